// The official client set up the way real apps get it wrong or differently: asking for V1
// while sending V2 arrays (closed with a reason that names it, logged at a bounded rate,
// its reconnect loop slowed by 429s), and speaking V1 for real through its encode/decode
// options.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Socket } from "phoenix";
import WebSocket from "ws";
import { api, connect, join, mint, next, startServer } from "./helpers.mjs";

let server;
before(async () => { server = await startServer(["--connect-burst", "10", "--connects-per-sec", "2"]); });
after(async () => { await server.stop(); });

describe("the official client, configured as apps do", () => {
  test("vsn 1.0.0 with the V2 encoder: the close names the mismatch, the reconnect loop is slowed, the log stays bounded", async () => {
    const closes = [];
    const socket = new Socket(server.socketUrl, {
      transport: WebSocket,
      vsn: "1.0.0",
      params: { token: mint("mismatch") },
      reconnectAfterMs: () => 10,
    });
    socket.onClose((e) => closes.push({ code: e.code, reason: e.reason }));
    socket.connect();
    socket.channel("room:lobby", {}).join();
    await new Promise((r) => setTimeout(r, 3000));
    socket.disconnect();
    const named = closes.filter((c) => c.code === 1007);
    assert.ok(named.length > 0, JSON.stringify(closes.slice(0, 3)));
    assert.match(named[0].reason, /V1 serializer expects an object frame; the client sent a V2 array/);
    const stats = (await api(server, "GET", "/api/stats")).body;
    // Without the connect limit this loop opened ~75 sockets a second (1,526 in 20 s).
    assert.ok(stats.malformed_frames <= 10 + 2 * 4, `sockets opened in 3 s: ${stats.malformed_frames}`);
    assert.ok(stats.connects_throttled > 0, "the loop met 429s");
    const logged = server.stderr().split("\n").filter((l) => l.includes("client cut off for what it sent"));
    assert.ok(logged.length >= 1 && logged.length <= 5 * 4, `${logged.length} log lines`);
    assert.match(logged[0], /peer=127\.0\.0\.1:\d+/);
  });

  test("the V1 serializer through the client's encode/decode options: joins and chats", async () => {
    const v1 = new Socket(server.socketUrl, {
      transport: WebSocket,
      vsn: "1.0.0",
      params: { token: mint("v1") },
      encode: ({ join_ref, ref, topic, event, payload }, cb) => cb(JSON.stringify({ join_ref, ref, topic, event, payload })),
      decode: (raw, cb) => cb(JSON.parse(raw)),
    });
    v1.connect();
    const a = v1.channel("room:lobby", {});
    assert.equal((await join(a)).status, "ok");
    const bob = await connect(server, "bob-v2");
    const b = bob.channel("room:lobby", {});
    await join(b);
    const got = next(a, "new_message");
    b.push("new_message", { body: "to a V1 client" });
    assert.deepEqual(await got, { body: "to a V1 client" });
    v1.disconnect();
    bob.disconnect();
  });
});
