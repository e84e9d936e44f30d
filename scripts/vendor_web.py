#!/usr/bin/env python3
"""Vendor the offline page's browser runtime into src/cxr/web/static/vendor/, from npm, pinned and checked.

For each package the page needs (package.json pins the version, package-lock.json records its sha512):
`npm pack NAME@VERSION` fetches the registry tarball into a temporary folder, its sha512 is checked against
the lock (a mismatch stops here: nothing is copied), and only the files the page loads are copied out.
No CDN at run time: the service worker caches these files like the page's own. Idempotent: vendor/
carries a stamp of what it holds, and a run with the same lock does nothing. Needs node/npm (setup.sh).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENDOR = ROOT / "src" / "cxr" / "web" / "static" / "vendor"
STAMP = VENDOR / "VERSIONS.json"
# What the page loads from each package: the WASM build of onnxruntime-web only (no WebGL/WebGPU, which
# would add 30 MB to every phone's cache for nothing the page uses), and dicom-parser's minified build.
FILES = {
    "onnxruntime-web": ["dist/ort.wasm.min.js", "dist/ort-wasm-simd-threaded.mjs", "dist/ort-wasm-simd-threaded.wasm"],
    "dicom-parser": ["dist/dicomParser.min.js"],
}


def locked() -> dict[str, dict]:
    lock = json.loads((ROOT / "package-lock.json").read_text())
    pins = json.loads((ROOT / "package.json").read_text())["dependencies"]
    out = {}
    for name, version in pins.items():
        entry = lock["packages"].get(f"node_modules/{name}")
        if not entry or entry.get("version") != version or not entry.get("integrity", "").startswith("sha512-"):
            sys.exit(f"vendor_web: package-lock.json does not pin {name}@{version} with a sha512 integrity; "
                     "run `npm install --package-lock-only` after editing package.json")
        out[name] = {"version": version, "integrity": entry["integrity"]}
    return out


def fetch(name: str, pin: dict, tmp: Path) -> Path:
    """The registry tarball, checked against the lock's sha512."""
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("vendor_web: npm is not installed (Debian: apt-get install npm); the offline page needs it once")
    done = subprocess.run([npm, "pack", f"{name}@{pin['version']}", "--pack-destination", str(tmp), "--silent"],
                          cwd=tmp, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        sys.exit(f"vendor_web: npm pack {name}@{pin['version']} failed: {done.stderr.strip()[-500:]}")
    tgz = tmp / done.stdout.strip().splitlines()[-1]
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
    if digest != pin["integrity"]:
        sys.exit(f"vendor_web: {tgz.name} has {digest}, package-lock.json says {pin['integrity']}: refusing it")
    return tgz


def extract(name: str, tgz: Path) -> None:
    with tarfile.open(tgz) as tar:
        for rel in FILES[name]:
            member = tar.extractfile(f"package/{rel}")
            if member is None:
                sys.exit(f"vendor_web: {name} has no {rel}")
            (VENDOR / Path(rel).name).write_bytes(member.read())


def main() -> int:
    pins = locked()
    if STAMP.is_file() and json.loads(STAMP.read_text()) == pins and all(
            (VENDOR / Path(f).name).is_file() for files in FILES.values() for f in files):
        return 0
    VENDOR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cxr-vendor-") as tmp:
        for name, pin in pins.items():
            extract(name, fetch(name, pin, Path(tmp)))
    STAMP.write_text(json.dumps(pins, indent=1) + "\n")
    done = ", ".join(f"{n}@{p['version']}" for n, p in pins.items())
    print(f"vendor_web: {done} -> {VENDOR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
