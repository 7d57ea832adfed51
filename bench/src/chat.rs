//! `chat [ROOMS] [RATE]`: ROOMS rooms `room:lobby-N` of 10 members, each member sending
//! `new_message` with its send time at its share of RATE messages/s: send-to-receive
//! latency p50/p99/p999, deliveries per second, how even the offered load was, and the CPU
//! the server (when its process is known) and the load generator used, over 10 s after
//! 2 s of warm-up. On Cinder twice, a fresh server each: the chat plugin as shipped (the
//! fastlane), then the same component on `room-out:lobby-N` with `new_message`
//! intercepted; with `--target`, once, on `room:lobby-N`.

use std::time::{Duration, Instant};

use cinder_tests::Client;
use serde_json::json;

use crate::net::open_many;
use crate::proc::{Cpu, cpu_time};
use crate::server::{Endpoint, Flags, Target};

/// Tenths of the send period, for the check that the offered load is even.
const PHASES: usize = 10;

/// One chat member: sends `new_message` with its send time every `every`, from `epoch` +
/// `offset`, until `stop`; records the latency of every message it receives (microseconds)
/// and returns it with its sends counted by the tenth of the period they fell in.
async fn chat_member(
    mut ws: Client,
    topic: String,
    every: Duration,
    offset: Duration,
    epoch: Instant,
    measure_from: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(Vec<u32>, [u64; PHASES])> {
    let mut latencies = Vec::new();
    let mut sent = [0; PHASES];
    let period = every.as_nanos() as u64;
    // On a schedule fixed from the run's common epoch: a member's first poll comes up to
    // tens of milliseconds after `epoch` (10,000 spawns), and a start counted from it
    // wrapped the latest members' phases into the next period's first 50 ms (a third more
    // messages there); a late tick is sent at once and the schedule kept (`Burst`), where
    // `Delay` moved every late member to the moment the delay ended, which bunched them.
    let start = tokio::time::Instant::from_std(epoch) + offset;
    let mut tick = tokio::time::interval_at(start, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if *stop.borrow() {
                    break;
                }
                let now = epoch.elapsed().as_nanos() as u64;
                let frame =
                    json!(["1", null, topic, "new_message", {"body": now.to_string()}]).to_string();
                if ws.try_send_text(frame).await.is_err() {
                    break;
                }
                sent[((now % period) * PHASES as u64 / period) as usize] += 1;
            }
            // Unparsed: only the body's send time is read out of the frame.
            text = ws.next_text() => {
                let Ok(text) = text else { break };
                if let Some(rest) = text.split("\"body\":\"").nth(1)
                    && let Some(sent_at) = rest.split('"').next().and_then(|n| n.parse::<u64>().ok())
                    && Instant::now() >= measure_from
                {
                    let now = epoch.elapsed().as_nanos() as u64;
                    latencies.push((now.saturating_sub(sent_at) / 1000) as u32);
                }
            }
        }
    }
    Ok((latencies, sent))
}

/// Both chat variants at `rate` messages/s in: the plugin as shipped, on the fastlane (one
/// `handle_in`, the broadcast encoded once for the ten members), then the same component
/// with `new_message` intercepted (one `handle_in` and ten `handle_out` calls per message,
/// each member's copy encoded on its own). A server each, one after the other. With
/// `--target`, that server once, on `room:lobby-N`.
pub async fn run(flags: &Flags, rooms: usize, rate: usize) -> anyhow::Result<()> {
    let variants: Vec<(&str, &str)> = match &flags.target {
        None => vec![
            ("fastlane, as shipped", "room"),
            ("intercepted", "room-out"),
        ],
        Some(target) => vec![(target.as_str(), "room")],
    };
    for (variant, prefix) in variants {
        let server = Endpoint::start(flags).await?;
        let result = chat_run(std::slice::from_ref(&server.target), prefix, rooms, rate).await;
        server.stop().await?;
        println!("chat ({variant}): {}", result?);
    }
    Ok(())
}

/// `rooms` rooms `<prefix>:lobby-N` of 10 members, member i on `targets[i % n]` (so with
/// several nodes each room's members are on different nodes), each member sending at its
/// share of `rate`; returns the summary line. The server CPU is the first target's.
pub async fn chat_run(
    targets: &[Target],
    prefix: &str,
    rooms: usize,
    rate: usize,
) -> anyhow::Result<String> {
    const MEMBERS: usize = 10;
    const WARMUP: Duration = Duration::from_secs(2);
    const MEASURE: Duration = Duration::from_secs(10);
    let topic = |i: usize| format!("{prefix}:lobby-{}", i / MEMBERS);
    let sockets = open_many(rooms * MEMBERS, |i| {
        let topic = topic(i);
        let target = &targets[i % targets.len()];
        async move {
            let mut ws = target.open(i + 1).await?;
            ws.try_join("1", &topic, json!({})).await?;
            Ok(ws)
        }
    })
    .await?;
    let sockets_n = sockets.len();
    // Each member sends every `every`; starts spread evenly over one period.
    let every = Duration::from_secs_f64(sockets_n as f64 / rate as f64);
    let epoch = Instant::now();
    let measure_from = epoch + WARMUP;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let members: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, ws)| {
            let offset = every.mul_f64(i as f64 / sockets_n as f64);
            tokio::spawn(chat_member(
                ws,
                topic(i),
                every,
                offset,
                epoch,
                measure_from,
                stop_rx.clone(),
            ))
        })
        .collect();
    let pid = targets[0].pid;
    tokio::time::sleep_until(measure_from.into()).await;
    let (cpu_from, own_from) = (pid.map(Cpu::of).transpose()?, cpu_time(std::process::id())?);
    tokio::time::sleep_until((measure_from + MEASURE).into()).await;
    let cpu = match (pid, cpu_from) {
        (Some(pid), Some(from)) => Some(Cpu::of(pid)?.since(from)),
        _ => None,
    };
    let own = cpu_time(std::process::id())? - own_from;
    // Each member stops at its next tick, having read what arrived until then.
    stop_tx.send_replace(true);
    let mut latencies = Vec::new();
    let mut by_phase = [0; PHASES];
    for member in members {
        let (l, s) = member.await??;
        latencies.extend(l);
        by_phase
            .iter_mut()
            .zip(s)
            .for_each(|(all, one)| *all += one);
    }
    let sent: u64 = by_phase.iter().sum();
    let busiest = by_phase.iter().max().copied().unwrap_or(0);
    latencies.sort_unstable();
    anyhow::ensure!(!latencies.is_empty(), "nothing received");
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    let server_cpu = match cpu {
        Some(cpu) => format!(
            "server CPU {:.2} cores, {} per message in",
            cpu.total().as_secs_f64() / MEASURE.as_secs_f64(),
            cpu.per(rate as f64 * MEASURE.as_secs_f64()),
        ),
        None => "server CPU not measured (no --pid)".to_owned(),
    };
    Ok(format!(
        "{rooms} rooms x {MEMBERS} members, {:.0} messages/s in ({} sent), {:.0} deliveries/s measured over {}s: latency p50 {} µs, p99 {} µs, p999 {} µs; busiest tenth of the send period {:.2}x the mean; {server_cpu}; load generator CPU {:.2} cores",
        sent as f64 / (WARMUP + MEASURE).as_secs_f64(),
        sent,
        latencies.len() as f64 / MEASURE.as_secs_f64(),
        MEASURE.as_secs(),
        at(0.5),
        at(0.99),
        at(0.999),
        busiest as f64 * PHASES as f64 / sent.max(1) as f64,
        own.as_secs_f64() / MEASURE.as_secs_f64(),
    ))
}
