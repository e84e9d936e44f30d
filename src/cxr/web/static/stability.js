// cxr page, the per-film stability estimate on the device: cxr.inference.stability redone in the browser.
// The film as read (cropped, turned) is squashed to twice the model's input side, and three variants of it
// are made as the server makes them: a 4 degree tilt (Pillow's rotate), a JPEG recompression and an
// exposure curve; ondevice.js runs them through the graph as one batch and measure() gives the server's
// StabilityOut. tests/test_offline_stability.py measures the parity on real films.
//
// How close each variant is to Python's (tests/test_offline_stability.py, 3 shared films, Debian chromium):
//   base      images.resize through cxrImaging.resize: bit for bit.
//   tilt      Image.rotate(TILT_DEG, BILINEAR, fillcolor=edge) on the "F" image: bit for bit (Pillow's
//             matrix, rounded to 15 digits as Pillow rounds it; Geometry.c's arithmetic per pixel).
//   exposure  bit for bit: the power in double, rounded once to float32 (Math.pow, Math.fround), as
//             Python takes it (float64, then float32: numpy's float32 power is not correctly rounded, and
//             where it errs depends on the server's CPU: glibc's FMA variant, numpy's AVX-512 loops).
//   jpeg      the same 8-bit levels as Pillow's grayscale JPEG (0 of 307,200 pixels differ): the browser's
//             encoder is libjpeg-turbo as Pillow's is, at the same quality and the same (ISLOW) DCT; the
//             gray goes in as R = G = B, whose luma is the levels themselves and whose chroma is flat, and
//             comes back as R = G = B = the decoded luma. Not promised by any standard: the test checks it.
// The estimate itself (per variant, unrounded): within 2.5e-6 of the server's on 8 films, onnxruntime-web
// against onnxruntime; 0 in the answer, which is rounded to 4 decimals.
"use strict";

const cxrStability = (() => {
  const f32 = Math.fround;
  // cxr.inference.stability's constants, for a server whose /offline/model.json does not carry them yet
  const DEFAULTS = { variants: ["tilt", "jpeg", "exposure"], tilt_deg: 4.0, jpeg_quality: 70, gamma: 1.25,
    lift: 0.05, limit: 0.10 };

  const settings = (cfg) => ({ ...DEFAULTS, ...((cfg && cfg.stability) || {}) });
  const pyRound = (x, n) => Number(x.toFixed(n));  // Python's round(x, n): the exact binary value rounded

  function edgeMedian(base, s) {
    // float(np.median(np.concatenate([base[0], base[-1], base[:, 0], base[:, -1]]))): 4s values, an even
    // count, so the float32 mean of the two middle ones.
    const e = new Float32Array(4 * s);
    for (let i = 0; i < s; i++) {
      e[i] = base[i]; e[s + i] = base[(s - 1) * s + i]; e[2 * s + i] = base[i * s]; e[3 * s + i] = base[i * s + s - 1];
    }
    e.sort();
    return f32(f32(e[2 * s - 1] + e[2 * s]) / 2);
  }

  function rotate(src, w, h, deg, fill) {
    // Image.rotate(deg, BILINEAR, fillcolor=fill) of an "F" image, not expanded: Pillow's inverse affine
    // map about the centre (w / 2, h / 2), its coefficients rounded to 15 digits, then Geometry.c's
    // generic transform (cxrImaging.warp).
    const angle = -(deg * (Math.PI / 180));  // math.radians: x * (pi / 180)
    const a = pyRound(Math.cos(angle), 15), b = pyRound(Math.sin(angle), 15);
    const d = pyRound(-Math.sin(angle), 15), e = pyRound(Math.cos(angle), 15);
    const cx = w / 2, cy = h / 2;
    const c = a * -cx + b * -cy + 0.0 + cx, f = d * -cx + e * -cy + 0.0 + cy;
    return cxrImaging.warp(src, w, h, [a, b, c, d, e, f, 0, 0], w, h, fill);
  }

  function exposure(base, gamma, lift) {
    // LIFT + (1 - LIFT) * power(clip(base, 0, 1), GAMMA): the power in double, then every step in float32.
    const l = f32(lift), m = f32(1 - lift);
    return base.map((v) => f32(l + f32(m * f32(Math.pow(Math.min(1, Math.max(0, v)), gamma)))));
  }

  async function jpeg(base, s, quality) {
    // _u8(base) saved as JPEG at `quality` and read back, / 255 in float32.
    const canvas = new OffscreenCanvas(s, s);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    const img = ctx.createImageData(s, s);
    for (let i = 0; i < base.length; i++) {
      const v = Math.trunc(Math.min(255, Math.max(0, f32(f32(base[i] * 255) + 0.5))));
      img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = v;
      img.data[4 * i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    const blob = await canvas.convertToBlob({ type: "image/jpeg", quality: quality / 100 });
    const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    ctx.clearRect(0, 0, s, s);
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    const rgba = ctx.getImageData(0, 0, s, s, { colorSpace: "srgb" }).data;
    const out = new Float32Array(s * s);
    for (let i = 0; i < out.length; i++) out[i] = f32(rgba[4 * i] / 255);
    return out;
  }

  async function variants(film, side, cfg) {
    // stability.variants(film, side): {name: side x side Float32Array}, in the order of the settings' variants.
    const S = settings(cfg);
    const base = cxrImaging.resize(film.data, film.w, film.h, side, side, "bilinear");
    const made = {
      tilt: () => rotate(base, side, side, S.tilt_deg, edgeMedian(base, side)),
      jpeg: () => jpeg(base, side, S.jpeg_quality),
      exposure: () => exposure(base, S.gamma, S.lift),
    };
    const out = {};
    for (const name of S.variants) {
      if (!made[name]) throw new Error(`this page cannot make the stability variant "${name}"; reload it`);
      out[name] = await made[name]();
    }
    return out;
  }

  function measure(p0, pv, columns, cfg) {
    // stability.measure + Stability.to_dict, as the server's StabilityOut: p0 the film's probabilities,
    // pv one array of probabilities a variant (in the settings' order); the largest |dp| over the columns.
    const S = settings(cfg), per = {};
    let spread = 0;
    S.variants.forEach((name, v) => {
      let top = 0;
      for (const c of columns) top = Math.max(top, Math.abs(pv[v][c] - p0[c]));
      per[name] = top;
      spread = Math.max(spread, top);
    });
    for (const name of Object.keys(per)) per[name] = pyRound(per[name], 4);
    return { spread: pyRound(spread, 4), per_variant: per, limit: S.limit, unstable: spread > S.limit };
  }

  return { settings, variants, measure, rotate, exposure, jpeg, edgeMedian };
})();
