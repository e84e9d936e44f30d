"""A checkpoint's metadata: what a model needs besides its tensors to be used correctly.

Stored as JSON in the checkpoint's header; the fields and their JSON never change meaning, so every
checkpoint written before still loads. No torch and no pandas: the web schemas and the model card read it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

from cxr.errors import CxrError, ModelError
from cxr.findings import NORMALISATIONS
from cxr.tasks import get_task

# The architecture registry lives with the networks (torch); cxr.nets installs its check here on import.
# Without cxr.nets loaded nothing can be built from a meta anyway, and building checks the name again.
_arch_check: Callable[[str], object] | None = None


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
