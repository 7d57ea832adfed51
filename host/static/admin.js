// The admin page: everything it shows and does goes through the admin API with the admin
// token the operator signs in with (kept in sessionStorage, this tab only). Every value
// from the server (plugin names, topics, presence metas) is written as text, never as
// HTML: plugins and clients choose them.
"use strict";
(() => {
  const $ = (sel) => document.querySelector(sel);
  const KEY = "cinder-admin-token";
  const POLL_MS = 1000;
  const HISTORY = 60;
  let token = sessionStorage.getItem(KEY);
  let timer = null;
  let last = null; // the previous scrape, for rates
  const series = { messages: [], deliveries: [], p99: [] };

  function el(tag, text, attrs = {}) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "dataset") Object.assign(node.dataset, v);
      else if (k === "className") node.className = v;
      else if (k === "onclick") node.addEventListener("click", v);
      else node.setAttribute(k, v);
    }
    return node;
  }

  async function api(method, path, body) {
    const init = { method, headers: { authorization: `Bearer ${token}` } };
    if (body instanceof FormData) init.body = body;
    else if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["content-type"] = "application/json";
    }
    const response = await fetch(path, init);
    if (response.status === 401) {
      signOut("The admin token was refused.");
      throw new Error("unauthorized");
    }
    const text = await response.text();
    let parsed = text;
    if ((response.headers.get("content-type") || "").includes("json") && text) parsed = JSON.parse(text);
    return { ok: response.ok, status: response.status, body: parsed };
  }

  // --- Prometheus text: the families the page reads -------------------------------
  function parseMetrics(text) {
    const samples = [];
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
      if (!m) continue;
      const labels = {};
      for (const pair of (m[3] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
      samples.push({ name: m[1], labels, value: Number(m[4]) });
    }
    return samples;
  }
  const total = (samples, name) => samples.filter((s) => s.name === name).reduce((a, s) => a + s.value, 0);
  // Call-latency buckets summed over every plugin, version and export: le -> count.
  function callBuckets(samples) {
    const buckets = new Map();
    for (const s of samples) {
      if (s.name !== "cinder_plugin_call_duration_seconds_bucket") continue;
      const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
      buckets.set(le, (buckets.get(le) || 0) + s.value);
    }
    return buckets;
  }
  // The 99th percentile of the calls between two scrapes (the bucket's upper bound).
  function p99(before, now) {
    const bounds = [...now.keys()].sort((a, b) => a - b);
    const counts = bounds.map((le) => (now.get(le) || 0) - (before.get(le) || 0));
    const all = counts[counts.length - 1] || 0;
    if (all <= 0) return null;
    const i = counts.findIndex((c) => c >= 0.99 * all);
    return bounds[i];
  }
  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "no calls";
    if (seconds === Infinity) return "> 1 s";
    if (seconds < 1e-3) return `≤ ${Math.round(seconds * 1e6)} µs`;
    return `≤ ${(seconds * 1e3).toFixed(seconds < 1e-2 ? 1 : 0)} ms`;
  }
  function draw(canvas, values) {
    const ctx = canvas.getContext("2d");
    const { width, height } = canvas;
    ctx.clearRect(0, 0, width, height);
    const finite = values.filter((v) => Number.isFinite(v));
    const max = Math.max(1e-9, ...finite);
    ctx.strokeStyle = "#d9480f";
    ctx.lineWidth = 2;
    ctx.beginPath();
    values.forEach((v, i) => {
      const x = (i / (HISTORY - 1)) * width;
      const y = height - 4 - ((Number.isFinite(v) ? v : 0) / max) * (height - 8);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
  function push(list, value) {
    list.push(value);
    if (list.length > HISTORY) list.shift();
  }

  async function rates() {
    const scrape = await api("GET", "/metrics");
    const samples = parseMetrics(scrape.body);
    const now = {
      at: performance.now(),
      messages: total(samples, "cinder_messages_in_total"),
      deliveries: total(samples, "cinder_deliveries_out_total"),
      buckets: callBuckets(samples),
    };
    if (last) {
      const secs = (now.at - last.at) / 1000;
      const m = (now.messages - last.messages) / secs;
      const d = (now.deliveries - last.deliveries) / secs;
      const p = p99(last.buckets, now.buckets);
      push(series.messages, m);
      push(series.deliveries, d);
      push(series.p99, p);
      $("[data-test='rate-messages']").textContent = m.toFixed(1);
      $("[data-test='rate-deliveries']").textContent = d.toFixed(1);
      $("[data-test='rate-p99']").textContent = duration(p);
      draw($("#chart-messages"), series.messages);
      draw($("#chart-deliveries"), series.deliveries);
      draw($("#chart-p99"), series.p99);
    }
    last = now;
  }

  // --- Nodes, plugins, rooms -------------------------------------------------------
  async function nodes() {
    const stats = (await api("GET", "/api/stats")).body;
    const body = $("#nodes");
    body.replaceChildren();
    if (stats.cluster) {
      for (const m of stats.cluster.members) {
        const versions = Object.entries(m.versions || {}).map(([p, v]) => `${p} ${v}`).join(", ");
        const name = m.id === stats.cluster.node ? `${m.id} (this node)` : m.id;
        body.append(row([name, m.address, new Date(m.started_ms).toLocaleString(), versions]));
      }
      $("#node-summary").textContent = `Cluster: Redis ${stats.cluster.redis}; ${stats.cluster.members.length} member(s).`;
    } else {
      body.append(row(["this node", location.host, "", "standalone (no cluster)"]));
      $("#node-summary").textContent = "";
    }
    $("#node-summary").textContent += ` ${stats.sockets} WebSocket(s), ${stats.longpoll_sessions} LongPoll session(s), ${stats.rooms} room(s) here.`;
  }

  function row(cells) {
    const tr = el("tr");
    for (const c of cells) tr.append(c instanceof Node ? wrap(c) : el("td", c));
    return tr;
  }
  function wrap(node) {
    const td = el("td");
    td.append(node);
    return td;
  }

  async function act(what, method, path, body) {
    const result = $("#action-result");
    result.className = "";
    result.textContent = `${what}…`;
    const answer = await api(method, path, body);
    if (answer.ok) {
      result.className = "ok";
      const a = answer.body && (answer.body.activation || answer.body);
      const rooms = a && typeof a === "object" && "rooms" in a ? `: ${a.swapped}/${a.rooms} live room(s) moved` : "";
      result.textContent = `${what}: done${rooms}.`;
    } else {
      result.className = "error";
      result.textContent = `${what}: ${answer.body && answer.body.error ? answer.body.error : `HTTP ${answer.status}`}`;
    }
    await refresh();
  }

  async function plugins() {
    const list = (await api("GET", "/api/plugins")).body;
    const body = $("#plugins");
    body.replaceChildren();
    for (const p of list) {
      const versions = el("div");
      for (const v of p.versions) {
        const isActive = v.version === p.active;
        const tag = el("span", v.version, { className: isActive ? "tag active" : "tag", dataset: { version: v.version } });
        versions.append(tag);
        if (!isActive) {
          versions.append(el("button", "activate", {
            dataset: { test: "activate", plugin: p.name, version: v.version },
            onclick: () => act(`activate ${p.name} ${v.version}`, "POST", `/api/plugins/${encodeURIComponent(p.name)}/activate`, { version: v.version }),
          }));
          versions.append(el("button", "delete", {
            dataset: { test: "delete-version", plugin: p.name, version: v.version },
            onclick: () => confirm(`Delete ${p.name} ${v.version}?`) && act(`delete ${p.name} ${v.version}`, "DELETE", `/api/plugins/${encodeURIComponent(p.name)}/versions/${encodeURIComponent(v.version)}`),
          }));
        }
        versions.append(el("br"));
      }
      const perNode = p.nodes ? Object.entries(p.nodes).map(([n, v]) => `${n}: ${v ?? "–"}`).join(", ") : "this node";
      const actions = el("div", null, { className: "row" });
      actions.append(el("button", "roll back", {
        dataset: { test: "rollback", plugin: p.name },
        onclick: () => act(`roll back ${p.name}`, "POST", `/api/plugins/${encodeURIComponent(p.name)}/rollback`),
      }));
      if (p.history.length === 0) actions.lastChild.disabled = true;
      actions.append(el("button", "delete", {
        dataset: { test: "delete-plugin", plugin: p.name },
        onclick: () => confirm(`Delete ${p.name} with every version?`) && act(`delete ${p.name}`, "DELETE", `/api/plugins/${encodeURIComponent(p.name)}`),
      }));
      const tr = row([p.name, p.topics.join(" "), p.active || "none", versions, perNode, String(p.live_rooms), actions]);
      tr.dataset.plugin = p.name;
      tr.dataset.active = p.active || "";
      body.append(tr);
    }
  }

  async function rooms() {
    const answer = (await api("GET", "/api/rooms")).body;
    const body = $("#rooms");
    body.replaceChildren();
    $("#room-total").textContent = `(${answer.total})`;
    for (const r of answer.rooms) {
      const show = el("button", "presence", { onclick: () => { $("#presence-topic").value = r.topic; presence(r.topic); } });
      const tr = row([r.topic, r.plugin, r.version, String(r.members), show]);
      tr.dataset.topic = r.topic;
      tr.dataset.version = r.version;
      body.append(tr);
    }
  }

  async function presence(topic) {
    const list = $("#presence");
    list.replaceChildren();
    if (!topic) return;
    const state = (await api("GET", `/api/presence?topic=${encodeURIComponent(topic)}`)).body;
    const keys = Object.keys(state || {});
    if (keys.length === 0) list.append(el("li", "nobody", { className: "muted" }));
    for (const key of keys) {
      const metas = state[key].metas.map((m) => JSON.stringify(m)).join(" ");
      list.append(el("li", `${key}: ${metas}`, { dataset: { key } }));
    }
  }

  async function refresh() {
    await Promise.all([nodes(), plugins(), rooms(), rates()]);
    $("#updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  }

  async function tick() {
    try {
      await refresh();
      const topic = $("#presence-topic").value.trim();
      if (topic) await presence(topic);
    } catch (e) {
      if (String(e.message) !== "unauthorized") $("#updated").textContent = `update failed: ${e.message}`;
    }
    if (token) timer = setTimeout(tick, POLL_MS);
  }

  function signOut(why) {
    token = null;
    sessionStorage.removeItem(KEY);
    clearTimeout(timer);
    last = null;
    $("#console").hidden = true;
    $("#sign-out").hidden = true;
    $("#sign-in").hidden = false;
    $("#sign-in-error").textContent = why || "";
  }

  async function signIn(candidate) {
    const answer = await fetch("/api/stats", { headers: { authorization: `Bearer ${candidate}` } });
    if (!answer.ok) {
      $("#sign-in-error").textContent = answer.status === 401 ? "That is not the admin token." : `Sign-in failed: HTTP ${answer.status}`;
      return;
    }
    token = candidate;
    sessionStorage.setItem(KEY, token);
    $("#sign-in").hidden = true;
    $("#sign-out").hidden = false;
    $("#console").hidden = false;
    tick();
  }

  $("#sign-in-form").addEventListener("submit", (e) => {
    e.preventDefault();
    signIn($("#token").value.trim());
  });
  $("#sign-out").addEventListener("click", () => signOut());
  $("#presence-form").addEventListener("submit", (e) => {
    e.preventDefault();
    presence($("#presence-topic").value.trim());
  });
  $("#upload-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const form = new FormData();
    form.append("manifest", $("#upload-manifest").files[0]);
    form.append("wasm", $("#upload-wasm").files[0]);
    const activate = $("#upload-activate").checked;
    act("upload", "POST", `/api/plugins?activate=${activate}`, form);
  });
  if (token) signIn(token);
})();
