"""DICOM films through pydicom: header checks before any pixel is read, modality LUT (slope/intercept),
MONOCHROME1 inversion, VOI LUT or window, then [0, 1]. Used by `images.read_image`, which sniffs DICOM."""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO

import numpy as np

from cxr.images.errors import FIX, CorruptImageError, ImageError, NotAnImageError, UnsupportedImageError
from cxr.images.pillow import min_max
from cxr.images.sniff import Limits, check_size


def read_dicom(fp: BinaryIO, label: str, limits: Limits, *, force: bool) -> np.ndarray:
    import pydicom  # about a second to import: only films that need it pay for it

    try:
        # Large values (the pixels) stay on disk until asked for, so the header is checked first.
        ds = pydicom.dcmread(fp, force=force, defer_size="256 KB")
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for a bad header
        if force:  # it only looked like DICOM
            raise NotAnImageError(f"{label}: not an image (unrecognised data); {FIX}") from None
        raise CorruptImageError(f"{label}: DICOM header cannot be read ({e}); re-export the study") from None
    _check_dicom_header(ds, label, limits)
    _check_decoder(ds, label)
    try:
        gray = _dicom_gray(ds.pixel_array, ds, label)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - short pixel data, bad LUTs, decoder failures
        raise CorruptImageError(f"{label}: DICOM pixel data cannot be decoded ({e}); re-export the study") from None
    if gray.ndim != 2:
        raise UnsupportedImageError(f"{label}: DICOM pixel data has shape {gray.shape}, not one 2-D film")
    return gray


def _check_dicom_header(ds, label: str, limits: Limits) -> None:
    """Pixels present, one frame, a size within limits: all from the header, before any pixel is read."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        # pydicom stops quietly where a file is cut or garbled: an image class without pixels means damage.
        sop = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
        if "Rows" in ds or (sop is not None and "Image Storage" in sop.name):
            raise CorruptImageError(
                f"{label}: this DICOM image has no Pixel Data: the file is truncated or damaged; re-export the study"
            )
        raise NotAnImageError(
            f"{label}: this DICOM holds no image (no Pixel Data: a report or presentation state?); "
            "send the image file of the study"
        )
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as e:
        raise CorruptImageError(f"{label}: DICOM header is incomplete ({e}); re-export the study") from None
    if frames > 1:
        raise UnsupportedImageError(
            f"{label}: the DICOM has {frames} frames (a cine loop or volume); cxr reads one 2-D film: "
            "export a single frame"
        )
    check_size(cols, rows, label, limits)


def _check_decoder(ds, label: str) -> None:
    """Refuse a compressed transfer syntax we cannot decode, saying what to install."""
    from pydicom import uid
    from pydicom.pixels import get_decoder

    meta = ds.file_meta  # dcmread always gives one; a bare dataset's is empty
    if "TransferSyntaxUID" not in meta:  # pydicom saw how the bare dataset was encoded
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (uid.ImplicitVRLittleEndian if implicit else
                                  uid.ExplicitVRLittleEndian if little is not False else uid.ExplicitVRBigEndian)
    tsyntax = meta.TransferSyntaxUID
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise UnsupportedImageError(
            f"{label}: DICOM transfer syntax {tsyntax.name} cannot be decoded; export the study uncompressed"
        ) from None
    if decoder.is_available:
        return
    hint = ("pip install pylibjpeg pylibjpeg-openjpeg" if "JPEG 2000" in tsyntax.name else
            "pip install pylibjpeg pylibjpeg-libjpeg" if "JPEG" in tsyntax.name else
            "install one of: " + "; ".join(decoder.missing_dependencies))
    raise UnsupportedImageError(
        f"{label}: DICOM pixel data is compressed as {tsyntax.name} and no decoder for it is installed; {hint}"
    )


def _dicom_gray(arr: np.ndarray, ds, label: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        gray = _monochrome(arr, ds)
        if photometric == "MONOCHROME1":  # stored with white = low: invert after the VOI, as viewers do
            np.subtract(np.float32(1), gray, out=gray)
        return gray
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return _luma(rgb, np.iinfo(rgb.dtype).max)
    if arr.ndim == 3 and arr.shape[-1] == 3:  # RGB, and YBR_* that pydicom has converted to RGB
        return _luma(arr, 2 ** int(ds.get("BitsStored", 8)) - 1)
    raise UnsupportedImageError(f"{label}: DICOM photometric interpretation {photometric} is not supported")


def _luma(rgb: np.ndarray, full_scale: float) -> np.ndarray:
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    gray = (0.299 * r + 0.587 * g + 0.114 * b) / np.float32(full_scale)
    return np.clip(gray, 0.0, 1.0, out=gray)


def _monochrome(arr: np.ndarray, ds) -> np.ndarray:
    """Modality LUT (rescale), then the VOI (LUT or window); min-max where the file gives no VOI."""
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(arr, ds)
    gray = _voi(values, ds)
    if gray is not None:
        return gray
    bits = int(ds.get("BitsStored", 8))
    slope, intercept = float(ds.get("RescaleSlope") or 1), float(ds.get("RescaleIntercept") or 0)
    identity = "ModalityLUTSequence" not in ds and slope == 1 and intercept == 0
    if bits <= 8 and arr.dtype.kind == "u" and identity:
        # 8-bit pixels are display values already, like a PNG's; stretching them would change the film.
        return np.divide(arr, np.float32(2**bits - 1), dtype=np.float32)
    return min_max(values)  # deeper films rarely fill their bit range: stretch what is there


def _voi(values: np.ndarray, ds) -> np.ndarray | None:
    """The first VOI LUT, else the first window, mapped straight to [0, 1]; None when there is neither.

    Done here, not by pydicom's apply_voi_lut: its output range must be rebuilt from BitsStored and the
    rescale to normalise it, and pydicom 3.0 indexes 8-bit LUTs with uint8 (wrong past 256 entries).
    """
    seq = ds.get("VOILUTSequence")
    if seq and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]:
        return _voi_lut(values, seq[0], little_endian=ds.original_encoding[1] is not False)
    center, width = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
    if center is None or width is None:
        return None
    func = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
    x = np.asarray(values, dtype=np.float32)
    if func == "SIGMOID" and width > 0:
        return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))).astype(np.float32)
    if func == "LINEAR_EXACT" and width > 0:
        gray = (x - np.float32(center)) / np.float32(width) + np.float32(0.5)
    elif width > 1:  # LINEAR (PS3.3 C.11.2.1.2.1), also for unknown functions, as viewers do
        gray = (x - np.float32(center - 0.5)) / np.float32(width - 1) + np.float32(0.5)
    elif width == 1:
        gray = (x > center - 0.5).astype(np.float32)  # a one-value window is a threshold
    else:
        return None  # a nonsensical width: better the whole range than nothing
    return np.clip(gray, 0.0, 1.0, out=gray)


def _voi_lut(values: np.ndarray, item, *, little_endian: bool) -> np.ndarray:
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):  # VR OW: raw 16-bit words
        lut = np.frombuffer(data, dtype="<u2" if little_endian else ">u2")
    else:
        lut = np.atleast_1d(np.asarray(data))
    lut = lut[: entries or 65536].astype(np.float32)
    # Some writers declare fewer bits than their entries use: never let white exceed 1.
    full_scale = max(float(2**bits - 1), float(lut.max()), 1.0)
    lut /= np.float32(full_scale)
    index = np.rint(values) if values.dtype.kind == "f" else values.astype(np.int64)
    index = np.clip(index - first, 0, len(lut) - 1).astype(np.intp)
    return lut[index]


def _first_number(value) -> float | None:
    """A DS value (one number or several, one per alternative view): the first, or None if unusable."""
    if isinstance(value, Sequence) and not isinstance(value, str):  # pydicom's MultiValue
        value = value[0] if len(value) else None
    try:
        return float(value)
    except (TypeError, ValueError):  # None, '' or junk
        return None
