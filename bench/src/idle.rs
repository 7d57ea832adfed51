//! `idle [SOCKETS]`: the server's RSS per idle socket joined to `room:lobby`, then its CPU
//! and its threads' context switches per second while nothing is sent. Both figures need
//! the server's process (a Cinder the bench started, or `--pid`).

use std::time::Duration;

use serde_json::json;

use crate::net::open_many;
use crate::proc::{context_switches, cpu_time, rss_kib};
use crate::server::{Endpoint, Flags};

/// The topic every socket joins: one a chat-room server serves.
const TOPIC: &str = "room:lobby";

pub async fn run(flags: &Flags, sockets: usize) -> anyhow::Result<()> {
    let server = Endpoint::start(flags).await?;
    let target = &server.target;
    let pid = target.pid;
    // One member first, so the room and its instance exist before the baseline.
    let mut first = target.open(0).await?;
    first.try_join("1", TOPIC, json!({})).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = pid.map(rss_kib).transpose()?;
    let all = open_many(sockets, |i| async move {
        let mut ws = target.open(i + 1).await?;
        ws.try_join("1", TOPIC, json!({})).await?;
        anyhow::Ok(ws)
    })
    .await?;
    let (Some(pid), Some(before)) = (pid, before) else {
        println!(
            "idle: {sockets} sockets joined to {TOPIC}; server RSS and CPU not measured (no --pid)"
        );
        drop(all);
        return server.stop().await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    println!(
        "idle: {sockets} sockets joined to {TOPIC}; server RSS {before} KiB -> {after} KiB; {:.2} KiB per socket",
        (after.saturating_sub(before)) as f64 / sockets as f64
    );
    // What the idle server costs while nothing happens: its CPU, and how often its threads
    // were switched in.
    const QUIET: Duration = Duration::from_secs(5);
    let (cpu_from, switches_from) = (cpu_time(pid)?, context_switches(pid)?);
    tokio::time::sleep(QUIET).await;
    let cpu = cpu_time(pid)? - cpu_from;
    // Threads that ended in between are not counted; threads that started count from zero.
    let switches: u64 = context_switches(pid)?
        .iter()
        .map(|(tid, n)| n.saturating_sub(switches_from.get(tid).copied().unwrap_or(0)))
        .sum();
    println!(
        "idle: over {}s with nothing sent, server CPU {:.1} ms per second, {:.0} context switches per second",
        QUIET.as_secs(),
        cpu.as_secs_f64() * 1e3 / QUIET.as_secs_f64(),
        switches as f64 / QUIET.as_secs_f64(),
    );
    drop(all);
    server.stop().await
}
