"""Training callbacks: an atomic last checkpoint every epoch, and a per-epoch metrics CSV."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import lightning as L

CSV_FIELDS = ["epoch", "phase", "train_loss", "val_loss", "val_macro_auc", "lr_body", "lr_head", "seconds"]


class AtomicLastCheckpoint(L.Callback):
    """Writes `last.ckpt` at the end of every epoch through a temporary file and a rename, so that a
    kill -9 at any moment leaves either the previous checkpoint or the new one, never half a file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("atomic-checkpoint")


class EpochCSV(L.Callback):
    """One row per epoch. On resume, rows of epochs that are about to be re-run are dropped first."""

    def __init__(self, path: Path, head_phase_from: int):
        self.path, self.head_phase_from = Path(path), head_phase_from
        self._t0 = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_start, not on_fit_start: only then has a resumed run restored its epoch counter
        if not trainer.is_global_zero:
            return
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= trainer.current_epoch]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank reads the metrics: reading them can synchronise across DDP processes, and a read on rank 0
        # alone would wait for the others forever.
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if not trainer.is_global_zero:
            return
        lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
        row = {
            "epoch": trainer.current_epoch + 1,
            "phase": "head" if trainer.current_epoch >= self.head_phase_from else "end-to-end",
            "train_loss": m.get("train_loss_epoch", ""),
            "val_loss": m.get("val_loss", ""),
            "val_macro_auc": m.get("val_macro_auc", ""),
            "lr_body": lrs[0],
            "lr_head": lrs[-1],
            "seconds": round(time.monotonic() - self._t0, 2),
        }
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, CSV_FIELDS).writerow(row)
