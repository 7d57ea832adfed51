// The article's RoomChannel through the official client: chat in room:lobby, refusals,
// connect auth, and hostile frames that must not disturb others.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { Socket } from "phoenix";
import { execFileSync } from "node:child_process";
import { SECRET, connect, join, mint, next, push, rawUpgrade, startServer, until } from "./helpers.mjs";

let server;
before(async () => { server = await startServer(); });
after(async () => { await server.stop(); });

// The same chat behaviour from three plugins in three languages: Rust (`plugins/chat`),
// JavaScript (`plugins/chat-js`, QuickJS) and Python (`plugins/chat-py`).
for (const [prefix, language] of [["room", "Rust"], ["js", "JavaScript"], ["py", "Python"]]) {
describe(`chat plugin in ${language} (${prefix}:*)`, () => {
  const lobby = `${prefix}:lobby`;
  // Alice and Bob, each on a socket of their own, joined to `topic`: both joins answer ok.
  async function aliceAndBob(topic) {
    const alice = await connect(server, "alice");
    const bob = await connect(server, "bob");
    const a = alice.channel(topic, {});
    const b = bob.channel(topic, {});
    assert.deepEqual(await join(a), { status: "ok", response: {} });
    assert.deepEqual(await join(b), { status: "ok", response: {} });
    return { alice, bob, a, b };
  }

  test(`two users join ${lobby} and chat`, async () => {
    const { alice, bob, a, b } = await aliceAndBob(lobby);

    const bobGets = next(b, "new_message");
    const aliceGets = next(a, "new_message");
    a.push("new_message", { body: "hello bob" });
    assert.deepEqual(await bobGets, { body: "hello bob" });
    assert.deepEqual(await aliceGets, { body: "hello bob" }, "broadcast reaches the sender too");

    const aliceGetsReply = next(a, "new_message");
    b.push("new_message", { body: "hi alice" });
    assert.deepEqual(await aliceGetsReply, { body: "hi alice" });
    alice.disconnect();
    bob.disconnect();
  });

  test(`with new_message intercepted (${prefix}-out:*), handle_out pushes every member's copy`, async () => {
    // The same component under cinder-intercept.toml: each copy is a push from handle_out,
    // carrying the member's join_ref, which the client checks against its channel's.
    const { alice, bob, a, b } = await aliceAndBob(`${prefix}-out:lobby`);
    const bobGets = next(b, "new_message");
    const aliceGets = next(a, "new_message");
    a.push("new_message", { body: "through handle_out" });
    assert.deepEqual(await bobGets, { body: "through handle_out" });
    assert.deepEqual(await aliceGets, { body: "through handle_out" });
    alice.disconnect();
    bob.disconnect();
  });

  test("a message without a body gets an error reply", async () => {
    const s = await connect(server, "carol");
    const c = s.channel(lobby, {});
    await join(c);
    const r = await push(c, "new_message", { text: "no body" });
    assert.equal(r.status, "error");
    assert.match(r.response.reason, /body/);
    s.disconnect();
  });

  test(`${prefix}:secret is refused as unauthorized; overflow lobbies are open`, async () => {
    const s = await connect(server, "mallory");
    const c = s.channel(`${prefix}:secret`, {});
    assert.deepEqual(await join(c), { status: "error", response: { reason: "unauthorized" } });
    assert.deepEqual(await join(s.channel(`${prefix}:lobby-7`, {})), { status: "ok", response: {} });
    s.disconnect();
  });

  test("a topic no plugin serves is an unmatched topic", async () => {
    const s = await connect(server, "dave");
    const c = s.channel("nowhere:1", {});
    assert.deepEqual(await join(c), { status: "error", response: { reason: "unmatched topic" } });
    s.disconnect();
  });

  test("leaving closes the channel and stops delivery", async () => {
    const s1 = await connect(server, "erin");
    const s2 = await connect(server, "frank");
    const c1 = s1.channel(lobby, {});
    const c2 = s2.channel(lobby, {});
    await join(c1);
    await join(c2);
    let received = 0;
    c1.on("new_message", () => { received += 1; });
    const left = new Promise((resolve) => c1.leave().receive("ok", resolve));
    await left;
    assert.equal(c1.state, "closed");
    const seen = next(c2, "new_message");
    c2.push("new_message", { body: "after leave" });
    await seen;
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(received, 0);
    s1.disconnect();
    s2.disconnect();
  });

  test("an unknown event gets an error reply naming it", async () => {
    const s = await connect(server, "ivan");
    const c = s.channel(lobby, {});
    await join(c);
    assert.deepEqual(await push(c, "dance", {}), { status: "error", response: { reason: "unknown event dance" } });
    s.disconnect();
  });

  test("an exception in the handler crashes only that channel; the room and the server go on", async () => {
    const s1 = await connect(server, "grace");
    const s2 = await connect(server, "heidi");
    const c1 = s1.channel(lobby, {});
    const c2 = s2.channel(lobby, {});
    await join(c1);
    await join(c2);
    const crashed = new Promise((resolve) => c1.onError(resolve));
    c1.push("boom", {});
    await crashed;
    // The other member never noticed, and the crashed channel rejoins by itself.
    const seen = next(c2, "new_message");
    c2.push("new_message", { body: "still here" });
    assert.deepEqual(await seen, { body: "still here" });
    await until(() => c1.state === "joined", 5000, "rejoin");
    const again = next(c2, "new_message");
    c1.push("new_message", { body: "back" });
    assert.deepEqual(await again, { body: "back" });
    s1.disconnect();
    s2.disconnect();
  });
});
}

describe("connect authentication", () => {
  test("no token, a forged token, a malformed token and an expired token get HTTP 403", async () => {
    const base = `${server.socketUrl}/websocket?vsn=2.0.0`;
    assert.deepEqual(await rawUpgrade(base), { status: 403 });
    assert.deepEqual(await rawUpgrade(`${base}&token=${mint("1", { secret: "wrong" })}`), { status: 403 });
    assert.deepEqual(await rawUpgrade(`${base}&token=not.a.jwt`), { status: 403 });
    assert.deepEqual(await rawUpgrade(`${base}&token=${mint("1", { expiresIn: -60 })}`), { status: 403 });
    assert.deepEqual(await rawUpgrade(`${server.socketUrl}/websocket?vsn=9.9.9&token=${mint("1")}`), { status: 403 });
  });

  test("the official client with a forged token never opens", async () => {
    const socket = new Socket(server.socketUrl, {
      transport: WebSocket,
      params: { token: mint("1", { secret: "forged" }) },
      reconnectAfterMs: () => 10000,
    });
    let opened = false;
    socket.onOpen(() => { opened = true; });
    const errored = new Promise((resolve) => socket.onError(resolve));
    socket.connect();
    await errored;
    assert.equal(opened, false);
    socket.disconnect();
  });

  test("the token can come through the authToken subprotocol, answered with phoenix", async () => {
    const url = `${server.socketUrl}/websocket?vsn=2.0.0`;
    const token = mint("9");
    const proto = `base64url.bearer.phx.${Buffer.from(token).toString("base64").replace(/=/g, "")}`;
    assert.deepEqual(await rawUpgrade(url, ["phoenix", proto]), { status: "open", protocol: "phoenix" });

    const socket = new Socket(server.socketUrl, { transport: WebSocket, authToken: token });
    await new Promise((resolve) => { socket.onOpen(resolve); socket.connect(); });
    const c = socket.channel("room:lobby", {});
    assert.equal((await join(c)).status, "ok");
    socket.disconnect();
  });
});

describe("hostile frames", () => {
  test("garbage frames close only their own socket; others keep chatting", async () => {
    const s1 = await connect(server, "u1");
    const s2 = await connect(server, "u2");
    const c1 = s1.channel("room:lobby", {});
    const c2 = s2.channel("room:lobby", {});
    await join(c1);
    await join(c2);

    const garbage = ["not json", "[1,2", "{}", "[null,null,5,6,7]", "\u0000\u0001", "[\"1\",\"1\",\"room:lobby\"]"];
    const closes = await Promise.all(garbage.map((frame) => new Promise((resolve) => {
      const ws = new WebSocket(`${server.socketUrl}/websocket?vsn=2.0.0&token=${mint("evil")}`);
      ws.on("open", () => ws.send(frame));
      ws.on("close", (code) => resolve(code));
      ws.on("error", () => {});
    })));
    assert.deepEqual(closes, garbage.map(() => 1007), "each garbage socket is closed with 1007");

    const binaryClose = await new Promise((resolve) => {
      const ws = new WebSocket(`${server.socketUrl}/websocket?vsn=2.0.0&token=${mint("evil")}`);
      ws.on("open", () => ws.send(Buffer.from([0, 200, 1, 1, 1, 65])));
      ws.on("close", (code) => resolve(code));
      ws.on("error", () => {});
    });
    assert.equal(binaryClose, 1007, "binary frame with lengths past the end");

    const got = next(c2, "new_message");
    c1.push("new_message", { body: "still here" });
    assert.deepEqual(await got, { body: "still here" });
    assert.equal(s1.isConnected() && s2.isConnected(), true);
    s1.disconnect();
    s2.disconnect();
  });

  test("a heartbeat is answered", async () => {
    const s = await connect(server, "hb");
    const ok = await new Promise((resolve) => {
      const ref = s.makeRef();
      s.onMessage(({ topic, event, ref: r, payload }) => {
        if (topic === "phoenix" && r === ref) resolve({ event, payload });
      });
      s.push({ topic: "phoenix", event: "heartbeat", payload: {}, ref });
    });
    assert.deepEqual(ok, { event: "phx_reply", payload: { status: "ok", response: {} } });
    await until(() => s.isConnected());
    s.disconnect();
  });
});

describe("cinder token", () => {
  test("mints a token the server accepts", async () => {
    const args = ["token", "--user-id", "42", "--jwt-secret", SECRET];
    const token = execFileSync(process.env.CINDER_BIN, args, { encoding: "utf8" }).trim();
    const socket = new Socket(server.socketUrl, { transport: WebSocket, params: { token } });
    await new Promise((resolve) => { socket.onOpen(resolve); socket.connect(); });
    const mine = socket.channel("user:42", {});
    assert.equal((await join(mine)).status, "ok", "the token carries user_id 42");
    socket.disconnect();
  });
});
