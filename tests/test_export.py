"""cxr.inference.export and `cxr export`: a valid ONNX file, dynamic batch, metadata inside, ORT matches torch fp32.

ORT is held to 1e-4 of torch fp32 here (backends.TOLERANCE; measured differences in docs/BENCHMARKS.md).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cxr.inference import export
from cxr import images
from cxr.data import transforms
from cxr import nets as M
from cxr.cli import app
from cxr.inference.predictor import Predictor
from conftest import save_random_model

SIZE = 96


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_random_model(tmp_path_factory.mktemp("export") / "lite0.safetensors", size=SIZE,
                             thresholds={"Mass": 0.25})


def test_cli_export_matches_torch_with_a_dynamic_batch(ckpt, tmp_path, images_1024):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "cxr.onnx"
    result = CliRunner().invoke(app, ["export", "--model", str(ckpt), "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    net, meta = M.load(ckpt)
    assert export.read_meta(out).to_json() == meta.to_json()
    assert [i.name for i in proto.graph.input] == [export.INPUT] and [o.name for o in proto.graph.output] == list(export.OUTPUTS)
    films = sorted(images_1024.glob("*.png"))[:3]
    x = torch.stack([transforms.preprocess(images.read_image(f), meta) for f in films])
    with torch.no_grad():
        fmap = net.features(x)
        logits, pooled = net.classify(fmap).numpy(), fmap.mean(dim=(2, 3)).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (slice(0, 1), slice(0, 3)):  # one graph, any batch size
        got_logits, got_pooled = sess.run(None, {export.INPUT: x[batch].numpy()})
        assert got_logits.shape == (batch.stop, 14)
        np.testing.assert_allclose(got_logits, logits[batch], atol=1e-4)
        np.testing.assert_allclose(got_pooled, pooled[batch], atol=1e-4)


def test_export_errors(ckpt, tmp_path):
    with pytest.raises(export.ExportError, match="unknown export format"):
        export.export(ckpt, tmp_path / "m.tflite", "tflite")
    with pytest.raises(export.ExportError, match="not a readable ONNX"):
        export.read_meta(b"not onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["a"], ["b"])], "g",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("b", TensorProto.FLOAT, [1])])
    with pytest.raises(export.ExportError, match="not written by `cxr export`"):
        export.read_meta(helper.make_model(graph).SerializeToString())


def test_predictor_caches_the_export_and_survives_a_damaged_cache(ckpt, tmp_path, monkeypatch, images_1024):
    monkeypatch.setenv("CXR_CACHE", str(tmp_path / "cache"))
    film = sorted(images_1024.glob("*.png"))[0]
    first = Predictor(ckpt).predict_one(film)
    cached = list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(cached) == 1 and export.read_meta(cached[0]).input_size == SIZE
    cached[0].write_bytes(b"damaged")
    again = Predictor(ckpt).predict_one(film)  # re-exports, and repairs the cache
    assert again.probabilities == pytest.approx(first.probabilities, abs=1e-6)
    assert export.read_meta(cached[0]).input_size == SIZE


def test_cache_keeps_the_most_recently_used(tmp_path):
    folder = tmp_path / "onnx"
    folder.mkdir()
    for i in range(export.CACHE_KEEP + 3):
        (folder / f"{i:02d}.onnx").write_bytes(b"x")
        os.utime(folder / f"{i:02d}.onnx", (1000 + i, 1000 + i))
    os.utime(folder / "00.onnx")  # just used
    export._prune(folder)
    left = sorted(f.name for f in folder.glob("*.onnx"))
    assert len(left) == export.CACHE_KEEP and "00.onnx" in left and "01.onnx" not in left
