"""Settings: the only module that reads environment variables; where the bundled model and page are; input limits."""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

from cxr.errors import CxrError


def _resource(*parts: str) -> Path:
    """A file shipped inside the package, found through importlib.resources so that an installed wheel
    (not only a source checkout) finds it. Wheels install unzipped, so the resource is a real path."""
    return Path(str(resources.files("cxr").joinpath(*parts)))


PACKAGE_DIR = _resource()
# Only meaningful in a source checkout: the default data folder sits beside the repository.
REPO_DIR = PACKAGE_DIR.parent.parent

# The bundled demonstration model: weights (safetensors with JSON metadata) and its model card.
BUNDLED_MODEL = _resource("assets", "cxr-demo.safetensors")
MODEL_CARD = _resource("assets", "MODEL_CARD.md")
# The web page (index.html, script, styles) served at / and /static.
STATIC_DIR = _resource("web", "static")

# Inputs: refuse films too small to read and headers that promise a decompression bomb.
MIN_SIDE = 64
MAX_PIXELS = 64_000_000  # 8000 x 8000; NIH films are 1024 x 1024, scanned originals up to ~3000 x 3000
MAX_UPLOAD_BYTES = 32 * 1024 * 1024


def _env(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The variable's value stripped, '' when unset (an empty variable means unset, as shells treat it)."""
    return (os.environ if environ is None else environ).get(name, "").strip()


def data_dir() -> Path:
    """ChestX-ray14 folder: $CXR_DATA, else ../shared/data/nih beside the repository."""
    env = _env("CXR_DATA")
    if env:
        return Path(env).expanduser()
    return (REPO_DIR.parent / "shared" / "data" / "nih").resolve()


def model_from_env() -> Path | None:
    """$CXR_MODEL: the checkpoint `cxr serve` runs when --model is not given (None: the bundled model)."""
    env = _env("CXR_MODEL")
    return Path(env).expanduser() if env else None


def serve_options() -> dict:
    """$CXR_SERVE_OPTIONS: the JSON of `cxr serve`'s options, which it sets for its --workers processes."""
    import json

    raw = _env("CXR_SERVE_OPTIONS")
    try:
        options = json.loads(raw) if raw else {}
    except ValueError:
        raise CxrError(f"$CXR_SERVE_OPTIONS is not JSON ({raw[:80]!r}); unset it, `cxr serve` sets it") from None
    if not isinstance(options, dict):
        raise CxrError("$CXR_SERVE_OPTIONS must be a JSON object; unset it, `cxr serve` sets it")
    return options


def set_serve_options(options: dict) -> None:
    """For `cxr serve --workers`: the options its spawned worker processes read back (serve_options)."""
    import json

    os.environ["CXR_SERVE_OPTIONS"] = json.dumps(options)


def cache_dir() -> Path:
    """Where exported ONNX models are cached: $CXR_CACHE, else $XDG_CACHE_HOME/cxr, else ~/.cache/cxr."""
    env = _env("CXR_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(_env("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxr"


def models_dir() -> Path:
    """Where `cxr models` and `--model NAME` look, and `cxr import` writes: $CXR_MODELS, else
    $XDG_DATA_HOME/cxr/models, else ~/.local/share/cxr/models."""
    env = _env("CXR_MODELS")
    if env:
        return Path(env).expanduser()
    return Path(_env("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "cxr" / "models"


def imagenet_weights() -> Path | None:
    """$CXR_IMAGENET_WEIGHTS: DenseNet-121's ImageNet file when it is not in torch hub's cache."""
    env = _env("CXR_IMAGENET_WEIGHTS")
    return Path(env).expanduser() if env else None


def port(environ: Mapping[str, str] | None = None) -> int | None:
    """$PORT (Heroku and most container platforms set it), None when unset. A malformed value is an error,
    not a silent fallback: the platform would route to a port nobody listens on."""
    raw = _env("PORT", environ)
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise CxrError(f"PORT={raw!r} is not a port number (1-65535); set PORT or pass --port")
    return int(raw)


def tcmalloc_env(library: str) -> dict[str, str] | None:
    """The environment to re-exec `cxr` in with `library` (tcmalloc) preloaded, or None where that is not
    wanted ($CXR_NO_TCMALLOC set) or already done (tcmalloc in $LD_PRELOAD)."""
    preload = _env("LD_PRELOAD")
    if _env("CXR_NO_TCMALLOC") or "tcmalloc" in preload:
        return None
    return dict(os.environ, LD_PRELOAD=":".join(filter(None, [library, preload])))
