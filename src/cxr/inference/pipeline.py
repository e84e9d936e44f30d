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
from cxr.errors import CxrError
from cxr.images import capture as camera
from cxr.inference import gate
from cxr.inference import preprocess as convention

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
    capture: Capture | None = None  # what the capture stage did before the film was read
    variants: np.ndarray | None = None  # V x 3 x S x S: the stability check's test-time variants


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple, std: tuple) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(mean, np.float32).reshape(3, 1, 1), np.asarray(std, np.float32).reshape(3, 1, 1)


def preprocess(gray: np.ndarray, meta) -> np.ndarray:
    """Gray float32 H x W in [0, 1] -> 3 x S x S float32: squashed to meta.input_size (antialiased), the
    gray copied to three channels, minus meta.mean, divided by meta.std (in that order, in float32)."""
    if convention.custom(meta):  # an imported model's own preprocessing (maybe ten crops: 10 x 3 x S x S)
        return convention.prepare(gray, meta)
    gray = np.asarray(gray)
    if gray.ndim != 2:
        raise ValueError(f"expected a 2-D gray film (H x W), got shape {gray.shape}")
    small = images.resize(gray, int(meta.input_size))
    mean, std = _affine(tuple(map(float, meta.mean)), tuple(map(float, meta.std)))
    out = np.subtract(small[None], mean, dtype=np.float32)
    out /= std
    return out


def admit(index: int, film: images.Film, meta, keep_gray: bool, *, crop: camera.Quad | str | None = None,
          find: bool = True, variants: bool = False) -> Decoded:
    """A decoded film through the capture stage (crop, orientation) and the gate's image checks, then
    preprocessed if it passed. variants: also the stability check's test-time variants."""
    d = Decoded(index, film.name, size=film.size)
    gray, d.capture = capture(film.gray, crop=crop, find=find, side=int(meta.input_size))
    # colourfulness is the whole photo's: a room and a warm light box around a found film are not the film's
    colour = 0.0 if d.capture.crop is not None else film.colourfulness or 0.0  # None: not measured (DICOM)
    d.refused = gate.image_check(gray, colour)
    if d.refused is None and d.capture.refused:
        d.refused = d.capture.message  # never read a film that may be turned or inverted as it is
    if d.refused is None:
        d.x = preprocess(gray, meta)
        d.gray = gray if keep_gray else None
        if variants:
            from cxr.inference import stability

            d.variants = stability.inputs(gray, meta)
    return d


def decode(index: int, src: Source, name: str, meta, keep_gray: bool, strict: bool = False, *,
           variants: bool = False) -> Decoded:
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
    return admit(index, film, meta, keep_gray, variants=variants)


# --- the capture stage: a photographed film is found, cropped and put upright before it is read ----------

# Below this orientation confidence a film is refused, not read: on held-out patients' films turned and
# inverted 8 ways, every wrong answer scored under 0.7 (0.6 left 8 of 2,040 wrong and confident), and
# 0.8% of upright films score under it (refused; tests/test_capture.py holds both).
MIN_ORIENTATION_CONFIDENCE = 0.7
# A photographed film is rectified straight to this many times the model's input side (its long side),
# from a copy box-shrunk by a whole factor to at most twice that (so the warp's bilinear taps do not
# alias): a full-resolution warp cost more than the network, and a warp's cost is per output pixel
# (448 px a side took 4x the time of 224 px, for the same numbers within the |dp| the targets allow).
READ_SCALE = 1.0
MIN_CROP_SHARE = 0.05  # a crop smaller than this share of the photo is a mistake, not a film


class CropError(CxrError):
    """A crop the caller gave (the page's adjusted corners) that cannot be a film's outline."""


@dataclass(frozen=True)
class Capture:
    """What the capture stage did before a film was read, in the words and coordinates a user needs."""

    crop: tuple[tuple[float, float], ...] | None  # 4 corners (x, y), clockwise from top-left, in the image
    #                                               as decoded (after EXIF rotation); None: the whole image
    crop_source: str  # "found" (a light box in a photo), "given" (by the caller) or "none"
    k_rot90: int      # the film as sent was the upright film turned by np.rot90(film, k_rot90) ...
    inverted: bool    # ... then made a negative
    confidence: float  # the orientation scorer's (0.125: no idea, 1: certain)
    message: str      # what was done ('' when nothing), or why the film was refused
    refused: bool = False

    @property
    def changed(self) -> bool:
        return self.crop is not None or (not self.refused and (self.k_rot90 % 4 != 0 or self.inverted))

    def to_dict(self) -> dict:
        return {"crop": [list(p) for p in self.crop] if self.crop else None, "crop_source": self.crop_source,
                "rotated_degrees": 90 * (self.k_rot90 % 4), "inverted": self.inverted,
                "orientation_confidence": round(self.confidence, 4), "message": self.message,
                "refused": self.refused}


def capture(gray: np.ndarray, *, crop: camera.Quad | str | None = None, find: bool = True,
            side: int = 224) -> tuple[np.ndarray, Capture]:
    """(the film to read, what was done) for a decoded image.

    crop: a Quad the caller chose (the page's adjusted crop), "full" (read the whole image, no search),
    or None (look for a film on a light box when `find`). A film that is not found in a photo passes
    through as the same array. Orientation and polarity are then judged; a confident turn or negative
    is undone and said, an unsure one refused (the returned film is then as it was: `probabilities_of`
    scores it so, as it scores films the gate refuses).
    """
    work = camera.working_copy(gray)
    quad, source = None, "none"
    if isinstance(crop, camera.Quad):
        quad, source = (None, "none") if crop.is_frame(gray.shape[1], gray.shape[0]) else (crop, "given")
    elif find and crop is None:
        quad = camera.find_film(gray, work=work)
        source = "found" if quad is not None else "none"
    film = gray if quad is None else _rectified(gray, quad, side)
    o = camera.orientation(film if quad is not None else work[0])  # a film's thumbnail comes from the copy
    said = {"found": "the film was found in the photo and cropped to it",
            "given": "the film was cropped where you marked it"}.get(source, "")
    corners = quad.points if quad is not None else None
    if o.confidence < MIN_ORIENTATION_CONFIDENCE:
        why = (f"could not tell which way up this film is, or whether it is a negative (orientation "
               f"confidence {o.confidence:.2f}, under {MIN_ORIENTATION_CONFIDENCE:g}), so it was not read; "
               "send the film upright, bones white, filling the frame")
        return film, Capture(corners, source, o.k_rot90, o.inverted, o.confidence, why, refused=True)
    turned = camera.describe(o)
    if turned:
        done = {(True, False): "it was turned", (False, True): "it was made positive",
                (True, True): "it was turned and made positive"}[(o.k_rot90 % 4 != 0, o.inverted)]
        said = "; ".join(filter(None, [said, f"{turned}; {done} before reading"]))
        film = camera.correct(film, o.k_rot90, o.inverted)
    return film, Capture(corners, source, o.k_rot90, o.inverted, o.confidence, said)


def _rectified(gray: np.ndarray, quad: camera.Quad, side: int) -> np.ndarray:
    sides = _sides(quad)
    size = _read_size(quad, side, sides)
    shrink = int(max(sides) / (2 * max(size)))  # whole factor: PIL's reduce is a cheap box filter
    if shrink >= 2:
        quad, box = quad.scaled(1 / shrink, 1 / shrink), None
        h, w = -(-gray.shape[0] // shrink), -(-gray.shape[1] // shrink)  # the shrunk copy's
        if not camera.leaves(quad, w, h):  # else rectify fills with the whole copy's level: all of it is needed
            # the warp's bilinear taps lie in the quad's bounding box, a pixel beyond at most: 2 for rounding
            xs, ys = [x for x, _ in quad.points], [y for _, y in quad.points]
            box = (max(int(min(xs)) - 2, 0), max(int(min(ys)) - 2, 0),
                   min(int(max(xs)) + 3, w), min(int(max(ys)) + 3, h))
        gray = camera.shrunk(gray, shrink, box)
    return camera.rectify(gray, quad, size=size)


def _sides(quad: camera.Quad) -> tuple[float, float]:
    """The quad's mean width and height (4 sides in one call: numpy's hypot, element by element)."""
    p = quad.array()
    d = p[[1, 2, 3, 2]] - p[[0, 3, 0, 1]]
    side = np.hypot(d[:, 0], d[:, 1])
    return 0.5 * (side[0] + side[1]), 0.5 * (side[2] + side[3])


def _read_size(quad: camera.Quad, side: int, sides: tuple[float, float] | None = None) -> tuple[int, int]:
    """(width, height) to rectify to: the film's own aspect, its long side READ_SCALE x the input side
    (never more than the photo has). `sides`: `_sides(quad)`, when the caller has it."""
    w, h = sides or _sides(quad)
    scale = min(1.0, READ_SCALE * side / max(w, h))
    return max(8, round(w * scale)), max(8, round(h * scale))


def crop_quad(points, width: int, height: int) -> camera.Quad:
    """The caller's crop, checked: 4 corners (x, y) in the image as decoded, inside it (1% slack), a
    convex quadrilateral covering at least MIN_CROP_SHARE of it. Raises CropError saying what is wrong."""
    try:
        p = np.asarray(points, dtype=np.float64).reshape(4, 2)
    except (TypeError, ValueError):
        raise CropError("crop: give 4 corners as x,y pairs (8 numbers) in the image's pixels") from None
    if not np.isfinite(p).all():
        raise CropError("crop: the corners must be finite numbers")
    slack = 0.01 * max(width, height)
    if (p < -slack).any() or (p[:, 0] > width + slack).any() or (p[:, 1] > height + slack).any():
        raise CropError(f"crop: every corner must lie inside the {width} x {height} image")
    quad = camera.Quad.from_array(np.clip(p, 0, [width, height]))
    q = quad.array()
    d = np.roll(q, -1, axis=0) - q  # the sides; a convex outline turns the same way at every corner
    turns = d[:, 0] * np.roll(d, -1, axis=0)[:, 1] - d[:, 1] * np.roll(d, -1, axis=0)[:, 0]
    if not (all(t > 0 for t in turns) or all(t < 0 for t in turns)):
        raise CropError("crop: the 4 corners must outline a convex quadrilateral (no crossed sides)")
    if quad.area() < MIN_CROP_SHARE * width * height:
        raise CropError(f"crop: the outline covers under {MIN_CROP_SHARE:.0%} of the image; mark the whole film")
    return quad


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
