"""Films photographed on a light box: find the film, rectify it, and put it upright and positive.

A phone photo of a film shows the film (transmitting light from behind), the bright light-box border
around it, and a margin of room; perspective makes the film a quadrilateral. `find_film` looks for the
one thing a film file never has: a bright, smooth, *connected* border that encloses a darker, textured
region, and accepts it only when that region is a convex quadrilateral well inside the frame, with a
step from box to film along each side. Everything else (DICOM, PNG films edge to edge, photos without a
light box) gets None and passes through unchanged. It works on a 160 px copy, in a few dozen array
passes, and places the film's edges to a fraction of that copy's pixel.

`orientation` decides among the 8 ways a film can be turned (0/90/180/270 degrees) and inverted (negative),
with a small linear scorer over the 8 corrected candidates (assets/orientation.npz, fitted by
scripts/fit_orientation.py); rotation and inversion form a group, so it needs no labels beyond upright films.
numpy, scipy and Pillow only: cxr.images never imports torch.
"""

from __future__ import annotations

import functools
import importlib
import threading

import numpy as np
from PIL import Image

from cxr.images.arrays import pixels, quantiles, to_gray, to_pil  # noqa: F401 (to_gray is re-exported)
from cxr.images.geometry import (  # noqa: F401 (re-exported)
    Quad, homography, leaves, mapped, quad_iou, shrunk, signed_area, warp,
)


class _OnFirstUse:
    """scipy takes about a second to import on a small machine: a server imports it on its first photo (or in
    the background after start, see `warm_up`), not before it can answer /healthz."""

    _lock = threading.Lock()  # scipy imported by two decode threads at once fails half-initialised

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str):
        with self._lock:
            module = importlib.import_module(self._name)
        value = getattr(module, attr)
        setattr(self, attr, value)  # found here from now on (three labellings a photo)
        return value


ndimage = _OnFirstUse("scipy.ndimage")


def warm_up() -> None:
    """Import what the finder needs now (a server calls this in a background thread after it starts)."""
    with _OnFirstUse._lock:
        importlib.import_module("scipy.ndimage")

WORK_SIDE = 160        # the finder's copy (and a film's orientation thumbnail's): a border stays 3 px or wider
_MIN_SIDE = 96          # smaller than this, a picture is a thumbnail, not a photo worth cropping
_MIN_FILM = 0.15       # a film photographed to be read fills at least this fraction of the photo
_MIN_ENCLOSED = 0.02   # ... and before bright parts of it are peeled off the border, the border encloses this
_MIN_IOU = 0.92        # the film's region and its quadrilateral agree, pixel by pixel
_BOX_SHARE = 0.9       # a film passes at most ~0.8 of the light behind it: the box lies above this share of
#                        its fitted level, the film (a glare aside) below it
_REACH, _STEP, _SAMPLES = 4.0, 0.5, 24  # edge search: +-4 px across each side, at 24 places along it
_ENOUGH = 6  # a side with fewer steps found along it is no film's edge
_ACROSS = np.arange(-_REACH, _REACH + _STEP / 2, _STEP)
_ALONG = np.linspace(0.15, 0.85, _SAMPLES)[None, :, None]  # the corners' regions left out
_DIRECTIONS = np.stack([np.cos(np.arange(32) * np.pi / 16), np.sin(np.arange(32) * np.pi / 16)])
_RIDGE = 1e-9 * np.eye(6)  # the box level's least squares, kept solvable
_EIGHT, _FOUR = np.ones((3, 3), dtype=bool), np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)


def _flat(s: np.ndarray, limit: float) -> np.ndarray:
    """Pixels in some 2 x 2 block whose standard deviation is under `limit`: a border 2 px wide on the copy
    stays a closed ring (a 3 x 3 window needs 3). Slices, not scipy filters: a fifth of the time. float32,
    summed in finder.js's order (any other rounds differently), in place: allocations cost as much."""
    sq = s * s  # each pixel's square once, not once per block holding it
    q = sq[:-1, :-1] + sq[:-1, 1:]
    q += sq[1:, :-1]
    q += sq[1:, 1:]
    q *= 4
    total = s[:-1, :-1] + s[:-1, 1:]
    total += s[1:, :-1]
    total += s[1:, 1:]
    total *= total
    q -= total
    flat = q < 16 * limit * limit  # 16 x the variance
    wide = np.zeros((flat.shape[0], s.shape[1]), dtype=bool)  # each of the 4 blocks holding a pixel: 2 x 2 wide
    wide[:, :-1] = flat
    wide[:, 1:] |= flat
    out = np.zeros(s.shape, dtype=bool)
    out[:-1] = wide
    out[1:] |= wide
    return out


def _extent(mask: np.ndarray, margin: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[slice, slice]]:
    """(the rows and the columns `mask` touches, its bounding box grown by `margin`)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rows, cols, (slice(max(rows[0] - margin, 0), rows[-1] + 1 + margin),
                        slice(max(cols[0] - margin, 0), cols[-1] + 1 + margin))


def _holes(mask: np.ndarray, box: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """What `mask` encloses: (labels in `box`, a box holding the mask, and each label's size, 0 for what
    reaches the edge). Beyond the box all is complement joined to the edge: labelling the box is enough."""
    lab, n = ndimage.label(~mask[box], structure=_FOUR)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])] = 0
    sizes[0] = 0
    return lab, sizes


def _light_box(s: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    """(the light box's visible border, its bounding box), or None: of the bright, smooth regions, the one
    enclosing most, less what lies below `_BOX_SHARE` of the box's level there."""
    top = quantiles(s[::2, ::2], 0.995)[0]  # a quarter of the pixels give the same level
    if not top > 0.05:
        return None
    # within the bright pixels' bounding box (a pixel more for 2 x 2 blocks): a box is about half a photo
    bright = s > 0.55 * top
    _, _, (r, c) = _extent(bright, 1)
    sub = s[r, c]
    lab, n = ndimage.label(_flat(sub, 0.04 * top) & bright[r, c], structure=_EIGHT)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    sizes[0] = 0
    # hysteresis: a glare can set `top`, and a box dims towards its corners, so dim parts join bright ones;
    # a dim region without a bright pixel is no box (what binary_propagation would keep). Seeds and boxes
    # only of the few regions tried: find_objects and a bincount over all (a film has hundreds) cost more.
    seed = sub > 0.7 * top
    best, enclosed, tried = None, _MIN_ENCLOSED * s.size, 0
    for i in np.argsort(sizes)[::-1]:  # the border is among the largest; a bright lung is not a ring
        if sizes[i] < 0.02 * s.size or tried == 5:
            break
        mask = lab == i
        if not (mask & seed).any():
            continue
        tried += 1
        _, _, box = _extent(mask)
        if (box[0].stop - box[0].start) * (box[1].stop - box[1].start) - sizes[i] >= enclosed:
            comp = mask[box]  # else its bounding box has no room for more
            hole = int(_holes(comp, (slice(None), slice(None)))[1].sum())
            if hole >= enclosed:
                at = (slice(box[0].start + r.start, box[0].stop + r.start),
                      slice(box[1].start + c.start, box[1].stop + c.start))  # in the whole copy
                best, enclosed = (comp, at), hole
    if best is None:
        return None
    # a bright, smooth part of the film that touched the border lies below the box's level: peeled off in
    # one step. Bits left inside the film (a glare) only make holes in its region, which its outline fills.
    comp, box = best
    level = _box_level(s, comp, box)
    level *= _BOX_SHARE
    ring = np.zeros(s.shape, dtype=bool)
    np.greater(s[box], level, out=ring[box])
    ring[box] &= comp
    return (ring, box) if ring.any() else None


def _box_level(s: np.ndarray, comp: np.ndarray, box: tuple[slice, slice]) -> np.ndarray:
    """The light box's brightness over `box`: a quadratic surface (tilt and fall-off) fitted to the outer
    rim of `comp` (its bright region there), each row's and column's outermost (flat) pixels, where no film
    reaches (bright film touching the inside drags a fit to all of it down), refitted without outliers."""
    (h, w), (bh, bw) = s.shape, comp.shape
    rows, cols = np.arange(bh), np.arange(bw)  # a connected region touches every row and column of its box
    ys = np.concatenate([rows, rows, comp.argmax(axis=0), bh - 1 - comp[::-1].argmax(axis=0)]) + box[0].start
    xs = np.concatenate([comp.argmax(axis=1), bw - 1 - comp[:, ::-1].argmax(axis=1), cols, cols]) + box[1].start
    v, y, x = s[ys, xs].astype(np.float64), ys / h - 0.5, xs / w - 0.5
    a = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    fit = a @ np.linalg.solve(a.T @ a + _RIDGE, a.T @ v)
    keep = np.abs(v - fit) < 0.1 * fit  # not a glare on the rim, nor the room seen through a gap
    a, v = a[keep], v[keep]
    c0, cx, cy, cxx, cxy, cyy = np.linalg.solve(a.T @ a + _RIDGE, a.T @ v).astype(np.float32)
    gy = np.arange(box[0].start, box[0].stop, dtype=np.float32)[:, None] / h - 0.5  # separably, on the box
    gx = np.arange(box[1].start, box[1].stop, dtype=np.float32)[None, :] / w - 0.5
    # (c0 + cy gy + cyy gy gy) + (cx + cxx gx + cxy gy) gx, float32 as finder.js has it; in place (a sum's
    # terms swap exactly)
    level = (cx + cxx * gx) + cxy * gy
    level *= gx
    level += c0 + cy * gy + cyy * gy * gy
    return level


def _outline(region: np.ndarray, box: tuple[slice, slice]) -> tuple[np.ndarray, float]:
    """(points (x, y) on the region's outline, its area with any holes filled): each row's and column's
    first and last pixel, at the pixel's outer edge. Their hull is the region's hull. Read in `box` (which
    holds the region), not the whole copy."""
    sub, r0, c0 = region[box], box[0].start, box[1].start
    (bh, bw), (rows, cols, _) = sub.shape, _extent(sub)
    r, c = sub[rows], sub[:, cols]
    left, right = r.argmax(axis=1) + c0, (c0 + bw) - r[:, ::-1].argmax(axis=1)
    nr, nc = len(rows), len(cols)
    out = np.empty((2 * (nr + nc), 2))  # [left, right] x rows, then columns x [top, bottom]
    out[:nr, 0], out[nr:2 * nr, 0] = left, right
    out[:nr, 1] = out[nr:2 * nr, 1] = rows + (r0 + 0.5)
    out[2 * nr:2 * nr + nc, 0] = out[2 * nr + nc:, 0] = cols + (c0 + 0.5)
    out[2 * nr:2 * nr + nc, 1], out[2 * nr + nc:, 1] = c.argmax(axis=0) + r0, (r0 + bh) - c[::-1].argmax(axis=0)
    return out, float((right - left).sum())


@functools.cache
def _unordered(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Where (i, j, k) is not i < j < k, and where (i, k) is not i < k: the same for every hull of n points."""
    idx = np.arange(n)
    return (~((idx[:, None, None] < idx[None, :, None]) & (idx[None, :, None] < idx[None, None, :])),
            ~(idx[:, None] < idx[None, :]))


def _four_corners(hull: np.ndarray) -> np.ndarray:
    """The largest quadrilateral on the hull's vertices (in order around it): the film's corners (dropping
    the vertex losing least area, four times over, can drop a corner that its neighbours crowd)."""
    c = np.outer(hull[:, 0], hull[:, 1])
    c = c - c.T  # x_i y_j - y_i x_j: twice triangle (i, j, k)'s signed area is c_ij + c_jk + c_ki
    inner = c[:, :, None] + c[None, :, :]
    inner += c.T[:, None, :]
    sign = np.sign(signed_area(hull))
    if sign != 1.0:  # times 1 changes no bit
        inner *= sign
    not3, not2 = _unordered(len(hull))
    np.copyto(inner, -np.inf, where=not3)  # only (i, j, k) with i < j < k
    # quad i < j < k < l is triangles (i, j, k) + (i, k, l): for each diagonal (i, k), the best j and l
    total = inner.max(axis=1) + inner.max(axis=2)
    np.copyto(total, -np.inf, where=not2)
    i, k = np.unravel_index(np.argmax(total), total.shape)
    return hull[[i, np.argmax(inner[i, :, k]), k, np.argmax(inner[i, k, :])]]


def _edge_points(s: np.ndarray, corners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel points of the film's edge near each side of a rough quad (4 x _SAMPLES x 2, and which were
    found): across the side, where the brightness first falls halfway from the box (the brightest outside)
    to the film (the darkest inside). The box-shrunk copy's step is a ramp a pixel wide: interpolated."""
    h, w = s.shape
    d = corners[[1, 2, 3, 0]] - corners
    n = (d[:, ::-1] * [-1.0, 1.0]) / np.hypot(d[:, 0], d[:, 1])[:, None]  # inwards, for clockwise corners
    base = corners[:, None, :] + _ALONG * d[:, None, :]  # 4 x S x 2
    # bilinear by hand, pixel centres at +0.5 (ndimage.map_coordinates cost ten times as much here)
    xy = np.clip(base[:, :, None, :] - 0.5 + _ACROSS[:, None] * n[:, None, None, :], 0, [w - 1.001, h - 1.001])
    at = xy.astype(np.intp)
    fx, fy = (xy - at).transpose(3, 0, 1, 2)
    i, f = at[..., 1] * w + at[..., 0], s.ravel()
    a, b, c, e = f[i], f[i + 1], f[i + w], f[i + w + 1]
    v = a + fx * (b - a)
    v = (v + fy * (c + fx * (e - c) - v)).reshape(-1, len(_ACROSS))
    half, rows = len(_ACROSS) // 2, np.arange(len(v))
    start = np.argmax(v[:, : half + 1], axis=1)
    box, film = v[rows, start], v[:, half:].min(axis=1)
    mid = 0.5 * (box + film)
    below = (v < mid[:, None]) & (np.arange(len(_ACROSS)) > start[:, None])
    k = np.maximum(np.argmax(below, axis=1), 1)
    found = below.any(axis=1) & (box - film > 0.1 * box)  # a step worth the name (not a glare's plateau)
    v0, v1 = v[rows, k - 1], v[rows, k]
    cross = (_ACROSS[k - 1] + _STEP * (v0 - mid) / np.maximum(v0 - v1, 1e-9)).reshape(4, _SAMPLES, 1)
    return base + cross * n[:, None, :], found.reshape(4, _SAMPLES)


def _refine(corners: np.ndarray, s: np.ndarray) -> np.ndarray | None:
    """Each side's line through its edge points (total least squares, refitted without those over a pixel
    off it: a glare's notch), neighbours intersected; None when a side shows no step from box to film along
    most of it (a film's edge does; a lung's bright surround does not)."""
    pts, keep = _edge_points(s, corners)
    if (keep.sum(axis=1) < _ENOUGH).any():
        return None
    found = keep
    for _ in range(2):  # all 4 sides at once; refitted only when some point lies off its line
        wt = keep / keep.sum(axis=1, keepdims=True)
        c = np.einsum("sn,snk->sk", wt, pts)
        q = pts - c[:, None, :]
        sxx, syy, sxy = np.einsum("sn,snk,snl->skl", wt, q, q).reshape(4, 4)[:, [0, 3, 1]].T
        angle = 0.5 * np.arctan2(2 * sxy, sxx - syy)  # the 2 x 2 scatter's principal axis, in closed form
        d = np.stack([np.cos(angle), np.sin(angle)], axis=1)
        near = found & (np.abs(q[..., 1] * d[:, None, 0] - q[..., 0] * d[:, None, 1]) <= 1.0)
        near = np.where(near.sum(axis=1, keepdims=True) >= _ENOUGH, near, keep)
        if (near == keep).all():
            break
        keep = near
    c1, d1 = c[[3, 0, 1, 2]], d[[3, 0, 1, 2]]  # side i - 1 meets side i at corner i
    det = d[:, 0] * d1[:, 1] - d1[:, 0] * d[:, 1]
    if (np.abs(det) < 1e-6).any():
        return None
    out = c1 + ((d[:, 0] * (c - c1)[:, 1] - d[:, 1] * (c - c1)[:, 0]) / det)[:, None] * d1
    # the edges lie within the search's reach of the rough corners, or the search found something else
    return out if np.abs(out - corners).max() <= 2 * _REACH else None


def _quad_of(region: np.ndarray, s: np.ndarray, box: tuple[slice, slice], count: int) -> Quad | None:
    """The quadrilateral a region (`count` pixels, within `box`) fills, or None when the region is not one
    (not convex, not 4-sided)."""
    outline, area = _outline(region, box)
    # the hull, near enough: the outline's extreme points in 32 directions, in order around it (scipy's
    # ConvexHull cost a tenth of the whole search; a film's corner is extreme over a quarter turn)
    extreme = np.argmax(outline @ _DIRECTIONS, axis=0)
    hull = outline[list(dict.fromkeys(extreme.tolist()))]  # each once, in order of first appearance
    if len(hull) < 4 or area < 0.9 * abs(signed_area(hull)):
        return None
    corners = _refine(_four_corners(hull), s)
    if corners is None:
        return None
    quad = Quad.from_array(corners)
    # the region and the quad agree pixel by pixel: on light-box photos their IoU was 0.95 or more, on the
    # bright-ringed lungs of films that got this far 0.89 or less
    lo, hi = _spans(quad, s.shape)
    x = np.arange(box[1].start, box[1].stop) + 0.5  # the quad's pixels in the region's box
    both = np.count_nonzero((x >= lo[box[0], None]) & (x <= hi[box[0], None]) & region[box])
    # and all of them, row by row: the centres j + 0.5 from the first >= lo to the last <= hi
    x = np.arange(s.shape[1]) + 0.5
    inside = np.maximum(np.searchsorted(x, hi, side="right") - np.searchsorted(x, lo, side="left"), 0).sum()
    return quad if both >= _MIN_IOU * (int(inside) + count - both) else None


def _spans(quad: Quad, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the span [lo, hi] between a convex, clockwise quad's sides where they cross the row's centre
    line: pixel centres x with lo <= x <= hi lie inside it (two comparisons a pixel, not four half-planes)."""
    y = np.arange(shape[0]) + 0.5
    lo, hi = np.full(shape[0], -np.inf), np.full(shape[0], np.inf)
    for (ax, ay), (bx, by) in zip(quad.points, quad.points[1:] + quad.points[:1]):
        if by == ay:  # a level side: the rows on its outer side are outside
            lo = np.where((bx - ax) * (y - ay) >= 0, lo, np.inf)
        elif by > ay:  # going down on screen: the inner side is to its left
            hi = np.minimum(hi, ax + (bx - ax) * (y - ay) / (by - ay))
        else:
            lo = np.maximum(lo, ax + (bx - ax) * (y - ay) / (by - ay))
    return lo, hi


def working_copy(gray: np.ndarray) -> tuple[np.ndarray, float]:
    """The finder's copy (at most WORK_SIDE px a side) and its scale (original px per copy px). The
    decode stage makes it once and hands it to `find_film` and, for a film, to `orientation`; the offline
    page's workingCopy (web/static/imaging.js) repeats these steps for a film's orientation."""
    gray = to_gray(gray)
    h, w = gray.shape
    s = min(1.0, WORK_SIDE / max(h, w))
    if s >= 1.0:
        return np.asarray(gray, dtype=np.float32), 1.0
    im = mapped(gray)
    if int(1 / s) >= 2:
        im = im.reduce(int(1 / s))  # integer box shrink first: several times faster than resize alone
    size = (max(1, round(w * s)), max(1, round(h * s)))
    if im.size != size:  # a resize to its own size is a copy (a photo 6 x 160 px a side)
        im = im.resize(size, Image.Resampling.BOX)
    return pixels(im), w / size[0]


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
    found = _light_box(s)
    if found is None:
        return None
    ring, box = found
    lab, sizes = _holes(ring, box)  # the largest region the box encloses: what it lights from behind
    if not _MIN_FILM * s.size <= sizes.max() <= 0.95 * s.size:
        return None
    region, inner = np.zeros(s.shape, dtype=bool), lab == np.argmax(sizes)
    region[box] = inner
    # a light box outshines what it lights: the film's bright tenth stays below the border's typical level
    if quantiles(s[box][inner], 0.9)[0] >= 0.95 * quantiles(s[box][ring[box]], 0.5)[0]:
        return None
    quad = _quad_of(region, s, box, int(sizes.max()))
    quad = None if quad is None else quad.scaled(scale, scale)
    return None if quad is None or quad.is_frame(w, h) else quad


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
    fill = 0.0  # the fill shows only where the quad leaves the image: then a typical level (strided sample)
    if leaves(quad, g.shape[1], g.shape[0]):
        step = max(1, max(g.shape) // 128)
        fill = float(np.median(g[::step, ::step]))
    out = warp(g, homography(rect, p), (wo, ho), fill=fill)
    if stretch:  # in place: the same float32 steps as (out - lo) / (hi - lo)
        lo, hi = quantiles(out[::3, ::3], 0.005, 0.995)  # a ninth of the pixels give the same levels
        out -= lo
        out /= max(hi - lo, 1e-6)
    return np.clip(out, 0.0, 1.0, out=out)


# Orientation and polarity live in cxr.images.orientation; callers that read a photo use both, from here.
from cxr.images.orientation import (  # noqa: E402,F401,I001
    THUMB, Orientation, candidates, correct, describe, features, orientation, scorer_parameters, thumbnail,
)
