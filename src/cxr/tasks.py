"""What a model predicts: the registry of tasks (outputs, activation, which films and targets they take).

A task is the one place that knows "2 outputs with a softmax" or "14 independent sigmoids": training,
evaluation, prediction and the checkpoint's metadata all ask it rather than testing the task's name.
No torch and no pandas here: the metadata and the web schemas import this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cxr.errors import CxrError
from cxr.findings import FINDINGS

ACTIVATIONS = ("sigmoid", "softmax")

# (N x F 0/1 labels over a data set's findings, those findings) -> (keep mask over N, targets of the kept)
Select = Callable[[np.ndarray, tuple[str, ...]], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Task:
    """outputs: the model's output columns, in order. activation: "sigmoid" (each output an independent
    probability) or "softmax" (outputs are exclusive classes). reported: what a user is shown; columns:
    the output index each reported name is read from."""

    name: str
    outputs: tuple[str, ...]
    activation: str
    reported: tuple[str, ...]
    columns: tuple[int, ...]
    select: Select

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"task {self.name}: activation must be one of {ACTIVATIONS}, not {self.activation!r}")
        if len(self.reported) != len(self.columns) or not all(0 <= c < len(self.outputs) for c in self.columns):
            raise ValueError(f"task {self.name}: each reported name needs one output column")

    def __reduce__(self):
        # Pickled by name (select may be a closure): a spawned training process looks it up again.
        return get_task, (self.name,)

    @property
    def softmax(self) -> bool:
        return self.activation == "softmax"

    def truth(self, targets: np.ndarray) -> np.ndarray:
        """N x len(reported) int8 labels from `select`'s targets (class indices for a softmax task)."""
        targets = np.asarray(targets)
        if self.softmax:
            return (targets.reshape(-1, 1) == np.asarray(self.columns)).astype(np.int8)
        return targets[:, list(self.columns)].astype(np.int8)


class UnknownTaskError(CxrError, ValueError):
    """A task name that is not registered (a ValueError too: it is a bad argument)."""


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Make `task` known by its name (to ModelMeta, `cxr train --task`, evaluation); returns it."""
    _TASKS[task.name] = task
    return task


def unregister_task(name: str) -> None:
    _TASKS.pop(name, None)


def task_names() -> tuple[str, ...]:
    return tuple(_TASKS)


def get_task(name: str) -> Task:
    """The registered task; a data set with findings of its own registers its task in its module,
    cxr.data.NAME, which is imported here on first use, so its checkpoints load wherever cxr runs."""
    if name not in _TASKS and isinstance(name, str) and name.isidentifier():
        import importlib

        try:
            importlib.import_module(f"cxr.data.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"cxr.data.{name}":
                raise
    try:
        return _TASKS[name]
    except KeyError:
        raise UnknownTaskError(f"unknown task {name!r}; expected one of: {', '.join(_TASKS)}") from None


def _columns_of(wanted: Sequence[str], findings: tuple[str, ...], task: str) -> list[int]:
    missing = [w for w in wanted if w not in findings]
    if missing:
        raise CxrError(f"task {task} needs the findings {', '.join(missing)}, which this data set does not label "
                       f"(it labels {', '.join(findings)}); choose a task made for it")
    return [findings.index(w) for w in wanted]


def multilabel(name: str, outputs: Sequence[str], *, with_finding_only: bool = False) -> Task:
    """Independent sigmoids over `outputs`; with_finding_only keeps only films carrying at least one."""
    outputs = tuple(outputs)

    def select(y: np.ndarray, findings: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        y = np.asarray(y, dtype=np.uint8)
        keep = y.any(axis=1) if with_finding_only else np.ones(len(y), dtype=bool)
        return keep, y[keep][:, _columns_of(outputs, findings, name)]

    return Task(name, outputs, "sigmoid", outputs, tuple(range(len(outputs))), select)


def one_vs_rest(name: str, finding: str, *, with_finding_only: bool = True) -> Task:
    """Two exclusive classes, ("All others", finding), under a softmax; the user is shown the finding's."""

    def select(y: np.ndarray, findings: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        y = np.asarray(y, dtype=np.uint8)
        keep = y.any(axis=1) if with_finding_only else np.ones(len(y), dtype=bool)
        return keep, y[keep][:, _columns_of([finding], findings, name)[0]].astype(np.int64)

    return Task(name, ("All others", finding), "softmax", (finding,), (1,), select)


# The paper's three: all films; films with a finding (its multilabel set); pneumothorax vs the others.
register_task(multilabel("multilabel", FINDINGS))
register_task(multilabel("multilabel-paper", FINDINGS, with_finding_only=True))
register_task(one_vs_rest("pneumothorax", "Pneumothorax"))


def probabilities(logits: np.ndarray, task_or_activation, platt=None) -> np.ndarray:
    """float32 probabilities: independent sigmoids (never renormalised to sum to 1), or a softmax over
    exclusive classes. Computed in float64, so fp32 inputs give the same numbers on every CPU.

    The one place calibration is applied, for every backend: given a ModelMeta (anything with `.platt`),
    or platt=(slopes, intercepts) per output column, each sigmoid output is sigmoid(a * logit + b)."""
    activation = getattr(task_or_activation, "activation", task_or_activation)
    if activation not in ACTIVATIONS:
        raise CxrError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    z = np.asarray(logits, dtype=np.float64)
    platt = getattr(task_or_activation, "platt", None) if platt is None else platt
    if platt is not None and activation == "sigmoid":
        z = z * np.asarray(platt[0], np.float64) + np.asarray(platt[1], np.float64)
    if activation == "softmax":
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)  # the sigmoid, without overflow for large |z|
