// SIGTERM to the real binary: every socket is closed with 1012 (so clients reconnect
// elsewhere) and the process exits within a bounded time.
import assert from "node:assert/strict";
import { test } from "node:test";
import { connect, join, startServer } from "./helpers.mjs";

test("SIGTERM closes sockets with 1012 and the server exits promptly", async () => {
  const server = await startServer();
  const clients = await Promise.all([1, 2, 3].map((i) => connect(server, `u${i}`, { reconnectAfterMs: () => 60000 })));
  await Promise.all(clients.map((s) => join(s.channel("room:lobby", {}))));
  const codes = clients.map((s) => new Promise((resolve) => s.onClose((event) => resolve(event.code))));
  const started = Date.now();
  server.child.kill("SIGTERM");
  assert.deepEqual(await Promise.all(codes), [1012, 1012, 1012]);
  const { code } = await server.exited;
  assert.equal(code, 0, "clean exit");
  assert.ok(Date.now() - started < 10000, "stopped within the shutdown grace");
  clients.forEach((s) => s.disconnect());
  await server.stop();
});
