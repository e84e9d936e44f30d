"""What Grad-CAM heatmaps for all 14 findings cost next to the forward pass that gives the probabilities.

Run from the repository root with tcmalloc preloaded (as the `cxr` command does itself):

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 .venv/bin/python benchmarks/explain.py [--reference]

DenseNet-121 with random weights (the cost does not depend on the values) at 224 px, one film, fp32, eval
mode, on the CPU. The two are timed alternately, REPS times each after a warm-up, so a neighbour's load on
a shared machine hits both alike; medians are reported. With --reference, Grad-CAM the textbook way
(captum's LayerGradCam: a forward and a full backward per finding, about 10x a forward) is timed once for
context. The last line is the ratio of the medians; cxr.explain.gradcam promises at most 3x (exit status 1 above).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from cxr.explain import gradcam as explain
from cxr.nets import build

SIZE, REPS, WARMUP = 224, 7, 2
LIMIT = 3.0


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _reference(model: torch.nn.Module, x: torch.Tensor) -> None:
    from captum.attr import LayerGradCam

    cam = LayerGradCam(model, model.body)
    for k in range(model.num_outputs):
        cam.attribute(x, target=k, relu_attributions=True)


def main() -> int:
    if "tcmalloc" not in os.environ.get("LD_PRELOAD", ""):
        print("note: tcmalloc is not preloaded; timings will be slower than the cxr command's", file=sys.stderr)
    torch.manual_seed(0)
    model = build("densenet121", 14, None).eval()
    x = torch.randn(1, 3, SIZE, SIZE)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    def gradcam() -> None:
        with torch.inference_mode():  # as a predictor would call it: explain turns gradients back on
            explain.gradcam(model, x)

    for _ in range(WARMUP):
        forward()
        gradcam()
    fwd, cam = [], []
    for _ in range(REPS):
        fwd.append(_seconds(forward))
        cam.append(_seconds(gradcam))
    f, c = statistics.median(fwd), statistics.median(cam)
    print(f"densenet121 @ {SIZE} px, 1 film, fp32, {torch.get_num_threads()} threads, median of {REPS}")
    print(f"forward (inference):              {f * 1000:8.1f} ms")
    print(f"gradcam, 14 findings (cxr):       {c * 1000:8.1f} ms")
    if "--reference" in sys.argv[1:]:
        r = _seconds(lambda: _reference(model, x.clone()))
        print(f"gradcam, 14 full backward passes: {r * 1000:8.1f} ms  ({r / f:.1f}x forward; one run)")
    print(f"gradcam 14 findings vs forward: {c / f:.2f}x")
    return 0 if c / f <= LIMIT else 1


if __name__ == "__main__":
    raise SystemExit(main())
