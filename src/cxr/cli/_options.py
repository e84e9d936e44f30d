"""The flags every long-running command shares, defined once so that their spellings and meanings agree.

--progress/--no-progress: a progress bar on standard error. --workers: processes that decode films.
--threads: compute threads (torch or ONNX Runtime). --out: where the command writes. tests/test_cli.py
walks the app and holds every command to these.
"""

from __future__ import annotations

from typing import Any

import typer

PROGRESS_HELP = "Progress bar on standard error (drawn only on a terminal)."
# --workers counts worker processes everywhere (as in uvicorn and DataLoader); each command says what they do.
WORKERS_HELP = "Worker processes"
THREADS_HELP = "Compute threads"

# The commands that can run for minutes: each takes --progress/--no-progress, --out, and --workers or --threads.
LONG_RUNNING = ("prepare", "train", "evaluate", "predict", "explain", "lr-find", "gate-fit")


def progress() -> Any:
    return typer.Option(True, "--progress/--no-progress", help=PROGRESS_HELP)


def workers(default: int | None = None, when_unset: str = "one per CPU core") -> Any:
    return typer.Option(default, "--workers", min=0, help=f"{WORKERS_HELP} decoding films (default: {when_unset}).")


def threads(when_unset: str = "one per CPU core") -> Any:
    return typer.Option(None, "--threads", min=1, help=f"{THREADS_HELP} (default: {when_unset}).")


def progress_bar(label: str, show: bool):
    """A rich progress bar on standard error, drawn only on a terminal and only if asked for."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console,
                    disable=not (show and console.is_terminal))
