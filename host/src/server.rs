//! The server: it builds the node (runtime, registry, hub, sockets, API), routes requests,
//! and runs the accept loop that guards the door. Before a request reaches a handler, its connection
//! holds one of `max_connections` slots (past it: a 503 at once), its headers arrive within
//! `http_header_timeout_secs` (an idle keep-alive connection waits no longer for its next
//! request), an API request shows the admin token before its body is read, and the body
//! arrives within `http_body_timeout_secs`. When the process runs out of file descriptors,
//! accepting backs off and says so once, not once per attempt.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{any, delete, get, post};
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tower::ServiceExt as _;

use crate::api::{self, Admin};
use crate::channel::Hub;
use crate::cluster::Link;
use crate::config::{Config, Limits, Secrets};
use crate::connect::{Admission, Peer};
use crate::deploy::Deploy;
use crate::lease::Leases;
use crate::limit::Connects;
use crate::limit::Slots;
use crate::longpoll::{self, LongPolls};
use crate::pubsub::{LocalPubSub, PubSub, RedisPubSub};
use crate::registry::Registry;
use crate::runtime::Runtime;
use crate::stats::Stats;
use crate::store::{PluginStore, Source};
use crate::transport::{self, Sockets};
use crate::{auth, cluster, pages, presence, protocol};

/// How long shutdown waits for sockets to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Descriptors kept back from `max_connections` when it is derived from the open-file
/// limit (the store, the artifact cache, the log, the runtime), at most a quarter of it.
const RESERVED_FILES: u64 = 256;
/// Refusals (503) being written at once; past it a connection over the cap is just
/// closed, so refusing cannot itself hold descriptors.
const REFUSALS_IN_FLIGHT: usize = 64;
/// How long a refusal waits for the client to take it.
const REFUSAL_LINGER: Duration = Duration::from_millis(200);
/// How often an accept error is logged at most (it repeats while descriptors are short).
const ACCEPT_ERROR_EVERY: Duration = Duration::from_secs(60);
/// How long accepting pauses after an error other than a dropped connection.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What the accept loop needs: the connection slots, the counters, the shutdown signal.
struct Door {
    slots: Arc<Slots>,
    stats: Arc<Stats>,
    stopping: watch::Receiver<bool>,
}

/// The connection cap when the configuration gives none: the open-file limit less a
/// reserve.
fn default_max_connections() -> usize {
    let files = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1 << 20);
    let reserve = RESERVED_FILES.min(files / 4);
    usize::try_from(files - reserve).unwrap_or(usize::MAX)
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
    let limits = config.limits.clone();
    let stats = Arc::new(Stats::default());
    let addr = listener.local_addr()?;
    let (pubsub, link): (Arc<dyn PubSub>, _) = match &config.redis_url {
        None => (Arc::new(LocalPubSub::new()), None),
        Some(url) => {
            let node = config
                .node_id
                .clone()
                .unwrap_or_else(cluster::generated_node_id);
            let down = Duration::from_millis(config.node_down_ms);
            let link = Link::start(url, &node, addr.to_string(), down, stats.clone())?;
            tracing::info!(%node, "cluster member: broadcasts and disconnects cross nodes through Redis");
            (RedisPubSub::new(link.clone(), stats.clone()), Some(link))
        }
    };
    let tracker = presence::Tracker::start(
        pubsub.clone(),
        limits.presence_bytes_per_socket,
        limits.presence_bytes_total,
    );
    let runtime = Arc::new(Runtime::new(&limits, stats.clone(), tracker.clone())?);
    let store = PluginStore::open(&config.data_dir, &config.cache_dir())?;
    let registry = Arc::new(Registry::open(runtime.clone(), store, limits.clone()).await?);
    let leases = link
        .clone()
        .map(|link| Leases::start(link, Duration::from_millis(config.node_down_ms)));
    let hub = Hub::new(
        registry.clone(),
        pubsub,
        tracker.clone(),
        limits.clone(),
        stats,
        leases,
    );
    // On a cluster the cluster's versions come first: a node that starts later serves
    // the active versions of the cluster, not those of its plugins dir.
    let stop = watch::Sender::new(false);
    let deploy = link
        .clone()
        .map(|link| Deploy::start(link, registry.clone(), hub.clone(), stop.subscribe()));
    if let Some(deploy) = &deploy {
        deploy.converge_all().await;
    }
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
    let max = limits
        .max_connections
        .unwrap_or_else(default_max_connections);
    let slots = Arc::new(Slots::new(max));
    let admission = Admission::new(
        &config.check_origin,
        auth::Verifier::hs256(&secrets.jwt_secret, limits.max_token_lifetime_secs),
        Connects::new(limits.connects_per_sec, limits.connect_burst),
    );
    let sockets = Arc::new(Sockets::new(hub.clone(), admission, stop.subscribe()));
    let longpolls = LongPolls::start(
        sockets.clone(),
        slots.clone(),
        &secrets.jwt_secret,
        link.clone(),
    );
    let stats = hub.stats().clone();
    let admin = Arc::new(Admin {
        hub: hub.clone(),
        registry,
        runtime,
        presence: tracker,
        sockets: sockets.clone(),
        longpolls: longpolls.clone(),
        connections: slots.clone(),
        cluster: link.clone(),
        deploy,
        admin_token: secrets.admin_token,
        metrics_token: config.metrics_token.clone(),
        dev_secret: secrets.generated.then(|| secrets.jwt_secret.clone()),
        mount: config.mount.clone(),
    });
    let socket_path = format!("{}{}", config.mount, protocol::WEBSOCKET_PATH);
    let longpoll_path = format!("{}{}", config.mount, protocol::longpoll::PATH);
    let router = router(
        admin,
        sockets,
        longpolls,
        &socket_path,
        &longpoll_path,
        &limits,
    );
    tracing::info!(%addr, socket = %socket_path, max_connections = max, "cinder listening");
    // Scripts and tests wait for this line and read the address from it (the port may have
    // been 0): it comes once the plugins are loaded and requests are served.
    println!("cinder listening on http://{addr}");
    let door = Door {
        slots: slots.clone(),
        stats,
        stopping: stop.subscribe(),
    };
    accept(&listener, &door, router, &limits, shutdown).await;
    tracing::info!("shutting down: closing sockets with 1012");
    stop.send_replace(true);
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while slots.open() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    // The rooms this node owns for the cluster move on with their state.
    hub.hand_off().await;
    if let Some(link) = link {
        link.leave(SHUTDOWN_GRACE).await;
    }
    Ok(())
}

/// The routes: the socket (WebSocket and LongPoll), the landing page, the demo and admin
/// pages, the metrics, and the admin API behind its token.
fn router(
    app: Arc<Admin>,
    sockets: Arc<Sockets>,
    longpolls: Arc<LongPolls>,
    socket_path: &str,
    longpoll_path: &str,
    limits: &Limits,
) -> axum::Router {
    let admin = axum::Router::new()
        .route("/api/broadcast", post(api::broadcast))
        .route("/api/stats", get(api::stats))
        .route("/api/rooms", get(api::rooms))
        .route("/api/presence", get(api::presence))
        .route("/api/plugins/{name}/activate", post(api::activate))
        .route("/api/plugins/{name}/rollback", post(api::rollback))
        .route("/api/plugins/{name}", delete(api::delete_plugin))
        .route(
            "/api/plugins/{name}/versions/{version}",
            delete(api::delete_version),
        )
        .layer(DefaultBodyLimit::max(limits.max_frame_bytes))
        .route(
            "/api/plugins",
            get(api::list_plugins)
                .post(api::upload)
                .layer(DefaultBodyLimit::max(limits.max_upload_bytes)),
        )
        // Outermost, so it runs first: no body is read for a request without the token.
        .route_layer(middleware::from_fn_with_state(app.clone(), admin_only));
    let socket = axum::Router::new()
        .route(socket_path, get(transport::websocket))
        .with_state(sockets);
    let longpoll = axum::Router::new()
        .route(longpoll_path, any(longpoll::endpoint))
        .with_state(longpolls);
    axum::Router::new()
        .route("/", get(api::index))
        .route("/metrics", get(api::metrics))
        .route("/demo/token", get(api::dev_token))
        .route("/demo", get(pages::demo))
        .route("/admin", get(pages::admin))
        .route("/assets/{name}", get(pages::asset))
        .merge(admin)
        .with_state(app)
        .merge(socket)
        .merge(longpoll)
}

/// Refuses an admin API request without the admin token (401) before anything reads its
/// body; gives the body of one with it `http_body_timeout_secs` to arrive.
async fn admin_only(State(app): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    if let Some(refused) = api::refusal(&app, request.headers()) {
        return refused;
    }
    let limit = Duration::from_secs(app.hub.limits().http_body_timeout_secs);
    let stats = app.hub.stats().clone();
    let request = request.map(|body| Body::new(Deadline::new(body, limit, stats)));
    next.run(request).await
}

/// A request body that fails once its deadline passes (a client trickling a body).
struct Deadline {
    body: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    stats: Arc<Stats>,
    limit: Duration,
}

impl Deadline {
    fn new(body: Body, limit: Duration, stats: Arc<Stats>) -> Self {
        Deadline {
            body,
            sleep: Box::pin(tokio::time::sleep(limit)),
            stats,
            limit,
        }
    }
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            Stats::bump(&self.stats.http_timeouts);
            let why = format!(
                "request body not received within {} s (http_body_timeout_secs)",
                self.limit.as_secs()
            );
            return Poll::Ready(Some(Err(axum::Error::new(why))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Accepts connections until `shutdown` resolves, each in a task of its own holding a
/// slot; refuses those past the cap.
async fn accept(
    listener: &TcpListener,
    door: &Door,
    router: axum::Router,
    limits: &Limits,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.http_header_timeout_secs));
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
    let mut last_error: Option<Instant> = None;
    let stopping = door.stopping.clone();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(door, e, &mut last_error).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        // Real-time frames are small: never let Nagle hold one back waiting for an ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let Some(slot) = door.slots.take() else {
            Stats::bump(&door.stats.connections_refused);
            if let Ok(refusing) = refusals.clone().try_acquire_owned() {
                tokio::spawn(refuse(tcp, door.slots.max(), refusing));
            }
            continue;
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<_>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(slot.clone());
            request.extensions_mut().insert(Peer(peer));
            router.clone().oneshot(request)
        });
        let conn = http
            .serve_connection(TokioIo::new(tcp), service)
            .with_upgrades();
        let stats = door.stats.clone();
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            let stop = async {
                // The guard `wait_for` returns must not live across an await.
                let _ = stopping.wait_for(|stop| *stop).await.map(|_| ());
            };
            let finished = tokio::select! {
                finished = conn.as_mut() => finished,
                () = stop => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = finished {
                if e.is_timeout() {
                    Stats::bump(&stats.http_timeouts);
                }
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
}

/// Answers a connection over the cap with a 503 naming it, and closes it.
async fn refuse(mut tcp: TcpStream, max: usize, _refusing: OwnedSemaphorePermit) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = format!(
        "{{\"error\":\"connection cap of {max} reached (max_connections): try again later\"}}"
    );
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-type: application/json\r\nretry-after: 1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        tcp.write_all(answer.as_bytes()).await?;
        tcp.shutdown().await?;
        // Read what the client sent until it closes, so closing does not reset the
        // connection before the client has read the answer.
        let mut sink = [0u8; 1024];
        while tcp.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// An accept failed: a connection that went away is nothing; anything else (out of file
/// descriptors) is counted, logged at most once a minute, and accepting pauses briefly.
async fn accept_failed(door: &Door, e: std::io::Error, last: &mut Option<Instant>) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    Stats::bump(&door.stats.accept_errors);
    if last.is_none_or(|at| at.elapsed() >= ACCEPT_ERROR_EVERY) {
        *last = Some(Instant::now());
        tracing::error!(error = %e, open = door.slots.open(), "cannot accept connections (retrying; logged once a minute, counted in accept_errors)");
    }
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}
