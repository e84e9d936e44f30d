"""Films in a folder: which files are films, and the one walk that finds them by file name."""

from __future__ import annotations

import os
from pathlib import Path

from cxr.errors import DataError

FILM_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".dcm", ".dicom"})


def _is_dicom(path: Path) -> bool:
    """DICOM files from archives often have no extension; the standard puts b'DICM' at byte 128."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_film_file(path: Path) -> bool:
    """What a folder scan takes as a film: a film suffix, or no suffix and DICOM's magic; never hidden
    files ('._x.png' are macOS resource forks, not images)."""
    suffix = path.suffix.lower()
    return not path.name.startswith(".") and (suffix in FILM_SUFFIXES or (not suffix and _is_dicom(path)))


def find_films(root: str | os.PathLike) -> tuple[dict[str, Path], list[Path]]:
    """PNG/JPEG/DICOM files under `root` (recursively) by file name, and the other files (ignored).

    Films are known by file name alone (NIH's 00000001_000.png), so two files of the same name in
    different subfolders are an error rather than one silently shadowing the other.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give the folder that holds the films (PNG, JPEG or DICOM)")
    films: dict[str, Path] = {}
    ignored: list[Path] = []
    clashes: list[tuple[Path, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not is_film_file(path):
                ignored.append(path)
            elif name in films:
                clashes.append((films[name], path))
            else:
                films[name] = path
    if clashes:
        a, b = clashes[0]
        raise DataError(
            f"{root}: {len(clashes)} file name(s) occur in more than one subfolder, e.g. {a} and {b}; "
            "films are known by file name, so rename them or use the subfolders separately"
        )
    return films, ignored
