"""The registry of data sets: a name -> where its labels come from (and its official split lists, if any).

Adding a data set is one module under cxr.data, named after it, that decorates a class with
`@register_dataset("name")`. The class has `findings` (the names its labels use), `read_labels(path)
-> LabelTable` and, optionally, `official_lists(folder, known) -> OfficialLists`. A data set named
NAME is imported on first use from cxr.data.NAME, so nothing else needs to change.
"""

from __future__ import annotations

import importlib
from typing import Any

from cxr.errors import DataError

_DATASETS: dict[str, Any] = {}
_BUILT_IN = ("nih",)  # imported before names are listed, so that an error can name them


def register_dataset(name: str):
    """Class decorator: `@register_dataset("nih")`. The registry holds one instance of the class."""

    def add(cls):
        _DATASETS[name] = cls()
        return cls

    return add


def unregister_dataset(name: str) -> None:
    _DATASETS.pop(name, None)


def _import(name: str) -> None:
    try:
        importlib.import_module(f"cxr.data.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"cxr.data.{name}":  # the module exists but lacks something it needs: say so
            raise


def dataset_names() -> tuple[str, ...]:
    for name in _BUILT_IN:
        _import(name)
    return tuple(_DATASETS)


def get_dataset(name: str):
    if name not in _DATASETS and name.isidentifier():
        _import(name)
    try:
        return _DATASETS[name]
    except KeyError:
        dataset_names()
        raise DataError(f"unknown data set {name!r}; known: {', '.join(_DATASETS)} "
                        f"(a data set NAME is registered by the module cxr.data.NAME)") from None
