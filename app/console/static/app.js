// maml-serve browser console: plain JavaScript, no build step, no network access beyond this API.
"use strict";

const KEY_STORAGE = "maml-serve.api-key";
const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

const state = {
  key: localStorage.getItem(KEY_STORAGE) || "",
  admin: false,
  selectedTask: null,
  queries: [],
  selectedRun: null,
  runsTimer: null,
  tasksTimer: null,
};
const rowImages = new WeakMap(); // label row element -> [Blob]

// --- HTTP -----------------------------------------------------------------------------------

class ApiProblem extends Error {
  constructor(status, body) {
    super(body.detail || `HTTP ${status}`);
    this.status = status;
    this.code = body.code || `http_${status}`;
    this.detail = body.detail || "";
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function api(method, path, { json, form, retryNotAdapted = false, blob = false } = {}) {
  const headers = { Authorization: `Bearer ${state.key}` };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(path, { method, headers, body });
    if (response.ok) {
      if (blob) return response.blob();
      return response.status === 204 ? null : response.json();
    }
    let problem = {};
    try { problem = await response.json(); } catch (e) { problem = {}; }
    const retryable = response.status === 503
      || (retryNotAdapted && response.status === 409 && problem.code === "not_adapted_yet");
    if (retryable && attempt < 30) {
      const seconds = Number(response.headers.get("Retry-After")) || 1;
      await sleep(Math.min(seconds, 5) * 1000);
      continue;
    }
    throw new ApiProblem(response.status, problem);
  }
}

function showMessage(text, ok = false) {
  const box = $("#message");
  box.textContent = text;
  box.classList.toggle("ok", ok);
  box.hidden = false;
  clearTimeout(showMessage.timer);
  showMessage.timer = setTimeout(() => { box.hidden = true; }, ok ? 5000 : 12000);
}

function report(error) {
  if (error instanceof ApiProblem) showMessage(`${error.status} ${error.code}: ${error.detail}`);
  else showMessage(String(error));
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");
const percent = (x) => (x === null || x === undefined ? "" : `${(100 * x).toFixed(1)}%`);
function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  if (s < 90) return `${s} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

// Two clicks to delete: the first arms the button, the second acts.
function confirmButton(label, action) {
  const button = el("button", { class: "danger small" }, label);
  button.addEventListener("click", async () => {
    if (!button.dataset.armed) {
      button.dataset.armed = "1";
      button.textContent = "Sure?";
      setTimeout(() => { delete button.dataset.armed; button.textContent = label; }, 4000);
      return;
    }
    button.disabled = true;
    try { await action(); } catch (e) { report(e); button.disabled = false; }
  });
  return button;
}

// --- key ------------------------------------------------------------------------------------

async function useKey(key) {
  state.key = key.trim();
  if (!state.key) return;
  try {
    await api("GET", "/v1/tasks?limit=1");
  } catch (e) {
    $("#key-status").textContent = "this key was refused";
    $("#workspace").hidden = true;
    report(e);
    return;
  }
  localStorage.setItem(KEY_STORAGE, state.key);
  try {
    await api("GET", "/v1/admin/datasets");
    state.admin = true;
  } catch (e) {
    state.admin = false;
  }
  $("#key-status").textContent = state.admin ? "signed in with an admin key" : "signed in with a user key";
  $("#workspace").hidden = false;
  $("#admin-panel").hidden = !state.admin;
  await Promise.all([refreshTasks(), refreshInitializationChoice()]);
  if (state.admin) await refreshAdmin();
}

// Every ready version the caller may adapt from, with what it knows and the input it expects.
async function refreshInitializationChoice() {
  const { items } = await api("GET", "/v1/initializations");
  const select = $("#task-initialization");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "your default"));
  for (const init of items.filter((i) => i.status === "ready")) {
    const input = `${init.config.in_channels === 3 ? "colour" : "grey"} ${init.config.image_size}px`;
    select.append(el("option", { value: init.version }, `${init.version} (${init.domain}, ${input})`));
  }
  select.value = chosen;
}

// --- drawing pads and drop zones ------------------------------------------------------------

function setupPad(canvas) {
  const ctx = canvas.getContext("2d");
  const clear = () => {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    canvas.dataset.dirty = "";
  };
  clear();
  let drawing = false;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width,
      (event.clientY - box.top) * canvas.height / box.height];
  };
  canvas.addEventListener("pointerdown", (event) => {
    drawing = true;
    canvas.setPointerCapture(event.pointerId);
    const [x, y] = point(event);
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.lineTo(x + 0.1, y + 0.1);
    ctx.strokeStyle = "#000";
    ctx.lineWidth = 7;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.stroke();
    canvas.dataset.dirty = "1";
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drawing) return;
    const [x, y] = point(event);
    ctx.lineTo(x, y);
    ctx.stroke();
  });
  const stop = () => { drawing = false; };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointerleave", stop);
  return {
    clear,
    toBlob: () => new Promise((resolve) => canvas.toBlob(resolve, "image/png")),
    dirty: () => canvas.dataset.dirty === "1",
  };
}

function setupDrop(zone, onFiles) {
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    onFiles(Array.from(event.dataTransfer.files).filter((f) => f.type.startsWith("image/")));
  });
  const input = $("input[type=file]", zone);
  input.addEventListener("change", () => { onFiles(Array.from(input.files)); input.value = ""; });
}

function thumb(blob) {
  return el("img", { src: URL.createObjectURL(blob), alt: "" });
}

// --- new task -------------------------------------------------------------------------------

function addLabelRow(name = "") {
  const row = $("#label-row-template").content.firstElementChild.cloneNode(true);
  rowImages.set(row, []);
  $(".label-name", row).value = name;
  const thumbs = $(".thumbs", row);
  const add = (blobs) => {
    for (const blob of blobs) {
      rowImages.get(row).push(blob);
      thumbs.append(thumb(blob));
    }
  };
  setupDrop($(".dropzone", row), add);
  const pad = setupPad($(".label-canvas", row));
  $(".draw-add", row).addEventListener("click", async () => {
    if (!pad.dirty()) return;
    add([await pad.toBlob()]);
    pad.clear();
  });
  $(".draw-clear", row).addEventListener("click", pad.clear);
  $(".remove-label", row).addEventListener("click", () => row.remove());
  $("#label-rows").append(row);
  return row;
}

async function createTask() {
  const form = new FormData();
  let count = 0;
  for (const row of $$(".label-row")) {
    const label = $(".label-name", row).value.trim();
    for (const [i, blob] of rowImages.get(row).entries()) {
      form.append("images", blob, `${label || "image"}-${i}.png`);
      form.append("labels", label);
      count++;
    }
  }
  if (count === 0) { showMessage("add images to at least two labels first"); return; }
  const name = $("#task-name").value.trim();
  if (name) form.append("name", name);
  form.append("mode", $("#task-mode").value);
  const initialization = $("#task-initialization").value;
  if (initialization) form.append("initialization", initialization);
  const status = $("#create-status");
  const button = $("#create-task");
  button.disabled = true;
  status.textContent = "uploading…";
  try {
    let task = await api("POST", "/v1/tasks", { form });
    const started = Date.now();
    while (task.status === "adapting") {
      status.textContent = `adapting… ${((Date.now() - started) / 1000).toFixed(1)} s`;
      await sleep(400);
      task = await api("GET", `/v1/tasks/${task.id}`);
    }
    if (task.status === "ready") {
      status.textContent = `ready: ${supportSummary(task)} (${task.initialization_version})`;
      status.dataset.taskId = task.id;
      $("#label-rows").replaceChildren();
      addLabelRow();
      addLabelRow();
      $("#task-name").value = "";
      await refreshTasks();
      selectTask(task);
    } else {
      status.textContent = `failed: ${task.error ? task.error.message : "unknown error"}`;
      await refreshTasks();
    }
  } catch (e) {
    status.textContent = "";
    report(e);
  } finally {
    button.disabled = false;
  }
}

// Support-set diagnostics: leave-one-out accuracy (classes with >= 2 images) and the closest pair.
function leaveOneOut(task) {
  const d = task.diagnostics;
  if (!d) return "";
  return d.leave_one_out_accuracy === null ? "n/a (1 image per class)" : percent(d.leave_one_out_accuracy);
}

function supportSummary(task) {
  const d = task.diagnostics;
  if (!d) return "adapted";
  const pair = d.confusable_pairs[0];
  const closest = pair ? `; most alike: ${pair.first} / ${pair.second} (similarity ${pair.similarity.toFixed(2)})` : "";
  return `leave-one-out accuracy ${leaveOneOut(task)}${closest}`;
}

// --- tasks ----------------------------------------------------------------------------------

async function refreshTasks() {
  const page = await api("GET", "/v1/tasks?limit=100");
  const body = $("#tasks-table tbody");
  body.replaceChildren();
  for (const task of page.items) {
    const labels = task.labels.map((l) => `${l} (${task.counts[l]})`).join(", ");
    const row = el("tr", { dataset: { taskId: task.id } },
      el("td", {}, task.name || task.id.slice(0, 8)),
      el("td", {}, labels),
      el("td", { class: `status-${task.status}` }, task.status),
      el("td", {}, leaveOneOut(task)),
      el("td", {}, when(task.created_at)),
      el("td", {},
        el("button", { class: "small use-task", onclick: () => selectTask(task) }, "Predict"), " ",
        confirmButton("Delete", async () => {
          await api("DELETE", `/v1/tasks/${task.id}`);
          if (state.selectedTask && state.selectedTask.id === task.id) {
            state.selectedTask = null;
            $("#query-panel").hidden = true;
          }
          await refreshTasks();
        })));
    if (state.selectedTask && state.selectedTask.id === task.id) row.classList.add("selected");
    body.append(row);
  }
  if (page.items.length === 0) body.append(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "no tasks yet")));
  clearTimeout(state.tasksTimer);
  if (page.items.some((t) => t.status === "adapting")) state.tasksTimer = setTimeout(refreshTasks, 1000);
}

function selectTask(task) {
  state.selectedTask = task;
  $("#query-panel").hidden = false;
  $("#query-task-name").textContent = `${task.name || task.id.slice(0, 8)} (${task.labels.join(", ")})`;
  $("#top-k").value = String(Math.min(3, task.labels.length));
  $("#predictions").replaceChildren();
  for (const row of $$("#tasks-table tbody tr")) row.classList.toggle("selected", row.dataset.taskId === task.id);
  $("#query-panel").scrollIntoView({ behavior: "smooth", block: "start" });
}

// --- queries --------------------------------------------------------------------------------

function addQueries(blobs) {
  for (const blob of blobs) {
    state.queries.push(blob);
    $("#query-thumbs").append(thumb(blob));
  }
}

async function predict() {
  if (!state.selectedTask) return;
  if (state.queries.length === 0) { showMessage("add a query image or drawing first"); return; }
  const form = new FormData();
  state.queries.forEach((blob, i) => form.append("images", blob, `query-${i}.png`));
  form.append("top_k", $("#top-k").value || "3");
  const button = $("#predict");
  button.disabled = true;
  try {
    const result = await api("POST", `/v1/tasks/${state.selectedTask.id}/predictions`,
      { form, retryNotAdapted: true });
    renderPredictions(result.predictions, state.queries.slice());
  } catch (e) {
    report(e);
  } finally {
    button.disabled = false;
  }
}

function renderPredictions(predictions, blobs) {
  const box = $("#predictions");
  box.replaceChildren();
  predictions.forEach((prediction, i) => {
    const unknown = prediction.label === "unknown";
    const bars = prediction.top_k.map((entry) => el("div", { class: "bar" },
      el("span", { class: "bar-label" }, entry.label),
      el("div", { class: "track" }, el("div", { class: "fill", style: `width: ${(100 * entry.probability).toFixed(1)}%` })),
      el("span", { class: "bar-value" }, percent(entry.probability))));
    box.append(el("div", { class: "prediction" },
      blobs[i] ? thumb(blobs[i]) : el("span"),
      el("div", {}, el("div", { class: unknown ? "predicted-label unknown" : "predicted-label" },
        unknown ? "unknown" : prediction.label),
      el("div", { class: "muted" }, unknown ? "looks like none of the task's labels" : ""),
      el("div", { class: "muted" }, prediction.score === null || prediction.score === undefined
        ? "" : `familiarity ${percent(prediction.score)}`)),
      el("div", { class: "bars" }, ...bars)));
  });
}

// --- admin ----------------------------------------------------------------------------------

async function refreshAdmin() {
  await Promise.all([refreshDatasets(), refreshRuns(), refreshInitializations()]);
}

async function refreshDatasets() {
  const { items } = await api("GET", "/v1/admin/datasets");
  const body = $("#datasets-table tbody");
  body.replaceChildren();
  const select = $("#mt-dataset");
  select.replaceChildren();
  for (const dataset of items) {
    body.append(el("tr", {},
      el("td", {}, dataset.name), el("td", {}, dataset.class_count), el("td", {}, dataset.image_count),
      el("td", {}, when(dataset.created_at)),
      el("td", {}, confirmButton("Delete", async () => {
        await api("DELETE", `/v1/admin/datasets/${dataset.id}`);
        await refreshDatasets();
      }))));
    select.append(el("option", { value: dataset.id }, dataset.name));
  }
  if (items.length === 0) body.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "no datasets yet")));
}

async function uploadDataset() {
  const file = $("#dataset-file").files[0];
  if (!file) { showMessage("choose a zip first"); return; }
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("name", $("#dataset-name").value.trim() || file.name.replace(/\.zip$/i, ""));
  try {
    const dataset = await api("POST", "/v1/admin/datasets", { form });
    showMessage(`dataset ${dataset.name}: ${dataset.class_count} classes, ${dataset.image_count} images`, true);
    await refreshDatasets();
  } catch (e) { report(e); }
}

async function registerOmniglot() {
  try {
    const dataset = await api("POST", "/v1/admin/datasets/omniglot", { json: {} });
    showMessage(`dataset ${dataset.name}: ${dataset.class_count} classes`, true);
    await refreshDatasets();
  } catch (e) { report(e); }
}

async function startTraining() {
  const body = {
    dataset_id: $("#mt-dataset").value,
    start: $("#mt-start").value,
    auto_promote: $("#mt-auto").checked,
    algorithm: { iterations: Number($("#mt-iterations").value), order: $("#mt-order").value },
  };
  try {
    const run = await api("POST", "/v1/admin/meta-trainings", { json: body });
    state.selectedRun = run.id;
    await refreshRuns();
  } catch (e) { report(e); }
}

async function refreshRuns() {
  const { items } = await api("GET", "/v1/admin/meta-trainings");
  const body = $("#runs-table tbody");
  body.replaceChildren();
  for (const run of items) {
    const fraction = run.progress.fraction || 0;
    const progress = run.progress.iteration != null && run.progress.total
      ? `${run.progress.iteration} / ${run.progress.total}` : (run.progress.stage || "");
    const result = run.result && run.result.initialization_version
      ? `${run.result.initialization_version}${run.result.promoted ? " (promoted)" : ""}`
      : (run.error ? `${run.error.code}: ${run.error.message}` : "");
    const active = run.state === "queued" || run.state === "running";
    body.append(el("tr", { dataset: { runId: run.id }, class: state.selectedRun === run.id ? "selected" : "" },
      el("td", {}, run.id.slice(0, 8)),
      el("td", {}, run.dataset_name || ""),
      el("td", { class: `status-${run.state}` }, run.state),
      el("td", {}, el("span", { class: "progress", title: `${(100 * fraction).toFixed(1)}%` },
        el("div", { style: `width: ${(100 * fraction).toFixed(1)}%` })), " ", progress),
      el("td", {}, active ? duration(run.progress.eta_seconds) : ""),
      el("td", {}, result),
      el("td", {},
        el("button", { class: "secondary small", onclick: () => { state.selectedRun = run.id; drawRun(run); } }, "Curve"), " ",
        active ? el("button", { class: "danger small", onclick: async () => {
          try { await api("POST", `/v1/admin/meta-trainings/${run.id}/cancel`); await refreshRuns(); } catch (e) { report(e); }
        } }, "Cancel") : null)));
    if (state.selectedRun === run.id) drawRun(run);
  }
  if (items.length === 0) body.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "no runs yet")));
  clearTimeout(state.runsTimer);
  if (items.some((r) => r.state === "queued" || r.state === "running")) {
    state.runsTimer = setTimeout(() => refreshRuns().catch(report), 2000);
  } else if (items.length) {
    await refreshInitializations();
  }
}

function drawRun(run) {
  $("#run-detail").hidden = false;
  $("#run-detail-id").textContent = `${run.id.slice(0, 8)} (${run.state})`;
  drawCurve($("#curve"), run.curve || []);
}

function drawCurve(canvas, curve) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = 36;
  ctx.clearRect(0, 0, W, H);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, W, H);
  ctx.font = "12px system-ui, sans-serif";
  if (curve.length === 0) {
    ctx.fillStyle = "#6b7785";
    ctx.fillText("no points yet: the first appears after the first logged iterations", pad, H / 2);
    $("#curve-legend").textContent = "";
    return;
  }
  const its = curve.map((p) => p.iteration);
  const x0 = Math.min(...its), x1 = Math.max(...its, x0 + 1);
  const losses = curve.map((p) => p.loss).filter((v) => typeof v === "number");
  const lossMax = Math.max(...losses, 1e-6);
  const X = (it) => pad + (W - 2 * pad) * (it - x0) / (x1 - x0);
  const Yloss = (v) => H - pad - (H - 2 * pad) * v / lossMax;
  const Yacc = (v) => H - pad - (H - 2 * pad) * v;
  ctx.strokeStyle = "#d9dee4";
  ctx.strokeRect(pad, pad, W - 2 * pad, H - 2 * pad);
  ctx.fillStyle = "#6b7785";
  ctx.fillText(String(x0), pad, H - pad + 14);
  ctx.fillText(String(x1), W - pad - 20, H - pad + 14);
  ctx.fillText(lossMax.toFixed(2), 2, pad + 4);
  ctx.fillText("100%", W - pad + 4, pad + 4);
  const series = [["loss", "#2f5d8a", Yloss, "meta-train loss (left)"],
    ["train_accuracy", "#9bb3cc", Yacc, "train accuracy (right)"]];
  const colours = ["#2e7d32", "#e07b00", "#8e24aa", "#c62828"];
  const valKeys = [...new Set(curve.flatMap((p) => Object.keys(p).filter((k) => k.startsWith("val_"))))].sort();
  valKeys.forEach((k, i) => series.push([k, colours[i % colours.length], Yacc, `${k.slice(4)} validation (right)`]));
  const legend = [];
  for (const [key, colour, Y, name] of series) {
    const pts = curve.filter((p) => typeof p[key] === "number");
    if (pts.length === 0) continue;
    ctx.strokeStyle = colour;
    ctx.fillStyle = colour;
    ctx.lineWidth = 2;
    ctx.beginPath();
    pts.forEach((p, i) => (i ? ctx.lineTo(X(p.iteration), Y(p[key])) : ctx.moveTo(X(p.iteration), Y(p[key]))));
    ctx.stroke();
    for (const p of pts) ctx.fillRect(X(p.iteration) - 2, Y(p[key]) - 2, 4, 4);
    const last = pts[pts.length - 1][key];
    legend.push(`${name}: ${key === "loss" ? last.toFixed(3) : percent(last)}`);
  }
  $("#curve-legend").textContent = legend.join(" · ");
}

async function refreshInitializations() {
  const { items, active_version: active } = await api("GET", "/v1/initializations");
  const body = $("#inits-table tbody");
  body.replaceChildren();
  const start = $("#mt-start");
  const chosen = start.value;
  start.replaceChildren(el("option", { value: "scratch" }, "scratch"));
  for (const init of items) {
    const validation = (init.metrics && init.metrics.validation) || {};
    const summary = Object.entries(validation)
      .map(([shape, r]) => `${shape} ${percent(r && typeof r === "object" ? r.accuracy : r)}`).join(", ");
    body.append(el("tr", { dataset: { version: init.version }, class: init.version === active ? "selected" : "" },
      el("td", {}, init.version),
      el("td", {}, init.version === active ? "active" : init.status),
      el("td", {}, init.source),
      el("td", {}, summary),
      el("td", {}, when(init.created_at)),
      el("td", {}, init.version === active ? "" : el("button", { class: "small", onclick: async () => {
        try {
          const r = await api("POST", `/v1/admin/initializations/${encodeURIComponent(init.version)}/promote`);
          showMessage(`active: ${r.active_version} (was ${r.previous_version})`, true);
          await refreshInitializations();
        } catch (e) { report(e); }
      } }, "Promote"))));
    start.append(el("option", { value: init.version }, init.version));
  }
  start.value = chosen || "scratch";
}

async function rollback() {
  try {
    const r = await api("POST", "/v1/admin/initializations/rollback");
    showMessage(`rolled back: active ${r.active_version} (was ${r.previous_version})`, true);
    await refreshInitializations();
  } catch (e) { report(e); }
}

// --- wiring ---------------------------------------------------------------------------------

function main() {
  $("#save-key").addEventListener("click", () => useKey($("#api-key").value).catch(report));
  $("#api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") useKey($("#api-key").value).catch(report); });
  $("#forget-key").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORAGE);
    state.key = "";
    $("#api-key").value = "";
    $("#workspace").hidden = true;
    $("#key-status").textContent = "key forgotten";
  });
  $("#add-label").addEventListener("click", () => addLabelRow());
  $("#create-task").addEventListener("click", createTask);
  $("#refresh-tasks").addEventListener("click", () => refreshTasks().catch(report));
  setupDrop($("#query-drop"), addQueries);
  const queryPad = setupPad($("#query-canvas"));
  $("#query-draw-add").addEventListener("click", async () => {
    if (!queryPad.dirty()) return;
    addQueries([await queryPad.toBlob()]);
    queryPad.clear();
  });
  $("#query-draw-clear").addEventListener("click", queryPad.clear);
  $("#clear-queries").addEventListener("click", () => {
    state.queries = [];
    $("#query-thumbs").replaceChildren();
    $("#predictions").replaceChildren();
  });
  $("#predict").addEventListener("click", predict);
  $("#upload-dataset").addEventListener("click", uploadDataset);
  $("#register-omniglot").addEventListener("click", registerOmniglot);
  $("#start-training").addEventListener("click", startTraining);
  $("#rollback").addEventListener("click", rollback);
  addLabelRow();
  addLabelRow();
  // A link from `maml-serve serve --console-key` carries a key in its fragment: keep it, hide it.
  const takeLinkedKey = () => {
    const linked = new URLSearchParams(location.hash.slice(1)).get("key");
    if (!linked) return false;
    state.key = linked;
    localStorage.setItem(KEY_STORAGE, linked);
    history.replaceState(null, "", location.pathname + location.search);
    $("#api-key").value = linked;
    return true;
  };
  window.addEventListener("hashchange", () => { if (takeLinkedKey()) useKey(state.key).catch(report); });
  takeLinkedKey();
  if (state.key) {
    $("#api-key").value = state.key;
    useKey(state.key).catch(report);
  }
}

main();
