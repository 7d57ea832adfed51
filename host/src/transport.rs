//! The WebSocket transport: the upgrade at `<mount>/websocket` with connect-time
//! authentication, and one task per socket that reads frames into its [`Session`] and writes
//! the frames the session encodes; it answers nothing itself but enforces the idle timeout,
//! the frame size and the slow-client cut-off, and closes cleanly (queued frames, the close
//! frame, the client's answer).
//!
//! tungstenite reads the socket and writes its control frames (pongs, the close frame),
//! never in the middle of a batch. Data frames are framed here, straight from the encoded
//! message into the socket's write buffer: a broadcast's frame, shared by every member, is
//! copied once per member rather than handed to tungstenite as a counted reference per
//! member.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, FrameHeader};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage, Utf8Bytes};

use crate::channel::Hub;
use crate::channel::{Next, Outbound, OutboundRx, Session, Slowness, outbound_queue};
use crate::connect::{Admission, Peer, Refusal};
use crate::limit::{RateLimit, SharedBucket, Slot};
use crate::metrics::{Metrics, Transport};
use crate::protocol::{self, Frame, Vsn, close};
use crate::stats::Stats;

/// What the sockets of a node share: the hub, the rules a connect passes, the shutdown
/// signal, how many are open, and how often a closed socket is logged.
pub struct Sockets {
    hub: Arc<Hub>,
    admission: Admission,
    shutdown: tokio::sync::watch::Receiver<bool>,
    live: AtomicUsize,
    closes_logged: SharedBucket,
}

/// Sockets closed for a broken frame logged per second at most (the rest are counted in
/// `malformed_frames` and `oversized_frames`).
const CLOSES_LOGGED_PER_SEC: u32 = 5;

impl Sockets {
    /// Sockets joining `hub`'s rooms, admitted by `admission`, closed with 1012 once
    /// `shutdown` turns true.
    pub fn new(
        hub: Arc<Hub>,
        admission: Admission,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Sockets {
            hub,
            admission,
            shutdown,
            live: AtomicUsize::new(0),
            closes_logged: SharedBucket::per_sec(CLOSES_LOGGED_PER_SEC),
        }
    }

    /// Open WebSockets.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// The hub the sockets join rooms of.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The rules a connect passes.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// The shutdown signal.
    pub fn shutdown(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Logs that a client was cut off for what it sent (`why`), at most
    /// [`CLOSES_LOGGED_PER_SEC`] a second: a client that reconnects and breaks again in a
    /// loop must not flood the log.
    pub fn log_refused_input(&self, peer: Option<Peer>, why: &str) {
        if self.closes_logged.take() {
            let peer = peer.map(|p| p.0.to_string()).unwrap_or_default();
            tracing::warn!(%peer, reason = why, "client cut off for what it sent (logged at most {CLOSES_LOGGED_PER_SEC}/s)");
        }
    }

    /// A refused connect: counted, logged at debug, answered with its status and reason.
    pub fn refused(&self, refusal: &Refusal) {
        match refusal {
            Refusal::TooOften(_) => Stats::bump(&self.hub.stats().connects_throttled),
            _ => Stats::bump(&self.hub.stats().connects_refused),
        }
        tracing::debug!(error = %refusal, "connect refused");
    }
}

/// The answer to a refused WebSocket connect: its status, the reason, and when a client
/// connecting too often may try again.
fn refusal_response(app: &Sockets, refusal: &Refusal) -> Response {
    app.refused(refusal);
    let mut response = (refusal.status(), refusal.to_string()).into_response();
    if let Refusal::TooOften(secs) = refusal {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
    }
    response
}

/// An upgraded connection.
type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// The WebSocket version this server speaks (RFC 6455).
const WEBSOCKET_VERSION: &str = "13";
/// The `Upgrade` header's token for WebSocket.
const UPGRADE_WEBSOCKET: &str = "websocket";
/// The `Connection` header's token for an upgrade.
const CONNECTION_UPGRADE: &str = "upgrade";

/// Read buffer per socket. tungstenite's default (128 KiB) would dominate an idle socket's
/// memory; 1 KiB holds several typical frames per read (measured: 13.6 KiB per idle socket
/// with 4 KiB and the old queue, 6.7 KiB now), and a larger frame just takes more reads.
const READ_BUFFER: usize = 1 << 10;
/// Items written per batch when the queue has several ready.
const WRITE_BATCH: usize = 64;
/// Frames of one batch are gathered up to this many bytes before a write, so a batch costs
/// one syscall rather than one per frame (fan-out of 10k x 100 measured 2.6x faster than
/// with eager writes). The buffer grows only as far as it is used: an idle socket pays for
/// the largest batch it was ever sent, not for this size.
const WRITE_BUFFER: usize = 16 << 10;
/// How long a closing socket may take to write what was queued for it, its close frame,
/// and to hear the client's answer.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Bytes a socket closed for a broken frame reads and drops while the client finishes
/// sending it, so the close frame reaches the client (a close with unread input resets
/// the connection, and the client sees 1006 instead of the code).
const CLOSE_DRAIN_BYTES: u64 = 128 << 20;

/// `GET <mount>/websocket`: authenticate, then upgrade.
pub async fn websocket(
    State(app): State<Arc<Sockets>>,
    Query(params): Query<HashMap<String, String>>,
    slot: Option<axum::Extension<Slot>>,
    peer: Option<axum::Extension<Peer>>,
    mut request: Request,
) -> Response {
    let key = match upgrade_key(&request) {
        Ok(key) => key,
        Err((status, why)) => return (status, why).into_response(),
    };
    let headers = request.headers();
    if let Err(refusal) = app.admission.check_origin(headers) {
        return refusal_response(&app, &refusal);
    }
    let token = params
        .get(protocol::TOKEN_PARAM)
        .cloned()
        .or_else(|| subprotocol_token(headers));
    let peer = peer.map(|p| p.0);
    let (vsn, identity) =
        match app
            .admission
            .admit(&params, token.as_deref(), peer.map(|p| p.0.ip()))
        {
            Ok(admitted) => admitted,
            Err(refusal) => return refusal_response(&app, &refusal),
        };
    let offers_phoenix = offered_protocols(headers).any(|p| p == protocol::SUBPROTOCOL);
    let limits = app.hub.limits();
    // tungstenite writes only control frames, each at once: data frames have their own
    // buffer (`Outgoing`).
    let config = WebSocketConfig::default()
        .max_message_size(Some(limits.max_frame_bytes))
        .max_frame_size(Some(limits.max_frame_bytes))
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0);
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                // The socket holds its connection's slot until it closes.
                let _slot = slot;
                let io = TokioIo::new(upgraded);
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                run(ws, app, vsn, identity, peer).await;
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        header::CONNECTION,
        HeaderValue::from_static(CONNECTION_UPGRADE),
    );
    headers.insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_WEBSOCKET));
    if let Ok(accept) = HeaderValue::try_from(derive_accept_key(key.as_bytes())) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    if offers_phoenix {
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol::SUBPROTOCOL),
        );
    }
    response
}

/// The `Sec-WebSocket-Key` of a valid WebSocket upgrade request (RFC 6455, 4.2.1), or why
/// the request is not one.
fn upgrade_key(request: &Request) -> Result<HeaderValue, (StatusCode, &'static str)> {
    let headers = request.headers();
    let has = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case(token))
    };
    if request.method() != Method::GET {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            "a WebSocket upgrade is a GET",
        ));
    }
    if !has(header::CONNECTION, CONNECTION_UPGRADE) || !has(header::UPGRADE, UPGRADE_WEBSOCKET) {
        return Err((
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade (Connection: upgrade, Upgrade: websocket)",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(WEBSOCKET_VERSION.as_bytes())
    {
        return Err((StatusCode::BAD_REQUEST, "Sec-WebSocket-Version must be 13"));
    }
    if request
        .extensions()
        .get::<hyper::upgrade::OnUpgrade>()
        .is_none()
    {
        return Err((
            StatusCode::UPGRADE_REQUIRED,
            "this connection cannot be upgraded",
        ));
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .cloned()
        .ok_or((StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is missing"))
}

/// The subprotocols a client offers in `Sec-WebSocket-Protocol`.
fn offered_protocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// The token carried as `base64url.bearer.phx.<base64 token>` in `Sec-WebSocket-Protocol`.
fn subprotocol_token(headers: &HeaderMap) -> Option<String> {
    let encoded = offered_protocols(headers)
        .find_map(|p| p.strip_prefix(protocol::AUTH_SUBPROTOCOL_PREFIX))?;
    let engines = [
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    engines
        .iter()
        .find_map(|e| e.decode(encoded.trim_end_matches('=')).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
}

fn close(code: u16, reason: &str) -> Option<CloseFrame> {
    // A close reason is at most 123 bytes.
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    Some(CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from(&reason[..cut]),
    })
}

/// Data frames on their way to the socket, in WebSocket framing, and how much of them
/// the socket has taken. What a cancelled write left is still here, to go out before a
/// close frame.
#[derive(Default)]
struct Outgoing {
    buf: Vec<u8>,
    sent: usize,
    /// Frames put since the last count.
    frames: u64,
}

impl Outgoing {
    /// Appends one frame (a server's frames are not masked: the same bytes for everyone).
    fn put(&mut self, frame: &Frame) {
        let (data, payload) = match frame {
            Frame::Text(text) => (Data::Text, text.as_bytes()),
            Frame::Binary(bytes) => (Data::Binary, &bytes[..]),
        };
        let header = FrameHeader {
            opcode: OpCode::Data(data),
            ..FrameHeader::default()
        };
        // Writing into a Vec does not fail.
        let _ = header.format(payload.len() as u64, &mut self.buf);
        self.buf.extend_from_slice(payload);
        self.frames += 1;
    }

    /// Writes what is gathered; safe to cancel (the next call goes on where it stopped).
    async fn write(&mut self, ws: &mut Ws, metrics: &Metrics) -> io::Result<()> {
        use futures_util::SinkExt as _;
        // A control frame tungstenite could not finish (a pong to a client's ping, with the
        // socket's send buffer full) goes first: these frames must not land inside it.
        ws.flush().await.map_err(io::Error::other)?;
        let io = ws.get_mut();
        while self.sent < self.buf.len() {
            match io.write(&self.buf[self.sent..]).await? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => self.sent += n,
            }
        }
        self.sent = 0;
        // Counted once per write, not per frame (framing included in the bytes).
        if self.frames > 0 {
            metrics.deliveries_out.add(std::mem::take(&mut self.frames));
            metrics.bytes_out.add(self.buf.len() as u64);
        }
        if self.buf.capacity() > 2 * WRITE_BUFFER {
            // A large frame's memory goes back once it is written.
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        io.flush().await
    }
}

/// Writes what is ready, up to [`WRITE_BATCH`] items, a write per [`WRITE_BUFFER`] bytes
/// gathered. Returns whether a `disconnect` for this socket came up.
async fn write_batch(
    ws: &mut Ws,
    out: &mut Outgoing,
    session: &mut Session,
    rx: &mut OutboundRx,
    metrics: &Metrics,
) -> io::Result<bool> {
    for _ in 0..WRITE_BATCH {
        match session.next_ready(rx) {
            None => break,
            Some(Next::Broadcast(frame)) => out.put(frame),
            Some(Next::Queued(Outbound::Disconnect)) => {
                out.write(ws, metrics).await?;
                return Ok(true);
            }
            Some(Next::Queued(item)) => {
                if let Some(frame) = session.encode(item) {
                    out.put(&frame);
                }
            }
        }
        if out.buf.len() >= WRITE_BUFFER {
            out.write(ws, metrics).await?;
        }
    }
    out.write(ws, metrics).await.map(|()| false)
}

/// Resolves once the server is shutting down.
async fn stopping(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    // An error means the sender is gone: the server is gone too.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn too_slow(app: &Sockets) -> End {
    Stats::bump(&app.hub.stats().slow_disconnects);
    tracing::info!(
        limit = app.hub.limits().outbound_queue_bytes,
        "slow client disconnected: outbound queue full"
    );
    End::close(close::POLICY, close::TOO_SLOW)
}

/// How a socket's loop ended.
enum End {
    /// The server closes the socket with this frame.
    Close(CloseFrame),
    /// A frame could not be read (over the size limit, broken): the server closes with
    /// this frame, and drops what the client still sends.
    ReadFailed(CloseFrame),
    /// The client sent its close frame (tungstenite answers it with the same code).
    ClientClosed,
    /// The connection is gone.
    Gone,
}

impl End {
    fn close(code: u16, reason: &str) -> End {
        close(code, reason).map_or(End::Gone, End::Close)
    }
}

/// The end for a failed read: the client broke a limit or the WebSocket protocol.
fn read_failure(e: WsError, app: &Sockets, peer: Option<Peer>) -> End {
    let limits = app.hub.limits();
    let frame = match e {
        WsError::Capacity(_) => {
            Stats::bump(&app.hub.stats().oversized_frames);
            close(
                close::TOO_BIG,
                &format!("frame over {} bytes", limits.max_frame_bytes),
            )
        }
        WsError::Utf8(_) => {
            Stats::bump(&app.hub.stats().malformed_frames);
            close(close::INVALID_DATA, close::NOT_UTF8)
        }
        WsError::Protocol(p) => close(close::PROTOCOL_ERROR, &p.to_string()),
        other => {
            tracing::debug!(error = %other, "websocket read failed");
            None
        }
    };
    if let Some(frame) = &frame {
        app.log_refused_input(peer, &frame.reason);
    }
    frame.map_or(End::Gone, End::ReadFailed)
}

struct LiveGuard(Arc<Sockets>);
impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn run(
    mut ws: Ws,
    app: Arc<Sockets>,
    vsn: Vsn,
    identity: crate::auth::Identity,
    peer: Option<Peer>,
) {
    use futures_util::{SinkExt as _, StreamExt as _};
    app.live.fetch_add(1, Ordering::Relaxed);
    let _live = LiveGuard(app.clone());
    let limits = app.hub.limits().clone();
    let (out, mut rx) = outbound_queue(Slowness::from_limits(&limits));
    let mut session = Session::new(
        app.hub.clone(),
        identity.socket_id,
        identity.assigns,
        out,
        vsn,
    );
    let mut outgoing = Outgoing::default();
    let overflow = rx.overflow();
    // Both waits are made once and polled last: a shutdown wait made anew on every turn
    // registers with, and leaves, a lock shared by every socket (the watch's). A socket
    // that is never idle sees both through the lock-free checks at the loop's top.
    let shutdown = app.shutdown.clone();
    let mut shutdown_wait = shutdown.clone();
    let stop = stopping(&mut shutdown_wait);
    tokio::pin!(stop);
    let overflowed = overflow.wait();
    tokio::pin!(overflowed);
    let idle = tokio::time::sleep(limits.idle_timeout());
    tokio::pin!(idle);
    let mut rate = RateLimit::new(limits.messages_per_sec, limits.message_burst);

    let stats = app.hub.stats().clone();
    let metrics = &stats.metrics;
    let _open = metrics.socket_opened(Transport::WebSocket, vsn == Vsn::V2);
    let end = loop {
        if shutdown.has_changed().unwrap_or(true) {
            break End::close(close::RESTART, close::SERVER_RESTART);
        }
        if overflow.happened() {
            break too_slow(&app);
        }
        tokio::select! {
            biased;
            () = session.ready(&mut rx) => {
                // A client that does not read blocks this write; overflow and shutdown
                // must still end it.
                let written = tokio::select! {
                    biased;
                    written = write_batch(&mut ws, &mut outgoing, &mut session, &mut rx, metrics) => written,
                    () = &mut overflowed => break too_slow(&app),
                    () = &mut stop => break End::close(close::RESTART, close::SERVER_RESTART),
                };
                match written {
                    Ok(false) => {}
                    Ok(true) => break End::close(close::GOING_AWAY, close::DISCONNECTED),
                    Err(_) => break End::Gone,
                }
            }
            incoming = ws.next() => {
                idle.as_mut().reset(Instant::now() + limits.idle_timeout());
                let decoded = match incoming {
                    None => break End::Gone,
                    Some(Ok(WsMessage::Close(_))) => break End::ClientClosed,
                    Some(Err(e)) => break read_failure(e, &app, peer),
                    Some(Ok(WsMessage::Text(text))) => {
                        metrics.messages_in.add(1);
                        metrics.bytes_in.add(text.len() as u64);
                        protocol::decode_text(vsn, &text)
                    }
                    Some(Ok(WsMessage::Binary(data))) => {
                        metrics.messages_in.add(1);
                        metrics.bytes_in.add(data.len() as u64);
                        protocol::decode_binary(vsn, &data)
                    }
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {
                        continue;
                    }
                };
                match decoded {
                    Ok(msg) if rate.allow() => session.handle(msg).await,
                    Ok(msg) => {
                        Stats::bump(&stats.rate_limited);
                        if rate.exhausted() {
                            break End::close(close::POLICY, close::RATE_LIMIT);
                        }
                        session.refuse(&msg, protocol::reason::RATE_LIMITED);
                    }
                    Err(e) => {
                        Stats::bump(&stats.malformed_frames);
                        let why = e.to_string();
                        app.log_refused_input(peer, &why);
                        break End::close(close::INVALID_DATA, &why);
                    }
                }
            }
            () = &mut overflowed => break too_slow(&app),
            () = &mut stop => break End::close(close::RESTART, close::SERVER_RESTART),
            () = &mut idle => {
                Stats::bump(&stats.idle_timeouts);
                break End::close(close::GOING_AWAY, close::IDLE_TIMEOUT);
            }
        }
    };
    let slow = overflow.happened();
    let closing = async {
        // What was queued for the client goes out before the close frame (a slow client
        // would not read it: only what a cut-off batch left goes), then the close frame,
        // then the client's answer is awaited, so its TCP connection ends cleanly and the
        // client sees the code rather than 1006.
        let frame = match &end {
            End::Close(frame) | End::ReadFailed(frame) => Some(frame.clone()),
            End::ClientClosed | End::Gone => None,
        };
        if frame.is_some() && !slow {
            while session.next_ready_exists(&mut rx) {
                if !matches!(
                    write_batch(&mut ws, &mut outgoing, &mut session, &mut rx, metrics).await,
                    Ok(false)
                ) {
                    break;
                }
            }
        }
        if outgoing.write(&mut ws, metrics).await.is_err() {
            return;
        }
        let read_failed = matches!(end, End::ReadFailed(_));
        match frame {
            Some(frame) => {
                if ws.send(WsMessage::Close(Some(frame))).await.is_err() {
                    return;
                }
                if read_failed {
                    // tungstenite cannot read past a broken frame: the rest of the client's
                    // input is read and dropped until it closes.
                    let mut rest = tokio::io::AsyncReadExt::take(ws.get_mut(), CLOSE_DRAIN_BYTES);
                    let _ = tokio::io::copy(&mut rest, &mut tokio::io::sink()).await;
                } else {
                    while let Some(Ok(_)) = ws.next().await {}
                }
            }
            // tungstenite queued the answer to the client's close frame: it goes now.
            None if matches!(end, End::ClientClosed) => {
                let _ = ws.flush().await;
            }
            None => {}
        }
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, closing).await;
    session.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn reads_the_token_from_the_subprotocol_header() {
        let mut headers = HeaderMap::new();
        // btoa("abc.def") without padding, as the JS client sends it.
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("phoenix, base64url.bearer.phx.YWJjLmRlZg"),
        );
        assert_eq!(subprotocol_token(&headers).as_deref(), Some("abc.def"));
        headers.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("phoenix"),
        );
        assert_eq!(subprotocol_token(&headers), None);
    }

    #[test]
    fn frames_put_together_read_back_as_the_same_messages() {
        use tokio_tungstenite::tungstenite::WebSocket;
        // Each length encoding: 7 bits, 16 bits, 64 bits.
        let sizes = [0, 125, 126, 65_535, 65_536];
        let mut out = Outgoing::default();
        for n in sizes {
            out.put(&Frame::Text("x".repeat(n).into()));
            out.put(&Frame::Binary(vec![7; n].into()));
        }
        let mut client =
            WebSocket::from_raw_socket(std::io::Cursor::new(out.buf), Role::Client, None);
        for n in sizes {
            let text = client.read().expect("a text frame");
            assert_eq!(text, WsMessage::text("x".repeat(n)));
            let binary = client.read().expect("a binary frame");
            assert_eq!(binary, WsMessage::binary(vec![7; n]));
        }
    }

    #[test]
    fn close_reasons_fit_the_frame() {
        let long = "é".repeat(100);
        let frame = close(1007, &long).expect("frame");
        assert!(frame.reason.len() <= 123);
    }
}
