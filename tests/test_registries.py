"""The registries are real: an architecture, a task and a data set registered inside this test (none of
them NIH's, none known to cxr's code) go through `cxr train` -> `cxr evaluate` -> `cxr predict`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from cxr import nets, tasks
from cxr.cli import app
from cxr.data import registry as datasets
from cxr.data.labels import read_label_csv

FINDINGS = ("Bright", "Dark")  # findings NIH does not have: the data set's task brings them
N_FILMS = 24


class ToyBody(nn.Module):
    """One strided convolution, 224 parameters: enough to tell a bright film from a dark one."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class ToyFilms:
    """A data set whose label file is a plain CSV: image, patient, '|'-joined findings."""

    findings = FINDINGS

    def read_labels(self, path):
        return read_label_csv(path, FINDINGS)


@pytest.fixture
def registered():
    nets.register("toy", normalisation="imagenet")(ToyBody)
    datasets.register_dataset("toy")(ToyFilms)
    tasks.register_task(tasks.multilabel("toy", FINDINGS))
    try:
        yield
    finally:
        nets.unregister("toy")
        datasets.unregister_dataset("toy")
        tasks.unregister_task("toy")
    assert "toy" not in nets.ARCHITECTURES and "toy" not in tasks.task_names()


@pytest.fixture
def toy_films(tmp_path, images_64):
    """Real 64 px films made brighter or darker (some both, some neither), one patient each, and their labels.
    Real films, not noise: predict reads them through the whole inference path, orientation check included."""
    sources = sorted(images_64.glob("*.png"))[:N_FILMS]
    folder, rows = tmp_path / "films", []
    folder.mkdir()
    for i, src in enumerate(sources):
        bright, dark = i % 2 == 0, i % 3 == 0
        gray = np.asarray(Image.open(src).convert("L"), dtype=np.float32)
        pixels = np.clip(gray * (1.0 - 0.4 * dark) + 70 * bright, 0, 255).astype(np.uint8)
        name = f"toy_{i:03d}.png"
        Image.fromarray(pixels).save(folder / name)
        labels = "|".join(f for f, on in zip(FINDINGS, (bright, dark)) if on) or "No Finding"
        rows.append({"image": name, "patient": f"p{i}", "labels": labels})
    labels_csv = tmp_path / "labels.csv"
    with open(labels_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "patient", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    return folder, labels_csv


def cxr(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def test_toy_architecture_and_data_set_train_evaluate_predict(registered, toy_films, tmp_path):
    films, labels_csv = toy_films
    run, report = tmp_path / "run", tmp_path / "report"
    cxr("train", "--data", films, "--metadata", labels_csv, "--dataset", "toy", "--task", "toy", "--arch", "toy",
        "--weights", "none", "--size", "32", "--batch-size", "8", "--epochs", "2", "--workers", "0",
        "--val-fraction", "0.25", "--test-fraction", "0.25", "--precision", "32-true", "--accelerator", "cpu",
        "--no-progress", "--out", run)
    model, meta = nets.load(run / "model.safetensors")
    assert (meta.arch, meta.task, meta.outputs) == ("toy", "toy", list(FINDINGS))
    assert isinstance(model.body, ToyBody) and meta.provenance["config"]["dataset"] == "toy"
    assert sum(p.numel() for p in model.body.parameters()) == 224

    # evaluate finds the data set through the model's provenance and scores the run's own test films
    cxr("evaluate", "--model", run / "model.safetensors", "--data", films, "--metadata", labels_csv,
        "--split", run / "split.json", "--subset", "test", "--n-boot", "20", "--no-progress", "--out", report)
    scored = json.loads((report / "report.json").read_text())
    assert scored["n_images"] == len(json.loads((run / "split.json").read_text())["test"]) > 0
    assert set(scored["per_finding"]) == set(FINDINGS)

    out = tmp_path / "predictions.json"
    cxr("predict", films / "toy_000.png", films / "toy_003.png", "--model", run / "model.safetensors",
        "--backend", "torch", "--format", "json", "--out", out, "--no-progress")
    text = out.read_text()
    assert "toy_000.png" in text and "toy_003.png" in text
    assert all(f in text for f in FINDINGS)


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(Exception, match="densenet121"):
        nets.build("no-such-net")
    with pytest.raises(Exception, match="nih"):
        datasets.get_dataset("no_such_set")
    with pytest.raises(Exception, match="pneumothorax"):
        tasks.get_task("no-such-task")
