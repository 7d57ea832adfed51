//! `reload [ROOMS]` (Cinder only: counter uploads and activations through the admin API):
//! ROOMS counter rooms each sending `inc` every 10 ms while counter 2.0.0 is uploaded, then
//! 1.0.0 and 2.0.0 activated in turn; upload-to-live time, per-room swap pause, message
//! latency, and lost or out-of-order replies (must be 0).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::server::{Cinder, Target};
use crate::stats::percentiles;

/// One counter room with one member sending `inc` every 10 ms until `stop`; returns the
/// latency of each reply and how many replies were missing or out of order.
async fn counting_member(
    target: Arc<Target>,
    room: usize,
    stop: tokio::sync::watch::Receiver<bool>,
    first_v2: Arc<std::sync::OnceLock<Instant>>,
) -> anyhow::Result<(Vec<Duration>, u64)> {
    let topic = format!("counter:bench-{room}");
    let mut ws = target.open(room).await?;
    ws.try_join("1", &topic, json!({})).await?;
    let mut latencies = Vec::new();
    let mut expected = 1;
    let mut anomalies = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !*stop.borrow() {
        tick.tick().await;
        let sent = Instant::now();
        ws.try_send_text(json!(["1", expected.to_string(), topic, "inc", {}]).to_string())
            .await?;
        let reply = loop {
            let frame = ws.next_json().await?;
            if frame[3] == "phx_reply" {
                break frame;
            }
        };
        latencies.push(sent.elapsed());
        let response = &reply[4]["response"];
        if reply[4]["status"] != "ok" || response["count"] != expected {
            anomalies += 1;
        }
        if response["version"] == "2.0.0" {
            let _ = first_v2.set(Instant::now());
        }
        expected += 1;
    }
    Ok((latencies, anomalies))
}

pub async fn run(rooms: usize) -> anyhow::Result<()> {
    const SWAPS: usize = 20;
    let server = Cinder::start().await?;
    let target = Arc::new(server.target()?);
    let addr = target.api;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let first_v2 = Arc::new(std::sync::OnceLock::new());
    let members: Vec<_> = (0..rooms)
        .map(|room| {
            tokio::spawn(counting_member(
                target.clone(),
                room,
                stop_rx.clone(),
                first_v2.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Upload to live: a version new to the server (compiled, stored, activated) until the
    // first reply from it reaches a client.
    let dir = cinder_tests::test_uploads_dir();
    let manifest = std::fs::read_to_string(dir.join("counter-2.0.0.toml"))?;
    let wasm = std::fs::read(dir.join("counter-2.0.0.wasm"))?;
    let started = Instant::now();
    let (status, body) = cinder_tests::upload(addr, &manifest, &wasm, true).await;
    let answered = started.elapsed();
    anyhow::ensure!(status == 201, "upload refused: {status} {body}");
    while first_v2.get().is_none() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let live = first_v2
        .get()
        .map(|t| t.duration_since(started))
        .ok_or_else(|| anyhow::anyhow!("no reply from 2.0.0"))?;
    let activation = &body["activation"];
    println!(
        "reload: upload to live {:.1} ms (upload answered after {:.1} ms; {} of {} rooms moved, pause p50 {} µs, p99 {} µs)",
        live.as_secs_f64() * 1e3,
        answered.as_secs_f64() * 1e3,
        activation["swapped"],
        activation["rooms"],
        activation["pause_us"]["p50"],
        activation["pause_us"]["p99"],
    );

    // Swaps back and forth between stored versions, under the same load.
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut took = Vec::new();
    for i in 0..SWAPS {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let version = if i % 2 == 0 { "1.0.0" } else { "2.0.0" };
        let (status, a) = cinder_tests::admin(
            addr,
            "POST",
            "/api/plugins/counter/activate",
            Some(&json!({ "version": version }).to_string()),
        )
        .await;
        anyhow::ensure!(status == 200, "activate refused: {status} {a}");
        anyhow::ensure!(a["failed"] == json!([]), "swaps failed: {a}");
        p50s.push(Duration::from_micros(
            a["pause_us"]["p50"].as_u64().unwrap_or(0),
        ));
        p99s.push(Duration::from_micros(
            a["pause_us"]["p99"].as_u64().unwrap_or(0),
        ));
        took.push(Duration::from_secs_f64(
            a["took_ms"].as_f64().unwrap_or(0.0) / 1e3,
        ));
    }
    stop_tx.send_replace(true);
    let mut latencies = Vec::new();
    let mut anomalies = 0;
    for member in members {
        let (l, a) = member.await??;
        latencies.extend(l);
        anomalies += a;
    }
    let messages = latencies.len();
    let (lat_median, lat_p99) = percentiles(latencies);
    let (p50_median, _) = percentiles(p50s);
    let worst_p99 = p99s.iter().max().map(|d| d.as_micros()).unwrap_or(0);
    let (p99_median, _) = percentiles(p99s);
    let (took_median, _) = percentiles(took);
    println!(
        "reload: {SWAPS} activations of {rooms} live rooms (each sending 100 msg/s): per-room pause p50 {p50_median:.0} µs, p99 {p99_median:.0} µs (median over activations; worst activation's p99 {worst_p99} µs); whole activation {:.1} ms median",
        took_median / 1e3,
    );
    println!(
        "reload: {messages} inc round trips during the run: median {lat_median:.0} µs, p99 {lat_p99:.0} µs; lost or out of order: {anomalies}"
    );
    server.stop().await
}
