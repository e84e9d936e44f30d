"""The page's refusals in a real browser (Debian chromium, Playwright): every text the error and refusal cards
can show reads as sentences, and the refusal card draws its warning sign without depending on a symbol font.

The server runs a small random-weight model whose gate has a limit no film meets, so real uploads reach every
refusal the page shows: the four image checks, the gate's distance, and the film-reading errors. A phone-size
screenshot of the refusal card is kept in test-artifacts/."""

from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import pytest
from PIL import Image
from test_browser import ARTIFACTS, PHONE, TIMEOUT_MS, _serve

from conftest import save_random_model

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.browser]

CARDS = ("results", "error", "refusal")
# A lower-case word (or a closing bracket) followed by a capitalised word: two sentences run together,
# as in "films are grayscale This does not look like...". X-ray, PNG, DICOM do not match [A-Z][a-z].
RUN_ON = re.compile(r"[a-z0-9,;)\]] +[A-Z][a-z]")
SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


def punctuation_problems(text: str) -> list[str]:
    """What is wrong with `text` as one or more sentences; [] when nothing is."""
    t = text.strip()
    problems = [] if t else ["empty"]
    if t and not t[0].isupper():
        problems.append("does not start with a capital")
    if t and not SENTENCE_END.search(t):
        problems.append("does not end with a full stop")
    problems += [f"sentences run together at {m.group()!r}" for m in RUN_ON.finditer(t)]
    problems += [f"stray spacing or stops at {m.group()!r}" for m in re.finditer(r" [.,;:]|\.\.|\S  +\S", t)]
    return problems


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def upload(name: str, data: bytes, mime: str = "image/png") -> dict:
    return {"name": name, "mimeType": mime, "buffer": data}


@pytest.fixture(scope="module")
def server(tmp_path_factory, images_64):
    from cxr import nets
    from cxr.inference import gate
    from cxr.inference.predictor import Predictor
    from cxr.web.app import create_app

    path = save_random_model(tmp_path_factory.mktemp("model") / "page-lite0.safetensors")
    fitted, tensors = gate.fit(Predictor(path, backend="torch"), sorted(images_64.glob("*.png"))[:40], dims=8)
    net, meta = nets.load(path)
    # A limit no film meets: every film that passes the image checks is refused for its distance.
    nets.save(path, net, dataclasses.replace(meta, gate={**fitted, "threshold": 1e-9}), extra=tensors)
    yield from _serve(create_app(Predictor(path, threads=1), model=path))


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True)
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.problems = []
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.goto(server + "/")
    page.wait_for_selector("#model-card dd >> text=page-lite0")
    yield page
    ctx.close()


def shown(page, files) -> tuple[str, str]:
    """(the card that the upload shows, its message)."""
    page.evaluate("ids => ids.forEach(id => { document.getElementById(id).hidden = true; })", list(CARDS))
    page.set_input_files("#picker", files)
    page.wait_for_function("ids => ids.some(id => !document.getElementById(id).hidden)", arg=list(CARDS))
    card = next(c for c in CARDS if page.is_visible(f"#{c}"))
    return card, "" if card == "results" else page.inner_text(f"#{card}-message")


def films_the_page_refuses(film: bytes) -> dict[str, tuple[dict, str, str]]:
    """name -> (upload, the card it must show, a word its message must hold)."""
    rng = np.random.default_rng(0)
    ramp = np.tile(np.linspace(0, 255, 600).astype(np.uint8), (200, 1))
    document = np.full((300, 300), 255, np.uint8)
    document[100:200, 100:200] = 0
    return {
        "colour photo": (upload("photo.png", png(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8))),
                         "refusal", "colour"),
        "long strip": (upload("strip.png", png(ramp)), "refusal", "shape"),
        "blank": (upload("blank.png", png(np.full((256, 256), 128, np.uint8))), "refusal", "blank"),
        "document": (upload("doc.png", png(document)), "refusal", "flat shade"),
        "unlike the films": (upload("film.png", film), "refusal", "does not resemble"),
        "text": (upload("notes.txt", b"not a film\n" * 20, "text/plain"), "error", "not an image"),
        "empty": (upload("empty.png", b""), "error", "empty"),
        "truncated": (upload("cut.png", film[: len(film) // 2]), "error", "corrupt"),
        "thumbnail": (upload("thumb.png", png(rng.integers(0, 255, (32, 32), dtype=np.uint8))), "error", "small"),
    }


def test_the_check_catches_what_the_issue_saw():
    assert punctuation_problems("Not a frontal chest X-ray: a colour image; films are grayscale This does not "
                                "look like a frontal chest X-ray, so it was not read.")
    assert punctuation_problems("the uploaded file: the file is empty (0 bytes); send a PNG")
    assert punctuation_problems("Send a frontal (PA or AP) chest film, photographed flat and filling the "
                                "frame. Or a DICOM from NIH; see /docs.") == []


def test_every_refusal_text_is_punctuated(page, first_film_512):
    texts = {"refusal card": page.inner_text("#refusal .small"), "error card": page.inner_text("#error h3") + "."}
    for name, (files, card, word) in films_the_page_refuses(first_film_512.read_bytes()).items():
        got, message = shown(page, files)
        assert (got, word in message) == (card, True), (name, got, message)
        texts[name] = message
    # The page's own messages: the server unreachable, and an answer that is not the API's JSON.
    film = upload("film.png", first_film_512.read_bytes())
    page.route("**/api/v1/predict*", lambda route: route.abort())
    texts["no server"] = shown(page, film)[1]
    page.unroute("**/api/v1/predict*")
    page.route("**/api/v1/predict*", lambda route: route.fulfill(status=502, body="<html>bad gateway</html>",
                                                                  content_type="text/html"))
    texts["bad gateway"] = shown(page, film)[1]
    assert "502" in texts["bad gateway"] and "reach the server" in texts["no server"]
    problems = {name: p for name, text in texts.items() if (p := punctuation_problems(text))}
    assert problems == {}, "\n".join(f"{n}: {texts[n]!r}: {p}" for n, p in problems.items())
    assert page.problems == []


def test_refusal_card_draws_its_icon_without_fonts(page, first_film_512):
    card, _ = shown(page, upload("photo.png", png(np.random.default_rng(1).integers(0, 255, (300, 300, 3),
                                                                                     dtype=np.uint8))))
    assert card == "refusal"
    heading = page.locator("#refusal h3")
    icon = heading.locator("svg")
    assert icon.is_visible() and icon.get_attribute("aria-hidden") == "true"
    box = icon.bounding_box()
    assert box["width"] >= 16 and box["height"] >= 16
    assert heading.evaluate("h => getComputedStyle(h, '::before').content") in ("none", "normal")
    # Every character the card shows is one any phone font has: Latin text and common punctuation.
    odd = [c for c in page.inner_text("#refusal") if ord(c) > 0x24F and not 0x2010 <= ord(c) <= 0x2026]
    assert odd == []
    # The sign is drawn: its amber fill is on screen, not an empty box. Two animation frames first: under
    # load (2 cores, the suite's other worker busy) one screenshot caught the card before it was painted.
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    shot = icon.screenshot(animations="disabled")
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).reshape(-1, 3).astype(int)
    amber = (pixels[:, 0] > 150) & (pixels[:, 1] > 90) & (pixels[:, 1] < 150) & (pixels[:, 2] < 80)
    assert amber.mean() > 0.2, amber.mean()
    page.locator("#refusal").scroll_into_view_if_needed()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "phone-390x844-refusal.png"))
    overflow = "() => document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    assert page.evaluate(overflow)
    assert page.problems == []
