"""`cxr`: the command line. Each concern registers its commands from its own file in this package."""

from __future__ import annotations

import glob
import importlib
import os
import pkgutil
import sys

import typer

from cxr import settings
from cxr.errors import CxrError

app = typer.Typer(
    name="cxr",
    help="Read chest X-rays: 14 findings, heatmaps, training and evaluation on ChestX-ray14. Not for clinical use.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Every public module in this package defines `register(app)`; heavy imports stay inside the commands.
# Private modules (_options) hold what the commands share.
for _mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}").register(app)


def _preload_tcmalloc() -> None:
    """Re-exec under tcmalloc: glibc malloc halves PyTorch's CPU speed on this kind of machine."""
    libs = glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4")
    env = settings.tcmalloc_env(libs[0]) if libs else None
    if env is not None and sys.argv and os.path.exists(sys.argv[0]):
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    _preload_tcmalloc()
    try:
        app()
    except CxrError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
