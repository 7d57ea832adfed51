//! Micro benchmarks of the plugin boundary: `handle_in` round trips and first-join
//! instantiation, through the same runtime the server uses (pooling allocator, epoch
//! deadline, WASI linked). Needs the plugins built: `make plugins`.
//!
//! Run with `cargo bench -p cinder --bench plugin_calls`. Prints the median and p99 of
//! individually timed calls.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cinder::channel::{ChannelSocket, LogicFactory as _, RoomLogic};
use cinder::config::Limits;
use cinder::presence::Tracker;
use cinder::protocol::Payload;
use cinder::pubsub::LocalPubSub;
use cinder::runtime::{Manifest, Plugin, Runtime};

fn plugins_dir() -> PathBuf {
    std::env::var_os("CINDER_TEST_PLUGINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-plugins"))
}

fn load(runtime: &Runtime, name: &str) -> Plugin {
    let dir = plugins_dir();
    let manifest: Manifest = toml::from_str(
        &std::fs::read_to_string(dir.join(format!("{name}.toml")))
            .expect("manifest: run `make plugins`"),
    )
    .expect("manifest parses");
    let wasm = std::fs::read(dir.join(format!("{name}.wasm"))).expect("wasm: run `make plugins`");
    let component = runtime.compile_uncached(&wasm).expect("plugin compiles");
    runtime.load(manifest, &component).expect("plugin loads")
}

fn socket(topic: &str) -> ChannelSocket {
    ChannelSocket {
        channel: 1,
        id: Some("user_socket:1".into()),
        topic: topic.into(),
        join_ref: Some("1".into()),
        assigns: r#"{"user_id":"1"}"#.into(),
    }
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e6;
    println!(
        "{name:<44} median {:>8.2} µs   p99 {:>8.2} µs   (n={})",
        at(0.5),
        at(0.99),
        samples.len()
    );
}

async fn time_handle_in(
    logic: &mut dyn RoomLogic,
    event: &str,
    payload: &str,
    sock: &ChannelSocket,
    n: usize,
) -> Vec<Duration> {
    let payload = Payload::json(payload.to_owned()).expect("json");
    for _ in 0..1000 {
        logic
            .handle_in(event, payload.clone(), sock)
            .await
            .expect("call");
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let p = payload.clone();
        let start = Instant::now();
        let handled = logic.handle_in(event, p, sock).await.expect("call");
        samples.push(start.elapsed());
        std::hint::black_box(handled);
    }
    samples
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    rt.block_on(async {
        let limits = Limits {
            max_rooms: 2000,
            ..Limits::default()
        };
        let runtime = Runtime::new(
            &limits,
            Default::default(),
            Arc::new(Tracker::new(Arc::new(LocalPubSub::new()))),
        )
        .expect("runtime");
        let chat = load(&runtime, "chat");
        let misbehave = load(&runtime, "misbehave");
        let n = 20_000;

        let sock = socket("bad:bench");
        let mut logic = misbehave.instantiate("bad:bench").await.expect("instance");
        logic.join(Payload::empty(), &sock).await.expect("join");
        report(
            "handle_in, tiny reply (misbehave count)",
            time_handle_in(&mut *logic, "count", "{}", &sock, n).await,
        );
        report(
            "handle_in, echo 95-byte payload",
            time_handle_in(
                &mut *logic,
                "echo",
                &format!(r#"{{"body":"{}"}}"#, "x".repeat(84)),
                &sock,
                n,
            )
            .await,
        );

        let sock = socket("room:lobby");
        let mut logic = chat.instantiate("room:lobby").await.expect("instance");
        logic.join(Payload::empty(), &sock).await.expect("join");
        report(
            "handle_in, chat new_message + broadcast",
            time_handle_in(
                &mut *logic,
                "new_message",
                r#"{"body":"hello, world"}"#,
                &sock,
                n,
            )
            .await,
        );

        let mut samples = Vec::with_capacity(2000);
        for i in 0..2000 {
            let topic = format!("room:lobby{i}");
            let sock = socket(&topic);
            let start = Instant::now();
            let mut logic = chat.instantiate(&topic).await.expect("instance");
            let joined = logic.join(Payload::empty(), &sock).await.expect("join");
            samples.push(start.elapsed());
            std::hint::black_box(joined);
        }
        report("first join: instantiate + join (chat)", samples);
    });
}
