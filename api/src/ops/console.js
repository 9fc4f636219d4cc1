"use strict";
const $ = (id) => document.getElementById(id);
const state = { kind: null, status: "", filter: "", start: 0, limit: 50, total: 0, actor: null };

function text(v) { return v === null || v === undefined ? "" : String(v); }
function ms(v) { if (v === null || v === undefined) return ""; return v < 1000 ? v + " ms" : (v / 1000).toFixed(1) + " s"; }
function ago(unixMs) { return unixMs ? ms(Date.now() - unixMs) + " ago" : ""; }
function cell(tr, value, cls) { const td = document.createElement("td"); td.textContent = text(value); if (cls) td.className = cls; tr.appendChild(td); return td; }
function fill(tableId, rows, render) {
  const body = $(tableId).querySelector("tbody");
  body.textContent = "";
  for (const row of rows) { const tr = document.createElement("tr"); render(tr, row); body.appendChild(tr); }
}

async function api(path, options) {
  const request = Object.assign({ credentials: "same-origin" }, options || {});
  // The server takes a change made with the console's cookie only with this header.
  request.headers = Object.assign({ "X-Strato-Console": "1" }, request.headers || {});
  const response = await fetch(path, request);
  if (response.status === 401) { showLogin(); throw new Error("not logged in"); }
  const body = await response.json();
  if (!response.ok) throw new Error((body.error && body.error.description) || response.statusText);
  return body;
}

function showLogin() { $("login").classList.remove("hidden"); $("nav").classList.add("hidden"); for (const v of document.querySelectorAll(".view")) v.classList.add("hidden"); }

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("login-error").textContent = "";
  const response = await fetch("/console/login", { method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ accountName: $("account").value, password: $("password").value }) });
  if (!response.ok) { const b = await response.json(); $("login-error").textContent = b.error ? b.error.description : "refused"; return; }
  start();
});

function show(view) {
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("on", a.dataset.view === view);
  for (const v of document.querySelectorAll(".view")) v.classList.toggle("hidden", v.id !== "view-" + view);
}
for (const a of document.querySelectorAll("#nav a")) a.addEventListener("click", () => show(a.dataset.view));

async function loadTree() {
  const tree = await api("/debug/tree");
  fill("kinds", tree.kinds, (tr, k) => {
    const a = cell(tr, k.kind); a.innerHTML = ""; const link = document.createElement("a"); link.className = "link"; link.dataset.kind = k.kind; link.textContent = k.kind;
    link.addEventListener("click", () => { state.kind = k.kind; $("kind-select").value = k.kind; state.start = 0; loadActors(); }); a.appendChild(link);
    cell(tr, k.supervisor); cell(tr, k.resources); cell(tr, k.live);
    cell(tr, Object.entries(k.byStatus).map(([s, n]) => s + " " + n).join(", "));
    cell(tr, k.restarts);
    cell(tr, k.queues.map((q) => q.name + " " + q.running + "/" + q.pending + " (" + q.level + ")").join(", "));
  });
  const select = $("kind-select");
  if (!select.options.length) {
    for (const k of tree.kinds) { const o = document.createElement("option"); o.textContent = k.kind; select.appendChild(o); }
    state.kind = tree.kinds.length ? tree.kinds.find((k) => k.kind === "vm") ? "vm" : tree.kinds[0].kind : null;
    select.value = state.kind;
  }
}

async function loadActors() {
  if (!state.kind) return;
  const params = new URLSearchParams({ kind: state.kind, start: state.start, limit: state.limit });
  if (state.status) params.set("status", state.status);
  if (state.filter) params.set("filter", state.filter);
  const page = await api("/debug/actors?" + params);
  state.total = page.total;
  $("page").textContent = page.total ? (state.start + 1) + "-" + (state.start + page.actors.length) + " of " + page.total : "none";
  fill("actors", page.actors, (tr, a) => {
    tr.dataset.uuid = a.uuid;
    const td = cell(tr, ""); const link = document.createElement("a"); link.className = "link mono"; link.textContent = a.uuid;
    link.addEventListener("click", () => { state.actor = { kind: a.kind, uuid: a.uuid }; loadActor(); }); td.appendChild(link);
    cell(tr, a.name); cell(tr, a.status, a.status); cell(tr, a.running); cell(tr, a.pending); cell(tr, a.restarts); cell(tr, a.lastError);
  });
}

async function act(action, args, question) {
  if (!window.confirm(question)) return;
  try { await api("/debug/actions/" + action, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(args) }); }
  catch (e) { window.alert(e.message); }
  refresh();
}

async function loadActor() {
  if (!state.actor) return;
  const a = await api("/debug/actors/" + state.actor.kind + "/" + state.actor.uuid);
  $("actor").classList.remove("hidden");
  $("actor-title").textContent = a.kind + " " + a.uuid + " — " + a.status;
  $("actor-title").className = a.status;
  const actions = $("actor-actions"); actions.textContent = "";
  if (a.actor) {
    const restart = document.createElement("button"); restart.id = "restart-actor"; restart.textContent = "Restart actor";
    restart.addEventListener("click", () => act("restart", { kind: a.kind, uuid: a.uuid }, "Restart " + a.kind + " " + a.uuid + "?"));
    actions.appendChild(restart);
  }
  const actor = a.actor || { queues: [], running: [], pending: [], recent: [], restart_log: [] };
  fill("blocking", a.blocking, (tr, b) => {
    cell(tr, b.queue); cell(tr, b.level);
    cell(tr, b.holding.map((o) => o.name + " (" + text(o.job_id) + ", " + ms(o.age_ms) + ")").join("; "));
    cell(tr, b.waiting.map((o) => o.name + " (" + ms(o.age_ms) + ")").join("; "));
  });
  fill("queues", actor.queues, (tr, q) => {
    cell(tr, q.name); cell(tr, q.level); cell(tr, q.running); cell(tr, q.pending); cell(tr, ms(q.oldest_pending_ms));
    // A prompt, not an input in the table: the live view redraws the table every second.
    const td = cell(tr, q.serial ? "serial" : "");
    if (q.serial) return;
    const set = document.createElement("button"); set.textContent = "Set level…"; set.className = "set-level"; set.dataset.queue = q.name;
    set.addEventListener("click", () => {
      const level = window.prompt("New level of queue " + q.name + " for every " + a.kind, String(q.level));
      if (level === null) return;
      act("queue-level", { kind: a.kind, queue: q.name, level: Number(level) }, "Set the level of queue " + q.name + " of every " + a.kind + " to " + level + "?");
    });
    td.appendChild(set);
  });
  fill("running", actor.running, (tr, o) => { cell(tr, o.queue); cell(tr, o.name); cell(tr, o.job_id, "mono"); cell(tr, ms(o.age_ms)); cell(tr, ms(o.deadline_unix_ms - Date.now())); });
  fill("recent", (actor.recent || []).slice().reverse(), (tr, o) => {
    cell(tr, o.queue); cell(tr, o.name); cell(tr, o.job_id, "mono");
    const result = typeof o.result === "string" ? o.result : Object.keys(o.result)[0] + ": " + Object.values(o.result)[0];
    cell(tr, result, typeof o.result === "string" ? "" : "failed"); cell(tr, ms(Math.round(o.duration_us / 1000)));
  });
  fill("restarts", actor.restart_log || [], (tr, r) => { cell(tr, new Date(r.at_unix_ms).toISOString()); cell(tr, r.reason, "failed"); });
  $("record").textContent = JSON.stringify(a.record, null, 2);
}

function renderSummary(s) {
  fill("flows", s.flowsInProgress, (tr, f) => { cell(tr, f.chain); cell(tr, f.phase, f.phase); cell(tr, f.current_step); cell(tr, f.job_id, "mono"); cell(tr, ms(f.age_ms)); });
  fill("recent-flows", s.recentFlows.slice().reverse(), (tr, f) => {
    cell(tr, f.chain); cell(tr, f.phase, f.phase); cell(tr, f.failure ? f.failure[0] : ""); cell(tr, f.failure ? f.failure[1] : ""); cell(tr, f.job_id, "mono"); cell(tr, ms(f.age_ms));
  });
  fill("gc", s.gcJobs, (tr, j) => {
    cell(tr, j.name); cell(tr, j.kind); cell(tr, JSON.stringify(j.trigger)); cell(tr, j.attempts); cell(tr, new Date(j.next_run_unix_ms).toISOString()); cell(tr, j.last_error, j.last_error ? "failed" : "");
    const td = cell(tr, "");
    const run = document.createElement("button"); run.textContent = "Run now"; run.addEventListener("click", () => act("gc-run", { id: j.id }, "Run GC job " + j.name + " now?"));
    const cancel = document.createElement("button"); cancel.textContent = "Cancel"; cancel.addEventListener("click", () => act("gc-cancel", { id: j.id }, "Cancel GC job " + j.name + "?"));
    td.appendChild(run); td.appendChild(cancel);
  });
  fill("hosts", s.hosts, (tr, h) => {
    cell(tr, h.host, "mono"); cell(tr, h.connected ? "Connected" : "Disconnected", h.connected ? "Active" : "Failed");
    cell(tr, h.rttUs === null ? "" : (h.rttUs / 1000).toFixed(2) + " ms"); cell(tr, ago(h.lastHeartbeatUnixMs)); cell(tr, Math.max(0, h.connects - 1));
  });
}

async function refresh() {
  try { await loadTree(); await loadActors(); await loadActor(); } catch (e) { /* shown by api() */ }
}

let events = null;
function start() {
  $("login").classList.add("hidden"); $("nav").classList.remove("hidden"); show("tree");
  refresh();
  if (events) events.close();
  events = new EventSource("/debug/events");
  events.addEventListener("summary", (e) => {
    const s = JSON.parse(e.data);
    $("live").textContent = "live · " + new Date(s.takenUnixMs).toLocaleTimeString();
    renderSummary(s);
    refresh();
  });
  events.onerror = () => { $("live").textContent = "reconnecting…"; };
}

$("kind-select").addEventListener("change", (e) => { state.kind = e.target.value; state.start = 0; loadActors(); });
$("status-select").addEventListener("change", (e) => { state.status = e.target.value; state.start = 0; loadActors(); });
$("search").addEventListener("click", () => { state.filter = $("filter").value.trim(); state.start = 0; loadActors(); });
$("prev").addEventListener("click", () => { state.start = Math.max(0, state.start - state.limit); loadActors(); });
$("next").addEventListener("click", () => { if (state.start + state.limit < state.total) { state.start += state.limit; loadActors(); } });

api("/debug/tree").then(start).catch(showLogin);
