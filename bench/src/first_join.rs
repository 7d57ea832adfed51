//! `first-join [ROOMS]`: the latency of joining brand-new topics over one WebSocket, from
//! sending `phx_join` to reading its ok reply, with the heartbeat round trip on the same
//! socket as the floor. On a Cinder the bench started, the topics are `bad:fresh-N` (the
//! misbehave test plugin: each a new room and instance); with `--target`, `room:lobby-N`,
//! which a chat-room server serves.

use std::time::Instant;

use serde_json::json;

use crate::server::{Endpoint, Flags};
use crate::stats::percentiles;

pub async fn run(flags: &Flags, rooms: usize) -> anyhow::Result<()> {
    let server = Endpoint::start(flags).await?;
    let mut ws = server.target.open(1).await?;
    // The round trip of a heartbeat is the floor any join latency stands on.
    let mut floor = Vec::with_capacity(rooms);
    for i in 0..rooms {
        let start = Instant::now();
        ws.try_send_text(json!([null, format!("h{i}"), "phoenix", "heartbeat", {}]).to_string())
            .await?;
        ws.next_text().await?;
        floor.push(start.elapsed());
    }
    let (floor_median, floor_p99) = percentiles(floor);
    println!(
        "heartbeat round trip over loopback: median {floor_median:.1} µs, p99 {floor_p99:.1} µs"
    );
    let prefix = if server.target.own {
        "bad:fresh"
    } else {
        "room:lobby"
    };
    let mut samples = Vec::with_capacity(rooms);
    for i in 0..rooms {
        let topic = format!("{prefix}-{i}");
        let start = Instant::now();
        ws.try_join(&i.to_string(), &topic, json!({})).await?;
        samples.push(start.elapsed());
        ws.try_send_text(json!([i.to_string(), "l", topic, "phx_leave", {}]).to_string())
            .await?;
    }
    let (median, p99) = percentiles(samples);
    println!(
        "first-join: {rooms} new rooms, join request to ok reply over loopback: median {median:.1} µs, p99 {p99:.1} µs"
    );
    server.stop().await
}
