"""Films photographed on a light box: find the film, rectify it, and put it upright and positive.

A phone photo of a film shows the film (transmitting light from behind), the bright light-box border
around it, and a margin of room; perspective makes the film a quadrilateral. `find_film` looks for the
one thing a film file never has: a bright, smooth, *connected* border that encloses a darker, textured
region, and accepts it only when that region is a convex quadrilateral well inside the frame. Everything
else (DICOM, PNG films edge to edge, photos without a light box) gets None and passes through unchanged.

`orientation` decides among the 8 ways a film can be turned (0/90/180/270 degrees) and inverted (negative),
with a small linear scorer over the 8 corrected candidates (assets/orientation.npz, fitted by
scripts/fit_orientation.py); rotation and inversion form a group, so it needs no labels beyond upright films.
numpy, scipy and Pillow only: cxr.images never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cxr.images.arrays import to_gray, to_pil  # noqa: F401 (to_gray is re-exported)


class _OnFirstUse:
    """scipy takes about a second to import on a small machine: a server imports it on its first photo (or in
    the background after start, see `warm_up`), not before it can answer /healthz."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


ndimage = _OnFirstUse("scipy.ndimage")
_spatial = _OnFirstUse("scipy.spatial")


def warm_up() -> None:
    """Import what the finder needs now (a server calls this in a background thread after it starts)."""
    importlib.import_module("scipy.ndimage")
    importlib.import_module("scipy.spatial")

WORK_SIDE = 256        # the finder works on a copy this size: borders are wide, films are large
_MIN_SIDE = 96          # smaller than this, a picture is a thumbnail, not a photo worth cropping
_MIN_FILM = 0.15       # a film photographed to be read fills at least this fraction of the photo
_FULL_FRAME_TOL = 0.03  # a quad this close to the frame's corners (fraction of the side) is the frame


@dataclass(frozen=True)
class Quad:
    """Four corners (x, y), clockwise from top-left, in continuous pixel coordinates of the image they
    belong to: pixel (row i, column j) covers [j, j+1) x [i, i+1), so a W x H frame is (0,0),(W,0),(W,H),(0,H)."""

    points: tuple[tuple[float, float], ...]

    @classmethod
    def from_array(cls, pts) -> Quad:
        """Any 4 points of a convex quadrilateral, in any order; they are put clockwise from top-left."""
        p = np.asarray(pts, dtype=np.float64).reshape(4, 2)
        c = p.mean(axis=0)
        p = p[np.argsort(np.arctan2(p[:, 1] - c[1], p[:, 0] - c[0]))]  # clockwise on screen (y down)
        start = int(np.argmin(p.sum(axis=1)))                          # top-left: smallest x + y
        p = np.roll(p, -start, axis=0)
        return cls(tuple((float(x), float(y)) for x, y in p))

    @classmethod
    def frame(cls, width: int, height: int) -> Quad:
        return cls(((0.0, 0.0), (float(width), 0.0), (float(width), float(height)), (0.0, float(height))))

    def array(self) -> np.ndarray:
        return np.array(self.points, dtype=np.float64)

    def scaled(self, sx: float, sy: float) -> Quad:
        return Quad(tuple((x * sx, y * sy) for x, y in self.points))

    def area(self) -> float:
        return abs(_signed_area(self.array()))

    def is_frame(self, width: int, height: int, tol: float = _FULL_FRAME_TOL) -> bool:
        d = np.abs(self.array() - Quad.frame(width, height).array()) / np.array([width, height])
        return bool(d.max() <= tol)


def _signed_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _clip(subject: list, a: np.ndarray, b: np.ndarray, sign: float) -> list:
    """Sutherland-Hodgman: keep the part of a convex polygon on the inner side of edge a->b."""
    def inside(p):
        return sign * ((b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])) >= 0

    out = []
    for i, cur in enumerate(subject):
        prev = subject[i - 1]
        if inside(cur):
            if not inside(prev):
                out.append(_intersect(prev, cur, a, b))
            out.append(cur)
        elif inside(prev):
            out.append(_intersect(prev, cur, a, b))
    return out


def _intersect(p, q, a, b) -> np.ndarray:
    d1, d2 = q - p, b - a
    den = d1[0] * d2[1] - d1[1] * d2[0]
    t = ((a[0] - p[0]) * d2[1] - (a[1] - p[1]) * d2[0]) / den if den else 0.0
    return p + t * d1


def quad_iou(a: Quad, b: Quad) -> float:
    """Intersection over union of two convex quadrilaterals, exactly (polygon clipping)."""
    pa, pb = a.array(), b.array()
    sign = 1.0 if _signed_area(pb) > 0 else -1.0
    poly = list(pa)
    for i in range(4):
        if not poly:
            break
        poly = _clip(poly, pb[i], pb[(i + 1) % 4], sign)
    inter = abs(_signed_area(np.array(poly))) if len(poly) >= 3 else 0.0
    union = a.area() + b.area() - inter
    return inter / union if union > 0 else 0.0


def homography(src, dst) -> np.ndarray:
    """The 3x3 projective map taking the 4 points `src` to the 4 points `dst` (x, y each)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(np.asarray(src, float), np.asarray(dst, float), strict=True):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    h = np.linalg.solve(np.array(rows), np.array(rhs))
    return np.append(h, 1.0).reshape(3, 3)


def warp(gray: np.ndarray, out_to_in: np.ndarray, size: tuple[int, int], fill: float = 0.0) -> np.ndarray:
    """Resample `gray` into a (width, height) canvas; `out_to_in` maps output coordinates to input ones."""
    h = out_to_in / out_to_in[2, 2]
    out = to_pil(gray).transform(size, Image.Transform.PERSPECTIVE, tuple(h.ravel()[:8]), Image.Resampling.BILINEAR,
                       fillcolor=float(fill))
    return np.asarray(out, dtype=np.float32)


def _small(gray: np.ndarray) -> tuple[np.ndarray, float]:
    h, w = gray.shape
    s = min(1.0, WORK_SIDE / max(h, w))
    if s >= 1.0:
        return np.asarray(gray, dtype=np.float32), 1.0
    im = to_pil(gray)
    if int(1 / s) >= 2:
        im = im.reduce(int(1 / s))  # integer box shrink first: several times faster than resize alone
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(im.resize(size, Image.Resampling.BOX), dtype=np.float32), w / size[0]


def _light_box(s: np.ndarray) -> np.ndarray | None:
    """The light box's visible border: of the bright, smooth regions, the one enclosing most; or None."""
    top = float(np.percentile(s, 99.5))
    if top <= 0.05:
        return None
    mean = ndimage.uniform_filter(s, 3)  # small window: a thin border must survive as a closed ring
    std = np.sqrt(np.maximum(ndimage.uniform_filter(s * s, 3) - mean * mean, 0.0))
    smooth = std < 0.04 * top
    # hysteresis: a glare can set `top`, and a box dims towards its corners; dim parts join bright ones
    bright = ndimage.binary_propagation((s > 0.7 * top) & smooth, structure=np.ones((3, 3)),
                                        mask=(s > 0.55 * top) & smooth)
    lab, n = ndimage.label(bright, structure=np.ones((3, 3)))
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel())[1:]
    best, enclosed = None, 0
    for i in np.argsort(sizes)[::-1][:5]:  # the border is among the largest; a bright lung is not a ring
        comp = lab == i + 1
        if comp.mean() < 0.02:
            break
        hole = int(_holes(comp).sum())
        if hole > enclosed:
            best, enclosed = comp, hole
    if best is None or enclosed < _MIN_FILM * s.size:
        return None
    level = _box_level(s, best)
    ring = best
    for _ in range(6):  # peel off a bright, smooth part of the film that touched the border, 4 px a round:
        near = ndimage.maximum_filter(np.where(ring, s, 0.0), size=9)  # the box next to it outshines it
        peeled = ring & (s > 0.9 * near)
        if peeled.sum() == ring.sum():
            break  # nothing peeled: later rounds would peel nothing either
        ring = peeled
    lab, _ = ndimage.label(ring, structure=np.ones((3, 3)))  # what was peeled off is film, not box
    ring = lab == 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
    # smoothness stops short of the film's edge: the border reaches to the middle of the blurred step
    # between the box and the film next to it (the darkest nearby pixel stands for the film)
    mid = 0.5 * (level + ndimage.minimum_filter(s, size=7))
    return ring | (ndimage.binary_dilation(ring, iterations=4) & (s > mid))


def _box_level(s: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """The light box's brightness everywhere: a quadratic surface (tilt and fall-off) fitted to the
    border, refitted without what lies well below it (bright film that touched the border)."""
    h, w = s.shape
    ys, xs = np.nonzero(ring)
    ys, xs = ys[::2], xs[::2]  # a smooth surface: every other border pixel fits it as well
    y, x, v = ys / h - 0.5, xs / w - 0.5, s[ys, xs].astype(np.float64)
    a = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    keep = np.ones(len(v), dtype=bool)
    for _ in range(2):
        coef = np.linalg.solve(a[keep].T @ a[keep] + 1e-9 * np.eye(6), a[keep].T @ v[keep])
        keep = v > 0.9 * (a @ coef)
    gy = (np.arange(h, dtype=np.float32) / h - 0.5)[:, None]  # evaluated separably on the grid
    gx = (np.arange(w, dtype=np.float32) / w - 0.5)[None, :]
    c = coef.astype(np.float32)
    return c[0] + c[1] * gx + c[2] * gy + c[3] * gx * gx + c[4] * gx * gy + c[5] * gy * gy


def _holes(mask: np.ndarray) -> np.ndarray:
    """What `mask` encloses: the parts of its complement that do not reach the image's edge."""
    lab, n = ndimage.label(~mask)
    inner = np.ones(n + 1, dtype=bool)  # a lookup table: np.isin sorts, this indexes
    inner[[0, *np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])]] = False
    return inner[lab]


def _film_region(ring: np.ndarray) -> np.ndarray | None:
    """The largest region the light box encloses (what it lights from behind)."""
    holes = _holes(ring)
    holes = ndimage.binary_opening(holes, iterations=2)  # drops slivers between border and film edge
    lab, n = ndimage.label(holes)
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (1 + int(np.argmax(sizes)))


def _hull(points: np.ndarray) -> np.ndarray:
    """Convex hull vertices, in order around it."""
    return points[_spatial.ConvexHull(points).vertices]


def _four_corners(hull: np.ndarray) -> np.ndarray:
    """Drop the hull vertex whose removal loses least area until four are left."""
    p = [tuple(v) for v in hull.tolist()]  # tens of vertices: plain floats beat numpy's per-call cost

    def lost(i: int) -> float:
        (ax, ay), (bx, by), (cx, cy) = p[i - 1], p[i], p[(i + 1) % len(p)]
        return abs((bx - ax) * (cy - ay) - (by - ay) * (cx - ax))

    while len(p) > 4:
        del p[min(range(len(p)), key=lost)]
    return np.array(p)


def _refine(corners: np.ndarray, edge: np.ndarray) -> np.ndarray:
    """Fit a line to the boundary points along each side (corner regions left out), intersect neighbours."""
    lines = []
    for i in range(4):
        a, b = corners[i], corners[(i + 1) % 4]
        d = b - a
        length = float(np.hypot(*d))
        n = np.array([-d[1], d[0]]) / length
        t = (edge - a) @ d / (length * length)
        near = (np.abs((edge - a) @ n) < max(3.0, 0.04 * length)) & (t > 0.15) & (t < 0.85)
        if near.sum() < 8:
            return corners
        lines.append(_robust_line(edge[near]))
    out = []
    for i in range(4):
        (c1, d1), (c2, d2) = lines[i - 1], lines[i]
        m = np.array([d1, -d2]).T
        if abs(np.linalg.det(m)) < 1e-6:
            return corners
        t = np.linalg.solve(m, c2 - c1)
        out.append(c1 + t[0] * d1)
    return np.array(out)


def _robust_line(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Total least squares, refitted without the points far off the line (a bright notch, a glare)."""
    keep = np.ones(len(pts), dtype=bool)
    for _ in range(3):
        c = pts[keep].mean(axis=0)
        _, _, vt = np.linalg.svd(pts[keep] - c, full_matrices=False)
        dist = np.abs((pts - c) @ vt[1])
        new = dist <= max(1.0, 2.0 * float(np.median(dist[keep])))
        if new.sum() < 8 or (new == keep).all():
            break
        keep = new
    return c, vt[0]


def _quad_of(region: np.ndarray) -> Quad | None:
    """The quadrilateral a region fills, or None when the region is not one (not convex, not 4-sided)."""
    boundary = region & ~ndimage.binary_erosion(region)
    ys, xs = np.nonzero(boundary)
    # pixel (i, j) covers [j, j+1) x [i, i+1): boundary pixels' outer edges are half a pixel further out
    edge = np.stack([xs + 0.5, ys + 0.5], axis=1).astype(np.float64)
    hull = _hull(np.concatenate([edge + o for o in ((-.5, -.5), (.5, -.5), (.5, .5), (-.5, .5))]))
    if len(hull) < 4 or region.sum() < 0.9 * abs(_signed_area(hull)):
        return None
    quad = Quad.from_array(_refine(_four_corners(hull), edge))
    if quad.area() <= 0 or region.sum() < 0.9 * quad.area() or quad.area() < 0.9 * region.sum():
        return None
    return quad


def working_copy(gray: np.ndarray) -> tuple[np.ndarray, float]:
    """The finder's copy (at most WORK_SIDE px a side) and its scale (original px per copy px). The
    decode stage makes it once and hands it to `find_film` and, for a film, to `orientation`."""
    return _small(to_gray(gray))


def find_film(gray: np.ndarray, *, work: tuple[np.ndarray, float] | None = None) -> Quad | None:
    """Where the film lies in a photo of it on a light box, in `gray`'s pixel coordinates, or None.

    None means "this already is a film, or no light box was found": use the image as it is. Colour
    photos (H x W x 3) are read through `to_gray`, as `read_image` would. `work`: `working_copy(gray)`,
    when the caller already has it.
    """
    h, w = np.shape(gray)[:2]
    if min(h, w) < _MIN_SIDE:
        return None
    s, scale = work if work is not None else working_copy(gray)
    s = ndimage.gaussian_filter(s, 1.0)
    ring = _light_box(s)
    region = None if ring is None else _film_region(ring)
    if region is None or not _MIN_FILM <= region.mean() <= 0.95:
        return None
    # a light box outshines what it lights: the film's bright tenth stays below the border's typical level
    if np.percentile(s[region], 90) >= 0.95 * np.median(s[ring]):
        return None
    quad = _quad_of(region)
    if quad is None:
        return None
    quad = quad.scaled(scale, scale)
    return None if quad.is_frame(w, h) else quad


def rectify(gray: np.ndarray, quad: Quad, *, inset: float = 0.01, size: tuple[int, int] | None = None,
            stretch: bool = True) -> np.ndarray:
    """The film inside `quad`, warped to an upright rectangle (float32, [0, 1]).

    `inset` trims that fraction of each side (the blurred film edge and any sliver of light box).
    `size` (width, height) defaults to the quad's mean side lengths. `stretch` maps the 0.5th..99.5th
    percentiles to 0..1: a photo's film never reaches the black and white a film file has.
    """
    g = to_gray(gray)
    p = quad.array()
    if size is None:
        wd = 0.5 * (np.hypot(*(p[1] - p[0])) + np.hypot(*(p[2] - p[3])))
        ht = 0.5 * (np.hypot(*(p[3] - p[0])) + np.hypot(*(p[2] - p[1])))
        size = (max(8, round(wd * (1 - 2 * inset))), max(8, round(ht * (1 - 2 * inset))))
    wo, ho = size
    # output rectangle, grown by the inset, maps onto the quad: the inset trims the film's edges
    ex, ey = wo * inset / (1 - 2 * inset), ho * inset / (1 - 2 * inset)
    rect = [(-ex, -ey), (wo + ex, -ey), (wo + ex, ho + ey), (-ex, ho + ey)]
    step = max(1, max(g.shape) // 128)  # the fill is a typical level: a strided sample gives it
    out = warp(g, homography(rect, p), (wo, ho), fill=float(np.median(g[::step, ::step])))
    if stretch:
        lo, hi = np.percentile(out[::3, ::3], [0.5, 99.5])  # a ninth of the pixels give the same levels
        out = (out - lo) / max(hi - lo, 1e-6)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# Orientation and polarity live in cxr.images.orientation; callers that read a photo use both, from here.
from cxr.images.orientation import (  # noqa: E402,F401,I001
    THUMB, Orientation, candidates, correct, describe, features, orientation, scorer_parameters, thumbnail,
)
