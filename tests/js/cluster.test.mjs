// Three Cinder nodes (the real binary) on a redis-server this file starts on a free port,
// driven by the official client with its sockets spread over the nodes: chat, Presence,
// the API's push, `disconnect`, a node killed, Redis restarted, a version uploaded on one
// node and served by another.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join as joinPath } from "node:path";
import { after, before, describe, test } from "node:test";
import { Presence } from "phoenix";
import { UPLOADS, api, apiBroadcast, connect, freePort, join, next, startRedis, startServer, until, uploadPlugin } from "./helpers.mjs";

let port;
let redis;
let nodes;
const member = (id, down = 2000) => ["--redis", `redis://127.0.0.1:${port}`, "--node-id", id, "--node-down-ms", String(down)];

before(async () => {
  port = await freePort();
  redis = await startRedis(port);
  nodes = [];
  for (const id of ["a", "b", "c"]) nodes.push(await startServer(member(id)));
});
after(async () => {
  for (const n of nodes) await n.stop();
  await redis.stop();
});

/** A channel with a Presence attached before the join, and its keys. */
function watch(socket, topic) {
  const channel = socket.channel(topic, {});
  const presence = new Presence(channel);
  return { channel, presence, keys: () => presence.list((key) => key).sort().join() };
}

describe("a cluster of three nodes on Redis", () => {
  test("chat crosses nodes: every member gets every message once, in order", async () => {
    const [a, b, c] = nodes;
    const channels = [];
    for (const [server, user] of [[a, "alice"], [b, "bob"], [c, "carol"]]) {
      const s = await connect(server, user);
      const ch = s.channel("room:lobby", {});
      assert.equal((await join(ch)).status, "ok");
      const got = [];
      ch.on("new_message", ({ body }) => got.push(body));
      channels.push({ s, ch, got });
    }
    const sent = Array.from({ length: 20 }, (_, i) => `m${i}`);
    // RoomChannel answers new_message with no reply, as Phoenix's does: the broadcast is it.
    for (const body of sent) channels[0].ch.push("new_message", { body });
    for (const { got } of channels) await until(() => got.length >= sent.length, 5000, "every message");
    await new Promise((r) => setTimeout(r, 200));
    for (const { got } of channels) assert.deepEqual(got, sent);
    for (const { s } of channels) s.disconnect();
  });

  test("Presence sees the same state from every node", async () => {
    const views = [];
    for (const [server, user] of [[nodes[0], "alice"], [nodes[1], "bob"], [nodes[2], "carol"]]) {
      const s = await connect(server, user);
      const v = watch(s, "presence:cluster");
      assert.equal((await join(v.channel)).status, "ok");
      views.push({ s, v });
    }
    for (const { v } of views) await until(() => v.keys() === "alice,bob,carol", 5000, "all three everywhere");
    const leftEverywhere = views.slice(0, 2).map(({ v }) => next(v.channel, "presence_diff"));
    views[2].s.disconnect();
    for (const diff of await Promise.all(leftEverywhere)) assert.deepEqual(Object.keys(diff.leaves), ["carol"]);
    for (const { v } of views.slice(0, 2)) await until(() => v.keys() === "alice,bob", 3000, "carol left");
    for (const { s } of views) s.disconnect();
  });

  test("the API's push on one node reaches the user's socket on another", async () => {
    const s = await connect(nodes[2], "42");
    const ch = s.channel("user:42", {});
    assert.equal((await join(ch)).status, "ok");
    const note = next(ch, "notification");
    const res = await apiBroadcast(nodes[0], { topic: "user:42", event: "notification", payload: { id: 1, text: "hello" } });
    assert.equal(res.status, 202);
    assert.deepEqual(await note, { id: 1, text: "hello" });
    s.disconnect();
  });

  test("disconnect on one node closes the user's sockets on the others", async () => {
    const closed = [];
    const sockets = [];
    for (const server of [nodes[0], nodes[1]]) {
      const s = await connect(server, "9", { reconnectAfterMs: () => 60000 });
      s.onClose(() => closed.push(server.addr));
      sockets.push(s);
    }
    // Each node listens on the socket id once its socket is up; give Redis a moment.
    await new Promise((r) => setTimeout(r, 200));
    const res = await apiBroadcast(nodes[2], { topic: "user_socket:9", event: "disconnect", payload: {} });
    assert.equal(res.status, 202);
    await until(() => closed.length === 2, 5000, "both sockets closed");
    for (const s of sockets) s.disconnect();
  });

  test("a node killed with SIGKILL: its presences leave everywhere within the down period", async () => {
    const doomed = await startServer(member("doomed"));
    const watcher = watch(await connect(nodes[0], "alice"), "presence:kill");
    await join(watcher.channel);
    const far = watch(await connect(doomed, "dave", { reconnectAfterMs: () => 60000 }), "presence:kill");
    await join(far.channel);
    await until(() => watcher.keys() === "alice,dave", 5000, "alice sees dave");
    const killed = Date.now();
    doomed.child.kill("SIGKILL");
    await until(() => watcher.keys() === "alice", 4000, "dave left");
    assert.ok(Date.now() - killed < 2000, `left ${Date.now() - killed} ms after the kill (down period 2 s)`);
    await doomed.stop();
    watcher.channel.socket.disconnect();
  });

  test("Redis restarted during steady traffic: no node exits and the traffic resumes", async () => {
    const sender = (await connect(nodes[0], "alice")).channel("room:lobby-restart", {});
    const reader = (await connect(nodes[1], "bob")).channel("room:lobby-restart", {});
    assert.equal((await join(sender)).status, "ok");
    assert.equal((await join(reader)).status, "ok");
    const got = [];
    reader.on("new_message", ({ body }) => got.push(body));
    const mine = [];
    sender.on("new_message", ({ body }) => mine.push(body));
    let i = 0;
    const ticker = setInterval(() => sender.push("new_message", { body: `t${i++}` }), 20);
    await until(() => got.length > 5, 5000, "traffic before");
    await redis.stop();
    await new Promise((r) => setTimeout(r, 500));
    redis = await startRedis(port);
    const sentAfter = i;
    await until(() => got.some((b) => Number(b.slice(1)) > sentAfter), 10000, "traffic after the restart");
    clearInterval(ticker);
    for (const n of nodes) assert.equal(n.child.exitCode, null, "no node exited");
    // The sender's own node serves it throughout (the ticker's last messages may still be
    // on their way back to it, so it waits for this one by its body).
    sender.push("new_message", { body: "last" });
    await until(() => mine.includes("last"), 3000, "the sender hears its own last message");
    sender.socket.disconnect();
    reader.socket.disconnect();
  });

  test("counter 2.0.0 uploaded on one node is served by new rooms on another", async () => {
    const manifest = readFileSync(joinPath(UPLOADS, "counter-2.0.0.toml"), "utf8");
    const wasm = readFileSync(joinPath(UPLOADS, "counter-2.0.0.wasm"));
    // Right after the Redis restart, wait until every node is back in the members' view
    // (an activation reports on the members whose heartbeat is current).
    const members = async () => (await api(nodes[0], "GET", "/api/stats")).body.cluster?.members?.length ?? 0;
    const deadline = Date.now() + 10000;
    while ((await members()) < 3) {
      assert.ok(Date.now() < deadline, "all three nodes back within 10 s");
      await new Promise((r) => setTimeout(r, 100));
    }
    const up = await uploadPlugin(nodes[0], manifest, wasm);
    assert.equal(up.status, 201, JSON.stringify(up.body));
    assert.deepEqual(up.body.activation.nodes, { a: { version: "2.0.0" }, b: { version: "2.0.0" }, c: { version: "2.0.0" } });
    const ch = (await connect(nodes[2], "carol")).channel("counter:fresh-on-c", {});
    const joined = await join(ch);
    assert.equal(joined.status, "ok");
    assert.deepEqual(joined.response, { count: 0, version: "2.0.0" });
    const { body } = await api(nodes[1], "GET", "/api/plugins");
    assert.equal(body.find((p) => p.name === "counter").active, "2.0.0");
    ch.socket.disconnect();
  });
});
