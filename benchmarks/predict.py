"""End-to-end speed of `cxr predict`'s path (the Predictor) against a naive loop, from the repository root:

    .venv/bin/python benchmarks/predict.py

- films/s from file to 14 probabilities over the 24 full-size films of images-1024 repeated to 216:
  the Predictor (threaded decoding, batches of 16, ONNX Runtime, tcmalloc) against the paper's app path
  (fastai v1's predict on one film: Pillow decode to RGB, a float tensor, bilinear resize, eager fp32
  torch, glibc malloc: a subprocess without LD_PRELOAD), and against a stronger naive loop that decodes
  to gray and uses cxr's preprocessing (one channel, not three),
  timed on 48 films (the rate it sustains; 216 naive films would take minutes). The two run in their own
  processes, each loaded once, in 3 alternating rounds so that both see the same background load; the
  rates are over all rounds, the per-round ratios show the noise. Model load (and ONNX export, cold) is
  reported apart. For the bundled model if present, else EfficientNet-Lite0 (ImageNet weights, 224 px),
  and for DenseNet-121 (random weights: the same speed).
- Batch throughput of DenseNet-121 at 224 px (5.7 GFLOP per film) against this CPU's measured fp32 and
  bf16 matmul peaks; the limit is whichever of the two the CPU computes faster, as measured (the detected
  CPU features, printed first, say why: native bf16 needs AVX-512 BF16 or AMX).
- Peak RSS of `cxr predict` on one film (cold and warm ONNX cache), from the parent's getrusage.

The speed-up is on the last line. Every measurement runs in the same invocation, so ratios compare like
with like on a machine other jobs may be sharing.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILMS = sorted((Path(os.environ.get("CXR_DATA") or REPO.parent / "shared" / "data" / "nih") / "images-1024").glob("*.png"))
N_FAST, N_NAIVE, ROUNDS, DENSENET_GFLOP = 216, 48, 3, 5.7
TCMALLOC = next(iter(glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4")), None)


# ------------------------------------------------------------------------------------- workers
# A worker loads its model once, then times `run N` commands read from stdin, answering one JSON line each.
# The driver alternates the two workers' rounds, so both see the same background load on a shared machine.


def fast_worker(path: str):
    from cxr.inference.predictor import Predictor

    start = time.perf_counter()
    predictor = Predictor(path, batch_size=16)
    info = {"load_s": time.perf_counter() - start, "backend": predictor.backend}
    predictor.predict(FILMS[:16])  # warm-up: allocator pools, ORT's first-run planning

    def run(films):
        preds = predictor.predict(films)
        assert all(len(p.probabilities) == len(predictor.findings) for p in preds), [p.message for p in preds][:3]

    return info, run


def naive_worker(path: str, app_path: bool = True):
    """One film at a time, eager fp32. app_path: the paper's app (fastai v1's open_image and resize: RGB
    decode, a 3-channel float tensor, bilinear resize, normalise); else gray decode + cxr's preprocessing."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from cxr import nets as M
    from cxr.data import transforms
    net, meta = M.load(path)
    mean, std = torch.tensor(meta.mean).view(3, 1, 1), torch.tensor(meta.std).view(3, 1, 1)
    size = (meta.input_size, meta.input_size)

    def tensor(p):
        if not app_path:
            return transforms.preprocess(np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0, meta)
        x = torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)).permute(2, 0, 1) / 255.0
        return (F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0] - mean) / std

    def run(films):
        for p in films:
            with torch.no_grad():
                M.probabilities(net(tensor(p).unsqueeze(0)), meta)

    run(FILMS[:2])
    return {}, run


def serve_worker(kind: str, path: str) -> None:
    info, run = {"fast": fast_worker, "naive": naive_worker,
                 "naive-gray": lambda p: naive_worker(p, app_path=False)}[kind](path)
    print(json.dumps(info), flush=True)
    done = 0
    for line in sys.stdin:
        n = int(line.split()[1])
        films = [FILMS[(done + i) % len(FILMS)] for i in range(n)]
        start = time.perf_counter()
        run(films)
        print(json.dumps({"n": n, "s": time.perf_counter() - start}), flush=True)
        done += n


def _matmul_gflops(dtype, side: int = 2048, min_s: float = 0.5) -> float:
    """Repeated until min_s has passed: an emulated bf16 matmul takes ~100x as long as a native one."""
    import torch

    a, b = torch.randn(side, side).to(dtype), torch.randn(side, side).to(dtype)
    torch.matmul(a, b)
    reps, start = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - start < min_s:
        torch.matmul(a, b)
        reps += 1
    return 2 * side**3 * reps / (time.perf_counter() - start) / 1e9


# ---------------------------------------------------------------------------------- CPU and its limit

CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The first processor's flags in /proc/cpuinfo (none where there is no such file)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _has(flags: set[str], feature: str) -> bool:
    return any(f.startswith("amx") for f in flags) if feature == "amx" else feature in flags


def features_text(flags: set[str]) -> str:
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    listed = ", ".join(f"{f} {'yes' if _has(flags, f) else 'no'}" for f in CPU_FEATURES)
    return f"CPU features: {listed} (native bf16: {'yes' if native else 'no, bf16 is emulated'})"


def _gf(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def limit_text(reached: float, fp32: float, bf16: float, flags: set[str]) -> str:
    """The measured matmul peaks and which one bounds this CPU: the faster, whatever the flags promise."""
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    peaks = f"this CPU's matmul peaks: fp32 {_gf(fp32)} GFLOP/s, bf16 {_gf(bf16)} GFLOP/s"
    if bf16 > fp32:
        why = "native bf16" if native else "although no native bf16 flag was found"
        return (f"{peaks}; bf16 is {bf16 / fp32:.1f}x faster ({why}), so bf16 is the limit: "
                f"{reached / bf16:.0%} of it reached by this fp32 run ({reached / fp32:.0%} of the fp32 peak)")
    why = "native bf16, yet slower here" if native else "no native bf16: it is emulated"
    return (f"{peaks}; bf16 is {fp32 / bf16:.1f}x slower ({why}), so fp32 is the limit: "
            f"{reached / fp32:.0%} of it reached")


def worker_peak(path: str, n: int) -> dict:
    import numpy as np
    import torch

    from cxr.inference import export
    from cxr import nets as M
    net, meta = M.load(path)
    sess = export.session(export.to_onnx(net, meta))
    x = np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype(np.float32)
    sess.run(None, {export.INPUT: x})
    start = time.perf_counter()
    for _ in range(n):
        sess.run(None, {export.INPUT: x})
    films_s = 16 * n / (time.perf_counter() - start)
    return {"films_per_s": films_s, "fp32_gflops": _matmul_gflops(torch.float32),
            "bf16_gflops": _matmul_gflops(torch.bfloat16, side=1024)}


# -------------------------------------------------------------------------------------- driver


class Worker:
    """A worker process: tcmalloc preloaded for the Predictor, glibc malloc for the naive loop."""

    def __init__(self, kind: str, path: Path, cache: str, fast_malloc: bool):
        env = dict(os.environ, CXR_CACHE=cache, PYTHONPATH=str(REPO / "src"))
        env.pop("LD_PRELOAD", None)
        if fast_malloc and TCMALLOC:
            env["LD_PRELOAD"] = TCMALLOC
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--model", str(path)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"worker {self.proc.args[3]} failed (exit {self.proc.wait()}); see its messages above")
        return json.loads(line)

    def run(self, n: int) -> float:
        self.proc.stdin.write(f"run {n}\n")
        self.proc.stdin.flush()
        return self._answer()["s"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def compare(path: Path, cache: str) -> tuple[dict, dict[str, float], list[float]]:
    """Alternating rounds of the three loops; (Predictor info, films/s of each, per-round ratios vs naive)."""
    workers = {"fast": Worker("fast", path, cache, True), "naive": Worker("naive", path, cache, False),
               "naive-gray": Worker("naive-gray", path, cache, False)}
    films = {"fast": N_FAST // ROUNDS, "naive": N_NAIVE // ROUNDS, "naive-gray": N_NAIVE // ROUNDS}
    try:
        rounds = [{k: w.run(films[k]) for k, w in workers.items()} for _ in range(ROUNDS)]
    finally:
        for w in workers.values():
            w.close()
    rates = {k: films[k] * ROUNDS / sum(r[k] for r in rounds) for k in workers}
    ratios = [(films["fast"] / r["fast"]) / (films["naive"] / r["naive"]) for r in rounds]
    return workers["fast"].info, rates, ratios


def run_peak(path: Path, reps: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), LD_PRELOAD=TCMALLOC or "")
    out = subprocess.run([sys.executable, __file__, "--peak", "--model", str(path), "--n", str(reps)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"peak worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss(model: Path, cache: str) -> tuple[float, float]:
    """(MiB, seconds) of `cxr predict` on one film, measured by a wrapper whose only child it is."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.perf_counter() - t)")
    cxr = Path(sys.executable).with_name("cxr")
    env = dict(os.environ, CXR_CACHE=cache)
    out = subprocess.run([sys.executable, "-c", probe, str(cxr), "predict", str(FILMS[0]), "--model", str(model)],
                         env=env, capture_output=True, text=True, check=True)
    mib, secs = out.stdout.split()
    return float(mib), float(secs)


def models(tmp: Path) -> list[tuple[str, Path]]:
    import torch

    from cxr import settings as config
    from cxr import nets as M
    from cxr.findings import FINDINGS

    def save(arch: str, weights) -> Path:
        torch.manual_seed(0)
        meta = M.ModelMeta(arch=arch, task="multilabel", outputs=list(FINDINGS), activation="sigmoid",
                           input_size=224, normalisation=M.default_normalisation(arch))
        return M.save(tmp / f"{arch}.safetensors", M.build(arch, 14, weights=weights), meta)

    first = ("bundled", config.BUNDLED_MODEL) if config.BUNDLED_MODEL.is_file() else \
        ("EfficientNet-Lite0 (ImageNet weights)", save("efficientnet_lite0", "imagenet"))
    return [first, ("DenseNet-121 (random weights)", save("densenet121", None))]


def main() -> None:
    if len(FILMS) != 24:
        raise SystemExit(f"expected the 24 films of images-1024, found {len(FILMS)}: set CXR_DATA")
    import onnxruntime
    import torch

    print(f"CPU: {os.cpu_count()} cores; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"tcmalloc {'yes' if TCMALLOC else 'not found'}")
    print(features_text(cpu_flags()))
    speedups = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = str(Path(tmp) / "cache")
        found = models(Path(tmp))
        for name, path in found:
            info, rates, ratios = compare(path, cache)
            fast, naive, gray = rates["fast"], rates["naive"], rates["naive-gray"]
            speedups.append((name, fast / naive))
            print(f"{name}: Predictor ({info['backend']}, batch 16, threaded decode, tcmalloc) {fast:.1f} films/s "
                  f"over {N_FAST} films (load {info['load_s']:.1f} s, cold cache); naive loop, the paper's app path "
                  f"(one film, eager fp32, Pillow RGB decode, glibc malloc) {naive:.2f} films/s over {N_NAIVE}: "
                  f"{fast / naive:.1f}x (rounds {', '.join(f'{r:.1f}x' for r in ratios)}); naive loop with cxr's gray "
                  f"preprocessing {gray:.2f} films/s: {fast / gray:.1f}x")
        peak = run_peak(found[1][1], 4)
        gflops = peak["films_per_s"] * DENSENET_GFLOP
        print(f"DenseNet-121 batch 16 at 224 px (ONNX Runtime fp32, preprocessed input): {peak['films_per_s']:.1f} films/s "
              f"= {gflops:.0f} GFLOP/s; " + limit_text(gflops, peak["fp32_gflops"], peak["bf16_gflops"], cpu_flags()))
        cold = peak_rss(found[0][1], str(Path(tmp) / "rss-cache"))
        warm = peak_rss(found[0][1], str(Path(tmp) / "rss-cache"))
        print(f"`cxr predict` on one film, {found[0][0]}: peak RSS {cold[0]:.0f} MiB in {cold[1]:.1f} s with a cold "
              f"ONNX cache (exports), {warm[0]:.0f} MiB in {warm[1]:.1f} s warm")
    print("speed-up, Predictor vs naive loop: " + "; ".join(f"{n} {s:.1f}x" for n, s in speedups))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", choices=("fast", "naive", "naive-gray"))
    parser.add_argument("--peak", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--n", type=int, default=4)
    args = parser.parse_args()
    if args.serve:
        serve_worker(args.serve, args.model)
    elif args.peak:
        print(json.dumps(worker_peak(args.model, args.n)))
    else:
        main()
