// mindone-lora ui: the page. Plain JavaScript over the JSON API of mindone_lora_plugin/ui/server.py.
"use strict";

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v; else if (k in e && k !== "list") e[k] = v; else e.setAttribute(k, v);
  }
  for (const kid of kids) e.append(kid);
  return e;
};
const fileUrl = (p) => "/api/file?path=" + encodeURIComponent(p);

// the session token the server put in this page: sent with every request (no other page can read or send it)
const TOKEN = document.querySelector('meta[name="ui-token"]').content;

async function api(path, body) {
  const opts = body === undefined ? {headers: {"X-UI-Token": TOKEN}} :
    {method: "POST", headers: {"Content-Type": "application/json", "X-UI-Token": TOKEN}, body: JSON.stringify(body)};
  const r = await fetch(path, opts);
  let data;
  try { data = await r.json(); } catch (e) { data = {error: `HTTP ${r.status}`}; }
  if (!r.ok && !data.error) data.error = `HTTP ${r.status}`;
  data.http = r.status;
  return data;
}

// ---------------------------------------------------------------- tabs

function showTab(name) {
  for (const p of document.querySelectorAll(".page")) p.hidden = p.id !== "page-" + name;
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.tab === name);
  if (name === "runs") refreshRuns();
}

// ---------------------------------------------------------------- new run

let schema = null;

function fieldInput(f) {
  const id = "f-" + f.dest;
  if (f.kind === "bool") return el("input", {type: "checkbox", id, name: f.dest, checked: !!f.default});
  if (f.kind === "choice") {
    const s = el("select", {id, name: f.dest});
    if (f.default === null) s.append(el("option", {value: "", text: "(default)"}));
    for (const c of f.choices) s.append(el("option", {value: String(c), text: String(c)}));
    if (f.default !== null) s.value = String(f.default);
    return s;
  }
  // a required field's default is never used (the form asks for a value): no "default:" shown
  const input = el("input", {type: "text", id, name: f.dest, size: f.path ? 60 : 24,
                             placeholder: f.required ? (f.written ? "required: a new folder, e.g. runs/my-lora" :
                                                        f.path ? "required: pick or type a folder" : "required") :
                               f.default === null ? "" : "default: " + String(f.default)});
  return f.path ? el("span", {}, input, " ", pickButton(input)) : input;
}

function pickButton(input) {
  const pick = el("button", {type: "button", class: "small", text: "browse…", title: "pick inside the allowed folders"});
  pick.addEventListener("click", () => openPicker(input));
  return pick;
}

// ---------------------------------------------------------------- folder/file picker (allowed folders only)

let pickerTarget = null;

async function openPicker(input) {
  pickerTarget = input;
  await showFolder(input.value.trim() ? input.value.trim().replace(/\/[^/]*$/, "") || "" : "");
  $("picker").showModal();
}

async function showFolder(path) {
  let r = await api("/api/browse?path=" + encodeURIComponent(path));
  if (r.error) r = await api("/api/browse?path=");
  const list = $("picker-list");
  list.textContent = "";
  $("picker-folder").textContent = r.folder || "allowed folders";
  $("picker").dataset.folder = r.folder || "";
  $("picker").dataset.parent = r.parent || "";
  for (const e of r.entries) {
    const li = el("li", {class: e.dir ? "dir" : "file", text: e.name});
    li.addEventListener("click", () => e.dir ? showFolder(e.path) : choose(e.path));
    list.append(li);
  }
}

function choose(path) {
  if (pickerTarget && path) { pickerTarget.value = path; pickerTarget.dispatchEvent(new Event("change")); }
  $("picker").close();
  if (pickerTarget && pickerTarget.form) validate();
}

function buildForm() {
  const form = $("train-form");
  form.textContent = "";
  let sourced = false;
  for (const g of schema.groups) {
    const basic = g.fields.some((f) => f.basic);
    // a group with nothing shown by default is one folded line under its title
    const fs = el("fieldset", {class: "group"}, basic ? el("legend", {text: g.title}) : "");
    const more = el("details", {}, el("summary", {text: basic ? "more options" : g.title}));
    for (const f of g.fields) {
      if (f.source === f.dest && !sourced) { fs.append(sourceRow()); sourced = true; }  // before the first way
      const lab = el("label", {for: "f-" + f.dest}, f.label,
                     f.required ? el("span", {class: "req", text: " *", title: "required"}) : "",
                     el("span", {class: "flag", text: f.flag}));
      const row = el("div", {class: "field"}, lab, fieldInput(f),
        el("span", {class: "help", text: f.help || ""}),
        el("div", {class: "err", id: "err-" + f.dest}));
      if (f.dest === "pretrained_model_name_or_path") row.append(el("div", {class: "info", id: "model-arch"}));
      (f.basic ? fs : more).append(row);
    }
    if (more.children.length > 1) fs.append(more);
    if (!basic) fs.classList.add("folded");
    form.append(fs);
  }
  for (const d of ["train_data_dir", "instance_data_dir"]) {
    const i = $("f-" + d);
    if (i) i.addEventListener("change", () => previewDataset(i.value));
  }
  form.addEventListener("input", () => {
    applyScopes();
    clearTimeout(buildForm.t); buildForm.t = setTimeout(validate, 600);
  });
  form.addEventListener("change", () => applyScopes());
  const sel = $("preset");
  for (const name of Object.keys(schema.presets)) sel.append(el("option", {value: name, text: name}));
  applyScopes();
}

// "Training images": an imagefolder, a dataset or DreamBooth images; only the chosen way's fields show (the
// DreamBooth group with its own)
function sourceRow() {
  const s = el("select", {id: "f-_source", name: "_source"});
  for (const src of schema.sources) s.append(el("option", {value: src.dest, text: src.label}));
  s.addEventListener("change", () => { applyScopes(); validate(); });
  return el("div", {class: "field"}, el("label", {for: "f-_source"}, "Training images",
                                        el("span", {class: "req", text: " *", title: "required"})), s,
            el("span", {class: "help", text: "how the training images are given; the others' fields are hidden"}));
}

// pick the way of giving the images that the values use (a preset, a loaded config, a cloned run)
function pickSource(values) {
  const given = (d) => values[d] !== undefined && values[d] !== null && values[d] !== "" && values[d] !== false;
  const fields = schema.groups.flatMap((g) => g.fields);
  const found = schema.sources.find((s) => given(s.dest)) ||
    schema.sources.find((s) => fields.some((f) => f.source === s.dest && given(f.dest)));
  if (found) $("f-_source").value = found.dest;
}

// a field shows (and is sent) only where it applies: its way of giving the images is chosen, its algorithm,
// architecture or strategy is (the architecture is the model's, known once a Check has read it; until then those
// all show), and the flag it needs is set
let architecture = null;

function applies(f) {
  if (f.source && f.source !== $("f-_source").value) return false;
  if (f.scope) {
    const [kind, names] = f.scope;
    const menu = $("f-" + (kind === "algorithm" ? "lora_algo" : "lora_strategy"));
    const chosen = kind === "architecture" ? architecture :
      (menu && menu.value) || (kind === "algorithm" ? "lora" : "");
    if (!(names.includes(chosen) || (kind === "architecture" && !architecture))) return false;
  }
  if (f.needs) {
    const other = $("f-" + f.needs);
    if (other && !(other.type === "checkbox" ? other.checked : other.value.trim())) return false;
  }
  return true;
}

function applyScopes() {
  for (const g of schema.groups) for (const f of g.fields) $("f-" + f.dest).closest(".field").hidden = !applies(f);
  const strategy = $("f-lora_strategy");  // the strategies that fit the model's architecture
  const fits = (schema.groups.flatMap((g) => g.fields).find((f) => f.dest === "lora_strategy") || {}).fits || {};
  const unfit = (name) => !!(architecture && fits[name] && !fits[name].includes(architecture));
  if (strategy) for (const o of strategy.options) o.hidden = unfit(o.value);
  for (const box of document.querySelectorAll("#train-form details, #train-form fieldset")) {
    const rows = [...box.querySelectorAll(".field")];
    box.hidden = rows.length > 0 && rows.every((r) => r.hidden);
  }
  const info = $("model-arch");
  if (info) info.textContent = architecture ? `${schema.architectures[architecture] || architecture} model: options ` +
    "for other architectures are hidden" : "";
}

function formValues() {
  const v = {};
  for (const g of schema.groups) for (const f of g.fields) {
    const i = $("f-" + f.dest);
    if (i.closest(".field").hidden) continue;  // does not apply to these choices: left out of the run
    v[f.dest] = f.kind === "bool" ? i.checked : i.value;
  }
  return v;
}

function applyPreset() {
  const p = schema.presets[$("preset").value];
  if (!p) return;
  // what another preset filled in and this one does not set goes back to its default (not what the user typed)
  const fields = Object.fromEntries(schema.groups.flatMap((g) => g.fields).map((f) => [f.dest, f]));
  for (const [name, other] of Object.entries(schema.presets)) {
    if (name === $("preset").value) continue;
    for (const [k, v] of Object.entries(other)) {
      const i = $("f-" + k), f = fields[k];
      if (!i || k in p || (i.type === "checkbox" ? i.checked !== !!v : i.value !== String(v))) continue;
      if (i.type === "checkbox") i.checked = !!f.default;
      else i.value = f.kind === "choice" && f.default !== null ? String(f.default) : "";
    }
  }
  for (const [k, v] of Object.entries(p)) {
    const i = $("f-" + k);
    if (!i) continue;
    if (i.type === "checkbox") i.checked = !!v; else i.value = v;
  }
  pickSource(p);
  applyScopes();
  validate();
}

function showErrors(errors) {
  for (const e of document.querySelectorAll("#page-new .err")) { e.textContent = ""; }
  for (const e of document.querySelectorAll("#train-form .field")) e.classList.remove("bad");
  for (const [dest, msg] of Object.entries(errors || {})) {
    let box = $("err-" + dest) || $("err-_form");
    if (box.closest(".field") && box.closest(".field").hidden)  // e.g. "give the training images": at the chosen way
      box = schema.sources.some((s) => s.dest === dest) ? $("err-" + $("f-_source").value) : $("err-_form");
    box.textContent = msg;
    const row = box.closest(".field");
    if (row) { row.classList.add("bad"); const d = row.closest("details"); if (d) d.open = true; }
  }
}

// only the newest check's answer is shown: an older one still on its way (typing, then Check) is dropped
let checkSeq = 0;

async function validate(path = "/api/validate", extra = {}) {
  clearTimeout(buildForm.t);
  const seq = ++checkSeq;
  const r = await api(path, Object.assign({values: formValues()}, extra));
  if (seq !== checkSeq && path === "/api/validate") return r;
  if (r.error) { showErrors({_form: r.error}); return r; }
  showErrors(r.errors);
  if (r.architecture || r.errors && r.errors.pretrained_model_name_or_path) {
    architecture = r.architecture || null; applyScopes();
  }
  $("cmdline").textContent = r.command || "mindone-lora train … (fix the marked fields)";
  return r;
}

async function startRun(queue) {
  $("form-message").textContent = "";
  const r = await validate("/api/start", {queue: queue === true});
  if (r.id) { $("form-message").textContent = (queue ? "queued " : "started ") + r.id; current = r.id; showTab("runs"); }
}

function setValues(values) {
  for (const g of schema.groups) for (const f of g.fields) {
    const i = $("f-" + f.dest);
    if (f.kind === "bool") i.checked = !!values[f.dest];
    else i.value = values[f.dest] === undefined || values[f.dest] === null ? (f.kind === "choice" && f.default !== null ? String(f.default) : "") : String(values[f.dest]);
  }
  pickSource(values);
  applyScopes();
}

async function loadConfig() {
  const r = await api("/api/load_config", {path: $("config-path").value});
  if (r.error) { showErrors({_form: r.error}); return; }
  setValues(r.values);
  $("form-message").textContent = "loaded " + $("config-path").value;
  validate();
}

function cloneRun(argv) {
  const byFlag = {};
  for (const g of schema.groups) for (const f of g.fields) byFlag[f.flag] = f;
  const values = {};
  for (let i = 0; i < argv.length; i++) {
    const f = byFlag[argv[i]];
    if (!f) continue;
    if (f.kind === "bool") values[f.dest] = !f.default; else values[f.dest] = argv[++i];
  }
  delete values.resume_from_checkpoint;
  setValues(values);
  showTab("new");
  $("form-message").textContent = "settings of " + current + " (choose a new --output_dir)";
}

async function saveConfig() {
  const r = await validate("/api/config", {path: $("config-path").value});
  if (r.saved) $("form-message").textContent = "saved " + r.saved;
}

async function previewDataset(path) {
  const box = $("dataset-preview");
  box.textContent = "";
  if (!path.trim()) return;
  const r = await api("/api/dataset?path=" + encodeURIComponent(path));
  if (r.error) { box.append(el("div", {class: "err", text: r.error})); return; }
  box.append(el("div", {text: `${r.count} image(s) in ${r.folder}`}));
  for (const im of r.images) {
    box.append(el("figure", {}, el("img", {src: fileUrl(im.path), alt: im.caption || ""}),
                  el("figcaption", {text: im.caption || "(no caption)"})));
  }
}

// ---------------------------------------------------------------- runs

let current = null;
let timer = null;

function fmtTime(s) {
  if (s === null || s === undefined) return "";
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)}h${Math.floor(s % 3600 / 60)}m` : s >= 60 ? `${Math.floor(s / 60)}m${s % 60}s` : `${s}s`;
}

async function refreshRuns() {
  clearTimeout(timer);
  const r = await api("/api/runs");
  const body = $("runs-list").tBodies[0];
  body.textContent = "";
  $("runs-empty").hidden = !!(r.runs && r.runs.length);
  for (const run of r.runs || []) {
    const q = el("td", {});
    if (run.status === "queued") {
      for (const [what, label] of [["up", "↑"], ["down", "↓"], ["cancel", "cancel"]]) {
        const b = el("button", {class: "small", text: label, title: what});
        b.addEventListener("click", async (ev) => { ev.stopPropagation(); await api("/api/run/queue", {id: run.id, action: what}); refreshRuns(); });
        q.append(b);
      }
    }
    const shown = run.status === "stopping" ? "stopping…" : run.status;
    const tr = el("tr", {class: run.id === current ? "sel" : ""},
      el("td", {text: run.id}), el("td", {}, el("span", {class: "status " + run.status, text: shown})),
      el("td", {text: `${run.step}${run.total_steps ? " / " + run.total_steps : ""}`}),
      el("td", {text: run.s_per_step ? run.s_per_step.toFixed(2) : ""}), el("td", {text: fmtTime(run.eta_s)}), q);
    tr.addEventListener("click", () => { current = run.id; $("files-list").textContent = ""; refreshRuns(); });
    body.append(tr);
  }
  if (!current && r.runs && r.runs.length) current = r.runs[0].id;  // newest first
  if (current) await refreshRun();
  if (!$("page-runs").hidden) timer = setTimeout(refreshRuns, 1500);
}

// the loss curve held by the page: only the points after the last one are fetched (a flat cost per poll)
let curve = {id: null, starts: -1, losses: [], vals: []};

async function refreshRun() {
  const since = curve.id === current && curve.losses.length ? curve.losses[curve.losses.length - 1][0] : 0;
  const r = await api("/api/run?id=" + encodeURIComponent(current) + "&since=" + since);
  const box = $("run-detail");
  if (r.error) { box.hidden = false; $("run-error").textContent = r.error; return; }
  box.hidden = false;
  $("run-title").textContent = r.id;
  const st = $("run-status");
  st.textContent = r.status === "stopping" ? "stopping…" : r.status; st.className = "status " + r.status;
  $("run-progress").max = r.total_steps || 1; $("run-progress").value = r.step || 0;
  $("run-numbers").textContent = `step ${r.step}${r.total_steps ? " of " + r.total_steps : ""}` +
    (r.s_per_step ? `, ${r.s_per_step.toFixed(2)} s/step` : "") + (r.eta_s ? `, ${fmtTime(r.eta_s)} left` : "") +
    (r.checkpoints.length ? `, checkpoints: ${r.checkpoints.join(", ")}` : "");
  $("run-error").textContent = r.message || "";
  $("btn-stop").disabled = !(r.status === "running" || r.status === "starting");
  $("btn-resume").disabled = !r.can_resume;
  $("btn-resume").title = r.can_resume ? "start the run again from its newest checkpoint" :
    "only a stopped or failed run with a complete checkpoint can resume";
  $("btn-clone").disabled = !r.argv;
  $("btn-delete").disabled = !r.argv || ["running", "starting", "stopping", "queued"].includes(r.status);
  const all = r.images || [];
  $("gallery").querySelector("summary").textContent = `all images (${all.length})`;
  if ($("gallery").open && $("gallery-images").dataset.key !== all.join("|")) {
    $("gallery-images").dataset.key = all.join("|");
    $("gallery-images").textContent = "";
    for (const p of all) $("gallery-images").append(el("figure", {}, el("img", {src: fileUrl(p), loading: "lazy"}),
                                                          el("figcaption", {text: p.split("/").slice(-2).join("/")})));
  }
  cloneArgv = r.argv;
  if (curve.id !== current || curve.starts !== r.starts || r.since === 0) {
    curve = {id: current, starts: r.starts, losses: [], vals: []};
    if (since) return refreshRun();  // a resume began a new curve: fetch it whole
  }
  curve.losses = curve.losses.concat(r.losses || []);
  curve.vals = r.val_losses || [];  // few points: always sent whole
  drawLoss(curve.losses, curve.vals, r.resumes);
  document.querySelector(".legend .l-val").hidden = !curve.vals.length;
  document.querySelector(".legend .l-resume").hidden = !(r.resumes || []).length;
  const imgs = $("run-images");
  const want = (r.images || []).slice(-12);
  if (imgs.dataset.key !== want.join("|")) {
    imgs.dataset.key = want.join("|");
    imgs.textContent = "";
    for (const p of want) imgs.append(el("figure", {}, el("img", {src: fileUrl(p) + "&t=" + Date.now(), class: "val"}),
                                            el("figcaption", {text: p.split("/").pop()})));
  }
  $("run-log").textContent = r.log || "";
  $("run-cmd").textContent = r.argv ? "mindone-lora train " + r.argv.map(shq).join(" ") : "";
}

let cloneArgv = null;

function shq(a) { return /^[\w@%+=:,./-]+$/.test(a) ? a : "'" + a.replace(/'/g, "'\\''") + "'"; }

function niceTicks(lo, hi, n, whole = false) {
  const span = hi - lo || 1, step0 = span / n, mag = Math.pow(10, Math.floor(Math.log10(step0)));
  let step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= n) || 10 * mag;
  if (whole) step = Math.max(1, Math.round(step));  // steps are whole numbers
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-12; t += step) out.push(t);
  return out;
}

// the training loss (faint), its moving average (smoothing: exponential, 0.9), validation loss, axis ticks, dashed
// markers where the run was resumed, and the nearest point under the pointer
function drawLoss(points, vals, resumes) {
  const c = $("loss-canvas"), g = c.getContext("2d");
  const W = c.width, H = c.height, L = 52, R = 10, T = 10, B = 30;
  g.fillStyle = "#fff"; g.fillRect(0, 0, W, H);
  c.dataset.points = String(points.length);
  const all = points.concat(vals);
  g.strokeStyle = "#999"; g.strokeRect(L, T, W - L - R, H - T - B);
  if (!all.length) { g.fillStyle = "#666"; g.fillText("no steps yet", L + 10, 30); return; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const X = (x) => L + (W - L - R) * (x - x0) / (x1 - x0), Y = (y) => T + (H - T - B) * (1 - (y - y0) / (y1 - y0));
  g.font = "11px system-ui"; g.fillStyle = "#444"; g.strokeStyle = "#eee";
  for (const t of niceTicks(y0, y1, 5)) {
    g.beginPath(); g.moveTo(L, Y(t)); g.lineTo(W - R, Y(t)); g.stroke();
    g.fillText(t.toPrecision(3), 4, Y(t) + 4);
  }
  for (const t of niceTicks(x0, x1, 6, true)) {
    g.beginPath(); g.moveTo(X(t), T); g.lineTo(X(t), H - B); g.stroke();
    g.fillText(String(Math.round(t)), X(t) - 8, H - B + 14);
  }
  g.fillText("step", W - R - 24, H - 4);
  const line = (pts, colour, width) => {
    if (pts.length > 2000) { const k = Math.ceil(pts.length / 2000); pts = pts.filter((p, i) => i % k === 0 || i === pts.length - 1); }
    g.strokeStyle = colour; g.lineWidth = width; g.beginPath();
    pts.forEach((p, i) => (i ? g.lineTo(X(p[0]), Y(p[1])) : g.moveTo(X(p[0]), Y(p[1]))));
    g.stroke(); g.lineWidth = 1;
  };
  let ema = null;
  const smooth = points.map((p) => { ema = ema === null ? p[1] : 0.9 * ema + 0.1 * p[1]; return [p[0], ema]; });
  line(points, "rgba(30,90,200,0.3)", 1);
  line(smooth, "#1e5ac8", 2);
  if (vals.length) { line(vals, "#d2691e", 2); g.fillStyle = "#d2691e"; for (const p of vals) g.fillRect(X(p[0]) - 2, Y(p[1]) - 2, 4, 4); }
  g.strokeStyle = "#7c3aed"; g.setLineDash([4, 3]);
  for (const s of resumes || []) if (s > x0 && s <= x1) { g.beginPath(); g.moveTo(X(s), T); g.lineTo(X(s), H - B); g.stroke(); }
  g.setLineDash([]);
  c.onmousemove = (ev) => {
    const r = c.getBoundingClientRect(), sx = x0 + (ev.clientX - r.left - L) / (W - L - R) * (x1 - x0);
    let best = null;
    for (const p of points) if (best === null || Math.abs(p[0] - sx) < Math.abs(best[0] - sx)) best = p;
    if (best) $("loss-tip").textContent = `step ${best[0]}: loss ${best[1].toPrecision(4)}`;
  };
}

async function runAction(what) {
  const r = await api("/api/run/" + what, {id: current});
  $("run-error").textContent = r.error || "";
  refreshRuns();
}

async function showFiles() {
  const r = await api("/api/run/files?id=" + encodeURIComponent(current));
  const box = $("files-list");
  box.textContent = "";
  if (r.error) { box.append(el("div", {class: "err", text: r.error})); return; }
  const ul = el("ul");
  for (const f of r.files) {
    const li = el("li", {}, el("a", {href: fileUrl(f.path), target: "_blank", text: f.name}),
                  ` (${(f.size / 1024).toFixed(1)} KiB) `);
    if (f.lora) {
      const b = el("button", {text: "inspect", class: "small"});
      b.addEventListener("click", () => { $("inspect-path").value = f.path; showTab("files"); inspect(); });
      li.append(b);
    }
    ul.append(li);
  }
  box.append(el("h3", {text: "Output files"}), ul);
}

// ---------------------------------------------------------------- LoRA files

function table(rows) {
  const t = el("table", {class: "kv"});
  for (const [k, v] of rows) t.append(el("tr", {}, el("th", {text: k}), el("td", {text: String(v)})));
  return t;
}

async function inspect() {
  const r = await api("/api/inspect", {path: $("inspect-path").value});
  const box = $("inspect-result");
  box.textContent = "";
  $("inspect-error").textContent = r.error || "";
  if (r.error) return;
  box.append(table([["file", r.file], ["format", r.format], ["architecture", r.architecture],
                    ["algorithm", r.algorithm], ["dtype", r.dtype],
                    ["trigger words", r.trigger_words.map((t) => `${t[0]} (${t[1]})`).join(", ") || "(none recorded)"]]));
  const comps = el("table", {class: "grid", id: "inspect-components"},
                   el("tr", {}, el("th", {text: "component"}), el("th", {text: "modules"}), el("th", {text: "ranks"}),
                      el("th", {text: "alphas"})));
  for (const [name, c] of Object.entries(r.components))
    comps.append(el("tr", {}, el("td", {text: name}), el("td", {text: c.modules}), el("td", {text: c.ranks.join(", ")}),
                    el("td", {text: c.alphas.join(", ")})));
  box.append(comps);
  const meta = Object.entries(r.metadata).map(([k, v]) => [k, v.length > 200 ? v.slice(0, 200) + "…" : v]);
  box.append(el("details", {}, el("summary", {text: `metadata (${meta.length} keys)`}), table(meta)));
  box.append(el("pre", {text: r.text}));
}

function loraRows(id) {
  return [...$(id).querySelectorAll(".lora-row")].map((row) => ({path: row.children[0].value, weight: row.children[1].value}));
}

function addLora(target) {
  const file = el("input", {"aria-label": "LoRA file", placeholder: "LoRA file", size: 50});
  const weight = el("input", {value: "1", size: 4, title: "weight", "aria-label": "weight"});
  $(target).append(el("div", {class: "lora-row"}, file, weight, " ", pickButton(file)));
}

async function simple(what, body, extra) {
  $(what + "-error").textContent = ""; $(what + "-message").textContent = "working …";
  const watch = what === "generate" ? watchGenerate() : null;
  let r = await api("/api/" + what, body);
  if (r.confirm && confirm(r.error)) r = await api("/api/" + what, Object.assign({}, body, {overwrite: true}));
  else if (r.confirm) r = {error: "not replaced"};
  if (watch) watch.stop();
  $(what + "-message").textContent = r.error ? "" : r.message;
  $(what + "-error").textContent = r.error || "";
  if (!r.error && extra) extra(r);
}

// generate's progress while it works: the worker reports each denoising step, the page asks every 0.4 s
function describeProgress(p) {
  if (p.phase === "denoising" || p.phase === "done") {
    const which = p.first === p.last ? `image ${p.first}` : `images ${p.first}–${p.last}`;
    return `${which} of ${p.images}: denoising step ${p.step} of ${p.steps}`;
  }
  return p.phase === "loading" ? "loading the model …" : "starting …";
}

function watchGenerate() {
  const bar = $("gen-progress"), line = $("gen-progress-text");
  bar.hidden = false; bar.removeAttribute("value"); line.textContent = "starting …";
  let on = true, t = null;
  const poll = async () => {
    const p = await api("/api/progress");
    if (!on) return;
    if (p.action === "generate" && p.running) {
      line.textContent = describeProgress(p);
      if (p.fraction !== undefined) { bar.max = 1; bar.value = p.fraction; } else bar.removeAttribute("value");
    }
    t = setTimeout(poll, 400);
  };
  poll();
  return {stop: async () => {
    on = false; clearTimeout(t);
    const p = await api("/api/progress");  // the last report: the steps it took
    bar.hidden = true;
    const done = p.action === "generate" && !p.running && p.phase === "done";
    line.textContent = done ? "done: " + describeProgress(p) : "";
  }};
}

// ---------------------------------------------------------------- start

async function main() {
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => showTab(t.dataset.tab));
  const info = await api("/api/info");
  const others = info.allowed.slice(1).filter((f) => !info.readonly.includes(f));
  $("root-info").textContent = `runs in ${info.root}` +
    (others.length ? ` · also allowed: ${others.join(", ")}` : "") +
    (info.readonly.length ? ` · read-only: ${info.readonly.join(", ")}` : "");
  schema = await api("/api/form");
  buildForm();
  $("btn-preset").addEventListener("click", applyPreset);
  $("btn-validate").addEventListener("click", () => validate());
  $("btn-start").addEventListener("click", () => startRun(false));
  $("btn-queue").addEventListener("click", () => startRun(true));
  $("btn-config").addEventListener("click", saveConfig);
  $("btn-load-config").addEventListener("click", loadConfig);
  $("btn-load-config").before(pickButton($("config-path")));
  $("btn-clone").addEventListener("click", () => cloneArgv && cloneRun(cloneArgv));
  $("btn-delete").addEventListener("click", async () => {
    if (!confirm(`Delete the run ${current} and every file in its folder?`)) return;
    const r = await api("/api/run/delete", {id: current});
    $("run-error").textContent = r.error || "";
    if (!r.error) { current = null; $("run-detail").hidden = true; }
    refreshRuns();
  });
  $("picker-close").addEventListener("click", () => $("picker").close());
  $("picker-here").addEventListener("click", () => choose($("picker").dataset.folder));
  $("picker-up").addEventListener("click", () => showFolder($("picker").dataset.parent || ""));
  $("btn-copy").addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText($("cmdline").textContent));
  $("btn-stop").addEventListener("click", () => runAction("stop"));
  $("btn-resume").addEventListener("click", () => runAction("resume"));
  $("btn-files").addEventListener("click", showFiles);
  $("btn-inspect").addEventListener("click", inspect);
  for (const i of document.querySelectorAll("#page-files input.path")) {
    const row = el("span", {class: "pathrow"});
    i.replaceWith(row);
    row.append(i, pickButton(i));
  }
  for (const b of document.querySelectorAll(".add-lora")) b.addEventListener("click", () => addLora(b.dataset.target));
  addLora("merge-loras"); addLora("gen-loras");
  $("btn-convert").addEventListener("click", () => simple("convert", {input: $("conv-in").value, output: $("conv-out").value,
    to: $("conv-to").value, base: $("conv-base").value, dtype: $("conv-dtype").value}));
  $("btn-merge").addEventListener("click", () => simple("merge", {model: $("merge-model").value, loras: loraRows("merge-loras"),
    out: $("merge-out").value, to_lora: $("merge-tolora").checked, format: $("merge-format").value,
    overwrite: $("merge-overwrite").checked}));
  $("btn-generate").addEventListener("click", () => simple("generate", {model: $("gen-model").value, loras: loraRows("gen-loras"),
    prompt: $("gen-prompt").value, negative_prompt: $("gen-negative").value, seed: $("gen-seed").value,
    steps: $("gen-steps").value, guidance_scale: $("gen-guidance").value, width: $("gen-width").value,
    height: $("gen-height").value, num_images: $("gen-n").value, out: $("gen-out").value}, (r) => { $("gen-grid").textContent = "";
      $("gen-grid").append(el("img", {src: fileUrl(r.grid) + "&t=" + Date.now(), id: "gen-grid-img"})); }));
  document.body.dataset.ready = "1";
  showTab(location.hash === "#runs" ? "runs" : location.hash === "#files" ? "files" : "new");
}

main();
