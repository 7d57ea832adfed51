//! The host under load: a plugin judged on the CPU time it used while the machine is busy,
//! readers that keep up never cut while non-readers are, and a timer storm held to its CPU
//! budget. These tests load the machine or measure this process, so they run one at a
//! time (in this binary of their own).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use cinder_tests::{ADMIN, Client, TestServer, WAIT, http_post, reply, rss_kib, stats, upload};
use serde_json::json;
use tokio::sync::Mutex;

/// One test at a time: each loads the machine or measures the whole process.
static SERIAL: Mutex<()> = Mutex::const_new(());

async fn member(server: &TestServer, user: &str, topic: &str) -> Client {
    let mut c = server.client(user).await;
    let joined = c.join("1", topic, json!({})).await;
    assert_eq!(
        joined,
        reply(Some("1"), "1", topic, "ok", json!({})),
        "join {topic}"
    );
    c
}

/// Busy loops in processes of their own, stopped when dropped.
struct Load(Vec<std::process::Child>);

impl Load {
    fn start(processes: usize) -> Load {
        Load(
            (0..processes)
                .map(|_| {
                    std::process::Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .spawn()
                        .expect("a busy loop")
                })
                .collect(),
        )
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `wasm` with a custom section appended: other bytes than any test plugin's.
fn unseen(mut wasm: Vec<u8>, tag: &str) -> Vec<u8> {
    let name = format!("cinder-test-{tag}");
    let mut section = vec![u8::try_from(name.len()).expect("short name")];
    section.extend_from_slice(name.as_bytes());
    section.extend_from_slice(&[0; 64]);
    wasm.push(0);
    let mut len = section.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            wasm.push(byte);
            break;
        }
        wasm.push(byte | 0x80);
    }
    wasm.extend_from_slice(&section);
    wasm
}

/// CPU time this process used so far (user and system), from /proc.
fn cpu_used() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("proc stat");
    // Fields after the command (which may hold spaces): utime and stime are the 12th and
    // 13th, in clock ticks (100 a second on Linux).
    let after = stat.rsplit_once(')').expect("a command field").1;
    let fields: Vec<u64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|f| f.parse().expect("a tick count"))
        .collect();
    Duration::from_millis((fields[0] + fields[1]) * 10)
}

#[tokio::test]
async fn a_plugin_within_its_cpu_budget_survives_compiles_and_a_loaded_machine() {
    let _one = SERIAL.lock().await;
    // Calls as fast as they are answered, for as long as the compile takes: past the
    // default rate limit.
    let server = TestServer::start_with(|c| {
        c.limits.messages_per_sec = 100_000;
        c.limits.message_burst = 100_000;
        // An artifact cache of its own (in the data dir, removed with it): the upload
        // below is compiled, never found cached.
        c.cache_dir = None;
    })
    .await;
    let mut c = member(&server, "w", "hostile:work").await;
    let python = cinder_tests::test_plugins_dir().join("../test-plugins-js/chat-py.wasm");
    let python = std::fs::read(&python)
        .unwrap_or_else(|e| panic!("{}: {e} (run `make plugins`)", python.display()));
    let load = Load::start(3);
    let addr = server.addr;
    let compiling = tokio::spawn(async move {
        let manifest = "name = \"heavy\"\nversion = \"0.1.0\"\ntopics = [\"heavy:*\"]\n";
        upload(addr, manifest, &unseen(python, "load"), false).await
    });
    // 3 ms of work per call, 10 ms allowed: with the cores taken, each call may take far
    // longer than 10 ms of wall time, and must never be cut for it.
    for call in 0..200 {
        let msg_ref = format!("w{call}");
        c.send(json!(["1", msg_ref, "hostile:work", "work", {"ms": 3}]))
            .await;
        let r = c.recv().await;
        assert_eq!(
            r,
            reply(
                Some("1"),
                &msg_ref,
                "hostile:work",
                "ok",
                json!({"worked": true})
            ),
            "call {call}"
        );
    }
    assert!(
        !compiling.is_finished(),
        "the calls ran while the upload compiled"
    );
    // The compile thread yields to everything else: with the load gone it finishes.
    drop(load);
    let (status, answer) = compiling.await.expect("upload task");
    assert_eq!(status, 201, "{answer}");
    assert_eq!(stats(server.addr).await["room_crashes"], 0);
    server.stop().await;
}

/// Reads frames until `expected` distinct `data` broadcasts (by their `i`) arrived.
async fn read_all(mut c: Client, expected: usize) -> Client {
    let mut seen = HashSet::new();
    while seen.len() < expected {
        let frame = c.recv().await;
        if frame[3] == "data" {
            seen.insert(frame[4]["i"].as_u64().expect("an index"));
        }
    }
    c
}

#[tokio::test]
async fn every_reader_gets_every_message_and_every_non_reader_is_cut_with_memory_bounded() {
    let _one = SERIAL.lock().await;
    // A burst of 1024 broadcasts in one call takes this debug build more than 10 ms.
    let server = TestServer::start_with(|c| c.limits.plugin_call_ms = 200).await;
    let topic = "hostile:fan";
    let mut readers = Vec::new();
    for i in 0..3 {
        readers.push(member(&server, &format!("reader{i}"), topic).await);
    }
    let mut idle = Vec::new();
    for i in 0..30 {
        idle.push(member(&server, &format!("idle{i}"), topic).await);
    }
    let before = rss_kib();
    // One plugin call: 1024 broadcasts of 1000 bytes, past the 1 MiB queue cap at once.
    let caller = readers.pop().expect("a reader");
    let reading: Vec<_> = readers
        .drain(..)
        .map(|r| tokio::spawn(read_all(r, 1024)))
        .collect();
    let mut caller = caller;
    caller
        .send(json!(["1", "b", topic, "burst", {"n": 1024, "bytes": 1000}]))
        .await;
    let mut caller = read_all(caller, 1024).await;
    for r in reading {
        readers.push(
            tokio::time::timeout(WAIT * 2, r)
                .await
                .expect("read")
                .expect("reader"),
        );
    }
    readers.push({
        // Its reply to the burst.
        loop {
            let frame = caller.recv().await;
            if frame[3] == "phx_reply" {
                assert_eq!(frame[4]["response"]["sent"], 1024, "{frame}");
                break;
            }
        }
        caller
    });
    // Then 1500 broadcasts of 32 KiB through the HTTP API, 50 at a time.
    let reading: Vec<_> = readers
        .drain(..)
        .map(|r| tokio::spawn(read_all(r, 1500)))
        .collect();
    let pad = "x".repeat(32 << 10);
    for round in 0..30 {
        let posts: Vec<_> = (0..50)
            .map(|j| {
                let body = json!({"topic": topic, "event": "data", "payload": {"i": round * 50 + j, "pad": pad}})
                    .to_string();
                let addr = server.addr;
                tokio::spawn(async move { http_post(addr, "/api/broadcast", Some(ADMIN), &body).await })
            })
            .collect();
        for post in posts {
            assert!(post.await.expect("post").starts_with("HTTP/1.1 202"));
        }
    }
    for r in reading {
        tokio::time::timeout(WAIT * 6, r)
            .await
            .expect("every reader got every broadcast")
            .expect("reader");
    }
    // Every non-reader was cut, with a code that makes clients reconnect: its close
    // frame's, or 1006 when its buffers were too full to take one.
    for c in &mut idle {
        let code = c.close_code().await;
        assert_ne!(code, 1000);
    }
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 256 << 10, "memory grew by {grown} KiB");
    let s = stats(server.addr).await;
    assert_eq!(s["slow_disconnects"], 30, "{s}");
    server.stop().await;
}

#[tokio::test]
async fn a_timer_storm_is_held_to_its_cpu_budget() {
    let _one = SERIAL.lock().await;
    let server = TestServer::start().await;
    let mut rooms = Vec::new();
    for i in 0..10 {
        let topic = format!("hostile:storm{i}");
        let mut c = member(&server, &format!("s{i}"), &topic).await;
        c.send(json!(["1", "2", topic, "timer-storm", {"n": 64}]))
            .await;
        assert_eq!(c.recv().await[4]["status"], "ok");
        rooms.push(c);
    }
    // Let the storm settle into its budget, then measure two seconds of it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cpu, wall) = (cpu_used(), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_used() - cpu;
    let per_sec = used.as_secs_f64() / wall.elapsed().as_secs_f64();
    // Ten rooms of 20 ms per second each is a fifth of a core; without the budget the
    // storm takes the whole machine.
    assert!(per_sec < 0.6, "the storm used {per_sec:.2} cores");
    let s = stats(server.addr).await;
    assert!(s["timers_deferred"].as_u64() > Some(0), "{s}");
    drop(rooms);
    server.stop().await;
}
