"""`cxr.data.datasets`: folder and cache behave alike; FilmDataset feeds DataLoader workers reproducibly."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cxr import images
from cxr.data.cache import Cache, prepare
from cxr.data.datasets import FilmDataset, FilmFolder, open_films
from cxr.errors import DataError
from cxr.findings import FINDINGS, NORMALISATIONS
from cxr.data.transforms import eval_transform, train_transform

MEAN, STD = NORMALISATIONS["imagenet"]


@pytest.fixture(scope="module")
def folder(images_512, tmp_path_factory) -> Path:
    """6 real films, one in a subfolder, as a user's folder would have them."""
    root = tmp_path_factory.mktemp("films")
    (root / "batch2").mkdir()
    films = sorted(images_512.glob("*.png"))[:6]
    for f in films[:5]:
        shutil.copy(f, root)
    shutil.copy(films[5], root / "batch2")
    return root


@pytest.fixture(scope="module")
def cache_dirs(folder, tmp_path_factory) -> dict[int, Path]:
    out = tmp_path_factory.mktemp("caches")
    for size in (96, 128):
        prepare(folder, out / str(size), size=size, workers=1, progress=False)
    return {size: out / str(size) for size in (96, 128)}


def test_open_films_picks_folder_or_cache(folder, cache_dirs, tmp_path):
    films = open_films(folder)
    assert isinstance(films, FilmFolder)
    assert len(films.names) == 6 and all(n.endswith(".png") and "/" not in n for n in films.names)
    name = films.names[-1]
    assert np.array_equal(films.read(name), images.read_image(films.path(name)))
    cached = open_films(cache_dirs[96])
    assert isinstance(cached, Cache) and sorted(cached.names) == sorted(films.names)
    gray = cached.read(name)
    assert gray.dtype == np.float32 and gray.shape == (96, 96) and 0 <= gray.min() <= gray.max() <= 1
    with pytest.raises(DataError, match="no such folder"):
        open_films(tmp_path / "nowhere")
    with pytest.raises(DataError, match="no PNG, JPEG or DICOM"):
        open_films(tmp_path)


def test_folder_and_cache_give_the_same_eval_tensors(folder, cache_dirs):
    films, tf = FilmFolder(folder), eval_transform(96, MEAN, STD)
    same_size = Cache(cache_dirs[96])  # only the uint8 rounding differs: at most half a grey level
    larger = Cache(cache_dirs[128])  # resized twice (512 -> 128 -> 96): a little softer
    for name in films.names:
        want = tf(films.read(name))
        assert (tf(same_size.read(name)) - want).abs().max() <= 0.5 / 255 / min(STD) + 1e-5
        assert (tf(larger.read(name)) - want).abs().mean() < 0.03


def test_dataset_targets_and_checks(folder):
    films = FilmFolder(folder)
    names = films.names[:3]
    multi = FilmDataset(films, names, np.eye(3, len(FINDINGS)), eval_transform(64, MEAN, STD))
    x, y = multi[1]
    assert x.shape == (3, 64, 64) and y.dtype == torch.float32 and y.tolist()[:3] == [0, 1, 0]
    binary = FilmDataset(films, names, [0.0, 1.0, 1.0], eval_transform(64, MEAN, STD))
    assert binary.targets.dtype == torch.int64 and binary[2][1].item() == 1
    with pytest.raises(ValueError, match="whole numbers"):
        FilmDataset(films, names, [0.5, 1, 0], eval_transform(64, MEAN, STD))
    with pytest.raises(ValueError, match="3 names but 2 targets"):
        FilmDataset(films, names, [0, 1], eval_transform(64, MEAN, STD))
    with pytest.raises(DataError, match="1 of 3 labelled films"):
        FilmDataset(films, [*names[:2], "99999999_999.png"], [0, 1, 0], eval_transform(64, MEAN, STD))


def _epoch(dataset, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=2, shuffle=True, num_workers=2)
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_dataloader_workers_are_seeded_reproducibly(cache_dirs):
    films = Cache(cache_dirs[96])
    targets = np.arange(len(films) * 2, dtype=np.float32).reshape(len(films), 2)
    dataset = FilmDataset(films, films.names, targets, train_transform(64, MEAN, STD))
    assert len(pickle.dumps(dataset)) < 96 * 96  # workers receive the index, not the pixels
    x1, y1 = _epoch(dataset, seed=0)
    x2, y2 = _epoch(dataset, seed=0)
    x3, _ = _epoch(dataset, seed=1)
    assert x1.shape == (len(films), 3, 64, 64) and y1.shape == (len(films), 2)
    assert sorted(y1[:, 0].tolist()) == sorted(targets[:, 0].tolist())  # every film once per epoch
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
