// The official client's LongPoll transport against Cinder: alone and as the fallback when
// a proxy blocks WebSockets, in Node and in Debian's Chromium (playwright-core), on one
// node and on two cluster nodes whose requests alternate; plus the transport's wire rules
// checked with plain HTTP (Phoenix's long_poll_channels_test.exs is the checklist).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, describe, test } from "node:test";
import { LongPoll, Presence, Socket } from "phoenix";
import {
  api, apiBroadcast, connect, freePort, join, launchChromium, mint, push, startProxy,
  startRedis, startServer, until,
} from "./helpers.mjs";

// The official client's browser build (a global `Phoenix`), as a page loads it.
const PHOENIX_BROWSER_BUILD = readFileSync(new URL("node_modules/phoenix/priv/static/phoenix.js", import.meta.url));

const lpSockets = new Set();
after(() => { for (const s of lpSockets) s.disconnect(); });

/** The official client on `url` (`ws://.../socket`) over LongPoll, opened. */
function longPoll(url, user, opts = {}) {
  const socket = new Socket(url, {
    transport: LongPoll,
    params: { token: mint(user) },
    reconnectAfterMs: () => 50,
    rejoinAfterMs: () => 50,
    ...opts,
  });
  lpSockets.add(socket);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("LongPoll socket did not open")), 5000);
    socket.onOpen(() => { clearTimeout(timer); resolve(socket); });
    socket.connect();
  });
}

/** A channel with a Presence attached before the join, and its keys. */
function watch(socket, topic) {
  const channel = socket.channel(topic, {});
  const presence = new Presence(channel);
  return { channel, presence, keys: () => presence.list((key) => key).sort().join() };
}

/** A raw LongPoll request: `{http, body}` (the JSON answer). */
async function lp(server, method, { query = "vsn=2.0.0", session, body, headers = {} } = {}) {
  const h = { ...headers };
  if (session) h["x-phoenix-longpoll-token"] = session;
  if (body !== undefined) h["content-type"] ??= "application/x-ndjson";
  const res = await fetch(`${server.http}/socket/longpoll?${query}`, { method, headers: h, body });
  const text = await res.text();
  return { http: res.status, headers: res.headers, body: text ? JSON.parse(text) : null };
}

/** A new raw session for `user`: its token. */
async function session(server, user = "raw") {
  const opened = await lp(server, "GET", { query: `vsn=2.0.0&token=${mint(user)}` });
  assert.equal(opened.body.status, 410);
  return opened.body.token;
}

/** Polls until the messages answering (or pushed to) `topic` arrive; the frames. */
async function pollUntil(server, token, predicate) {
  const got = [];
  const deadline = Date.now() + 5000;
  while (!got.some(predicate)) {
    if (Date.now() > deadline) throw new Error(`no such message in ${JSON.stringify(got)}`);
    const r = await lp(server, "GET", { session: token });
    assert.equal(r.http, 200);
    if (r.body.status === 200) got.push(...r.body.messages.map((m) => JSON.parse(m)));
    else assert.equal(r.body.status, 204);
  }
  return got;
}

// A page as an app writes it: the official browser build, room:lobby and a presence list.
const PAGE = `<!doctype html><meta charset="utf-8"><title>LongPoll</title>
<script src="/phoenix.js"></script>
<script>
  // Opens the official client as a page would, joins room:lobby and presence:browser.
  window.start = async ({ url, token, longpoll, fallbackMs }) => {
    const opts = { params: { token }, reconnectAfterMs: () => 50 };
    if (longpoll) opts.transport = Phoenix.LongPoll;
    if (fallbackMs) opts.longPollFallbackMs = fallbackMs;
    const socket = new Phoenix.Socket(url, opts);
    socket.connect();
    window.got = [];
    const lobby = socket.channel("room:lobby", {});
    lobby.on("new_message", (m) => window.got.push(m.body));
    const joined = (ch) => new Promise((ok, fail) => ch.join().receive("ok", ok).receive("error", fail).receive("timeout", () => fail("timeout")));
    await joined(lobby);
    const pc = socket.channel("presence:browser", {});
    const presence = new Phoenix.Presence(pc);
    window.keys = () => presence.list((k) => k).sort().join();
    await joined(pc);
    window.say = (body) => lobby.push("new_message", { body });
    return socket.transport === Phoenix.LongPoll ? "LongPoll" : "WebSocket";
  };
</script>`;
const PAGE_FILES = {
  "/page.html": { type: "text/html", body: PAGE },
  "/phoenix.js": { type: "text/javascript", body: PHOENIX_BROWSER_BUILD },
};

/**
 * A Chromium page (from `proxy`) that chats, over `how`, with a Node client on
 * `peerServer` and sees it in presence; the transport the page used.
 */
async function chat(browser, proxy, peerServer, how, user) {
  const tab = await browser.newPage();
  await tab.goto(`${proxy.url}/page.html`);
  const transport = await tab.evaluate((args) => window.start(args), { ...how, token: mint(user) });
  const peer = await connect(peerServer, `${user}-peer`);
  const lobby = peer.channel("room:lobby", {});
  const heard = [];
  lobby.on("new_message", ({ body }) => heard.push(body));
  await join(lobby);
  const pc = watch(peer, "presence:browser");
  await join(pc.channel);
  await tab.waitForFunction((who) => window.keys().split(",").includes(who), `${user}-peer`);
  const keysOnPage = await tab.evaluate(() => window.keys());
  await until(() => pc.keys().split(",").includes(user), 10000, "the page's user present").catch((e) => {
    throw new Error(`${e.message}: the peer sees [${pc.keys()}], the page [${keysOnPage}]`);
  });
  lobby.push("new_message", { body: `hello ${user}` });
  await tab.waitForFunction((body) => window.got.includes(body), `hello ${user}`);
  await tab.evaluate((body) => window.say(body), `from ${user}`);
  await until(() => heard.includes(`from ${user}`), 5000, "the peer hears the page");
  await tab.close();
  peer.disconnect();
  return transport;
}

describe("LongPoll on one node", () => {
  let server;
  before(async () => { server = await startServer(["--longpoll-window-ms", "1000"]); });
  after(async () => { await server.stop(); });

  test("the official client joins, chats with a WebSocket client, gets replies and presence", async () => {
    const alice = await longPoll(server.socketUrl, "alice");
    const bob = await connect(server, "bob");
    const a = alice.channel("room:lobby", {});
    const b = bob.channel("room:lobby", {});
    assert.deepEqual(await join(a), { status: "ok", response: {} });
    assert.deepEqual(await join(b), { status: "ok", response: {} });

    // Each side hears every message (its own too): collected, as they may still be on
    // their way when the next one is sent.
    const heard = { alice: [], bob: [] };
    a.on("new_message", ({ body }) => heard.alice.push(body));
    b.on("new_message", ({ body }) => heard.bob.push(body));
    b.push("new_message", { body: "over the websocket" });
    await until(() => heard.alice.includes("over the websocket"), 5000, "alice hears bob");
    a.push("new_message", { body: "over longpoll" });
    await until(() => heard.bob.includes("over longpoll"), 5000, "bob hears alice");
    await until(() => heard.alice.length === 2 && heard.bob.length === 2, 5000, "both hear both");
    assert.deepEqual(heard.alice, ["over the websocket", "over longpoll"]);
    assert.equal((await push(a, "new_message", {})).status, "error", "a reply comes back over LongPoll");

    const counter = alice.channel("counter:lp", {});
    assert.equal((await join(counter)).status, "ok");
    const counts = [];
    for (let i = 0; i < 5; i++) counts.push((await push(counter, "inc", {})).response.count);
    assert.deepEqual(counts, [1, 2, 3, 4, 5]);

    const va = watch(alice, "presence:lp");
    const vb = watch(bob, "presence:lp");
    await join(va.channel);
    await join(vb.channel);
    await until(() => va.keys() === "alice,bob" && vb.keys() === "alice,bob", 5000, "both present on both");
    bob.disconnect();
    await until(() => va.keys() === "alice", 5000, "bob's leave seen over LongPoll");
    alice.disconnect();
  });

  test("a burst of pushes in one event loop turn goes as one batch, every reply in order", async () => {
    const alice = await longPoll(server.socketUrl, "batcher");
    const counter = alice.channel("counter:batch", {});
    await join(counter);
    const replies = await Promise.all(Array.from({ length: 150 }, () => push(counter, "inc", {})));
    assert.deepEqual(replies.map((r) => r.response.count), Array.from({ length: 150 }, (_, i) => i + 1));
    alice.disconnect();
  });

  test("a new session answers 410 with a token; the preflight and every answer carry Phoenix's CORS headers", async () => {
    const opened = await lp(server, "GET", { query: `vsn=2.0.0&token=${mint("cors")}` });
    assert.equal(opened.http, 200);
    assert.deepEqual(Object.keys(opened.body).sort(), ["messages", "status", "token"]);
    assert.equal(opened.headers.get("access-control-allow-origin"), "*");
    assert.equal(opened.headers.get("cache-control"), "no-store");
    assert.match(opened.headers.get("content-type"), /^application\/json/);
    const pre = await fetch(`${server.http}/socket/longpoll?vsn=2.0.0`, {
      method: "OPTIONS",
      headers: { origin: "https://app.example", "access-control-request-method": "POST", "access-control-request-headers": "x-phoenix-longpoll-token, content-type" },
    });
    assert.equal(pre.status, 200);
    assert.equal(pre.headers.get("access-control-allow-origin"), "*");
    assert.equal(pre.headers.get("access-control-allow-headers"), "x-phoenix-longpoll-token, content-type");
    assert.equal(pre.headers.get("access-control-allow-methods"), "get, post, options");
    assert.equal(pre.headers.get("access-control-max-age"), "3600");
    const put = await lp(server, "PUT", { session: opened.body.token });
    assert.equal(put.http, 400);
  });

  test("refuses a bad token and an unknown serializer with 403, the same auth as the WebSocket", async () => {
    assert.equal((await lp(server, "GET", { query: "vsn=2.0.0" })).body.status, 403, "no token");
    assert.equal((await lp(server, "GET", { query: `vsn=2.0.0&token=${mint("x", { secret: "wrong" })}` })).body.status, 403);
    assert.equal((await lp(server, "GET", { query: `vsn=123.1.1&token=${mint("x")}` })).body.status, 403);
    const viaHeader = await lp(server, "GET", { headers: { "x-phoenix-authtoken": mint("hdr") } });
    assert.equal(viaHeader.body.status, 410, "the connect token from X-Phoenix-AuthToken");
    const forged = `${viaHeader.body.token.slice(0, -2)}AA`;
    assert.equal((await lp(server, "POST", { session: forged, body: "[]" })).body.status, 410, "a forged session token reaches nothing");
  });

  test("a batch is read as ndjson (the first 100 lines), or as one message without that content type", async () => {
    const token = await session(server);
    const join_ = JSON.stringify(["1", "1", "counter:ndjson", "phx_join", {}]);
    assert.equal((await lp(server, "POST", { session: token, body: join_ })).body.status, 200);
    const incs = Array.from({ length: 101 }, (_, i) => JSON.stringify(["1", String(i + 2), "counter:ndjson", "inc", {}]));
    assert.equal((await lp(server, "POST", { session: token, body: incs.join("\n") })).body.status, 200);
    const replies = await pollUntil(server, token, (m) => m[1] === "101");
    const counts = replies.filter((m) => m[3] === "phx_reply" && m[1] !== "1").map((m) => m[4].response.count);
    assert.deepEqual(counts, Array.from({ length: 100 }, (_, i) => i + 1), "lines past the 100th are ignored, as Phoenix does");
    const leave = JSON.stringify(["1", "200", "counter:ndjson", "phx_leave", {}]);
    const plain = await lp(server, "POST", { session: token, body: leave, headers: { "content-type": "" } });
    assert.equal(plain.body.status, 200);
    await pollUntil(server, token, (m) => m[3] === "phx_close");
  });

  test("a malformed batch ends the session with 400 and the reason; its next poll gets 410", async () => {
    const token = await session(server);
    const bad = await lp(server, "POST", { session: token, body: '{"topic":"t"}' });
    assert.equal(bad.http, 400);
    assert.equal(bad.body.status, 400);
    assert.match(bad.body.reason, /V2 serializer expects an array frame; the client sent a V1 object/);
    assert.equal((await lp(server, "GET", { session: token })).body.status, 410);
    assert.match(server.stderr(), /client cut off for what it sent.*peer=127\.0\.0\.1:\d+.*V2 serializer expects an array/);
  });

  test("a session nobody polls ends after one and a half windows; then 410", async () => {
    const token = await session(server);
    const join_ = JSON.stringify(["1", "1", "counter:expire", "phx_join", {}]);
    assert.equal((await lp(server, "POST", { session: token, body: join_ })).body.status, 200);
    await new Promise((r) => setTimeout(r, 1800));
    assert.equal((await lp(server, "POST", { session: token, body: join_ })).body.status, 410);
    assert.equal((await lp(server, "GET", { session: token })).body.status, 410);
  });

  test("a disconnect broadcast on the socket's id ends the session", async () => {
    const token = await session(server, "456");
    const join_ = JSON.stringify(["1", "1", "counter:disc", "phx_join", {}]);
    await lp(server, "POST", { session: token, body: join_ });
    await pollUntil(server, token, (m) => m[3] === "phx_reply");
    assert.equal((await apiBroadcast(server, { topic: "user_socket:456", event: "disconnect", payload: {} })).status, 202);
    let status;
    const deadline = Date.now() + 5000;
    do { status = (await lp(server, "GET", { session: token })).body.status; } while (status !== 410 && Date.now() < deadline);
    assert.equal(status, 410);
  });

  test("the official client's session gone (410) makes it reconnect and rejoin", async () => {
    const alice = await longPoll(server.socketUrl, "rejoiner");
    const counter = alice.channel("counter:rejoin", {});
    await join(counter);
    let rejoined = 0;
    alice.onOpen(() => { rejoined += 1; });
    // A disconnect for the user ends its session; the client opens a new one and rejoins.
    await apiBroadcast(server, { topic: "user_socket:rejoiner", event: "disconnect", payload: {} });
    await until(() => rejoined >= 1 && counter.state === "joined", 8000, "a new session and the channel joined again");
    assert.equal((await push(counter, "inc", {})).status, "ok");
    alice.disconnect();
  });

  test("a client that closes a WebSocket sees its own close code (the server answers the Close)", async () => {
    const { default: WebSocket } = await import("ws");
    const ws = new WebSocket(`${server.socketUrl}/websocket?vsn=2.0.0&token=${mint("closer")}`);
    await new Promise((resolve) => ws.on("open", resolve));
    const closed = new Promise((resolve) => ws.on("close", (code) => resolve(code)));
    ws.close(1000);
    assert.equal(await closed, 1000);
  });
});

/**
 * The official client with `longPollFallbackMs`, through `proxy` (which blocks WebSockets):
 * it falls back, joins, chats with a WebSocket client on `peerServer` and sees presence.
 */
async function fallsBackAndChats(proxy, peerServer, user) {
  const socket = new Socket(`${proxy.url.replace("http", "ws")}/socket`, {
    params: { token: mint(user) },
    longPollFallbackMs: 300,
    reconnectAfterMs: () => 50,
  });
  lpSockets.add(socket);
  socket.connect();
  const lobby = socket.channel("room:lobby", {});
  const topic = `presence:${user}`;
  const v = watch(socket, topic);
  assert.equal((await join(lobby)).status, "ok");
  assert.equal(socket.transport, LongPoll, "the socket fell back to LongPoll");
  await join(v.channel);
  const bob = await connect(peerServer, `${user}-peer`);
  const b = bob.channel("room:lobby", {});
  await join(b);
  const vb = watch(bob, topic);
  await join(vb.channel);
  await until(() => v.keys() === [user, `${user}-peer`].sort().join(), 8000, "presence over the fallback");
  const heard = [];
  lobby.on("new_message", ({ body }) => heard.push(body));
  b.push("new_message", { body: `to ${user}` });
  await until(() => heard.includes(`to ${user}`), 5000, "the fallback hears the peer");
  const bobHeard = [];
  b.on("new_message", ({ body }) => bobHeard.push(body));
  lobby.push("new_message", { body: `from ${user}` });
  await until(() => bobHeard.includes(`from ${user}`), 5000, "the peer hears the fallback");
  socket.disconnect();
  bob.disconnect();
}

describe("LongPoll as the fallback when a proxy blocks WebSockets", () => {
  let server;
  let proxy;
  before(async () => {
    server = await startServer();
    proxy = await startProxy([server.http]);
  });
  after(async () => { await proxy.stop(); await server.stop(); });

  test("the official client with longPollFallbackMs falls back, joins, chats and gets presence", async () => {
    await fallsBackAndChats(proxy, server, "fallback");
  });
});

describe("LongPoll on two cluster nodes, requests alternating between them", () => {
  let browser;
  let redis;
  let nodes;
  let proxy;
  before(async () => {
    const port = await freePort();
    redis = await startRedis(port);
    const member = (id) => ["--redis", `redis://127.0.0.1:${port}`, "--node-id", id, "--node-down-ms", "2000"];
    nodes = [await startServer(member("lp-a")), await startServer(member("lp-b"))];
    proxy = await startProxy(nodes.map((n) => n.http), { files: PAGE_FILES });
  });
  after(async () => {
    await browser?.close();
    await proxy.stop();
    for (const n of nodes) await n.stop();
    await redis.stop();
  });

  test("a session opened on one node is polled and posted to through both, with chat and presence", async () => {
    const alice = await longPoll(`${proxy.url.replace("http", "ws")}/socket`, "alice");
    const bob = await connect(nodes[1], "bob");
    const a = alice.channel("room:lobby", {});
    const b = bob.channel("room:lobby", {});
    assert.equal((await join(a)).status, "ok");
    await join(b);
    const va = watch(alice, "presence:cluster-lp");
    const vb = watch(bob, "presence:cluster-lp");
    await join(va.channel);
    await join(vb.channel);
    await until(() => va.keys() === "alice,bob" && vb.keys() === "alice,bob", 8000, "presence across nodes");
    const heard = { alice: [], bob: [] };
    a.on("new_message", ({ body }) => heard.alice.push(body));
    b.on("new_message", ({ body }) => heard.bob.push(body));
    for (let i = 0; i < 5; i++) {
      b.push("new_message", { body: `to alice ${i}` });
      await until(() => heard.alice.includes(`to alice ${i}`), 5000, `alice hears message ${i}`);
      a.push("new_message", { body: `to bob ${i}` });
      await until(() => heard.bob.includes(`to bob ${i}`), 5000, `bob hears message ${i}`);
    }
    const sent = [0, 1, 2, 3, 4].flatMap((i) => [`to alice ${i}`, `to bob ${i}`]);
    await until(() => heard.alice.length === 10 && heard.bob.length === 10, 5000, "every message at both");
    assert.deepEqual(heard.alice, sent, "alice (LongPoll) hears everything once, in order");
    assert.deepEqual(heard.bob, sent);
    const counter = alice.channel("counter:cluster-lp", {});
    await join(counter);
    const counts = [];
    for (let i = 0; i < 6; i++) counts.push((await push(counter, "inc", {})).response.count);
    assert.deepEqual(counts, [1, 2, 3, 4, 5, 6]);
    assert.ok(proxy.hits.every((n) => n > 5), `both nodes took requests: ${proxy.hits}`);
    const forwarded = await Promise.all(nodes.map(async (n) => (await api(n, "GET", "/api/stats")).body.longpoll_forwarded));
    assert.ok(forwarded.reduce((x, y) => x + y) > 0, `requests reached the session's node from the other: ${forwarded}`);
    const sessions = await Promise.all(nodes.map(async (n) => (await api(n, "GET", "/api/stats")).body.longpoll_sessions));
    assert.deepEqual(sessions.sort(), [0, 1], "one session, on one node");
    alice.disconnect();
    bob.disconnect();
  });

  test("as the fallback (WebSockets blocked), through both nodes", async () => {
    await fallsBackAndChats(proxy, nodes[0], "cluster-fallback");
  });

  test("in Chromium: LongPoll alone and as the fallback, through both nodes", async () => {
    browser = await launchChromium();
    const url = `${proxy.url.replace("http", "ws")}/socket`;
    const before = [...proxy.hits];
    assert.equal(await chat(browser, proxy, nodes[1], { url, longpoll: true }, "chromium-cluster"), "LongPoll");
    assert.equal(await chat(browser, proxy, nodes[0], { url, fallbackMs: 500 }, "chromium-cluster-fb"), "LongPoll");
    assert.ok(proxy.hits.every((n, i) => n - before[i] > 3), `the page's requests went to both nodes: ${before} -> ${proxy.hits}`);
  });
});

describe("LongPoll in Chromium", () => {
  let server;
  let proxy;
  let browser;

  before(async () => {
    server = await startServer();
    proxy = await startProxy([server.http], { files: PAGE_FILES });
    browser = await launchChromium();
  });
  after(async () => {
    await browser?.close();
    await proxy.stop();
    await server.stop();
  });

  test("the LongPoll transport works cross-origin (CORS preflights in a real browser)", async () => {
    // The page comes from the proxy's origin; the socket is Cinder's own, another origin.
    assert.equal(await chat(browser, proxy, server, { url: server.socketUrl, longpoll: true }, "chromium-lp"), "LongPoll");
  });

  test("with WebSockets blocked by the proxy, longPollFallbackMs falls back to LongPoll", async () => {
    const url = `${proxy.url.replace("http", "ws")}/socket`;
    assert.equal(await chat(browser, proxy, server, { url, fallbackMs: 500 }, "chromium-fallback"), "LongPoll");
  });
});
