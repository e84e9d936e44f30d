"""Importing other projects' DenseNet-121 models into cxr checkpoints (`cxr import SOURCE ...`).

One module per source (`torchxrayvision`, `chexnet`, `jrzech`), each giving `convert(...) -> Imported`. What
they share lives here: the file's SHA-256, mapping the source's output names onto our 14 findings (findings
it lacks keep a placeholder column that is never assessed; names it has that we do not are dropped and
recorded; names nobody knows are refused), building the CxrNet (torchvision's linear head) from a
torchvision-layout state dict, and writing the result atomically (a refusal never leaves a partial file).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cxr.errors import ModelError
from cxr.findings import FINDINGS, canonical
from cxr.meta import ModelMeta

SOURCES = ("torchxrayvision", "chexnet", "jrzech")
ARCH = "densenet121"

# The ChestX-ray14 order CheXNet and reproduce-chexnet both use for their 14 sigmoids (the paper's order).
CHESTXRAY14 = FINDINGS

# Key names of torchvision's pre-0.4 DenseNet files (CheXNet's too): 'norm.1' is now 'norm1'.
_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


class ImportRefused(ModelError):
    """The file cannot be imported as asked; the message names the file and what to do."""


@dataclass
class Imported:
    """A converted model: its network, its metadata, and notes for the user."""

    model: torch.nn.Module
    meta: ModelMeta
    notes: list[str] = field(default_factory=list)


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def modern_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's pre-0.4 DenseNet key names ('norm.1', 'conv.2') renamed as torchvision does on load."""
    return {(m.group(1) + m.group(2) if (m := _OLD_KEY.match(k)) else k): v for k, v in state.items()}


def map_outputs(names: list[str], path, known_extra: tuple[str, ...] = ()) -> tuple[dict[str, int], list[str]]:
    """{our finding: source column} for the source's output names, and the names dropped (known to the
    source, not among our findings). '' marks an unused column. Any other name is refused."""
    columns, dropped, unknown = {}, [], []
    for j, name in enumerate(names):
        if not name:
            continue
        try:
            ours = canonical(name)
        except ValueError:
            (dropped if name in known_extra else unknown).append(name)
            continue
        if ours in columns:
            raise ImportRefused(f"{path}: output {name!r} appears twice; cannot tell which column is {ours}")
        columns[ours] = j
    if unknown:
        raise ImportRefused(f"{path}: unknown output names {unknown}; cxr reads the 14 ChestX-ray14 findings "
                            f"({', '.join(FINDINGS)}). Give the model's outputs in order with --outputs.")
    if not columns:
        raise ImportRefused(f"{path}: none of the model's outputs {names} is a ChestX-ray14 finding")
    return columns, dropped


def build_linear(state: dict[str, torch.Tensor], columns: dict[str, int], path, *,
                 classifier: str = "classifier", fold_gray: bool = False):
    """A CxrNet (linear head, the 14 findings) from a torchvision-layout DenseNet-121 state dict: features.*
    and `classifier`.weight/bias. Rows for findings the source lacks are zero (a placeholder logit 0)."""
    from cxr.nets.checkpoint import load_strict
    from cxr.nets.head import CxrNet

    state = modern_keys(state)
    w, b = state.get(f"{classifier}.weight"), state.get(f"{classifier}.bias")
    if w is None or b is None or w.ndim != 2:
        raise ImportRefused(f"{path}: no {classifier}.weight/bias Linear layer: not a DenseNet-121 classifier "
                            "of the kind this source saves (wrong file, or a different architecture)")
    if max(columns.values()) >= w.shape[0]:
        raise ImportRefused(f"{path}: the classifier has {w.shape[0]} outputs, fewer than the names given")
    body = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    conv0 = body.get("conv0.weight")
    if fold_gray and conv0 is not None and conv0.shape[1] == 1:
        # One gray channel: cxr feeds the film as 3 equal channels, so a third of the kernel on each.
        body["conv0.weight"] = conv0.repeat(1, 3, 1, 1) / 3
    extra = sorted(k for k in state if not k.startswith(("features.", f"{classifier}.")) and k != "op_threshs")
    if extra:
        raise ImportRefused(f"{path}: unexpected tensors {extra[:3]}: not a DenseNet-121 of this source's layout")
    model = CxrNet(ARCH, len(FINDINGS), head="linear")
    weight = torch.zeros(len(FINDINGS), w.shape[1], dtype=torch.float32)
    bias = torch.zeros(len(FINDINGS), dtype=torch.float32)
    for f, j in columns.items():
        weight[FINDINGS.index(f)], bias[FINDINGS.index(f)] = w[j].float(), b[j].float()
    tensors = {f"body.features.{k}": v for k, v in body.items()}
    tensors.update({"head.2.weight": weight, "head.2.bias": bias})
    try:
        load_strict(model, tensors, str(path))
    except ModelError as e:
        raise ImportRefused(f"{e}. cxr imports DenseNet-121 only: is this the right file for this source?") from None
    return model.eval()


def absent_assessment(columns: dict[str, int], source: str) -> dict[str, dict]:
    """HONEST's per-finding evidence for the findings the source has no output for: never assessed."""
    return {f: {"note": "the imported model has no output for this finding", "source": source}
            for f in FINDINGS if f not in columns}


def write(out: str | os.PathLike, imported: Imported) -> Path:
    """Save atomically (nets.save writes a temporary file and renames it): a failure leaves no partial file."""
    from cxr.nets.checkpoint import save

    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise ImportRefused(f"--out {out}: cxr checkpoints are .safetensors files; name it {out.stem}.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    return save(out, imported.model, imported.meta)
