// /docs: a small offline API reference rendered from /openapi.json (FastAPI's Swagger UI loads from a CDN).
"use strict";

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function refName(schema) {
  if (!schema) return "";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.type === "array") return `array of ${refName(schema.items)}`;
  return schema.type || "";
}

function schemaBlock(name, schemas) {
  const s = schemas[name];
  if (!s || !s.properties) return null;
  const lines = Object.entries(s.properties).map(([k, v]) => {
    const type = refName(v) || (v.anyOf || []).map(refName).filter(Boolean).join(" | ");
    const req = (s.required || []).includes(k) ? "" : "?";
    return `  ${k}${req}: ${type}${v.description ? "  // " + v.description : ""}`;
  });
  return el("pre", "", `${name} {\n${lines.join("\n")}\n}`);
}

function operation(path, method, op, schemas) {
  const box = el("section", "op");
  const h = el("h3");
  h.append(el("span", "method", method.toUpperCase()), el("code", "", path));
  box.append(h);
  if (op.summary) box.append(el("p", "", op.summary));
  if (op.description) box.append(el("p", "small", op.description));
  for (const p of op.parameters || []) {
    box.append(el("p", "", `${p.in} parameter ${p.name}: ${refName(p.schema) || "string"}` +
      (p.description ? `: ${p.description}` : "")));
  }
  const body = op.requestBody && op.requestBody.content;
  if (body) box.append(el("p", "", `Request body: ${Object.keys(body).join(", ")}, field "file"`));
  const list = el("ul");
  const shown = new Set();
  for (const [status, r] of Object.entries(op.responses || {})) {
    const schema = r.content && r.content["application/json"] && r.content["application/json"].schema;
    const name = refName(schema);
    list.append(el("li", "", `${status}: ${r.description}${name ? ` (${name})` : ""}`));
    if (name && schemas[name] && !shown.has(name)) {
      shown.add(name);
      const block = schemaBlock(name, schemas);
      if (block) box.append(block);
    }
  }
  box.append(list);
  return box;
}

async function main() {
  const ops = document.getElementById("ops");
  try {
    const spec = await (await fetch("/openapi.json")).json();
    const schemas = (spec.components && spec.components.schemas) || {};
    ops.replaceChildren(el("h2", "", `${spec.info.title} ${spec.info.version}`),
      el("p", "small", spec.info.description || ""));
    for (const [path, methods] of Object.entries(spec.paths)) {
      for (const [method, op] of Object.entries(methods)) ops.append(operation(path, method, op, schemas));
    }
  } catch (err) {
    ops.replaceChildren(el("p", "error", "Could not load /openapi.json: " + err.message));
  }
}

main();
