// The Gantry dashboard: one page that routes itself by path under /ui and reads everything from
// this coordinator's API with the token the user signed in with (kept in session storage, sent
// as a bearer token). No framework and nothing fetched from elsewhere: it works offline.
"use strict";

const TOKEN_KEY = "gantry.token";
const REFRESH_MS = 10000;
const PALETTE = ["#2457c5", "#d1495b", "#2a9d8f", "#e9a03b", "#7b5ea7", "#5c8001", "#c25e9f", "#3d5a80"];

// An element: h("td", {class: "num"}, "3"). Text is always set as text, never parsed as HTML.
function h(tag, attrs, ...children) {
  const svg = ["svg", "polyline", "line", "text", "g", "rect", "title"].includes(tag);
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, asText) {
  const response = await fetch(path, { headers: { Authorization: "Bearer " + token() } });
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { const body = await response.json(); message = body.error.message; } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, message);
  }
  return asText ? response.text() : response.json();
}

const fmt = {
  bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  },
  time(ms) { return ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) + "Z" : "-"; },
  clock(ms) { return new Date(ms).toISOString().slice(11, 16); },
  money(x) { return x.toFixed(x < 10 ? 4 : 2); },
  number(x, digits) { return Number(x).toFixed(digits === undefined ? 1 : digits); },
  ago(ms) { return ms === null || ms === undefined ? "-" : (ms / 1000).toFixed(1) + " s ago"; },
};

function state(text) { return h("span", { class: "state state-" + text }, text); }

function table(headers, rows, attrs) {
  return h("table", attrs || {},
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { class: x.endsWith("#") ? "num" : null }, x.replace(/#$/, ""))))),
    h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c, i) =>
      h("td", { class: headers[i].endsWith("#") ? "num" : null }, c))))));
}

function card(value, label) {
  return h("div", { class: "card" }, h("div", { class: "value" }, value), h("div", { class: "label" }, label));
}

// ----- pages -----

async function fleetPage() {
  const nodes = await api("/v1/nodes");
  const sites = new Map();
  for (const n of nodes) {
    const s = sites.get(n.site) || { kind: n.site_kind, nodes: 0, ready: 0, gpus: 0, cpus: 0, memory: 0, cost: 0 };
    s.nodes++;
    if (n.status === "ready") s.ready++;
    s.gpus += n.gpus.length;
    s.cpus += n.cpu_cores;
    s.memory += n.memory_bytes;
    s.cost += n.gpus.length * n.cost_per_gpu_hour + n.cpu_cores * n.cost_per_cpu_hour;
    sites.set(n.site, s);
  }
  const ready = nodes.filter((n) => n.status === "ready").length;
  const gpus = nodes.reduce((sum, n) => sum + n.gpus.length, 0);
  const cpus = nodes.reduce((sum, n) => sum + n.cpu_cores, 0);
  return [
    h("h1", {}, "Fleet"),
    h("div", { class: "cards" },
      card(sites.size, "sites"), card(ready + " / " + nodes.length, "nodes ready"),
      card(gpus, "GPUs"), card(cpus, "CPU cores")),
    h("h2", {}, "Sites"),
    table(["Site", "Kind", "Nodes#", "Ready#", "GPUs#", "CPU cores#", "Memory#", "Capacity cost / hour#"],
      [...sites.entries()].map(([name, s]) => [name, s.kind, s.nodes, s.ready, s.gpus, s.cpus, fmt.bytes(s.memory), fmt.money(s.cost)]),
      { id: "sites" }),
    h("h2", {}, "Nodes"),
    nodes.length === 0 ? h("p", { class: "muted" }, "No agent has joined yet: see `gantry token create --role agent`.") :
      table(["Node", "Site", "Status", "CPU cores#", "Memory#", "GPUs", "Runtimes", "GPU / hour#", "CPU / hour#", "Last heard#"],
        nodes.map((n) => [
          h("span", { title: n.id }, n.name), n.site, state(n.status), n.cpu_cores, fmt.bytes(n.memory_bytes),
          n.gpus.length === 0 ? "-" : n.gpus.length + " x " + [...new Set(n.gpus.map((g) => g.model))].join(", "),
          n.runtimes.join(", "), fmt.money(n.cost_per_gpu_hour), fmt.money(n.cost_per_cpu_hour), fmt.ago(n.last_heard_ms_ago),
        ]), { id: "nodes" }),
  ];
}

async function jobsPage(params) {
  const jobs = await api("/v1/jobs");
  const wanted = params.get("state") || "";
  const shown = jobs.filter((j) => !wanted || j.state === wanted)
    .sort((a, b) => b.submitted_at_unix_ms - a.submitted_at_unix_ms);
  const counts = {};
  for (const j of jobs) counts[j.state] = (counts[j.state] || 0) + 1;
  const filter = h("select", {
    id: "state-filter",
    onchange: (event) => { location.search = event.target.value ? "?state=" + event.target.value : ""; },
  }, h("option", { value: "" }, "every state (" + jobs.length + ")"),
  ["pending", "running", "succeeded", "failed", "cancelled"].map((s) =>
    h("option", { value: s, selected: s === wanted }, s + " (" + (counts[s] || 0) + ")")));
  return [
    h("h1", {}, "Jobs"),
    h("div", { class: "controls" }, h("label", { for: "state-filter" }, "Show"), filter),
    shown.length === 0 ? h("p", { class: "muted" }, "No jobs" + (wanted ? " " + wanted : "") + ".") :
      table(["Job", "Name", "Team", "Kind", "State", "Progress#", "Allocations#", "Submitted"],
        shown.map((j) => [
          h("a", { href: "/ui/jobs/" + encodeURIComponent(j.id) }, j.id), j.name, j.team, j.kind, state(j.state),
          j.progress.succeeded + " / " + j.progress.total, j.allocations.length, fmt.time(j.submitted_at_unix_ms),
        ]), { id: "jobs" }),
  ];
}

async function jobPage(id) {
  const [job, nodes] = await Promise.all([api("/v1/jobs/" + encodeURIComponent(id)), api("/v1/nodes")]);
  // Allocations name their agent and the node within it; people know nodes by name.
  const nodeNames = new Map(nodes.map((n) => [n.agent + "/" + n.node, n.name]));
  const spec = job.spec || {};
  const resources = spec.resources || {};
  const inputs = job.inputs || [], artifacts = job.artifacts || [];
  const parts = [
    h("h1", {}, "Job " + job.name + " ", h("span", { class: "muted" }, job.id)),
    h("div", { class: "cards" },
      card(state(job.state), "state"), card(job.kind, "kind"), card(job.team, "team"),
      card(job.progress.succeeded + " / " + job.progress.total, "units succeeded"),
      card(job.restarts, "gang restarts"), card(job.generation, "spec generation")),
    table(["Submitted", "By", "Image", "Command", "Resources per unit"], [[
      fmt.time(job.submitted_at_unix_ms), job.submitted_by, spec.image || "(plain process)",
      (spec.command || []).join(" "),
      (resources.gpus || 0) + " GPU, " + (resources.cpus || 0) + " CPU, " + (resources.memory || "-") + " memory",
    ]], { id: "job-summary" }),
  ];
  if (job.failure) parts.push(h("p", { class: "error", id: "failure" }, "Failed: " + job.failure));
  if (job.state === "pending") {
    try {
      const explain = await api("/v1/jobs/" + encodeURIComponent(id) + "/explain");
      if (explain.units.length > 0) {
        parts.push(h("h2", {}, "Why it waits"), table(["Unit#", "Reason", "Nodes#"],
          explain.units.map((u) => [u.unit, u.reason, u.nodes_total]), { id: "explain" }));
      }
    } catch (_) { /* explain is a hint; the page stands without it */ }
  }
  parts.push(h("h2", {}, "Allocations"), job.allocations.length === 0 ? h("p", { class: "muted" }, "None yet.") :
    table(["Allocation", "Unit#", "Attempt#", "Node", "State", "Exit#", "Reason", "Image", "Started", "Ended"],
      job.allocations.map((a) => [a.id, a.unit, a.attempt, nodeNames.get(a.agent + "/" + a.node) || a.node, state(a.state),
        a.exit_code === null || a.exit_code === undefined ? "-" : a.exit_code, a.reason || "-", a.image || "-",
        fmt.time(a.started_at_unix_ms), fmt.time(a.ended_at_unix_ms)]), { id: "allocations" }));
  if (artifacts.length > 0 || inputs.length > 0) {
    parts.push(h("h2", {}, "Artifacts"), table(["Direction", "Name", "sha256", "Size#"], [
      ...inputs.map((x) => ["in (from " + x.job + ")", x.name, x.sha256, fmt.bytes(x.size_bytes)]),
      ...artifacts.map((x) => ["out", x.name, x.sha256, fmt.bytes(x.size_bytes)]),
    ], { id: "artifacts" }));
  }
  parts.push(h("h2", {}, "Logs"));
  if (job.allocations.length === 0) {
    parts.push(h("p", { class: "muted" }, "No output until a unit is placed."));
  } else {
    try {
      const text = await api("/v1/jobs/" + encodeURIComponent(id) + "/logs", true);
      const LIMIT = 64 * 1024;
      parts.push(h("pre", { class: "logs", id: "logs" }, text.length > LIMIT ? "...\n" + text.slice(-LIMIT) : text || "(no output yet)"));
    } catch (error) {
      parts.push(h("p", { class: "error", id: "logs-error" }, "Logs unavailable: " + error.message));
    }
  }
  return parts;
}

// A line plot of several series over the usage window, as SVG.
function plot(id, caption, unit, series, usage) {
  const W = 560, H = 200, left = 52, right = 10, top = 10, bottom = 24;
  const max = Math.max(1e-9, ...series.flatMap((s) => s.values));
  const x = (i) => left + (usage.steps <= 1 ? 0 : (i / (usage.steps - 1)) * (W - left - right));
  const y = (v) => top + (1 - v / max) * (H - top - bottom);
  const svg = h("svg", { class: "plot", viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img", "aria-label": caption },
    h("line", { class: "axis", x1: left, y1: H - bottom, x2: W - right, y2: H - bottom }),
    h("line", { class: "axis", x1: left, y1: top, x2: left, y2: H - bottom }),
    h("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, fmt.number(max, max < 10 ? 2 : 0)),
    h("text", { x: left - 4, y: H - bottom, "text-anchor": "end" }, "0"),
    h("text", { x: left, y: H - 6 }, fmt.clock(usage.start_unix_ms)),
    h("text", { x: W - right, y: H - 6, "text-anchor": "end" }, fmt.clock(usage.start_unix_ms + usage.steps * usage.step_ms)),
    h("text", { x: (left + W) / 2, y: H - 6, "text-anchor": "middle" }, unit));
  series.forEach((s, n) => {
    const points = s.values.map((v, i) => x(i).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
    svg.append(h("polyline", { class: "series", "data-series": s.name, points, fill: "none",
      stroke: PALETTE[n % PALETTE.length], "stroke-width": 2 }, h("title", {}, s.name)));
  });
  const legend = h("div", { class: "legend" }, series.map((s, n) => {
    const item = h("span", {}, s.name);
    item.style.setProperty("--swatch", PALETTE[n % PALETTE.length]);
    return item;
  }));
  return h("figure", { id }, h("figcaption", {}, caption), series.length ? svg : h("p", { class: "muted" }, "Nothing yet."), legend);
}

const sum = (xs) => xs.reduce((a, b) => a + b, 0);

async function usagePage(params) {
  const windowS = Number(params.get("window") || 3600);
  const usage = await api("/v1/usage?window=" + encodeURIComponent(windowS));
  const stepS = usage.step_ms / 1000;
  const teams = Object.entries(usage.teams);
  const sites = Object.entries(usage.sites);
  const choose = h("select", {
    id: "window", onchange: (event) => { location.search = "?window=" + event.target.value; },
  }, [[900, "15 minutes"], [3600, "1 hour"], [6 * 3600, "6 hours"], [86400, "1 day"], [7 * 86400, "7 days"], [30 * 86400, "30 days"]]
    .map(([value, label]) => h("option", { value, selected: value === windowS }, label)));
  return [
    h("h1", {}, "Usage and cost"),
    h("div", { class: "controls" }, h("label", { for: "window" }, "Over the last"), choose,
      h("span", { class: "muted" }, usage.steps + " steps of " + stepS + " s; cost at each node's prices; idle cost is capacity not in use")),
    h("div", { class: "plots" },
      plot("plot-gpu-util-site", "GPU utilisation by site", "% of the site's GPUs",
        sites.filter(([, s]) => s.gpus > 0).map(([name, s]) => ({ name, values: s.gpu_seconds.map((v) => (100 * v) / (s.gpus * stepS)) })), usage),
      plot("plot-cpu-util-site", "CPU utilisation by site", "% of the site's cores",
        sites.filter(([, s]) => s.cpus > 0).map(([name, s]) => ({ name, values: s.cpu_seconds.map((v) => (100 * v) / (s.cpus * stepS)) })), usage),
      plot("plot-gpus-team", "GPUs in use by team", "GPUs (mean over the step)",
        teams.map(([name, t]) => ({ name, values: t.gpu_seconds.map((v) => v / stepS) })), usage),
      plot("plot-cpus-team", "CPUs in use by team", "cores (mean over the step)",
        teams.map(([name, t]) => ({ name, values: t.cpu_seconds.map((v) => v / stepS) })), usage),
      plot("plot-cost-team", "Cost by team", "cost per step",
        teams.map(([name, t]) => ({ name, values: t.cost })), usage),
      plot("plot-cost-site", "Cost by site, used and idle", "cost per step",
        sites.flatMap(([name, s]) => [{ name, values: s.cost }, { name: name + " idle", values: s.idle_cost }]), usage)),
    h("h2", {}, "By team"),
    table(["Team", "GPU-hours#", "CPU-hours#", "Cost#"], teams.map(([name, t]) =>
      [name, fmt.number(sum(t.gpu_seconds) / 3600, 3), fmt.number(sum(t.cpu_seconds) / 3600, 3), fmt.money(sum(t.cost))]),
    { id: "usage-teams" }),
    h("h2", {}, "By site"),
    table(["Site", "GPUs#", "CPU cores#", "GPU-hours#", "CPU-hours#", "Cost in use#", "Idle cost#", "Capacity cost / hour#"],
      sites.map(([name, s]) => [name, s.gpus, s.cpus, fmt.number(sum(s.gpu_seconds) / 3600, 3), fmt.number(sum(s.cpu_seconds) / 3600, 3),
        fmt.money(sum(s.cost)), fmt.money(sum(s.idle_cost)), fmt.money(s.cost_per_hour)]), { id: "usage-sites" }),
  ];
}

async function clusterPage() {
  const cluster = await api("/v1/cluster");
  return [
    h("h1", {}, "Coordinators"),
    h("div", { class: "cards" }, card(cluster.leader === null ? "none" : cluster.leader, "leader"),
      card(cluster.term, "term"), card(cluster.commit_index, "commit index"), card(cluster.node, "answered by")),
    table(["Member#", "Role", "QUIC", "HTTP", "Applied index#", ""], cluster.members.map((m) => [
      m.id, m.role, m.addr, m.http_addr, m.applied_index === null || m.applied_index === undefined ? "-" : m.applied_index,
      m.id === cluster.leader ? "leader" : "",
    ]), { id: "members" }),
  ];
}

// ----- shell -----

function route() {
  const path = location.pathname.replace(/^\/ui\/?/, "").replace(/\/$/, "");
  const params = new URLSearchParams(location.search);
  if (path === "" || path === "fleet") return { page: "fleet", render: fleetPage };
  if (path === "jobs") return { page: "jobs", render: () => jobsPage(params) };
  if (path.startsWith("jobs/")) return { page: "jobs", render: () => jobPage(decodeURIComponent(path.slice(5))) };
  if (path === "usage") return { page: "usage", render: () => usagePage(params) };
  if (path === "cluster") return { page: "cluster", render: clusterPage };
  return { page: "", render: async () => [h("h1", {}, "Not found"), h("p", {}, "No page " + location.pathname + ".")] };
}

function showLogin(message) {
  document.getElementById("nav").hidden = true;
  const input = h("input", { id: "token", type: "password", autocomplete: "off", required: true,
    placeholder: "the admin token, or a token you were given" });
  const main = document.getElementById("main");
  main.replaceChildren(h("form", { class: "login", id: "login", onsubmit: (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    render();
  } }, h("h1", {}, "Sign in"), message ? h("p", { class: "error" }, message) : null,
  h("label", { for: "token" }, "API token"), input,
  h("p", { class: "muted" }, "The first coordinator wrote the admin token to DATA_DIR/admin.token."),
  h("button", { type: "submit" }, "Sign in")));
  main.dataset.state = "login";
}

let timer = null;
async function render() {
  clearTimeout(timer);
  if (!token()) { showLogin(); return; }
  const nav = document.getElementById("nav");
  const main = document.getElementById("main");
  const { page, render: draw } = route();
  nav.hidden = false;
  for (const link of nav.querySelectorAll("a")) link.classList.toggle("current", link.dataset.page === page);
  try {
    const content = await draw();
    main.replaceChildren(...content, h("p", { class: "muted" }, "Updated " + fmt.time(Date.now()) + "; every " + REFRESH_MS / 1000 + " s."));
    main.dataset.state = "ready";
  } catch (error) {
    console.error(error);
    if (error.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("That token was refused: " + error.message);
      return;
    }
    main.replaceChildren(h("h1", {}, "Could not load this page"), h("p", { class: "error", id: "error" }, error.message));
    main.dataset.state = "error";
  }
  // Refresh, unless the user is reading a form control.
  timer = setTimeout(() => { if (!document.activeElement || document.activeElement.tagName !== "SELECT") render(); }, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  // A link may carry the token in its fragment (`/ui/jobs#token=...`): the fragment never
  // reaches a server; it is moved to session storage and taken off the address.
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.get("token")) {
    sessionStorage.setItem(TOKEN_KEY, fragment.get("token"));
    history.replaceState(null, "", location.pathname + location.search);
  }
  document.getElementById("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin();
  });
  render();
});
