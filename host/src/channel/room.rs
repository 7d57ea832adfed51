//! The room actor: one task per live topic that owns the topic's plugin instance,
//! serialises every call into it, applies what the calls asked for (pushes, broadcasts,
//! timers) to its members, and swaps the instance for another plugin version between two
//! messages (hot reload). Also what every room of the node shares ([`Node`]: the directory
//! of live rooms, PubSub, presence, leases, limits, counters).
//!
//! A room's members are channels of this node or, for a room this node owns on a cluster
//! (`owned`), channels of other nodes, whose replies and pushes go to their node ([`Out`]).

mod owned;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::feed::Feed;
use super::outbound::{Outbound, OutboundTx, Slowness};
use super::remote::{Proxies, RemoteMsg, ToMember, ToOwner};
use super::{
    CallBudget, CallError, CallResult, ChannelSocket, Effect, Handled, InOutcome, InfoOutcome,
    JoinOutcome, JoinResult, MemberId, Placement, RoomLogic, Route, Router,
};
use crate::config::Limits;
use crate::lease::Leases;
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
/// runs `handle_out` once per member. Decided once per broadcast, not once per member. On a
/// cluster, a broadcast of an owner older than one already heard is dropped (fencing).
struct RoomSink {
    feed: Arc<Feed>,
    tx: mpsc::Sender<RoomMsg>,
    intercepts: Arc<[String]>,
    topic: Arc<str>,
    warnings: Arc<crate::limit::Warnings>,
    /// The newest owner fence heard for the topic.
    floor: Arc<AtomicU64>,
    stats: Arc<Stats>,
}

impl Subscriber for RoomSink {
    fn deliver(&self, broadcast: &Arc<Broadcast>) {
        if broadcast.fence != 0
            && broadcast.fence < self.floor.fetch_max(broadcast.fence, Ordering::Relaxed)
        {
            Stats::bump(&self.stats.fenced);
            return;
        }
        if !self.intercepts.iter().any(|e| *e == broadcast.event) {
            self.feed.append(broadcast);
        } else if self
            .tx
            .try_send(RoomMsg::Intercepted(broadcast.clone()))
            .is_err()
        {
            Stats::bump(&self.stats.room_mailbox_drops);
            if self.warnings.allow() {
                tracing::warn!(topic = %self.topic, event = %broadcast.event, "room mailbox full: intercepted broadcast dropped");
            }
        }
    }
}

#[derive(Clone)]
pub(super) struct RoomHandle {
    id: u64,
    pub(super) plugin: Arc<str>,
    pub(super) tx: mpsc::Sender<RoomMsg>,
    /// What other nodes and the cluster tell the room.
    inbox: mpsc::UnboundedSender<RemoteMsg>,
    /// Forwarded messages in `inbox` not handled yet, bounded by `room_mailbox`.
    queued: Arc<AtomicUsize>,
    /// Whether the room runs its plugin's instance on this node (false while it forwards to
    /// the owner on another node): only those move on hot reload here.
    pub(super) serving: Arc<AtomicBool>,
    /// The fence of the room's lease while this node owns it.
    fence: Arc<AtomicU64>,
    /// The room's channels on this node (joined or being forwarded), for listings.
    pub(super) members: Arc<AtomicUsize>,
    /// The version serving the room, for listings (see [`RoomHandle::version`]).
    version: Arc<Mutex<Arc<str>>>,
}

/// A room's channels by id, counted in its [`RoomHandle::members`] as they come and go.
pub(super) struct Counted<V> {
    map: HashMap<MemberId, V>,
    count: Arc<AtomicUsize>,
}

impl<V> Counted<V> {
    fn new(count: Arc<AtomicUsize>) -> Self {
        Counted {
            map: HashMap::new(),
            count,
        }
    }

    pub(super) fn insert(&mut self, id: MemberId, value: V) -> Option<V> {
        let old = self.map.insert(id, value);
        if old.is_none() {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        old
    }

    pub(super) fn remove(&mut self, id: &MemberId) -> Option<V> {
        let value = self.map.remove(id);
        if value.is_some() {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        value
    }

    pub(super) fn drain(&mut self) -> std::collections::hash_map::Drain<'_, MemberId, V> {
        self.count.fetch_sub(self.map.len(), Ordering::Relaxed);
        self.map.drain()
    }

    pub(super) fn get_mut(&mut self, id: &MemberId) -> Option<&mut V> {
        self.map.get_mut(id)
    }
}

impl<V> std::ops::Deref for Counted<V> {
    type Target = HashMap<MemberId, V>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<V> Drop for Counted<V> {
    fn drop(&mut self) {
        self.count.fetch_sub(self.map.len(), Ordering::Relaxed);
    }
}

impl RoomHandle {
    /// Asks the room to hand itself off (this node stops); false when it is gone.
    pub(super) fn hand_off(&self, done: oneshot::Sender<()>) -> bool {
        self.inbox.send(RemoteMsg::HandOff(done)).is_ok()
    }

    /// The version serving the room here; for a room that forwards to its owner on
    /// another node, the version this node routes the topic to.
    pub(super) fn version(&self) -> Arc<str> {
        self.version
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Where what a room tells one member goes: the queue of its socket on this node, or the
/// member's node (a channel of another node in a room this node owns).
#[derive(Clone)]
pub(super) enum Out {
    Local(OutboundTx),
    Remote(Arc<RemoteOut>),
}

/// A member on another node.
pub(super) struct RemoteOut {
    pubsub: Arc<dyn PubSub>,
    /// Its node.
    node: Arc<str>,
    /// Its channel id there.
    member: MemberId,
    /// The fence of this node's lease on the room.
    fence: u64,
}

impl Out {
    pub(super) fn send(&self, item: Outbound) {
        match self {
            Out::Local(out) => out.send(item),
            Out::Remote(remote) => remote.send(item),
        }
    }
}

impl RemoteOut {
    fn tell(&self, answer: ToMember) {
        self.pubsub.send_to(&self.node, answer.encode());
    }

    fn send(&self, item: Outbound) {
        let (member, fence) = (self.member, self.fence);
        self.tell(match item {
            Outbound::Reply {
                msg_ref,
                status,
                payload,
                ..
            } => ToMember::Reply {
                member,
                fence,
                msg_ref,
                status,
                payload,
            },
            Outbound::Push { event, payload, .. } => ToMember::Push {
                member,
                fence,
                event,
                payload,
            },
            Outbound::ChannelDown { crashed, .. } => ToMember::Down {
                member,
                fence,
                crashed,
            },
            // Said by the member's own socket, never by a room.
            Outbound::Close { .. } | Outbound::Disconnect => return,
        });
    }
}

/// What a message of a room saving after every message caused, held until the save
/// stands.
enum Held {
    Send(Out, Outbound),
    Publish(Arc<Broadcast>),
}

/// Sends to a member now, or holds it behind the message's save (`gate`).
fn emit(gate: &mut Option<Vec<Held>>, out: &Out, item: Outbound) {
    match gate {
        Some(held) => held.push(Held::Send(out.clone(), item)),
        None => out.send(item),
    }
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
    /// Run by its owner on another node, which moves it.
    Elsewhere,
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

/// What every room of the node shares: the directory of live rooms (which the hub keeps
/// and a room leaves when it ends), routing, PubSub, presence, leases (on a cluster),
/// limits, counters and ids, and the channels of this node whose room runs elsewhere.
pub(super) struct Node {
    rooms: Mutex<HashMap<Arc<str>, RoomHandle>>,
    pub(super) router: Arc<dyn Router>,
    pub(super) pubsub: Arc<dyn PubSub>,
    pub(super) presence: Arc<Tracker>,
    pub(super) leases: Option<Arc<Leases>>,
    pub(super) proxies: Proxies,
    pub(super) limits: Limits,
    pub(super) stats: Arc<Stats>,
    next_id: AtomicU64,
    /// Nodes taken for gone (until they prove alive): a room does not forward to them.
    gone: Mutex<std::collections::HashSet<Arc<str>>>,
}

impl Node {
    /// A node with no rooms yet.
    pub(super) fn new(
        router: Arc<dyn Router>,
        pubsub: Arc<dyn PubSub>,
        presence: Arc<Tracker>,
        leases: Option<Arc<Leases>>,
        limits: Limits,
        stats: Arc<Stats>,
    ) -> Self {
        Node {
            rooms: Mutex::default(),
            router,
            pubsub,
            presence,
            leases,
            proxies: Proxies::default(),
            limits,
            stats,
            // Ids differ from a previous run's: another node may still know this node's
            // old channels by (node id, channel id) for a moment after a restart.
            next_id: AtomicU64::new(u64::from(rand::random::<u32>()) << 32 | 1),
            gone: Mutex::default(),
        }
    }

    /// Marks node `node` gone (or back).
    pub(super) fn down(&self, node: &str, gone: bool) {
        let mut set = self.gone.lock().unwrap_or_else(|p| p.into_inner());
        if gone {
            set.insert(node.into());
        } else {
            set.remove(node);
        }
    }

    /// Whether node `node` is taken for gone.
    pub(super) fn is_gone(&self, node: &str) -> bool {
        self.gone
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(node)
    }

    /// A call from a channel on node `origin` for a room this node may own: into the
    /// room's inbox, or answered `Moved` when no room of the topic runs here.
    pub(super) fn call(&self, origin: Arc<str>, call: ToOwner) {
        let room = self.rooms().get(call.topic()).cloned();
        let moved = |call: &ToOwner| {
            if let ToOwner::Join { member, .. } | ToOwner::In { member, .. } = call {
                let moved = ToMember::Moved { member: *member };
                self.pubsub.send_to(&origin, moved.encode());
            }
        };
        let Some(room) = room else {
            return moved(&call);
        };
        let is_in = matches!(call, ToOwner::In { .. });
        if let ToOwner::In {
            member, msg_ref, ..
        } = &call
        {
            if room.queued.load(Ordering::Relaxed) >= self.limits.room_mailbox {
                Stats::bump(&self.stats.owner_refused);
                if msg_ref.is_some() {
                    let reply = ToMember::Reply {
                        member: *member,
                        fence: room.fence.load(Ordering::Relaxed),
                        msg_ref: msg_ref.clone(),
                        status: Status::Error,
                        payload: crate::protocol::reason_payload(reason::ROOM_BUSY),
                    };
                    self.pubsub.send_to(&origin, reply.encode());
                }
                return;
            }
            room.queued.fetch_add(1, Ordering::Relaxed);
        }
        let call = RemoteMsg::Call {
            origin: origin.clone(),
            call,
        };
        if let Err(mpsc::error::SendError(RemoteMsg::Call { call, .. })) = room.inbox.send(call) {
            if is_in {
                room.queued.fetch_sub(1, Ordering::Relaxed);
            }
            moved(&call);
        }
    }

    /// Tells every live room of the node something about the cluster.
    pub(super) fn tell_rooms(&self, what: impl Fn() -> RemoteMsg) {
        let rooms: Vec<RoomHandle> = self.rooms().values().cloned().collect();
        for room in rooms {
            let _ = room.inbox.send(what());
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
    let (inbox, inbox_rx) = mpsc::unbounded_channel();
    let owned = node.leases.is_some() && route.placement == Placement::Owner;
    let handle = RoomHandle {
        id: node.next_id(),
        plugin: route.plugin.clone(),
        tx,
        inbox,
        queued: Arc::default(),
        serving: Arc::new(AtomicBool::new(!owned)),
        fence: Arc::default(),
        members: Arc::default(),
        version: Arc::new(Mutex::new(route.version.clone())),
    };
    rooms.insert(topic.clone(), handle.clone());
    let room = Room {
        id: handle.id,
        topic: topic.clone(),
        node: node.clone(),
        route,
        tx: handle.tx.downgrade(),
        inbox: handle.inbox.downgrade(),
        queued: handle.queued.clone(),
        serving: handle.serving.clone(),
        fence: handle.fence.clone(),
        floor: Arc::default(),
        members: Counted::new(handle.members.clone()),
        remote_ids: HashMap::new(),
        proxied: Counted::new(handle.members.clone()),
        version: handle.version.clone(),
        owned: None,
        gate: None,
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
        opened: false,
    };
    tokio::spawn(room.run(rx, inbox_rx));
    handle
}

struct Member {
    socket: ChannelSocket,
    out: Out,
}

/// A channel of this node whose room runs on another node: what its join said, to join
/// it again at the next owner.
struct Joining {
    socket: ChannelSocket,
    payload: Payload,
}

struct Room {
    id: u64,
    topic: Arc<str>,
    node: Arc<Node>,
    route: Route,
    tx: mpsc::WeakSender<RoomMsg>,
    inbox: mpsc::WeakUnboundedSender<RemoteMsg>,
    /// See [`RoomHandle`].
    queued: Arc<AtomicUsize>,
    serving: Arc<AtomicBool>,
    fence: Arc<AtomicU64>,
    /// The newest owner fence heard for the topic: older owners' broadcasts are dropped.
    floor: Arc<AtomicU64>,
    members: Counted<Member>,
    /// Members on other nodes (by node and channel id there) in a room this node owns.
    remote_ids: HashMap<(Arc<str>, MemberId), MemberId>,
    /// This node's channels while the room runs on another node.
    proxied: Counted<Joining>,
    /// See [`RoomHandle::version`].
    version: Arc<Mutex<Arc<str>>>,
    /// The lease and snapshots while this node owns the room.
    owned: Option<owned::Owned>,
    /// What the message being handled caused, held until its save stands (owned rooms
    /// saving after every message).
    gate: Option<Vec<Held>>,
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
    /// Whether the room subscribed and opened the topic's presence.
    opened: bool,
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

/// How a room ended, as the joins still in its mailbox are told.
enum End {
    /// Ask the hub again (a new room starts).
    Retry,
    /// No instance could be made (or no owner found), for this reason.
    Unavailable(&'static str),
}

/// How a room's instance stopped serving.
#[derive(Debug, PartialEq, Eq)]
enum Served {
    /// No members left (or the instance crashed: every member was told).
    Ended,
    /// The room's lease went to another node: every member here was told `phx_error`.
    SteppedDown,
    /// This node stops: the room's state is saved and its lease given up for the next
    /// owner.
    HandedOff,
}

/// What woke a serving room.
enum Input {
    Room(RoomMsg),
    Remote(RemoteMsg),
    /// The next save of the room's state is due.
    Save,
    /// The room's lease went to another node.
    Lost,
}

impl Room {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<RoomMsg>,
        mut inbox: mpsc::UnboundedReceiver<RemoteMsg>,
    ) {
        let end = match self.node.leases.clone() {
            Some(leases) if !self.serving.load(Ordering::Relaxed) => {
                self.owned(leases, &mut rx, &mut inbox).await
            }
            _ => self.local(&mut rx, &mut inbox).await,
        };
        if let Some(id) = self.room_sink.take() {
            self.node.pubsub.unsubscribe(&self.topic, id);
        }
        if self.opened {
            self.node.presence.close(&self.topic);
        }
        self.node.remove_room(&self.topic, self.id);
        // Calls of other nodes' channels that came too late are told to ask again.
        inbox.close();
        while let Ok(msg) = inbox.try_recv() {
            if let RemoteMsg::Call { origin, call } = msg {
                self.refuse_call(&origin, &call);
            }
        }
        rx.close();
        while let Some(msg) = rx.recv().await {
            if let RoomMsg::Join { done, .. } = msg {
                let _ = done.send(match end {
                    End::Retry => JoinResult::Retry,
                    End::Unavailable(why) => JoinResult::Unavailable(why),
                });
            }
        }
    }

    /// A room whose instance runs on this node whatever the cluster: one node, or a
    /// plugin placed `local`.
    async fn local(
        &mut self,
        rx: &mut mpsc::Receiver<RoomMsg>,
        inbox: &mut mpsc::UnboundedReceiver<RemoteMsg>,
    ) -> End {
        let mut logic = match self.instance().await {
            Ok(logic) => logic,
            Err(why) => return End::Unavailable(why),
        };
        self.open().await;
        self.serve(&mut logic, rx, inbox).await;
        End::Retry
    }

    /// A fresh instance of the room's plugin; the reason for the joining client when none
    /// could be made.
    async fn instance(&mut self) -> Result<Box<dyn RoomLogic>, &'static str> {
        self.route.factory.instantiate(&self.topic).await.map_err(|e| {
            if self.route.warnings.allow() {
                tracing::error!(plugin = %self.route.plugin, topic = %self.topic, error = %e.detail, "plugin instantiation failed");
            }
            e.reason
        })
    }

    /// Subscribes the room to its topic; on a cluster, what other nodes broadcast to the
    /// topic (and the presence they hold for it) reaches the room before its first
    /// member's join is answered.
    async fn open(&mut self) {
        self.subscribe();
        self.node.pubsub.ready(&self.topic).await;
        if let Some(waited) = self.node.presence.open(&self.topic).await {
            self.node.stats.metrics.presence_synced(waited);
        }
        self.opened = true;
    }

    /// Runs the room's instance, one message at a time, until the room has no members
    /// left, its instance crashed, or (owned) its lease went to another node.
    async fn serve(
        &mut self,
        logic: &mut Box<dyn RoomLogic>,
        rx: &mut mpsc::Receiver<RoomMsg>,
        inbox: &mut mpsc::UnboundedReceiver<RemoteMsg>,
    ) -> Served {
        let lease = self.owned.as_ref().map(|o| o.lease.clone());
        loop {
            let due = self.owned.as_ref().and_then(|o| o.due);
            // An owned room without members lingers a moment: channels of other nodes may be
            // on their way (joining again after a takeover).
            let linger = (lease.is_some() && self.members.is_empty())
                .then(|| tokio::time::Instant::now() + owned::LINGER);
            let input = if lease.is_none() {
                // A room of this node alone: its mailbox, and news of the cluster.
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(msg) => Input::Room(msg),
                        None => return Served::Ended,
                    },
                    Some(msg) = inbox.recv() => Input::Remote(msg),
                }
            } else {
                tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(msg) => Input::Room(msg),
                        None => return Served::Ended,
                    },
                    Some(msg) = inbox.recv() => Input::Remote(msg),
                    () = owned::until(due) => Input::Save,
                    () = owned::lost(lease.as_deref()) => Input::Lost,
                    () = owned::until(linger) => return Served::Ended,
                }
            };
            let ran = matches!(
                input,
                Input::Room(_) | Input::Remote(RemoteMsg::Call { .. } | RemoteMsg::NodeDown(_))
            );
            if let Some(lease) = &lease
                && (matches!(input, Input::Lost) || !self.still_owner(lease).await)
            {
                return self.step_down(logic);
            }
            if let Input::Remote(RemoteMsg::HandOff(done)) = input {
                if lease.is_none() {
                    continue;
                }
                let served = self.hand_off(logic).await;
                let _ = done.send(());
                return served;
            }
            // Everything this message causes, its call and the handle_out rounds its
            // broadcasts start, broadcasts at most one call's worth: a handle_out that
            // broadcasts what it intercepts cannot loop.
            self.cascade = CallBudget::full(&self.node.limits, 0);
            // What an owned room's message causes leaves once the room knows it still owns
            // the room (and, saving after every message, once the save stands).
            self.gate = lease.is_some().then(Vec::new);
            let mut flow = match input {
                Input::Room(msg) => self.handle(logic, msg).await,
                Input::Remote(msg) => self.remote(&mut **logic, msg).await,
                Input::Save => self.save_now(logic).await,
                Input::Lost => Flow::Continue,
            };
            while let (Flow::Continue, Some(b)) = (&flow, self.pending_out.pop_front()) {
                flow = self.handle_out(&mut **logic, &b).await;
            }
            self.pending_out.clear();
            if !self.saved(logic, &mut flow, ran).await {
                return self.step_down(logic);
            }
            if self.ended(flow) {
                return Served::Ended;
            }
            while self.timers.try_join_next().is_some() {}
            if lease.is_none() && self.members.is_empty() {
                return Served::Ended;
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
            floor: self.floor.clone(),
            stats: self.node.stats.clone(),
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
        self.set_route(route);
        Stats::bump(&self.node.stats.room_swaps);
        let pause = started.elapsed();
        self.route.metrics.swapped(pause);
        tracing::debug!(plugin = %self.route.plugin, topic = %self.topic, from = %from, to = %self.route.version, pause_us = pause.as_micros() as u64, "room swapped");
        (SwapResult::Moved(pause), Flow::Continue)
    }

    /// Serves the room by `route` from now on (its intercepts included).
    fn set_route(&mut self, route: Route) {
        let intercepts_changed = route.intercepts != self.route.intercepts;
        if let Some(owned) = &mut self.owned {
            owned.every = route.snapshot_every;
        }
        *self.version.lock().unwrap_or_else(|p| p.into_inner()) = route.version.clone();
        self.route = route;
        if intercepts_changed && let (Some(id), Some(sink)) = (self.room_sink, self.sink()) {
            // In one step: no broadcast is missed or seen twice in between.
            self.node.pubsub.resubscribe(&self.topic, vec![(id, sink)]);
        }
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
                self.handle_in(logic, member, &event, payload, msg_ref)
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

    /// Runs `handle_in` for a member's message and answers it.
    async fn handle_in(
        &mut self,
        logic: &mut dyn RoomLogic,
        member: MemberId,
        event: &str,
        payload: Payload,
        msg_ref: Option<String>,
    ) -> Flow {
        self.prepare(logic);
        let Some(m) = self.members.get(&member) else {
            return Flow::Continue;
        };
        let result = logic.handle_in(event, payload, &m.socket).await;
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
                let out = Out::Local(out);
                self.members.insert(member, Member { socket, out });
                self.apply(member, effects);
                (JoinResult::Joined(cursor), Flow::Continue)
            }
            Ok(Handled {
                outcome: JoinOutcome::Refused(reply),
                ..
            }) => (JoinResult::Refused(reply), Flow::Continue),
            Err(e) => {
                // The call logged its error in its span.
                if let CallError::Failed(_) = &e {
                    Stats::bump(&self.node.stats.channel_errors);
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
            // The call logged its error in its span.
            Err(CallError::Failed(_)) => {
                Stats::bump(&self.node.stats.channel_errors);
                if let Some(m) = self.detach(member) {
                    notify_down(&mut self.gate, member, &m, true);
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
        notify_down(&mut self.gate, member, &m, false);
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
        if let Out::Remote(remote) = &m.out {
            self.remote_ids
                .remove(&(remote.node.clone(), remote.member));
        }
        self.node.presence.untrack_owner(&self.topic, member);
        Some(m)
    }

    fn reply(
        &mut self,
        member: MemberId,
        msg_ref: Option<String>,
        status: Status,
        payload: Payload,
    ) {
        if let Some(m) = self.members.get(&member) {
            let reply = Outbound::Reply {
                join_ref: m.socket.join_ref.clone(),
                msg_ref,
                topic: self.topic.clone(),
                status,
                payload,
            };
            emit(&mut self.gate, &m.out, reply);
        }
    }

    fn apply(&mut self, member: MemberId, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Push { event, payload } => {
                    if let Some(m) = self.members.get(&member) {
                        let push = Outbound::Push {
                            join_ref: m.socket.join_ref.clone(),
                            topic: self.topic.clone(),
                            event,
                            payload,
                        };
                        emit(&mut self.gate, &m.out, push);
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
                    let mut b = Broadcast::new(self.topic.clone(), event, payload, except)
                        .fenced(self.lease_fence());
                    if let (true, Some(Out::Remote(remote))) =
                        (exclude_self, self.members.get(&member).map(|m| &m.out))
                    {
                        // A channel on another node: its node skips it.
                        b = b.except_on(remote.node.clone(), remote.member);
                    }
                    let b = Arc::new(b);
                    if intercepted {
                        self.pending_out.push_back(b);
                    } else if let Some(held) = &mut self.gate {
                        held.push(Held::Publish(b));
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

/// Tells a member its channel ended (behind what the message held, if it holds any).
fn notify_down(gate: &mut Option<Vec<Held>>, id: MemberId, m: &Member, crashed: bool) {
    emit(
        gate,
        &m.out,
        Outbound::ChannelDown {
            topic: m.socket.topic.clone(),
            join_ref: m.socket.join_ref.clone(),
            member: id,
            crashed,
        },
    );
}
