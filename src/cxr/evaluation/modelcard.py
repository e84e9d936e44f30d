"""Model cards (Mitchell et al. 2019): what a checkpoint was trained on, how well it does, and what it
is not for. Written from the checkpoint's own metadata so the card can never disagree with the model."""

from __future__ import annotations

from pathlib import Path

from cxr.evaluation.calibration import assessments
from cxr.findings import DISPLAY_NAMES
from cxr.meta import ModelMeta

NOT_FOR_CLINICAL_USE = (
    "**Not for clinical use.** This is research software. It has not been validated prospectively, "
    "is not a medical device, and must not be used to diagnose, treat or triage patients."
)


def _ci(v) -> str:
    return f"{v[0]:.2f}–{v[1]:.2f}" if v else "n/a"


def _num(v, fmt: str = ".3f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "n/a"


def summary(meta: ModelMeta) -> dict:
    """The short form the web page and the API show."""
    m = meta.metrics or {}
    return {
        "name": meta.provenance.get("name", f"cxr {meta.arch}"),
        "architecture": meta.arch,
        "task": meta.task,
        "input_size": meta.input_size,
        "data": meta.provenance.get("data", "NIH ChestX-ray14"),
        "validation_images": m.get("n_images"),
        "macro_auc": m.get("macro_auc"),
        "macro_auc_ci": m.get("macro_auc_ci"),
        "per_finding_auc": {f: e.get("auc") for f, e in m.get("per_finding", {}).items()},
        "operating_point": meta.policy,
        "calibrated": bool(meta.calibration),
        "not_assessed": {f: why for f, (ok, why) in assessments(meta).items() if not ok},
        "intended_use": meta.provenance.get("intended_use", INTENDED_USE),
        "not_for_clinical_use": True,
    }


INTENDED_USE = ("Demonstration, teaching and software testing of the cxr pipeline on frontal chest X-rays; "
                "research on methods. Not for clinical decisions.")


def _twice(p: dict, split: dict) -> str:
    """Why the training films outnumber the split's names: a name found under two --data sources (the same
    film at two resolutions) is one name in the split and two films in training, always in the same part."""
    extra = (p.get("n_train") or 0) - (split.get("sizes") or {}).get("train", 0)
    return (f" ({extra} image name{'s' if extra > 1 else ''} found under two --data sources, the same film at two "
            "resolutions: one name in the split, trained on at both)") if extra > 0 else ""


def _members(meta: ModelMeta, split: dict) -> list[str]:
    """An ensemble says so: how many networks, how they combine, what each was trained on."""
    if meta.members <= 1:
        return []
    each = [m.get("n_train") for m in split.get("members", [])]
    trained = f"; each trained on {', '.join(map(str, each))} films (the other folds)" if each else ""
    shared = ", sharing one frozen body (stored and run once; each has its own head)" if meta.shared_body else ""
    return [f"- An ensemble of {meta.members} such networks (the cross-validation's fold models){shared}: the shown "
            f"probabilities come from the mean of their logits{trained}. Grad-CAM maps are those of that mean.",
            "- Its calibration and thresholds were fitted on single fold models' out-of-fold scores (the figures "
            "below). The mean of several networks' logits is less spread than one network's, so the ensemble "
            "flags fewer findings per film than those figures show: it errs towards missing a finding, not "
            "towards crying wolf (docs/BENCHMARKS.md measures it on set-aside films)."]


def _body(config: dict) -> list[str]:
    """How much of the network was trained: a body kept at its pretrained weights is worth saying."""
    if config.get("epochs") != 0 or not config.get("head_epochs") or config.get("weights") in (None, "none"):
        return []
    return [f"- Body: its {config['weights']} weights, frozen (BatchNorm statistics included); only the head was "
            f"trained ({config['head_epochs']} epochs)."]


def render(meta: ModelMeta, *, title: str | None = None, notes: list[str] | None = None) -> str:
    m, p = meta.metrics or {}, meta.provenance or {}
    split = p.get("split", {})
    lines = [
        f"# Model card: {title or p.get('name', 'cxr ' + meta.arch)}",
        "",
        NOT_FOR_CLINICAL_USE,
        "",
        "## Model",
        f"- Architecture: `{meta.arch}` body with the paper's head (concat pooling, BN–Dropout–Linear–ReLU, "
        f"BN–Dropout–Linear); {len(meta.outputs)} outputs, {meta.activation} "
        + ("(independent per-finding probabilities; they are not renormalised and do not sum to 1)."
           if meta.activation == "sigmoid" else "(2 classes)."),
        *_members(meta, split),
        f"- Input: {meta.input_size}×{meta.input_size}, grayscale film repeated to 3 channels, normalised with "
        f"mean {list(meta.mean)} / std {list(meta.std)} (`{meta.normalisation}`).",
        f"- Not-a-chest-X-ray gate: {meta.gate.get('method', 'none')}"
        + (f", threshold {meta.gate['threshold']:.4g}" if "threshold" in meta.gate else "") + ".",
        "",
        "## Data",
        f"- {p.get('data', 'NIH ChestX-ray14')}",
        f"- Task: `{meta.task}`. Split: `{split.get('kind', '?')}` (seed {split.get('seed', '?')}), sizes "
        f"{split.get('sizes', {})} (image names), patients shared between parts: "
        f"{split.get('patient_overlap', {})}.",
        f"- Training films: {p.get('n_train', '?')}{_twice(p, split)}. Labels: NIH's text-mined labels "
        "(noisy; Wang et al. 2017).",
        "",
        "## Training",
        *_body(p.get("config", {})),
        f"- Command: `{p.get('command', '?')}`",
        f"- Versions: {p.get('versions', {})}",
        "",
        *_performance_heading(m, p),
        f"- Macro AUC {_num(m.get('macro_auc'))} (95% CI {_ci(m.get('macro_auc_ci'))}); micro AUC "
        f"{_num(m.get('micro_auc'))} (micro is inflated by how common each finding is: judge on macro).",
        "",
        f"| Finding | Positives | AUC | 95% CI | AP | Threshold ({meta.policy or 'Youden'}) | Judged on: AUC (95% CI) | Assessed |",
        "|---|---:|---:|---|---:|---:|---|---|",
    ]
    verdicts = assessments(meta)
    for f in meta.outputs:
        e, ev = m.get("per_finding", {}).get(f, {}), meta.evidence(f) or {}
        judged = f"{_num(ev.get('auc'), '.2f')} ({_ci(ev.get('auc_ci'))})" if ev else "no evidence"
        ok = "yes" if verdicts.get(f, (False, None))[0] else "**no**"
        lines.append(f"| {DISPLAY_NAMES.get(f, f)} | {e.get('n_positive', '?')} | {_num(e.get('auc'), '.2f')} | "
                     f"{_ci(e.get('auc_ci'))} | {_num(e.get('ap'), '.2f')} | {meta.thresholds.get(f, 0.5):.3f} | "
                     f"{judged} | {ok} |")
    lines += honesty(meta)
    lines += [
        "",
        "## Intended use",
        f"- {p.get('intended_use', INTENDED_USE)}",
        "",
        "## Limitations",
        "- Trained and validated on very few films: wide confidence intervals, findings with a handful of "
        "positives are close to chance. It is much weaker than models trained on the full 112,120 films.",
        "- NIH labels were mined from reports and are noisy; one hospital's population and equipment.",
        "- Frontal (PA/AP) adult films only; lateral views, children and other modalities are out of scope "
        "(the gate refuses inputs far from the training films, but it is not a guarantee).",
        *[f"- {n}" for n in (notes or [])],
        "",
        "## Attribution",
        "- Data: NIH Clinical Center, ChestX-ray14 (Wang et al., CVPR 2017), https://nihcc.app.box.com/v/ChestXray-NIHCC.",
        "- Method: Elkins, Freitas & Sanz, J Med Artif Intell 2020 (doi:10.21037/jmai.2019.12.01).",
        "",
    ]
    return "\n".join(lines)


def _performance_heading(m: dict, p: dict) -> list[str]:
    """Out-of-fold figures say so (and where they come from); a held-out split is 'Validation'."""
    cv = p.get("cv")
    if m.get("subset") != "out-of-fold" or not cv:
        return [f"## Validation ({m.get('n_images', '?')} films, 95% bootstrap CIs)"]
    folds = ", ".join(_num(a) for a in cv.get("per_fold_macro_auc", []))
    return [f"## Out-of-fold performance ({cv['folds']}-fold patient-grouped cross-validation, "
            f"{m.get('n_images', '?')} films of {cv.get('n_patients', '?')} patients, 95% bootstrap CIs)",
            "- Every film is scored by the fold model that never saw its patient; the shipped model is "
            f"{p.get('shipped', 'a refit on all films')}. Macro AUC per fold: {folds}.", *_by_source(cv)]


def _by_source(cv: dict) -> list[str]:
    by, within = cv.get("by_source") or {}, cv.get("within_source")
    if not by:
        return []
    each = "; ".join(f"{name} ({b.get('n_images', '?')} films) {_num(b.get('macro_auc'))} (95% CI "
                     f"{_ci(b.get('macro_auc_ci'))})" for name, b in by.items())
    lines = [f"- Macro AUC per source: {each}."]
    if within:
        lines.append(f"- Macro AUC within sources (only pairs of films from the same source): "
                     f"{_num(within.get('macro_auc'))} (95% CI {_ci(within.get('macro_auc_ci'))}). **Judge the model "
                     "on these**: the sources differ in resolution and in how many findings their films carry, so "
                     "the pooled figure below also credits telling them apart. The not-assessed rule reads "
                     "the within-source AUCs.")
    return lines


POLICY_WORDS = {"spec": "specificity at least {:.2f} per finding", "sens": "sensitivity at least {:.2f} per finding",
                "youden": "Youden's J per finding"}


def _policy(meta: ModelMeta) -> str:
    op = meta.operating_point or {}
    if not op.get("policy"):
        return ("not recorded: the thresholds are Youden's J on the validation split, which on a few hundred films "
                "sits near the floor and flags many findings on most films")
    kind, _, value = op["policy"].partition(":")
    words = POLICY_WORDS.get(kind, "{}").format(float(value) if value else "")
    where = f", fitted on {op['fitted_on']}" if op.get("fitted_on") else ""
    return f"`{op['policy']}` ({words}){where}"


def honesty(meta: ModelMeta) -> list[str]:
    """The operating points, the calibration and the findings the model cannot assess, as card lines."""
    lines = ["", "## Operating points and calibration",
             f"- Operating-point policy: {_policy(meta)}.",
             "- Probabilities: " + ("calibrated per finding (Platt scaling of the logit, fitted on held-out "
                                    "predictions)." if meta.calibration else "not recalibrated (the network's own "
                                    "sigmoid; they may be over- or under-confident).")]
    overall, flags = (meta.metrics or {}).get("calibration"), (meta.metrics or {}).get("flags_per_film")
    if overall:
        lines.append(f"- Overall ({(meta.metrics or {}).get('subset', 'validation')} probabilities): Brier "
                     f"{_num(overall.get('brier'), '.4f')}, Brier skill {_num(overall.get('brier_skill'), '+.3f')} "
                     f"against each finding's base rate, ECE {_num(overall.get('ece'))} (equal-mass bins).")
    if flags:
        lines.append(f"- Flagged findings per film at these operating points: {_num(flags.get('cross_fitted'), '.2f')} "
                     f"(the films truly carry {_num(flags.get('true'), '.2f')}).")
    verdicts = assessments(meta)
    figs = {f: meta.evidence(f) or {} for f in verdicts}
    if any(e.get("brier_skill") is not None or e.get("ece") is not None for e in figs.values()):
        lines += ["", "| Finding | Brier skill (vs base rate) | ECE (equal-mass bins) | Evidence from |",
                  "|---|---:|---:|---|"]
        lines += [f"| {DISPLAY_NAMES.get(f, f)} | {_num(e.get('brier_skill'), '+.3f')} | {_num(e.get('ece'))} | "
                  f"{e.get('source', '?')} |" for f, e in figs.items()]
    else:
        lines.append("- Calibration figures (Brier skill, ECE): not measured for this model; "
                     "`cxr evaluate` reports them, `cxr evaluate --update-model` records them.")
    absent = {f: why for f, (ok, why) in verdicts.items() if not ok}
    lines += ["", "## Findings this model cannot assess",
              "A finding whose validation AUC 95% CI reaches 0.5 (or that has no evidence) is never flagged; the API "
              "returns its probability with `assessed: false` for research use only.", ""]
    if absent:
        lines += ["| Finding | Why |", "|---|---|"]
        lines += [f"| {DISPLAY_NAMES.get(f, f)} | {why} |" for f, why in absent.items()]
    else:
        lines.append("- None: every finding's validation AUC interval lies above 0.5.")
    return lines


def write(meta: ModelMeta, path: Path, *, figure: Path | None = None, **kw) -> Path:
    """The card; `figure`: its reliability diagram (cxr.evaluation.reliability.figure of the scores behind
    the card's figures), a file beside the card, shown in it. (Drawn by the caller: the card itself stays
    free of matplotlib, which the torch-free runtime does not install.)"""
    path = Path(path)
    text = render(meta, **kw)
    if figure is not None:
        anchor = "\n## Findings this model cannot assess"
        caption = ("Reliability diagram (equal-mass bins) of the calibrated out-of-fold probabilities: observed "
                   "frequency against mean predicted probability")
        text = text.replace(anchor, f"\n![{caption}]({Path(figure).name})\n" + anchor, 1)
    path.write_text(text)
    return path
