"""LR range test (Smith 2017; the paper's Eq. 4-5 and Fig. 6) over several weight decays, on Lightning's tuner.

The learning rate grows exponentially each mini-batch from min_lr to max_lr; the suggestion is where the
smoothed loss falls fastest (the paper's "steeper gradient towards the minimum").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cxr.training.train import TrainConfig, _loader_factory, default_channels_last, default_precision, prepare_data

PAPER_WEIGHT_DECAYS = (0.0, 1e-1, 1e-3, 1e-5)


def lr_find(cfg: TrainConfig, weight_decays=PAPER_WEIGHT_DECAYS, min_lr: float = 1e-7, max_lr: float = 10.0,
            steps: int = 100) -> dict:
    import lightning as L
    from lightning.pytorch.tuner import Tuner

    from cxr import nets as M
    from cxr.findings import NORMALISATIONS
    from cxr.training.learner import Learner
    from cxr.training.losses import make_loss

    cfg.out = Path(cfg.out)
    cfg.out.mkdir(parents=True, exist_ok=True)
    norm = M.default_normalisation(cfg.arch)
    data = prepare_data(cfg, *NORMALISATIONS[norm])
    precision = default_precision(cfg.accelerator) if cfg.precision == "auto" else cfg.precision
    curves = {}
    for wd in weight_decays:
        L.seed_everything(cfg.seed, verbose=False)  # every weight decay starts from the same weights
        net = M.build(cfg.arch, len(data.class_names), weights=cfg.weights, dropout=cfg.dropout)
        loss = make_loss(cfg.loss, cfg.task, class_weights=data.class_weights, pos_weight=data.pos_weight)
        learner = Learner(net, loss, lr=min_lr, head_lr=min_lr, weight_decay=wd, epochs=1, head_epochs=0,
                          seed=cfg.seed, task=data.task, loaders=_loader_factory(data, cfg),
                          channels_last=default_channels_last(cfg.accelerator) if cfg.channels_last is None
                          else cfg.channels_last)
        trainer = L.Trainer(default_root_dir=cfg.out, accelerator=cfg.accelerator, devices=1,
                            precision=precision, logger=False, enable_checkpointing=False,
                            enable_progress_bar=cfg.progress, max_epochs=max(1, -(-steps // max(1, len(
                                learner.loaders("train", 0, 1))))), use_distributed_sampler=False)
        found = Tuner(trainer).lr_find(learner, min_lr=min_lr, max_lr=max_lr, num_training=steps,
                                       early_stop_threshold=4.0, update_attr=False)
        curves[str(wd)] = {"lr": [float(x) for x in found.results["lr"]],
                           "loss": [float(x) for x in found.results["loss"]],
                           "suggestion": _num(found.suggestion())}
    result = {"weight_decays": list(weight_decays), "curves": curves, "arch": cfg.arch, "loss": cfg.loss,
              "task": cfg.task}
    (cfg.out / "lr_find.json").write_text(json.dumps(result, indent=1))
    plot(result, cfg.out / "lr_find.png")
    return result


def _num(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for wd, c in result["curves"].items():
        line, = ax.plot(c["lr"], c["loss"], label=f"WD={wd}")
        if c["suggestion"]:
            i = int(np.argmin(np.abs(np.asarray(c["lr"]) - c["suggestion"])))
            ax.plot(c["lr"][i], c["loss"][i], "o", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title(f"LR range test ({result['arch']}, {result['loss']} loss); dots: steepest descent")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
