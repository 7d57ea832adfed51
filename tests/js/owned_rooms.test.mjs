// Single-owner rooms, driven by the official client: three Cinder nodes (the real binary)
// on a redis-server this file starts on a free port, counter members on every node. The
// `counter` example is placed on an owner and saves after every message: one count for
// the cluster, whichever node a member is on, that survives its owner being killed or
// paused, and moves with its count when a new version is activated anywhere.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join as joinPath } from "node:path";
import { after, before, describe, test } from "node:test";
import { UPLOADS, api, connect, freePort, join, push, startRedis, startServer, until, uploadPlugin } from "./helpers.mjs";

const DOWN_MS = 2000;
let port;
let redis;
let nodes;
const member = (id) => ["--redis", `redis://127.0.0.1:${port}`, "--node-id", id, "--node-down-ms", String(DOWN_MS)];

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

/**
 * A member of `topic` on `server` as `user`: the counts it sees broadcast, the counts its
 * own pushes got, how often its channel errored, and a push loop to start and stop.
 */
async function counterMember(server, user, topic) {
  const socket = await connect(server, user);
  const channel = socket.channel(topic, {});
  const seen = [];
  const replies = [];
  let errors = 0;
  channel.on("count", ({ count }) => seen.push(count));
  channel.onError(() => { errors += 1; });
  const joined = await join(channel);
  assert.equal(joined.status, "ok", JSON.stringify(joined));
  let timer = null;
  return {
    socket,
    channel,
    seen,
    replies,
    joined: joined.response,
    errors: () => errors,
    /** Pushes `inc` every `ms` until stopped, keeping each reply's count. */
    start(ms) {
      timer = setInterval(() => {
        channel.push("inc", {}, 10000).receive("ok", ({ count }) => replies.push(count));
      }, ms);
    },
    stop() { clearInterval(timer); },
  };
}

/** Whether `xs` only goes up. */
const increasing = (xs) => xs.every((x, i) => i === 0 || xs[i - 1] < x);

/** A node's counter. */
const counterOf = async (server, name) => (await api(server, "GET", "/api/stats")).body[name];

describe("owned rooms on a cluster of three nodes", () => {
  test("members on every node pushing at once see one sequence, identical everywhere, with no gap or duplicate", async () => {
    const members = [];
    for (const [server, user] of [[nodes[0], "alice"], [nodes[1], "bob"], [nodes[2], "carol"]]) {
      members.push(await counterMember(server, user, "counter:together"));
    }
    const each = 30;
    const pushes = [];
    for (let i = 0; i < each; i++) {
      for (const m of members) pushes.push(push(m.channel, "inc", {}));
    }
    const answers = await Promise.all(pushes);
    assert.ok(answers.every((a) => a.status === "ok"), JSON.stringify(answers.find((a) => a.status !== "ok")));
    const total = each * members.length;
    const all = Array.from({ length: total }, (_, i) => i + 1);
    assert.deepEqual(answers.map((a) => a.response.count).sort((x, y) => x - y), all, "every inc got its own count");
    for (const m of members) await until(() => m.seen.length >= total, 5000, "every count broadcast");
    for (const m of members) assert.deepEqual(m.seen, all, "the same sequence at every member");
    // One node ran the room: the others forwarded to it.
    const won = await Promise.all(nodes.map((n) => counterOf(n, "room_leases_won")));
    assert.equal(won.reduce((x, y) => x + y, 0), 1, `leases won per node: ${won}`);
    for (const m of members) m.socket.disconnect();
  });

  test("counter 2.0.0 activated through a node that does not own the room moves the room with its count", async () => {
    const [a, b, c] = nodes;
    // a owns the room: its member joins first.
    const members = [await counterMember(a, "alice", "counter:upgraded")];
    members.push(await counterMember(c, "carol", "counter:upgraded"));
    for (let i = 1; i <= 5; i++) assert.equal((await push(members[1].channel, "inc", {})).response.count, i);
    const manifest = readFileSync(joinPath(UPLOADS, "counter-2.0.0.toml"), "utf8");
    const wasm = readFileSync(joinPath(UPLOADS, "counter-2.0.0.wasm"));
    const up = await uploadPlugin(b, manifest, wasm);
    assert.equal(up.status, 201, JSON.stringify(up.body));
    assert.deepEqual(up.body.activation.nodes, { a: { version: "2.0.0" }, b: { version: "2.0.0" }, c: { version: "2.0.0" } });
    for (const m of members) {
      const { status, response } = await push(m.channel, "inc", { by: 10 });
      assert.equal(status, "ok");
      assert.equal(response.version, "2.0.0");
    }
    // 5, then +10 twice under 2.0.0: the count moved with the room.
    assert.equal((await push(members[0].channel, "get", {})).response.count, 25);
    for (const m of members) assert.equal(m.errors(), 0, "no member's channel errored");
    for (const m of members) m.socket.disconnect();
    // Back to 1.0.0 for the tests after this one.
    const back = await api(a, "POST", "/api/plugins/counter/rollback");
    assert.equal(back.status, 200, JSON.stringify(back.body));
  });

  test("the owner killed with SIGKILL while members push: the room moves to a survivor from its last count", async () => {
    const doomed = await startServer(member("doomed"));
    const topic = "counter:killed";
    const owner = await counterMember(doomed, "dave", topic);
    const survivors = [await counterMember(nodes[0], "alice", topic), await counterMember(nodes[1], "bob", topic)];
    for (const m of survivors) m.start(50);
    await until(() => survivors.every((m) => m.replies.length >= 10), 5000, "counting before the kill");
    const before = Math.max(...survivors.flatMap((m) => m.seen));
    const killed = Date.now();
    doomed.child.kill("SIGKILL");
    await until(() => survivors.every((m) => m.seen.some((n) => n > before + 5)), 10000, "counting after the kill");
    const movedIn = Date.now() - killed;
    for (const m of survivors) m.stop();
    await new Promise((r) => setTimeout(r, 300));
    for (const m of survivors) {
      assert.ok(increasing(m.seen), `only up, never back: ${m.seen}`);
      // Saved after every message: what a member saw is never undone. The one message a
      // kill can cut between its save and its broadcast shows as one skipped number.
      const gaps = m.seen.slice(1).map((n, i) => n - m.seen[i]).filter((d) => d > 1);
      assert.ok(gaps.every((d) => d === 2) && gaps.length <= 1, `at most one number skipped: ${m.seen}`);
      assert.equal(m.channel.state, "joined");
      assert.equal(m.errors(), 0, "the member kept its channel");
    }
    // One room for both: the same last count, and no count given to two incs.
    assert.equal(survivors[0].seen.at(-1), survivors[1].seen.at(-1));
    const replies = survivors.flatMap((m) => m.replies);
    assert.equal(new Set(replies).size, replies.length, "no count was given to two incs");
    assert.ok(movedIn < 3 * DOWN_MS, `moved in ${movedIn} ms`);
    owner.socket.disconnect();
    for (const m of survivors) m.socket.disconnect();
    await doomed.stop();
  });

  test("the owner paused past its lease (SIGSTOP) and resumed: never two owners, no count applied twice", async () => {
    const paused = await startServer(member("paused"));
    const topic = "counter:paused";
    const members = [await counterMember(paused, "paula", topic)];
    members.push(await counterMember(nodes[0], "alice", topic), await counterMember(nodes[2], "carol", topic));
    for (const m of members) m.start(50);
    await until(() => members.every((m) => m.replies.length >= 5), 5000, "counting before the pause");
    paused.child.kill("SIGSTOP");
    const stoppedAt = Math.max(...members.flatMap((m) => m.seen));
    await until(() => members.slice(1).every((m) => m.seen.some((n) => n > stoppedAt + 5)), 10000, "a survivor took the room over");
    await new Promise((r) => setTimeout(r, DOWN_MS));
    paused.child.kill("SIGCONT");
    // The stale owner does not act: its own member errors once, rejoins through the new
    // owner, and counts on with everyone.
    await until(() => members[0].errors() >= 1 && members[0].channel.state === "joined", 10000, "the paused node's member rejoined");
    const resumedAt = Math.max(...members.flatMap((m) => m.seen));
    await until(() => members.every((m) => m.replies.some((n) => n > resumedAt + 5)), 10000, "everyone counting after the resume");
    for (const m of members) m.stop();
    await new Promise((r) => setTimeout(r, 500));
    const replies = members.flatMap((m) => m.replies);
    assert.equal(new Set(replies).size, replies.length, "no count was given to two incs");
    for (const m of members.slice(1)) {
      assert.ok(increasing(m.seen), `only up, never back: ${m.seen}`);
      assert.equal(m.errors(), 0, "a survivor's member kept its channel");
    }
    assert.ok((await counterOf(paused, "room_leases_lost")) >= 1, "the paused node stepped down");
    for (const m of members) m.socket.disconnect();
    await paused.stop();
  });
});
