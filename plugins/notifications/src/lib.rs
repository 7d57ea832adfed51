//! The `notifications` example plugin (Phoenix's NotificationChannel): serves `user:*`.
//!
//! - A socket may join `user:<id>` only when `<id>` is its own `user_id`; otherwise the join
//!   is refused with `{"reason":"unauthorized"}`.
//! - A `notification` event reaching the topic (server push through `POST /api/broadcast`,
//!   payload with an `id`) is pushed to the client and remembered as unread in room state.
//! - `mark_read` `{"notification_id"}` broadcasts `notification_marked_read` `{"id"}` and
//!   replies ok; an id that is not unread replies error `{"reason":"failed"}`.

use std::collections::BTreeMap;

use cinder_sdk::{
    Channel, Error, InOutcome, Join, Outcome, Payload, Reply, Socket, broadcast, push,
};
use serde::Deserialize;
use serde_json::{Value, json};

/// Unread notifications of this user: id (as text) -> the id as it was sent.
#[derive(Default)]
struct Notifications {
    unread: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct Notification {
    id: Value,
}

#[derive(Deserialize)]
struct MarkRead {
    notification_id: Value,
}

/// Ids may be strings or numbers; `7` and `"7"` are the same notification.
fn id_key(id: &Value) -> Option<String> {
    match id {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Channel for Notifications {
    fn join(&mut self, topic: &str, _payload: Payload, socket: &mut Socket) -> Result<Join, Error> {
        let wanted = topic.strip_prefix("user:");
        if wanted.is_some() && wanted == socket.user_id().as_deref() {
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
            "mark_read" => {
                let id = payload.parse::<MarkRead>().ok().map(|m| m.notification_id);
                match id
                    .as_ref()
                    .and_then(id_key)
                    .and_then(|key| self.unread.remove(&key))
                {
                    Some(id) => {
                        broadcast("notification_marked_read", json!({"id": id}))?;
                        Ok(InOutcome::Reply(Reply::ok(json!({}))))
                    }
                    None => Ok(InOutcome::Reply(Reply::error(json!({"reason": "failed"})))),
                }
            }
            _ => Ok(InOutcome::Reply(Reply::error(
                json!({"reason": format!("unknown event {event}")}),
            ))),
        }
    }

    fn handle_out(
        &mut self,
        event: &str,
        payload: Payload,
        _socket: &mut Socket,
    ) -> Result<Outcome, Error> {
        let notification = (event == "notification")
            .then(|| payload.parse::<Notification>().ok())
            .flatten();
        if let Some((key, id)) = notification.and_then(|n| Some((id_key(&n.id)?, n.id))) {
            self.unread.insert(key, id);
        }
        push(event, payload)?;
        Ok(Outcome::NoReply)
    }
}

cinder_sdk::export_channel!(Notifications);
