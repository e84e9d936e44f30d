"""Cost of the capture steps (find the film, rectify it, orientation and polarity) against the model's
forward pass on one film, from the repository root:

    CXR_DATA=../shared/data/nih .venv/bin/python benchmarks/capture.py [--films 6] [--repeats 5]

- capture steps: the Predictor's capture stage (`cxr.inference.pipeline.capture`: one working copy shared
  by `find_film` and orientation, `rectify` straight to the model's input side, `orientation`) on
  synthetic light-box photos (720 x 960 colour JPEGs decoded to gray, as an upload would be) of 1024-px
  shared films; and the same stage on the films themselves (the pass-through path every file takes).
- forward: the bundled model on one film, with its normal preprocessing (`pipeline.preprocess`: resize
  and normalise) and its backend (batch of 1), and nothing of the capture stage. Earlier versions timed
  `Predictor.probabilities_of([film])`, which runs the capture stage itself (the finder and orientation)
  before the network: the denominator then held part of the numerator, and the ratios read low.
Medians over repeats, in one process, alternating, so both see the same background load. The ratios are on
the last two lines; the issue asks for <= 0.3x for both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from cxr import images
from cxr.data import capture as aug
from cxr.inference import pipeline
from cxr.tasks import probabilities

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CXR_DATA") or REPO.parent / "shared" / "data" / "nih")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _photo_steps(gray: np.ndarray, side: int) -> None:
    _, done = pipeline.capture(gray, side=side)
    assert done.crop is not None


def _film_steps(gray: np.ndarray, side: int) -> None:
    film, done = pipeline.capture(gray, side=side)
    assert done.crop is None and (film is gray or done.k_rot90 or done.inverted or done.refused)


def _forward(predictor, gray: np.ndarray) -> np.ndarray:
    """What reading a film costs once the capture stage is done: preprocessing, the network, activation."""
    logits, _ = predictor._run(pipeline.preprocess(gray, predictor.meta)[None])
    return probabilities(logits, predictor.meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--films", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from cxr.images import capture as camera
    from cxr.inference.predictor import Predictor

    films = [images.read_image(p) for p in sorted((DATA / "images-1024").glob("*.png"))[: args.films]]
    photos = [images.read_image(aug.photo_bytes(aug.light_box_photo(g, np.random.default_rng(i))[0]))
              for i, g in enumerate(films)]
    predictor = Predictor()
    side = int(predictor.meta.input_size)
    camera.warm_up()  # scipy's import is a server's start-up cost, not a photo's
    for g, p in zip(films, photos, strict=True):  # warm up: ONNX load, first allocations, both paths
        _forward(predictor, g), _film_steps(g, side), _photo_steps(p, side)
    t_photo, t_film, t_fwd = [], [], []
    for _ in range(args.repeats):
        for gray, photo in zip(films, photos, strict=True):
            t_photo.append(_timed(lambda p=photo: _photo_steps(p, side)))
            t_film.append(_timed(lambda g=gray: _film_steps(g, side)))
            t_fwd.append(_timed(lambda g=gray: _forward(predictor, g)))
    photo_ms, film_ms, fwd_ms = (1000 * statistics.median(t) for t in (t_photo, t_film, t_fwd))
    print(f"backend {predictor.backend}, input {side} px, {len(films)} films x {args.repeats} repeats, medians:")
    print(f"  photo: find_film + rectify + orientation      {photo_ms:7.1f} ms")
    print(f"  film:  find_film (pass-through) + orientation {film_ms:7.1f} ms")
    print(f"  forward: preprocess + network (one film)      {fwd_ms:7.1f} ms")
    print(f"pass-through steps vs forward: {film_ms / fwd_ms:.2f}x")
    print(f"capture steps vs forward: {photo_ms / fwd_ms:.2f}x")


if __name__ == "__main__":
    main()
