"""`pip install .` (not editable) into a fresh venv, then `cxr predict` and `cxr serve` from another directory:
the installed package finds its bundled model and its page through importlib.resources, not the source tree."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv holding a plain install of cxr built from a copy of the source tree (so the build leaves
    nothing in the checkout). The heavy dependencies are this environment's, reached through a .pth line:
    a venv made from a venv's python with --system-site-packages sees the base interpreter's packages only,
    and a plain path line (unlike `site.addsitedir`) does not run this environment's editable-install hook."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))

    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_reuse_test_env.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", source], check=True, cwd=tmp)
    shutil.rmtree(source)  # the installed package must not need its source
    return venv


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> Path:
    """A working directory with no source tree in it or above it."""
    return tmp_path_factory.mktemp("elsewhere")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("cache")
    drop = {"PYTHONPATH", "CXR_MODEL", "VIRTUAL_ENV"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "CXR_CACHE": str(cache)}


@pytest.fixture(scope="module")
def film(first_film_512) -> Path:
    return first_film_512


def test_installed_package_is_the_one_used(venv, elsewhere, env):
    code = ("import json, cxr, cxr.settings as s; print(json.dumps([cxr.__file__, str(s.BUNDLED_MODEL), "
            "s.BUNDLED_MODEL.is_file(), (s.STATIC_DIR / 'index.html').is_file(), s.MODEL_CARD.is_file()]))")
    out = subprocess.run([venv / "bin" / "python", "-c", code], cwd=elsewhere, env=env,
                         check=True, capture_output=True, text=True).stdout
    module, model, has_model, has_page, has_card = json.loads(out)
    assert Path(module).is_relative_to(venv) and not Path(module).is_relative_to(ROOT), module
    assert Path(model).is_relative_to(venv), model
    assert has_model and has_page and has_card


def test_installed_cxr_predict_reads_a_film(venv, elsewhere, env, film):
    shutil.copy2(film, elsewhere / "film.png")
    run = subprocess.run([venv / "bin" / "cxr", "predict", "film.png", "--format", "json", "--no-progress"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    [row] = json.loads(run.stdout)
    assert row["status"] == "ok", row
    assert len(row["probabilities"]) == 14 and all(0 <= p <= 1 for p in row["probabilities"].values())


def test_installed_cxr_serve_answers(venv, elsewhere, env, film):
    port = free_port()
    proc = subprocess.Popen([venv / "bin" / "cxr", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        health = wait_for(f"{base}/healthz", proc)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        page = httpx.get(f"{base}/", timeout=10)
        assert page.status_code == 200 and "not for clinical use" in page.text.lower()
        assert httpx.get(f"{base}/static/app.js", timeout=10).status_code == 200
        answer = httpx.post(f"{base}/api/v1/predict", timeout=120,
                            files={"file": ("film.png", film.read_bytes(), "image/png")})
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["findings"]) == 14
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert "Traceback" not in out, out


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 120) -> httpx.Response:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"`cxr serve` did not answer {url}: {proc.communicate()[0].decode(errors='replace')}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
