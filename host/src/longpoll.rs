//! The LongPoll transport (`<mount>/longpoll`), as Phoenix's `Phoenix.Transports.LongPoll`
//! and the official client speak it: the sessions of this node, one task each holding a
//! [`Session`] (the same channel rules, limits and serializers as a WebSocket), the signed
//! session tokens, the HTTP endpoint (polls, batches of messages, CORS), and the requests
//! that reach a session on another node of the cluster.
//!
//! A first `GET` with a connect token opens a session and is answered 410 with the
//! session's token; each `GET` with it then waits up to `longpoll_window_ms` for what the
//! session has to say (200 with the messages, or 204); a `POST` hands the session a batch
//! of messages and is answered once they are handled. A session nobody polled for one and
//! a half windows ends, as does one whose client broke a limit; its next request is
//! answered 410, and the client connects anew and rejoins.
//!
//! On a cluster a request may land on any node, as Phoenix allows through its PubSub: the
//! token names the node that holds the session, and a request for another node's session
//! goes to it on its channel `cinder:lp:<node>`; that node answers at once that it holds
//! the session (or that it does not: 410), then with the answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::channel::{Next, Outbound, OutboundRx, Session, Slowness, outbound_queue};
use crate::cluster::Link;
use crate::connect::{Peer, Refusal};
use crate::limit::{RateLimit, Slot, Slots};
use crate::metrics::Transport;
use crate::protocol::{self, Text, Vsn, close, longpoll};
use crate::stats::Stats;
use crate::transport::Sockets;

/// The channel of a node's LongPoll requests and answers.
const CHANNEL_PREFIX: &str = "cinder:lp:";
/// How long a node asked for one of its sessions may take to say it holds it (Phoenix's
/// `pubsub_timeout_ms`); past it the session counts as gone.
const PUBSUB_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages in one answer at most; the rest wait for the next poll.
const ANSWER_MESSAGES: usize = 1000;
/// Bytes of messages in one answer at most (one message may pass it alone).
const ANSWER_BYTES: usize = 1 << 20;
/// Requests waiting for a session at once; past it a request is answered as if the
/// session were busy (`UNAVAILABLE`).
const SESSION_QUEUE: usize = 8;

/// A session's id: random, and only ever shown signed.
type Sid = [u8; 16];

/// What a request asks of a session.
#[derive(Debug, Serialize, Deserialize)]
enum Ask {
    /// Messages, waiting up to the window for some.
    Poll,
    /// Handle a batch (the POST body and whether it is ndjson).
    Post { body: String, ndjson: bool },
}

/// A session's answer.
#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    /// The node holds the session: the answer follows (across nodes only).
    Held,
    /// Messages (200).
    Messages(Vec<String>),
    /// Nothing within the window (204).
    Empty,
    /// The batch was handled (200).
    Posted,
    /// The batch broke a limit: the status and why; the session ended.
    Refused(u16, String),
    /// No such session (410).
    Gone,
    /// The session is busy with as many requests as it takes.
    Busy,
}

/// What nodes send each other on their LongPoll channels.
#[derive(Debug, Serialize, Deserialize)]
enum Wire {
    /// A request for session `sid`, from node `from`, numbered `req` there.
    Ask {
        req: u64,
        from: String,
        sid: Sid,
        ask: Ask,
    },
    /// The answer to request `req` of the receiving node, for session `sid`.
    Answer { req: u64, sid: Sid, answer: Answer },
}

/// Where a session's answer goes.
enum Reply {
    /// A request on this node.
    Local(oneshot::Sender<Answer>),
    /// A request for session `sid` on node `node`, numbered `req` there.
    Remote { node: Arc<str>, req: u64, sid: Sid },
}

/// A request for a session.
struct Cmd {
    ask: Ask,
    reply: Reply,
}

/// The LongPoll sessions of this node, and the requests it forwarded to other nodes.
pub struct LongPolls {
    sockets: Arc<Sockets>,
    slots: Arc<Slots>,
    /// This node's id (on one node, a random one no other node knows).
    node: Arc<str>,
    link: Option<Arc<Link>>,
    /// The key session tokens are signed with (derived from the connect secret, so that
    /// every node of a cluster verifies every node's tokens).
    key: Vec<u8>,
    sessions: Mutex<HashMap<Sid, mpsc::Sender<Cmd>>>,
    /// Requests forwarded to other nodes, by number: the session asked and where its
    /// answers go.
    asked: Mutex<HashMap<u64, (Sid, mpsc::Sender<Answer>)>>,
    next_req: AtomicU64,
    live: AtomicUsize,
}

impl LongPolls {
    /// The LongPoll sessions of a node whose WebSocket sockets are `sockets`, holding a
    /// connection slot each, signing tokens with a key derived from `jwt_secret`; on a
    /// cluster (`link`), reachable from every node.
    pub fn start(
        sockets: Arc<Sockets>,
        slots: Arc<Slots>,
        jwt_secret: &str,
        link: Option<Arc<Link>>,
    ) -> Arc<LongPolls> {
        use sha2::Digest as _;
        let node: Arc<str> = match &link {
            Some(link) => link.node().clone(),
            None => hex(&rand::random::<[u8; 8]>()).into(),
        };
        let key = Sha256::new()
            .chain_update(b"cinder longpoll session v1\0")
            .chain_update(jwt_secret.as_bytes())
            .finalize()
            .to_vec();
        let polls = Arc::new(LongPolls {
            sockets,
            slots,
            node,
            link: link.clone(),
            key,
            sessions: Mutex::default(),
            asked: Mutex::default(),
            // A random start: a node that restarts under the same id does not take the
            // answers meant for the requests of its previous run.
            next_req: AtomicU64::new(rand::random::<u64>() >> 1),
            live: AtomicUsize::new(0),
        });
        if let Some(link) = link {
            let messages = link.tap(&format!("{CHANNEL_PREFIX}{}", polls.node));
            tokio::spawn(hear(Arc::downgrade(&polls), messages));
        }
        polls
    }

    /// Live sessions on this node.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    fn sign(&self, node: &str, sid: &Sid) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mac = self.mac(node, sid).finalize().into_bytes();
        format!(
            "{}.{}.{}",
            b64.encode(node),
            b64.encode(sid),
            b64.encode(mac)
        )
    }

    /// The MAC of a session token, before it is finalized or verified.
    fn mac(&self, node: &str, sid: &Sid) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC keys may have any length"));
        mac.update(node.as_bytes());
        mac.update(b"\0");
        mac.update(sid);
        mac
    }

    /// The node and session a token names, if this cluster signed it.
    fn verify(&self, token: &str) -> Option<(String, Sid)> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        if token.len() > 512 {
            return None;
        }
        let mut parts = token.split('.');
        let (node, sid, mac) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let node = String::from_utf8(b64.decode(node).ok()?).ok()?;
        let sid: Sid = b64.decode(sid).ok()?.try_into().ok()?;
        // Compared in constant time.
        self.mac(&node, &sid)
            .verify_slice(&b64.decode(mac).ok()?)
            .ok()?;
        Some((node, sid))
    }

    /// Hands `ask` to session `sid` of this node; answers `Gone` when there is none.
    fn ask_here(&self, sid: &Sid, ask: Ask, reply: Reply) {
        let session = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sid)
            .cloned();
        let Some(session) = session else {
            self.answer(reply, Answer::Gone);
            return;
        };
        if let Err(e) = session.try_send(Cmd { ask, reply }) {
            let (answer, cmd) = match e {
                mpsc::error::TrySendError::Full(cmd) => (Answer::Busy, cmd),
                mpsc::error::TrySendError::Closed(cmd) => (Answer::Gone, cmd),
            };
            self.answer(cmd.reply, answer);
        }
    }

    /// Sends `answer` where it goes; returns it when a request of this node is no longer
    /// waiting for it.
    fn answer(&self, reply: Reply, answer: Answer) -> Option<Answer> {
        match reply {
            Reply::Local(tx) => tx.send(answer).err(),
            Reply::Remote { node, req, sid } => {
                self.send(&node, &Wire::Answer { req, sid, answer });
                None
            }
        }
    }

    fn send(&self, node: &str, wire: &Wire) {
        if let (Some(link), Ok(data)) = (&self.link, serde_json::to_vec(wire)) {
            link.publish(format!("{CHANNEL_PREFIX}{node}"), data);
        }
    }

    /// Asks session `sid` of `node` (this one or another) and waits for its answer:
    /// `Gone` when nobody holds it, `Busy` when it holds it but did not answer in time (the
    /// client retries; the session lives on).
    async fn ask(&self, node: &str, sid: Sid, ask: Ask) -> Answer {
        let wait = self.sockets.hub().limits().longpoll_window() + PUBSUB_TIMEOUT;
        if node == &*self.node {
            let (tx, rx) = oneshot::channel();
            self.ask_here(&sid, ask, Reply::Local(tx));
            return match tokio::time::timeout(wait, rx).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Answer::Gone,
                Err(_) => Answer::Busy,
            };
        }
        if self.link.is_none() {
            return Answer::Gone;
        }
        Stats::bump(&self.sockets.hub().stats().longpoll_forwarded);
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::channel(2);
        self.asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req, (sid, tx));
        // Forgotten however the request ends, its client gone included.
        let _forget = Forget { polls: self, req };
        let from = self.node.to_string();
        self.send(
            node,
            &Wire::Ask {
                req,
                from,
                sid,
                ask,
            },
        );
        match tokio::time::timeout(PUBSUB_TIMEOUT, rx.recv()).await {
            Ok(Some(Answer::Held)) => {}
            Ok(Some(answer)) => return answer,
            _ => return Answer::Gone,
        }
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(answer)) => answer,
            Ok(None) => Answer::Gone,
            Err(_) => Answer::Busy,
        }
    }

    /// A message on this node's channel.
    fn heard(&self, data: &[u8]) {
        match serde_json::from_slice::<Wire>(data) {
            Ok(Wire::Ask {
                req,
                from,
                sid,
                ask,
            }) => {
                let node: Arc<str> = from.into();
                let held = self
                    .sessions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&sid);
                if held {
                    self.send(
                        &node,
                        &Wire::Answer {
                            req,
                            sid,
                            answer: Answer::Held,
                        },
                    );
                }
                self.ask_here(&sid, ask, Reply::Remote { node, req, sid });
            }
            Ok(Wire::Answer { req, sid, answer }) => {
                let asked = self
                    .asked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&req)
                    .filter(|(asked, _)| *asked == sid)
                    .map(|(_, tx)| tx.clone());
                if let Some(asked) = asked {
                    let _ = asked.try_send(answer);
                }
            }
            Err(_) => Stats::bump(&self.sockets.hub().stats().cluster_malformed),
        }
    }

    /// Opens a session for a client admitted with `vsn` and `identity`, holding `slot`;
    /// returns its token.
    fn open(
        self: &Arc<Self>,
        vsn: Vsn,
        identity: crate::auth::Identity,
        slot: Slot,
        peer: Option<Peer>,
    ) -> String {
        let sid: Sid = rand::random();
        let (tx, cmds) = mpsc::channel(SESSION_QUEUE);
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sid, tx);
        let hub = self.sockets.hub().clone();
        let (out, rx) = outbound_queue(Slowness::from_limits(hub.limits()));
        let session = Session::new(hub, identity.socket_id, identity.assigns, out, vsn).text_only();
        let stats = self.sockets.hub().stats();
        Stats::bump(&stats.longpoll_sessions_started);
        let open = stats
            .metrics
            .socket_opened(Transport::LongPoll, vsn == Vsn::V2);
        self.live.fetch_add(1, Ordering::Relaxed);
        let polls = self.clone();
        tokio::spawn(async move {
            let run = Run {
                polls: &polls,
                vsn,
                peer,
                session,
                rx,
                carried: Vec::new(),
            };
            let mut cmds = run.serve(cmds).await;
            // Requests that came while it ended are told it is gone, not left to time out.
            cmds.close();
            while let Ok(cmd) = cmds.try_recv() {
                polls.answer(cmd.reply, Answer::Gone);
            }
            polls
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&sid);
            polls.live.fetch_sub(1, Ordering::Relaxed);
            drop((open, slot));
        });
        self.sign(&self.node, &sid)
    }
}

/// Removes a forwarded request from [`LongPolls::asked`] when it is dropped.
struct Forget<'a> {
    polls: &'a LongPolls,
    req: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.polls
            .asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.req);
    }
}

/// Hears this node's LongPoll channel until the node is gone.
async fn hear(polls: std::sync::Weak<LongPolls>, mut messages: mpsc::UnboundedReceiver<Vec<u8>>) {
    while let Some(data) = messages.recv().await {
        let Some(polls) = polls.upgrade() else { return };
        polls.heard(&data);
    }
}

/// Lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How a session ended.
enum End {
    /// Its client broke a limit or sent what cannot be read: why.
    Refused(String),
    /// Nobody polled it for one and a half windows.
    Expired,
    /// Too slow, disconnected, or the server stops.
    Closed,
}

/// One session's task: what it holds.
struct Run<'a> {
    polls: &'a Arc<LongPolls>,
    vsn: Vsn,
    peer: Option<Peer>,
    session: Session,
    rx: OutboundRx,
    /// Messages taken for a poll that went away before it got them: the next poll's.
    carried: Vec<Text>,
}

impl Run<'_> {
    /// Serves the session until it ends; hands back its queue of requests.
    async fn serve(mut self, mut cmds: mpsc::Receiver<Cmd>) -> mpsc::Receiver<Cmd> {
        let hub = self.polls.sockets.hub().clone();
        let limits = hub.limits().clone();
        let window = limits.longpoll_window();
        let mut rate = RateLimit::new(limits.messages_per_sec, limits.message_burst);
        let overflow = self.rx.overflow();
        let overflowed = overflow.wait();
        tokio::pin!(overflowed);
        let mut shutdown = self.polls.sockets.shutdown();
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
        };
        tokio::pin!(stop);
        // The poll waiting for messages, and when it is answered empty.
        let mut waiting: Option<(Reply, Instant)> = None;
        let mut last_poll = Instant::now();
        let mut disconnected = false;
        let end = loop {
            if disconnected {
                break End::Closed;
            }
            let expires = last_poll + window.mul_f32(1.5);
            let has_waiter = waiting.is_some();
            let answer_at = waiting.as_ref().map_or(expires, |(_, at)| *at);
            tokio::select! {
                biased;
                cmd = cmds.recv() => {
                    let Some(Cmd { ask, reply }) = cmd else { break End::Closed };
                    match ask {
                        Ask::Poll => {
                            last_poll = Instant::now();
                            if let Some((old, _)) = waiting.take() {
                                self.polls.answer(old, Answer::Empty);
                            }
                            let (messages, disconnect) = self.take();
                            disconnected = disconnect;
                            if messages.is_empty() && !disconnect {
                                waiting = Some((reply, last_poll + window));
                            } else {
                                self.give(reply, messages);
                            }
                        }
                        Ask::Post { body, ndjson } => {
                            match self.handle(&body, ndjson, &mut rate).await {
                                Ok(()) => {
                                    self.polls.answer(reply, Answer::Posted);
                                }
                                Err((status, why)) => {
                                    self.polls.answer(reply, Answer::Refused(status, why.clone()));
                                    break End::Refused(why);
                                }
                            }
                        }
                    }
                }
                () = self.session.ready(&mut self.rx), if has_waiter => {
                    let (messages, disconnect) = self.take();
                    disconnected = disconnect;
                    if let Some((reply, _)) = waiting.take() {
                        self.give(reply, messages);
                    }
                }
                () = tokio::time::sleep_until(answer_at) => {
                    match waiting.take() {
                        Some((reply, _)) => {
                            self.polls.answer(reply, Answer::Empty);
                        }
                        None => break End::Expired,
                    }
                }
                () = &mut overflowed => {
                    Stats::bump(&hub.stats().slow_disconnects);
                    break End::Closed;
                }
                () = &mut stop => break End::Closed,
            }
        };
        // A poll still waiting gets what is left, then the session is gone.
        if let Some((reply, _)) = waiting.take() {
            let (messages, _) = self.take();
            self.give(reply, messages);
        }
        match &end {
            End::Expired => Stats::bump(&hub.stats().longpoll_sessions_expired),
            End::Refused(why) => self.polls.sockets.log_refused_input(self.peer, why),
            End::Closed => {}
        }
        self.session.close().await;
        cmds
    }

    /// Answers a poll with `messages` (204 when there are none); what a poll that went
    /// away did not take waits for the next.
    fn give(&mut self, reply: Reply, messages: Vec<Text>) {
        let answer = if messages.is_empty() {
            Answer::Empty
        } else {
            Answer::Messages(messages.iter().map(|m| m.as_str().to_owned()).collect())
        };
        if self.polls.answer(reply, answer).is_some() {
            self.carried = messages;
        }
    }

    /// What is ready for the client, up to an answer's size, and whether a `disconnect`
    /// came up (the session then ends).
    fn take(&mut self) -> (Vec<Text>, bool) {
        let mut messages = std::mem::take(&mut self.carried);
        let mut bytes: usize = messages.iter().map(Text::len).sum();
        while messages.len() < ANSWER_MESSAGES && bytes < ANSWER_BYTES {
            let frame = match self.session.next_ready(&mut self.rx) {
                None => break,
                Some(Next::Broadcast(frame)) => frame.clone(),
                Some(Next::Queued(Outbound::Disconnect)) => return (messages, true),
                Some(Next::Queued(item)) => match self.session.encode(item) {
                    Some(frame) => frame,
                    None => continue,
                },
            };
            match frame {
                protocol::Frame::Text(text) => {
                    bytes += text.len();
                    let metrics = &self.polls.sockets.hub().stats().metrics;
                    metrics.deliveries_out.add(1);
                    metrics.bytes_out.add(text.len() as u64);
                    messages.push(text);
                }
                // No binary frame fits a JSON answer (Phoenix's neither).
                protocol::Frame::Binary(_) => {
                    Stats::bump(&self.polls.sockets.hub().stats().undeliverable);
                }
            }
        }
        (messages, false)
    }

    /// Handles a batch as a WebSocket handles frames: decoded with the session's
    /// serializer, each frame within `max_frame_bytes`, held to the message rate. A batch
    /// that breaks a rule ends the session, with the status and the reason.
    async fn handle(
        &mut self,
        body: &str,
        ndjson: bool,
        rate: &mut RateLimit,
    ) -> Result<(), (u16, String)> {
        let hub = self.polls.sockets.hub().clone();
        let stats = hub.stats().clone();
        let max = hub.limits().max_frame_bytes;
        let lines = longpoll::lines(body, ndjson).map_err(|e| {
            Stats::bump(&stats.malformed_frames);
            (StatusCode::BAD_REQUEST.as_u16(), e.to_string())
        })?;
        for line in lines {
            stats.metrics.messages_in.add(1);
            stats.metrics.bytes_in.add(match &line {
                longpoll::Line::Text(text) => text.len(),
                longpoll::Line::Binary(data) => data.len(),
            } as u64);
            let decoded = match &line {
                longpoll::Line::Text(text) if text.len() <= max => {
                    protocol::decode_text(self.vsn, text)
                }
                longpoll::Line::Binary(data) if data.len() <= max => {
                    protocol::decode_binary(self.vsn, data)
                }
                _ => {
                    Stats::bump(&stats.oversized_frames);
                    return Err((
                        StatusCode::PAYLOAD_TOO_LARGE.as_u16(),
                        format!("frame over {max} bytes"),
                    ));
                }
            };
            match decoded {
                Ok(msg) if rate.allow() => self.session.handle(msg).await,
                Ok(msg) => {
                    Stats::bump(&stats.rate_limited);
                    if rate.exhausted() {
                        return Err((
                            StatusCode::TOO_MANY_REQUESTS.as_u16(),
                            close::RATE_LIMIT.to_owned(),
                        ));
                    }
                    self.session.refuse(&msg, protocol::reason::RATE_LIMITED);
                }
                Err(e) => {
                    Stats::bump(&stats.malformed_frames);
                    return Err((StatusCode::BAD_REQUEST.as_u16(), e.to_string()));
                }
            }
        }
        Ok(())
    }
}

/// An answer in LongPoll's shape: HTTP `http` with `{"status": status, ...}` in the body,
/// never cached, readable from any origin (the origin was checked).
fn respond(http: StatusCode, body: String) -> Response {
    let mut response = (http, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    response
}

/// A status-only answer, with a reason for those that need one.
fn status(http: StatusCode, status: u16, reason: Option<&str>) -> Response {
    let mut body = longpoll::answer(status, None, &[]);
    if let Some(reason) = reason {
        body.pop();
        body.push_str(",\"reason\":");
        body.push_str(&serde_json::Value::from(reason).to_string());
        body.push('}');
    }
    respond(http, body)
}

/// A refused connect: 403 for the token, the origin or the serializer (the client stops);
/// 429 (said as `UNAVAILABLE`, which the client retries) for one that connects too often.
fn refused(polls: &LongPolls, refusal: &Refusal) -> Response {
    polls.sockets.refused(refusal);
    let code = match refusal {
        Refusal::TooOften(_) => longpoll::UNAVAILABLE,
        _ => longpoll::FORBIDDEN,
    };
    let mut response = status(refusal.status(), code, Some(&refusal.to_string()));
    if let Refusal::TooOften(secs) = refusal {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
    }
    response
}

/// The session token a request carries: the header, or the `token` parameter of older
/// clients when it is one (the parameter may be the connect token).
fn session_token<'a>(
    polls: &LongPolls,
    headers: &'a HeaderMap,
    params: &'a HashMap<String, String>,
) -> Option<(String, Sid)> {
    let header = headers
        .get(longpoll::SESSION_HEADER)
        .and_then(|v| v.to_str().ok());
    header
        .or(params.get(protocol::TOKEN_PARAM).map(String::as_str))
        .and_then(|token| polls.verify(token))
}

/// `<mount>/longpoll`: preflights, polls (a first one opens the session) and batches.
pub async fn endpoint(
    State(polls): State<Arc<LongPolls>>,
    Query(params): Query<HashMap<String, String>>,
    peer: Option<axum::Extension<Peer>>,
    request: Request,
) -> Response {
    let headers = request.headers().clone();
    if let Err(refusal) = polls.sockets.admission().check_origin(&headers) {
        return refused(&polls, &refusal);
    }
    let peer = peer.map(|p| p.0);
    let session = session_token(&polls, &headers, &params);
    match (request.method().clone(), session) {
        (Method::OPTIONS, _) => preflight(&headers),
        (Method::GET, Some((node, sid))) => {
            let token = polls.sign(&node, &sid);
            match polls.ask(&node, sid, Ask::Poll).await {
                Answer::Messages(messages) => {
                    let messages: Vec<Text> = messages.into_iter().map(Text::from).collect();
                    respond(
                        StatusCode::OK,
                        longpoll::answer(longpoll::OK, Some(&token), &messages),
                    )
                }
                Answer::Empty | Answer::Held | Answer::Posted => respond(
                    StatusCode::OK,
                    longpoll::answer(longpoll::NO_CONTENT, Some(&token), &[]),
                ),
                Answer::Busy => status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    longpoll::UNAVAILABLE,
                    Some("session busy"),
                ),
                Answer::Gone | Answer::Refused(..) => status(StatusCode::OK, longpoll::GONE, None),
            }
        }
        (Method::GET, None) => {
            let token = params
                .get(protocol::TOKEN_PARAM)
                .map(String::as_str)
                .or_else(|| {
                    headers
                        .get(longpoll::AUTH_HEADER)
                        .and_then(|v| v.to_str().ok())
                });
            let (vsn, identity) =
                match polls
                    .sockets
                    .admission()
                    .admit(&params, token, peer.map(|p| p.0.ip()))
                {
                    Ok(admitted) => admitted,
                    Err(refusal) => return refused(&polls, &refusal),
                };
            // A session holds a connection slot of its own while it lives (the request's
            // slot goes with the request).
            let Some(held) = polls.slots.take() else {
                Stats::bump(&polls.sockets.hub().stats().connections_refused);
                return status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    longpoll::UNAVAILABLE,
                    Some("connection cap reached (max_connections): try again later"),
                );
            };
            let token = polls.open(vsn, identity, held, peer);
            respond(
                StatusCode::OK,
                longpoll::answer(longpoll::GONE, Some(&token), &[]),
            )
        }
        (Method::POST, Some((node, sid))) => {
            let ndjson = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case(longpoll::NDJSON));
            let body = match read_body(&polls, request.into_body()).await {
                Ok(body) => body,
                Err((http, why)) => return status(http, http.as_u16(), Some(&why)),
            };
            match polls.ask(&node, sid, Ask::Post { body, ndjson }).await {
                Answer::Posted => status(StatusCode::OK, longpoll::OK, None),
                Answer::Refused(code, why) => status(
                    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST),
                    code,
                    Some(&why),
                ),
                Answer::Busy => status(
                    StatusCode::SERVICE_UNAVAILABLE,
                    longpoll::UNAVAILABLE,
                    Some("session busy"),
                ),
                Answer::Gone | Answer::Held | Answer::Empty | Answer::Messages(_) => {
                    status(StatusCode::OK, longpoll::GONE, None)
                }
            }
        }
        (Method::POST, None) => status(StatusCode::OK, longpoll::GONE, None),
        _ => status(
            StatusCode::BAD_REQUEST,
            StatusCode::BAD_REQUEST.as_u16(),
            Some("LongPoll takes GET, POST and OPTIONS"),
        ),
    }
}

/// A CORS preflight: the headers asked for, the methods LongPoll takes.
fn preflight(headers: &HeaderMap) -> Response {
    let mut response = respond(StatusCode::OK, String::new());
    let out = response.headers_mut();
    out.remove(header::CONTENT_TYPE);
    let asked: Vec<&str> = headers
        .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if let Ok(asked) = HeaderValue::from_str(&asked.join(", ")) {
        out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked);
    }
    out.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(longpoll::ALLOW_METHODS),
    );
    out.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from(longpoll::PREFLIGHT_MAX_AGE),
    );
    response
}

/// A batch's body: UTF-8, within a batch's bytes, arriving within `http_body_timeout_secs`.
async fn read_body(polls: &LongPolls, body: Body) -> Result<String, (StatusCode, String)> {
    let limits = polls.sockets.hub().limits();
    let max = max_batch_bytes(limits.max_frame_bytes);
    let wait = Duration::from_secs(limits.http_body_timeout_secs);
    let bytes = match tokio::time::timeout(wait, axum::body::to_bytes(body, max)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            Stats::bump(&polls.sockets.hub().stats().oversized_frames);
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a batch is at most {max} bytes"),
            ));
        }
        Err(_) => {
            Stats::bump(&polls.sockets.hub().stats().http_timeouts);
            return Err((
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time (http_body_timeout_secs)".into(),
            ));
        }
    };
    String::from_utf8(bytes.to_vec())
        .map_err(|_| (StatusCode::BAD_REQUEST, "the batch is not UTF-8".to_owned()))
}

/// The largest batch: two frames of the largest size (one binary frame in base64 takes a
/// third more). A batch for another node's session crosses Redis whole, beside the
/// cluster's broadcasts, so it stays small.
pub fn max_batch_bytes(max_frame_bytes: usize) -> usize {
    max_frame_bytes.saturating_mul(2)
}
