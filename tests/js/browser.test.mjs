// The pages Cinder serves, in a real browser (Debian's Chromium through playwright-core):
// two demo chat pages talk through their inputs and see each other in the presence list;
// the admin page signs in with the admin token, shows the plugins, a live room, a topic's
// presence and live rates, and activates and rolls back `counter` while a page counts,
// with the count kept. With SCREENSHOTS=<dir> it also saves the pictures docs/ shows.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { dirname, join as joinPath } from "node:path";
import { fileURLToPath } from "node:url";
import { UPLOADS, api, launchChromium, startServer, uploadPlugin } from "./helpers.mjs";

const PHOENIX_BUILD = joinPath(dirname(fileURLToPath(import.meta.url)), "node_modules", "phoenix", "priv", "static", "phoenix.min.js");
const SHOTS = process.env.SCREENSHOTS;

/** Resolves once the async `predicate` holds, checking every 20 ms for up to `ms`. */
async function until(predicate, ms, what) {
  const deadline = Date.now() + ms;
  while (!(await predicate())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A demo page signed in as `user` (through the name form, or with `?token=`). */
async function chatPage(browser, server, user, { token } = {}) {
  const page = await browser.newPage({ viewport: { width: 1000, height: 640 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.errors = errors;
  if (token) {
    await page.goto(`${server.http}/demo?token=${encodeURIComponent(token)}`);
  } else {
    await page.goto(`${server.http}/demo`);
    await page.fill("[data-test='name-input']", user);
    await page.press("[data-test='name-input']", "Enter");
  }
  await page.waitForSelector("text=joined room:lobby", { timeout: 10000 });
  return page;
}

/** The users in a page's presence list. */
const present = (page) => page.$$eval("[data-test='presence'] li", (items) => items.map((i) => i.dataset.user).sort());

/** The texts of a page's message list (without their time). */
const heard = (page) => page.$$eval("[data-test='messages'] li", (items) => items.map((i) => i.lastChild.textContent));

describe("the demo chat and the admin page in Chromium", () => {
  let server;
  let browser;
  let alice;
  let bob;
  before(async () => {
    // As `make run` starts it: no secrets given, so they are generated and the demo page
    // may mint its tokens.
    server = await startServer([], { generatedSecrets: true });
    browser = await launchChromium();
  });
  after(async () => {
    await browser?.close();
    await server?.stop();
  });

  test("the page's phoenix build is the official npm package's, byte for byte", async () => {
    const served = Buffer.from(await (await fetch(`${server.http}/assets/phoenix.min.js`)).arrayBuffer());
    assert.ok(served.equals(readFileSync(PHOENIX_BUILD)), "host/static/vendor/phoenix.min.js differs from node_modules/phoenix");
    // A browser at / gets the landing page linking both pages; an API client gets JSON.
    const landing = await fetch(`${server.http}/`, { headers: { accept: "text/html" } }).then((r) => r.text());
    assert.match(landing, /href="\/demo"/);
    assert.match(landing, /href="\/admin"/);
    const about = await fetch(`${server.http}/`).then((r) => r.json());
    assert.equal(about.pages.demo, "/demo");
  });

  test("two chat pages talk through their inputs and see each other in the presence list", async () => {
    alice = await chatPage(browser, server, "alice");
    // The second page takes its token from the query, as a production page would.
    const minted = await fetch(`${server.http}/demo/token?user=bob`).then((r) => r.json());
    bob = await chatPage(browser, server, "bob", { token: minted.token });
    await until(async () => (await present(alice)).join() === "alice,bob" && (await present(bob)).join() === "alice,bob",
      10000, "both pages list alice and bob");

    const input = "[data-test='message-input']";
    await alice.fill(input, "hello from alice");
    await alice.press(input, "Enter");
    await until(async () => (await heard(bob)).includes("hello from alice"), 5000, "bob hears alice");
    // The input is cleared once the server said ok.
    await until(async () => (await alice.inputValue(input)) === "", 5000, "alice's input is cleared");
    await bob.fill(input, "hi alice <img src=x onerror=alert(1)>");
    await bob.press(input, "Enter");
    await until(async () => (await heard(alice)).includes("hi alice <img src=x onerror=alert(1)>"), 5000, "alice hears bob");
    // What a member sends is shown as text, never run as HTML.
    assert.equal(await alice.$$eval("[data-test='messages'] img", (imgs) => imgs.length), 0);
    assert.deepEqual(await heard(alice), ["hello from alice", "hi alice <img src=x onerror=alert(1)>"]);
    assert.deepEqual(await heard(bob), ["hello from alice", "hi alice <img src=x onerror=alert(1)>"]);
    if (SHOTS) await alice.screenshot({ path: joinPath(SHOTS, "chat.png") });

    // A page closing leaves the other's presence list.
    const carol = await chatPage(browser, server, "carol");
    await until(async () => (await present(alice)).includes("carol"), 5000, "alice sees carol");
    await carol.close();
    await until(async () => !(await present(alice)).includes("carol"), 5000, "carol left alice's list");
    assert.deepEqual([...alice.errors, ...bob.errors], []);
  });

  test("the admin page signs in, shows plugins, a live room, presence and rates, and moves counter while a page counts", async () => {
    const manifest = readFileSync(joinPath(UPLOADS, "counter-2.0.0.toml"), "utf8");
    const wasm = readFileSync(joinPath(UPLOADS, "counter-2.0.0.wasm"));
    assert.equal((await uploadPlugin(server, manifest, wasm, { activate: false })).status, 201);

    // A page counting: the official client in the browser pushes `inc` every 20 ms and
    // keeps every reply.
    const counting = alice ?? await chatPage(browser, server, "alice");
    const token = await fetch(`${server.http}/demo/token?user=counter-page`).then((r) => r.json()).then((b) => b.token);
    await counting.evaluate((token) => new Promise((resolve, reject) => {
      const socket = new window.Phoenix.Socket("/socket", { params: { token } });
      socket.connect();
      const room = socket.channel("counter:browser", {});
      window.counts = [];
      room.join().receive("ok", () => {
        window.counting = setInterval(() => {
          room.push("inc", {}).receive("ok", (r) => window.counts.push([r.count, r.version ?? "1.0.0"]));
        }, 20);
        resolve();
      }).receive("error", reject);
    }), token);
    await until(async () => (await counting.evaluate(() => window.counts.length)) >= 5, 5000, "the page counts");

    const admin = await browser.newPage({ viewport: { width: 1200, height: 1000 } });
    const errors = [];
    admin.on("pageerror", (e) => errors.push(String(e)));
    await admin.goto(`${server.http}/admin`);
    // Nothing is shown without the token; a wrong one is refused.
    assert.equal(await admin.isVisible("[data-test='plugins']"), false);
    await admin.fill("[data-test='admin-token']", "not-the-token");
    await admin.click("[data-test='sign-in']");
    await admin.waitForSelector("text=That is not the admin token.");
    await admin.fill("[data-test='admin-token']", server.adminToken);
    await admin.click("[data-test='sign-in']");
    await admin.waitForSelector("[data-test='plugins'] tr[data-plugin='counter']");
    for (const name of ["chat", "counter", "presence"]) {
      assert.ok(await admin.$(`[data-test='plugins'] tr[data-plugin='${name}']`), `${name} listed`);
    }
    assert.equal(await admin.getAttribute("tr[data-plugin='counter']", "data-active"), "1.0.0");
    // The live rooms, with their channels here.
    await admin.waitForSelector("[data-test='rooms'] tr[data-topic='room:lobby']");
    const lobby = await admin.$$eval("[data-test='rooms'] tr[data-topic='room:lobby'] td", (tds) => tds.map((t) => t.textContent));
    assert.deepEqual(lobby.slice(0, 4), ["room:lobby", "chat", "0.1.0", "2"]);
    await admin.waitForSelector("[data-test='rooms'] tr[data-topic='counter:browser']");
    // A topic's presence.
    await admin.fill("[data-test='presence-topic']", "presence:lobby");
    await admin.press("[data-test='presence-topic']", "Enter");
    await admin.waitForSelector("[data-test='presence-list'] li[data-key='alice']");
    await admin.waitForSelector("[data-test='presence-list'] li[data-key='bob']");
    // Live rates: the counting page makes about 50 messages a second.
    await until(async () => Number(await admin.textContent("[data-test='rate-messages']")) > 10, 8000, "a message rate");
    await until(async () => /µs|ms/.test(await admin.textContent("[data-test='rate-p99']")), 8000, "a call p99");
    assert.equal(await admin.textContent("[data-test='node-summary']").then((t) => /standalone|room\(s\)/.test(t)), true);

    // Activate 2.0.0 from the page while the page counts.
    await admin.click("[data-test='activate'][data-plugin='counter'][data-version='2.0.0']");
    await admin.waitForSelector("[data-test='action-result'].ok");
    assert.match(await admin.textContent("[data-test='action-result']"), /activate counter 2\.0\.0: done: 1\/1 live room/);
    await until(async () => (await admin.getAttribute("tr[data-plugin='counter']", "data-active")) === "2.0.0", 5000, "2.0.0 active");
    await until(async () => (await counting.evaluate(() => window.counts.at(-1)[1])) === "2.0.0", 5000, "replies from 2.0.0");
    if (SHOTS) await admin.screenshot({ path: joinPath(SHOTS, "admin.png"), fullPage: true });
    // And roll back.
    await admin.click("[data-test='rollback'][data-plugin='counter']");
    await until(async () => /roll back counter: done: 1\/1/.test(await admin.textContent("[data-test='action-result']")), 5000, "rolled back");
    await until(async () => (await counting.evaluate(() => window.counts.at(-1)[1])) === "1.0.0", 5000, "replies from 1.0.0 again");
    await until(async () => (await counting.evaluate(() => window.counts.filter(([, v]) => v === "1.0.0").length)) > 20, 5000, "counting on");

    const counts = await counting.evaluate(() => { clearInterval(window.counting); return window.counts; });
    // The count was kept through both swaps: every reply is the one before plus one.
    const numbers = counts.map(([n]) => n);
    assert.deepEqual(numbers, numbers.map((_, i) => numbers[0] + i), `counts ${numbers.join(",")}`);
    // The replies came from 1.0.0, then 2.0.0, then 1.0.0 again.
    const runs = counts.map(([, v]) => v).filter((v, i, all) => i === 0 || all[i - 1] !== v);
    assert.deepEqual(runs, ["1.0.0", "2.0.0", "1.0.0"], JSON.stringify(counts));
    assert.deepEqual(errors, []);

    // Signing out forgets the token; an API call without it is refused.
    await admin.click("[data-test='sign-out']");
    assert.equal(await admin.isVisible("[data-test='plugins']"), false);
    assert.equal((await fetch(`${server.http}/api/plugins`)).status, 401);
    await admin.close();
  });
});

describe("a server given its secret", () => {
  test("mints no demo tokens, and the page says how to sign in instead", async () => {
    const server = await startServer();
    const browser = await launchChromium();
    try {
      assert.equal((await fetch(`${server.http}/demo/token?user=eve`)).status, 404);
      const page = await browser.newPage();
      await page.goto(`${server.http}/demo`);
      await page.fill("[data-test='name-input']", "eve");
      await page.press("[data-test='name-input']", "Enter");
      await page.waitForSelector("text=development tokens are off");
      assert.equal((await api(server, "GET", "/api/stats")).status, 200);
    } finally {
      await browser.close();
      await server.stop();
    }
  });
});
