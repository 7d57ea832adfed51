// Channel lifecycle through the official client: plugin stop and crash, automatic rejoin
// into a fresh instance, duplicate joins, the channel cap.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { connect, join, next, push, startServer, until } from "./helpers.mjs";

let server;
before(async () => { server = await startServer(["--max-channels-per-socket", "3"]); });
after(async () => { await server.stop(); });

describe("channel lifecycle", () => {
  test("a plugin stop closes the channel with phx_close", async () => {
    const s = await connect(server, "1");
    const c = s.channel("bad:stop", {});
    await join(c);
    const closed = new Promise((resolve) => c.onClose(resolve));
    assert.deepEqual(await push(c, "stop", {}), { status: "ok", response: { stopping: true } });
    await closed;
    assert.equal(c.state, "closed");
    s.disconnect();
  });

  test("a crash sends phx_error and the client rejoins a fresh instance by itself", async () => {
    const s = await connect(server, "2");
    const watcher = await connect(server, "3");
    const c = s.channel("bad:crash", {});
    const w = watcher.channel("bad:crash", {});
    await join(c);
    await join(w);
    assert.deepEqual(await push(c, "count", {}), { status: "ok", response: { count: 1 } });
    assert.deepEqual(await push(c, "count", {}), { status: "ok", response: { count: 2 } });

    let errors = 0;
    c.onError(() => { errors += 1; });
    let watcherErrors = 0;
    w.onError(() => { watcherErrors += 1; });
    c.push("panic", {});
    await until(() => errors > 0, 5000, "phx_error");
    await until(() => watcherErrors > 0, 5000, "phx_error for the other member of the room");

    await until(() => c.state === "joined" && w.state === "joined", 5000, "automatic rejoin");
    const fresh = await push(c, "count", {});
    assert.equal(fresh.status, "ok");
    assert.ok(fresh.response.count <= 2, `a fresh instance counts from the start, got ${fresh.response.count}`);
    assert.ok(s.isConnected(), "the socket stays connected");
    s.disconnect();
    watcher.disconnect();
  });

  test("a plugin error crashes only that channel; the room keeps its state", async () => {
    const s1 = await connect(server, "4");
    const s2 = await connect(server, "5");
    const c1 = s1.channel("bad:error", {});
    const c2 = s2.channel("bad:error", {});
    await join(c1);
    await join(c2);
    await push(c2, "count", {});
    let c2Errors = 0;
    c2.onError(() => { c2Errors += 1; });
    const errored = new Promise((resolve) => c1.onError(resolve));
    c1.push("error", {});
    await errored;
    assert.deepEqual(await push(c2, "count", {}), { status: "ok", response: { count: 3 } });
    assert.equal(c2Errors, 0);
    s1.disconnect();
    s2.disconnect();
  });

  test("a duplicate join closes the old channel and the new one works", async () => {
    const s = await connect(server, "6");
    const first = s.channel("room:lobby", {});
    await join(first);
    const second = s.channel("room:lobby", {});
    const firstClosed = new Promise((resolve) => first.onClose(resolve));
    assert.equal((await join(second)).status, "ok");
    await firstClosed;
    const got = next(second, "new_message");
    second.push("new_message", { body: "dup" });
    assert.deepEqual(await got, { body: "dup" });
    s.disconnect();
  });

  test("joins past the per-socket cap are refused", async () => {
    const s = await connect(server, "7");
    for (const t of ["bad:1", "bad:2", "bad:3"]) assert.equal((await join(s.channel(t, {}))).status, "ok");
    assert.deepEqual(await join(s.channel("bad:4", {})), { status: "error", response: { reason: "too many channels joined" } });
    s.disconnect();
  });

  test("timers from send-after reach handle_info", async () => {
    const s = await connect(server, "8");
    const c = s.channel("bad:timer", {});
    await join(c);
    const tick = next(c, "tick");
    c.push("later", { ms: 20 });
    assert.deepEqual(await tick, { tick: true });
    s.disconnect();
  });
});
