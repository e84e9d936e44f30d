"""torchxrayvision's DenseNet-121 weights (`densenet121-res224-nih`, `-all`, `-chex`, `-mimic_ch`, `-rsna`, `-pc`).

torchxrayvision stores each model as a whole pickled module; cxr never unpickles it itself: the weights are
loaded by `xrv.models.DenseNet(weights=NAME, cache_dir=...)`, torchxrayvision's own loader, from its cache
or from a file the user gives (shown to it as its cache), and only after cxr checked the file is there, so
nothing is ever downloaded. Carried over: the input convention (one channel in [-1024, 1024], centre crop,
skimage's resize: cxr.inference.preprocess), the output names (mapped onto our findings) and op_threshs.

op_threshs: torchxrayvision rescales each probability p so that its threshold t lands on 0.5 (`op_norm`).
cxr keeps p itself and uses t as the finding's threshold: p >= t is exactly op_norm(p) >= 0.5.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

from cxr.findings import FINDINGS
from cxr.meta import ModelMeta
from cxr.nets.imports import ARCH, Imported, ImportRefused, absent_assessment, build_linear, map_outputs, sha256

LICENCE = "Apache-2.0 (torchxrayvision, code and weights)"
HOME = "https://github.com/mlmed/torchxrayvision"
SCALE = 1024.0  # its pixel range is [-SCALE, SCALE]


def _xrv():
    try:
        import torchxrayvision as xrv
    except ImportError:
        raise ImportRefused("importing torchxrayvision weights needs the torchxrayvision package (it loads its own "
                            "files): pip install torchxrayvision==1.5.7") from None
    return xrv


def names() -> list[str]:
    """The DenseNet-121 weight names this torchxrayvision knows."""
    return sorted(k for k in _xrv().models.model_urls if k.startswith("densenet121-"))


def weights_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where torchxrayvision keeps `name`'s file (its own cache unless cache_dir says otherwise)."""
    xrv = _xrv()
    if name not in xrv.models.model_urls or not name.startswith("densenet121-"):
        raise ImportRefused(f"unknown torchxrayvision DenseNet weights {name!r}; known: {', '.join(names())}")
    folder = Path(cache_dir).expanduser() if cache_dir else Path(xrv.utils.get_cache_dir())
    return folder / os.path.basename(xrv.models.model_urls[name]["weights_url"])


def op_norm(p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """torchxrayvision's op_norm in numpy: p < t -> p / 2t, else 1 - (1 - p) / 2(1 - t); NaN t -> 0.5."""
    p, t = np.asarray(p, np.float64), np.broadcast_to(np.asarray(thresholds, np.float64), np.shape(p))
    out = np.full(p.shape, 0.5)
    low, high = (p < t) & ~np.isnan(t), ~(p < t) & ~np.isnan(t)
    out[low] = p[low] / (t[low] * 2)
    out[high] = 1.0 - (1.0 - p[high]) / ((1 - t[high]) * 2)
    return out


def convert(name: str, *, weights_file: str | os.PathLike | None = None,
            cache_dir: str | os.PathLike | None = None) -> Imported:
    xrv = _xrv()
    spec_path = weights_path(name, cache_dir)
    url = xrv.models.model_urls[name]["weights_url"]
    if weights_file is not None:
        source = Path(weights_file).expanduser()
        if not source.is_file():
            raise ImportRefused(f"--weights-file {source} does not exist")
    else:
        source = spec_path
        if not source.is_file():
            raise ImportRefused(f"{source}: torchxrayvision's {name} weights are not there and cxr never downloads. "
                                f"Fetch them once (wget {url} -O {source}), or pass the file with --weights-file.")
    with tempfile.TemporaryDirectory(prefix="cxr-xrv-") as tmp:
        # torchxrayvision looks in a cache folder for the file named as its URL: show it ours, read-only.
        os.symlink(source.resolve(), Path(tmp) / spec_path.name)
        try:
            net = xrv.models.DenseNet(weights=name, cache_dir=tmp)
        except Exception as e:  # noqa: BLE001 - torchxrayvision raises whatever torch.load raised
            raise ImportRefused(f"{source}: torchxrayvision could not load it as {name} ({type(e).__name__}: "
                                f"{e}). A truncated or damaged download? Fetch it again from {url}.") from None
    columns, dropped = map_outputs(list(net.targets), source, tuple(xrv.datasets.default_pathologies))
    model = build_linear(net.state_dict(), columns, source, fold_gray=True)
    op = net.op_threshs.tolist() if getattr(net, "op_threshs", None) is not None else [math.nan] * len(net.targets)
    thresholds = {f: float(op[j]) for f, j in columns.items() if math.isfinite(op[j])}
    absent = [f for f in FINDINGS if f not in columns]
    meta = ModelMeta(
        arch=ARCH, task="multilabel", outputs=list(FINDINGS), activation="sigmoid",
        input_size=int(getattr(net, "input_resolution", 224)), normalisation="torchxrayvision",
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), thresholds=thresholds,
        convention="torchxrayvision", head="linear", assessment=absent_assessment(columns, f"torchxrayvision {name}"),
        provenance={
            "source": "torchxrayvision", "weights": name, "url": url, "file": str(source), "sha256": sha256(source),
            "licence": LICENCE, "home": HOME, "loaded_by": f"torchxrayvision {xrv.__version__}",
            "description": xrv.models.model_urls[name].get("description", ""),
            "outputs_of_source": list(net.targets), "dropped_outputs": dropped, "absent_outputs": absent,
            "thresholds": "torchxrayvision op_threshs: positive when p >= t, i.e. its op_norm(p) >= 0.5",
            "input": "1 channel scaled to [-1024, 1024], centre crop, skimage resize to 224 (fed as 3 equal "
                     "channels, conv0 divided by 3)",
            "claimed_auc": {"values": {}, "status": "claim", "where": f"{HOME} (the torchxrayvision paper, "
                            "Cohen et al. 2022); not measured by cxr until `cxr evaluate`"},
        })
    notes = [f"dropped outputs cxr does not read: {', '.join(dropped)}"] if dropped else []
    if absent:
        notes.append(f"not assessed (no output in this model): {', '.join(absent)}")
    return Imported(model, meta, notes)
