"""A checkpoint's metadata: what a model needs besides its tensors to be used correctly.

Stored as JSON in the checkpoint's header; the fields and their JSON never change meaning, so every
checkpoint written before still loads. No torch and no pandas: the web schemas and the model card read it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable

from cxr.errors import CxrError, ModelError
from cxr.findings import NORMALISATIONS
from cxr.tasks import get_task

# The architecture registry lives with the networks (torch); cxr.nets installs its check here on import.
# Without cxr.nets loaded nothing can be built from a meta anyway, and building checks the name again.
_arch_check: Callable[[str], object] | None = None

CONVENTIONS = ("cxr", "torchxrayvision", "torchvision")
TTAS = ("none", "tencrop")
HEADS = ("paper", "linear")


def check_architectures_with(check: Callable[[str], object]) -> None:
    """Validate ModelMeta.arch with `check` (raises ModelError for an unknown name) from now on."""
    global _arch_check
    _arch_check = check


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
    # Platt scaling per output, on the logit: output -> {"a": slope, "b": intercept}; absent = sigmoid(logit).
    calibration: dict[str, dict] = dataclasses.field(default_factory=dict)
    # How the thresholds were chosen: {"policy": "spec:0.90", "fitted_on": "out-of-fold 5-fold CV", "n_films": N}.
    operating_point: dict = dataclasses.field(default_factory=dict)
    # Per reported finding, the evidence that the model can tell it: {"auc", "auc_ci", "n_positive",
    # "n_negative", "source", optionally "brier_skill", "ece", "note"}. Absent: `evidence` falls back to metrics.
    assessment: dict[str, dict] = dataclasses.field(default_factory=dict)
    # Input convention of an imported model (cxr.inference.preprocess): how a gray film becomes its input.
    # convention: "cxr" (squash to input_size), "torchxrayvision" ([-1024, 1024], centre crop, its resize) or
    # "torchvision" (8-bit PIL resize of the shorter side to `resize`, centre crop). tta: "none" or "tencrop".
    convention: str = "cxr"
    resize: int | None = None  # shorter side before cropping (None: input_size)
    tta: str = "none"
    head: str = "paper"  # "paper" (fastai's head) or "linear" (torchvision's classifier: average pool, Linear)
    # Networks in the checkpoint: 1, or K of one architecture read as one (cxr.nets.ensemble: the mean of
    # their logits; their feature maps side by side are the gate's features and Grad-CAM's target).
    members: int = 1
    # An ensemble whose members' bodies are one and the same (frozen at pretrained weights): stored and run
    # once, every head reading its whole feature map.
    shared_body: bool = False

    def __post_init__(self) -> None:
        if _arch_check is not None:
            _arch_check(self.arch)
        try:
            task = get_task(self.task)
        except CxrError as e:
            raise ModelError(str(e)) from None
        self.outputs = list(self.outputs)
        if task.softmax:  # exclusive classes: all of them, in the task's order
            if tuple(self.outputs) != task.outputs:
                raise ModelError(f"task {task.name} needs outputs {list(task.outputs)}, got {self.outputs}")
        else:  # independent findings: any of the task's, each once
            unknown = [o for o in self.outputs if o not in task.outputs]
            if unknown or not self.outputs or len(set(self.outputs)) != len(self.outputs):
                raise ModelError(f"outputs must be distinct findings among {', '.join(task.outputs)}; "
                                 f"got {self.outputs} (unknown: {unknown})")
        if self.activation != task.activation:
            raise ModelError(f"task {task.name} uses activation {task.activation!r}, not {self.activation!r}")
        if not isinstance(self.input_size, int) or self.input_size < 32:
            raise ModelError(f"input_size must be an integer >= 32, got {self.input_size!r}")
        self._check_normalisation()
        self._check_thresholds()
        self._check_honesty(task)
        self._check_input(task)

    def _check_input(self, task) -> None:
        if self.convention not in CONVENTIONS or self.tta not in TTAS or self.head not in HEADS:
            raise ModelError(f"unknown input convention {self.convention!r} / tta {self.tta!r} / head {self.head!r}; "
                             f"known: {CONVENTIONS} / {TTAS} / {HEADS}")
        if not isinstance(self.members, int) or self.members < 1:
            raise ModelError(f"members must be a whole number >= 1 (networks in the checkpoint), got {self.members!r}")
        if not isinstance(self.shared_body, bool) or (self.shared_body and self.members < 2):
            raise ModelError(f"shared_body must be true or false, and true only for an ensemble (members >= 2); "
                             f"got {self.shared_body!r} with members={self.members}")
        if self.resize is not None and (not isinstance(self.resize, int) or self.resize < self.input_size):
            raise ModelError(f"resize must be an integer >= input_size {self.input_size}, got {self.resize!r}")
        if self.tta != "none" and (self.convention != "torchvision" or task.softmax):
            raise ModelError(f"tta {self.tta!r} needs the torchvision convention and independent findings")

    def _check_honesty(self, task) -> None:
        """Calibration, operating point and assessment: plain JSON of known outputs (old checkpoints have none)."""
        if self.calibration and task.softmax:
            raise ModelError(f"task {task.name} has exclusive classes (softmax): per-output Platt calibration "
                             "does not apply; remove 'calibration' from the metadata")
        unknown = [k for k in self.calibration if k not in self.outputs]
        if unknown:
            raise ModelError(f"calibration for unknown outputs {unknown}; outputs are {self.outputs}")
        try:
            self.calibration = {k: {"a": float(v["a"]), "b": float(v["b"])} for k, v in self.calibration.items()}
        except (TypeError, KeyError, ValueError):
            raise ModelError(f"calibration must map outputs to {{'a': slope, 'b': intercept}}, "
                             f"got {self.calibration!r}") from None
        if not all(math.isfinite(v["a"]) and math.isfinite(v["b"]) for v in self.calibration.values()):
            raise ModelError(f"calibration parameters must be finite numbers, got {self.calibration}")
        if not isinstance(self.operating_point, dict) or not isinstance(self.assessment, dict):
            raise ModelError("operating_point and assessment must be JSON objects")
        extra = [k for k in self.assessment if k not in task.reported]
        if extra or not all(isinstance(v, dict) for v in self.assessment.values()):
            raise ModelError(f"assessment must map reported findings ({', '.join(task.reported)}) to objects; "
                             f"unknown: {extra}")

    @property
    def platt(self) -> tuple[list[float], list[float]] | None:
        """(slopes, intercepts) over all outputs, identity where an output is uncalibrated; None: none is."""
        if not self.calibration:
            return None
        cal = [self.calibration.get(o, {"a": 1.0, "b": 0.0}) for o in self.outputs]
        return [c["a"] for c in cal], [c["b"] for c in cal]

    @property
    def policy(self) -> str | None:
        """The operating-point policy the thresholds were chosen by, or None when the model does not say."""
        return self.operating_point.get("policy")

    def evidence(self, finding: str) -> dict | None:
        """What shows the model can tell `finding`: its own assessment entry, else (older checkpoints, the
        bundled model) the per-finding validation metrics a training run stored; None when there is none."""
        if finding in self.assessment:
            return self.assessment[finding]
        m = self.metrics or {}
        entry = (m.get("per_finding") or {}).get(finding)
        if not isinstance(entry, dict) or not ({"auc", "auc_ci"} & set(entry)):
            return None
        films = f", {m['n_images']} films" if m.get("n_images") else ""
        return {"auc": entry.get("auc"), "auc_ci": entry.get("auc_ci"), "n_positive": entry.get("n_positive"),
                "n_negative": entry.get("n_negative"), "source": f"{m.get('subset', 'validation')} split{films}"}

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
