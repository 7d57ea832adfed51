//! Load measurements against a real `cinder` server process on loopback.
//!
//! ```text
//! cinder-bench idle [SOCKETS]        server RSS per idle socket joined to room:lobby
//! cinder-bench first-join [ROOMS]    join latency of brand-new rooms over a WebSocket
//! cinder-bench neighbour [CALLS]     a room's echo latency alone, beside a looping plugin,
//!                                    and beside a plugin doing 9 ms of legal work per call
//! cinder-bench reload [ROOMS]        hot reload under load: ROOMS counter rooms each sending
//!                                    `inc` every 10 ms; upload-to-live time, per-room swap
//!                                    pause, message latency, and lost messages (must be 0)
//! ```
//!
//! Starts `target/release/cinder` (or `$CINDER_BIN`) with the test plugins on a free port,
//! measures, and stops it. Bounded in count and time; loopback only.

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "bench-secret";
const LIMIT: Duration = Duration::from_secs(300);

struct Server {
    child: Child,
    addr: String,
    _data: std::path::PathBuf,
}

async fn start_server() -> anyhow::Result<Server> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = std::env::var("CINDER_BIN")
        .unwrap_or_else(|_| root.join("target/release/cinder").display().to_string());
    let plugins = cinder_tests::test_plugins_dir();
    let data = std::env::temp_dir().join(format!("cinder-bench-{}", std::process::id()));
    let mut child = Command::new(&bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            SECRET,
            "--admin-token",
            cinder_tests::ADMIN,
        ])
        .arg("--plugins-dir")
        .arg(&plugins)
        .arg("--data-dir")
        .arg(&data)
        // Load, not abuse: lift the per-socket rate limit and the crash quarantine.
        .args(["--max-rooms", "2000", "--crash-limit", "1000000"])
        .args([
            "--messages-per-sec",
            "1000000",
            "--message-burst",
            "1000000",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!("starting {bin}: {e} (build it: cargo build --release -p cinder)")
        })?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        let line = lines
            .next_line()
            .await?
            .ok_or_else(|| anyhow::anyhow!("server exited"))?;
        if let Some(addr) = line.strip_prefix("cinder listening on http://") {
            break addr.to_owned();
        }
    };
    Ok(Server {
        child,
        addr,
        _data: data,
    })
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(addr: &str, user: usize) -> anyhow::Result<Ws> {
    let token = cinder::auth::mint(SECRET, &user.to_string(), 3600)?;
    let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0&token={token}");
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, None, true).await?;
    Ok(ws)
}

/// The next text frame, as JSON.
async fn next_frame(ws: &mut Ws) -> anyhow::Result<serde_json::Value> {
    loop {
        let Some(msg) = ws.next().await else {
            anyhow::bail!("socket closed")
        };
        if let Message::Text(text) = msg? {
            return Ok(serde_json::from_str(&text)?);
        }
    }
}

async fn join(ws: &mut Ws, join_ref: &str, topic: &str) -> anyhow::Result<()> {
    ws.send(Message::text(
        json!([join_ref, join_ref, topic, "phx_join", {}]).to_string(),
    ))
    .await?;
    loop {
        let frame = next_frame(ws).await?;
        if frame[1] == join_ref && frame[3] == "phx_reply" {
            anyhow::ensure!(frame[4]["status"] == "ok", "join refused: {frame}");
            return Ok(());
        }
    }
}

async fn idle(sockets: usize) -> anyhow::Result<()> {
    let mut server = start_server().await?;
    let pid = server.child.id().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    // One member first, so the room and its instance exist before the baseline.
    let mut first = open(&server.addr, 0).await?;
    join(&mut first, "1", "room:lobby").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid)?;
    let mut all = Vec::with_capacity(sockets);
    for chunk in (0..sockets).collect::<Vec<_>>().chunks(200) {
        let batch = futures_util::future::try_join_all(chunk.iter().map(|&i| {
            let addr = server.addr.clone();
            async move {
                let mut ws = open(&addr, i + 1).await?;
                join(&mut ws, "1", "room:lobby").await?;
                anyhow::Ok(ws)
            }
        }))
        .await?;
        all.extend(batch);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid)?;
    println!(
        "idle: {sockets} sockets joined to room:lobby; server RSS {before} KiB -> {after} KiB; {:.2} KiB per socket",
        (after.saturating_sub(before)) as f64 / sockets as f64
    );
    drop(all);
    server.child.kill().await?;
    Ok(())
}

fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

async fn first_join(rooms: usize) -> anyhow::Result<()> {
    let mut server = start_server().await?;
    let mut ws = open(&server.addr, 1).await?;
    // The round trip of a heartbeat is the floor any join latency stands on.
    let mut floor = Vec::with_capacity(rooms);
    for i in 0..rooms {
        let start = Instant::now();
        ws.send(Message::text(
            json!([null, format!("h{i}"), "phoenix", "heartbeat", {}]).to_string(),
        ))
        .await?;
        ws.next().await.ok_or_else(|| anyhow::anyhow!("closed"))??;
        floor.push(start.elapsed());
    }
    let (floor_median, floor_p99) = percentiles(floor);
    println!(
        "heartbeat round trip over loopback: median {floor_median:.1} µs, p99 {floor_p99:.1} µs"
    );
    let mut samples = Vec::with_capacity(rooms);
    for i in 0..rooms {
        let topic = format!("bad:fresh-{i}");
        let start = Instant::now();
        join(&mut ws, &i.to_string(), &topic).await?;
        samples.push(start.elapsed());
        ws.send(Message::text(
            json!([i.to_string(), "l", topic, "phx_leave", {}]).to_string(),
        ))
        .await?;
    }
    let (median, p99) = percentiles(samples);
    println!(
        "first-join: {rooms} new rooms, join request to ok reply over loopback: median {median:.1} µs, p99 {p99:.1} µs"
    );
    server.child.kill().await?;
    Ok(())
}

/// Echo round trips on `topic`, one at a time.
async fn echoes(ws: &mut Ws, topic: &str, calls: usize) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls {
        let msg_ref = format!("e{i}");
        let start = Instant::now();
        ws.send(Message::text(
            json!(["1", msg_ref, topic, "echo", {"i": i}]).to_string(),
        ))
        .await?;
        while next_frame(ws).await?[1] != msg_ref.as_str() {}
        samples.push(start.elapsed());
    }
    Ok(samples)
}

/// Keeps a room next door busy until `stop`: `command` on `bad:evil`, rejoining after
/// each crash. Returns how many calls it made.
async fn bad_neighbour(
    addr: String,
    command: &'static str,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let mut ws = open(&addr, 666).await?;
    let mut calls = 0;
    let mut join_ref = 0;
    while !*stop.borrow() {
        join_ref += 1;
        let jr = join_ref.to_string();
        join(&mut ws, &jr, "bad:evil").await?;
        // Call until the room crashes (loop) or forever (legal work), one call at a time.
        'calls: while !*stop.borrow() {
            calls += 1;
            ws.send(Message::text(
                json!([jr, format!("c{calls}"), "bad:evil", command, {"ms": 9}]).to_string(),
            ))
            .await?;
            loop {
                let frame = next_frame(&mut ws).await?;
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

async fn neighbour(calls: usize) -> anyhow::Result<()> {
    let mut server = start_server().await?;
    let mut good = open(&server.addr, 1).await?;
    join(&mut good, "1", "bad:good").await?;
    echoes(&mut good, "bad:good", 500).await?;
    let (alone_median, alone_p99) = percentiles(echoes(&mut good, "bad:good", calls).await?);
    println!(
        "neighbour: echo round trip alone: median {alone_median:.1} µs, p99 {alone_p99:.1} µs"
    );
    for (command, what) in [
        ("loop", "a plugin looping into its 10 ms deadline"),
        ("sleep-ish", "a plugin doing 9 ms of legal work per call"),
    ] {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let evil = tokio::spawn(bad_neighbour(server.addr.clone(), command, stop_rx));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (median, p99) = percentiles(echoes(&mut good, "bad:good", calls).await?);
        stop_tx.send_replace(true);
        let evil_calls = evil.await??;
        println!(
            "neighbour: echo round trip beside {what}: median {median:.1} µs, p99 {p99:.1} µs ({evil_calls} calls next door)"
        );
    }
    server.child.kill().await?;
    Ok(())
}

/// One counter room with one member sending `inc` every 10 ms until `stop`; returns the
/// latency of each reply and how many replies were missing or out of order.
async fn counting_member(
    addr: String,
    room: usize,
    stop: tokio::sync::watch::Receiver<bool>,
    first_v2: std::sync::Arc<std::sync::OnceLock<Instant>>,
) -> anyhow::Result<(Vec<Duration>, u64)> {
    let topic = format!("counter:bench-{room}");
    let mut ws = open(&addr, room).await?;
    join(&mut ws, "1", &topic).await?;
    let mut latencies = Vec::new();
    let mut expected = 1;
    let mut anomalies = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while !*stop.borrow() {
        tick.tick().await;
        let sent = Instant::now();
        ws.send(Message::text(
            json!(["1", expected.to_string(), topic, "inc", {}]).to_string(),
        ))
        .await?;
        let reply = loop {
            let frame = next_frame(&mut ws).await?;
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

async fn reload(rooms: usize) -> anyhow::Result<()> {
    const SWAPS: usize = 20;
    let mut server = start_server().await?;
    let addr: std::net::SocketAddr = server.addr.parse()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let first_v2 = std::sync::Arc::new(std::sync::OnceLock::new());
    let members: Vec<_> = (0..rooms)
        .map(|room| {
            tokio::spawn(counting_member(
                server.addr.clone(),
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
    server.child.kill().await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count = |default: usize| args.get(1).and_then(|n| n.parse().ok()).unwrap_or(default);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let work = async {
            match args.first().map(String::as_str) {
                Some("idle") => idle(count(10_000)).await,
                Some("first-join") => first_join(count(1_000)).await,
                Some("neighbour") => neighbour(count(2_000)).await,
                Some("reload") => reload(count(100)).await,
                _ => anyhow::bail!(
                    "usage: cinder-bench idle [SOCKETS] | first-join [ROOMS] | neighbour [CALLS] | reload [ROOMS]"
                ),
            }
        };
        tokio::time::timeout(LIMIT, work)
            .await
            .map_err(|_| anyhow::anyhow!("gave up after {LIMIT:?}"))?
    })
}
