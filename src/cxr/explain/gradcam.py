"""Heatmaps of what the model looked at: Grad-CAM, guided backprop and guided Grad-CAM (paper Figs 8, 13-20).

Every method explains the *logit of the probability the user is shown* for each target output: for the
sigmoid (14-finding) models that is the output's logit itself; for the 2-class softmax (pneumothorax) model
it is log(p_c / (1 - p_c)) = z_c - z_other. The raw class logit z_1 alone would be arbitrary there, because
a softmax ignores anything added to both logits.

Maps are float32, finite, non-negative, each normalised to max 1 (all zero when nothing supports the
output). Grad-CAM maps are at feature-map resolution (input/32); the guided maps at input resolution;
`upsample` takes either to the film's own size. The model is never changed and never accumulates
gradients: gradients are taken with torch.autograd.grad with respect to activations or inputs only.

Grad-CAM runs the body once without a graph and differentiates only the small head, for all targets in one
batched backward, so the heatmaps of all 14 findings cost little more than the forward pass that gives the
probabilities (`gradcam` returns those logits too). The guided methods need a full backward per target.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxr.data import transforms
from cxr.explain.maps import (  # noqa: F401 - re-exported: the torch-free half of explaining
    ExplainError,
    _softmax,
    colorize,
    default_targets,
    file_stem,
    overlay,
    target_indices,
)
from cxr.inference import preprocess as convention

METHODS = ("gradcam", "guided-backprop", "guided-gradcam")
GUIDED_CHUNK = 8  # (film, target) pairs per full backward of a guided method: bounds the memory used


def _scores(logits: torch.Tensor, softmax: bool) -> torch.Tensor:
    """Per output, the logit of the probability shown: z_c for sigmoids, z_c - logsumexp(others) for softmax."""
    if not softmax:
        return logits
    eye = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    others = logits.unsqueeze(-2).masked_fill(eye, float("-inf"))  # row c: every logit but z_c
    return logits - torch.logsumexp(others, dim=-1)


def _check_targets(targets: Sequence[int] | None, meta, num_outputs: int) -> list[int]:
    targets = default_targets(meta, num_outputs) if targets is None else [int(t) for t in targets]
    bad = [t for t in targets if not 0 <= t < num_outputs]
    if not targets or bad:
        raise ExplainError(f"targets must be output indices in 0..{num_outputs - 1}, got {targets}")
    return targets


@contextlib.contextmanager
def _grad_enabled(model: nn.Module) -> Iterator[None]:
    """Gradients on even inside a caller's inference_mode/no_grad; refuse a model in training mode,
    where BatchNorm and dropout would make a heatmap depend on the batch and on chance."""
    if model.training:
        raise ExplainError("explaining needs the model in eval mode: call model.eval() first")
    with torch.inference_mode(False), torch.enable_grad():
        yield


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map (last two dims) divided by its max: float32 in [0, 1]; all-zero maps stay zero."""
    maps = maps.float()
    if not torch.isfinite(maps).all():
        raise ExplainError("the heatmap holds NaN or infinite values: the model's outputs overflow on this film")
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(maps))


# ------------------------------------------------------------------------------------------ Grad-CAM


def gradcam(model: nn.Module, x: torch.Tensor, targets: Sequence[int] | None = None, *, meta=None,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits B x outputs, cams float32 B x K x h x w) for a batch of model inputs, from one forward pass.

    targets: output indices (default: see default_targets). meta: the model's ModelMeta, needed for the
    softmax task (without it the raw logits are explained). The logits are those of model(x).
    """
    targets = _check_targets(targets, meta, model.num_outputs)
    with _grad_enabled(model):
        with torch.no_grad():  # the body is only read, never differentiated: no graph, no saved activations
            fmap = model.features(x.clone())  # clone: an inference-mode tensor cannot enter autograd
        fmap.requires_grad_()
        logits = model.classify(fmap)
        scores = _scores(logits, _softmax(meta))[:, targets]  # B x K
        k, b = len(targets), scores.shape[0]
        # One backward through the head for all K targets: row k of the batched grad_outputs selects target k.
        onehot = torch.eye(k, dtype=scores.dtype, device=scores.device).unsqueeze(1).expand(k, b, k)
        (grads,) = torch.autograd.grad(scores, fmap, grad_outputs=onehot, is_grads_batched=True)
        weights = grads.mean(dim=(-2, -1))  # K x B x C: Grad-CAM's alpha, the spatially pooled gradient
        cams = torch.relu(torch.einsum("kbc,bchw->bkhw", weights, fmap.detach()))
    return logits.detach(), normalise(cams)


# ------------------------------------------------------------------------------------ guided methods


class _Explained(nn.Module):
    """The model as captum sees it: outputs the explained scores (see _scores), and passes the feature map
    through an explicit nn.ReLU. That ReLU changes no value (the map is already >= 0: DenseNet's final ReLU,
    Lite0's ReLU6) but it is the module captum needs: guided backprop hooks it, which guides DenseNet's final
    ReLU (a function call in DenseNetBody, invisible to module hooks), and it is guided Grad-CAM's layer."""

    def __init__(self, model: nn.Module, softmax: bool):
        super().__init__()
        self.model, self.softmax, self.fmap = model, softmax, nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _scores(self.model.classify(self.fmap(self.model.features(x))), self.softmax)


def _guided_backprop(wrapper: nn.Module):
    """captum's GuidedBackprop, also guiding nn.ReLU6: captum hooks only nn.ReLU, and EfficientNet-Lite0's
    activations are all ReLU6, which would leave its guided backprop a plain gradient. ReLU6's gradient is
    gated like ReLU's, so the guided rule (pass only positive gradients) applies to it unchanged."""
    from captum._utils.common import _register_backward_hook
    from captum.attr import GuidedBackprop

    class GuidedBackprop6(GuidedBackprop):
        def _register_hooks(self, module: nn.Module) -> None:
            if isinstance(module, (nn.ReLU, nn.ReLU6)):
                self.backward_hooks.extend(_register_backward_hook(module, self._backward_hook, self))

    return GuidedBackprop6(wrapper)


def _attributor(model: nn.Module, method: str, softmax: bool):
    """A function (inputs N x 3 x S x S, targets list of N) -> attributions N x 3 x S x S, by captum."""
    from captum.attr import GuidedGradCam

    wrapper = _Explained(model, softmax)
    if method == "guided-backprop":
        gb = _guided_backprop(wrapper)
        return lambda xs, ts: gb.attribute(xs, target=ts)
    ggc = GuidedGradCam(wrapper, wrapper.fmap)
    ggc.guided_backprop = _guided_backprop(wrapper)  # the ReLU6-aware one (see _guided_backprop)
    return lambda xs, ts: ggc.attribute(xs, target=ts, interpolate_mode="bilinear")


def _guided(model: nn.Module, x: torch.Tensor, method: str, targets: Sequence[int] | None, meta,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    targets = _check_targets(targets, meta, model.num_outputs)
    attribute = _attributor(model, method, _softmax(meta))
    # The input is gray copied into 3 channels and normalised per channel, so the gradient with respect to
    # the gray film is sum_c grad_c / std_c. The heatmap shows its magnitude: brightening or darkening a
    # pixel can both be evidence, and a sign has no colour in a heat scale.
    std = torch.tensor(meta.std if meta is not None else (1.0, 1.0, 1.0), device=x.device).view(1, 3, 1, 1)
    b, k = x.shape[0], len(targets)
    pairs = [(i, t) for i in range(b) for t in targets]  # film-major: pair j is film j // k, target j % k
    out = []
    with _grad_enabled(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")  # captum, every call
        with torch.no_grad():
            logits = model(x)
        for start in range(0, len(pairs), GUIDED_CHUNK):
            chunk = pairs[start:start + GUIDED_CHUNK]
            xs = x[[i for i, _ in chunk]].clone().requires_grad_()  # a fresh leaf per chunk
            attr = attribute(xs, [t for _, t in chunk]).detach()
            out.append((attr / std).sum(dim=1).abs())
    maps = torch.cat(out).view(b, k, *x.shape[-2:])
    return logits.detach(), normalise(maps)


def guided_backprop(model: nn.Module, x: torch.Tensor, targets: Sequence[int] | None = None, *, meta=None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, maps B x K x S x S at input resolution): |guided backprop| with respect to the gray film."""
    return _guided(model, x, "guided-backprop", targets, meta)


def guided_gradcam(model: nn.Module, x: torch.Tensor, targets: Sequence[int] | None = None, *, meta=None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, maps B x K x S x S): |guided backprop x Grad-CAM upsampled bilinearly| (Selvaraju et al.)."""
    return _guided(model, x, "guided-gradcam", targets, meta)


def explain(model: nn.Module, x: torch.Tensor, method: str = "gradcam", targets: Sequence[int] | None = None,
            *, meta=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on method (one of METHODS): (logits, normalised maps B x K x h x w)."""
    if method == "gradcam":
        return gradcam(model, x, targets, meta=meta)
    if method in ("guided-backprop", "guided-gradcam"):
        return _guided(model, x, method, targets, meta)
    raise ExplainError(f"unknown method {method!r}; expected one of: {', '.join(METHODS)}")


# ---------------------------------------------------------------------------------- films and images


def upsample(maps: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor | np.ndarray:
    """Maps (..., h, w) to (..., H, W), bilinear, then renormalised to max 1 (interpolation can lower the
    peak between samples). Returns the type it was given (numpy float32 for arrays)."""
    is_numpy = isinstance(maps, np.ndarray)
    t = torch.as_tensor(np.asarray(maps, dtype=np.float32)) if is_numpy else maps.float()
    lead = t.shape[:-2]
    flat = t.reshape(-1, 1, *t.shape[-2:])
    up = F.interpolate(flat, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    up = normalise(up.clamp_min(0)).reshape(*lead, *up.shape[-2:])
    return up.numpy() if is_numpy else up


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def explain_films(model: nn.Module, meta, grays: Sequence[np.ndarray], findings: str | Sequence[str] = "all",
                  method: str = "gradcam", *, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """Per film, {finding: heatmap float32 at the film's own H x W}, from the model's own preprocessing
    (transforms.preprocess). findings: "all" (see default_targets) or names. See explain_films_with_logits
    for the logits of the same pass."""
    return explain_films_with_logits(model, meta, grays, findings, method, batch_size=batch_size)[0]


def explain_films_with_logits(model: nn.Module, meta, grays: Sequence[np.ndarray],
                              findings: str | Sequence[str] = "all", method: str = "gradcam", *,
                              batch_size: int = 8) -> tuple[list[dict[str, np.ndarray]], torch.Tensor]:
    """explain_films, plus the logits (N x outputs) of the same forward pass: model.probabilities(logits, meta)."""
    if method not in METHODS:
        raise ExplainError(f"unknown method {method!r}; expected one of: {', '.join(METHODS)}")
    targets = target_indices(meta, findings)
    names = [meta.outputs[t] for t in targets]
    results, all_logits = [], []
    for start in range(0, len(grays), batch_size):
        batch = [np.asarray(g, dtype=np.float32) for g in grays[start:start + batch_size]]
        x = torch.stack([torch.from_numpy(convention.single(g, meta)) if convention.custom(meta)  # imported
                         else transforms.preprocess(g, meta) for g in batch]).to(_device(model))
        logits, maps = explain(model, x, method, targets, meta=meta)
        all_logits.append(logits.cpu())
        for gray, film_maps in zip(batch, maps.cpu()):
            full = upsample(film_maps, gray.shape)  # squashed to a square for the model: unsquash to the film
            results.append({name: full[j].numpy() for j, name in enumerate(names)})
    out_logits = torch.cat(all_logits) if all_logits else torch.empty(0, len(meta.outputs))
    return results, out_logits
