import numpy as np

from cxr.evaluation import metrics
from cxr.evaluation import modelcard
from cxr.findings import DISPLAY_NAMES, FINDINGS
from cxr.meta import ModelMeta
from conftest import make_meta


def _meta() -> ModelMeta:
    rng = np.random.default_rng(0)
    y = (rng.random((60, 14)) < 0.3).astype(np.uint8)
    p = np.clip(y * 0.3 + rng.random((60, 14)) * 0.7, 0, 1).astype(np.float32)
    summary = metrics.summarize(y, p, FINDINGS, n_boot=50)
    return make_meta(metrics=summary,
                     provenance={"command": "cxr train --data X", "split": {"kind": "patient", "seed": 0}})


def test_card_states_data_metrics_use_and_not_for_clinical_use():
    meta = _meta()
    text = modelcard.render(meta)
    assert "Not for clinical use" in text
    assert "cxr train --data X" in text and "`patient`" in text
    assert f"Macro AUC {meta.metrics['macro_auc']:.3f}" in text
    for f in FINDINGS:
        auc = meta.metrics["per_finding"][f]["auc"]
        assert f"| {DISPLAY_NAMES[f]} | " in text and f"{auc:.2f}" in text
    assert "Intended use" in text and "Limitations" in text


def test_summary_is_what_the_page_shows():
    s = modelcard.summary(_meta())
    assert s["not_for_clinical_use"] is True
    assert set(s["per_finding_auc"]) == set(FINDINGS)
    assert s["macro_auc_ci"] is not None and len(s["macro_auc_ci"]) == 2


def test_card_explains_films_outnumbering_the_split_names():
    """The same film under two --data sources (512 px and 64 px) is one name in the split, two training films."""
    import dataclasses

    meta = _meta()
    split = {"kind": "all", "seed": 0, "sizes": {"train": 1239, "val": 0, "test": 0}}
    text = modelcard.render(dataclasses.replace(meta, provenance={**meta.provenance, "split": split, "n_train": 1242}))
    assert "Training films: 1242 (3 image names found under two --data sources" in text
    same = {**meta.provenance, "split": dict(split, sizes={"train": 1242}), "n_train": 1242}
    assert "two --data sources" not in modelcard.render(dataclasses.replace(meta, provenance=same))


def test_an_ensemble_card_says_how_many_networks_and_what_each_was_trained_on():
    import dataclasses

    meta = _meta()
    assert "ensemble" not in modelcard.render(meta)
    split = {"kind": "cv-ensemble", "seed": 0, "sizes": {"train": 1239, "val": 0, "test": 0},
             "members": [{"n_train": 827}, {"n_train": 828}, {"n_train": 829}]}
    text = modelcard.render(dataclasses.replace(meta, members=3, provenance={**meta.provenance, "split": split,
                                                                            "n_train": 1242}))
    assert "An ensemble of 3 such networks" in text and "mean of their logits" in text
    assert "each trained on 827, 828, 829 films" in text and "Training films: 1242 (3 image names" in text
    assert "flags fewer findings per film than those figures show" in text


def test_a_frozen_body_and_a_shared_body_are_said_on_the_card():
    import dataclasses

    meta = _meta()
    config = {"weights": "imagenet", "epochs": 0, "head_epochs": 16}
    frozen = dataclasses.replace(meta, provenance={**meta.provenance, "config": config})
    assert "Body: its imagenet weights, frozen (BatchNorm statistics included); only the head was trained " \
           "(16 epochs)." in modelcard.render(frozen)
    tuned = dataclasses.replace(meta, provenance={**meta.provenance, "config": dict(config, epochs=3)})
    assert "frozen" not in modelcard.render(tuned)
    split = {"kind": "cv-ensemble", "seed": 0, "members": [{"n_train": 827}, {"n_train": 828}]}
    shared = dataclasses.replace(frozen, members=2, shared_body=True,
                                 provenance={**frozen.provenance, "split": split})
    assert "fold models), sharing one frozen body (stored and run once; each has its own head)" in modelcard.render(shared)
