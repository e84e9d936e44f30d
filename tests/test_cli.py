"""The command line as a whole: one flag vocabulary across commands, found by walking the typer app."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cxr.cli import _options as opt
from cxr.cli import app

# Spellings of the shared flags that a command might drift to; none may appear anywhere.
DRIFTED = {"--output", "-o", "--output-dir", "--out-dir", "--outdir", "--num-workers", "--n-workers", "--jobs",
           "-j", "--num-threads", "--nthreads", "--n-threads", "--quiet", "--progress-bar", "--no-progress-bar",
           "--no-bar", "--silent"}


def commands() -> dict:
    return typer.main.get_command(app).commands


def options(command) -> dict:
    """Every spelling (--x, --no-x, -x) of the command's options, to the option."""
    return {name: p for p in command.params if p.param_type_name == "option"
            for name in (*p.opts, *p.secondary_opts)}


def value_type(param) -> type | str:
    """The Python type the option converts to (this typer describes it; click-based ones name their type)."""
    described = getattr(param, "type_descriptor", None)
    if described is not None:
        return described.annotation
    return {"integer": int, "integer range": int, "path": Path, "boolean": bool}.get(param.type.name, param.type.name)


def test_every_long_running_command_takes_the_shared_flags():
    found = commands()
    for name in opt.LONG_RUNNING:
        assert name in found, f"`cxr {name}` is not a command"
        flags = options(found[name])
        progress = flags.get("--progress")
        assert progress is not None, f"`cxr {name}` has no --progress/--no-progress"
        assert progress.secondary_opts == ["--no-progress"] and progress.default is True, name
        assert "--out" in flags and value_type(flags["--out"]) is Path, f"`cxr {name}` --out"
        assert "--workers" in flags or "--threads" in flags, f"`cxr {name}` has neither --workers nor --threads"


def test_shared_flags_mean_the_same_everywhere():
    for name, command in commands().items():
        flags = options(command)
        assert not DRIFTED & set(flags), f"`cxr {name}` spells a shared flag differently: {DRIFTED & set(flags)}"
        if "--progress" in flags:
            assert flags["--progress"].help == opt.PROGRESS_HELP, name
        for flag, meaning in (("--workers", opt.WORKERS_HELP), ("--threads", opt.THREADS_HELP)):
            if flag in flags:
                assert value_type(flags[flag]) is int and flags[flag].help.startswith(meaning), f"`cxr {name}` {flag}"
        if "--out" in flags:
            assert value_type(flags["--out"]) is Path, f"`cxr {name}` --out is not a path"


def test_prepare_takes_no_progress(images_64, tmp_path):
    """The symptom the issue names: `cxr prepare --no-progress` was a usage error."""
    films = tmp_path / "films"
    films.mkdir()
    for f in sorted(images_64.glob("*.png"))[:3]:
        (films / f.name).symlink_to(f)
    result = CliRunner().invoke(app, ["prepare", str(films), "--out", str(tmp_path / "cache"), "--size", "32",
                                      "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "prepared 3" in result.stdout


@pytest.mark.parametrize("name", opt.LONG_RUNNING)
def test_help_lists_the_shared_flags(name):
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--no-progress" in result.stdout and "--out" in result.stdout
