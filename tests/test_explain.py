"""cxr.explain.gradcam: Grad-CAM's fast path against a textbook implementation, the sanity checks of Adebayo et al.
(2018), the guided methods, and the `cxr explain` command. Small EfficientNet-Lite0 inputs keep it fast."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from cxr.explain import gradcam as E
from cxr import nets as M
from cxr.findings import FINDINGS
from cxr.data.transforms import preprocess
from conftest import make_meta

SIZE = 128  # Lite0's feature map is SIZE / 32 = 4 x 4


def _meta(task="multilabel", size=SIZE, arch="efficientnet_lite0"):
    return make_meta(arch, task, size)


def _build(outputs=14, weights=None, arch="efficientnet_lite0"):
    torch.manual_seed(0)
    return M.build(arch, outputs, weights)


@pytest.fixture(scope="module")
def lite():
    return _build()


def _films(n, size=SIZE, seed=0):
    """Model inputs with structure (a few smooth blobs each), normalised: noise would explain nothing."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        img = torch.zeros(size, size)
        for _ in range(6):
            cx, cy = (torch.rand(2, generator=g) * 1.6 - 0.8).tolist()
            s, a = 0.1 + 0.3 * torch.rand(1, generator=g).item(), 2 * torch.rand(1, generator=g).item() - 1
            img += a * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
        out.append(img)
    x = torch.stack(out)[:, None].expand(-1, 3, -1, -1)
    return ((x - x.mean()) / x.std()).contiguous()


def reference_gradcam(model, x, targets, score=lambda z: z):
    """Grad-CAM as Selvaraju et al. describe it: a forward hook keeps the body's output, a full backward of
    the whole network per target, on a copy (this one does accumulate gradients into the weights)."""
    model = copy.deepcopy(model)
    kept = {}

    def hook(module, inputs, output):
        output.retain_grad()
        kept["a"] = output

    model.body.register_forward_hook(hook)
    s = score(model(x.clone()))
    cams = []
    for k in targets:
        kept["a"].grad = None
        s[:, k].sum().backward(retain_graph=True)  # films are independent in eval mode: the sum separates them
        a, g = kept["a"], kept["a"].grad
        cams.append(torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1)).detach())
    cams = torch.stack(cams, 1)
    peak = cams.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, cams / peak, torch.zeros_like(cams))


def _rank_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean Spearman correlation over maps (B x K x h x w); a constant map correlates 0 with anything
    but an identical one."""
    rs = []
    for u, v in zip(a.flatten(0, 1), b.flatten(0, 1)):
        if torch.equal(u, v):
            rs.append(1.0)
        else:
            rs.append(0.0 if u.std() == 0 or v.std() == 0 else spearmanr(u.flatten(), v.flatten())[0])
    return float(np.mean(rs))


# ------------------------------------------------------------------------------------ Grad-CAM


def test_gradcam_equals_reference_and_keeps_the_model_clean(lite):
    x = _films(2)
    logits, cams = E.gradcam(lite, x)
    ref = reference_gradcam(lite, x, range(14))
    assert cams.shape == (2, 14, SIZE // 32, SIZE // 32) and cams.dtype == torch.float32
    torch.testing.assert_close(cams, ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(logits, lite(x), atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in lite.parameters())
    assert not lite.training


def test_gradcam_densenet_equals_reference():
    model = _build(arch="densenet121")  # its body ends in a functional ReLU: the map is read after it
    x = _films(1, size=64)
    _, cams = E.gradcam(model, x, [1, 4])
    torch.testing.assert_close(cams, reference_gradcam(model, x, [1, 4]), atol=1e-5, rtol=0)


def test_two_class_model_explains_the_log_odds_of_class_1():
    model, meta = _build(outputs=2), _meta("pneumothorax")
    x = _films(2)
    _, cams = E.gradcam(model, x, meta=meta)  # default target: class 1 only
    assert cams.shape[1] == 1
    log_odds = reference_gradcam(model, x, [1], score=lambda z: z - z.flip(-1))
    torch.testing.assert_close(cams, log_odds, atol=1e-5, rtol=0)
    assert not torch.allclose(cams, reference_gradcam(model, x, [1]), atol=1e-3)  # raw z_1 is another map


def test_gradcam_inside_inference_mode_and_refuses_training_mode(lite):
    x = _films(1)
    _, expected = E.gradcam(lite, x)
    with torch.inference_mode():
        _, cams = E.gradcam(lite, x.clone())
    torch.testing.assert_close(cams, expected)
    model = copy.deepcopy(lite).train()
    with pytest.raises(E.ExplainError, match="eval mode"):
        E.gradcam(model, x)


# ------------------------------------------------------------------------- sanity checks (Adebayo)


def test_cascading_randomisation_destroys_the_map():
    """Re-initialise the network from the head down, cumulatively: every stage's maps must stop resembling
    the original (Spearman rank correlation), while the untouched copy reproduces them exactly."""
    model = _build(weights="imagenet")  # real features in the body, a fixed random head
    x = _films(4)
    _, original = E.gradcam(model, x)
    clone = copy.deepcopy(model)
    assert _rank_corr(original, E.gradcam(clone, x)[1]) == pytest.approx(1.0)
    net, blocks = clone.body.net, list(clone.body.net._blocks)
    stages = [("last linear", [clone.head[8]]), ("first linear", [clone.head[4], clone.head[6]]),
              ("head conv", [net._conv_head, net._bn1])]
    stages += [(f"blocks {i}-{i + 3}", [m for b in blocks[i:i + 4] for m in b.modules()]) for i in (12, 8, 4, 0)]
    stages += [("stem", [net._conv_stem, net._bn0])]
    torch.manual_seed(1)
    for name, modules in stages:
        for m in modules:
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        rho = _rank_corr(original, E.gradcam(clone, x)[1])
        assert rho < 0.5, f"after randomising up to the {name}, the maps still correlate {rho:.2f} with the original"


def test_map_follows_the_target(lite):
    x = _films(3)
    _, cams = E.gradcam(lite, x, [0, 1])
    assert _rank_corr(cams[:, :1], cams[:, 1:]) < 0.5
    twin = copy.deepcopy(lite)
    with torch.no_grad():  # positive control: output 1 made identical to output 0 explains identically
        twin.head[8].weight[1] = twin.head[8].weight[0]
        twin.head[8].bias[1] = twin.head[8].bias[0]
    _, same = E.gradcam(twin, x, [0, 1])
    torch.testing.assert_close(same[:, 0], same[:, 1])


# ---------------------------------------------------------------------------------- guided methods


@pytest.mark.parametrize("method", E.METHODS)
def test_maps_are_finite_nonnegative_normalised(lite, method):
    x = _films(2)
    logits, maps = E.explain(lite, x, method, [2, 7], meta=_meta())
    side = SIZE // 32 if method == "gradcam" else SIZE
    assert maps.shape == (2, 2, side, side) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and (maps >= 0).all()
    peaks = maps.amax(dim=(-2, -1))
    assert ((peaks == 1) | (peaks == 0)).all() and (peaks == 1).any()
    with torch.no_grad():
        torch.testing.assert_close(logits, lite(x), atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in lite.parameters())


def test_guided_gradcam_is_guided_backprop_times_upsampled_gradcam(lite):
    """captum's GuidedGradCam, at the layer explain gives it, uses the same Grad-CAM as the fast path."""
    x, meta = _films(2), _meta()
    _, cam = E.gradcam(lite, x, [3, 5], meta=meta)
    _, gb = E.guided_backprop(lite, x, [3, 5], meta=meta)
    _, ggc = E.guided_gradcam(lite, x, [3, 5], meta=meta)
    expected = E.normalise(gb * E.upsample(cam, (SIZE, SIZE)))
    torch.testing.assert_close(ggc, expected, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:Setting backward hooks on ReLU")
def test_guided_backprop_guides_relu6():
    """Lite0's activations are ReLU6, which captum alone leaves unguided: only positive gradients may pass."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU6(), torch.nn.Linear(4, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -1.0]]))
    x = torch.tensor([[0.5, 0.5, -0.5]], requires_grad=True)  # units 0, 1, 3 active; unit 2 clipped
    attr = E._guided_backprop(net).attribute(x, target=0)
    active = torch.tensor([1.0, 1.0, 0.0, 1.0])
    guided = net[0].weight.T @ torch.relu(net[2].weight[0] * active)
    torch.testing.assert_close(attr[0], guided)
    plain = net[0].weight.T @ (net[2].weight[0] * active)
    assert not torch.allclose(guided, plain)


# ------------------------------------------------------------------------------- films and images


def test_upsample_keeps_orientation_and_type():
    cam = np.zeros((4, 4), np.float32)
    cam[0, 3] = 1.0  # top right
    up = E.upsample(cam, (100, 200))
    assert isinstance(up, np.ndarray) and up.shape == (100, 200) and up.dtype == np.float32
    row, col = np.unravel_index(np.argmax(up), up.shape)
    assert row < 25 and col > 150 and up.max() == 1.0
    t = E.upsample(torch.zeros(2, 3, 4, 4), (8, 8))
    assert isinstance(t, torch.Tensor) and t.shape == (2, 3, 8, 8) and not t.any()


def test_colorize_and_overlay():
    rgb = E.colorize(np.array([[0.0, 1.0]]))
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 2, 3)
    assert rgb[0, 0, 2] > rgb[0, 0, 0] and rgb[0, 1, 0] > rgb[0, 1, 2]  # jet: cold blue, hot red
    gray = np.linspace(0, 1, 100 * 140, dtype=np.float32).reshape(100, 140)
    over = E.overlay(gray, np.random.default_rng(0).random((4, 4)).astype(np.float32))
    assert over.shape == (100, 140, 3) and over.dtype == np.uint8
    plain = E.overlay(gray, np.ones((4, 4), np.float32), alpha=0.0)
    np.testing.assert_allclose(plain[..., 1], np.round(gray * 255), atol=1)
    with pytest.raises(E.ExplainError, match="alpha"):
        E.overlay(gray, gray, alpha=1.5)


def test_explain_films_at_each_films_own_size(lite):
    meta = _meta()
    rng = np.random.default_rng(0)
    grays = [rng.random((100, 140), dtype=np.float32), rng.random((90, 90), dtype=np.float32)]
    maps, logits = E.explain_films_with_logits(lite, meta, grays, ["pleural thickening", "Edema"])
    assert [sorted(m) for m in maps] == [["Edema", "Pleural_Thickening"]] * 2
    for gray, m in zip(grays, maps):
        for heat in m.values():
            assert heat.shape == gray.shape and heat.dtype == np.float32 and heat.max() in (0.0, 1.0)
    x = torch.stack([preprocess(g, meta) for g in grays])
    with torch.no_grad():
        torch.testing.assert_close(logits, lite(x), atol=1e-5, rtol=1e-5)
    _, cams = E.gradcam(lite, x, [12, 9])
    np.testing.assert_allclose(maps[0]["Edema"], E.upsample(cams[0, 1], (100, 140)).numpy(), atol=1e-6)


def test_finding_selection():
    two = _meta("pneumothorax")
    assert E.target_indices(two, "all") == [1] and E.target_indices(two, ["pneumothorax"]) == [1]
    with pytest.raises(E.ExplainError, match="reads: Pneumothorax"):
        E.target_indices(two, ["Hernia"])
    with pytest.raises(E.ExplainError, match="unknown finding"):
        E.target_indices(_meta(), ["Fracture"])
    assert E.target_indices(_meta(), "all") == list(range(14))
    stems = [E.file_stem(f) for f in FINDINGS]
    assert E.file_stem("Pleural_Thickening") == "Pleural-thickening" and len(set(stems)) == 14
    assert all(s.replace("-", "").isalpha() for s in stems)


# ------------------------------------------------------------------------------------ cxr explain


def _png(path, shape, seed):
    arr = (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_cli_writes_heatmaps_overlays_and_panels(tmp_path):
    from typer.testing import CliRunner

    from cxr.cli import app

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    films = [_png(tmp_path / "a" / "film.png", (96, 128), 0), _png(tmp_path / "b" / "film.png", (80, 80), 1)]
    report = {"per_finding": {
        "Cardiomegaly": {"ap": 0.21, "threshold": 0.4, "precision": 0.3, "recall": 0.6, "n_positive": 20,
                         "n_negative": 180, "pr_curve": {"recall": [1, 0.5, 0], "precision": [0.1, 0.4, 1]}},
        "Pleural_Thickening": {"ap": 0.07, "threshold": 0.5, "precision": None, "recall": 0.0}}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["explain", *map(str, films), "--model", "random:efficientnet_lite0",
                                      "--finding", "Cardiomegaly", "--finding", "pleural thickening",
                                      "--report", str(tmp_path / "report.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    for folder, shape in (("film", (96, 128)), ("film-2", (80, 80))):
        for stem in ("Cardiomegaly", "Pleural-thickening"):
            heat = Image.open(out / folder / f"{stem}-heatmap.png")
            assert heat.mode.startswith("I;16") and heat.size == shape[::-1]
            assert np.asarray(heat).max() in (0, 65535)
            assert Image.open(out / folder / f"{stem}-overlay.png").size == shape[::-1]
            assert (out / folder / f"{stem}-panel.png").stat().st_size > 0
    summary = json.loads((out / "explain.json").read_text())
    assert [f["folder"] for f in summary["films"]] == ["film", "film-2"]
    assert set(summary["films"][0]["probabilities"]) == set(FINDINGS)
    bad = CliRunner().invoke(app, ["explain", str(films[0]), "--model", "random:efficientnet_lite0",
                                   "--method", "saliency", "--out", str(out)])
    assert bad.exit_code != 0 and "gradcam" in str(bad.exception)
