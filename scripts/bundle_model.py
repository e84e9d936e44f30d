"""Rebuild the bundled demonstration model, src/cxr/assets/cxr-demo.safetensors, and its model card.

These are the exact steps that made the committed file (about 45 minutes on 2 CPU cores):
  1. `cxr train` on the sample films (512 px and 64 px), patient-disjoint validation (TRAIN below);
     the positive-class weighting's shift of the logits is undone (honest probabilities);
  2. `cxr gate-fit` on the same films (the not-a-chest-X-ray gate);
  3. `cxr evaluate` on the run's validation split; its report becomes the checkpoint's `metrics`, so the
     model card shows exactly what `cxr evaluate` reproduces;
  4. the checkpoint and MODEL_CARD.md are written into src/cxr/assets/.

Run from the repository root:  .venv/bin/python scripts/bundle_model.py [--run DIR] [--skip-train]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

DATA = "../shared/data/nih"
TRAIN = (
    f"train --data {DATA}/images-512 --data {DATA}/images-64 --metadata {DATA}/Data_Entry_2017_v2020.csv.gz "
    "--task multilabel --split patient --val-fraction 0.2 --test-fraction 0 --seed 0 "
    "--arch efficientnet_lite0 --weights imagenet --size 224 --batch-size 32 --epochs 4 --lr 1e-3 "
    "--weight-decay 1e-2 --head-epochs 1 --head-lr 1e-3 --precision 32-true --workers 1 --no-progress"
)
INTENDED_USE = (
    "Demonstration of the cxr pipeline (CLI, API, web page) and software testing. It was trained on about "
    "1,000 films and is weak; it must not be used for any clinical purpose."
)


def cxr(args: str) -> None:
    print("+ cxr", args, flush=True)
    subprocess.run([sys.executable, "-m", "cxr", *args.split()], check=True)


def honest_probabilities(path: Path, run: Path) -> None:
    """Runs trained before cxr undid the pos_weight shift at the end of training (the committed demo
    model's run was): undo it here, exactly as `cxr train` now does, and move the thresholds with it."""
    import numpy as np

    from cxr import nets as M
    from cxr.data import nih, splits
    from cxr.training.train import shift_probabilities, undo_pos_weight

    net, meta = M.load(path)
    if "pos_weight_undone" in meta.provenance:
        return
    table = nih.select_task(nih.read_metadata(f"{DATA}/Data_Entry_2017_v2020.csv.gz"), meta.task)
    train = set(json.loads((run / "split.json").read_text())["train"])
    pos_weight = splits.pos_weight(np.asarray(table.targets)[table.df["image"].isin(train).to_numpy()])
    undo_pos_weight(net, pos_weight)
    shifted = shift_probabilities([meta.thresholds[f] for f in meta.outputs], pos_weight)
    meta = dataclasses.replace(meta, thresholds=dict(zip(meta.outputs, map(float, shifted))),
                               provenance=dict(meta.provenance, pos_weight_undone=[float(w) for w in pos_weight]))
    M.save(path, net, meta, extra=M.load_extra(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/cxr-demo"))
    ap.add_argument("--skip-train", action="store_true", help="reuse the finished run in --run")
    args = ap.parse_args()
    if not args.skip_train:
        cxr(f"{TRAIN} --out {args.run}")
    gated = args.run / "gated.safetensors"
    shutil.copyfile(args.run / "model.safetensors", gated)
    honest_probabilities(gated, args.run)
    cxr(f"gate-fit --model {gated} --data {DATA}/images-512 --data {DATA}/images-64")
    cxr(f"evaluate --model {gated} --data {DATA}/images-512 --data {DATA}/images-64 "
        f"--metadata {DATA}/Data_Entry_2017_v2020.csv.gz --split {args.run}/split.json --subset val "
        f"--out {args.run}/eval")

    from cxr import settings as config
    from cxr.evaluation import modelcard
    from cxr import nets as M
    net, meta = M.load(gated)
    report = json.loads((args.run / "eval" / "report.json").read_text())
    report["subset"] = "validation"
    split = json.loads((args.run / "split.json").read_text())
    # The validation names travel with the model, so `cxr evaluate --split model` reproduces its card.
    recorded_split = dict(meta.provenance["split"], val=split["val"])
    provenance = dict(meta.provenance, split=recorded_split, name="cxr-demo (EfficientNet-Lite0, sample films)",
                      data="NIH ChestX-ray14 sample shipped with the project: 546+6 films at 512 px and "
                           "690 at 64 px (official train_val list; 6 boxed test-list films), about 1,000 "
                           "patients; labels from Data_Entry_2017_v2020.csv",
                      intended_use=INTENDED_USE, recipe="scripts/bundle_model.py")
    meta = dataclasses.replace(meta, metrics=report, provenance=provenance)
    config.BUNDLED_MODEL.parent.mkdir(parents=True, exist_ok=True)
    M.save(config.BUNDLED_MODEL, net, meta, extra=M.load_extra(gated))
    modelcard.write(meta, config.BUNDLED_MODEL.parent / "MODEL_CARD.md", title="cxr-demo")
    print(f"wrote {config.BUNDLED_MODEL} and MODEL_CARD.md")


if __name__ == "__main__":
    main()
