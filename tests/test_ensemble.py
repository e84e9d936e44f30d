"""Ensemble checkpoints (cxr.nets.ensemble): K networks saved as one file and read as one model. Its logits
are the mean of the members', its Grad-CAM is relu(mean of the members' pre-ReLU maps) in torch and in the
runtime graph alike, its gate reads the members' features side by side, and it never seeds training."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_ARCH, make_meta

SIZE, K = 64, 3


@pytest.fixture(scope="module")
def members():
    from cxr import nets

    out = []
    for seed in range(K):
        torch.manual_seed(seed)
        net = nets.build(TINY_ARCH, 14)
        with torch.no_grad():  # fresh BatchNorm statistics make every random member nearly the same function
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm1d):
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        out.append(net.eval())
    return out


@pytest.fixture(scope="module")
def saved(members, tmp_path_factory) -> Path:
    from cxr import nets

    meta = make_meta(TINY_ARCH, size=SIZE, members=K, calibration={"Effusion": {"a": 0.8, "b": -0.3}})
    return nets.save(tmp_path_factory.mktemp("ens") / "ens.safetensors", nets.ensemble(members), meta)


def _films(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(n, 1, 6, 6, generator=g)
    film = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    return ((film.clamp(0, 1) - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


def test_a_saved_ensemble_loads_as_one_model_whose_logits_are_the_members_mean(members, saved):
    from cxr import nets

    net, meta = nets.load(saved)
    assert isinstance(net, nets.Ensemble) and meta.members == K == net.members
    x = _films()
    with torch.no_grad():
        want = torch.stack([m(x) for m in members]).mean(dim=0)
        assert torch.equal(net(x), want)
        assert not torch.allclose(members[0](x), want, atol=1e-3)  # the members differ: the mean is no copy
        assert net.features(x).shape[1] == K * members[0].body.num_features


def _member_raw_cams(net, x: torch.Tensor) -> torch.Tensor:
    """Member k's Grad-CAM before its ReLU (B x outputs x h x w), by autograd on that member alone."""
    fmap = net.features(x).detach().requires_grad_(True)
    logits = net.classify(fmap)
    out = []
    for o in range(logits.shape[1]):
        (g,) = torch.autograd.grad(logits[:, o].sum(), fmap, retain_graph=True)
        out.append((g.mean(dim=(2, 3), keepdim=True) * fmap).sum(dim=1))
    return torch.stack(out, dim=1).detach()


def test_grad_cam_is_the_relu_of_the_members_mean_map_in_torch_and_in_the_runtime_graph(members, saved,
                                                                                         tmp_path):
    from cxr import nets
    from cxr.explain import gradcam
    from cxr.inference import artefacts, export

    x = _films()
    want = torch.relu(torch.stack([_member_raw_cams(m, x) for m in members]).mean(dim=0))
    want = gradcam.normalise(want).numpy()
    net, meta = nets.load(saved)
    _, torch_maps = gradcam.gradcam(net, x, list(range(14)), meta=meta)
    np.testing.assert_allclose(torch_maps.numpy(), want, atol=2e-5)
    copy = tmp_path / saved.name
    shutil.copyfile(saved, copy)
    export.export_artefacts(copy)  # raises when the graph's maps or features differ from torch's
    rt = artefacts.Runtime(copy)
    logits, feats, maps = rt.classify_with_cams(x.numpy(), list(range(14)))
    assert rt.num_features == K * members[0].body.num_features == feats.shape[1]
    np.testing.assert_allclose(maps, want, atol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(logits, net(x).numpy(), atol=1e-5)


def test_the_predictor_reads_an_ensemble_through_either_engine_with_its_calibration(saved, tmp_path,
                                                                                     first_film_512):
    from cxr import images, nets
    from cxr.inference import export
    from cxr.inference.predictor import TOLERANCE, Predictor

    copy = tmp_path / saved.name
    shutil.copyfile(saved, copy)
    export.export_artefacts(copy)
    by_torch = Predictor(copy, backend="torch", threads=1).predict([first_film_512])[0]
    by_runtime = Predictor(copy, threads=1).predict([first_film_512])[0]
    net, meta = nets.load(copy)
    assert by_torch.status == by_runtime.status == "ok"
    p_torch = np.array([by_torch.probabilities[o] for o in meta.outputs])
    np.testing.assert_allclose(p_torch, [by_runtime.probabilities[o] for o in meta.outputs], atol=TOLERANCE["onnx"])
    j = meta.outputs.index("Effusion")
    z = Predictor.from_model(net, meta, backend="torch").logits_of([images.read_image(first_film_512)])[0]
    assert p_torch[j] == pytest.approx(1 / (1 + np.exp(-(0.8 * z[j] - 0.3))), abs=1e-6)  # calibrated, once


def test_metadata_must_count_the_networks_and_an_ensemble_never_seeds_training(members, saved, tmp_path):
    from cxr import nets
    from cxr.errors import ModelError

    with pytest.raises(ModelError, match="holds 3 networks, its metadata says members=1"):
        nets.save(tmp_path / "wrong.safetensors", nets.ensemble(members), make_meta(TINY_ARCH, size=SIZE))
    with pytest.raises(ModelError, match="members must be a whole number"):
        make_meta(TINY_ARCH, members=0)
    with pytest.raises(ModelError, match="ensemble of 3 networks; training starts from one network"):
        nets.build(TINY_ARCH, 14, weights=saved)
    with pytest.raises(ModelError, match="single networks of one architecture"):
        nets.ensemble([members[0], nets.build("efficientnet_lite1", 14)])
    _, meta = nets.load(saved)
    assert dataclasses.replace(meta, members=1).members == 1


@pytest.fixture(scope="module")
def same_body(members):
    """K members with one body (as when the body stays frozen at its pretrained weights) and their own heads."""
    from cxr import nets

    out = []
    for m in members:
        net = nets.build(TINY_ARCH, 14)
        net.body.load_state_dict(members[0].body.state_dict())
        net.head.load_state_dict(m.head.state_dict())
        out.append(net.eval())
    return out


def test_members_with_one_body_share_it_stored_and_run_once_with_the_same_logits_and_maps(same_body, saved,
                                                                                          tmp_path):
    from cxr import nets
    from cxr.explain import gradcam
    from cxr.inference import artefacts, export

    ens = nets.ensemble(same_body)
    assert ens.shared_body and ens.members == K
    meta = make_meta(TINY_ARCH, size=SIZE, members=K, shared_body=True)
    path = nets.save(tmp_path / "shared.safetensors", ens, meta)
    assert path.stat().st_size < 0.6 * saved.stat().st_size  # one body instead of K
    net, meta = nets.load(path)
    x = _films()
    width = same_body[0].body.num_features
    with torch.no_grad():
        assert torch.allclose(net(x), torch.stack([m(x) for m in same_body]).mean(dim=0), atol=1e-6)
        assert net.features(x).shape[1] == width  # the gate's features: the one body's
    want = gradcam.normalise(torch.relu(torch.stack([_member_raw_cams(m, x) for m in same_body]).mean(dim=0)))
    _, torch_maps = gradcam.gradcam(net, x, list(range(14)), meta=meta)
    np.testing.assert_allclose(torch_maps.numpy(), want.numpy(), atol=2e-5)
    export.export_artefacts(path)  # raises when the graph's maps or features differ from torch's
    logits, feats, maps = artefacts.Runtime(path).classify_with_cams(x.numpy(), list(range(14)))
    assert feats.shape[1] == width
    np.testing.assert_allclose(maps, want.numpy(), atol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(logits, net(x).numpy(), atol=1e-5)


def test_a_shared_body_must_be_said_in_the_metadata_and_only_of_an_ensemble(members, same_body, tmp_path):
    from cxr import nets
    from cxr.errors import ModelError

    assert not nets.ensemble(members).shared_body  # bodies that differ by a bit stay K bodies
    with pytest.raises(ModelError, match="shared body: the model's True, the metadata's False"):
        nets.save(tmp_path / "x.safetensors", nets.ensemble(same_body), make_meta(TINY_ARCH, size=SIZE, members=K))
    with pytest.raises(ModelError, match="shared_body must be true or false, and true only for an ensemble"):
        make_meta(TINY_ARCH, shared_body=True)
