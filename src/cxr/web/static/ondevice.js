// cxr page, reading a film on this device: the model's ONNX graph in onnxruntime-web (WASM, threads when
// the page is cross-origin isolated), with what the server does around it, step for step (pipeline.admit,
// Predictor._infer, routes.infer): decode, orientation, the gate's image checks, preprocessing, the
// network, the gate's feature distance, calibrated independent probabilities, thresholds, "not assessed".
// The capture stage too: a photographed film is found on its light box (finder.js), or cropped where the
// user marked it, and rectified before it is read, as pipeline.capture does; and, when asked, the
// stability estimate over test-time variants of the film as read (stability.js), as Predictor._stability.
// read(file) answers exactly the JSON the server's /api/v1/predict would: {status, body}.
"use strict";

const cxrDevice = (() => {
  const f32 = Math.fround;
  const MIN_CROP_SHARE = 0.05;  // pipeline.MIN_CROP_SHARE, for a cached model.json without capture.min_crop_share
  let cfg = null;       // /offline/model.json: everything the server knows that the page needs
  let session = null;   // the onnxruntime-web InferenceSession
  let loading = null;

  function floats(b64) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return new Float32Array(bytes.buffer);
  }

  function script(src) {
    return new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = resolve;
      s.onerror = () => reject(new Error(`could not load ${src}`));
      document.head.append(s);
    });
  }

  async function prepare() {
    // Fetch the model's description, the runtime and the graph (from the service worker's cache offline).
    const r = await fetch("/offline/model.json");
    const c = await r.json();
    if (!c.available) throw new Error(c.why || "this model cannot be read on the device");
    for (const k of ["mean", "components", "variances"]) if (c.gate) c.gate[k] = floats(c.gate[k]);
    for (const k of ["weights", "mean", "scale"]) c.orientation[k] = floats(c.orientation[k]);
    if (typeof ort === "undefined") await script("/static/vendor/ort.wasm.min.js");
    if (typeof dicomParser === "undefined") await script("/static/vendor/dicomParser.min.js");
    ort.env.wasm.wasmPaths = "/static/vendor/";
    ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
    const graph = await (await fetch("/offline/model.onnx")).arrayBuffer();
    session = await ort.InferenceSession.create(graph, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
    cfg = c;
    return c;
  }

  function load() {
    if (!loading) loading = prepare().catch((e) => { loading = null; throw e; });
    return loading;
  }

  async function decode(file) {
    // {gray, w, h, colour}: DICOM through dicom.js, anything else the browser decodes (EXIF orientation
    // applied, as Pillow's exif_transpose; no colour management, as Pillow does none).
    const bytes = new Uint8Array(await file.arrayBuffer());
    if (cxrDicom.sniff(bytes)) return { ...cxrDicom.read(bytes), colour: 0 };
    let bitmap;
    try {
      bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none", imageOrientation: "from-image" });
    } catch (e) {
      throw new DeviceError(400, "unreadable_image", "the file is not an image this device can decode (PNG, JPEG or DICOM); " +
        "send a PNG, JPEG or DICOM file, or read it on the server");
    }
    const w = bitmap.width, h = bitmap.height;
    const canvas = new OffscreenCanvas(w, h);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    const rgba = ctx.getImageData(0, 0, w, h, { colorSpace: "srgb" }).data;
    return { gray: cxrImaging.toGray(rgba, w, h), w, h, colour: cxrImaging.colourfulness(rgba, w, h) };
  }

  class DeviceError extends Error {
    constructor(status, code, message, extra) { super(message); this.status = status; this.code = code; this.extra = extra || {}; }
  }

  const sentence = (t) => t.slice(0, 1).toUpperCase() + t.slice(1).replace(/\.+$/, "") + ".";

  function parseCrop(value) {
    // routes.parse_crop: "" (look for the film), "full" (the whole image) or 8 numbers, the page's corners.
    const v = String(value || "").trim().toLowerCase();
    if (v === "" || v === "auto") return null;
    if (v === "full" || v === "none") return "full";
    const number = (t) => {  // Python's float(): "inf" and "nan" too (crop_quad refuses them), never ""
      t = t.trim();
      if (/^[+-]?inf(inity)?$/.test(t)) return t.startsWith("-") ? -Infinity : Infinity;
      if (/^[+-]?nan$/.test(t)) return NaN;
      return t === "" || Number.isNaN(Number(t)) ? undefined : Number(t);
    };
    const numbers = v.replace(/;/g, ",").split(",").map(number);
    if (numbers.length !== 8 || numbers.includes(undefined)) {
      throw new DeviceError(400, "bad_crop", "crop: give 8 numbers x0,y0,x1,y1,x2,y2,x3,y3 (the film's corners in " +
        "the image's pixels), or 'full'");
    }
    return [0, 2, 4, 6].map((i) => [numbers[i], numbers[i + 1]]);
  }

  function cropQuad(p, w, h) {
    // pipeline.crop_quad: the user's corners, checked (inside the image with 1% slack, convex, >= 5% of it).
    const bad = (m) => new DeviceError(400, "bad_crop", m);
    if (!p.flat().every(Number.isFinite)) throw bad("crop: the corners must be finite numbers");
    const slack = 0.01 * Math.max(w, h);
    if (p.some(([x, y]) => x < -slack || y < -slack || x > w + slack || y > h + slack)) {
      throw bad(`crop: every corner must lie inside the ${w} x ${h} image`);
    }
    const q = cxrFinder.ordered(p.map(([x, y]) => [Math.min(Math.max(x, 0), w), Math.min(Math.max(y, 0), h)]));
    const d = q.map((a, i) => [q[(i + 1) % 4][0] - a[0], q[(i + 1) % 4][1] - a[1]]);
    const turns = d.map((a, i) => a[0] * d[(i + 1) % 4][1] - a[1] * d[(i + 1) % 4][0]);
    if (!(turns.every((t) => t > 0) || turns.every((t) => t < 0))) {
      throw bad("crop: the 4 corners must outline a convex quadrilateral (no crossed sides)");
    }
    const area = 0.5 * Math.abs(q.reduce((t, a, i) => t + q[(i + 3) % 4][0] * a[1] - a[0] * q[(i + 3) % 4][1], 0));
    const share = (cfg.capture || {}).min_crop_share ?? MIN_CROP_SHARE;
    if (area < share * w * h) {
      throw bad(`crop: the outline covers under ${Math.round(share * 100)}% of the image; mark the whole film`);
    }
    return q;
  }

  function capture(decoded, crop) {
    // pipeline.capture: the film found on a light box (crop null), the user's corners, or the whole image
    // ("full"); a found or given film rectified to the size _read_size chooses; then orientation and
    // polarity, corrected or refused. {film: {data, w, h}, info (CaptureOut), refused}.
    const o = cfg.orientation, { gray, w, h } = decoded, work = cxrImaging.workingCopy(gray, w, h, o.work_side);
    let quad = null, source = "none";
    if (Array.isArray(crop)) [quad, source] = cxrFinder.isFrame(crop, w, h) ? [null, "none"] : [crop, "given"];
    else if (crop === null) [quad, source] = [cxrFinder.find(gray, w, h, work), "found"];
    if (!quad) source = "none";
    let film = quad ? cxrFinder.rectified(gray, w, h, quad, cfg.input_size, (cfg.capture || {}).read_scale)
      : { data: gray, w, h };
    const seen = quad ? film : work;  // an uncropped film's orientation thumbnail comes from the working copy
    const r = cxrImaging.orientation(seen.data, seen.w, seen.h, o, true);
    const info = { crop_source: source, rotated_degrees: 90 * (r.k % 4), inverted: r.inverted,
      orientation_confidence: Math.round(r.confidence * 1e4) / 1e4, message: "" };
    if (quad) {  // as the server answers with ?preview=true: the corners, and the photo to draw them over
      info.crop = quad.map((p) => [p[0], p[1]]);
      info.photo = preview({ data: gray, w, h });
    }
    const said = { found: "the film was found in the photo and cropped to it", given: "the film was cropped where you marked it" }[source] || "";
    if (r.confidence < o.min_confidence) {
      info.message = `could not tell which way up this film is, or whether it is a negative (orientation ` +
        `confidence ${r.confidence.toFixed(2)}, under ${o.min_confidence}), so it was not read; ` +
        "send the film upright, bones white, filling the frame";
      return { film, info, refused: info.message };
    }
    const turned = cxrImaging.describe(r.k, r.inverted);
    if (turned) {
      const done = r.k % 4 && r.inverted ? "it was turned and made positive" : r.k % 4 ? "it was turned" : "it was made positive";
      film = cxrImaging.correct(film.data, film.w, film.h, r.k, r.inverted);
      info.message = [said, `${turned}; ${done} before reading`].filter(Boolean).join("; ");
    } else info.message = said;
    return { film, info, refused: null };
  }

  function input(...films) {
    // pipeline.preprocess, a batch of films: squashed to S x S (antialiased bilinear), 3 channels, minus
    // mean, over std (float32).
    const s = cfg.input_size, n = s * s, x = new Float32Array(films.length * 3 * n);
    films.forEach((film, b) => {
      const small = cxrImaging.resize(film.data, film.w, film.h, s, s, "bilinear");
      for (let c = 0; c < 3; c++) {
        const m = f32(cfg.mean[c]), sd = f32(cfg.std[c]), at = (3 * b + c) * n;
        for (let i = 0; i < n; i++) x[at + i] = f32(f32(small[i] - m) / sd);
      }
    });
    return new ort.Tensor("float32", x, [films.length, 3, s, s]);
  }

  async function stability(film, p) {
    // Predictor._stability: the film's test-time variants (stability.js), preprocessed as films are, one
    // batched forward, the largest move of the reported findings' probabilities (the server's StabilityOut).
    const side = 2 * cfg.input_size, made = await cxrStability.variants(film, side, cfg);
    const films = Object.values(made).map((data) => ({ data, w: side, h: side }));
    const logits = (await session.run({ image: input(...films) })).logits.data, k = logits.length / films.length;
    const pv = films.map((_, v) => probabilities(logits.subarray(v * k, (v + 1) * k)));
    return cxrStability.measure(p, pv, cfg.columns, cfg);
  }

  function gateScore(feats) {
    // gate.Stats.score / threshold: PPCA distance of the L2-normalised pooled features, in double.
    const g = cfg.gate, d = feats.length, k = g.dims;
    let norm = 0;
    for (const v of feats) norm += v * v;
    norm = Math.max(Math.sqrt(norm), 1e-12);
    const xc = new Float64Array(d);
    let total = 0;
    for (let i = 0; i < d; i++) { xc[i] = feats[i] / norm - g.mean[i]; total += xc[i] * xc[i]; }
    let inside = 0, along = 0;
    for (let j = 0; j < k; j++) {
      let z = 0;
      for (let i = 0; i < d; i++) z += xc[i] * g.components[i * k + j];
      along += z * z;
      inside += (z * z) / g.variances[j];
    }
    return Math.sqrt((inside + Math.max(total - along, 0) / g.residual) / d) / g.threshold;
  }

  function probabilities(logits) {
    // tasks.probabilities: independent sigmoids (Platt-calibrated where the model is), never renormalised.
    return Array.from(logits, (z, i) => {
      if (cfg.platt) z = z * cfg.platt[0][i] + cfg.platt[1][i];
      return f32(0.5 * (1 + Math.tanh(0.5 * z)));
    });
  }

  function heatmapPng(cam, mh, mw, peak, h, w) {
    // Predictor._heatmaps + render.heatmap_png: bilinear (align_corners=False) to the film's aspect at
    // most heatmap_max_side px, renormalised to max 1, coloured by the jet table, opacity from the heat.
    const scale = Math.min(1, cfg.heatmap_max_side / Math.max(h, w));
    const H = Math.max(1, Math.round(h * scale)), W = Math.max(1, Math.round(w * scale));
    const up = new Float32Array(H * W);
    let top = 0;
    for (let y = 0; y < H; y++) {
      const sy = Math.max(0, (y + 0.5) * (mh / H) - 0.5), y0 = Math.min(Math.floor(sy), mh - 1), y1 = Math.min(y0 + 1, mh - 1), fy = sy - y0;
      for (let x = 0; x < W; x++) {
        const sx = Math.max(0, (x + 0.5) * (mw / W) - 0.5), x0 = Math.min(Math.floor(sx), mw - 1), x1 = Math.min(x0 + 1, mw - 1), fx = sx - x0;
        const v = (cam[y0 * mw + x0] * (1 - fx) + cam[y0 * mw + x1] * fx) * (1 - fy) + (cam[y1 * mw + x0] * (1 - fx) + cam[y1 * mw + x1] * fx) * fy;
        up[y * W + x] = Math.max(0, v / peak);
        top = Math.max(top, up[y * W + x]);
      }
    }
    const canvas = document.createElement("canvas");
    canvas.width = W; canvas.height = H;
    const ctx = canvas.getContext("2d"), img = ctx.createImageData(W, H);
    for (let i = 0; i < up.length; i++) {
      const v = top > 0 ? Math.min(1, up[i] / top) : 0, j = Math.min(255, Math.trunc(f32(v * 256)));
      img.data.set([cfg.jet[3 * j], cfg.jet[3 * j + 1], cfg.jet[3 * j + 2], Math.round(v * cfg.heat_max_alpha)], 4 * i);
    }
    ctx.putImageData(img, 0, 0);
    return canvas.toDataURL("image/png");
  }

  function preview(film) {
    const scale = Math.min(1, cfg.preview_max_side / Math.max(film.w, film.h));
    const W = Math.max(1, Math.round(film.w * scale)), H = Math.max(1, Math.round(film.h * scale));
    const small = cxrImaging.resize(film.data, film.w, film.h, W, H, "bilinear");
    const canvas = document.createElement("canvas");
    canvas.width = W; canvas.height = H;
    const ctx = canvas.getContext("2d"), img = ctx.createImageData(W, H);
    for (let i = 0; i < small.length; i++) {
      const v = Math.min(255, Math.max(0, Math.trunc(small[i] * 255 + 0.5)));
      img.data.set([v, v, v, 255], 4 * i);
    }
    ctx.putImageData(img, 0, 0);
    return canvas.toDataURL("image/png");
  }

  async function run(decoded, crop, options = {}) {
    const cap = capture(decoded, crop === "full" || crop === null ? crop : cropQuad(crop, decoded.w, decoded.h));
    const film = cap.film;
    // colourfulness is the whole photo's: a room and a warm light box around a cropped film are not the film's
    const refused = cxrImaging.imageCheck(film.data, film.w, film.h, cap.info.crop ? 0 : decoded.colour, cfg.checks);
    if (refused) return refusal(refused, null);
    if (cap.refused) throw new DeviceError(422, "orientation_unsure", sentence(cap.refused));
    const out = await session.run({ image: input(film) });
    const logits = out.logits.data, feats = out.features.data, cams = out.cams;
    const score = cfg.gate ? gateScore(feats) : null;
    if (score !== null && score > 1) {
      return refusal(`${cfg.checks.refusal}: it does not resemble the films this model was trained on ` +
        `(distance ${score.toFixed(2)} x the limit)`, score);
    }
    const p = probabilities(logits), byName = Object.fromEntries(cfg.card.findings.map((f) => [f.name, f]));
    const [, , mh, mw] = cams.dims, heat = {};
    const findings = cfg.findings.map((name, i) => {
      const c = cfg.columns[i], card = byName[name], prob = p[c];
      const map = cams.data.subarray(c * mh * mw, (c + 1) * mh * mw);
      const peak = map.reduce((a, b) => Math.max(a, b), 0);  // an all-zero map stays transparent, as the server's
      heat[name] = Number.isFinite(peak) ? heatmapPng(map, mh, mw, peak > 0 ? peak : 1, film.h, film.w) : null;
      const f = { name, display_name: card.display_name, probability: prob, threshold: card.threshold,
        positive: card.assessed && prob >= card.threshold, assessed: card.assessed };
      if (!card.assessed) f.reason = card.reason;
      return f;
    });
    for (const n of Object.keys(heat)) if (!heat[n]) delete heat[n];
    const body = { findings, model: cfg.model, image: { width: decoded.w, height: decoded.h, preview: preview(film) },
      capture: cap.info };
    if (options && options.stability) body.stability = await stability(film, p);  // ?stability=true
    return { status: 200, body: { ...body, gate_score: score, heatmaps: heat, produced_by: "device" } };
  }

  function refusal(clause, score) {
    const reason = clause.slice(0, 1).toUpperCase() + clause.slice(1).replace(/\.+$/, "");
    return { status: 422, body: { error: "not_a_chest_xray", gate_score: score, produced_by: "device",
      message: `${reason}. This does not look like a frontal chest X-ray, so it was not read. ` +
        "Send a frontal (PA or AP) chest film, photographed flat and filling the frame." } };
  }

  async function read(file, crop, options = {}) {
    // {status, body} as the server would answer; errors a user can act on come back the same way.
    // crop: what the server's ?crop= takes ("" or absent: look for the film; "full"; 8 numbers, the corners).
    // options.stability: also the stability estimate, as ?stability=true (three more films through the graph).
    try {
      const wanted = parseCrop(crop);
      await load();
      return await run(await decode(file), wanted, options);
    } catch (e) {
      if (e instanceof DeviceError || e instanceof cxrDicom.DicomError) {
        return { status: e.status || 400, body: { error: e.code || "unsupported_image", message: e.message, produced_by: "device" } };
      }
      return { status: 500, body: { error: "device_failed", produced_by: "device",
        message: `Reading on this device failed (${e.message}); switch to "on the server" and try again` } };
    }
  }

  return { load, read, config: () => cfg };
})();
