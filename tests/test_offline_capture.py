"""The film finder on the device (issue 14 on the offline page): finder.js against images/capture.py's
find_film on light-box photos of the shared films and on the films themselves (which pass through), then
the installed offline page reading a photo on the device as the server reads it: the film found and
cropped, a crop the user marked ("read again"), and the whole photo. Debian chromium, as test_offline.py."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from cxr import images
from cxr.data import capture as aug
from cxr.images import capture
from cxr.images.capture import Quad, quad_iou
from test_browser import ARTIFACTS
from test_offline import READY_MS, _installed, probs, server_read

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.browser]
STATIC = Path(__file__).resolve().parents[1] / "src" / "cxr" / "web" / "static"
MAX_DP = 0.03  # device vs server on one photo: the browser's JPEG decode differs from Pillow's by a level or so


@pytest.fixture(scope="module")
def finder(browser):
    """A bare page holding only imaging.js and finder.js: the finder called directly, no server."""
    page = browser.new_page()
    page.set_content("<!doctype html><title>finder</title>")
    for name in ("imaging.js", "finder.js"):
        page.add_script_tag(path=str(STATIC / name))
    yield page
    page.close()


def js_find(page, gray: np.ndarray) -> Quad | None:
    """cxrFinder.find on a decoded gray photo (8-bit levels / 255, exactly what read_image gives a JPEG)."""
    u8 = np.round(gray * 255).astype(np.uint8)
    assert np.array_equal(u8 / np.float32(255), gray), "not an 8-bit gray image"
    h, w = gray.shape
    found = page.evaluate("""([b64, w, h]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const gray = Float32Array.from(bytes, (v) => Math.fround(v / 255));
        return cxrFinder.find(gray, w, h);
    }""", [base64.b64encode(u8.tobytes()).decode(), w, h])
    return None if found is None else Quad(tuple((float(x), float(y)) for x, y in found))


@pytest.fixture(scope="module")
def photos(images_512: Path, images_1024: Path) -> list[dict]:
    """Light-box photos of 14 shared films (12 at 512 px, 2 at 1024 px): the phone's JPEG, its gray decode,
    where the film truly is, and where Python's finder puts it."""
    paths = sorted(images_512.glob("*.png"))[::46][:12] + sorted(images_1024.glob("*.png"))[:2]
    out = []
    for i, path in enumerate(paths):
        photo, truth = aug.light_box_photo(images.read_image(path), np.random.default_rng(300 + i))
        jpeg = aug.photo_bytes(photo)
        gray = images.read_image(jpeg)
        out.append({"name": path.name, "jpeg": jpeg, "gray": gray, "truth": truth, "python": capture.find_film(gray)})
    assert len(out) >= 12
    return out


def test_device_finder_finds_the_film_where_python_does(finder, photos):
    truth_iou, python_iou, worst = [], [], 0.0
    for p in photos:
        found = js_find(finder, p["gray"])
        assert found is not None, f"{p['name']}: the device found no film in a light-box photo"
        assert p["python"] is not None, f"{p['name']}: Python found no film"
        truth_iou.append(quad_iou(found, p["truth"]))
        python_iou.append(quad_iou(found, p["python"]))
        worst = max(worst, float(np.abs(found.array() - p["python"].array()).max()))
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "offline-finder.json").write_text(json.dumps({
        "photos": len(photos), "iou_truth_min": min(truth_iou), "iou_truth_mean": float(np.mean(truth_iou)),
        "iou_python_min": min(python_iou), "iou_python_mean": float(np.mean(python_iou)), "max_corner_px": worst}))
    assert min(truth_iou) >= 0.9, f"IoU with the true quad per photo: {np.round(truth_iou, 3).tolist()}"
    assert min(python_iou) >= 0.995, f"IoU with Python's quad per photo: {np.round(python_iou, 4).tolist()}"
    # a port, not a look-alike: the same corners (they agree to 1e-12 px where the float steps match)
    assert worst <= 0.5, f"corners up to {worst:.3f} px from Python's"


def test_device_finder_passes_films_through(finder, images_512, images_1024):
    """Films that already are films (edge-to-edge PNGs) are read as they are, on the device as in Python."""
    paths = sorted(images_512.glob("*.png"))[7::50] + sorted(images_1024.glob("*.png"))[::6]
    assert len(paths) >= 12
    for path in paths:
        gray = images.read_image(path)
        assert capture.find_film(gray) is None, path.name
        found = js_find(finder, gray)
        assert found is None, f"{path.name}: the device cropped a film to {found.points}"


# --- the installed page, the bundled model --------------------------------------------------------------


@pytest.fixture(scope="module")
def installed_bundled(browser, bundled):
    """A phone-sized page that has visited once online, is ready offline and reads on the device."""
    context, page = _installed(browser, bundled)
    assert page.is_checked("#mode-device")
    yield page, bundled
    context.close()


def device_read(page, data: bytes, crop: str = "") -> dict:
    """{status, body} from the page's on-device reader for one file's bytes and a ?crop= choice."""
    return page.evaluate("""async ([b64, crop]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const r = await cxrDevice.read(new File([bytes], "photo.jpg"), crop);
        return {status: r.status, body: {...r.body, heatmaps: Object.keys(r.body.heatmaps || {}), image: r.body.image &&
                {width: r.body.image.width, height: r.body.image.height}}};
    }""", [base64.b64encode(data).decode(), crop])


def server_crop_read(server: str, data: bytes, crop: str) -> dict:
    import httpx

    r = httpx.post(server + "/api/v1/predict", params={"crop": crop, "preview": "true"}, files={"file": ("f", data)},
                   timeout=120)
    return {"status": r.status_code, "body": r.json()}


def max_dp(a: dict, b: dict) -> float:
    pa, pb = probs(a["body"]), probs(b["body"])
    assert pa.keys() == pb.keys() and len(pa) == 14
    return max(abs(pa[k] - pb[k]) for k in pa)


@pytest.fixture(scope="module")
def readable(installed_bundled, photos):
    """The first photo the server reads (the gate or the orientation check may refuse a photo), and its answer."""
    _, server = installed_bundled
    for p in photos:
        srv = server_read(server, p["jpeg"])
        if srv["status"] == 200 and srv["body"]["capture"]["crop_source"] == "found":
            return p, srv
    pytest.fail("the server read none of the light-box photos")


def test_device_finds_and_reads_the_film_in_a_photo_as_the_server(installed_bundled, readable):
    page, _ = installed_bundled
    photo, srv = readable
    dev = device_read(page, photo["jpeg"])
    assert dev["status"] == 200, dev["body"]
    c, s = dev["body"]["capture"], srv["body"]["capture"]
    assert c["crop_source"] == "found" and c["message"].startswith("the film was found in the photo and cropped")
    assert c["photo"].startswith("data:image/png;base64,"), "the crop editor needs the photo"
    assert set(c) == set(s) | {"photo"}, (sorted(c), sorted(s))  # the server's CaptureOut (photo with ?preview=true)
    assert quad_iou(Quad.from_array(c["crop"]), Quad.from_array(s["crop"])) >= 0.98
    assert (c["rotated_degrees"], c["inverted"]) == (s["rotated_degrees"], s["inverted"])
    assert dev["body"]["image"] == {"width": photo["gray"].shape[1], "height": photo["gray"].shape[0]}
    dp = max_dp(dev, srv)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "offline-capture-parity.json").write_text(json.dumps({"photo_of": photo["name"], "max_abs_dp": dp}))
    assert dp <= MAX_DP, f"device vs server on a light-box photo: max |dp| {dp:.4f}"


def test_crop_editor_reads_again_and_whole_photo_on_the_device(installed_bundled, readable, tmp_path):
    page, server = installed_bundled
    photo, _ = readable
    file = tmp_path / "photo.jpg"
    file.write_bytes(photo["jpeg"])
    page.evaluate("""() => {  // every read the page makes on the device, with the crop it asked for
        const read = cxrDevice.read;
        window.reads = [];
        cxrDevice.read = async (f, crop) => {
            const r = await read(f, crop);
            window.reads.push({crop, status: r.status, body: {...r.body, heatmaps: null, image: null}});
            return r;
        };
    }""")
    reads = lambda n: page.wait_for_function(f"() => window.reads.length >= {n}", timeout=READY_MS)  # noqa: E731
    page.set_input_files("#picker", str(file))
    reads(1)
    assert page.evaluate("() => window.reads[0].crop") == ""
    editor = page.locator("#crop-editor")
    assert editor.is_visible(), "the device's result must show the crop it used"
    assert page.inner_text("#crop-title") == "The crop that was read"
    assert "found in the photo" in page.inner_text("#capture-message")
    with page.expect_file_chooser():  # "Retake the photo" opens the camera
        page.click("#crop-retake")
    # drag the top-left corner a little inwards, then "Read again with this crop"
    handle = page.locator(".crop-handle").first
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 12, y + 9, steps=4)
    page.mouse.up()
    page.click("#crop-read")
    reads(2)
    again = page.evaluate("() => window.reads[1]")
    first = page.evaluate("() => window.reads[0].body.capture.crop")
    assert again["crop"].count(",") == 7, f"the page read again without the corners: {again['crop']!r}"
    numbers = [float(v) for v in again["crop"].split(",")]
    assert len(numbers) == 8 and numbers[0] > first[0][0] + 5 and numbers[1] > first[0][1] + 5, (numbers, first)
    srv = server_crop_read(server, photo["jpeg"], again["crop"])
    assert again["status"] == srv["status"] == 200, (again["body"].get("message"), srv["body"].get("message"))
    c, s = again["body"]["capture"], srv["body"]["capture"]
    assert c["crop_source"] == s["crop_source"] == "given"
    assert np.allclose(c["crop"], s["crop"], atol=1e-9), (c["crop"], s["crop"])
    assert c["message"].startswith("the film was cropped where you marked it")
    assert max_dp(again, srv) <= MAX_DP
    page.wait_for_selector("#capture-message >> text=cropped where you marked it")
    # "Use the whole image": no search, no crop, the whole photo read (or refused) as the server does
    page.click("#crop-full")
    reads(3)
    whole = page.evaluate("() => window.reads[2]")
    assert whole["crop"] == "full"
    srv = server_crop_read(server, photo["jpeg"], "full")
    assert whole["status"] == srv["status"], (whole["body"].get("message"), srv["body"].get("message"))
    if srv["status"] == 200:
        assert whole["body"]["capture"]["crop_source"] == "none" and "crop" not in whole["body"]["capture"]
        assert max_dp(whole, srv) <= MAX_DP
    else:
        assert whole["body"]["message"] == srv["body"]["message"]
    # a crop that cannot be a film's outline: refused in the server's words
    bad = device_read(page, photo["jpeg"], "0,0,10,0,10,10,0,10")
    srv = server_crop_read(server, photo["jpeg"], "0,0,10,0,10,10,0,10")
    assert bad["status"] == srv["status"] == 400 and bad["body"]["error"] == srv["body"]["error"] == "bad_crop"
    assert bad["body"]["message"] == srv["body"]["message"]
