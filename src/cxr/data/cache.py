"""Decode every film once: `prepare` writes one memory-mapped uint8 array plus an index; `Cache` reads it.

Decoding a 1024 px PNG costs ~20 ms; reading a 256 px row of the cache costs microseconds, so an epoch is
bounded by the GPU rather than by zlib. A cache folder holds:

    images.u8    raw uint8, N x S x S, row-major; row i is the film at position i of the index
    index.json   {"format": "cxr-cache", "version": 1, "size": S, "films": [[name, width, height], ...]}
    failed.json  the films the last run could not read: [{"name", "path", "reason"}, ...]

The index is the source of truth. Rows are appended to images.u8 and flushed before the index that
counts them is replaced (write to a temporary file, then rename), so an interrupted run leaves at most
unindexed bytes at the end of images.u8, which the next run cuts off and redoes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import closing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from cxr import images
from cxr.data.films import find_films
from cxr.errors import DataError

DATA, INDEX, FAILED = "images.u8", "index.json", "failed.json"
FORMAT, VERSION = "cxr-cache", 1
_CHECKPOINT_ROWS, _CHECKPOINT_SECONDS = 2000, 60.0  # how much work an interruption may cost


class CacheError(DataError):
    """A cache folder is missing, damaged, or does not match what was asked of it."""


def _load(path: str, size: int) -> tuple[int, int, bytes] | str:
    """Runs in a worker: (width, height, size*size uint8 bytes), or the reason the film cannot be read."""
    try:
        gray = images.read_image(path)
        small = images.resize(gray, size)
    except images.ImageError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - one odd file must not end a run of 100,000
        return f"{path}: unexpected {type(e).__name__}: {e}"
    h, w = gray.shape
    return w, h, np.clip(np.rint(small * 255.0), 0, 255).astype(np.uint8).tobytes()


def _read_index(folder: Path) -> dict:
    path = folder / INDEX
    if not path.is_file():
        raise CacheError(
            f"{folder} is not a film cache (it has no {INDEX}): create one with "
            f"`cxr prepare IMAGES_DIR --out {folder}`"
        )
    try:
        index = json.loads(path.read_text())
        ok = index.get("format") == FORMAT and isinstance(index["size"], int) and isinstance(index["films"], list)
    except (ValueError, KeyError, AttributeError, TypeError):
        ok = False
    if not ok:
        raise CacheError(f"{path} is damaged or not a cxr cache index: "
                         f"delete {folder} and run `cxr prepare` again")
    if index.get("version") != VERSION:
        raise CacheError(f"{path} has cache format version {index.get('version')}, this cxr reads {VERSION}: "
                         "run `cxr prepare` into a new --out folder")
    return index


def _write_json(path: Path, obj) -> None:
    """Replace `path` in one step, so a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, separators=(",", ":")))
    os.replace(tmp, path)


@dataclass
class PrepareReport:
    out_dir: Path
    size: int
    prepared: int = 0  # films decoded and added by this run
    skipped: int = 0  # films already in the cache
    failed: list[dict] = field(default_factory=list)  # {"name", "path", "reason"}
    ignored: list[str] = field(default_factory=list)  # files that are not films, relative to images_dir
    total: int = 0  # films in the cache after this run
    seconds: float = 0.0


class _Writer:
    """Appends rows to images.u8 and checkpoints the index after them."""

    def __init__(self, out: Path, size: int, films: list):
        self.out, self.size, self.films = out, size, films
        row_bytes = size * size
        data = out / DATA
        have = data.stat().st_size if data.exists() else 0
        if have < len(films) * row_bytes:
            raise CacheError(f"{data} is shorter than {INDEX} says: the cache is damaged; "
                             f"delete {out} and run `cxr prepare` again")
        self.file = open(data, "r+b" if data.exists() else "wb")
        self.file.truncate(len(films) * row_bytes)  # drop rows an interrupted run wrote but never indexed
        self.file.seek(0, os.SEEK_END)
        self.last_checkpoint, self.pending = time.monotonic(), 0

    def add(self, name: str, width: int, height: int, row: bytes) -> None:
        self.file.write(row)
        self.films.append([name, width, height])
        self.pending += 1
        if self.pending >= _CHECKPOINT_ROWS or time.monotonic() - self.last_checkpoint > _CHECKPOINT_SECONDS:
            self.checkpoint()

    def checkpoint(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())  # the rows must be on disk before an index that counts them
        index = {"format": FORMAT, "version": VERSION, "size": self.size, "films": self.films}
        _write_json(self.out / INDEX, index)
        self.last_checkpoint, self.pending = time.monotonic(), 0

    def close(self) -> None:
        try:
            self.checkpoint()
        finally:
            self.file.close()


def _open_out(out: Path, size: int) -> list:
    """The films already in `out` (empty for a new cache), after checking `out` may be written to."""
    if (out / INDEX).exists():
        index = _read_index(out)
        if index["size"] != size:
            raise CacheError(f"{out} holds films at {index['size']} px, not {size} px: "
                             f"use a new --out folder for {size} px (or --size {index['size']})")
        return index["films"]
    if out.exists() and not out.is_dir():
        raise CacheError(f"{out} is a file: give a folder for --out")
    ours = {DATA, FAILED, INDEX + ".tmp", FAILED + ".tmp"}  # leftovers of a run interrupted early
    strangers = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.exists() else []
    if strangers:
        raise CacheError(f"{out} already holds other files ({', '.join(strangers[:3])}) and is not a cache: "
                         "give an empty or new folder for --out")
    out.mkdir(parents=True, exist_ok=True)
    return []


def _results(todo: list[tuple[str, Path]], size: int, workers: int) -> Iterator[tuple[str, Path, object]]:
    """(name, path, _load result) in completion order, keeping a bounded number of films in flight."""
    if workers <= 1:
        for name, path in todo:
            yield name, path, _load(str(path), size)
        return
    # forkserver: forking a parent that runs torch's thread pools (tests, notebooks) can deadlock
    with ProcessPoolExecutor(workers, mp_context=get_context("forkserver")) as pool:
        pending, queue = {}, iter(todo)
        try:
            while True:
                for name, path in queue:
                    pending[pool.submit(_load, str(path), size)] = (name, path)
                    if len(pending) >= 4 * workers:
                        break
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    name, path = pending.pop(fut)
                    try:
                        result = fut.result()
                    except BrokenProcessPool:
                        raise CacheError(
                            f"a worker process died while reading {path} (out of memory?): run `cxr prepare` "
                            "again with fewer --workers; the films finished so far are kept") from None
                    yield name, path, result
        finally:
            pool.shutdown(cancel_futures=True)


def prepare(images_dir: str | os.PathLike, out_dir: str | os.PathLike, size: int = 256,
            workers: int | None = None, progress: bool = True) -> PrepareReport:
    """Decode each film under `images_dir` once, resize it (antialiased) to size x size and add it to the
    cache in `out_dir`. Films already there are skipped; unreadable files are listed in failed.json."""
    if not 16 <= size <= 4096:
        raise CacheError(f"--size {size} is out of range: use 16 to 4096 px (the paper's models take 224)")
    start = time.monotonic()
    images_dir, out = Path(images_dir), Path(out_dir)
    films, ignored = find_films(images_dir)
    if not films:
        raise CacheError(f"{images_dir}: no PNG, JPEG or DICOM films found (subfolders included); "
                         "give the folder that holds the films")
    done = _open_out(out, size)
    have = {row[0] for row in done}
    todo = [(name, films[name]) for name in sorted(films) if name not in have]
    report = PrepareReport(out, size, skipped=len(films) - len(todo),
                           ignored=[str(p.relative_to(images_dir)) for p in ignored])
    workers = max(1, min(workers or len(os.sched_getaffinity(0)), len(todo)))

    from rich.progress import MofNCompleteColumn, Progress, TimeRemainingColumn

    writer = _Writer(out, size, done)
    bar = Progress(*Progress.get_default_columns()[:-1], MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not progress)
    try:  # closing(): an error while writing must stop the workers at once, not when garbage is collected
        with bar, closing(_results(todo, size, workers)) as results:
            task = bar.add_task(f"caching films at {size} px", total=len(todo))
            for name, path, result in results:
                if isinstance(result, str):
                    report.failed.append({"name": name, "path": str(path), "reason": result})
                else:
                    writer.add(name, *result)
                    report.prepared += 1
                bar.advance(task)
    finally:  # also on Ctrl-C: keep what was finished, so a re-run only does the rest
        writer.close()
        _write_json(out / FAILED, report.failed)
    report.total, report.seconds = len(writer.films), time.monotonic() - start
    return report


class Cache:
    """Reader of a prepared cache. `cache[i]` is a zero-copy uint8 S x S view of the memory map.

    The memory map opens on first use and is left out of pickles, so each DataLoader worker maps the
    file itself instead of receiving a copy of the array.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = _read_index(self.path)
        self.size: int = index["size"]
        self._films = index["films"]
        self.names: tuple[str, ...] = tuple(row[0] for row in self._films)
        self._rows = {name: i for i, name in enumerate(self.names)}
        data = self.path / DATA
        need = len(self.names) * self.size * self.size
        if (data.stat().st_size if data.exists() else 0) < need:
            raise CacheError(f"{data} is shorter than {INDEX} says: the cache is damaged; "
                             f"delete {self.path} and run `cxr prepare` again")
        self._data: np.ndarray | None = None

    def _array(self) -> np.ndarray:
        if self._data is None:
            shape = (len(self.names), self.size, self.size)
            if shape[0] == 0:  # numpy cannot map zero bytes
                self._data = np.empty(shape, np.uint8)
            else:
                self._data = np.memmap(self.path / DATA, dtype=np.uint8, mode="r", shape=shape)
        return self._data

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._rows

    def __getitem__(self, i: int) -> np.ndarray:
        return self._array()[i]

    def row(self, name: str) -> int:
        try:
            return self._rows[name]
        except KeyError:
            raise CacheError(f"film {name} is not in the cache {self.path}: "
                             "run `cxr prepare` on the folder that holds it with this --out") from None

    def original_size(self, name: str) -> tuple[int, int]:
        """(width, height) of the film before it was resized."""
        _, width, height = self._films[self.row(name)]
        return width, height

    def read(self, name: str) -> np.ndarray:
        """Float32 S x S in [0, 1], like `images.read_image` after `images.resize`."""
        return np.divide(self[self.row(name)], np.float32(255), dtype=np.float32)

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, {len(self)} films at {self.size} px)"
