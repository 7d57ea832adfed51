//! Load measurements against a real `cinder` server process on loopback.
//!
//! ```text
//! cinder-bench idle [SOCKETS]        server RSS per idle socket joined to room:lobby
//! cinder-bench first-join [ROOMS]    join latency of brand-new rooms over a WebSocket
//! cinder-bench neighbour [CALLS]     a room's echo latency alone, beside a looping plugin,
//!                                    beside a plugin doing 9 ms of legal work per call,
//!                                    and beside one making oversized broadcasts
//! cinder-bench reload [ROOMS]        hot reload under load: ROOMS counter rooms each sending
//!                                    `inc` every 10 ms; upload-to-live time, per-room swap
//!                                    pause, message latency, and lost messages (must be 0)
//! cinder-bench fanout [SUBSCRIBERS]  one topic, SUBSCRIBERS sockets, 6 rounds of 100
//!                                    broadcasts through the HTTP API, then made by a plugin:
//!                                    deliveries per second and server CPU per delivery
//!                                    (user and kernel), against the raw baseline server in
//!                                    the same run
//! cinder-bench chat [ROOMS] [RATE]   ROOMS chat rooms of 10 members, RATE messages/s in all
//!                                    through the chat plugin: send-to-receive latency
//!                                    p50/p99/p999, deliveries per second and the CPU the
//!                                    server and the load generator used, for 10 s; as
//!                                    shipped (new_message on the fastlane), then the same
//!                                    component with new_message intercepted (handle_out
//!                                    per member)
//! cinder-bench raw-server            the raw baseline: a tokio-tungstenite server that sends
//!                                    every text frame it gets to every other connection
//! ```
//!
//! Starts `target/release/cinder` (or `$CINDER_BIN`) with the test plugins on a free port,
//! measures, and stops it. Bounded in count and time; loopback only. Raises its open-file
//! limit as far as the system lets it (the servers it starts inherit it), and spreads its
//! connections over many 127.x.y.z source addresses, so the count is not capped by the
//! ephemeral ports of one address.

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

/// The release server (or `$CINDER_BIN`) with the test plugins (`make plugins`): among them
/// `chat` on `room:*`, and the same component as `chat-intercept` on `room-out:*` with
/// `new_message` intercepted.
async fn start_server() -> anyhow::Result<Server> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = std::env::var("CINDER_BIN")
        .unwrap_or_else(|_| root.join("target/release/cinder").display().to_string());
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
        .arg(cinder_tests::test_plugins_dir())
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

/// CPU time a process has used so far: in user space and in the kernel.
#[derive(Clone, Copy, Default)]
struct Cpu {
    user: Duration,
    system: Duration,
}

impl Cpu {
    fn of(pid: u32) -> anyhow::Result<Cpu> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The fields after the command name (which may hold spaces): utime and stime are
        // the 12th and 13th of them, in clock ticks.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| -> anyhow::Result<u64> {
            let field = fields
                .get(i)
                .ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?;
            Ok(field.parse()?)
        };
        #[allow(unsafe_code)]
        // SAFETY: sysconf only reads a configuration value.
        let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        anyhow::ensure!(per_sec > 0, "no clock tick rate");
        let time = |ticks: u64| Duration::from_secs_f64(ticks as f64 / per_sec as f64);
        Ok(Cpu {
            user: time(ticks(11)?),
            system: time(ticks(12)?),
        })
    }

    fn total(self) -> Duration {
        self.user + self.system
    }

    /// What was used since `before`.
    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
        }
    }

    fn add(self, other: Cpu) -> Cpu {
        Cpu {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }

    /// "T ns (U user + S system)" per one of `count`.
    fn per(self, count: f64) -> String {
        let ns = |d: Duration| d.as_secs_f64() * 1e9 / count;
        format!(
            "{:.0} ns ({:.0} user + {:.0} system)",
            ns(self.total()),
            ns(self.user),
            ns(self.system)
        )
    }
}

/// CPU time (user and system) a process has used so far.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    Ok(Cpu::of(pid)?.total())
}

/// Context switches (voluntary and not) so far of each of a process's threads, by id.
fn context_switches(pid: u32) -> anyhow::Result<std::collections::HashMap<String, u64>> {
    let mut threads = std::collections::HashMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        // A thread that ended since the listing is skipped.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let switches = status
            .lines()
            .filter_map(|l| {
                l.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .sum();
        threads.insert(task.file_name().to_string_lossy().into_owned(), switches);
    }
    Ok(threads)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Connections per source address: well inside the ephemeral port range of one address.
const PER_SOURCE: usize = 5_000;

/// Connections opened by this process so far: each gets the next source slot.
static OPENED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The source address of the next connection: 127.R.x.y, with R random per process so ports
/// still in TIME_WAIT from an earlier run are never in the way, and a new x.y every
/// `PER_SOURCE` connections.
fn next_source() -> std::net::Ipv4Addr {
    static RUN: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    let run = *RUN.get_or_init(|| 1 + (std::process::id() % 250) as u8);
    let slot = OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) / PER_SOURCE;
    std::net::Ipv4Addr::new(127, run, (slot / 250) as u8, 1 + (slot % 250) as u8)
}

/// Raises the open-file limit to `want` (or as far as it goes); returns the new limit.
fn raise_fd_limit(want: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    #[allow(unsafe_code)]
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer,
    // which lives on this stack frame for the duration of each call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: want.max(limit.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return want;
        }
        let soft = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
            return limit.rlim_max;
        }
    }
    limit.rlim_cur
}

/// Lets the kernel pick the source port at `connect` (by the whole 4-tuple) rather than at
/// `bind`, so ports still in TIME_WAIT from an earlier phase do not run the range dry.
fn bind_address_no_port(socket: &tokio::net::TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let on: libc::c_int = 1;
    #[allow(unsafe_code)]
    // SAFETY: the fd is the socket's own and open for the duration of the call; the option
    // value points to a live c_int whose size is passed along.
    let status = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if status == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A WebSocket to `url` on `addr` from the next source address, with small buffers
/// (tungstenite's defaults are 128 KiB per connection).
async fn connect_ws(addr: &str, url: String) -> anyhow::Result<Ws> {
    let source = next_source();
    let socket = tokio::net::TcpSocket::new_v4()?;
    bind_address_no_port(&socket)?;
    socket.bind(std::net::SocketAddr::new(source.into(), 0))?;
    let stream = socket.connect(addr.parse()?).await?;
    stream.set_nodelay(true)?;
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config)).await?;
    Ok(ws)
}

/// A Phoenix V2 socket to Cinder for `user`.
async fn open(addr: &str, user: usize) -> anyhow::Result<Ws> {
    let token = cinder::auth::mint(SECRET, &user.to_string(), 3600)?;
    connect_ws(
        addr,
        format!("ws://{addr}/socket/websocket?vsn=2.0.0&token={token}"),
    )
    .await
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

/// What a bad neighbour does: its topic, command and the command's payload.
type Badness = (&'static str, &'static str, serde_json::Value);

/// Keeps a room next door busy until `stop`: `command` on `topic`, rejoining after
/// each crash. Returns how many calls it made.
async fn bad_neighbour(
    addr: String,
    (topic, command, payload): Badness,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let mut ws = open(&addr, 666).await?;
    let mut calls = 0;
    let mut join_ref = 0;
    while !*stop.borrow() {
        join_ref += 1;
        let jr = join_ref.to_string();
        join(&mut ws, &jr, topic).await?;
        // Call until the room crashes (loop) or forever (legal work), one call at a time.
        'calls: while !*stop.borrow() {
            calls += 1;
            ws.send(Message::text(
                json!([jr, format!("c{calls}"), topic, command, payload]).to_string(),
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
        let evil = tokio::spawn(bad_neighbour(server.addr.clone(), badness, stop_rx));
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

type RawFrame = (u64, tokio_tungstenite::tungstenite::Utf8Bytes);

/// Writes `first` and what else the baseline's channel has ready (up to 64 frames, the
/// connection's own skipped) in one flush, as Cinder's socket task does. False once the
/// connection or the channel is gone.
async fn raw_write(
    ws: &mut Ws,
    rx: &mut tokio::sync::broadcast::Receiver<RawFrame>,
    id: u64,
    first: Option<RawFrame>,
) -> bool {
    use tokio::sync::broadcast::error::TryRecvError;
    let mut next = first;
    let mut batch = 0;
    loop {
        if let Some((from, text)) = next.take()
            && from != id
        {
            if ws.feed(Message::Text(text)).await.is_err() {
                return false;
            }
            batch += 1;
        }
        if batch == 64 {
            break;
        }
        next = match rx.try_recv() {
            Ok(frame) => Some(frame),
            Err(TryRecvError::Lagged(_)) => None,
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Closed) => return false,
        };
    }
    ws.flush().await.is_ok()
}

/// The raw baseline: every text frame a connection sends goes to every other connection.
/// No protocol, no auth, no plugin: what tokio-tungstenite alone costs.
async fn raw_server() -> anyhow::Result<()> {
    use tokio::sync::broadcast;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("raw listening on {}", listener.local_addr()?);
    let (tx, _) = broadcast::channel::<RawFrame>(4096);
    let mut next_id = 0u64;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        next_id += 1;
        let id = next_id;
        let tx = tx.clone();
        let mut rx = tx.subscribe();
        tokio::spawn(async move {
            let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                .read_buffer_size(1024)
                .write_buffer_size(16 << 10);
            let Ok(mut ws) =
                tokio_tungstenite::accept_async_with_config(stream, Some(config)).await
            else {
                return;
            };
            loop {
                tokio::select! {
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Text(text))) => { let _ = tx.send((id, text)); }
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                    got = rx.recv() => {
                        let first = match got {
                            Ok(frame) => Some(frame),
                            Err(broadcast::error::RecvError::Lagged(_)) => None,
                            Err(broadcast::error::RecvError::Closed) => break,
                        };
                        if !raw_write(&mut ws, &mut rx, id, first).await {
                            break;
                        }
                    }
                }
            }
        });
    }
}

/// Starts `cinder-bench raw-server` and returns it with its address.
async fn start_raw_server() -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("raw-server")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let line = BufReader::new(stdout)
        .lines()
        .next_line()
        .await?
        .ok_or_else(|| anyhow::anyhow!("raw server exited"))?;
    let addr = line
        .strip_prefix("raw listening on ")
        .ok_or_else(|| anyhow::anyhow!("unexpected line {line}"))?
        .to_owned();
    Ok((child, addr))
}

/// Counts frames that contain `marker` on each socket until `total` arrived in all.
fn count_deliveries(
    sockets: Vec<Ws>,
    marker: &'static str,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    sockets
        .into_iter()
        .map(|mut ws| {
            let counter = counter.clone();
            tokio::spawn(async move {
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Text(text) = msg
                        && text.contains(marker)
                    {
                        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        })
        .collect()
}

/// Waits until `counter` reaches `total` (or 60 s pass); returns the time since `start`.
async fn until_delivered(
    counter: &std::sync::atomic::AtomicU64,
    total: u64,
    start: Instant,
) -> anyhow::Result<Duration> {
    while counter.load(std::sync::atomic::Ordering::Relaxed) < total {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "only {} of {total} deliveries after 60 s",
            counter.load(std::sync::atomic::Ordering::Relaxed)
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

/// Opens `n` sockets with `open_one`, 200 at a time.
async fn open_many<F, Fut>(n: usize, open_one: F) -> anyhow::Result<Vec<Ws>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Ws>>,
{
    let mut all = Vec::with_capacity(n);
    for start in (0..n).step_by(200) {
        let batch =
            futures_util::future::try_join_all((start..n.min(start + 200)).map(&open_one)).await?;
        all.extend(batch);
    }
    Ok(all)
}

async fn fanout(subscribers: usize) -> anyhow::Result<()> {
    const BROADCASTS: usize = 100;
    let per_round = (subscribers * BROADCASTS) as u64;
    let pad = "x".repeat(64);

    // Raw baseline: one more connection publishes.
    let (mut raw, raw_addr) = start_raw_server().await?;
    let url = format!("ws://{raw_addr}/");
    let sockets = open_many(subscribers, |_| connect_ws(&raw_addr, url.clone())).await?;
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let readers = count_deliveries(sockets, "\"news\"", counter.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let raw_pid = raw
        .id()
        .ok_or_else(|| anyhow::anyhow!("raw server exited"))?;
    let (raw_rates, raw_cpu) = fanout_rounds(raw_pid, &counter, per_round, || {
        let frames: Vec<String> = (0..BROADCASTS)
            .map(|seq| json!({"event": "news", "seq": seq, "pad": pad}).to_string())
            .collect();
        let (addr, url) = (raw_addr.clone(), url.clone());
        async move {
            let mut publisher = connect_ws(&addr, url).await?;
            for frame in frames {
                publisher.send(Message::text(frame)).await?;
            }
            Ok(())
        }
    })
    .await?;
    readers.iter().for_each(|r| r.abort());
    raw.kill().await?;

    // Cinder: the same count of sockets joined to one topic, broadcasts through the API.
    let api_bodies: Vec<String> = (0..BROADCASTS)
        .map(|seq| {
            json!({"topic": "room:lobby", "event": "news", "payload": {"seq": seq, "pad": pad}})
                .to_string()
        })
        .collect();
    let api_bodies = std::sync::Arc::new(api_bodies);
    let (rates, cpu) = cinder_fanout("room:lobby", "\"news\"", subscribers, per_round, |addr| {
        let bodies = api_bodies.clone();
        // All requests at once, as a backend with news for everyone would send them.
        async move {
            let answers = futures_util::future::join_all(
                bodies
                    .iter()
                    .map(|body| cinder_tests::admin(addr, "POST", "/api/broadcast", Some(body))),
            )
            .await;
            for (status, answer) in answers {
                anyhow::ensure!(status == 202, "broadcast refused: {status} {answer}");
            }
            Ok(())
        }
    })
    .await?;

    // Cinder again, the broadcasts made by a plugin: one more socket sends the chat
    // plugin's `new_message` (not intercepted) 100 times over one WebSocket, as the
    // baseline's publisher sends its frames.
    let frames: Vec<String> = (0..BROADCASTS)
        .map(|seq| {
            json!(["p", null, "room:lobby", "new_message", {"body": format!("{seq} {pad}")}])
                .to_string()
        })
        .collect();
    let frames = std::sync::Arc::new(frames);
    let (plugin_rates, plugin_cpu) = cinder_fanout(
        "room:lobby",
        "\"new_message\"",
        subscribers,
        per_round,
        |addr| {
            let frames = frames.clone();
            async move {
                let mut publisher = open(&addr.to_string(), 0).await?;
                join(&mut publisher, "p", "room:lobby").await?;
                for frame in frames.iter() {
                    publisher.send(Message::text(frame.clone())).await?;
                }
                // Stays until its own copies arrive: closing with them unread would reset
                // the connection, and the server would lose what it had not yet read.
                let mut own = 0;
                while own < frames.len() {
                    if next_frame(&mut publisher).await?[3] == "new_message" {
                        own += 1;
                    }
                }
                Ok(())
            }
        },
    )
    .await?;

    // The first round also grows every socket's write buffer; the others are the steady
    // state. Medians of those, since one round lasts a few hundred milliseconds.
    let millions = |rates: &[f64]| {
        rates
            .iter()
            .map(|r| format!("{:.2}", r / 1e6))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let raw_warm = median(&raw_rates[1..]);
    println!(
        "fanout: {subscribers} subscribers x {BROADCASTS} broadcasts, {FANOUT_ROUNDS} rounds (M deliveries/s): raw baseline {}, cinder (API) {}, cinder (plugin) {}",
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
    for (how, rates, cpu) in [("API", &rates, cpu), ("plugin", &plugin_rates, plugin_cpu)] {
        let warm = median(&rates[1..]);
        println!(
            "fanout: cinder ({how}): first round cinder/baseline {:.2}; later rounds median {warm:.0}/s, cinder/baseline {:.2}; server CPU per delivery {}, baseline/cinder {:.2}",
            rates[0] / raw_rates[0],
            warm / raw_warm,
            cpu.per(warm_deliveries),
            raw_cpu.total().as_secs_f64() / cpu.total().as_secs_f64(),
        );
    }
    Ok(())
}

/// Starts Cinder with `plugins`, joins `subscribers` sockets to `topic`, and runs the
/// fan-out rounds with `publish` (given the server's address); each frame holding `marker`
/// counts as a delivery. Returns each round's rate and the CPU of the later rounds.
async fn cinder_fanout<F, Fut>(
    topic: &'static str,
    marker: &'static str,
    subscribers: usize,
    per_round: u64,
    publish: F,
) -> anyhow::Result<(Vec<f64>, Cpu)>
where
    F: Fn(std::net::SocketAddr) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut server = start_server().await?;
    let addr: std::net::SocketAddr = server.addr.parse()?;
    let server_addr = server.addr.clone();
    let sockets = open_many(subscribers, |i| {
        let server_addr = server_addr.clone();
        async move {
            let mut ws = open(&server_addr, i + 1).await?;
            join(&mut ws, "1", topic).await?;
            Ok(ws)
        }
    })
    .await?;
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let readers = count_deliveries(sockets, marker, counter.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = server
        .child
        .id()
        .ok_or_else(|| anyhow::anyhow!("server exited"))?;
    let result = fanout_rounds(pid, &counter, per_round, || publish(addr)).await;
    readers.iter().for_each(|r| r.abort());
    server.child.kill().await?;
    result
}

/// Rounds of a fan-out measurement.
const FANOUT_ROUNDS: usize = 6;

/// Runs `FANOUT_ROUNDS` rounds of `publish` (on a thread of its own) against the server
/// `pid`, whose subscribers count each round's `per_round` deliveries in `counter`. Returns
/// each round's deliveries per second and the server's CPU time over all rounds but the
/// first.
async fn fanout_rounds<F, Fut>(
    pid: u32,
    counter: &std::sync::atomic::AtomicU64,
    per_round: u64,
    publish: F,
) -> anyhow::Result<(Vec<f64>, Cpu)>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut rates = Vec::with_capacity(FANOUT_ROUNDS);
    let mut cpu = Cpu::default();
    for round in 0..FANOUT_ROUNDS {
        let cpu_before = Cpu::of(pid)?;
        let start = Instant::now();
        on_own_thread(publish()).await?;
        let took = until_delivered(counter, per_round * (round as u64 + 1), start).await?;
        rates.push(per_round as f64 / took.as_secs_f64());
        if round > 0 {
            cpu = cpu.add(Cpu::of(pid)?.since(cpu_before));
        }
    }
    Ok((rates, cpu))
}

/// The median of some measurements.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// Tenths of the send period, for the check that the offered load is even.
const PHASES: usize = 10;

/// One chat member: sends `new_message` with its send time every `every`, from `epoch` +
/// `offset`, until `stop`; records the latency of every message it receives (microseconds)
/// and returns it with its sends counted by the tenth of the period they fell in.
async fn chat_member(
    mut ws: Ws,
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
                if ws.send(Message::text(frame)).await.is_err() {
                    break;
                }
                sent[((now % period) * PHASES as u64 / period) as usize] += 1;
            }
            msg = ws.next() => {
                let Some(Ok(msg)) = msg else { break };
                if let Message::Text(text) = msg
                    && let Some(rest) = text.split("\"body\":\"").nth(1)
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
/// each member's copy encoded on its own). A server each, one after the other.
async fn chat(rooms: usize, rate: usize) -> anyhow::Result<()> {
    for (variant, prefix) in [
        ("fastlane, as shipped", "room"),
        ("intercepted", "room-out"),
    ] {
        let mut server = start_server().await?;
        let pid = server
            .child
            .id()
            .ok_or_else(|| anyhow::anyhow!("server exited"))?;
        let result = chat_run(&server.addr, pid, prefix, rooms, rate).await;
        server.child.kill().await?;
        println!("chat ({variant}): {}", result?);
    }
    Ok(())
}

/// `rooms` rooms `<prefix>:lobby-N` of 10 members on the server at `server_addr` (process
/// `pid`), each member sending at its share of `rate`; returns the summary line.
async fn chat_run(
    server_addr: &str,
    pid: u32,
    prefix: &str,
    rooms: usize,
    rate: usize,
) -> anyhow::Result<String> {
    const MEMBERS: usize = 10;
    const WARMUP: Duration = Duration::from_secs(2);
    const MEASURE: Duration = Duration::from_secs(10);
    let topic = |i: usize| format!("{prefix}:lobby-{}", i / MEMBERS);
    let sockets = open_many(rooms * MEMBERS, |i| {
        let (server_addr, topic) = (server_addr.to_owned(), topic(i));
        async move {
            let mut ws = open(&server_addr, i + 1).await?;
            join(&mut ws, "1", &topic).await?;
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
    tokio::time::sleep_until(measure_from.into()).await;
    let (cpu_from, own_from) = (Cpu::of(pid)?, cpu_time(std::process::id())?);
    tokio::time::sleep_until((measure_from + MEASURE).into()).await;
    let cpu = Cpu::of(pid)?.since(cpu_from);
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
    Ok(format!(
        "{rooms} rooms x {MEMBERS} members, {:.0} messages/s in ({} sent), {:.0} deliveries/s measured over {}s: latency p50 {} µs, p99 {} µs, p999 {} µs; busiest tenth of the send period {:.2}x the mean; server CPU {:.2} cores, {} per message in; load generator CPU {:.2} cores",
        sent as f64 / (WARMUP + MEASURE).as_secs_f64(),
        sent,
        latencies.len() as f64 / MEASURE.as_secs_f64(),
        MEASURE.as_secs(),
        at(0.5),
        at(0.99),
        at(0.999),
        busiest as f64 * PHASES as f64 / sent.max(1) as f64,
        cpu.total().as_secs_f64() / MEASURE.as_secs_f64(),
        cpu.per(rate as f64 * MEASURE.as_secs_f64()),
        own.as_secs_f64() / MEASURE.as_secs_f64(),
    ))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count = |default: usize| args.get(1).and_then(|n| n.parse().ok()).unwrap_or(default);
    let second = |default: usize| args.get(2).and_then(|n| n.parse().ok()).unwrap_or(default);
    raise_fd_limit(1 << 20);
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
                Some("fanout") => fanout(count(10_000)).await,
                Some("chat") => chat(count(1_000), second(20_000)).await,
                Some("raw-server") => raw_server().await,
                _ => anyhow::bail!(
                    "usage: cinder-bench idle [SOCKETS] | first-join [ROOMS] | neighbour [CALLS] | reload [ROOMS] | fanout [SUBSCRIBERS] | chat [ROOMS] [RATE] | raw-server"
                ),
            }
        };
        tokio::time::timeout(LIMIT, work)
            .await
            .map_err(|_| anyhow::anyhow!("gave up after {LIMIT:?}"))?
    })
}
