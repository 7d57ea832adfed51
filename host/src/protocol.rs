//! Phoenix Channels wire protocol: frames in and out for the V1 JSON, V2 JSON and V2 binary
//! serializers, and every reserved topic, event, reason and status string.
//!
//! Pure: no I/O, no tokio, no axum, no wasmtime. Decoding never panics: invalid input of any
//! kind is a [`ProtocolError`]. No other module spells a protocol string; they use the
//! constants and encoders here.

use std::fmt::{self, Write as _};

use bytes::Bytes;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// The topic of socket-level messages (heartbeats).
pub const PHOENIX_TOPIC: &str = "phoenix";
/// The query parameter naming the serializer version.
pub const VSN_PARAM: &str = "vsn";
/// The query parameter carrying the connect token.
pub const TOKEN_PARAM: &str = "token";
/// The WebSocket subprotocol the server answers with when the client offers it.
pub const SUBPROTOCOL: &str = "phoenix";
/// Prefix of the subprotocol that carries the connect token (base64 without padding).
pub const AUTH_SUBPROTOCOL_PREFIX: &str = "base64url.bearer.phx.";
/// Path of the WebSocket transport under the socket mount.
pub const WEBSOCKET_PATH: &str = "/websocket";

/// Reserved event names.
pub mod event {
    /// Client keep-alive on the `phoenix` topic.
    pub const HEARTBEAT: &str = "heartbeat";
    /// Join a topic.
    pub const JOIN: &str = "phx_join";
    /// Leave a topic.
    pub const LEAVE: &str = "phx_leave";
    /// A reply to a client message.
    pub const REPLY: &str = "phx_reply";
    /// The server closed the channel.
    pub const CLOSE: &str = "phx_close";
    /// The channel crashed.
    pub const ERROR: &str = "phx_error";
    /// Broadcast on a socket id topic: close every socket with that id.
    pub const DISCONNECT: &str = "disconnect";

    /// Whether `event` is reserved by the protocol (clients may not send it as a custom
    /// event, the HTTP API may not broadcast it).
    pub fn is_reserved(event: &str) -> bool {
        matches!(event, HEARTBEAT | JOIN | LEAVE | REPLY | CLOSE | ERROR)
    }

    /// Whether a plugin may not use `event` (broadcast, push or intercept it): the
    /// protocol's events and `disconnect`, which only the server's owner may send, to a
    /// socket id.
    pub fn is_reserved_for_plugins(event: &str) -> bool {
        is_reserved(event) || event == DISCONNECT
    }
}

/// Topics a plugin may never serve: the socket-level topic and the socket ids
/// (`user_socket:<user_id>`), as patterns. A plugin pattern that would cover a topic one
/// of these covers is refused.
pub const RESERVED_TOPICS: [&str; 2] = [PHOENIX_TOPIC, SOCKET_ID_PATTERN];

/// The prefix of every socket id: a connect token's `user_id` 42 makes `user_socket:42`.
pub const SOCKET_ID_PREFIX: &str = "user_socket:";

/// Every socket id, as a topic pattern.
const SOCKET_ID_PATTERN: &str = "user_socket:*";

/// How deeply JSON from a client or a plugin may nest (a payload, a reply): the frame
/// around it adds one level, so a whole frame nests at most 127 levels, which a JSON parser
/// with the common limit of 128 (serde_json's, which refuses the 128th level) reads.
pub const MAX_JSON_DEPTH: usize = 126;

/// Whether `json` (valid JSON) nests at most `max` arrays and objects deep.
pub fn nests_within(json: &str, max: usize) -> bool {
    let bytes = json.as_bytes();
    // Most payloads have fewer brackets than the limit in all: one quick count decides.
    if bytes.iter().filter(|b| matches!(b, b'[' | b'{')).count() <= max {
        return true;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// Reasons the server gives in error replies and `phx_error` payloads.
pub mod reason {
    /// A message to a topic without a channel, or a join no plugin serves.
    pub const UNMATCHED_TOPIC: &str = "unmatched topic";
    /// The plugin failed while handling a join.
    pub const JOIN_CRASHED: &str = "join crashed";
    /// The socket already has the maximum number of channels.
    pub const TOO_MANY_CHANNELS: &str = "too many channels joined";
    /// Payload of `phx_error`.
    pub const CHANNEL_CRASH: &str = "channel_crash";
    /// The plugin serving the topic cannot take the join now (no instance could be made).
    pub const PLUGIN_UNAVAILABLE: &str = "plugin unavailable";
    /// The socket sends faster than its rate limit.
    pub const RATE_LIMITED: &str = "rate limited";
    /// This node runs as many rooms as it may; a new room cannot start.
    pub const AT_CAPACITY: &str = "too many rooms";
    /// The node's plugin memory budget is used up; a new room cannot start.
    pub const MEMORY_FULL: &str = "server memory full";
    /// The room did not answer in time (it is busy with messages queued before this one).
    pub const ROOM_BUSY: &str = "room busy";
    /// The room's owner on a cluster cannot be known (Redis is unreachable).
    pub const CLUSTER_UNAVAILABLE: &str = "cluster unavailable";
    /// A binary reply or push to a socket whose serializer (V1) has no binary frames.
    pub const BINARY_NEEDS_V2: &str = "binary payloads need the V2 serializer";
    /// A reply with a binary payload to a LongPoll session, whose answers are JSON text.
    pub const BINARY_NEEDS_WEBSOCKET: &str = "binary payloads need a WebSocket";
    /// A reply the socket's serializer cannot carry for another reason (a topic too long
    /// for a binary frame).
    pub const UNENCODABLE: &str = "reply cannot be encoded for this socket";
    /// Terminate reason: the client left.
    pub const LEFT: &str = "left";
    /// Terminate reason: the socket closed.
    pub const CLOSED: &str = "closed";
    /// Terminate reason: the socket joined the topic again.
    pub const DUPLICATE_JOIN: &str = "duplicate_join";
}

/// How the server closes a socket (RFC 6455 codes, and the reasons its close frames
/// give); never 1000, so the official client reconnects.
pub mod close {
    /// The server is going away: idle timeout, or a `disconnect` broadcast on the socket id.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A frame could not be decoded.
    pub const INVALID_DATA: u16 = 1007;
    /// The client did not read fast enough, or kept sending past its rate limit.
    pub const POLICY: u16 = 1008;
    /// A frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The server restarts: reconnect (to another node).
    pub const RESTART: u16 = 1012;

    /// Reason of a close on shutdown.
    pub const SERVER_RESTART: &str = "server restart";
    /// Reason of a close for a `disconnect` broadcast on the socket's id.
    pub const DISCONNECTED: &str = "disconnected";
    /// Reason of a close for a socket that sent nothing for the idle timeout.
    pub const IDLE_TIMEOUT: &str = "idle timeout";
    /// Reason of a close for a socket that kept sending past its rate limit.
    pub const RATE_LIMIT: &str = "rate limit exceeded";
    /// Reason of a close for a socket that does not read.
    pub const TOO_SLOW: &str = "outbound queue full: client too slow";
    /// Reason of a close for a text frame that is not UTF-8.
    pub const NOT_UTF8: &str = "text frame is not UTF-8";
}

/// Phoenix Presence on the wire: the events, and the shapes of their payloads
/// (`presence_state` `{key: {"metas": [meta, ...]}}`, `presence_diff` `{"joins": {...},
/// "leaves": {...}}`), each meta carrying its `phx_ref` (and, for an update, `phx_ref_prev`).
pub mod presence {
    use super::push_json_str;

    /// Event pushed to a channel with the whole presence of its topic.
    pub const STATE: &str = "presence_state";
    /// Event broadcast to a topic with what joined and left.
    pub const DIFF: &str = "presence_diff";

    /// One meta of an entry.
    pub struct Meta<'a> {
        /// The meta as tracked: a JSON object (checked), without the refs.
        pub meta: &'a str,
        /// The entry's `phx_ref`.
        pub phx_ref: String,
        /// The `phx_ref` of the entry this one replaced (an update).
        pub prev: Option<String>,
    }

    /// Appends `"<key>":{"metas":[...]}`.
    pub fn push_key<'a>(out: &mut String, key: &str, metas: impl Iterator<Item = Meta<'a>>) {
        push_json_str(out, key);
        out.push_str(":{\"metas\":[");
        for (i, meta) in metas.enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_meta(out, &meta);
        }
        out.push_str("]}");
    }

    /// Appends a meta object with its refs added.
    fn push_meta(out: &mut String, meta: &Meta<'_>) {
        // The meta is a checked JSON object: open it and append the refs.
        let body = meta.meta.trim();
        let inner = body
            .strip_prefix('{')
            .and_then(|b| b.strip_suffix('}'))
            .unwrap_or_default()
            .trim();
        out.push('{');
        out.push_str(inner);
        if !inner.is_empty() {
            out.push(',');
        }
        out.push_str("\"phx_ref\":");
        push_json_str(out, &meta.phx_ref);
        if let Some(prev) = &meta.prev {
            out.push_str(",\"phx_ref_prev\":");
            push_json_str(out, prev);
        }
        out.push('}');
    }

    /// The `presence_diff` payload text; `joins` and `leaves` append their key objects.
    pub fn diff(joins: impl FnOnce(&mut String), leaves: impl FnOnce(&mut String)) -> String {
        let mut out = String::from("{\"joins\":");
        joins(&mut out);
        out.push_str(",\"leaves\":");
        leaves(&mut out);
        out.push('}');
        out
    }
}

/// Phoenix's LongPoll transport as the official client speaks it: `GET <mount>/longpoll`
/// polls (a first poll without a session token opens a session and is answered 410 with
/// the token), `POST` sends a batch of messages, one per line. Every answer is HTTP 200
/// with `{"status", "token", "messages"}` in the body; the client reads the status there.
pub mod longpoll {
    use super::{ProtocolError, Text, push_json_str};
    use base64::Engine as _;

    /// Path of the LongPoll transport under the socket mount.
    pub const PATH: &str = "/longpoll";
    /// The header carrying the session token (older clients send it as `token`).
    pub const SESSION_HEADER: &str = "x-phoenix-longpoll-token";
    /// The header carrying the connect token (the client's `authToken` option).
    pub const AUTH_HEADER: &str = "x-phoenix-authtoken";
    /// The content type of a batch: one message per line.
    pub const NDJSON: &str = "application/x-ndjson";
    /// The methods a preflight allows.
    pub const ALLOW_METHODS: &str = "get, post, options";
    /// How long a browser may keep a preflight's answer, in seconds.
    pub const PREFLIGHT_MAX_AGE: u32 = 3600;
    /// Messages of one batch that are read (the client sends at most 100); the lines past
    /// it are ignored, as Phoenix ignores them.
    pub const MAX_BATCH: usize = 100;

    /// Messages in the answer.
    pub const OK: u16 = 200;
    /// No message within the window: poll again.
    pub const NO_CONTENT: u16 = 204;
    /// A new session (its token in the answer), or the session is gone: connect anew.
    pub const GONE: u16 = 410;
    /// The connect is refused (token, origin): the client stops until it reconnects.
    pub const FORBIDDEN: u16 = 403;
    /// Not now (connecting too often, no room for a session): the client retries with
    /// its backoff. The client knows no other status, so 429 and 503 say this one.
    pub const UNAVAILABLE: u16 = 500;

    /// One message of a batch: a text frame (a line opening with `[`, or `{` for V1) or a
    /// binary frame (any other line, base64).
    #[derive(Debug, PartialEq, Eq)]
    pub enum Line<'a> {
        /// JSON text.
        Text(&'a str),
        /// The decoded bytes of a binary frame.
        Binary(Vec<u8>),
    }

    /// The messages of a POST body: one per line of an `application/x-ndjson` batch (the
    /// first [`MAX_BATCH`]), or the whole body as one text message otherwise (older
    /// clients).
    pub fn lines(body: &str, ndjson: bool) -> Result<Vec<Line<'_>>, ProtocolError> {
        if !ndjson {
            return Ok(vec![Line::Text(body)]);
        }
        let body = body.strip_suffix('\n').unwrap_or(body);
        body.split('\n')
            .take(MAX_BATCH)
            .map(|line| {
                let line = line.strip_suffix('\r').unwrap_or(line);
                if line.starts_with(['[', '{']) {
                    Ok(Line::Text(line))
                } else {
                    base64::engine::general_purpose::STANDARD
                        .decode(line)
                        .map(Line::Binary)
                        .map_err(|_| {
                            ProtocolError::Malformed(
                                "a batch line is neither a JSON frame nor base64".into(),
                            )
                        })
                }
            })
            .collect()
    }

    /// The body of an answer: `{"status":..,"token":..,"messages":[..]}`, the token and
    /// messages left out when there are none to give.
    pub fn answer(status: u16, token: Option<&str>, messages: &[Text]) -> String {
        let size: usize = messages.iter().map(|m| m.len() + 8).sum();
        let mut out = String::with_capacity(64 + size);
        out.push_str("{\"status\":");
        out.push_str(&status.to_string());
        if let Some(token) = token {
            out.push_str(",\"token\":");
            push_json_str(&mut out, token);
            out.push_str(",\"messages\":[");
            for (i, message) in messages.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json_str(&mut out, message.as_str());
            }
            out.push(']');
        }
        out.push('}');
        out
    }
}

/// Serializer version chosen by the `vsn` connect parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Vsn {
    /// `1.0.0`: JSON objects, no binary frames.
    V1,
    /// `2.0.0`: JSON arrays and binary frames.
    V2,
}

impl Vsn {
    /// The version named by the `vsn` parameter; missing means `1.0.0`.
    pub fn from_param(vsn: Option<&str>) -> Result<Self, ProtocolError> {
        match vsn {
            None | Some("1.0.0") => Ok(Vsn::V1),
            Some("2.0.0") => Ok(Vsn::V2),
            Some(other) => Err(ProtocolError::UnknownVsn(other.chars().take(32).collect())),
        }
    }

    /// Index for per-serializer caches.
    pub fn index(self) -> usize {
        match self {
            Vsn::V1 => 0,
            Vsn::V2 => 1,
        }
    }
}

/// Why input could not be decoded or output encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The `vsn` parameter names no serializer this server has.
    #[error("unknown serializer version {0:?}")]
    UnknownVsn(String),
    /// The text frame is not the JSON the serializer expects.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A binary frame is shorter than its header says.
    #[error("binary frame truncated")]
    Truncated,
    /// A binary frame kind the client may not send.
    #[error("unexpected binary frame kind {0}")]
    BinaryKind(u8),
    /// A string field of a binary frame is not UTF-8.
    #[error("binary frame field {0} is not UTF-8")]
    InvalidUtf8(&'static str),
    /// A string field is too long for a binary frame (255 bytes at most).
    #[error("field {0} longer than 255 bytes")]
    FieldTooLong(&'static str),
    /// The V1 serializer has no binary frames.
    #[error("binary frames need the V2 serializer")]
    BinaryUnsupported,
    /// JSON nested deeper than [`MAX_JSON_DEPTH`].
    #[error("JSON nests deeper than {MAX_JSON_DEPTH} levels")]
    TooDeep,
}

/// A message body: JSON text or raw bytes.
#[derive(Clone, Debug)]
pub enum Payload {
    /// Valid JSON text.
    Json(Box<RawValue>),
    /// Raw bytes (V2 binary frames).
    Binary(Bytes),
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Payload::Json(a), Payload::Json(b)) => a.get() == b.get(),
            (Payload::Binary(a), Payload::Binary(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Payload {}

impl Payload {
    /// The empty JSON object.
    pub fn empty() -> Self {
        Payload::Json(empty_object())
    }

    /// JSON payload from text, checking that it is valid JSON.
    pub fn json(text: String) -> Result<Self, ProtocolError> {
        RawValue::from_string(text)
            .map(Payload::Json)
            .map_err(|e| ProtocolError::Malformed(format!("invalid JSON payload: {e}")))
    }

    /// JSON payload from text someone else wrote (a plugin, an API caller): valid JSON
    /// nested at most [`MAX_JSON_DEPTH`] levels.
    pub fn untrusted_json(text: String) -> Result<Self, ProtocolError> {
        let payload = Self::json(text)?;
        match &payload {
            Payload::Json(raw) if !nests_within(raw.get(), MAX_JSON_DEPTH) => {
                Err(ProtocolError::TooDeep)
            }
            _ => Ok(payload),
        }
    }

    /// Size in bytes, for queue accounting and limits.
    pub fn len(&self) -> usize {
        match self {
            Payload::Json(raw) => raw.get().len(),
            Payload::Binary(bytes) => bytes.len(),
        }
    }

    /// Whether the payload has no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `{}` as raw JSON.
fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).unwrap_or_else(|_| unreachable!("{{}} is JSON"))
}

/// `{"reason": <reason>}` as a JSON payload.
pub fn reason_payload(reason: &str) -> Payload {
    let mut text = String::with_capacity(reason.len() + 14);
    text.push_str("{\"reason\":");
    push_json_str(&mut text, reason);
    text.push('}');
    Payload::json(text).unwrap_or_else(|_| unreachable!("escaped string is JSON"))
}

/// A message from a client.
///
/// Its refs are in the socket's ref form, which the encoders take back: with V2 the ref's
/// text (an integer is kept as its digits), with V1 the ref as JSON (`"1"` or `1`), so
/// that a V1 reply echoes the ref as the client sent it, as Phoenix's V1 serializer does.
/// [`ref_text`] turns either into text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The join reference of the channel the message is for (V1 clients may omit it).
    pub join_ref: Option<String>,
    /// The message reference a reply must echo; none for fire-and-forget.
    pub msg_ref: Option<String>,
    /// Topic, e.g. `room:lobby`.
    pub topic: String,
    /// Event, e.g. `phx_join` or `new_message`.
    pub event: String,
    /// Body.
    pub payload: Payload,
}

/// Reply status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// `"ok"`
    Ok,
    /// `"error"`
    Error,
}

impl Status {
    /// The wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
        }
    }
}

/// The body of a text frame: UTF-8 by construction (it is made from a `String`), shared by
/// reference count, so a frame shared by many sockets is never checked again on its way out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Text(Bytes);

impl Text {
    /// The text's bytes (UTF-8), as the socket writes them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // Made from a `String` only: the check never fails.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Text {
    fn from(text: String) -> Self {
        Text(Bytes::from(text))
    }
}

/// An encoded frame, ready for the socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A text frame.
    Text(Text),
    /// A binary frame.
    Binary(Bytes),
}

impl Frame {
    /// Size in bytes.
    pub fn len(&self) -> usize {
        match self {
            Frame::Text(t) => t.len(),
            Frame::Binary(b) => b.len(),
        }
    }

    /// Whether the frame is empty (never, for frames this module makes).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// Decodes a text frame with the given serializer.
pub fn decode_text(vsn: Vsn, text: &str) -> Result<Message, ProtocolError> {
    match vsn {
        Vsn::V2 => decode_v2_text(text),
        Vsn::V1 => decode_v1_text(text),
    }
}

/// Decodes a binary frame: with V2 a client push, kind 0; with V1 JSON text, since
/// Phoenix's V1 serializer reads a frame whatever its opcode (some clients send text as
/// binary frames).
pub fn decode_binary(vsn: Vsn, data: &[u8]) -> Result<Message, ProtocolError> {
    if vsn == Vsn::V1 {
        let text = std::str::from_utf8(data).map_err(|_| ProtocolError::InvalidUtf8("frame"))?;
        return decode_v1_text(text);
    }
    let (&kind, rest) = data.split_first().ok_or(ProtocolError::Truncated)?;
    if kind != 0 {
        return Err(ProtocolError::BinaryKind(kind));
    }
    let [jr_len, ref_len, topic_len, event_len] = match rest.get(..4) {
        Some(&[a, b, c, d]) => [a, b, c, d].map(usize::from),
        _ => return Err(ProtocolError::Truncated),
    };
    let mut cursor = &rest[4..];
    let mut take = |len: usize, field: &'static str| -> Result<String, ProtocolError> {
        if cursor.len() < len {
            return Err(ProtocolError::Truncated);
        }
        let (head, tail) = cursor.split_at(len);
        cursor = tail;
        std::str::from_utf8(head)
            .map(str::to_owned)
            .map_err(|_| ProtocolError::InvalidUtf8(field))
    };
    let join_ref = take(jr_len, "join_ref")?;
    let msg_ref = take(ref_len, "ref")?;
    let topic = take(topic_len, "topic")?;
    let event = take(event_len, "event")?;
    Ok(Message {
        join_ref: non_empty(join_ref),
        msg_ref: non_empty(msg_ref),
        topic,
        event,
        payload: Payload::Binary(Bytes::copy_from_slice(cursor)),
    })
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn malformed(e: serde_json::Error) -> ProtocolError {
    ProtocolError::Malformed(e.to_string())
}

/// A reference: JSON string or null. Numbers are accepted and kept as their text, since
/// some clients count with integers.
struct Ref(Option<String>);

impl<'de> Deserialize<'de> for Ref {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RefVisitor;
        impl Visitor<'_> for RefVisitor {
            type Value = Ref;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, an integer or null")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ref, E> {
                Ok(Ref(Some(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Ref, E> {
                Ok(Ref(Some(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ref, E> {
                Ok(Ref(Some(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ref, E> {
                Ok(Ref(Some(v.to_string())))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Ref, E> {
                Ok(Ref(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Ref, E> {
                Ok(Ref(None))
            }
        }
        d.deserialize_any(RefVisitor)
    }
}

/// `[join_ref, ref, topic, event, payload, ...ignored]`
struct V2Frame(Message);

impl<'de> Deserialize<'de> for V2Frame {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V2Visitor;
        impl<'de> Visitor<'de> for V2Visitor {
            type Value = V2Frame;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of exactly 5 elements [join_ref, ref, topic, event, payload]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<V2Frame, A::Error> {
                let missing = |n| de::Error::invalid_length(n, &self);
                let join_ref: Ref = seq.next_element()?.ok_or_else(|| missing(0))?;
                let msg_ref: Ref = seq.next_element()?.ok_or_else(|| missing(1))?;
                let topic: String = seq.next_element()?.ok_or_else(|| missing(2))?;
                let event: String = seq.next_element()?.ok_or_else(|| missing(3))?;
                let payload: Box<RawValue> = seq.next_element()?.ok_or_else(|| missing(4))?;
                // Phoenix ignores elements past the fifth; no client sends them, and a
                // frame that has them is not the frame it claims to be.
                if seq.next_element::<IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(6, &self));
                }
                Ok(V2Frame(Message {
                    join_ref: join_ref.0,
                    msg_ref: msg_ref.0,
                    topic,
                    event,
                    payload: Payload::Json(payload),
                }))
            }
        }
        d.deserialize_seq(V2Visitor)
    }
}

/// The first character of a frame that is not whitespace: what kind of JSON value it is.
fn opens_with(text: &str, c: char) -> bool {
    text.trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with(c)
}

fn decode_v2_text(text: &str) -> Result<Message, ProtocolError> {
    if opens_with(text, '{') {
        return Err(ProtocolError::Malformed(
            "V2 serializer expects an array frame; the client sent a V1 object (connect with vsn=1.0.0 to send objects)".into(),
        ));
    }
    let message = serde_json::from_str::<V2Frame>(text)
        .map(|f| f.0)
        .map_err(malformed)?;
    within_depth(message)
}

/// A decoded message whose payload nests at most [`MAX_JSON_DEPTH`] levels.
fn within_depth(message: Message) -> Result<Message, ProtocolError> {
    match &message.payload {
        Payload::Json(raw) if !nests_within(raw.get(), MAX_JSON_DEPTH) => {
            Err(ProtocolError::TooDeep)
        }
        _ => Ok(message),
    }
}

#[derive(Deserialize)]
struct V1Frame<'a> {
    topic: String,
    event: String,
    payload: Box<RawValue>,
    #[serde(rename = "ref", default, borrow)]
    msg_ref: Option<&'a RawValue>,
    #[serde(default, borrow)]
    join_ref: Option<&'a RawValue>,
}

fn decode_v1_text(text: &str) -> Result<Message, ProtocolError> {
    if opens_with(text, '[') {
        return Err(ProtocolError::Malformed(
            "V1 serializer expects an object frame; the client sent a V2 array (connect with vsn=2.0.0 to send arrays)".into(),
        ));
    }
    let f: V1Frame = serde_json::from_str(text).map_err(malformed)?;
    within_depth(Message {
        join_ref: v1_ref(f.join_ref, "join_ref")?,
        msg_ref: v1_ref(f.msg_ref, "ref")?,
        topic: f.topic,
        event: f.event,
        payload: Payload::Json(f.payload),
    })
}

/// A V1 ref in the socket's ref form: its JSON, a string re-encoded (so `"\u0031"` and
/// `"1"` are one ref), a number as written; null is none. Other JSON is refused.
fn v1_ref(raw: Option<&RawValue>, field: &str) -> Result<Option<String>, ProtocolError> {
    let Some(raw) = raw else { return Ok(None) };
    let json = raw.get();
    match json.as_bytes().first() {
        Some(b'n') => Ok(None),
        Some(b'"') => {
            let text: String = serde_json::from_str(json).map_err(malformed)?;
            let mut out = String::with_capacity(text.len() + 2);
            push_json_str(&mut out, &text);
            Ok(Some(out))
        }
        Some(b'-' | b'0'..=b'9') => Ok(Some(json.to_owned())),
        _ => Err(ProtocolError::Malformed(format!(
            "{field} must be a string, a number or null"
        ))),
    }
}

/// A ref in the socket's ref form (see [`Message`]) as text: what a plugin is shown.
pub fn ref_text(vsn: Vsn, r: &str) -> String {
    match vsn {
        Vsn::V2 => r.to_owned(),
        Vsn::V1 => serde_json::from_str::<String>(r).unwrap_or_else(|_| r.to_owned()),
    }
}

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// Appends `s` as a JSON string literal.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn push_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.push_str("null"),
    }
}

/// What a server frame is; the pieces every serializer needs.
struct Out<'a> {
    join_ref: Option<&'a str>,
    msg_ref: Option<&'a str>,
    topic: &'a str,
    event: &'a str,
    body: Body<'a>,
}

enum Body<'a> {
    /// A JSON payload as is.
    Json(&'a RawValue),
    /// `{"status":..,"response":..}` with a JSON response.
    Reply(Status, &'a RawValue),
    /// Raw bytes.
    Binary(&'a [u8]),
    /// A reply whose response is raw bytes.
    BinaryReply(Status, &'a [u8]),
}

fn body_for(payload: &Payload, reply: Option<Status>) -> Body<'_> {
    match (payload, reply) {
        (Payload::Json(raw), None) => Body::Json(raw),
        (Payload::Json(raw), Some(status)) => Body::Reply(status, raw),
        (Payload::Binary(b), None) => Body::Binary(b),
        (Payload::Binary(b), Some(status)) => Body::BinaryReply(status, b),
    }
}

fn encode(vsn: Vsn, out: Out<'_>) -> Result<Frame, ProtocolError> {
    match (&out.body, vsn) {
        (Body::Json(_) | Body::Reply(..), Vsn::V2) => Ok(encode_v2_text(&out)),
        (Body::Json(_) | Body::Reply(..), Vsn::V1) => Ok(encode_v1_text(&out)),
        (Body::Binary(_) | Body::BinaryReply(..), Vsn::V2) => encode_v2_binary(&out),
        (Body::Binary(_) | Body::BinaryReply(..), Vsn::V1) => Err(ProtocolError::BinaryUnsupported),
    }
}

fn push_json_body(buf: &mut String, body: &Body<'_>) {
    match body {
        Body::Json(raw) => buf.push_str(raw.get()),
        Body::Reply(status, raw) => {
            buf.push_str("{\"status\":\"");
            buf.push_str(status.as_str());
            buf.push_str("\",\"response\":");
            buf.push_str(raw.get());
            buf.push('}');
        }
        Body::Binary(_) | Body::BinaryReply(..) => unreachable!("binary bodies are not JSON"),
    }
}

fn body_len(body: &Body<'_>) -> usize {
    match body {
        Body::Json(raw) | Body::Reply(_, raw) => raw.get().len() + 32,
        Body::Binary(b) | Body::BinaryReply(_, b) => b.len(),
    }
}

fn encode_v2_text(out: &Out<'_>) -> Frame {
    let mut buf =
        String::with_capacity(out.topic.len() + out.event.len() + body_len(&out.body) + 32);
    buf.push('[');
    push_opt_str(&mut buf, out.join_ref);
    buf.push(',');
    push_opt_str(&mut buf, out.msg_ref);
    buf.push(',');
    push_json_str(&mut buf, out.topic);
    buf.push(',');
    push_json_str(&mut buf, out.event);
    buf.push(',');
    push_json_body(&mut buf, &out.body);
    buf.push(']');
    Frame::Text(Text::from(buf))
}

fn encode_v1_text(out: &Out<'_>) -> Frame {
    let mut buf =
        String::with_capacity(out.topic.len() + out.event.len() + body_len(&out.body) + 48);
    buf.push_str("{\"topic\":");
    push_json_str(&mut buf, out.topic);
    buf.push_str(",\"event\":");
    push_json_str(&mut buf, out.event);
    buf.push_str(",\"payload\":");
    push_json_body(&mut buf, &out.body);
    // V1 refs are held as JSON (see [`Message`]): echoed as the client sent them.
    buf.push_str(",\"ref\":");
    buf.push_str(out.msg_ref.unwrap_or("null"));
    buf.push('}');
    Frame::Text(Text::from(buf))
}

fn field_len(s: &str, field: &'static str) -> Result<u8, ProtocolError> {
    u8::try_from(s.len()).map_err(|_| ProtocolError::FieldTooLong(field))
}

fn encode_v2_binary(out: &Out<'_>) -> Result<Frame, ProtocolError> {
    let join_ref = out.join_ref.unwrap_or("");
    let msg_ref = out.msg_ref.unwrap_or("");
    let topic_len = field_len(out.topic, "topic")?;
    let jr_len = field_len(join_ref, "join_ref")?;
    let mut buf = Vec::with_capacity(
        8 + join_ref.len()
            + msg_ref.len()
            + out.topic.len()
            + out.event.len()
            + body_len(&out.body),
    );
    match out.body {
        Body::BinaryReply(status, data) => {
            let status = status.as_str();
            buf.extend_from_slice(&[
                1,
                jr_len,
                field_len(msg_ref, "ref")?,
                topic_len,
                field_len(status, "status")?,
            ]);
            for part in [join_ref, msg_ref, out.topic, status] {
                buf.extend_from_slice(part.as_bytes());
            }
            buf.extend_from_slice(data);
        }
        Body::Binary(data) if out.join_ref.is_none() && out.msg_ref.is_none() => {
            buf.extend_from_slice(&[2, topic_len, field_len(out.event, "event")?]);
            buf.extend_from_slice(out.topic.as_bytes());
            buf.extend_from_slice(out.event.as_bytes());
            buf.extend_from_slice(data);
        }
        Body::Binary(data) => {
            buf.extend_from_slice(&[0, jr_len, topic_len, field_len(out.event, "event")?]);
            for part in [join_ref, out.topic, out.event] {
                buf.extend_from_slice(part.as_bytes());
            }
            buf.extend_from_slice(data);
        }
        Body::Json(_) | Body::Reply(..) => unreachable!("JSON bodies are text frames"),
    }
    Ok(Frame::Binary(Bytes::from(buf)))
}

/// A reply to a client message: `[join_ref, ref, topic, "phx_reply", {"status", "response"}]`.
pub fn encode_reply(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    status: Status,
    response: &Payload,
) -> Result<Frame, ProtocolError> {
    encode(
        vsn,
        Out {
            join_ref,
            msg_ref,
            topic,
            event: event::REPLY,
            body: body_for(response, Some(status)),
        },
    )
}

/// A push to one channel: `[join_ref, null, topic, event, payload]`.
pub fn encode_push(
    vsn: Vsn,
    join_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &Payload,
) -> Result<Frame, ProtocolError> {
    encode(
        vsn,
        Out {
            join_ref,
            msg_ref: None,
            topic,
            event,
            body: body_for(payload, None),
        },
    )
}

/// A broadcast, the same bytes for every subscriber: `[null, null, topic, event, payload]`.
pub fn encode_broadcast(
    vsn: Vsn,
    topic: &str,
    event: &str,
    payload: &Payload,
) -> Result<Frame, ProtocolError> {
    encode(
        vsn,
        Out {
            join_ref: None,
            msg_ref: None,
            topic,
            event,
            body: body_for(payload, None),
        },
    )
}

/// The server closed a channel: `[join_ref, join_ref, topic, "phx_close", {}]`.
pub fn encode_close(vsn: Vsn, join_ref: Option<&str>, topic: &str) -> Frame {
    encode_channel_end(vsn, join_ref, topic, event::CLOSE, &empty_object())
}

/// A channel crashed: `[join_ref, join_ref, topic, "phx_error", {"reason":"channel_crash"}]`.
pub fn encode_crash(vsn: Vsn, join_ref: Option<&str>, topic: &str) -> Frame {
    let reason = RawValue::from_string(format!("{{\"reason\":\"{}\"}}", reason::CHANNEL_CRASH))
        .unwrap_or_else(|_| unreachable!("a fixed JSON object"));
    encode_channel_end(vsn, join_ref, topic, event::ERROR, &reason)
}

/// `phx_close` and `phx_error` both carry the join ref as their ref, and JSON bodies only.
fn encode_channel_end(
    vsn: Vsn,
    join_ref: Option<&str>,
    topic: &str,
    event: &str,
    body: &RawValue,
) -> Frame {
    let out = Out {
        join_ref,
        msg_ref: join_ref,
        topic,
        event,
        body: Body::Json(body),
    };
    match vsn {
        Vsn::V2 => encode_v2_text(&out),
        Vsn::V1 => encode_v1_text(&out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> Payload {
        Payload::json(text.to_owned()).expect("valid JSON")
    }

    fn text(frame: Frame) -> String {
        match frame {
            Frame::Text(t) => t.as_str().to_owned(),
            Frame::Binary(_) => panic!("expected a text frame"),
        }
    }

    fn binary(frame: Frame) -> Vec<u8> {
        match frame {
            Frame::Binary(b) => b.to_vec(),
            Frame::Text(_) => panic!("expected a binary frame"),
        }
    }

    #[test]
    fn decodes_v2_join() {
        let m =
            decode_text(Vsn::V2, r#"["1","1","room:lobby","phx_join",{"a":1}]"#).expect("decodes");
        assert_eq!(m.join_ref.as_deref(), Some("1"));
        assert_eq!(m.msg_ref.as_deref(), Some("1"));
        assert_eq!(m.topic, "room:lobby");
        assert_eq!(m.event, "phx_join");
        assert_eq!(m.payload, json(r#"{"a":1}"#));
    }

    #[test]
    fn decodes_v2_heartbeat_with_null_join_ref() {
        let m = decode_text(Vsn::V2, r#"[null,"7","phoenix","heartbeat",{}]"#).expect("decodes");
        assert_eq!(m.join_ref, None);
        assert_eq!(m.msg_ref.as_deref(), Some("7"));
        assert_eq!(m.topic, PHOENIX_TOPIC);
        assert_eq!(m.event, event::HEARTBEAT);
    }

    #[test]
    fn a_v2_frame_has_exactly_five_elements() {
        for extra in [
            r#"[null,"7","phoenix","heartbeat",{},"extra"]"#,
            r#"[null,"7","phoenix","heartbeat",{},[1,2],3]"#,
        ] {
            assert!(decode_text(Vsn::V2, extra).is_err(), "accepted {extra}");
        }
    }

    #[test]
    fn payloads_nest_at_most_the_limit() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let frame = |n: usize| format!(r#"[null,"1","t","e",{}]"#, nested(n));
        assert!(decode_text(Vsn::V2, &frame(MAX_JSON_DEPTH)).is_ok());
        assert_eq!(
            decode_text(Vsn::V2, &frame(MAX_JSON_DEPTH + 1)),
            Err(ProtocolError::TooDeep)
        );
        let v1 = format!(
            r#"{{"topic":"t","event":"e","payload":{},"ref":null}}"#,
            nested(500)
        );
        assert_eq!(decode_text(Vsn::V1, &v1), Err(ProtocolError::TooDeep));
        // Brackets inside strings are not nesting.
        let quoted = format!(r#"{{"a":"{}","b":[[1]]}}"#, "[{\\\"".repeat(300));
        assert!(nests_within(&quoted, 3));
        assert!(!nests_within(&nested(4), 3));
        assert!(Payload::untrusted_json(nested(MAX_JSON_DEPTH)).is_ok());
        assert!(Payload::untrusted_json(nested(MAX_JSON_DEPTH + 1)).is_err());
    }

    #[test]
    fn keeps_payload_text_byte_for_byte() {
        let m = decode_text(
            Vsn::V2,
            r#"[null,null,"t","e", {"b" : "x\u00e9" , "n":1.50}]"#,
        )
        .expect("decodes");
        let Payload::Json(raw) = m.payload else {
            panic!("json")
        };
        assert_eq!(raw.get(), r#"{"b" : "x\u00e9" , "n":1.50}"#);
    }

    #[test]
    fn integer_refs_are_kept_as_text() {
        let m = decode_text(Vsn::V2, r#"[3,4,"t","e",{}]"#).expect("decodes");
        assert_eq!(
            (m.join_ref.as_deref(), m.msg_ref.as_deref()),
            (Some("3"), Some("4"))
        );
    }

    #[test]
    fn rejects_malformed_v2_frames() {
        let bad = [
            "",
            "not json",
            "{}",
            "[]",
            r#"["1","1","t","e"]"#,
            r#"["1","1","t"]"#,
            r#"["1","1",5,"e",{}]"#,
            r#"["1","1","t",null,{}]"#,
            r#"[{},"1","t","e",{}]"#,
            r#"[true,"1","t","e",{}]"#,
            r#"["1","1","t","e",{}"#,
            r#"["1","1","t","e",{}] trailing"#,
            "[\"1\",\"1\",\"t\",\"e\",{\"a\":\"\u{0}\"}]",
        ];
        for input in bad {
            assert!(decode_text(Vsn::V2, input).is_err(), "accepted {input:?}");
        }
    }

    #[test]
    fn decodes_v1_frames_with_and_without_join_ref() {
        let m = decode_text(
            Vsn::V1,
            r#"{"topic":"room:lobby","event":"new_message","payload":{"body":"hi"},"ref":"2"}"#,
        )
        .expect("decodes");
        assert_eq!((m.join_ref, m.msg_ref.as_deref()), (None, Some(r#""2""#)));
        assert_eq!(m.payload, json(r#"{"body":"hi"}"#));
        let m = decode_text(
            Vsn::V1,
            r#"{"topic":"t","event":"e","payload":{},"ref":null,"join_ref":"1"}"#,
        )
        .expect("decodes");
        assert_eq!((m.join_ref.as_deref(), m.msg_ref), (Some(r#""1""#), None));
        assert!(decode_text(Vsn::V1, r#"{"topic":"t","event":"e"}"#).is_err());
        assert!(
            decode_text(
                Vsn::V1,
                r#"{"topic":"t","event":"e","payload":{},"ref":{}}"#
            )
            .is_err()
        );
    }

    #[test]
    fn v1_echoes_refs_as_the_client_sent_them() {
        let m = decode_text(
            Vsn::V1,
            r#"{"topic":"t","event":"e","payload":{},"ref":1,"join_ref":"\u0032"}"#,
        )
        .expect("decodes");
        assert_eq!(
            (m.join_ref.as_deref(), m.msg_ref.as_deref()),
            (Some(r#""2""#), Some("1"))
        );
        let reply = |r: &Message| {
            text(
                encode_reply(
                    Vsn::V1,
                    None,
                    r.msg_ref.as_deref(),
                    "t",
                    Status::Ok,
                    &Payload::empty(),
                )
                .expect("encodes"),
            )
        };
        assert_eq!(
            reply(&m),
            r#"{"topic":"t","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":1}"#
        );
        let s = decode_text(
            Vsn::V1,
            r#"{"topic":"t","event":"e","payload":{},"ref":"1"}"#,
        )
        .expect("decodes");
        assert!(reply(&s).ends_with(r#""ref":"1"}"#));
        assert_eq!(ref_text(Vsn::V1, r#""2""#), "2");
        assert_eq!(ref_text(Vsn::V1, "7"), "7");
        assert_eq!(ref_text(Vsn::V2, "7"), "7");
    }

    #[test]
    fn v1_reads_json_in_binary_frames() {
        let m = decode_binary(
            Vsn::V1,
            br#"{"topic":"t","event":"e","payload":{},"ref":3}"#,
        )
        .expect("decodes");
        assert_eq!((m.topic.as_str(), m.msg_ref.as_deref()), ("t", Some("3")));
        assert_eq!(
            decode_binary(Vsn::V1, &[0xff, 0]),
            Err(ProtocolError::InvalidUtf8("frame"))
        );
    }

    #[test]
    fn a_frame_of_the_other_serializer_is_named() {
        let Err(ProtocolError::Malformed(why)) = decode_text(Vsn::V1, r#" ["1","1","t","e",{}]"#)
        else {
            panic!("accepted a V2 array as V1")
        };
        assert!(
            why.starts_with("V1 serializer expects an object frame; the client sent a V2 array"),
            "{why}"
        );
        let Err(ProtocolError::Malformed(why)) = decode_text(Vsn::V2, r#"{"topic":"t"}"#) else {
            panic!("accepted a V1 object as V2")
        };
        assert!(
            why.starts_with("V2 serializer expects an array frame; the client sent a V1 object"),
            "{why}"
        );
    }

    #[test]
    fn encodes_v2_reply_golden() {
        let f = encode_reply(
            Vsn::V2,
            Some("1"),
            Some("2"),
            "room:lobby",
            Status::Ok,
            &Payload::empty(),
        )
        .expect("encodes");
        assert_eq!(
            text(f),
            r#"["1","2","room:lobby","phx_reply",{"status":"ok","response":{}}]"#
        );
        let f = encode_reply(
            Vsn::V2,
            None,
            Some("5"),
            "phoenix",
            Status::Ok,
            &Payload::empty(),
        )
        .expect("encodes");
        assert_eq!(
            text(f),
            r#"[null,"5","phoenix","phx_reply",{"status":"ok","response":{}}]"#
        );
        let f = encode_reply(
            Vsn::V2,
            Some("3"),
            Some("3"),
            "room:secret",
            Status::Error,
            &reason_payload("unauthorized"),
        )
        .expect("encodes");
        assert_eq!(
            text(f),
            r#"["3","3","room:secret","phx_reply",{"status":"error","response":{"reason":"unauthorized"}}]"#
        );
    }

    #[test]
    fn encodes_v2_push_broadcast_close_and_crash_golden() {
        let p = json(r#"{"body":"hi"}"#);
        let f = encode_push(Vsn::V2, Some("1"), "room:lobby", "new_message", &p).expect("encodes");
        assert_eq!(
            text(f),
            r#"["1",null,"room:lobby","new_message",{"body":"hi"}]"#
        );
        let f = encode_broadcast(Vsn::V2, "room:lobby", "new_message", &p).expect("encodes");
        assert_eq!(
            text(f),
            r#"[null,null,"room:lobby","new_message",{"body":"hi"}]"#
        );
        assert_eq!(
            text(encode_close(Vsn::V2, Some("4"), "room:lobby")),
            r#"["4","4","room:lobby","phx_close",{}]"#
        );
        assert_eq!(
            text(encode_crash(Vsn::V2, Some("4"), "room:lobby")),
            r#"["4","4","room:lobby","phx_error",{"reason":"channel_crash"}]"#
        );
    }

    #[test]
    fn encodes_v1_golden() {
        let f = encode_reply(
            Vsn::V1,
            Some("1"),
            Some(r#""2""#),
            "room:lobby",
            Status::Ok,
            &Payload::empty(),
        )
        .expect("encodes");
        assert_eq!(
            text(f),
            r#"{"topic":"room:lobby","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"2"}"#
        );
        let f = encode_broadcast(Vsn::V1, "t", "e", &json("[1]")).expect("encodes");
        assert_eq!(
            text(f),
            r#"{"topic":"t","event":"e","payload":[1],"ref":null}"#
        );
        assert_eq!(
            text(encode_close(Vsn::V1, Some(r#""9""#), "t")),
            r#"{"topic":"t","event":"phx_close","payload":{},"ref":"9"}"#
        );
        let bin = Payload::Binary(Bytes::from_static(b"\x00\x01"));
        assert_eq!(
            encode_broadcast(Vsn::V1, "t", "e", &bin),
            Err(ProtocolError::BinaryUnsupported)
        );
    }

    #[test]
    fn escapes_strings() {
        let f =
            encode_broadcast(Vsn::V2, "a\"b\\c\n\u{1}é", "e", &Payload::empty()).expect("encodes");
        let s = text(f);
        assert_eq!(s, "[null,null,\"a\\\"b\\\\c\\n\\u0001é\",\"e\",{}]");
        let back: serde_json::Value = serde_json::from_str(&s).expect("valid JSON");
        assert_eq!(back[2], "a\"b\\c\n\u{1}é");
    }

    #[test]
    fn decodes_binary_push_golden() {
        let mut data = vec![0, 2, 1, 10, 3];
        data.extend_from_slice(b"12");
        data.extend_from_slice(b"3");
        data.extend_from_slice(b"room:lobby");
        data.extend_from_slice(b"img");
        data.extend_from_slice(&[0xff, 0x00, 0x10]);
        let m = decode_binary(Vsn::V2, &data).expect("decodes");
        assert_eq!(m.join_ref.as_deref(), Some("12"));
        assert_eq!(m.msg_ref.as_deref(), Some("3"));
        assert_eq!(m.topic, "room:lobby");
        assert_eq!(m.event, "img");
        assert_eq!(
            m.payload,
            Payload::Binary(Bytes::from_static(&[0xff, 0x00, 0x10]))
        );
    }

    #[test]
    fn rejects_bad_binary_frames() {
        assert_eq!(decode_binary(Vsn::V2, &[]), Err(ProtocolError::Truncated));
        assert_eq!(
            decode_binary(Vsn::V2, &[0, 1, 1]),
            Err(ProtocolError::Truncated)
        );
        assert_eq!(
            decode_binary(Vsn::V2, &[0, 200, 0, 0, 0, b'x']),
            Err(ProtocolError::Truncated)
        );
        assert_eq!(
            decode_binary(Vsn::V2, &[2, 0, 0]),
            Err(ProtocolError::BinaryKind(2))
        );
        assert_eq!(
            decode_binary(Vsn::V2, &[0, 1, 0, 0, 0, 0xff]),
            Err(ProtocolError::InvalidUtf8("join_ref"))
        );
    }

    #[test]
    fn encodes_binary_frames_golden() {
        let data = Payload::Binary(Bytes::from_static(&[9, 8]));
        let f = encode_push(Vsn::V2, Some("1"), "t", "ev", &data).expect("encodes");
        assert_eq!(
            binary(f),
            [&[0u8, 1, 1, 2][..], b"1", b"t", b"ev", &[9, 8]].concat()
        );
        let f =
            encode_reply(Vsn::V2, Some("1"), Some("22"), "t", Status::Ok, &data).expect("encodes");
        assert_eq!(
            binary(f),
            [&[1u8, 1, 2, 1, 2][..], b"1", b"22", b"t", b"ok", &[9, 8]].concat()
        );
        let f = encode_broadcast(Vsn::V2, "t", "ev", &data).expect("encodes");
        assert_eq!(binary(f), [&[2u8, 1, 2][..], b"t", b"ev", &[9, 8]].concat());
        let long = "x".repeat(256);
        assert_eq!(
            encode_broadcast(Vsn::V2, &long, "e", &data),
            Err(ProtocolError::FieldTooLong("topic"))
        );
    }

    #[test]
    fn vsn_param() {
        assert_eq!(Vsn::from_param(None), Ok(Vsn::V1));
        assert_eq!(Vsn::from_param(Some("1.0.0")), Ok(Vsn::V1));
        assert_eq!(Vsn::from_param(Some("2.0.0")), Ok(Vsn::V2));
        assert!(Vsn::from_param(Some("3.0.0")).is_err());
    }

    #[test]
    fn longpoll_batches_split_into_text_and_binary_lines() {
        use longpoll::{Line, lines};
        let body = "[null,\"1\",\"phoenix\",\"heartbeat\",{}]\r\nAAEC\n{\"topic\":\"t\"}\n";
        assert_eq!(
            lines(body, true).expect("splits"),
            [
                Line::Text("[null,\"1\",\"phoenix\",\"heartbeat\",{}]"),
                Line::Binary(vec![0, 1, 2]),
                Line::Text("{\"topic\":\"t\"}"),
            ]
        );
        assert_eq!(
            lines("[1]\n[2]", false).expect("one"),
            [Line::Text("[1]\n[2]")]
        );
        assert!(lines("not base64!", true).is_err());
        let batch = (0..101)
            .map(|n| format!("[{n}]"))
            .collect::<Vec<_>>()
            .join("\n");
        let read = lines(&batch, true).expect("splits");
        assert_eq!((read.len(), read.last()), (100, Some(&Line::Text("[99]"))));
    }

    #[test]
    fn longpoll_answers_carry_messages_as_json_strings() {
        let messages = [Text::from(r#"[null,null,"t","e",{"a":"\n"}]"#.to_owned())];
        let body = longpoll::answer(200, Some("tok"), &messages);
        let back: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(back["status"], 200);
        assert_eq!(back["token"], "tok");
        assert_eq!(back["messages"][0], r#"[null,null,"t","e",{"a":"\n"}]"#);
        assert_eq!(longpoll::answer(410, None, &[]), r#"{"status":410}"#);
    }

    #[test]
    fn reason_payload_escapes() {
        assert_eq!(reason_payload("a\"b"), json(r#"{"reason":"a\"b"}"#));
    }
}
