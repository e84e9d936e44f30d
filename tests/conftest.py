"""Shared fixtures. Real-data tests find ChestX-ray14 through $CXR_DATA (default ../shared/data/nih).

Where the data is absent (an outside contributor's machine) they skip with the reason; with
CXR_REQUIRE_DATA=1 (set by .ci/run) a missing folder is a failure instead, so CI never skips them.

Models: `make_meta` (a valid ModelMeta for a registered task) and `save_random_model` (a seeded, randomly
initialised checkpoint, by default EfficientNet-Lite0 at 128 px: fast on 2 cores) are the one copy of what
test files used to build for themselves; import them with `from conftest import make_meta, save_random_model`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxr.settings import data_dir

TINY_ARCH, TINY_SIZE = "efficientnet_lite0", 128

# Keep the 2-core CI machine responsive when pytest-xdist runs two workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _need(path: Path, what: str) -> Path:
    if path.exists():
        return path
    reason = f"{what} not found at {path}: set CXR_DATA to the ChestX-ray14 folder (see README)"
    if os.environ.get("CXR_REQUIRE_DATA"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def nih_dir() -> Path:
    return _need(data_dir(), "ChestX-ray14 data folder")


@pytest.fixture(scope="session")
def metadata_csv(nih_dir: Path) -> Path:
    return _need(nih_dir / "Data_Entry_2017_v2020.csv.gz", "ChestX-ray14 metadata")


@pytest.fixture(scope="session")
def images_512(nih_dir: Path) -> Path:
    return _need(nih_dir / "images-512", "512 px films")


@pytest.fixture(scope="session")
def images_1024(nih_dir: Path) -> Path:
    return _need(nih_dir / "images-1024", "full-size films")


@pytest.fixture(scope="session")
def images_64(nih_dir: Path) -> Path:
    return _need(nih_dir / "images-64", "64 px films")


@pytest.fixture(scope="session")
def first_film_512(images_512: Path) -> Path:
    """The first 512 px film by name: the film tests use when any real film will do."""
    return sorted(images_512.glob("*.png"))[0]


# ------------------------------------------------------------------------------------------------- models


def make_meta(arch: str = TINY_ARCH, task: str = "multilabel", size: int | None = None, **kw):
    """A valid ModelMeta: the task's outputs and activation (from the task registry), the architecture's
    normalisation unless given; `size` None keeps ModelMeta's default input size."""
    from cxr import nets
    from cxr.meta import ModelMeta
    from cxr.tasks import get_task

    task_ = get_task(task)
    kw.setdefault("normalisation", nets.default_normalisation(arch))
    if size is not None:
        kw["input_size"] = size
    return ModelMeta(arch=arch, task=task, outputs=list(task_.outputs), activation=task_.activation, **kw)


def assessed_everywhere(task: str = "multilabel", ci=(0.6, 0.8)) -> dict:
    """ModelMeta.assessment saying every reported finding of `task` is assessed (AUC CI above 0.5): a random
    model's findings are otherwise all "not assessed", never positive."""
    from cxr.tasks import get_task

    return {f: {"auc": sum(ci) / 2, "auc_ci": list(ci), "n_positive": 50, "n_negative": 200,
                "source": "test fixture"} for f in get_task(task).reported}


def save_random_model(path: Path, arch: str = TINY_ARCH, task: str = "multilabel", size: int = TINY_SIZE,
                      *, seed: int = 0, **meta_kw) -> Path:
    """A randomly initialised (seeded, so reproducible) checkpoint at `path`; `meta_kw` go to ModelMeta
    (thresholds, metrics, provenance...). Its name is the file's stem (what /healthz and the page show)."""
    import torch

    from cxr import nets

    meta = make_meta(arch, task, size, **meta_kw)
    torch.manual_seed(seed)
    return nets.save(path, nets.build(arch, len(meta.outputs)), meta)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """save_random_model into a fresh temporary folder: `tiny_model_factory("name", **kw) -> path`."""
    def make(name: str = "tiny-lite0", **kw) -> Path:
        return save_random_model(tmp_path_factory.mktemp("model") / f"{name}.safetensors", **kw)
    return make


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    """Every test's ONNX exports go to one temporary cache per test process: never into the user's ~/.cache,
    and each checkpoint (the bundled model's above all) is exported once per process, not once per module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXR_CACHE", str(tmp_path_factory.mktemp("onnx-cache")))
        yield


def dicom_dataset(pixels, photometric="MONOCHROME2", bits=8, **attrs):
    """A minimal digital X-ray DICOM data set (explicit VR little endian) holding `pixels` (or none)."""
    from pydicom import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "DX", "Anonymous"
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, bits)
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium driven by Playwright (never `playwright install`), one per test module."""
    from playwright.sync_api import sync_playwright

    from test_browser import ARGS, CHROMIUM

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: scripts/setup.sh installs Debian's chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def bundled():
    """The bundled model served, where its ONNX artefacts are fresh (the offline page runs them): a trained
    model, whose answers differ from film to film (a random network's collapse to one answer would make
    device-server parity prove nothing)."""
    from cxr import settings
    from cxr.inference import artefacts
    from cxr.inference.predictor import Predictor
    from cxr.web.app import create_app
    from test_browser import _serve

    if not artefacts.has_fresh_artefacts(settings.BUNDLED_MODEL):
        pytest.skip(f"the bundled model has no fresh artefacts: {artefacts.stale_reason(settings.BUNDLED_MODEL)}")
    yield from _serve(create_app(Predictor(None, threads=1)))
