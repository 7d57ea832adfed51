//! Configuration: every setting with its default, the TOML file, validation, plus the
//! connect secret and admin token that are generated and kept in the data dir when unset.
//! The command line (flags and environment, which beat the file) is [`crate::cli`]'s.
//!
//! Every limit is named here with its default and the reason for it (docs/limits.md lists
//! them for users).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The longest per-call time a config or a plugin manifest may ask for: a call that needs a
/// second is a batch job, not channel logic.
pub const MAX_PLUGIN_CALL_MS: u64 = 1000;

/// Limits that protect the server from clients and plugins.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// The JS client heartbeats every 30 s; twice that without a frame means the peer is gone.
    pub idle_timeout_secs: u64,
    /// Phoenix's default; bounds per-socket state and join work.
    pub max_channels_per_socket: usize,
    /// 1 MiB: far above chat or game messages, small enough that a hostile frame is cheap.
    pub max_frame_bytes: usize,
    /// 1 MiB of pending frames per socket; a reader that falls further behind is cut off
    /// rather than letting memory grow.
    pub outbound_queue_bytes: usize,
    /// Bounded room mailbox: senders wait (backpressure) instead of memory growing.
    pub room_mailbox: usize,
    /// Live plugin instances per node; sized so the pooling allocator's reservation and
    /// the kernel's map count stay well within bounds (see DESIGN).
    pub max_rooms: u32,
    /// 32 MiB per room instance: generous for room state, bounded for hostile plugins.
    pub plugin_memory_bytes: usize,
    /// 10 ms per call: a room handles a message in microseconds; ten milliseconds is a bug.
    pub plugin_call_ms: u64,
    /// 200 ms to make an instance (the component's start code): interpreters compiled to
    /// wasm (Python, JS) set up their heap here; a start that runs longer is a loop.
    pub plugin_instantiate_ms: u64,
    /// Pushes and broadcasts one plugin call may make, so a loop cannot flood the host.
    pub max_messages_per_call: usize,
    /// Payload bytes one plugin call may push, broadcast or schedule in total, and the
    /// largest reply.
    pub max_plugin_payload_bytes: usize,
    /// 64 MiB per plugin upload: room for interpreters compiled to wasm (Python, JS),
    /// small enough that an upload cannot exhaust memory.
    pub max_upload_bytes: usize,
    /// Pending `send-after` timers per channel.
    pub max_timers_per_channel: usize,
    /// Longest `send-after` delay, in milliseconds (one day).
    pub max_timer_delay_ms: u32,
    /// A plugin whose rooms crash this many times within `crash_window_secs` is
    /// quarantined: no instance-create/trap busy loop.
    pub crash_limit: u32,
    /// The window crashes are counted in.
    pub crash_window_secs: u64,
    /// How long a quarantined plugin refuses joins (`plugin unavailable`).
    pub quarantine_secs: u64,
    /// Sustained client messages per second per socket; far above any human, well below a
    /// flood.
    pub messages_per_sec: u32,
    /// Messages a socket may send at once above the sustained rate; also how many refused
    /// messages it may send before it is disconnected.
    pub message_burst: u32,
    /// Plugin stdout/stderr lines logged per second per plugin; the rest are counted and
    /// dropped.
    pub plugin_log_lines_per_sec: u32,
    /// A socket more than `outbound_queue_bytes` behind for this long is cut off: a burst
    /// a reader drains is not slowness, a backlog that stays is.
    pub slow_client_grace_ms: u64,
    /// A socket this far behind is cut off at once, whatever the grace: what bounds the
    /// memory a backlog holds.
    pub outbound_queue_max_bytes: usize,
    /// Linear memory of every plugin instance on the node together: the defaults would
    /// otherwise let 1000 rooms of 32 MiB ask for more memory than the machine has.
    pub plugin_memory_total_bytes: usize,
    /// Presence keys and metas one socket's channels may hold: presence lives in host
    /// memory, and a socket must not be able to fill it.
    pub presence_bytes_per_socket: usize,
    /// Presence keys and metas the whole node may hold.
    pub presence_bytes_total: usize,
    /// Time per second a room's `handle_info` calls (timers) may use: a plugin re-arming
    /// timers in a loop must not keep the cores busy with no client asking.
    pub timer_cpu_ms_per_sec: u64,
    /// Open connections, HTTP and WebSocket; past it, new connections get a 503 and are
    /// closed. `None`: the process's open-file limit less a reserve, so that accepting
    /// never runs out of descriptors.
    pub max_connections: Option<usize>,
    /// A client that has not sent a request's headers within this time (a slow or idle
    /// keep-alive connection) is disconnected.
    pub http_header_timeout_secs: u64,
    /// An HTTP API request whose body has not arrived within this time is refused.
    pub http_body_timeout_secs: u64,
    /// Connect tokens valid for longer than this from now are refused: a token that never
    /// expires cannot be revoked by waiting.
    pub max_token_lifetime_secs: u64,
    /// Sustained connects (WebSocket upgrades, LongPoll sessions) per second per client
    /// (the token's user, or the address for tokens without one): far above a page that
    /// reconnects with the JS client's backoff, far below a reconnect loop.
    pub connects_per_sec: u32,
    /// Connects a client may make at once above the sustained rate (a page with many tabs,
    /// a node restart everybody reconnects to).
    pub connect_burst: u32,
    /// How long a LongPoll request waits for messages before it is answered empty
    /// (Phoenix's `window_ms`); a session nobody polled for one and a half times as long
    /// ends.
    pub longpoll_window_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            idle_timeout_secs: 60,
            max_channels_per_socket: 100,
            max_frame_bytes: 1 << 20,
            outbound_queue_bytes: 1 << 20,
            room_mailbox: 1024,
            max_rooms: 1000,
            plugin_memory_bytes: 32 << 20,
            plugin_call_ms: 10,
            plugin_instantiate_ms: 200,
            max_messages_per_call: 1024,
            max_plugin_payload_bytes: 1 << 20,
            max_upload_bytes: 64 << 20,
            max_timers_per_channel: 64,
            max_timer_delay_ms: 86_400_000,
            crash_limit: 5,
            crash_window_secs: 60,
            quarantine_secs: 300,
            messages_per_sec: 100,
            message_burst: 200,
            plugin_log_lines_per_sec: 50,
            slow_client_grace_ms: 5000,
            outbound_queue_max_bytes: 8 << 20,
            plugin_memory_total_bytes: 1 << 30,
            presence_bytes_per_socket: 1 << 20,
            presence_bytes_total: 256 << 20,
            timer_cpu_ms_per_sec: 20,
            max_connections: None,
            http_header_timeout_secs: 10,
            http_body_timeout_secs: 30,
            max_token_lifetime_secs: 7 * 86_400,
            connects_per_sec: 20,
            connect_burst: 100,
            longpoll_window_ms: 10_000,
        }
    }
}

impl Limits {
    /// The idle timeout as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// The per-call time limit as a duration.
    pub fn plugin_call_time(&self) -> Duration {
        Duration::from_millis(self.plugin_call_ms)
    }

    /// The LongPoll window as a duration.
    pub fn longpoll_window(&self) -> Duration {
        Duration::from_millis(self.longpoll_window_ms)
    }
}

/// Shortest `metrics_token` accepted: a guessable token would give the metrics away.
const MIN_TOKEN_LEN: usize = 16;

/// How log records are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text per record (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line, with the record's span and fields, for log shippers.
    Json,
}

/// The whole server configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Socket mount path.
    pub mount: String,
    /// HS256 connect secret; generated when unset.
    pub jwt_secret: Option<String>,
    /// HTTP API bearer token; generated when unset.
    pub admin_token: Option<String>,
    /// A second bearer token that reads `GET /metrics` and nothing else (for a Prometheus
    /// server); the admin token reads it too.
    pub metrics_token: Option<String>,
    /// How log records are written: `text` (one line each) or `json` (one object each).
    pub log_format: LogFormat,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Plugins directory, taken at start.
    pub plugins_dir: Option<PathBuf>,
    /// Plugins directory taken at start and followed for changes.
    pub watch: Option<PathBuf>,
    /// Compiled-artifact cache; `<data_dir>/cache` when unset.
    pub cache_dir: Option<PathBuf>,
    /// Redis URL (`redis://host:port`) of the cluster this node is a member of; unset, the
    /// node stands alone and needs nothing external.
    pub redis_url: Option<String>,
    /// This node's name in the cluster; generated when unset.
    pub node_id: Option<String>,
    /// A member whose heartbeat is this old is down; members heartbeat five times as often.
    pub node_down_ms: u64,
    /// Origins a browser may connect from (Phoenix's `check_origin`), such as
    /// `https://example.com`, `//example.com` (any scheme), `https://*.example.com` (the
    /// domain and its subdomains), with a port or without (any). Empty: any origin, for
    /// development on loopback; a production server lists its sites.
    pub check_origin: Vec<String>,
    /// Limits.
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 4000)),
            mount: "/socket".into(),
            jwt_secret: None,
            admin_token: None,
            metrics_token: None,
            log_format: LogFormat::Text,
            data_dir: PathBuf::from("cinder-data"),
            plugins_dir: None,
            watch: None,
            cache_dir: None,
            redis_url: None,
            node_id: None,
            node_down_ms: 5000,
            check_origin: Vec::new(),
            limits: Limits::default(),
        }
    }
}

impl Config {
    /// Where compiled artifacts are cached.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("cache"))
    }

    /// The configuration in a TOML file: what it sets over the defaults.
    pub fn from_file(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
    }

    /// Checks values no type can: paths, ranges, positive limits.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.mount.starts_with('/') && !self.mount.ends_with('/'),
            "mount must start with / and not end with one, got {:?}",
            self.mount
        );
        if let Some(url) = &self.redis_url {
            anyhow::ensure!(
                url.starts_with("redis://"),
                "redis_url must be a redis://host:port URL, got {url:?}"
            );
        }
        if let Some(id) = &self.node_id {
            anyhow::ensure!(
                (1..=64).contains(&id.len())
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
                "node_id must be 1 to 64 letters, digits, '-', '_' or '.', got {id:?}"
            );
        }
        anyhow::ensure!(
            (500..=300_000).contains(&self.node_down_ms),
            "node_down_ms must be between 500 and 300000, got {}",
            self.node_down_ms
        );
        if let Some(token) = &self.metrics_token {
            // Compared byte for byte with what a scraper sends: a stray space or newline
            // would refuse every scrape, so it is refused here, where it can be seen.
            anyhow::ensure!(
                token.len() >= MIN_TOKEN_LEN && token.bytes().all(|b| b.is_ascii_graphic()),
                "metrics_token must be at least {MIN_TOKEN_LEN} printable characters, with no spaces"
            );
        }
        for origin in &self.check_origin {
            Origin::parse(origin)
                .map_err(|why| anyhow::anyhow!("check_origin entry {origin:?}: {why}"))?;
        }
        let l = &self.limits;
        anyhow::ensure!(
            l.connects_per_sec > 0 && l.connect_burst > 0,
            "connects_per_sec and connect_burst must be positive"
        );
        anyhow::ensure!(
            (1000..=15_000).contains(&l.longpoll_window_ms),
            "longpoll_window_ms must be between 1000 and 15000 (the official client gives up on a poll after 20 s), got {}",
            l.longpoll_window_ms
        );
        anyhow::ensure!(
            l.idle_timeout_secs > 0,
            "idle_timeout_secs must be positive"
        );
        anyhow::ensure!(
            l.max_frame_bytes >= 1024,
            "max_frame_bytes must be at least 1024"
        );
        anyhow::ensure!(l.room_mailbox > 0, "room_mailbox must be positive");
        anyhow::ensure!(l.max_rooms > 0, "max_rooms must be positive");
        anyhow::ensure!(
            (1..=MAX_PLUGIN_CALL_MS).contains(&l.plugin_call_ms),
            "plugin_call_ms must be 1 to {MAX_PLUGIN_CALL_MS}"
        );
        anyhow::ensure!(
            (1..=MAX_PLUGIN_CALL_MS).contains(&l.plugin_instantiate_ms),
            "plugin_instantiate_ms must be 1 to {MAX_PLUGIN_CALL_MS}"
        );
        anyhow::ensure!(l.crash_limit > 0, "crash_limit must be positive");
        anyhow::ensure!(
            l.messages_per_sec > 0 && l.message_burst > 0,
            "messages_per_sec and message_burst must be positive"
        );
        anyhow::ensure!(
            l.plugin_memory_bytes >= 1 << 20,
            "plugin_memory_bytes must be at least 1 MiB"
        );
        Ok(())
    }
}

/// One entry of `check_origin`: a scheme, a host and a port, each of which may be left
/// open (`//host` is any scheme, no port is any port, `*.host` is the host and its
/// subdomains).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: Option<String>,
    host: String,
    port: Option<u16>,
}

impl Origin {
    /// Parses `scheme://host[:port]` or `//host[:port]`; no path, query or credentials.
    pub fn parse(text: &str) -> Result<Origin, &'static str> {
        let (scheme, rest) = match text.split_once("//") {
            Some(("", rest)) => (None, rest),
            Some((scheme, rest)) => {
                let scheme = scheme
                    .strip_suffix(':')
                    .filter(|s| {
                        !s.is_empty()
                            && s.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
                    })
                    .ok_or("expected scheme://host or //host")?;
                (Some(scheme.to_ascii_lowercase()), rest)
            }
            None => return Err("expected scheme://host or //host"),
        };
        if rest.contains(['/', '?', '#', '@']) {
            return Err("an origin has no path, query or credentials");
        }
        // An IPv6 host is in brackets, and holds colons of its own.
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (inside, after) = v6.split_once(']').ok_or("an unclosed [ in the host")?;
                let host = &rest[..inside.len() + 2];
                match after {
                    "" => (host, None),
                    _ => (
                        host,
                        Some(after.strip_prefix(':').ok_or("junk after the host")?),
                    ),
                }
            }
            None => match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            },
        };
        let port = port
            .map(|p| p.parse::<u16>().map_err(|_| "the port is not a number"))
            .transpose()?;
        if host.is_empty() || host == "*." || host == "[]" {
            return Err("the host is empty");
        }
        let mut origin = Origin {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
        };
        // As Phoenix parses it: a scheme without a port means its default port.
        origin.port = origin.port();
        Ok(origin)
    }

    /// Whether a browser's `Origin` (parsed) is allowed by this entry.
    pub fn allows(&self, origin: &Origin) -> bool {
        let host = match self.host.strip_prefix("*.") {
            Some(base) => {
                origin.host == base
                    || origin
                        .host
                        .strip_suffix(base)
                        .is_some_and(|sub| sub.ends_with('.'))
            }
            None => origin.host == self.host,
        };
        host && self
            .scheme
            .as_ref()
            .is_none_or(|s| origin.scheme.as_ref() == Some(s))
            && self.port.is_none_or(|p| origin.port == Some(p))
    }

    /// The port, or the scheme's default (none for `//host`: any port).
    fn port(&self) -> Option<u16> {
        self.port.or(match self.scheme.as_deref() {
            Some("http" | "ws") => Some(80),
            Some("https" | "wss") => Some(443),
            _ => None,
        })
    }
}

/// The connect secret and admin token in force.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Secrets {
    /// HS256 secret of connect tokens.
    pub jwt_secret: String,
    /// HTTP API bearer token.
    pub admin_token: String,
    /// Whether the connect secret was generated (none was given): a development server,
    /// which mints connect tokens for its demo page (`GET /demo/token`).
    #[serde(skip)]
    pub generated: bool,
}

/// File in the data dir holding generated secrets.
const SECRETS_FILE: &str = "secrets.toml";

impl Secrets {
    /// The secrets kept in the data dir, if any were generated there.
    pub fn read(config: &Config) -> anyhow::Result<Option<Secrets>> {
        let path = config.data_dir.join(SECRETS_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The configured secrets; what is unset comes from the data dir, generated and saved
    /// there (mode 0600) on first use. Returns whether anything was generated now.
    pub fn resolve(config: &Config) -> anyhow::Result<(Secrets, bool)> {
        if let (Some(jwt_secret), Some(admin_token)) = (&config.jwt_secret, &config.admin_token) {
            return Ok((
                Secrets {
                    jwt_secret: jwt_secret.clone(),
                    admin_token: admin_token.clone(),
                    generated: false,
                },
                false,
            ));
        }
        let (stored, generated) = match Self::read(config)? {
            Some(stored) => (stored, false),
            None => {
                let fresh = Secrets {
                    jwt_secret: random_token(),
                    admin_token: random_token(),
                    generated: true,
                };
                let path = config.data_dir.join(SECRETS_FILE);
                write_private(&path, &toml::to_string(&fresh)?)?;
                (fresh, true)
            }
        };
        Ok((
            Secrets {
                jwt_secret: config.jwt_secret.clone().unwrap_or(stored.jwt_secret),
                admin_token: config.admin_token.clone().unwrap_or(stored.admin_token),
                generated: config.jwt_secret.is_none(),
            },
            generated,
        ))
    }
}

fn random_token() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_origin_entries_are_refused() {
        for bad in [
            "example.com",
            "https://example.com/path",
            "https://",
            "ftp//x",
            "//h:port",
        ] {
            assert!(Origin::parse(bad).is_err(), "accepted {bad:?}");
        }
        let config = Config {
            check_origin: vec!["example.com".into()],
            ..Config::default()
        };
        let err = config.validate().expect_err("refused");
        assert!(
            err.to_string()
                .contains("check_origin entry \"example.com\""),
            "{err}"
        );
    }

    #[test]
    fn a_short_or_padded_metrics_token_is_refused() {
        let with = |token: &str| Config {
            metrics_token: Some(token.into()),
            ..Config::default()
        };
        for bad in [
            "short",
            "metrics-token-for-prometheus\n",
            " metrics-token-for-prometheus",
        ] {
            let err = with(bad).validate().expect_err("refused");
            assert!(err.to_string().contains("metrics_token"), "{bad:?}: {err}");
        }
        with("metrics-token-for-prometheus")
            .validate()
            .expect("a long printable token");
    }

    #[test]
    fn generated_secrets_are_kept_in_the_data_dir() {
        let dir = std::env::temp_dir().join(format!(
            "cinder-secrets-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let config = Config {
            data_dir: dir.clone(),
            ..Config::default()
        };
        let (first, generated) = Secrets::resolve(&config).expect("generates");
        assert!(generated);
        let (again, generated) = Secrets::resolve(&config).expect("reads");
        assert!(!generated);
        assert_eq!(first, again);
        let config = Config {
            jwt_secret: Some("s".into()),
            ..config
        };
        let (mixed, _) = Secrets::resolve(&config).expect("reads");
        assert_eq!(
            (mixed.jwt_secret.as_str(), &mixed.admin_token),
            ("s", &first.admin_token)
        );
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
