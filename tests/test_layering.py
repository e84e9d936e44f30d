"""The dependency rules (import-linter contracts in pyproject.toml) and ruff, as tests: `make test` runs both
before pytest too, and here their report shows in pytest's output next to the test that names it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    tool = BIN / name
    if not tool.exists():
        pytest.fail(f"{tool} not found: it is pinned in requirements.lock; run `make setup`")
    return subprocess.run([tool, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    run = run_tool("lint-imports", "--no-cache")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_ruff_finds_nothing():
    run = run_tool("ruff", "check", "--no-cache", "--output-format", "concise")
    assert run.returncode == 0, run.stdout + run.stderr


def test_only_settings_reads_the_environment():
    """One place to look for every knob: `cxr.settings` (CXR_DATA, CXR_MODEL, CXR_CACHE, PORT, ...)."""
    offenders = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                 for path in sorted((ROOT / "src" / "cxr").rglob("*.py")) if path.name != "settings.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if "os.environ" in line or "getenv" in line or "envvar=" in line]
    assert not offenders, "read these through cxr.settings:\n" + "\n".join(offenders)
