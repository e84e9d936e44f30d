"""An evaluation written out: the paper's figures (7, 9-12, 21) as PNG, Tables 1-2 as Markdown and CSV,
report.json with every number, and one self-contained report.html (figures inlined as data URIs).

Figures use matplotlib's object API (`Figure`, Agg) rather than pyplot: no global state, safe in a server.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from cxr.evaluation import metrics, reliability
from cxr.findings import DISPLAY_NAMES, FINDINGS, canonical

NOT_FOR_CLINICAL_USE = ("Not for clinical use. A research reproduction of Elkins, Freitas & Sanz (2020); its "
                        "outputs must not inform the diagnosis or treatment of anyone.")

# The paper's Tables 1 and 2 (DenseNet-121, fastai, 30 epochs), shown beside ours for comparison.
PAPER_AUC = dict(zip(FINDINGS, (0.76, 0.91, 0.83, 0.69, 0.79, 0.71, 0.67, 0.83, 0.71, 0.86, 0.83, 0.78, 0.73, 0.89)))
PAPER_AP = dict(zip(FINDINGS, (0.31, 0.21, 0.42, 0.46, 0.13, 0.13, 0.03, 0.17, 0.09, 0.04, 0.07, 0.03, 0.07, 0.01)))
ISO_F1 = (0.2, 0.4, 0.6, 0.8)


def _label(name: str) -> str:
    return DISPLAY_NAMES.get(name, name)


def _column(y, p, finding: str, findings: Sequence[str] | None):
    """One finding's labels and scores, from 1-D arrays or from the matching column of 2-D ones."""
    y, p = np.asarray(y), np.asarray(p)
    if y.ndim == 1:
        return y, p
    names = list(findings) if findings is not None else list(FINDINGS)
    j = names.index(finding) if finding in names else names.index(canonical(finding))
    return y[:, j], p[:, j]


# ---- axes helpers (also used by cxr.explain.gradcam for its per-finding panels) -------------------------------

def iso_f1_axes(ax, levels: Sequence[float] = ISO_F1) -> None:
    """Grey curves of constant F1 in the precision-recall plane (the paper's Fig. 12)."""
    for f in levels:
        r = np.linspace(f / (2 - f) + 1e-3, 1, 100)
        ax.plot(r, f * r / (2 * r - f), color="0.75", lw=0.8, zorder=0)
        ax.annotate(f"F1={f:.1f}", xy=(0.9, f * 0.9 / (1.8 - f) + 0.02), fontsize=7, color="0.5")


def _unit_axes(ax, xlabel: str, ylabel: str, title: str | None = None) -> None:
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=xlabel, ylabel=ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.25)


def pr_curve_axes(ax, y, p, finding: str, *, findings: Sequence[str] | None = None, iso_f1: bool = True,
                  color=None, label: str | None = None) -> float | None:
    """One finding's PR curve on `ax`, AP in its legend, with iso-F1 curves and the prevalence line.

    y, p: that finding's labels and scores, or 2-D arrays whose columns are `findings` (default FINDINGS).
    Returns the AP, or None (and a note on the axes) when the finding has no positives.
    """
    y1, p1 = _column(y, p, finding, findings)
    if iso_f1:
        iso_f1_axes(ax)
    _unit_axes(ax, "Recall", "Precision", f"{_label(finding)}: precision-recall")
    curve = metrics.pr_curves(y1, p1)["per_output"][0]
    if curve is None:
        ax.text(0.5, 0.5, "no positive films", ha="center", va="center", color="0.4")
        return None
    ap = metrics.ap_or_none(y1, p1)
    ax.step(curve[0], curve[1], where="post", color=color, label=f"{label or _label(finding)} (AP = {ap:.2f})")
    ax.axhline(y1.mean(), color="0.6", ls=":", lw=0.8)  # a random reader's precision
    ax.legend(loc="lower left", fontsize=8)  # PR curves fall towards the lower right
    return ap


def roc_curve_axes(ax, y, p, finding: str, *, findings: Sequence[str] | None = None, color=None,
                   label: str | None = None) -> float | None:
    """One finding's ROC curve on `ax` with its AUC in the legend (None without both classes)."""
    y1, p1 = _column(y, p, finding, findings)
    _unit_axes(ax, "False positive rate", "True positive rate", f"{_label(finding)}: ROC")
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=0.8)
    curve = metrics.roc_curves(y1, p1)["per_output"][0]
    if curve is None:
        ax.text(0.5, 0.5, "needs positive and negative films", ha="center", va="center", color="0.4")
        return None
    auc = metrics.auc_or_none(y1, p1)
    ax.plot(*curve, color=color, label=f"{label or _label(finding)} (AUC = {auc:.2f})")
    ax.legend(loc="lower right", fontsize=8)
    return auc


def _colors(k: int):
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i % 20) for i in range(k)]


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


# ---- the paper's figures ----------------------------------------------------------------------------

def _roc_axes(ax, y, p, findings, per_finding: bool) -> None:
    curves = metrics.roc_curves(y, p)
    _unit_axes(ax, "False positive rate", "True positive rate", "Receiver operating characteristic")
    ax.plot([0, 1], [0, 1], color="0.6", ls=":", lw=0.8)
    if per_finding:
        for name, c, color in zip(findings, curves["per_output"], _colors(len(findings))):
            if c is not None:
                ax.plot(*c, lw=1, color=color, label=f"{_label(name)} ({metrics.auc_or_none(*_column(y, p, name, findings)):.2f})")
    if curves["micro"] is not None:
        micro = metrics.auc_or_none(np.ravel(y), np.ravel(p))
        ax.plot(*curves["micro"], ls="--", lw=2.5, color="purple", label=f"micro-average (AUC = {micro:.2f})")
    if curves["macro"] is not None:
        from sklearn.metrics import auc

        ax.plot(*curves["macro"], ls="--", lw=2.5, color="navy",
                label=f"macro-average (AUC = {auc(*curves['macro']):.2f})")
    ax.legend(loc="lower right", fontsize=7 if per_finding else 9)


def roc_figure(path, y, p, findings: Sequence[str], *, per_finding: bool = True) -> Path:
    """Fig. 10 (per finding with micro and macro averages) or, per_finding=False, Fig. 9 (averages only)."""
    fig = Figure(figsize=(7, 6.5) if per_finding else (6, 5.5))
    _roc_axes(fig.add_subplot(), y, p, findings, per_finding)
    return _save(fig, Path(path))


def pr_figure(path, y, p, findings: Sequence[str], *, per_finding: bool = True) -> Path:
    """Fig. 12 (PR per finding, iso-F1 curves, micro average) or, per_finding=False, Fig. 11 (micro only)."""
    y, p = metrics.as_2d(y, p)
    fig = Figure(figsize=(7, 6.5) if per_finding else (6, 5.5))
    ax = fig.add_subplot()
    iso_f1_axes(ax)
    micro_ap = metrics.ap_or_none(y.ravel(), p.ravel())
    title = "Precision-recall" if per_finding else f"Micro-averaged over all findings: AP = {micro_ap or float('nan'):.2f}"
    _unit_axes(ax, "Recall", "Precision", title)
    curves = metrics.pr_curves(y, p)
    if per_finding:
        for j, (name, c, color) in enumerate(zip(findings, curves["per_output"], _colors(len(findings)))):
            if c is not None:
                ap = metrics.ap_or_none(y[:, j], p[:, j])
                ax.step(*c, where="post", lw=1, color=color, label=f"{_label(name)} ({ap:.2f})")
    if curves["micro"] is not None:
        ax.step(*curves["micro"], where="post", ls="--", lw=2.5, color="gold" if per_finding else "navy",
                label=f"micro-average (AP = {micro_ap:.2f})")
    ax.legend(loc="lower left", fontsize=7 if per_finding else 9)
    return _save(fig, Path(path))


def binary_figure(path, y, p, finding: str = "Pneumothorax") -> Path:
    """Fig. 7: the two-class task's precision-recall curve (top) and ROC curve (bottom)."""
    y1, p1 = np.ravel(y), np.ravel(p)
    fig = Figure(figsize=(5.5, 10))
    top, bottom = fig.subplots(2, 1)
    pr_curve_axes(top, y1, p1, finding, color="tab:blue")
    roc_curve_axes(bottom, y1, p1, finding, color="tab:orange")
    return _save(fig, Path(path))


def comparison_figure(path, y, p_a, p_b, findings: Sequence[str], labels: Sequence[str] = ("A", "B")) -> Path:
    """Fig. 21: the PR and ROC curves of two models on the same films (e.g. unweighted vs weighted loss),
    one row each; ROC barely moves with class weighting while PR shows the imbalance."""
    fig = Figure(figsize=(12, 11))
    axes = fig.subplots(2, 2)
    for row, (p, label) in enumerate(((p_a, labels[0]), (p_b, labels[1]))):
        y2, p2 = metrics.as_2d(y, p)
        pr, roc = axes[row]
        iso_f1_axes(pr)
        _unit_axes(pr, "Recall", "Precision", f"({'AB'[row]}) {label}: precision-recall")
        for j, (c, color) in enumerate(zip(metrics.pr_curves(y2, p2)["per_output"], _colors(len(findings)))):
            if c is not None:
                pr.step(*c, where="post", lw=1, color=color,
                        label=f"{_label(findings[j])} ({metrics.ap_or_none(y2[:, j], p2[:, j]):.2f})")
        pr.legend(loc="lower left", fontsize=6)
        _roc_axes(roc, y2, p2, findings, per_finding=True)
        roc.set_title(f"({'AB'[row]}) {label}: ROC", fontsize=10)
    return _save(fig, Path(path))


def figures(out_dir, y, p, findings: Sequence[str], *, compare=None, labels=("model", "comparison")) -> dict[str, Path]:
    """Every figure that applies to the task (two-class: Fig. 7; multi-label: Figs 9-12), and Fig. 21
    when `compare` holds a second model's scores for the same films."""
    out = Path(out_dir)
    y, p = metrics.as_2d(y, p)
    made = {}
    if y.shape[1] == 1:
        made["fig7_pr_roc"] = binary_figure(out / "fig7_pr_roc.png", y, p, findings[0])
    else:
        made["fig9_roc_average"] = roc_figure(out / "fig9_roc_average.png", y, p, findings, per_finding=False)
        made["fig10_roc"] = roc_figure(out / "fig10_roc.png", y, p, findings)
        made["fig11_pr_micro"] = pr_figure(out / "fig11_pr_micro.png", y, p, findings, per_finding=False)
        made["fig12_pr"] = pr_figure(out / "fig12_pr.png", y, p, findings)
    if compare is not None:
        made["fig21_compare"] = comparison_figure(out / "fig21_compare.png", y, p, compare, findings, labels)
    return made


# ---- Tables 1-2 -------------------------------------------------------------------------------------

def _fmt(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _with_ci(x, ci) -> str:
    return _fmt(x) + ("" if ci is None else f" ({ci[0]:.3f}–{ci[1]:.3f})")


def table_rows(summary: dict, metric: str) -> list[dict]:
    """Rows of Table 1 (metric 'auc') or Table 2 ('ap'): per finding, then the macro and micro averages."""
    paper = (PAPER_AUC if metric == "auc" else PAPER_AP) if summary["task"] == "multilabel" else {}
    rows = []
    for name, e in summary["per_finding"].items():
        ci = e[f"{metric}_ci"] or [None, None]
        rows.append({"finding": _label(name), "n_positive": e["n_positive"], metric: e[metric],
                     "ci_low": ci[0], "ci_high": ci[1], "paper": paper.get(name)})
    for avg in ("macro", "micro"):
        ci = summary.get(f"{avg}_{metric}_ci") or [None, None]
        rows.append({"finding": f"{avg}-average", "n_positive": None, metric: summary[f"{avg}_{metric}"],
                     "ci_low": ci[0], "ci_high": ci[1], "paper": None})
    return rows


def write_tables(out_dir, summary: dict) -> dict[str, Path]:
    """table1_auc and table2_ap, each as .csv (plain numbers) and .md (values with their 95% CIs)."""
    out, made = Path(out_dir), {}
    for key, metric, title in (("table1_auc", "auc", "AUC"), ("table2_ap", "ap", "Average precision")):
        rows = table_rows(summary, metric)
        with open(out / f"{key}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
        lines = [f"| Finding | Positives | {title} (95% CI) | Paper |", "|---|---:|---|---:|"]
        lines += [f"| {r['finding']} | {'' if r['n_positive'] is None else r['n_positive']} | "
                  f"{_with_ci(r[metric], None if r['ci_low'] is None else (r['ci_low'], r['ci_high']))} | "
                  f"{_fmt(r['paper'], 2) if r['paper'] is not None else ''} |" for r in rows]
        (out / f"{key}.md").write_text("\n".join(lines) + "\n")
        made[f"{key}_csv"], made[f"{key}_md"] = out / f"{key}.csv", out / f"{key}.md"
    return made


# ---- report.json and report.html --------------------------------------------------------------------

def write_json(path, summary: dict) -> Path:
    """Strict JSON (no NaN): numpy scalars become numbers, anything else unexpected fails loudly."""
    def plain(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, (np.ndarray, tuple)):
            return list(o)
        raise TypeError(f"report.json cannot hold {type(o).__name__}")

    Path(path).write_text(json.dumps(summary, indent=1, allow_nan=False, default=plain))
    return Path(path)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _per_finding_html(s: dict) -> str:
    paper = s["task"] == "multilabel"
    rows = [[_label(n), e["n_positive"], _with_ci(e["auc"], e["auc_ci"]), _fmt(PAPER_AUC.get(n), 2) if paper else "",
             _with_ci(e["ap"], e["ap_ci"]), _fmt(PAPER_AP.get(n), 2) if paper else "", _fmt(e["ap_weighted"]),
             _fmt(e["threshold"]), _fmt(e["precision"]), _fmt(e["recall"]), _fmt(e["f1"]), _fmt(e["f1_weighted"]),
             _fmt(e["accuracy"]), _fmt((e["youden"] or {}).get("threshold"))] for n, e in s["per_finding"].items()]
    return _table(["Finding", "Positives", "AUC (95% CI)", "Paper AUC", "AP (95% CI)", "Paper AP",
                   "AP, class-weighted", "Threshold", "Precision", "Recall", "F1", "F1, class-weighted",
                   "Accuracy", "Youden threshold"], rows)


def _f1_html(s: dict) -> str:
    cols = [s["f1"]["unweighted"], s["f1"]["paper_weighted"], s["f1_youden"]["unweighted"],
            s["f1_youden"]["paper_weighted"]]
    keys = [k for k in cols[0] if not k.startswith("per_")]
    return _table(["Average", "At model thresholds", "… with the paper's sample weights (Eq. 6)",
                   "At Youden thresholds", "… with the paper's sample weights"],
                  [[k] + [_fmt(c[k]) for c in cols] for k in keys])


def _compare_html(s: dict) -> str:
    c = s.get("compare")
    if not c:
        return ""
    b = c["summary"]["per_finding"]
    rows = [[_label(n), _fmt(e["auc"]), _fmt(b[n]["auc"]), _fmt(e["ap"]), _fmt(b[n]["ap"])]
            for n, e in s["per_finding"].items()]
    rows.append(["macro-average", _fmt(s["macro_auc"]), _fmt(c["summary"]["macro_auc"]),
                 _fmt(s["macro_ap"]), _fmt(c["summary"]["macro_ap"])])
    la, lb = c.get("labels", ("model", "comparison"))
    return "<h2>Comparison (Fig. 21)</h2>" + _table(["Finding", f"AUC {la}", f"AUC {lb}", f"AP {la}", f"AP {lb}"], rows)


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


CAPTIONS = {
    "fig7_pr_roc": "Fig. 7: precision-recall (top) and ROC (bottom), two-class task",
    "fig9_roc_average": "Fig. 9: micro- and macro-averaged ROC",
    "fig10_roc": "Fig. 10: ROC per finding, with micro and macro averages",
    "fig11_pr_micro": "Fig. 11: micro-averaged precision-recall",
    "fig12_pr": "Fig. 12: precision-recall per finding, with iso-F1 curves",
    "fig21_compare": "Fig. 21: the two models' PR and ROC curves on the same films",
    "reliability": reliability.CAPTION,
}
_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:auto;padding:1em;color:#222}"
        ".notice{background:#fde8e8;border:2px solid #b91c1c;padding:.7em;font-weight:bold}"
        "table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
        "th{background:#f3f3f3}figure{display:inline-block;margin:.5em}img{max-width:100%}"
        "figcaption{font-size:.85em;color:#555}")


def render_html(summary: dict, figure_paths: dict[str, Path]) -> str:
    """The whole report as one HTML page: no external resources, figures as base64 data URIs."""
    s, e = summary, html.escape
    info = [[k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in (s.get("model") or {}).items()]
    info += [[f"data: {k}", v] for k, v in (s.get("data") or {}).items() if not isinstance(v, (dict, list))]
    averages = [["AUC, macro (mean of findings)", _with_ci(s["macro_auc"], s["macro_auc_ci"])],
                ["AUC, macro (paper's interpolated curve)", _fmt(s["macro_auc_interpolated"])],
                ["AUC, micro", _with_ci(s["micro_auc"], s["micro_auc_ci"])],
                ["AP, macro", _with_ci(s["macro_ap"], s["macro_ap_ci"])],
                ["AP, micro", _with_ci(s["micro_ap"], s["micro_ap_ci"])]]
    notes = "".join(f"<li>{e(str(n))}</li>" for n in s.get("notes", []))
    figs = "".join(_img(p, CAPTIONS.get(k, k)) for k, p in figure_paths.items())
    boot = s["bootstrap"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>cxr evaluation report</title><style>{_CSS}</style></head><body>
<h1>cxr evaluation report</h1>
<p class="notice">{e(NOT_FOR_CLINICAL_USE)}</p>
<p>{s['n_images']} films, task {e(s['task'])}. 95% intervals: {boot['n_boot']} bootstrap resamples of the films
(seed {boot['seed']}), {e(boot['method'])}.</p>
<h2>Model and data</h2>{_table(["", ""], info)}
<h2>Averages</h2>{_table(["", "value (95% CI)"], averages)}
<h2>Per finding (Tables 1 and 2)</h2>{_per_finding_html(s)}
<h2>F1 scores</h2>{_f1_html(s)}
{reliability.html_section(s, _table)}
{_compare_html(s)}
<h2>Figures</h2>{figs}
<h2>Notes</h2><ul>{notes or "<li>none</li>"}</ul>
<p class="notice">{e(NOT_FOR_CLINICAL_USE)}</p>
</body></html>
"""


def write_report(out_dir, y, p, summary: dict, *, compare=None, labels=("model", "comparison")) -> dict[str, Path]:
    """Figures, tables, report.json and report.html into out_dir; returns what was written, by name.

    summary: `cxr.evaluation.metrics.summarize(y, p, ...)`, optionally with 'model', 'data', 'compare' added.
    compare: a second model's scores on the same films (Fig. 21), labelled by `labels`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = figures(out, y, p, summary["findings"], compare=compare, labels=labels)
    if summary.get("calibration"):
        figs["reliability"] = reliability.figure(out / "reliability.png", summary["calibration"])
    made = {**figs, **write_tables(out, summary)}
    summary = {**summary, "files": {k: v.name for k, v in made.items()}}
    made["json"] = write_json(out / "report.json", summary)
    (out / "report.html").write_text(render_html(summary, figs), encoding="utf-8")
    made["html"] = out / "report.html"
    return made
