// cxr page: upload a film, show the 14 independent likelihoods, overlay a finding's heatmap on tap.
// Every string from the server goes through textContent (never innerHTML): messages may quote a file.
"use strict";

const API = "/api/v1";
const $ = (id) => document.getElementById(id);
let pending = null;   // AbortController of the upload in flight: a new film cancels the old request
let heatmaps = {};    // finding -> PNG data URL of the current film

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function pct(p) {
  // Honest rounding: never show 0% or 100% for a probability that is neither.
  if (p < 0.01) return "<1%";
  if (p > 0.99) return ">99%";
  return Math.round(p * 100) + "%";
}

// Server messages are clauses joined for a terminal ("the uploaded file: ...; send ..."): the page shows
// each as a sentence, with a capital and a full stop.
function sentence(text) {
  const t = String(text).trim();
  if (!t) return t;
  const s = t[0].toUpperCase() + t.slice(1);
  return /[.!?]["')\]]*$/.test(s) ? s : s + ".";
}

function setStatus(text, busy) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("busy", !!busy);
}

function clearMessages() {
  $("error").hidden = true;
  $("refusal").hidden = true;
}

function showError(message) {
  $("error-message").textContent = sentence(message);
  $("error").hidden = false;
  $("error").scrollIntoView({ block: "nearest" });
}

function showRefusal(message) {
  $("refusal-message").textContent = sentence(message);
  $("refusal").hidden = false;
  $("refusal").scrollIntoView({ block: "nearest" });
}

function mode() {
  const device = $("mode-device");
  return device && device.checked && !device.disabled ? "device" : "server";
}

const WHERE = {
  device: "Read on this device: the film never left it.",
  server: "Read on the server.",
};

async function upload(file) {
  if (!file) return;
  if (pending) pending.abort();
  pending = new AbortController();
  clearMessages();
  $("results").hidden = true;
  setStatus("Reading the film\u2026", true);
  if (mode() === "device") {
    const ticket = pending;
    // the same question as the server's: the crop, and the stability estimate (stability=true)
    return finish(await cxrDevice.read(file, cxrCapture.choice(file), { stability: true }), "device", ticket);
  }
  const form = new FormData();
  form.append("file", file);
  let response, body;
  try {
    response = await fetch(`${API}/predict?heatmaps=all&preview=true&stability=true${cxrCapture.query(file)}`, {
      method: "POST", body: form, signal: pending.signal,
    });
    body = await response.json().catch(() => null);
  } catch (err) {
    if (err.name === "AbortError") return;
    setStatus("");
    showError("Could not reach the server. Check the connection (or that cxr serve is running) and try again.");
    return;
  }
  finish({ status: response.status, body }, "server", null);
}

function finish(answer, where, ticket) {
  // The server's answer or the device's (the same JSON): one way to show either, saying which it was.
  if (ticket && ticket !== pending) return;  // a newer film was chosen meanwhile
  const { status, body } = answer;
  setStatus("");
  if (status !== 200 || !body || !body.findings) {
    const message = (body && body.message) || `The server answered ${status}; try again.`;
    if (body && body.error === "not_a_chest_xray") showRefusal(message);
    else showError(message);
    return;
  }
  render(body, where);
}

function render(result, where) {
  heatmaps = result.heatmaps || {};
  const film = $("film");
  film.src = result.image.preview || "";
  film.hidden = !result.image.preview;
  $("overlay").hidden = true;
  $("caption").textContent = "Tap a finding to see where the network looked.";
  const list = $("findings");
  list.replaceChildren();
  const sorted = [...result.findings].sort((a, b) => b.probability - a.probability);
  // A finding the model has no evidence for is never flagged: it goes, greyed, under its own heading.
  for (const f of sorted.filter((f) => f.assessed !== false)) list.append(findingRow(f));
  const unassessed = sorted.filter((f) => f.assessed === false);
  $("unassessed").replaceChildren(...unassessed.map(unassessedRow));
  $("not-assessed").hidden = unassessed.length === 0;
  cxrCapture.show(result);  // capture.js: the crop, the turn undone, the stability estimate
  $("produced-by").textContent = WHERE[where];
  $("results").dataset.producedBy = where;
  $("results").hidden = false;
  $("results").scrollIntoView({ behavior: "smooth", block: "start" });  // on a phone it is below the fold
  const on = where === "device" ? "on this device" : "on the server";
  setStatus(`Read a ${result.image.width} \u00d7 ${result.image.height} film with ${result.model.name}, ${on}.`);
}

function findingRow(f) {
  const li = el("li");
  const b = el("button", "finding" + (f.positive ? " positive" : ""));
  b.type = "button";
  b.dataset.finding = f.name;
  b.setAttribute("aria-pressed", "false");
  const name = el("span", "name", f.display_name);
  if (f.positive) name.append(el("span", "flag", "above threshold"));
  const value = el("span", "pct", pct(f.probability));
  const bar = el("span", "bar");
  const fill = el("span", "fill");
  fill.style.width = `${(f.probability * 100).toFixed(1)}%`;  // CSSOM: allowed by the page's CSP
  const mark = el("span", "mark");
  mark.style.left = `${(f.threshold * 100).toFixed(1)}%`;
  mark.title = `threshold ${pct(f.threshold)}`;
  bar.append(fill, mark);
  b.append(name, value, bar);
  b.setAttribute("aria-label",
    `${f.display_name}: ${pct(f.probability)}, threshold ${pct(f.threshold)}` + (f.positive ? ", above threshold" : ""));
  b.addEventListener("click", () => toggleHeatmap(b, f));
  li.append(b);
  return li;
}

function unassessedRow(f) {
  // Still a finding button (its heatmap can be looked at), greyed, with no threshold and never a flag.
  const li = findingRow({ ...f, positive: false });
  const b = li.firstChild;
  const reason = sentence(f.reason || "No validation evidence for this finding");
  b.classList.add("unassessed");
  b.append(el("span", "reason", reason));
  b.setAttribute("aria-label", `${f.display_name}: not assessed (${pct(f.probability)}). ${reason}`);
  return li;
}

function toggleHeatmap(button, f) {
  const overlay = $("overlay");
  const on = button.getAttribute("aria-pressed") !== "true";
  for (const other of document.querySelectorAll(".finding")) other.setAttribute("aria-pressed", "false");
  if (!on || !heatmaps[f.name]) {
    overlay.hidden = true;
    $("caption").textContent = on ? `No heatmap for ${f.display_name}.` : "No finding selected.";
    return;
  }
  button.setAttribute("aria-pressed", "true");
  overlay.src = heatmaps[f.name];
  overlay.alt = `Where the network looked for ${f.display_name}`;
  overlay.hidden = false;
  $("caption").textContent = `${f.display_name} (${pct(f.probability)}): warmer colours weighed more in its score.`;
}

function wireInputs() {
  for (const id of ["camera", "picker"]) {
    $(id).addEventListener("change", (e) => {
      upload(e.target.files[0]);
      e.target.value = "";  // choosing the same file again must still trigger a read
    });
  }
  const drop = $("drop");
  // Dropping a file anywhere must not make the browser navigate away to it.
  for (const type of ["dragover", "drop"]) document.addEventListener(type, (e) => e.preventDefault());
  drop.addEventListener("dragenter", () => drop.classList.add("dragging"));
  drop.addEventListener("dragleave", (e) => { if (!drop.contains(e.relatedTarget)) drop.classList.remove("dragging"); });
  drop.addEventListener("drop", (e) => {
    drop.classList.remove("dragging");
    upload(e.dataTransfer && e.dataTransfer.files[0]);
  });
}

function cardRow(dl, term, value) {
  if (value === null || value === undefined || value === "") return;
  dl.append(el("dt", "", term), el("dd", "", String(value)));
}

async function loadModelCard() {
  const dl = $("model-card");
  let card;
  try {
    const r = await fetch(`${API}/model`);
    card = await r.json();
    if (!r.ok) throw new Error(card.message);
  } catch (err) {
    dl.replaceChildren(el("dt", "", "Model"), el("dd", "", "The model card could not be loaded."));
    return;
  }
  dl.replaceChildren();
  cardRow(dl, "Model", `${card.name} (${card.members > 1 ? `${card.members} × ` : ""}${card.arch}, ${card.input_size} px)`);
  cardRow(dl, "Data", card.data);
  const auc = card.macro_auc == null ? "not recorded" : `${card.macro_auc.toFixed(3)} mean AUC`;
  cardRow(dl, "Validation", card.validation ? `${auc} (${card.validation})` : auc);
  cardRow(dl, "Operating point", card.operating_point);
  cardRow(dl, "Probabilities", card.calibrated ? "calibrated per finding (Platt scaling)" : "not recalibrated");
  const absent = card.findings.filter((f) => f.assessed === false).map((f) => f.display_name);
  cardRow(dl, "Cannot assess", absent.length ? absent.join(", ") : "");
  cardRow(dl, "Refuses non-chest images", card.gate ? "yes" : "no: check the film is a frontal chest X-ray yourself");
  cardRow(dl, "Intended use", card.intended_use);
  cardRow(dl, "Limitations", card.limitations);
  const tbody = $("aucs").tBodies[0];
  tbody.replaceChildren();
  for (const f of card.findings) {
    const tr = el("tr");
    tr.append(el("td", "", f.display_name),
      el("td", "num", f.validation_auc == null ? "\u2013" : f.validation_auc.toFixed(3)),
      el("td", "num", pct(f.threshold)),
      el("td", "", f.assessed === false ? `no: ${f.reason || "no evidence"}` : "yes"));
    tbody.append(tr);
  }
}

async function goOffline() {
  // Install the service worker (it caches the page, runtime and model), then load the model here: the
  // device mode becomes the default once everything it needs is cached.
  const note = $("mode-device-note");
  if (!("serviceWorker" in navigator) || typeof cxrDevice === "undefined") {
    note.textContent = "(not in this browser)";
    return;
  }
  try {
    await navigator.serviceWorker.register("/sw.js", { scope: "/" });
    await navigator.serviceWorker.ready;
    await cxrDevice.load();
  } catch (err) {
    note.textContent = `(not available: ${err.message})`;
    $("offline").textContent = "Works online only: films are read on the server.";
    return;
  }
  const cached = await Promise.all(["/offline/model.onnx", "/static/vendor/ort-wasm-simd-threaded.wasm", "/"]
    .map((u) => caches.match(u)));
  $("mode-device").disabled = false;
  note.textContent = self.crossOriginIsolated ? "(WASM, threads)" : "(WASM)";
  if (cached.every(Boolean)) {
    $("mode-device").checked = true;
    $("offline").textContent = "Ready offline: this page and its model are saved on this device; films are read here and never uploaded.";
  }
}

wireInputs();
loadModelCard();
goOffline();
