"""Training: the paper's DenseNet-121 recipe on Lightning (one-cycle Adam, two phases, class weights).

Reproducibility is built in rather than hoped for: the shuffle order is a function of (seed, epoch),
augmentation randomness a function of (seed, epoch, film), dropout a function of (seed, step). So a run
resumed from its last checkpoint after a kill -9, or the same run on 2 processes, retraces the same path.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cxr.tasks import Task


@dataclass
class TrainConfig:
    data: list[Path]
    metadata: Path
    out: Path
    dataset: str = "nih"  # a registered data set (cxr.data.registry): whose label file --metadata is
    task: str = "multilabel"
    split: str = "patient"
    seed: int = 0
    val_fraction: float | None = None   # None: the split's own default (cxr.data.splits.make_split)
    test_fraction: float | None = None
    lists: Path | None = None  # folder with NIH's train_val_list.txt / test_list.txt (split=official)
    arch: str = "densenet121"
    weights: str | None = "imagenet"
    size: int = 224
    batch_size: int = 64
    epochs: int = 30
    lr: float = 1e-2
    weight_decay: float = 1e-3
    head_epochs: int = 0
    head_lr: float | None = None
    loss: str = "weighted"
    precision: str = "auto"
    channels_last: bool | None = None  # None: where it is faster (see default_channels_last)
    augment: bool = True
    capture_aug: float = 0.0  # phone-capture augmentations (cxr.data.capture), each step with this probability
    freeze_bn: bool = False  # BatchNorm statistics fixed: for tiny per-device batches (and exact DDP parity)
    dropout: tuple[float, float] = (0.25, 0.5)
    workers: int | None = None
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: str = "auto"
    max_films: int | None = None
    resume: bool = False
    progress: bool = True
    # Explicit film names {"train": [...], "val": [...]} instead of `split` (a cross-validation fold, or a
    # refit on every film with an empty "val": no validation, thresholds left to the caller).
    parts: dict | None = None
    command: str = field(default_factory=lambda: " ".join(["cxr", *sys.argv[1:]]))


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by (seed, epoch) and keeps this rank's share.

    It yields `epoch * n + index`, so the dataset can seed each film's augmentation by epoch too.
    With one process it is a seeded RandomSampler; with several it matches DistributedSampler (each
    rank takes every world-th index), so one process at batch 2b sees what two see at batch b.
    """

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1):
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch = 0
        self.per_rank = math.ceil(n / world) if not shuffle else n // world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()[: self.per_rank * self.world]
        else:  # evaluation: pad by repeating so every rank gets the same count; duplicates dropped later
            order = list(range(self.n))
            order += order[: self.per_rank * self.world - self.n]
        return iter(self.epoch * self.n + i for i in order[self.rank :: self.world])


class SeededFilms(Dataset):
    """Wraps a FilmDataset: decodes `epoch * n + index` and seeds that film's augmentation."""

    def __init__(self, inner: Dataset, seed: int):
        self.inner, self.seed = inner, seed

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key: int):
        epoch, i = divmod(int(key), len(self.inner))
        torch.manual_seed((self.seed * 1_000_003 + epoch * 100_003 + i) % (2**63))
        x, y = self.inner[i]
        return x, y, i


def default_precision(accelerator: str) -> str:
    """AMP on GPUs (bf16 where supported, else fp16); fp32 on every CPU. bf16 on a CPU is opt-in
    (`--precision bf16-mixed`): a CPU with native bf16 would otherwise train different weights, and report
    different numbers, from one without it, and every reported number must not depend on the CPU."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def default_channels_last(accelerator: str) -> bool:
    """channels_last on GPUs, where it pays. On CPUs the default layout: on an AVX2-only CPU DenseNet-121
    trained slower in channels_last, and a layout chosen by CPU features would make results CPU-dependent."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_workers(requested: int | None) -> int:
    if requested is not None:
        return requested
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def config_dict(cfg: TrainConfig) -> dict:
    out = {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if k == "data" else v)
           for k, v in asdict(cfg).items()}
    if cfg.parts is not None:  # the names are in split.json; the metadata keeps the counts
        out["parts"] = {k: len(v) for k, v in cfg.parts.items()}
    return out


def steps_per_epoch(n_train: int, batch_size: int, world: int) -> int:
    return max(1, (n_train // world) // batch_size)


@dataclass
class Prepared:
    """Everything `fit` needs to know about the data, decided once and saved as split.json."""

    train: Dataset
    val: Dataset | None  # None: a refit on every film, nothing held out
    n_train: int
    class_names: list[str]
    task: Task
    class_weights: np.ndarray | None
    pos_weight: np.ndarray | None
    split: dict


def _subset(sources, part, transform):
    from torch.utils.data import ConcatDataset

    from cxr.data.datasets import FilmDataset

    lookup = {n: i for i, n in enumerate(part.names)}
    parts = []
    for films in sources:
        mine = sorted(n for n in films.names if n in lookup)
        if mine:
            parts.append(FilmDataset(films, mine, part.targets[[lookup[n] for n in mine]], transform))
    return ConcatDataset(parts) if parts else None


def prepare_data(cfg: TrainConfig, mean, std) -> Prepared:
    """Labels from the data set's label file, joined by file name to the films found under every --data source."""
    from cxr.data.datasets import open_films
    from cxr.data.labels import TaskData, labelled
    from cxr.data.splits import class_weights, pos_weight
    from cxr.data.transforms import eval_transform, train_transform
    from cxr.errors import DataError

    sources = [open_films(p) for p in cfg.data]
    present = set().union(*(set(s.names) for s in sources))
    split_spec = cfg.parts if cfg.parts is not None else cfg.split
    train_part, val_part, info = labelled(
        cfg.dataset, present, cfg.task, split_spec, metadata=cfg.metadata, seed=cfg.seed, val=cfg.val_fraction,
        test=cfg.test_fraction, lists=cfg.lists, max_films=cfg.max_films)
    if len(info.all) < 4:
        raise DataError(f"only {len(info.all)} of the films under {', '.join(map(str, cfg.data))} are in "
                        f"{cfg.metadata} for task {cfg.task!r}; check --data and --metadata")
    aug = (train_transform(cfg.size, mean, std, capture=cfg.capture_aug) if cfg.augment
           else eval_transform(cfg.size, mean, std))
    train = _subset(sources, train_part, aug)
    val = _subset(sources, val_part, eval_transform(cfg.size, mean, std))
    refit = cfg.parts is not None and not cfg.parts.get("val")
    if train is None or (val is None and not refit):
        raise DataError(f"the {cfg.split} split left no training or no validation films among {len(info.all)}; "
                        "give more films or a larger --val-fraction")
    task, split = info.task, info.split
    weights = class_weights(TaskData(task.name, None, train_part.targets, task.outputs))
    if split is None:  # explicit parts: describe them as make_split would
        split = _explicit_split(cfg, train_part, val_part)
    return Prepared(
        train=SeededFilms(train, cfg.seed), val=SeededFilms(val, cfg.seed) if val is not None else None,
        n_train=len(train),
        class_names=list(task.outputs), task=task,
        class_weights=np.array([weights[c] for c in task.outputs]) if task.softmax else None,
        pos_weight=None if task.softmax else pos_weight(train_part.targets, task.outputs),
        split={"kind": split.kind, "seed": split.seed, "sizes": split.sizes(),
               "patient_overlap": split.patient_overlap,
               "train": list(split.train), "val": list(split.val), "test": list(split.test)},
    )


def _explicit_split(cfg: TrainConfig, train_part, val_part):
    from cxr.data.splits import Split

    overlap = len(set(train_part.patients) & set(val_part.patients))
    return Split("cv-fold" if len(val_part) else "all", cfg.seed, train_part.names, val_part.names, (),
                 {"train-val": overlap, "train-test": 0, "val-test": 0})


def _loader_factory(data: Prepared, cfg: TrainConfig):
    from torch.utils.data import DataLoader

    workers = resolve_workers(cfg.workers)

    def make(stage: str, rank: int, world: int) -> DataLoader:
        ds = data.train if stage == "train" else data.val
        if ds is None:  # a refit: nothing to validate on
            return []
        sampler = EpochSampler(len(ds), cfg.seed, shuffle=stage == "train", rank=rank, world=world)
        return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                          persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                          drop_last=stage == "train" and len(sampler) > cfg.batch_size)

    return make


def _trainer(cfg: TrainConfig, validate: bool = True):
    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from cxr.training.callbacks import AtomicLastCheckpoint, EpochCSV

    n_dev = int(cfg.devices) if str(cfg.devices).isdigit() else 1
    bar = RichProgressBar() if sys.stdout.isatty() else TQDMProgressBar(refresh_rate=10)
    precision = default_precision(cfg.accelerator) if cfg.precision == "auto" else cfg.precision
    return L.Trainer(
        default_root_dir=cfg.out, max_epochs=cfg.epochs + cfg.head_epochs, accelerator=cfg.accelerator,
        devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy, precision=precision,
        deterministic="warn", benchmark=False, use_distributed_sampler=False, logger=False,
        enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1,
        limit_val_batches=None if validate else 0,
        # SyncBatchNorm needs GPUs; on CPU each process normalises over its own share of the batch.
        sync_batchnorm=n_dev * cfg.num_nodes > 1 and cfg.accelerator != "cpu" and torch.cuda.is_available(),
        enable_progress_bar=cfg.progress,
        # The epoch's CSV row before its checkpoint: a kill between the two then re-runs the epoch (its row is
        # dropped on resume) instead of resuming past an epoch whose row was never written.
        callbacks=[EpochCSV(cfg.out / "metrics.csv", cfg.epochs), AtomicLastCheckpoint(cfg.out / "last.ckpt")]
        + ([bar] if cfg.progress else []),
    )


def fit(cfg: TrainConfig) -> Path:
    """Train, checkpointing every epoch; returns the final cxr checkpoint (model.safetensors)."""
    import json

    import lightning as L

    from cxr import nets as M
    from cxr.errors import CxrError
    from cxr.findings import NORMALISATIONS
    from cxr.training.learner import Learner
    from cxr.tasks import get_task
    from cxr.training.losses import make_loss

    cfg.out = Path(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    last = cfg.out / "last.ckpt"
    if cfg.resume and not last.exists():
        raise CxrError(f"--resume: no checkpoint at {last}; start without --resume")
    if last.exists() and not cfg.resume:
        raise CxrError(f"{last} exists: add --resume to continue that run, or pick a new --out")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # The network first, straight after seeding: its initial weights depend on the seed alone.
    net = M.build(cfg.arch, len(get_task(cfg.task).outputs), weights=cfg.weights, dropout=cfg.dropout)
    norm = M.default_normalisation(cfg.arch)
    mean, std = NORMALISATIONS[norm]
    data = prepare_data(cfg, mean, std)
    loss = make_loss(cfg.loss, cfg.task, class_weights=data.class_weights, pos_weight=data.pos_weight)
    learner = Learner(net, loss, lr=cfg.lr, head_lr=cfg.head_lr or cfg.lr / 10, weight_decay=cfg.weight_decay,
                      epochs=cfg.epochs, head_epochs=cfg.head_epochs, seed=cfg.seed, task=data.task,
                      loaders=_loader_factory(data, cfg), freeze_bn=cfg.freeze_bn,
                      channels_last=default_channels_last(cfg.accelerator) if cfg.channels_last is None
                      else cfg.channels_last)
    trainer = _trainer(cfg, validate=data.val is not None)
    trainer.fit(learner, ckpt_path=last if cfg.resume else None)
    final = cfg.out / "model.safetensors"
    if trainer.is_global_zero:
        (cfg.out / "split.json").write_text(json.dumps(data.split, indent=1))
        val = learner.val_outputs
        if data.pos_weight is not None and cfg.loss == "weighted":
            undo_pos_weight(learner.model, data.pos_weight)
            val = val and (val[0], shift_probabilities(val[1], data.pos_weight))
        meta = final_meta(cfg, data, norm, val)
        M.save(final, learner.model.to(memory_format=torch.contiguous_format).float(), meta)
    return final


def undo_pos_weight(model, pos_weight) -> None:
    """Make a model trained with BCE pos_weight w output honest probabilities again.

    Weighting the positives by w moves the loss's optimum from p to w·p / (w·p + 1 − p), i.e. adds
    log(w) to every logit: a finding with 1% prevalence and w = 99 comes out near 50%. Subtracting
    log(w) from the last layer's bias undoes exactly that shift; rankings (AUC, AP) are unchanged.
    """
    last = model.head[-1]
    with torch.no_grad():
        last.bias -= torch.log(torch.as_tensor(np.asarray(pos_weight), dtype=last.bias.dtype))


def shift_probabilities(p: np.ndarray, pos_weight) -> np.ndarray:
    """The probabilities `undo_pos_weight` turns p into (for outputs computed before the change)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    z = np.log(p / (1 - p)) - np.log(np.asarray(pos_weight, dtype=np.float64))
    return (1 / (1 + np.exp(-z))).astype(np.float32)


def final_meta(cfg: TrainConfig, data: Prepared, norm: str, val_outputs):
    """The checkpoint's metadata: thresholds by Youden's J on validation, validation metrics, provenance."""
    import platform

    import lightning
    import torchvision

    import cxr
    from cxr.evaluation import metrics
    from cxr.findings import NORMALISATIONS
    from cxr.meta import ModelMeta

    names = data.class_names
    thresholds = {n: 0.5 for n in names}
    summary: dict = {}
    if val_outputs is not None:
        y, p = val_outputs
        cols = list(data.task.columns)  # what a user is shown (pneumothorax, not "All others")
        outs = [names[c] for c in cols]
        youden = metrics.youden_thresholds(y[:, cols], p[:, cols])
        thresholds.update({n: float(t) for n, t in zip(outs, youden) if np.isfinite(t)})
        summary = metrics.summarize(y[:, cols], p[:, cols], outs, thresholds=[thresholds[n] for n in outs])
        summary["subset"] = "validation"
    mean, std = NORMALISATIONS[norm]
    return ModelMeta(
        arch=cfg.arch, task=cfg.task, outputs=names, activation=data.task.activation,
        input_size=cfg.size, normalisation=norm, mean=mean, std=std, thresholds=thresholds,
        metrics=summary,
        provenance={
            "command": cfg.command, "config": config_dict(cfg),
            "split": {k: v for k, v in data.split.items() if k not in ("train", "val", "test")},
            "n_train": data.n_train,
            "pos_weight_undone": None if data.pos_weight is None or cfg.loss != "weighted"
            else [float(w) for w in data.pos_weight],
            "versions": {"cxr": cxr.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "lightning": lightning.__version__,
            "python": platform.python_version()},
        },
    )
