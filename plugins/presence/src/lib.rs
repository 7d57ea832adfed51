//! The `presence` example plugin (Phoenix's PresenceChannel): serves `presence:*`.
//!
//! - Any socket with a `user_id` may join; on join it is tracked under its `user_id` with
//!   `{"online_at": <seconds>}`. The host pushes `presence_state` to it and `presence_diff`
//!   to the topic; several tabs of one user are one key with several metas.
//! - The other members also get `user_joined` `{"user_id","meta"}` and, when the channel
//!   goes away, `user_left` `{"user_id"}`.
//! - `update` with a JSON object merges it into this channel's meta (a presence update:
//!   a leave and a join with `phx_ref_prev`).

use std::time::{SystemTime, UNIX_EPOCH};

use cinder_sdk::{
    Channel, Error, InOutcome, Join, Payload, Reply, Socket, broadcast_from, presence,
};
use serde_json::{Map, Value, json};

#[derive(Default)]
struct Presence;

const META: &str = "presence_meta";

impl Channel for Presence {
    fn join(
        &mut self,
        _topic: &str,
        _payload: Payload,
        socket: &mut Socket,
    ) -> Result<Join, Error> {
        let Some(user_id) = socket.user_id() else {
            return Ok(Join::refuse(json!({"reason": "unauthorized"})));
        };
        let online_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let meta = json!({"online_at": online_at});
        presence::track(&user_id, &meta)?;
        broadcast_from("user_joined", json!({"user_id": user_id, "meta": meta}))?;
        socket.assign(META, meta);
        Ok(Join::ok())
    }

    fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        socket: &mut Socket,
    ) -> Result<InOutcome, Error> {
        match event {
            "update" => {
                let (Some(user_id), Ok(Value::Object(changes))) =
                    (socket.user_id(), payload.parse::<Value>())
                else {
                    return Ok(InOutcome::Reply(Reply::error(
                        json!({"reason": "update needs a JSON object"}),
                    )));
                };
                let mut meta: Map<String, Value> = match socket.get(META) {
                    Some(Value::Object(m)) => m.clone(),
                    _ => Map::new(),
                };
                meta.extend(changes);
                let meta = Value::Object(meta);
                presence::update(&user_id, &meta)?;
                socket.assign(META, meta);
                Ok(InOutcome::Reply(Reply::ok(json!({}))))
            }
            _ => Ok(InOutcome::Reply(Reply::error(
                json!({"reason": format!("unknown event {event}")}),
            ))),
        }
    }

    fn terminate(&mut self, _reason: &str, socket: &Socket) {
        if let Some(user_id) = socket.user_id() {
            // The channel is gone; the rest of the topic hears about it.
            let _ = broadcast_from("user_left", json!({"user_id": user_id}));
        }
    }
}

cinder_sdk::export_channel!(Presence);
