"""The web API's JSON shapes (pydantic, so /openapi.json documents them) and how a Prediction becomes one.

Everything here is pure: no request, no app. serve.py calls these from its inference threads, so the PNG
encoding of heatmaps and previews never runs on the event loop.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, Field

from cxr.findings import DISPLAY_NAMES, canonical

# Previews and heatmaps travel as PNG data URLs bounded on their longest side. 512 px is enough for a phone
# screen; Grad-CAM maps come from a 4x4 to 16x16 grid of features, so 256 px loses nothing (the browser
# scales them smoothly over the film) and 14 maps stay a few hundred kB instead of megabytes.
PREVIEW_MAX_SIDE = 512
HEATMAP_MAX_SIDE = 256
FILM_MAX_SIDE = 1024  # NIH films' own size; larger films reach the Predictor downscaled: see bounded_film
# Heatmap opacity at the hottest pixel; cold pixels are fully transparent so the film shows through.
HEAT_MAX_ALPHA = 200

NOT_CLINICAL = "Not for clinical use: it has not been validated for diagnosis and does not replace a radiologist."
LIMITATIONS = (
    "Labels of ChestX-ray14 were mined from reports and are noisy; one hospital's films (NIH Clinical Center). "
    "Each finding is scored on its own: the likelihoods do not add up to 100%. Frontal (PA/AP) adult films only."
)


class ErrorBody(BaseModel):
    """Every refusal: a stable code for programs and a message that says what to do."""

    error: str = Field(examples=["not_an_image"])
    message: str = Field(examples=["the uploaded file: not an image (looks like a PDF document); send a chest X-ray"])
    gate_score: float | None = Field(None, description="The not-a-chest-X-ray gate's score, on a gate refusal.")


class FindingOut(BaseModel):
    name: str = Field(description="NIH spelling, e.g. Pleural_Thickening")
    display_name: str
    probability: float = Field(ge=0, le=1, description="Independent per finding: they do not sum to 1.")
    threshold: float = Field(ge=0, le=1, description="Operating point chosen on validation data.")
    positive: bool = Field(description="probability >= threshold")


class ImageOut(BaseModel):
    width: int
    height: int
    preview: str | None = Field(None, description="With ?preview=true: the film as read (EXIF-rotated, "
                                "DICOM-windowed), PNG data URL, <= 512 px.")


class ModelSummary(BaseModel):
    name: str
    arch: str
    task: str
    input_size: int


class FindingCard(BaseModel):
    name: str
    display_name: str
    threshold: float
    validation_auc: float | None


class ModelCard(ModelSummary):
    """GET /api/v1/model: what the model is, what it was trained and checked on, and what it is for."""

    data: str
    validation: str | None = Field(None, description="Where the AUCs come from (subset, number of films).")
    macro_auc: float | None
    findings: list[FindingCard]
    gate: bool = Field(description="Whether this model refuses images that are not frontal chest X-rays.")
    intended_use: str
    limitations: str
    clinical_use: bool = False


class PredictOut(BaseModel):
    findings: list[FindingOut] = Field(description="In the model's output order (the paper's).")
    model: ModelSummary
    image: ImageOut
    gate_score: float | None = None
    heatmaps: dict[str, str] | None = Field(
        None, description="With ?heatmaps=all or a comma list: finding -> PNG data URL (RGBA: colour and "
        "opacity from the heat; <= 256 px, the film's aspect: stretch it over the preview)."
    )


class Health(BaseModel):
    status: str = "ok"
    model: str


# ------------------------------------------------------------------------------------------ builders


def model_name(meta: Any, model: str | Path | None) -> str:
    named = (meta.provenance or {}).get("name")
    if named:
        return str(named)
    return Path(model).stem if model else "cxr-demo"


def summary(meta: Any, name: str) -> ModelSummary:
    return ModelSummary(name=name, arch=meta.arch, task=meta.task, input_size=meta.input_size)


def model_card(meta: Any, name: str, outputs: Sequence[str]) -> ModelCard:
    metrics = meta.metrics or {}
    per = metrics.get("per_finding") or {}
    prov = meta.provenance or {}
    return ModelCard(
        **summary(meta, name).model_dump(),
        data=_data_line(prov),
        validation=_validation_line(metrics),
        macro_auc=_number(metrics.get("macro_auc")),
        findings=[
            FindingCard(name=o, display_name=DISPLAY_NAMES.get(o, o), threshold=meta.thresholds[o],
                        validation_auc=_number((per.get(o) or {}).get("auc")))
            for o in outputs
        ],
        gate=bool(meta.gate),
        intended_use=f"{prov.get('intended_use') or _card_intended_use()} {NOT_CLINICAL}",
        limitations=str(prov.get("limitations") or LIMITATIONS),
    )


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


def _number(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def parse_heatmaps(value: str | None, outputs: Sequence[str]) -> bool | list[str]:
    """?heatmaps=: '' or 'none' -> False, 'all' -> True, else a comma list of findings (any spelling).

    Raises ValueError with a message naming what is wrong and what is allowed.
    """
    value = (value or "").strip()
    if value.lower() in ("", "none", "false", "0"):
        return False
    if value.lower() in ("all", "true", "1"):
        return True
    names: list[str] = []
    for raw in filter(None, (v.strip() for v in value.split(","))):
        try:
            name = canonical(raw)
        except ValueError:
            name = raw if raw in outputs else ""
        if name not in outputs:
            raise ValueError(f"heatmaps: unknown finding {raw!r}; use 'all' or a comma list of: {', '.join(outputs)}")
        if name not in names:
            names.append(name)
    return names or False


def prediction_out(pred: Any, model: ModelSummary, preview: np.ndarray | None, size: tuple[int, int]) -> PredictOut:
    """The 200 response for a Prediction the gate accepted; size = (width, height) of the film as sent."""
    width, height = size
    return PredictOut(
        findings=[
            FindingOut(name=n, display_name=DISPLAY_NAMES.get(n, n), probability=float(p),
                       threshold=float(pred.thresholds[n]), positive=bool(pred.positive[n]))
            for n, p in pred.probabilities.items()
        ],
        model=model,
        image=ImageOut(width=int(width), height=int(height),
                       preview=None if preview is None else gray_png(preview)),
        gate_score=_number(pred.gate_score),
        heatmaps={n: heatmap_png(h) for n, h in pred.heatmaps.items()} if pred.heatmaps else None,
    )


# ------------------------------------------------------------------------------------------ PNG encoding


def bounded_film(data: bytes, gray: np.ndarray) -> tuple[bytes, np.ndarray]:
    """(bytes for the Predictor, the film as it will read them), the longest side at most FILM_MAX_SIDE.

    The Predictor returns heatmaps at the film's resolution: 14 float32 maps of a 12-megapixel phone photo
    are 670 MB (and several times that while they are computed), of a film at the 64-megapixel limit 3.6 GB.
    Models read 224-512 px and the page shows 512 px, so a film over 1024 px (NIH's size) is downscaled,
    antialiased, and re-encoded losslessly: a colour original stays colour (the gate measures colour in the
    original bytes: a photo must still be refused), a gray one becomes a 16-bit PNG (its gray levels kept).
    Done for every request, so probabilities never depend on whether heatmaps were asked for.
    """
    from cxr.images import read as images
    h, w = gray.shape
    if max(h, w) <= FILM_MAX_SIDE:
        return data, gray
    scale = FILM_MAX_SIDE / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = _colour_small(data, size)
    if small is None:
        small = _gray_small(gray, size)
    buf = io.BytesIO()
    small.save(buf, format="PNG", compress_level=1)
    data = buf.getvalue()
    return data, images.read_image(data)


def _colour_small(data: bytes, size: tuple[int, int]):
    """The original, EXIF-rotated as images.read_image does and resized, when it is a colour image Pillow
    reads; else None (gray files, DICOM)."""
    from PIL import Image, ImageOps

    try:
        im = Image.open(io.BytesIO(data))
        if im.mode in ("1", "L", "LA", "I", "F") or im.mode.startswith("I;16"):
            return None
        side = max(size)  # square: the target may be rotated relative to the stored image
        im.draft("RGB", (side, side))  # JPEG: decode at a reduced scale no smaller than the target
        im = ImageOps.exif_transpose(im.convert("RGB"))
    except Exception:  # noqa: BLE001 - read_image already decoded it; any surprise falls back to gray
        return None
    return im.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)


def _gray_small(gray: np.ndarray, size: tuple[int, int]):
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(gray, np.float32), mode="F")
    small = np.asarray(im.resize(size, Image.Resampling.BILINEAR, reducing_gap=None), np.float32)
    return Image.fromarray(np.round(np.clip(small, 0.0, 1.0) * 65535).astype(np.uint16))


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
    """uint8 H x W x 3: cxr.explain.gradcam's colormap when it has one, so the page matches the CLI's figures."""
    try:
        from cxr.explain.gradcam import colorize
    except ImportError:  # explain not installed in this build: the conventional Grad-CAM colormap
        colorize = None
    if colorize is not None:
        out = np.asarray(colorize(heat))
    else:
        from matplotlib import colormaps

        out = colormaps["jet"](heat)
    out = out[..., :3]
    if out.dtype != np.uint8:
        out = np.clip(np.asarray(out, np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)
    return out
