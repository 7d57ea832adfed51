//! The server under load: a Cinder this bench starts itself (the release binary with the
//! test plugins, the only choice before `--target`), or the Phoenix-protocol server
//! `--target` names; and how to reach one ([`Target`]: the socket URL, the broadcast API,
//! the token secret, the process if known).

use std::net::SocketAddr;
use std::process::Stdio;

use cinder_tests::Client;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::net;

/// The secret the Cinder this bench starts signs connect tokens with; also the default of
/// `--jwt-secret`.
const SECRET: &str = "bench-secret";

/// The `--target` flags, as given.
#[derive(Default)]
pub struct Flags {
    /// `ws://host:port/socket`: the Phoenix socket to load instead of a Cinder of our own.
    pub target: Option<String>,
    /// `http://host:port`: where `POST /api/broadcast` goes (default: the target's).
    pub api: Option<String>,
    /// The HS256 secret connect tokens are signed with (default: the bench's own).
    pub jwt_secret: Option<String>,
    /// The bearer token for `POST /api/broadcast` (default: the bench's own).
    pub admin_token: Option<String>,
    /// The target's process, for the figures read from /proc.
    pub pid: Option<u32>,
}

impl Flags {
    /// Whether any flag was given.
    pub fn any(&self) -> bool {
        self.target.is_some()
            || self.api.is_some()
            || self.jwt_secret.is_some()
            || self.admin_token.is_some()
            || self.pid.is_some()
    }
}

/// How to reach the server under load. A scenario may count on nothing more than this:
/// the Phoenix V2 JSON protocol at `<socket>/websocket`, tokens with a `user_id` claim, and
/// `POST <api>/api/broadcast` with `{"topic","event","payload"}`.
#[derive(Clone)]
pub struct Target {
    /// The Phoenix socket, `ws://host:port/socket`.
    pub socket: String,
    /// Its host and port, resolved: where the connections go.
    pub addr: SocketAddr,
    /// Where `POST /api/broadcast` goes.
    pub api: SocketAddr,
    /// The bearer token for it.
    pub admin_token: String,
    /// The server's process, when known: the bench started it, or `--pid`.
    pub pid: Option<u32>,
    /// Whether this is a Cinder the bench started, with the test plugins.
    pub own: bool,
    secret: String,
}

impl Target {
    /// The server `--target` names.
    async fn remote(flags: &Flags, target: &str) -> anyhow::Result<Target> {
        let socket = target.trim_end_matches('/');
        let rest = socket.strip_prefix("ws://").ok_or_else(|| {
            anyhow::anyhow!("--target {target}: not a ws:// URL such as ws://127.0.0.1:4000/socket (wss is not supported)")
        })?;
        let authority = rest.split_once('/').map_or(rest, |(a, _)| a);
        let addr = resolve("--target", authority).await?;
        let api = match &flags.api {
            None => addr,
            Some(api) => {
                let authority = api
                    .trim_end_matches('/')
                    .strip_prefix("http://")
                    .filter(|a| !a.contains('/'))
                    .ok_or_else(|| {
                        anyhow::anyhow!("--api {api}: not an http://host:port base (no path)")
                    })?;
                resolve("--api", authority).await?
            }
        };
        Ok(Target {
            socket: socket.to_owned(),
            addr,
            api,
            admin_token: flags
                .admin_token
                .clone()
                .unwrap_or_else(|| cinder_tests::ADMIN.to_owned()),
            pid: flags.pid,
            own: false,
            secret: flags
                .jwt_secret
                .clone()
                .unwrap_or_else(|| SECRET.to_owned()),
        })
    }

    /// A Phoenix V2 socket for `user`, from the next source address (see [`net::connect`]).
    pub async fn open(&self, user: usize) -> anyhow::Result<Client> {
        let token = cinder::auth::mint(&self.secret, &user.to_string(), 3600)?;
        net::connect(
            self.addr,
            &cinder_tests::v2_socket_url(&self.socket, &token),
        )
        .await
    }
}

/// `host:port` resolved (its first address).
async fn resolve(flag: &str, authority: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(authority)
        .await
        .map_err(|e| anyhow::anyhow!("{flag}: {authority}: {e} (host:port expected)"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{flag}: {authority} has no address"))
}

/// A Cinder started by the bench as a child process; killed on drop.
pub struct Cinder {
    child: Child,
    addr: String,
    _data: std::path::PathBuf,
}

impl Cinder {
    /// The release server (or `$CINDER_BIN`) with the test plugins (`make plugins`): among
    /// them `chat` on `room:*`, and the same component as `chat-intercept` on `room-out:*`
    /// with `new_message` intercepted.
    pub async fn start() -> anyhow::Result<Cinder> {
        Self::start_with(&[]).await
    }

    /// [`Cinder::start`] with more flags (`--redis ...` for a cluster node), in a data dir
    /// of its own.
    pub async fn start_with(extra: &[&str]) -> anyhow::Result<Cinder> {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let bin = std::env::var("CINDER_BIN")
            .unwrap_or_else(|_| root.join("target/release/cinder").display().to_string());
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let data = std::env::temp_dir().join(format!("cinder-bench-{}-{n}", std::process::id()));
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
            .args(extra)
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
        Ok(Cinder {
            child,
            addr,
            _data: data,
        })
    }

    /// How to reach it.
    pub fn target(&self) -> anyhow::Result<Target> {
        let addr: SocketAddr = self.addr.parse()?;
        Ok(Target {
            socket: format!("ws://{}/socket", self.addr),
            addr,
            api: addr,
            admin_token: cinder_tests::ADMIN.to_owned(),
            pid: Some(
                self.child
                    .id()
                    .ok_or_else(|| anyhow::anyhow!("server exited"))?,
            ),
            own: true,
            secret: SECRET.to_owned(),
        })
    }

    /// Kills it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

/// The server a scenario loads: the `--target`, or else a Cinder started for it.
pub struct Endpoint {
    /// How to reach it.
    pub target: Target,
    cinder: Option<Cinder>,
}

impl Endpoint {
    /// The `--target` of `flags`, or a Cinder started now.
    pub async fn start(flags: &Flags) -> anyhow::Result<Endpoint> {
        match &flags.target {
            Some(target) => Ok(Endpoint {
                target: Target::remote(flags, target).await?,
                cinder: None,
            }),
            None => {
                let cinder = Cinder::start().await?;
                Ok(Endpoint {
                    target: cinder.target()?,
                    cinder: Some(cinder),
                })
            }
        }
    }

    /// Stops the Cinder it started, if any.
    pub async fn stop(self) -> anyhow::Result<()> {
        match self.cinder {
            Some(cinder) => cinder.stop().await,
            None => Ok(()),
        }
    }
}
