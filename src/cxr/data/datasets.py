"""Films with labels for training and evaluation: a folder of image files or a prepared cache, same interface.

Both sources have `.names` (file names such as 00000001_000.png, the key NIH's metadata uses) and
`.read(name) -> gray float32 in [0, 1]`; `FilmDataset` pairs them with targets and a transform from
`cxr.data.transforms`. Everything here pickles cheaply, as DataLoader workers need.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cxr import images
from cxr.data.cache import INDEX, Cache
from cxr.data.films import find_films
from cxr.errors import DataError


class FilmFolder:
    """PNG, JPEG and DICOM films anywhere under `root`, known by file name. Decodes on every read."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._paths, self.ignored = find_films(self.root)
        if not self._paths:
            raise DataError(f"{self.root}: no PNG, JPEG or DICOM films found (subfolders included); "
                            "give the folder that holds the films")
        self.names: tuple[str, ...] = tuple(sorted(self._paths))

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: str) -> bool:
        return name in self._paths

    def path(self, name: str) -> Path:
        try:
            return self._paths[name]
        except KeyError:
            raise DataError(f"film {name} is not under {self.root}: check the folder or the label file") from None

    def read(self, name: str) -> np.ndarray:
        """Gray float32 H x W in [0, 1] at the file's own resolution."""
        return images.read_image(self.path(name))

    def __repr__(self) -> str:
        return f"FilmFolder({str(self.root)!r}, {len(self)} films)"


def open_films(path: str | os.PathLike) -> Cache | FilmFolder:
    """A prepared cache (a folder with index.json) or else a folder of films."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such folder; give a folder of films or a cache made by `cxr prepare`")
    return Cache(path) if (path / INDEX).exists() else FilmFolder(path)


def _as_targets(targets, n: int) -> torch.Tensor:
    """float32 N x K (multi-label, one column per finding) or int64 N (class index for 2 classes)."""
    t = torch.as_tensor(np.asarray(targets))
    if len(t) != n:
        raise ValueError(f"{n} names but {len(t)} targets")
    if t.ndim == 2:
        return t.to(torch.float32)
    if t.ndim == 1:
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError("1-D targets are class indices and must be whole numbers; "
                             "use N x K floats for multi-label")
        return t.to(torch.int64)
    raise ValueError(f"targets must be N x K (multi-label) or N (class index), got shape {tuple(t.shape)}")


class FilmDataset(Dataset):
    """`(transform(films.read(names[i])), targets[i])`; every name is checked against `films` up front."""

    def __init__(self, films: Cache | FilmFolder, names: Sequence[str], targets, transform: Callable):
        self.films, self.names, self.transform = films, list(names), transform
        self.targets = _as_targets(targets, len(self.names))
        missing = [n for n in self.names if n not in films]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(self.names)} labelled films are not in {films!r}, e.g. {missing[0]}: "
                "point at the folder or cache that holds them, or drop them from the labels"
            )

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.films.read(self.names[i])), self.targets[i]
