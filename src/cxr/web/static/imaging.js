// cxr page, on-device imaging: the server's decode-to-gray, Pillow's resampling, the gate's image checks and
// the orientation scorer, redone in the browser so that a film read here gives the server's numbers.
// Each function names the Python it reproduces; tests/test_offline.py measures the parity on real films.
"use strict";

const cxrImaging = (() => {
  const f32 = Math.fround;

  // Pillow's Resample.c for mode "F" images: per output pixel, filter taps over the input scaled by the
  // shrink factor (antialiasing), weights normalised, sums in double, the horizontal pass first and its
  // result stored as float32 before the vertical pass. filter: "bilinear" (support 1) or "box" (0.5).
  function taps(inSize, outSize, filter) {
    const support0 = filter === "box" ? 0.5 : 1.0;
    const scale = inSize / outSize;
    const filterscale = Math.max(scale, 1.0);
    const support = support0 * filterscale;
    const ss = 1.0 / filterscale;
    const kernel = filter === "box"
      ? (x) => (x > -0.5 && x <= 0.5 ? 1.0 : 0.0)
      : (x) => { x = Math.abs(x); return x < 1.0 ? 1.0 - x : 0.0; };
    const out = [];
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
      const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
      const k = new Float64Array(xmax);
      let ww = 0.0;
      for (let x = 0; x < xmax; x++) { k[x] = kernel((x + xmin - center + 0.5) * ss); ww += k[x]; }
      if (ww !== 0) for (let x = 0; x < xmax; x++) k[x] /= ww;
      out.push([xmin, k]);
    }
    return out;
  }

  function resize(src, w, h, outW, outH, filter) {
    // images.resize (BILINEAR, reducing_gap=None) and the capture stage's BOX shrinks, bit for bit in
    // intent: float32 storage between the passes, as Pillow keeps an "F" image.
    let cur = src, cw = w;
    if (outW !== w) {
      const t = taps(w, outW, filter);
      const tmp = new Float32Array(outW * h);
      for (let y = 0; y < h; y++) {
        const row = y * w;
        for (let xx = 0; xx < outW; xx++) {
          const [x0, k] = t[xx];
          let s = 0.0;
          for (let i = 0; i < k.length; i++) s += cur[row + x0 + i] * k[i];
          tmp[y * outW + xx] = s;
        }
      }
      cur = tmp; cw = outW;
    }
    if (outH !== h) {
      const t = taps(h, outH, filter);
      const tmp = new Float32Array(cw * outH);
      for (let yy = 0; yy < outH; yy++) {
        const [y0, k] = t[yy];
        for (let x = 0; x < cw; x++) {
          let s = 0.0;
          for (let i = 0; i < k.length; i++) s += cur[(y0 + i) * cw + x] * k[i];
          tmp[yy * cw + x] = s;
        }
      }
      cur = tmp;
    }
    return cur === src ? Float32Array.from(src) : cur;
  }

  function reduce(src, w, h, f) {
    // Pillow's Image.reduce(f) on an "F" image (Reduce.c, ImagingReduceNxN_32bpc and ..Corners_32bpc), to
    // the bit: whole blocks as float32 sums of 2 x 2 (and 2 x 1) groups added in double, times 1 / f^2;
    // the partial blocks at the right and bottom edges summed pixel by pixel over what they hold.
    const ow = Math.ceil(w / f), oh = Math.ceil(h / f), fw = Math.floor(w / f), fh = Math.floor(h / f);
    const out = new Float32Array(ow * oh), odd = f & 1, m = 1.0 / (f * f);
    for (let yy = 0; yy < fh; yy++) {
      for (let xx = 0; xx < fw; xx++) {
        const x0 = xx * f;
        let ss = 0.0, y = yy * f;
        for (; y < yy * f + f - 1; y += 2) {
          const a = y * w, b = a + w;
          let x = x0;
          for (; x < x0 + f - 1; x += 2) ss += f32(f32(f32(src[a + x] + src[a + x + 1]) + src[b + x]) + src[b + x + 1]);
          if (odd) ss += f32(src[a + x] + src[b + x]);
        }
        if (odd) {
          let x = x0;
          for (; x < x0 + f - 1; x += 2) ss += f32(src[y * w + x] + src[y * w + x + 1]);
          ss += src[y * w + x];
        }
        out[yy * ow + xx] = ss * m;
      }
    }
    const part = (xx, yy, x1, y1) => {  // a partial block, in double, over what it holds
      let ss = 0.0;
      for (let y = yy * f; y < y1; y++) for (let x = xx * f; x < x1; x++) ss += src[y * w + x];
      out[yy * ow + xx] = ss * (1.0 / ((x1 - xx * f) * (y1 - yy * f)));
    };
    if (w % f) for (let yy = 0; yy < fh; yy++) part(fw, yy, w, yy * f + f);
    if (h % f) for (let xx = 0; xx < fw; xx++) part(xx, fh, xx * f + f, h);
    if (w % f && h % f) part(fw, fh, w, h);
    return { data: out, w: ow, h: oh };
  }

  function toGray(rgba, w, h) {
    // pillow._gray: "L" (and gray stored as RGB) is value / 255; colour goes through Pillow's convert("L"),
    // the ITU-R 601 luma in 16-bit fixed point. Alpha is dropped, as Pillow drops it.
    const out = new Float32Array(w * h);
    for (let i = 0, j = 0; i < out.length; i++, j += 4) {
      const r = rgba[j], g = rgba[j + 1], b = rgba[j + 2];
      const l = r === g && g === b ? r : (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
      out[i] = f32(l / 255);
    }
    return out;
  }

  function colourfulness(rgba, w, h) {
    // pillow.colourfulness_of: Hasler & Suesstrunk on a strided ~256 px sample of the original colours.
    const step = Math.max(1, Math.floor(Math.max(w, h) / 256));
    const rg = [], yb = [];
    for (let y = 0; y < h; y += step) {
      for (let x = 0; x < w; x += step) {
        const j = 4 * (y * w + x);
        const r = rgba[j], g = rgba[j + 1], b = rgba[j + 2];
        rg.push(r - g); yb.push(0.5 * (r + g) - b);
      }
    }
    const ms = (a) => { let m = 0; for (const v of a) m += v; m /= a.length; let s = 0; for (const v of a) s += (v - m) ** 2; return [m, Math.sqrt(s / a.length)]; };
    const [mrg, srg] = ms(rg), [myb, syb] = ms(yb);
    return Math.hypot(srg, syb) + 0.3 * Math.hypot(mrg, myb);
  }

  function pyFixed(v, digits) {
    // Python's format(v, ".Nf") rounds half to even on the binary value; toFixed is close enough but for
    // ties, which the decimal expansions of these floats never are.
    return Number(v).toFixed(digits);
  }

  function imageCheck(gray, w, h, colour, c) {
    // gate.image_check: the same checks, thresholds and words.
    const refusal = (d) => `${c.refusal}: ${d}`;
    if (colour > c.max_colourfulness) {
      return refusal(`a colour image (colourfulness ${pyFixed(colour, 0)}, over ${pyFixed(c.max_colourfulness, 0)}); films are grayscale`);
    }
    if (Math.max(h, w) > c.max_aspect * Math.min(h, w)) {
      return refusal(`${w}x${h} pixels is not the shape of a chest film (one side over ${c.max_aspect}x the other)`);
    }
    const step = Math.max(1, Math.floor(Math.max(h, w) / c.sample_side));
    const shades = new Float64Array(256);
    let n = 0, sum = 0, sum2 = 0;
    for (let y = 0; y < h; y += step) {
      for (let x = 0; x < w; x += step) {
        const v = gray[y * w + x];
        sum += v; sum2 += v * v; n++;
        const s = f32(f32(v * 255) + 0.5);
        shades[Math.min(255, Math.max(0, Math.trunc(s)))]++;
      }
    }
    const mean = sum / n;
    const std = Math.sqrt(Math.max(0, sum2 / n - mean * mean));
    if (std < c.min_std) return refusal(`the image is blank or nearly uniform (contrast ${pyFixed(std, 3)})`);
    const share = Math.max(...shades) / n;
    if (share > c.max_flat_share) {
      return refusal(`${Math.round(share * 100)}% of the image is one flat shade (a document, screenshot or drawing?)`);
    }
    return null;
  }

  // --- orientation and polarity (images.capture.orientation on pipeline.capture's working copy) ----------

  function workingCopy(gray, w, h, side) {
    const s = Math.min(1.0, side / Math.max(h, w));
    if (s >= 1.0) return { data: gray, w, h };
    let im = { data: gray, w, h };
    const f = Math.trunc(1 / s);
    if (f >= 2) im = reduce(gray, w, h, f);
    const round = (x) => { const r = Math.round(x); return r - x === 0.5 && r % 2 ? r - 1 : r; };  // Python's round
    const ow = Math.max(1, round(w * s)), oh = Math.max(1, round(h * s));
    return { data: resize(im.data, im.w, im.h, ow, oh, "box"), w: ow, h: oh };
  }

  function quantiles(values, qs) {
    // images.arrays.quantiles: linear interpolation between order statistics, in float32 as numpy does it.
    const s = Float32Array.from(values).sort(), last = s.length - 1;
    return qs.map((q) => {
      const i = Math.trunc(q * last), d = f32(s[Math.min(i + 1, last)] - s[i]);
      return f32(s[i] + f32(f32(q * last - i) * d));
    });
  }

  function warp(src, w, h, m, wo, ho, fill) {
    // Pillow's Image.transform of an "F" image with BILINEAR (Geometry.c's generic transform): each output
    // pixel's centre (x + 0.5, y + 0.5) mapped into the input by m (8 coefficients, perspective; an affine
    // map has m[6] = m[7] = 0, and its division by 1 is exact), outside [0, w) x [0, h) the fill, else
    // bilinear_filter32F: taps clipped to the edge, the difference of two taps in float32 (C's
    // float - float), the rest in double, stored float32. capture.rectify and Image.rotate both run it.
    const out = new Float32Array(wo * ho).fill(fill);
    const clip = (v, n) => (v < 0 ? 0 : v < n ? v : n - 1);
    for (let y = 0; y < ho; y++) {
      const v = y + 0.5;
      for (let x = 0; x < wo; x++) {
        const u = x + 0.5, den = m[6] * u + m[7] * v + 1;
        let xx = (m[0] * u + m[1] * v + m[2]) / den, yy = (m[3] * u + m[4] * v + m[5]) / den;
        if (xx < 0.0 || xx >= w || yy < 0.0 || yy >= h) continue;
        xx -= 0.5; yy -= 0.5;
        const ix = Math.floor(xx), iy = Math.floor(yy), dx = xx - ix, dy = yy - iy;
        const x0 = clip(ix, w), x1 = clip(ix + 1, w);
        let row = clip(iy, h) * w;
        const v1 = src[row + x0] + f32(src[row + x1] - src[row + x0]) * dx;
        let v2 = v1;
        if (iy + 1 >= 0 && iy + 1 < h) { row = (iy + 1) * w; v2 = src[row + x0] + f32(src[row + x1] - src[row + x0]) * dx; }
        out[y * wo + x] = v1 + (v2 - v1) * dy;
      }
    }
    return out;
  }

  function thumbnail(im, n) {
    const t = resize(im.data, im.w, im.h, n, n, "box");
    const [lo, hi] = quantiles(t, [0.01, 0.99]);
    const d = f32(Math.max(hi - lo, 1e-6));
    return t.map((v) => Math.min(1, Math.max(0, f32(f32(v - lo) / d))));
  }

  function rotCw(a, n) {  // np.rot90(a, -1) of an n x n image
    const out = new Float32Array(n * n);
    for (let i = 0; i < n; i++) for (let j = 0; j < n; j++) out[i * n + j] = a[(n - 1 - j) * n + i];
    return out;
  }

  function correctSquare(t, n, k, inv) {
    let out = t;
    for (let i = 0; i < k; i++) out = rotCw(out, n);
    return inv ? out.map((v) => f32(1 - v)) : out;
  }

  function features(u, n) {
    const m = n / 2, out = new Float64Array(m * m * 2 + 16);
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < m; j++) {
        const v = f32((u[2 * i * n + 2 * j] + u[2 * i * n + 2 * j + 1] + u[(2 * i + 1) * n + 2 * j] + u[(2 * i + 1) * n + 2 * j + 1]) / 4);
        out[i * m + j] = v;
        out[m * m + i * m + j] = f32(v * v);
      }
    }
    for (const v of u) out[2 * m * m + Math.min(15, Math.trunc(f32(v * 16)))] += 1 / u.length;
    return out;
  }

  function orientation(gray, w, h, o, asIs) {
    // {k, inverted, confidence}: the 8 hypotheses scored by the linear scorer, softmax, the best kept.
    // asIs: thumbnail `gray` itself (the working copy already made, or a rectified film, as pipeline.capture).
    const work = asIs ? { data: gray, w, h } : workingCopy(gray, w, h, o.work_side);
    const thumb = thumbnail(work, o.thumb);
    const z = [], hyps = [];
    for (const inv of [false, true]) {
      for (let k = 0; k < 4; k++) {
        const x = features(correctSquare(thumb, o.thumb, k, inv), o.thumb);
        let s = 0;
        for (let i = 0; i < x.length; i++) s += ((x[i] - o.mean[i]) / o.scale[i]) * o.weights[i];
        z.push(s); hyps.push([k, inv]);
      }
    }
    const top = Math.max(...z), e = z.map((v) => Math.exp(v - top)), total = e.reduce((a, b) => a + b, 0);
    const best = e.indexOf(Math.max(...e));
    return { k: hyps[best][0], inverted: hyps[best][1], confidence: e[best] / total };
  }

  function correct(gray, w, h, k, inv) {
    // capture.correct on the full film: np.rot90(film, -k), then 1 - film for a negative.
    let data = gray, cw = w, ch = h;
    for (let r = 0; r < k % 4; r++) {
      const out = new Float32Array(cw * ch);  // clockwise: new is ch wide, cw high
      for (let i = 0; i < cw; i++) for (let j = 0; j < ch; j++) out[i * ch + j] = data[(ch - 1 - j) * cw + i];
      data = out; [cw, ch] = [ch, cw];
    }
    if (inv) data = data.map((v) => f32(1 - v));
    return { data, w: cw, h: ch };
  }

  function describe(k, inv) {
    const turn = { 1: "turned 90 degrees anticlockwise", 2: "upside down", 3: "turned 90 degrees clockwise" };
    const parts = (k % 4 ? [`was ${turn[k % 4]}`] : []).concat(inv ? ["was a negative"] : []);
    return parts.length ? "this film " + parts.join(" and ") : "";
  }

  return { resize, reduce, workingCopy, toGray, colourfulness, imageCheck, orientation, correct, describe, pyFixed,
    quantiles, warp };
})();
