"""Seconds per film read in headless chromium on the device (onnxruntime-web WASM, the offline page's
path) against the server on the same machine (POST /api/v1/predict), both with the 14 heatmaps and the
preview the page shows. The bundled model (its ONNX artefacts must be fresh: `cxr export`), shared films.

    .venv/bin/python benchmarks/browser.py [--films 10]

The last line is the ratio: browser seconds per film / server seconds per film.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_browser import ARGS, CHROMIUM, _serve  # noqa: E402


def main() -> None:
    import httpx
    from playwright.sync_api import sync_playwright

    from cxr import settings
    from cxr.inference.predictor import Predictor
    from cxr.web.app import create_app

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--films", type=int, default=10)
    args = ap.parse_args()
    films = sorted((settings.data_dir() / "images-512").glob("*.png"))[: args.films]
    serving = _serve(create_app(Predictor(None, threads=None)))
    url = next(serving)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_context(service_workers="allow").new_page()
        page.goto(url + "/")
        page.wait_for_selector("#offline >> text=Ready offline", timeout=300_000)
        isolated = page.evaluate("() => self.crossOriginIsolated")
        read = """async (b64) => { const b = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                   const r = await cxrDevice.read(new File([b], 'f.png')); return r.status; }"""
        payloads = [base64.b64encode(f.read_bytes()).decode() for f in films]
        assert page.evaluate(read, payloads[0]) == 200  # warm-up: compile, first allocations
        start = time.perf_counter()
        for b64 in payloads:
            assert page.evaluate(read, b64) == 200
        device = (time.perf_counter() - start) / len(films)
        browser.close()
    query = "/api/v1/predict?heatmaps=all&preview=true"
    with httpx.Client(timeout=300) as client:
        client.post(url + query, files={"file": ("f", films[0].read_bytes())})  # warm-up
        start = time.perf_counter()
        for f in films:
            assert client.post(url + query, files={"file": ("f", f.read_bytes())}).status_code == 200
        server = (time.perf_counter() - start) / len(films)
    next(serving, None)
    print(f"films: {len(films)} (images-512), bundled model; browser threads: {'yes' if isolated else 'no'}")
    print(f"browser (WASM, on the device): {device:.3f} s per film")
    print(f"server (ONNX Runtime, same machine): {server:.3f} s per film")
    print(f"ratio browser/server: {device / server:.2f}")


if __name__ == "__main__":
    main()
