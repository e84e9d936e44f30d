"""`cxr import`: public DenseNet-121 models proven equal to their own projects' code, without the real weights.

Each source's network is built here from its own description (torchxrayvision's DenseNet; torchvision's
DenseNet-121 with Linear(1024, 14) + Sigmoid for CheXNet and reproduce-chexnet), seeded, its BatchNorm
statistics set on real films so that outputs are spread rather than saturated, saved in that project's own
file format, imported, and then scored on real NIH films both by the project's own preprocessing and
forward and by cxr. Every output must agree within 1e-4. Refusals must name the file and write nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cxr.findings import FINDINGS

xrv = pytest.importorskip("torchxrayvision")
TOL = 1e-4
XRV_NAME = "densenet121-res224-nih"
runner = CliRunner()


def _films(folder: Path, n: int) -> list[Path]:
    return sorted(folder.glob("*.png"))[:n]


def _settle_batchnorm(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Running statistics from real inputs (a random network's would saturate every sigmoid)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


def _cli(*args: str) -> str:
    from cxr.cli import app

    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


# ------------------------------------------------------------------------------------------ torchxrayvision


def _xrv_input(path: Path) -> torch.Tensor:
    """torchxrayvision's README procedure: 8-bit film -> [-1024, 1024] -> centre crop -> XRayResizer(224)."""
    import torchvision

    img = np.asarray(Image.open(path).convert("L"))
    img = xrv.utils.normalize(img, 255)[None]
    img = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)])(img)
    return torch.from_numpy(img)


@pytest.fixture(scope="module")
def xrv_setup(tmp_path_factory, images_512):
    films = _films(images_512, 3)
    torch.manual_seed(0)
    net = xrv.models.DenseNet(weights=None)
    x = torch.stack([_xrv_input(f) for f in films])
    _settle_batchnorm(net, x)
    cache = tmp_path_factory.mktemp("xrv-cache")
    from cxr.nets.imports.xrv import weights_path
    torch.save(net, weights_path(XRV_NAME, cache))  # as torchxrayvision stores its own files: the whole module
    with torch.no_grad():
        reference = torch.sigmoid(net(x)).numpy()
    return films, cache, reference, list(net.targets)


def test_xrv_preprocessing_matches_its_own(images_512, images_1024, images_64):
    from types import SimpleNamespace

    from cxr import images
    from cxr.inference import preprocess

    meta = SimpleNamespace(convention="torchxrayvision", tta="none", input_size=224, mean=(0, 0, 0), std=(1, 1, 1))
    for f in [*_films(images_512, 1), *_films(images_1024, 2), *_films(images_64, 2)]:  # RGBA, RGB, enlarged
        ours = preprocess.prepare(images.read_image(f), meta)
        assert ours.shape == (3, 224, 224)
        assert np.abs(ours[0] - _xrv_input(f).numpy()[0]).max() <= 1e-3  # of a range of 2048


def test_torchvision_crops_match_torchvision(images_512, images_64):
    from cxr import images
    from cxr.inference import preprocess
    from cxr.meta import ModelMeta

    meta = ModelMeta(arch="densenet121", task="multilabel", outputs=list(FINDINGS), activation="sigmoid",
                     convention="torchvision", resize=256, tta="tencrop", head="linear")
    for f in [*_films(images_512, 1), *_films(images_64, 1)]:
        ours = preprocess.prepare(images.read_image(f), meta)
        theirs = _torchvision_inputs(f, 256, True).numpy()
        assert ours.shape == theirs.shape == (10, 3, 224, 224)
        assert np.abs(ours - theirs).max() <= 1e-5


def test_xrv_import_equals_torchxrayvision(xrv_setup, tmp_path, monkeypatch):
    films, cache, reference, targets = xrv_setup
    assert reference.std() > 0.05, "outputs saturated: the comparison would prove nothing"
    out = tmp_path / "nih.safetensors"
    _cli("import", "torchxrayvision", XRV_NAME, "--cache-dir", str(cache), "--out", str(out))
    from cxr import nets
    meta = nets.load(out)[1]
    assert meta.convention == "torchxrayvision" and meta.provenance["source"] == "torchxrayvision"
    assert meta.provenance["sha256"] == __import__("hashlib").sha256(
        (cache / os.path.basename(xrv.models.model_urls[XRV_NAME]["weights_url"])).read_bytes()).hexdigest()
    assert out.with_suffix(".md").is_file()

    _cli("predict", *map(str, films), "--model", str(out), "--format", "json", "--backend", "torch",
         "--out", str(tmp_path / "p.json"))
    rows = json.loads((tmp_path / "p.json").read_text())
    ours = np.array([[r["probabilities"][f] for f in FINDINGS] for r in rows])
    theirs = np.array([[reference[i][targets.index(f)] for f in FINDINGS] for i in range(len(films))])
    diff = np.abs(ours - theirs).max()
    print(f"torchxrayvision parity: max |dp| = {diff:.2e} over {len(films)} films x 14 outputs")
    assert diff <= TOL

    # op_threshs, applied its way: torchxrayvision's loader sets them; its op_norm output vs ours.
    loaded = xrv.models.DenseNet(weights=XRV_NAME, cache_dir=str(cache))
    from cxr.nets.imports.xrv import op_norm
    with torch.no_grad():
        normed = loaded(torch.stack([_xrv_input(f) for f in films])).numpy()
    thresholds = np.array([meta.thresholds[f] for f in FINDINGS])
    cols = [targets.index(f) for f in FINDINGS]
    assert np.abs(op_norm(ours, thresholds) - normed[:, cols]).max() <= TOL
    assert np.allclose(thresholds, loaded.op_threshs.numpy()[cols])


def test_xrv_missing_outputs_are_not_assessed(xrv_setup, tmp_path):
    films, cache, _, _ = xrv_setup
    # -chex lacks 7 of the 14 findings: give the same file as its weights (the architecture is the same).
    src = cache / os.path.basename(xrv.models.model_urls[XRV_NAME]["weights_url"])
    out = tmp_path / "chex.safetensors"
    _cli("import", "torchxrayvision", "densenet121-res224-chex", "--weights-file", str(src), "--out", str(out))
    from cxr.evaluation.calibration import assessments
    from cxr.nets import load
    meta = load(out)[1]
    absent = {"Infiltration", "Emphysema", "Fibrosis", "Pleural_Thickening", "Nodule", "Mass", "Hernia"}
    assert set(meta.provenance["absent_outputs"]) == absent
    verdicts = assessments(meta)
    assert all(not verdicts[f][0] and "no output" in verdicts[f][1] for f in absent)
    assert "Lung Opacity" in meta.provenance["dropped_outputs"]


def test_xrv_never_downloads(tmp_path):
    from cxr.errors import CxrError
    from cxr.nets.imports import xrv as importer

    with pytest.raises(CxrError, match="never downloads") as e:
        importer.convert(XRV_NAME, cache_dir=tmp_path)
    assert str(tmp_path) in str(e.value)


# ----------------------------------------------------------------------------- CheXNet and reproduce-chexnet


def _chexnet_like():
    """Both projects' network, written from their descriptions: torchvision DenseNet-121 whose classifier is
    Sequential(Linear(1024, 14), Sigmoid())."""
    import torchvision

    net = torchvision.models.densenet121(weights=None)
    net.classifier = torch.nn.Sequential(torch.nn.Linear(1024, 14), torch.nn.Sigmoid())
    return net


def _torchvision_inputs(path: Path, resize: int, tencrop: bool) -> torch.Tensor:
    """Their test transforms on Image.open(path).convert('RGB')."""
    from torchvision import transforms as T

    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    im = Image.open(path).convert("RGB")
    if tencrop:
        crops = T.Compose([T.Resize(resize), T.TenCrop(224)])(im)
        return torch.stack([norm(T.ToTensor()(c)) for c in crops])
    return T.Compose([T.Resize(resize), T.CenterCrop(224), T.ToTensor(), norm])(im)[None]


@pytest.fixture(scope="module")
def chexnet_reference(images_512):
    films = _films(images_512, 2)
    torch.manual_seed(1)
    net = _chexnet_like()
    _settle_batchnorm(net, torch.cat([_torchvision_inputs(f, 224, False) for f in films]))
    return net, films


def test_chexnet_tencrop_equals_its_procedure(chexnet_reference, tmp_path):
    net, films = chexnet_reference
    film = films[0]
    # arnoweng's format: DataParallel prefixes and torchvision's old 'norm.1' key names, in a dict.
    old = {}
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue  # a PyTorch 0.3 file has no such counters
        k = k.replace("norm1", "norm.1").replace("norm2", "norm.2").replace("conv1", "conv.1").replace("conv2", "conv.2")
        old["module.densenet121." + k] = v
    src = tmp_path / "model.pth.tar"
    torch.save({"epoch": 1, "state_dict": old, "optimizer": {}}, src)
    out = tmp_path / "chexnet.safetensors"
    _cli("import", "chexnet", str(src), "--out", str(out), "--tta", "tencrop")

    with torch.no_grad():  # their test loop: the mean over crops of the sigmoid outputs
        theirs = net(_torchvision_inputs(film, 256, True)).mean(0).numpy()
    from cxr.inference.predictor import Predictor
    ours = Predictor(out, backend="torch").predict([film])[0]
    diff = max(abs(ours.probabilities[f] - theirs[i]) for i, f in enumerate(FINDINGS))
    print(f"CheXNet ten-crop parity: max |dp| = {diff:.2e} (1 film, 10 crops, 14 outputs)")
    assert theirs.std() > 0.02
    assert diff <= TOL


def test_jrzech_pickle_needs_trust_and_then_equals(chexnet_reference, tmp_path):
    net, films = chexnet_reference
    src = tmp_path / "checkpoint"
    torch.save({"model": net, "best_loss": 0.1, "epoch": 3, "LR": 0.01}, src)  # the whole model, pickled
    out = tmp_path / "jrzech.safetensors"
    from cxr.cli import app
    refused = runner.invoke(app, ["import", "jrzech", str(src), "--out", str(out)])
    assert refused.exit_code != 0 and "--trust-pickle" in str(refused.exception or refused.output)
    assert not out.exists()

    _cli("import", "jrzech", str(src), "--out", str(out), "--trust-pickle")
    with torch.no_grad():
        theirs = net(torch.cat([_torchvision_inputs(f, 224, False) for f in films])).numpy()
    from cxr.inference.predictor import Predictor
    ours = np.array([[p.probabilities[f] for f in FINDINGS] for p in Predictor(out, backend="torch").predict(films)])
    diff = np.abs(ours - theirs).max()
    print(f"reproduce-chexnet parity: max |dp| = {diff:.2e} over {len(films)} films x 14 outputs")
    assert theirs.std() > 0.02, "outputs saturated: the comparison would prove nothing"
    assert diff <= TOL
    raw = out.read_bytes()
    assert b"torchvision.models" not in raw  # no pickle left in the output


# ------------------------------------------------------------------------------------------------- refusals


def _refused(tmp_path: Path, *args: str, match: str) -> None:
    from cxr.cli import app

    out = tmp_path / "refused.safetensors"
    result = runner.invoke(app, [*args, "--out", str(out)])
    message = str(result.exception) if result.exception else result.output
    assert result.exit_code != 0 and match in message, message
    assert not out.exists() and not list(tmp_path.glob(".refused*"))


def test_refusals_name_the_file_and_write_nothing(tmp_path):
    import torchvision

    sd = torchvision.models.densenet121(weights=None).state_dict()
    good = {"state_dict": {f"module.densenet121.{k}": v for k, v in sd.items()}}
    good["state_dict"]["module.densenet121.classifier.weight"] = torch.zeros(14, 1024)
    good["state_dict"]["module.densenet121.classifier.bias"] = torch.zeros(14)
    full = tmp_path / "model.pth.tar"
    torch.save(good, full)

    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _refused(tmp_path, "import", "chexnet", str(truncated), match=str(truncated))

    resnet = tmp_path / "resnet.pth.tar"
    rs = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({"state_dict": {**rs, "classifier.0.weight": torch.zeros(14, 512), "classifier.0.bias": torch.zeros(14)}},
               resnet)
    _refused(tmp_path, "import", "chexnet", str(resnet), match=str(resnet))

    _refused(tmp_path, "import", "chexnet", str(full), "--outputs", ",".join(["Tumour"] * 14), match="unknown output")

    pickled = tmp_path / "checkpoint"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)
    _refused(tmp_path, "import", "jrzech", str(pickled), match="--trust-pickle")


# --------------------------------------------------------------------------------- names, and ImageNet weights


def test_model_names_resolve_through_the_models_folder(tmp_path, monkeypatch):
    from conftest import save_random_model

    from cxr import nets

    monkeypatch.setenv("CXR_MODELS", str(tmp_path))
    path = save_random_model(tmp_path / "mine.safetensors", provenance={"source": "test"})
    assert nets.resolve_model("mine") == path
    assert nets.resolve_model(None) == nets.resolve_model("bundled")
    with pytest.raises(Exception, match="cxr models"):
        nets.resolve_model("nobody")
    listed = _cli("models", "--json")
    names = [json.loads(line)["name"] for line in listed.splitlines()]
    assert names[0] == "bundled" and "mine" in names


def test_imagenet_body_from_a_torchvision_format_file(tmp_path, monkeypatch):
    """`cxr train --weights imagenet` reads torchvision's densenet121-a639ec97.pth placed locally."""
    import re

    import torchvision

    from cxr import nets

    torch.manual_seed(2)
    sd = torchvision.models.densenet121(weights=None).state_dict()
    old = {re.sub(r"(norm|conv|relu)([12])\.", r"\1.\2.", k): v for k, v in sd.items()
           if not k.endswith("num_batches_tracked")}  # the 2017 file's names, no counters
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(old, path)
    monkeypatch.setenv("CXR_IMAGENET_WEIGHTS", str(path))
    model = nets.build("densenet121", 14, weights="imagenet")
    got = model.body.features.state_dict()
    assert all(torch.equal(got[k[len("features."):]], v) for k, v in sd.items()
               if k.startswith("features.") and not k.endswith("num_batches_tracked"))
