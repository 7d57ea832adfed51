//! Micro benchmarks of the plugin boundary with criterion: `handle_in` round trips, the
//! `handle_out` an intercepted broadcast costs per member, and first-join instantiation,
//! through the same runtime the server uses (pooling allocator, epoch deadline, WASI linked,
//! host imports), driven through the `RoomLogic` trait the room actor uses, without sockets.
//! Needs the plugins built: `make plugins`.
//!
//! Run with `cargo bench -p cinder --bench plugin_calls` (criterion's estimates: the time
//! per call with its confidence interval).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cinder::channel::{ChannelSocket, LogicFactory as _, RoomLogic};
use cinder::config::Limits;
use cinder::protocol::Payload;
use cinder::runtime::{Manifest, Plugin, Runtime};
use criterion::Criterion;

mod common;

fn plugins_dir() -> PathBuf {
    std::env::var_os("CINDER_TEST_PLUGINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-plugins"))
}

fn load(runtime: &Runtime, limits: &Limits, name: &str) -> Plugin {
    let dir = plugins_dir();
    let text = std::fs::read_to_string(dir.join(format!("{name}.toml")))
        .expect("manifest: run `make plugins`");
    let manifest = Manifest::parse(&text, limits).expect("manifest parses");
    let wasm = std::fs::read(dir.join(format!("{name}.wasm"))).expect("wasm: run `make plugins`");
    let component = runtime.compile_uncached(&wasm).expect("plugin compiles");
    runtime.load(manifest, &component).expect("plugin loads")
}

/// A room of `plugin` on `topic` that `sock` has joined.
async fn joined(plugin: &Plugin, topic: &str, sock: &ChannelSocket) -> Box<dyn RoomLogic> {
    let mut room = plugin.instantiate(topic).await.expect("instance");
    room.join(Payload::empty(), sock).await.expect("join");
    room
}

/// `iters` calls of `handle_in` with `payload`, timed together.
async fn handle_in_calls(
    room: &mut dyn RoomLogic,
    event: &str,
    payload: &Payload,
    sock: &ChannelSocket,
    iters: u64,
) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        let handled = room
            .handle_in(event, payload.clone(), sock)
            .await
            .expect("call");
        std::hint::black_box(handled);
    }
    start.elapsed()
}

fn plugin_calls(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let limits = common::limits();
    let runtime = common::runtime(&limits);
    let chat = load(&runtime, &limits, "chat");
    let misbehave = load(&runtime, &limits, "misbehave");

    let mut group = c.benchmark_group("handle_in");
    let calls: [(&str, &Plugin, &str, &str, String); 3] = [
        (
            "tiny reply (misbehave count)",
            &misbehave,
            "bad:bench",
            "count",
            "{}".into(),
        ),
        (
            "echo of a 95-byte payload",
            &misbehave,
            "bad:bench",
            "echo",
            format!(r#"{{"body":"{}"}}"#, "x".repeat(84)),
        ),
        (
            "chat new_message + broadcast",
            &chat,
            "room:lobby",
            "new_message",
            r#"{"body":"hello, world"}"#.into(),
        ),
    ];
    for (name, plugin, topic, event, payload) in calls {
        let sock = common::socket(topic);
        let payload = Payload::json(payload).expect("json");
        let mut room = rt.block_on(joined(plugin, topic, &sock));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(handle_in_calls(&mut *room, event, &payload, &sock, iters))
            })
        });
    }
    group.finish();

    // What an intercepted `new_message` costs per member: the chat plugin's `handle_out`
    // (the SDK's default, which pushes the broadcast unchanged).
    c.bench_function("handle_out: chat new_message, pushed unchanged", |b| {
        let sock = common::socket("room:lobby");
        let payload = Payload::json(r#"{"body":"hello, world"}"#.into()).expect("json");
        let mut room = rt.block_on(joined(&chat, "room:lobby", &sock));
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let handled = room
                        .handle_out("new_message", payload.clone(), &sock)
                        .await
                        .expect("call");
                    std::hint::black_box(handled);
                }
                start.elapsed()
            })
        })
    });

    c.bench_function("first join: instantiate + join (chat)", |b| {
        let sock = common::socket("room:lobby");
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let mut room = chat.instantiate("room:lobby").await.expect("instance");
                    let joined = room.join(Payload::empty(), &sock).await.expect("join");
                    std::hint::black_box(joined);
                }
                start.elapsed()
            })
        })
    });
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    plugin_calls(&mut c);
    c.final_summary();
}
