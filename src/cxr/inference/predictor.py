"""`Predictor`: the one inference path of the CLI, the API, the page and `cxr evaluate`.

file or bytes -> images.read_film (one decode) -> gate.image_check -> pipeline.preprocess -> a backend
(logits and pooled features, one pass) -> gate distance -> per-finding probabilities (independent
sigmoids, never renormalised; P(Pneumothorax) alone for the 2-class model; cxr.tasks says which) ->
optional Grad-CAM heatmaps.

Two engines do the network's part. A checkpoint with fresh ONNX artefacts (`cxr export`) runs through
cxr.inference.artefacts.Runtime: onnxruntime + numpy, probabilities, the gate's features and Grad-CAM for
every finding from one graph, and torch is never imported. Otherwise, and for what needs it (bf16, CUDA,
backend "torch", a model handed over in memory), cxr.inference.torchpath imports torch; a checkpoint that
could have run without it says so once, with what to run.

`probabilities_of` is the same backends and preprocessing without the gate, for labelled films that
`cxr evaluate` scores: the evaluated model is the model users run. Arithmetic is fp32 unless bf16 is
asked for (cxr.inference.runtime); backends and their tolerances are in cxr.inference.backends, speeds in
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxr import images
from cxr.errors import CxrError
from cxr.evaluation.calibration import assessments
from cxr.explain import maps as heat
from cxr.inference import artefacts, gate, pipeline, runtime
from cxr.inference import preprocess as convention
from cxr.inference.runtime import BACKENDS, TOLERANCE, resolve_backend
from cxr.inference.stability import Stability
from cxr.tasks import get_task, probabilities

__all__ = ["BACKENDS", "TOLERANCE", "Prediction", "Predictor", "resolve_backend"]

Source = pipeline.Source
Gray = np.ndarray | Callable[[], np.ndarray]  # a decoded film, or how to read one (in a decode thread)
log = logging.getLogger("cxr.inference")
_noted: set[str] = set()  # checkpoints already told they run on torch for want of artefacts (once a process)


@dataclass
class Prediction:
    """One film's result. `probabilities` holds independent per-finding probabilities (never renormalised,
    calibrated when the model carries a calibration); the dicts are empty when the film was refused by the
    gate or could not be read. A finding that is not `assessed` (no evidence that the model does better
    than chance on it) is never `positive`; `reasons` says why, for those findings only."""

    name: str
    probabilities: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    positive: dict[str, bool] = field(default_factory=dict)
    assessed: dict[str, bool] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # finding -> why it is not assessed
    refused: str | None = None
    gate_score: float | None = None
    error: str | None = None
    size: tuple[int, int] | None = None  # (width, height)
    heatmaps: dict[str, np.ndarray] | None = None
    capture: pipeline.Capture | None = None  # what was done before reading: crop, turn, inversion, message
    stability: Stability | None = None  # with stability=True: the spread over test-time variants
    read: np.ndarray | None = field(default=None, repr=False)  # predict_film(keep_read=True): the film as read

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
            "positive": dict(self.positive), "assessed": dict(self.assessed), "reasons": dict(self.reasons),
            "refused": self.refused, "gate_score": self.gate_score,
            "error": self.error, "size": list(self.size) if self.size else None,
            "heatmaps": sorted(self.heatmaps) if self.heatmaps else None,
            "capture": self.capture.to_dict() if self.capture else None,
            "stability": self.stability.to_dict() if self.stability else None,
        }


class Predictor:
    """Loads a model once (None = the bundled one) and reads films with it. Thread-safe for predict_one
    and predict_film. precision: "fp32" (default) or "bf16" (torch backend only; its measured error
    against fp32 is kept in `.measured`). device: "cpu" (default) or "cuda" (torch backend). workers:
    decoding threads (default: up to 4)."""

    def __init__(self, model: str | Path | None = None, *, backend: str = "auto", batch_size: int = 16,
                 threads: int | None = None, precision: str = runtime.DEFAULT_PRECISION, device: str = "cpu",
                 workers: int | None = None):
        path = artefacts.resolve_model(model)  # a path, a name from `cxr models`, or None (the bundled model)
        name = "torch" if backend == "auto" and precision != "fp32" else resolve_backend(backend)
        runtime.check_precision(precision, name)
        why = "backend torch" if name == "torch" else None if str(device) == "cpu" else f"device {device}"
        stale = artefacts.stale_reason(path) if why is None else None
        if why is None and stale is None:
            rt = artefacts.Runtime(path, threads=threads, check=False)  # checked just now
            engine, meta, extra = artefacts.RuntimeEngine(rt), rt.meta, rt.extra
        else:
            from cxr.inference import torchpath

            if stale is not None:
                _note_once(path, stale)
            net, meta = torchpath.load(path)
            extra = artefacts.read_checkpoint_header(path)[1]
            engine = torchpath.TorchEngine(net, meta, backend=name, path=path, threads=threads,
                                           precision=precision, device=device)
        self._setup(engine, meta, extra, path, backend=name, batch_size=batch_size, threads=threads,
                    precision=precision, workers=workers)

    @classmethod
    def from_model(cls, net, meta, *, extra: dict | None = None, backend: str = "torch",
                   batch_size: int = 16, threads: int | None = None, precision: str = runtime.DEFAULT_PRECISION,
                   device: str = "cpu", workers: int | None = None) -> Predictor:
        """A Predictor around a model already in memory (a training run's, a test's). Without `extra`
        (the gate's statistics) the gate's feature distance is off; its image checks still run."""
        from cxr.inference import torchpath

        self = cls.__new__(cls)
        if extra is None and meta.gate:
            import dataclasses
            meta = dataclasses.replace(meta, gate={})
        # bf16 runs on torch only: "auto" picks torch for it rather than refusing.
        name = "torch" if backend == "auto" and precision != "fp32" else resolve_backend(backend)
        runtime.check_precision(precision, name)
        engine = torchpath.TorchEngine(net, meta, backend=name, path=None, threads=threads, precision=precision,
                                       device=device)
        self._setup(engine, meta, extra or {}, None, backend=name, batch_size=batch_size, threads=threads,
                    precision=precision, workers=workers)
        return self

    def _setup(self, engine, meta, extra: dict, path: Path | None, *, backend: str, batch_size: int,
               threads: int | None, precision: str, workers: int | None) -> None:
        if batch_size < 1:
            raise CxrError(f"batch_size must be at least 1, got {batch_size}")
        self.path, self.meta, self._engine = path, meta, engine
        self.model = engine.model  # the torch network, or None on the torch-free runtime
        self.torch_free = isinstance(engine, artefacts.RuntimeEngine)
        self.gate = gate.Gate(meta, extra, engine.num_features)
        self.batch_size, self.threads = int(batch_size), threads
        self.backend, self.precision = backend, precision
        self._run = convention.with_tta(engine.run, meta)
        self.measured = runtime.Measured(precision) if precision != "fp32" else None
        task = get_task(meta.task)
        self.task = task
        self.findings, self._columns = list(task.reported), list(task.columns)
        self.assessed = assessments(meta)  # finding -> (assessed, why not): fixed for the model's life
        self._workers = workers or pipeline.default_workers()  # decoding threads

    # ------------------------------------------------------------------------------------ public

    def predict(self, inputs: Sequence[Source], *, names: Sequence[str] | None = None,
                heatmaps: bool | Sequence[str] = False, stability: bool = False) -> list[Prediction]:
        """One Prediction per input, in order; an unreadable input gives one with .error, never an exception.
        stability: also the spread over test-time variants (cxr.inference.stability; 3 more forwards a film)."""
        return list(self.iter_predict(inputs, names=names, heatmaps=heatmaps, stability=stability))

    def iter_predict(self, inputs: Sequence[Source], *, names: Sequence[str] | None = None,
                     heatmaps: bool | Sequence[str] = False,
                     progress: Callable[[int], None] | None = None, stability: bool = False) -> Iterator[Prediction]:
        """predict, one Prediction at a time as batches finish; progress(n) after each batch of n films."""
        inputs = list(inputs)
        targets = self._heatmap_targets(heatmaps)
        labels = pipeline.names_of(inputs, names)
        decoded = self._ordered(lambda i: pipeline.decode(i, inputs[i], labels[i], self.meta, bool(targets),
                                                          variants=stability), len(inputs))
        for batch in pipeline.batches(decoded, self.batch_size):
            yield from self._infer(batch, targets)
            if progress:
                progress(len(batch))

    def predict_one(self, src: Source, *, name: str | None = None,
                    heatmaps: bool | Sequence[str] = False, stability: bool = False) -> Prediction:
        """One film; raises images.ImageError when it cannot be read. A gate refusal is a Prediction with .refused."""
        label = pipeline.names_of([src], [name] if name else None)[0]
        targets = self._heatmap_targets(heatmaps)
        return self._infer([pipeline.decode(0, src, label, self.meta, bool(targets), strict=True,
                                            variants=stability)], targets)[0]

    def predict_film(self, film: images.Film, *, heatmaps: bool | Sequence[str] = False,
                     heatmap_max_side: int | None = None, crop=None, stability: bool = False,
                     keep_read: bool = False) -> Prediction:
        """A film already decoded by images.read_film (the web app decodes once and keeps the pixels).
        heatmap_max_side: heatmaps at the film's aspect ratio, at most this many px a side (default: the
        film's own size). crop: the caller's crop (a Quad, e.g. from pipeline.crop_quad) or "full" (no
        search for a light box); default: found in a photo. keep_read: the film as read (cropped, turned)
        in .read, which heatmaps are drawn over."""
        targets = self._heatmap_targets(heatmaps)
        decoded = pipeline.admit(0, film, self.meta, bool(targets) or keep_read, crop=crop, variants=stability)
        pred = self._infer([decoded], targets, heatmap_max_side=heatmap_max_side)[0]
        pred.read = decoded.gray if keep_read else None
        return pred

    def probabilities_of(self, grays: Sequence[Gray], *, strict: bool = False,
                         progress: Callable[[int], None] | None = None, find_film: bool = True) -> np.ndarray:
        """len(grays) x outputs float32: the model's probabilities for every output column, through the same
        preprocessing and backend as predict but without the gate (labelled films are all scored). Items
        are gray arrays or callables that read one; a film that cannot be read is a NaN row (strict:
        its images.ImageError is raised). progress(n) with the number of films done after each batch.
        The capture stage applies as in predict (a photo's film cropped, a confidently turned or inverted
        film put right) but refuses nothing; find_film=False skips the search for a light box (a cache's
        films are films already)."""
        logits = self.logits_of(grays, strict=strict, progress=progress, find_film=find_film)
        ok = np.isfinite(logits).all(axis=1)
        out = np.full(logits.shape, np.nan, dtype=np.float32)
        out[ok] = probabilities(logits[ok], self.meta)
        return out

    def logits_of(self, grays: Sequence[Gray], *, strict: bool = False,
                  progress: Callable[[int], None] | None = None, find_film: bool = True) -> np.ndarray:
        """probabilities_of before the activation and before calibration: the raw logits that
        `cxr calibrate` fits on (NaN rows for films that cannot be read)."""
        out = np.full((len(grays), len(self.meta.outputs)), np.nan, dtype=np.float32)
        done = 0
        prepared = self._ordered(lambda i: self._prepare(grays[i], strict, find_film), len(grays))
        for batch in pipeline.batches(prepared, self.batch_size):
            ready = [j for j, x in enumerate(batch) if x is not None]
            if ready:
                logits, _ = self._forward(np.stack([batch[j] for j in ready]))
                out[[done + j for j in ready]] = logits
            done += len(batch)
            if progress:
                progress(done)
        return out

    def verdicts_of(self, grays: Sequence[np.ndarray], *, find_film: bool = True
                    ) -> tuple[np.ndarray, list[str | None]]:
        """probabilities_of (every film scored, as it is read) beside what predict would answer each: None
        where it would read the film, else its refusal (image checks, orientation, the gate). One forward
        pass a film; `cxr evaluate --stability` reports acceptance rates from it."""
        probs = np.full((len(grays), len(self.meta.outputs)), np.nan, dtype=np.float32)
        refusals: list[str | None] = []
        for start in range(0, len(grays), self.batch_size):
            xs, why = [], []
            for g in grays[start:start + self.batch_size]:
                film = images.Film(g, (int(g.shape[1]), int(g.shape[0])), None, "film")
                d = pipeline.admit(0, film, self.meta, False, find=find_film)
                xs.append(d.x if d.x is not None else self._prepare(g, True, find_film))
                why.append(d.refused)
            logits, feats = self._forward(np.stack(xs))
            probs[start:start + len(xs)] = probabilities(logits, self.meta)
            refusals += [w or reason for w, (_, reason) in zip(why, self.gate.check_features(feats))]
        return probs, refusals

    def embed(self, inputs: Sequence[Source], *, low_res: int | None = None,
              photo: Callable[[np.ndarray, int], np.ndarray] | None = None,
              progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[int]]:
        """Pooled features (the gate's) of the films that pass the image checks, film after film, each
        followed by its copy downscaled to low_res px when low_res is given, then by `photo(gray, index)` (a
        gray photo of the film, say on a light box) read as an upload is (found, cropped, put upright);
        and the indices skipped."""
        rows, skipped, xs = [], [], []
        inputs = list(inputs)
        labels = pipeline.names_of(inputs, None)
        keep = bool(low_res) or photo is not None
        decoded = self._ordered(lambda i: pipeline.decode(i, inputs[i], labels[i], self.meta, keep), len(inputs))
        per_film = 1 + bool(low_res) + (photo is not None)
        for film in decoded:
            if film.x is None:
                skipped.append(film.index)
            else:
                xs.append(film.x)
                if low_res:
                    xs.append(pipeline.preprocess(images.resize(film.gray, low_res), self.meta))
                if photo is not None:
                    xs.append(self._prepare(photo(film.gray, film.index), True))
            if len(xs) >= self.batch_size or (film.index == len(inputs) - 1 and xs):
                rows.append(self._run(np.stack(xs))[1])
                if progress:
                    progress(len(xs) // per_film)
                xs = []
        width = self._engine.num_features
        return (np.concatenate(rows) if rows else np.empty((0, width), np.float32)), skipped

    # --------------------------------------------------------------------------------- internals

    def _ordered(self, work: Callable[[int], object], n: int) -> Iterator:
        return pipeline.ordered(work, n, workers=self._workers, ahead=2 * self.batch_size)

    def _prepare(self, item: Gray, strict: bool, find: bool = True) -> np.ndarray | None:
        try:
            gray, _ = pipeline.capture(item() if callable(item) else item, find=find,
                                       side=int(self.meta.input_size))
            return pipeline.preprocess(gray, self.meta)
        except images.ImageError:
            if strict:
                raise
            return None

    def _heatmap_targets(self, heatmaps: bool | Sequence[str]) -> list[int]:
        if heatmaps is False or heatmaps is None or (not isinstance(heatmaps, (bool, str)) and not len(heatmaps)):
            return []
        return heat.target_indices(self.meta, "all" if heatmaps is True else heatmaps)

    def _forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, pooled features) from the backend. With a faster precision, the first batch_size films
        a Predictor scores are also run in fp32, to measure what the faster arithmetic costs."""
        logits, feats = self._run(x)
        if self.measured is not None and self.measured.films < self.batch_size:
            reference, _ = self._run(x, precision="fp32")
            self.measured.add(probabilities(logits, self.meta), probabilities(reference, self.meta))
        return logits, feats

    def _forward_with_maps(self, x: np.ndarray,
                           targets: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(logits, pooled features, Grad-CAM maps or None): one pass through the body either way."""
        if not targets:
            return *self._forward(x), None
        if x.ndim == 5:  # ten crops: scores from all of them, heatmaps from the centre crop (TenCrop's fifth)
            logits, feats = self._forward(x)
            return logits, feats, self._forward_with_maps(np.ascontiguousarray(x[:, 4]), targets)[2]
        return self._engine.with_maps(x, targets)

    def _infer(self, batch: list[pipeline.Decoded], targets: list[int], *,
               heatmap_max_side: int | None = None) -> list[Prediction]:
        ready = [f for f in batch if f.x is not None]
        results: dict[int, Prediction] = {}
        if ready:
            logits, feats, cams = self._forward_with_maps(np.stack([f.x for f in ready]), targets)
            probs = probabilities(logits, self.meta)  # calibrated here, the same for every backend
            verdicts = self.gate.check_features(feats)
            for j, (film, (score, reason)) in enumerate(zip(ready, verdicts)):
                maps = None
                if cams is not None and not reason:
                    maps = self._heatmaps(cams[j], film.gray.shape, targets, heatmap_max_side)
                results[film.index] = self._prediction(film, probs[j], score, reason, maps)
            self._stability([f for f in ready if not results[f.index].refused], probs, ready, results)
        out = [results.get(f.index) or Prediction(f.name, refused=f.refused, error=f.error, size=f.size)
               for f in batch]
        for f, pred in zip(batch, out):
            pred.capture = f.capture
        return out

    def _stability(self, films: list[pipeline.Decoded], probs: np.ndarray, ready: list[pipeline.Decoded],
                   results: dict[int, Prediction]) -> None:
        """The stability estimate of the accepted films that carry variants: one batched forward of them all."""
        from cxr.inference import stability

        films = [f for f in films if f.variants is not None]
        if not films:
            return
        logits, _ = self._forward(np.concatenate([f.variants for f in films]))
        pv = probabilities(logits, self.meta).reshape(len(films), len(stability.VARIANTS), -1)
        row = {f.index: j for j, f in enumerate(ready)}
        for k, f in enumerate(films):
            results[f.index].stability = stability.measure(probs[row[f.index]], pv[k], self._columns)

    def _heatmaps(self, cams: np.ndarray, shape: tuple[int, int], targets: list[int],
                  max_side: int | None) -> dict[str, np.ndarray]:
        h, w = shape
        scale = 1.0 if not max_side else min(1.0, max_side / max(h, w))
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        full = heat.upsample(cams, size)  # the film was squashed to a square: unsquash
        return {self.meta.outputs[t]: full[k].astype(np.float32, copy=False) for k, t in enumerate(targets)}

    def _prediction(self, film: pipeline.Decoded, probs: np.ndarray, score: float | None, reason: str | None,
                    maps: dict[str, np.ndarray] | None) -> Prediction:
        if reason:
            return Prediction(film.name, refused=reason, gate_score=score, size=film.size)
        p = {f: float(probs[c]) for f, c in zip(self.findings, self._columns)}
        t = {f: float(self.meta.thresholds[f]) for f in self.findings}
        ok = {f: self.assessed[f][0] for f in self.findings}
        why = {f: self.assessed[f][1] for f in self.findings if not ok[f]}
        return Prediction(film.name, p, t, {f: ok[f] and p[f] >= t[f] for f in self.findings}, ok, why,
                          gate_score=score, size=film.size, heatmaps=maps)


_note_lock = threading.Lock()


def _note_once(path: Path, why: str) -> None:
    """Say once per checkpoint and process that it runs on torch for want of fresh artefacts, and the fix."""
    with _note_lock:
        if str(path) in _noted:
            return
        _noted.add(str(path))
    log.warning("cxr: running %s with torch (slower to start, ~1 GB more memory): %s", path, why)
