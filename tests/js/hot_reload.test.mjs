// Plugin versions with the official client connected: upload, hot reload under continuous
// traffic (no socket closed, no message lost, the counter's state kept), rollback, bad
// uploads refused while the running version serves, a restart that keeps the active
// version without recompiling, a server killed mid-upload, and `serve --watch`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { copyFileSync, readFileSync, readdirSync, rmSync } from "node:fs";
import { connect as netConnect } from "node:net";
import { join as joinPath } from "node:path";
import { promisify } from "node:util";
import {
  ADMIN, BIN, PLUGINS, RUST_PLUGINS, UPLOADS, api, connect, join, push, startServer, tempDir, until, uploadPlugin,
} from "./helpers.mjs";

const run = promisify(execFile);
const V2_MANIFEST = readFileSync(joinPath(UPLOADS, "counter-2.0.0.toml"), "utf8");
const V2_WASM = readFileSync(joinPath(UPLOADS, "counter-2.0.0.wasm"));
// Continuous traffic from one socket is far above the default per-socket rate limit.
const UNLIMITED = ["--messages-per-sec", "100000", "--message-burst", "100000"];

const range = (n) => Array.from({ length: n }, (_, i) => i + 1);

/** A joined counter channel on a fresh socket, with everything that could go wrong recorded. */
async function counterMember(server, user, topic, trouble) {
  const socket = await connect(server, user);
  socket.onClose((e) => trouble.push(`${user} socket closed ${e?.code}`));
  socket.onError(() => trouble.push(`${user} socket error`));
  const channel = socket.channel(topic);
  channel.onError(() => trouble.push(`${user} channel crashed`));
  channel.onClose(() => trouble.push(`${user} channel closed`));
  const joined = await join(channel);
  assert.equal(joined.status, "ok");
  return { socket, channel, joined };
}

async function cli(server, ...args) {
  const { stdout } = await run(BIN, ["plugin", ...args, "--server", server.http, "--admin-token", ADMIN]);
  return stdout;
}

test("v2 goes live and rolls back under continuous traffic: no message lost, no socket closed, the count kept", async () => {
  const server = await startServer(UNLIMITED);
  const trouble = [];
  try {
    const topic = "counter:live";
    const a = await counterMember(server, "a", topic, trouble);
    const b = await counterMember(server, "b", topic, trouble);
    const c = await counterMember(server, "c", topic, trouble);
    const seen = { b: [], c: [] };
    b.channel.on("count", (p) => seen.b.push(p.count));
    c.channel.on("count", (p) => seen.c.push(p.count));

    // `a` pushes `inc` every millisecond, never waiting for replies.
    const replies = [];
    const inflight = [];
    let sent = 0;
    const pump = setInterval(() => {
      sent += 1;
      inflight.push(push(a.channel, "inc", {}).then((r) => replies.push(r)));
    }, 1);
    const versionOf = (r) => r.response?.version ?? "1.0.0";
    try {
      await until(() => replies.length >= 100, 10000, "v1 replies");

      const uploaded = await uploadPlugin(server, V2_MANIFEST, V2_WASM);
      assert.equal(uploaded.status, 201, JSON.stringify(uploaded.body));
      const activation = uploaded.body.activation;
      assert.deepEqual([activation.rooms, activation.swapped, activation.failed], [1, 1, []]);
      assert.equal(activation.previous, "1.0.0");
      const { p50, p99, max } = activation.pause_us;
      assert.ok(Number.isInteger(p50) && p50 <= p99 && p99 <= max, JSON.stringify(activation.pause_us));
      await until(() => replies.some((r) => versionOf(r) === "2.0.0"), 5000, "v2 replies");
      const atV2 = replies.length;
      await until(() => replies.length >= atV2 + 100, 10000, "more v2 replies");

      const rolled = await api(server, "POST", "/api/plugins/counter/rollback");
      assert.equal(rolled.status, 200, JSON.stringify(rolled.body));
      assert.deepEqual([rolled.body.version, rolled.body.swapped, rolled.body.failed], ["1.0.0", 1, []]);
      const atRollback = replies.length;
      await until(() => replies.length >= atRollback + 100 && versionOf(replies.at(-1)) === "1.0.0",
        10000, "v1 replies again");
    } finally {
      clearInterval(pump);
    }
    await Promise.all(inflight);

    // Every push answered ok, in order, each count exactly once: nothing lost or repeated.
    assert.deepEqual(replies.filter((r) => r.status !== "ok"), []);
    assert.equal(replies.length, sent);
    assert.deepEqual(replies.map((r) => r.response.count), range(sent));
    // Version 1, then 2, then 1 again, each a contiguous run.
    const runs = replies.map(versionOf).filter((v, i, all) => i === 0 || all[i - 1] !== v);
    assert.deepEqual(runs, ["1.0.0", "2.0.0", "1.0.0"]);
    // The other members saw every broadcast, in order.
    await until(() => seen.b.length === sent && seen.c.length === sent, 5000, "every broadcast");
    assert.deepEqual(seen.b, range(sent));
    assert.deepEqual(seen.c, range(sent));
    assert.deepEqual(trouble, []);
  } finally {
    await server.stop();
  }
});

test("bad uploads are refused with the reason while the running version keeps serving", async () => {
  const server = await startServer();
  const trouble = [];
  try {
    const topic = "counter:bad";
    const a = await counterMember(server, "a", topic, trouble);
    assert.deepEqual((await push(a.channel, "inc", {})).response, { count: 1 });
    const manifest = (name, version, topics = '["counter:*"]') =>
      `name = "${name}"\nversion = "${version}"\ntopics = ${topics}\n`;
    const bad = [
      ["not wasm", manifest("counter", "9.0.0"), Buffer.from("hello"), 422, "not a loadable component"],
      ["a core module", manifest("counter", "9.0.0"), Buffer.from([0, 0x61, 0x73, 0x6d, 1, 0, 0, 0]), 422, "not a loadable component"],
      ["an empty component", manifest("counter", "9.0.0"), Buffer.from([0, 0x61, 0x73, 0x6d, 0x0d, 0, 1, 0]), 422, "missing export cinder:channel/handler"],
      ["a clashing pattern", manifest("thief", "1.0.0", '["counter:x"]'), V2_WASM, 409, "overlaps"],
      ["a stored version with other bytes", manifest("counter", "1.0.0"), V2_WASM, 409, "immutable"],
      ["a manifest that is not TOML", "name = ", V2_WASM, 400, "manifest"],
    ];
    for (const [what, text, wasm, status, words] of bad) {
      const r = await uploadPlugin(server, text, wasm);
      assert.equal(r.status, status, `${what}: ${JSON.stringify(r.body)}`);
      assert.match(r.body.error, new RegExp(words), what);
    }
    assert.deepEqual((await push(a.channel, "inc", {})).response, { count: 2 });
    const list = await api(server, "GET", "/api/plugins");
    const counter = list.body.find((p) => p.name === "counter");
    assert.equal(counter.active, "1.0.0");
    assert.deepEqual(counter.versions.map((v) => v.version), ["1.0.0"]);
    assert.equal(counter.live_rooms, 1);
    assert.deepEqual(trouble, []);
  } finally {
    await server.stop();
  }
});

test("a restart keeps the active version and loads it from the artifact cache; the CLI pushes, lists and rolls back", async () => {
  const dataDir = tempDir();
  try {
    let server = await startServer([], { dataDir, cacheDir: null, plugins: RUST_PLUGINS });
    const first = await api(server, "GET", "/api/stats");
    assert.ok(first.body.artifact_compiles >= 5, JSON.stringify(first.body));
    const pushed = await cli(server, "push", joinPath(UPLOADS, "counter-2.0.0.wasm"));
    assert.match(pushed, /counter 2\.0\.0 stored/);
    assert.match(pushed, /counter 2\.0\.0 active \(was 1\.0\.0\)/);
    assert.match(await cli(server, "list"), /counter {2}active 2\.0\.0 {2}topics counter:\*/);
    await server.stop();

    server = await startServer([], { dataDir, cacheDir: null, plugins: RUST_PLUGINS });
    try {
      const trouble = [];
      const a = await counterMember(server, "a", "counter:after", trouble);
      assert.deepEqual(a.joined.response, { count: 0, version: "2.0.0" });
      const stats = (await api(server, "GET", "/api/stats")).body;
      assert.equal(stats.artifact_compiles, 0, "nothing recompiled");
      assert.ok(stats.artifact_cache_hits >= 5, JSON.stringify(stats));

      assert.match(await cli(server, "rollback", "counter"), /counter 1\.0\.0 active \(was 2\.0\.0\): 1 of 1 live rooms moved/);
      assert.deepEqual((await push(a.channel, "inc", {})).response, { count: 1 });
      await assert.rejects(cli(server, "rollback", "counter"), /409 Conflict: plugin counter has no earlier version/);
      assert.deepEqual(trouble, []);
    } finally {
      await server.stop();
    }
  } finally {
    rmSync(dataDir, { recursive: true, force: true });
  }
});

/** Sends an upload's headers and half its body, so the server is mid-upload. */
function halfUpload(server) {
  const boundary = "cinderkill";
  const body = Buffer.concat([
    Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="manifest"\r\n\r\n${V2_MANIFEST}\r\n`),
    Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="wasm"\r\n\r\n`),
    V2_WASM,
    Buffer.from(`\r\n--${boundary}--\r\n`),
  ]);
  const [host, port] = server.addr.split(":");
  return new Promise((resolve) => {
    const s = netConnect({ host, port: Number(port) }, () => {
      s.write(`POST /api/plugins HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${ADMIN}\r\n`
        + `Content-Type: multipart/form-data; boundary=${boundary}\r\nContent-Length: ${body.length}\r\n\r\n`);
      s.write(body.subarray(0, body.length >> 1), () => resolve(s));
    });
    s.on("error", () => {});
  });
}

test("a server killed mid-upload restarts with the old or the new version, never a broken one", async () => {
  const dataDir = tempDir();
  const versionsDir = joinPath(dataDir, "plugins", "counter", "versions");
  try {
    // First a kill while the body is still arriving, then kills at moments after a whole
    // upload was sent: while it compiles, writes, renames or activates.
    for (const delay of ["half", 0, 1, 3, 6, 10, 20, 40]) {
      const server = await startServer([], { dataDir, cacheDir: null, plugins: RUST_PLUGINS });
      if (delay === "half") {
        const s = await halfUpload(server);
        await new Promise((r) => setTimeout(r, 50));
        server.child.kill("SIGKILL");
        s.destroy();
      } else {
        uploadPlugin(server, V2_MANIFEST, V2_WASM).catch(() => {});
        await new Promise((r) => setTimeout(r, delay));
        server.child.kill("SIGKILL");
      }
      await server.exited;

      const again = await startServer([], { dataDir, cacheDir: null, plugins: RUST_PLUGINS });
      try {
        const list = (await api(again, "GET", "/api/plugins")).body;
        const counter = list.find((p) => p.name === "counter");
        const stored = counter.versions.map((v) => v.version);
        assert.ok(["1.0.0", "2.0.0"].includes(counter.active), `kill at ${delay}: active ${counter.active}`);
        assert.ok(stored.every((v) => v === "1.0.0" || v === "2.0.0"), `kill at ${delay}: ${stored}`);
        assert.deepEqual(readdirSync(versionsDir).filter((e) => e.startsWith(".")), [], "no leftovers");
        const trouble = [];
        const a = await counterMember(again, "a", `counter:kill${delay}`, trouble);
        assert.equal(a.joined.response.version ?? "1.0.0", counter.active, `kill at ${delay}: serves the active version`);
        a.socket.disconnect();
        // Back to the start for the next kill.
        if (stored.includes("2.0.0")) {
          if (counter.active === "2.0.0") {
            assert.equal((await api(again, "POST", "/api/plugins/counter/activate", { version: "1.0.0" })).status, 200);
          }
          assert.equal((await api(again, "DELETE", "/api/plugins/counter/versions/2.0.0")).status, 204);
        }
      } finally {
        await again.stop();
      }
    }
  } finally {
    rmSync(dataDir, { recursive: true, force: true });
  }
});

test("serve --watch reloads a rebuilt plugin into live rooms, state kept", async () => {
  const dir = tempDir("cinder-watch-");
  copyFileSync(joinPath(PLUGINS, "counter.wasm"), joinPath(dir, "counter.wasm"));
  copyFileSync(joinPath(PLUGINS, "counter.toml"), joinPath(dir, "counter.toml"));
  const server = await startServer(["--watch", dir], { plugins: null });
  const trouble = [];
  try {
    const a = await counterMember(server, "a", "counter:watch", trouble);
    assert.deepEqual((await push(a.channel, "inc", {})).response, { count: 1 });
    // "Rebuild": new bytes, same manifest version.
    copyFileSync(joinPath(UPLOADS, "counter-2.0.0.wasm"), joinPath(dir, "counter.wasm"));
    let last;
    const deadline = Date.now() + 10000;
    do {
      await new Promise((r) => setTimeout(r, 100));
      last = (await push(a.channel, "get", {})).response;
    } while (last.version !== "2.0.0" && Date.now() < deadline);
    assert.deepEqual(last, { count: 1, version: "2.0.0" });
    const counter = (await api(server, "GET", "/api/plugins")).body.find((p) => p.name === "counter");
    assert.match(counter.active, /^1\.0\.0\+[0-9a-f]{12}$/);
    assert.equal(counter.history.at(-1), "1.0.0");
    // Back to the original bytes: the stored 1.0.0 is active again.
    copyFileSync(joinPath(PLUGINS, "counter.wasm"), joinPath(dir, "counter.wasm"));
    const back = Date.now() + 10000;
    do {
      await new Promise((r) => setTimeout(r, 100));
      last = (await push(a.channel, "get", {})).response;
    } while (last.version !== undefined && Date.now() < back);
    assert.deepEqual(last, { count: 1 });
    assert.deepEqual(trouble, []);
  } finally {
    await server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});
