//! `cluster [SUBSCRIBERS] [ROOMS] [RATE]` (Cinder only): three Cinder nodes on a
//! `redis-server` this bench starts on a free port, against one node in the same run:
//!
//! - fan-out: SUBSCRIBERS sockets on `room:lobby` spread evenly over the nodes, rounds of
//!   100 broadcasts through one node's API; deliveries per second, the ratio to one node
//!   holding every subscriber, and Redis's CPU per delivered message (from `INFO cpu`);
//! - chat: ROOMS rooms of 10 members at RATE messages/s, each room's members spread over the
//!   three nodes, against every member on one node: send-to-receive latency;
//! - presence: the time from kill -9 of a node to the leave diff at a client on another
//!   (down period 1 s).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use cinder_tests::RedisServer;
use serde_json::json;

use crate::chat::chat_run;
use crate::fanout::{
    FANOUT_ROUNDS, TOPIC, api_broadcasts, count_deliveries, fanout_rounds, news_bodies,
};
use crate::net::open_many;
use crate::server::{Cinder, Target};
use crate::stats::{median, millions};

/// The down period of the bench's nodes.
const DOWN_MS: &str = "1000";

/// Redis's CPU time so far (user and system), in seconds.
pub(crate) async fn redis_cpu(redis: &RedisServer) -> anyhow::Result<f64> {
    let info = redis
        .command(&["INFO", "cpu"])
        .await
        .ok_or_else(|| anyhow::anyhow!("redis-server does not answer INFO"))?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok(field("used_cpu_sys:") + field("used_cpu_user:"))
}

/// Three nodes on `redis`, each up in the cluster.
async fn three_nodes(redis: &RedisServer) -> anyhow::Result<Vec<Cinder>> {
    nodes(redis, &["n1", "n2", "n3"]).await
}

/// Nodes named `ids` on `redis`, each seeing all of them (and no other) in the cluster.
pub(crate) async fn nodes(redis: &RedisServer, ids: &[&str]) -> anyhow::Result<Vec<Cinder>> {
    let url = redis.url();
    let mut nodes = Vec::new();
    for id in ids {
        nodes.push(
            Cinder::start_with(&["--redis", &url, "--node-id", id, "--node-down-ms", DOWN_MS])
                .await?,
        );
    }
    for node in &nodes {
        let target = node.target()?;
        let start = Instant::now();
        loop {
            let (_, stats) =
                cinder_tests::admin_as(target.api, &target.admin_token, "GET", "/api/stats", None)
                    .await;
            if stats["cluster"]["members"].as_array().map(Vec::len) == Some(ids.len()) {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(10),
                "the nodes did not all join within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(nodes)
}

/// Fan-out rounds over `targets` (subscriber i on `targets[i % n]`), broadcasts through
/// the first one's API; each round's deliveries per second, and the CPU seconds `redis`
/// used during the rounds.
async fn fanout_over(
    targets: &[Target],
    subscribers: usize,
    redis: Option<&RedisServer>,
) -> anyhow::Result<(Vec<f64>, f64)> {
    const BROADCASTS: usize = 100;
    let sockets = open_many(subscribers, |i| {
        let target = &targets[i % targets.len()];
        async move {
            let mut ws = target.open(i + 1).await?;
            ws.try_join("1", TOPIC, json!({})).await?;
            Ok(ws)
        }
    })
    .await?;
    let counter = Arc::new(AtomicU64::new(0));
    let readers = count_deliveries(sockets, "\"news\"", counter.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bodies = news_bodies(BROADCASTS);
    let per_round = (subscribers * BROADCASTS) as u64;
    let cpu_before = match redis {
        Some(redis) => redis_cpu(redis).await?,
        None => 0.0,
    };
    let result = fanout_rounds(None, &counter, per_round, || {
        api_broadcasts(&targets[0], bodies.clone())
    })
    .await;
    let redis_seconds = match redis {
        Some(redis) => redis_cpu(redis).await? - cpu_before,
        None => 0.0,
    };
    readers.iter().for_each(|r| r.abort());
    Ok((result?.0, redis_seconds))
}

pub async fn run(subscribers: usize, rooms: usize, rate: usize) -> anyhow::Result<()> {
    let redis = RedisServer::start().await;

    // Fan-out: one node, then three.
    let one = Cinder::start().await?;
    let (one_rates, _) = fanout_over(&[one.target()?], subscribers, None).await?;
    one.stop().await?;
    let nodes = three_nodes(&redis).await?;
    let targets: Vec<Target> = nodes.iter().map(Cinder::target).collect::<Result<_, _>>()?;
    let (three_rates, redis_seconds) = fanout_over(&targets, subscribers, Some(&redis)).await?;
    let deliveries = (subscribers * 100 * FANOUT_ROUNDS) as f64;
    println!(
        "cluster fanout: {subscribers} subscribers x 100 API broadcasts, {FANOUT_ROUNDS} rounds (M deliveries/s): one node {}, three nodes {}",
        millions(&one_rates),
        millions(&three_rates)
    );
    let (one_warm, three_warm) = (median(&one_rates[1..]), median(&three_rates[1..]));
    println!(
        "cluster fanout: later rounds median one node {one_warm:.0}/s, three nodes {three_warm:.0}/s, three/one {:.2}; Redis CPU {:.0} ns per delivery ({:.1} µs per broadcast)",
        three_warm / one_warm,
        redis_seconds * 1e9 / deliveries,
        redis_seconds * 1e6 / (100 * FANOUT_ROUNDS) as f64,
    );

    // Chat: each room's members over the three nodes, then all on one node.
    let across = chat_run(&targets, "room", rooms, rate).await?;
    println!("cluster chat (members of each room on three nodes): {across}");
    for node in nodes {
        node.stop().await?;
    }
    let one = Cinder::start().await?;
    let local = chat_run(&[one.target()?], "room", rooms, rate).await?;
    println!("cluster chat (every member on one node): {local}");
    one.stop().await?;

    // Presence: kill -9 of a node, timed to the leave diff on another.
    let mut nodes = three_nodes(&redis).await?;
    let doomed = nodes.pop().ok_or_else(|| anyhow::anyhow!("three nodes"))?;
    let mut watcher = nodes[0].target()?.open(1).await?;
    watcher.try_join("1", "presence:bench", json!({})).await?;
    let mut far = doomed.target()?.open(2).await?;
    far.try_join("1", "presence:bench", json!({})).await?;
    // Until the watcher has seen user 2 join.
    loop {
        let frame = watcher.next_json().await?;
        if frame[3] == "presence_diff" && frame[4]["joins"].get("2").is_some() {
            break;
        }
    }
    let killed = Instant::now();
    doomed.stop().await?;
    loop {
        let frame = watcher.next_json().await?;
        if frame[3] == "presence_diff" && frame[4]["leaves"].get("2").is_some() {
            break;
        }
    }
    println!(
        "cluster presence: kill -9 of a node to the leave diff on another: {:.0} ms (down period {DOWN_MS} ms)",
        killed.elapsed().as_secs_f64() * 1e3
    );
    drop(far);
    for node in nodes {
        node.stop().await?;
    }
    Ok(())
}
