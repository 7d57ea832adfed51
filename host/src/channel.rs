//! Channels: the per-socket session state machine (joins, join refs, duplicate joins,
//! leaves, the channel cap) and the room actor that owns one plugin instance per live topic
//! and serialises every call into it.
//!
//! The room calls a [`RoomLogic`] trait and applies the [`Effect`]s a call returns; it knows
//! nothing of wasmtime. The session reads decoded [`Message`]s and writes [`Outbound`]
//! items into the socket's bounded queue; it knows nothing of axum or WebSockets.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::config::Limits;
use crate::presence::Tracker;
use crate::protocol::{self, Message, Payload, Status, event, reason};
use crate::pubsub::{Broadcast, PubSub, Subscriber, SubscriberId};
use crate::stats::Stats;

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

// ---------------------------------------------------------------------------------------
// The socket's outbound queue
// ---------------------------------------------------------------------------------------

/// Something to write to a socket; the socket task encodes it with its serializer.
#[derive(Debug)]
pub enum Outbound {
    /// A reply to a client message.
    Reply {
        /// Join reference of the channel.
        join_ref: Option<String>,
        /// The message's reference.
        msg_ref: Option<String>,
        /// Topic.
        topic: Arc<str>,
        /// Status.
        status: Status,
        /// Response.
        payload: Payload,
    },
    /// A push to one channel.
    Push {
        /// Join reference of the channel.
        join_ref: Option<String>,
        /// Topic.
        topic: Arc<str>,
        /// Event.
        event: String,
        /// Body.
        payload: Payload,
    },
    /// A broadcast, encoded once for all subscribers.
    Broadcast(Arc<Broadcast>),
    /// The socket closed a channel itself (leave, duplicate join): `phx_close`.
    Close {
        /// Topic.
        topic: Arc<str>,
        /// Join reference of the channel.
        join_ref: Option<String>,
    },
    /// The room ended a channel: `phx_close` (stopped) or `phx_error` (crashed).
    ChannelDown {
        /// Topic.
        topic: Arc<str>,
        /// Join reference of the channel.
        join_ref: Option<String>,
        /// Which channel, so a stale notice does not end a newer join.
        member: MemberId,
        /// `phx_error` rather than `phx_close`.
        crashed: bool,
    },
}

impl Outbound {
    /// Approximate bytes this item holds, for the queue limit.
    fn cost(&self) -> usize {
        const OVERHEAD: usize = 64;
        OVERHEAD
            + match self {
                Outbound::Reply { payload, .. } | Outbound::Push { payload, .. } => payload.len(),
                Outbound::Broadcast(b) => b.payload.len(),
                Outbound::Close { .. } | Outbound::ChannelDown { .. } => 0,
            }
    }
}

struct QueueState {
    bytes: AtomicUsize,
    limit: usize,
    overflowed: AtomicBool,
    overflow: Notify,
}

/// Sending side of a socket's outbound queue, bounded in bytes. Cheap to clone.
#[derive(Clone)]
pub struct OutboundTx {
    tx: mpsc::UnboundedSender<(Outbound, usize)>,
    state: Arc<QueueState>,
}

/// Receiving side of a socket's outbound queue.
pub struct OutboundRx {
    rx: mpsc::UnboundedReceiver<(Outbound, usize)>,
    state: Arc<QueueState>,
}

/// A queue for one socket holding at most `limit_bytes`.
pub fn outbound_queue(limit_bytes: usize) -> (OutboundTx, OutboundRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let state = Arc::new(QueueState {
        bytes: AtomicUsize::new(0),
        limit: limit_bytes,
        overflowed: AtomicBool::new(false),
        overflow: Notify::new(),
    });
    (
        OutboundTx {
            tx,
            state: state.clone(),
        },
        OutboundRx { rx, state },
    )
}

impl OutboundTx {
    /// Enqueues without waiting. Past the byte limit the queue is marked overflowed (the
    /// socket task then disconnects the slow client) and the item is dropped. An item
    /// reaching an empty queue is always taken.
    pub fn send(&self, item: Outbound) {
        if self.state.overflowed.load(Ordering::Relaxed) {
            return;
        }
        let cost = item.cost();
        let before = self.state.bytes.fetch_add(cost, Ordering::Relaxed);
        // The limit bounds the backlog: one item larger than it (a big presence_state) is
        // still delivered to a client that has read everything else.
        if before > 0 && before + cost > self.state.limit {
            self.state.bytes.fetch_sub(cost, Ordering::Relaxed);
            self.state.overflowed.store(true, Ordering::Relaxed);
            self.state.overflow.notify_one();
            return;
        }
        if self.tx.send((item, cost)).is_err() {
            self.state.bytes.fetch_sub(cost, Ordering::Relaxed);
        }
    }
}

impl OutboundRx {
    /// The next item.
    pub async fn recv(&mut self) -> Option<Outbound> {
        let (item, cost) = self.rx.recv().await?;
        self.state.bytes.fetch_sub(cost, Ordering::Relaxed);
        Some(item)
    }

    /// The next item if one is ready.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        let (item, cost) = self.rx.try_recv().ok()?;
        self.state.bytes.fetch_sub(cost, Ordering::Relaxed);
        Some(item)
    }

    /// A handle that resolves once the queue went over its limit.
    pub fn overflow(&self) -> Overflow {
        Overflow(self.state.clone())
    }
}

/// Watches a queue for overflow.
pub struct Overflow(Arc<QueueState>);

impl Overflow {
    /// Resolves once the queue went over its limit.
    pub async fn wait(&self) {
        loop {
            let notified = self.0.overflow.notified();
            if self.0.overflowed.load(Ordering::Relaxed) {
                return;
            }
            notified.await;
        }
    }
}

/// Fastlane subscriber for one channel: non-intercepted broadcasts straight to the socket.
struct MemberSink {
    out: OutboundTx,
    intercepts: Arc<[String]>,
}

impl Subscriber for MemberSink {
    fn deliver(&self, broadcast: &Arc<Broadcast>) {
        if !self.intercepts.iter().any(|e| *e == broadcast.event) {
            self.out.send(Outbound::Broadcast(broadcast.clone()));
        }
    }
}

/// The room's own subscriber: intercepted broadcasts from elsewhere (the HTTP API) go to
/// the room, which runs `handle_out` once per member.
struct RoomSink {
    tx: mpsc::Sender<RoomMsg>,
    intercepts: Arc<[String]>,
    topic: Arc<str>,
}

impl Subscriber for RoomSink {
    fn deliver(&self, broadcast: &Arc<Broadcast>) {
        if self.intercepts.iter().any(|e| *e == broadcast.event)
            && self
                .tx
                .try_send(RoomMsg::Intercepted(broadcast.clone()))
                .is_err()
        {
            tracing::warn!(topic = %self.topic, event = %broadcast.event, "room mailbox full: intercepted broadcast dropped");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The hub: live rooms of this node
// ---------------------------------------------------------------------------------------

/// The live rooms of this node and what they need: routing, PubSub, limits.
pub struct Hub {
    rooms: Mutex<HashMap<Arc<str>, RoomHandle>>,
    router: Arc<dyn Router>,
    pubsub: Arc<dyn PubSub>,
    presence: Arc<Tracker>,
    limits: Limits,
    stats: Arc<Stats>,
    next_id: AtomicU64,
}

#[derive(Clone)]
struct RoomHandle {
    id: u64,
    tx: mpsc::Sender<RoomMsg>,
}

enum RoomMsg {
    Join {
        member: MemberId,
        socket: ChannelSocket,
        out: OutboundTx,
        payload: Payload,
        msg_ref: Option<String>,
        done: oneshot::Sender<JoinResult>,
    },
    In {
        member: MemberId,
        event: String,
        payload: Payload,
        msg_ref: Option<String>,
    },
    Leave {
        member: MemberId,
        reason: &'static str,
    },
    Intercepted(Arc<Broadcast>),
    Info {
        member: MemberId,
        message: Payload,
    },
}

/// How a join ended, as the session needs to know.
enum JoinResult {
    /// Joined; the room already queued the ok reply (before any broadcast can reach the
    /// channel).
    Joined,
    /// Refused by the plugin, with its reply.
    Refused(Payload),
    /// The plugin failed in `join`.
    Crashed,
    /// No instance could be made.
    Unavailable,
    /// The room was closing; ask the hub again.
    Retry,
}

impl Hub {
    /// A hub with no rooms yet.
    pub fn new(
        router: Arc<dyn Router>,
        pubsub: Arc<dyn PubSub>,
        presence: Arc<Tracker>,
        limits: Limits,
        stats: Arc<Stats>,
    ) -> Arc<Self> {
        Arc::new(Hub {
            rooms: Mutex::default(),
            router,
            pubsub,
            presence,
            limits,
            stats,
            next_id: AtomicU64::new(1),
        })
    }

    /// The event counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The PubSub rooms publish through.
    pub fn pubsub(&self) -> &Arc<dyn PubSub> {
        &self.pubsub
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Number of live rooms.
    pub fn room_count(&self) -> usize {
        self.lock_rooms().len()
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn lock_rooms(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, RoomHandle>> {
        // A std lock: held for a map lookup or insert, never across an await.
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The room of `topic`, started if needed. `Err` when no plugin serves the topic or the
    /// node is at its room cap.
    fn room(self: &Arc<Self>, topic: &Arc<str>) -> Result<RoomHandle, &'static str> {
        let mut rooms = self.lock_rooms();
        if let Some(room) = rooms.get(topic) {
            return Ok(room.clone());
        }
        let route = self.router.route(topic).ok_or(reason::UNMATCHED_TOPIC)?;
        if rooms.len() >= self.limits.max_rooms as usize {
            Stats::bump(&self.stats.rooms_refused);
            tracing::warn!(%topic, max_rooms = self.limits.max_rooms, "room cap reached: join refused");
            return Err(reason::AT_CAPACITY);
        }
        let (tx, rx) = mpsc::channel(self.limits.room_mailbox);
        let handle = RoomHandle {
            id: self.next_id(),
            tx,
        };
        rooms.insert(topic.clone(), handle.clone());
        let room = Room {
            id: handle.id,
            topic: topic.clone(),
            hub: self.clone(),
            route,
            tx: handle.tx.downgrade(),
            members: HashMap::new(),
            pending_out: VecDeque::new(),
            timers: JoinSet::new(),
        };
        tokio::spawn(room.run(rx));
        Ok(handle)
    }

    fn remove_room(&self, topic: &str, id: u64) {
        let mut rooms = self.lock_rooms();
        if rooms.get(topic).is_some_and(|r| r.id == id) {
            rooms.remove(topic);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The room actor
// ---------------------------------------------------------------------------------------

struct Member {
    socket: ChannelSocket,
    out: OutboundTx,
}

struct Room {
    id: u64,
    topic: Arc<str>,
    hub: Arc<Hub>,
    route: Route,
    tx: mpsc::WeakSender<RoomMsg>,
    members: HashMap<MemberId, Member>,
    /// Intercepted broadcasts made by this room's own calls, handled after the current one.
    pending_out: VecDeque<Arc<Broadcast>>,
    /// `send-after` timers; dropped (aborted) with the room.
    timers: JoinSet<()>,
}

/// A room ends when it has no members left or its instance crashed.
enum Flow {
    Continue,
    Crashed(String),
}

impl Room {
    async fn run(mut self, mut rx: mpsc::Receiver<RoomMsg>) {
        let logic = self.route.factory.instantiate(&self.topic).await;
        let mut logic = match logic {
            Ok(logic) => logic,
            Err(e) => {
                tracing::error!(plugin = %self.route.plugin, topic = %self.topic, error = %e, "plugin instantiation failed");
                self.hub.remove_room(&self.topic, self.id);
                rx.close();
                while let Some(msg) = rx.recv().await {
                    if let RoomMsg::Join { done, .. } = msg {
                        let _ = done.send(JoinResult::Unavailable);
                    }
                }
                return;
            }
        };
        // The hub holds a sender until this room removes itself, so the upgrade succeeds.
        let room_sink = match (self.route.intercepts.is_empty(), self.tx.upgrade()) {
            (false, Some(tx)) => {
                let id = self.hub.next_id();
                let sink = RoomSink {
                    tx,
                    intercepts: self.route.intercepts.clone(),
                    topic: self.topic.clone(),
                };
                self.hub.pubsub.subscribe(&self.topic, id, Arc::new(sink));
                Some(id)
            }
            _ => None,
        };
        while let Some(msg) = rx.recv().await {
            let mut flow = self.handle(&mut *logic, msg).await;
            while let (Flow::Continue, Some(b)) = (&flow, self.pending_out.pop_front()) {
                flow = self.handle_out(&mut *logic, &b).await;
            }
            if let Flow::Crashed(cause) = flow {
                self.route.factory.crashed(&self.topic, &cause);
                let ids: Vec<MemberId> = self.members.keys().copied().collect();
                for id in ids {
                    if let Some(member) = self.detach(id) {
                        notify_down(id, &member, true);
                    }
                }
                break;
            }
            while self.timers.try_join_next().is_some() {}
            if self.members.is_empty() {
                break;
            }
        }
        if let Some(id) = room_sink {
            self.hub.pubsub.unsubscribe(&self.topic, id);
        }
        self.hub.remove_room(&self.topic, self.id);
        rx.close();
        while let Some(msg) = rx.recv().await {
            if let RoomMsg::Join { done, .. } = msg {
                let _ = done.send(JoinResult::Retry);
            }
        }
    }

    async fn handle(&mut self, logic: &mut dyn RoomLogic, msg: RoomMsg) -> Flow {
        match msg {
            RoomMsg::Join {
                member,
                socket,
                out,
                payload,
                msg_ref,
                done,
            } => {
                let (result, flow) = self
                    .join(logic, member, socket, out, payload, msg_ref)
                    .await;
                if !matches!(result, JoinResult::Joined) {
                    // A join that did not happen leaves nothing behind, presence included.
                    self.hub.presence.untrack_owner(&self.topic, member);
                }
                let _ = done.send(result);
                flow
            }
            RoomMsg::In {
                member,
                event,
                payload,
                msg_ref,
            } => {
                let Some(m) = self.members.get(&member) else {
                    return Flow::Continue;
                };
                let result = logic.handle_in(&event, payload, &m.socket).await;
                self.after_call(
                    logic,
                    member,
                    result,
                    |room, member, outcome| match outcome {
                        InOutcome::NoReply => None,
                        InOutcome::Reply(status, payload) => {
                            room.reply(member, msg_ref, status, payload);
                            None
                        }
                        InOutcome::Stop(reason, reply) => {
                            if let Some((status, payload)) = reply {
                                room.reply(member, msg_ref, status, payload);
                            }
                            Some(reason)
                        }
                    },
                )
                .await
            }
            RoomMsg::Leave { member, reason } => match self.detach(member) {
                Some(m) => self.terminate(logic, member, &m, reason).await,
                None => Flow::Continue,
            },
            RoomMsg::Intercepted(b) => self.handle_out(logic, &b).await,
            RoomMsg::Info { member, message } => {
                let Some(m) = self.members.get(&member) else {
                    return Flow::Continue;
                };
                let result = logic.handle_info(message, &m.socket).await;
                self.after_call(logic, member, result, info_stop).await
            }
        }
    }

    /// Calls `join`; on success queues the ok reply, then subscribes the channel (so no
    /// broadcast overtakes the reply), then applies the call's effects.
    async fn join(
        &mut self,
        logic: &mut dyn RoomLogic,
        member: MemberId,
        mut socket: ChannelSocket,
        out: OutboundTx,
        payload: Payload,
        msg_ref: Option<String>,
    ) -> (JoinResult, Flow) {
        match logic.join(payload, &socket).await {
            Ok(Handled {
                outcome: JoinOutcome::Ok(reply),
                assigns,
                effects,
            }) => {
                if let Some(assigns) = assigns {
                    socket.assigns = assigns;
                }
                out.send(Outbound::Reply {
                    join_ref: socket.join_ref.clone(),
                    msg_ref,
                    topic: self.topic.clone(),
                    status: Status::Ok,
                    payload: reply,
                });
                let sink = MemberSink {
                    out: out.clone(),
                    intercepts: self.route.intercepts.clone(),
                };
                self.hub
                    .pubsub
                    .subscribe(&self.topic, member, Arc::new(sink));
                self.members.insert(member, Member { socket, out });
                self.apply(member, effects);
                (JoinResult::Joined, Flow::Continue)
            }
            Ok(Handled {
                outcome: JoinOutcome::Refused(reply),
                ..
            }) => (JoinResult::Refused(reply), Flow::Continue),
            Err(CallError::Failed(e)) => {
                Stats::bump(&self.hub.stats.channel_errors);
                tracing::warn!(plugin = %self.route.plugin, topic = %self.topic, error = %e, "join failed");
                (JoinResult::Crashed, Flow::Continue)
            }
            Err(CallError::Crashed(e)) => (JoinResult::Crashed, Flow::Crashed(e)),
        }
    }

    /// Runs `handle_out` for every member the broadcast is for.
    async fn handle_out(&mut self, logic: &mut dyn RoomLogic, b: &Broadcast) -> Flow {
        let targets: Vec<MemberId> = self
            .members
            .keys()
            .copied()
            .filter(|id| b.except != Some(*id))
            .collect();
        for member in targets {
            let Some(m) = self.members.get(&member) else {
                continue;
            };
            let result = logic
                .handle_out(&b.event, b.payload.clone(), &m.socket)
                .await;
            if let Flow::Crashed(e) = self.after_call(logic, member, result, info_stop).await {
                return Flow::Crashed(e);
            }
        }
        Flow::Continue
    }

    /// Applies a call's assigns and effects, then its outcome (`decide` returns a stop
    /// reason); a failed call crashes that channel, a crashed one the room.
    async fn after_call<T>(
        &mut self,
        logic: &mut dyn RoomLogic,
        member: MemberId,
        result: CallResult<T>,
        decide: impl FnOnce(&mut Self, MemberId, T) -> Option<String>,
    ) -> Flow {
        match result {
            Ok(handled) => {
                if let (Some(assigns), Some(m)) = (handled.assigns, self.members.get_mut(&member)) {
                    m.socket.assigns = assigns;
                }
                self.apply(member, handled.effects);
                match decide(self, member, handled.outcome) {
                    None => Flow::Continue,
                    Some(reason) => self.stop(logic, member, &reason).await,
                }
            }
            Err(CallError::Failed(e)) => {
                Stats::bump(&self.hub.stats.channel_errors);
                tracing::warn!(plugin = %self.route.plugin, topic = %self.topic, error = %e, "plugin error: channel crashed");
                if let Some(m) = self.detach(member) {
                    notify_down(member, &m, true);
                }
                Flow::Continue
            }
            Err(CallError::Crashed(e)) => Flow::Crashed(e),
        }
    }

    /// A handler asked to stop the channel: `phx_close`, then `terminate`.
    async fn stop(&mut self, logic: &mut dyn RoomLogic, member: MemberId, reason: &str) -> Flow {
        let Some(m) = self.detach(member) else {
            return Flow::Continue;
        };
        notify_down(member, &m, false);
        self.terminate(logic, member, &m, reason).await
    }

    /// Calls `terminate` for a channel already detached and applies what it asked for.
    async fn terminate(
        &mut self,
        logic: &mut dyn RoomLogic,
        member: MemberId,
        m: &Member,
        reason: &str,
    ) -> Flow {
        let flow = match logic.terminate(reason, &m.socket).await {
            Ok(effects) => {
                self.apply(member, effects);
                Flow::Continue
            }
            Err(CallError::Crashed(e)) => Flow::Crashed(e),
            Err(CallError::Failed(_)) => Flow::Continue,
        };
        // Presence tracked by a channel that is already gone must not stay behind.
        self.hub.presence.untrack_owner(&self.topic, member);
        flow
    }

    /// Takes a channel out of the room: no more broadcasts, its presence entries leave.
    fn detach(&mut self, member: MemberId) -> Option<Member> {
        let m = self.members.remove(&member)?;
        self.hub.pubsub.unsubscribe(&self.topic, member);
        self.hub.presence.untrack_owner(&self.topic, member);
        Some(m)
    }

    fn reply(&self, member: MemberId, msg_ref: Option<String>, status: Status, payload: Payload) {
        if let Some(m) = self.members.get(&member) {
            m.out.send(Outbound::Reply {
                join_ref: m.socket.join_ref.clone(),
                msg_ref,
                topic: self.topic.clone(),
                status,
                payload,
            });
        }
    }

    fn apply(&mut self, member: MemberId, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Push { event, payload } => {
                    if let Some(m) = self.members.get(&member) {
                        m.out.send(Outbound::Push {
                            join_ref: m.socket.join_ref.clone(),
                            topic: self.topic.clone(),
                            event,
                            payload,
                        });
                    }
                }
                Effect::Broadcast {
                    event,
                    payload,
                    exclude_self,
                } => {
                    let except = exclude_self.then_some(member);
                    let intercepted = self.route.intercepts.contains(&event);
                    let b = Arc::new(Broadcast::new(self.topic.clone(), event, payload, except));
                    if intercepted {
                        self.pending_out.push_back(b);
                    } else {
                        self.hub.pubsub.publish(b);
                    }
                }
                Effect::SendAfter { delay, message } => {
                    if self.timers.len()
                        >= self.hub.limits.max_timers_per_channel * self.members.len().max(1)
                    {
                        tracing::warn!(plugin = %self.route.plugin, topic = %self.topic, "too many pending timers: send-after dropped");
                        continue;
                    }
                    let tx = self.tx.clone();
                    self.timers.spawn(async move {
                        tokio::time::sleep(delay).await;
                        if let Some(tx) = tx.upgrade() {
                            let _ = tx.send(RoomMsg::Info { member, message }).await;
                        }
                    });
                }
            }
        }
    }
}

fn info_stop(_: &mut Room, _: MemberId, outcome: InfoOutcome) -> Option<String> {
    match outcome {
        InfoOutcome::NoReply => None,
        InfoOutcome::Stop(reason) => Some(reason),
    }
}

fn notify_down(id: MemberId, m: &Member, crashed: bool) {
    m.out.send(Outbound::ChannelDown {
        topic: m.socket.topic.clone(),
        join_ref: m.socket.join_ref.clone(),
        member: id,
        crashed,
    });
}

// ---------------------------------------------------------------------------------------
// The session: one socket's channels
// ---------------------------------------------------------------------------------------

struct Joined {
    join_ref: Option<String>,
    member: MemberId,
    room: RoomHandle,
}

/// The channels of one socket and the protocol rules that govern them.
pub struct Session {
    hub: Arc<Hub>,
    socket_id: Option<Arc<str>>,
    assigns: String,
    out: OutboundTx,
    channels: HashMap<Arc<str>, Joined>,
}

/// Terminate reason for a channel replaced by a duplicate join.
const DUPLICATE_JOIN: &str = "duplicate_join";
/// How often a join is retried when it meets a room that is closing.
const JOIN_RETRIES: usize = 3;

impl Session {
    /// A session for a socket with this identity, writing to `out`.
    pub fn new(
        hub: Arc<Hub>,
        socket_id: Option<String>,
        assigns: &serde_json::Map<String, serde_json::Value>,
        out: OutboundTx,
    ) -> Self {
        let assigns = serde_json::to_string(assigns).unwrap_or_else(|_| "{}".into());
        Session {
            hub,
            socket_id: socket_id.map(Arc::from),
            assigns,
            out,
            channels: HashMap::new(),
        }
    }

    fn reply(&self, msg: &Message, topic: Arc<str>, status: Status, payload: Payload) {
        self.out.send(Outbound::Reply {
            join_ref: msg.join_ref.clone(),
            msg_ref: msg.msg_ref.clone(),
            topic,
            status,
            payload,
        });
    }

    /// Answers a message with an error reply instead of handling it (messages without a
    /// ref get nothing).
    pub fn refuse(&self, msg: &Message, why: &str) {
        if msg.msg_ref.is_some() {
            self.reply(
                msg,
                Arc::from(msg.topic.as_str()),
                Status::Error,
                protocol::reason_payload(why),
            );
        }
    }

    /// Handles one client message.
    pub async fn handle(&mut self, msg: Message) {
        let topic: Arc<str> = Arc::from(msg.topic.as_str());
        if msg.topic == protocol::PHOENIX_TOPIC && msg.event == event::HEARTBEAT {
            return self.reply(&msg, topic, Status::Ok, Payload::empty());
        }
        match msg.event.as_str() {
            event::JOIN => self.join(msg, topic).await,
            event::LEAVE => {
                if self
                    .channels
                    .get(&topic)
                    .is_some_and(|c| is_stale(&msg, &c.join_ref))
                {
                    return;
                }
                self.reply(&msg, topic.clone(), Status::Ok, Payload::empty());
                if let Some(joined) = self.channels.remove(&topic) {
                    self.out.send(Outbound::Close {
                        topic,
                        join_ref: joined.join_ref,
                    });
                    let _ = joined
                        .room
                        .tx
                        .send(RoomMsg::Leave {
                            member: joined.member,
                            reason: reason::LEFT,
                        })
                        .await;
                }
            }
            _ => match self.channels.get(&topic) {
                None => self.reply(
                    &msg,
                    topic,
                    Status::Error,
                    protocol::reason_payload(reason::UNMATCHED_TOPIC),
                ),
                Some(joined) if is_stale(&msg, &joined.join_ref) => {}
                Some(joined) => {
                    let room = joined.room.tx.clone();
                    let m = RoomMsg::In {
                        member: joined.member,
                        event: msg.event,
                        payload: msg.payload,
                        msg_ref: msg.msg_ref,
                    };
                    let _ = room.send(m).await;
                }
            },
        }
    }

    async fn join(&mut self, msg: Message, topic: Arc<str>) {
        let replaced = self.channels.remove(&topic);
        if let Some(old) = &replaced {
            let _ = old
                .room
                .tx
                .send(RoomMsg::Leave {
                    member: old.member,
                    reason: DUPLICATE_JOIN,
                })
                .await;
        } else if self.channels.len() >= self.hub.limits.max_channels_per_socket {
            return self.reply(
                &msg,
                topic,
                Status::Error,
                protocol::reason_payload(reason::TOO_MANY_CHANNELS),
            );
        }
        let member = self.hub.next_id();
        let socket = ChannelSocket {
            channel: member,
            id: self.socket_id.clone(),
            topic: topic.clone(),
            join_ref: msg.join_ref.clone(),
            assigns: self.assigns.clone(),
        };
        let mut outcome = JoinResult::Retry;
        let mut joined_room = None;
        for _ in 0..JOIN_RETRIES {
            let room = match self.hub.room(&topic) {
                Ok(room) => room,
                Err(why) => {
                    outcome = JoinResult::Refused(protocol::reason_payload(why));
                    break;
                }
            };
            let (done, result) = oneshot::channel();
            let m = RoomMsg::Join {
                member,
                socket: socket.clone(),
                out: self.out.clone(),
                payload: msg.payload.clone(),
                msg_ref: msg.msg_ref.clone(),
                done,
            };
            if room.tx.send(m).await.is_err() {
                continue;
            }
            outcome = result.await.unwrap_or(JoinResult::Retry);
            if !matches!(outcome, JoinResult::Retry) {
                joined_room = Some(room);
                break;
            }
        }
        match (outcome, joined_room) {
            (JoinResult::Joined, Some(room)) => {
                self.channels.insert(
                    topic.clone(),
                    Joined {
                        join_ref: msg.join_ref.clone(),
                        member,
                        room,
                    },
                );
            }
            (JoinResult::Refused(reply), _) => {
                self.reply(&msg, topic.clone(), Status::Error, reply)
            }
            (JoinResult::Crashed, _) => self.reply(
                &msg,
                topic.clone(),
                Status::Error,
                protocol::reason_payload(reason::JOIN_CRASHED),
            ),
            (JoinResult::Unavailable | JoinResult::Retry | JoinResult::Joined, _) => self.reply(
                &msg,
                topic.clone(),
                Status::Error,
                protocol::reason_payload(reason::PLUGIN_UNAVAILABLE),
            ),
        }
        if let Some(old) = replaced {
            self.out.send(Outbound::Close {
                topic,
                join_ref: old.join_ref,
            });
        }
    }

    /// The room ended a channel; returns whether the socket should tell the client (false
    /// when the notice is about a channel this socket already replaced or left).
    pub fn channel_down(&mut self, topic: &str, member: MemberId) -> bool {
        match self.channels.get(topic) {
            Some(joined) if joined.member == member => {
                self.channels.remove(topic);
                true
            }
            _ => false,
        }
    }

    /// Whether a broadcast for `topic` is for a channel this socket has.
    pub fn is_joined(&self, topic: &str) -> bool {
        self.channels.contains_key(topic)
    }

    /// The socket closed: every channel leaves with reason `closed`.
    pub async fn close(&mut self) {
        for (_, joined) in self.channels.drain() {
            let _ = joined
                .room
                .tx
                .send(RoomMsg::Leave {
                    member: joined.member,
                    reason: reason::CLOSED,
                })
                .await;
        }
    }
}

/// A message whose join_ref is not the channel's current one is dropped (V1 clients send
/// none and are never stale).
fn is_stale(msg: &Message, current: &Option<String>) -> bool {
    msg.join_ref.is_some() && msg.join_ref != *current
}
