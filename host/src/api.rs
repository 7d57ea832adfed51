//! The HTTP API: the landing page at `/` and server push (`POST /api/broadcast`), which
//! sends an event to every subscriber of a topic from outside any channel (Phoenix's
//! `Endpoint.broadcast`). Authenticated with the admin bearer token.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::AppState;
use crate::protocol::{self, Payload};
use crate::pubsub::Broadcast;

/// `GET /`: what this server is and where its socket is.
pub async fn index(State(app): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({
        "name": "cinder",
        "version": env!("CARGO_PKG_VERSION"),
        "about": "Phoenix Channels server; channel logic runs in WebAssembly plugins",
        "socket": format!("{}{}", app.mount, protocol::WEBSOCKET_PATH),
        "serializers": ["1.0.0", "2.0.0"],
        "plugins": app.plugin_summary,
    }))
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Compares without an early exit, so timing does not reveal the token.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A 401 unless the request carries `Authorization: Bearer <admin token>`.
fn refusal(app: &AppState, headers: &HeaderMap) -> Option<Response> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(token) if same(token.trim().as_bytes(), app.admin_token.as_bytes()) => None,
        Some(_) => Some(error(StatusCode::UNAUTHORIZED, "wrong admin token")),
        None => Some(error(
            StatusCode::UNAUTHORIZED,
            "missing admin token: send Authorization: Bearer <token>",
        )),
    }
}

/// `GET /api/stats`: open sockets, live rooms and the event counters.
pub async fn stats(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&app, &headers) {
        return refused;
    }
    let sockets = app.live_sockets.load(std::sync::atomic::Ordering::Relaxed);
    Json(app.hub.stats().snapshot(sockets, app.hub.room_count())).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    topic: String,
    event: String,
    payload: Box<RawValue>,
}

/// `POST /api/broadcast` with `{"topic","event","payload"}`: deliver to every subscriber.
pub async fn broadcast(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refusal(&app, &headers) {
        return refused;
    }
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
    let b = Broadcast::new(
        body.topic.into(),
        body.event,
        Payload::Json(body.payload),
        None,
    );
    app.hub.pubsub().publish(Arc::new(b));
    (StatusCode::ACCEPTED, Json(json!({ "status": "ok" }))).into_response()
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
