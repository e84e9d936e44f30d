"""Memory and cold start of the torch-free runtime (cxr.inference.artefacts) against the torch Predictor.

    .venv/bin/python benchmarks/runtime.py                # bundled model, 50 films of $CXR_DATA/images-512
    .venv/bin/python benchmarks/runtime.py --films DIR --n 50 --model runs/x/model.safetensors

Each side runs in its own fresh interpreter (so neither sees the other's imports), reads the same films and
makes Grad-CAM heatmaps for every finding at each film's own size:

- "torch-free": torch, torchvision and lightning are blocked from import; the model runs through its ONNX
  artefacts (written here into a temporary copy when the checkpoint has none that are fresh), heatmaps are
  upsampled with Pillow.
- "torch": cxr.inference.predictor.Predictor(model).predict(films, heatmaps=True), as `cxr predict` does now.

Reported per side: RSS after loading, RSS and peak RSS after the films, cold start (interpreter start to the
first film's result) and films/s. Last line: "RSS torch-free vs torch: 0.25x" (RSS after the films).
The runtime is not yet wired into `cxr serve` and `cxr predict`; this measures the parts that exist.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COMMON = textwrap.dedent("""
    import json, sys, time
    T0 = float(sys.argv[1])
    def rss_mb(field="VmRSS"):  # VmHWM: the peak; unlike ru_maxrss it is not inherited from the parent
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field)) / 1024
    def report(**kw):
        print(json.dumps(kw), flush=True)
""")

TORCH_FREE = COMMON + textwrap.dedent("""
    import importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "lightning", "pytorch_lightning"):
                raise ImportError(f"{name} is blocked")
    sys.meta_path.insert(0, Block())
    import numpy as np
    from PIL import Image
    from cxr import images
    from cxr.inference import artefacts
    model, films = sys.argv[2], sys.argv[3:]
    rt = artefacts.Runtime(model)
    mean, std = (np.asarray(v, np.float32).reshape(3, 1, 1) for v in (rt.meta.mean, rt.meta.std))
    targets = list(range(len(rt.meta.outputs)))
    report(stage="loaded", rss=rss_mb(), s=time.time() - T0)
    start = None
    for i, f in enumerate(films):
        film = images.read_film(f)
        x = ((images.resize(film.gray, rt.meta.input_size)[None] - mean) / std).astype(np.float32)[None]
        logits, feats, cams = rt.classify_with_cams(x, targets)
        h, w = film.gray.shape
        maps = [np.asarray(Image.fromarray(m, "F").resize((w, h), Image.BILINEAR)) for m in cams[0]]
        if i == 0:
            report(stage="first", rss=rss_mb(), s=time.time() - T0)
            start = time.perf_counter()
    n = len(films) - 1
    report(stage="done", rss=rss_mb(), peak=rss_mb("VmHWM"),
           films_per_s=n / (time.perf_counter() - start) if n else 0.0, torch="torch" in sys.modules)
""")

TORCH = COMMON + textwrap.dedent("""
    from cxr.inference.predictor import Predictor
    model, films = sys.argv[2], sys.argv[3:]
    p = Predictor(model, batch_size=1)
    report(stage="loaded", rss=rss_mb(), s=time.time() - T0)
    p.predict_one(films[0], heatmaps=True)
    report(stage="first", rss=rss_mb(), s=time.time() - T0)
    start = time.perf_counter()
    for f in films[1:]:
        p.predict_one(f, heatmaps=True)
    n = len(films) - 1
    report(stage="done", rss=rss_mb(), peak=rss_mb("VmHWM"),
           films_per_s=n / (time.perf_counter() - start) if n else 0.0, torch="torch" in sys.modules)
""")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="cxr checkpoint (default: the bundled model)")
    p.add_argument("--films", type=Path, help="folder of PNG films (default: $CXR_DATA/images-512)")
    p.add_argument("--n", type=int, default=50, help="films per side")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per side")
    return p.parse_args()


def with_artefacts(model: Path, workdir: Path) -> Path:
    """The checkpoint itself when its artefacts are fresh, else a copy in workdir exported now (needs torch)."""
    from cxr.inference import artefacts, export

    if artefacts.has_fresh_artefacts(model):
        return model
    copy = workdir / model.name
    shutil.copy2(model, copy)
    t = time.perf_counter()
    export.export_artefacts(copy)
    parity = artefacts.read_manifest(copy)["parity"]
    print(f"exported {model.name}'s artefacts in {time.perf_counter() - t:.0f} s; against torch: "
          f"max |dp| {parity['max_abs_probability']:.1e}, Grad-CAM max |d| {parity['max_abs_cam']:.1e}, "
          f"min correlation {parity['min_cam_correlation']:.6f}")
    return copy


def side(code: str, model: Path, films: list[str], timeout: float) -> dict:
    run = subprocess.run([sys.executable, "-c", code, repr(time.time()), str(model), *films], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        raise SystemExit(f"benchmark side failed:\n{run.stderr[-3000:]}")
    stages = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {s["stage"]: s for s in stages}


def main() -> None:
    args = parse_args()
    from cxr import settings as config

    model = args.model or config.BUNDLED_MODEL
    folder = args.films or config.data_dir() / "images-512"
    films = [str(f) for f in sorted(folder.glob("*.png"))[:args.n]]
    if not films:
        raise SystemExit(f"no PNG films in {folder}: pass --films DIR or set CXR_DATA")
    print(f"{model.name}, {len(films)} films from {folder}, Grad-CAM for every finding at each film's size; "
          f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        runnable = with_artefacts(model, Path(tmp))
        results = {"torch-free": side(TORCH_FREE, runnable, films, args.timeout),
                   "torch": side(TORCH, model, films, args.timeout)}
    for name, r in results.items():
        done = r["done"]
        print(f"{name:>10}: RSS {r['loaded']['rss']:.0f} MB loaded, {done['rss']:.0f} MB after {len(films)} films "
              f"(peak {done['peak']:.0f} MB); cold start: loaded {r['loaded']['s']:.2f} s, first result {r['first']['s']:.2f} s; "
              f"{done['films_per_s']:.1f} films/s; torch imported: {done['torch']}")
    ratio = results["torch-free"]["done"]["rss"] / results["torch"]["done"]["rss"]
    print(f"RSS torch-free vs torch: {ratio:.2f}x")


if __name__ == "__main__":
    main()
