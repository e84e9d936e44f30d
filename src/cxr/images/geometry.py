"""Plane geometry of photographed films: quadrilaterals, their overlap, projective maps and resampling
(numpy and Pillow only). cxr.images.capture finds films with it; cxr.data.capture makes photos with it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cxr.images.arrays import pixels, to_pil

_FULL_FRAME_TOL = 0.03  # a quad this close to the frame's corners (fraction of the side) is the frame


@dataclass(frozen=True)
class Quad:
    """Four corners (x, y), clockwise from top-left, in continuous pixel coordinates of the image they
    belong to: pixel (row i, column j) covers [j, j+1) x [i, i+1), so a W x H frame is (0,0),(W,0),(W,H),(0,H)."""

    points: tuple[tuple[float, float], ...]

    @classmethod
    def from_array(cls, pts) -> Quad:
        """Any 4 points of a convex quadrilateral, in any order; they are put clockwise from top-left."""
        p = [(float(x), float(y)) for x, y in np.asarray(pts, dtype=np.float64).reshape(4, 2).tolist()]
        cx, cy = sum(x for x, _ in p) / 4, sum(y for _, y in p) / 4  # four points: plain floats, no numpy calls
        p.sort(key=lambda q: math.atan2(q[1] - cy, q[0] - cx))  # clockwise on screen (y down)
        start = min(range(4), key=lambda i: p[i][0] + p[i][1])  # top-left: smallest x + y
        return cls(tuple(p[start:] + p[:start]))

    @classmethod
    def frame(cls, width: int, height: int) -> Quad:
        return cls(((0.0, 0.0), (float(width), 0.0), (float(width), float(height)), (0.0, float(height))))

    def array(self) -> np.ndarray:
        return np.array(self.points, dtype=np.float64)

    def scaled(self, sx: float, sy: float) -> Quad:
        return Quad(tuple((x * sx, y * sy) for x, y in self.points))

    def area(self) -> float:
        p = self.points
        return 0.5 * abs(sum(p[i - 1][0] * p[i][1] - p[i][0] * p[i - 1][1] for i in range(len(p))))

    def is_frame(self, width: int, height: int, tol: float = _FULL_FRAME_TOL) -> bool:
        return all(abs(x - fx) / width <= tol and abs(y - fy) / height <= tol
                   for (x, y), (fx, fy) in zip(self.points, Quad.frame(width, height).points, strict=True))


def leaves(quad: Quad, width: float, height: float) -> bool:
    """Whether a corner of the quad lies outside the W x H frame (its edges are in it)."""
    return any(x < 0 or y < 0 or x > width or y > height for x, y in quad.points)


def signed_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float(x[:-1] @ y[1:] + x[-1] * y[0] - x[1:] @ y[:-1] - x[0] * y[-1])


def quad_iou(a: Quad, b: Quad) -> float:
    """Intersection over union of two convex quadrilaterals, exactly (Sutherland-Hodgman clipping)."""
    pb = b.array()
    sign = 1.0 if signed_area(pb) > 0 else -1.0
    poly = list(a.array())
    for e0, e1 in zip(pb, np.roll(pb, -1, axis=0)):  # keep what lies on the inner side of each edge of b
        side = [sign * ((e1[0] - e0[0]) * (q[1] - e0[1]) - (e1[1] - e0[1]) * (q[0] - e0[0])) for q in poly]
        out = []
        for i, cur in enumerate(poly):
            if (side[i] >= 0) != (side[i - 1] >= 0):  # this side of the polygon crosses the edge
                out.append(poly[i - 1] + side[i - 1] / (side[i - 1] - side[i]) * (cur - poly[i - 1]))
            if side[i] >= 0:
                out.append(cur)
        poly = out
    inter = abs(signed_area(np.array(poly))) if len(poly) >= 3 else 0.0
    union = a.area() + b.area() - inter
    return inter / union if union > 0 else 0.0


def homography(src, dst) -> np.ndarray:
    """The 3x3 projective map taking the 4 points `src` to the 4 points `dst` (x, y each)."""
    rows, rhs = [], []  # plain floats: the same doubles as numpy's scalars, at a tenth of the cost
    for (x, y), (u, v) in zip(np.asarray(src, float).tolist(), np.asarray(dst, float).tolist(), strict=True):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    h = np.linalg.solve(np.array(rows), np.array(rhs))
    return np.append(h, 1.0).reshape(3, 3)


def warp(gray: np.ndarray, out_to_in: np.ndarray, size: tuple[int, int], fill: float = 0.0) -> np.ndarray:
    """Resample `gray` into a (width, height) canvas; `out_to_in` maps output coordinates to input ones."""
    h = out_to_in / out_to_in[2, 2]
    return pixels(mapped(gray).transform(size, Image.Transform.PERSPECTIVE, tuple(h.ravel()[:8]),
                                         Image.Resampling.BILINEAR, fillcolor=float(fill)))


def mapped(gray: np.ndarray) -> Image.Image:
    """A Pillow 'F' image on the array's memory: `to_pil` copies (frombuffer maps 8- and 16-bit modes only;
    its map_buffer maps 'F' too), and copying a full-size photo cost a third of shrinking it."""
    a = np.ascontiguousarray(gray, dtype=np.float32)
    try:
        im = Image.new("F", (0, 0))._new(Image.core.map_buffer(a, (a.shape[1], a.shape[0]), "raw", 0, ("F", 0, 1)))
    except Exception:  # noqa: BLE001 - only slower
        return to_pil(a)
    im.readonly = 1
    return im


def shrunk(gray: np.ndarray, factor: int, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """`gray` box-shrunk by a whole factor (Pillow's reduce, reading the array in place). `box` (x0, y0, x1,
    y1), in the shrunk copy's pixels: only that part is shrunk, the rest is 0 (a warp that reads no further
    then costs a fraction of a whole photo's shrink). Its pixels are the whole shrink's, bit for bit: Pillow
    sums the blocks from the box's corner, here a multiple of the factor, and the last, partial row and
    column of blocks only at the photo's edge, as for the whole photo."""
    f, im = int(factor), mapped(gray)
    if box is None:
        return pixels(im.reduce(f))
    (h, w), (x0, y0, x1, y1) = gray.shape[:2], box
    part = pixels(im.reduce(f, (x0 * f, y0 * f, min(x1 * f, w), min(y1 * f, h))))
    out = np.zeros((-(-h // f), -(-w // f)), dtype=np.float32)
    out[y0:y0 + part.shape[0], x0:x0 + part.shape[1]] = part
    return out
