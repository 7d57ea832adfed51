// Test helpers: start a real Cinder server (the built binary) on a free port, mint connect
// tokens, and drive the official `phoenix` client over the `ws` WebSocket implementation.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { createConnection, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join as joinPath } from "node:path";
import { Socket } from "phoenix";
import WebSocket from "ws";

export const SECRET = "js-test-secret";
export const ADMIN = "js-test-admin";

export const BIN = process.env.CINDER_BIN;
export const PLUGINS = process.env.CINDER_TEST_PLUGINS;
if (!BIN || !PLUGINS) {
  throw new Error("set CINDER_BIN and CINDER_TEST_PLUGINS (make test-js does)");
}
/** The Rust plugins only: for tests that start many servers with their own artifact cache. */
export const RUST_PLUGINS = joinPath(PLUGINS, "..", "test-plugins");
/** Versions the hot-reload tests upload (`make plugins` builds them). */
export const UPLOADS = joinPath(PLUGINS, "..", "test-uploads");
/** One artifact cache for the suite's servers, so each plugin is compiled once. */
const SHARED_CACHE = joinPath(PLUGINS, "..", "test-cache");

/** A fresh temporary directory. */
export const tempDir = (prefix = "cinder-js-") => mkdtempSync(joinPath(tmpdir(), prefix));

/**
 * Starts Cinder on 127.0.0.1:0 and resolves once it listens. Options: `dataDir` (kept on
 * stop when given), `plugins` (the plugins dir, or null for none), `cacheDir` (null for the
 * data dir's own cache), `generatedSecrets` (give no secrets: the server generates them,
 * as `make run` does, and `adminToken` is the one it printed).
 */
export async function startServer(extraArgs = [], { dataDir, plugins = PLUGINS, cacheDir = SHARED_CACHE, generatedSecrets = false } = {}) {
  const ownData = dataDir === undefined;
  dataDir ??= tempDir();
  const secrets = generatedSecrets ? [] : ["--jwt-secret", SECRET, "--admin-token", ADMIN];
  const args = ["serve", "--listen", "127.0.0.1:0", "--data-dir", dataDir, ...secrets, ...extraArgs];
  if (plugins !== null) args.push("--plugins-dir", plugins);
  if (cacheDir !== null) args.push("--cache-dir", cacheDir);
  const child = spawn(
    BIN,
    args,
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn" } },
  );
  let stderr = "";
  child.stderr.on("data", (d) => { stderr += d; });
  let out = "";
  const addr = await new Promise((resolve, reject) => {
    // The first start compiles the Python and JS plugins (seconds); later ones hit the cache.
    const timer = setTimeout(() => reject(new Error(`server did not start: ${stderr}`)), 120000);
    child.stdout.on("data", (d) => {
      out += d;
      const m = out.match(/cinder listening on http:\/\/(\S+)/);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    child.on("exit", (code) => { clearTimeout(timer); reject(new Error(`server exited ${code}: ${stderr}`)); });
  });
  const exited = new Promise((resolve) => child.on("exit", (code, signal) => resolve({ code, signal })));
  const generated = out.match(/CINDER_ADMIN_TOKEN=(\S+)/);
  return {
    addr,
    adminToken: generated ? generated[1] : ADMIN,
    http: `http://${addr}`,
    socketUrl: `ws://${addr}/socket`,
    child,
    exited,
    dataDir,
    stderr: () => stderr,
    async stop() {
      // Sockets a failed test left open would reconnect forever and keep node running.
      for (const socket of sockets) socket.disconnect();
      sockets.clear();
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      await exited;
      if (ownData) rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

const b64url = (buf) => Buffer.from(buf).toString("base64url");

/** An HS256 JWT like `cinder token` makes. */
export function mint(userId, { secret = SECRET, expiresIn = 3600 } = {}) {
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ user_id: userId, exp: Math.floor(Date.now() / 1000) + expiresIn }));
  const sig = createHmac("sha256", secret).update(`${header}.${body}`).digest("base64url");
  return `${header}.${body}.${sig}`;
}

const sockets = new Set();

/** A connected official client; `opts` go to the phoenix Socket. */
export function connect(server, userId, opts = {}) {
  const socket = new Socket(server.socketUrl, {
    transport: WebSocket,
    params: { token: mint(userId) },
    reconnectAfterMs: () => 50,
    rejoinAfterMs: () => 50,
    ...opts,
  });
  sockets.add(socket);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("socket did not open")), 5000);
    socket.onOpen(() => { clearTimeout(timer); resolve(socket); });
    socket.connect();
  });
}

/** Joins and resolves with `{status, response}` ("ok", "error" or "timeout"). */
export function join(channel) {
  return new Promise((resolve) => {
    channel.join(3000)
      .receive("ok", (response) => resolve({ status: "ok", response }))
      .receive("error", (response) => resolve({ status: "error", response }))
      .receive("timeout", () => resolve({ status: "timeout" }));
  });
}

/** Pushes and resolves with the reply `{status, response}`. */
export function push(channel, event, payload) {
  return new Promise((resolve) => {
    channel.push(event, payload, 3000)
      .receive("ok", (response) => resolve({ status: "ok", response }))
      .receive("error", (response) => resolve({ status: "error", response }))
      .receive("timeout", () => resolve({ status: "timeout" }));
  });
}

/** Resolves with the payload of the next `event` on `channel`. */
export function next(channel, event, ms = 3000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { channel.off(event, ref); reject(new Error(`no ${event} within ${ms} ms`)); }, ms);
    const ref = channel.on(event, (payload) => { clearTimeout(timer); channel.off(event, ref); resolve(payload); });
  });
}

/** Resolves once `predicate()` is true, polling. */
export async function until(predicate, ms = 5000, what = "condition") {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** `POST /api/broadcast`. */
export function apiBroadcast(server, body, token = ADMIN) {
  const headers = { "content-type": "application/json" };
  if (token !== null) headers.authorization = `Bearer ${token}`;
  return fetch(`${server.http}/api/broadcast`, {
    method: "POST",
    headers,
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
}

/** Opens a raw WebSocket and resolves with the HTTP status of a refused upgrade, or "open". */
export function rawUpgrade(url, protocols) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, protocols);
    ws.on("open", () => { ws.close(); resolve({ status: "open", protocol: ws.protocol }); });
    ws.on("unexpected-response", (_req, res) => resolve({ status: res.statusCode }));
    ws.on("error", () => {});
  });
}

/** An admin API call; resolves with `{status, body}` (the JSON answer, or null). */
export async function api(server, method, path, body) {
  const headers = { authorization: `Bearer ${server.adminToken ?? ADMIN}` };
  if (body !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(`${server.http}${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
}

/** `POST /api/plugins` with a manifest (text) and a wasm (bytes); `{status, body}`. */
export async function uploadPlugin(server, manifest, wasm, { activate = true } = {}) {
  const form = new FormData();
  form.append("manifest", new Blob([manifest]), "cinder.toml");
  form.append("wasm", new Blob([wasm]), "plugin.wasm");
  const res = await fetch(`${server.http}/api/plugins${activate ? "" : "?activate=false"}`, {
    method: "POST",
    headers: { authorization: `Bearer ${server.adminToken ?? ADMIN}` },
    body: form,
  });
  return { status: res.status, body: await res.json() };
}

/** A free loopback port. */
export function freePort() {
  return new Promise((resolve) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

/** Whether a redis-server answers PING on `port`. */
function pong(port) {
  return new Promise((resolve) => {
    const c = createConnection({ port, host: "127.0.0.1" });
    c.on("connect", () => c.write("PING\r\n"));
    c.on("data", (d) => { c.destroy(); resolve(d.toString().startsWith("+PONG")); });
    c.on("error", () => resolve(false));
  });
}

/** A redis-server of the caller's own on `port`, keeping nothing on disk. */
export async function startRedis(port) {
  const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: "ignore" });
  const exited = new Promise((resolve) => child.on("exit", resolve));
  const deadline = Date.now() + 10000;
  while (!(await pong(port))) {
    if (Date.now() > deadline) throw new Error("redis-server did not answer");
    await new Promise((r) => setTimeout(r, 20));
  }
  return { child, async stop() { child.kill("SIGKILL"); await exited; } };
}

/**
 * An HTTP proxy on a free loopback port in front of Cinder nodes (`targets`, their
 * `http://host:port`), as a proxy that blocks WebSockets is: plain requests are forwarded,
 * each to the next target in turn (no sticky sessions), and every upgrade request is
 * refused. `files` maps paths it serves itself (a test page) to `{type, body}`. Resolves
 * with `{url, hits, stop}`, `hits` counting requests per target.
 */
export async function startProxy(targets, { files = {} } = {}) {
  const { createServer: createHttp, request } = await import("node:http");
  const hits = targets.map(() => 0);
  let turn = 0;
  const server = createHttp((req, res) => {
    const file = files[req.url.split("?")[0]];
    if (file) {
      res.writeHead(200, { "content-type": file.type });
      res.end(file.body);
      return;
    }
    const i = turn++ % targets.length;
    hits[i] += 1;
    const target = new URL(req.url, targets[i]);
    const out = request(target, { method: req.method, headers: req.headers }, (answer) => {
      res.writeHead(answer.statusCode, answer.headers);
      answer.pipe(res);
    });
    out.on("error", () => { res.writeHead(502); res.end(); });
    req.pipe(out);
  });
  server.on("upgrade", (_req, socket) => {
    socket.end("HTTP/1.1 403 Forbidden\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
  });
  const connections = new Set();
  server.on("connection", (c) => { connections.add(c); c.on("close", () => connections.delete(c)); });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    hits,
    async stop() {
      for (const c of connections) c.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/**
 * Debian's Chromium, headless, driven by playwright-core (`make test` installs both).
 * Resolves with the browser; close it when done.
 */
export async function launchChromium() {
  const { chromium } = await import("playwright-core");
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}
