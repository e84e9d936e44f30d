"""The page in a real browser: Debian chromium driven by Playwright, against uvicorn on a loopback port,
running the real Predictor (small random-weight Lite0 at 128 px). Screenshots go to test-artifacts/."""

from __future__ import annotations

import io
import json
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import save_random_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
browser_test = pytest.mark.browser  # the tests that drive chromium; the served-HTML checks need none

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
PHONE = {"width": 390, "height": 844}
TIMEOUT_MS = 60_000  # first inference pays for imports and thread pools on a 2-core CI machine


def _serve(app):
    """Run `app` under uvicorn on a free loopback port; yields its base URL, stops it afterwards."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # loopback only, a free port chosen by the kernel
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(30)
    sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from cxr.inference.predictor import Predictor
    from cxr.web.app import create_app

    path = save_random_model(tmp_path_factory.mktemp("model") / "browser-lite0.safetensors",
                             metrics={"macro_auc": 0.5, "n_images": 10, "subset": "validation"})
    yield from _serve(create_app(Predictor(path, threads=1), model=path))


@pytest.fixture(scope="module")
def bundled_server():
    """What `make run` serves: the bundled model, through the one Predictor."""
    from cxr.inference.predictor import Predictor
    from cxr.web.app import create_app

    yield from _serve(create_app(Predictor(None, threads=1)))


@pytest.fixture
def page_factory(browser):
    contexts = []

    def make(**kwargs):
        ctx = browser.new_context(**kwargs)
        contexts.append(ctx)
        page = ctx.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.problems = []  # console errors include CSP violations: the page must have none
        page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
        page.on("pageerror", lambda e: page.problems.append(str(e)))
        return page

    yield make
    for ctx in contexts:
        ctx.close()


@pytest.fixture(scope="module")
def film_path(images_1024) -> Path:
    return sorted(images_1024.glob("*.png"))[0]


def upload_and_wait(page, server: str, files) -> None:
    page.goto(server + "/")
    page.wait_for_selector("#model-card dd >> text=browser-lite0")
    page.set_input_files("#picker", files)
    # Arrow functions, not expression strings: Playwright evals strings, which the page's CSP forbids.
    page.wait_for_function("() => ['results', 'error', 'refusal'].some(id => !document.getElementById(id).hidden)")


def widths(page) -> list[float]:
    return page.eval_on_selector_all(".finding .fill", "els => els.map(e => parseFloat(e.style.width))")


@browser_test
def test_film_gives_14_sorted_findings_and_a_heatmap(page_factory, server, film_path):
    page = page_factory(viewport={"width": 1280, "height": 900})
    upload_and_wait(page, server, film_path)
    assert page.is_visible("#results") and page.is_hidden("#error")
    assert page.locator(".finding").count() == 14
    w = widths(page)
    assert w == sorted(w, reverse=True) and all(0 <= x <= 100 for x in w)
    assert page.locator(".finding .mark").count() == 14
    assert page.is_visible("text=they do not add up to 100%")
    assert page.is_visible(".notice >> text=Not for clinical use")
    film = page.locator("#film")
    assert film.evaluate("img => img.complete && img.naturalWidth") == 512  # the preview, bounded to 512 px
    first = page.locator(".finding").first
    name = first.get_attribute("data-finding")
    first.click()
    overlay = page.locator("#overlay")
    overlay.wait_for(state="visible")
    page.wait_for_function("() => document.getElementById('overlay').naturalWidth > 0")
    assert first.get_attribute("aria-pressed") == "true"
    box, film_box = overlay.bounding_box(), film.bounding_box()
    assert abs(box["width"] - film_box["width"]) < 1 and abs(box["height"] - film_box["height"]) < 1
    assert name.replace("_", " ").lower() in page.inner_text("#caption").lower()
    first.click()  # a second tap hides it again
    overlay.wait_for(state="hidden")
    assert page.problems == []


@browser_test
def test_text_file_gives_a_readable_error(page_factory, server):
    page = page_factory()
    upload_and_wait(page, server, {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a film\n" * 20})
    assert page.is_visible("#error") and page.is_hidden("#results") and page.is_hidden("#refusal")
    text = page.inner_text("#error")
    assert "not an image" in text and "PNG, JPEG or DICOM" in text
    assert page.problems == [] or all("422" in p or "400" in p for p in page.problems)


@browser_test
def test_gate_refusal_is_shown_as_a_refusal(page_factory, server):
    """The refusal box is distinct from the error box and says why. The server's answer is the real app's
    422 body shape; it is served by interception so the page is tested whatever this random model's gate does."""
    page = page_factory()
    body = json.dumps({"error": "not_a_chest_xray", "message": "Looks like a photo of a hand, not a chest film.",
                       "gate_score": 0.02})
    page.route("**/api/v1/predict*", lambda route: route.fulfill(status=422, body=body,
                                                                  content_type="application/json"))
    flat = io.BytesIO()
    Image.fromarray(np.full((256, 256), 128, np.uint8)).save(flat, format="PNG")
    upload_and_wait(page, server, {"name": "hand.png", "mimeType": "image/png", "buffer": flat.getvalue()})
    assert page.is_visible("#refusal") and page.is_hidden("#error") and page.is_hidden("#results")
    assert "photo of a hand" in page.inner_text("#refusal")
    styles = page.evaluate("""() => ['refusal', 'error'].map(id => {
        const s = getComputedStyle(document.getElementById(id)); return s.backgroundImage + s.borderTopColor; })""")
    assert styles[0] != styles[1]


@browser_test
def test_phone_viewport_does_not_overflow(page_factory, server, film_path):
    page = page_factory(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    page.goto(server + "/")
    overflow = "() => document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    assert page.evaluate(overflow)
    assert page.is_visible("label[for=camera]") and page.is_visible("label[for=picker]")
    assert page.get_attribute("#camera", "capture") == "environment"
    upload_and_wait(page, server, film_path)
    assert page.locator(".finding").count() == 14
    last = page.locator(".finding").nth(13)
    last.scroll_into_view_if_needed()
    last.tap()
    page.locator("#overlay").wait_for(state="visible")
    film, overlay = page.locator("#film").bounding_box(), page.locator("#overlay").bounding_box()
    assert all(abs(film[k] - overlay[k]) < 1 for k in ("x", "y", "width", "height"))
    assert film["y"] >= 0 and film["y"] + film["height"] <= PHONE["height"]  # the film stays in view
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "phone-390x844-heatmap.png"))
    page.click("summary")  # the AUC table opens too
    page.evaluate("() => window.scrollTo(0, 0)")  # a full-page capture paints sticky parts where they stick
    page.screenshot(path=str(ARTIFACTS / "phone-390x844.png"), full_page=True)
    assert page.evaluate(overflow), page.evaluate("() => [document.documentElement.scrollWidth, innerWidth]")
    small = page.eval_on_selector_all("button.finding, label.button", "els => els.map(e => e.offsetHeight)")
    assert min(small) >= 44  # comfortable tap targets
    assert page.problems == []


@browser_test
def test_docs_page_works_offline(page_factory, server):
    page = page_factory()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server + "/docs")
    page.wait_for_selector(".op")
    assert page.locator(".op").count() >= 3
    assert page.get_by_text("/api/v1/predict", exact=True).is_visible()
    assert all(u.startswith(server) for u in requests), requests
    assert page.problems == []


def test_served_page_is_self_contained(server):
    import httpx

    page = httpx.get(server + "/").text
    assert "Not for clinical use" in page and "they do not add up to 100%" in page
    assert '<input id="camera" class="file" type="file" accept="image/*,.dcm,application/dicom" capture' in page
    assert re.search(r'<input id="picker"[^>]*accept="image/\*,\.dcm,application/dicom">', page)
    from cxr.settings import STATIC_DIR as static  # where the app serves /static from
    # everything the page loads is served from here: no CDN, no web fonts (icons are PNG; vendor/ is npm's)
    for f in (f for f in static.iterdir() if f.is_file() and f.suffix != ".png"):
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|@import|url\(\s*["']?https?:""", f.read_text()), f
        assert httpx.get(f"{server}/static/{f.name}").status_code == 200, f.name
    assert httpx.get(server + "/docs").status_code == 200


@browser_test
def test_bundled_model_reads_a_real_film_with_heatmaps(page_factory, bundled_server, images_1024):
    """The acceptance path: the README's run command serves the bundled model; a real full-size film
    uploaded from the page gives 14 findings, and tapping one shows a (non-empty) heatmap over the film."""
    page = page_factory(viewport=PHONE)
    page.goto(bundled_server + "/")
    page.wait_for_selector("#model-card dd >> text=cxr-demo")
    page.set_input_files("#picker", images_1024 / "00000100_000.png")  # an RGBA film, as NIH released it
    page.wait_for_function("() => ['results', 'error', 'refusal'].some(id => !document.getElementById(id).hidden)")
    assert page.is_visible("#results"), page.inner_text("body")[:500]
    assert page.locator(".finding").count() == 14
    page.locator(".finding").first.click()
    page.wait_for_function("() => document.getElementById('overlay').naturalWidth > 0")
    alpha = page.evaluate("""() => {
        const img = document.getElementById('overlay'), c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
        return n / (c.width * c.height); }""")
    assert alpha > 0.01, "the heatmap overlay is empty"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "phone-bundled-model.png"), full_page=True)
    assert page.problems == []
