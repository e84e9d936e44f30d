"""`cxr train` and `cxr lr-find`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand

from cxr.cli import _options as opt
from cxr.tasks import task_names

DATA_HELP = "A folder of films or a `cxr prepare` cache; repeat to train on several (e.g. 512 px and 64 px)."


def train(
    data: list[Path] = typer.Option(..., "--data", help=DATA_HELP),
    metadata: Path = typer.Option(..., help="Data_Entry_2017(.csv|_v2020.csv.gz): labels joined by file name."),
    out: Path = typer.Option(..., help="Run folder: last.ckpt, metrics.csv, split.json, model.safetensors."),
    task: str = typer.Option("multilabel", help=" | ".join(task_names())),
    dataset: str = typer.Option("nih", help="The data set whose label file --metadata is (listed when help is shown)."),
    split: str = typer.Option("patient", help="patient | official | random (the paper's; leaks patients)"),
    seed: int = typer.Option(0),
    val_fraction: Optional[float] = typer.Option(None, help="Validation share (default: 0.1; random: 0.2)."),
    test_fraction: Optional[float] = typer.Option(None, help="Test share (default: 0.1; random: 0; official: NIH's list)."),
    lists: Optional[Path] = typer.Option(None, help="Folder with NIH's split lists (default: beside --metadata)."),
    arch: str = typer.Option("densenet121", help="The network (the registered ones are listed when help is shown)."),
    weights: str = typer.Option("imagenet", help="imagenet | none | PATH to a cxr checkpoint"),
    size: int = typer.Option(224, help="Input side in pixels."),
    batch_size: int = typer.Option(64),
    epochs: int = typer.Option(30, help="Phase 1: end-to-end epochs."),
    lr: float = typer.Option(1e-2, help="Phase 1 peak learning rate (one-cycle)."),
    weight_decay: float = typer.Option(1e-3),
    head_epochs: int = typer.Option(0, help="Phase 2: epochs with the body frozen, head retrained."),
    head_lr: Optional[float] = typer.Option(None, help="Phase 2 peak learning rate (default lr/10)."),
    loss: str = typer.Option("weighted", help="weighted (Eq. 2/3 with Eq. 1 weights) | unweighted"),
    precision: str = typer.Option("auto", help="auto (bf16 on CPU, AMP on GPU) | 32-true | bf16-mixed | 16-mixed"),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                 help="Memory layout; default: where it is faster (GPUs, CPUs with native bf16)."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="The paper's training augmentations."),
    capture_aug: float = typer.Option(0.0, "--capture-aug", min=0.0, max=1.0,
                                      help="Phone-capture augmentations (JPEG, perspective, tilt, glare, tint, "
                                           "exposure, blur, border/crop), each with this probability; 0: off."),
    freeze_bn: bool = typer.Option(False, "--freeze-bn", help="Keep BatchNorm statistics fixed (tiny per-device batches)."),
    dropout: float = typer.Option(0.5, help="Dropout before the last linear layer (half of it before the first)."),
    workers: Optional[int] = opt.workers(when_unset="cores - 1, as DataLoader workers"),
    accelerator: str = typer.Option("auto", help="auto | cpu | gpu"),
    devices: str = typer.Option("auto", help="Processes/GPUs per machine, e.g. 2 for 2-process DDP."),
    num_nodes: int = typer.Option(1, help="Machines (with torchrun or a cluster environment)."),
    strategy: str = typer.Option("auto", help="auto | ddp | ddp_spawn | ..."),
    max_films: Optional[int] = typer.Option(None, help="Use only the first N labelled films (smoke runs)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from last.ckpt."),
    progress: bool = opt.progress(),
    cv: int = typer.Option(0, "--cv", min=0, help="K-fold patient-grouped cross-validation over every film "
                           "(--split and the fractions are then unused): out-of-fold scores (oof.csv, cv.json), "
                           "calibration and operating points fitted on them, and the shipped model (--ship)."),
    operating_point: str = typer.Option("spec:0.90", help="With --cv: youden | spec:X | sens:X, per finding."),
    ship: str = typer.Option("ensemble", "--ship", help="With --cv, the model written as model.safetensors: "
                             "ensemble (the K fold models as one, the mean of their logits; no more training), "
                             "refit (the recipe again on every film) or none."),
) -> None:
    """Train a model (the paper's recipe by default) and write a cxr checkpoint with its thresholds."""
    from cxr.training.train import TrainConfig, fit

    cfg = TrainConfig(
        data=data, metadata=metadata, out=out, task=task, split=split, seed=seed, val_fraction=val_fraction,
        test_fraction=test_fraction, lists=lists, arch=arch, weights=None if weights == "none" else weights,
        size=size, batch_size=batch_size, epochs=epochs, lr=lr, weight_decay=weight_decay,
        head_epochs=head_epochs, head_lr=head_lr, loss=loss, precision=precision, channels_last=channels_last,
        augment=augment, freeze_bn=freeze_bn, dropout=(dropout / 2, dropout), workers=workers, accelerator=accelerator,
        devices=devices, num_nodes=num_nodes, strategy=strategy, max_films=max_films, resume=resume,
        progress=progress, dataset=dataset, capture_aug=capture_aug,
    )
    if cv:
        from cxr.training.cv import cross_validate

        report = cross_validate(cfg, cv, policy=operating_point, ship=ship)
        pooled = report["pooled"]
        lo, hi = pooled["macro_auc_ci"] or (float("nan"), float("nan"))
        typer.echo(f"out-of-fold macro AUC {pooled['macro_auc']:.3f} (95% CI {lo:.3f}-{hi:.3f}) on "
                   f"{report['n_films']} films; wrote {out / 'cv.json'} and {out / 'oof.csv'}")
        if ship != "none":
            typer.echo(f"wrote {out / 'model.safetensors'}")
        return
    final = fit(cfg)
    if final.exists():
        typer.echo(f"wrote {final}")


def lr_find(
    data: list[Path] = typer.Option(..., "--data", help=DATA_HELP),
    metadata: Path = typer.Option(..., help="Data_Entry_2017(.csv|_v2020.csv.gz)."),
    out: Path = typer.Option(..., help="Folder for lr_find.json and lr_find.png (the paper's Fig. 6)."),
    task: str = typer.Option("multilabel"),
    split: str = typer.Option("patient"),
    seed: int = typer.Option(0),
    arch: str = typer.Option("densenet121"),
    weights: str = typer.Option("imagenet", help="imagenet | none | PATH"),
    size: int = typer.Option(224),
    batch_size: int = typer.Option(64),
    loss: str = typer.Option("weighted", help="weighted | unweighted (Fig. 6 right / left)"),
    weight_decays: str = typer.Option("0,0.1,0.001,1e-5", help="Comma-separated; one curve each."),
    min_lr: float = typer.Option(1e-7),
    max_lr: float = typer.Option(10.0),
    steps: int = typer.Option(100, help="Mini-batches per curve."),
    max_films: Optional[int] = typer.Option(None),
    workers: Optional[int] = opt.workers(when_unset="cores - 1, as DataLoader workers"),
    progress: bool = opt.progress(),
) -> None:
    """LR range test over several weight decays; suggests the LR at the steepest loss descent."""
    from cxr.training.lrfind import lr_find as run
    from cxr.training.train import TrainConfig

    cfg = TrainConfig(data=data, metadata=metadata, out=out, task=task, split=split, seed=seed, arch=arch,
                      weights=None if weights == "none" else weights, size=size, batch_size=batch_size,
                      loss=loss, max_films=max_films, workers=workers, progress=progress)
    wds = [float(w) for w in weight_decays.split(",") if w.strip()]
    result = run(cfg, wds, min_lr=min_lr, max_lr=max_lr, steps=steps)
    for wd, c in result["curves"].items():
        typer.echo(f"WD={wd}: suggested lr {c['suggestion']}")
    typer.echo(f"wrote {out / 'lr_find.png'}")


class _RegistryHelp(TyperCommand):
    """Help that lists the registered architectures and data sets, read when help is shown: importing
    them means torch and pandas, which `cxr --help` and every other command should not pay for."""

    def format_help(self, ctx, formatter) -> None:
        from cxr.data.registry import dataset_names
        from cxr.nets import ARCHITECTURES

        for param in self.params:
            if param.name == "arch":
                param.help = " | ".join(ARCHITECTURES)
            elif param.name == "dataset":
                param.help = f"The data set whose label file --metadata is: {' | '.join(dataset_names())}"
        super().format_help(ctx, formatter)


def register(app: typer.Typer) -> None:
    app.command("train", cls=_RegistryHelp)(train)
    app.command("lr-find", cls=_RegistryHelp)(lr_find)
