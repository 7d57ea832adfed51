// The article's NotificationChannel and NotificationService.notify_user: per-user topics,
// server push through POST /api/broadcast, mark_read.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { ADMIN, apiBroadcast, connect, join, next, push, startServer } from "./helpers.mjs";

let server;
before(async () => { server = await startServer(); });
after(async () => { await server.stop(); });

describe("notifications plugin (user:*)", () => {
  test("a user joins only their own topic", async () => {
    const s = await connect(server, "42");
    assert.equal((await join(s.channel("user:42", {}))).status, "ok");
    assert.deepEqual(await join(s.channel("user:7", {})), { status: "error", response: { reason: "unauthorized" } });
    s.disconnect();
  });

  test("a notification pushed through the API arrives and can be marked read", async () => {
    const s = await connect(server, "42");
    const other = await connect(server, "7");
    const mine = s.channel("user:42", {});
    const theirs = other.channel("user:7", {});
    await join(mine);
    await join(theirs);
    let leaked = 0;
    theirs.on("notification", () => { leaked += 1; });

    const arrived = next(mine, "notification");
    const res = await apiBroadcast(server, { topic: "user:42", event: "notification", payload: { id: 1, text: "hello" } });
    assert.equal(res.status, 202);
    assert.deepEqual(await arrived, { id: 1, text: "hello" });

    const marked = next(mine, "notification_marked_read");
    assert.deepEqual(await push(mine, "mark_read", { notification_id: 1 }), { status: "ok", response: {} });
    assert.deepEqual(await marked, { id: 1 });

    assert.deepEqual(await push(mine, "mark_read", { notification_id: 1 }), { status: "error", response: { reason: "failed" } });
    assert.deepEqual(await push(mine, "mark_read", { notification_id: 999 }), { status: "error", response: { reason: "failed" } });
    assert.equal(leaked, 0, "another user's topic gets nothing");
    s.disconnect();
    other.disconnect();
  });

  test("every tab of a user receives the push", async () => {
    const tab1 = await connect(server, "5");
    const tab2 = await connect(server, "5");
    const c1 = tab1.channel("user:5", {});
    const c2 = tab2.channel("user:5", {});
    await join(c1);
    await join(c2);
    const both = Promise.all([next(c1, "notification"), next(c2, "notification")]);
    await apiBroadcast(server, { topic: "user:5", event: "notification", payload: { id: "n-1" } });
    assert.deepEqual(await both, [{ id: "n-1" }, { id: "n-1" }]);
    tab1.disconnect();
    tab2.disconnect();
  });
});

describe("POST /api/broadcast", () => {
  test("401 without the admin token or with a wrong one", async () => {
    const body = { topic: "room:lobby", event: "x", payload: {} };
    const missing = await apiBroadcast(server, body, null);
    assert.equal(missing.status, 401);
    assert.match((await missing.json()).error, /missing admin token/);
    const wrong = await apiBroadcast(server, body, "nope");
    assert.equal(wrong.status, 401);
    assert.match((await wrong.json()).error, /wrong admin token/);
  });

  test("400 with a clear message for a bad body", async () => {
    for (const [body, pattern] of [
      ["not json", /body must be JSON/],
      [{ topic: "room:lobby", event: "x" }, /payload/],
      [{ topic: "room:lobby", payload: {} }, /event/],
      [{ topic: 5, event: "x", payload: {} }, /topic|string/],
      [{ topic: "room:lobby", event: "phx_close", payload: {} }, /reserved/],
      [{ topic: "", event: "x", payload: {} }, /empty/],
    ]) {
      const res = await apiBroadcast(server, body);
      assert.equal(res.status, 400, JSON.stringify(body));
      assert.match((await res.json()).error, pattern);
    }
  });

  test("a broadcast reaches every subscriber of a chat room", async () => {
    const s1 = await connect(server, "a");
    const s2 = await connect(server, "b");
    const c1 = s1.channel("room:lobby", {});
    const c2 = s2.channel("room:lobby", {});
    await join(c1);
    await join(c2);
    const got = Promise.all([next(c1, "announcement"), next(c2, "announcement")]);
    const res = await apiBroadcast(server, { topic: "room:lobby", event: "announcement", payload: { text: "maintenance" } });
    assert.equal(res.status, 202);
    assert.deepEqual(await got, [{ text: "maintenance" }, { text: "maintenance" }]);
    s1.disconnect();
    s2.disconnect();
  });
});
