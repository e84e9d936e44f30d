"""The web API (cxr.web.app) on the real Predictor with a small random-weight Lite0 checkpoint at 128 px."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cxr.cli.serve import resolve_port
from cxr.errors import CxrError
from cxr.findings import FINDINGS
from cxr.images import read_film
from cxr.web.app import create_app
from conftest import save_random_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

AUCS = {f: 0.6 + 0.01 * i for i, f in enumerate(FINDINGS)}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_random_model(
        tmp_path_factory.mktemp("model") / "tiny-lite0.safetensors", thresholds={"Effusion": 0.3, "Hernia": 0.05},
        metrics={"per_finding": {f: {"auc": a, "auc_ci": [a - 0.05, a + 0.05]} for f, a in AUCS.items()},
                 "macro_auc": 0.665,
                 "n_images": 1234, "subset": "validation"},
    )


@pytest.fixture(scope="module")
def predictor(tiny_model):
    from cxr.inference.predictor import Predictor

    return Predictor(tiny_model, threads=1)


@pytest.fixture(scope="module")
def client(predictor, tiny_model):
    with TestClient(create_app(predictor, model=tiny_model)) as c:
        yield c


@pytest.fixture(scope="module")
def film(first_film_512) -> bytes:
    return first_film_512.read_bytes()


def post(client, data: bytes, query: str = "", filename: str = "film.png", field: str = "file"):
    return client.post(f"/api/v1/predict{query}", files={field: (filename, data, "application/octet-stream")})


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header (valid CRC) promises width x height 8-bit gray pixels: 10^10 for the default."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 1024))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def decode_data_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def assert_refusal(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code and len(body["message"]) > 20, body
    return body


# ---------------------------------------------------------------------------------------------- predict


def test_predict_matches_the_predictor(client, predictor, film):
    r = post(client, film)
    assert r.status_code == 200, r.text
    body = r.json()
    names = [f["name"] for f in body["findings"]]
    assert names == list(FINDINGS)
    direct = predictor.predict_one(film)
    for f in body["findings"]:
        assert f["probability"] == pytest.approx(direct.probabilities[f["name"]], abs=1e-5)
        assert f["threshold"] == pytest.approx(direct.thresholds[f["name"]])
        assert f["positive"] == (f["probability"] >= f["threshold"])
    thresholds = {f["name"]: f["threshold"] for f in body["findings"]}
    assert thresholds["Effusion"] == pytest.approx(0.3) and thresholds["Hernia"] == pytest.approx(0.05)
    assert body["image"] == {"width": 512, "height": 512}
    assert body["model"] == {"name": "tiny-lite0", "arch": "efficientnet_lite0", "task": "multilabel",
                             "input_size": 128, "members": 1}
    assert "heatmaps" not in body


def test_heatmaps_on_request_as_bounded_rgba_pngs(client, film):
    body = post(client, film, "?heatmaps=effusion,Pleural thickening").json()
    assert sorted(body["heatmaps"]) == ["Effusion", "Pleural_Thickening"]
    im = decode_data_url(body["heatmaps"]["Effusion"])
    assert im.mode == "RGBA" and max(im.size) <= 256 and im.size[0] == im.size[1]
    all_maps = post(client, film, "?heatmaps=all").json()["heatmaps"]
    assert sorted(all_maps) == sorted(FINDINGS)
    # Opacity follows the heat: the hottest place shows (up to ~80%), cold places let the film through.
    # (A random-weight model can give a finding an all-zero map, so look across all 14.)
    peaks = [int(np.asarray(decode_data_url(u))[..., 3].max()) for u in all_maps.values()]
    assert 0 < max(peaks) <= 200


def test_unknown_heatmap_finding_is_refused(client, film):
    body = assert_refusal(post(client, film, "?heatmaps=Effusion,Flu"), 400, "bad_heatmaps")
    assert "'Flu'" in body["message"] and "Atelectasis" in body["message"]


def test_preview_is_the_film_as_read(client, film):
    body = post(client, film, "?preview=true").json()
    im = decode_data_url(body["image"]["preview"])
    assert im.mode == "L" and im.size == (512, 512)
    original = np.asarray(Image.open(io.BytesIO(film)).convert("L"), np.int16)
    assert np.abs(np.asarray(im, np.int16) - original).max() <= 1


def test_large_film_is_decoded_once_and_read_as_the_cli_reads_it(client, predictor, film, monkeypatch):
    """A 3000 px film (a phone photo's size): one decode per request, the same probabilities as the
    Predictor on the file, and heatmaps computed at most 256 px (at the film's size they would be hundreds
    of MB), its aspect kept."""
    big = png(np.asarray(Image.open(io.BytesIO(film)).resize((3000, 2400), Image.Resampling.BICUBIC)))
    direct = predictor.predict_one(big)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    body = post(client, big, "?heatmaps=all&preview=true").json()
    assert len(opened) == 1, f"the upload was opened {len(opened)} times"
    assert body["image"]["width"] == 3000 and body["image"]["height"] == 2400 and len(body["heatmaps"]) == 14
    assert decode_data_url(body["image"]["preview"]).size == (512, 410)
    for url in body["heatmaps"].values():
        w, h = decode_data_url(url).size
        assert w == 256 and abs(h - 205) <= 1
    for f in body["findings"]:
        assert f["probability"] == pytest.approx(direct.probabilities[f["name"]], abs=1e-5)


def test_large_colour_photo_stays_colour_for_the_gate(client):
    """The gate measures colour in the original colours, whatever the photo's size: a photo stays refused."""
    from cxr.inference import gate
    rng = np.random.default_rng(1)
    photo = Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).resize((4000, 3000))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    read = read_film(buf.getvalue())  # the web's one decode measures colour on the original colours
    assert read.colourfulness == pytest.approx(gate.colourfulness(buf.getvalue()), rel=0.1)
    assert read.colourfulness > gate.MAX_COLOURFULNESS
    assert_refusal(post(client, buf.getvalue()), 422, "not_a_chest_xray")


def test_model_card(client):
    card = client.get("/api/v1/model").json()
    assert card["name"] == "tiny-lite0" and card["input_size"] == 128
    assert card["macro_auc"] == pytest.approx(0.665) and "1,234 films" in card["validation"]
    assert [f["name"] for f in card["findings"]] == list(FINDINGS)
    assert {f["name"]: f["validation_auc"] for f in card["findings"]} == pytest.approx(AUCS)
    assert "ChestX-ray14" in card["data"]
    assert "not for clinical use" in card["intended_use"].lower() and card["clinical_use"] is False
    assert client.get("/healthz").json() == {"status": "ok", "model": "tiny-lite0"}


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("data, status, code", [
    (b"name,age\nfilm,42\n", 400, "not_an_image"),
    (b"%PDF-1.7\n" + bytes(200), 400, "not_an_image"),
    (b"", 400, "empty_image"),
    (png(np.arange(90_000, dtype=np.uint32).reshape(300, 300).astype(np.uint8))[:80], 400, "corrupt_image"),
    (bomb_png(), 413, "image_too_large"),
    (png(np.zeros((40, 40), np.uint8)), 422, "image_too_small"),
    (b"\0\0\0\x18ftypheic" + bytes(100), 415, "unsupported_image"),
    (png(np.full((512, 512), 128, np.uint8)), 422, "not_a_chest_xray"),  # the real gate: a blank image
], ids=["csv", "pdf", "empty", "truncated-png", "bomb", "thumbnail", "heic", "blank"])
def test_unreadable_uploads_get_json_refusals(client, data, status, code):
    assert_refusal(post(client, data), status, code)


def test_truncated_film_is_corrupt(client, film):
    assert_refusal(post(client, film[: len(film) // 2]), 400, "corrupt_image")


def test_request_shape_refusals(client, film):
    assert_refusal(post(client, film, field="image"), 400, "missing_file")
    assert_refusal(client.post("/api/v1/predict", content=film, headers={"content-type": "image/png"}),
                   415, "not_multipart")
    cut = b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n" + film[:1000]
    assert_refusal(client.post("/api/v1/predict", content=cut,
                               headers={"content-type": "multipart/form-data; boundary=XyZ"}),
                   400, "incomplete_upload")
    assert_refusal(client.get("/api/v1/predict"), 405, "method_not_allowed")
    assert_refusal(client.get("/api/v2/predict"), 404, "not_found")


def test_gate_refusal_is_a_distinct_422(predictor, film):
    """A Prediction the gate refused becomes a 422 with the gate's reason and score, never findings.
    (Whether the gate refuses is the Predictor's business, tested with it; here the real prediction is
    marked refused, as the gate would.)"""
    import dataclasses

    def refused(*args, **kwargs):
        pred = predictor.predict_film(*args, **kwargs)
        return dataclasses.replace(pred, refused="Looks like a photo of a hand.", gate_score=0.03)

    app = create_app(types.SimpleNamespace(meta=predictor.meta, predict_film=refused))
    with TestClient(app) as c:
        body = assert_refusal(post(c, film, "?heatmaps=all&preview=true"), 422, "not_a_chest_xray")
    assert set(body) == {"error", "message", "gate_score"} and body["gate_score"] == pytest.approx(0.03)
    assert body["message"].startswith("Looks like a photo of a hand.") and "frontal" in body["message"]


# ---------------------------------------------------------------------------------------------- safety


def test_security_headers_everywhere(client, film):
    for r in (client.get("/"), client.get("/api/v1/model"), client.get("/nope"), post(client, b"x")):
        h = r.headers
        assert h["content-security-policy"].startswith("default-src 'self'")
        assert h["x-content-type-options"] == "nosniff" and h["referrer-policy"] == "no-referrer"
        assert h["x-frame-options"] == "DENY" and "camera=(self)" in h["permissions-policy"]
    assert client.get("/api/v1/model").headers["cache-control"] == "no-store"


class Blocking:
    """The real predictor behind a gate the test opens: lets a test hold inference slots busy."""

    def __init__(self, inner):
        self.inner, self.meta = inner, inner.meta
        self.release, self.started = threading.Event(), threading.Semaphore(0)

    def predict_film(self, *args, **kwargs):
        self.started.release()
        assert self.release.wait(60), "the test never released the predictor"
        return self.inner.predict_film(*args, **kwargs)


def test_saturated_server_answers_503_and_stays_responsive(predictor, film):
    blocking = Blocking(predictor)
    app = create_app(blocking, max_concurrency=1, max_queue=1)
    with TestClient(app) as c:
        results = []
        workers = [threading.Thread(target=lambda: results.append(post(c, film))) for _ in range(2)]
        try:
            for w in workers:
                w.start()
            assert blocking.started.acquire(timeout=30)  # one in inference, the other admitted and waiting
            for _ in range(300):
                if app.state.admission.admitted == 2:
                    break
                time.sleep(0.05)
            assert app.state.admission.admitted == 2
            r = post(c, film)
            assert_refusal(r, 503, "busy")
            assert int(r.headers["retry-after"]) > 0
            assert c.get("/healthz").status_code == 200  # the event loop is not blocked by inference
        finally:
            blocking.release.set()
            for w in workers:
                w.join(60)
        assert [r.status_code for r in results] == [200, 200]
        assert app.state.admission.admitted == 0
        assert post(c, film).status_code == 200


def test_no_debug_and_no_tracebacks(predictor, film):
    def explode(*args, **kwargs):
        raise RuntimeError("secret internals")

    app = create_app(types.SimpleNamespace(meta=predictor.meta, predict_film=explode))
    assert app.debug is False
    with TestClient(app, raise_server_exceptions=False) as c:
        r = post(c, film)
        assert r.status_code == 500 and r.json()["error"] == "internal"
        assert "secret internals" not in r.text and "Traceback" not in r.text


# ---------------------------------------------------------------------------------------------- API docs


def test_openapi_is_complete_and_takes_no_urls(client):
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/api/v1/predict"]["post"]
    schema = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["file"] and schema["properties"]["file"]["format"] == "binary"
    assert {"200", "400", "413", "415", "422", "503"} <= set(predict["responses"])
    assert {"/api/v1/model", "/healthz"} <= set(spec["paths"])
    params = [p["name"] for ops in spec["paths"].values() for op in ops.values() for p in op.get("parameters", [])]
    assert not [p for p in params if re.search("url|uri|link|href|fetch", p, re.I)]


def test_a_url_upload_is_not_fetched(client):
    assert_refusal(post(client, b"http://127.0.0.1:9/chest.png"), 400, "not_an_image")


# ---------------------------------------------------------------------------------------------- CLI, Docker


def test_port_comes_from_option_then_env_then_default():
    assert resolve_port(None, {"PORT": "5123"}) == 5123
    assert resolve_port(8080, {"PORT": "5123"}) == 8080
    assert resolve_port(None, {}) == 8000
    with pytest.raises(CxrError, match="PORT='web'"):
        resolve_port(None, {"PORT": "web"})


def test_dockerfile_cmd_serves_on_port(tiny_model):
    """The Dockerfile's CMD, run here as the container would (on loopback, not 0.0.0.0), with $PORT set."""
    text = (Path(__file__).resolve().parents[1] / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M) and re.search(r"^USER (?!root)\w+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M) and "--index-url" in text
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[:2] == ["sh", "-c"] and "${PORT" in cmd[2]
    port = free_port()
    env = {**os.environ, "PORT": str(port), "CXR_MODEL": str(tiny_model),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["sh", "-c", cmd[2].replace("0.0.0.0", "127.0.0.1")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, health = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert health is not None and health.json() == {"status": "ok", "model": "tiny-lite0"}, proc.poll()
        assert "not for clinical use" in httpx.get(f"http://127.0.0.1:{port}/").text.lower()
    finally:
        proc.send_signal(signal.SIGTERM)  # exec: the server itself gets it, as from `docker stop`
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells how it ended.
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in out, out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
