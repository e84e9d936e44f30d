// cxr page, the capture part: what was done to a photographed film before it was read (crop, turn), the
// crop drawn over the photo with corners the user can drag, "read again" / "whole photo" / "retake", and
// the stability estimate. app.js calls cxrCapture.query(file) when it uploads to the server (or
// cxrCapture.choice(file) when it reads on this device: the same crop) and cxrCapture.show(result).
"use strict";

const cxrCapture = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  let file = null;        // the file last sent: "read again" resends it with the adjusted crop
  let next = "";          // the crop to send with the next upload of that file ("" = let the server look)
  let points = null;      // the crop's 4 corners [x, y] in the image's pixels
  const byId = (id) => document.getElementById(id);

  function choice(f) {
    // What to do with this file: "" (look for the film), "full" or the corners as 8 numbers. A new file
    // starts afresh; the same file read again carries the crop the user chose. The device reads it as is.
    const crop = f === file ? next : "";
    file = f;
    next = "";
    return crop;
  }

  function query(f) {
    // The same choice as the server's ?crop= parameter.
    const crop = choice(f);
    return crop ? `&crop=${encodeURIComponent(crop)}` : "";
  }

  function say(id, text) {
    const e = byId(id);
    e.textContent = text || "";
    e.hidden = !text;
  }

  function show(result) {
    const c = result.capture || {};
    say("capture-message", c.message ? sentence(c.message) : "");
    showStability(result.stability);
    const turned = c.rotated_degrees || c.inverted;
    const src = c.photo || (!turned && !c.crop ? result.image.preview : null);
    const box = byId("crop-editor");
    box.hidden = !src;
    if (!src) return;
    const w = result.image.width, h = result.image.height;
    points = c.crop ? c.crop.map((p) => p.slice()) :
      [[0.05 * w, 0.05 * h], [0.95 * w, 0.05 * h], [0.95 * w, 0.95 * h], [0.05 * w, 0.95 * h]];
    byId("crop-photo").src = src;
    byId("crop-title").textContent = c.crop ? "The crop that was read" : "Crop the film by hand";
    draw(w, h);
  }

  function showStability(s) {
    if (!s) { say("stability", ""); return; }
    const pts = (x) => `${Math.round(x * 100)} points`;
    say("stability", s.unstable
      ? `Unstable: a finding's likelihood moved by up to ${pts(s.spread)} when the film was tilted 4\u00b0, ` +
        `recompressed or exposed differently (limit ${pts(s.limit)}). Retake the photo flat, evenly lit and ` +
        "filling the frame, or send the file itself."
      : `Stable: likelihoods moved by at most ${pts(s.spread)} under a small tilt, recompression or exposure change.`);
    byId("stability").classList.toggle("warn", !!s.unstable);
  }

  function draw(w, h) {
    const svg = byId("crop-svg");
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    svg.replaceChildren();
    const poly = document.createElementNS(SVG, "polygon");
    poly.setAttribute("class", "crop-line");
    svg.append(poly);
    const r = Math.max(w, h) / 40;
    const handles = points.map((p, i) => {
      const c = document.createElementNS(SVG, "circle");
      c.setAttribute("class", "crop-handle");
      c.setAttribute("r", r);
      c.setAttribute("tabindex", "0");
      c.setAttribute("aria-label", ["top-left", "top-right", "bottom-right", "bottom-left"][i] + " corner");
      c.addEventListener("pointerdown", (e) => { c.setPointerCapture(e.pointerId); e.preventDefault(); });
      c.addEventListener("pointermove", (e) => {
        if (!c.hasPointerCapture(e.pointerId)) return;
        const m = svg.getScreenCTM().inverse();
        const q = new DOMPoint(e.clientX, e.clientY).matrixTransform(m);
        points[i] = [Math.min(w, Math.max(0, q.x)), Math.min(h, Math.max(0, q.y))];
        update();
      });
      svg.append(c);
      return c;
    });
    function update() {
      poly.setAttribute("points", points.map((p) => p.join(",")).join(" "));
      handles.forEach((c, i) => { c.setAttribute("cx", points[i][0]); c.setAttribute("cy", points[i][1]); });
    }
    update();
  }

  function wire() {
    byId("crop-read").addEventListener("click", () => {
      if (!file || !points) return;
      next = points.map((p) => p.map((v) => v.toFixed(1)).join(",")).join(",");
      upload(file);
    });
    byId("crop-full").addEventListener("click", () => { if (file) { next = "full"; upload(file); } });
    byId("crop-retake").addEventListener("click", () => byId("camera").click());
  }

  document.addEventListener("DOMContentLoaded", wire);
  return { choice, query, show };
})();
