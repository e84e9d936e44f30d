"""How much faster training reads films from a prepared cache than by decoding PNGs.

Run from the repository root: `.venv/bin/python benchmarks/cache.py`. Prepares a 256 px cache of the
full-size (1024 px) sample films into a temporary folder, then reads films (repeated to at least 1,000
reads) (a) from the cache, as training does (uint8 row -> float32 in [0, 1]) and (b) by decoding the PNG
and resizing it to 256 px. The last line is the ratio of the two throughputs.

Both read from a warm page cache; on a cold disk the PNGs (~0.5 MB each) also cost more I/O than a 64 kB
cache row, so the real gap is larger.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

from cxr import images
from cxr.data.cache import Cache, prepare
from cxr.settings import data_dir

SIZE, MIN_READS = 256, 1000


def _rate(label: str, read, names: list[str]) -> float:
    read(names[0])  # first touch (page-in, lazy memory map) is not what a long epoch pays
    start = time.perf_counter()
    for name in names:
        read(name)
    seconds = time.perf_counter() - start
    print(f"{label}: {len(names)} reads in {seconds:.2f} s = {len(names) / seconds:,.0f} films/s")
    return len(names) / seconds


def main() -> int:
    src = data_dir() / "images-1024"
    if not src.is_dir():
        print(f"{src} not found: set CXR_DATA to the ChestX-ray14 folder (see README)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        start = time.perf_counter()
        report = prepare(src, Path(tmp) / "cache", size=SIZE, progress=False)
        print(f"prepare: {report.prepared} films at {SIZE} px in {time.perf_counter() - start:.1f} s "
              f"({len(report.failed)} failed)")
        cache = Cache(Path(tmp) / "cache")
        paths = {p.name: p for p in src.glob("*.png")}
        names = list(cache.names) * math.ceil(MIN_READS / len(cache))
        cached = _rate("cache (uint8 -> float32)", cache.read, names)
        decoded = _rate(f"png (read_image + resize to {SIZE})",
                        lambda n: images.resize(images.read_image(paths[n]), SIZE), names)
    print(f"cache vs png: {cached / decoded:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
