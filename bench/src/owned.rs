//! `owned [CALLS]` (Cinder only): rooms placed on an owner, on nodes sharing a
//! `redis-server` this bench starts on a free port.
//!
//! - latency and cost: CALLS sequential `inc`s (send, wait for the reply) to a counter room
//!   with a member on each of two nodes, from the member on the owner's node and from the
//!   member on the other node (forwarded), for the same counter component placed `local` (no
//!   owner: the baseline, measured in the same run), owned saving at most every second, and
//!   owned saving after every message (the example as shipped); p50/p99, and the owner's and
//!   Redis's CPU per message;
//! - failover: a room with a member on each of three nodes, one pushing `inc` every 10 ms;
//!   after 3 s (three interval saves), kill -9 of the owner: the time to the first reply from
//!   the new owner, the pushes that got no reply, and the counts the room lost (resumed below
//!   the last one a member saw), for both ways of saving.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cinder_tests::{Client, RedisServer};
use serde_json::{Value, json};

use crate::cluster::{nodes, redis_cpu};
use crate::proc::Cpu;
use crate::server::Target;
use crate::stats::percentiles;

/// The variants of the counter component this bench uploads: plugin name, manifest lines
/// replacing the shipped `snapshot_every` line, and what to call it.
const VARIANTS: [(&str, &str, &str); 3] = [
    ("tally-local", "placement = \"local\"", "local (no owner)"),
    (
        "tally",
        "snapshot_every = 1000",
        "owned, saving every 1000 ms",
    ),
    (
        "counter",
        "snapshot_every = \"message\"",
        "owned, saving after every message",
    ),
];

/// Uploads every variant but the shipped one through `target`.
async fn upload_variants(target: &Target) -> anyhow::Result<()> {
    let dir = cinder_tests::test_plugins_dir();
    let manifest = std::fs::read_to_string(dir.join("counter.toml"))?;
    let wasm = std::fs::read(dir.join("counter.wasm"))?;
    for (name, line, _) in VARIANTS.iter().filter(|(name, ..)| *name != "counter") {
        let manifest = manifest
            .replace("name = \"counter\"", &format!("name = \"{name}\""))
            .replace("counter:*", &format!("{name}:*"))
            .replace("snapshot_every = \"message\"", line);
        let (status, body) = cinder_tests::upload(target.api, &manifest, &wasm, true).await;
        anyhow::ensure!(status == 201, "uploading {name}: {status} {body}");
    }
    Ok(())
}

/// One `inc` through `c` on `topic` (joined with join ref "1"): its count and how long the
/// reply took.
async fn inc(c: &mut Client, topic: &str, msg_ref: &str) -> anyhow::Result<(u64, Duration)> {
    let sent = Instant::now();
    c.try_send_text(json!(["1", msg_ref, topic, "inc", {}]).to_string())
        .await?;
    loop {
        let frame = c.next_json().await?;
        if frame[3] == "phx_reply" && frame[1] == msg_ref {
            anyhow::ensure!(frame[4]["status"] == "ok", "inc refused: {frame}");
            let count = frame[4]["response"]["count"].as_u64().unwrap_or(0);
            return Ok((count, sent.elapsed()));
        }
    }
}

/// `calls` sequential `inc`s through `c`: p50/p99 in µs, and the CPU `owner` and `redis`
/// used per call, in µs.
async fn measure(
    c: &mut Client,
    topic: &str,
    calls: usize,
    owner: u32,
    redis: &RedisServer,
) -> anyhow::Result<(f64, f64, f64, f64)> {
    for i in 0..calls / 10 {
        inc(c, topic, &format!("w{i}")).await?;
    }
    let (cpu, redis_before) = (Cpu::of(owner)?, redis_cpu(redis).await?);
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls {
        samples.push(inc(c, topic, &format!("m{i}")).await?.1);
    }
    let owner_us = Cpu::of(owner)?.since(cpu).total().as_secs_f64() * 1e6 / calls as f64;
    let redis_us = (redis_cpu(redis).await? - redis_before) * 1e6 / calls as f64;
    let (p50, p99) = percentiles(samples);
    Ok((p50, p99, owner_us, redis_us))
}

/// A member of `topic` on `target` as `user`.
async fn member(target: &Target, user: usize, topic: &str) -> anyhow::Result<Client> {
    let mut c = target.open(user).await?;
    c.try_join("1", topic, json!({})).await?;
    Ok(c)
}

/// Reads what `c` has for at most `wait`: replies by ref (count, when), and counts broadcast.
async fn drain(
    c: &mut Client,
    wait: Duration,
    replies: &mut HashMap<String, (u64, Instant)>,
    seen: &mut Vec<u64>,
) {
    while let Ok(Ok(frame)) = tokio::time::timeout(wait, c.next_json()).await {
        record(&frame, replies, seen);
    }
}

fn record(frame: &Value, replies: &mut HashMap<String, (u64, Instant)>, seen: &mut Vec<u64>) {
    let count = |v: &Value| v["count"].as_u64().unwrap_or(0);
    if frame[3] == "phx_reply" && frame[4]["status"] == "ok" {
        let msg_ref = frame[1].as_str().unwrap_or_default().to_owned();
        replies.insert(msg_ref, (count(&frame[4]["response"]), Instant::now()));
    } else if frame[3] == "count" {
        seen.push(count(&frame[4]));
    }
}

/// Kill -9 of the owner of `topic` while a member on another node pushes `inc` every 10 ms.
async fn failover(redis: &RedisServer, plugin: &str, label: &str) -> anyhow::Result<()> {
    let mut three = nodes(redis, &["f1", "f2", "f3"]).await?;
    let doomed = three.pop().ok_or_else(|| anyhow::anyhow!("three nodes"))?;
    let topic = format!("{plugin}:failover");
    // The doomed node's member joins first: it owns the room.
    let _owner = member(&doomed.target()?, 1, &topic).await?;
    let mut pusher = member(&three[0].target()?, 2, &topic).await?;
    let _other = member(&three[1].target()?, 3, &topic).await?;
    let (mut replies, mut seen) = (HashMap::new(), Vec::new());
    let mut sent: Vec<(String, Instant)> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut killed = None;
    let mut last_before = 0;
    let mut doomed = Some(doomed);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let msg_ref = format!("p{}", sent.len());
                pusher.try_send_text(json!(["1", msg_ref, topic, "inc", {}]).to_string()).await?;
                sent.push((msg_ref, Instant::now()));
                if sent.len() == 300
                    && let Some(node) = doomed.take()
                {
                    last_before = seen.iter().copied().max().unwrap_or(0);
                    node.stop().await?;
                    killed = Some(Instant::now());
                }
                if killed.is_some_and(|k| k.elapsed() > Duration::from_secs(5)) {
                    break;
                }
            }
            frame = pusher.next_json() => record(&frame?, &mut replies, &mut seen),
        }
    }
    drain(&mut pusher, Duration::from_secs(2), &mut replies, &mut seen).await;
    let killed = killed.ok_or_else(|| anyhow::anyhow!("not killed"))?;
    let after: Vec<&(String, Instant)> = sent.iter().filter(|(_, at)| *at > killed).collect();
    let first = after
        .iter()
        .filter_map(|(r, _)| replies.get(r))
        .min_by_key(|(_, at)| *at)
        .ok_or_else(|| anyhow::anyhow!("no reply from a new owner"))?;
    let unanswered = sent
        .iter()
        .filter(|(r, _)| !replies.contains_key(r))
        .count();
    let lost_counts = (last_before + 1).saturating_sub(first.0);
    println!(
        "owned failover ({label}): kill -9 of the owner to the first reply from the new owner {:.0} ms; {unanswered} of {} pushes got no reply (sent to the owner as it died); the count went on at {} after {last_before} seen before the kill: {lost_counts} counts lost",
        (first.1 - killed).as_secs_f64() * 1e3,
        sent.len(),
        first.0,
    );
    for node in three {
        node.stop().await?;
    }
    Ok(())
}

pub async fn run(calls: usize) -> anyhow::Result<()> {
    let redis = RedisServer::start().await;
    let two = nodes(&redis, &["o1", "o2"]).await?;
    let (t1, t2) = (two[0].target()?, two[1].target()?);
    upload_variants(&t1).await?;
    let owner = t1.pid.ok_or_else(|| anyhow::anyhow!("no pid"))?;
    println!(
        "owned latency: {calls} sequential inc per row; p50/p99 in µs; CPU per message of the owner's process (for local: the member's node) and of Redis"
    );
    for (plugin, _, label) in VARIANTS {
        let topic = format!("{plugin}:bench");
        // The first join takes the lease: the room's owner is o1.
        let mut near = member(&t1, 1, &topic).await?;
        let mut far = member(&t2, 2, &topic).await?;
        let (p50, p99, cpu, rcpu) = measure(&mut near, &topic, calls, owner, &redis).await?;
        println!(
            "owned latency: {label}, member on the owner's node: p50 {p50:.0} p99 {p99:.0}; owner CPU {cpu:.1} µs, Redis CPU {rcpu:.1} µs per message"
        );
        let o2 = t2.pid.ok_or_else(|| anyhow::anyhow!("no pid"))?;
        // Local: the other member's room runs on its own node.
        let serving = if plugin == "tally-local" { o2 } else { owner };
        let (p50, p99, cpu, rcpu) = measure(&mut far, &topic, calls, serving, &redis).await?;
        println!(
            "owned latency: {label}, member on another node: p50 {p50:.0} p99 {p99:.0}; serving node CPU {cpu:.1} µs, Redis CPU {rcpu:.1} µs per message"
        );
    }
    for node in two {
        node.stop().await?;
    }
    for (plugin, _, label) in VARIANTS.iter().skip(1) {
        failover(&redis, plugin, label).await?;
    }
    Ok(())
}
