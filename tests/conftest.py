"""Shared fixtures. Real-data tests find ChestX-ray14 through $CXR_DATA (default ../shared/data/nih).

Where the data is absent (an outside contributor's machine) they skip with the reason; with
CXR_REQUIRE_DATA=1 (set by .ci/run) a missing folder is a failure instead, so CI never skips them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxr.settings import data_dir

# Keep the 2-core CI machine responsive when pytest-xdist runs two workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _need(path: Path, what: str) -> Path:
    if path.exists():
        return path
    reason = f"{what} not found at {path}: set CXR_DATA to the ChestX-ray14 folder (see README)"
    if os.environ.get("CXR_REQUIRE_DATA"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def nih_dir() -> Path:
    return _need(data_dir(), "ChestX-ray14 data folder")


@pytest.fixture(scope="session")
def metadata_csv(nih_dir: Path) -> Path:
    return _need(nih_dir / "Data_Entry_2017_v2020.csv.gz", "ChestX-ray14 metadata")


@pytest.fixture(scope="session")
def images_512(nih_dir: Path) -> Path:
    return _need(nih_dir / "images-512", "512 px films")


@pytest.fixture(scope="session")
def images_1024(nih_dir: Path) -> Path:
    return _need(nih_dir / "images-1024", "full-size films")


@pytest.fixture(scope="session")
def images_64(nih_dir: Path) -> Path:
    return _need(nih_dir / "images-64", "64 px films")
