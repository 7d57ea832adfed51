//! The `chat` example plugin (Phoenix's RoomChannel): serves `room:*`. `plugins/chat-js` and
//! `plugins/chat-py` do the same in JavaScript and Python, and one test suite runs against
//! all three.
//!
//! - Joining `room:lobby` (or a numbered overflow lobby, `room:lobby-<n>`) is allowed; any
//!   other room is refused with `{"reason":"unauthorized"}`.
//! - `new_message` `{"body"}` is broadcast to the room as `new_message` `{"body"}`, and the
//!   sender gets an `ok` reply (`{}`) once it is (the demo page clears its input on it).
//! - `new_message` is not intercepted (see `cinder.toml`): the broadcast is encoded once
//!   and written to every member (the fastlane), and `handle_out` is not called. To filter
//!   or personalise each member's copy, list the event in `intercept` and override
//!   `handle_out` (the SDK's default pushes it as is); that is a guest call per member.
//!   For the tests, `cinder-intercept.toml` serves this component on `room-out:*` with
//!   `new_message` intercepted.
//! - `boom` fails in the handler (an `Err`): only this channel crashes (`phx_error`).
//! - Any other event gets an error reply.

use cinder_sdk::{Channel, Error, InOutcome, Join, Payload, Reply, Socket, broadcast};
use serde::Deserialize;
use serde_json::json;

#[derive(Default)]
struct Chat;

#[derive(Deserialize)]
struct NewMessage {
    body: String,
}

const NEW_MESSAGE: &str = "new_message";

impl Channel for Chat {
    fn join(
        &mut self,
        topic: &str,
        _payload: Payload,
        _socket: &mut Socket,
    ) -> Result<Join, Error> {
        let open = |room: &str| room == "lobby" || room.starts_with("lobby-");
        if topic.split_once(':').is_some_and(|(_, room)| open(room)) {
            Ok(Join::ok())
        } else {
            Ok(Join::refuse(json!({"reason": "unauthorized"})))
        }
    }

    fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        _socket: &mut Socket,
    ) -> Result<InOutcome, Error> {
        match event {
            NEW_MESSAGE => match payload.parse::<NewMessage>() {
                Ok(msg) => {
                    broadcast(NEW_MESSAGE, json!({"body": msg.body}))?;
                    Ok(InOutcome::Reply(Reply::ok(json!({}))))
                }
                Err(_) => Ok(InOutcome::Reply(Reply::error(
                    json!({"reason": "new_message needs a string body"}),
                ))),
            },
            "boom" => Err(Error("boom: the handler failed".into())),
            _ => Ok(InOutcome::Reply(Reply::error(
                json!({"reason": format!("unknown event {event}")}),
            ))),
        }
    }
}

cinder_sdk::export_channel!(Chat);
