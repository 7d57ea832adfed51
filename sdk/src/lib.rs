//! Write Cinder channel plugins in Rust.
//!
//! A plugin implements [`Channel`] for a type that holds the room's state, and exports it
//! with [`export_channel!`]. Cinder keeps one instance of the plugin per live topic (a
//! room), so `&mut self` is the state of one room: every channel (socket) joined to that
//! topic is served by the same value, one call at a time.
//!
//! The WIT contract (`cinder:channel`, in the repository's `wit/` folder) explains the
//! execution model; this crate hides the generated bindings behind a small API:
//! [`Payload`] for message bodies (JSON text or bytes) with serde helpers, [`Socket`] for
//! the channel a call is about and its assigns, the host functions [`broadcast`],
//! [`broadcast_from`], [`push`], [`send_after`] and [`log`], and [`presence`].
//!
//! # Example: a chat room
//!
//! ```no_run
//! use cinder_sdk::{Channel, Error, InOutcome, Join, Payload, Reply, Socket, broadcast};
//! use serde::Deserialize;
//! use serde_json::json;
//!
//! #[derive(Default)]
//! struct Chat {
//!     messages: u64,
//! }
//!
//! #[derive(Deserialize)]
//! struct NewMessage {
//!     body: String,
//! }
//!
//! impl Channel for Chat {
//!     fn join(&mut self, topic: &str, _payload: Payload, _socket: &mut Socket) -> Result<Join, Error> {
//!         if topic == "room:lobby" {
//!             Ok(Join::ok())
//!         } else {
//!             Ok(Join::refuse(json!({"reason": "unauthorized"})))
//!         }
//!     }
//!
//!     fn handle_in(&mut self, event: &str, payload: Payload, _socket: &mut Socket) -> Result<InOutcome, Error> {
//!         match event {
//!             "new_message" => {
//!                 let Ok(msg) = payload.parse::<NewMessage>() else {
//!                     return Ok(InOutcome::Reply(Reply::error(json!({"reason": "body required"}))));
//!                 };
//!                 self.messages += 1;
//!                 broadcast("new_message", json!({"body": msg.body}))?;
//!                 Ok(InOutcome::NoReply)
//!             }
//!             _ => Ok(InOutcome::Reply(Reply::error(json!({"reason": "unknown event"})))),
//!         }
//!     }
//! }
//!
//! cinder_sdk::export_channel!(Chat);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`: the output `.wasm` is a
//! component, ready to serve with a manifest (see the repository's README).

use std::any::Any;
use std::cell::{OnceCell, RefCell};
use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

extern crate self as cinder_sdk;

/// The generated bindings of the `cinder:channel` world. Not part of the API.
#[doc(hidden)]
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod wit {
    wit_bindgen::generate!({
        path: "../wit",
        world: "stateful-channel",
        pub_export_macro: true,
        export_macro_name: "__export_cinder_channel",
        default_bindings_module: "cinder_sdk::wit",
        runtime_path: "cinder_sdk::__rt",
    });
}

/// The bindings' runtime support, so plugins need not depend on wit-bindgen. Not part of
/// the API.
#[doc(hidden)]
pub use wit_bindgen::rt as __rt;

use wit::cinder::channel::{host, types as w};
use wit::exports::cinder::channel::handler::Guest;
use wit::exports::cinder::channel::state::Guest as StateGuest;

/// An error from a plugin or from a host call. Returned from a callback, it crashes the
/// channel the call was about (`phx_error`), or refuses a join with `join crashed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error(s)
    }
}

impl From<&str> for Error {
    fn from(s: &str) -> Self {
        Error(s.to_owned())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error(format!("json: {e}"))
    }
}

/// A message body: JSON text (text frames) or raw bytes (V2 binary frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// JSON text.
    Json(String),
    /// Raw bytes.
    Binary(Vec<u8>),
}

impl Payload {
    /// Serializes `value` as a JSON payload.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Payload, Error> {
        Ok(Payload::Json(serde_json::to_string(value)?))
    }

    /// Deserializes a JSON payload into `T`. Binary payloads are an error.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, Error> {
        match self {
            Payload::Json(text) => Ok(serde_json::from_str(text)?),
            Payload::Binary(_) => Err(Error("expected a JSON payload, got binary".into())),
        }
    }

    /// The JSON text, if this is a JSON payload.
    pub fn as_json(&self) -> Option<&str> {
        match self {
            Payload::Json(text) => Some(text),
            Payload::Binary(_) => None,
        }
    }
}

impl From<Value> for Payload {
    fn from(value: Value) -> Self {
        Payload::Json(value.to_string())
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Payload::Binary(bytes)
    }
}

impl From<w::Payload> for Payload {
    fn from(p: w::Payload) -> Self {
        match p {
            w::Payload::Json(text) => Payload::Json(text),
            w::Payload::Binary(bytes) => Payload::Binary(bytes),
        }
    }
}

impl From<Payload> for w::Payload {
    fn from(p: Payload) -> Self {
        match p {
            Payload::Json(text) => w::Payload::Json(text),
            Payload::Binary(bytes) => w::Payload::Binary(bytes),
        }
    }
}

/// The channel a call is about: socket id, topic, join reference and assigns.
#[derive(Debug, Clone)]
pub struct Socket {
    id: Option<String>,
    topic: String,
    join_ref: Option<String>,
    /// The assigns as the host sent them (a JSON object), parsed on first use: most calls
    /// never look at them.
    raw_assigns: String,
    assigns: OnceCell<Map<String, Value>>,
    changed: bool,
}

impl Socket {
    fn from_wit(s: w::Socket) -> Socket {
        Socket {
            id: s.id,
            topic: s.topic,
            join_ref: s.join_ref,
            raw_assigns: s.assigns,
            assigns: OnceCell::new(),
            changed: false,
        }
    }

    fn parsed(raw: &str) -> Map<String, Value> {
        match serde_json::from_str(raw) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        }
    }

    fn assigns(&self) -> &Map<String, Value> {
        self.assigns.get_or_init(|| Self::parsed(&self.raw_assigns))
    }

    /// The socket id (`user_socket:<user_id>`), if the connect token named a user.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The topic, e.g. `room:lobby`.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The client's join reference for this channel.
    pub fn join_ref(&self) -> Option<&str> {
        self.join_ref.as_deref()
    }

    /// An assign (`user_id` comes from the connect token).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.assigns().get(key)
    }

    /// The `user_id` assign as text (a numeric id gives its decimal form).
    pub fn user_id(&self) -> Option<String> {
        match self.assigns().get("user_id")? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// Sets an assign; it is kept for later calls on this channel.
    pub fn assign(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        let mut assigns = self
            .assigns
            .take()
            .unwrap_or_else(|| Self::parsed(&self.raw_assigns));
        assigns.insert(key.into(), value.into());
        self.assigns = OnceCell::from(assigns);
        self.changed = true;
    }

    fn changed_assigns(&self) -> Option<String> {
        self.changed
            .then(|| Value::Object(self.assigns().clone()).to_string())
    }
}

/// Reply status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `receive("ok")` fires on the client.
    Ok,
    /// `receive("error")` fires on the client.
    Error,
}

/// A reply to a client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status.
    pub status: Status,
    /// Response body.
    pub response: Payload,
}

impl Reply {
    /// `{"status":"ok","response":...}`
    pub fn ok(response: impl Into<Payload>) -> Reply {
        Reply {
            status: Status::Ok,
            response: response.into(),
        }
    }

    /// `{"status":"error","response":...}`
    pub fn error(response: impl Into<Payload>) -> Reply {
        Reply {
            status: Status::Error,
            response: response.into(),
        }
    }

    fn into_wit(self) -> w::Reply {
        let status = match self.status {
            Status::Ok => w::Status::Ok,
            Status::Error => w::Status::Error,
        };
        w::Reply {
            status,
            response: self.response.into(),
        }
    }
}

/// What `join` decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Join {
    /// Accept, replying `{}` or the given JSON.
    Ok(Option<Value>),
    /// Refuse with this JSON reply, e.g. `{"reason":"unauthorized"}`.
    Refuse(Value),
}

impl Join {
    /// Accept with an empty reply.
    pub fn ok() -> Join {
        Join::Ok(None)
    }

    /// Accept with this reply.
    pub fn ok_with(reply: Value) -> Join {
        Join::Ok(Some(reply))
    }

    /// Refuse with this reply.
    pub fn refuse(reply: Value) -> Join {
        Join::Refuse(reply)
    }
}

/// What `handle_in` decided.
#[derive(Debug, Clone, PartialEq)]
pub enum InOutcome {
    /// No reply.
    NoReply,
    /// Answer the client's message.
    Reply(Reply),
    /// Stop the channel (`phx_close`), answering first when a reply is given.
    Stop {
        /// Passed to `terminate`.
        reason: String,
        /// Sent before `phx_close`.
        reply: Option<Reply>,
    },
}

/// What `handle_out` and `handle_info` decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Keep going.
    NoReply,
    /// Stop the channel with this reason.
    Stop(String),
}

/// Channel callbacks (Phoenix.Channel). `self` is the state of one room.
pub trait Channel: Default + 'static {
    /// A socket asks to join `topic`; decide whether it may.
    fn join(&mut self, topic: &str, payload: Payload, socket: &mut Socket) -> Result<Join, Error>;

    /// The client sent `event` on this channel.
    fn handle_in(
        &mut self,
        event: &str,
        payload: Payload,
        socket: &mut Socket,
    ) -> Result<InOutcome, Error>;

    /// An intercepted broadcast is about to reach this channel (once per subscriber).
    /// The default pushes it unchanged.
    fn handle_out(
        &mut self,
        event: &str,
        payload: Payload,
        _socket: &mut Socket,
    ) -> Result<Outcome, Error> {
        push(event, payload)?;
        Ok(Outcome::NoReply)
    }

    /// A timer set with [`send_after`] fired. The default ignores it.
    fn handle_info(&mut self, _message: Payload, _socket: &mut Socket) -> Result<Outcome, Error> {
        Ok(Outcome::NoReply)
    }

    /// The channel is going away (`left`, `closed`, or a stop reason).
    fn terminate(&mut self, _reason: &str, _socket: &Socket) {}

    /// The room's state as bytes, handed to the next version on hot reload. The default
    /// (empty) hands nothing over: the new version starts the room from `Default`.
    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Takes over the state `snapshot` of version `from_version` made (an older version,
    /// or a newer one on rollback). Called on a fresh `Default` value before any other
    /// callback. An error keeps the room on the running version.
    fn restore(&mut self, _state: &[u8], _from_version: &str) -> Result<(), Error> {
        Ok(())
    }
}

/// Broadcast to every subscriber of the current topic.
pub fn broadcast(event: &str, payload: impl Into<Payload>) -> Result<(), Error> {
    host::broadcast(event, &payload.into().into()).map_err(Error)
}

/// Broadcast to every subscriber of the current topic but the current channel.
pub fn broadcast_from(event: &str, payload: impl Into<Payload>) -> Result<(), Error> {
    host::broadcast_from(event, &payload.into().into()).map_err(Error)
}

/// Push to the current channel only.
pub fn push(event: &str, payload: impl Into<Payload>) -> Result<(), Error> {
    host::push(event, &payload.into().into()).map_err(Error)
}

/// Deliver `message` to [`Channel::handle_info`] of the current channel after `delay`.
pub fn send_after(delay: Duration, message: impl Into<Payload>) -> Result<(), Error> {
    let ms = u32::try_from(delay.as_millis()).map_err(|_| Error("delay too long".into()))?;
    host::send_after(ms, &message.into().into()).map_err(Error)
}

/// Presence kept by the host (Phoenix.Presence) for the current topic. Entries belong to
/// the current channel and leave with it; clients see `presence_state` and `presence_diff`.
pub mod presence {
    use super::Error;
    use crate::wit::cinder::channel::presence as p;
    use serde_json::Value;

    /// Track `key` (e.g. the user id) with `meta` (a JSON object). The channel gets
    /// `presence_state` after the call; the topic gets a `presence_diff`.
    pub fn track(key: &str, meta: &Value) -> Result<(), Error> {
        p::track(key, &meta.to_string()).map_err(Error)
    }

    /// Replace this channel's meta for `key` (a leave and a join with `phx_ref_prev`).
    pub fn update(key: &str, meta: &Value) -> Result<(), Error> {
        p::update(key, &meta.to_string()).map_err(Error)
    }

    /// Stop tracking `key` for this channel.
    pub fn untrack(key: &str) -> Result<(), Error> {
        p::untrack(key).map_err(Error)
    }

    /// The presence of `topic` on this node: `{"<key>": {"metas": [...]}}`.
    pub fn list(topic: &str) -> Result<Value, Error> {
        Ok(serde_json::from_str(&p::list(topic))?)
    }
}

/// Log severity.
pub use w::Level;

/// Write a line to the host's log.
pub fn log(level: Level, message: &str) {
    host::log(level, message);
}

thread_local! {
    /// The room's state: one value per instance (a wasm instance is single-threaded).
    static ROOM: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

fn with_room<T: Channel, R>(f: impl FnOnce(&mut T) -> R) -> R {
    ROOM.with(|cell| {
        let mut slot = cell.borrow_mut();
        let state = slot.get_or_insert_with(|| Box::new(T::default()));
        match state.downcast_mut::<T>() {
            Some(room) => f(room),
            None => unreachable!("one channel type per plugin"),
        }
    })
}

/// Adapts a [`Channel`] to the generated export trait. Use [`export_channel!`].
#[doc(hidden)]
pub struct Export<T>(std::marker::PhantomData<T>);

fn info_result(outcome: Result<Outcome, Error>, socket: &Socket) -> Result<w::InfoResult, String> {
    let outcome = match outcome.map_err(|e| e.0)? {
        Outcome::NoReply => w::InfoOutcome::Noreply,
        Outcome::Stop(reason) => w::InfoOutcome::Stop(reason),
    };
    Ok(w::InfoResult {
        outcome,
        assigns: socket.changed_assigns(),
    })
}

impl<T: Channel> Guest for Export<T> {
    fn join(
        topic: String,
        payload: w::Payload,
        socket: w::Socket,
    ) -> Result<w::JoinOutcome, String> {
        let mut socket = Socket::from_wit(socket);
        let join = with_room(|room: &mut T| room.join(&topic, payload.into(), &mut socket))
            .map_err(|e| e.0)?;
        Ok(match join {
            Join::Ok(reply) => w::JoinOutcome::Ok(w::JoinOk {
                reply: reply.map(|r| r.to_string()),
                assigns: socket.changed_assigns(),
            }),
            Join::Refuse(reply) => w::JoinOutcome::Error(reply.to_string()),
        })
    }

    fn handle_in(
        event: String,
        payload: w::Payload,
        socket: w::Socket,
    ) -> Result<w::InResult, String> {
        let mut socket = Socket::from_wit(socket);
        let outcome = with_room(|room: &mut T| room.handle_in(&event, payload.into(), &mut socket))
            .map_err(|e| e.0)?;
        let outcome = match outcome {
            InOutcome::NoReply => w::InOutcome::Noreply,
            InOutcome::Reply(reply) => w::InOutcome::Reply(reply.into_wit()),
            InOutcome::Stop { reason, reply } => w::InOutcome::Stop(w::Stop {
                reason,
                reply: reply.map(Reply::into_wit),
            }),
        };
        Ok(w::InResult {
            outcome,
            assigns: socket.changed_assigns(),
        })
    }

    fn handle_out(
        event: String,
        payload: w::Payload,
        socket: w::Socket,
    ) -> Result<w::InfoResult, String> {
        let mut socket = Socket::from_wit(socket);
        let outcome =
            with_room(|room: &mut T| room.handle_out(&event, payload.into(), &mut socket));
        info_result(outcome, &socket)
    }

    fn handle_info(message: w::Payload, socket: w::Socket) -> Result<w::InfoResult, String> {
        let mut socket = Socket::from_wit(socket);
        let outcome = with_room(|room: &mut T| room.handle_info(message.into(), &mut socket));
        info_result(outcome, &socket)
    }

    fn terminate(reason: String, socket: w::Socket) {
        let socket = Socket::from_wit(socket);
        with_room(|room: &mut T| room.terminate(&reason, &socket));
    }
}

impl<T: Channel> StateGuest for Export<T> {
    fn snapshot() -> Vec<u8> {
        with_room(|room: &mut T| room.snapshot())
    }

    fn restore(state: Vec<u8>, from_version: String) -> Result<(), String> {
        with_room(|room: &mut T| room.restore(&state, &from_version)).map_err(|e| e.0)
    }
}

/// Exports a [`Channel`] implementation as the plugin's `cinder:channel/handler` (and
/// `cinder:channel/state`, for hot reload).
///
/// ```no_run
/// use cinder_sdk::{Channel, Error, InOutcome, Join, Payload, Socket};
///
/// #[derive(Default)]
/// struct Echo;
///
/// impl Channel for Echo {
///     fn join(&mut self, _topic: &str, _payload: Payload, _socket: &mut Socket) -> Result<Join, Error> {
///         Ok(Join::ok())
///     }
///     fn handle_in(&mut self, _event: &str, payload: Payload, _socket: &mut Socket) -> Result<InOutcome, Error> {
///         Ok(InOutcome::Reply(cinder_sdk::Reply::ok(payload)))
///     }
/// }
///
/// cinder_sdk::export_channel!(Echo);
/// ```
#[macro_export]
macro_rules! export_channel {
    ($room:ty) => {
        #[allow(unsafe_code)]
        const _: () = {
            type __CinderExport = $crate::Export<$room>;
    $crate::wit::__export_cinder_channel!(__CinderExport with_types_in $crate::wit);
        };
    };
}
