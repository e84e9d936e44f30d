"""The routes: the page at `/`, the offline API reference at /docs, /healthz, and the JSON API under /api/v1.

Each route's `responses=` lists every refusal it can answer with (cxr.web.errors), so /openapi.json
documents them all; tests/test_openapi.py holds the app to that with schemathesis.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Sequence

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from cxr import images
from cxr import settings as config
from cxr.findings import canonical
from cxr.inference import artefacts, pipeline
from cxr.web import render
from cxr.web.deps import UPLOAD_BODY, AdmittedUpload, PredictorDep, ServedDep, get_served
from cxr.web.errors import FILM_REFUSALS, INTERNAL, INVALID_REQUEST, UPLOAD_REFUSALS, ApiError, image_error, merged
from cxr.web.schemas import CaptureOut, Health, ModelCard, ModelSummary, PredictOut, StabilityOut

log = logging.getLogger("cxr.web.routes")
router = APIRouter()
UPLOAD_LABEL = "the uploaded file"  # never the client's file name: it may carry a patient's name
CROP_HELP = ("The film's outline in a photo, as the page lets the user adjust it: 8 numbers "
             "x0,y0,x1,y1,x2,y2,x3,y3 (4 corners in pixels of the image as sent, after EXIF rotation), or "
             "'full' to read the whole image. Default: the film is looked for on a light box.")
# Off by default: 3 more films through the network made a plain read about 3.5x slower (measured on the
# shared films, bundled model, 2 cores); the page asks for it, beside heatmaps that cost more.
STABILITY_HELP = ("Also read 3 test-time variants (4 degree tilt, JPEG 70, exposure) and report how far the "
                  "probabilities move, 'unstable' past a limit: 3 more films through the network (about 3.5x "
                  "the time of a read without heatmaps).")


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
                              {400: {"description": "An unknown finding in ?heatmaps= (bad_heatmaps), or a "
                                                    "?crop= that cannot be a film's outline (bad_crop)"},
                               422: {"description": "The film's orientation or polarity is unsure "
                                                    "(orientation_unsure)"}}))
async def predict(upload: AdmittedUpload, predictor: PredictorDep, served: ServedDep,
                  wanted: bool | list[str] = Depends(heatmap_choice),
                  preview: bool = Query(False, description="Include the film as read (PNG, <= 512 px)"),
                  crop: str | None = Query(None, max_length=200, description=CROP_HELP),
                  stability: bool = Query(False, description=STABILITY_HELP)):
    """Read one film (multipart field `file`: PNG, JPEG or DICOM): 14 independent likelihoods."""
    data = await upload.read()
    start = time.perf_counter()
    body = await upload.run(infer, predictor, data, wanted, preview, served.summary, crop, stability)
    log.debug("predict: %.0f ms", 1000 * (time.perf_counter() - start))
    return JSONResponse(body)


def parse_crop(value: str | None) -> list[float] | str | None:
    """?crop=: None, 'full', or 8 numbers; raises ApiError(400, bad_crop) naming what is wrong."""
    value = (value or "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("full", "none"):
        return "full"
    try:
        numbers = [float(v) for v in value.replace(";", ",").split(",")]
    except ValueError:
        numbers = []
    if len(numbers) != 8:
        raise ApiError(400, "bad_crop", "crop: give 8 numbers x0,y0,x1,y1,x2,y2,x3,y3 (the film's corners in "
                       "the image's pixels), or 'full'")
    return numbers


def capture_out(pred, film: images.Film, preview: bool) -> CaptureOut | None:
    """What the capture stage did, with the image as sent when there is a crop to draw over it."""
    if pred.capture is None:
        return None
    c = pred.capture.to_dict()
    c.pop("refused", None)
    photo = render.gray_png(film.gray) if preview and c["crop"] else None
    return CaptureOut(**c, photo=photo)


def infer(predictor, data: bytes, heatmaps: bool | list[str], preview: bool, model: ModelSummary,
          crop: str | None = None, stability: bool = False) -> dict:
    """On an inference thread: decode once, predict, refuse or encode. Returns the JSON body of a 200.

    Heatmaps come back at most render.HEATMAP_MAX_SIDE px: Grad-CAM maps at a phone photo's full size
    would be hundreds of MB (14 float32 maps of 12 megapixels) for a picture drawn at 256 px.
    """
    wanted_crop = parse_crop(crop)
    try:
        film = images.read_film(data, name=UPLOAD_LABEL)
        if isinstance(wanted_crop, list):
            wanted_crop = pipeline.crop_quad(wanted_crop, *film.size)
        pred = predictor.predict_film(film, heatmaps=heatmaps, heatmap_max_side=render.HEATMAP_MAX_SIDE,
                                      crop=wanted_crop, stability=stability, keep_read=preview)
    except images.ImageError as e:
        raise image_error(e) from None
    except pipeline.CropError as e:
        raise ApiError(400, "bad_crop", str(e)) from None
    if pred.error:
        raise ApiError(400, "unreadable_image", str(pred.error))
    if pred.capture is not None and pred.capture.refused and pred.refused == pred.capture.message:
        raise ApiError(422, "orientation_unsure", pipeline_sentence(pred.capture.message))
    if pred.refused:
        reason = pred.refused[:1].upper() + pred.refused[1:].rstrip(".")  # the gate's reason is a clause
        raise ApiError(422, "not_a_chest_xray",
                       f"{reason}. This does not look like a frontal chest X-ray, so it was not read. "
                       "Send a frontal (PA or AP) chest film, photographed flat and filling the frame.",
                       gate_score=render.number(pred.gate_score))
    out = render.prediction_out(pred, model, pred.read if preview else None, film.size)
    out.capture = capture_out(pred, film, preview)
    out.stability = StabilityOut(**pred.stability.to_dict()) if pred.stability else None
    return out.model_dump(exclude_none=True)


def pipeline_sentence(clause: str) -> str:
    return clause[:1].upper() + clause[1:].rstrip(".") + "."


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


# --- the installable, offline page: its manifest, service worker, and what it needs to read on the device ----


@router.get("/manifest.webmanifest", include_in_schema=False)
def manifest() -> FileResponse:
    return FileResponse(config.STATIC_DIR / "manifest.webmanifest", media_type="application/manifest+json")


@router.get("/sw.js", include_in_schema=False)
def service_worker() -> FileResponse:
    # Served from the root so that its scope is the whole page; no-cache so a new version is seen at once.
    return FileResponse(config.STATIC_DIR / "sw.js", media_type="text/javascript",
                        headers={"cache-control": "no-cache", "service-worker-allowed": "/"})


@router.get("/offline/model.json", include_in_schema=False)
def offline_model(request: Request, served: ServedDep) -> JSONResponse:
    """Everything the page needs to read a film on the device as the server does (or why it cannot)."""
    state = request.app.state
    if getattr(state, "offline_config", None) is None:
        state.offline_config = offline_config(state.predictor, served)
    return JSONResponse(state.offline_config, headers={"cache-control": "no-cache"})


@router.get("/offline/model.onnx", include_in_schema=False)
def offline_graph(request: Request, served: ServedDep) -> FileResponse:
    offline_model(request, served)  # builds and caches the config: the graph is served only when usable
    state = request.app.state
    if not state.offline_config.get("available"):
        raise ApiError(404, "not_found", f"No on-device model: {state.offline_config.get('why')}.")
    graph = artefacts.paths(state.predictor.path).graph
    return FileResponse(graph, media_type="application/octet-stream", headers={"cache-control": "no-cache"})


def _f32(a) -> str:
    """A float array as base64 of its little-endian float32 bytes: a tenth of the JSON text of its numbers."""
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def offline_config(predictor, served) -> dict:
    """What ondevice.js reproduces: preprocessing, capture (finder, orientation), the gate, probabilities,
    verdicts, the stability estimate."""
    from cxr.explain.maps import JET
    from cxr.images import capture as camera
    from cxr.inference import gate as gates
    from cxr.inference import preprocess as convention
    from cxr.inference import stability as stab
    from cxr.tasks import get_task

    meta = predictor.meta
    why = _offline_unavailable(predictor, meta, convention)
    if why:
        return {"available": False, "why": why}
    task = get_task(meta.task)
    path = artefacts.paths(predictor.path)
    stats, g = predictor.gate.stats, predictor.gate
    weights, mean, scale = camera.scorer_parameters()  # the orientation scorer the capture stage runs
    platt = meta.platt
    return {
        "available": True, "version": artefacts.sha256(path.graph)[:16], "model": served.summary.model_dump(),
        "card": served.card.model_dump(), "input_size": int(meta.input_size),
        "mean": [float(v) for v in meta.mean], "std": [float(v) for v in meta.std],
        "columns": [int(c) for c in task.columns], "findings": list(task.reported),
        "platt": [[float(v) for v in platt[0]], [float(v) for v in platt[1]]] if platt else None,
        "gate": None if stats is None else {
            "threshold": g.threshold, "mean": _f32(stats.mean), "components": _f32(stats.components),
            "dims": int(stats.components.shape[1]), "variances": _f32(stats.variances), "residual": stats.residual},
        "checks": {"refusal": gates.REFUSAL, "max_colourfulness": gates.MAX_COLOURFULNESS,
                   "min_std": gates.MIN_STD, "max_aspect": gates.MAX_ASPECT,
                   "max_flat_share": gates.MAX_FLAT_SHARE, "sample_side": gates._SAMPLE_SIDE},
        "orientation": {"weights": _f32(weights), "mean": _f32(mean), "scale": _f32(scale), "thumb": camera.THUMB,
                        "work_side": camera.WORK_SIDE, "min_confidence": pipeline.MIN_ORIENTATION_CONFIDENCE},
        "capture": {"read_scale": pipeline.READ_SCALE, "min_crop_share": pipeline.MIN_CROP_SHARE},
        "stability": {"variants": list(stab.VARIANTS), "tilt_deg": stab.TILT_DEG, "jpeg_quality": stab.JPEG_QUALITY,
                      "gamma": stab.GAMMA, "lift": stab.LIFT, "limit": stab.LIMIT},
        "jet": JET.astype(int).ravel().tolist(), "heatmap_max_side": render.HEATMAP_MAX_SIDE,
        "heat_max_alpha": render.HEAT_MAX_ALPHA, "preview_max_side": render.PREVIEW_MAX_SIDE,
    }


def _offline_unavailable(predictor, meta, convention) -> str | None:
    """Why this model cannot be read on the device (the page then stays in server mode), or None."""
    if predictor.path is None:
        return "the served model is in memory only (no checkpoint file to export)"
    if convention.custom(meta):
        return f"the model uses {meta.convention!r} preprocessing, which only the server reproduces"
    stale = artefacts.stale_reason(predictor.path)
    if stale:
        return f"no fresh ONNX artefacts ({stale})"
    if not (config.STATIC_DIR / "vendor" / "ort-wasm-simd-threaded.wasm").is_file():
        return ("the browser runtime was not vendored into this installation "
                "(run scripts/vendor_web.py before building, or use the Dockerfile)")
    return None
