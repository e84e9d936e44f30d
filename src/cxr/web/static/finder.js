// cxr page, the film finder on this device: images/capture.py's find_film and rectify, and the capture
// stage's _read_size/_rectified (inference/pipeline.py), step for step, so that a photo read here is cropped
// where the server would crop it. Python is the reference: the same thresholds, the same order of steps,
// and float32 arithmetic (Math.fround) wherever numpy computes in float32 and a threshold decides.
// tests/test_offline_capture.py holds the quads to Python's.
"use strict";

const cxrFinder = (() => {
  const f32 = Math.fround;
  const MIN_SIDE = 96, MIN_FILM = 0.15, MIN_ENCLOSED = 0.02, MIN_IOU = 0.92, BOX_SHARE = f32(0.9);
  const REACH = 4.0, STEP = 0.5, SAMPLES = 24, ENOUGH = 6, INSET = 0.01, FRAME_TOL = 0.03;
  const READ_SCALE = 1.0;  // pipeline.READ_SCALE (model.json's capture.read_scale overrides it)
  const ACROSS = Array.from({ length: 17 }, (_, i) => -REACH + i * STEP);  // np.arange(-4, 4.25, 0.5)
  const ALONG = Array.from({ length: SAMPLES }, (_, i) => (i === SAMPLES - 1 ? 0.85 : i * ((0.85 - 0.15) / 23) + 0.15));
  const DIRS = Array.from({ length: 32 }, (_, k) => [Math.cos((k * Math.PI) / 16), Math.sin((k * Math.PI) / 16)]);

  const quantiles = (values, qs) => cxrImaging.quantiles(values, qs);  // images.arrays.quantiles

  function label(mask, w, h, eight) {
    // scipy.ndimage.label by flood fill: connected components (8- or 4-neighbours), numbered in raster
    // order of their first pixel; {lab, sizes} with sizes[0] = 0 (the background).
    const lab = new Int32Array(w * h), stack = new Int32Array(w * h), sizes = [0];
    for (let start = 0; start < w * h; start++) {
      if (!mask[start] || lab[start]) continue;
      const n = sizes.length;
      let top = 0, size = 0;
      stack[top++] = start;
      lab[start] = n;
      while (top) {
        const p = stack[--top], y = (p / w) | 0, x = p - y * w;
        size++;
        for (let yy = Math.max(y - 1, 0); yy <= Math.min(y + 1, h - 1); yy++) {
          for (let xx = Math.max(x - 1, 0); xx <= Math.min(x + 1, w - 1); xx++) {
            const q = yy * w + xx;
            if (mask[q] && !lab[q] && (eight || xx === x || yy === y)) { lab[q] = n; stack[top++] = q; }
          }
        }
      }
      sizes.push(size);
    }
    return { lab, sizes };
  }

  function extent(mask, w, h, margin) {
    // capture._extent: the mask's bounding box [r0, r1, c0, c1), grown by margin and clipped.
    let r0 = h, r1 = -1, c0 = w, c1 = -1;
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) if (mask[y * w + x]) { r0 = Math.min(r0, y); r1 = y; c0 = Math.min(c0, x); c1 = Math.max(c1, x); }
    }
    return [Math.max(r0 - margin, 0), Math.min(r1 + 1 + margin, h), Math.max(c0 - margin, 0), Math.min(c1 + 1 + margin, w)];
  }

  function holes(mask, mw, box) {
    // capture._holes: what the mask encloses in box (4-connected complement, parts touching the box's
    // edge dropped); {lab, sizes, bw, bh}.
    const [r0, r1, c0, c1] = box, bw = c1 - c0, bh = r1 - r0, inv = new Uint8Array(bw * bh);
    for (let y = 0; y < bh; y++) for (let x = 0; x < bw; x++) inv[y * bw + x] = !mask[(y + r0) * mw + x + c0];
    const { lab, sizes } = label(inv, bw, bh, false);
    for (let x = 0; x < bw; x++) { sizes[lab[x]] = 0; sizes[lab[(bh - 1) * bw + x]] = 0; }
    for (let y = 0; y < bh; y++) { sizes[lab[y * bw]] = 0; sizes[lab[y * bw + bw - 1]] = 0; }
    sizes[0] = 0;
    return { lab, sizes, bw, bh };
  }

  function flat(s, w, h, limit) {
    // capture._flat: pixels in some 2 x 2 block whose variance (x 16, in float32) is under 16 limit^2.
    const out = new Uint8Array(w * h), lim = f32(16 * limit * limit);
    for (let y = 0; y + 1 < h; y++) {
      for (let x = 0; x + 1 < w; x++) {
        const i = y * w + x, a = s[i], b = s[i + 1], c = s[i + w], d = s[i + w + 1];
        const total = f32(f32(f32(a + b) + c) + d);
        const sq = f32(f32(f32(f32(a * a) + f32(b * b)) + f32(c * c)) + f32(d * d));
        if (f32(f32(4 * sq) - f32(total * total)) < lim) out[i] = out[i + 1] = out[i + w] = out[i + w + 1] = 1;
      }
    }
    return out;
  }

  function solve(a, b) {
    // A linear system by Gaussian elimination with partial pivoting (numpy.linalg.solve's LU).
    const n = b.length, m = a.map((row, i) => row.concat([b[i]])), x = new Array(n).fill(0);
    for (let c = 0; c < n; c++) {
      let p = c;
      for (let r = c + 1; r < n; r++) if (Math.abs(m[r][c]) > Math.abs(m[p][c])) p = r;
      [m[c], m[p]] = [m[p], m[c]];
      for (let r = c + 1; r < n; r++) for (let k = n, f = m[r][c] / m[c][c]; k >= c; k--) m[r][k] -= f * m[c][k];
    }
    for (let r = n - 1; r >= 0; r--) x[r] = (m[r][n] - x.reduce((t, v, k) => (k > r ? t + m[r][k] * v : t), 0)) / m[r][r];
    return x;
  }

  function fitSurface(rows, v, keep) {
    // Least squares (normal equations, + 1e-9 I) of v on the quadratic rows [1, x, y, xx, xy, yy].
    const ata = Array.from({ length: 6 }, () => new Array(6).fill(0)), atv = new Array(6).fill(0);
    rows.forEach((r, n) => {
      if (!keep[n]) return;
      for (let i = 0; i < 6; i++) { atv[i] += r[i] * v[n]; for (let j = 0; j < 6; j++) ata[i][j] += r[i] * r[j]; }
    });
    for (let i = 0; i < 6; i++) ata[i][i] += 1e-9;
    return solve(ata, atv);
  }

  function boxLevel(s, w, h, comp, box) {
    // capture._box_level: the box's brightness over `box`, a quadratic surface fitted to the outermost
    // pixels of each row and column of `comp` (its bright region there), refitted without outliers.
    const [r0, r1, c0, c1] = box, bw = c1 - c0, bh = r1 - r0, ys = [], xs = [];
    const first = (n, at) => { for (let i = 0; i < n; i++) if (at(i)) return i; return 0; };
    for (let y = 0; y < bh; y++) { ys.push(y); xs.push(first(bw, (x) => comp[y * bw + x])); }
    for (let y = 0; y < bh; y++) { ys.push(y); xs.push(bw - 1 - first(bw, (x) => comp[y * bw + bw - 1 - x])); }
    for (let x = 0; x < bw; x++) { xs.push(x); ys.push(first(bh, (y) => comp[y * bw + x])); }
    for (let x = 0; x < bw; x++) { xs.push(x); ys.push(bh - 1 - first(bh, (y) => comp[(bh - 1 - y) * bw + x])); }
    const v = ys.map((y, n) => s[(y + r0) * w + xs[n] + c0]);
    const rows = ys.map((y, n) => { const yy = (y + r0) / h - 0.5, xx = (xs[n] + c0) / w - 0.5; return [1, xx, yy, xx * xx, xx * yy, yy * yy]; });
    const all = fitSurface(rows, v, v.map(() => true));
    const keep = rows.map((r, n) => { const fit = r.reduce((t, a, i) => t + a * all[i], 0); return Math.abs(v[n] - fit) < 0.1 * fit; });
    const [k0, kx, ky, kxx, kxy, kyy] = fitSurface(rows, v, keep).map(f32);
    const out = new Float32Array(bw * bh);
    for (let y = 0; y < bh; y++) {
      const gy = f32(f32((y + r0) / h) - 0.5), a = f32(f32(k0 + f32(ky * gy)) + f32(f32(kyy * gy) * gy));
      for (let x = 0; x < bw; x++) {
        const gx = f32(f32((x + c0) / w) - 0.5), b = f32(f32(kx + f32(kxx * gx)) + f32(kxy * gy));
        out[y * bw + x] = f32(a + f32(b * gx));
      }
    }
    return out;
  }

  function lightBox(s, w, h) {
    // capture._light_box: {ring, box} (the box's visible border and its bounding box) or null. Of the bright,
    // smooth regions, the one enclosing most, less what lies below BOX_SHARE of the box's fitted level.
    const sample = [];
    for (let y = 0; y < h; y += 2) for (let x = 0; x < w; x += 2) sample.push(s[y * w + x]);
    const top = quantiles(sample, [0.995])[0];
    if (!(top > 0.05)) return null;
    const bright = Uint8Array.from(s, (v) => v > f32(0.55 * top));
    const [r0, r1, c0, c1] = extent(bright, w, h, 1), bw = c1 - c0, bh = r1 - r0, sub = new Float32Array(bw * bh);
    for (let y = 0; y < bh; y++) for (let x = 0; x < bw; x++) sub[y * bw + x] = s[(y + r0) * w + x + c0];
    const smooth = flat(sub, bw, bh, 0.04 * top);
    for (let y = 0; y < bh; y++) for (let x = 0; x < bw; x++) smooth[y * bw + x] &= bright[(y + r0) * w + x + c0];
    const { lab, sizes } = label(smooth, bw, bh, true), seed = f32(0.7 * top);
    // largest first (np.argsort(sizes)[::-1]: equal sizes, the later label first)
    const order = sizes.map((_, i) => i).sort((a, b) => sizes[b] - sizes[a] || b - a);
    let best = null, enclosed = MIN_ENCLOSED * s.length, tried = 0;
    for (const i of order) {
      if (sizes[i] < 0.02 * s.length || tried === 5) break;
      const comp = lab.map((l) => l === i);
      if (!comp.some((c, p) => c && sub[p] > seed)) continue;  // a dim region without a bright pixel is no box
      tried++;
      const box = extent(comp, bw, bh, 0);
      if ((box[1] - box[0]) * (box[3] - box[2]) - sizes[i] >= enclosed) {
        const hole = holes(comp, bw, box).sizes.reduce((a, b) => a + b, 0);
        if (hole >= enclosed) {
          const cw = box[3] - box[2], cropped = new Uint8Array(cw * (box[1] - box[0]));
          for (let y = box[0]; y < box[1]; y++) for (let x = box[2]; x < box[3]; x++) cropped[(y - box[0]) * cw + x - box[2]] = comp[y * bw + x];
          best = { comp: cropped, box: [box[0] + r0, box[1] + r0, box[2] + c0, box[3] + c0] };
          enclosed = hole;
        }
      }
    }
    if (!best) return null;
    // bright, smooth parts of the film touching the border lie below the box's level: peeled off
    const { comp, box } = best, level = boxLevel(s, w, h, comp, box), ring = new Uint8Array(w * h), cw = box[3] - box[2];
    comp.forEach((c, j) => {
      const i = (box[0] + ((j / cw) | 0)) * w + box[2] + (j % cw);
      if (c && s[i] > f32(BOX_SHARE * level[j])) ring[i] = 1;
    });
    return ring.includes(1) ? { ring, box } : null;
  }

  function outline(region, w, h) {
    // capture._outline: each row's and column's first and last pixel at the pixel's outer edge (their hull
    // is the region's), and the region's area with holes filled.
    const left = [], right = [], tops = [], bottoms = [];
    let area = 0;
    for (let y = 0; y < h; y++) {
      let a = -1, b = -1;
      for (let x = 0; x < w; x++) if (region[y * w + x]) { if (a < 0) a = x; b = x; }
      if (a >= 0) { left.push([a, y + 0.5]); right.push([b + 1, y + 0.5]); area += b + 1 - a; }
    }
    for (let x = 0; x < w; x++) {
      let a = -1, b = -1;
      for (let y = 0; y < h; y++) if (region[y * w + x]) { if (a < 0) a = y; b = y; }
      if (a >= 0) { tops.push([x + 0.5, a]); bottoms.push([x + 0.5, b + 1]); }
    }
    return { points: left.concat(right, tops, bottoms), area };
  }

  function signedArea(p) {
    let t = 0;
    for (let i = 0; i < p.length; i++) { const q = p[(i + 1) % p.length]; t += p[i][0] * q[1] - q[0] * p[i][1]; }
    return 0.5 * t;
  }

  function fourCorners(hull) {
    // capture._four_corners: the largest quadrilateral i < j < k < l on the hull's vertices, as triangles
    // (i, j, k) + (i, k, l) with the best j and l for each diagonal (i, k). The areas are exact (half pixels).
    const n = hull.length, sg = Math.sign(signedArea(hull));
    const c = (i, j) => hull[i][0] * hull[j][1] - hull[j][0] * hull[i][1];
    const tri = (i, j, k) => (c(i, j) + c(j, k) + c(k, i)) * sg;
    let top = -Infinity, pick = [0, 0, 0, 0];
    for (let i = 0; i < n; i++) {
      for (let k = i + 1; k < n; k++) {
        let a = -Infinity, b = -Infinity, j = 0, l = 0;  // the first of equals, as np.argmax
        for (let m = i + 1; m < k; m++) { const t = tri(i, m, k); if (t > a) { a = t; j = m; } }
        for (let m = k + 1; m < n; m++) { const t = tri(i, k, m); if (t > b) { b = t; l = m; } }
        if (a + b > top) { top = a + b; pick = [i, j, k, l]; }
      }
    }
    return pick.map((i) => hull[i]);
  }

  function sample(s, w, h, x, y) {
    // bilinear by hand, as capture._edge_points: float32 pixels, float64 weights
    const ix = Math.trunc(x), iy = Math.trunc(y), fx = x - ix, fy = y - iy, i = iy * w + ix;
    const a = s[i], b = s[i + 1], c = s[i + w], e = s[i + w + 1], v = a + fx * f32(b - a);
    return v + fy * (c + fx * f32(e - c) - v);
  }

  function refine(corners, s, w, h) {
    // capture._edge_points and _refine: where the brightness first falls halfway from the box to the film
    // across each side; each side's total least-squares line (refitted without points over a pixel off
    // it); neighbouring lines intersected. null when a side shows no step along most of it.
    const pts = [], found = [];
    for (let i = 0; i < 4; i++) {
      const a = corners[i], b = corners[(i + 1) % 4], dx = b[0] - a[0], dy = b[1] - a[1], len = Math.hypot(dx, dy);
      const nx = -dy / len, ny = dx / len;
      pts.push([]); found.push([]);
      for (const t of ALONG) {
        const bx = a[0] + t * dx, by = a[1] + t * dy;
        const v = ACROSS.map((u) => sample(s, w, h, Math.min(Math.max(bx - 0.5 + u * nx, 0), w - 1.001),
          Math.min(Math.max(by - 0.5 + u * ny, 0), h - 1.001)));
        let start = 0;
        for (let m = 1; m <= 8; m++) if (v[m] > v[start]) start = m;
        const box = v[start], film = Math.min(...v.slice(8)), mid = 0.5 * (box + film);
        let k = v.findIndex((x, m) => m > start && x < mid);
        const ok = k >= 0 && box - film > 0.1 * box;  // a step worth the name, not a glare's plateau
        k = Math.max(k, 1);
        const cross = ACROSS[k - 1] + (STEP * (v[k - 1] - mid)) / Math.max(v[k - 1] - v[k], 1e-9);
        pts[i].push([bx + cross * nx, by + cross * ny]);
        found[i].push(ok);
      }
    }
    const count = (r) => r.filter(Boolean).length;
    if (found.some((r) => count(r) < ENOUGH)) return null;
    let keep = found, c = [], d = [];
    for (let it = 0; it < 2; it++) {
      const near = [];
      c = []; d = [];
      for (let i = 0; i < 4; i++) {
        const wt = 1 / count(keep[i]);
        let cx = 0, cy = 0, sxx = 0, syy = 0, sxy = 0;
        pts[i].forEach((p, n) => { if (keep[i][n]) { cx += wt * p[0]; cy += wt * p[1]; } });
        pts[i].forEach((p, n) => {
          if (!keep[i][n]) return;
          const qx = p[0] - cx, qy = p[1] - cy;
          sxx += wt * qx * qx; syy += wt * qy * qy; sxy += wt * qx * qy;
        });
        const angle = 0.5 * Math.atan2(2 * sxy, sxx - syy), ux = Math.cos(angle), uy = Math.sin(angle);
        c.push([cx, cy]); d.push([ux, uy]);
        const row = pts[i].map((p, n) => found[i][n] && Math.abs((p[1] - cy) * ux - (p[0] - cx) * uy) <= 1.0);
        near.push(count(row) >= ENOUGH ? row : keep[i]);
      }
      if (near.every((r, i) => r.every((v, n) => v === keep[i][n]))) break;
      keep = near;
    }
    const out = [];
    for (let i = 0; i < 4; i++) {  // side i - 1 meets side i at corner i
      const c1 = c[(i + 3) % 4], d1 = d[(i + 3) % 4], det = d[i][0] * d1[1] - d1[0] * d[i][1];
      if (Math.abs(det) < 1e-6) return null;
      const t = (d[i][0] * (c[i][1] - c1[1]) - d[i][1] * (c[i][0] - c1[0])) / det;
      out.push([c1[0] + t * d1[0], c1[1] + t * d1[1]]);
    }
    // the edges lie within the search's reach of the rough corners, or the search found something else
    const moved = Math.max(...out.map((p, i) => Math.max(Math.abs(p[0] - corners[i][0]), Math.abs(p[1] - corners[i][1]))));
    return moved <= 2 * REACH ? out : null;
  }

  function ordered(points) {
    // Quad.from_array: 4 points clockwise (on screen) from the top-left (smallest x + y).
    const p = points.map((q) => [Number(q[0]), Number(q[1])]);
    const cx = (p[0][0] + p[1][0] + p[2][0] + p[3][0]) / 4, cy = (p[0][1] + p[1][1] + p[2][1] + p[3][1]) / 4;
    p.sort((a, b) => Math.atan2(a[1] - cy, a[0] - cx) - Math.atan2(b[1] - cy, b[0] - cx));
    let start = 0;
    for (let i = 1; i < 4; i++) if (p[i][0] + p[i][1] < p[start][0] + p[start][1]) start = i;
    return p.slice(start).concat(p.slice(0, start));
  }

  function quadOf(region, s, w, h) {
    // capture._quad_of: the quadrilateral the region fills, or null (not convex, not 4-sided, or the
    // region and the quad disagree pixel by pixel: a film's IoU is 0.95 or more, a lung's ring 0.89 or less).
    // the hull, near enough: the outline's extreme points in 32 directions, in order around it (numpy's
    // matmul may fuse x cos + y sin; ties on the pixel staircase that it breaks otherwise moved no quad)
    const { points, area } = outline(region, w, h), extreme = [];
    for (const [cs, sn] of DIRS) {
      let best = 0, top = -Infinity;
      points.forEach((p, i) => { const v = p[0] * cs + p[1] * sn; if (v > top) { top = v; best = i; } });
      if (!extreme.includes(best)) extreme.push(best);
    }
    const hull = extreme.map((i) => points[i]);
    if (hull.length < 4 || area < 0.9 * Math.abs(signedArea(hull))) return null;
    const corners = refine(fourCorners(hull), s, w, h);
    if (!corners) return null;
    const q = ordered(corners);
    let inter = 0, union = 0;
    for (let y = 0; y < h; y++) {
      // capture._spans: per row, the span between the sides' crossings
      let lo = -Infinity, hi = Infinity;
      const yc = y + 0.5;
      for (let i = 0; i < 4; i++) {
        const [ax, ay] = q[i], [bx, by] = q[(i + 1) % 4];
        if (by === ay) { if (!((bx - ax) * (yc - ay) >= 0)) lo = Infinity; }
        else if (by > ay) hi = Math.min(hi, ax + (bx - ax) * (yc - ay) / (by - ay));
        else lo = Math.max(lo, ax + (bx - ax) * (yc - ay) / (by - ay));
      }
      for (let x = 0; x < w; x++) {
        const inside = x + 0.5 >= lo && x + 0.5 <= hi, r = region[y * w + x];
        inter += inside && r; union += inside || r;
      }
    }
    return inter >= MIN_IOU * union ? q : null;
  }

  function isFrame(quad, w, h) {
    // Quad.is_frame: every corner within 3% of the frame's.
    const frame = [[0, 0], [w, 0], [w, h], [0, h]];
    return quad.every((p, i) => Math.abs(p[0] - frame[i][0]) / w <= FRAME_TOL && Math.abs(p[1] - frame[i][1]) / h <= FRAME_TOL);
  }

  function find(gray, w, h, work) {
    // capture.find_film: the film's 4 corners [x, y] (clockwise from top-left, in `gray`'s pixels) in a photo
    // of it on a light box, or null: a film file, or no light box. work: cxrImaging.workingCopy's copy.
    if (Math.min(w, h) < MIN_SIDE) return null;
    const wc = work || cxrImaging.workingCopy(gray, w, h, 160), s = wc.data, sw = wc.w, sh = wc.h, scale = w / sw;
    const found = lightBox(s, sw, sh);
    if (!found) return null;
    const { ring, box } = found, { lab, sizes, bw } = holes(ring, sw, box);
    let film = 0;
    for (let i = 1; i < sizes.length; i++) if (sizes[i] > sizes[film]) film = i;
    if (!(MIN_FILM * s.length <= sizes[film] && sizes[film] <= 0.95 * s.length)) return null;
    const region = new Uint8Array(sw * sh), inRegion = [], onRing = [];
    for (let y = box[0]; y < box[1]; y++) for (let x = box[2]; x < box[3]; x++) region[y * sw + x] = lab[(y - box[0]) * bw + x - box[2]] === film;
    s.forEach((v, i) => { if (region[i]) inRegion.push(v); if (ring[i]) onRing.push(v); });
    // a light box outshines what it lights: the film's bright tenth stays below the border's typical level
    if (quantiles(inRegion, [0.9])[0] >= 0.95 * quantiles(onRing, [0.5])[0]) return null;
    const q = quadOf(region, s, sw, sh);
    if (!q) return null;
    const quad = q.map(([x, y]) => [x * scale, y * scale]);
    return isFrame(quad, w, h) ? null : quad;
  }

  function homography(src, dst) {
    // geometry.homography: the 3 x 3 projective map (row-major, h22 = 1) taking 4 points src to dst.
    const a = [], b = [];
    src.forEach(([x, y], i) => {
      const [u, v] = dst[i];
      a.push([x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]);
      b.push(u, v);
    });
    return solve(a, b).concat([1]);
  }

  function sides(quad) {
    // pipeline._sides: the mean widths and heights of the quad's opposite sides
    const d = (a, b) => Math.hypot(quad[b][0] - quad[a][0], quad[b][1] - quad[a][1]);
    return [0.5 * (d(0, 1) + d(3, 2)), 0.5 * (d(0, 3) + d(1, 2))];
  }

  const pyRound = (x) => { const r = Math.round(x); return r - x === 0.5 && r % 2 ? r - 1 : r; };  // half to even

  function readSize(quad, side, readScale = READ_SCALE) {
    // pipeline._read_size: the film's own aspect, its long side READ_SCALE x the input side (at most the photo's)
    const [w, h] = sides(quad), scale = Math.min(1.0, (readScale * side) / Math.max(w, h));
    return [Math.max(8, pyRound(w * scale)), Math.max(8, pyRound(h * scale))];
  }

  function rectify(gray, w, h, quad, size) {
    // capture.rectify: the film inside quad warped to an upright size[0] x size[1] rectangle (Pillow's
    // PERSPECTIVE transform, BILINEAR, float32), each side trimmed by INSET, then the 0.5th..99.5th
    // percentiles stretched to 0..1.
    const [wo, ho] = size, ex = (wo * INSET) / (1 - 2 * INSET), ey = (ho * INSET) / (1 - 2 * INSET);
    const m = homography([[-ex, -ey], [wo + ex, -ey], [wo + ex, ho + ey], [-ex, ho + ey]], quad);
    let fill = 0;  // where the quad leaves the image: the image's typical level (strided median)
    if (quad.some(([x, y]) => x < 0 || y < 0 || x > w || y > h)) {
      const step = Math.max(1, Math.floor(Math.max(w, h) / 128)), v = [];
      for (let y = 0; y < h; y += step) for (let x = 0; x < w; x += step) v.push(gray[y * w + x]);
      const sorted = Float32Array.from(v).sort(), n = sorted.length;
      fill = n % 2 ? sorted[(n - 1) / 2] : f32(f32(sorted[n / 2 - 1] + sorted[n / 2]) / 2);
    }
    const out = cxrImaging.warp(gray, w, h, m, wo, ho, fill);
    const every = [];
    for (let y = 0; y < ho; y += 3) for (let x = 0; x < wo; x += 3) every.push(out[y * wo + x]);
    const [lo, hi] = quantiles(every, [0.005, 0.995]), flo = f32(lo), d = f32(Math.max(hi - lo, 1e-6));
    return out.map((v) => Math.min(1, Math.max(0, f32(f32(v - flo) / d))));
  }

  function rectified(gray, w, h, quad, side, readScale = READ_SCALE) {
    // pipeline._rectified: {data, w, h}, the film at readSize, warped from a copy box-shrunk by a whole
    // factor to at most twice that (Pillow's reduce), so the warp's bilinear taps do not alias.
    const size = readSize(quad, side, readScale), shrink = Math.trunc(Math.max(...sides(quad)) / (2 * Math.max(...size)));
    const im = shrink >= 2 ? cxrImaging.reduce(gray, w, h, shrink) : { data: gray, w, h };
    const q = shrink >= 2 ? quad.map(([x, y]) => [x * (1 / shrink), y * (1 / shrink)]) : quad;
    return { data: rectify(im.data, im.w, im.h, q, size), w: size[0], h: size[1] };
  }

  return { find, rectify, rectified, readSize, ordered, isFrame };
})();
