// perspicio serve: the page. Plain JavaScript, no framework, no network access beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  models: [], model: null, sample: "chelsea", file: null, top: [], target: null,
  explained: null, trust: null, job: null, labels: [], layerDefault: null,
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== false && v !== null && v !== undefined) node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function showError(message) {
  const box = $("error");
  if (!message) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = message;
  box.hidden = false;
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (e) {
    throw new Error("the server cannot be reached.");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    let msg = (body && body.error) || `the server answered ${response.status}.`;
    if (response.status === 503) msg += ` (retry in ${response.headers.get("Retry-After") || "a few"} s)`;
    throw new Error(msg);
  }
  return body;
}

function imageForm(extra = {}) {
  const form = new FormData();
  form.append("model", state.model);
  if (state.file) form.append("file", state.file);
  else form.append("sample", state.sample);
  for (const [k, v] of Object.entries(extra)) if (v !== null && v !== undefined && v !== "") form.append(k, v);
  return form;
}

// ------------------------------------------------------------------ setup

async function init() {
  try {
    const [models, methods] = await Promise.all([api("/api/models"), api("/api/methods")]);
    state.models = models.models;
    const sel = $("model");
    for (const m of models.models) sel.append(el("option", { value: m.id, text: m.id, title: m.description }));
    state.model = models.models.length ? models.models[0].id : null;
    const lim = models.limits;
    $("limits").textContent = `Uploads up to ${(lim.max_upload_bytes / 1048576).toFixed(0)} MB and ` +
      `${(lim.max_pixels / 1e6).toFixed(0)} megapixels; the image never leaves this machine.`;
    renderSamples(models.samples);
    renderMethods(methods);
    sel.addEventListener("change", () => { state.model = sel.value; loadModelInfo(); predict(); });
    $("file").addEventListener("change", onFile);
    $("explain").addEventListener("click", explain);
    $("cancel").addEventListener("click", cancel);
    $("score").addEventListener("click", score);
    $("opacity").addEventListener("input", applyOpacity);
    for (const r of document.querySelectorAll("input[name=view]")) r.addEventListener("change", applyView);
    $("download-json").addEventListener("click", downloadExplainJson);
    $("download-trust").addEventListener("click", () => downloadJson(state.trust, "perspicio-trust.json"));
    $("copy-cli").addEventListener("click", () => { $("cli").select(); navigator.clipboard && navigator.clipboard.writeText($("cli").value); });
    $("target-name").addEventListener("change", onTypedTarget);
    applyOpacity();
    setupTabs();
    await loadModelInfo();
    await predict();
  } catch (e) {
    showError(e.message);
  }
}

function renderSamples(samples) {
  const box = $("samples");
  for (const s of samples) {
    const id = `sample-${s.name}`;
    const input = el("input", { type: "radio", name: "sample", id, value: s.name, checked: s.name === state.sample });
    input.addEventListener("change", () => { state.sample = s.name; state.file = null; $("file").value = ""; predict(); });
    box.append(el("label", { for: id, class: "sample", title: s.description },
      input, el("img", { src: `/api/samples/${s.name}.png`, alt: s.description, width: 64, height: 64 }),
      el("span", { text: s.name.replace("_", " ") })));
  }
}

function renderMethods(data, box = $("families"), prefix = "m-", field = "method") {
  const chosen = new Set(data.default);
  for (const fam of data.families) {
    const fs = el("fieldset", { class: "family" }, el("legend", { text: fam.family }));
    for (const m of fam.methods) {
      const id = `${prefix}${m.name}`;
      fs.append(el("label", { for: id, title: m.summary },
        el("input", { type: "checkbox", id, value: m.name, name: field, checked: chosen.has(m.name) }),
        methodName(m.name)));
    }
    box.append(fs);
  }
}

// a method's name; it may break only after an underscore, and only when its box is narrower than
// the name (every family box is as wide as its longest name where the screen allows)
function methodName(name) {
  const span = el("span", { class: "mname" });
  name.split("_").forEach((part, i, all) => {
    span.append(part + (i < all.length - 1 ? "_" : ""));
    if (i < all.length - 1) span.append(el("wbr"));
  });
  return span;
}

async function loadModelInfo() {
  const layerSel = $("layer");
  layerSel.replaceChildren(el("option", { value: "", text: "automatic" }));
  try {
    const [layers, labels] = await Promise.all([
      api(`/api/layers?model=${encodeURIComponent(state.model)}`),
      api(`/api/labels?model=${encodeURIComponent(state.model)}`)]);
    state.layerDefault = layers.default;
    layerSel.replaceChildren(el("option", { value: "", text: `automatic (${layers.default})` }));
    for (const l of layers.layers) {
      layerSel.append(el("option", { value: l.name, text: `${l.name}  ${l.shape.slice(1).join("x")}${l.default ? "  (default)" : ""}` }));
    }
    state.labels = labels.labels;
    $("labels").replaceChildren(...labels.labels.map((n, i) => el("option", { value: n, text: `${i}` })));
  } catch (e) {
    showError(e.message);
  }
}

function onFile(event) {
  const f = event.target.files[0];
  if (!f) return;
  state.file = f;
  for (const r of document.querySelectorAll("input[name=sample]")) r.checked = false;
  predict();
}

function onTypedTarget() {
  const name = $("target-name").value.trim();
  if (!name) return;
  const idx = state.labels.findIndex((l) => l.toLowerCase() === name.toLowerCase());
  if (idx < 0) { showError(`unknown class name '${name}'; pick one of the suggestions.`); return; }
  showError("");
  state.target = idx;
  for (const r of document.querySelectorAll("input[name=target]")) r.checked = Number(r.value) === idx;
}

async function predict() {
  showError("");
  const preview = $("preview");
  preview.src = state.file ? URL.createObjectURL(state.file) : `/api/samples/${state.sample}.png`;
  preview.hidden = false;
  const box = $("top5");
  box.replaceChildren(el("legend", { text: "Top-5 classes - choose the one to explain" }), el("p", { class: "hint", text: "Asking the model..." }));
  try {
    const res = await api("/api/predict", { method: "POST", body: imageForm() });
    state.top = res.top;
    state.target = res.top.length ? res.top[0].index : null;
    $("target-name").value = "";
    box.replaceChildren(el("legend", { text: "Top-5 classes - choose the one to explain" }));
    res.top.forEach((t, i) => {
      const id = `t-${t.index}`;
      const input = el("input", { type: "radio", name: "target", id, value: t.index, checked: i === 0 });
      input.addEventListener("change", () => { state.target = t.index; $("target-name").value = ""; });
      const bar = el("span", { class: "bar" });
      bar.style.width = `${Math.max(1, t.probability * 100).toFixed(1)}%`;
      box.append(el("label", { for: id, class: "topclass" }, input,
        el("span", { class: "name", text: `${t.label}` }),
        el("span", { class: "prob", text: `${(t.probability * 100).toFixed(1)}%` }),
        el("span", { class: "barbox" }, bar)));
    });
  } catch (e) {
    box.replaceChildren(el("legend", { text: "Top-5 classes" }));
    showError(e.message);
  }
}

function chosenMethods() {
  return [...document.querySelectorAll("input[name=method]:checked")].map((c) => c.value);
}

// ------------------------------------------------------------------ jobs with progress

function runJob(path, form, progressEl, cancelBtn = $("cancel")) {
  form.append("wait", "false");
  return new Promise((resolve, reject) => {
    api(path, { method: "POST", body: form }).then((start) => {
      if (start.cached) { resolve(start.result); return; }
      state.job = start.job;
      cancelBtn.hidden = false;
      const source = new EventSource(start.events);
      const finish = () => { source.close(); state.job = null; cancelBtn.hidden = true; };
      source.addEventListener("progress", (ev) => {
        const p = JSON.parse(ev.data);
        progressEl.textContent = progressText(p);
      });
      source.addEventListener("state", (ev) => {
        const p = JSON.parse(ev.data);
        progressEl.textContent = p.state === "queued" ? "waiting for a free worker..." : "started...";
      });
      source.addEventListener("result", (ev) => { finish(); resolve(JSON.parse(ev.data).result); });
      source.addEventListener("error", (ev) => {
        finish();
        if (ev.data) reject(new Error(JSON.parse(ev.data).error));
        else reject(new Error("the progress stream was interrupted."));
      });
    }, reject);
  });
}

// one progress event as a line: the method running (k of n), the comparison's step k of n with
// the last one finished and the plan's estimate, or the stage
function progressText(p) {
  if (p.method) {
    const passes = p.passes_total ? `: ${p.pass_stage || "passes"} ${p.passes} of ${p.passes_total}` : "";
    return `running ${p.method} (${p.done + 1} of ${p.total})${passes}...`;
  }
  if (p.stage === "compare") {
    const est = p.estimate ? ` (estimated ${p.estimate} in all)` : "";
    if (p.total) return `scoring: ${p.done} of ${p.total} steps done - ${p.step}${est}...`;
    return `scoring ${p.methods.length} method(s) with ${p.metrics.join(", ")}${est}...`;
  }
  if (p.stage) return `${p.stage}${p.seconds !== undefined ? ` (${p.seconds} s)` : ""}...`;
  return "working...";
}

async function cancel() {
  if (!state.job) return;
  try { await api(`/api/jobs/${state.job}`, { method: "DELETE" }); } catch (e) { showError(e.message); }
}

// ------------------------------------------------------------------ explain

async function explain() {
  showError("");
  const methods = chosenMethods();
  if (!methods.length) { showError("choose at least one method."); return; }
  const button = $("explain");
  button.disabled = true;
  $("progress").textContent = "sending...";
  try {
    const res = await runJob("/api/explain", imageForm({ methods: methods.join(","), target: state.target, layer: $("layer").value }), $("progress"));
    state.explained = res;
    renderResults(res);
    $("progress").textContent = `done: ${res.methods.length} method(s) for '${res.target.name}'.`;
    $("score").disabled = false;
    $("results").focus();
  } catch (e) {
    $("progress").textContent = "";
    showError(e.message);
  } finally {
    button.disabled = false;
  }
}

function decodeValues(b64) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Float32Array(bytes.buffer);
}

function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "n/a";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(2) : v.toPrecision(3);
}

function renderResults(res) {
  const cards = $("cards");
  cards.replaceChildren();
  const base = `data:image/png;base64,${res.image.png}`;
  for (const m of res.methods) {
    if (m.error) {
      cards.append(el("article", { class: "card failed" }, el("h3", { text: m.method }), el("p", { class: "error-inline", text: m.error })));
      continue;
    }
    const values = decodeValues(m.values);
    const [h, w] = m.shape;
    const readout = el("p", { class: "readout", "aria-live": "polite", text: "hover or focus the map for values" });
    const photo = el("img", { class: "photo", src: base, alt: "", width: w, height: h });
    const heat = el("img", { class: "heat", src: `data:image/png;base64,${m.heat_png}`, alt: `${m.method} map`, width: w, height: h, "data-method": m.method });
    const cursor = el("span", { class: "cursor", hidden: true });
    const stack = el("div", { class: "stack", tabindex: 0, role: "img", "aria-label": `${m.method} attribution map; arrow keys read values` }, photo, heat, cursor);
    let kx = Math.floor(w / 2), ky = Math.floor(h / 2);
    const show = (x, y) => {
      x = Math.min(w - 1, Math.max(0, x)); y = Math.min(h - 1, Math.max(0, y));
      readout.textContent = `value at (${x}, ${y}): ${fmt(values[y * w + x])}`;
      cursor.hidden = false;
      cursor.style.left = `${(100 * (x + 0.5)) / w}%`;
      cursor.style.top = `${(100 * (y + 0.5)) / h}%`;
    };
    stack.addEventListener("mousemove", (ev) => {
      const r = stack.getBoundingClientRect();
      kx = Math.floor(((ev.clientX - r.left) / r.width) * w);
      ky = Math.floor(((ev.clientY - r.top) / r.height) * h);
      show(kx, ky);
    });
    stack.addEventListener("mouseleave", () => { cursor.hidden = true; });
    stack.addEventListener("focus", () => show(kx, ky));
    stack.addEventListener("keydown", (ev) => {
      const step = ev.shiftKey ? 16 : 4;
      const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
      if (!moves[ev.key]) return;
      ev.preventDefault();
      kx = Math.min(w - 1, Math.max(0, kx + moves[ev.key][0]));
      ky = Math.min(h - 1, Math.max(0, ky + moves[ev.key][1]));
      show(kx, ky);
    });
    const legendBar = el("span", { class: "legend-bar" });
    legendBar.style.background = `linear-gradient(to right, ${m.legend.colors.join(", ")})`;
    const legend = el("div", { class: "legend", title: m.signed ? "diverging: blue negative, red positive evidence" : "low to high" },
      el("span", { class: "lo", text: fmt(m.legend.low) }), legendBar, el("span", { class: "hi", text: fmt(m.legend.high) }));
    const note = m.signed ? "signed: red for, blue against the class" : "unsigned";
    const dl = el("button", { type: "button", class: "small", text: "PNG" });
    dl.addEventListener("click", () => downloadPng(m, photo, heat));
    cards.append(el("article", { class: "card" },
      el("h3", {}, m.method, el("span", { class: "meta", text: ` ${m.family}${m.layer ? " @ " + m.layer : ""} - ${m.seconds.toFixed(2)} s` })),
      stack, legend, el("p", { class: "note", text: note }), readout, dl));
  }
  $("cli").value = res.cli;
  $("cli-box").hidden = false;
  $("download-json").disabled = false;
  applyOpacity();
  applyView();
}

function applyOpacity() {
  const v = Number($("opacity").value) / 100;
  $("opacity-value").textContent = `${Math.round(v * 100)}%`;
  const raw = document.querySelector("input[name=view]:checked").value === "raw";
  for (const img of document.querySelectorAll(".heat")) img.style.opacity = raw ? 1 : v;
}

function applyView() {
  const raw = document.querySelector("input[name=view]:checked").value === "raw";
  for (const img of document.querySelectorAll(".photo")) img.hidden = raw;
  $("opacity").disabled = raw;
  applyOpacity();
}

function downloadBlob(blob, name) {
  const a = el("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

function downloadJson(obj, name) {
  if (!obj) return;
  downloadBlob(new Blob([JSON.stringify(obj, null, 1)], { type: "application/json" }), name);
}

function downloadPng(m, photo, heat) {
  const [h, w] = m.shape;
  const canvas = el("canvas", { width: w, height: h });
  const ctx = canvas.getContext("2d");
  const raw = document.querySelector("input[name=view]:checked").value === "raw";
  if (!raw) ctx.drawImage(photo, 0, 0, w, h);
  ctx.globalAlpha = raw ? 1 : Number($("opacity").value) / 100;
  ctx.drawImage(heat, 0, 0, w, h);
  canvas.toBlob((blob) => downloadBlob(blob, `perspicio-${m.method}${raw ? "-raw" : ""}.png`), "image/png");
}

function downloadExplainJson() {
  const res = state.explained;
  if (!res) return;
  const out = {
    model: res.model, target: res.target, layer: res.layer, cli: res.cli,
    methods: res.methods.map((m) => {
      if (m.error) return { method: m.method, error: m.error };
      const v = decodeValues(m.values);
      const [h, w] = m.shape;
      const rows = [];
      for (let y = 0; y < h; y++) rows.push(Array.from(v.subarray(y * w, (y + 1) * w)));
      return { method: m.method, family: m.family, layer: m.layer, signed: m.signed, shape: m.shape,
        range: m.range, legend: m.legend, seconds: m.seconds, summary: m.summary, values: rows };
    }),
  };
  downloadJson(out, "perspicio-explain.json");
}

// ------------------------------------------------------------------ trust

async function score() {
  showError("");
  const methods = state.explained ? state.explained.methods.filter((m) => !m.error).map((m) => m.method) : chosenMethods();
  const button = $("score");
  button.disabled = true;
  $("trust-progress").textContent = "sending...";
  try {
    const target = state.explained ? state.explained.target.index : state.target;
    const layer = state.explained ? state.explained.layer : $("layer").value;
    const res = await runJob("/api/compare", imageForm({ methods: methods.join(","), target, layer }), $("trust-progress"));
    state.trust = res;
    renderTrust(res);
    $("trust-progress").textContent = "done.";
    $("download-trust").disabled = false;
  } catch (e) {
    $("trust-progress").textContent = "";
    showError(e.message);
  } finally {
    button.disabled = false;
  }
}

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"];

function renderTrust(res) {
  const out = $("trust-out");
  const metrics = Object.keys(res.metrics);
  const head = el("tr", {}, el("th", { scope: "col", text: "rank" }), el("th", { scope: "col", text: "method" }),
    ...metrics.map((m) => el("th", { scope: "col", title: res.metrics[m].summary, text: `${m} ${res.metrics[m].higher_is_better ? "\u2191" : "\u2193"}` })));
  const rows = res.table.map((r) => el("tr", {}, el("td", { text: r.rank }), el("th", { scope: "row", text: r.method }),
    ...metrics.map((m) => el("td", { class: (res.best[m] || []).includes(r.method) ? "best" : "", text: fmt(r[m]) }))));
  const table = el("table", { class: "trust" }, el("caption", { text: `Target '${res.target.name}'. \u2191 higher is better, \u2193 lower is better; best in bold.` }),
    el("thead", {}, head), el("tbody", {}, ...rows));
  const plain = el("ul", { class: "plain" }, ...metrics.map((m) => el("li", {}, el("strong", { text: `${m}: ` }), res.plain[m])));
  const curves = el("div", { class: "curves" }, ...Object.entries(res.curves).map(([metric, per]) => curveChart(metric, per)));
  const cli = el("p", { class: "cli-line" }, "Reproduce: ", el("code", { text: res.cli }));
  const errs = Object.entries(res.errors || {}).map(([m, e]) => el("p", { class: "error-inline", text: `${m}: ${e}` }));
  out.replaceChildren(el("div", { class: "tablewrap" }, table), plain, curves, cli, ...errs);
}

function curveChart(metric, per) {
  const W = 320, H = 200, L = 40, B = 30, T = 24, R = 10;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${metric} curves: model score against the fraction of pixels ${metric === "deletion" ? "removed" : "inserted"}`);
  const add = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text) n.textContent = text;
    svg.append(n);
    return n;
  };
  const all = Object.values(per).flat();
  const ymax = Math.max(1e-6, ...all);
  const x = (i, n) => L + ((W - L - R) * i) / Math.max(1, n - 1);
  const y = (v) => T + (H - T - B) * (1 - v / ymax);
  add("line", { x1: L, y1: y(0), x2: W - R, y2: y(0), class: "axis" });
  add("line", { x1: L, y1: T, x2: L, y2: y(0), class: "axis" });
  add("text", { x: L - 4, y: T + 4, "text-anchor": "end", class: "tick" }, fmt(ymax));
  add("text", { x: L - 4, y: y(0), "text-anchor": "end", class: "tick" }, "0");
  add("text", { x: L, y: H - 10, class: "tick" }, "0%");
  add("text", { x: W - R, y: H - 10, "text-anchor": "end", class: "tick" }, "100%");
  add("text", { x: (L + W) / 2, y: H - 4, "text-anchor": "middle", class: "tick" }, metric === "deletion" ? "pixels removed" : "pixels inserted");
  add("text", { x: L, y: 14, class: "title" }, `${metric} curve (score of the target)`);
  Object.entries(per).forEach(([m, vals], k) => {
    const pts = vals.map((v, i) => `${x(i, vals.length).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    add("polyline", { points: pts, fill: "none", stroke: COLORS[k % COLORS.length], "stroke-width": 2 });
  });
  const legend = el("ul", { class: "curve-legend" }, ...Object.keys(per).map((m, k) => {
    const sw = el("span", { class: "swatch" });
    sw.style.background = COLORS[k % COLORS.length];
    return el("li", {}, sw, m);
  }));
  return el("figure", { class: "curve" }, svg, legend);
}

// ------------------------------------------------------------------ tabs

const tabs = { images: null, tabular: null, text: null };

function setupTabs() {
  const buttons = [...document.querySelectorAll("[role=tab]")];
  for (const b of buttons) {
    b.addEventListener("click", () => selectTab(b));
    b.addEventListener("keydown", (ev) => {
      if (ev.key !== "ArrowRight" && ev.key !== "ArrowLeft") return;
      const shown = buttons.filter((x) => !x.hidden);
      const i = shown.indexOf(b) + (ev.key === "ArrowRight" ? 1 : -1);
      const next = shown[(i + shown.length) % shown.length];
      selectTab(next); next.focus();
    });
  }
  api("/api/tabular/models").then((res) => {
    tabs.tabular = res;
    if (res.models.length) $("tab-btn-tabular").hidden = false;
  }, () => {});
  api("/api/text/models").then((res) => {
    tabs.text = res;
    if (res.models.length) $("tab-btn-text").hidden = false;
  }, () => {});
}

function selectTab(button) {
  for (const b of document.querySelectorAll("[role=tab]")) {
    const on = b === button;
    b.setAttribute("aria-selected", on ? "true" : "false");
    b.tabIndex = on ? 0 : -1;
    $(b.getAttribute("aria-controls")).hidden = !on;
  }
  if (button.id === "tab-btn-tabular") initTabular();
  if (button.id === "tab-btn-text") initText().catch((e) => showError(e.message));
}

// ------------------------------------------------------------------ tabular tab

const tab = { ready: false, rows: null, result: null };

function kernelText(k) {
  if (!k) return "";
  if (k.state === "compiling") return `TreeSHAP kernels: compiling in the background (${k.seconds} s so far; once per worker). A tree model's first row waits for them.`;
  if (k.state === "ready") return `TreeSHAP kernels: ready (compiled in ${k.seconds} s).`;
  if (k.state === "failed") return `TreeSHAP is unavailable: ${k.error}`;
  return "";
}

async function initTabular() {
  if (tab.ready) return;
  tab.ready = true;
  const sel = $("tab-model");
  const res = tabs.tabular || await api("/api/tabular/models");
  for (const m of res.models) sel.append(el("option", { value: m.id, text: `${m.id} - ${m.method}`, title: m.description }));
  $("tab-kernels").textContent = kernelText(res.tree_kernels);
  sel.addEventListener("change", loadRows);
  $("tab-explain").addEventListener("click", explainRow);
  $("tab-cancel").addEventListener("click", cancel);
  await loadRows();
}

async function loadRows() {
  showError("");
  const rowSel = $("tab-row");
  const model = $("tab-model").value;
  tab.loading = model;
  $("tab-progress").textContent = "loading the rows...";
  try {
    const res = await api(`/api/tabular/rows?model=${encodeURIComponent(model)}`);
    if (tab.loading !== model || $("tab-model").value !== model) return;  // a newer choice won
    tab.rows = res;
    rowSel.replaceChildren();
    rowSel.dataset.model = model;
    for (const r of res.rows) {
      rowSel.append(el("option", { value: r.row, text: `row ${r.row}: true ${r.true}, predicted ${r.predicted}` }));
    }
    $("tab-progress").textContent = "";
  } catch (e) {
    $("tab-progress").textContent = "";
    showError(e.message);
  }
}

async function explainRow() {
  showError("");
  const button = $("tab-explain");
  button.disabled = true;
  $("tab-progress").textContent = "sending...";
  const form = new FormData();
  form.append("model", $("tab-model").value);
  form.append("row", $("tab-row").value);
  try {
    const res = await runJob("/api/tabular/explain", form, $("tab-progress"), $("tab-cancel"));
    tab.result = res;
    renderTabular(res);
    $("tab-progress").textContent = `done: row ${res.row} with ${res.method}.`;
    if (res.method === "tree_shap" && res.waited_for_compile) {
      $("tab-kernels").textContent = `TreeSHAP kernels: ready (this row waited ${res.waited_for_compile} s for them to compile).`;
    } else if (res.method === "tree_shap") {
      $("tab-kernels").textContent = "TreeSHAP kernels: ready.";
    }
    $("tab-results").focus();
  } catch (e) {
    $("tab-progress").textContent = "";
    showError(e.message);
  } finally {
    button.disabled = false;
  }
}

function pngBlob(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

function renderTabular(res) {
  const out = $("tab-out");
  const probs = el("fieldset", { class: "top5" }, el("legend", { text: `Prediction (true class: ${res.true})` }));
  for (const [label, p] of Object.entries(res.probabilities)) {
    const bar = el("span", { class: "bar" });
    bar.style.width = `${Math.max(1, p * 100).toFixed(1)}%`;
    probs.append(el("div", { class: "topclass" }, el("span"), el("span", { class: "name", text: label }),
      el("span", { class: "prob", text: `${(100 * p).toFixed(1)}%` }), el("span", { class: "barbox" }, bar)));
  }
  const top = [...res.features].sort((a, b) => Math.abs(b.attribution) - Math.abs(a.attribution)).slice(0, 8);
  const table = el("table", { class: "featuretable" },
    el("caption", { class: "hint", text: `Largest contributions to the ${res.explained} (base ${fmt(res.base_value)} -> ${fmt(res.score)})` }),
    el("thead", {}, el("tr", {}, el("th", { text: "feature" }), el("th", { text: "value" }), el("th", { text: res.method }))),
    el("tbody", {}, ...top.map((f) => el("tr", {}, el("td", { text: f.name }), el("td", { text: fmt(f.value) }),
      el("td", { class: f.attribution >= 0 ? "pos" : "neg", text: (f.attribution >= 0 ? "+" : "") + fmt(f.attribution) })))));
  const figure = (name, caption, wide) => {
    const img = el("img", { src: `data:image/png;base64,${res.images[name]}`, alt: `${caption} for row ${res.row}`, "data-plot": name });
    const dl = el("button", { type: "button", class: "small", text: "PNG",
      onclick: () => downloadBlob(pngBlob(res.images[name]), `perspicio-${res.model}-row${res.row}-${name}.png`) });
    return el("figure", { class: wide ? "wide" : "" }, el("figcaption", {}, el("span", { text: caption }), dl), img);
  };
  const plots = el("div", { class: "tab-plots" },
    figure("force", "Force plot: what pushes this row up or down", true),
    figure("waterfall", "Waterfall: from the base value to this row"),
    figure("beeswarm", "Global summary: every test row"));
  const numbers = el("button", { type: "button", text: "Download JSON", onclick: () => {
    const { images, ...rest } = res;
    downloadJson(rest, `perspicio-${res.model}-row${res.row}.json`);
  } });
  const cli = el("div", { class: "cli" }, el("label", { for: "tab-cli", text: "Reproduce from the command line" }),
    el("div", { class: "cli-row" }, el("input", { id: "tab-cli", readonly: true, value: res.cli })));
  out.replaceChildren(el("div", { class: "pred" }, probs, table), el("div", { class: "row" }, numbers), plots, cli);
}

// ------------------------------------------------------------------ text tab

const text = { ready: false, info: null, result: null };

async function initText() {
  if (text.ready) return;
  text.ready = true;
  const info = tabs.text || await api("/api/text/models");
  text.info = info;
  const sel = $("text-model");
  for (const m of info.models) sel.append(el("option", { value: m.id, text: m.id, title: m.description }));
  const showLimits = () => {
    const m = info.models.find((x) => x.id === sel.value) || info.models[0];
    const lim = info.limits;
    $("text-limits").textContent = `${m.description}. It reads the first ${m.max_tokens} tokens (a longer ` +
      `text is cut, with a warning); up to ${lim.max_text_chars} characters. Attention views for texts up to ` +
      `${lim.max_view_tokens} tokens.`;
  };
  sel.addEventListener("change", showLimits);
  showLimits();
  renderMethods(info, $("text-families"), "tm-", "text-method");
  $("text-explain").addEventListener("click", explainText);
  $("text-cancel").addEventListener("click", cancel);
  for (const r of document.querySelectorAll("input[name=text-target]")) r.addEventListener("change", syncTargetKind);
  syncTargetKind();
}

function targetKind() {
  return document.querySelector("input[name=text-target]:checked").value;
}

function syncTargetKind() {
  const zs = targetKind() === "zeroshot";
  $("text-target").disabled = zs;
  $("text-labels").disabled = !zs;
}

async function explainText() {
  showError("");
  const methods = [...document.querySelectorAll("input[name=text-method]:checked")].map((c) => c.value);
  if (!methods.length) { showError("choose at least one method."); return; }
  const form = new FormData();
  form.append("model", $("text-model").value);
  form.append("text", $("text-input").value);
  form.append("methods", methods.join(","));
  if (targetKind() === "zeroshot") form.append("labels", $("text-labels").value);
  else form.append("target", $("text-target").value);
  if ($("text-merge").checked) form.append("merge_words", "true");
  const button = $("text-explain");
  button.disabled = true;
  $("text-progress").textContent = "sending...";
  try {
    const res = await runJob("/api/text/explain", form, $("text-progress"), $("text-cancel"));
    text.result = res;
    renderText(res);
    $("text-progress").textContent = `done: ${res.methods.length} method(s), target ${res.target.explained}.`;
    $("text-results").focus();
  } catch (e) {
    $("text-progress").textContent = "";
    showError(e.message);
  } finally {
    button.disabled = false;
  }
}

function renderText(res) {
  const warn = $("text-warning");
  warn.textContent = res.warnings.join(" ");
  warn.hidden = !res.warnings.length;
  const parts = [];
  if (res.similarities.length) {
    const box = el("fieldset", { class: "top5 sims" }, el("legend", {
      text: res.target.kind === "zeroshot" ? "Zero-shot labels: cosine similarity to the sentence" : "Cosine similarity to the target sentence" }));
    for (const sim of res.similarities) {
      const bar = el("span", { class: "bar" });
      bar.style.width = `${Math.max(1, Math.max(0, sim.similarity) * 100).toFixed(1)}%`;
      box.append(el("div", { class: "topclass" }, el("span"), el("span", { class: "name", text: sim.sentence }),
        el("span", { class: "prob", text: sim.similarity.toFixed(3) }), el("span", { class: "barbox" }, bar)));
    }
    parts.push(box);
  }
  const cards = el("div", { class: "cards text-cards" });
  for (const m of res.methods) {
    if (m.error) {
      cards.append(el("article", { class: "card failed" }, el("h3", { text: m.method }), el("p", { class: "error-inline", text: m.error })));
      continue;
    }
    cards.append(tokenCard(m));
  }
  parts.push(cards);
  const numbers = el("button", { type: "button", id: "text-download-json", text: "Download JSON", onclick: () => {
    const { attention, methods, ...rest } = res;
    downloadJson({ ...rest, methods: methods.map(({ png, html, colors, ...m }) => m) }, "perspicio-text.json");
  } });
  parts.push(el("div", { class: "row" }, numbers));
  if (res.attention) parts.push(attentionViews(res));
  parts.push(el("div", { class: "cli" }, el("label", { for: "text-cli", text: "Reproduce from the command line" }),
    el("div", { class: "cli-row" }, el("input", { id: "text-cli", readonly: true, value: res.cli }))));
  $("text-out").replaceChildren(...parts);
}

function tokenCard(m) {
  const readout = el("p", { class: "readout", "aria-live": "polite", text: "hover or focus the tokens for values" });
  const strip = el("div", { class: "tokens", tabindex: 0, role: "group", "data-method": m.method,
    "aria-label": `${m.method}: tokens coloured by attribution (red for, blue against); arrow keys read values` });
  const spans = m.tokens.map((t, i) => {
    const span = el("span", { class: "tok", text: t, title: `${t}: ${fmt(m.values[i])}` });
    span.style.backgroundColor = m.colors[i];
    span.addEventListener("mouseenter", () => show(i));
    strip.append(span);
    return span;
  });
  let current = 0;
  const show = (i) => {
    current = Math.max(0, Math.min(spans.length - 1, i));
    spans.forEach((s, k) => s.classList.toggle("current", k === current));
    readout.textContent = `token ${current} '${m.tokens[current]}': ${fmt(m.values[current])}`;
  };
  strip.addEventListener("focus", () => show(current));
  strip.addEventListener("keydown", (ev) => {
    const step = { ArrowLeft: -1, ArrowRight: 1, Home: -spans.length, End: spans.length }[ev.key];
    if (step === undefined) return;
    ev.preventDefault();
    show(current + step);
  });
  strip.addEventListener("mouseleave", () => spans.forEach((s) => s.classList.remove("current")));
  const target = m.target ? `target: ${m.target}${m.score !== null ? ` = ${fmt(m.score)}` : ""}` : "";
  const png = el("button", { type: "button", class: "small", text: "PNG",
    onclick: () => downloadBlob(pngBlob(m.png), `perspicio-text-${m.method}.png`) });
  const page = el("button", { type: "button", class: "small", text: "HTML",
    onclick: () => downloadBlob(new Blob([m.html], { type: "text/html" }), `perspicio-text-${m.method}.html`) });
  return el("article", { class: "card" },
    el("h3", {}, m.method, el("span", { class: "meta", text: ` ${m.family} - ${m.seconds.toFixed(2)} s` })),
    el("p", { class: "target-line", text: target }), strip, readout, el("div", { class: "buttons" }, png, page));
}

function attentionViews(res) {
  const a = res.attention;
  const head = el("h3", { text: "Attention" });
  if (a.note) return el("div", {}, head, el("p", { class: "hint", text: a.note }));
  const figure = (key, caption, name) => {
    const img = el("img", { src: `data:image/png;base64,${a[key]}`, alt: caption, "data-plot": name });
    const dl = el("button", { type: "button", class: "small", text: "PNG",
      onclick: () => downloadBlob(pngBlob(a[key]), `perspicio-text-${name}.png`) });
    return el("figure", { class: "wide" }, el("figcaption", {}, el("span", { text: caption }), dl), img);
  };
  const src = `/api/text/lines?model=${encodeURIComponent(res.model)}&text=${encodeURIComponent(res.text)}`;
  const frame = el("iframe", { id: "text-lines", class: "lines-frame", src, sandbox: "allow-scripts",
    title: "attention lines view: query tokens left, attended tokens right" });
  frame.style.height = `${Math.min(1800, 200 + 22 * a.tokens)}px`;
  const lines = el("figure", { class: "wide" }, el("figcaption", {},
    el("span", { text: "Lines view: hover a query token (left) to see where it attends" }),
    el("a", { href: src, target: "_blank", rel: "noopener", text: "open alone" })), frame);
  return el("div", { class: "text-views" }, head, el("div", { class: "tab-plots" },
    figure("layers_png", "Every layer (mean of heads): rows attend to columns", "attention_layers"),
    figure("heads_png", "Every head of the last layer", "attention_heads"), lines));
}

document.addEventListener("DOMContentLoaded", init);
