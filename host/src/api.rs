//! The HTTP API: the landing document at `/`, server push (`POST /api/broadcast`, Phoenix's
//! `Endpoint.broadcast`), stats, Prometheus metrics (`GET /metrics`), live rooms and a
//! topic's presence, plugin administration under `/api/plugins` (upload, list, activate,
//! roll back, delete), and the demo page's development token. Everything under `/api`
//! needs the admin bearer token, checked before the body is read (the server runs
//! `refusal` before any handler); `/metrics` takes the admin token or the metrics token;
//! `/demo/token` answers only on a server whose connect secret was generated.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::channel::Hub;
use crate::cluster::Link;
use crate::deploy::Deploy;
use crate::limit::Slots;
use crate::metrics::{self, Scrape};
use crate::presence::Tracker;
use crate::protocol::{self, Payload};
use crate::pubsub::Broadcast;
use crate::registry::Activation;
use crate::registry::Refusal;
use crate::registry::Registry;
use crate::runtime::Runtime;
use crate::stats::Gauges;
use crate::store::Source;
use crate::transport::Sockets;

/// What the API's handlers share.
pub struct Admin {
    /// The live rooms.
    pub hub: Arc<Hub>,
    /// The plugins.
    pub registry: Arc<Registry>,
    /// The runtime, for the plugin memory it holds.
    pub runtime: Arc<Runtime>,
    /// Presence, for the bytes it holds.
    pub presence: Arc<Tracker>,
    /// The sockets, for how many are open.
    pub sockets: Arc<Sockets>,
    /// The LongPoll sessions, for how many are live.
    pub longpolls: Arc<crate::longpoll::LongPolls>,
    /// The connection slots, for how many are taken.
    pub connections: Arc<Slots>,
    /// The link to the cluster, on a cluster member.
    pub cluster: Option<Arc<Link>>,
    /// Plugin versions on the cluster, on a cluster member.
    pub deploy: Option<Arc<Deploy>>,
    /// The bearer token of the API.
    pub admin_token: String,
    /// The token that reads `/metrics` only, if one is set.
    pub metrics_token: Option<String>,
    /// The connect secret, on a development server (generated secrets) only: the demo
    /// page's tokens are minted with it.
    pub dev_secret: Option<String>,
    /// Where the WebSocket is mounted.
    pub mount: String,
}

impl Admin {
    /// What is in use now, for `/api/stats`.
    fn gauges(&self) -> Gauges {
        Gauges {
            sockets: self.sockets.live(),
            longpoll_sessions: self.longpolls.live(),
            connections: self.connections.open(),
            rooms: self.hub.room_count(),
            plugin_memory_bytes: self.runtime.plugin_memory(),
            presence_bytes: self.presence.held(),
        }
    }
}

/// `GET /`: what this server is and where its socket is; a browser (asking for HTML) gets
/// the landing page, which links the demo and the admin page.
pub async fn index(State(app): State<Arc<Admin>>, headers: HeaderMap) -> Response {
    if crate::pages::wants_html(&headers) {
        return crate::pages::landing();
    }
    Json(json!({
        "name": "cinder",
        "version": env!("CARGO_PKG_VERSION"),
        "about": "Phoenix Channels server; channel logic runs in WebAssembly plugins",
        "socket": format!("{}{}", app.mount, protocol::WEBSOCKET_PATH),
        "longpoll": format!("{}{}", app.mount, protocol::longpoll::PATH),
        "serializers": ["1.0.0", "2.0.0"],
        "plugins": app.registry.list(&app.hub).unwrap_or_default().into_iter().filter_map(|p| {
            Some(json!({ "name": p.name, "version": p.active?, "topics": p.topics, "description": p.description }))
        }).collect::<Vec<_>>(),
        "pages": { "demo": "/demo", "admin": "/admin" },
    }))
    .into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Compares without an early exit, so timing does not reveal the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token a request carries.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// A 401 unless the request carries `Authorization: Bearer <admin token>`.
pub(crate) fn refusal(app: &Admin, headers: &HeaderMap) -> Option<Response> {
    match bearer(headers) {
        Some(token) if same(token.as_bytes(), app.admin_token.as_bytes()) => None,
        Some(_) => Some(error(StatusCode::UNAUTHORIZED, "wrong admin token")),
        None => Some(error(
            StatusCode::UNAUTHORIZED,
            "missing admin token: send Authorization: Bearer <token>",
        )),
    }
}

/// `GET /metrics`: every counter and gauge in the Prometheus text format, for the admin
/// token or the metrics token.
pub async fn metrics(State(app): State<Arc<Admin>>, headers: HeaderMap) -> Response {
    let allowed = bearer(&headers).is_some_and(|token| {
        same(token.as_bytes(), app.admin_token.as_bytes())
            || app
                .metrics_token
                .as_ref()
                .is_some_and(|m| same(token.as_bytes(), m.as_bytes()))
    });
    if !allowed {
        let mut refused = error(
            StatusCode::UNAUTHORIZED,
            "send Authorization: Bearer <metrics token or admin token>",
        );
        refused.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return refused;
    }
    let g = app.gauges();
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    let mut gauges = vec![
        (
            "connections",
            "Open connections (HTTP and WebSocket).",
            count(g.connections),
        ),
        (
            "rooms",
            "Live rooms (plugin instances and rooms forwarding to their owner).",
            count(g.rooms),
        ),
        (
            "plugin_memory_bytes",
            "Linear memory of every plugin instance.",
            count(g.plugin_memory_bytes),
        ),
        (
            "presence_bytes",
            "Presence keys and metas held.",
            count(g.presence_bytes),
        ),
    ];
    if let Some(link) = &app.cluster {
        gauges.push((
            "cluster_redis_up",
            "Whether the link to the cluster's Redis is up (1) or down (0).",
            i64::from(link.is_up()),
        ));
        let members = link.members().await.len();
        gauges.push((
            "cluster_members",
            "Cluster members whose heartbeat is current.",
            count(members),
        ));
    }
    let rooms = app.hub.rooms_by_version();
    let stats = app.hub.stats();
    let text = stats.metrics.render(&Scrape {
        counters: stats.described(),
        gauges,
        rooms: &rooms,
    });
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

/// Rooms a listing gives at most.
const MAX_LISTED_ROOMS: usize = 500;

/// Query of `GET /api/rooms`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomsQuery {
    /// Only this plugin's rooms.
    plugin: Option<String>,
}

/// `GET /api/rooms[?plugin=name]`: this node's live rooms, most channels first (at most
/// 500; `total` says how many there are), with plugin, version and channels here.
pub async fn rooms(State(app): State<Arc<Admin>>, Query(query): Query<RoomsQuery>) -> Response {
    let mut rooms = app.hub.rooms();
    if let Some(plugin) = &query.plugin {
        rooms.retain(|r| &r.plugin == plugin);
    }
    rooms.sort_by(|a, b| {
        b.members
            .cmp(&a.members)
            .then_with(|| a.topic.cmp(&b.topic))
    });
    let total = rooms.len();
    rooms.truncate(MAX_LISTED_ROOMS);
    Json(json!({ "total": total, "rooms": rooms })).into_response()
}

/// Query of `GET /api/presence`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceQuery {
    /// The topic.
    topic: String,
}

/// `GET /api/presence?topic=<topic>`: who is in the topic, as this node sees it, in the
/// shape of Phoenix's `presence_state` (`{key: {"metas": [...]}}`).
pub async fn presence(
    State(app): State<Arc<Admin>>,
    Query(query): Query<PresenceQuery>,
) -> Response {
    if query.topic.is_empty() || query.topic.len() > app.hub.limits().max_frame_bytes {
        return error(
            StatusCode::BAD_REQUEST,
            "topic must be given and not longer than max_frame_bytes",
        );
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        app.presence.list_json(&query.topic),
    )
        .into_response()
}

/// Query of `GET /demo/token`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevTokenQuery {
    /// The user the token is for.
    user: String,
}

/// Longest user name the development endpoint mints a token for.
const MAX_DEV_USER: usize = 64;

/// Lifetime of a development token.
const DEV_TOKEN_SECS: u64 = 3600;

/// `GET /demo/token?user=<name>`: a connect token for `user`, valid an hour, on a
/// development server only (its connect secret was generated; 404 on any other).
pub async fn dev_token(
    State(app): State<Arc<Admin>>,
    Query(query): Query<DevTokenQuery>,
) -> Response {
    let Some(secret) = &app.dev_secret else {
        return error(
            StatusCode::NOT_FOUND,
            "development tokens are off: this server was given its connect secret",
        );
    };
    let user = query.user.trim();
    if user.is_empty() || user.chars().count() > MAX_DEV_USER || user.chars().any(char::is_control)
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!("user must be 1 to {MAX_DEV_USER} characters, none of them control characters"),
        );
    }
    let ttl = DEV_TOKEN_SECS.min(app.hub.limits().max_token_lifetime_secs);
    match crate::auth::mint(secret, user, ttl) {
        Ok(token) => {
            Json(json!({ "token": token, "user_id": user, "expires_in": ttl })).into_response()
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("token not minted: {e}"),
        ),
    }
}

/// `GET /api/stats`: open sockets, live rooms and the event counters; on a cluster member
/// also `cluster`: this node's id, whether Redis answers, and the members whose heartbeat
/// is current.
pub async fn stats(State(app): State<Arc<Admin>>) -> Response {
    let snapshot = app.hub.stats().snapshot(app.gauges());
    let Some(link) = &app.cluster else {
        return Json(snapshot).into_response();
    };
    let mut body = serde_json::to_value(snapshot).unwrap_or_default();
    body["cluster"] = json!({
        "node": &**link.node(),
        "redis": if link.is_up() { "up" } else { "down" },
        "members": link.members().await,
    });
    Json(body).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    topic: String,
    event: String,
    payload: Box<RawValue>,
}

/// `POST /api/broadcast` with `{"topic","event","payload"}`: deliver to every subscriber.
pub async fn broadcast(State(app): State<Arc<Admin>>, body: Bytes) -> Response {
    let body: BroadcastBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("body must be JSON {{\"topic\",\"event\",\"payload\"}}: {e}"),
            );
        }
    };
    if body.topic.is_empty() || body.event.is_empty() {
        return error(StatusCode::BAD_REQUEST, "topic and event must not be empty");
    }
    if protocol::event::is_reserved(&body.event) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("event {} is reserved", body.event),
        );
    }
    if !protocol::nests_within(body.payload.get(), protocol::MAX_JSON_DEPTH) {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "payload nests deeper than {} levels",
                protocol::MAX_JSON_DEPTH
            ),
        );
    }
    // Socket ids are not topics: `disconnect` goes to the sockets listening on the id,
    // and nothing else goes there.
    if body.event == protocol::event::DISCONNECT {
        app.hub.pubsub().disconnect(&body.topic);
    } else if body.topic.starts_with(protocol::SOCKET_ID_PREFIX) {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "{} is a socket id: only disconnect is broadcast there",
                body.topic.chars().take(64).collect::<String>()
            ),
        );
    } else {
        let b = Broadcast::new(
            body.topic.into(),
            body.event,
            Payload::Json(body.payload),
            None,
        );
        app.hub.pubsub().publish(Arc::new(b));
    }
    (StatusCode::ACCEPTED, Json(json!({ "status": "ok" }))).into_response()
}

/// On a cluster member whose Redis does not answer, a plugin change is refused: made here
/// alone, it would leave this node's record apart from the cluster's.
fn cluster_unwritable(app: &Admin) -> Option<Response> {
    let deploy = app.deploy.as_ref()?;
    (!deploy.writable()).then(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the cluster's Redis is unreachable: plugin changes wait until it is back",
        )
    })
}

/// An activation's answer; on a cluster with `nodes`, what each member serves once it
/// applied the version (or why it could not; `null` when it did not say in time).
async fn activated(app: &Admin, activation: Result<Activation, Refusal>) -> Response {
    let activation = match activation {
        Ok(a) => a,
        Err(e) => return refused(e),
    };
    let Some(deploy) = &app.deploy else {
        return Json(activation).into_response();
    };
    let nodes = deploy
        .reports(&activation.plugin, &activation.version)
        .await;
    let mut body = serde_json::to_value(&activation).unwrap_or_default();
    body["nodes"] = serde_json::to_value(nodes).unwrap_or_default();
    Json(body).into_response()
}

fn refused(refusal: Refusal) -> Response {
    let status = match &refusal {
        Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
        Refusal::NotFound(_) => StatusCode::NOT_FOUND,
        Refusal::Conflict(_) => StatusCode::CONFLICT,
        Refusal::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Refusal::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, refusal.to_string())
}

/// Query of `POST /api/plugins`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// Activate the version once stored (default true).
    activate: Option<bool>,
}

/// `POST /api/plugins`, multipart with a `manifest` part (TOML) and a `wasm` part (the
/// component): validate, store durably, and (unless `?activate=false`) activate, moving
/// the plugin's live rooms to the new version. 201 when stored, 200 when that exact
/// version was already stored.
pub async fn upload(
    State(app): State<Arc<Admin>>,
    Query(query): Query<UploadQuery>,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    const USAGE: &str = "send multipart/form-data with a `manifest` part (TOML) and a `wasm` part (the component), e.g. curl -F manifest=@cinder.toml -F wasm=@plugin.wasm";
    let mut multipart = match multipart {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e}: {USAGE}")),
    };
    let (mut manifest, mut wasm) = (None, None);
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return multipart_error(&app, &e),
        };
        let name = field.name().unwrap_or_default().to_owned();
        let bytes = match field.bytes().await {
            Ok(bytes) => bytes,
            Err(e) => return multipart_error(&app, &e),
        };
        match name.as_str() {
            "manifest" => match String::from_utf8(bytes.to_vec()) {
                Ok(text) => manifest = Some(text),
                Err(_) => return error(StatusCode::BAD_REQUEST, "the manifest is not UTF-8"),
            },
            "wasm" => wasm = Some(bytes.to_vec()),
            other => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("unexpected part {other:?}: {USAGE}"),
                );
            }
        }
    }
    let (Some(manifest), Some(wasm)) = (manifest, wasm) else {
        return error(StatusCode::BAD_REQUEST, format!("missing part: {USAGE}"));
    };
    let activate = query.activate.unwrap_or(true);
    if let Some(refusal) = cluster_unwritable(&app) {
        return refusal;
    }
    match app
        .registry
        .add(&app.hub, &manifest, wasm, Source::Upload, activate)
        .await
    {
        Ok(up) => {
            let status = if up.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let mut body = serde_json::to_value(&up).unwrap_or_default();
            if let (Some(deploy), Some(activation)) = (&app.deploy, &up.activation) {
                let nodes = deploy
                    .reports(&activation.plugin, &activation.version)
                    .await;
                body["activation"]["nodes"] = serde_json::to_value(nodes).unwrap_or_default();
            }
            (status, Json(body)).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "plugin upload refused");
            refused(e)
        }
    }
}

fn multipart_error(app: &Admin, e: &axum::extract::multipart::MultipartError) -> Response {
    let status = e.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        let max = app.hub.limits().max_upload_bytes;
        return error(
            status,
            format!("upload over the limit of {max} bytes (max_upload_bytes)"),
        );
    }
    error(
        status,
        format!("malformed multipart body: {}", e.body_text()),
    )
}

/// `GET /api/plugins`: every plugin with its versions, active version and live rooms.
/// On a cluster member each plugin also has `nodes`: the version each member's heartbeat
/// says it serves.
pub async fn list_plugins(State(app): State<Arc<Admin>>) -> Response {
    let plugins = match app.registry.list(&app.hub) {
        Ok(plugins) => plugins,
        Err(e) => return refused(e),
    };
    let Some(link) = &app.cluster else {
        return Json(plugins).into_response();
    };
    let members = link.members().await;
    let mut body = serde_json::to_value(&plugins).unwrap_or_default();
    if let Some(list) = body.as_array_mut() {
        for plugin in list {
            let name = plugin["name"].as_str().unwrap_or_default().to_owned();
            let nodes: serde_json::Map<String, serde_json::Value> = members
                .iter()
                .map(|m| (m.id.clone(), json!(m.versions.get(&name))))
                .collect();
            plugin["nodes"] = serde_json::Value::Object(nodes);
        }
    }
    Json(body).into_response()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VersionBody {
    version: Option<String>,
}

/// An optional JSON body `{"version": "..."}`; the error says what is wrong.
fn version_body(body: &[u8]) -> Result<Option<String>, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice::<VersionBody>(body)
        .map(|b| b.version)
        .map_err(|e| format!("body must be JSON {{\"version\": \"x.y.z\"}}: {e}"))
}

/// `POST /api/plugins/{name}/activate` with `{"version"}`: make that version active and
/// move the live rooms to it; the answer says how each room's swap went.
pub async fn activate(
    State(app): State<Arc<Admin>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let named = version_body(&body).and_then(|v| {
        v.ok_or_else(|| "body must name the version: {\"version\": \"x.y.z\"}".to_owned())
    });
    let version = match named {
        Ok(v) => v,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if let Some(refusal) = cluster_unwritable(&app) {
        return refusal;
    }
    activated(&app, app.registry.activate(&app.hub, &name, &version).await).await
}

/// `POST /api/plugins/{name}/rollback`, optionally with `{"version"}`: go back to that
/// version, or to the one active before the current.
pub async fn rollback(
    State(app): State<Arc<Admin>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let version = match version_body(&body) {
        Ok(v) => v,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if let Some(refusal) = cluster_unwritable(&app) {
        return refusal;
    }
    let rolled_back = app
        .registry
        .rollback(&app.hub, &name, version.as_deref())
        .await;
    activated(&app, rolled_back).await
}

/// `DELETE /api/plugins/{name}`: remove a plugin with every version (refused while it has
/// live rooms).
pub async fn delete_plugin(State(app): State<Arc<Admin>>, Path(name): Path<String>) -> Response {
    if let Some(refusal) = cluster_unwritable(&app) {
        return refusal;
    }
    match app.registry.delete_plugin(&app.hub, &name).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => refused(e),
    }
}

/// `DELETE /api/plugins/{name}/versions/{version}`: remove a stored version (never the
/// active one).
pub async fn delete_version(
    State(app): State<Arc<Admin>>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    if let Some(refusal) = cluster_unwritable(&app) {
        return refusal;
    }
    match app.registry.delete_version(&name, &version).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => refused(e),
    }
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
