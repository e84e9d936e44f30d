"""Patient-grouped cross-validation at tiny size: folds, out-of-fold scores, calibration into the metadata."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr.training.cv import patient_folds, read_oof


def test_folds_are_patient_disjoint_balanced_and_a_function_of_the_seed(metadata_csv):
    from cxr.data import nih

    df = nih.read_metadata(metadata_csv).head(3000)
    patients = df["patient"].to_numpy()
    fold = patient_folds(patients, 5, seed=0)
    assert set(fold) == set(range(5))
    for p in set(patients):  # every patient's films in one fold
        assert len(set(fold[patients == p])) == 1
    sizes = np.bincount(fold)
    assert sizes.max() - sizes.min() <= np.bincount(np.unique(patients, return_inverse=True)[1]).max()
    assert (patient_folds(patients, 5, seed=0) == fold).all()
    shuffled = np.random.default_rng(1).permutation(len(patients))  # film order does not matter
    assert (patient_folds(patients[shuffled], 5, seed=0) == fold[shuffled]).all()
    assert (patient_folds(patients, 5, seed=1) != fold).any()


def test_too_few_patients_for_the_folds_is_a_clear_error():
    from cxr.errors import DataError

    with pytest.raises(DataError, match="patients cannot fill"):
        patient_folds(["a", "a", "b"], 3, seed=0)


def test_capture_augmentation_is_seeded_by_the_torch_stream(first_film_512):
    from cxr.data.transforms import train_transform
    from cxr.images import read_image

    gray = read_image(first_film_512)
    plain = train_transform(64, (0.5,) * 3, (0.25,) * 3)
    captured = train_transform(64, (0.5,) * 3, (0.25,) * 3, capture=1.0)

    def run(t, seed):
        torch.manual_seed(seed)
        return t(gray)

    assert torch.equal(run(captured, 7), run(captured, 7))  # a resumed run redraws the same photo
    assert not torch.equal(run(captured, 7), run(captured, 8))
    assert not torch.equal(run(captured, 7), run(plain, 7))


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, images_64, metadata_csv) -> tuple[Path, dict]:
    from cxr.training.cv import cross_validate

    out = tmp_path_factory.mktemp("cv")
    return out, cross_validate(_config(out, images_64, metadata_csv), 2, policy="spec:0.80", ship="refit", n_boot=50)


def _config(out: Path, images_64: Path, metadata_csv: Path, **kw):
    from cxr.training.train import TrainConfig

    kw = {"epochs": 1, **kw}
    return TrainConfig(data=[images_64], metadata=metadata_csv, out=out, arch="efficientnet_lite0", weights=None,
                       size=64, batch_size=8, max_films=40, workers=0, progress=False, seed=5,
                       precision="32-true", capture_aug=0.3, **kw)


def test_every_film_is_scored_once_by_the_fold_that_never_saw_its_patient(cv_run):
    out, report = cv_run
    oof = read_oof(out / "oof.csv")
    folds = json.loads((out / "folds.json").read_text())
    assert len(oof["image"]) == len(set(oof["image"])) == len(folds["fold"]) == report["n_films"] == 40
    assert [folds["fold"][n] for n in oof["image"]] == list(oof["fold"])
    assert report["patients_in_two_folds"] == 0
    for f in range(2):
        split = json.loads((out / f"fold-{f + 1}" / "split.json").read_text())
        mine = {n for n, k in zip(oof["image"], oof["fold"]) if k == f}
        assert set(split["val"]) == mine and not mine & set(split["train"])
        train_patients = {folds["patients"][n] for n in split["train"]}
        assert not train_patients & {folds["patients"][n] for n in mine}


def test_oof_scores_are_the_fold_models_scores_through_the_predictor(cv_run, images_64):
    from cxr.data.datasets import open_films
    from cxr.inference.predictor import Predictor
    from cxr.nets import load

    out, _ = cv_run
    oof = read_oof(out / "oof.csv")
    films = open_films(images_64)
    for f in range(2):
        net, meta = load(out / f"fold-{f + 1}" / "model.safetensors")
        rows = np.flatnonzero(oof["fold"] == f)
        p = Predictor.from_model(net, meta, backend="torch").probabilities_of(
            [films.read(oof["image"][i]) for i in rows])
        np.testing.assert_allclose(oof["p"][rows], p, atol=2e-6)
        np.testing.assert_allclose(1 / (1 + np.exp(-oof["logit"][rows])), p, atol=2e-6)


def test_cv_json_has_pooled_and_per_fold_auc_with_cis(cv_run):
    _, report = cv_run
    assert len(report["per_fold"]) == 2 and sum(f["n_images"] for f in report["per_fold"]) == 40
    lo, hi = report["pooled"]["macro_auc_ci"]
    assert lo <= report["pooled"]["macro_auc"] <= hi
    assert len(report["per_finding"]) == 14
    assert report["operating_point"]["policy"] == "spec:0.80"


def test_calibration_thresholds_and_evidence_land_in_the_shipped_model(cv_run):
    from cxr.nets import load

    out, report = cv_run
    _, meta = load(out / "model.safetensors")
    assert meta.operating_point["policy"] == "spec:0.80"
    assert meta.thresholds == {f: e["threshold"] for f, e in report["per_finding"].items()}
    assert set(meta.calibration) == set(meta.outputs)  # a base rate where nothing could be fitted
    assert all(c["a"] >= 0 for c in meta.calibration.values())
    assert set(meta.assessment) == set(meta.outputs)
    for f, e in meta.assessment.items():
        assert e["auc_ci"] == report["per_finding"][f]["auc_ci"] and "out-of-fold" in e["source"]
    assert meta.metrics["subset"] == "out-of-fold"
    assert meta.metrics["macro_auc"] == report["pooled"]["macro_auc"]  # the card's figures are the OOF ones
    assert all(meta.metrics["per_finding"][f]["auc"] == e["auc"] for f, e in report["per_finding"].items())
    assert meta.provenance["shipped"].startswith("a refit on all films")
    assert meta.provenance["config"]["parts"] == {"train": 40, "val": 0}
    assert meta.provenance["config"]["capture_aug"] == 0.3


def test_the_fold_ensemble_ships_with_the_same_out_of_fold_fit_and_no_more_training(cv_run, tmp_path, images_64,
                                                                                     metadata_csv):
    import dataclasses
    import shutil

    from cxr.data.datasets import open_films
    from cxr.inference.predictor import Predictor
    from cxr.nets import load
    from cxr.training.cv import cross_validate

    out, _ = cv_run
    again = tmp_path / "cv"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("refit"))
    (again / "model.safetensors").unlink()  # the refit's
    before = {f: (again / f"fold-{f}" / "model.safetensors").stat().st_mtime_ns for f in (1, 2)}
    _, refit_meta = load(out / "model.safetensors")
    report = cross_validate(_config(again, images_64, metadata_csv, resume=True), 2, policy="spec:0.80",
                            ship="ensemble", n_boot=50)
    assert before == {f: (again / f"fold-{f}" / "model.safetensors").stat().st_mtime_ns for f in (1, 2)}
    assert not (again / "refit").exists() and report["shipped"] == "ensemble"
    net, meta = load(again / "model.safetensors")
    assert meta.members == 2 and meta.provenance["shipped"].startswith("the ensemble of the 2 fold models")
    assert meta.provenance["n_train"] == 40 and meta.provenance["split"]["sizes"]["train"] == 40
    assert [m["sizes"]["val"] for m in meta.provenance["split"]["members"]] == [
        int((read_oof(again / "oof.csv")["fold"] == f).sum()) for f in range(2)]
    # the same out-of-fold scores give the same calibration, thresholds and evidence as the refit carries
    assert (meta.calibration, meta.thresholds, meta.assessment) == (
        refit_meta.calibration, refit_meta.thresholds, refit_meta.assessment)
    films = open_films(images_64)
    grays = [films.read(n) for n in films.names[:4]]
    folds = [Predictor.from_model(*load(again / f"fold-{f}" / "model.safetensors"), backend="torch").logits_of(grays)
             for f in (1, 2)]
    ours = Predictor.from_model(net, dataclasses.replace(meta, calibration={}), backend="torch").logits_of(grays)
    np.testing.assert_allclose(ours, np.mean(folds, axis=0), atol=1e-5)


def test_fold_models_trained_with_the_body_frozen_ship_as_one_shared_body(tmp_path, images_64, metadata_csv):
    """epochs 0: only the heads train (the paper's phase 2), so every fold keeps the same body; the ensemble
    stores it once and its logits are still the fold models' mean."""
    from safetensors import safe_open

    from cxr.data.datasets import open_films
    from cxr.inference.predictor import Predictor
    from cxr.nets import load
    from cxr.training.cv import cross_validate

    cross_validate(_config(tmp_path, images_64, metadata_csv, epochs=0, head_epochs=1), 2, policy="spec:0.80",
                   ship="ensemble", n_boot=20)
    net, meta = load(tmp_path / "model.safetensors")
    assert meta.members == 2 and meta.shared_body and net.shared_body
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    with safe_open(str(tmp_path / "fold-1" / "model.safetensors"), framework="pt") as f:
        fold_keys = list(f.keys())
    assert sum(k.startswith("body.") for k in keys) == sum(k.startswith("body.") for k in fold_keys)
    films = open_films(images_64)
    grays = [films.read(n) for n in films.names[:4]]
    folds = [Predictor.from_model(*load(tmp_path / f"fold-{f}" / "model.safetensors"), backend="torch").logits_of(grays)
             for f in (1, 2)]
    np.testing.assert_allclose(Predictor.from_model(net, meta, backend="torch").logits_of(grays),
                               np.mean(folds, axis=0), atol=1e-5)


def test_assessment_reads_within_source_evidence_when_sources_differ():
    """A finding the model 'ranks' only by telling the 512-px from the 64-px films apart (they differ in
    prevalence) is not assessed, though its pooled AUC is high; a finding ranked within each source is."""
    from cxr.training import oof as O

    rng = np.random.default_rng(1)
    n = 900
    source = np.repeat(["data/images-512", "data/images-64"], n // 2)
    y = (rng.random((n, 2)) < np.where(source == "data/images-512", 0.35, 0.08)[:, None]).astype(np.int8)
    z = np.stack([3.0 * (source == "data/images-512") + rng.normal(0, 0.3, n), 2.0 * y[:, 1] + rng.normal(0, 1, n)], 1)
    oof = {"source": list(source), "image": [f"{i:08d}_000.png" for i in range(n)], "patient": np.arange(n),
           "fold": np.arange(n) % 3, "y": y, "logit": z, "p": 1 / (1 + np.exp(-z))}
    fitted = O.fit_from_oof(oof, ["Shortcut", "Real"], "spec:0.90", folds=3, n_boot=200)
    report = O.cv_report(oof, ["Shortcut", "Real"], fitted, folds=3, n_boot=200)
    assert report["per_finding"]["Shortcut"]["auc"] > 0.7  # pooled
    assert not report["per_finding"]["Shortcut"]["assessed"] and report["per_finding"]["Real"]["assessed"]
    assert report["per_finding"]["Shortcut"]["evidence_basis"] == "within-source pairs"
    evidence = O.assessment(fitted, ["Shortcut", "Real"], y, 3)
    assert evidence["Shortcut"]["auc_ci"][0] <= 0.5 < evidence["Real"]["auc_ci"][0]
    assert "within each source: images-512, images-64" in evidence["Shortcut"]["source"]
    assert set(report["by_source"]) == {"images-512", "images-64"} and report["within_source"]["macro_auc_ci"]
    assert report["flags_per_film"]["cross_fitted"] <= report["flags_per_film"]["if_every_finding_were_assessed"]
