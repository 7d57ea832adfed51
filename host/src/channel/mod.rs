//! Channels: the per-socket session state machine (joins, join refs, duplicate joins,
//! leaves, the channel cap) and the room actor that owns one plugin instance per live topic
//! and serialises every call into it.
//!
//! The room calls a [`RoomLogic`] trait and applies the [`Effect`]s a call returns; it knows
//! nothing of wasmtime. The session reads decoded protocol messages and writes
//! [`Outbound`] items into the socket's bounded queue; it knows nothing of axum or
//! WebSockets.
//!
//! - `feed`: a room's fastlane broadcasts, read by each member at its own cursor.
//! - `outbound`: the socket's queue, bounded in bytes, and the order shared with feeds.
//! - `room`: the hub of live rooms and the room actor.
//! - `session`: one socket's channels.

mod feed;
mod outbound;
mod room;
mod session;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::{Payload, Status};
use crate::pubsub::SubscriberId;

pub use outbound::{Outbound, OutboundRx, OutboundTx, Overflow, outbound_queue};
pub use room::{Hub, SwapResult};
pub use session::{Next, Session};

/// A boxed future, so the room can hold any [`RoomLogic`] as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Identifies one channel (one join of one socket) across the node.
pub type MemberId = SubscriberId;

/// The channel a plugin call is about.
#[derive(Debug, Clone)]
pub struct ChannelSocket {
    /// Which channel: unique on this node, the owner of its presence entries.
    pub channel: MemberId,
    /// `user_socket:<user_id>` or none.
    pub id: Option<Arc<str>>,
    /// The topic.
    pub topic: Arc<str>,
    /// The client's join reference.
    pub join_ref: Option<String>,
    /// Assigns, a JSON object as text.
    pub assigns: String,
}

/// Something a plugin asked the host to do during a call, applied in order after it returns.
#[derive(Debug)]
pub enum Effect {
    /// Push to the channel of the call.
    Push {
        /// Event name.
        event: String,
        /// Body.
        payload: Payload,
    },
    /// Broadcast to the topic; `exclude_self` for `broadcast_from`.
    Broadcast {
        /// Event name.
        event: String,
        /// Body.
        payload: Payload,
        /// Skip the channel of the call.
        exclude_self: bool,
    },
    /// Call `handle_info` on the channel of the call later.
    SendAfter {
        /// Delay.
        delay: Duration,
        /// Message for `handle_info`.
        message: Payload,
    },
}

/// What a plugin call returned besides its outcome.
#[derive(Debug)]
pub struct Handled<T> {
    /// The callback's decision.
    pub outcome: T,
    /// New assigns (JSON object text), when changed.
    pub assigns: Option<String>,
    /// Host calls made during the call, in order.
    pub effects: Vec<Effect>,
}

/// Why a plugin call produced no outcome.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The plugin returned an error: the channel crashes, the instance lives on.
    #[error("plugin error: {0}")]
    Failed(String),
    /// The instance trapped (panic, time limit, memory cap): every channel of the room
    /// crashes and the instance is discarded.
    #[error("plugin crashed: {0}")]
    Crashed(String),
}

/// The result of a plugin call.
pub type CallResult<T> = Result<Handled<T>, CallError>;

/// What `join` decided.
#[derive(Debug)]
pub enum JoinOutcome {
    /// Joined, with this reply.
    Ok(Payload),
    /// Refused, with this reply.
    Refused(Payload),
}

/// What `handle_in` decided.
#[derive(Debug)]
pub enum InOutcome {
    /// Nothing to answer.
    NoReply,
    /// Answer the message.
    Reply(Status, Payload),
    /// Stop the channel, answering first if a reply is given.
    Stop(String, Option<(Status, Payload)>),
}

/// What `handle_out` and `handle_info` decided.
#[derive(Debug)]
pub enum InfoOutcome {
    /// Keep going.
    NoReply,
    /// Stop the channel with this reason.
    Stop(String),
}

/// The channel logic of one room: one plugin instance.
pub trait RoomLogic: Send + 'static {
    /// The plugin version this instance runs.
    fn version(&self) -> &str;
    /// Hot reload: the room's state to hand to the next version (empty: nothing).
    fn snapshot(&mut self) -> BoxFuture<'_, Result<Vec<u8>, CallError>>;
    /// Hot reload: takes over `state` that version `from_version` made. `Ok(false)` when
    /// this plugin does not take state (the room starts fresh).
    fn restore<'a>(
        &'a mut self,
        state: Vec<u8>,
        from_version: &'a str,
    ) -> BoxFuture<'a, Result<bool, CallError>>;
    /// Phoenix `join/3`.
    fn join<'a>(
        &'a mut self,
        payload: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<JoinOutcome>>;
    /// Phoenix `handle_in/3`.
    fn handle_in<'a>(
        &'a mut self,
        event: &'a str,
        payload: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<InOutcome>>;
    /// Phoenix `handle_out/3`, for intercepted events.
    fn handle_out<'a>(
        &'a mut self,
        event: &'a str,
        payload: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<InfoOutcome>>;
    /// Phoenix `handle_info/2`.
    fn handle_info<'a>(
        &'a mut self,
        message: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<InfoOutcome>>;
    /// Phoenix `terminate/2`; its effects are applied after the channel is gone.
    fn terminate<'a>(
        &'a mut self,
        reason: &'a str,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, Result<Vec<Effect>, CallError>>;
}

/// Makes room instances of one plugin.
pub trait LogicFactory: Send + Sync {
    /// The room of `topic` lost its instance (trap, time limit, memory cap); counts toward
    /// the plugin's quarantine.
    fn crashed(&self, topic: &str, cause: &str);

    /// A fresh instance for the room of `topic`.
    fn instantiate<'a>(
        &'a self,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn RoomLogic>, String>>;
}

/// Which plugin serves a topic.
#[derive(Clone)]
pub struct Route {
    /// Plugin name, for logs.
    pub plugin: Arc<str>,
    /// Its version.
    pub version: Arc<str>,
    /// Events that go through `handle_out`.
    pub intercepts: Arc<[String]>,
    /// Instances of the plugin.
    pub factory: Arc<dyn LogicFactory>,
}

/// Maps topics to plugins.
pub trait Router: Send + Sync {
    /// The plugin serving `topic`, if any.
    fn route(&self, topic: &str) -> Option<Route>;
}
