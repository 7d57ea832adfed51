// The chat example in JavaScript, built with componentize-js (StarlingMonkey): the same
// behaviour as the Rust `plugins/chat`, on `js:*`.
//
// - Joining `js:lobby` (or a numbered overflow lobby, `js:lobby-<n>`) is allowed; any other
//   room is refused with {"reason":"unauthorized"}.
// - `new_message` {"body"} is broadcast to the room as `new_message` {"body"} (the sender
//   gets an `ok` reply, {}), through the
//   fastlane (cinder.toml intercepts nothing). `handleOut` pushes an intercepted event as
//   is; the tests run it with cinder-intercept.toml, which serves this component on
//   `js-out:*` with `new_message` intercepted.
// - `boom` throws in the handler: the host gets an `err`, and only this channel crashes
//   (`phx_error`), as for any failing handler.
// - Any other event gets an error reply.
import { broadcast, push } from "cinder:channel/host@0.1.0";

const NEW_MESSAGE = "new_message";
const NOREPLY = { outcome: { tag: "noreply" }, assigns: undefined };

/** An exception escaping a handler becomes an `err` result (that channel crashes). */
function errorsAsResults(handler) {
  return (...args) => {
    try {
      return handler(...args);
    } catch (e) {
      throw String(e?.message ?? e);
    }
  };
}

const json = (value) => ({ tag: "json", val: JSON.stringify(value) });
const reply = (status, body) => ({
  outcome: { tag: "reply", val: { status, response: json(body) } },
  assigns: undefined,
});

export const handler = {
  join: errorsAsResults((topic, _payload, _socket) => {
    const room = topic.slice(topic.indexOf(":") + 1);
    if (room === "lobby" || room.startsWith("lobby-")) {
      return { tag: "ok", val: { reply: undefined, assigns: undefined } };
    }
    return { tag: "error", val: JSON.stringify({ reason: "unauthorized" }) };
  }),

  handleIn: errorsAsResults((event, payload, _socket) => {
    if (event === NEW_MESSAGE) {
      const message = payload.tag === "json" ? JSON.parse(payload.val) : null;
      const body = message?.body;
      if (typeof body !== "string") {
        return reply("error", { reason: "new_message needs a string body" });
      }
      broadcast(NEW_MESSAGE, json({ body }));
      return reply("ok", {});
    }
    if (event === "boom") {
      throw new Error("boom: the handler threw");
    }
    return reply("error", { reason: `unknown event ${event}` });
  }),

  handleOut: errorsAsResults((event, payload, _socket) => {
    push(event, payload);
    return NOREPLY;
  }),

  handleInfo: errorsAsResults((_message, _socket) => NOREPLY),

  terminate(_reason, _socket) {},
};
