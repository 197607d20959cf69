// corral's web GUI: plain JavaScript, no build step. It talks to the same HTTP API as
// the command line (docs/api.md) and follows the server's event stream (SSE) to show
// states as they change.
"use strict";

const ALLOWED = {
  STANDBY: ["DEPLOY", "EXIT"],
  DEPLOYED: ["CONFIGURE", "EXIT"],
  CONFIGURED: ["START_ACTIVITY", "RESET", "EXIT"],
  RUNNING: ["STOP_ACTIVITY"],
  ERROR: ["RECOVER"],
  DONE: [],
};
const ROLES = ["viewer", "operator", "admin"];
const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const n = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") n.className = v;
    else if (k.startsWith("on")) n.addEventListener(k.slice(2), v);
    else n.setAttribute(k, v);
  }
  for (const c of children) n.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return n;
};
const badge = (state) => el("span", { class: `state ${state}`, "data-state": state }, state);
const clock = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "-");

const app = {
  token: localStorage.getItem("corral-token") || "",
  me: null,
  stream: null,
  lastSeq: 0,
  env: null, // the environment page's state
  timers: [],
};

async function api(method, path, body) {
  const opts = { method, headers: { Authorization: `Bearer ${app.token}` } };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({}));
  if (r.status === 401) {
    showLogin("the token was refused: " + (data.detail || r.status));
    throw new Error("unauthorized");
  }
  if (!r.ok) {
    const extra = (data.errors || []).map((e) => e.message || e.where + ": " + e.message);
    throw new Error([data.detail || `HTTP ${r.status}`, ...extra].join("\n"));
  }
  return data;
}

// -- login -------------------------------------------------------------------------------

function showLogin(message) {
  $("#login").hidden = false;
  $("#app").hidden = true;
  $("#logout").hidden = true;
  $("#who").textContent = "";
  $("#login-error").textContent = message || "";
  if (app.stream) app.stream.close();
}

async function login(token) {
  app.token = token;
  try {
    app.me = await api("GET", "/api/whoami");
  } catch (e) {
    if (e.message !== "unauthorized") showLogin(e.message);
    return;
  }
  localStorage.setItem("corral-token", token);
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#logout").hidden = false;
  $("#who").textContent = `${app.me.name} (${app.me.role})`;
  const operator = ROLES.indexOf(app.me.role) >= 1;
  document.querySelectorAll(".needs-operator").forEach((n) => (n.hidden = !operator));
  follow();
  route();
}

$("#login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  login($("#token").value.trim());
});
$("#logout").addEventListener("click", () => {
  localStorage.removeItem("corral-token");
  app.token = "";
  showLogin("");
});

// -- the event stream ------------------------------------------------------------------

function follow() {
  if (app.stream) app.stream.close();
  const url = `/api/events/stream?token=${encodeURIComponent(app.token)}&after=${app.lastSeq}`;
  app.stream = new EventSource(url);
  app.stream.onmessage = null;
  const handle = (msg) => {
    const e = JSON.parse(msg.data);
    if (e.seq <= app.lastSeq) return;
    app.lastSeq = e.seq;
    onEvent(e);
  };
  for (const kind of ["environment", "transition", "task", "role", "call", "run", "lock", "token"]) {
    app.stream.addEventListener(kind, handle);
  }
}

let listRefresh = null;
function onEvent(e) {
  if (["environment", "transition", "run"].includes(e.kind) && !$("#list-view").hidden) {
    clearTimeout(listRefresh);
    listRefresh = setTimeout(loadList, 150);
  }
  if (app.env && e.env === app.env.id) envEvent(e);
}

// -- routing -----------------------------------------------------------------------------

function route() {
  for (const t of app.timers) clearInterval(t);
  app.timers = [];
  const m = location.hash.match(/^#\/env\/([\w-]+)/);
  $("#list-view").hidden = !!m;
  $("#env-view").hidden = !m;
  if (m) openEnv(m[1]);
  else {
    app.env = null;
    loadList();
  }
}
window.addEventListener("hashchange", () => app.me && route());

// -- the environment list --------------------------------------------------------------------

async function loadList() {
  const envs = await api("GET", "/api/environments");
  const body = $("#envs tbody");
  body.replaceChildren(
    ...envs.reverse().map((e) =>
      el("tr", { "data-env": e.id, onclick: () => (location.hash = `#/env/${e.id}`) },
        el("td", {}, e.id), el("td", {}, e.name), el("td", {}, badge(e.state)),
        el("td", {}, e.run_number ?? "-"),
        el("td", {}, Object.entries(e.tasks).map(([s, n]) => `${s}=${n}`).join(" ")),
        el("td", {}, e.created_by ?? "-"))));
}

$("#new-env").addEventListener("click", async () => {
  $("#create").hidden = false;
  const flows = await api("GET", "/api/workflows");
  const select = $("#workflow");
  select.replaceChildren(...flows.map((w) => el("option", { value: w.name }, w.name)));
  await loadPublic();
});
$("#workflow").addEventListener("change", loadPublic);
$("#create-cancel").addEventListener("click", () => ($("#create").hidden = true));

async function loadPublic() {
  const wf = await api("GET", `/api/workflows/${encodeURIComponent($("#workflow").value)}`);
  const box = $("#public-vars");
  const vars = [...wf.public].sort((a, b) => (a.index ?? 99) - (b.index ?? 99));
  box.replaceChildren(...vars.map((v) => {
    let input;
    if (v.widget === "checkBox" || v.type === "bool") {
      input = el("input", { type: "checkbox", name: v.name, "data-default": v.value });
      input.checked = v.value === "true";
    } else if (v.widget === "comboBox" && v.values.length) {
      input = el("select", { name: v.name, "data-default": v.value },
        ...v.values.map((x) => el("option", { value: x }, x)));
      input.value = v.value;
    } else {
      input = el("input", { type: "text", name: v.name, value: v.value, "data-default": v.value });
    }
    return el("label", {}, (v.label || v.name) + " ", input,
      el("span", { class: "help" }, v.description || ""));
  }));
}

$("#create-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const vars = {};
  for (const input of $("#public-vars").querySelectorAll("[name]")) {
    const value = input.type === "checkbox" ? String(input.checked) : input.value;
    if (value !== input.dataset.default) vars[input.name] = value;
  }
  $("#create-error").textContent = "";
  try {
    const env = await api("POST", "/api/environments", { workflow: $("#workflow").value, vars });
    $("#create").hidden = true;
    location.hash = `#/env/${env.id}`;
  } catch (e) {
    $("#create-error").textContent = e.message;
  }
});

// -- one environment ---------------------------------------------------------------------------

async function openEnv(id) {
  app.env = { id, tasks: new Map(), rows: new Map(), nodes: new Map(), selected: null };
  $("#env-error").textContent = "";
  $("#log").textContent = "";
  $("#log-task").textContent = "(click a task)";
  const [tasks, events] = await Promise.all([
    api("GET", `/api/tasks?env=${id}&limit=10000`),
    api("GET", `/api/events?env=${id}&limit=10000`),
  ]);
  for (const t of tasks) app.env.tasks.set(t.path, t);
  renderTasks();
  await loadEnv();
  $("#events").replaceChildren();
  for (const e of events.slice(-200)) logEvent(e);
  app.timers.push(setInterval(tailLog, 1500));
}

async function loadEnv() {
  const env = await api("GET", `/api/environments/${app.env.id}`);
  app.env.summary = env;
  $("#env-title").textContent = `${env.name} ${env.id}`;
  $("#env-state").replaceWith(Object.assign(badge(env.state), { id: "env-state" }));
  $("#env-run").textContent = env.run_number ? `run ${env.run_number}` : "";
  $("#env-busy").textContent = env.transitioning ? `${env.transitioning} …` : "";
  if (env.error) $("#env-error").textContent = env.error;
  renderControls(env);
  $("#roles").replaceChildren(...(env.roles || []).map((r) =>
    el("li", { style: `padding-left:${(r.path.split(".").length - 1) * 1.2}em`, "data-role": r.path },
      r.path.split(".").pop() + " ", badge(r.state), el("span", { class: "muted" }, ` ${r.tasks}`))));
  drawGraph(env.channels || []);
}

function renderControls(env) {
  const box = $("#controls");
  const events = env.controlled ? ALLOWED[env.state] || [] : [];
  box.replaceChildren(
    ...events.map((ev) => el("button", { "data-event": ev, onclick: () => control(ev) }, ev)),
    ...(env.controlled ? [el("button", { class: "danger", "data-event": "DESTROY", onclick: destroy }, "Destroy")] : []));
}

async function control(event) {
  $("#env-error").textContent = "";
  try {
    await api("POST", `/api/environments/${app.env.id}/transitions`, { event, wait: false });
    $("#env-busy").textContent = `${event} …`;
  } catch (e) {
    $("#env-error").textContent = e.message;
  }
}

async function destroy() {
  if (!confirm(`Destroy ${app.env.id}? Its processes are ended.`)) return;
  try {
    await api("DELETE", `/api/environments/${app.env.id}`);
    await loadEnv();
  } catch (e) {
    $("#env-error").textContent = e.message;
  }
}

function renderTasks() {
  const body = $("#tasks tbody");
  const rows = [];
  for (const t of app.env.tasks.values()) {
    const tr = el("tr", { "data-task": t.path, onclick: () => selectTask(t) });
    app.env.rows.set(t.path, tr);
    fillRow(tr, t);
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

function fillRow(tr, t) {
  tr.replaceChildren(el("td", {}, t.path), el("td", {}, t.node), el("td", {}, t.pid ?? "-"),
    el("td", {}, badge(t.state), t.reason ? el("span", { class: "muted" }, " " + t.reason) : ""),
    el("td", {}, t.critical ? "yes" : "no"), el("td", {}, clock(t.since)));
}

function setTask(path, fields) {
  const t = app.env.tasks.get(path);
  if (!t) return;
  Object.assign(t, fields);
  const tr = app.env.rows.get(path);
  if (tr) fillRow(tr, t);
  const node = app.env.nodes.get(path);
  if (node) node.querySelector("rect").setAttribute("fill", colour(t.state));
}

let envRefresh = null;
function envEvent(e) {
  logEvent(e);
  if (e.kind === "task" && Array.isArray(e.tasks)) {
    for (const path of e.tasks) setTask(path, { state: e.state, since: e.time, reason: e.reason ?? null });
  } else if (e.kind === "task" && e.task && !e.status) {
    setTask(e.task, { state: e.state, since: e.time, pid: e.pid, reason: e.reason ?? null });
  }
  if (["environment", "transition", "role", "run"].includes(e.kind)) {
    clearTimeout(envRefresh);
    envRefresh = setTimeout(() => loadEnv().then(refreshTasks), 100);
  }
}

async function refreshTasks() {
  const tasks = await api("GET", `/api/tasks?env=${app.env.id}&limit=10000`);
  for (const t of tasks) setTask(t.path, t);
}

function logEvent(e) {
  const what = e.kind === "task" && e.tasks ? `${e.state} ×${e.count} on ${e.node}`
    : e.kind === "task" ? `${e.task} ${e.status || e.state}${e.reason ? ": " + e.reason : ""}`
    : e.kind === "call" ? `${e.path} ${e.func} ${e.status}${e.error ? ": " + e.error : ""}`
    : e.kind === "transition" ? `${e.transition} ${e.step || ""} ${e.status}${e.error ? ": " + e.error : ""}`
    : e.kind === "role" ? `${e.role} ${e.state}`
    : `${e.state || e.status || ""}${e.error ? ": " + e.error : ""}`;
  const li = el("li", { "data-kind": e.kind }, `${clock(e.time)} ${e.kind} ${what}${e.actor ? " by " + e.actor : ""}`);
  const list = $("#events");
  list.append(li);
  while (list.children.length > 300) list.firstChild.remove();
  list.scrollTop = list.scrollHeight;
}

function selectTask(t) {
  app.env.selected = t;
  $("#log-task").textContent = t.path;
  tailLog();
}

async function tailLog() {
  const t = app.env && app.env.selected;
  if (!t) return;
  try {
    const r = await api("GET", `/api/tasks/${t.env}:${t.idx}/log?lines=200`);
    $("#log").textContent = r.lines.join("\n");
  } catch (e) {
    $("#log").textContent = e.message;
  }
}

// -- the dataflow graph: tasks as nodes, channels as edges, in layers from sources to sinks --

function colour(state) {
  return { RUNNING: "#0969da", CONFIGURED: "#1a7f37", STANDBY: "#1a7f37", ERROR: "#cf222e",
    LOST: "#cf222e", LAUNCHING: "#9a6700", PENDING: "#9a6700" }[state] || "#57606a";
}

function drawGraph(channels) {
  const svg = $("#graph");
  const NS = "http://www.w3.org/2000/svg";
  const mk = (tag, attrs) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    return n;
  };
  svg.replaceChildren();
  app.env.nodes = new Map();
  const tasks = [...app.env.tasks.values()];
  if (tasks.length > 300) {
    const t = mk("text", { x: 10, y: 20 });
    t.textContent = `${tasks.length} tasks: too many to draw`;
    svg.append(t);
    return;
  }
  const edges = channels.filter((c) => app.env.tasks.has(c.from) && app.env.tasks.has(c.to));
  const layer = new Map(tasks.map((t) => [t.path, 0]));
  for (let i = 0; i < tasks.length; i++) {
    let moved = false;
    for (const e of edges) {
      if (layer.get(e.to) < layer.get(e.from) + 1) { layer.set(e.to, layer.get(e.from) + 1); moved = true; }
    }
    if (!moved) break;
  }
  const columns = new Map();
  for (const t of tasks) {
    const l = layer.get(t.path);
    if (!columns.has(l)) columns.set(l, []);
    columns.get(l).push(t);
  }
  const W = 150, H = 34, GX = 60, GY = 14;
  const pos = new Map();
  let maxRows = 0;
  for (const [l, col] of columns) {
    maxRows = Math.max(maxRows, col.length);
    col.forEach((t, i) => pos.set(t.path, { x: 10 + l * (W + GX), y: 10 + i * (H + GY) }));
  }
  svg.setAttribute("viewBox", `0 0 ${20 + columns.size * (W + GX)} ${20 + maxRows * (H + GY)}`);
  const defs = mk("defs", {});
  const marker = mk("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto" });
  marker.append(mk("path", { d: "M0,0 L10,5 L0,10 z", fill: "#8c959f" }));
  defs.append(marker);
  svg.append(defs);
  for (const e of edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
    const path = mk("path", { class: "edge", d: `M${x1},${y1} C${x1 + GX / 2},${y1} ${x2 - GX / 2},${y2} ${x2},${y2}`, "data-edge": `${e.from}->${e.to}` });
    const title = mk("title", {});
    title.textContent = `${e.from_channel} → ${e.to_channel} (${e.type})${e.address ? " " + e.address : ""}`;
    path.append(title);
    svg.append(path);
  }
  for (const t of tasks) {
    const p = pos.get(t.path);
    const g = mk("g", { class: "node", "data-node": t.path, transform: `translate(${p.x},${p.y})` });
    g.append(mk("rect", { width: W, height: H, fill: colour(t.state) }));
    const label = mk("text", { x: 6, y: 21 });
    label.textContent = t.path.split(".").slice(-2).join(".").slice(0, 24);
    const title = mk("title", {});
    title.textContent = `${t.path} on ${t.node}: ${t.state}`;
    g.append(label, title);
    svg.append(g);
    app.env.nodes.set(t.path, g);
  }
}

// -- start -----------------------------------------------------------------------------------

if (app.token) login(app.token);
else showLogin("");
