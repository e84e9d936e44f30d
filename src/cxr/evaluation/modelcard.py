"""Model cards (Mitchell et al. 2019): what a checkpoint was trained on, how well it does, and what it
is not for. Written from the checkpoint's own metadata so the card can never disagree with the model."""

from __future__ import annotations

from pathlib import Path

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
        "intended_use": meta.provenance.get("intended_use", INTENDED_USE),
        "not_for_clinical_use": True,
    }


INTENDED_USE = ("Demonstration, teaching and software testing of the cxr pipeline on frontal chest X-rays; "
                "research on methods. Not for clinical decisions.")


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
        f"- Input: {meta.input_size}×{meta.input_size}, grayscale film repeated to 3 channels, normalised with "
        f"mean {list(meta.mean)} / std {list(meta.std)} (`{meta.normalisation}`).",
        f"- Not-a-chest-X-ray gate: {meta.gate.get('method', 'none')}"
        + (f", threshold {meta.gate['threshold']:.4g}" if "threshold" in meta.gate else "") + ".",
        "",
        "## Data",
        f"- {p.get('data', 'NIH ChestX-ray14')}",
        f"- Task: `{meta.task}`. Split: `{split.get('kind', '?')}` (seed {split.get('seed', '?')}), sizes "
        f"{split.get('sizes', {})}, patients shared between parts: {split.get('patient_overlap', {})}.",
        f"- Training films: {p.get('n_train', '?')}. Labels: NIH's text-mined labels (noisy; Wang et al. 2017).",
        "",
        "## Training",
        f"- Command: `{p.get('command', '?')}`",
        f"- Versions: {p.get('versions', {})}",
        "",
        f"## Validation ({m.get('n_images', '?')} films, 95% bootstrap CIs)",
        f"- Macro AUC {_num(m.get('macro_auc'))} (95% CI {_ci(m.get('macro_auc_ci'))}); micro AUC "
        f"{_num(m.get('micro_auc'))} (micro is inflated by how common each finding is: judge on macro).",
        "",
        "| Finding | Positives | AUC | 95% CI | AP | Threshold (Youden) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for f in meta.outputs:
        e = m.get("per_finding", {}).get(f, {})
        lines.append(f"| {DISPLAY_NAMES.get(f, f)} | {e.get('n_positive', '?')} | {_num(e.get('auc'), '.2f')} | "
                     f"{_ci(e.get('auc_ci'))} | {_num(e.get('ap'), '.2f')} | {meta.thresholds.get(f, 0.5):.3f} |")
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


def write(meta: ModelMeta, path: Path, **kw) -> Path:
    path = Path(path)
    path.write_text(render(meta, **kw))
    return path
