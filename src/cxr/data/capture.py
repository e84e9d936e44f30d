"""Capture noise: what a phone does to a film, as seeded augmentations and as synthetic light-box photos.

Every function takes a float32 gray film H x W in [0, 1] and an explicit `np.random.Generator`, so the
same seed gives the same image (tests and benchmarks replay them). numpy, scipy and Pillow only (no torch):
a DataLoader worker can run these before the torch transforms, and tests can make "phone photos" of real films.

- `CaptureAugment`: a training transform; each step (JPEG 50-95, perspective, small rotation, blur,
  glare, tint, exposure, light-box border and crop) fires with its own probability, and the output keeps
  the input's shape.
- `light_box_photo`: a colour photo of the film on a light box (bright uneven border, a margin of room,
  perspective, warm tint, mild blur, optional glare) and the true quadrilateral of the film in it.
- `variants`: the named single perturbations the stability checks compare against the original.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from cxr.images.capture import Quad, homography, to_gray, warp

WARM = (1.0, 0.92, 0.78)  # a tungsten-ish white balance left uncorrected


def _pil(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32), mode="F")


def jpeg(gray: np.ndarray, rng: np.random.Generator, quality: tuple[int, int] = (50, 95)) -> np.ndarray:
    q = int(rng.integers(quality[0], quality[1] + 1))
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(gray, 0, 1) * 255).astype(np.uint8)).save(buf, "JPEG", quality=q)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255.0


def rotate(gray: np.ndarray, rng: np.random.Generator, max_deg: float = 7.0) -> np.ndarray:
    """A small tilt; corners are filled with the film's edge colour, as a light box's dark margin would be."""
    deg = float(rng.uniform(-max_deg, max_deg))
    fill = float(np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])))
    return np.asarray(_pil(gray).rotate(deg, Image.Resampling.BILINEAR, fillcolor=fill), dtype=np.float32)


def perspective(gray: np.ndarray, rng: np.random.Generator, strength: float = 0.06) -> np.ndarray:
    """Each corner moves by up to `strength` of the side: a phone not quite parallel to the film."""
    h, w = gray.shape
    rect = np.array([(0, 0), (w, 0), (w, h), (0, h)], dtype=np.float64)
    moved = rect + rng.uniform(-strength, strength, size=(4, 2)) * np.array([w, h])
    fill = float(np.median(gray[[0, -1]]))
    return warp(gray, homography(rect, moved), (w, h), fill=fill)


def blur(gray: np.ndarray, rng: np.random.Generator, sigma: tuple[float, float] = (0.4, 1.6)) -> np.ndarray:
    """Defocus or shake, in pixels of a 512-px film (scaled to the film's size)."""
    r = float(rng.uniform(*sigma)) * max(gray.shape) / 512
    return ndimage.gaussian_filter(np.asarray(gray, dtype=np.float32), r, mode="nearest")


def glare(gray: np.ndarray, rng: np.random.Generator, strength: tuple[float, float] = (0.15, 0.45)) -> np.ndarray:
    """A soft specular reflection of a ceiling light: an elliptical bright blob added to the film."""
    h, w = gray.shape
    cy, cx = rng.uniform(0.1, 0.9, size=2) * (h, w)
    sy, sx = rng.uniform(0.05, 0.2, size=2) * (h, w)
    yy, xx = np.ogrid[:h, :w]
    blob = np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
    return np.clip(gray + float(rng.uniform(*strength)) * blob, 0, 1).astype(np.float32)


def exposure(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Auto-exposure: a gain, a gamma and a lifted black level (the film's fog and the room's light)."""
    gain, gamma, lift = rng.uniform(0.75, 1.2), rng.uniform(0.8, 1.25), rng.uniform(0.0, 0.08)
    return np.clip(lift + (1 - lift) * gain * np.power(np.clip(gray, 0, 1), gamma), 0, 1).astype(np.float32)


def tint(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colour cast as the gray decode sees it: the luma of a tinted white dims the film and lifts nothing."""
    cast = np.array(WARM) ** rng.uniform(0.0, 2.0)
    return (gray * float(cast @ (0.299, 0.587, 0.114))).astype(np.float32)


def border_crop(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A badly framed capture: a strip of bright light box on some sides, or a crop into the film,
    then resized back to the input's shape."""
    h, w = gray.shape
    pad = rng.uniform(-0.06, 0.08, size=4)  # top, right, bottom, left; negative = cropped into the film
    top, right, bottom, left = (int(round(p * s)) for p, s in zip(pad, (h, w, h, w), strict=True))
    canvas = np.full((h + max(top, 0) + max(bottom, 0), w + max(left, 0) + max(right, 0)),
                     float(rng.uniform(0.85, 1.0)), dtype=np.float32)
    canvas[max(top, 0):max(top, 0) + h, max(left, 0):max(left, 0) + w] = gray
    y0, x0 = max(-top, 0), max(-left, 0)
    canvas = canvas[y0:canvas.shape[0] - max(-bottom, 0), x0:canvas.shape[1] - max(-right, 0)]
    return np.asarray(_pil(canvas).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


STEPS = {"jpeg": jpeg, "perspective": perspective, "rotate": rotate, "blur": blur, "glare": glare,
         "tint": tint, "exposure": exposure, "border": border_crop}


class CaptureAugment:
    """Training transform: gray H x W float32 in [0, 1] -> the same shape, after a random subset of STEPS.

    `p` is each step's probability (one float for all, or a dict by step name). Steps run in capture
    order: geometry, then light, then the camera's blur, then its JPEG encoder. Pass `rng` per call for
    reproducibility; without one, the transform's own generator (seeded by `seed`) is used.
    """

    ORDER = ("border", "perspective", "rotate", "glare", "tint", "exposure", "blur", "jpeg")

    def __init__(self, p: float | dict[str, float] = 0.3, seed: int | None = None):
        self.p = {k: (p.get(k, 0.0) if isinstance(p, dict) else float(p)) for k in self.ORDER}
        self.rng = np.random.default_rng(seed)

    def __call__(self, gray: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        rng = self.rng if rng is None else rng
        out = np.asarray(gray, dtype=np.float32)
        for name in self.ORDER:
            if rng.random() < self.p[name]:
                out = STEPS[name](out, rng)
        return np.clip(out, 0, 1).astype(np.float32)

    def __repr__(self) -> str:
        return f"CaptureAugment(p={self.p})"


def _illumination(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A light box's brightness: a gentle tilt and fall-off towards its edges (0.85 .. 1)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h - 0.5, xx / w - 0.5
    tilt = rng.uniform(-0.06, 0.06, size=2)
    fall = 1 - float(rng.uniform(0.05, 0.15)) * (xx ** 2 + yy ** 2) * 2
    return np.clip(fall + tilt[0] * xx + tilt[1] * yy, 0.8, 1.0) * float(rng.uniform(0.9, 1.0))


def light_box_photo(gray: np.ndarray, rng: np.random.Generator, *, size: tuple[int, int] = (720, 960),
                    film_fraction: tuple[float, float] = (0.55, 0.75), tilt_deg: float = 5.0,
                    perspective: float = 0.05, glare_p: float = 0.5, jpeg_quality: tuple[int, int] = (75, 95),
                    ) -> tuple[np.ndarray, Quad]:
    """A colour phone photo (H x W x 3 float32 in [0, 1]) of `gray` on a light box, and where the film is.

    The film transmits the box's light (photo = light x (fog + film)), so it never outshines the border;
    the box sits on a darker table with a margin of room around it; the whole plane is seen in perspective.
    """
    wp, hp = size
    fh, fw = gray.shape
    side = float(rng.uniform(*film_fraction)) * min(wp, hp)
    fw_p, fh_p = side * fw / max(fw, fh), side * fh / max(fw, fh)
    # the film's rectangle, then a light box a border wider, both in the plane around the photo's centre
    border = float(rng.uniform(0.06, 0.12)) * side
    c = np.array([wp, hp]) / 2 + rng.uniform(-0.04, 0.04, size=2) * (wp, hp)
    film = c + np.array([(-fw_p, -fh_p), (fw_p, -fh_p), (fw_p, fh_p), (-fw_p, fh_p)]) / 2
    box = c + (film - c) * (1 + 2 * border / side)
    # one projective map for the plane: a small rotation plus each corner nudged (the phone's tilt)
    a = math.radians(float(rng.uniform(-tilt_deg, tilt_deg)))
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    seen = c + (film - c) @ rot.T + rng.uniform(-perspective, perspective, size=(4, 2)) * side
    plane_to_photo = homography(film, seen)
    photo_to_plane = np.linalg.inv(plane_to_photo)

    def project(img: np.ndarray, rect: np.ndarray, fill: float) -> np.ndarray:
        to_img = homography(rect, [(0, 0), (img.shape[1], 0), img.shape[::-1], (0, img.shape[0])])
        return warp(img, to_img @ photo_to_plane, (wp, hp), fill=fill)

    inside = project(np.ones((8, 8), np.float32), box, 0.0)   # 1 on the box, antialiased at its edge
    illum = _illumination(64, 64, rng)
    light = project(illum, box, float(illum.mean()))
    fog = float(rng.uniform(0.03, 0.08))
    clear = float(rng.uniform(0.6, 0.8))  # the clearest film: its base and fog absorb a fifth or more
    trans = project(fog + (clear - fog) * np.clip(gray, 0, 1), film, 1.0)  # 1 where no film covers the box
    room = float(rng.uniform(0.12, 0.35)) * (1 + 0.3 * project(_illumination(16, 16, rng), box * 2 - c, 0.5))
    lit = light * trans
    colour = np.array(WARM) ** float(rng.uniform(0.5, 1.5))
    table = np.array([0.9, 0.8, 0.7]) * float(rng.uniform(0.7, 1.1))
    rgb = inside[..., None] * lit[..., None] * colour + (1 - inside[..., None]) * room[..., None] * table
    if rng.random() < glare_p:
        spot = glare(np.zeros((hp, wp), np.float32), rng, strength=(0.1, 0.35))
        rgb = rgb + spot[..., None]
    rgb = rgb * float(rng.uniform(0.85, 1.0)) + rng.normal(0, 0.008, size=rgb.shape)
    return _camera(np.clip(rgb, 0, 1), rng, jpeg_quality), Quad.from_array(seen)


def _camera(rgb: np.ndarray, rng: np.random.Generator, quality: tuple[int, int]) -> np.ndarray:
    """Mild blur, then the phone's JPEG encoder."""
    im = Image.fromarray(np.round(rgb * 255).astype(np.uint8), mode="RGB")
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 1.5))))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(quality[0], quality[1] + 1)))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 255.0


def photo_bytes(rgb: np.ndarray, quality: int = 92) -> bytes:
    """A photo as the JPEG file a phone uploads (what `read_image` will decode to gray)."""
    buf = io.BytesIO()
    Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), mode="RGB").save(buf, "JPEG",
                                                                                         quality=quality)
    return buf.getvalue()


def variants(gray: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One gray film per perturbation the stability targets name (the light-box photo is returned in gray)."""
    photo, _ = light_box_photo(gray, rng)
    return {"jpeg": jpeg(gray, rng, (70, 70)), "tilt": rotate(gray, rng), "glare": glare(gray, rng),
            "crop": border_crop(gray, rng), "exposure": exposure(gray, rng), "light_box": to_gray(photo)}
