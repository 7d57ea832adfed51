//! `counter:*`: every room keeps a count in the plugin's own memory. `inc` adds to it,
//! replies with the new count and broadcasts it as `count`; `get` replies with it. The
//! count survives a hot reload through `snapshot` / `restore`, which is what this example
//! shows: activate another version while clients count, and no increment is lost.
//!
//! Built with the `v2` feature it is version 2: replies also carry `"version": "2.0.0"`
//! and `inc` accepts `{"by": n}`.

use cinder_sdk::{Channel, Error, InOutcome, Join, Payload, Reply, Socket, broadcast};
use serde::Deserialize;
use serde_json::{Value, json};

/// The version this build is, as its manifest says.
const VERSION: &str = if cfg!(feature = "v2") {
    "2.0.0"
} else {
    "1.0.0"
};

#[derive(Default)]
struct Counter {
    count: u64,
}

#[derive(Deserialize, Default)]
struct Inc {
    #[serde(default)]
    by: Option<u64>,
}

impl Counter {
    fn reply(&self) -> Value {
        if cfg!(feature = "v2") {
            json!({ "count": self.count, "version": VERSION })
        } else {
            json!({ "count": self.count })
        }
    }
}

impl Channel for Counter {
    fn join(
        &mut self,
        _topic: &str,
        _payload: Payload,
        _socket: &mut Socket,
    ) -> Result<Join, Error> {
        Ok(Join::ok_with(self.reply()))
    }

    fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        _socket: &mut Socket,
    ) -> Result<InOutcome, Error> {
        match event {
            "inc" => {
                let step = if cfg!(feature = "v2") {
                    payload.parse::<Inc>().unwrap_or_default().by.unwrap_or(1)
                } else {
                    1
                };
                self.count = self.count.saturating_add(step);
                broadcast("count", self.reply())?;
                Ok(InOutcome::Reply(Reply::ok(self.reply())))
            }
            "get" => Ok(InOutcome::Reply(Reply::ok(self.reply()))),
            _ => Ok(InOutcome::Reply(Reply::error(
                json!({ "reason": "unknown event" }),
            ))),
        }
    }

    /// The count as 8 little-endian bytes: a format every version reads.
    fn snapshot(&self) -> Vec<u8> {
        self.count.to_le_bytes().to_vec()
    }

    fn restore(&mut self, state: &[u8], _from_version: &str) -> Result<(), Error> {
        let bytes: [u8; 8] = state
            .try_into()
            .map_err(|_| Error(format!("expected 8 bytes of state, got {}", state.len())))?;
        self.count = u64::from_le_bytes(bytes);
        Ok(())
    }
}

cinder_sdk::export_channel!(Counter);
