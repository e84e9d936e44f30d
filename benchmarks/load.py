"""Load test for `cxr serve`: N concurrent clients x M requests against a local server, next to the
Predictor's raw throughput measured in the same run on the same films.

    .venv/bin/python benchmarks/load.py                 # bundled model if present, else a Lite0 it makes
    .venv/bin/python benchmarks/load.py --model runs/x/model.safetensors --clients 8 --requests 200

Everything stays on 127.0.0.1. The run is bounded: each client stops after --requests or when
--max-seconds has passed, whichever comes first, and the server is stopped at the end. Expect 0 errors:
the server's queue is sized to the number of clients. Last line: "server vs raw predictor throughput: 0.93x".
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"  # loopback only, always


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="cxr checkpoint (default: bundled, else a Lite0 made here)")
    p.add_argument("--films", type=Path, help="folder of PNG films (default: $CXR_DATA/images-512)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200, help="per client")
    p.add_argument("--raw", type=int, default=100, help="films read for the raw throughput (in two halves)")
    p.add_argument("--concurrency", type=int, default=1, help="the server's inference slots")
    p.add_argument("--threads", type=int, help="torch threads, for the server and the raw Predictor alike")
    p.add_argument("--max-seconds", type=float, default=240.0, help="stop the load phase after this long")
    return p.parse_args()


def pick_model(given: Path | None, workdir: Path) -> Path:
    from cxr import settings as config
    if given:
        return given
    if config.BUNDLED_MODEL.is_file():
        return config.BUNDLED_MODEL
    # No bundled model in this checkout: a random-weight Lite0 at 224 px costs what the real one would.
    import torch

    from cxr import nets as M
    from cxr.findings import FINDINGS

    torch.manual_seed(0)  # the same bytes every run: the Predictor's ONNX export is cached by content
    net = M.build("efficientnet_lite0", len(FINDINGS), weights=None)
    meta = M.ModelMeta(arch="efficientnet_lite0", task="multilabel", outputs=list(FINDINGS),
                       activation="sigmoid", input_size=224, normalisation="lite")
    return M.save(workdir / "bench-lite0.safetensors", net, meta)


def load_films(folder: Path | None, n: int = 32) -> list[bytes]:
    from cxr.settings import data_dir

    folder = folder or data_dir() / "images-512"
    paths = sorted(folder.glob("*.png"))[:n]
    if not paths:
        sys.exit(f"no PNG films in {folder}: pass --films or set CXR_DATA")
    return [p.read_bytes() for p in paths]


class Raw:
    """Films per second read as the API reads them (images.read_film, then Predictor.predict_film), one
    after another.

    Measured in two halves, before and after the load phase, so that a change in what else the machine is
    doing during the run weighs on both numbers alike. The calls run on a worker thread, as the server's
    do: torch's OpenMP threading behaves differently on the main thread (on a busy 2-core machine the main
    thread's 2-thread OpenMP teams were measured 5-30x slower than a worker thread's inference).
    """

    def __init__(self, model: Path, films: list[bytes], threads: int | None) -> None:
        from cxr.inference.predictor import Predictor

        self.predictor = Predictor(model, threads=threads)
        self.films, self.calls, self.seconds = films, 0, 0.0
        self._on_thread(self._warm)

    def _warm(self) -> None:
        for f in self.films[:3]:
            self._read(f)  # first calls pay for allocation and thread-pool start

    def _on_thread(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args)
        t.start()
        t.join()

    def _calls(self, n: int) -> None:
        for i in range(n):
            self._read(self.films[(self.calls + i) % len(self.films)])

    def _read(self, data: bytes) -> None:
        from cxr import images

        self.predictor.predict_film(images.read_film(data, name="film"))

    def measure(self, n: int) -> None:
        start = time.perf_counter()
        self._on_thread(self._calls, n)
        self.seconds += time.perf_counter() - start
        self.calls += n

    @property
    def throughput(self) -> float:
        return self.calls / self.seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, clients: int, concurrency: int, threads: int | None) -> subprocess.Popen:
    env = dict(os.environ)
    tcmalloc = glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4")
    if tcmalloc and "tcmalloc" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = tcmalloc[0]  # as `cxr` does for itself when started from its script
    cmd = [sys.executable, "-c", "from cxr.cli import main; main()", "serve", "--model", str(model),
           "--host", HOST, "--port", str(port), "--concurrency", str(concurrency), "--queue", str(clients)]
    cmd += ["--threads", str(threads)] if threads else []
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited ({proc.returncode}): {proc.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    sys.exit(f"server not healthy after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client(url: str, films: list[bytes], n: int, offset: int, deadline: float, out: list, errors: list) -> None:
    import httpx

    with httpx.Client(timeout=120) as http:
        for i in range(n):
            if time.monotonic() > deadline:
                return
            data = films[(offset + i) % len(films)]
            start = time.perf_counter()
            try:
                r = http.post(url + "/api/v1/predict", files={"file": ("film.png", data, "image/png")})
                ok = r.status_code == 200 and len(r.json()["findings"]) > 0
                why = f"{r.status_code} {r.text[:120]}"
            except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the others
                ok, why = False, repr(e)
            out.append(time.perf_counter() - start)
            if not ok:
                errors.append(why)


def run_load(url: str, films: list[bytes], clients: int, requests: int, max_seconds: float):
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + max_seconds
    threads = [threading.Thread(target=client, args=(url, films, requests, k * 7, deadline, latencies, errors))
               for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    films = load_films(args.films)
    with tempfile.TemporaryDirectory(prefix="cxr-load-") as tmp:
        model = pick_model(args.model, Path(tmp))
        print(f"model: {model.name}; films: {len(films)} x ~{statistics.mean(map(len, films)) / 1024:.0f} kB; "
              f"{args.clients} clients x {args.requests} requests; server concurrency {args.concurrency}")
        raw = Raw(model, films, args.threads)
        raw.measure(args.raw // 2)
        port = free_port()
        url = f"http://{HOST}:{port}"
        proc = start_server(model, port, args.clients, args.concurrency, args.threads)
        try:
            wait_healthy(proc, url)
            latencies, errors, elapsed = run_load(url, films, args.clients, args.requests, args.max_seconds)
        finally:
            stop_server(proc)
        raw.measure(args.raw - args.raw // 2)
    print(f"raw predictor: {raw.calls} films read one after another (read_film + predict_film), "
          "half before and half after the load")
    report(latencies, errors, elapsed, raw.throughput, args.clients * args.requests)


def report(latencies: list[float], errors: list[str], elapsed: float, raw: float, planned: int) -> None:
    done = len(latencies)
    q = statistics.quantiles(latencies, n=100) if done >= 2 else [float("nan")] * 99
    throughput = done / elapsed
    print(f"requests: {done} of {planned} in {elapsed:.1f} s; errors: {len(errors)}")
    for e in sorted(set(errors))[:5]:
        print(f"  error: {e}")
    worst = 1000 * max(latencies, default=0)
    print(f"latency: p50 {1000 * q[49]:.0f} ms, p95 {1000 * q[94]:.0f} ms, max {worst:.0f} ms")
    print(f"server throughput: {throughput:.1f} films/s; raw predictor: {raw:.1f} films/s")
    print(f"server vs raw predictor throughput: {throughput / raw:.2f}x")
    if errors or done < planned:
        sys.exit(1)


if __name__ == "__main__":
    main()
