//! A test plugin that attacks the host on command, one event per attack the hardening
//! pass closed (tests/tests/hostile.rs drives each). Serves `hostile:*`; intercepts
//! `echo-out`, whose `handle_out` broadcasts it again (a loop through `handle_out`).
//!
//! Events (payload fields in braces):
//! - `disconnect`: broadcast `disconnect` in its own topic; reply the host's answer.
//! - `spy` `{"topic"}`: reply `presence.list` of another topic.
//! - `log` `{"message"}`: write `message` to the host log as is (newlines included).
//! - `loop-out`: broadcast `echo-out`, which `handle_out` re-broadcasts for ever.
//! - `huge-broadcast` `{"bytes", "n"}`: try `n` broadcasts of a `bytes`-long JSON string;
//!   reply how many the host refused.
//! - `burst` `{"n", "bytes"}`: broadcast `n` events `data` padded to `bytes`.
//! - `timer-storm` `{"n"}`: arm `n` zero-delay timers; each `handle_info` re-arms `n` more.
//! - `hoard` `{"bytes"}`: allocate and keep `bytes` (room state).
//! - `track-big` `{"keys", "bytes"}`: track `keys` keys with a `bytes`-long meta each; reply
//!   how many were tracked and the first refusal.
//! - `binary-reply`: reply with a binary payload.
//! - `nested` `{"depth"}`: push a payload nested `depth` levels deep; reply the host's answer.
//! - `work` `{"ms"}`: busy-wait `ms` milliseconds of wall time (legal work).
//! - `counters`: reply what the room counted (`handle_info` calls, `handle_out` calls).

use std::time::{Duration, Instant};

use cinder_sdk::{
    Channel, Error, InOutcome, Join, Level, Outcome, Payload, Reply, Socket, broadcast, push,
    send_after,
};
use serde_json::{Value, json};

#[derive(Default)]
struct Hostile {
    /// Timers each `handle_info` re-arms (0: the storm is off).
    storm: u64,
    infos: u64,
    outs: u64,
    hoard: Vec<Vec<u8>>,
}

fn arg(payload: &Payload, key: &str) -> u64 {
    payload
        .parse::<Value>()
        .ok()
        .and_then(|v| v.get(key).and_then(Value::as_u64))
        .unwrap_or(0)
}

fn text(payload: &Payload, key: &str) -> String {
    payload
        .parse::<Value>()
        .ok()
        .and_then(|v| v.get(key).and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_default()
}

fn ok(v: Value) -> Result<InOutcome, Error> {
    Ok(InOutcome::Reply(Reply::ok(v)))
}

/// The host's answer to a host call, as JSON: `"ok"` or the error.
fn answer(result: Result<(), Error>) -> Value {
    match result {
        Ok(()) => json!("ok"),
        Err(e) => json!({"error": e.0}),
    }
}

impl Hostile {
    fn arm(&self, n: u64) {
        for i in 0..n {
            if send_after(Duration::ZERO, json!({"i": i})).is_err() {
                break;
            }
        }
    }
}

impl Channel for Hostile {
    fn join(
        &mut self,
        _topic: &str,
        _payload: Payload,
        _socket: &mut Socket,
    ) -> Result<Join, Error> {
        Ok(Join::ok())
    }

    fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        _socket: &mut Socket,
    ) -> Result<InOutcome, Error> {
        match event {
            "disconnect" => ok(answer(broadcast("disconnect", json!({})))),
            "spy" => ok(cinder_sdk::presence::list(&text(&payload, "topic"))?),
            "log" => {
                cinder_sdk::log(Level::Error, &text(&payload, "message"));
                ok(json!({"logged": true}))
            }
            "loop-out" => ok(answer(broadcast("echo-out", json!({"round": 0})))),
            "huge-broadcast" => {
                // The generated binding, which takes the payload by reference: the host's
                // share of each call is all that is measured, not a copy in the guest.
                use cinder_sdk::wit::cinder::channel::{host, types};
                let bytes = arg(&payload, "bytes") as usize;
                let body = types::Payload::Json(format!("\"{}\"", "x".repeat(bytes)));
                let refused = (0..arg(&payload, "n"))
                    .filter(|_| host::broadcast("huge", &body).is_err())
                    .count();
                ok(json!({"refused": refused}))
            }
            "burst" => {
                let pad = "x".repeat(arg(&payload, "bytes") as usize);
                let sent = (0..arg(&payload, "n"))
                    .take_while(|i| broadcast("data", json!({"i": i, "pad": pad})).is_ok())
                    .count();
                ok(json!({"sent": sent}))
            }
            "timer-storm" => {
                self.storm = arg(&payload, "n");
                self.arm(self.storm);
                ok(json!({"storming": self.storm}))
            }
            "hoard" => {
                let mut block = vec![0u8; arg(&payload, "bytes") as usize];
                // Touch every page, so the memory is really used.
                for page in block.chunks_mut(4096) {
                    page[0] = 1;
                }
                self.hoard.push(block);
                ok(json!({"hoarded": self.hoard.iter().map(Vec::len).sum::<usize>()}))
            }
            "track-big" => {
                let meta = json!({"pad": "x".repeat(arg(&payload, "bytes") as usize)});
                let mut tracked = 0;
                let mut refusal = Value::Null;
                for key in 0..arg(&payload, "keys") {
                    match cinder_sdk::presence::track(&format!("k{key}"), &meta) {
                        Ok(()) => tracked += 1,
                        Err(e) => {
                            refusal = json!(e.0);
                            break;
                        }
                    }
                }
                ok(json!({"tracked": tracked, "refusal": refusal}))
            }
            "binary-reply" => Ok(InOutcome::Reply(Reply::ok(Payload::Binary(vec![1, 2, 3])))),
            "nested" => {
                let depth = arg(&payload, "depth") as usize;
                let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
                ok(answer(push("nested", Payload::Json(nested))))
            }
            "work" => {
                let until = Instant::now() + Duration::from_millis(arg(&payload, "ms"));
                while Instant::now() < until {
                    std::hint::black_box(self.infos);
                }
                ok(json!({"worked": true}))
            }
            "counters" => ok(json!({"infos": self.infos, "outs": self.outs})),
            other => Ok(InOutcome::Reply(Reply::error(
                json!({"reason": format!("unknown command {other}")}),
            ))),
        }
    }

    fn handle_out(
        &mut self,
        event: &str,
        payload: Payload,
        _socket: &mut Socket,
    ) -> Result<Outcome, Error> {
        self.outs += 1;
        // Deliver it, then broadcast it again: every round causes the next. Refusals from
        // the host are ignored, as a careless plugin would.
        let _ = push(event, payload.clone());
        let _ = broadcast(event, payload);
        Ok(Outcome::NoReply)
    }

    fn handle_info(&mut self, _message: Payload, _socket: &mut Socket) -> Result<Outcome, Error> {
        self.infos += 1;
        self.arm(self.storm);
        Ok(Outcome::NoReply)
    }
}

cinder_sdk::export_channel!(Hostile);
