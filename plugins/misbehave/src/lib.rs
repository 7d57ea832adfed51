//! A test plugin that obeys commands sent as events, to prove the host survives what an
//! untrusted plugin may do. Serves `bad:*`. Join params `{"track": key}` track the
//! channel's presence under `key`; `"refuse": true` refuses the join after that; every other
//! join is accepted.
//!
//! Events: `count` (reply the room's call count: a fresh instance starts at 1), `echo`,
//! `parse` (parse the payload into a JSON tree, recursively, and reply its depth),
//! `error` (return an error: this channel crashes), `panic` (trap: the room crashes), `stop`
//! (stop this channel), `loop` (never return), `recurse` (overflow the stack), `alloc`
//! `{"bytes"}` (allocate and touch), `push-flood` `{"n", "bytes"?}` (push n times, padded,
//! reply how many the host accepted), `assign` `{"bytes"}` (grow the channel's assigns),
//! `big-reply` `{"bytes"}`, `sleep-ish` `{"ms"}` (legal busy work), `later`
//! `{"ms"}` (a timer; its `handle_info` pushes `tick`), `caps` (try the filesystem, the
//! environment, arguments, the network, clocks and random; reply what worked), `print`
//! `{"n"}` (n lines to stdout and n to stderr), `interleave` `{"n"}` (broadcast `first`,
//! push `second`, broadcast `third`, each `{"n"}`, then reply `{"n"}`).
//!
//! On hot reload it refuses any state it is handed (`restore` fails), so activating it
//! over a plugin that snapshots shows a failed swap.

use std::time::{Duration, Instant};

use cinder_sdk::{
    Channel, Error, InOutcome, Join, Outcome, Payload, Reply, Socket, broadcast, push, send_after,
};
use serde_json::{Value, json};

#[derive(Default)]
struct Misbehave {
    calls: u64,
}

fn arg(payload: &Payload, key: &str) -> u64 {
    payload
        .parse::<Value>()
        .ok()
        .and_then(|v| v.get(key).and_then(Value::as_u64))
        .unwrap_or(0)
}

/// Never returns: each frame keeps a block on the stack until the stack overflows.
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    recurse(depth + 1) + frame[63]
}

/// How deeply `value` nests: 1 for a scalar.
fn nesting(value: &Value) -> usize {
    let inner = match value {
        Value::Array(items) => items.iter().map(nesting).max(),
        Value::Object(fields) => fields.values().map(nesting).max(),
        _ => None,
    };
    1 + inner.unwrap_or(0)
}

/// What this instance can reach; a sandboxed plugin reaches clocks and random only.
fn capabilities() -> Value {
    let random_differs = {
        use std::hash::{BuildHasher, RandomState};
        RandomState::new().hash_one(1u8) != RandomState::new().hash_one(1u8)
    };
    json!({
        "read_file": std::fs::read("/etc/passwd").is_ok() || std::fs::read("plugin.toml").is_ok(),
        "list_dir": std::fs::read_dir("/").is_ok() || std::fs::read_dir(".").is_ok(),
        "write_file": std::fs::write("escape.txt", b"x").is_ok(),
        "env": std::env::vars().count(),
        "args": std::env::args().count(),
        "connect": std::net::TcpStream::connect(("127.0.0.1", 4000)).is_ok(),
        "listen": std::net::TcpListener::bind(("127.0.0.1", 0)).is_ok(),
        "clock": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).is_ok_and(|d| d.as_secs() > 0),
        "random": random_differs,
    })
}

impl Channel for Misbehave {
    fn join(
        &mut self,
        _topic: &str,
        payload: Payload,
        _socket: &mut Socket,
    ) -> Result<Join, Error> {
        // `{"track": key}` in the join params tracks the channel's presence under `key`;
        // `"refuse": true` then refuses the join anyway.
        let params = payload.parse::<Value>().unwrap_or_default();
        if let Some(key) = params.get("track").and_then(Value::as_str) {
            cinder_sdk::presence::track(key, &json!({}))?;
        }
        if params.get("refuse") == Some(&Value::Bool(true)) {
            return Ok(Join::refuse(json!({"reason": "refused after tracking"})));
        }
        Ok(Join::ok())
    }

    fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        socket: &mut Socket,
    ) -> Result<InOutcome, Error> {
        self.calls += 1;
        let reply = |v: Value| Ok(InOutcome::Reply(Reply::ok(v)));
        match event {
            "count" => reply(json!({"count": self.calls})),
            "echo" => Ok(InOutcome::Reply(Reply::ok(payload))),
            "parse" => {
                let tree: Value = payload.parse()?;
                reply(json!({"depth": nesting(&tree)}))
            }
            "error" => Err(Error("asked to fail".into())),
            "panic" => panic!("asked to panic"),
            "stop" => Ok(InOutcome::Stop {
                reason: "asked to stop".into(),
                reply: Some(Reply::ok(json!({"stopping": true}))),
            }),
            "loop" => loop {
                std::hint::black_box(self.calls);
            },
            "recurse" => reply(json!({"depth": recurse(0)})),
            "interleave" => {
                let n = arg(&payload, "n");
                broadcast("first", json!({"n": n}))?;
                push("second", json!({"n": n}))?;
                broadcast("third", json!({"n": n}))?;
                reply(json!({"n": n}))
            }
            "alloc" => {
                let bytes = arg(&payload, "bytes") as usize;
                let block = vec![1u8; bytes];
                reply(json!({"allocated": std::hint::black_box(block).len()}))
            }
            "push-flood" => {
                let n = arg(&payload, "n");
                let pad = "x".repeat(arg(&payload, "bytes") as usize);
                let message = |i| {
                    if pad.is_empty() {
                        json!({"i": i})
                    } else {
                        json!({"i": i, "pad": pad})
                    }
                };
                let accepted = (0..n)
                    .take_while(|i| push("flood", message(*i)).is_ok())
                    .count();
                reply(json!({"accepted": accepted}))
            }
            "assign" => {
                socket.assign("blob", "x".repeat(arg(&payload, "bytes") as usize));
                reply(json!({"assigned": true}))
            }
            "big-reply" => reply(json!({"data": "x".repeat(arg(&payload, "bytes") as usize)})),
            "sleep-ish" => {
                let until = Instant::now() + Duration::from_millis(arg(&payload, "ms"));
                while Instant::now() < until {
                    std::hint::black_box(self.calls);
                }
                reply(json!({"slept": true}))
            }
            "later" => {
                send_after(
                    Duration::from_millis(arg(&payload, "ms")),
                    json!({"tick": true}),
                )?;
                Ok(InOutcome::NoReply)
            }
            "caps" => reply(capabilities()),
            "print" => {
                for i in 0..arg(&payload, "n") {
                    println!("misbehave stdout line {i}");
                    eprintln!("misbehave stderr line {i}");
                }
                reply(json!({"printed": true}))
            }
            other => Ok(InOutcome::Reply(Reply::error(
                json!({"reason": format!("unknown command {other}")}),
            ))),
        }
    }

    fn handle_info(&mut self, message: Payload, _socket: &mut Socket) -> Result<Outcome, Error> {
        push("tick", message)?;
        Ok(Outcome::NoReply)
    }

    fn restore(&mut self, state: &[u8], from_version: &str) -> Result<(), Error> {
        Err(Error(format!(
            "misbehave refuses {} bytes of state from version {from_version}",
            state.len()
        )))
    }
}

cinder_sdk::export_channel!(Misbehave);
