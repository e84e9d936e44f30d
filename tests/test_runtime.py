"""The torch-free runtime end to end: `cxr serve`'s app and `cxr predict` on a model with its ONNX artefacts,
in a fresh interpreter where torch, torchvision, Lightning (and pandas, scikit-learn, matplotlib, captum)
cannot be imported; the Predictor's two engines agree; a model without artefacts falls back to torch and
says so; the numpy heatmap helpers match the torch and matplotlib ones they replace."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr.explain import gradcam, maps
from cxr.inference import artefacts, export
from cxr.inference.predictor import TOLERANCE, Predictor
from conftest import save_random_model

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128
REQUESTS = 20

# argv: checkpoint (or "bundled"), film, output folder. Prints one JSON line.
SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys
    HEAVY = ("torch", "torchvision", "lightning", "pytorch_lightning", "pandas", "sklearn", "matplotlib", "captum")
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError(f"{name} is blocked: the runtime must not import it")
    sys.meta_path.insert(0, Block())
    from pathlib import Path
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner
    from cxr.cli import app as cli
    from cxr.web.app import create_app
    model, film, out = (None if sys.argv[1] == "bundled" else sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    app = create_app(model=model, threads=1)
    statuses, heatmaps, probs = [], set(), None
    with TestClient(app) as client:
        health = client.get("/healthz").status_code
        data = Path(film).read_bytes()
        for _ in range(int(sys.argv[4])):
            r = client.post("/api/v1/predict?heatmaps=all", files={"file": ("film.png", data, "image/png")})
            statuses.append(r.status_code)
            body = r.json()
            heatmaps |= set(body.get("heatmaps") or {})
            probs = {f["name"]: f["probability"] for f in body.get("findings", [])}
    args = ["predict", film, "--format", "json", "--out", str(out / "p.json"), "--heatmaps", str(out / "maps"),
            "--threads", "1"] + (["--model", model] if model else [])
    result = CliRunner().invoke(cli, args)
    print(json.dumps({"health": health, "statuses": statuses, "heatmaps": sorted(heatmaps), "api": probs,
                      "torch_free": app.state.predictor.torch_free, "cli_exit": result.exit_code,
                      "cli_output": result.output[-2000:], "overlays": len(list((out / "maps").rglob("*.png"))),
                      "heavy": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)}))
""")


def _run_blocked(model: str, film: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([sys.executable, "-c", SCRIPT, model, str(film), str(out), str(REQUESTS)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def _check(got: dict, out: Path, outputs: int) -> None:
    assert got["heavy"] == []  # no torch (nor the training stack) after serving and predicting
    assert got["torch_free"] and got["health"] == 200
    assert got["statuses"] == [200] * REQUESTS
    assert len(got["heatmaps"]) == outputs and got["overlays"] == outputs
    assert got["cli_exit"] == 0, got["cli_output"]
    cli = json.loads((out / "p.json").read_text())[0]
    assert cli["status"] == "ok" and cli["heatmaps"] == got["heatmaps"]
    # The page's numbers and the command line's are the same numbers.
    assert cli["probabilities"] == pytest.approx(got["api"], abs=1e-6)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    ckpt = save_random_model(tmp_path_factory.mktemp("runtime") / "tiny.safetensors", size=SIZE)
    export.export_artefacts(ckpt)
    return ckpt


def test_serve_and_predict_a_random_model_without_torch(exported, first_film_512, tmp_path):
    got = _run_blocked(str(exported), first_film_512, tmp_path)
    _check(got, tmp_path, 14)


def test_serve_and_predict_the_bundled_model_with_its_shipped_artefacts(first_film_512, tmp_path):
    from cxr import settings as config

    assert artefacts.stale_reason(config.BUNDLED_MODEL) is None  # shipped and fresh: `cxr export` after a change
    got = _run_blocked("bundled", first_film_512, tmp_path)
    _check(got, tmp_path, 14)


def test_both_engines_give_the_same_probabilities_gate_and_heatmaps(exported, images_512):
    films = sorted(images_512.glob("*.png"))[:3]
    fast, slow = Predictor(exported, threads=1), Predictor(exported, backend="torch", threads=1)
    assert fast.torch_free and fast.model is None and not slow.torch_free
    a, b = fast.predict(films, heatmaps=True), slow.predict(films, heatmaps=True)
    for p, q in zip(a, b):
        assert p.status == q.status == "ok"
        assert p.probabilities == pytest.approx(q.probabilities, abs=TOLERANCE["onnx"])
        assert set(p.heatmaps) == set(q.heatmaps)
        for name in p.heatmaps:
            assert p.heatmaps[name].shape == q.heatmaps[name].shape == (512, 512)
            np.testing.assert_allclose(p.heatmaps[name], q.heatmaps[name], atol=2e-3)


def test_a_model_without_artefacts_runs_on_torch_and_says_so_once(tmp_path, first_film_512, caplog):
    ckpt = save_random_model(tmp_path / "plain.safetensors", size=SIZE)
    with caplog.at_level(logging.WARNING, logger="cxr.inference"):
        first, again = Predictor(ckpt, threads=1), Predictor(ckpt, threads=1)
    assert not first.torch_free and first.model is not None
    said = [r.getMessage() for r in caplog.records if "plain.safetensors" in r.getMessage()]
    assert len(said) == 1 and f"cxr export --model {ckpt}" in said[0] and "does not exist" in said[0]
    assert first.predict_one(first_film_512).status == again.predict_one(first_film_512).status == "ok"
    export.export_artefacts(ckpt)
    assert Predictor(ckpt, threads=1).torch_free  # exported: the runtime from now on
    assert not Predictor(ckpt, precision="bf16").torch_free  # bf16 needs torch


def test_numpy_upsample_and_colour_table_match_torch_and_matplotlib():
    import matplotlib

    rng = np.random.default_rng(0)
    cams = rng.random((2, 3, 4, 4), dtype=np.float32)
    for size in [(512, 512), (300, 170), (4, 4), (3, 9)]:
        np.testing.assert_allclose(maps.upsample(cams, size), gradcam.upsample(torch.from_numpy(cams), size).numpy(),
                                   atol=1e-5)
    heat = np.concatenate([np.linspace(0, 1, 2001, dtype=np.float32), [0.0, 1.0, 0.5]]).reshape(1, -1)
    want = (matplotlib.colormaps["jet"](heat)[..., :3] * 255 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(maps.colorize(heat), want)


def test_serve_workers_build_their_app_from_the_options_serve_sets(exported, monkeypatch):
    from cxr import settings
    from cxr.cli.serve import worker_app

    monkeypatch.delenv("CXR_SERVE_OPTIONS", raising=False)
    settings.set_serve_options({"model": str(exported), "concurrency": 2, "queue": 3, "threads": 1})
    try:
        app = worker_app()
    finally:
        monkeypatch.delenv("CXR_SERVE_OPTIONS", raising=False)
    assert app.state.predictor.path == exported and app.state.predictor.torch_free
    assert (app.state.admission.slots, app.state.admission.limit) == (2, 5)
