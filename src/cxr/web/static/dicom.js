// cxr page, DICOM on this device (dicom-parser): what images/dicom.py does on the server, for uncompressed
// monochrome films: modality LUT (rescale slope/intercept), the VOI (LUT or window, LINEAR/LINEAR_EXACT/
// SIGMOID), min-max where the file gives none, MONOCHROME1 inverted after the VOI. Compressed films and
// colour DICOM are refused with a message that points to server mode, which decodes them.
"use strict";

const cxrDicom = (() => {
  const f32 = Math.fround;
  const UNCOMPRESSED = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian", "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
  };
  const SERVER = "switch to \u201con the server\u201d (it decodes compressed DICOM) or export the study uncompressed";

  class DicomError extends Error {
    constructor(message, status) { super(message); this.status = status || 415; this.code = "unsupported_image"; }
  }

  function sniff(bytes) {
    const at = (o) => String.fromCharCode(...bytes.subarray(o, o + 4));
    return (bytes.length > 132 && at(128) === "DICM") ||
      (bytes.length > 8 && bytes[0] === 0x08 && bytes[1] === 0x00 && bytes[3] === 0x00);  // a bare group-8 dataset
  }

  function first(ds, tag) {
    const s = ds.string(tag);
    if (s === undefined || s === "") return null;
    const v = parseFloat(s.split("\\")[0]);
    return Number.isFinite(v) ? v : null;
  }

  function pixels(ds, bytes, rows, cols) {
    const el = ds.elements.x7fe00010;
    if (!el) throw new DicomError("the uploaded file: this DICOM holds no image (no Pixel Data); send the image file of the study", 400);
    const bits = ds.uint16("x00280100") || 16, stored = ds.uint16("x00280101") || bits;
    const signed = ds.uint16("x00280103") === 1, n = rows * cols;
    const little = ds.string("x00020010") !== "1.2.840.10008.1.2.2";
    if (el.length < n * (bits / 8)) throw new DicomError("the uploaded file: DICOM pixel data is shorter than its header says; re-export the study", 400);
    const view = new DataView(bytes.buffer, bytes.byteOffset + el.dataOffset, el.length);
    const out = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      let v = bits === 8 ? view.getUint8(i) : view.getUint16(2 * i, little);
      if (stored < bits) v &= (1 << stored) - 1;
      if (signed && v >= 1 << (stored - 1)) v -= 1 << stored;  // two's complement in BitsStored bits
      out[i] = v;
    }
    return { raw: out, bits: stored, unsigned: !signed };
  }

  function voi(values, ds) {
    const seq = ds.elements.x00283010;
    if (seq && seq.items && seq.items.length) {
      const item = seq.items[0].dataSet, desc = item.elements.x00283002, data = item.elements.x00283006;
      if (desc && data) {
        const entries = item.uint16("x00283002", 0) || 65536, firstIn = item.uint16("x00283002", 1), lbits = item.uint16("x00283002", 2);
        const lut = new Float64Array(entries);
        for (let i = 0; i < entries; i++) lut[i] = item.uint16("x00283006", i) || 0;
        const full = Math.max(2 ** lbits - 1, Math.max(...lut), 1);
        return values.map((v) => f32(lut[Math.min(entries - 1, Math.max(0, Math.round(v) - firstIn))] / full));
      }
    }
    const c = first(ds, "x00281050"), w = first(ds, "x00281051");
    if (c === null || w === null) return null;
    const fn = (ds.string("x00281056") || "LINEAR").trim().toUpperCase();
    if (fn === "SIGMOID" && w > 0) return values.map((x) => f32(1 / (1 + Math.exp(-4 * (x - c) / w))));
    let g;
    if (fn === "LINEAR_EXACT" && w > 0) g = values.map((x) => (x - c) / w + 0.5);
    else if (w > 1) g = values.map((x) => (x - (c - 0.5)) / (w - 1) + 0.5);
    else if (w === 1) g = values.map((x) => (x > c - 0.5 ? 1 : 0));
    else return null;
    return g.map((v) => f32(Math.min(1, Math.max(0, v))));
  }

  function read(bytes) {
    // {gray Float32Array in [0, 1], w, h}, or a DicomError saying what to do instead.
    let ds;
    try {
      ds = dicomParser.parseDicom(bytes);
    } catch (e) {
      throw new DicomError(`the uploaded file: DICOM header cannot be read (${e.exception || e}); re-export the study`, 400);
    }
    const syntax = (ds.string("x00020010") || "1.2.840.10008.1.2.1").replace(/\0/g, "").trim();
    if (!UNCOMPRESSED[syntax]) {
      throw new DicomError(`the uploaded file: DICOM pixel data is compressed (transfer syntax ${syntax}), which this ` +
        `device cannot decode; ${SERVER}`);
    }
    const photometric = (ds.string("x00280004") || "MONOCHROME2").trim().toUpperCase();
    if (!["MONOCHROME1", "MONOCHROME2"].includes(photometric) || (ds.uint16("x00280002") || 1) !== 1) {
      throw new DicomError(`the uploaded file: DICOM photometric interpretation ${photometric} is read on the server only; ${SERVER}`);
    }
    if ((parseInt(ds.string("x00280008") || "1", 10) || 1) > 1) {
      throw new DicomError("the uploaded file: the DICOM has several frames (a cine loop or volume); cxr reads one 2-D film: export a single frame");
    }
    const rows = ds.uint16("x00280010"), cols = ds.uint16("x00280011");
    if (!rows || !cols) throw new DicomError("the uploaded file: DICOM header is incomplete (no Rows/Columns); re-export the study", 400);
    const px = pixels(ds, bytes, rows, cols);
    const slopeS = first(ds, "x00281053"), interS = first(ds, "x00281052");
    const slope = slopeS || 1, inter = interS || 0;
    const values = px.raw.map((v) => v * slope + inter);
    let gray = voi(values, ds);
    if (gray === null) {
      if (px.bits <= 8 && px.unsigned && slope === 1 && inter === 0) {
        gray = px.raw.map((v) => f32(v / (2 ** px.bits - 1)));
      } else {
        let lo = Infinity, hi = -Infinity;
        for (const v of values) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
        gray = values.map((v) => (hi > lo ? Math.min(1, Math.max(0, f32(f32(v - lo) * f32(1 / (hi - lo))))) : 0));
      }
    }
    const out = Float32Array.from(gray);
    if (photometric === "MONOCHROME1") for (let i = 0; i < out.length; i++) out[i] = f32(1 - out[i]);
    return { gray: out, w: cols, h: rows };
  }

  return { sniff, read, DicomError };
})();
