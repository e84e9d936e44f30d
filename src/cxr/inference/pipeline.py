"""From inputs to batches: decode (once), check, preprocess, in a small thread pool ahead of the network.

PNG/JPEG decoding and resizing release the GIL, so films are decoded while the previous batch is
inferred. Preprocessing is numpy (no torch): the same numbers as `cxr.data.transforms.preprocess`,
bit for bit (tests/test_predict.py holds them to that), which training and its augmentations use.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cxr import images
from cxr.inference import gate

Source = str | os.PathLike | bytes


@dataclass
class Decoded:
    """An input on its way to the network: x is set when it passed the image checks."""

    index: int
    name: str
    x: np.ndarray | None = None  # 3 x S x S float32, normalised
    size: tuple[int, int] | None = None  # (width, height)
    gray: np.ndarray | None = None  # kept only when heatmaps (or low-res copies) need it
    refused: str | None = None
    error: str | None = None


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple, std: tuple) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(mean, np.float32).reshape(3, 1, 1), np.asarray(std, np.float32).reshape(3, 1, 1)


def preprocess(gray: np.ndarray, meta) -> np.ndarray:
    """Gray float32 H x W in [0, 1] -> 3 x S x S float32: squashed to meta.input_size (antialiased), the
    gray copied to three channels, minus meta.mean, divided by meta.std (in that order, in float32)."""
    gray = np.asarray(gray)
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D gray film (H x W), got shape {gray.shape}")
    small = images.resize(gray, int(meta.input_size))
    mean, std = _affine(tuple(map(float, meta.mean)), tuple(map(float, meta.std)))
    out = np.subtract(small[None], mean, dtype=np.float32)
    out /= std
    return out


def admit(index: int, film: images.Film, meta, keep_gray: bool) -> Decoded:
    """A decoded film through the gate's image checks, then preprocessed if it passed."""
    d = Decoded(index, film.name, size=film.size)
    d.refused = gate.image_check(film.gray, film.colourfulness or 0.0)  # None: not measured (DICOM is gray)
    if d.refused is None:
        d.x = preprocess(film.gray, meta)
        d.gray = film.gray if keep_gray else None
    return d


def decode(index: int, src: Source, name: str, meta, keep_gray: bool, strict: bool = False) -> Decoded:
    """One input read, checked and preprocessed; an unreadable one is a Decoded with .error, or (strict)
    an images.ImageError."""
    try:
        film = images.read_film(src, name=name)
    except images.ImageError as e:
        if strict:
            raise
        return Decoded(index, name, error=str(e))
    except Exception as e:  # noqa: BLE001 - one bad film must never stop a batch
        message = f"{name}: cannot be read ({type(e).__name__}: {e})"
        if strict:
            raise images.ImageError(message) from None
        return Decoded(index, name, error=message)
    return admit(index, film, meta, keep_gray)


def ordered(work: Callable[[int], object], n: int, *, workers: int, ahead: int) -> Iterator:
    """work(0), ..., work(n - 1) in order, computed up to `ahead` items ahead in `workers` threads."""
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="cxr-decode")
    pending: deque = deque()
    todo = iter(range(n))
    try:
        for i in todo:
            pending.append(pool.submit(work, i))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            i = next(todo, None)
            if i is not None:
                pending.append(pool.submit(work, i))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def batches(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def names_of(inputs: Sequence[Source], names: Sequence[str] | None) -> list[str]:
    """The label of each input in results and messages: the given names, the path, or 'input i' for bytes."""
    from cxr.errors import CxrError

    if names is not None:
        if len(names) != len(inputs):
            raise CxrError(f"{len(names)} names for {len(inputs)} inputs")
        return [str(n) for n in names]
    return [f"input {i}" if isinstance(s, (bytes, bytearray, memoryview)) else os.fspath(s)
            for i, s in enumerate(inputs)]
