"""Checkpoints: one `.safetensors` file, the tensors plus the JSON of `ModelMeta` under the header key "cxr".

Nothing here ever unpickles a file from outside (ImageNet weight files are read with
`torch.load(weights_only=True)`, which refuses arbitrary objects), and nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from cxr.errors import ModelError
from cxr.meta import ModelMeta
from cxr.nets.head import CxrNet


def torch_load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise ModelError(f"{path}: not a plain weights file that torch.load(weights_only=True) accepts ({e})") from None


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict, but every mismatch becomes one ModelError that lists what did not fit."""
    own = module.state_dict()
    # Pre-0.4 files (torchvision's DenseNet one) lack num_batches_tracked; BatchNorm then fills in 0.
    missing = sorted(k for k in set(own) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(v)}): {', '.join(v[:3])}{', ...' if len(v) > 3 else ''}"
                 for label, v in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if v]
        raise ModelError(f"{source}: weights do not fit this model; " + "; ".join(parts))
    module.load_state_dict(state)


PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin"}


EXTRA = "extra."  # key prefix of tensors stored beside the network (e.g. the gate's statistics)


def save(path: str | os.PathLike, model: nn.Module, meta: ModelMeta,
         extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model + meta as one .safetensors file, atomically (a reader never sees half a file).

    extra: further named tensors, stored under "extra.NAME"; `load` ignores them, `load_extra` reads them.
    """
    from safetensors.torch import save_file

    path = Path(path)
    held = (getattr(model, "members", 1), getattr(model, "shared_body", False))
    if held != (meta.members, meta.shared_body):  # else the file would load as another network
        raise ModelError(f"the model holds {held[0]} networks, its metadata says members={meta.members} (shared "
                         f"body: the model's {held[1]}, the metadata's {meta.shared_body}): set ModelMeta.members "
                         "and shared_body to match")
    # contiguous + clone: channels_last weights are strided and safetensors refuses tensors sharing storage.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tensors.update({EXTRA + k: torch.as_tensor(v).detach().cpu().contiguous().clone() for k, v in (extra or {}).items()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt", "cxr": meta.to_json()})
        os.chmod(tmp, 0o644)  # safetensors writes 0600; a model is meant to be shared (and packaged)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _pickle_message(path: Path) -> str:
    return (f"{path} looks like a PyTorch pickle: cxr never unpickles (a pickle can run arbitrary code). "
            "Convert it once, where you trust it: torch.load(it, weights_only=True) the state dict, load it "
            "into cxr.nets.build(arch, n_outputs) and write it with cxr.nets.save(NAME.safetensors, model, meta).")


def _read_checkpoint(path: Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], ModelMeta]:
    from safetensors import safe_open

    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(_pickle_message(path))
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(EXTRA)}  # network only
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        with open(path, "rb") as f:
            start = f.read(2)
        # Sniff only after safetensors failed: its first bytes are a length and may be anything.
        if start == b"PK" or start[:1] == b"\x80":
            raise ModelError(_pickle_message(path)) from None
        raise ModelError(f"{path} is not a readable .safetensors checkpoint ({e})") from None
    if "cxr" not in header:
        raise ModelError(f"{path} is a safetensors file but not a cxr checkpoint (no 'cxr' metadata in its header)")
    return tensors, ModelMeta.from_json(header["cxr"])


def read_meta(path: str | os.PathLike) -> ModelMeta:
    """A checkpoint's ModelMeta from its header alone (no tensors read: `cxr models` lists many)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ModelError(f"{path} is not a readable .safetensors checkpoint ({e})") from None
    if "cxr" not in header:
        raise ModelError(f"{path} is a safetensors file but not a cxr checkpoint (no 'cxr' metadata in its header)")
    return ModelMeta.from_json(header["cxr"])


def load_into(model: CxrNet, path: Path) -> None:
    """Initialise `model` from a checkpoint of the same arch; a different number of outputs keeps a fresh last layer."""
    tensors, meta = _read_checkpoint(path)
    if meta.members > 1:
        raise ModelError(f"{path} is an ensemble of {meta.members} networks; training starts from one network: "
                         "use one of the fold models it was built from (fold-K/model.safetensors of its run)")
    if meta.arch != model.arch:
        raise ModelError(f"{path} holds a {meta.arch} model; cannot initialise a {model.arch} from it")
    if len(meta.outputs) != model.num_outputs:
        # Fine-tuning to another task: keep everything but the last Linear, which starts fresh.
        last = f"head.{len(model.head) - 1}."
        own = model.state_dict()
        tensors = {k: (own[k] if k.startswith(last) else v) for k, v in tensors.items()}
    load_strict(model, tensors, str(path))


def load_extra(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The extra tensors saved with `save(..., extra=)`, by name (without the prefix); {} when there are none."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k[len(EXTRA):]: f.get_tensor(k) for k in f.keys() if k.startswith(EXTRA)}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise ModelError(f"{path} is not a readable .safetensors checkpoint ({e})") from None


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[CxrNet, ModelMeta]:
    """(model in eval mode, its metadata) from a cxr .safetensors checkpoint."""
    path = Path(path)
    tensors, meta = _read_checkpoint(path, map_location)
    if meta.members > 1:
        from cxr.nets.ensemble import Ensemble

        model = Ensemble(meta.arch, len(meta.outputs), meta.members, head=meta.head,
                         shared_body=meta.shared_body).to(map_location)
    else:
        model = CxrNet(meta.arch, len(meta.outputs), head=meta.head).to(map_location)
    load_strict(model, tensors, str(path))
    return model.eval(), meta


BUNDLED_NAME = "bundled"  # what `cxr models` lists the bundled model as


def resolve_model(spec: str | os.PathLike | None = None) -> Path:
    """The checkpoint file --model means (cxr.inference.artefacts.resolve_model: the torch-free runtime needs it)."""
    from cxr.inference.artefacts import resolve_model as resolve

    return resolve(spec)


def load_model(spec: str | os.PathLike | None = None) -> tuple[CxrNet, ModelMeta]:
    """load(spec) after resolve_model: None means the model bundled with cxr, a bare name one in the models folder."""
    return load(resolve_model(spec))
