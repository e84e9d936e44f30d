"""The one preprocessing path: evaluation transform, the paper's augmentations (fastai v1 semantics)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cxr import images
from cxr.data import transforms
from cxr.findings import NORMALISATIONS

MEAN, STD = NORMALISATIONS["imagenet"]
PLAIN = dict(mean=(0.0,) * 3, std=(1.0,) * 3)


@pytest.fixture(scope="module")
def film(first_film_512) -> np.ndarray:
    return images.read_image(first_film_512)


def test_eval_shape_dtype_and_resize_path():
    gray = np.random.default_rng(0).random((300, 200), dtype=np.float32)
    x = transforms.eval_transform(224, MEAN, STD)(gray)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and x.is_contiguous()
    # the same pixels as images.resize, in all three channels, then per-channel normalisation
    small = torch.from_numpy(images.resize(gray, 224).copy())
    for c in range(3):
        torch.testing.assert_close(x[c], (small - MEAN[c]) / STD[c])


def test_normalisation_constants():
    x = transforms.eval_transform(64, MEAN, STD)(np.full((80, 80), 0.5, np.float32))
    for c in range(3):
        torch.testing.assert_close(x[c], torch.full((64, 64), (0.5 - MEAN[c]) / STD[c]))


def test_eval_is_deterministic_and_preprocess_reads_meta(film):
    tf = transforms.eval_transform(96, MEAN, STD)
    torch.manual_seed(1)
    a = tf(film)
    torch.manual_seed(2)
    assert torch.equal(a, tf(film))
    meta = SimpleNamespace(input_size=96, mean=list(MEAN), std=list(STD), arch="densenet121")
    assert torch.equal(a, transforms.preprocess(film, meta))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="2-D"):
        transforms.eval_transform(32, MEAN, STD)(np.zeros((40, 40, 3), np.float32))
    with pytest.raises(ValueError, match="std"):
        transforms.eval_transform(32, MEAN, (0.2, 0.0, 0.2))


def test_train_changes_pixels_and_is_reproducible_under_a_seed(film):
    def make(seed):
        return transforms.train_transform(128, MEAN, STD, generator=torch.Generator().manual_seed(seed))

    a, b, c = make(5)(film), make(5)(film), make(6)(film)
    assert a.shape == (3, 128, 128) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert (a - transforms.eval_transform(128, MEAN, STD)(film)).abs().mean() > 0.05
    # the default draws from torch's global RNG, which DataLoader workers seed from torch.manual_seed
    tf = transforms.train_transform(128, MEAN, STD)
    torch.manual_seed(7)
    first = tf(film)
    torch.manual_seed(7)
    assert torch.equal(first, tf(film))


def test_drawn_parameters_follow_the_paper():
    g = torch.Generator().manual_seed(0)
    affine, light = transforms.RandAffine(generator=g), transforms.RandLighting(generator=g)
    draws = [affine.draw() | light.draw() for _ in range(2000)]
    angles = np.array([d["angle"] for d in draws])
    assert np.abs(angles).max() <= 30 and angles.min() < -28 and angles.max() > 28
    assert np.all(angles != 0)  # rotation every time
    zoomed = [d["scale"] for d in draws if d["scale"] != 1]
    assert 0.45 < len(zoomed) / len(draws) < 0.55  # zoom half the time
    assert 1 < min(zoomed) and max(zoomed) <= 1.3 and max(zoomed) > 1.28
    change = np.array([d["brightness"] for d in draws])
    assert change.min() >= 0.3 and change.max() <= 0.7 and change.min() < 0.31 and change.max() > 0.69
    contrast = np.log([d["contrast"] for d in draws])  # log-uniform, symmetric about 1
    assert np.abs(contrast).max() <= -math.log(0.6) + 1e-9 and abs(contrast.mean()) < 0.02


def test_affine_geometry():
    x = torch.zeros(1, 8, 8)
    x[0, 0, 1] = 1.0
    same = {"angle": 0.0, "scale": 1.0, "row": 0.5, "col": 0.5}
    assert transforms.RandAffine.apply(x, same) is x
    turned = transforms.RandAffine.apply(x, same | {"angle": 90.0})
    torch.testing.assert_close(turned, torch.rot90(x, 1, (1, 2)), atol=1e-5, rtol=0)  # counter-clockwise
    ramp = torch.linspace(0, 1, 101).expand(1, 101, 101)  # value = horizontal position
    centre = transforms.RandAffine.apply(ramp, same | {"scale": 2.0})[0, 50]
    assert centre[0] == pytest.approx(0.25, abs=0.01) and centre[-1] == pytest.approx(0.75, abs=0.01)
    left = transforms.RandAffine.apply(ramp, same | {"scale": 2.0, "col": 0.0})[0, 50]
    assert left[0] == pytest.approx(0.0, abs=0.01) and left[-1] == pytest.approx(0.5, abs=0.01)


def test_lighting_is_fastai_logit_space():
    x = torch.linspace(0.05, 0.95, 50).view(1, 5, 10)
    apply = transforms.RandLighting.apply
    torch.testing.assert_close(apply(x, {"brightness": 0.5, "contrast": 1.0}), x)
    brighter = apply(x, {"brightness": 0.7, "contrast": 1.0})
    torch.testing.assert_close(brighter, torch.sigmoid(torch.logit(x) + math.log(0.7 / 0.3)))
    assert bool((brighter > x).all()) and float(brighter.max()) < 1
    sharper = apply(x, {"brightness": 0.5, "contrast": 1 / 0.6})
    assert sharper.std() > x.std() and sharper.min() > 0


def test_own_generator_is_refused_in_a_dataloader_worker(film):
    tf = transforms.train_transform(32, MEAN, STD, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader([film], num_workers=1, collate_fn=lambda b: [tf(f) for f in b])
    with pytest.raises(RuntimeError, match="generator=None"):
        next(iter(loader))


def test_augment_preview_cli(images_512, tmp_path):
    from cxr.cli import app

    out = tmp_path / "figs" / "preview.png"
    src = str(sorted(images_512.glob("*.png"))[0])
    args = ["augment-preview", src, "--out", str(out), "--n", "3", "--seed", "1", "--size", "96"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    first = out.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"
    assert CliRunner().invoke(app, args).exit_code == 0
    assert out.read_bytes() == first  # the same seed draws the same grid
    bad = CliRunner().invoke(app, [*args[:3], str(tmp_path / "p.xyz")])
    assert "use .png" in str(bad.exception)
