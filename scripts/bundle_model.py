"""Rebuild the bundled demonstration model, src/cxr/assets/cxr-demo.safetensors, and its model card.

The exact, rerunnable recipe (its CPU time is estimated and printed at start):
  1. `cxr train --cv 5` on the sample films (512 px and 64 px), with capture augmentations: five
     patient-disjoint fold models; every film scored out of fold by the model that never saw its patient
     (oof.csv, cv.json with per-fold and pooled macro AUC and 95% CIs);
  2. from those out-of-fold scores: Platt calibration per finding, thresholds by the stated policy
     (specificity 0.90), and the evidence behind "assessed" / "not assessed" (the AUC's 95% CI);
  3. the shipped model: the same recipe refit on every film, carrying 2. in its metadata;
  4. `cxr gate-fit` on the same films (the not-a-chest-X-ray gate);
  5. the checkpoint and MODEL_CARD.md (its figures are the out-of-fold ones) into src/cxr/assets/.
A killed run continues where it stopped: rerun the same command (finished folds are kept).

Run from the repository root:  .venv/bin/python scripts/bundle_model.py [--run DIR] [--quick]
--quick: a smoke run of every step (2 folds, 40 films, 64 px, 1 epoch) into runs/cxr-demo-quick; the
bundled model is left alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATA = "../shared/data/nih"
SOURCES = ("images-512", "images-64")
RECIPE = {"folds": 5, "arch": "efficientnet_lite0", "size": 224, "epochs": 6, "head_epochs": 1,
          "lr": "1e-3", "head_lr": "1e-3", "weight_decay": "1e-2", "batch_size": 32, "capture_aug": 0.3,
          "operating_point": "spec:0.90", "max_films": None}
QUICK = dict(RECIPE, folds=2, size=64, epochs=1, head_epochs=0, batch_size=16, max_films=40)
LITE0_FILMS_PER_S_224 = 7.5  # training, measured on this 2-core machine when not shared
INTENDED_USE = (
    "Demonstration of the cxr pipeline (CLI, API, web page) and software testing. It was trained on about "
    "1,200 films and is weak; it must not be used for any clinical purpose."
)


def train_args(r: dict, run: Path) -> str:
    data = " ".join(f"--data {DATA}/{s}" for s in SOURCES)
    return (f"train --cv {r['folds']} {data} --metadata {DATA}/Data_Entry_2017_v2020.csv.gz --task multilabel "
            f"--seed 0 --arch {r['arch']} --weights imagenet --size {r['size']} --batch-size {r['batch_size']} "
            f"--epochs {r['epochs']} --lr {r['lr']} --weight-decay {r['weight_decay']} "
            f"--head-epochs {r['head_epochs']} --head-lr {r['head_lr']} --capture-aug {r['capture_aug']} "
            f"--operating-point {r['operating_point']} --precision 32-true --workers 1 --no-progress "
            + (f"--max-films {r['max_films']} " if r["max_films"] else "") + f"--out {run}"
            + (" --resume" if (run / "folds.json").exists() else ""))


def estimate_seconds(r: dict) -> tuple[float, int]:
    """CPU seconds of the recipe: every epoch of every fold (on (k-1)/k of the films) and of the refit (on
    all), at Lite0's training speed scaled by pixels; scoring and the gate at about 3x that speed."""
    films = sum(len(list(Path(DATA, s).glob("*.png"))) for s in SOURCES)
    films = min(films, r["max_films"] or films)
    speed = LITE0_FILMS_PER_S_224 * (224 / r["size"]) ** 2
    trained = (r["epochs"] + r["head_epochs"]) * films * (r["folds"] - 1 + 1)  # k folds x (k-1)/k + the refit
    return trained / speed + 2 * films / (3 * speed), films


def cxr(args: str) -> None:
    print("+ cxr", args, flush=True)
    subprocess.run([sys.executable, "-m", "cxr", *args.split()], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="run folder (default runs/cxr-demo[-quick])")
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run of every step; assets untouched")
    args = ap.parse_args()
    recipe = QUICK if args.quick else RECIPE
    run = args.run or Path("runs/cxr-demo-quick" if args.quick else "runs/cxr-demo")
    seconds, films = estimate_seconds(recipe)
    print(f"recipe: {recipe}\nestimated CPU time: {seconds / 3600:.1f} h ({films} films, "
          f"Lite0 at {LITE0_FILMS_PER_S_224} films/s at 224 px on 2 unshared cores)", flush=True)
    t0 = time.monotonic()
    cxr(train_args(recipe, run))
    gated = run / "gated.safetensors"
    shutil.copyfile(run / "model.safetensors", gated)
    cxr(f"gate-fit --model {gated} " + " ".join(f"--data {DATA}/{s}" for s in SOURCES) + " --no-progress")
    took = time.monotonic() - t0

    from cxr import nets as M
    from cxr import settings as config
    from cxr.evaluation import modelcard

    net, meta = M.load(gated)
    cv = json.loads((run / "cv.json").read_text())
    provenance = dict(meta.provenance, name="cxr-demo (EfficientNet-Lite0, sample films)",
                      data="NIH ChestX-ray14 sample shipped with the project: 546+6 films at 512 px and "
                           "690 at 64 px (official train_val list; 6 boxed test-list films), about 1,000 "
                           "patients; labels from Data_Entry_2017_v2020.csv",
                      intended_use=INTENDED_USE, recipe="scripts/bundle_model.py" + (" --quick" if args.quick else ""),
                      recipe_seconds={"measured": round(took), "estimated": round(seconds), **cv["seconds"]})
    meta = dataclasses.replace(meta, provenance=provenance)
    target = run / "cxr-demo.safetensors" if args.quick else config.BUNDLED_MODEL
    target.parent.mkdir(parents=True, exist_ok=True)
    M.save(target, net, meta, extra=M.load_extra(gated))
    card = modelcard.write(meta, target.parent / "MODEL_CARD.md", title="cxr-demo")
    pooled = cv["pooled"]
    print(f"out-of-fold macro AUC {pooled['macro_auc']:.3f} (95% CI {pooled['macro_auc_ci']}), "
          f"flags per film {cv['flags_per_film']}; {took / 60:.1f} min; wrote {target} and {card}")


if __name__ == "__main__":
    main()
