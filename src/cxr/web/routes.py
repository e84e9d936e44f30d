"""The routes: the page at `/`, the offline API reference at /docs, /healthz, and the JSON API under /api/v1.

Each route's `responses=` lists every refusal it can answer with (cxr.web.errors), so /openapi.json
documents them all; tests/test_openapi.py holds the app to that with schemathesis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, JSONResponse

from cxr import images
from cxr import settings as config
from cxr.findings import canonical
from cxr.web import render
from cxr.web.deps import UPLOAD_BODY, AdmittedUpload, PredictorDep, ServedDep, get_served
from cxr.web.errors import FILM_REFUSALS, INTERNAL, INVALID_REQUEST, UPLOAD_REFUSALS, ApiError, image_error, merged
from cxr.web.schemas import Health, ModelCard, ModelSummary, PredictOut

log = logging.getLogger("cxr.web.routes")
router = APIRouter()
UPLOAD_LABEL = "the uploaded file"  # never the client's file name: it may carry a patient's name


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(config.STATIC_DIR / "index.html")


@router.get("/docs", include_in_schema=False)
def docs() -> FileResponse:
    return FileResponse(config.STATIC_DIR / "docs.html")


@router.get("/healthz", response_model=Health, tags=["service"], responses=INTERNAL)
def healthz(served: ServedDep) -> Health:
    return Health(model=served.name)


@router.get("/api/v1/model", response_model=ModelCard, tags=["model"], responses=INTERNAL)
def model_info(served: ServedDep) -> ModelCard:
    """The model card: name, training data, validation AUCs, intended use."""
    return served.card


def heatmap_choice(
    heatmaps: str | None = Query(None, description="'all' or a comma list of findings"),
    served=Depends(get_served),
) -> bool | list[str]:
    try:
        return parse_heatmaps(heatmaps, served.outputs)
    except ValueError as e:
        raise ApiError(400, "bad_heatmaps", str(e)) from None


@router.post("/api/v1/predict", response_model=PredictOut, tags=["predict"], openapi_extra=UPLOAD_BODY,
             responses=merged(INVALID_REQUEST, UPLOAD_REFUSALS, FILM_REFUSALS, INTERNAL,
                              {400: {"description": "An unknown finding in ?heatmaps= (bad_heatmaps)"}}))
async def predict(upload: AdmittedUpload, predictor: PredictorDep, served: ServedDep,
                  wanted: bool | list[str] = Depends(heatmap_choice),
                  preview: bool = Query(False, description="Include the film as read (PNG, <= 512 px)")):
    """Read one film (multipart field `file`: PNG, JPEG or DICOM): 14 independent likelihoods."""
    data = await upload.read()
    start = time.perf_counter()
    body = await upload.run(infer, predictor, data, wanted, preview, served.summary)
    log.debug("predict: %.0f ms", 1000 * (time.perf_counter() - start))
    return JSONResponse(body)


def infer(predictor, data: bytes, heatmaps: bool | list[str], preview: bool, model: ModelSummary) -> dict:
    """On an inference thread: decode once, predict, refuse or encode. Returns the JSON body of a 200.

    Heatmaps come back at most render.HEATMAP_MAX_SIDE px: Grad-CAM maps at a phone photo's full size
    would be hundreds of MB (14 float32 maps of 12 megapixels) for a picture drawn at 256 px.
    """
    try:
        film = images.read_film(data, name=UPLOAD_LABEL)
        pred = predictor.predict_film(film, heatmaps=heatmaps, heatmap_max_side=render.HEATMAP_MAX_SIDE)
    except images.ImageError as e:
        raise image_error(e) from None
    if pred.error:
        raise ApiError(400, "unreadable_image", str(pred.error))
    if pred.refused:
        reason = pred.refused[:1].upper() + pred.refused[1:].rstrip(".")  # the gate's reason is a clause
        raise ApiError(422, "not_a_chest_xray",
                       f"{reason}. This does not look like a frontal chest X-ray, so it was not read. "
                       "Send a frontal (PA or AP) chest film, photographed flat and filling the frame.",
                       gate_score=render.number(pred.gate_score))
    out = render.prediction_out(pred, model, film.gray if preview else None, film.size)
    return out.model_dump(exclude_none=True)


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
