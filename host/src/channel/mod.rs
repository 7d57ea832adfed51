//! Channels: the per-socket session state machine (joins, join refs, duplicate joins,
//! leaves, the channel cap) and the room actor that owns one plugin instance per live topic
//! and serialises every call into it.
//!
//! The room calls a [`RoomLogic`] trait and applies the [`Effect`]s a call returns; it knows
//! nothing of wasmtime. The session reads decoded protocol messages and writes
//! [`Outbound`] items into the socket's bounded queue; it knows nothing of axum or
//! WebSockets.
//!
//! Bottom up (each file imports only those before it):
//! - `feed`: a room's fastlane broadcasts, read by each member at its own cursor.
//! - `outbound`: the socket's queue, bounded in bytes, and the order shared with feeds.
//! - `remote`: what nodes tell each other about owned rooms, and this node's channels whose
//!   room runs on another node.
//! - `room`: the room actor, one per live topic, and what the rooms of a node share; and
//!   (`room::owned`), on a cluster, the rooms of plugins placed on an owner: one instance
//!   per room for the whole cluster, on the node holding the room's lease, to which the
//!   room actor of every other node with members forwards.
//! - `hub`: the live rooms of the node, started on first join, moved on hot reload; what
//!   other nodes send this one, handed to its rooms.
//! - `session`: one socket's channels.

mod feed;
mod hub;
mod outbound;
mod remote;
mod room;
mod session;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::config::Limits;
use crate::limit::Warnings;
use crate::presence::Account;
use crate::protocol::{Payload, Status};
use crate::pubsub::SubscriberId;

pub use hub::Hub;
pub use hub::Relay;
pub use outbound::{Outbound, OutboundRx, OutboundTx, Overflow, Slowness, outbound_queue};
pub use room::{ROOM_WAIT, SwapResult};
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
    /// The presence bytes its socket holds, which what it tracks is charged to.
    pub presence: Arc<Account>,
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
    /// The node refused the instance a resource it shares with every plugin (its memory
    /// budget was used up): the room ends as after a crash, without blaming the plugin
    /// (it does not count toward quarantine).
    #[error("plugin evicted: {0}")]
    Evicted(String),
}

/// What the host calls of the next plugin call may still do, beside the per-call limits
/// the instance keeps itself (`max_messages_per_call`, `max_plugin_payload_bytes`): the
/// room hands it over before each call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallBudget {
    /// Broadcasts still allowed to the message being handled, across its call and every
    /// `handle_out` round its broadcasts cause: one call's worth in all.
    pub broadcasts: usize,
    /// Payload bytes of those broadcasts.
    pub broadcast_bytes: usize,
    /// Timers the room may still arm (`max_timers_per_channel` for each member, less those
    /// pending).
    pub timers: usize,
}

impl CallBudget {
    /// A whole call's worth: what one message may broadcast, and `timers` timers.
    pub fn full(limits: &Limits, timers: usize) -> Self {
        CallBudget {
            broadcasts: limits.max_messages_per_call,
            broadcast_bytes: limits.max_plugin_payload_bytes,
            timers,
        }
    }
}

/// Why no instance could be made for a room: what the joining client is told, and the
/// details for the log.
#[derive(Debug, Clone)]
pub struct Unavailable {
    /// The reason in the join's error reply (`plugin unavailable`, `server memory full`).
    pub reason: &'static str,
    /// What happened.
    pub detail: String,
}

/// How a join ended, as the session needs to know.
enum JoinResult {
    /// Joined, reading the room's feed from here; the room (or, for a room run by another
    /// node, the owner's answer) already queued the ok reply (before any broadcast the
    /// cursor reads).
    Joined(feed::Cursor),
    /// Refused by the plugin, with its reply.
    Refused(Payload),
    /// The plugin failed in `join`.
    Crashed,
    /// No instance could be made, for this reason.
    Unavailable(&'static str),
    /// The room was closing; ask the hub again.
    Retry,
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
    /// Whether the instance hands its state over (`snapshot` / `restore`).
    fn stateful(&self) -> bool;
    /// What the next call's host calls may still do (see [`CallBudget`]); until it is
    /// set, a call gets a whole call's worth.
    fn budget(&mut self, budget: CallBudget);
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
    ) -> BoxFuture<'a, Result<Box<dyn RoomLogic>, Unavailable>>;
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
    /// How often the host may warn about the plugin.
    pub warnings: Arc<Warnings>,
    /// The version's counters (swap pauses).
    pub metrics: Arc<crate::metrics::PluginMetrics>,
    /// Where its rooms run on a cluster.
    pub placement: Placement,
    /// How often an owned room's state is saved for the node that takes it over.
    pub snapshot_every: SnapshotEvery,
}

/// Where the rooms of a plugin run on a cluster (on one node, always on that node).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    /// One instance per room for the whole cluster, on the node that holds the room's
    /// lease; the calls of channels on other nodes are forwarded to it. The default: a
    /// room's state is one state, whichever node its members are on.
    #[default]
    Owner,
    /// One instance per room on every node with members, calls handled where the socket
    /// is (no hop): for plugins that keep no room state, such as a chat relay.
    Local,
}

/// When an owned room saves its state (for plugins that export `state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotEvery {
    /// After every message, before what the message caused leaves the room: a takeover
    /// loses nothing a member saw.
    Message,
    /// At most this often, after a message: a takeover loses at most this much.
    Interval(std::time::Duration),
}

impl Default for SnapshotEvery {
    fn default() -> Self {
        SnapshotEvery::Interval(std::time::Duration::from_secs(1))
    }
}

/// Shortest and longest `snapshot_every` interval, in milliseconds.
pub const SNAPSHOT_EVERY_MS: std::ops::RangeInclusive<u64> = 10..=3_600_000;

impl<'de> Deserialize<'de> for SnapshotEvery {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Word(String),
            Millis(u64),
        }
        match Given::deserialize(d)? {
            Given::Word(word) if word == "message" => Ok(SnapshotEvery::Message),
            Given::Millis(ms) if SNAPSHOT_EVERY_MS.contains(&ms) => Ok(SnapshotEvery::Interval(
                std::time::Duration::from_millis(ms),
            )),
            _ => Err(serde::de::Error::custom(format!(
                "snapshot_every must be \"message\" or milliseconds from {} to {}",
                SNAPSHOT_EVERY_MS.start(),
                SNAPSHOT_EVERY_MS.end()
            ))),
        }
    }
}

/// Maps topics to plugins.
pub trait Router: Send + Sync {
    /// The plugin serving `topic`, if any.
    fn route(&self, topic: &str) -> Option<Route>;
}
