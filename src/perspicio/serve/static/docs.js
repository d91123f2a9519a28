// The API reference, drawn from /openapi.json by this server (no external Swagger UI assets).
"use strict";

function node(tag, text, cls) {
  const n = document.createElement(tag);
  if (text) n.textContent = text;
  if (cls) n.className = cls;
  return n;
}

function schemaOf(spec, ref) {
  const parts = ref.replace(/^#\//, "").split("/");
  return parts.reduce((o, k) => (o ? o[k] : undefined), spec);
}

async function main() {
  const root = document.getElementById("api");
  const spec = await (await fetch("/openapi.json")).json();
  root.replaceChildren(node("p", spec.info.description, "hint"));
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const sec = node("section");
      sec.append(node("h2", `${method.toUpperCase()} ${path}`));
      if (op.summary) sec.append(node("p", op.summary));
      if (op.description) sec.append(node("p", op.description, "hint"));
      const params = (op.parameters || []).map((p) => `${p.name} (${p.in}${p.required ? ", required" : ""})`);
      const body = op.requestBody && op.requestBody.content;
      if (body) {
        for (const [type, content] of Object.entries(body)) {
          let schema = content.schema || {};
          if (schema.$ref) schema = schemaOf(spec, schema.$ref) || {};
          for (const [name, prop] of Object.entries(schema.properties || {})) {
            const def = prop.default !== undefined ? ` = ${JSON.stringify(prop.default)}` : "";
            params.push(`${name} (${type}${prop.format === "binary" ? ", file" : ""})${def}`);
          }
        }
      }
      if (params.length) {
        const ul = node("ul");
        for (const p of params) ul.append(node("li", p));
        sec.append(node("h3", "Parameters"), ul);
      }
      root.append(sec);
    }
  }
}

document.addEventListener("DOMContentLoaded", () => main().catch((e) => {
  document.getElementById("api").textContent = `cannot load the API description: ${e.message}`;
}));
