//! The command line: `cinder [serve|token|plugin]`, its flags and their environment
//! variables, and how they turn into a [`Config`] (a flag beats the environment, which beats
//! the config file, which beats the defaults).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;

/// Cinder: a Phoenix Channels server whose channel logic runs in WebAssembly plugins.
#[derive(Debug, Parser)]
#[command(name = "cinder", version, about)]
pub struct Cli {
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `serve`, accepted without the subcommand too.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve(ServeArgs),
    /// Print a connect token (JWT, HS256) signed with the configured secret.
    Token(TokenArgs),
    /// Manage the plugins of a running server: push, list, activate, rollback, delete.
    Plugin(crate::client::PluginArgs),
}

/// Options of `cinder serve`; each also settable in the config file and most by environment.
#[derive(Debug, Default, Clone, Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "CINDER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:4000].
    #[arg(long, env = "CINDER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// HS256 secret for connect tokens [default: generated, kept in the data dir].
    #[arg(long, env = "CINDER_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Bearer token of the HTTP API [default: generated, kept in the data dir].
    #[arg(long, env = "CINDER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Bearer token that reads `GET /metrics` only, for a Prometheus server (the admin
    /// token reads it too) [default: none].
    #[arg(long, env = "CINDER_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Log records as `text` lines or `json` objects (one per line) [default: text].
    #[arg(long, env = "CINDER_LOG_FORMAT", value_enum)]
    pub log_format: Option<crate::config::LogFormat>,
    /// Directory for Cinder's own files [default: ./cinder-data].
    #[arg(long, env = "CINDER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Directory of plugins to take at start: `<name>.wasm` beside `<name>.toml`. A version
    /// new to the store becomes active.
    #[arg(long, env = "CINDER_PLUGINS_DIR")]
    pub plugins_dir: Option<PathBuf>,
    /// A plugins dir to take at start and then follow: a changed wasm is reloaded into the
    /// running server (the dev loop).
    #[arg(long)]
    pub watch: Option<PathBuf>,
    /// Directory of compiled plugin artifacts [default: <data dir>/cache].
    #[arg(long, env = "CINDER_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Redis of the cluster to join, `redis://host:port` [default: none, one node alone].
    #[arg(long = "redis", env = "CINDER_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// This node's name in the cluster [default: generated].
    #[arg(long, env = "CINDER_NODE_ID")]
    pub node_id: Option<String>,
    /// A cluster member without a heartbeat for this many milliseconds is down [default: 5000].
    #[arg(long, env = "CINDER_NODE_DOWN_MS")]
    pub node_down_ms: Option<u64>,
    /// Origins browsers may connect from, comma-separated (`https://example.com`,
    /// `//example.com` for any scheme, `https://*.example.com` for subdomains) [default: any].
    #[arg(long, env = "CINDER_CHECK_ORIGIN", value_delimiter = ',')]
    pub check_origin: Option<Vec<String>>,
    /// Socket mount path; the WebSocket is at `<mount>/websocket`, LongPoll at
    /// `<mount>/longpoll` [default: /socket].
    #[arg(long)]
    pub mount: Option<String>,
    /// Close a socket that sent nothing for this many seconds [default: 60].
    #[arg(long)]
    pub idle_timeout_secs: Option<u64>,
    /// Channels one socket may join [default: 100].
    #[arg(long)]
    pub max_channels_per_socket: Option<usize>,
    /// Largest WebSocket message accepted, in bytes [default: 1048576].
    #[arg(long)]
    pub max_frame_bytes: Option<usize>,
    /// Bytes queued for one socket before it is disconnected as too slow [default: 1048576].
    #[arg(long)]
    pub outbound_queue_bytes: Option<usize>,
    /// Messages waiting for one room before senders wait [default: 1024].
    #[arg(long)]
    pub room_mailbox: Option<usize>,
    /// Live rooms (plugin instances) on this node [default: 1000].
    #[arg(long)]
    pub max_rooms: Option<u32>,
    /// Linear memory of one plugin instance, in bytes [default: 33554432].
    #[arg(long)]
    pub plugin_memory_bytes: Option<usize>,
    /// Time one plugin call may run, in milliseconds [default: 10].
    #[arg(long)]
    pub plugin_call_ms: Option<u64>,
    /// Time making one plugin instance may take, in milliseconds [default: 200].
    #[arg(long)]
    pub plugin_instantiate_ms: Option<u64>,
    /// Pushes and broadcasts one plugin call may make [default: 1024].
    #[arg(long)]
    pub max_messages_per_call: Option<usize>,
    /// Payload bytes one plugin call may send in total, and the largest reply [default: 1048576].
    #[arg(long)]
    pub max_plugin_payload_bytes: Option<usize>,
    /// Largest plugin upload (wasm plus manifest), in bytes [default: 67108864].
    #[arg(long)]
    pub max_upload_bytes: Option<usize>,
    /// Pending send-after timers per channel [default: 64].
    #[arg(long)]
    pub max_timers_per_channel: Option<usize>,
    /// Longest send-after delay, in milliseconds [default: 86400000].
    #[arg(long)]
    pub max_timer_delay_ms: Option<u32>,
    /// Room crashes of one plugin within the crash window that quarantine it [default: 5].
    #[arg(long)]
    pub crash_limit: Option<u32>,
    /// The crash window, in seconds [default: 60].
    #[arg(long)]
    pub crash_window_secs: Option<u64>,
    /// How long a quarantined plugin refuses joins, in seconds [default: 300].
    #[arg(long)]
    pub quarantine_secs: Option<u64>,
    /// Sustained messages per second one socket may send [default: 100].
    #[arg(long)]
    pub messages_per_sec: Option<u32>,
    /// Burst of messages above the sustained rate [default: 200].
    #[arg(long)]
    pub message_burst: Option<u32>,
    /// Plugin stdout/stderr lines logged per second per plugin [default: 50].
    #[arg(long)]
    pub plugin_log_lines_per_sec: Option<u32>,
    /// How long a socket may stay over `outbound_queue_bytes` behind before it is cut off,
    /// in milliseconds [default: 5000].
    #[arg(long)]
    pub slow_client_grace_ms: Option<u64>,
    /// Bytes behind at which a socket is cut off at once [default: 8388608].
    #[arg(long)]
    pub outbound_queue_max_bytes: Option<usize>,
    /// Linear memory all plugin instances of the node may hold together, in bytes
    /// [default: 1073741824].
    #[arg(long)]
    pub plugin_memory_total_bytes: Option<usize>,
    /// Presence bytes (keys and metas) one socket's channels may track [default: 1048576].
    #[arg(long)]
    pub presence_bytes_per_socket: Option<usize>,
    /// Presence bytes the node may hold [default: 268435456].
    #[arg(long)]
    pub presence_bytes_total: Option<usize>,
    /// Time per second a room's timers (`handle_info`) may use, in milliseconds [default: 20].
    #[arg(long)]
    pub timer_cpu_ms_per_sec: Option<u64>,
    /// Open connections (HTTP and WebSocket) [default: the open-file limit less a reserve].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Time a client has to send a request's headers, and an idle keep-alive connection
    /// waits for its next request, in seconds [default: 10].
    #[arg(long)]
    pub http_header_timeout_secs: Option<u64>,
    /// Time an HTTP API request has to send its body, in seconds [default: 30].
    #[arg(long)]
    pub http_body_timeout_secs: Option<u64>,
    /// Longest lifetime a connect token may have (`exp` from now), in seconds
    /// [default: 604800].
    #[arg(long)]
    pub max_token_lifetime_secs: Option<u64>,
    /// Sustained connects per second per client (its token's user, or its address)
    /// [default: 20].
    #[arg(long)]
    pub connects_per_sec: Option<u32>,
    /// Connects one client may make at once above the sustained rate [default: 100].
    #[arg(long)]
    pub connect_burst: Option<u32>,
    /// How long a LongPoll request waits for messages, in milliseconds [default: 10000].
    #[arg(long)]
    pub longpoll_window_ms: Option<u64>,
}

/// Options of `cinder token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The `user_id` claim.
    #[arg(long)]
    pub user_id: String,
    /// Lifetime of the token in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub ttl_secs: u64,
    /// Where the secret comes from, as for `serve`.
    #[command(flatten)]
    pub serve: ServeArgs,
}

impl ServeArgs {
    /// Defaults, then the config file named here (if any), then these flags and
    /// environment variables; validated.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        self.apply_to(&mut config);
        config.validate()?;
        Ok(config)
    }

    fn apply_to(&self, config: &mut Config) {
        let a = self;
        fn set<T: Clone>(slot: &mut T, v: &Option<T>) {
            if let Some(v) = v {
                *slot = v.clone();
            }
        }
        fn set_opt<T: Clone>(slot: &mut Option<T>, v: &Option<T>) {
            if v.is_some() {
                slot.clone_from(v);
            }
        }
        set(&mut config.listen, &a.listen);
        set(&mut config.mount, &a.mount);
        set_opt(&mut config.jwt_secret, &a.jwt_secret);
        set_opt(&mut config.admin_token, &a.admin_token);
        set_opt(&mut config.metrics_token, &a.metrics_token);
        set(&mut config.log_format, &a.log_format);
        set(&mut config.data_dir, &a.data_dir);
        set_opt(&mut config.plugins_dir, &a.plugins_dir);
        set_opt(&mut config.watch, &a.watch);
        set_opt(&mut config.cache_dir, &a.cache_dir);
        set_opt(&mut config.redis_url, &a.redis_url);
        set_opt(&mut config.node_id, &a.node_id);
        set(&mut config.node_down_ms, &a.node_down_ms);
        set(&mut config.check_origin, &a.check_origin);
        let l = &mut config.limits;
        set(&mut l.idle_timeout_secs, &a.idle_timeout_secs);
        set(&mut l.max_channels_per_socket, &a.max_channels_per_socket);
        set(&mut l.max_frame_bytes, &a.max_frame_bytes);
        set(&mut l.outbound_queue_bytes, &a.outbound_queue_bytes);
        set(&mut l.room_mailbox, &a.room_mailbox);
        set(&mut l.max_rooms, &a.max_rooms);
        set(&mut l.plugin_memory_bytes, &a.plugin_memory_bytes);
        set(&mut l.plugin_call_ms, &a.plugin_call_ms);
        set(&mut l.plugin_instantiate_ms, &a.plugin_instantiate_ms);
        set(&mut l.max_messages_per_call, &a.max_messages_per_call);
        set(&mut l.max_plugin_payload_bytes, &a.max_plugin_payload_bytes);
        set(&mut l.max_upload_bytes, &a.max_upload_bytes);
        set(&mut l.max_timers_per_channel, &a.max_timers_per_channel);
        set(&mut l.max_timer_delay_ms, &a.max_timer_delay_ms);
        set(&mut l.crash_limit, &a.crash_limit);
        set(&mut l.crash_window_secs, &a.crash_window_secs);
        set(&mut l.quarantine_secs, &a.quarantine_secs);
        set(&mut l.messages_per_sec, &a.messages_per_sec);
        set(&mut l.message_burst, &a.message_burst);
        set(&mut l.plugin_log_lines_per_sec, &a.plugin_log_lines_per_sec);
        set(&mut l.slow_client_grace_ms, &a.slow_client_grace_ms);
        set(&mut l.outbound_queue_max_bytes, &a.outbound_queue_max_bytes);
        set(
            &mut l.plugin_memory_total_bytes,
            &a.plugin_memory_total_bytes,
        );
        set(
            &mut l.presence_bytes_per_socket,
            &a.presence_bytes_per_socket,
        );
        set(&mut l.presence_bytes_total, &a.presence_bytes_total);
        set(&mut l.timer_cpu_ms_per_sec, &a.timer_cpu_ms_per_sec);
        set_opt(&mut l.max_connections, &a.max_connections);
        set(&mut l.http_header_timeout_secs, &a.http_header_timeout_secs);
        set(&mut l.http_body_timeout_secs, &a.http_body_timeout_secs);
        set(&mut l.max_token_lifetime_secs, &a.max_token_lifetime_secs);
        set(&mut l.connects_per_sec, &a.connects_per_sec);
        set(&mut l.connect_burst, &a.connect_burst);
        set(&mut l.longpoll_window_ms, &a.longpoll_window_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("cinder-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let file = dir.join("c.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:5000\"\nmount = \"/ws\"\n[limits]\nmax_rooms = 7\nplugin_call_ms = 3\n")
            .expect("write");
        let args = ServeArgs {
            config: Some(file),
            plugin_call_ms: Some(5),
            ..ServeArgs::default()
        };
        let c = args.config().expect("loads");
        assert_eq!(c.listen.port(), 5000);
        assert_eq!(c.mount, "/ws");
        assert_eq!(c.limits.max_rooms, 7);
        assert_eq!(c.limits.plugin_call_ms, 5);
        assert_eq!(c.limits.max_channels_per_socket, 100);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = std::env::temp_dir().join(format!("cinder-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let file = dir.join("c.toml");
        std::fs::write(&file, "lissten = \"x\"\n").expect("write");
        let err = ServeArgs {
            config: Some(file.clone()),
            ..ServeArgs::default()
        }
        .config()
        .expect_err("refused");
        assert!(format!("{err:#}").contains("lissten"), "{err:#}");
        std::fs::write(&file, "mount = \"socket/\"\n").expect("write");
        assert!(
            ServeArgs {
                config: Some(file),
                ..ServeArgs::default()
            }
            .config()
            .is_err()
        );
    }
}
