// The demo chat: the official `phoenix` browser build (window.Phoenix) on room:lobby, as
// in Phoenix's channels guide, with who is here from presence:lobby (the presence example
// plugin). The connect token comes from ?token=, or, on a development server (generated
// secrets), from GET /demo/token?user=<name>.
"use strict";
(() => {
  const { Socket, Presence } = window.Phoenix;
  const $ = (sel) => document.querySelector(sel);
  const status = $("#status");

  // Where the socket is mounted, as the server describes itself.
  async function endpoint() {
    const about = await fetch("/", { headers: { accept: "application/json" } }).then((r) => r.json());
    return about.socket.replace(/\/websocket$/, "");
  }

  function addMessage(text) {
    const item = document.createElement("li");
    const when = document.createElement("span");
    when.className = "muted";
    when.textContent = `[${new Date().toLocaleTimeString()}] `;
    item.append(when, document.createTextNode(text));
    const list = $("#messages");
    list.append(item);
    list.scrollTop = list.scrollHeight;
  }

  function showPresence(presence) {
    const list = $("#presence");
    list.replaceChildren();
    presence.list((id, { metas }) => {
      const item = document.createElement("li");
      item.textContent = metas.length > 1 ? `${id} (${metas.length})` : id;
      item.dataset.user = id;
      list.append(item);
    });
  }

  async function start(token) {
    $("#sign-in").hidden = true;
    $("#room").hidden = false;
    const socket = new Socket(await endpoint(), { params: { token } });
    socket.onOpen(() => { status.textContent = "connected"; });
    socket.onError(() => { status.textContent = "reconnecting"; });
    socket.connect();

    const lobby = socket.channel("room:lobby", {});
    lobby.on("new_message", (payload) => addMessage(payload.body));
    lobby.join()
      .receive("ok", () => { status.textContent = "joined room:lobby"; })
      .receive("error", (e) => { status.textContent = `join refused: ${JSON.stringify(e)}`; });

    const here = socket.channel("presence:lobby", {});
    const presence = new Presence(here);
    presence.onSync(() => showPresence(presence));
    here.join();

    const input = $("[data-test='message-input']");
    $("#message-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const body = input.value.trim();
      if (!body) return;
      lobby.push("new_message", { body })
        .receive("ok", () => { if (input.value.trim() === body) input.value = ""; })
        .receive("error", (e) => { status.textContent = `not sent: ${JSON.stringify(e)}`; });
    });
    input.focus();
  }

  const given = new URLSearchParams(location.search).get("token");
  if (given) {
    start(given);
    return;
  }
  $("#sign-in").hidden = false;
  status.textContent = "signed out";
  $("#name-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const user = $("#name").value.trim();
    const answer = await fetch(`/demo/token?user=${encodeURIComponent(user)}`);
    const body = await answer.json().catch(() => ({}));
    if (!answer.ok) {
      $("#sign-in-error").textContent = body.error || `no token (HTTP ${answer.status})`;
      return;
    }
    start(body.token);
  });
})();
