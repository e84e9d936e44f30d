"""`cxr`: the command line. Each concern registers its commands from its own file in this package."""

from __future__ import annotations

import glob
import importlib
import os
import pkgutil
import sys

import typer

from cxr.errors import CxrError

app = typer.Typer(
    name="cxr",
    help="Read chest X-rays: 14 findings, heatmaps, training and evaluation on ChestX-ray14. Not for clinical use.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Every module in this package defines `register(app)`; heavy imports stay inside the commands.
for _mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_mod.name}").register(app)


def _preload_tcmalloc() -> None:
    """Re-exec under tcmalloc: glibc malloc halves PyTorch's CPU speed on this kind of machine."""
    if os.environ.get("CXR_NO_TCMALLOC") or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    libs = glob.glob("/usr/lib/*/libtcmalloc_minimal.so.4")
    if libs and sys.argv and os.path.exists(sys.argv[0]):
        env = dict(os.environ, LD_PRELOAD=":".join(filter(None, [libs[0], os.environ.get("LD_PRELOAD")])))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    _preload_tcmalloc()
    try:
        app()
    except CxrError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
