//! Helpers for end-to-end tests: a Cinder server started in-process on port 0 with the
//! test plugins, and a raw Phoenix V1/V2 WebSocket client (tokio-tungstenite) that speaks
//! frames as JSON values.

pub mod cluster;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use cinder::config::{Config, Secrets};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Secret the test server signs connect tokens with.
pub const SECRET: &str = "test-secret";
/// The test server's admin token.
pub const ADMIN: &str = "test-admin";
/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);

/// Where `make plugins` puts the example and test plugins.
pub fn test_plugins_dir() -> PathBuf {
    let dir = std::env::var_os("CINDER_TEST_PLUGINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-plugins")
        });
    assert!(
        dir.join("chat.wasm").exists(),
        "no plugins in {}: run `make plugins` first",
        dir.display()
    );
    dir
}

/// The manifest and component of a plugin `make plugins` laid out in the test plugins dir.
pub fn test_plugin(name: &str) -> (String, Vec<u8>) {
    let dir = test_plugins_dir();
    let manifest = std::fs::read_to_string(dir.join(format!("{name}.toml")))
        .unwrap_or_else(|e| panic!("{name}.toml: {e} (run `make plugins`)"));
    let wasm = std::fs::read(dir.join(format!("{name}.wasm")))
        .unwrap_or_else(|e| panic!("{name}.wasm: {e} (run `make plugins`)"));
    (manifest, wasm)
}

/// Where `make plugins` puts versions the tests upload at run time (counter 2.0.0).
pub fn test_uploads_dir() -> PathBuf {
    test_plugins_dir().join("../test-uploads")
}

/// One artifact cache for every test server, so each plugin is compiled once per run.
fn shared_cache_dir() -> PathBuf {
    test_plugins_dir().join("../test-cache")
}

/// Components (and not-components) that an upload must refuse, with the words the refusal
/// must contain. Built from WAT here so the tests carry their own hostile inputs.
pub fn bad_components() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let wat = |text: &str| wat::parse_str(text).expect("fixture WAT parses");
    // A handler interface with the right names and the wrong signatures.
    let wrong_types = |start: &str| {
        wat(&format!(
            r#"(component
                (core module $m (func (export "f")) {start})
                (core instance $i (instantiate $m))
                (func $f (canon lift (core func $i "f")))
                (instance $h
                    (export "join" (func $f))
                    (export "handle-in" (func $f))
                    (export "handle-out" (func $f))
                    (export "handle-info" (func $f))
                    (export "terminate" (func $f)))
                (export "cinder:channel/handler@0.1.0" (instance $h)))"#
        ))
    };
    vec![
        (
            "not wasm",
            b"#!/bin/sh\nrm -rf /\n".to_vec(),
            "not a loadable component",
        ),
        ("a core module", wat("(module)"), "not a loadable component"),
        (
            "a component without the handler export",
            wat("(component)"),
            "missing export cinder:channel/handler@0.1.0",
        ),
        (
            "a handler with the wrong signatures",
            wrong_types(""),
            "does not match the world (function join)",
        ),
        (
            "an import the host does not offer",
            wat(
                r#"(component (import "evil:net/socket@1.0.0" (instance (export "connect" (func)))))"#,
            ),
            "imports do not match what the host offers",
        ),
        (
            "a component that traps on start",
            wrong_types("(func $boom unreachable) (start $boom)"),
            "instantiation failed",
        ),
    ]
}

/// A server running in this process.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
    _data: TempDir,
}

/// A directory removed on drop.
struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl TestServer {
    /// A server with default limits and the test plugins.
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// A server whose configuration `tweak` may change first.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let data = std::env::temp_dir().join(format!(
            "cinder-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let mut config = Config {
            listen: "127.0.0.1:0".parse().expect("addr"),
            plugins_dir: Some(test_plugins_dir()),
            data_dir: data.clone(),
            cache_dir: Some(shared_cache_dir()),
            ..Config::default()
        };
        tweak(&mut config);
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let secrets = Secrets {
            jwt_secret: SECRET.into(),
            admin_token: ADMIN.into(),
            generated: false,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(cinder::serve(listener, config, secrets, async move {
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            stop: Some(stop),
            task,
            _data: TempDir(data),
        }
    }

    /// The server's data dir (its plugin store), which no answer may reveal.
    pub fn data_dir(&self) -> &std::path::Path {
        &self._data.0
    }

    /// A connect token for `user_id`.
    pub fn token(&self, user_id: &str) -> String {
        cinder::auth::mint(SECRET, user_id, 3600).expect("mint")
    }

    /// The WebSocket URL with this query string.
    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/socket/websocket?{query}", self.addr)
    }

    /// A V2 client for `user_id`.
    pub async fn client(&self, user_id: &str) -> Client {
        Client::connect(&self.ws_url(&format!("vsn=2.0.0&token={}", self.token(user_id))))
            .await
            .expect("connects")
    }

    /// Stops the server (as on SIGTERM) and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = &mut self.task;
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("server stops")
            .expect("join")
            .expect("serve");
    }
}

fn rand_suffix() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A raw WebSocket client speaking Phoenix frames.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    /// Connects; `Err` carries the HTTP status of a refused upgrade.
    pub async fn connect(url: &str) -> Result<Client, u16> {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => Ok(Client { ws }),
            Err(tokio_tungstenite::tungstenite::Error::Http(res)) => Err(res.status().as_u16()),
            Err(e) => panic!("connect failed: {e}"),
        }
    }

    /// Sends a frame given as JSON.
    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// Sends a text frame as is.
    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// Sends any WebSocket message, raw frames included.
    pub async fn send_raw(&mut self, msg: Message) {
        self.ws.send(msg).await.expect("send");
    }

    /// Reads everything until the stream ends; `true` if it ended within the wait.
    pub async fn drains_to_close(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return false,
                Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return true,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.ws.send(Message::binary(data)).await.expect("send");
    }

    /// The next message of any kind, pongs included; panics on close or timeout.
    pub async fn recv_any(&mut self) -> Message {
        let msg = tokio::time::timeout(WAIT, self.ws.next())
            .await
            .expect("a frame within the wait")
            .expect("socket open")
            .expect("read");
        if let Message::Close(frame) = msg {
            panic!("socket closed: {frame:?}");
        }
        msg
    }

    /// The next data message (text or binary), skipping pings; panics on close or timeout.
    pub async fn recv_message(&mut self) -> Message {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame within the wait")
                .expect("socket open")
                .expect("read");
            match msg {
                Message::Text(_) | Message::Binary(_) => return msg,
                Message::Close(frame) => panic!("socket closed: {frame:?}"),
                _ => {}
            }
        }
    }

    /// The next text frame as JSON, waiting at most `wait` for it.
    pub async fn recv_within(&mut self, wait: Duration) -> Value {
        loop {
            let msg = tokio::time::timeout(wait, self.ws.next())
                .await
                .expect("a frame within the wait")
                .expect("socket open")
                .expect("read");
            match msg {
                Message::Text(text) => return serde_json::from_str(&text).expect("JSON frame"),
                Message::Close(frame) => panic!("socket closed: {frame:?}"),
                _ => {}
            }
        }
    }

    /// The next text frame as JSON.
    pub async fn recv(&mut self) -> Value {
        match self.recv_message().await {
            Message::Text(text) => serde_json::from_str(&text).expect("JSON frame"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Sends `phx_join` and returns the reply frame.
    pub async fn join(&mut self, join_ref: &str, topic: &str, payload: Value) -> Value {
        self.send(json!([join_ref, join_ref, topic, "phx_join", payload]))
            .await;
        self.recv().await
    }

    /// Waits for the server to close the socket; returns its close frame.
    pub async fn closed(&mut self) -> Option<CloseFrame> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("close within the wait")
            {
                None | Some(Err(_)) => return None,
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
            }
        }
    }

    /// Reads until the socket closes; the code the client sees: the close frame's, or
    /// 1006 (abnormal closure) when the connection ended without one.
    pub async fn close_code(&mut self) -> u16 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("closed within the wait")
            {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(Message::Close(None))) => return 1005,
                None | Some(Err(_)) => return 1006,
                Some(Ok(_)) => {}
            }
        }
    }

    /// The close frame if the next message closes the socket, `None` for any other frame.
    pub async fn next_close_or_frame(&mut self) -> Option<CloseFrame> {
        match tokio::time::timeout(WAIT, self.ws.next())
            .await
            .expect("a message within the wait")
        {
            Some(Ok(Message::Close(frame))) => frame,
            Some(Ok(_)) => None,
            None | Some(Err(_)) => panic!("socket ended without a close frame"),
        }
    }

    /// Asserts that nothing but replies (`phx_reply`, to what this client sent) arrives
    /// for `ms` milliseconds.
    pub async fn only_replies_for(&mut self, ms: u64) {
        let end = tokio::time::Instant::now() + Duration::from_millis(ms);
        while let Ok(frame) = tokio::time::timeout_at(end, self.recv()).await {
            assert_eq!(frame[3], "phx_reply", "expected only replies, got {frame}");
        }
    }

    /// Asserts that nothing arrives for `ms` milliseconds.
    pub async fn silent_for(&mut self, ms: u64) {
        if let Ok(Some(Ok(msg))) =
            tokio::time::timeout(Duration::from_millis(ms), self.ws.next()).await
        {
            panic!("expected silence, got {msg:?}");
        }
    }
}

/// For load generators (`cinder-bench`): connecting over a socket the caller set up, and
/// sending and reading without a time limit or a panic (every failure is an `Err`), text
/// frames unparsed where parsing would cost more than the work measured.
impl Client {
    /// Handshakes for `url` over `stream`, a TCP connection the caller made (from a source
    /// address of its choosing, say), with tungstenite's `config` (its defaults when
    /// `None`). A refused upgrade is an `Err` naming the HTTP status.
    pub async fn handshake(
        stream: TcpStream,
        url: &str,
        config: Option<tokio_tungstenite::tungstenite::protocol::WebSocketConfig>,
    ) -> anyhow::Result<Client> {
        match tokio_tungstenite::client_async_with_config(
            url,
            MaybeTlsStream::Plain(stream),
            config,
        )
        .await
        {
            Ok((ws, _)) => Ok(Client { ws }),
            Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
                anyhow::bail!("upgrade refused: HTTP {}", res.status())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends a text frame, taking it without a copy; `Err` once the socket is gone.
    pub async fn try_send_text(
        &mut self,
        text: impl Into<tokio_tungstenite::tungstenite::Utf8Bytes>,
    ) -> anyhow::Result<()> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// The next text frame as it came, not parsed, however long it takes (pings, pongs and
    /// binary frames are skipped); `Err` once the socket closes or fails. Cancel-safe, so it
    /// can wait in a `select!` beside a send.
    pub async fn next_text(&mut self) -> anyhow::Result<tokio_tungstenite::tungstenite::Utf8Bytes> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => return Ok(text),
                Some(Ok(Message::Close(_))) | None => anyhow::bail!("socket closed"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }

    /// The next text frame as JSON, however long it takes; `Err` once the socket closes or
    /// fails, or for a frame that is not JSON.
    pub async fn next_json(&mut self) -> anyhow::Result<Value> {
        Ok(serde_json::from_str(&self.next_text().await?)?)
    }

    /// Sends `phx_join` for `topic` with `payload` and waits, however long it takes, for the
    /// reply to it (frames before it are skipped); the reply's `response` when its status is
    /// ok, `Err` when the join is refused or the socket closes.
    pub async fn try_join(
        &mut self,
        join_ref: &str,
        topic: &str,
        payload: Value,
    ) -> anyhow::Result<Value> {
        self.try_send_text(json!([join_ref, join_ref, topic, "phx_join", payload]).to_string())
            .await?;
        loop {
            let frame = self.next_json().await?;
            if frame[1] == join_ref && frame[3] == "phx_reply" {
                anyhow::ensure!(frame[4]["status"] == "ok", "join refused: {frame}");
                return Ok(frame[4]["response"].clone());
            }
        }
    }
}

/// The Phoenix V2 WebSocket URL of the socket mounted at `socket` (`ws://host:port/socket`,
/// any Phoenix-protocol server) for a connect `token`:
/// `<socket>/websocket?vsn=2.0.0&token=<token>`.
pub fn v2_socket_url(socket: &str, token: &str) -> String {
    format!(
        "{}/websocket?vsn=2.0.0&token={token}",
        socket.trim_end_matches('/')
    )
}

/// `["jr","ref",topic,"phx_reply",{"status":...,"response":...}]`
pub fn reply(
    join_ref: Option<&str>,
    msg_ref: &str,
    topic: &str,
    status: &str,
    response: Value,
) -> Value {
    json!([join_ref, msg_ref, topic, "phx_reply", {"status": status, "response": response}])
}

/// Sends one HTTP/1.1 request and reads the whole response.
async fn http(addr: std::net::SocketAddr, request: String) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// `GET path`; the whole response, status line first.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    http(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// `POST path` with a JSON body and an optional bearer token; the whole response.
pub async fn http_post(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> String {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    http(
        addr,
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await
}

/// An admin API call: `method path` with an optional JSON body; the status and the JSON
/// answer (`null` when empty).
pub async fn admin(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    admin_as(addr, ADMIN, method, path, body).await
}

/// [`admin`] for a server with another admin token (one the tests did not start): `method
/// path` with an optional JSON body and `token` as the bearer; the status and the JSON
/// answer (`null` when empty).
pub async fn admin_as(
    addr: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let body = body.unwrap_or_default();
    let response = http(
        addr,
        format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    parse_response(&response)
}

fn parse_response(response: &str) -> (u16, Value) {
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("an HTTP status");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    let value = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()))
    };
    (status, value)
}

/// `POST /api/plugins` (`?activate=false` unless `activate`) with a manifest and a wasm;
/// the status and the JSON answer.
pub async fn upload(addr: SocketAddr, manifest: &str, wasm: &[u8], activate: bool) -> (u16, Value) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body =
        cinder::client::multipart("XyZ", &[("manifest", manifest.as_bytes()), ("wasm", wasm)]);
    let path = if activate {
        "/api/plugins"
    } else {
        "/api/plugins?activate=false"
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write");
    // The server may answer (413) before reading the whole body.
    let _ = s.write_all(&body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    parse_response(&String::from_utf8_lossy(&out))
}

/// `GET /api/stats` as JSON.
pub async fn stats(addr: SocketAddr) -> Value {
    let response = http(addr, format!("GET /api/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {ADMIN}\r\n\r\n")).await;
    let body = response.split("\r\n\r\n").nth(1).expect("a body");
    serde_json::from_str(body).expect("JSON stats")
}

/// What the servers of this test process logged, through Cinder's own subscriber
/// ([`cinder::logging::subscriber`]), kept in memory. [`capture_logs`] installs it.
static LOGS: std::sync::OnceLock<std::sync::Arc<std::sync::Mutex<Vec<u8>>>> =
    std::sync::OnceLock::new();

/// Most bytes of log kept: the oldest half goes past it.
const MAX_CAPTURED: usize = 64 << 20;

/// Where captured records are written.
#[derive(Clone)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut logs = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if logs.len() + buf.len() > MAX_CAPTURED {
            let half = logs.len() / 2;
            logs.drain(..half);
        }
        logs.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends every server's log of this test process to memory (once; call it before the
/// server starts). Read it back with [`logged`].
pub fn capture_logs() {
    LOGS.get_or_init(|| {
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = Capture(buffer.clone());
        let subscriber = cinder::logging::subscriber(move || writer.clone(), false);
        tracing::subscriber::set_global_default(subscriber).expect("one log subscriber");
        buffer
    });
}

/// The log records captured so far (see [`capture_logs`]) that contain `needle`.
pub fn logged(needle: &str) -> Vec<String> {
    let logs = LOGS.get().expect("capture_logs() was called");
    let logs = logs.lock().unwrap_or_else(|p| p.into_inner());
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// This process's resident memory, in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("proc status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// The `cinder` binary the tests run as a process: `$CINDER_BIN`, else the debug build
/// beside this test's target dir (`make test` builds it first).
pub fn cinder_bin() -> PathBuf {
    std::env::var_os("CINDER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/cinder"))
}

/// A Cinder server running as its own process (for what a test cannot do in-process:
/// limit its open files, kill or pause it), with the test plugins, on a free port. Its
/// stderr (the log) is kept; dropping it kills the process.
pub struct ServerProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    child: tokio::process::Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
    _data: TempDir,
}

impl ServerProcess {
    /// Starts `cinder serve` with `args`, its open files limited to `max_files`.
    pub async fn start(max_files: u32, args: &[&str]) -> ServerProcess {
        use tokio::io::{AsyncBufReadExt as _, BufReader};
        let bin = cinder_bin();
        assert!(
            bin.exists(),
            "no {}: run `make test` or set CINDER_BIN",
            bin.display()
        );
        let data = std::env::temp_dir().join(format!(
            "cinder-proc-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {max_files} && exec \"$0\" \"$@\""))
            .arg(&bin)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("CINDER_JWT_SECRET", SECRET)
            .env("CINDER_ADMIN_TOKEN", ADMIN)
            .env("CINDER_DATA_DIR", &data)
            .env("CINDER_PLUGINS_DIR", test_plugins_dir())
            .env("CINDER_CACHE_DIR", shared_cache_dir())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("cinder starts");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut log = sink.lock().unwrap_or_else(|p| p.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = stdout.next_line().await {
                if let Some(addr) = line.strip_prefix("cinder listening on http://") {
                    return addr.parse().expect("an address");
                }
            }
            panic!("cinder exited before listening");
        })
        .await
        .expect("cinder listens within a minute");
        // Whatever else it prints is read, so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        ServerProcess {
            addr,
            child,
            log,
            _data: TempDir(data),
        }
    }

    /// The lines of its log so far that contain `needle`.
    pub fn logged(&self, needle: &str) -> Vec<String> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// Kills it.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// Sends it a signal by name (`STOP`, `CONT`, ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -{signal} {pid}");
    }
}

/// A `redis-server` of the test's own on a free loopback port (never the machine's 6379),
/// keeping nothing on disk; killed on drop. `make test` installs `redis-server` where it
/// is missing.
pub struct RedisServer {
    /// Its port.
    pub port: u16,
    child: std::process::Child,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers.
    pub async fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Self::start_on(port).await
    }

    /// Starts one on `port` (again, after [`RedisServer::kill`]) and waits until it answers.
    pub async fn start_on(port: u16) -> RedisServer {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts (make test installs it; or apt-get install redis-server)");
        let server = RedisServer { port, child };
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if server.command(&["PING"]).await.is_some() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("redis-server answers within 10 s");
        server
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends one command (RESP2, inline arrays) and returns the raw reply; `None` when the
    /// server does not answer.
    pub async fn command(&self, args: &[&str]) -> Option<String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut tcp = TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        tcp.write_all(request.as_bytes()).await.ok()?;
        let mut reply = vec![0; 64 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut reply))
            .await
            .ok()?
            .ok()?;
        (n > 0).then(|| String::from_utf8_lossy(&reply[..n]).into_owned())
    }

    /// Kills it at once (as a crash would).
    pub fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
