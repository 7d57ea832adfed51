//! Owned rooms: on a cluster, a plugin placed on an owner (`placement = "owner"`) has one
//! instance per room for the whole cluster, on the node that holds the room's lease
//! ([`crate::lease`]). The room actor of every node with members of the room asks for the
//! lease when it starts:
//!
//! - Won: it runs the instance (restored from the room's last snapshot, if any) and serves
//!   the channels of every node; those of other nodes reach it as [`RemoteMsg::Call`]s and
//!   are answered on their node ([`Out::Remote`]). Before each message, and again before
//!   what the message caused (replies, pushes, broadcasts, channel ends) leaves the room,
//!   it checks its lease is still surely its own; when it is not, nothing the message
//!   caused leaves and the room steps down (every member here gets `phx_error`, the
//!   official client rejoins). It saves the room's state after every message
//!   (`snapshot_every = "message"`: what the message caused leaves only once the save
//!   stands, and a fenced-out save lets nothing out) or at most every interval, in the
//!   background. Join replies are not held: they leave as the join returns, before the
//!   joined channel's place in the feed is taken. Without members it lingers
//!   [`LINGER`] for channels of other nodes joining again after a takeover.
//! - Held by another node: it forwards its channels' joins, messages and leaves there
//!   (a proxy) and keeps the room's feed for its members. When that node is gone (its
//!   heartbeat expired, now or before the room started) or answers that it does not run
//!   the room, it asks again: it waits out the gone owner's lease (one lease time at most:
//!   a lease still renewed then was not gone), then takes the room over or forwards to the
//!   new owner, its channels joining there again without a word to their clients (`join`
//!   runs again with the payload the channel first joined with; its reply is not sent),
//!   and listing them, so that the owner forgets any whose leave was lost.
//! - A node that cannot serve a room it just took (no instance could be made) or that
//!   steps down lets the lease go and keeps the snapshot for the next owner; a room that
//!   ends because it has no members deletes both.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::{
    Flow, Held, Joining, Member, Out, RemoteOut, Room, RoomMsg, Served, SwapResult, notify_down,
};
use crate::channel::remote::{Proxied, RemoteMsg, ToMember, ToOwner};
use crate::channel::{
    CallBudget, CallError, ChannelSocket, Handled, JoinOutcome, JoinResult, MemberId, RoomLogic,
    SnapshotEvery,
};
use crate::lease::{Acquired, Lease, Leases, Saved, Snapshot};
use crate::protocol::{self, Payload, reason};
use crate::stats::Stats;

/// How long a room waits before it asks for the lease again after an owner said it does
/// not run the room.
const RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// How long an owned room without members waits for channels of other nodes before it
/// ends (after a takeover, theirs join again a round trip or two later).
pub(super) const LINGER: std::time::Duration = std::time::Duration::from_millis(500);

/// This node's hold on a room it owns.
pub(super) struct Owned {
    pub(super) lease: Arc<Lease>,
    leases: Arc<Leases>,
    pub(super) every: SnapshotEvery,
    /// Saves made under this lease.
    seq: u64,
    /// When the next interval save is due (a message came since the last one).
    pub(super) due: Option<tokio::time::Instant>,
}

/// Resolves at `due`, or never.
pub(super) async fn until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// Resolves once `lease` is lost, or never.
pub(super) async fn lost(lease: Option<&Lease>) {
    match lease {
        Some(lease) => lease.lost().await,
        None => std::future::pending().await,
    }
}

/// How forwarding to an owner ended.
enum Proxy {
    /// No channel of this node is left in the room.
    Empty,
    /// The owner's node is gone.
    Gone,
    /// The owner does not run the room (anymore), or the link lost what was sent.
    Moved,
}

impl Room {
    /// An owned room: takes the room's lease, or forwards to its holder, until the room
    /// has no members left.
    pub(super) async fn owned(
        &mut self,
        leases: Arc<Leases>,
        rx: &mut mpsc::Receiver<RoomMsg>,
        inbox: &mut mpsc::UnboundedReceiver<RemoteMsg>,
    ) -> super::End {
        self.open().await;
        // The lease (by fence) of an owner taken for gone, and since when.
        let mut gone: Option<(u64, Instant)> = None;
        let mut first = true;
        loop {
            if !first && self.proxied.is_empty() {
                return super::End::Retry;
            }
            let heard = self.floor.load(std::sync::atomic::Ordering::Relaxed);
            match leases.acquire(&self.topic, heard).await {
                Acquired::Unreachable => {
                    if self.route.warnings.allow() {
                        tracing::warn!(plugin = %self.route.plugin, topic = %self.topic, "room owner unknown: Redis unreachable");
                    }
                    self.drop_proxied(reason::CLUSTER_UNAVAILABLE);
                    return super::End::Unavailable(reason::CLUSTER_UNAVAILABLE);
                }
                Acquired::Held { node, fence, left }
                    if (self.node.is_gone(&node) || gone.is_some_and(|(f, _)| f == fence))
                        && gone.is_none_or(|(f, since)| {
                            f != fence || since.elapsed() < leases.ttl() + RETRY
                        }) =>
                {
                    // The owner is gone but its lease has time left: wait it out. (Still
                    // renewed a lease time later, it was not gone: forward to it again.)
                    if gone.is_none_or(|(f, _)| f != fence) {
                        gone = Some((fence, Instant::now()));
                    }
                    tokio::time::sleep(left.clamp(RETRY, leases.ttl())).await;
                }
                Acquired::Held { node, fence, .. } => {
                    first = false;
                    match self.proxy(&node, fence, rx, inbox).await {
                        Proxy::Empty => return super::End::Retry,
                        Proxy::Gone => gone = Some((fence, Instant::now())),
                        Proxy::Moved => {
                            gone = None;
                            tokio::time::sleep(RETRY).await;
                        }
                    }
                    if self.settle(inbox) {
                        return super::End::Retry;
                    }
                }
                Acquired::Won(lease, snapshot) => {
                    return self.take_over(leases, lease, snapshot, rx, inbox).await;
                }
            }
        }
    }

    /// Runs the room here under `lease`: the plugin's instance, restored from `snapshot`,
    /// with this node's channels joined to it, until the room ends or the lease is lost.
    async fn take_over(
        &mut self,
        leases: Arc<Leases>,
        lease: Arc<Lease>,
        snapshot: Option<Snapshot>,
        rx: &mut mpsc::Receiver<RoomMsg>,
        inbox: &mut mpsc::UnboundedReceiver<RemoteMsg>,
    ) -> super::End {
        Stats::bump(&self.node.stats.room_leases_won);
        // Serving from now on: an activation from here on moves this room.
        self.serving
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.fence
            .store(lease.fence(), std::sync::atomic::Ordering::Relaxed);
        self.floor
            .store(lease.fence(), std::sync::atomic::Ordering::Relaxed);
        let end = self.run_owner(&leases, &lease, snapshot, rx, inbox).await;
        self.serving
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.fence.store(0, std::sync::atomic::Ordering::Relaxed);
        self.owned = None;
        end
    }

    async fn run_owner(
        &mut self,
        leases: &Arc<Leases>,
        lease: &Arc<Lease>,
        snapshot: Option<Snapshot>,
        rx: &mut mpsc::Receiver<RoomMsg>,
        inbox: &mut mpsc::UnboundedReceiver<RemoteMsg>,
    ) -> super::End {
        // The plugin's version now: the room may have started under an older one.
        let Some(route) = self.node.router.route(&self.topic) else {
            leases.let_go(lease);
            self.drop_proxied(reason::PLUGIN_UNAVAILABLE);
            return super::End::Unavailable(reason::PLUGIN_UNAVAILABLE);
        };
        self.set_route(route);
        let mut logic = match self.instance().await {
            Ok(logic) => logic,
            Err(why) => {
                leases.let_go(lease);
                self.drop_proxied(why);
                return super::End::Unavailable(why);
            }
        };
        if let Some(snapshot) = snapshot
            && !snapshot.state.is_empty()
        {
            match logic.restore(snapshot.state, &snapshot.version).await {
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(plugin = %self.route.plugin, topic = %self.topic, from = %snapshot.version, error = %e, "room taken over without its state: restore failed");
                    if let CallError::Crashed(_) | CallError::Evicted(_) = e {
                        logic = match self.instance().await {
                            Ok(logic) => logic,
                            Err(why) => {
                                leases.let_go(lease);
                                self.drop_proxied(why);
                                return super::End::Unavailable(why);
                            }
                        };
                    }
                }
            }
        }
        self.owned = Some(Owned {
            lease: lease.clone(),
            leases: leases.clone(),
            every: self.route.snapshot_every,
            seq: 0,
            due: None,
        });
        let flow = self.adopt_here(&mut logic).await;
        let served = if self.ended(flow) {
            Served::Ended
        } else {
            self.serve(&mut logic, rx, inbox).await
        };
        if served == Served::Ended {
            leases.release(lease);
        }
        super::End::Retry
    }

    /// This node stops: saves the room's state, gives the lease up keeping the snapshot,
    /// and tells the members' nodes to ask for the new owner, which takes the room over
    /// from exactly this state. This node's own members are closing with their sockets.
    pub(super) async fn hand_off(&mut self, logic: &mut Box<dyn RoomLogic>) -> Served {
        if logic.stateful() {
            let _ = self.save(logic).await;
        }
        if let Some(owned) = &self.owned {
            owned.leases.hand_off(&owned.lease).await;
        }
        let ids: Vec<MemberId> = self.members.keys().copied().collect();
        for id in ids {
            if let Some(Member {
                out: Out::Remote(remote),
                ..
            }) = self.detach(id)
            {
                remote.tell(ToMember::Moved {
                    member: remote.member,
                });
            }
        }
        Served::HandedOff
    }

    /// Ends the room after a flow that ends it (a crash): every member is told; true
    /// when it did.
    pub(super) fn ended(&mut self, flow: Flow) -> bool {
        match flow {
            Flow::Continue => return false,
            Flow::Crashed(cause) => self.route.factory.crashed(&self.topic, &cause),
            Flow::Evicted(cause) => {
                if self.route.warnings.allow() {
                    tracing::warn!(plugin = %self.route.plugin, version = %self.route.version, topic = %self.topic, %cause, "room evicted: instance discarded");
                }
            }
        }
        let ids: Vec<MemberId> = self.members.keys().copied().collect();
        for id in ids {
            if let Some(member) = self.detach(id) {
                notify_down(&mut self.gate, id, &member, true);
            }
        }
        true
    }

    /// This node's channels, which joined the room where it ran before, join the instance
    /// here: a join still waiting is answered as any join; a joined channel joins again
    /// without a word to its client (a refusal ends it with `phx_error`).
    async fn adopt_here(&mut self, logic: &mut Box<dyn RoomLogic>) -> Flow {
        let joining: Vec<(MemberId, Joining)> = self.proxied.drain().collect();
        for (member, joining) in joining {
            let Some(proxied) = self.node.proxies.take(member) else {
                continue;
            };
            self.cascade = CallBudget::full(&self.node.limits, 0);
            let flow = match proxied.pending {
                Some((done, msg_ref)) => {
                    let (result, flow) = self
                        .join(
                            &mut **logic,
                            member,
                            joining.socket,
                            proxied.out,
                            joining.payload,
                            msg_ref,
                        )
                        .await;
                    if !matches!(result, JoinResult::Joined(_)) {
                        self.node.presence.untrack_owner(&self.topic, member);
                    }
                    if done.send(result).is_err()
                        && let Some(m) = self.detach(member)
                    {
                        self.terminate(&mut **logic, member, &m, reason::CLOSED)
                            .await
                    } else {
                        flow
                    }
                }
                None => {
                    self.rejoin(
                        &mut **logic,
                        member,
                        joining.socket,
                        proxied.out,
                        joining.payload,
                    )
                    .await
                }
            };
            if !matches!(flow, Flow::Continue) {
                return flow;
            }
        }
        Flow::Continue
    }

    /// Joins a channel that was joined to the room elsewhere, without a word to its client.
    async fn rejoin(
        &mut self,
        logic: &mut dyn RoomLogic,
        member: MemberId,
        mut socket: ChannelSocket,
        out: crate::channel::OutboundTx,
        payload: Payload,
    ) -> Flow {
        self.prepare(logic);
        let (refused, flow) = match logic.join(payload, &socket).await {
            Ok(Handled {
                outcome: JoinOutcome::Ok(_),
                assigns,
                effects,
            }) => {
                if let Some(assigns) = assigns {
                    socket.assigns = assigns;
                }
                let out = Out::Local(out);
                self.members.insert(member, Member { socket, out });
                self.apply(member, effects);
                return Flow::Continue;
            }
            Ok(_) => (true, Flow::Continue),
            Err(e) => (true, Flow::from_error(&e).unwrap_or(Flow::Continue)),
        };
        if refused {
            self.node.presence.untrack_owner(&self.topic, member);
            out.send(crate::channel::Outbound::ChannelDown {
                topic: self.topic.clone(),
                join_ref: socket.join_ref,
                member,
                crashed: true,
            });
        }
        flow
    }

    /// This node's channels of a room that could not be placed: each join still waiting
    /// is refused with `why`, each joined channel gets `phx_error`.
    fn drop_proxied(&mut self, why: &'static str) {
        for (member, joining) in self.proxied.drain() {
            if let Some(proxied) = self.node.proxies.take(member) {
                match proxied.pending {
                    Some((done, _)) => {
                        let _ = done.send(JoinResult::Unavailable(why));
                    }
                    None => proxied.out.send(crate::channel::Outbound::ChannelDown {
                        topic: self.topic.clone(),
                        join_ref: joining.socket.join_ref,
                        member,
                        crashed: true,
                    }),
                }
            }
        }
    }

    /// Forwards this node's channels to `owner` (of fence `fence`) until none is left or
    /// the owner has to be asked for again.
    async fn proxy(
        &mut self,
        owner: &Arc<str>,
        fence: u64,
        rx: &mut mpsc::Receiver<RoomMsg>,
        inbox: &mut mpsc::UnboundedReceiver<RemoteMsg>,
    ) -> Proxy {
        let node = self.node.clone();
        let forward = |call: ToOwner| {
            Stats::bump(&node.stats.owner_forwarded);
            node.pubsub.send_to(owner, call.encode());
        };
        // The lease in Redis is the authority: from now on, broadcasts of an owner older
        // than this one are dropped (and, should Redis have lost its counter, this one's
        // are not).
        self.floor
            .store(fence, std::sync::atomic::Ordering::Relaxed);
        // The channels that joined an earlier owner join this one, and the owner forgets
        // this node's channels it has that are not among them (their leave was lost).
        if !self.proxied.is_empty() {
            for (member, joining) in self.proxied.iter() {
                let Some((pending, msg_ref)) = self.node.proxies.point(*member, fence) else {
                    continue;
                };
                forward(join_call(&self.topic, *member, joining, msg_ref, !pending));
            }
            forward(ToOwner::Members {
                topic: self.topic.clone(),
                members: self.proxied.keys().copied().collect(),
            });
        }
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else {
                        return Proxy::Empty;
                    };
                    match msg {
                        RoomMsg::Join { member, socket, out, payload, msg_ref, done } => {
                            if done.is_closed() {
                                continue;
                            }
                            let Some(room) = self.inbox.upgrade() else {
                                let _ = done.send(JoinResult::Retry);
                                continue;
                            };
                            let joining = Joining { socket, payload };
                            // Listed before the join leaves: its answer may come at once.
                            self.node.proxies.add(member, Proxied {
                                topic: self.topic.clone(),
                                join_ref: joining.socket.join_ref.clone(),
                                out,
                                feed: self.feed.clone(),
                                room,
                                fence,
                                pending: Some((done, msg_ref.clone())),
                            });
                            forward(join_call(&self.topic, member, &joining, msg_ref, false));
                            self.proxied.insert(member, joining);
                        }
                        RoomMsg::In { member, event, payload, msg_ref } => {
                            if self.proxied.contains_key(&member) {
                                forward(ToOwner::In {
                                    topic: self.topic.clone(),
                                    member,
                                    event,
                                    payload,
                                    msg_ref,
                                });
                            }
                        }
                        RoomMsg::Leave { member, reason } => {
                            if self.proxied.remove(&member).is_some() {
                                self.node.proxies.take(member);
                                forward(ToOwner::Leave {
                                    topic: self.topic.clone(),
                                    member,
                                    reason: reason.into(),
                                });
                            }
                            if self.proxied.is_empty() {
                                return Proxy::Empty;
                            }
                        }
                        RoomMsg::Upgrade { route, next, done } => {
                            drop(next);
                            self.set_route(route);
                            let _ = done.send(SwapResult::Elsewhere);
                        }
                        RoomMsg::Intercepted(_) | RoomMsg::Info { .. } | RoomMsg::Resume => {}
                    }
                }
                Some(msg) = inbox.recv() => match msg {
                    RemoteMsg::Call { origin, call } => self.refuse_call(&origin, &call),
                    RemoteMsg::Gone { member, leave } => {
                        if self.proxied.remove(&member).is_some() && leave {
                            forward(ToOwner::Leave {
                                topic: self.topic.clone(),
                                member,
                                reason: reason::CLOSED.into(),
                            });
                        }
                        if self.proxied.is_empty() {
                            return Proxy::Empty;
                        }
                    }
                    RemoteMsg::Moved | RemoteMsg::Reconnected => return Proxy::Moved,
                    RemoteMsg::HandOff(_) => {}
                    RemoteMsg::NodeDown(node) if node == *owner => return Proxy::Gone,
                    RemoteMsg::NodeDown(_) => {}
                },
            }
        }
    }

    /// What came in for the room while it was forwarding to an owner it has just left:
    /// news of that owner is old (one `Moved` per channel after a hand-off, say), calls of
    /// other nodes are told to ask again, channels gone are forgotten. True when no
    /// channel of this node is left.
    fn settle(&mut self, inbox: &mut mpsc::UnboundedReceiver<RemoteMsg>) -> bool {
        while let Ok(msg) = inbox.try_recv() {
            match msg {
                RemoteMsg::Call { origin, call } => self.refuse_call(&origin, &call),
                RemoteMsg::Gone { member, .. } => {
                    self.proxied.remove(&member);
                }
                RemoteMsg::Moved
                | RemoteMsg::Reconnected
                | RemoteMsg::NodeDown(_)
                | RemoteMsg::HandOff(_) => {}
            }
        }
        self.proxied.is_empty()
    }

    /// A call of a channel on node `origin` that this room does not serve: the channel's
    /// node asks the cluster again.
    pub(super) fn refuse_call(&self, origin: &Arc<str>, call: &ToOwner) {
        if let ToOwner::In { .. } = call {
            self.queued
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let ToOwner::Join { member, .. } | ToOwner::In { member, .. } = call {
            let moved = ToMember::Moved { member: *member };
            self.node.pubsub.send_to(origin, moved.encode());
        }
    }

    /// Whether this node may still act on the room: its lease is surely valid, or a
    /// renewal now says it is.
    pub(super) async fn still_owner(&self, lease: &Lease) -> bool {
        if lease.valid() {
            return true;
        }
        match &self.owned {
            Some(owned) => owned.leases.renew(lease).await,
            None => false,
        }
    }

    /// The room's lease is another node's: the instance here stops, and every member here
    /// gets `phx_error` (the official client rejoins, reaching the new owner).
    pub(super) fn step_down(&mut self, _logic: &mut Box<dyn RoomLogic>) -> Served {
        Stats::bump(&self.node.stats.room_leases_lost);
        tracing::warn!(plugin = %self.route.plugin, topic = %self.topic, "room lease lost (another node owns the room, or this one cannot prove it owns it): its members here rejoin");
        self.gate = None;
        if let Some(owned) = &self.owned {
            // Still this node's in Redis (it could not renew in time): the next owner need
            // not wait for it to expire, and takes the last snapshot.
            owned.leases.let_go(&owned.lease);
        }
        let ids: Vec<MemberId> = self.members.keys().copied().collect();
        for id in ids {
            if let Some(member) = self.detach(id) {
                notify_down(&mut self.gate, id, &member, true);
            }
        }
        Served::SteppedDown
    }

    /// After a message of an owned room (`ran`: one that ran the plugin): saving after
    /// every message, saves the state; saving at an interval, schedules the next save. Then,
    /// if the room is still surely this node's, lets out what the message caused. False
    /// when it is not (the save was fenced out or failed, or the lease is gone): nothing the
    /// message caused leaves, and the room must step down.
    pub(super) async fn saved(
        &mut self,
        logic: &mut Box<dyn RoomLogic>,
        flow: &mut Flow,
        ran: bool,
    ) -> bool {
        let Some(held) = self.gate.take() else {
            return true;
        };
        let Some(owned) = &mut self.owned else {
            return true;
        };
        let lease = owned.lease.clone();
        if ran && logic.stateful() {
            match owned.every {
                SnapshotEvery::Interval(every) => {
                    if owned.due.is_none() {
                        owned.due = Some(tokio::time::Instant::now() + every);
                    }
                }
                SnapshotEvery::Message if matches!(flow, Flow::Continue) => {
                    match self.save(logic).await {
                        Ok(Saved::Stored) => {}
                        Ok(Saved::Fenced | Saved::Unreachable) => return false,
                        Err(e) => {
                            // The state after the message is lost with the instance:
                            // nothing the message caused leaves.
                            *flow = Flow::from_error(&e).unwrap_or(Flow::Crashed(e.to_string()));
                            return true;
                        }
                    }
                }
                SnapshotEvery::Message => {}
            }
        }
        if !self.still_owner(&lease).await {
            return false;
        }
        for item in held {
            match item {
                Held::Send(out, item) => out.send(item),
                Held::Publish(b) => {
                    self.node.pubsub.publish(b);
                }
            }
        }
        true
    }

    /// Saves the room's state now and waits for the answer.
    async fn save(&mut self, logic: &mut Box<dyn RoomLogic>) -> Result<Saved, CallError> {
        let state = logic.snapshot().await?;
        let Some(owned) = &mut self.owned else {
            return Ok(Saved::Stored);
        };
        owned.seq += 1;
        let saved = owned
            .leases
            .save(&owned.lease, owned.seq, logic.version(), &state)
            .await;
        self.count(saved);
        Ok(saved)
    }

    fn count(&self, saved: Saved) {
        let stats = &self.node.stats;
        match saved {
            Saved::Stored => Stats::bump(&stats.snapshots_saved),
            Saved::Unreachable => Stats::bump(&stats.snapshot_failures),
            Saved::Fenced => {}
        }
    }

    /// An interval save came due: the state now, saved in the background (a fenced-out
    /// save loses the lease, which the room hears).
    pub(super) async fn save_now(&mut self, logic: &mut Box<dyn RoomLogic>) -> Flow {
        if let Some(owned) = &mut self.owned {
            owned.due = None;
        }
        let state = match logic.snapshot().await {
            Ok(state) => state,
            Err(e) => return Flow::from_error(&e).unwrap_or(Flow::Continue),
        };
        let Some(owned) = &mut self.owned else {
            return Flow::Continue;
        };
        owned.seq += 1;
        let (leases, lease, seq) = (owned.leases.clone(), owned.lease.clone(), owned.seq);
        let version = logic.version().to_owned();
        let stats = self.node.stats.clone();
        tokio::spawn(async move {
            match leases.save(&lease, seq, &version, &state).await {
                Saved::Stored => Stats::bump(&stats.snapshots_saved),
                Saved::Unreachable => Stats::bump(&stats.snapshot_failures),
                Saved::Fenced => {}
            }
        });
        Flow::Continue
    }

    /// What other nodes and the cluster tell a room this node owns.
    pub(super) async fn remote(&mut self, logic: &mut dyn RoomLogic, msg: RemoteMsg) -> Flow {
        match msg {
            RemoteMsg::Call { origin, call } => {
                Stats::bump(&self.node.stats.owner_served);
                match call {
                    ToOwner::Join {
                        member,
                        join_ref,
                        socket_id,
                        assigns,
                        payload,
                        msg_ref,
                        adopt,
                        ..
                    } => {
                        let socket = ChannelSocket {
                            channel: self.node.next_id(),
                            presence: Arc::default(),
                            id: socket_id.map(Arc::from),
                            topic: self.topic.clone(),
                            join_ref,
                            assigns,
                        };
                        self.remote_join(logic, origin, member, socket, payload, msg_ref, adopt)
                            .await
                    }
                    ToOwner::In {
                        member,
                        event,
                        payload,
                        msg_ref,
                        ..
                    } => {
                        self.queued
                            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        match self.remote_ids.get(&(origin.clone(), member)) {
                            Some(&local) => {
                                self.handle_in(logic, local, &event, payload, msg_ref).await
                            }
                            None => {
                                // Not a member here (its join was lost): it rejoins.
                                self.remote_out(origin, member).tell(ToMember::Down {
                                    member,
                                    fence: self.lease_fence(),
                                    crashed: true,
                                });
                                Flow::Continue
                            }
                        }
                    }
                    ToOwner::Leave { member, reason, .. } => {
                        let Some(local) = self.remote_ids.get(&(origin, member)).copied() else {
                            return Flow::Continue;
                        };
                        match self.detach(local) {
                            Some(m) => self.terminate(logic, local, &m, &reason).await,
                            None => Flow::Continue,
                        }
                    }
                    ToOwner::Members { members, .. } => {
                        let listed: std::collections::HashSet<MemberId> =
                            members.into_iter().collect();
                        let stale: Vec<MemberId> = self
                            .remote_ids
                            .iter()
                            .filter(|((n, id), _)| *n == origin && !listed.contains(id))
                            .map(|(_, local)| *local)
                            .collect();
                        self.drop_members(logic, stale).await
                    }
                }
            }
            RemoteMsg::NodeDown(node) => {
                // Its channels are gone with it.
                let gone: Vec<MemberId> = self
                    .remote_ids
                    .iter()
                    .filter(|((n, _), _)| *n == node)
                    .map(|(_, local)| *local)
                    .collect();
                self.drop_members(logic, gone).await
            }
            RemoteMsg::Gone { .. }
            | RemoteMsg::Moved
            | RemoteMsg::Reconnected
            | RemoteMsg::HandOff(_) => Flow::Continue,
        }
    }

    /// Ends these channels of other nodes (their node is gone, or they are no longer
    /// there): `terminate` with `closed`, no notice.
    async fn drop_members(&mut self, logic: &mut dyn RoomLogic, members: Vec<MemberId>) -> Flow {
        for local in members {
            if let Some(m) = self.detach(local) {
                let flow = self.terminate(logic, local, &m, reason::CLOSED).await;
                if !matches!(flow, Flow::Continue) {
                    return flow;
                }
            }
        }
        Flow::Continue
    }

    /// The fence of the room's lease while this node owns it, else 0.
    pub(super) fn lease_fence(&self) -> u64 {
        self.owned.as_ref().map_or(0, |o| o.lease.fence())
    }

    fn remote_out(&self, node: Arc<str>, member: MemberId) -> Arc<RemoteOut> {
        Arc::new(RemoteOut {
            pubsub: self.node.pubsub.clone(),
            node,
            member,
            fence: self.lease_fence(),
        })
    }

    /// A channel of node `origin` joins the room this node owns.
    #[allow(clippy::too_many_arguments)]
    async fn remote_join(
        &mut self,
        logic: &mut dyn RoomLogic,
        origin: Arc<str>,
        member: MemberId,
        mut socket: ChannelSocket,
        payload: Payload,
        msg_ref: Option<String>,
        adopt: bool,
    ) -> Flow {
        let out = self.remote_out(origin.clone(), member);
        let fence = out.fence;
        if self.remote_ids.contains_key(&(origin.clone(), member)) {
            // Already a member: a join sent again after a move.
            if !adopt {
                out.tell(ToMember::Joined {
                    member,
                    fence,
                    msg_ref,
                    reply: Payload::empty(),
                });
            }
            return Flow::Continue;
        }
        let local = socket.channel;
        self.prepare(logic);
        let (reply, flow) = match logic.join(payload, &socket).await {
            Ok(Handled {
                outcome: JoinOutcome::Ok(reply),
                assigns,
                effects,
            }) => {
                if let Some(assigns) = assigns {
                    socket.assigns = assigns;
                }
                if !adopt {
                    out.tell(ToMember::Joined {
                        member,
                        fence,
                        msg_ref,
                        reply,
                    });
                }
                self.remote_ids.insert((origin, member), local);
                self.members.insert(
                    local,
                    Member {
                        socket,
                        out: Out::Remote(out),
                    },
                );
                self.apply(local, effects);
                return Flow::Continue;
            }
            Ok(Handled {
                outcome: JoinOutcome::Refused(reply),
                ..
            }) => (reply, Flow::Continue),
            Err(e) => {
                // The call logged its error in its span.
                if let CallError::Failed(_) = &e {
                    Stats::bump(&self.node.stats.channel_errors);
                }
                (
                    protocol::reason_payload(reason::JOIN_CRASHED),
                    Flow::from_error(&e).unwrap_or(Flow::Continue),
                )
            }
        };
        self.node.presence.untrack_owner(&self.topic, local);
        out.tell(ToMember::Refused {
            member,
            fence,
            reply,
        });
        flow
    }
}

/// The join of `joining` as the owner gets it.
fn join_call(
    topic: &Arc<str>,
    member: MemberId,
    joining: &Joining,
    msg_ref: Option<String>,
    adopt: bool,
) -> ToOwner {
    ToOwner::Join {
        topic: topic.clone(),
        member,
        join_ref: joining.socket.join_ref.clone(),
        socket_id: joining.socket.id.as_deref().map(str::to_owned),
        assigns: joining.socket.assigns.clone(),
        payload: joining.payload.clone(),
        msg_ref,
        adopt,
    }
}
