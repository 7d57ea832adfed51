//! The room actor: one task per live topic that owns the topic's plugin instance,
//! serialises every call into it, applies what the calls asked for (pushes, broadcasts,
//! timers) to its members, and swaps the instance for another plugin version between two
//! messages (hot reload). Also what every room of the node shares ([`Node`]: the directory
//! of live rooms, PubSub, presence, limits, counters).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::feed::{Cursor, Feed};
use super::outbound::{Outbound, OutboundTx, Slowness};
use super::{
    CallBudget, CallError, CallResult, ChannelSocket, Effect, Handled, InOutcome, InfoOutcome,
    JoinOutcome, MemberId, RoomLogic, Route,
};
use crate::config::Limits;
use crate::limit::Bucket;
use crate::presence::Tracker;
use crate::protocol::{Payload, Status, reason};
use crate::pubsub::{Broadcast, PubSub, Subscriber};
use crate::stats::Stats;

/// How long a socket waits for a room to take its join, and an activation for a room to
/// swap, before it answers `room busy` (a room is never stuck for good: every message it
/// handles is bounded, but its mailbox may hold many).
pub const ROOM_WAIT: Duration = Duration::from_secs(5);

/// The room's subscription to its topic: fastlane broadcasts go to the room's feed, which
/// every member reads; intercepted ones from elsewhere (the HTTP API) go to the room, which
/// runs `handle_out` once per member. Decided once per broadcast, not once per member.
struct RoomSink {
    feed: Arc<Feed>,
    tx: mpsc::Sender<RoomMsg>,
    intercepts: Arc<[String]>,
    topic: Arc<str>,
    warnings: Arc<crate::limit::Warnings>,
}

impl Subscriber for RoomSink {
    fn deliver(&self, broadcast: &Arc<Broadcast>) {
        if !self.intercepts.iter().any(|e| *e == broadcast.event) {
            self.feed.append(broadcast);
        } else if self
            .tx
            .try_send(RoomMsg::Intercepted(broadcast.clone()))
            .is_err()
            && self.warnings.allow()
        {
            tracing::warn!(topic = %self.topic, event = %broadcast.event, "room mailbox full: intercepted broadcast dropped");
        }
    }
}

#[derive(Clone)]
pub(super) struct RoomHandle {
    id: u64,
    pub(super) plugin: Arc<str>,
    pub(super) tx: mpsc::Sender<RoomMsg>,
}

/// How one room's move to another version went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwapResult {
    /// Moved; the pause it cost the room.
    Moved(Duration),
    /// Stayed on its version, and why.
    Stayed(String),
    /// Still busy with messages queued before the swap after [`ROOM_WAIT`]: it moves once
    /// it reaches the swap.
    Pending,
}

pub(super) enum RoomMsg {
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
    /// The room's timer time refilled: run the timers it held back.
    Resume,
    /// Move to the plugin version of `route` (hot reload), whose instance for this room
    /// was made beforehand (or could not be).
    Upgrade {
        route: Route,
        next: Result<Box<dyn RoomLogic>, String>,
        done: oneshot::Sender<SwapResult>,
    },
}

/// How a join ended, as the session needs to know.
pub(super) enum JoinResult {
    /// Joined, reading the room's feed from here; the room already queued the ok reply
    /// (before any broadcast the cursor reads).
    Joined(Cursor),
    /// Refused by the plugin, with its reply.
    Refused(Payload),
    /// The plugin failed in `join`.
    Crashed,
    /// No instance could be made, for this reason.
    Unavailable(&'static str),
    /// The room was closing; ask the hub again.
    Retry,
}

/// What every room of the node shares: the directory of live rooms (which the hub keeps
/// and a room leaves when it ends), PubSub, presence, limits, counters and ids.
pub(super) struct Node {
    rooms: Mutex<HashMap<Arc<str>, RoomHandle>>,
    pub(super) pubsub: Arc<dyn PubSub>,
    pub(super) presence: Arc<Tracker>,
    pub(super) limits: Limits,
    pub(super) stats: Arc<Stats>,
    next_id: AtomicU64,
}

impl Node {
    /// A node with no rooms yet.
    pub(super) fn new(
        pubsub: Arc<dyn PubSub>,
        presence: Arc<Tracker>,
        limits: Limits,
        stats: Arc<Stats>,
    ) -> Self {
        Node {
            rooms: Mutex::default(),
            pubsub,
            presence,
            limits,
            stats,
            next_id: AtomicU64::new(1),
        }
    }

    /// A number unique on this node (channels, subscriptions, rooms).
    pub(super) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The directory of live rooms.
    pub(super) fn rooms(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, RoomHandle>> {
        // A std lock: held for a map lookup or insert, never across an await.
        self.rooms.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remove_room(&self, topic: &str, id: u64) {
        let mut rooms = self.rooms();
        if rooms.get(topic).is_some_and(|r| r.id == id) {
            rooms.remove(topic);
        }
    }
}

/// Starts the room of `topic`, served by `route`, and lists it in `rooms` (the directory,
/// locked by the caller, who checked the topic has no room).
pub(super) fn start(
    node: &Arc<Node>,
    rooms: &mut HashMap<Arc<str>, RoomHandle>,
    topic: &Arc<str>,
    route: Route,
) -> RoomHandle {
    let limits = &node.limits;
    let (tx, rx) = mpsc::channel(limits.room_mailbox);
    let handle = RoomHandle {
        id: node.next_id(),
        plugin: route.plugin.clone(),
        tx,
    };
    rooms.insert(topic.clone(), handle.clone());
    let room = Room {
        id: handle.id,
        topic: topic.clone(),
        node: node.clone(),
        route,
        tx: handle.tx.downgrade(),
        members: HashMap::new(),
        pending_out: VecDeque::new(),
        timers: JoinSet::new(),
        deferred: VecDeque::new(),
        resume_armed: false,
        timer_time: Bucket::new(
            limits.timer_cpu_ms_per_sec as f64,
            limits.timer_cpu_ms_per_sec as f64,
        ),
        cascade: CallBudget::full(limits, 0),
        feed: Feed::new(Slowness::from_limits(limits)),
        room_sink: None,
    };
    tokio::spawn(room.run(rx));
    handle
}

struct Member {
    socket: ChannelSocket,
    out: OutboundTx,
}

struct Room {
    id: u64,
    topic: Arc<str>,
    node: Arc<Node>,
    route: Route,
    tx: mpsc::WeakSender<RoomMsg>,
    members: HashMap<MemberId, Member>,
    /// Intercepted broadcasts made by this room's own calls, handled after the current one.
    pending_out: VecDeque<Arc<Broadcast>>,
    /// `send-after` timers; dropped (aborted) with the room.
    timers: JoinSet<()>,
    /// Timers that fired while the room had used its timer time, in order.
    deferred: VecDeque<(MemberId, Payload)>,
    /// A `Resume` is on its way for `deferred`.
    resume_armed: bool,
    /// Milliseconds of `handle_info` time the room may still use (`timer_cpu_ms_per_sec`).
    timer_time: Bucket,
    /// What the message being handled may still broadcast (see [`CallBudget`]).
    cascade: CallBudget,
    /// The fastlane broadcasts of the topic, which the members' sockets read.
    feed: Arc<Feed>,
    /// The room's PubSub subscription (feeding `feed` and `handle_out`).
    room_sink: Option<u64>,
}

/// A room ends when it has no members left or its instance crashed (or was evicted).
enum Flow {
    Continue,
    Crashed(String),
    Evicted(String),
}

impl Flow {
    /// The flow after a call's error: a trap ends the room, a failure only its channel.
    fn from_error(e: &CallError) -> Option<Flow> {
        match e {
            CallError::Failed(_) => None,
            CallError::Crashed(cause) => Some(Flow::Crashed(cause.clone())),
            CallError::Evicted(cause) => Some(Flow::Evicted(cause.clone())),
        }
    }
}

impl Room {
    async fn run(mut self, mut rx: mpsc::Receiver<RoomMsg>) {
        let logic = self.route.factory.instantiate(&self.topic).await;
        let mut logic = match logic {
            Ok(logic) => logic,
            Err(e) => {
                if self.route.warnings.allow() {
                    tracing::error!(plugin = %self.route.plugin, topic = %self.topic, error = %e.detail, "plugin instantiation failed");
                }
                self.node.remove_room(&self.topic, self.id);
                rx.close();
                while let Some(msg) = rx.recv().await {
                    if let RoomMsg::Join { done, .. } = msg {
                        let _ = done.send(JoinResult::Unavailable(e.reason));
                    }
                }
                return;
            }
        };
        self.subscribe();
        // On a cluster, what other nodes broadcast to the topic reaches the room before
        // its first member's join is answered.
        self.node.pubsub.ready(&self.topic).await;
        // And the presence other nodes hold for it.
        self.node.presence.open(&self.topic).await;
        while let Some(msg) = rx.recv().await {
            // Everything this message causes, its call and the handle_out rounds its
            // broadcasts start, broadcasts at most one call's worth: a handle_out that
            // broadcasts what it intercepts cannot loop.
            self.cascade = CallBudget::full(&self.node.limits, 0);
            let mut flow = self.handle(&mut logic, msg).await;
            while let (Flow::Continue, Some(b)) = (&flow, self.pending_out.pop_front()) {
                flow = self.handle_out(&mut *logic, &b).await;
            }
            self.pending_out.clear();
            let ended = match flow {
                Flow::Continue => false,
                Flow::Crashed(cause) => {
                    self.route.factory.crashed(&self.topic, &cause);
                    true
                }
                Flow::Evicted(cause) => {
                    if self.route.warnings.allow() {
                        tracing::warn!(plugin = %self.route.plugin, version = %self.route.version, topic = %self.topic, %cause, "room evicted: instance discarded");
                    }
                    true
                }
            };
            if ended {
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
        if let Some(id) = self.room_sink.take() {
            self.node.pubsub.unsubscribe(&self.topic, id);
        }
        self.node.presence.close(&self.topic);
        self.node.remove_room(&self.topic, self.id);
        rx.close();
        while let Some(msg) = rx.recv().await {
            if let RoomMsg::Join { done, .. } = msg {
                let _ = done.send(JoinResult::Retry);
            }
        }
    }

    /// The room's subscriber for its current intercepts, or `None` once the hub let the
    /// room go (it is closing).
    fn sink(&self) -> Option<Arc<dyn Subscriber>> {
        Some(Arc::new(RoomSink {
            feed: self.feed.clone(),
            tx: self.tx.upgrade()?,
            intercepts: self.route.intercepts.clone(),
            topic: self.topic.clone(),
            warnings: self.route.warnings.clone(),
        }))
    }

    /// Subscribes the room to its topic.
    fn subscribe(&mut self) {
        if let Some(sink) = self.sink() {
            let id = self.node.next_id();
            self.node.pubsub.subscribe(&self.topic, id, sink);
            self.room_sink = Some(id);
        }
    }

    /// Moves the room to `route`'s version: snapshot the running instance, restore the
    /// snapshot into `next` (made for this room beforehand), swap. Members, assigns,
    /// presence and timers are the room's and stay. On any failure the room keeps its
    /// instance (unless the snapshot trapped it: then the room crashes as on any trap).
    async fn upgrade(
        &mut self,
        logic: &mut Box<dyn RoomLogic>,
        route: Route,
        next: Result<Box<dyn RoomLogic>, String>,
    ) -> (SwapResult, Flow) {
        let started = Instant::now();
        let from: Arc<str> = logic.version().into();
        if route.version == from {
            return (SwapResult::Moved(Duration::ZERO), Flow::Continue);
        }
        let failed = |room: &Self, why: String| {
            Stats::bump(&room.node.stats.room_swap_failures);
            tracing::error!(plugin = %route.plugin, topic = %room.topic, from = %from, to = %route.version, error = %why, "room stays on its version: swap failed");
            SwapResult::Stayed(why)
        };
        let mut next = match next {
            Ok(next) => next,
            Err(e) => return (failed(self, e), Flow::Continue),
        };
        let state = match logic.snapshot().await {
            Ok(state) => state,
            Err(e) => {
                let flow = Flow::from_error(&e).unwrap_or(Flow::Continue);
                return (failed(self, format!("snapshot: {e}")), flow);
            }
        };
        if !state.is_empty() {
            match next.restore(state, &from).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(plugin = %route.plugin, topic = %self.topic, to = %route.version, "new version takes no state: room starts fresh");
                }
                Err(e) => return (failed(self, format!("restore: {e}")), Flow::Continue),
            }
        }
        let old = std::mem::replace(logic, next);
        // Freeing an instance zeroes the memory its pool slot keeps resident: done on a
        // blocking thread, not in the pause (it doubled the median pause when done here).
        tokio::task::spawn_blocking(move || drop(old));
        let intercepts_changed = route.intercepts != self.route.intercepts;
        self.route = route;
        if intercepts_changed && let (Some(id), Some(sink)) = (self.room_sink, self.sink()) {
            // In one step: no broadcast is missed or seen twice in between.
            self.node.pubsub.resubscribe(&self.topic, vec![(id, sink)]);
        }
        Stats::bump(&self.node.stats.room_swaps);
        let pause = started.elapsed();
        tracing::debug!(plugin = %self.route.plugin, topic = %self.topic, from = %from, to = %self.route.version, pause_us = pause.as_micros() as u64, "room swapped");
        (SwapResult::Moved(pause), Flow::Continue)
    }

    /// Tells the instance what its next call may still do: the broadcasts left to the
    /// message being handled, and the timers the room may still arm.
    fn prepare(&self, logic: &mut dyn RoomLogic) {
        let pending = self.timers.len() + self.deferred.len();
        let timers = (self.node.limits.max_timers_per_channel * self.members.len().max(1))
            .saturating_sub(pending);
        logic.budget(CallBudget {
            timers,
            ..self.cascade
        });
    }

    async fn handle(&mut self, instance: &mut Box<dyn RoomLogic>, msg: RoomMsg) -> Flow {
        let logic = &mut **instance;
        match msg {
            RoomMsg::Upgrade { route, next, done } => {
                let (result, flow) = self.upgrade(instance, route, next).await;
                let _ = done.send(result);
                flow
            }
            RoomMsg::Join {
                member,
                socket,
                out,
                payload,
                msg_ref,
                done,
            } => {
                if done.is_closed() {
                    // The socket stopped waiting (the room was busy for longer than
                    // ROOM_WAIT) and told its client so: the join is not made.
                    return Flow::Continue;
                }
                let (result, flow) = self
                    .join(logic, member, socket, out, payload, msg_ref)
                    .await;
                if !matches!(result, JoinResult::Joined(_)) {
                    // A join that did not happen leaves nothing behind, presence included.
                    self.node.presence.untrack_owner(&self.topic, member);
                }
                if done.send(result).is_err() {
                    // The socket gave up while the plugin was joining: undone.
                    if let Some(m) = self.detach(member) {
                        return self.terminate(logic, member, &m, reason::CLOSED).await;
                    }
                }
                flow
            }
            RoomMsg::In {
                member,
                event,
                payload,
                msg_ref,
            } => {
                self.prepare(logic);
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
                if self.timer_time.tokens() <= 0.0 {
                    self.defer(member, message);
                    return Flow::Continue;
                }
                self.info(logic, member, message).await
            }
            RoomMsg::Resume => {
                self.resume_armed = false;
                while self.timer_time.tokens() > 0.0 {
                    let Some((member, message)) = self.deferred.pop_front() else {
                        break;
                    };
                    if let flow @ (Flow::Crashed(_) | Flow::Evicted(_)) =
                        self.info(logic, member, message).await
                    {
                        return flow;
                    }
                }
                if !self.deferred.is_empty() {
                    self.arm_resume();
                }
                Flow::Continue
            }
        }
    }

    /// Runs a timer's `handle_info`, and charges its time to the room's timer time.
    async fn info(
        &mut self,
        logic: &mut dyn RoomLogic,
        member: MemberId,
        message: Payload,
    ) -> Flow {
        let started = Instant::now();
        self.prepare(logic);
        let Some(m) = self.members.get(&member) else {
            return Flow::Continue;
        };
        let result = logic.handle_info(message, &m.socket).await;
        let flow = self.after_call(logic, member, result, info_stop).await;
        self.timer_time
            .spend(started.elapsed().as_secs_f64() * 1000.0);
        flow
    }

    /// Holds a timer back until the room's timer time refills.
    fn defer(&mut self, member: MemberId, message: Payload) {
        Stats::bump(&self.node.stats.timers_deferred);
        self.deferred.push_back((member, message));
        if !self.resume_armed {
            self.arm_resume();
        }
    }

    /// Sends the room a `Resume` once its timer time holds some again.
    fn arm_resume(&mut self) {
        let wait = Duration::from_secs_f64(self.timer_time.refill_secs().min(1.0));
        let tx = self.tx.clone();
        self.resume_armed = true;
        self.timers.spawn(async move {
            tokio::time::sleep(wait).await;
            if let Some(tx) = tx.upgrade() {
                let _ = tx.send(RoomMsg::Resume).await;
            }
        });
    }

    /// Calls `join`; on success queues the ok reply, then gives the channel a cursor at the
    /// end of the feed (so no broadcast overtakes the reply), then applies the call's
    /// effects.
    async fn join(
        &mut self,
        logic: &mut dyn RoomLogic,
        member: MemberId,
        mut socket: ChannelSocket,
        out: OutboundTx,
        payload: Payload,
        msg_ref: Option<String>,
    ) -> (JoinResult, Flow) {
        self.prepare(logic);
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
                let cursor = self.feed.cursor(member, out.clone());
                self.members.insert(member, Member { socket, out });
                self.apply(member, effects);
                (JoinResult::Joined(cursor), Flow::Continue)
            }
            Ok(Handled {
                outcome: JoinOutcome::Refused(reply),
                ..
            }) => (JoinResult::Refused(reply), Flow::Continue),
            Err(e) => {
                if let CallError::Failed(why) = &e {
                    Stats::bump(&self.node.stats.channel_errors);
                    if self.route.warnings.allow() {
                        tracing::warn!(plugin = %self.route.plugin, topic = %self.topic, error = %why, "join failed");
                    }
                }
                (
                    JoinResult::Crashed,
                    Flow::from_error(&e).unwrap_or(Flow::Continue),
                )
            }
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
            self.prepare(logic);
            let Some(m) = self.members.get(&member) else {
                continue;
            };
            let result = logic
                .handle_out(&b.event, b.payload.clone(), &m.socket)
                .await;
            if let flow @ (Flow::Crashed(_) | Flow::Evicted(_)) =
                self.after_call(logic, member, result, info_stop).await
            {
                return flow;
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
                Stats::bump(&self.node.stats.channel_errors);
                if self.route.warnings.allow() {
                    tracing::warn!(plugin = %self.route.plugin, topic = %self.topic, error = %e, "plugin error: channel crashed");
                }
                if let Some(m) = self.detach(member) {
                    notify_down(member, &m, true);
                }
                Flow::Continue
            }
            Err(e) => Flow::from_error(&e).unwrap_or(Flow::Continue),
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
        self.prepare(logic);
        let flow = match logic.terminate(reason, &m.socket).await {
            Ok(effects) => {
                self.apply(member, effects);
                Flow::Continue
            }
            Err(e) => Flow::from_error(&e).unwrap_or(Flow::Continue),
        };
        // Presence tracked by a channel that is already gone must not stay behind.
        self.node.presence.untrack_owner(&self.topic, member);
        flow
    }

    /// Takes a channel out of the room; its presence entries leave. Its socket reads the
    /// feed until it writes the notice of the channel's end (queued by the caller), which
    /// comes before any later broadcast.
    fn detach(&mut self, member: MemberId) -> Option<Member> {
        let m = self.members.remove(&member)?;
        self.node.presence.untrack_owner(&self.topic, member);
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
                    let cascade = &mut self.cascade;
                    cascade.broadcasts = cascade.broadcasts.saturating_sub(1);
                    cascade.broadcast_bytes = cascade.broadcast_bytes.saturating_sub(payload.len());
                    let except = exclude_self.then_some(member);
                    let intercepted = self.route.intercepts.contains(&event);
                    let b = Arc::new(Broadcast::new(self.topic.clone(), event, payload, except));
                    if intercepted {
                        self.pending_out.push_back(b);
                    } else {
                        self.node.pubsub.publish(b);
                    }
                }
                Effect::SendAfter { delay, message } => {
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
