"""The calibration part of an evaluation report: the reliability diagram (equal-mass bins) and the
HTML tables of Brier, Brier skill, ECE and flagged-versus-true findings per film."""

from __future__ import annotations

import html
from pathlib import Path

from matplotlib.figure import Figure

from cxr.findings import DISPLAY_NAMES

CAPTION = ("Reliability diagram (equal-mass bins): observed frequency against mean predicted probability; "
           "on the diagonal the probabilities mean what they say")


def figure(path: Path, calibration: dict) -> Path:
    """All findings pooled (left) and each finding (right, thin lines) against the diagonal."""
    fig = Figure(figsize=(10, 4.8))
    pooled, each = fig.subplots(1, 2)
    for ax, title in ((pooled, "All findings pooled"), (each, "Per finding")):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfectly calibrated")
        ax.set(xlabel="mean predicted probability", ylabel="observed frequency", title=title)
        ax.grid(alpha=0.25)
    o = calibration["overall"]
    r = o["reliability"]
    skill = "n/a" if o.get("brier_skill") is None else f"{o['brier_skill']:+.3f}"
    pooled.plot(r["predicted"], r["observed"], "o-", color="C0",
                label=f"model (ECE {o['ece']:.3f}, Brier skill {skill})")
    top = max([0.05, *r["predicted"], *r["observed"]])
    for name, e in calibration["per_finding"].items():
        rr = e["reliability"]
        each.plot(rr["predicted"], rr["observed"], ".-", lw=0.8, label=DISPLAY_NAMES.get(name, name))
        top = max([top, *rr["predicted"], *rr["observed"]])
    for ax in (pooled, each):
        ax.set(xlim=(0, min(1.0, top * 1.05)), ylim=(0, min(1.02, top * 1.05)))
    pooled.legend(loc="upper left", fontsize=8)
    each.legend(loc="upper left", fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _f(x, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def html_section(summary: dict, table) -> str:
    """Calibration per finding and overall, and how many findings a film is flagged with."""
    cal = summary.get("calibration")
    if not cal:
        return ""
    flags = summary.get("flags") or {}
    share = flags.get("flagged_share", {})
    absent = flags.get("not_assessed", {})
    rows = [[DISPLAY_NAMES.get(n, n), _f(e["base_rate"]), _f(e["brier"], ".4f"), _f(e["brier_skill"], "+.3f"),
             _f(e["ece"]), _f(share.get(n), ".0%") if n not in absent else "not assessed: " + absent[n]]
            for n, e in cal["per_finding"].items()]
    o = cal["overall"]
    rows.append(["all findings", "", _f(o["brier"], ".4f"), _f(o["brier_skill"], "+.3f"), _f(o["ece"]), ""])
    op = summary.get("operating_point") or {}
    policy = (f"Operating points: policy {op['policy']}, fitted on {op.get('fitted_on', '?')}."
              if op.get("policy") else "Operating points: the model records no policy (older model).")
    per_film = (f"Flagged findings per film: {_f(flags.get('flagged_per_film'), '.2f')}; true findings per film: "
                f"{_f(flags.get('true_per_film'), '.2f')}." if flags else "")
    return (f"<h2>Calibration and flags</h2><p>{html.escape(policy)} {html.escape(per_film)} Brier skill is "
            "against predicting each finding's base rate on these films (&gt; 0 is better than knowing the "
            f"prevalence); ECE over {o.get('bins', 10)} equal-mass bins.</p>"
            + table(["Finding", "Base rate", "Brier", "Brier skill", "ECE", "Films flagged"], rows))
