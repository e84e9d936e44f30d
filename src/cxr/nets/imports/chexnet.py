"""CheXNet reimplementation (arnoweng/CheXNet `model.pth.tar`) and jrzech/reproduce-chexnet `pretrained/checkpoint`.

Both are torchvision DenseNet-121 with `classifier = Sequential(Linear(1024, 14), Sigmoid())` over the 14
ChestX-ray14 findings in the paper's order, fed 8-bit RGB films normalised with ImageNet's mean/std:
- CheXNet: a dict whose 'state_dict' was saved from DataParallel ('module.densenet121.' prefixes) with
  torchvision's old 'norm.1'/'conv.1' names; read with torch.load(weights_only=True), so never unpickled.
  Its test procedure: resize 256, ten crops of 224, the mean of the crops' probabilities (`tta="tencrop"`).
- reproduce-chexnet: a whole pickled model in a dict ('model'); unpickling runs code from the file, so it
  is done only when the user says they trust the file (`trust_pickle`). Resize 224, centre crop 224.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cxr.findings import FINDINGS
from cxr.meta import ModelMeta
from cxr.nets.imports import ARCH, CHESTXRAY14, Imported, ImportRefused, absent_assessment, build_linear
from cxr.nets.imports import map_outputs, sha256

CHEXNET_HOME = "https://github.com/arnoweng/CheXNet"
JRZECH_HOME = "https://github.com/jrzech/reproduce-chexnet"
PICKLE_RISK = ("a pickle can run any code when it is loaded: unpickle only a file you trust (downloaded by you "
               "from the project itself), ideally in a throw-away environment")
# arnoweng/CheXNet's README, column "Our Implemented CheXNet" (test split of its own); a claim, not measured here.
CHEXNET_CLAIMED = {"Atelectasis": 0.8321, "Cardiomegaly": 0.9107, "Effusion": 0.8860, "Infiltration": 0.7145,
                   "Mass": 0.8653, "Nodule": 0.8037, "Pneumonia": 0.7655, "Pneumothorax": 0.8857,
                   "Consolidation": 0.8157, "Edema": 0.9017, "Emphysema": 0.9422, "Fibrosis": 0.8523,
                   "Pleural_Thickening": 0.7948, "Hernia": 0.9416}


def _exists(path: Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ImportRefused(f"{path} does not exist")
    return path


def _strip(state: dict, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k.replace("classifier.0.", "classifier.")] = v  # Sequential(Linear, Sigmoid): the Linear
    return out


def _meta(columns, *, source: str, path: Path, resize: int, tta: str, provenance: dict) -> ModelMeta:
    return ModelMeta(
        arch=ARCH, task="multilabel", outputs=list(FINDINGS), activation="sigmoid", input_size=224,
        normalisation="imagenet", convention="torchvision", resize=resize, tta=tta, head="linear",
        assessment=absent_assessment(columns, source),
        provenance={"file": str(path), "sha256": sha256(path), "absent_outputs": [f for f in FINDINGS
                                                                                  if f not in columns],
                    **provenance})


def _columns(outputs, n_rows: int, path: Path) -> dict[str, int]:
    names = list(outputs or CHESTXRAY14)
    if len(names) != n_rows:
        raise ImportRefused(f"{path}: the classifier has {n_rows} outputs but {len(names)} names were given; "
                            "give its outputs in order with --outputs")
    return map_outputs(names, path)[0]


def _rows(state: dict, path: Path) -> int:
    w = state.get("classifier.weight")
    if w is None:
        raise ImportRefused(f"{path}: no DenseNet-121 classifier (classifier.0.weight) in it: not this project's "
                            "checkpoint, or a different architecture")
    return int(w.shape[0])


def convert_chexnet(path: str | os.PathLike, *, tta: str = "tencrop", outputs=None) -> Imported:
    path = _exists(Path(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, damaged, or holding objects beyond tensors
        raise ImportRefused(f"{path}: not a CheXNet model.pth.tar that loads without unpickling code ({e}). "
                            f"A truncated download? Fetch it again from {CHEXNET_HOME}.") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImportRefused(f"{path}: expected a dict with a 'state_dict' of tensors (CheXNet's format)")
    state = _strip(state, ("module.", "densenet121."))
    columns = _columns(outputs, _rows(state, path), path)
    model = build_linear(state, columns, path)
    if tta not in ("tencrop", "none"):
        raise ImportRefused(f"--tta {tta!r}: expected tencrop or none")
    meta = _meta(columns, source="CheXNet (arnoweng)", path=path, resize=256, tta=tta, provenance={
        "source": "chexnet", "home": CHEXNET_HOME, "licence": "see the repository's licence (arnoweng/CheXNet); NIH data terms apply",
        "input": "8-bit RGB, resize 256, " + ("ten crops of 224, mean probability" if tta == "tencrop"
                                               else "centre crop 224") + ", ImageNet mean/std",
        "claimed_auc": {"values": CHEXNET_CLAIMED, "status": "claim",
                        "where": f"{CHEXNET_HOME} README, column 'Our Implemented CheXNet' (as quoted by "
                                 "other projects: check it there); not measured by cxr until `cxr evaluate`"}})
    return Imported(model, meta)


def convert_jrzech(path: str | os.PathLike, *, trust_pickle: bool = False, outputs=None) -> Imported:
    path = _exists(Path(path))
    if not trust_pickle:
        raise ImportRefused(f"{path} is a whole pickled model (reproduce-chexnet's format) and {PICKLE_RISK}. "
                            "If you trust it, run again with --trust-pickle: cxr then writes a .safetensors file "
                            "that never needs pickle again.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated or damaged pickle
        raise ImportRefused(f"{path}: cannot be unpickled ({type(e).__name__}: {e}). A truncated download? "
                            f"Fetch pretrained/checkpoint again from {JRZECH_HOME}.") from None
    net = ckpt.get("model") if isinstance(ckpt, dict) else ckpt
    if not isinstance(net, torch.nn.Module):
        raise ImportRefused(f"{path}: expected a dict with the whole model under 'model' (reproduce-chexnet's format)")
    state = _strip(net.state_dict(), ("module.",))
    columns = _columns(outputs, _rows(state, path), path)
    model = build_linear(state, columns, path)
    meta = _meta(columns, source="reproduce-chexnet (jrzech)", path=path, resize=224, tta="none", provenance={
        "source": "jrzech", "home": JRZECH_HOME, "licence": "see the repository (code); NIH data terms apply",
        "unpickled": "with --trust-pickle, once; this file needs no pickle",
        "input": "8-bit RGB, resize 224, centre crop 224, ImageNet mean/std",
        "claimed_auc": {"values": {}, "status": "claim",
                        "where": f"{JRZECH_HOME} README; not measured by cxr until `cxr evaluate`"}})
    return Imported(model, meta)
