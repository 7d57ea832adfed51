//! Cinder: a real-time channel server that speaks the Phoenix Channels protocol and runs
//! channel logic in sandboxed WebAssembly components.
//!
//! # Layout
//! - [`protocol`]: Phoenix frames in and out (V1 JSON, V2 JSON, V2 binary). Pure.
//! - [`auth`]: connect tokens (JWT HS256).
//! - [`transport`]: the WebSocket endpoint and one task per socket.
//! - [`channel`]: the per-socket session and the room actor (one plugin instance per topic).
//! - [`pubsub`]: topic fan-out, encoded once per serializer.
//! - [`presence`]: who is in each topic (a delta CRDT plus the Phoenix wire shapes).
//! - [`runtime`]: wasmtime, the `cinder:channel` world, the manifest, compiling and checking.
//! - [`registry`]: plugins and their versions: upload, activate (hot reload), roll back,
//!   delete, routing, the plugins dir and the watched dir.
//! - [`store`]: the durable plugin store and artifact cache in the data dir.
//! - [`api`]: the HTTP API (server push, plugin administration).
//! - [`client`]: `cinder plugin ...`, the admin API from the command line.
//! - [`config`]: defaults, file, environment and flags; every limit.
//!
//! The binary only parses arguments and calls [`serve`], so tests start a server on port 0
//! in-process.

pub mod api;
pub mod auth;
pub mod channel;
pub mod client;
pub mod config;
pub mod presence;
pub mod protocol;
pub mod pubsub;
pub mod registry;
pub mod runtime;
pub mod stats;
pub mod store;
pub mod transport;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::serve::ListenerExt as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::channel::Hub;
use crate::config::{Config, Secrets};
use crate::pubsub::LocalPubSub;
use crate::registry::Registry;
use crate::runtime::Runtime;
use crate::store::{PluginStore, Source};

/// How long shutdown waits for sockets to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What every request handler shares.
pub struct AppState {
    hub: Arc<Hub>,
    verifier: auth::Verifier,
    admin_token: String,
    mount: String,
    registry: Arc<Registry>,
    shutdown: watch::Sender<bool>,
    live_sockets: AtomicUsize,
}

/// Runs Cinder on `listener` until `shutdown` resolves, then closes every socket with
/// 1012 (so clients reconnect) and returns once they are closed or after a grace period.
/// Once the plugins are loaded it prints `cinder listening on http://<addr>` to stdout.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    secrets: Secrets,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let stats = Arc::new(stats::Stats::default());
    let pubsub: Arc<dyn pubsub::PubSub> = Arc::new(LocalPubSub::new());
    let tracker = Arc::new(presence::Tracker::new(pubsub.clone()));
    let runtime = Arc::new(Runtime::new(
        &config.limits,
        stats.clone(),
        tracker.clone(),
    )?);
    let store = PluginStore::open(&config.data_dir, &config.cache_dir())?;
    let registry = Arc::new(Registry::open(runtime.clone(), store, config.limits.clone()).await?);
    let hub = Hub::new(
        registry.clone(),
        pubsub,
        tracker,
        config.limits.clone(),
        stats,
    );
    if let Some(dir) = &config.plugins_dir {
        registry.add_dir(&hub, dir, Source::Dir).await?;
    }
    if let Some(dir) = &config.watch {
        registry.add_dir(&hub, dir, Source::Dir).await?;
    }
    let watcher = config.watch.clone().map(|dir| {
        tracing::info!(dir = %dir.display(), "watching for plugin changes");
        tokio::spawn(registry.clone().watch(hub.clone(), dir))
    });
    let app = Arc::new(AppState {
        hub,
        verifier: auth::Verifier::hs256(&secrets.jwt_secret),
        admin_token: secrets.admin_token,
        mount: config.mount.clone(),
        registry,
        shutdown: watch::Sender::new(false),
        live_sockets: AtomicUsize::new(0),
    });
    let socket_path = format!("{}{}", config.mount, protocol::WEBSOCKET_PATH);
    let router = axum::Router::new()
        .route("/", get(api::index))
        .route(&socket_path, get(transport::websocket))
        .route("/api/broadcast", post(api::broadcast))
        .route("/api/stats", get(api::stats))
        .route("/api/plugins/{name}/activate", post(api::activate))
        .route("/api/plugins/{name}/rollback", post(api::rollback))
        .route("/api/plugins/{name}", delete(api::delete_plugin))
        .route(
            "/api/plugins/{name}/versions/{version}",
            delete(api::delete_version),
        )
        .layer(DefaultBodyLimit::max(config.limits.max_frame_bytes))
        .route(
            "/api/plugins",
            get(api::list_plugins)
                .post(api::upload)
                .layer(DefaultBodyLimit::max(config.limits.max_upload_bytes)),
        )
        .with_state(app.clone());
    let addr = listener.local_addr()?;
    tracing::info!(%addr, socket = %socket_path, "cinder listening");
    // Scripts and tests wait for this line and read the address from it (the port may have
    // been 0): it comes once the plugins are loaded and requests are served.
    println!("cinder listening on http://{addr}");
    let stop = app.clone();
    // Real-time frames are small: never let Nagle hold one back waiting for an ACK.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: closing sockets with 1012");
            stop.shutdown.send_replace(true);
        })
        .await?;
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while app.live_sockets.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    drop(runtime);
    Ok(())
}
