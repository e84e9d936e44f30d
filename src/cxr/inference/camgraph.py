"""The runtime graph: one forward pass from a film to its logits, the gate's features and Grad-CAM for every output.

Grad-CAM needs the gradient of each explained score with respect to the body's last feature map F
(B x C x h x w). The paper's head is small and every layer of it has a closed-form derivative, so the
gradient is written out here as ordinary forward operations, and the whole graph exports to ONNX and runs
without autograd (ONNX Runtime, onnxruntime-web):

    p = [max_hw F, mean_hw F]          AdaptiveConcatPool2d (max first)
    a = s1 * p + t1                    BatchNorm1d in eval mode (s = gamma / sqrt(var + eps)); Dropout = identity
    z1 = W1 a + c1, r = relu(z1)       Linear, ReLU
    logits = W2 (s2 * r + t2) + c2     BatchNorm1d, Dropout, Linear

    d score_o / d r  = (J W2)_o * s2   J = d scores / d logits (identity for sigmoid outputs; see below)
    d score_o / d a  = W1^T (d score_o / d r * [z1 > 0])      (torch's ReLU has gradient 0 at 0)
    d score_o / d p  = s1 * d score_o / d a

Grad-CAM's weight of channel c is the gradient averaged over the h x w positions. The mean's gradient is
1/hw everywhere; the max's is 1 at the maximum (spread evenly over ties by torch.amax), so it too sums to 1
over the map. Hence alpha_oc = (g_max_oc + g_avg_oc) / hw exactly, ties or not, with no argmax in the graph.
The map is relu(sum_c alpha_oc F_c), as cxr.explain.gradcam.gradcam computes it; the graph returns it before
the per-map normalisation to max 1 (done in numpy by cxr.inference.artefacts, and by the page in JS).

The linear head of imported models (cxr.nets.head.linear_head: average pool, Linear) is the special case
alpha_o = (J W)_o / hw.

Scores are what cxr.explain.gradcam explains: the logit itself for sigmoid outputs; for softmax tasks
z_o - logsumexp(z_j, j != o), whose Jacobian row is e_o - softmax(z over j != o).
"""

from __future__ import annotations

import torch
from torch import nn

from cxr.errors import ModelError

INPUT = "image"
OUTPUTS = ("logits", "features", "cams")
PROBABILITIES = "probabilities"  # a fourth output, only for models whose metadata carries calibration


def _bn_affine(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm1d as y = s * x + t."""
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return s, bn.bias - bn.running_mean * s


def _head_layers(head: nn.Sequential) -> tuple[nn.Module, ...]:
    """(Linear,) for the linear head; (BN, Linear, BN, Linear) for the paper's; else a ModelError naming what
    differs (the closed form is written for these two)."""
    from cxr.nets.head import AdaptiveConcatPool2d

    got = [type(m) for m in head]
    for kinds, picks in (((nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear), (2,)),
                         ((AdaptiveConcatPool2d, nn.Flatten, nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU,
                           nn.BatchNorm1d, nn.Dropout, nn.Linear), (2, 4, 6, 8))):
        if len(got) == len(kinds) and all(issubclass(g, k) for g, k in zip(got, kinds)):
            return tuple(head[i] for i in picks)
    raise ModelError("the runtime graph writes Grad-CAM for the paper's head (concat-pool, flatten, [BN, dropout, "
                     "linear, ReLU] x 2) and the linear one (average pool, flatten, linear); this model's head is "
                     f"{[g.__name__ for g in got]}")


class _HeadGradient(nn.Module):
    """One head's constants for the closed form above, folded from the head as it is now (eval mode)."""

    def __init__(self, head: nn.Sequential):
        super().__init__()
        layers = _head_layers(head)
        self.paper = len(layers) == 4
        with torch.no_grad():
            if self.paper:
                bn1, lin1, bn2, lin2 = layers
                s1, _ = _bn_affine(bn1)
                s2, _ = _bn_affine(bn2)
                c = lin1.in_features // 2
                w1 = lin1.weight * s1  # hidden x 2C: d z1 / d p
                # The max and the mean halves reach alpha through the same 1/hw average (see the module doc).
                self.register_buffer("w_alpha", (w1[:, :c] + w1[:, c:]).detach().clone())  # hidden x C
                self.register_buffer("w_out", (lin2.weight * s2).detach().clone())  # outputs x hidden: d logits / d r
                self._z1 = nn.Sequential(bn1, lin1)  # the same layers as the head's, for the ReLU's gate
            else:
                self.register_buffer("w_out", layers[0].weight.detach().clone())  # outputs x C

    def alpha(self, fmap: torch.Tensor, jac: torch.Tensor | None) -> torch.Tensor:
        """(B|1) x O x C: the spatial mean of d score_o / d fmap, for the feature map this head reads."""
        d_first = self.w_out.unsqueeze(0) if jac is None else torch.matmul(jac, self.w_out)  # (B|1) x O x ...
        if self.paper:
            pooled = torch.cat([torch.amax(fmap, dim=(2, 3)), torch.mean(fmap, dim=(2, 3))], dim=1)
            d_z1 = d_first * (self._z1(pooled) > 0).to(fmap.dtype).unsqueeze(1)  # B x O x hidden
            d_first = torch.matmul(d_z1, self.w_alpha)
        return d_first / float(fmap.shape[2] * fmap.shape[3])


class CamGraph(nn.Module):
    """image -> (logits, pooled features, raw Grad-CAM maps for every output[, calibrated probabilities]).

    The head's constants are folded from the model as it is now (eval mode); the model is not changed.
    An ensemble (cxr.nets.ensemble) has one head per member, each reading its own channels of the stacked
    feature map and weighing 1/K in the mean logit: its alphas are each member's, over K, side by side (or,
    over one shared body's map, their sum over K).
    platt: (slopes, intercepts) per output (ModelMeta.platt) to add the calibrated sigmoid probabilities as
    an output for the page; None adds nothing (probabilities are then computed in numpy from the logits).
    """

    def __init__(self, model: nn.Module, *, softmax: bool, platt=None):
        super().__init__()
        from cxr.nets.ensemble import AveragedHeads

        if model.training:
            raise ModelError("the runtime graph is exported from a model in eval mode: call model.eval() first")
        self.model, self.softmax = model, softmax
        heads = list(model.head.heads) if isinstance(model.head, AveragedHeads) else [model.head]
        self.heads = nn.ModuleList(_HeadGradient(h) for h in heads)
        self.calibrated = platt is not None
        if self.calibrated:
            self.register_buffer("platt_a", torch.tensor(platt[0], dtype=torch.float32))
            self.register_buffer("platt_b", torch.tensor(platt[1], dtype=torch.float32))

    def _jacobian(self, logits: torch.Tensor) -> torch.Tensor | None:
        """B x O x O: d score_o / d logit_j for softmax tasks; None for sigmoid outputs (the identity)."""
        if not self.softmax:
            return None
        n = logits.shape[-1]
        eye = torch.eye(n, dtype=logits.dtype, device=logits.device)
        others = logits.unsqueeze(1) - eye.unsqueeze(0) * 1e30  # row o: every logit but z_o (exp underflows to 0)
        return eye.unsqueeze(0) - torch.softmax(others, dim=-1)

    def _alpha(self, fmap: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Grad-CAM's channel weights, (B|1) x O x C: the spatial mean of d score_o / d fmap."""
        jac = self._jacobian(logits)  # of the (mean) logits: the score is a function of them
        if len(self.heads) == 1:
            return self.heads[0].alpha(fmap, jac)
        alphas = [h.alpha(part, jac) for h, part in zip(self.heads, self.model.head.parts(fmap), strict=True)]
        # a shared body's channels are every head's: their weights add; stacked bodies' sit side by side
        joined = torch.stack(alphas).sum(dim=0) if self.model.head.shared else torch.cat(alphas, dim=-1)
        return joined / len(self.heads)

    def forward(self, x: torch.Tensor):
        fmap = self.model.features(x)
        logits = self.model.classify(fmap)
        b, c, h, w = fmap.shape
        alpha = self._alpha(fmap, logits).expand(b, -1, -1)
        cams = torch.relu(torch.matmul(alpha, fmap.reshape(b, c, h * w))).reshape(b, -1, h, w)
        out = (logits, fmap.mean(dim=(2, 3)), cams)
        if self.calibrated:
            out = (*out, torch.sigmoid(logits * self.platt_a + self.platt_b))
        return out


def output_names(calibrated: bool) -> list[str]:
    return [*OUTPUTS, PROBABILITIES] if calibrated else list(OUTPUTS)


def to_onnx(model: nn.Module, meta, opset: int) -> bytes:
    """The runtime graph of a loaded model as serialized ONNX (fp32, dynamic batch, input size fixed by meta)."""
    import io
    import warnings

    platt = getattr(meta, "platt", None) if meta.activation == "sigmoid" else None
    graph = CamGraph(model.eval(), softmax=meta.activation == "softmax", platt=platt).eval()
    names = output_names(platt is not None)
    example = torch.zeros(1, 3, meta.input_size, meta.input_size)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, on every call
        torch.onnx.export(graph, (example,), buf, input_names=[INPUT], output_names=names,
                          dynamic_axes={n: {0: "batch"} for n in [INPUT, *names]}, opset_version=opset,
                          dynamo=False)
    return buf.getvalue()
