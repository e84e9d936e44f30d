"""`Predictor`: the one inference path of the CLI, the API and the page.

file or bytes -> images.read_image -> gate.image_check -> transforms.preprocess -> network (logits and
pooled features, one pass) -> gate distance -> per-finding probabilities (independent sigmoids, never
renormalised; P(Pneumothorax) alone for the 2-class model) -> optional Grad-CAM heatmaps (cxr.explain.gradcam).

Decoding runs in a small thread pool ahead of the network (PNG/JPEG decoding and resizing release the
GIL), so films are decoded while the previous batch is inferred.

Backends (`backend=`), each held to a stated max abs difference in probability from fp32 eager torch:

- "onnx": ONNX Runtime fp32 on the exported graph (cxr.inference.export; cached per checkpoint). Tolerance 1e-4
  (measured ~2e-6).
- "torch": eager fp32, channels_last. Tolerance 1e-4 (measured ~1e-6).
- "auto": "onnx" when onnxruntime is installed, else "torch". Measured on the project's CPU (2-core AMD
  EPYC Zen 3, AVX2, no AVX-512 or AMX; tcmalloc; a machine shared with other jobs), batch 16 at 224 px,
  films/s of the network alone: EfficientNet-Lite0 eager fp32 4.1, channels_last 5.8, bf16 autocast 0.1
  (emulated: 60x slower), torch.compile 10.4 (after a 200 s compile, so not offered), ONNX Runtime 13-18;
  DenseNet-121 eager 1.0, channels_last 1.6, ONNX Runtime 2.2. benchmarks/predict.py re-measures.

bf16 autocast was measured and is not offered: besides being 60x slower on a CPU without native bf16, it
is not accurate enough to hold to a useful bound with the models at hand. Lite0's feature map drifts 12 %
from fp32 (DenseNet-121's 0.6 %), and probabilities moved by up to 0.15-0.20 (Lite0 ImageNet, head in
fp32) and 0.05-0.12 (DenseNet-121, random body, head BatchNorm calibrated on the films).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cxr import settings as config
from cxr.inference import gate
from cxr.images import read as images
from cxr.data import transforms
from cxr.nets import model as M
from cxr.errors import CxrError, ModelError

BACKENDS = ("auto", "onnx", "torch")
TOLERANCE = {"onnx": 1e-4, "torch": 1e-4}  # max abs diff in probability vs fp32 eager torch

Source = str | os.PathLike | bytes


@dataclass
class Prediction:
    """One film's result. `probabilities` holds independent per-finding probabilities (never renormalised);
    all three dicts are empty when the film was refused by the gate or could not be read."""

    name: str
    probabilities: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    positive: dict[str, bool] = field(default_factory=dict)
    refused: str | None = None
    gate_score: float | None = None
    error: str | None = None
    size: tuple[int, int] | None = None  # (width, height)
    heatmaps: dict[str, np.ndarray] | None = None

    @property
    def status(self) -> str:
        return "error" if self.error else "refused" if self.refused else "ok"

    @property
    def message(self) -> str:
        return self.error or self.refused or ""

    def to_dict(self) -> dict:
        """JSON-ready: plain floats, bools and strings; heatmaps as the list of findings that have one."""
        return {
            "name": self.name, "status": self.status, "message": self.message,
            "probabilities": dict(self.probabilities), "thresholds": dict(self.thresholds),
            "positive": dict(self.positive), "refused": self.refused, "gate_score": self.gate_score,
            "error": self.error, "size": list(self.size) if self.size else None,
            "heatmaps": sorted(self.heatmaps) if self.heatmaps else None,
        }


@dataclass
class _Film:
    """A decoded input on its way to the network."""

    index: int
    name: str
    x: torch.Tensor | None = None
    size: tuple[int, int] | None = None
    gray: np.ndarray | None = None  # kept only when heatmaps (or low-res copies) need it
    refused: str | None = None
    error: str | None = None


class _TorchBackend:
    def __init__(self, model: torch.nn.Module):
        self.model = model.to(memory_format=torch.channels_last)  # 1.4-1.6x faster than contiguous here

    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            fmap = self.model.features(x.contiguous(memory_format=torch.channels_last))
            logits = self.model.classify(fmap)
        return logits.numpy(), gate.pooled(fmap).numpy()


class _OnnxBackend:
    def __init__(self, data: bytes, threads: int | None):
        from cxr.inference import export
        self.session, self.inputs, self.outputs = export.session(data, threads), export.INPUT, list(export.OUTPUTS)

    def __call__(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        logits, feats = self.session.run(self.outputs, {self.inputs: x.numpy()})
        return logits, feats


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise CxrError(f"unknown backend {backend!r}; expected one of: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "onnx" if importlib.util.find_spec("onnxruntime") else "torch"
    return backend


class Predictor:
    """Loads a model once (None = the bundled one) and reads films with it. Thread-safe for predict_one."""

    def __init__(self, model: str | Path | None = None, *, backend: str = "auto", batch_size: int = 16,
                 threads: int | None = None):
        if batch_size < 1:
            raise CxrError(f"batch_size must be at least 1, got {batch_size}")
        if threads:
            torch.set_num_threads(int(threads))  # process-wide: torch has no per-model thread count
        self.path = Path(model) if model is not None else config.BUNDLED_MODEL
        self.model, self.meta = M.load_model(model)
        self.gate = gate.Gate(self.meta, M.load_extra(self.path), self.model.body.num_features)
        self.batch_size, self.threads = int(batch_size), threads
        self.backend = resolve_backend(backend)
        self._run = self._make_backend()
        # Findings reported and the output each is read from: P(Pneumothorax) alone for the 2-class model.
        soft = self.meta.activation == "softmax"
        self.findings = [self.meta.outputs[1]] if soft else list(self.meta.outputs)
        self._columns = [1] if soft else list(range(len(self.meta.outputs)))
        self._workers = max(1, min(4, os.cpu_count() or 1))
        # The heatmap pass reads the body's feature map for the gate through this per-thread tap.
        self._tap = threading.local()
        self.model.body.register_forward_hook(self._capture)

    def _make_backend(self) -> Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]:
        if self.backend == "torch":
            return _TorchBackend(self.model)
        from cxr.inference import export
        try:
            return _OnnxBackend(export.cached_onnx(self.path, self.model, self.meta), self.threads)
        except Exception:  # noqa: BLE001 - a damaged cache file: export afresh once before giving up
            try:
                return _OnnxBackend(export.cached_onnx(self.path, self.model, self.meta, refresh=True), self.threads)
            except Exception as e:  # noqa: BLE001
                raise ModelError(f"{self.path}: cannot run with ONNX Runtime ({e}); try backend='torch'") from None

    def _capture(self, module, inputs, output) -> None:
        if getattr(self._tap, "on", False):
            self._tap.fmap = output.detach()

    # ------------------------------------------------------------------------------------ public

    def predict(self, inputs: Sequence[Source], *, names: Sequence[str] | None = None,
                heatmaps: bool | Sequence[str] = False) -> list[Prediction]:
        """One Prediction per input, in order; an unreadable input gives one with .error, never an exception."""
        return list(self.iter_predict(inputs, names=names, heatmaps=heatmaps))

    def iter_predict(self, inputs: Sequence[Source], *, names: Sequence[str] | None = None,
                     heatmaps: bool | Sequence[str] = False,
                     progress: Callable[[int], None] | None = None) -> Iterator[Prediction]:
        """predict, one Prediction at a time as batches finish; progress(n) after each batch of n films."""
        inputs = list(inputs)
        targets = self._heatmap_targets(heatmaps)
        batch: list[_Film] = []
        for film in self._decoded(inputs, self._names(inputs, names), keep_gray=bool(targets)):
            batch.append(film)
            if len(batch) == self.batch_size or film.index == len(inputs) - 1:
                yield from self._infer(batch, targets)
                if progress:
                    progress(len(batch))
                batch = []

    def predict_one(self, src: Source, *, name: str | None = None,
                    heatmaps: bool | Sequence[str] = False) -> Prediction:
        """One film; raises images.ImageError when it cannot be read. A gate refusal is a Prediction with .refused."""
        targets = self._heatmap_targets(heatmaps)
        film = self._decode(0, src, self._names([src], [name] if name else None)[0], bool(targets), strict=True)
        return self._infer([film], targets)[0]

    def embed(self, inputs: Sequence[Source], *, low_res: int | None = None,
              progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[int]]:
        """Pooled features (the gate's) of the films that pass the image checks, film after film, each
        followed by its copy downscaled to low_res px when low_res is given; and the indices skipped."""
        rows, skipped, xs = [], [], []
        inputs = list(inputs)
        for film in self._decoded(inputs, self._names(inputs, None), keep_gray=bool(low_res)):
            if film.x is None:
                skipped.append(film.index)
            else:
                xs.append(film.x)
                if low_res:
                    xs.append(transforms.preprocess(images.resize(film.gray, low_res), self.meta))
            if len(xs) >= self.batch_size or (film.index == len(inputs) - 1 and xs):
                rows.append(self._run(torch.stack(xs))[1])
                if progress:
                    progress(len(xs) // (2 if low_res else 1))
                xs = []
        width = self.model.body.num_features
        return (np.concatenate(rows) if rows else np.empty((0, width), np.float32)), skipped

    # ---------------------------------------------------------------------------------- decoding

    @staticmethod
    def _names(inputs: Sequence[Source], names: Sequence[str] | None) -> list[str]:
        if names is not None:
            if len(names) != len(inputs):
                raise CxrError(f"{len(names)} names for {len(inputs)} inputs")
            return [str(n) for n in names]
        return [f"input {i}" if isinstance(s, (bytes, bytearray, memoryview)) else os.fspath(s)
                for i, s in enumerate(inputs)]

    def _decode(self, index: int, src: Source, name: str, keep_gray: bool, strict: bool = False) -> _Film:
        film = _Film(index, name)
        info: dict = {}
        try:
            gray = images.read_image(src, name=name, info=info)
        except images.ImageError as e:
            if strict:
                raise
            film.error = str(e)
            return film
        except Exception as e:  # noqa: BLE001 - one bad film must never stop a batch
            if strict:
                raise images.ImageError(f"{name}: cannot be read ({type(e).__name__}: {e})") from None
            film.error = f"{name}: cannot be read ({type(e).__name__}: {e})"
            return film
        film.size = (int(gray.shape[1]), int(gray.shape[0]))
        colour = info.get("colourfulness")  # measured during the one decode; DICOM: ask the gate
        film.refused = gate.image_check(gray, gate.colourfulness(src) if colour is None else colour)
        if film.refused is None:
            film.x = transforms.preprocess(gray, self.meta)
            film.gray = gray if keep_gray else None
        return film

    def _decoded(self, inputs: Sequence[Source], names: list[str], keep_gray: bool) -> Iterator[_Film]:
        """Decoded films in input order, decoding up to two batches ahead in a thread pool."""
        pool = ThreadPoolExecutor(self._workers, thread_name_prefix="cxr-decode")
        pending: deque = deque()
        todo = iter(range(len(inputs)))
        try:
            for i in todo:
                pending.append(pool.submit(self._decode, i, inputs[i], names[i], keep_gray))
                if len(pending) >= 2 * self.batch_size:
                    break
            while pending:
                film = pending.popleft().result()
                i = next(todo, None)
                if i is not None:
                    pending.append(pool.submit(self._decode, i, inputs[i], names[i], keep_gray))
                yield film
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # --------------------------------------------------------------------------------- inference

    def _heatmap_targets(self, heatmaps: bool | Sequence[str]) -> list[int]:
        if heatmaps is False or heatmaps is None or (not isinstance(heatmaps, (bool, str)) and not len(heatmaps)):
            return []
        from cxr.explain import gradcam as explain
        return explain.target_indices(self.meta, "all" if heatmaps is True else heatmaps)

    def _forward(self, x: torch.Tensor, targets: list[int]) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
        """(logits, pooled features, Grad-CAM maps or None): one pass through the body either way."""
        if not targets:
            logits, feats = self._run(x)
            return logits, feats, None
        from cxr.explain import gradcam as explain
        self._tap.on = True
        try:
            logits, cams = explain.gradcam(self.model, x, targets, meta=self.meta)
            fmap = self._tap.fmap
        finally:
            self._tap.on, self._tap.fmap = False, None
        return logits.float().numpy(), gate.pooled(fmap).numpy(), cams

    def _infer(self, batch: list[_Film], targets: list[int]) -> list[Prediction]:
        ready = [f for f in batch if f.x is not None]
        results: dict[int, Prediction] = {}
        if ready:
            logits, feats, cams = self._forward(torch.stack([f.x for f in ready]), targets)
            probs = M.probabilities(torch.from_numpy(np.asarray(logits)), self.meta).numpy()
            verdicts = self.gate.check_features(feats)
            for j, (film, (score, reason)) in enumerate(zip(ready, verdicts)):
                maps = None if cams is None or reason else self._heatmaps(cams[j], film.gray, targets)
                results[film.index] = self._prediction(film, probs[j], score, reason, maps)
        return [results.get(f.index) or Prediction(f.name, refused=f.refused, error=f.error, size=f.size)
                for f in batch]

    def _heatmaps(self, cams: torch.Tensor, gray: np.ndarray, targets: list[int]) -> dict[str, np.ndarray]:
        from cxr.explain import gradcam as explain
        full = explain.upsample(cams.numpy(), gray.shape)  # the film was squashed to a square: unsquash
        return {self.meta.outputs[t]: full[k].astype(np.float32, copy=False) for k, t in enumerate(targets)}

    def _prediction(self, film: _Film, probs: np.ndarray, score: float | None, reason: str | None,
                    maps: dict[str, np.ndarray] | None) -> Prediction:
        if reason:
            return Prediction(film.name, refused=reason, gate_score=score, size=film.size)
        p = {f: float(probs[c]) for f, c in zip(self.findings, self._columns)}
        t = {f: float(self.meta.thresholds[f]) for f in self.findings}
        return Prediction(film.name, p, t, {f: p[f] >= t[f] for f in self.findings}, gate_score=score,
                          size=film.size, heatmaps=maps)
