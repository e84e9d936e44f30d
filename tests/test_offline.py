"""The offline page (issue 13) in Debian chromium: installed once online, then read films with no network,
on the device (onnxruntime-web WASM), giving the server's answers. A small random Lite0 exported to ONNX
artefacts here (fast); the bundled model too where its artefacts exist. Screenshots go to test-artifacts/."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assessed_everywhere, dicom_dataset, save_random_model
from test_browser import ARTIFACTS, PHONE, _serve

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.browser]
VENDOR = Path(__file__).resolve().parents[1] / "src" / "cxr" / "web" / "static" / "vendor"
READY_MS = 180_000  # the first visit caches a 14 MB runtime and compiles it on a 2-core machine


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    from cxr.inference import export

    if not (VENDOR / "ort-wasm-simd-threaded.wasm").is_file():
        pytest.fail(f"{VENDOR} has no onnxruntime-web: run scripts/setup.sh (it runs scripts/vendor_web.py)")
    path = save_random_model(tmp_path_factory.mktemp("model") / "offline-lite0.safetensors",
                             metrics={"macro_auc": 0.5, "n_images": 10, "subset": "validation"},
                             assessment=assessed_everywhere())
    export.export_artefacts(path)
    return path


@pytest.fixture(scope="module")
def server(exported):
    from cxr.inference.predictor import Predictor
    from cxr.web.app import create_app

    yield from _serve(create_app(Predictor(exported, threads=1), model=exported))


def _installed(browser, url):
    context = browser.new_context(viewport=PHONE, service_workers="allow")
    page = context.new_page()
    page.goto(url + "/")
    page.wait_for_selector("#offline >> text=Ready offline", timeout=READY_MS)
    return context, page


@pytest.fixture
def installed(browser, server):
    """A phone-sized page that has visited once online and says it is ready offline."""
    context, page = _installed(browser, server)
    yield context, page
    context.close()


@pytest.fixture
def installed_bundled(browser, bundled):
    context, page = _installed(browser, bundled)
    yield page, bundled
    context.close()


def films(images_512: Path, n: int) -> list[Path]:
    return sorted(images_512.glob("*.png"))[:n]


def device_read(page, data: bytes, name: str = "film.png") -> dict:
    """{status, body} from the page's on-device reader, for one file's bytes."""
    return page.evaluate("""async ([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const r = await cxrDevice.read(new File([bytes], name));
        return {status: r.status, body: {...r.body, heatmaps: Object.keys(r.body.heatmaps || {}),
                image: r.body.image && {width: r.body.image.width, height: r.body.image.height}}};
    }""", [base64.b64encode(data).decode(), name])


def server_read(server: str, data: bytes) -> dict:
    import httpx

    r = httpx.post(server + "/api/v1/predict", files={"file": ("f", data)}, timeout=120)
    return {"status": r.status_code, "body": r.json()}


def probs(body: dict) -> dict[str, float]:
    return {f["name"]: f["probability"] for f in body["findings"]}


def test_offline_reload_reads_a_real_film_with_no_request(installed, images_512):
    context, page = installed
    context.set_offline(True)
    page.reload()
    page.wait_for_selector("#offline >> text=Ready offline", timeout=READY_MS)
    assert page.is_checked("#mode-device"), "on-device must be the default once the model is cached"
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if r.url.startswith("http") else None)
    page.set_input_files("#picker", str(films(images_512, 1)[0]))
    page.wait_for_function("() => ['results', 'error', 'refusal'].some(id => !document.getElementById(id).hidden)",
                           timeout=READY_MS)
    assert page.locator("#results").is_visible(), page.inner_text("#upload")
    assert page.get_attribute("#results", "data-produced-by") == "device"
    assert "on this device" in page.inner_text("#produced-by").lower()
    assert page.locator("#results .finding").count() == 14
    page.locator("#findings .finding").first.click()
    page.locator("#overlay").wait_for(state="visible")
    page.wait_for_function("() => document.getElementById('overlay').naturalWidth > 0")
    assert "not for clinical use" in page.inner_text("body").lower()
    assert sent == [], f"requests left the page after the upload: {sent}"
    overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the phone page overflows by {overflow} px"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "offline-phone.png"), full_page=True)


def test_device_matches_server_on_ten_films(installed_bundled, images_512):
    page, server = installed_bundled
    worst, names, seen = 0.0, [], []
    for path in films(images_512, 10):
        data = path.read_bytes()
        dev, srv = device_read(page, data), server_read(server, data)
        assert dev["status"] == srv["status"] == 200, (path.name, dev, srv)
        a, b = probs(dev["body"]), probs(srv["body"])
        assert a.keys() == b.keys() and len(a) == 14
        assert {f["name"]: f["positive"] for f in dev["body"]["findings"]} == \
               {f["name"]: f["positive"] for f in srv["body"]["findings"]} or max(abs(a[k] - b[k]) for k in a) < 1e-3
        assert len(dev["body"]["heatmaps"]) == 14
        worst = max(worst, max(abs(a[k] - b[k]) for k in a))
        names.append(path.name)
        seen.append(list(b.values()))
    spread = float(np.ptp(np.asarray(seen), axis=0).max())  # the films must give different answers
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "offline-parity.json").write_text(json.dumps({"films": names, "max_abs_dp": worst,
                                                               "spread_between_films": spread}))
    assert spread > 1e-4, "the model answers the same for every film: parity would prove nothing"
    assert worst <= 0.01, f"browser vs server: max |dp| {worst:.4f} over {len(names)} films"


def _dicom(pixels: np.ndarray, **attrs) -> bytes:
    ds = dicom_dataset(pixels, attrs.pop("photometric", "MONOCHROME2"), attrs.pop("bits", 16), **attrs)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_dicom_monochrome1_window_and_rescale_match_the_server(installed_bundled, images_512):
    page, server = installed_bundled
    read = 0
    for film in films(images_512, 4):  # the window changes contrast: the gate may refuse a film; then the next
        with Image.open(film) as im:
            u8 = np.asarray(im.convert("L"), dtype=np.uint16)
        stored = (4095 - u8 * 16).astype(np.uint16)  # MONOCHROME1: white is low; 12 bits in 16
        data = _dicom(stored, photometric="MONOCHROME1", BitsStored=12, HighBit=11, RescaleSlope="2",
                      RescaleIntercept="-100", WindowCenter="3900", WindowWidth="7600")
        dev, srv = device_read(page, data, "film.dcm"), server_read(server, data)
        assert dev["status"] == srv["status"], (dev, srv)
        if srv["status"] != 200:  # refused on both: for the same reason, from the same pixels
            assert dev["body"]["gate_score"] == pytest.approx(srv["body"]["gate_score"], abs=1e-3)
            continue
        a, b = probs(dev["body"]), probs(srv["body"])
        assert max(abs(a[k] - b[k]) for k in a) <= 0.01
        read += 1
    assert read >= 2, "the gate refused most windowed films: pick others"


def test_compressed_dicom_is_refused_with_a_server_suggestion(installed, server):
    _, page = installed
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds = dcmread(io.BytesIO(_dicom(np.full((64, 64), 7, np.uint16))))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])  # a J2K codestream's start: never decoded
    ds["PixelData"].is_undefined_length = True
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    dev = device_read(page, buf.getvalue(), "film.dcm")
    assert dev["status"] != 200 and "on the server" in dev["body"]["message"], dev


def test_non_film_is_refused_by_the_gate_on_the_device(installed, server):
    _, page = installed
    rng = np.random.default_rng(0)
    colour = (rng.random((300, 300, 3)) * 255).astype(np.uint8)
    colour[..., 0] = 255  # strongly red: the gate's colour check, as on the server
    buf = io.BytesIO()
    Image.fromarray(colour).save(buf, format="PNG")
    dev, srv = device_read(page, buf.getvalue()), server_read(server, buf.getvalue())
    assert srv["status"] == 422 and srv["body"]["error"] == "not_a_chest_xray"
    assert dev["status"] == 422 and dev["body"]["error"] == "not_a_chest_xray"
    assert dev["body"]["message"] == srv["body"]["message"]


def test_without_the_vendored_runtime_the_page_stays_on_the_server_and_says_why(exported, tmp_path, monkeypatch):
    """A wheel built without scripts/vendor_web.py: model.json says why, and the graph is not offered."""
    from fastapi.testclient import TestClient

    from cxr import settings
    from cxr.inference.predictor import Predictor
    from cxr.web.app import create_app

    static = tmp_path / "static"
    shutil.copytree(settings.STATIC_DIR, static, ignore=shutil.ignore_patterns("vendor"))
    monkeypatch.setattr(settings, "STATIC_DIR", static)
    with TestClient(create_app(Predictor(exported, threads=1), model=exported)) as client:
        config = client.get("/offline/model.json").json()
        assert config["available"] is False and "vendor_web.py" in config["why"]
        assert client.get("/offline/model.onnx").status_code == 404
