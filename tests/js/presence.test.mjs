// Presence owned by the host, read by the official client's Presence class.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { Presence } from "phoenix";
import { connect, join, next, push, startServer, until } from "./helpers.mjs";

let server;
before(async () => { server = await startServer(); });
after(async () => { await server.stop(); });

/** A channel with a Presence attached before the join, and a live view of its list. */
function watch(socket, topic, params = {}) {
  const channel = socket.channel(topic, params);
  const presence = new Presence(channel);
  const view = { channel, presence, synced: 0, joined: [], left: [] };
  presence.onSync(() => { view.synced += 1; });
  presence.onJoin((key, current) => { if (!current) view.joined.push(key); });
  presence.onLeave((key, current) => { if (current.metas.length === 0) view.left.push(key); });
  view.keys = () => presence.list((key) => key).sort();
  view.metas = (key) => presence.list((k, { metas }) => (k === key ? metas : null)).find(Boolean) ?? [];
  return view;
}

describe("presence (presence:*)", () => {
  test("first sync lists the joiner with online_at", async () => {
    const s = await connect(server, "alice");
    const v = watch(s, "presence:first");
    assert.equal((await join(v.channel)).status, "ok");
    await until(() => v.synced > 0, 3000, "first sync");
    assert.deepEqual(v.keys(), ["alice"]);
    const [meta] = v.metas("alice");
    assert.ok(Math.abs(meta.online_at - Date.now() / 1000) < 60, "online_at is now, in seconds");
    assert.equal(typeof meta.phx_ref, "string");
    s.disconnect();
  });

  test("joins and leaves on disconnect reach the others, with user_joined and user_left", async () => {
    const a = await connect(server, "alice");
    const va = watch(a, "presence:room");
    await join(va.channel);
    await until(() => va.keys().includes("alice"), 3000, "alice sees herself");

    const joinedEvent = next(va.channel, "user_joined");
    const b = await connect(server, "bob");
    const vb = watch(b, "presence:room");
    await join(vb.channel);
    const joined = await joinedEvent;
    assert.equal(joined.user_id, "bob");
    assert.equal(typeof joined.meta.online_at, "number");
    await until(() => va.keys().join() === "alice,bob", 3000, "alice sees bob");
    await until(() => vb.keys().join() === "alice,bob", 3000, "bob sees alice");
    assert.ok(va.joined.includes("bob"));

    const leftEvent = next(va.channel, "user_left");
    b.disconnect();
    assert.deepEqual(await leftEvent, { user_id: "bob" });
    await until(() => va.keys().join() === "alice", 3000, "bob left alice's list");
    assert.ok(va.left.includes("bob"));
    a.disconnect();
  });

  test("several tabs of one user are one key with several metas", async () => {
    const watcher = await connect(server, "watcher");
    const v = watch(watcher, "presence:tabs");
    await join(v.channel);
    const tab1 = await connect(server, "carol");
    const tab2 = await connect(server, "carol");
    await join(tab1.channel("presence:tabs", {}));
    await join(tab2.channel("presence:tabs", {}));
    await until(() => v.metas("carol").length === 2, 3000, "two metas for carol");
    assert.deepEqual(v.keys(), ["carol", "watcher"]);
    tab1.disconnect();
    await until(() => v.metas("carol").length === 1, 3000, "one tab left");
    assert.deepEqual(v.keys(), ["carol", "watcher"], "carol is still present");
    tab2.disconnect();
    await until(() => !v.keys().includes("carol"), 3000, "carol gone");
    watcher.disconnect();
  });

  test("a metadata update replaces the meta (phx_ref_prev) without a leave of the key", async () => {
    const a = await connect(server, "dora");
    const b = await connect(server, "eve");
    const va = watch(a, "presence:update");
    const vb = watch(b, "presence:update");
    await join(va.channel);
    await join(vb.channel);
    await until(() => vb.keys().includes("dora"), 3000, "eve sees dora");
    const before = vb.metas("dora")[0];
    assert.deepEqual(await push(va.channel, "update", { status: "away" }), { status: "ok", response: {} });
    await until(() => vb.metas("dora")[0]?.status === "away", 3000, "eve sees dora away");
    const metas = vb.metas("dora");
    assert.equal(metas.length, 1);
    assert.equal(metas[0].online_at, before.online_at, "the rest of the meta is kept");
    assert.notEqual(metas[0].phx_ref, before.phx_ref);
    assert.equal(metas[0].phx_ref_prev, before.phx_ref);
    assert.ok(!vb.left.includes("dora"), "an update is not a leave of the key");
    a.disconnect();
    b.disconnect();
  });

  test("when a room crashes its entries leave", async () => {
    const survivor = await connect(server, "frank");
    const gone = await connect(server, "gina", { rejoinAfterMs: () => 60000 });
    const vs = watch(survivor, "bad:presence", { track: "frank" });
    const vg = watch(gone, "bad:presence", { track: "gina" });
    await join(vs.channel);
    await join(vg.channel);
    await until(() => vs.keys().join() === "frank,gina", 3000, "both present");
    const errored = new Promise((resolve) => vs.channel.onError(resolve));
    vs.channel.push("panic", {});
    await errored;
    // The survivor's client rejoins by itself (and tracks again); gina's does not.
    await until(() => vs.channel.state === "joined", 5000, "automatic rejoin");
    await until(() => vs.keys().join() === "frank", 5000, "gina's entry left with the crashed room");
    assert.ok(vs.left.includes("gina"));
    survivor.disconnect();
    gone.disconnect();
  });
});
