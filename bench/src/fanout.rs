//! `fanout [SUBSCRIBERS]`: SUBSCRIBERS sockets on one topic (`room:lobby`), rounds of 100
//! broadcasts, deliveries per second and the server's CPU per delivery: first against the
//! raw baseline (`raw-server`, always started here), then the server under load with the
//! broadcasts through `POST /api/broadcast`, then with them sent as `new_message` over one
//! more WebSocket (the chat plugin on Cinder; any chat-room channel that broadcasts
//! `new_message` to the room elsewhere). The server's CPU needs its process (a Cinder the
//! bench started, or `--pid`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cinder_tests::Client;
use serde_json::json;

use crate::net::{self, open_many};
use crate::proc::Cpu;
use crate::raw_server;
use crate::server::{Endpoint, Flags, Target};
use crate::stats::{median, millions};

/// The topic the subscribers join: one a chat-room server serves.
pub const TOPIC: &str = "room:lobby";

/// Rounds of a fan-out measurement.
pub const FANOUT_ROUNDS: usize = 6;

/// `count` bodies for `POST /api/broadcast` of `news` on [`TOPIC`], numbered, with 64
/// bytes of padding.
pub fn news_bodies(count: usize) -> Arc<Vec<String>> {
    let pad = "x".repeat(64);
    Arc::new(
        (0..count)
            .map(|seq| {
                json!({"topic": TOPIC, "event": "news", "payload": {"seq": seq, "pad": pad}})
                    .to_string()
            })
            .collect(),
    )
}

/// Sends every body to `target`'s `POST /api/broadcast` at once, as a backend with news
/// for everyone would; an error for any refused. Cinder answers 202; another server may
/// say 200.
pub fn api_broadcasts(
    target: &Target,
    bodies: Arc<Vec<String>>,
) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + use<> {
    let (api, token, own) = (target.api, target.admin_token.clone(), target.own);
    async move {
        let answers =
            futures_util::future::join_all(bodies.iter().map(|body| {
                cinder_tests::admin_as(api, &token, "POST", "/api/broadcast", Some(body))
            }))
            .await;
        for (status, answer) in answers {
            let accepted = if own {
                status == 202
            } else {
                (200..300).contains(&status)
            };
            anyhow::ensure!(accepted, "broadcast refused: {status} {answer}");
        }
        Ok(())
    }
}

/// Counts frames that contain `marker` on each socket until `total` arrived in all.
pub fn count_deliveries(
    sockets: Vec<Client>,
    marker: &'static str,
    counter: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    sockets
        .into_iter()
        .map(|mut ws| {
            let counter = counter.clone();
            tokio::spawn(async move {
                // Unparsed: a substring check is all a delivery costs the load generator.
                while let Ok(text) = ws.next_text().await {
                    if text.contains(marker) {
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect()
}

/// Waits until `counter` reaches `total` (or 60 s pass); returns the time since `start`.
async fn until_delivered(
    counter: &AtomicU64,
    total: u64,
    start: Instant,
) -> anyhow::Result<Duration> {
    while counter.load(Ordering::Relaxed) < total {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "only {} of {total} deliveries after 60 s",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    Ok(start.elapsed())
}

/// Runs `work` on a thread of its own, so the publisher is not queued behind thousands of
/// reader tasks on the load generator's runtime.
async fn on_own_thread(
    work: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(work)
    })
    .await?
}

pub async fn run(flags: &Flags, subscribers: usize) -> anyhow::Result<()> {
    const BROADCASTS: usize = 100;
    let per_round = (subscribers * BROADCASTS) as u64;
    let pad = "x".repeat(64);
    // What the server under load is called in the output, and how its second publisher
    // broadcasts.
    let (name, channel) = if flags.target.is_none() {
        ("cinder", "plugin")
    } else {
        ("target", "channel")
    };

    // Raw baseline: one more connection publishes.
    let (mut raw, raw_addr) = raw_server::start().await?;
    let url = format!("ws://{raw_addr}/");
    let sockets = open_many(subscribers, |_| net::connect(raw_addr, &url)).await?;
    let counter = Arc::new(AtomicU64::new(0));
    let readers = count_deliveries(sockets, "\"news\"", counter.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let raw_pid = raw
        .id()
        .ok_or_else(|| anyhow::anyhow!("raw server exited"))?;
    let (raw_rates, raw_cpu) = fanout_rounds(Some(raw_pid), &counter, per_round, || {
        let frames: Vec<String> = (0..BROADCASTS)
            .map(|seq| json!({"event": "news", "seq": seq, "pad": pad}).to_string())
            .collect();
        let url = url.clone();
        async move {
            let mut publisher = net::connect(raw_addr, &url).await?;
            for frame in frames {
                publisher.try_send_text(frame).await?;
            }
            Ok(())
        }
    })
    .await?;
    // Measured: the baseline's pid is known.
    let raw_cpu = raw_cpu.unwrap_or_default();
    readers.iter().for_each(|r| r.abort());
    raw.kill().await?;

    // The server: the same count of sockets joined to one topic, broadcasts through the API.
    let api_bodies = news_bodies(BROADCASTS);
    let (rates, cpu) = server_fanout(flags, "\"news\"", subscribers, per_round, |target| {
        api_broadcasts(target, api_bodies.clone())
    })
    .await?;

    // The server again, the broadcasts made by a channel (on Cinder, the chat plugin): one
    // more socket sends `new_message` (not intercepted) 100 times over one WebSocket, as the
    // baseline's publisher sends its frames.
    let frames: Vec<String> = (0..BROADCASTS)
        .map(|seq| {
            json!(["p", null, TOPIC, "new_message", {"body": format!("{seq} {pad}")}]).to_string()
        })
        .collect();
    let frames = Arc::new(frames);
    let (plugin_rates, plugin_cpu) =
        server_fanout(flags, "\"new_message\"", subscribers, per_round, |target| {
            let frames = frames.clone();
            let target = target.clone();
            async move {
                let mut publisher = target.open(0).await?;
                publisher.try_join("p", TOPIC, json!({})).await?;
                for frame in frames.iter() {
                    publisher.try_send_text(frame.clone()).await?;
                }
                // Stays until its own copies arrive: closing with them unread would reset
                // the connection, and the server would lose what it had not yet read.
                let mut own = 0;
                while own < frames.len() {
                    if publisher.next_json().await?[3] == "new_message" {
                        own += 1;
                    }
                }
                Ok(())
            }
        })
        .await?;

    // The first round also grows every socket's write buffer; the others are the steady
    // state. Medians of those, since one round lasts a few hundred milliseconds.
    let raw_warm = median(&raw_rates[1..]);
    println!(
        "fanout: {subscribers} subscribers x {BROADCASTS} broadcasts, {FANOUT_ROUNDS} rounds (M deliveries/s): raw baseline {}, {name} (API) {}, {name} ({channel}) {}",
        millions(&raw_rates),
        millions(&rates),
        millions(&plugin_rates),
    );
    // Server CPU per delivery over the later rounds: steadier than rates on a shared box.
    // User and system apart: the kernel's part (TCP over loopback) is the same work for
    // both servers, the user part is where they differ.
    let warm_deliveries = (per_round * (FANOUT_ROUNDS as u64 - 1)) as f64;
    println!(
        "fanout: raw baseline: later rounds median {raw_warm:.0}/s; server CPU per delivery {}",
        raw_cpu.per(warm_deliveries)
    );
    for (how, rates, cpu) in [("API", &rates, cpu), (channel, &plugin_rates, plugin_cpu)] {
        let warm = median(&rates[1..]);
        let cpu = match cpu {
            Some(cpu) => format!(
                "server CPU per delivery {}, baseline/{name} {:.2}",
                cpu.per(warm_deliveries),
                raw_cpu.total().as_secs_f64() / cpu.total().as_secs_f64(),
            ),
            None => "server CPU not measured (no --pid)".to_owned(),
        };
        println!(
            "fanout: {name} ({how}): first round {name}/baseline {:.2}; later rounds median {warm:.0}/s, {name}/baseline {:.2}; {cpu}",
            rates[0] / raw_rates[0],
            warm / raw_warm,
        );
    }
    Ok(())
}

/// Starts the server under load (a fresh Cinder, or the `--target`), joins `subscribers`
/// sockets to `TOPIC`, and runs the fan-out rounds with `publish` (given the server);
/// each frame holding `marker` counts as a delivery. Returns each round's rate and, when
/// the server's process is known, its CPU over the later rounds.
async fn server_fanout<F, Fut>(
    flags: &Flags,
    marker: &'static str,
    subscribers: usize,
    per_round: u64,
    publish: F,
) -> anyhow::Result<(Vec<f64>, Option<Cpu>)>
where
    F: Fn(&Target) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let server = Endpoint::start(flags).await?;
    let target = &server.target;
    let sockets = open_many(subscribers, |i| async move {
        let mut ws = target.open(i + 1).await?;
        ws.try_join("1", TOPIC, json!({})).await?;
        Ok(ws)
    })
    .await?;
    let counter = Arc::new(AtomicU64::new(0));
    let readers = count_deliveries(sockets, marker, counter.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let result = fanout_rounds(target.pid, &counter, per_round, || publish(target)).await;
    readers.iter().for_each(|r| r.abort());
    server.stop().await?;
    result
}

/// Runs `FANOUT_ROUNDS` rounds of `publish` (on a thread of its own) against the server
/// `pid`, whose subscribers count each round's `per_round` deliveries in `counter`. Returns
/// each round's deliveries per second and, with a `pid`, the server's CPU time over all
/// rounds but the first.
pub async fn fanout_rounds<F, Fut>(
    pid: Option<u32>,
    counter: &AtomicU64,
    per_round: u64,
    publish: F,
) -> anyhow::Result<(Vec<f64>, Option<Cpu>)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut rates = Vec::with_capacity(FANOUT_ROUNDS);
    let mut cpu = Cpu::default();
    for round in 0..FANOUT_ROUNDS {
        let cpu_before = pid.map(Cpu::of).transpose()?;
        let start = Instant::now();
        on_own_thread(publish()).await?;
        let took = until_delivered(counter, per_round * (round as u64 + 1), start).await?;
        rates.push(per_round as f64 / took.as_secs_f64());
        if round > 0
            && let (Some(pid), Some(before)) = (pid, cpu_before)
        {
            cpu = cpu.add(Cpu::of(pid)?.since(before));
        }
    }
    Ok((rates, pid.map(|_| cpu)))
}
