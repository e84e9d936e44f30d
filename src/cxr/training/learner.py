"""The LightningModule: a CxrNet, its loss, AdamW on one-cycle, and validation AUC gathered across ranks."""

from __future__ import annotations

import numpy as np
import torch
import lightning as L

from cxr.nets import activate, freeze_body
from cxr.tasks import Task
from cxr.training.schedule import TwoPhaseOneCycle


def macro_auc(targets: np.ndarray, probs: np.ndarray) -> float:
    """Mean ROC AUC over outputs that have both classes in the data (NaN when none has)."""
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(targets[:, k], probs[:, k]) for k in range(targets.shape[1])
            if 0 < targets[:, k].sum() < len(targets)]
    return float(np.mean(aucs)) if aucs else float("nan")


class Learner(L.LightningModule):
    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module, *, lr: float, head_lr: float,
                 weight_decay: float, epochs: int, head_epochs: int, seed: int, task: Task,
                 loaders=None, channels_last: bool = True, freeze_bn: bool = False):
        super().__init__()
        self.model, self.loss = model, loss
        self.lr, self.head_lr, self.weight_decay = lr, head_lr, weight_decay
        self.epochs, self.head_epochs = epochs, head_epochs
        # loaders(stage, rank, world) -> DataLoader; called only once the ranks are known
        self.loaders = loaders
        self.freeze_bn = freeze_bn
        self.seed, self.task, self.channels_last = seed, task, channels_last
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.val_outputs: tuple[np.ndarray, np.ndarray] | None = None  # (targets, probabilities)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    @property
    def in_head_phase(self) -> bool:
        return self.current_epoch >= self.epochs

    def on_train_epoch_start(self) -> None:
        # Lightning keeps whatever mode a module arrives in, and cxr builds models in eval mode: switch
        # to training (BatchNorm batch statistics, dropout) here. Phase 2 (the paper's transfer step)
        # then freezes the body, BatchNorm included, and only the head trains.
        self.model.train()
        freeze_body(self.model, self.in_head_phase)
        if self.freeze_bn:  # normalise with the stored statistics; the affine parameters still learn
            for m in self.model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        # Dropout's randomness depends only on (seed, step), so a resumed run retraces the same path.
        torch.manual_seed((self.seed * 1_000_033 + self.global_step) % (2**63))
        x, y, _ = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return activate(logits, self.task)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y, idx = batch
        logits = self(x)
        self.log("val_loss", self.loss(logits, y), on_epoch=True, prog_bar=True, sync_dist=True)
        self._val.append((self._probabilities(logits), y, idx))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        probs, ys, idx = (torch.cat(t) for t in zip(*self._val))
        self._val.clear()
        probs, ys, idx = (self.all_gather(t) for t in (probs, ys, idx))
        probs, ys, idx = (t.reshape(-1, *t.shape[2:]) if t.dim() > 1 and self.trainer.world_size > 1
                          else t for t in (probs, ys, idx))
        # Ranks pad the last batch by repeating films; keep each film once, in index order.
        _, first = np.unique(idx.cpu().numpy(), return_index=True)
        probs, ys = probs.cpu().numpy()[first], ys.cpu().numpy()[first]
        # softmax tasks: class indices become one-hot rows, so targets line up with the outputs
        targets = np.eye(probs.shape[1])[ys.astype(int)] if self.task.softmax else ys
        self.val_outputs = (targets.astype(np.uint8), probs.astype(np.float32))
        cols = list(self.task.columns)  # the reported outputs: pneumothorax, not "All others"
        auc = macro_auc(targets[:, cols], probs[:, cols])
        self.log("val_macro_auc", auc, prog_bar=True, rank_zero_only=True)

    def train_dataloader(self):
        return self.loaders("train", self.global_rank, self.trainer.world_size)

    def val_dataloader(self):
        return self.loaders("val", self.global_rank, self.trainer.world_size)

    def configure_optimizers(self):
        groups = [
            {"params": list(self.model.body.parameters())},
            {"params": list(self.model.head.parameters())},
        ]
        steps = max(1, self.trainer.estimated_stepping_batches // max(1, self.trainer.max_epochs))
        # AdamW: decoupled weight decay, as fastai's Adam (true_wd) that the paper trained with.
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=(0.9, 0.999), weight_decay=self.weight_decay)
        scheduler = TwoPhaseOneCycle(optimizer, body_lr=self.lr, head_lr=self.head_lr,
                                     phase1_steps=self.epochs * steps,
                                     phase2_steps=self.head_epochs * steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
