"""Issue 10, honest outputs: calibration applied in one place (torch and ONNX agree), findings the model
cannot assess are never flagged (API, CSV, page), and `cxr calibrate` / `cxr evaluate --update-model` refit
what comes after the network while leaving the weights byte for byte as they were."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cxr.cli import app
from cxr.evaluation import adapt
from cxr.evaluation.calibration import CalibrationError, apply_platt
from cxr.findings import FINDINGS
from cxr.inference.predictor import TOLERANCE, Predictor
from cxr.nets import load
from conftest import save_random_model

# Infiltration and Hernia: CIs reaching 0.5; Pneumonia: no evidence at all. The rest are assessed.
DOUBTFUL = {"Infiltration": [0.38, 0.57], "Hernia": [0.13, 0.92]}
NO_EVIDENCE = "Pneumonia"
HIDDEN = {*DOUBTFUL, NO_EVIDENCE}
CALIBRATION = {f: {"a": 0.5 + 0.1 * i, "b": -1.0 + 0.05 * i} for i, f in enumerate(FINDINGS)}


def _assessment() -> dict:
    return {f: {"auc": 0.5, "auc_ci": DOUBTFUL.get(f, [0.6, 0.8]), "n_positive": 30, "n_negative": 200,
                "source": "test fixture"} for f in FINDINGS if f != NO_EVIDENCE}


@pytest.fixture(scope="module")
def honest_model(tmp_path_factory) -> Path:
    """Thresholds of 0: every assessed finding is flagged on every film, so only "not assessed" can stop a flag."""
    return save_random_model(tmp_path_factory.mktemp("honest") / "honest-lite0.safetensors",
                             thresholds={f: 0.0 for f in FINDINGS}, calibration=CALIBRATION,
                             assessment=_assessment(),
                             operating_point={"policy": "spec:0.90", "fitted_on": "test fixture"})



@pytest.fixture(scope="module")
def films(images_512) -> list[Path]:
    return sorted(images_512.glob("*.png"))[:6]


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory, images_64) -> Path:
    """200 real 64 px films (links): a site's labelled folder, small enough to score in seconds."""
    folder = tmp_path_factory.mktemp("site")
    for f in sorted(images_64.glob("*.png"))[:200]:
        (folder / f.name).symlink_to(f)
    return folder


# ---------------------------------------------------------------------------------------- calibration


def test_torch_and_onnx_give_the_same_calibrated_probabilities(honest_model, films):
    torch_p = Predictor(honest_model, backend="torch", threads=1)
    onnx_p = Predictor(honest_model, backend="onnx", threads=1)
    a = np.array([[p.probabilities[f] for f in FINDINGS] for p in torch_p.predict(films)])
    b = np.array([[p.probabilities[f] for f in FINDINGS] for p in onnx_p.predict(films)])
    np.testing.assert_allclose(a, b, atol=TOLERANCE["onnx"])
    # The calibration is really applied: sigmoid(a * logit + b) of the raw logits, not sigmoid(logit).
    from cxr import images

    z = torch_p.logits_of([images.read_image(f) for f in films])
    slopes = np.array([CALIBRATION[f]["a"] for f in FINDINGS])
    intercepts = np.array([CALIBRATION[f]["b"] for f in FINDINGS])
    np.testing.assert_allclose(a, apply_platt(z, slopes, intercepts), atol=TOLERANCE["torch"])
    assert np.abs(a - 1 / (1 + np.exp(-z))).max() > 0.05


def test_old_checkpoints_load_without_the_new_fields(tiny_model_factory):
    _, meta = load(tiny_model_factory("plain"))
    assert meta.calibration == {} and meta.operating_point == {} and meta.assessment == {}
    assert meta.platt is None and meta.policy is None and meta.evidence("Effusion") is None


# --------------------------------------------------------------------------------------- not assessed


def test_the_api_never_flags_what_it_cannot_assess(honest_model, first_film_512):
    from cxr.web.app import create_app

    with TestClient(create_app(Predictor(honest_model, threads=1), model=honest_model)) as c:
        r = c.post("/api/v1/predict", files={"file": ("f.png", first_film_512.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        card = c.get("/api/v1/model").json()
    found = {f["name"]: f for f in r.json()["findings"]}
    assert set(found) == set(FINDINGS)
    for name, f in found.items():
        if name in HIDDEN:
            assert f["assessed"] is False and f["positive"] is False and 0 <= f["probability"] <= 1
            assert ("no better than chance" if name in DOUBTFUL else "no validation evidence") in f["reason"]
        else:
            assert f["assessed"] is True and f["positive"] is True and "reason" not in f
    assert card["operating_point"].startswith("spec:0.90") and card["calibrated"] is True
    assert {f["name"] for f in card["findings"] if not f["assessed"]} == HIDDEN


def test_the_csv_never_flags_what_it_cannot_assess(honest_model, films):
    result = CliRunner().invoke(app, ["predict", *map(str, films[:3]), "--model", str(honest_model)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 3
    for row in rows:
        for f in FINDINGS:
            assert row[f"{f}_assessed"] == ("0" if f in HIDDEN else "1")
            assert row[f"{f}_positive"] == ("0" if f in HIDDEN else "1")


@pytest.mark.browser
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_page_greys_out_what_it_cannot_assess(honest_model, first_film_512):
    from playwright.sync_api import sync_playwright
    from test_browser import ARGS, CHROMIUM, PHONE, TIMEOUT_MS, _serve

    from cxr.web.app import create_app

    served = _serve(create_app(Predictor(honest_model, threads=1), model=honest_model))
    base = next(served)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport=PHONE)
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(base + "/")
            page.wait_for_selector("#model-card dd >> text=spec:0.90")
            page.set_input_files("#picker", str(first_film_512))
            page.wait_for_selector("#results:not([hidden])")
            flagged = page.eval_on_selector_all(".finding.positive", "bs => bs.map(b => b.dataset.finding)")
            greyed = page.eval_on_selector_all("#unassessed .finding", "bs => bs.map(b => b.dataset.finding)")
            heading = page.inner_text("#not-assessed h3")
            reasons = page.inner_text("#unassessed")
            browser.close()
    finally:
        next(served, None)
    assert set(greyed) == HIDDEN and not HIDDEN & set(flagged)
    assert set(flagged) == set(FINDINGS) - HIDDEN  # thresholds of 0: every assessed finding is flagged
    assert heading.lower() == "this model cannot assess" and "no better than chance" in reasons


# ---------------------------------------------------------------------------------- cxr calibrate


def _tensors(path: Path) -> dict[str, bytes]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def test_calibrate_refits_thresholds_and_calibration_and_keeps_the_weights(tmp_path, labelled_folder,
                                                                            metadata_csv):
    model = save_random_model(tmp_path / "site.safetensors", thresholds={f: 0.5 for f in FINDINGS})
    out = tmp_path / "site-calibrated.safetensors"
    result = CliRunner().invoke(app, ["calibrate", "--model", str(model), "--data", str(labelled_folder),
                                      "--metadata", str(metadata_csv), "--out", str(out),
                                      "--operating-point", "spec:0.8", "--sparse", "not-assessed",
                                      "--n-boot", "100"])
    assert result.exit_code == 0, result.output
    _, before = load(model)
    _, after = load(out)
    assert _tensors(out) == _tensors(model)  # byte for byte: only the metadata changed
    assert after.policy == "spec:0.80" and "cxr calibrate" in after.operating_point["fitted_on"]
    fitted = [f for f in FINDINGS if "note" not in after.assessment[f]]
    assert fitted and set(after.calibration) == set(fitted)
    assert all(after.thresholds[f] != before.thresholds[f] for f in fitted)
    assert all(after.assessment[f]["source"].startswith("cxr calibrate") for f in FINDINGS)
    skipped = set(FINDINGS) - set(fitted)
    assert skipped and all(f in result.output for f in skipped)  # named, with why
    assert all("at least 5" in after.assessment[f]["note"] for f in skipped)


def test_calibrate_refuses_a_finding_with_too_few_positives(tmp_path, labelled_folder, metadata_csv):
    model = save_random_model(tmp_path / "site.safetensors")
    with pytest.raises(CalibrationError, match=r"Hernia: \d positive"):
        adapt.calibrate(str(model), [labelled_folder], metadata_csv, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_evaluate_reports_calibration_and_flags_and_updates_the_model(tmp_path, labelled_folder, metadata_csv):
    from cxr.evaluation.evaluate import evaluate

    model = save_random_model(tmp_path / "m.safetensors")
    got = evaluate(str(model), labelled_folder, metadata_csv, tmp_path / "report", n_boot=50,
                   update_model=tmp_path / "m2.safetensors", operating_point="spec:0.9", calibrate=True)
    cal = got["calibration"]
    assert set(cal["per_finding"]) == set(FINDINGS) and cal["overall"]["ece"] >= 0
    assert sum(cal["overall"]["reliability"]["count"]) == 200 * 14
    assert got["flags"]["flagged_per_film"] == 0  # a model without evidence flags nothing
    assert set(got["flags"]["not_assessed"]) == set(FINDINGS)
    assert got["flags"]["true_per_film"] > 0
    assert (tmp_path / "report" / "reliability.png").exists()
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Reliability diagram" in html and "Brier skill" in html
    _, updated = load(tmp_path / "m2.safetensors")
    assert updated.policy == "spec:0.90" and updated.calibration
    assert all(e["source"].startswith("cxr evaluate") for e in updated.assessment.values())
    assert _tensors(tmp_path / "m2.safetensors") == _tensors(model)
    json.dumps(got)
