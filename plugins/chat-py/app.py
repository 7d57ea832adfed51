"""The chat example in Python, built with componentize-py: the same behaviour as the Rust
`plugins/chat`, on `py:*`.

- Joining `py:lobby` (or a numbered overflow lobby, `py:lobby-<n>`) is allowed; any other
  room is refused with `{"reason": "unauthorized"}`.
- `new_message` `{"body"}` is broadcast to the room as `new_message` `{"body"}` (the sender
  gets an `ok` reply, `{}`), through the
  fastlane (cinder.toml intercepts nothing). `handle_out` pushes an intercepted event as
  is; the tests run it with cinder-intercept.toml, which serves this component on
  `py-out:*` with `new_message` intercepted.
- `boom` raises an exception in the handler: the host gets an `err`, and only this channel
  crashes (`phx_error`), as for any failing handler.
- Any other event gets an error reply.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host, types

NEW_MESSAGE = "new_message"


def errors_as_results(handler):
    """An exception escaping a handler becomes an `err` result (that channel crashes), never
    a trap that would take the whole room down."""

    def wrapped(*args):
        try:
            return handler(*args)
        except Err:
            raise
        except Exception as e:  # noqa: BLE001 - every exception becomes the channel's error
            raise Err(f"{type(e).__name__}: {e}")

    return wrapped


def reply(status, body):
    return types.InResult(
        outcome=types.InOutcome_Reply(types.Reply(status, types.Payload_Json(json.dumps(body)))),
        assigns=None,
    )


NOREPLY = types.InfoResult(outcome=types.InfoOutcome_Noreply(), assigns=None)


class Handler(exports.Handler):
    @errors_as_results
    def join(self, topic, payload, socket):
        room = topic.split(":", 1)[-1]
        if room == "lobby" or room.startswith("lobby-"):
            return types.JoinOutcome_Ok(types.JoinOk(reply=None, assigns=None))
        return types.JoinOutcome_Error(json.dumps({"reason": "unauthorized"}))

    @errors_as_results
    def handle_in(self, event, payload, socket):
        if event == NEW_MESSAGE:
            body = None
            if isinstance(payload, types.Payload_Json):
                message = json.loads(payload.value)
                if isinstance(message, dict):
                    body = message.get("body")
            if not isinstance(body, str):
                return reply(types.Status.ERROR, {"reason": "new_message needs a string body"})
            host.broadcast(NEW_MESSAGE, types.Payload_Json(json.dumps({"body": body})))
            return reply(types.Status.OK, {})
        if event == "boom":
            raise RuntimeError("boom: the handler raised")
        return reply(types.Status.ERROR, {"reason": f"unknown event {event}"})

    @errors_as_results
    def handle_out(self, event, payload, socket):
        host.push(event, payload)
        return NOREPLY

    @errors_as_results
    def handle_info(self, message, socket):
        return NOREPLY

    def terminate(self, reason, socket):
        pass
