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
const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "-");
const isOperator = () => !!app.me && ROLES.indexOf(app.me.role) >= 1;

const app = {
  token: localStorage.getItem("corral-token") || "",
  me: null,
  stream: null,
  lastSeq: 0,
  env: null, // the environment page's state
  job: null, // the job page's state
  services: null, // the services page's state
  view: null,
  timers: [],
};

async function api(method, path, body) {
  return (await request(method, path, body))[0];
}

// the answer's data and the response itself (for its headers)
async function request(method, path, body) {
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
  return [data, r];
}

// -- login -------------------------------------------------------------------------------

function showLogin(message) {
  $("#login").hidden = false;
  $("#app").hidden = true;
  $("#logout").hidden = true;
  $("#nav").hidden = true;
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
  $("#nav").hidden = false;
  $("#who").textContent = `${app.me.name} (${app.me.role})`;
  const operator = isOperator();
  document.querySelectorAll(".needs-operator").forEach((n) => (n.hidden = !operator));
  if (!app.lastSeq) { // follow from now: each page loads what is, the stream brings what changes
    try {
      const newest = await api("GET", "/api/events?last=true&limit=1");
      app.lastSeq = newest.length ? newest[0].seq : 0;
    } catch (e) {
      console.warn(e);
    }
  }
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
  for (const kind of ["environment", "transition", "task", "role", "call", "run", "lock", "token",
    "job", "units", "service"]) {
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
  if ((e.kind === "job" || e.kind === "units") && app.view === "jobs") refreshJobs();
  if ((e.kind === "job" || e.kind === "units") && app.job && e.job === app.job.id) refreshJob();
  if (e.kind === "service" && app.services) refreshServices();
}

// ``fn`` runs ``delay`` ms after it is first asked for, then at most once per ``gap()`` ms
// however often it is asked for (a burst of events makes one request), never two at once.
function throttled(fn, gap, delay = 120) {
  let timer = null, last = 0, running = false, again = false;
  const run = async () => {
    timer = null;
    if (running) { again = true; return; }
    running = true;
    last = Date.now();
    try { await fn(); } catch (e) { console.warn(e); }
    running = false;
    if (again) { again = false; ask(); }
  };
  const ask = () => {
    if (timer === null) timer = setTimeout(run, Math.max(delay, last + gap() - Date.now()));
  };
  return ask;
}

// -- routing -----------------------------------------------------------------------------

const VIEWS = { list: "#list-view", env: "#env-view", jobs: "#jobs-view", job: "#job-view",
  services: "#services-view" };
const NAV = { list: "envs", env: "envs", jobs: "jobs", job: "jobs", services: "services" };

function route() {
  for (const t of app.timers) clearInterval(t);
  app.timers = [];
  const h = location.hash;
  const env = h.match(/^#\/env\/([\w-]+)/);
  const job = h.match(/^#\/job\/([\w-]+)/);
  const view = env ? "env" : job ? "job" : /^#\/jobs\b/.test(h) ? "jobs"
    : /^#\/services\b/.test(h) ? "services" : "list";
  app.view = view;
  for (const [name, sel] of Object.entries(VIEWS)) $(sel).hidden = name !== view;
  document.querySelectorAll("#nav a").forEach((a) =>
    a.classList.toggle("current", a.dataset.nav === NAV[view]));
  if (view !== "env") app.env = null;
  if (view !== "job") app.job = null;
  if (view !== "services") app.services = null;
  if (view === "env") openEnv(env[1]);
  else if (view === "job") openJob(job[1]);
  else if (view === "jobs") openJobs();
  else if (view === "services") openServices();
  else loadList();
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
// The tasks are asked for a page at a time, filtered by the server (state, role, node): an
// environment of 150,000 tasks shows TASK_PAGE rows. The roles and the dataflow graph come
// from the role tree, aggregated per role by the server: never a DOM node per task.

const TASK_PAGE = 100;

async function openEnv(id) {
  const env = (app.env = { id, tasks: new Map(), rows: new Map(), nodes: new Map(), selected: null,
    filter: { state: "", role: "", node: "" }, offset: 0, asked: 0, total: 0, roles: [],
    rolesKey: null, liveFrom: null, started: null });
  env.refresh = throttled(async () => {
    await loadEnv();
    await loadTasks();
  }, () => 500, 100);
  env.refreshTasks = throttled(() => loadTasks(), () => 1000, 200);
  $("#env-view").removeAttribute("data-ready");
  $("#env-error").textContent = "";
  $("#log").textContent = "";
  $("#log-task").textContent = "(click a task)";
  $("#events").replaceChildren();
  $("#tasks tbody").replaceChildren();
  $("#tasks-range").textContent = "";
  syncFilters();
  let events = [];
  await Promise.all([
    api("GET", `/api/events?env=${encodeURIComponent(id)}&limit=100&last=true`).then((e) => (events = e)),
    loadEnv(),
    loadTasks(),
  ]);
  if (app.env !== env) return;
  // the history goes above what the stream brought meanwhile
  const anchor = $("#events").firstChild;
  for (const e of events) if (env.liveFrom === null || e.seq < env.liveFrom) logEvent(e, anchor);
  $("#env-view").dataset.ready = "true";
  $("#env-view").dataset.readyMs = String(Math.round(performance.now())); // since the page began
  app.timers.push(setInterval(tailLog, 1500));
}

async function loadEnv() {
  const env = app.env;
  if (!env) return;
  const data = await api("GET", `/api/environments/${encodeURIComponent(env.id)}?channels=false`);
  if (app.env !== env) return;
  env.summary = data;
  $("#env-title").textContent = `${data.name} ${data.id}`;
  $("#env-state").replaceWith(Object.assign(badge(data.state), { id: "env-state" }));
  $("#env-run").textContent = data.run_number ? `run ${data.run_number}` : "";
  $("#env-busy").textContent = data.transitioning ? `${data.transitioning} …` : "";
  $("#env-error").textContent = data.error || "";
  renderControls(data);
  env.roles = data.roles || [];
  renderRoles();
  fillFilters(data);
  drawGraph(env.roles, data.flows || []);
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
    await loadTasks();
  } catch (e) {
    $("#env-error").textContent = e.message;
  }
}

// -- the role tree: every role, its aggregated state and how many tasks it holds; a click
// shows that role's tasks -----------------------------------------------------------------------

const depthOf = (path) => path.split(".").length;
const parentOf = (path) => path.slice(0, Math.max(0, path.lastIndexOf(".")));

function renderRoles() {
  const env = app.env;
  $("#roles").replaceChildren(...env.roles.map((r) => {
    const li = el("li", { style: `padding-left:${(depthOf(r.path) - 1) * 1.2}em`, "data-role": r.path,
      title: `${r.path}: show its tasks`, onclick: () => setFilter({ role: r.path }) },
    r.path.split(".").pop() + " ", r.state ? badge(r.state) : el("span", { class: "muted" }, "(calls)"),
    r.state ? el("span", { class: "muted" }, ` ${r.tasks}`) : "",
    r.unlisted ? el("span", { class: "muted unlisted" }, ` (${r.unlisted} roles below)`) : "");
    if (r.path === env.filter.role) li.classList.add("selected");
    return li;
  }));
}

// -- the task table: a page of the environment's tasks, filtered ------------------------------

function fillFilters(data) {
  const env = app.env;
  const states = byState(Object.keys(data.tasks || {}));
  if (env.filter.state && !states.includes(env.filter.state)) states.push(env.filter.state);
  const stateSel = $("#task-state");
  const key = states.join();
  if (stateSel.dataset.key !== key) {
    stateSel.dataset.key = key;
    stateSel.replaceChildren(el("option", { value: "" }, "all"),
      ...states.map((s) => el("option", { value: s }, s)));
  }
  const rolesKey = env.roles.map((r) => r.path).join("\n");
  if (env.rolesKey !== rolesKey) {
    env.rolesKey = rolesKey;
    $("#task-role").replaceChildren(el("option", { value: "" }, "all"),
      ...env.roles.filter((r) => r.tasks > 0).map((r) =>
        el("option", { value: r.path }, "\u00a0\u00a0".repeat(depthOf(r.path) - 1) + r.path.split(".").pop())));
  }
  syncFilters();
}

function syncFilters() {
  const f = app.env.filter;
  $("#task-state").value = f.state;
  $("#task-role").value = f.role;
  if (document.activeElement !== $("#task-node")) $("#task-node").value = f.node;
}

function setFilter(change) {
  const env = app.env;
  if (!env) return;
  env.started = performance.now();
  Object.assign(env.filter, change);
  env.offset = 0;
  syncFilters();
  document.querySelectorAll("#roles li.selected").forEach((li) => li.classList.remove("selected"));
  if (env.filter.role) {
    const li = document.querySelector(`#roles li[data-role="${CSS.escape(env.filter.role)}"]`);
    if (li) li.classList.add("selected");
  }
  loadTasks();
}

$("#task-state").addEventListener("change", (ev) => setFilter({ state: ev.target.value }));
$("#task-role").addEventListener("change", (ev) => setFilter({ role: ev.target.value }));
$("#task-node").addEventListener("change", (ev) => setFilter({ node: ev.target.value.trim() }));
$("#tasks-clear").addEventListener("click", () => setFilter({ state: "", role: "", node: "" }));
$("#tasks-prev").addEventListener("click", () => page(-1));
$("#tasks-next").addEventListener("click", () => page(1));

function page(step) {
  const env = app.env;
  if (!env) return;
  env.started = performance.now();
  env.offset = Math.max(0, env.offset + step * TASK_PAGE);
  loadTasks();
}

function taskQuery(env) {
  const q = new URLSearchParams({ env: env.id, limit: TASK_PAGE, offset: env.offset });
  for (const k of ["state", "role", "node"]) if (env.filter[k]) q.set(k, env.filter[k]);
  return q;
}

async function loadTasks() {
  const env = app.env;
  if (!env) return;
  const q = taskQuery(env);
  const asked = ++env.asked;
  const [rows, r] = await request("GET", `/api/tasks?${q}`);
  if (app.env !== env || asked !== env.asked) return; // a newer question answers
  const total = Number(r.headers.get("X-Total-Count") ?? rows.length);
  if (!rows.length && env.offset > 0 && total > 0) { // the last page shrank
    env.offset = Math.floor((total - 1) / TASK_PAGE) * TASK_PAGE;
    return loadTasks();
  }
  env.total = total;
  env.tasks = new Map(rows.map((t) => [t.path, t]));
  renderTasks();
  $("#tasks-range").textContent = total
    ? `${env.offset + 1}–${env.offset + rows.length} of ${total.toLocaleString("en")}`
    : "no task matches";
  $("#tasks-prev").disabled = env.offset === 0;
  $("#tasks-next").disabled = env.offset + rows.length >= total;
  const table = $("#tasks");
  q.delete("env");
  q.delete("limit");
  table.dataset.query = q.toString();
  table.dataset.total = String(total);
  if (env.started !== null) {
    table.dataset.ms = String(Math.round(performance.now() - env.started));
    env.started = null;
  }
}

function renderTasks() {
  const env = app.env;
  env.rows = new Map();
  const rows = [];
  for (const t of env.tasks.values()) {
    const tr = el("tr", { "data-task": t.path, onclick: () => selectTask(t) });
    env.rows.set(t.path, tr);
    fillRow(tr, t);
    rows.push(tr);
  }
  $("#tasks tbody").replaceChildren(...rows);
}

function fillRow(tr, t) {
  tr.replaceChildren(el("td", {}, t.path), el("td", {}, t.node), el("td", {}, t.pid ?? "-"),
    el("td", {}, badge(t.state), t.reason ? el("span", { class: "muted" }, " " + t.reason) : ""),
    el("td", {}, t.critical ? "yes" : "no"), el("td", {}, clock(t.since)));
}

function setTask(path, fields) {
  const t = app.env.tasks.get(path);
  if (t) {
    Object.assign(t, fields);
    const tr = app.env.rows.get(path);
    if (tr) fillRow(tr, t);
  }
  const node = app.env.nodes.get(path); // a role of one task, drawn
  if (node && fields.state) paintRole(node, fields.state);
}

function envEvent(e) {
  const env = app.env;
  if (env.liveFrom === null) env.liveFrom = e.seq;
  logEvent(e);
  if (e.kind === "task" && Array.isArray(e.tasks)) {
    for (const path of e.tasks) setTask(path, { state: e.state, since: e.time, reason: e.reason ?? null });
  } else if (e.kind === "task" && e.task && !e.status) {
    setTask(e.task, { state: e.state, since: e.time, pid: e.pid, reason: e.reason ?? null });
  }
  if (e.kind === "task" && env.filter.state) env.refreshTasks(); // which tasks match changes
  if (["environment", "transition", "role", "run"].includes(e.kind)) env.refresh();
}

function logEvent(e, before = null) {
  const what = e.kind === "task" && e.tasks ? `${e.state} ×${e.count} on ${e.node}`
    : e.kind === "task" ? `${e.task} ${e.status || e.state}${e.reason ? ": " + e.reason : ""}`
    : e.kind === "call" ? `${e.path} ${e.func} ${e.status}${e.error ? ": " + e.error : ""}`
    : e.kind === "transition" ? `${e.transition} ${e.step || ""} ${e.status}${e.error ? ": " + e.error : ""}`
    : e.kind === "role" ? `${e.role} ${e.state}`
    : `${e.state || e.status || ""}${e.error ? ": " + e.error : ""}`;
  const li = el("li", { "data-kind": e.kind, "data-seq": e.seq }, `${clock(e.time)} ${e.kind} ${what}${e.actor ? " by " + e.actor : ""}`);
  const list = $("#events");
  list.insertBefore(li, before);
  while (list.children.length > 300) list.firstChild.remove();
  list.scrollTop = list.scrollHeight;
}

function selectTask(t) {
  app.env.selected = t;
  $("#log-task").textContent = t.path;
  $("#log").textContent = ""; // (another task's: start from its end)
  tailLog();
}

// A log panel shows its newest lines, and follows them while it is scrolled to its end
// (scrolled up to read, it stays where it is).
function showLog(box, text) {
  const atEnd = !box.textContent || box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  box.textContent = text;
  if (atEnd) box.scrollTop = box.scrollHeight;
}

async function tailLog() {
  const t = app.env && app.env.selected;
  if (!t) return;
  try {
    const r = await api("GET", `/api/tasks/${t.env}:${t.idx}/log?lines=200`);
    showLog($("#log"), r.lines.join("\n"));
  } catch (e) {
    $("#log").textContent = e.message;
  }
}

// -- the dataflow graph: roles as nodes, the channels between them as edges, in layers from
// sources to sinks. It collapses by role: the deepest level of the role tree with at most
// MAX_GRAPH_NODES roles holding tasks is drawn (a small environment: a node per task) ------------

const MAX_GRAPH_NODES = 40;

function colour(state) {
  return { RUNNING: "#0969da", CONFIGURED: "#1a7f37", STANDBY: "#1a7f37", DEPLOYED: "#1a7f37",
    ERROR: "#cf222e", LOST: "#cf222e", LAUNCHING: "#9a6700", PENDING: "#9a6700", MIXED: "#9a6700",
    SUCCEEDED: "#1a7f37", FAILED: "#cf222e", STARTING: "#9a6700", RETRYING: "#9a6700",
    ENDING: "#9a6700", FAILING: "#9a6700", EVICTING: "#9a6700", BLOCKED: "#8250df" }[state] || "#57606a";
}

// the roles drawn: at the deepest depth where the roles holding tasks are few enough, each
// role of that depth and each shallower one with no role listed below it
function graphRoles(roles) {
  const parents = new Set(roles.map((r) => parentOf(r.path)));
  const held = roles.filter((r) => r.tasks > 0);
  let deepest = 1;
  for (const r of held) deepest = Math.max(deepest, depthOf(r.path));
  for (let d = deepest; d >= 1; d--) {
    const pick = held.filter((r) => {
      const k = depthOf(r.path);
      return k === d || (k < d && !parents.has(r.path));
    });
    if (pick.length <= MAX_GRAPH_NODES || d === 1) return pick;
  }
  return [];
}

function paintRole(g, state) {
  g.setAttribute("data-state", state);
  g.querySelector("rect").setAttribute("fill", colour(state));
}

function drawGraph(roles, flows) {
  const env = app.env;
  const drawn = graphRoles(roles);
  const key = drawn.map((r) => r.path).join("\n") + "|" + flows.length;
  if (key === env.graphKey) { // the same shape: only the states change
    for (const r of drawn) {
      const g = env.nodes.get(r.path);
      if (g) {
        paintRole(g, r.state);
        g.querySelector("title").textContent = roleTitle(r);
      }
    }
    return;
  }
  env.graphKey = key;
  const svg = $("#graph");
  const NS = "http://www.w3.org/2000/svg";
  const mk = (tag, attrs) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    return n;
  };
  svg.replaceChildren();
  env.nodes = new Map();
  const shown = new Set(drawn.map((r) => r.path));
  const at = (path) => { // the drawn role a role counts in
    let p = path;
    while (p && !shown.has(p)) p = parentOf(p);
    return p || null;
  };
  const pairs = new Map();
  for (const f of flows) {
    const a = at(f.from), b = at(f.to);
    if (!a || !b || a === b) continue;
    const k = `${a}\n${b}`;
    const e = pairs.get(k) || { from: a, to: b, channels: 0, types: new Set() };
    e.channels += f.channels;
    for (const t of f.types) e.types.add(t);
    pairs.set(k, e);
  }
  const edges = [...pairs.values()];
  const layer = new Map(drawn.map((r) => [r.path, 0]));
  for (let i = 0; i < drawn.length; i++) { // longest path from a source (a cycle stops here)
    let moved = false;
    for (const e of edges) {
      if (layer.get(e.to) < layer.get(e.from) + 1) { layer.set(e.to, layer.get(e.from) + 1); moved = true; }
    }
    if (!moved) break;
  }
  const columns = new Map();
  for (const r of drawn) {
    const l = layer.get(r.path);
    if (!columns.has(l)) columns.set(l, []);
    columns.get(l).push(r);
  }
  const W = 190, H = 46, GX = 50, GY = 16;
  const pos = new Map();
  let maxRows = 0;
  for (const [l, col] of columns) {
    maxRows = Math.max(maxRows, col.length);
    col.forEach((r, i) => pos.set(r.path, { x: 10 + l * (W + GX), y: 10 + i * (H + GY) }));
  }
  const width = 20 + Math.max(1, columns.size) * (W + GX) - GX, height = 20 + maxRows * (H + GY) - GY;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", Math.max(height, 40));
  $("#graph-note").textContent = drawn.length && drawn.some((r) => r.tasks > 1)
    ? `(by role: ${drawn.length} roles)` : "";
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
    const types = [...e.types].sort().join(", ");
    title.textContent = `${e.from} → ${e.to}: ${e.channels} channel${e.channels === 1 ? "" : "s"} (${types})`;
    path.append(title);
    svg.append(path);
    if (e.channels > 1) {
      const label = mk("text", { class: "edge-label", x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 5, "text-anchor": "middle" });
      label.textContent = `×${e.channels.toLocaleString("en")}`;
      svg.append(label);
    }
  }
  for (const r of drawn) {
    const p = pos.get(r.path);
    const g = mk("g", { class: "node", "data-node": r.path, "data-tasks": r.tasks, transform: `translate(${p.x},${p.y})` });
    g.addEventListener("click", () => setFilter({ role: r.path }));
    g.append(mk("rect", { width: W, height: H }));
    const name = r.path.split(".").slice(-2).join(".");
    const label = mk("text", { x: 8, y: r.tasks > 1 ? 19 : 28 });
    label.textContent = name.length > 22 ? name.slice(0, 21) + "…" : name;
    g.append(label);
    if (r.tasks > 1) {
      const count = mk("text", { x: 8, y: 37, class: "count" });
      count.textContent = `${r.tasks.toLocaleString("en")} tasks`;
      g.append(count);
    }
    g.append(mk("title", {}));
    g.querySelector("title").textContent = roleTitle(r);
    paintRole(g, r.state);
    svg.append(g);
    env.nodes.set(r.path, g);
  }
}

function roleTitle(r) {
  return `${r.path}: ${r.state}, ${r.tasks} task${r.tasks === 1 ? "" : "s"} (click: its tasks)`;
}

// -- jobs ------------------------------------------------------------------------------------

const LIVE_JOB = ["QUEUED", "RUNNING"];
const FINAL_STEP = ["SUCCEEDED", "FAILED", "CANCELLED", "BLOCKED"];
const STATE_ORDER = ["RUNNING", "STARTING", "RETRYING", "ENDING", "FAILING", "EVICTING", "QUEUED",
  "SUCCEEDED", "FAILED", "BLOCKED", "CANCELLED", "LOST"];
const MAX_JOBS = 500; // rows of the job list
const MAX_DRAWN = 500; // steps drawn as a graph; above, a table of counts per state
const MAX_EDGES = 5000;
const MAX_STEP_ROWS = 500;

const byState = (states) => [...states].sort((a, b) =>
  ((STATE_ORDER.indexOf(a) + 1) || 99) - ((STATE_ORDER.indexOf(b) + 1) || 99) || a.localeCompare(b));

function counts(c) {
  const box = el("span", { class: "counts" });
  for (const s of byState(Object.keys(c || {}))) {
    if (c[s] > 0) box.append(el("span", { class: `state ${s}`, "data-count": s }, `${s} ${c[s]}`));
  }
  return box;
}

const refreshJobs = throttled(() => loadJobs(), () => 1000);
const refreshJob = throttled(() => loadJob(), () =>
  (app.job && app.job.data && app.job.data.units > MAX_DRAWN ? 1500 : 300));

async function openJobs() {
  $("#jobs-error").textContent = "";
  await Promise.all([loadJobs(), loadJobFiles()]);
}

async function loadJobs() {
  if (app.view !== "jobs") return;
  const jobs = await api("GET", "/api/jobs");
  if (app.view !== "jobs") return;
  jobs.sort((a, b) => (b.created || 0) - (a.created || 0));
  const shown = jobs.slice(0, MAX_JOBS);
  $("#jobs tbody").replaceChildren(...shown.map((j) =>
    el("tr", { "data-job": j.id, "data-state": j.state, onclick: () => (location.hash = `#/job/${j.id}`) },
      el("td", {}, el("a", { href: `#/job/${encodeURIComponent(j.id)}` }, j.id)),
      el("td", {}, j.name), el("td", {}, j.kind),
      el("td", {}, badge(j.state), j.reason ? el("span", { class: "muted" }, " " + j.reason) : ""),
      el("td", {}, counts(j.counts), el("span", { class: "muted" }, ` of ${j.units}`)),
      el("td", {}, j.owner ?? "-"), el("td", {}, when(j.created)))));
  $("#jobs-more").textContent = jobs.length > shown.length
    ? `the ${shown.length} newest of ${jobs.length} jobs` : "";
}

async function loadJobFiles() {
  if (!isOperator()) return;
  const files = await api("GET", "/api/job-files");
  const select = $("#job-file");
  const keep = select.value;
  select.replaceChildren(...files.map((f) => el("option", { value: f.file }, f.file)));
  if (files.some((f) => f.file === keep)) select.value = keep;
  $("#submit-job").disabled = files.length === 0;
}

$("#submit-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const file = $("#job-file").value;
  if (!file) return;
  $("#jobs-error").textContent = "";
  try {
    const r = await api("POST", "/api/jobs", { file });
    location.hash = r.kind === "service" ? "#/services" : `#/job/${r.id}`;
  } catch (e) {
    $("#jobs-error").textContent = e.message;
  }
});

// -- one job -----------------------------------------------------------------------------------

async function openJob(id) {
  app.job = { id, data: null, shape: null, nodes: new Map(), rows: new Map(), rowsKey: null,
    steps: new Map(), selected: null, logDone: false };
  $("#job-title").textContent = id;
  $("#job-state").replaceWith(Object.assign(el("span", { class: "state" }), { id: "job-state" }));
  for (const sel of ["#job-kind", "#job-reason", "#job-graph-note", "#job-log", "#steps-more"]) {
    $(sel).textContent = "";
  }
  $("#job-log-step").textContent = "(pick a step)";
  $("#job-counts").replaceChildren();
  $("#job-graph").replaceChildren();
  $("#job-steps tbody").replaceChildren();
  $("#job-summary tbody").replaceChildren();
  $("#step-filter").replaceChildren(el("option", { value: "" }, "all"));
  $("#job-stop").hidden = true;
  await loadJob();
  app.timers.push(setInterval(tailJobLog, 2000));
}

async function loadJob() {
  const j = app.job;
  if (!j) return;
  let data;
  try {
    data = await api("GET", `/api/jobs/${encodeURIComponent(j.id)}`);
  } catch (e) {
    if (app.job === j) $("#job-reason").textContent = e.message;
    return;
  }
  if (app.job !== j) return;
  j.data = data;
  const steps = data.steps || [];
  j.steps = new Map(steps.map((s) => [s.index, s]));
  $("#job-title").textContent = `${data.name} ${data.id}`;
  $("#job-state").replaceWith(Object.assign(badge(data.state), { id: "job-state" }));
  $("#job-kind").textContent = `${data.kind}, ${data.units} step${data.units === 1 ? "" : "s"}, ` +
    `priority ${data.priority_class}, by ${data.owner}, ${when(data.created)}`;
  $("#job-reason").textContent = data.reason || "";
  $("#job-counts").replaceChildren(counts(data.counts));
  $("#job-stop").hidden = !isOperator() || !LIVE_JOB.includes(data.state);
  drawJob(steps, data);
  renderSteps(steps, data);
}

$("#job-stop").addEventListener("click", async () => {
  const j = app.job;
  if (!j || !confirm(`Stop job ${j.id}? Its running steps are ended.`)) return;
  try {
    await api("DELETE", `/api/jobs/${encodeURIComponent(j.id)}`);
    await loadJob();
  } catch (e) {
    $("#job-reason").textContent = e.message;
  }
});

const stepName = (s) => s.name ?? `#${s.index}`;

function renderSteps(steps, data) {
  const j = app.job;
  const filter = $("#step-filter");
  const states = byState(new Set(steps.map((s) => s.state)));
  if ([...filter.options].map((o) => o.value).join() !== ["", ...states].join()) {
    const keep = filter.value;
    filter.replaceChildren(el("option", { value: "" }, "all"),
      ...states.map((s) => el("option", { value: s }, s)));
    filter.value = states.includes(keep) ? keep : "";
  }
  const wanted = filter.value ? steps.filter((s) => s.state === filter.value) : steps;
  const shown = wanted.slice(0, MAX_STEP_ROWS);
  const key = shown.map((s) => s.index).join(",");
  if (key !== j.rowsKey) {
    j.rowsKey = key;
    j.rows = new Map();
    $("#job-steps tbody").replaceChildren(...shown.map((s) => {
      const tr = el("tr", { "data-step": s.index, onclick: () => selectStep(s.index) });
      j.rows.set(s.index, tr);
      return tr;
    }));
  }
  for (const s of shown) fillStep(j.rows.get(s.index), s);
  const total = filter.value ? wanted.length : data.units;
  $("#steps-more").textContent = shown.length < total ? `(the first ${shown.length} of ${total})` : "";
}

$("#step-filter").addEventListener("change", () => {
  if (app.job && app.job.data) renderSteps(app.job.data.steps || [], app.job.data);
});

function fillStep(tr, s) {
  tr.setAttribute("data-state", s.state);
  tr.classList.toggle("selected", app.job.selected === s.index);
  const link = el("a", { href: "#", class: "log-link", onclick: (ev) => {
    ev.preventDefault();
    ev.stopPropagation();
    selectStep(s.index);
  } }, "log");
  tr.replaceChildren(el("td", {}, s.index), el("td", {}, stepName(s)), el("td", {}, badge(s.state)),
    el("td", {}, s.attempt ?? "-"), el("td", {}, s.node ?? "-"),
    el("td", { class: "reason" }, s.reason ?? ""), el("td", {}, link));
}

function selectStep(index) {
  const j = app.job;
  if (!j) return;
  const before = j.selected;
  j.selected = index;
  j.logDone = false;
  for (const i of [before, index]) {
    const s = j.steps.get(i);
    const tr = j.rows.get(i);
    if (s && tr) fillStep(tr, s);
    const g = j.nodes.get(i);
    if (g) g.classList.toggle("selected", i === index);
  }
  const s = j.steps.get(index);
  $("#job-log-step").textContent = s ? `${stepName(s)} (#${index})` : `#${index}`;
  $("#job-log").textContent = "";
  tailJobLog();
}

async function tailJobLog() {
  const j = app.job;
  if (!j || j.selected === null || j.logDone) return;
  const index = j.selected;
  const s = j.steps.get(index);
  const final = !!s && FINAL_STEP.includes(s.state);
  try {
    const r = await api("GET", `/api/jobs/${encodeURIComponent(j.id)}/log?index=${index}&lines=200`);
    if (app.job !== j || j.selected !== index) return;
    showLog($("#job-log"), r.lines.length ? r.lines.join("\n") : "(no output)");
    j.logDone = final; // what it wrote before it ended is all it writes
  } catch (e) {
    if (app.job === j && j.selected === index) $("#job-log").textContent = e.message;
  }
}

// -- a job's steps as a graph: layers from the steps that need none, each step right of what
// it needs; in a layer, a step sits near the steps it needs (one barycentre pass) ---------------

function drawJob(steps, data) {
  const j = app.job;
  const big = steps.length > MAX_DRAWN || data.units > MAX_DRAWN;
  $("#job-graph-box").hidden = big;
  $("#job-summary").hidden = !big;
  if (big) {
    j.shape = null;
    j.nodes = new Map();
    $("#job-graph").replaceChildren();
    $("#job-graph-note").textContent = `(${data.units} steps: more than ${MAX_DRAWN} are not drawn)`;
    $("#job-summary tbody").replaceChildren(
      ...byState(Object.keys(data.counts || {})).filter((s) => data.counts[s] > 0).map((s) =>
        el("tr", { "data-state": s }, el("td", {}, badge(s)), el("td", {}, data.counts[s]))),
      el("tr", { "data-state": "" }, el("td", {}, "all"), el("td", {}, data.units)));
    return;
  }
  const shape = steps.map((s) => `${s.index}:${(s.needs || []).join(",")}`).join(";");
  if (shape !== j.shape) {
    j.shape = shape;
    layoutJob(steps);
  }
  for (const s of steps) {
    const g = j.nodes.get(s.index);
    if (g) paintNode(g, s);
  }
}

function layoutJob(steps) {
  const j = app.job;
  const svg = $("#job-graph");
  const NS = "http://www.w3.org/2000/svg";
  const mk = (tag, attrs) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    return n;
  };
  svg.replaceChildren();
  j.nodes = new Map();
  const known = new Set(steps.map((s) => s.index));
  const needs = new Map(steps.map((s) =>
    [s.index, [...new Set(s.needs || [])].filter((d) => known.has(d) && d !== s.index)]));
  // layers: the longest path from a step that needs none (Kahn's order)
  const users = new Map();
  const waiting = new Map();
  for (const s of steps) {
    waiting.set(s.index, needs.get(s.index).length);
    for (const d of needs.get(s.index)) {
      if (!users.has(d)) users.set(d, []);
      users.get(d).push(s.index);
    }
  }
  const layer = new Map();
  const order = steps.filter((s) => waiting.get(s.index) === 0).map((s) => s.index);
  for (const i of order) layer.set(i, 0);
  for (let k = 0; k < order.length; k++) {
    const i = order[k];
    for (const u of users.get(i) || []) {
      layer.set(u, Math.max(layer.get(u) ?? 0, layer.get(i) + 1));
      waiting.set(u, waiting.get(u) - 1);
      if (waiting.get(u) === 0) order.push(u);
    }
  }
  const layers = [];
  for (const s of steps) {
    const l = layer.get(s.index) ?? 0; // (a cycle, which the API never gives, is not followed)
    (layers[l] ||= []).push(s);
  }
  const N = steps.length;
  const small = N <= 60;
  const W = small ? 140 : 96, H = small ? 28 : 18, GX = small ? 56 : 36, GY = small ? 12 : 6;
  const ROWS = small ? 20 : 40; // a layer taller than this wraps into more columns
  const font = small ? 11 : 9, chars = small ? 20 : 14;
  const pos = new Map();
  let x = 10, maxRows = 0;
  for (const col of layers) {
    if (!col) continue;
    const key = (s) => {
      const ds = needs.get(s.index).filter((d) => pos.has(d));
      return ds.length ? ds.reduce((a, d) => a + pos.get(d).y, 0) / ds.length : 0;
    };
    col.sort((a, b) => key(a) - key(b) || a.index - b.index);
    col.forEach((s, k) => {
      const row = k % ROWS;
      pos.set(s.index, { x: x + Math.floor(k / ROWS) * (W + 2 * GY), y: 10 + row * (H + GY) });
    });
    maxRows = Math.max(maxRows, Math.min(col.length, ROWS));
    x += Math.ceil(col.length / ROWS) * (W + 2 * GY) - 2 * GY + GX;
  }
  const width = x - GX + 10, height = 20 + maxRows * (H + GY) - GY;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const defs = mk("defs", {});
  const marker = mk("marker", { id: "job-arrow", viewBox: "0 0 10 10", refX: 10, refY: 5,
    markerWidth: 6, markerHeight: 6, orient: "auto" });
  marker.append(mk("path", { d: "M0,0 L10,5 L0,10 z", fill: "#8c959f" }));
  defs.append(marker);
  svg.append(defs);
  const edges = [];
  for (const s of steps) for (const d of needs.get(s.index)) edges.push([d, s.index]);
  if (edges.length <= MAX_EDGES) {
    for (const [from, to] of edges) {
      const a = pos.get(from), b = pos.get(to);
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
      svg.append(mk("path", { class: "edge", "data-edge": `${from}->${to}`,
        d: `M${x1},${y1} C${x1 + GX / 2},${y1} ${x2 - GX / 2},${y2} ${x2},${y2}` }));
    }
  } else {
    $("#job-graph-note").textContent = `(${edges.length} dependencies: not drawn)`;
  }
  for (const s of steps) {
    const p = pos.get(s.index);
    const g = mk("g", { class: "node", "data-step": s.index, transform: `translate(${p.x},${p.y})` });
    g.addEventListener("click", () => selectStep(s.index));
    g.append(mk("rect", { width: W, height: H }));
    const label = mk("text", { x: 5, y: H / 2 + font / 2 - 1, "font-size": font });
    const name = stepName(s);
    label.textContent = name.length > chars ? name.slice(0, chars - 1) + "…" : name;
    g.append(label, mk("title", {}));
    if (s.index === j.selected) g.classList.add("selected");
    svg.append(g);
    j.nodes.set(s.index, g);
  }
}

function paintNode(g, s) {
  g.setAttribute("data-state", s.state);
  g.querySelector("rect").setAttribute("fill", colour(s.state));
  g.querySelector("title").textContent = `${stepName(s)} (#${s.index}): ${s.state}` +
    `${s.node ? " on " + s.node : ""}${s.reason ? "\n" + s.reason : ""}`;
}

// -- services ------------------------------------------------------------------------------------

const refreshServices = throttled(() => loadServices(), () => 500);

async function openServices() {
  app.services = { cards: new Map(), unsettled: false };
  $("#services").replaceChildren();
  $("#services-error").textContent = "";
  await loadServices();
  // a replica's health changes without an event: while some replica is not yet (or no
  // longer) healthy, look again every 2 s; events bring the rest
  app.timers.push(setInterval(() => app.services && app.services.unsettled && refreshServices(), 2000));
}

async function loadServices() {
  const sv = app.services;
  if (!sv) return;
  let list, catalog;
  try {
    [list, catalog] = await Promise.all([api("GET", "/api/services"), api("GET", "/api/catalog")]);
  } catch (e) {
    if (app.services === sv) $("#services-error").textContent = e.message;
    return;
  }
  if (app.services !== sv) return;
  $("#services-error").textContent = "";
  $("#services-none").hidden = list.length > 0;
  const seen = new Set();
  let unsettled = false;
  for (const svc of list) {
    seen.add(svc.name);
    if (!sv.cards.has(svc.name)) sv.cards.set(svc.name, serviceCard(svc.name));
    if (!fillService(sv.cards.get(svc.name), svc, catalog[svc.name] || [])) unsettled = true;
  }
  sv.unsettled = unsettled;
  for (const [name, card] of sv.cards) {
    if (!seen.has(name)) {
      card.root.remove();
      sv.cards.delete(name);
    }
  }
  const box = $("#services");
  const roots = list.map((s) => sv.cards.get(s.name).root);
  if (roots.some((r, i) => box.children[i] !== r)) box.append(...roots); // (moves only if the order changed)
}

function serviceCard(name) {
  const c = { name };
  c.state = el("span", { class: "state" });
  c.info = el("span", { class: "muted" });
  c.input = el("input", { type: "number", min: 0, max: 10000, step: 1, class: "scale-input",
    "aria-label": `replicas of ${name}` });
  c.input.addEventListener("input", () => (c.input.dataset.dirty = "1"));
  c.button = el("button", { class: "scale-button", onclick: () => scale(c) }, "Scale");
  const controls = el("span", { class: "scale" }, "replicas ", c.input, " ", c.button);
  controls.hidden = !isOperator();
  c.reason = el("p", { class: "error svc-reason" });
  c.error = el("p", { class: "error svc-error" });
  c.endpoints = el("p", { class: "muted svc-endpoints" });
  c.tbody = el("tbody");
  c.root = el("section", { class: "card service", "data-service": name },
    el("div", { class: "row" }, el("h3", {}, name), c.state, c.info, controls),
    c.reason, c.error, c.endpoints,
    el("table", { class: "members" },
      el("thead", {}, el("tr", {}, ...["slot", "replica", "version", "state", "health", "restarts",
        "node", "address", "pid", "reason"].map((h) => el("th", {}, h)))),
      c.tbody));
  return c;
}

// healthy | unhealthy | pending | stopping: a running replica is healthy when it passes its
// checks, or when the catalog lists it (a service without checks)
function health(m, endpoints) {
  if (m.state === "STOPPING") return "stopping";
  if (m.state !== "RUNNING") return "pending";
  const listed = endpoints.some((e) => e.slot === m.slot && e.version === m.version && e.node === m.node);
  if (m.healthy || listed) return "healthy";
  return m.reason ? "unhealthy" : "pending";
}

// fills a service's card; true when the service is settled (every replica running, healthy)
function fillService(c, svc, endpoints) {
  const state = Object.assign(badge(svc.state), { className: `state ${svc.state} svc-state` });
  c.state.replaceWith(state);
  c.state = state;
  const members = svc.members || [];
  const healths = members.map((m) => health(m, endpoints));
  const healthy = healths.filter((h) => h === "healthy").length;
  c.info.textContent = `${healthy} of ${svc.replicas} healthy, version ${svc.version}, ` +
    `owner ${svc.owner ?? "-"}${svc.protected ? ", protected" : ""}`;
  c.reason.textContent = svc.reason || "";
  c.endpoints.textContent = endpoints.length
    ? "endpoints: " + endpoints.map((e) => `${e.address}:${e.port ?? "-"}`).join(", ") : "";
  if (document.activeElement !== c.input && !c.input.dataset.dirty) c.input.value = svc.replicas;
  c.tbody.replaceChildren(...members.map((m, i) =>
    el("tr", { "data-slot": m.slot, "data-replica": m.replica },
      el("td", {}, m.slot), el("td", {}, m.replica), el("td", {}, m.version), el("td", {}, badge(m.state)),
      el("td", {}, el("span", { class: `state ${healths[i]}`, "data-health": healths[i] }, healths[i])),
      el("td", {}, m.restarts), el("td", {}, m.node ?? "-"),
      el("td", {}, m.address && m.ports && m.ports.length
        ? m.ports.map((p) => `${m.address}:${p}`).join(", ") : m.address ?? "-"),
      el("td", {}, m.pid ?? "-"), el("td", {}, m.reason ?? ""))));
  return svc.state === "RUNNING" && members.length === svc.replicas && healthy === svc.replicas;
}

async function scale(c) {
  const n = Number(c.input.value);
  c.error.textContent = "";
  if (c.input.value === "" || !Number.isInteger(n) || n < 0) {
    c.error.textContent = "replicas: a whole number, 0 or more";
    return;
  }
  try {
    await api("POST", `/api/services/${encodeURIComponent(c.name)}/scale`, { replicas: n });
    delete c.input.dataset.dirty;
    if (app.services) app.services.unsettled = true;
    refreshServices();
  } catch (e) {
    c.error.textContent = e.message;
  }
}

// -- start -----------------------------------------------------------------------------------

if (app.token) login(app.token);
else showLogin("");
