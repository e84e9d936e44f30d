"""How a Prediction and a model's metadata become the API's response bodies (cxr.web.schemas), PNG
data URLs of previews and heatmaps included.

Everything here is pure: no request, no app. The routes call it on inference threads, so PNG encoding
never runs on the event loop.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cxr.findings import DISPLAY_NAMES
from cxr.web.schemas import FindingCard, FindingOut, ImageOut, ModelCard, ModelSummary, PredictOut

# Previews and heatmaps travel as PNG data URLs bounded on their longest side. 512 px is enough for a phone
# screen; Grad-CAM maps come from a 4x4 to 16x16 grid of features, so 256 px loses nothing (the browser
# scales them smoothly over the film) and 14 maps stay a few hundred kB instead of megabytes.
PREVIEW_MAX_SIDE = 512
HEATMAP_MAX_SIDE = 256
# Heatmap opacity at the hottest pixel; cold pixels are fully transparent so the film shows through.
HEAT_MAX_ALPHA = 200

NOT_CLINICAL = "Not for clinical use: it has not been validated for diagnosis and does not replace a radiologist."
LIMITATIONS = (
    "Labels of ChestX-ray14 were mined from reports and are noisy; one hospital's films (NIH Clinical Center). "
    "Each finding is scored on its own: the likelihoods do not add up to 100%. Frontal (PA/AP) adult films only."
)


# ------------------------------------------------------------------------------------------ builders


def model_name(meta: Any, model: str | Path | None) -> str:
    named = (meta.provenance or {}).get("name")
    if named:
        return str(named)
    return Path(model).stem if model else "cxr-demo"


def summary(meta: Any, name: str) -> ModelSummary:
    return ModelSummary(name=name, arch=meta.arch, task=meta.task, input_size=meta.input_size,
                        members=int(getattr(meta, "members", 1)))


def model_card(meta: Any, name: str, outputs: Sequence[str]) -> ModelCard:
    from cxr.evaluation.calibration import assessments

    metrics = meta.metrics or {}
    prov = meta.provenance or {}
    verdicts = assessments(meta)
    return ModelCard(
        **summary(meta, name).model_dump(),
        data=_data_line(prov),
        validation=_validation_line(metrics),
        macro_auc=number(metrics.get("macro_auc")),
        operating_point=operating_point_line(meta),
        calibrated=bool(meta.calibration),
        findings=[_finding_card(meta, o, verdicts.get(o, (False, "not a reported finding"))) for o in outputs],
        gate=bool(meta.gate),
        intended_use=f"{prov.get('intended_use') or _card_intended_use()} {NOT_CLINICAL}",
        limitations=str(prov.get("limitations") or LIMITATIONS),
    )


def _finding_card(meta: Any, o: str, verdict: tuple[bool, str | None]) -> FindingCard:
    e = meta.evidence(o) or {}
    ci = e.get("auc_ci")
    return FindingCard(name=o, display_name=DISPLAY_NAMES.get(o, o), threshold=meta.thresholds[o],
                       validation_auc=number(e.get("auc")),
                       validation_auc_ci=[float(v) for v in ci] if ci else None,
                       assessed=verdict[0], reason=verdict[1])


def operating_point_line(meta: Any) -> str:
    """The operating-point policy in words, for the API and the page (older models record none)."""
    op = meta.operating_point or {}
    if not op.get("policy"):
        return "not recorded (thresholds from the training run's validation split)"
    return f"{op['policy']}" + (f", fitted on {op['fitted_on']}" if op.get("fitted_on") else "")


def _card_intended_use() -> str:
    """The model card's wording (cxr.evaluation.modelcard), so the page and the written card say the same."""
    from cxr.evaluation.modelcard import INTENDED_USE

    return INTENDED_USE


def _data_line(prov: dict) -> str:
    if prov.get("data"):
        return str(prov["data"])
    parts = ["NIH ChestX-ray14 (112,120 frontal films, 30,805 patients)"]
    split = prov.get("split") or {}
    if isinstance(split, dict) and split.get("kind", split.get("name")):
        parts.append(f"{split.get('kind', split.get('name'))} split")
    if prov.get("n_train"):
        parts.append(f"trained on {int(prov['n_train']):,} films")
    return "; ".join(parts)


def _validation_line(metrics: dict) -> str | None:
    if not metrics.get("n_images"):
        return None
    return f"{metrics.get('subset', 'held-out')} set, {int(metrics['n_images']):,} films"


def number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def prediction_out(pred: Any, model: ModelSummary, preview: np.ndarray | None, size: tuple[int, int]) -> PredictOut:
    """The 200 response for a Prediction the gate accepted; size = (width, height) of the film as sent."""
    width, height = size
    return PredictOut(
        findings=[
            FindingOut(name=n, display_name=DISPLAY_NAMES.get(n, n), probability=float(p),
                       threshold=float(pred.thresholds[n]), positive=bool(pred.positive[n]),
                       assessed=bool(pred.assessed.get(n, False)), reason=pred.reasons.get(n))
            for n, p in pred.probabilities.items()
        ],
        model=model,
        image=ImageOut(width=int(width), height=int(height),
                       preview=None if preview is None else gray_png(preview)),
        gate_score=number(pred.gate_score),
        heatmaps={n: heatmap_png(h) for n, h in pred.heatmaps.items()} if pred.heatmaps else None,
    )


# ------------------------------------------------------------------------------------------ PNG encoding


def _data_url(im) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _bounded(im, max_side: int):
    from PIL import Image

    w, h = im.size
    scale = max_side / max(w, h)
    if scale >= 1:
        return im
    return im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR,
                     reducing_gap=2.0)


def gray_png(gray: np.ndarray) -> str:
    """The film as the model read it (after EXIF rotation, DICOM windowing), as a PNG data URL."""
    from PIL import Image

    u8 = np.clip(np.asarray(gray, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)
    return _data_url(_bounded(Image.fromarray(u8, mode="L"), PREVIEW_MAX_SIDE))


def heatmap_png(heat: np.ndarray) -> str:
    """A heatmap in [0, 1] as an RGBA PNG data URL: colour from the colormap, opacity from the heat."""
    from PIL import Image

    # Downscale the float map first: colourising 256^2 instead of the film's 1024^2 (or 3000^2) pixels.
    small = Image.fromarray(np.ascontiguousarray(heat, np.float32), mode="F")
    small = np.asarray(_bounded(small, HEATMAP_MAX_SIDE), np.float32)
    small = np.clip(np.nan_to_num(small), 0.0, 1.0)
    rgb = colorize_rgb(small)
    alpha = np.round(small * HEAT_MAX_ALPHA).astype(np.uint8)
    return _data_url(Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA"))


def colorize_rgb(heat: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 through cxr.explain.maps' jet table (matplotlib's jet, without matplotlib), so the page
    matches the CLI's figures."""
    from cxr.explain.maps import colorize

    return colorize(heat)
