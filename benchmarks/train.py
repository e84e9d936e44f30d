"""Training throughput: DenseNet-121 at 224, batch 16, fp32 eager vs cxr's default, in the same run.

cxr's default on every CPU is plain fp32 in the default layout, so that a run's numbers do not depend on
the CPU; bf16 autocast (`--precision bf16-mixed`) is opt-in. This script measures bf16 + channels_last too,
so the opt-in can be judged on the CPU at hand (emulated bf16 on AVX2-only CPUs is far slower). On a GPU:
AMP + channels_last.

Run from the repo root:  .venv/bin/python benchmarks/train.py [--steps 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cxr.training.losses import make_loss
from cxr.nets import build
from cxr.training.train import default_channels_last, default_precision


def images_per_second(device: str, batch: int, steps: int, *, channels_last: bool, dtype) -> float:
    torch.manual_seed(0)
    model = build("densenet121", 14).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    loss_fn = make_loss("unweighted", "multilabel").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=fmt)
    y = (torch.rand(batch, 14, device=device) < 0.1).float()
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    times = []
    for step in range(steps + 1):  # the first step warms up allocators and kernels
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-bf16", action="store_true", help="skip the extra bf16 measurement on CPU")
    args = ap.parse_args()
    precision = default_precision("gpu" if args.device == "cuda" else "cpu")
    default_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    print(f"device {args.device}, threads {torch.get_num_threads()}, default precision {precision}")
    base = images_per_second(args.device, args.batch, args.steps, channels_last=False, dtype=None)
    print(f"fp32 eager:                 {base:8.2f} img/s")
    accel = "gpu" if args.device == "cuda" else "cpu"
    layout = default_channels_last(accel)
    name = f"{precision}{' + channels_last' if layout else ''}"
    fast = images_per_second(args.device, args.batch, args.steps, channels_last=layout, dtype=default_dtype)
    print(f"default ({name}): {fast:8.2f} img/s")
    if args.device == "cpu" and not layout:
        cl = images_per_second(args.device, args.batch, args.steps, channels_last=True, dtype=None)
        print(f"fp32 + channels_last (not the default here): {cl:8.2f} img/s ({cl / base:.2f}x fp32)")
    if args.device == "cpu" and default_dtype is None and not args.skip_bf16:
        bf16 = images_per_second(args.device, args.batch, 1, channels_last=True, dtype=torch.bfloat16)
        print(f"bf16 autocast + channels_last (not the default here): {bf16:8.2f} img/s ({bf16 / base:.2f}x fp32)")
    print(f"default ({name}) vs fp32 eager: {fast / base:.2f}x")


if __name__ == "__main__":
    main()
