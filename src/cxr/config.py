"""Settings that several modules share: where the data is, where the bundled model is, input limits."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent.parent

# The bundled demonstration model: weights (safetensors with JSON metadata) and its model card.
BUNDLED_MODEL = PACKAGE_DIR / "models" / "cxr-demo.safetensors"

# Inputs: refuse films too small to read and headers that promise a decompression bomb.
MIN_SIDE = 64
MAX_PIXELS = 64_000_000  # 8000 x 8000; NIH films are 1024 x 1024, scanned originals up to ~3000 x 3000
MAX_UPLOAD_BYTES = 32 * 1024 * 1024


def data_dir() -> Path:
    """ChestX-ray14 folder: $CXR_DATA, else ../shared/data/nih beside the repository."""
    env = os.environ.get("CXR_DATA")
    if env:
        return Path(env).expanduser()
    return (REPO_DIR.parent / "shared" / "data" / "nih").resolve()
