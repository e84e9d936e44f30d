"""cxr.inference.predictor and `cxr predict`: probabilities on real films, backends, bad inputs, heatmaps, CLI output."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cxr.inference import gate
from cxr import images
from cxr.data import transforms
from cxr import nets as M
from cxr.cli import app
from cxr.cli.predict import collect, in_shard, parse_shard
from cxr.errors import CxrError
from cxr.findings import FINDINGS
from cxr.inference.predictor import TOLERANCE, Predictor, resolve_backend
from conftest import assessed_everywhere, make_meta

SIZE = 64  # a small input keeps a random Lite0 fast; the pipeline is the same at any size


def meta_for(arch="efficientnet_lite0", task="multilabel", size=SIZE, **kw) -> M.ModelMeta:
    return make_meta(arch, task, size, **kw)



@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "lite0-random.safetensors"
    return M.save(path, M.build("efficientnet_lite0", 14),
                  meta_for(thresholds={"Effusion": 0.3}, assessment=assessed_everywhere()))


@pytest.fixture(scope="module")
def predictor(ckpt):
    return Predictor(ckpt, batch_size=4)


@pytest.fixture(scope="module")
def films(images_1024):
    return sorted(images_1024.glob("*.png"))


def reference(path, sources):
    """fp32 eager torch, one film at a time: raw logits."""
    net, meta = M.load(path)
    with torch.no_grad():
        return torch.cat([net(transforms.preprocess(images.read_image(s), meta)[None]) for s in sources])


def probs(preds, findings=FINDINGS) -> np.ndarray:
    return np.array([[p.probabilities[f] for f in findings] for p in preds])


def test_probabilities_are_independent_sigmoids_of_the_logits(predictor, ckpt, films):
    preds = predictor.predict(films)
    assert predictor.backend == resolve_backend("auto") == "onnx"
    assert [p.name for p in preds] == [str(f) for f in films] and all(p.status == "ok" for p in preds)
    got = probs(preds)
    assert got.shape == (len(films), 14) and ((got >= 0) & (got <= 1)).all()
    expected = reference(ckpt, films).sigmoid().numpy()
    np.testing.assert_allclose(got, expected, atol=TOLERANCE["onnx"])
    assert not np.allclose(got.sum(axis=1), 1.0, atol=0.05)  # independent findings: never renormalised
    for p in preds:
        assert p.size == (1024, 1024) and p.thresholds["Effusion"] == 0.3 and p.thresholds["Mass"] == 0.5
        assert p.positive == {f: p.probabilities[f] >= p.thresholds[f] for f in FINDINGS}
        json.dumps(p.to_dict())


def test_torch_backend_agrees(ckpt, films):
    got = probs(Predictor(ckpt, backend="torch", batch_size=8).predict(films[:8]))
    np.testing.assert_allclose(got, reference(ckpt, films[:8]).sigmoid().numpy(), atol=TOLERANCE["torch"])
    with pytest.raises(CxrError, match="unknown backend"):
        Predictor(ckpt, backend="bf16")


def test_bad_inputs_become_error_rows_and_the_rest_succeed(predictor, films, tmp_path):
    good = films[0].read_bytes()
    flat = io.BytesIO()
    Image.new("L", (300, 300), 90).save(flat, format="PNG")
    batch = [films[0], b"junk", tmp_path / "missing.png", b"", good[: len(good) // 2], flat.getvalue(), good]
    preds = predictor.predict(batch)
    assert [p.status for p in preds] == ["ok", "error", "error", "error", "error", "refused", "ok"]
    assert "not an image" in preds[1].error and "no such file" in preds[2].error and "empty" in preds[3].error
    assert "blank" in preds[5].refused and preds[5].refused.startswith(gate.REFUSAL)
    for p in preds[1:6]:
        assert p.probabilities == p.thresholds == p.positive == {}
    assert preds[0].probabilities == pytest.approx(preds[6].probabilities, abs=1e-6)  # batch-independent
    single = predictor.predict([films[0]])[0]
    assert single.probabilities == pytest.approx(preds[0].probabilities, abs=1e-6)


def test_predict_one_raises_for_unreadable_and_refuses_non_films(predictor, films):
    with pytest.raises(images.NotAnImageError):
        predictor.predict_one(b"junk", name="upload")
    with pytest.raises(images.ImageNotFoundError):
        predictor.predict_one(films[0].with_name("missing.png"))
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(photo, format="PNG")
    refused = predictor.predict_one(photo.getvalue(), name="upload")
    assert refused.status == "refused" and "colour" in refused.refused and refused.probabilities == {}
    assert refused.name == "upload" and refused.size == (300, 300)
    ok = predictor.predict_one(films[0].read_bytes(), name="upload")
    assert ok.status == "ok" and ok.size == (1024, 1024)


def test_pneumothorax_model_reports_pneumothorax_only(tmp_path, films):
    torch.manual_seed(1)
    path = M.save(tmp_path / "ptx.safetensors", M.build("efficientnet_lite0", 2), meta_for(task="pneumothorax"))
    preds = Predictor(path, backend="torch").predict(films[:3])
    expected = reference(path, films[:3]).softmax(-1)[:, 1].numpy()
    assert all(list(p.probabilities) == ["Pneumothorax"] == list(p.positive) for p in preds)
    np.testing.assert_allclose([p.probabilities["Pneumothorax"] for p in preds], expected, atol=TOLERANCE["torch"])


def test_heatmaps_at_film_resolution_from_the_same_pass(predictor, films, images_512):
    plain = predictor.predict_one(films[1])
    pred = predictor.predict_one(films[1], heatmaps=["Effusion", "mass"])
    assert sorted(pred.heatmaps) == ["Effusion", "Mass"]
    for heat in pred.heatmaps.values():
        assert heat.shape == (1024, 1024) and heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1
    assert pred.probabilities == pytest.approx(plain.probabilities, abs=TOLERANCE["onnx"])
    everything = predictor.predict([sorted(images_512.glob("*.png"))[0], b"junk"], heatmaps=True)
    assert sorted(everything[0].heatmaps) == sorted(FINDINGS) and everything[1].heatmaps is None
    assert everything[0].to_dict()["heatmaps"] == sorted(FINDINGS)
    with pytest.raises(CxrError, match="unknown finding"):
        predictor.predict_one(films[1], heatmaps=["Fracture"])


def test_fitted_gate_scores_agree_with_and_without_heatmaps(ckpt, images_64, tmp_path):
    base = Predictor(ckpt, backend="torch", batch_size=16)
    meta_gate, tensors = gate.fit(base, sorted(images_64.glob("*.png"))[:60], dims=8)
    net, meta = M.load(ckpt)
    path = M.save(tmp_path / "gated.safetensors", net, dataclasses.replace(meta, gate=meta_gate), extra=tensors)
    gated = Predictor(path, backend="torch")
    film = sorted(images_64.glob("*.png"))[100]
    a, b = gated.predict_one(film), gated.predict_one(film, heatmaps=["Effusion"])
    assert gated.gate.fitted and a.gate_score is not None
    assert a.gate_score == pytest.approx(b.gate_score, rel=1e-4)


def test_iter_predict_reports_progress_per_batch(predictor, films):
    seen: list[int] = []
    preds = list(predictor.iter_predict(films[:10], progress=seen.append))
    assert seen == [4, 4, 2] and len(preds) == 10


def test_numpy_preprocessing_is_the_training_transform_bit_for_bit(films):
    from cxr.inference import pipeline

    gray = images.read_image(films[0])
    for meta in (meta_for(), meta_for(arch="densenet121", size=96)):  # lite and imagenet normalisations
        got = pipeline.preprocess(gray, meta)
        assert got.dtype == np.float32 and got.shape == (3, meta.input_size, meta.input_size)
        assert np.array_equal(got, transforms.preprocess(gray, meta).numpy())


def test_predict_film_reads_a_decoded_film_without_decoding_again(predictor, films, monkeypatch):
    film = images.read_film(films[1].read_bytes(), name="upload")
    assert film.size == (1024, 1024) and film.colourfulness == 0.0 and film.name == "upload"
    plain = predictor.predict_one(films[1])

    def refuse(*args, **kwargs):
        raise AssertionError("predict_film decoded the film again")

    monkeypatch.setattr(images, "read_image", refuse)
    monkeypatch.setattr(images, "read_film", refuse)
    pred = predictor.predict_film(film, heatmaps=["Effusion"], heatmap_max_side=256)
    assert pred.name == "upload" and pred.size == (1024, 1024)
    assert pred.probabilities == pytest.approx(plain.probabilities, abs=TOLERANCE["onnx"])
    assert pred.heatmaps["Effusion"].shape == (256, 256)
    wide = dataclasses.replace(film, gray=film.gray[:512], size=(1024, 512))
    assert predictor.predict_film(wide, heatmaps=["Mass"], heatmap_max_side=100).heatmaps["Mass"].shape == (50, 100)


def test_probabilities_of_is_predict_without_the_gate(predictor, films):
    def unreadable():
        raise images.CorruptImageError("bad.png: the PNG is truncated; re-send it")

    grays = [images.read_image(films[0]), unreadable, lambda: images.read_image(films[2])]
    got = predictor.probabilities_of(grays)
    assert got.shape == (3, 14) and got.dtype == np.float32 and np.isnan(got[1]).all()
    want = probs(predictor.predict([films[0], films[2]]))
    np.testing.assert_allclose(got[[0, 2]], want, atol=1e-6)
    with pytest.raises(images.CorruptImageError):
        predictor.probabilities_of(grays, strict=True)


def test_fp32_is_the_default_and_bf16_is_opt_in_with_its_error_measured(ckpt, films):
    plain = Predictor(ckpt, backend="torch", batch_size=2)
    assert plain.precision == "fp32" and plain.measured is None
    fast = Predictor(ckpt, precision="bf16", batch_size=2)
    assert fast.backend == "torch"  # "auto" picks the backend that can run bf16
    got = probs(fast.predict(films[:3]))
    assert fast.measured.films == 2 and 0 <= fast.measured.max_abs_dp < 1  # the first batch, against fp32
    assert "max |dp|" in str(fast.measured)
    assert np.abs(got[:2] - probs(plain.predict(films[:2]))).max() <= fast.measured.max_abs_dp + 1e-6
    with pytest.raises(CxrError, match="bf16 runs on the torch backend only"):
        Predictor(ckpt, backend="onnx", precision="bf16")
    with pytest.raises(CxrError, match="unknown precision"):
        Predictor(ckpt, backend="torch", precision="fp16")


# ------------------------------------------------------------------------------------------------ CLI


def run_cli(*args: str):
    result = CliRunner().invoke(app, ["predict", *args])
    assert result.exit_code == 0, result.output
    return result


def test_cli_csv_on_a_folder(ckpt, images_1024, monkeypatch):
    monkeypatch.chdir(images_1024)  # the file column starts with the folder as typed: here "."
    result = run_cli(".", "--model", str(ckpt), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 24 and {r["status"] for r in rows} == {"ok"}
    header = list(rows[0])
    assert header == ["file", "status", "message", *FINDINGS, *(f"{f}_positive" for f in FINDINGS),
                      *(f"{f}_assessed" for f in FINDINGS)]
    assert rows[0]["file"] == "00000075_000.png" and all(0 <= float(rows[0][f]) <= 1 for f in FINDINGS)
    assert {rows[0][f"{f}_positive"] for f in FINDINGS} <= {"0", "1"}


def test_cli_json_with_bad_and_refused_files(ckpt, films, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.png").symlink_to(films[0])
    (folder / "junk.png").write_text("not a film")
    Image.new("L", (200, 200), 0).save(folder / "black.png")
    (folder / "notes.txt").write_text("ignored: not a film suffix")
    out = tmp_path / "out.json"
    monkeypatch.chdir(folder)  # the file column starts with the folder as typed: here "."
    run_cli(".", "--model", str(ckpt), "--format", "json", "--out", str(out))
    rows = {r["file"]: r for r in json.loads(out.read_text())}
    assert sorted(rows) == ["black.png", "junk.png", "sub/a.png"]
    assert rows["sub/a.png"]["status"] == "ok" and len(rows["sub/a.png"]["probabilities"]) == 14
    assert rows["junk.png"]["status"] == "error" and rows["junk.png"]["probabilities"] == {}
    assert rows["black.png"]["status"] == "refused" and "blank" in rows["black.png"]["message"]


def test_shards_partition_the_films(ckpt, images_512, images_1024):
    keys = [k for _, k in collect([images_512])]
    shards = [{k for k in keys if in_shard(k, i, 3)} for i in range(3)]
    assert set().union(*shards) == set(keys) and sum(map(len, shards)) == len(keys)
    assert all(len(s) > len(keys) / 6 for s in shards)
    halves = [run_cli(str(images_1024), "--model", str(ckpt), "--shard", f"{i}/2").stdout for i in range(2)]
    files = [{r["file"] for r in csv.DictReader(io.StringIO(h))} for h in halves]
    assert not files[0] & files[1] and len(files[0] | files[1]) == 24
    for bad in ("2/2", "1", "a/b", "0/0"):
        with pytest.raises(CxrError, match="--shard"):
            parse_shard(bad)


def test_cli_writes_heatmaps(ckpt, films, tmp_path):
    run_cli(str(films[0]), "--model", str(ckpt), "--heatmaps", str(tmp_path / "maps"), "--heatmap-findings", "Effusion,Mass")
    written = sorted(p.relative_to(tmp_path / "maps").as_posix() for p in (tmp_path / "maps").rglob("*.png"))
    stem = films[0].as_posix().lstrip("/")[: -len(".png")]
    assert written == [f"{stem}/Effusion.png", f"{stem}/Mass.png"]
    assert Image.open(tmp_path / "maps" / written[0]).size == (1024, 1024)


# ------------------------------------------------------------- CLI: typed paths and output names (issue 15)


def test_cli_missing_typed_path_is_a_usage_error(ckpt, films, tmp_path):
    missing = tmp_path / "missing-path"
    result = CliRunner().invoke(app, ["predict", str(missing), str(films[0]), "--model", str(ckpt)])
    assert result.exit_code == 2 and result.stdout == ""
    assert str(missing) in result.stderr and "--keep-going" in result.stderr
    kept = run_cli(str(missing), str(films[0]), "--model", str(ckpt), "--keep-going", "--no-progress")
    rows = {r["file"]: r for r in csv.DictReader(io.StringIO(kept.stdout))}
    assert rows[missing.as_posix()]["status"] == "error" and "no such file" in rows[missing.as_posix()]["message"]
    assert rows[films[0].as_posix()]["status"] == "ok"


def test_cli_unreadable_film_in_a_folder_is_still_a_row(ckpt, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "junk.png").write_text("not a film")
    result = run_cli(str(tmp_path / "in"), "--model", str(ckpt))
    (row,) = csv.DictReader(io.StringIO(result.stdout))
    assert row["file"] == (tmp_path / "in" / "junk.png").as_posix() and row["status"] == "error"


def test_cli_names_are_the_typed_folder_joined_with_the_path_inside(ckpt, films, tmp_path, monkeypatch):
    for folder in ("a", "b/c"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "film.png").symlink_to(films[0])
    monkeypatch.chdir(tmp_path)
    result = run_cli("a", "b/c", "./a/film.png", "--model", str(ckpt), "--format", "json")
    rows = json.loads(result.stdout)
    assert [r["file"] for r in rows] == ["a/film.png", "b/c/film.png"]  # the film typed twice is read once
    assert all(r["status"] == "ok" for r in rows)
    # --shard hashes the path inside the folder, so shards agree wherever the data is mounted
    assert [k for _, k in collect([Path("a"), Path("b/c")])] == ["film.png", "film.png"]
