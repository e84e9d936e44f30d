"""Memory, cold start and speed of `cxr serve` and `cxr predict` on the torch-free runtime, against torch.

    .venv/bin/python benchmarks/runtime.py                # bundled model, 50 films of $CXR_DATA/images-512
    .venv/bin/python benchmarks/runtime.py --films DIR --n 50 --model runs/x/model.safetensors --threads 2

"now" is the model with its ONNX artefacts (cxr.inference.artefacts.Runtime: no torch imported). "with
torch" is a copy of the same checkpoint without artefacts, which the Predictor runs on torch (what `cxr
serve` did before: the classifier through ONNX Runtime exported by torch, Grad-CAM by autograd). Each
measure runs the real command in its own process:

- serve: `cxr serve` started, time to the first healthy /healthz (cold start), then n films POSTed with
  ?heatmaps=all; RSS of the server after them, and films/s over them.
- predict: `cxr predict FILM --heatmaps DIR` on one film; its peak RSS (psutil polling every 10 ms).
- throughput: Predictor.predict over the n films without heatmaps, films/s, now against today's ONNX
  path (Predictor(backend="onnx") on the copy without artefacts).

The last line is "RSS now vs RSS with torch: 0.xx x" (serve RSS after the n films). Targets (issue 12):
serve <= 350 MB, cold start <= 3 s, predict <= 300 MB, throughput within 10% of the ONNX path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
CXR = [str(Path(sys.executable).with_name("cxr"))]  # the installed command, as a user runs it

THROUGHPUT = """
import json, sys, time
from cxr.inference.predictor import Predictor
model, backend, threads, films = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
p = Predictor(model, backend=backend, threads=threads)
p.predict(films[:2])  # warm: first-call allocations are not throughput
start = time.perf_counter()
p.predict(films)
print(json.dumps({"films_per_s": len(films) / (time.perf_counter() - start), "torch_free": p.torch_free,
                  "torch": "torch" in sys.modules}))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="cxr checkpoint with artefacts (default: the bundled model)")
    p.add_argument("--films", type=Path, help="folder of PNG films (default: $CXR_DATA/images-512)")
    p.add_argument("--n", type=int, default=50, help="films per measure")
    p.add_argument("--threads", type=int, default=1, help="compute threads (--threads of the commands)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per measure")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, data: bytes) -> int:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"film.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()
        return r.status


def serve(model: Path, films: list[Path], threads: int, timeout: float) -> dict:
    port = free_port()
    env = {**os.environ, "CXR_NO_TCMALLOC": "1"}  # the same allocator for both sides
    start = time.perf_counter()
    proc = subprocess.Popen([*CXR, "serve", "--model", str(model), "--port", str(port), "--threads", str(threads)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.perf_counter() - start > timeout:
                raise SystemExit(f"cxr serve --model {model} did not become healthy")
            time.sleep(0.05)
        cold = time.perf_counter() - start
        t0 = time.perf_counter()
        codes = [post(f"http://127.0.0.1:{port}/api/v1/predict?heatmaps=all", f.read_bytes()) for f in films]
        rate = len(films) / (time.perf_counter() - t0)
        rss = psutil.Process(proc.pid).memory_info().rss / 2**20
        return {"cold_start_s": cold, "rss_mb": rss, "films_per_s": rate, "ok": codes.count(200)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def predict_peak(model: Path, film: Path, workdir: Path, threads: int) -> float:
    out = Path(tempfile.mkdtemp(dir=workdir))
    env = {**os.environ, "CXR_NO_TCMALLOC": "1"}
    proc = psutil.Popen([*CXR, "predict", str(film), "--model", str(model), "--heatmaps", str(out),
                         "--threads", str(threads), "--out", str(out / "p.csv")], env=env,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.01)
    if proc.returncode != 0:
        raise SystemExit(f"cxr predict --model {model} failed ({proc.returncode})")
    return peak / 2**20


def throughput(model: Path, backend: str, films: list[Path], threads: int, timeout: float) -> dict:
    run = subprocess.run([sys.executable, "-c", THROUGHPUT, str(model), backend, str(threads), *map(str, films)],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(run.stderr[-2000:])
    return json.loads(run.stdout.splitlines()[-1])


def main() -> None:
    args = parse_args()
    from cxr import settings
    from cxr.inference import artefacts

    model = (args.model or settings.BUNDLED_MODEL).resolve()
    if (why := artefacts.stale_reason(model)) is not None:
        raise SystemExit(f"{model}: {why}")
    folder = args.films or settings.data_dir() / "images-512"
    films = sorted(folder.glob("*.png"))[: args.n]
    if not films:
        raise SystemExit(f"no PNG films in {folder}")
    with tempfile.TemporaryDirectory(prefix="cxr-runtime-") as tmp:
        work = Path(tmp)
        plain = shutil.copy(model, work / model.name)  # without artefacts: the Predictor runs it on torch
        rows = {}
        for label, m in (("now", model), ("with torch", Path(plain))):
            s = serve(m, films, args.threads, args.timeout)
            rows[label] = {**s, "predict_peak_mb": predict_peak(m, films[0], work, args.threads)}
        now_rate = throughput(model, "auto", films, args.threads, args.timeout)
        onnx_rate = throughput(Path(plain), "onnx", films, args.threads, args.timeout)
    print(f"{len(films)} films from {folder}, model {model.name}, {args.threads} thread(s)")
    print(f"{'':12} {'serve RSS':>10} {'cold start':>11} {'served/s':>9} {'predict peak':>13}")
    for label, r in rows.items():
        print(f"{label:12} {r['rss_mb']:7.0f} MB {r['cold_start_s']:9.2f} s {r['films_per_s']:9.2f} "
              f"{r['predict_peak_mb']:10.0f} MB   ({r['ok']}/{len(films)} answered 200)")
    ratio = now_rate["films_per_s"] / onnx_rate["films_per_s"]
    print(f"throughput without heatmaps: {now_rate['films_per_s']:.2f} films/s now (torch imported: "
          f"{now_rate['torch']}) vs {onnx_rate['films_per_s']:.2f} on the ONNX path with torch: {ratio:.2f}x")
    print(f"RSS now vs RSS with torch: {rows['now']['rss_mb'] / rows['with torch']['rss_mb']:.2f} x")


if __name__ == "__main__":
    main()
