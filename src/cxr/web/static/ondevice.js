// cxr page, reading a film on this device: the model's ONNX graph in onnxruntime-web (WASM, threads when
// the page is cross-origin isolated), with what the server does around it, step for step (pipeline.admit,
// Predictor._infer, routes.infer): decode, orientation, the gate's image checks, preprocessing, the
// network, the gate's feature distance, calibrated independent probabilities, thresholds, "not assessed".
// read(file) answers exactly the JSON the server's /api/v1/predict would: {status, body}.
"use strict";

const cxrDevice = (() => {
  const f32 = Math.fround;
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

  function capture(film) {
    // pipeline.capture without the film finder (server only): orientation and polarity, corrected or refused.
    const o = cfg.orientation, r = cxrImaging.orientation(film.gray, film.w, film.h, o);
    const info = { crop: null, crop_source: "none", rotated_degrees: 90 * (r.k % 4), inverted: r.inverted,
      orientation_confidence: Math.round(r.confidence * 1e4) / 1e4, message: "" };
    if (r.confidence < o.min_confidence) {
      info.refused = `could not tell which way up this film is, or whether it is a negative (orientation ` +
        `confidence ${r.confidence.toFixed(2)}, under ${o.min_confidence}), so it was not read; ` +
        "send the film upright, bones white, filling the frame";
      return { film, info };
    }
    const turned = cxrImaging.describe(r.k, r.inverted);
    if (!turned) return { film, info };
    const done = r.k % 4 && r.inverted ? "it was turned and made positive" : r.k % 4 ? "it was turned" : "it was made positive";
    info.message = `${turned}; ${done} before reading`;
    return { film: cxrImaging.correct(film.gray, film.w, film.h, r.k, r.inverted), info };
  }

  function input(film) {
    // pipeline.preprocess: squashed to S x S (antialiased bilinear), 3 channels, minus mean, over std (float32).
    const s = cfg.input_size, small = cxrImaging.resize(film.data, film.w, film.h, s, s, "bilinear");
    const x = new Float32Array(3 * s * s);
    for (let c = 0; c < 3; c++) {
      const m = f32(cfg.mean[c]), sd = f32(cfg.std[c]);
      for (let i = 0; i < s * s; i++) x[c * s * s + i] = f32(f32(small[i] - m) / sd);
    }
    return new ort.Tensor("float32", x, [1, 3, s, s]);
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

  async function run(decoded) {
    const cap = capture(decoded);
    const film = cap.film.data ? cap.film : { data: cap.film.gray, w: cap.film.w, h: cap.film.h };
    const refused = cxrImaging.imageCheck(film.data, film.w, film.h, decoded.colour, cfg.checks);
    if (refused) return refusal(refused, null);
    if (cap.info.refused) throw new DeviceError(422, "orientation_unsure", sentence(cap.info.refused));
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
    return { status: 200, body: { findings, model: cfg.model, image: { width: decoded.w, height: decoded.h, preview: preview(film) },
      gate_score: score, heatmaps: heat, capture: cap.info, produced_by: "device" } };
  }

  function refusal(clause, score) {
    const reason = clause.slice(0, 1).toUpperCase() + clause.slice(1).replace(/\.+$/, "");
    return { status: 422, body: { error: "not_a_chest_xray", gate_score: score, produced_by: "device",
      message: `${reason}. This does not look like a frontal chest X-ray, so it was not read. ` +
        "Send a frontal (PA or AP) chest film, photographed flat and filling the frame." } };
  }

  async function read(file) {
    // {status, body} as the server would answer; errors a user can act on come back the same way.
    try {
      await load();
      return await run(await decode(file));
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
