"""Runtime artefacts: `cxr export` writes them beside the checkpoint, checked against torch; the torch-free
runtime (cxr.inference.artefacts) loads them with torch blocked and gives torch's probabilities (1e-4) and
Grad-CAM maps (1e-3, correlation >= 0.999) on real films; stale or damaged artefacts are refused."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cxr import images
from cxr import nets as M
from cxr.cli import app
from cxr.explain import gradcam
from cxr.inference import artefacts, export
from cxr.inference.pipeline import preprocess
from cxr.tasks import probabilities
from conftest import save_random_model

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128

# Run in a fresh interpreter: torch, torchvision and lightning cannot be imported there.
BLOCKED = textwrap.dedent("""
    import json, sys
    import importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "lightning", "pytorch_lightning"):
                raise ImportError(f"{name} is blocked: the runtime must not import it")
    sys.meta_path.insert(0, Block())
    import numpy as np
    from cxr import images
    from cxr.inference import artefacts
    ckpt, out, films = sys.argv[1], sys.argv[2], sys.argv[3:]
    rt = artefacts.Runtime(ckpt, threads=1)
    mean, std = (np.asarray(v, np.float32).reshape(3, 1, 1) for v in (rt.meta.mean, rt.meta.std))
    x = np.stack([(images.resize(images.read_film(f).gray, rt.meta.input_size)[None] - mean) / std for f in films])
    targets = list(range(len(rt.meta.outputs)))
    logits, feats, cams = rt.classify_with_cams(x.astype(np.float32), targets)
    np.savez(out, x=x, logits=logits, feats=feats, cams=cams)
    print(json.dumps({"torch": "torch" in sys.modules, "gate": sorted(rt.extra)}))
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    ckpt = save_random_model(tmp_path_factory.mktemp("artefacts") / "tiny.safetensors", size=SIZE)
    export.export_artefacts(ckpt)
    return ckpt


def _reference(ckpt: Path, x: np.ndarray, targets=None):
    net, meta = M.load(ckpt)
    logits, cams = gradcam.gradcam(net, torch.from_numpy(x), targets or list(range(len(meta.outputs))), meta=meta)
    return meta, logits.numpy(), cams.numpy()


def _assert_parity(meta, logits, cams, want_logits, want_cams) -> None:
    np.testing.assert_allclose(probabilities(logits, meta), probabilities(want_logits, meta), atol=1e-4, rtol=0)
    np.testing.assert_allclose(cams, want_cams, atol=1e-3, rtol=0)
    assert export._min_correlation(cams, want_cams) >= 0.999


def test_runtime_runs_without_torch_and_matches_it_on_real_films(exported, images_512, tmp_path):
    films = [str(f) for f in sorted(images_512.glob("*.png"))[:2]]
    out = tmp_path / "out.npz"
    run = subprocess.run([sys.executable, "-c", BLOCKED, str(exported), str(out), *films], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1]) == {"torch": False, "gate": []}
    got = np.load(out)
    # The same films through the package's own preprocessing: the runtime was given the same input.
    x = np.stack([preprocess(images.read_film(f).gray, M.load(exported)[1]) for f in films])
    np.testing.assert_allclose(got["x"], x, atol=1e-6)
    meta, want_logits, want_cams = _reference(exported, x)
    assert got["cams"].shape == want_cams.shape == (2, 14, SIZE // 32, SIZE // 32)
    _assert_parity(meta, got["logits"], got["cams"], want_logits, want_cams)
    with torch.no_grad():
        feats = M.load(exported)[0].features(torch.from_numpy(x)).mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(got["feats"], feats, atol=1e-4)


def test_the_bundled_models_gate_statistics_load_without_torch(tmp_path):
    from cxr import settings as config

    meta, extra = artefacts.read_checkpoint_header(config.BUNDLED_MODEL)
    torch_extra = M.load_extra(config.BUNDLED_MODEL)
    assert meta.to_json() == M.load(config.BUNDLED_MODEL)[1].to_json() and set(extra) == set(torch_extra)
    for k, v in extra.items():
        assert isinstance(v, np.ndarray)
        np.testing.assert_array_equal(v, torch_extra[k].numpy())


def test_softmax_and_calibrated_models_match_torch(tmp_path, first_film_512):
    film = images.read_film(first_film_512).gray
    pneumo = export.export_artefacts(save_random_model(tmp_path / "pneumo.safetensors", task="pneumothorax",
                                                       size=SIZE, seed=1))
    rt = artefacts.Runtime(pneumo.checkpoint)
    x = preprocess(film, rt.meta)[None]
    logits, _, cams = rt.classify_with_cams(x, [0, 1])
    _assert_parity(rt.meta, logits, cams, *_reference(pneumo.checkpoint, x, [0, 1])[1:])

    platt = {"Mass": {"a": 0.7, "b": -1.2}, "Nodule": {"a": 1.3, "b": 0.4}}
    calibrated = export.export_artefacts(save_random_model(tmp_path / "cal.safetensors", size=SIZE, calibration=platt))
    rt = artefacts.Runtime(calibrated.checkpoint)
    assert rt.calibrated and not artefacts.Runtime(pneumo.checkpoint).calibrated
    got = rt.session.run(None, {artefacts.INPUT: x})
    np.testing.assert_allclose(got[3], probabilities(got[0], rt.meta), atol=1e-6)  # the page's = numpy's
    i = rt.meta.outputs.index("Mass")
    assert got[3][0, i] == pytest.approx(1 / (1 + np.exp(-(0.7 * got[0][0, i] - 1.2))), abs=1e-6)


def test_stale_and_damaged_artefacts_are_refused(exported, tmp_path):
    ckpt = tmp_path / "copy.safetensors"
    ckpt.write_bytes(exported.read_bytes())
    assert "cxr export --model" in artefacts.stale_reason(ckpt) and not artefacts.has_fresh_artefacts(ckpt)
    where = export.export_artefacts(ckpt)
    assert artefacts.has_fresh_artefacts(ckpt)
    manifest = json.loads(where.manifest.read_text())
    assert manifest["checkpoint"]["sha256"] == artefacts.sha256(ckpt) and manifest["versions"]["torch"] == torch.__version__
    assert manifest["parity"]["max_abs_probability"] <= 1e-4 and manifest["parity"]["min_cam_correlation"] >= 0.999

    net, meta = M.load(ckpt)
    M.save(ckpt, net, dataclasses.replace(meta, thresholds={"Mass": 0.3}))  # a new threshold: a changed file
    assert "changed after" in artefacts.stale_reason(ckpt)
    with pytest.raises(artefacts.ArtefactError, match="changed after its ONNX artefacts"):
        artefacts.Runtime(ckpt)
    export.export_artefacts(ckpt)
    where.graph.write_bytes(b"damaged")
    assert "does not match" in artefacts.stale_reason(ckpt)
    with pytest.raises(artefacts.ArtefactError, match="ONNX Runtime cannot load it"):
        artefacts.Runtime(ckpt, check=False)
    where.manifest.write_text("{")
    assert "not a readable manifest" in artefacts.stale_reason(ckpt)


def test_export_refuses_a_graph_that_does_not_match_torch(exported, tmp_path, monkeypatch):
    ckpt = tmp_path / "strict.safetensors"
    ckpt.write_bytes(exported.read_bytes())
    monkeypatch.setattr(export, "CAM_MIN_CORRELATION", 1.5)  # no graph can pass: the check must refuse
    with pytest.raises(export.ExportError, match="does not match torch.*min_cam_correlation"):
        export.export_artefacts(ckpt)
    assert not artefacts.paths(ckpt).graph.exists() and not artefacts.paths(ckpt).manifest.exists()


def test_cli_export_writes_the_artefacts_beside_the_checkpoint(exported, tmp_path):
    ckpt = tmp_path / "cli.safetensors"
    ckpt.write_bytes(exported.read_bytes())
    result = CliRunner().invoke(app, ["export", "--model", str(ckpt)])
    assert result.exit_code == 0, result.output
    assert "cli.runtime.onnx" in result.output and "correlation" in result.output
    assert artefacts.has_fresh_artefacts(ckpt)


def test_normalise_matches_grad_cams():
    maps = np.random.default_rng(0).normal(size=(2, 3, 7, 7)).clip(0).astype(np.float32)
    maps[0, 1] = 0
    np.testing.assert_allclose(artefacts.normalise(maps), gradcam.normalise(torch.from_numpy(maps)).numpy(), atol=1e-7)
    with pytest.raises(artefacts.ArtefactError, match="NaN"):
        artefacts.normalise(np.full((1, 1, 2, 2), np.nan, np.float32))


def test_the_linear_head_of_imported_models_and_refusing_other_heads():
    from conftest import make_meta
    from cxr.errors import ModelError
    from cxr.inference import camgraph
    from cxr.nets.head import CxrNet

    for task in ("multilabel", "pneumothorax"):
        meta = make_meta(task=task, size=SIZE)
        torch.manual_seed(0)
        net = CxrNet(meta.arch, len(meta.outputs), head="linear").eval()
        parity = export.check_artefact(net, meta, camgraph.to_onnx(net, meta, export.OPSET))
        assert parity["max_abs_cam"] <= 1e-3 and parity["min_cam_correlation"] >= 0.999
    net.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1), torch.nn.Identity())
    with pytest.raises(ModelError, match="this model's head is"):
        camgraph.to_onnx(net, meta, export.OPSET)
