"""cxr evaluate end to end: a tiny random model over real NIH films with the real metadata."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from typer.testing import CliRunner

from cxr import nets as M
from cxr.data import nih
from cxr.data.datasets import open_films
from cxr.errors import CxrError
from cxr.evaluation.evaluate import evaluate, scores
from cxr.findings import FINDINGS
from cxr.data.transforms import preprocess
from conftest import save_random_model

SIZE = 32  # the smallest input a model accepts: keeps inference cheap on two cores



@pytest.fixture(scope="module")
def table(metadata_csv):
    return nih.read_metadata(metadata_csv)


@pytest.fixture(scope="module")
def films_dir(tmp_path_factory, images_512, table):
    """8 real films (2 with Pneumothorax, 3 with other findings, 3 with none), one film whose name the
    metadata lacks and one file that is not an image."""
    present = table[table["image"].isin({p.name for p in images_512.glob("*.png")})]
    ptx = present[present["labels"].str.contains("Pneumothorax")].head(2)
    other = present[~present["labels"].str.contains("Pneumothorax") & (present["labels"] != "No Finding")].head(3)
    normal = present[present["labels"] == "No Finding"].head(3)
    chosen = pd.concat([ptx, other, normal])
    folder = tmp_path_factory.mktemp("films")
    for name in chosen["image"]:
        shutil.copy(images_512 / name, folder / name)
    shutil.copy(images_512 / chosen["image"].iloc[0], folder / "not_in_metadata.png")
    (folder / "99999999_000.png").write_bytes(b"not a png")
    return folder


def _save(path, task: str):
    two = task == "pneumothorax"
    return save_random_model(path, "densenet121", task, SIZE,
                             thresholds={"Pneumothorax": 0.4} if two else {"Effusion": 0.3},
                             provenance={"config": {"loss": "weighted", "split": "patient", "seed": 0}})


@pytest.fixture(scope="module")
def multilabel_model(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("m") / "tiny.safetensors", "multilabel")


def _cli():
    from cxr.cli.evaluate import register

    app = typer.Typer()
    app.callback()(lambda: None)  # keep `evaluate` a subcommand, as in the real `cxr`
    register(app)
    return app


def test_cli_evaluate_end_to_end(tmp_path, films_dir, metadata_csv, multilabel_model, table):
    out = tmp_path / "report"
    result = CliRunner().invoke(_cli(), [
        "evaluate", "--model", str(multilabel_model), "--data", str(films_dir), "--metadata", str(metadata_csv),
        "--out", str(out), "--n-boot", "30", "--batch-size", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "report.json").read_text())
    assert data["n_images"] == 8 and data["task"] == "multilabel"
    for key in ("per_finding", "macro_auc", "micro_auc", "macro_ap", "micro_ap", "f1", "model"):
        assert key in data
    assert data["model"]["arch"] == "densenet121" and data["model"]["loss"] == "weighted"
    notes = " ".join(data["notes"])
    assert "not_in_metadata.png" in notes and "99999999_000.png" in notes
    assert data["per_finding"]["Effusion"]["threshold"] == 0.3  # the model's stored threshold
    for f, entry in data["per_finding"].items():  # curve points for explain's PR panels (Figs 13-20)
        if entry["n_positive"] and entry["n_negative"]:
            curve = entry["pr_curve"]
            assert len(curve["recall"]) == len(curve["precision"]) >= 2 and curve["recall"][-1] == 0.0

    frame = pd.read_csv(out / "scores.csv")
    labels = nih.label_matrix(table.set_index("image").loc[frame["image"]].reset_index())
    for j, f in enumerate(FINDINGS):
        assert data["per_finding"][f]["n_positive"] == int(labels[:, j].sum())
    assert ((frame.filter(like="p_") >= 0) & (frame.filter(like="p_") <= 1)).all().all()
    for name in ("report.html", "fig10_roc.png", "fig12_pr.png", "table1_auc.md", "table2_ap.csv"):
        assert (out / name).is_file()
    assert "Not for clinical use" in result.output


def test_scores_are_the_models_probabilities(films_dir, multilabel_model):
    net, meta = M.load(multilabel_model)
    films = open_films(films_dir)
    names = [n for n in films.names if n[0] == "0"][:5]
    net.train()
    p = scores(net, meta, films, names, batch_size=2)  # fp32, the default
    assert net.training  # the caller's mode is restored
    net.eval()
    with torch.no_grad():
        want = torch.sigmoid(net(torch.stack([preprocess(films.read(n), meta) for n in names]))).numpy()
    assert p.shape == (5, 14) and np.allclose(p, want, atol=1e-5)
    fast = scores(net, meta, films, names, batch_size=4, precision="bf16")  # opt-in bf16 autocast
    assert np.abs(fast - want).max() < 0.05


def test_scores_do_not_depend_on_whether_the_cpu_has_native_bf16(films_dir, multilabel_model, monkeypatch):
    """Issue 9: evaluation once autocast to bf16 on CPUs with AVX512-BF16, so its numbers differed from
    `cxr predict`'s there. This CPU has no native bf16, so pretend it has, and forbid autocast outright."""
    from cxr.inference import runtime

    net, meta = M.load(multilabel_model)
    films = open_films(films_dir)
    names = [n for n in films.names if n[0] == "0"][:5]
    fp32 = scores(net, meta, films, names, batch_size=4)
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)

    def no_autocast(*args, **kwargs):
        raise AssertionError("fp32 scoring entered torch.autocast")

    monkeypatch.setattr(torch, "autocast", no_autocast)
    assert np.array_equal(scores(net, meta, films, names, batch_size=4), fp32)


def test_bf16_is_opt_in_and_prints_its_measured_error(tmp_path, films_dir, metadata_csv, multilabel_model):
    result = CliRunner().invoke(_cli(), [
        "evaluate", "--model", str(multilabel_model), "--data", str(films_dir), "--metadata", str(metadata_csv),
        "--out", str(tmp_path), "--n-boot", "10", "--batch-size", "4", "--no-progress", "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["inference"]["precision"] == "bf16" and data["inference"]["backend"] == "torch"
    assert data["inference"]["films_checked"] == 4 and 0 <= data["inference"]["max_abs_dp_vs_fp32"] < 1
    assert "max |dp|" in result.output and "against fp32" in result.output
    default = evaluate(multilabel_model, films_dir, metadata_csv, tmp_path / "fp32", n_boot=10, batch_size=4)
    assert default["inference"] == {"backend": "onnx", "precision": "fp32", "max_abs_dp_vs_fp32": None,
                                    "films_checked": None}


def test_pneumothorax_model_on_a_saved_split(tmp_path, films_dir, metadata_csv, table):
    """The two-class task (films with a finding only), a run's split.json, and a comparison model (Fig. 21)."""
    model = _save(tmp_path / "ptx.safetensors", "pneumothorax")
    here = table[table["image"].isin(open_films(films_dir).names)]
    ptx = here["labels"].str.contains("Pneumothorax")
    val = list(here["image"][ptx]) + list(here["image"][~ptx & (here["labels"] != "No Finding")][:2])
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [], "val": val, "test": []}))
    data = evaluate(model, films_dir, metadata_csv, tmp_path / "out", str(split), subset="val", n_boot=20,
                    batch_size=4, compare=model)
    assert data["task"] == "binary" and data["n_images"] == 4
    assert data["per_finding"]["Pneumothorax"]["n_positive"] == 2
    assert data["per_finding"]["Pneumothorax"]["threshold"] == 0.4
    assert set(data["f1"]["paper_weighted"]) >= {"binary", "macro", "micro", "weighted"}
    assert data["compare"]["summary"]["per_finding"]["Pneumothorax"]["auc"] == data["per_finding"]["Pneumothorax"]["auc"]
    assert (tmp_path / "out" / "fig7_pr_roc.png").is_file() and (tmp_path / "out" / "fig21_compare.png").is_file()
    assert any("outside task" in n for n in data["notes"])  # the No Finding films


def test_bad_split_is_a_user_error(tmp_path, films_dir, metadata_csv, multilabel_model):
    with pytest.raises(CxrError, match="unknown split 'bogus'"):
        evaluate(multilabel_model, films_dir, metadata_csv, tmp_path, "bogus")
    with pytest.raises(CxrError, match="split.json"):
        evaluate(multilabel_model, films_dir, metadata_csv, tmp_path, str(tmp_path / "missing.json"))
