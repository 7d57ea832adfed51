//! The chat plugin in each language, side by side, through the runtime the server uses:
//! component size, compile time, cached load time (artifact cache read, checked and
//! deserialized), first join (instantiate + `join`), `handle_in` of `new_message`, and
//! resident memory per live room.
//!
//! Run with `make bench`, or `CINDER_LANG_PLUGINS=<dir> cargo bench -p cinder --bench
//! languages` where the dir holds `<name>.wasm` + `<name>.toml` for each plugin to compare.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cinder::channel::{LogicFactory as _, RoomLogic};
use cinder::protocol::Payload;
use cinder::runtime::Manifest;
use cinder::store::{PluginStore, sha256_hex};

mod common;

/// Plugins compared, in table order; those missing from the dir are skipped.
const PLUGINS: [&str; 4] = ["chat", "chat-js", "chat-js-starlingmonkey", "chat-py"];

fn dir() -> PathBuf {
    std::env::var_os("CINDER_LANG_PLUGINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-plugins-js")
        })
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() - 1) * 99 / 100]
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    rt.block_on(async {
        let limits = common::limits();
        let runtime = common::runtime(&limits);
        let cache_dir = std::env::temp_dir().join(format!("cinder-bench-{}", std::process::id()));
        let store = PluginStore::open(&cache_dir, &cache_dir.join("cache")).expect("store");
        println!(
            "| plugin | component | compile | cached load | first join p50 / p99 | handle_in p50 / p99 | memory per room |"
        );
        println!("|---|---|---|---|---|---|---|");
        for name in PLUGINS {
            let path = dir().join(format!("{name}.wasm"));
            let Ok(wasm) = std::fs::read(&path) else {
                eprintln!("{} missing: skipped", path.display());
                continue;
            };
            let text = std::fs::read_to_string(path.with_extension("toml")).expect("manifest");
            let manifest = Manifest::parse(&text, &limits).expect("manifest parses");
            let topic = manifest.topics[0].replace('*', "lobby");
            let sha = sha256_hex(&wasm);

            let started = Instant::now();
            let (component, cached) = runtime.compile(&wasm, &sha, &store).expect("compiles");
            let compile = started.elapsed();
            assert!(!cached, "a fresh cache");
            let mut loads = Vec::new();
            for _ in 0..5 {
                let started = Instant::now();
                let (_, cached) = runtime.compile(&wasm, &sha, &store).expect("loads");
                loads.push(started.elapsed());
                assert!(cached, "served by the cache");
            }
            let plugin = runtime.load(manifest, &component).expect("links");

            let rounds = if name == "chat" { 500 } else { 50 };
            let sock = common::socket(&topic);
            let mut joins = Vec::new();
            for _ in 0..rounds {
                let started = Instant::now();
                let mut room = plugin.instantiate(&topic).await.expect("instance");
                room.join(Payload::empty(), &sock).await.expect("join");
                joins.push(started.elapsed());
            }

            let mut room = plugin.instantiate(&topic).await.expect("instance");
            room.join(Payload::empty(), &sock).await.expect("join");
            let payload = Payload::json(r#"{"body":"hello, world"}"#.to_owned()).expect("json");
            let calls = if name == "chat" { 20_000 } else { 2_000 };
            for _ in 0..200 {
                room.handle_in("new_message", payload.clone(), &sock)
                    .await
                    .expect("call");
            }
            let mut ins = Vec::with_capacity(calls);
            for _ in 0..calls {
                let p = payload.clone();
                let started = Instant::now();
                let handled = room.handle_in("new_message", p, &sock).await.expect("call");
                ins.push(started.elapsed());
                std::hint::black_box(handled);
            }

            let before = rss_kib();
            let mut rooms: Vec<Box<dyn RoomLogic>> = Vec::new();
            for _ in 0..50 {
                let mut room = plugin.instantiate(&topic).await.expect("instance");
                room.join(Payload::empty(), &sock)
                    .await
                    .expect("join");
                room.handle_in("new_message", payload.clone(), &sock)
                    .await
                    .expect("call");
                rooms.push(room);
            }
            let per_room = (rss_kib().saturating_sub(before)) as f64 / 50.0;
            drop(rooms);

            println!(
                "| {name} | {:.1} MiB | {:.0} ms | {:.1} ms | {:.0} / {:.0} µs | {:.1} / {:.1} µs | {:.0} KiB |",
                wasm.len() as f64 / (1 << 20) as f64,
                compile.as_secs_f64() * 1e3,
                median(loads).as_secs_f64() * 1e3,
                median(joins.clone()).as_secs_f64() * 1e6,
                p99(joins).as_secs_f64() * 1e6,
                median(ins.clone()).as_secs_f64() * 1e6,
                p99(ins).as_secs_f64() * 1e6,
                per_room,
            );
        }
        let _ = std::fs::remove_dir_all(&cache_dir);
    });
}
