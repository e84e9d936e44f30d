"""The per-film stability estimate on the offline page (issue 14's estimate, issue 13's page): stability.js
makes the server's three test-time variants of the film as read (cxr.inference.stability.variants) and
ondevice.js reads them through the graph, answering the server's StabilityOut. Pixels first (the variants
against Python's, the same film in), then the answers on shared films, device against server, then the
page showing it. Debian chromium and the bundled model, as test_offline.py; numbers to test-artifacts/."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from cxr import images
from cxr.inference import stability
from test_browser import ARTIFACTS
from test_offline import READY_MS, _installed, films

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.browser]
# The first 6 shared 512-px films (all stable under the bundled model) and two 64-px films among the most
# unstable of all 1,241 shared 512- and 64-px films under the bundled frozen-body ensemble (spread 0.179
# and 0.151; limit 0.10): the flag is compared both ways. A retrained model may find them stable: then
# pick others (Predictor.predict(paths, stability=True) on a folder takes a minute or two).
FIRST, UNSTABLE = 6, ("00000260_000.png", "00000096_005.png")
# Device vs server, per variant's max |dp| in the API's answer (rounded to 4 decimals): the variants are
# the same pixels (tilt and jpeg bit for bit, exposure but for a few 1-ulp differences, see the pixel test),
# so all that is left is onnxruntime-web against onnxruntime (~1e-5) and one step of the rounding. Measured
# on these 8 films: 0 for every variant. jpeg has its own entry so that a browser whose encoder drifts
# says so by name (a level on 1% of the pixels moved these probabilities by ~1e-3).
MAX_DP = {"tilt": 2e-4, "exposure": 2e-4, "jpeg": 2e-4}
NEAR_LIMIT = 0.02  # the unstable flag may differ where the server's spread is this close to the limit


def chosen(images_512, images_64) -> list:
    paths = films(images_512, FIRST) + [images_64 / name for name in UNSTABLE]
    missing = [p.name for p in paths if not p.is_file()]
    assert not missing, f"shared films missing from {images_512} or {images_64}: {missing}"
    return paths


@pytest.fixture(scope="module")
def page(browser, bundled):
    """A phone-sized page that has visited once online, is ready offline and reads on the device."""
    context, page = _installed(browser, bundled)
    assert page.is_checked("#mode-device")
    yield page
    context.close()


def device_read(page, data: bytes) -> dict:
    """{status, body} from the page's on-device reader, asked for the stability estimate as the page asks."""
    return page.evaluate("""async (b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const r = await cxrDevice.read(new File([bytes], "film.png"), "", {stability: true});
        return {status: r.status, body: {...r.body, heatmaps: null, image: null, capture: null}};
    }""", base64.b64encode(data).decode())


def server_read(server: str, data: bytes) -> dict:
    import httpx

    r = httpx.post(server + "/api/v1/predict", params={"stability": "true"}, files={"file": ("f", data)}, timeout=120)
    return {"status": r.status_code, "body": r.json()}


def js_variants(page, gray: np.ndarray, side: int) -> dict[str, np.ndarray]:
    """cxrStability.variants of a gray film, with the served model's settings."""
    h, w = gray.shape
    out = page.evaluate("""async ([b64, w, h, side]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const made = await cxrStability.variants({data: new Float32Array(bytes.buffer), w, h}, side, cxrDevice.config());
        const enc = (a) => { const u = new Uint8Array(a.buffer); let s = "";
            for (let i = 0; i < u.length; i += 8192) s += String.fromCharCode(...u.subarray(i, i + 8192));
            return btoa(s); };
        return Object.fromEntries(Object.entries(made).map(([k, v]) => [k, enc(v)]));
    }""", [base64.b64encode(np.ascontiguousarray(gray, "<f4").tobytes()).decode(), w, h, side])
    return {k: np.frombuffer(base64.b64decode(v), "<f4").reshape(side, side) for k, v in out.items()}


def test_device_variants_are_pythons_pixels(page, images_512):
    """The three variants of the same film, device against Python: tilt bit for bit, exposure but for
    numpy's float32 power (glibc powf, not always correctly rounded: one ulp on ~5 pixels in 10^4), jpeg
    the browser's encoder and decoder against Pillow's, in 8-bit levels: the same levels (measured: 0 of
    307,200 pixels differ; libjpeg-turbo on both sides, the gray sent as R = G = B, see stability.js)."""
    side = 2 * int(page.evaluate("() => cxrDevice.config().input_size"))
    seen = {"tilt_differ": 0, "exposure_differ": 0, "exposure_max": 0.0, "jpeg_levels_differ": 0, "jpeg_max_levels": 0,
            "pixels": 0}
    for path in films(images_512, 3):
        gray = images.read_image(path)
        dev, ref = js_variants(page, gray, side), stability.variants(gray, side)
        assert list(dev) == list(stability.VARIANTS)
        seen["pixels"] += side * side
        seen["tilt_differ"] += int((dev["tilt"] != ref["tilt"]).sum())
        seen["exposure_differ"] += int((dev["exposure"] != ref["exposure"]).sum())
        seen["exposure_max"] = max(seen["exposure_max"], float(np.abs(dev["exposure"] - ref["exposure"]).max()))
        levels = np.abs(np.round(dev["jpeg"] * 255).astype(int) - np.round(ref["jpeg"] * 255).astype(int))
        assert np.array_equal(np.round(dev["jpeg"] * 255) / np.float32(255), dev["jpeg"]), "not 8-bit levels / 255"
        seen["jpeg_levels_differ"] += int((levels > 0).sum())
        seen["jpeg_max_levels"] = max(seen["jpeg_max_levels"], int(levels.max()))
        for name in stability.VARIANTS:  # each a change of the film, as Python's is
            assert not np.array_equal(dev[name], images.resize(gray, side)), name
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "offline-stability-pixels.json").write_text(json.dumps(seen))
    assert seen["tilt_differ"] == 0, seen
    assert seen["exposure_differ"] <= 1e-5 * seen["pixels"] and seen["exposure_max"] <= 1.2e-7, seen
    assert seen["jpeg_levels_differ"] == 0, seen


@pytest.fixture(scope="module")
def answers(page, bundled, images_512, images_64) -> list[dict]:
    """The device's and the server's answers (with stability) on the chosen shared films."""
    out = []
    for path in chosen(images_512, images_64):
        data = path.read_bytes()
        out.append({"name": path.name, "device": device_read(page, data), "server": server_read(bundled, data)})
    return out


def test_device_stability_matches_the_server(answers):
    worst = dict.fromkeys(stability.VARIANTS, 0.0)
    spread_dp, flags, read = 0.0, [], 0
    for a in answers:
        dev, srv = a["device"], a["server"]
        assert dev["status"] == srv["status"], (a["name"], dev["body"].get("message"), srv["body"].get("message"))
        if srv["status"] != 200:
            assert "stability" not in dev["body"]  # a refused film has no estimate, on either side
            continue
        d, s = dev["body"]["stability"], srv["body"]["stability"]
        assert list(d) == list(s), (list(d), list(s))  # the server's StabilityOut, field for field
        assert list(d["per_variant"]) == list(s["per_variant"]) == list(stability.VARIANTS)
        assert d["limit"] == s["limit"] == stability.LIMIT
        assert d["spread"] == max(d["per_variant"].values())
        for name in stability.VARIANTS:
            worst[name] = max(worst[name], abs(d["per_variant"][name] - s["per_variant"][name]))
        spread_dp = max(spread_dp, abs(d["spread"] - s["spread"]))
        flags.append({"film": a["name"], "server_spread": s["spread"], "device_spread": d["spread"],
                      "server_unstable": s["unstable"], "device_unstable": d["unstable"]})
        if abs(s["spread"] - s["limit"]) > NEAR_LIMIT:
            assert d["unstable"] == s["unstable"], (a["name"], d, s)
        read += 1
    agree = sum(f["server_unstable"] == f["device_unstable"] for f in flags)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "offline-stability.json").write_text(json.dumps({
        "films": read, "max_abs_dp_per_variant": worst, "max_abs_d_spread": spread_dp,
        "unstable_agree": f"{agree}/{len(flags)}", "per_film": flags}, indent=1))
    assert read >= len(answers) - 2, "the gate refused most films: pick others"
    assert {f["server_unstable"] for f in flags} == {True, False}, f"the flag is compared one way only: {flags}"
    for name, bound in MAX_DP.items():
        assert worst[name] <= bound, f"{name}: device vs server max |dp| {worst[name]:.5f} (bound {bound})"
    # an estimate that is missing, constant or the same for every variant would prove nothing
    spreads = [f["server_spread"] for f in flags]
    assert np.ptp(spreads) > 1e-3, f"the same spread for every film: {spreads}"
    per = np.array([[a["device"]["body"]["stability"]["per_variant"][k] for k in stability.VARIANTS]
                    for a in answers if a["server"]["status"] == 200])
    assert (per > 0).all(axis=0).all() and np.ptp(per, axis=0).min() > 1e-4, per


def test_without_asking_the_device_gives_no_estimate(page, images_512):
    """As the API without ?stability=true: no estimate, and no three more films through the graph."""
    data = films(images_512, 1)[0].read_bytes()
    r = page.evaluate("""async (b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const r = await cxrDevice.read(new File([bytes], "film.png"), "");
        return {status: r.status, has: "stability" in r.body};
    }""", base64.b64encode(data).decode())
    assert r == {"status": 200, "has": False}


def test_the_page_shows_the_device_estimate(page, answers, images_512, images_64):
    """The page's own upload on the device asks for the estimate and capture.js says it, as for the server."""
    read = [a for a in answers if a["device"]["status"] == 200]
    first = next((a for a in read if a["device"]["body"]["stability"]["unstable"]), read[0])  # the warning
    path = next(p for p in chosen(images_512, images_64) if p.name == first["name"])
    page.set_input_files("#picker", str(path))
    page.wait_for_selector("#results[data-produced-by=device]", timeout=READY_MS)
    page.wait_for_selector("#stability", state="visible", timeout=READY_MS)
    text, warn = page.inner_text("#stability"), page.evaluate("() => document.getElementById('stability').classList"
                                                               ".contains('warn')")
    s = first["device"]["body"]["stability"]
    assert text.startswith("Unstable:" if s["unstable"] else "Stable:") and warn == s["unstable"], text
    assert f"{round(s['spread'] * 100)} points" in text, (text, s)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "offline-stability-phone.png"), full_page=True)
