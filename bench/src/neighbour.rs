//! `neighbour [CALLS]` (Cinder only: the misbehave and hostile test plugins): a room's echo
//! round trip on `bad:good` alone, then beside a room next door that loops into its
//! deadline, does 9 ms of legal work per call, or makes oversized broadcasts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cinder_tests::Client;
use serde_json::json;

use crate::server::{Cinder, Target};
use crate::stats::percentiles;

/// Echo round trips on `topic`, one at a time.
async fn echoes(ws: &mut Client, topic: &str, calls: usize) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls {
        let msg_ref = format!("e{i}");
        let start = Instant::now();
        ws.try_send_text(json!(["1", msg_ref, topic, "echo", {"i": i}]).to_string())
            .await?;
        while ws.next_json().await?[1] != msg_ref.as_str() {}
        samples.push(start.elapsed());
    }
    Ok(samples)
}

/// What a bad neighbour does: its topic, command and the command's payload.
type Badness = (&'static str, &'static str, serde_json::Value);

/// Keeps a room next door busy until `stop`: `command` on `topic`, rejoining after
/// each crash. Returns how many calls it made.
async fn bad_neighbour(
    target: Arc<Target>,
    (topic, command, payload): Badness,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let mut ws = target.open(666).await?;
    let mut calls = 0;
    let mut join_ref = 0;
    while !*stop.borrow() {
        join_ref += 1;
        let jr = join_ref.to_string();
        ws.try_join(&jr, topic, json!({})).await?;
        // Call until the room crashes (loop) or forever (legal work), one call at a time.
        'calls: while !*stop.borrow() {
            calls += 1;
            ws.try_send_text(json!([jr, format!("c{calls}"), topic, command, payload]).to_string())
                .await?;
            loop {
                let frame = ws.next_json().await?;
                if frame[3] == "phx_error" {
                    break 'calls;
                }
                if frame[1] == format!("c{calls}").as_str() {
                    break;
                }
            }
        }
    }
    Ok(calls)
}

pub async fn run(calls: usize) -> anyhow::Result<()> {
    let server = Cinder::start().await?;
    let target = Arc::new(server.target()?);
    let mut good = target.open(1).await?;
    good.try_join("1", "bad:good", json!({})).await?;
    echoes(&mut good, "bad:good", 500).await?;
    let (alone_median, alone_p99) = percentiles(echoes(&mut good, "bad:good", calls).await?);
    println!(
        "neighbour: echo round trip alone: median {alone_median:.1} µs, p99 {alone_p99:.1} µs"
    );
    let neighbours: [(Badness, &str); 3] = [
        (
            ("bad:evil", "loop", json!({})),
            "a plugin looping into its 10 ms deadline",
        ),
        (
            ("bad:evil", "sleep-ish", json!({"ms": 9})),
            "a plugin doing 9 ms of legal work per call",
        ),
        (
            (
                "hostile:evil",
                "huge-broadcast",
                json!({"bytes": 8 << 20, "n": 1000}),
            ),
            "a plugin making 8 MiB broadcasts (refused by size) until its deadline",
        ),
    ];
    for (badness, what) in neighbours {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let evil = tokio::spawn(bad_neighbour(target.clone(), badness, stop_rx));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (median, p99) = percentiles(echoes(&mut good, "bad:good", calls).await?);
        stop_tx.send_replace(true);
        let evil_calls = evil.await??;
        println!(
            "neighbour: echo round trip beside {what}: median {median:.1} µs, p99 {p99:.1} µs ({evil_calls} calls next door)"
        );
    }
    server.stop().await
}
