"""Which model to ship from a cross-validation: the fold ensemble (mean of the fold models' logits) or a
refit of the same recipe on every film? Measured, not assumed (issue 10).

A patient-grouped fifth of the sample films is set aside (fold 1 of 5, seed 1: other folds than the
recipe's). On the rest, `cxr train --cv K` with the bundle recipe trains K fold models and the refit.
Both candidates then score the set-aside films: macro AUC (pooled, and within each source) with a
paired bootstrap 95% CI of the pooled difference, and films/s through the Predictor (the ensemble runs K networks per film).

Run from the repository root:  .venv/bin/python scripts/refit_vs_ensemble.py [--trial NAME] [--folds 3]
[--size 160] [--arch A] [--seed N] (default: the bundle recipe; --trial: one of bundle_model.py's TRIALS;
each recipe, and each other seed, trains into its own runs/refit-vs-ensemble/cv-NAME[-seedN]).
A killed run continues where it stopped (rerun the same command).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bundle_model as B  # noqa: E402  (the recipe itself, so the comparison is of what ships)

RUN = Path("runs/refit-vs-ensemble")


def split_films() -> dict[str, dict[str, list[Path]]]:
    """{'dev'|'test': {source: [film paths]}}, patient-disjoint (every labelled film of every source)."""
    import pandas as pd

    from cxr.training.cv import patient_folds

    rows = pd.read_csv(f"{B.DATA}/Data_Entry_2017_v2020.csv.gz", usecols=["Image Index", "Patient ID"])
    patient = dict(zip(rows["Image Index"], rows["Patient ID"].astype(str)))
    films = [(s, f) for s in B.SOURCES for f in sorted(Path(B.DATA, s).glob("*.png")) if f.name in patient]
    fold = patient_folds([patient[f.name] for _, f in films], 5, seed=1)
    out: dict = {"dev": {s: [] for s in B.SOURCES}, "test": {s: [] for s in B.SOURCES}}
    for (s, f), k in zip(films, fold):
        out["test" if k == 0 else "dev"][s].append(f)
    return out


def link(parts: dict) -> None:
    """Folders of links to the films of each part, so `cxr train --data` sees only the dev films."""
    for part, sources in parts.items():
        for s, files in sources.items():
            folder = RUN / part / s
            folder.mkdir(parents=True, exist_ok=True)
            for f in files:
                if not (folder / f.name).exists():
                    (folder / f.name).symlink_to(f.resolve())


def logits(model: Path, films: list[Path]) -> tuple[np.ndarray, float]:
    """Raw logits of every film through the Predictor (fp32, torch), and the seconds that took."""
    from cxr import images
    from cxr.inference.predictor import Predictor
    from cxr.nets import load

    net, meta = load(model)
    predictor = Predictor.from_model(net, meta, backend="torch", batch_size=32, precision="fp32")
    t0 = time.perf_counter()
    z = predictor.logits_of([functools.partial(images.read_image, f) for f in films], strict=True)
    return z, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--size", type=int, default=B.RECIPE["size"])
    ap.add_argument("--arch", default=B.RECIPE["arch"])
    ap.add_argument("--seed", type=int, default=0, help="another draw of the same recipe (folds and training)")
    ap.add_argument("--trial", choices=sorted(B.TRIALS), help="a trial's recipe instead of the bundle's")
    args = ap.parse_args()
    parts = split_films()
    link(parts)
    base = B.TRIALS[args.trial] if args.trial else B.RECIPE
    recipe = dict(base, folds=args.folds, size=args.size if args.size != B.RECIPE["size"] else base["size"],
                  arch=args.arch if args.arch != B.RECIPE["arch"] else base["arch"])
    name = args.trial or f"{recipe['arch']}-{recipe['size']}-e{recipe['epochs']}-h{recipe['head_epochs']}"
    cv = RUN / (f"cv-{name}" + (f"-seed{args.seed}" if args.seed else ""))
    if not (cv / "cv.json").exists():
        command = B.train_args(recipe, cv, ship="refit", sources=[str(RUN / "dev" / s) for s in B.SOURCES])
        B.cxr(command.replace("--seed 0 ", f"--seed {args.seed} "))

    from cxr.data.labels import labelled

    films = [f for s in B.SOURCES for f in parts["test"][s]]
    _, _, info = labelled("nih", [f.name for f in films], "multilabel", metadata=f"{B.DATA}/Data_Entry_2017_v2020.csv.gz")
    row = {n: i for i, n in enumerate(info.all.names)}
    films = [f for f in films if f.name in row]
    y = info.task.truth(info.all.targets)[[row[f.name] for f in films]]
    cols = list(info.task.columns)
    runs = [logits(cv / f"fold-{k + 1}" / "model.safetensors", films) for k in range(args.folds)]
    p_ens = sigmoid(np.mean([z for z, _ in runs], axis=0)[:, cols])
    t_ens = sum(t for _, t in runs)
    z_refit, t_refit = logits(cv / "model.safetensors", films)
    p_refit = sigmoid(z_refit[:, cols])
    diffs = paired_bootstrap(y, p_refit, p_ens)
    print(f"set-aside films: {len(films)}, dev films: {sum(map(len, parts['dev'].values()))}; recipe {recipe}")
    for name, p, t, k in (("refit", p_refit, t_refit, 1), (f"{args.folds}-model ensemble", p_ens, t_ens, args.folds)):
        print(f"{name}: macro AUC {macro_auc(y, p):.3f}, {len(films) / t:.1f} films/s ({k} network(s) per film)")
    source = np.array([f.parent.name for f in films])
    for name, p in (("refit", p_refit), ("ensemble", p_ens)):  # pooled AUCs also credit telling sources apart
        per = ", ".join(f"{s} {macro_auc(y[source == s], p[source == s]):.3f} ({(source == s).sum()} films)"
                        for s in B.SOURCES)
        print(f"{name} by source: {per}")
    honest(cv / "model.safetensors", y, {"refit": z_refit, "ensemble": np.mean([z for z, _ in runs], axis=0)}, cols)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    print(f"refit minus ensemble macro AUC: {macro_auc(y, p_refit) - macro_auc(y, p_ens):+.3f} (paired bootstrap "
          f"95% CI {lo:+.3f} to {hi:+.3f}); ensemble cost: {t_ens / t_refit:.1f}x the refit's")


def honest(calibrated: Path, y: np.ndarray, logits: dict[str, np.ndarray], cols: list[int]) -> None:
    """What each candidate would show on the set-aside films with what ships with it: the calibration,
    thresholds and assessment fitted on the dev films' out-of-fold scores (the same for both; the refit
    carries them). Brier skill against these films' base rates, equal-mass ECE, flags per film (a finding
    not assessed is never flagged) against the true findings per film."""
    from cxr.evaluation import calibration as C
    from cxr.nets.checkpoint import read_meta

    meta = read_meta(calibrated)
    names = [meta.outputs[c] for c in cols]
    a, b = (np.array([meta.calibration[n][k] for n in names]) for k in ("a", "b"))
    threshold = np.array([meta.thresholds[n] for n in names])
    shown = np.array([C.assessments(meta)[n][0] for n in names])
    for name, z in logits.items():
        p = C.apply_platt(z[:, cols], a, b)
        fig = C.figures(y, p, names)["overall"]
        flags = ((p >= threshold) & shown).sum(axis=1).mean()
        print(f"{name} as shipped: Brier skill {fig['brier_skill']:+.3f}, ECE {fig['ece']:.3f}, {flags:.2f} flags "
              f"per film (true {y.sum(axis=1).mean():.2f}; {shown.sum()} of {len(names)} findings assessed)")


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def macro_auc(y: np.ndarray, p: np.ndarray) -> float:
    from cxr.evaluation.metrics import auc_or_none

    aucs = [auc_or_none(y[:, j], p[:, j]) for j in range(y.shape[1])]
    return float(np.mean([a for a in aucs if a is not None]))


def paired_bootstrap(y: np.ndarray, a: np.ndarray, b: np.ndarray, n_boot: int = 1000) -> np.ndarray:
    """Macro AUC of a minus b on the same resampled films, n_boot times."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        out.append(macro_auc(y[i], a[i]) - macro_auc(y[i], b[i]))
    return np.array(out)

if __name__ == "__main__":
    main()
