"""`cxr stats` through the CLI: JSON on the real metadata reproduces the paper; tables; the heatmap PNG."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cxr.data import splits
from cxr.cli import app
from cxr.cli.stats import SplitKind, Task
from cxr.errors import DataError
from cxr.tasks import task_names

from test_nih import FIGURE_3, FIGURE_3_ORDER, HEADER, ROWS, write

NO_OVERLAP = {"train-val": 0, "train-test": 0, "val-test": 0}


def run(*args: str):
    result = CliRunner().invoke(app, ["stats", *args])
    if result.exception and not isinstance(result.exception, (SystemExit, DataError)):
        raise result.exception
    return result


def run_json(*args: str) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_choices_match_the_library():
    assert tuple(t.value for t in Task) == task_names()
    assert tuple(s.value for s in SplitKind) == splits.SPLITS


def test_json_on_the_real_metadata_reproduces_the_paper(metadata_csv):
    out = run_json("--metadata", str(metadata_csv))
    assert (out["images"], out["patients"], out["with_finding"]) == (112_120, 30_805, 51_759)
    assert out["label_counts"]["Pneumothorax"] == 5_302 and out["label_counts"]["Hernia"] == 227
    labels, matrix = out["cooccurrence"]["labels"], out["cooccurrence"]["matrix"]
    order = [labels.index(f) for f in FIGURE_3_ORDER]
    assert [[matrix[i][j] for j in order] for i in order] == FIGURE_3
    assert set(out["class_weights"]) == set(labels) and all(len(w) == 2 for w in out["class_weights"].values())
    assert out["pos_weight"]["Infiltration"] == pytest.approx((112_120 - 19_894) / 19_894, abs=1e-6)
    assert "split" not in out and out["warnings"] == []


def test_pneumothorax_class_weights_are_eq_1_on_51759_films(metadata_csv):
    out = run_json("--metadata", str(metadata_csv), "--task", "pneumothorax")
    assert out["task"]["images"] == 51_759
    assert out["task"]["class_counts"] == {"All others": 46_457, "Pneumothorax": 5_302}
    weights = out["class_weights"]
    assert round(weights["All others"], 4) == round(51_759 / (2 * 46_457), 4) == 0.5571
    assert round(weights["Pneumothorax"], 4) == round(51_759 / (2 * 5_302), 4) == 4.8811


@pytest.mark.parametrize("kind", ["patient", "official"])
def test_honest_splits_share_no_patient(metadata_csv, kind):
    out = run_json("--metadata", str(metadata_csv), "--task", "pneumothorax", "--split", kind, "--seed", "3")
    split = out["split"]
    assert split["kind"] == kind and split["seed"] == 3
    assert split["patient_overlap"] == NO_OVERLAP
    assert sum(split["sizes"].values()) == 51_759 and min(split["sizes"].values()) > 3_000
    assert sum(counts["Pneumothorax"] for counts in split["class_counts"].values()) == 5_302
    assert out["warnings"] == []


def test_random_split_reports_its_leak_and_warns(metadata_csv):
    result = run("--metadata", str(metadata_csv), "--task", "pneumothorax", "--split", "random", "--json")
    assert result.exit_code == 0, result.output
    split = json.loads(result.stdout)["split"]
    assert split["sizes"] == {"train": 41_408, "val": 10_351, "test": 0}
    leaked = split["patient_overlap"]["train-val"]
    assert leaked > 1_000
    assert f"puts {leaked} patients in both train and validation" in result.stderr


def test_tables_and_heatmap_png(tmp_path):
    csv = write(tmp_path / "meta.csv", [HEADER, *ROWS])  # small: the real numbers are checked in JSON above
    png = tmp_path / "figs" / "figure3.png"
    result = run("--metadata", str(csv), "--plot", str(png))
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    for text in ("films with a finding", "Co-occurrences", "Pleural_Thickening", "PlTh Pleural_Thickening"):
        assert text in result.stdout


def test_official_split_with_lists_elsewhere(tmp_path):
    csv = write(tmp_path / "meta.csv", [HEADER, *ROWS])
    names = [r.split(",")[0] for r in ROWS]
    lists = tmp_path / "lists"
    lists.mkdir()
    write(lists / "train_val_list.txt", names[:4])
    write(lists / "test_list.txt", names[4:])
    out = run_json("--metadata", str(csv), "--split", "official", "--lists", str(lists))
    assert out["split"]["sizes"]["test"] == 2 and out["split"]["patient_overlap"] == NO_OVERLAP
    # without --lists it looks beside the metadata, where there are none
    result = run("--metadata", str(csv), "--split", "official")
    assert isinstance(result.exception, DataError)
    assert str(tmp_path / "train_val_list.txt") in str(result.exception)
    tables = run("--metadata", str(csv), "--task", "pneumothorax", "--split", "patient", "--seed", "1")
    assert tables.exit_code == 0 and "Split patient (seed 1)" in tables.stdout and "All others" in tables.stdout


def test_bad_metadata_is_a_data_error(tmp_path):
    result = run("--metadata", str(tmp_path / "missing.csv.gz"))
    assert isinstance(result.exception, DataError) and "missing.csv.gz" in str(result.exception)
    bad = write(tmp_path / "bad.csv", [HEADER, ROWS[0].replace("Cardiomegaly", "Cardiomegally")])
    result = run("--metadata", str(bad), "--json")
    assert isinstance(result.exception, DataError) and "unknown finding 'Cardiomegally'" in str(result.exception)
    assert result.stdout == ""
