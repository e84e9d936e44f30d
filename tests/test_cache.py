"""`cxr.data.cache`: prepare (decode once, one memory-mapped array + index) and the Cache reader, on real films."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cxr.data import cache
from cxr.data import films as film_files
from cxr import images
from cxr.data.cache import Cache, CacheError, prepare

SIZE = 64


@pytest.fixture(scope="module")
def films_512(images_512) -> list[Path]:
    return sorted(images_512.glob("*.png"))


@pytest.fixture
def film_dir(tmp_path, films_512) -> Path:
    """4 real films (one in a subfolder), a truncated PNG, a text file named .jpg, and non-film files."""
    src = tmp_path / "films"
    (src / "sub").mkdir(parents=True)
    for f in films_512[:3]:
        shutil.copy(f, src)
    shutil.copy(films_512[3], src / "sub")
    (src / "broken.png").write_bytes(films_512[0].read_bytes()[:400])
    (src / "readme.jpg").write_text("not an image\n")
    (src / "notes.txt").write_text("ignored\n")
    (src / "._00000001_000.png").write_bytes(b"\0" * 64)  # macOS resource fork
    return src


def _expected(path: Path, size: int = SIZE) -> np.ndarray:
    return images.resize(images.read_image(path), size)


def test_prepare_caches_films_and_lists_bad_files(film_dir, tmp_path):
    out = tmp_path / "cache"
    report = prepare(film_dir, out, size=SIZE, workers=2, progress=False)
    assert (report.prepared, report.skipped, report.total) == (4, 0, 4)
    assert sorted(f["name"] for f in report.failed) == ["broken.png", "readme.jpg"]
    assert all(f["reason"] for f in report.failed)
    assert json.loads((out / "failed.json").read_text()) == report.failed
    assert sorted(report.ignored) == ["._00000001_000.png", "notes.txt"]

    c = Cache(out)
    assert len(c) == 4 and c.size == SIZE
    assert sorted(c.names) == sorted(p.name for p in film_dir.rglob("0*.png") if not p.name.startswith("."))
    assert (out / "images.u8").stat().st_size == 4 * SIZE * SIZE
    for name in c.names:
        path = next(film_dir.rglob(name))
        row = c[c.row(name)]
        assert row.dtype == np.uint8 and row.shape == (SIZE, SIZE)
        assert np.abs(c.read(name) - _expected(path)).max() <= 0.5 / 255 + 1e-6
        assert c.original_size(name) == (512, 512)
    view = c[0]
    assert np.shares_memory(view, c._array()) and not view.flags.writeable


def test_rerun_skips_done_films_and_appends_new_ones(film_dir, tmp_path, films_512):
    out = tmp_path / "cache"
    prepare(film_dir, out, size=SIZE, workers=1, progress=False)
    before = Cache(out)
    rows = {name: before[before.row(name)].copy() for name in before.names}

    again = prepare(film_dir, out, size=SIZE, workers=1, progress=False)
    assert (again.prepared, again.skipped, len(again.failed)) == (0, 4, 2)  # bad files are retried
    for f in films_512[4:6]:
        shutil.copy(f, film_dir)
    more = prepare(film_dir, out, size=SIZE, workers=1, progress=False)
    assert (more.prepared, more.skipped, more.total) == (2, 4, 6)

    after = Cache(out)
    assert after.names[:4] == before.names
    for name, row in rows.items():
        assert after.row(name) == before.row(name) and np.array_equal(after[after.row(name)], row)
    for f in films_512[4:6]:
        assert np.abs(after.read(f.name) - _expected(f)).max() <= 0.5 / 255 + 1e-6


def test_interrupted_run_keeps_finished_films_and_resumes(film_dir, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    real_load, calls = cache._load, []

    def dies_on_third(path, size):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_load(path, size)

    monkeypatch.setattr(cache, "_load", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare(film_dir, out, size=SIZE, workers=1, progress=False)
    monkeypatch.undo()
    kept = Cache(out).names
    assert len(kept) == 2  # the two films read before the stop are kept
    # bytes written after the last index (a crash between the two writes) are cut off by the next run
    with open(out / "images.u8", "ab") as f:
        f.write(b"\xff" * (SIZE * SIZE + 123))
    assert len(Cache(out)) == 2
    report = prepare(film_dir, out, size=SIZE, workers=1, progress=False)
    assert (report.prepared, report.skipped, report.total) == (2, 2, 4)
    assert (out / "images.u8").stat().st_size == 4 * SIZE * SIZE
    c = Cache(out)
    assert c.names[:2] == kept
    for name in c.names:
        assert np.abs(c.read(name) - _expected(next(film_dir.rglob(name)))).max() <= 0.5 / 255 + 1e-6


def test_errors_say_what_to_do(film_dir, tmp_path):
    out = tmp_path / "cache"
    prepare(film_dir, out, size=SIZE, workers=1, progress=False)
    with pytest.raises(CacheError, match="new --out"):
        prepare(film_dir, out, size=SIZE * 2, workers=1, progress=False)
    with pytest.raises(CacheError, match="cxr prepare"):
        Cache(film_dir)
    with pytest.raises(CacheError, match="empty or new folder"):
        prepare(film_dir, film_dir, size=SIZE, progress=False)  # --out pointed at the films themselves
    with pytest.raises(CacheError, match="not in the cache"):
        Cache(out).row("99999999_999.png")
    (out / "index.json").write_text("{truncated")
    with pytest.raises(CacheError, match="damaged"):
        Cache(out)


def test_find_films_refuses_clashing_names_and_sniffs_dicom(tmp_path, films_512):
    for d in ("a", "b"):
        (tmp_path / "clash" / d).mkdir(parents=True)
        shutil.copy(films_512[0], tmp_path / "clash" / d)
    with pytest.raises(cache.DataError, match="more than one subfolder"):
        film_files.find_films(tmp_path / "clash")
    (tmp_path / "pacs").mkdir()
    (tmp_path / "pacs" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (tmp_path / "pacs" / "LOG").write_bytes(b"plain text without a preamble" * 8)
    films, ignored = film_files.find_films(tmp_path / "pacs")
    assert list(films) == ["IM0001"] and [p.name for p in ignored] == ["LOG"]


def test_cache_pickles_without_its_array(film_dir, tmp_path):
    out = tmp_path / "cache"
    prepare(film_dir, out, size=SIZE, workers=1, progress=False)
    c = Cache(out)
    first = c[0].copy()
    blob = pickle.dumps(c)
    assert len(blob) < SIZE * SIZE  # the memory map stays behind; the copy maps the file itself
    assert np.array_equal(pickle.loads(blob)[0], first)


def test_prepare_cli(film_dir, tmp_path):
    from cxr.cli import app

    out = tmp_path / "cache"
    args = ["prepare", str(film_dir), "--out", str(out), "--size", str(SIZE), "--workers", "1"]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "prepared 4" in result.output and "failed 2" in result.output
    assert "broken.png" in result.output and "readme.jpg" in result.output
    assert len(Cache(out)) == 4
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert "prepared 0" in result.output and "skipped 4" in result.output
