//! The live rooms of a node: which room serves a topic (started on its first join, through
//! the [`Router`]), and moving every room of a plugin this node runs to another version
//! (hot reload), each within [`ROOM_WAIT`]; a room whose owner is another node moves there.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::oneshot;

use super::remote::{RemoteMsg, Wire};
use super::room::{self, Node, ROOM_WAIT, RoomHandle, RoomMsg, SwapResult};
use super::{Route, Router};
use crate::config::Limits;
use crate::lease::Leases;
use crate::limit::Warnings;
use crate::presence::Tracker;
use crate::protocol::reason;
use crate::pubsub::{DirectListener, PubSub};
use crate::stats::Stats;

/// A live room, as the admin API lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveRoom {
    /// Its topic.
    pub topic: String,
    /// The plugin serving it.
    pub plugin: String,
    /// The version serving it (for a room that forwards to its owner on another node: the
    /// version this node routes its topic to).
    pub version: String,
    /// Its channels on this node.
    pub members: usize,
    /// Whether its instance runs on this node (false: it forwards to its owner).
    pub here: bool,
}

/// The live rooms of this node and what they need: routing, PubSub, limits.
pub struct Hub {
    node: Arc<Node>,
    router: Arc<dyn Router>,
    /// How often the hub may warn about the node's own limits (the room cap).
    warnings: Warnings,
}

impl Hub {
    /// A hub with no rooms yet; on a cluster (`leases`), the rooms of plugins placed on an
    /// owner run on one node at a time.
    pub fn new(
        router: Arc<dyn Router>,
        pubsub: Arc<dyn PubSub>,
        presence: Arc<Tracker>,
        limits: Limits,
        stats: Arc<Stats>,
        leases: Option<Arc<Leases>>,
    ) -> Arc<Self> {
        let owning = leases.is_some();
        let node = Arc::new(Node::new(
            router.clone(),
            pubsub.clone(),
            presence,
            leases,
            limits,
            stats.clone(),
        ));
        if owning {
            pubsub.on_direct(Box::new(Relay::new(Arc::downgrade(&node))));
        }
        Arc::new(Hub {
            warnings: Warnings::new(stats),
            node,
            router,
        })
    }

    /// The event counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.node.stats
    }

    /// The PubSub rooms publish through.
    pub fn pubsub(&self) -> &Arc<dyn PubSub> {
        &self.node.pubsub
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.node.limits
    }

    /// Number of live rooms.
    pub fn room_count(&self) -> usize {
        self.node.rooms().len()
    }

    /// Every live room of this node, with its plugin, version and channels here. The
    /// handles are copied out first: joins take the rooms' lock, so it is not held while
    /// the listing's strings are built.
    pub fn rooms(&self) -> Vec<LiveRoom> {
        let handles: Vec<(Arc<str>, RoomHandle)> = self
            .node
            .rooms()
            .iter()
            .map(|(topic, r)| (topic.clone(), r.clone()))
            .collect();
        handles
            .into_iter()
            .map(|(topic, r)| LiveRoom {
                topic: topic.to_string(),
                plugin: r.plugin.to_string(),
                version: r.version().to_string(),
                members: r.members.load(Ordering::Relaxed),
                here: r.serving.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// The live rooms of this node counted by plugin and version (what a scrape reads:
    /// nothing is allocated per room).
    pub fn rooms_by_version(&self) -> BTreeMap<(Arc<str>, Arc<str>), usize> {
        let mut counts = BTreeMap::new();
        for r in self.node.rooms().values() {
            *counts.entry((r.plugin.clone(), r.version())).or_default() += 1;
        }
        counts
    }

    /// Number of live rooms of `plugin`.
    pub fn live_rooms(&self, plugin: &str) -> usize {
        self.node
            .rooms()
            .values()
            .filter(|r| &*r.plugin == plugin)
            .count()
    }

    /// Asks every live room of `route`'s plugin to move to `route`'s version at its next
    /// message boundary (behind the messages already queued, which the old version
    /// handles). Each room's new instance is made here first, so the room itself only
    /// pauses for snapshot, restore and the swap; at most `SWAPS_IN_FLIGHT` spare
    /// instances exist at once. Returns each room's topic and how its swap went; a room
    /// that closes before its turn has nothing to report.
    pub async fn upgrade(&self, route: &Route) -> Vec<(Arc<str>, SwapResult)> {
        let rooms: Vec<(Arc<str>, RoomHandle)> = self
            .node
            .rooms()
            .iter()
            .filter(|(_, r)| r.plugin == route.plugin && r.serving.load(Ordering::Relaxed))
            .map(|(topic, r)| (topic.clone(), r.clone()))
            .collect();
        let mut pending = VecDeque::new();
        let mut results = Vec::with_capacity(rooms.len());
        for (topic, room) in rooms {
            if pending.len() >= SWAPS_IN_FLIGHT {
                collect_swap(&mut pending, &mut results).await;
            }
            let next = route.factory.instantiate(&topic).await;
            let (done, result) = oneshot::channel();
            let msg = RoomMsg::Upgrade {
                route: route.clone(),
                next: next.map_err(|e| e.detail),
                done,
            };
            // A room whose mailbox stays full is busy: it is reported, not waited for.
            match tokio::time::timeout(ROOM_WAIT, room.tx.send(msg)).await {
                Ok(Ok(())) => pending.push_back((topic, Instant::now() + ROOM_WAIT, result)),
                Ok(Err(_)) => {}
                Err(_) => {
                    Stats::bump(&self.node.stats.room_busy);
                    results.push((
                        topic,
                        SwapResult::Stayed("room busy: its mailbox stayed full".into()),
                    ));
                }
            }
        }
        while !pending.is_empty() {
            collect_swap(&mut pending, &mut results).await;
        }
        results
    }

    /// This node stops: every room it owns for the cluster saves its state and gives its
    /// lease up, so the next owner takes it over at once from its last state (calls already
    /// on their way to this node get `Moved` and are not applied). At most
    /// [`ROOM_WAIT`].
    pub async fn hand_off(&self) {
        let rooms: Vec<RoomHandle> = self
            .node
            .rooms()
            .values()
            .filter(|r| r.serving.load(Ordering::Relaxed))
            .cloned()
            .collect();
        let deadline = tokio::time::Instant::now() + ROOM_WAIT;
        let mut waits = Vec::new();
        for room in rooms {
            let (done, handed) = oneshot::channel();
            if room.hand_off(done) {
                waits.push(handed);
            }
        }
        for handed in waits {
            let _ = tokio::time::timeout_at(deadline, handed).await;
        }
    }

    /// A number unique on this node (channels, subscriptions).
    pub(super) fn next_id(&self) -> u64 {
        self.node.next_id()
    }

    /// The room of `topic`, started if needed. `Err` when no plugin serves the topic or the
    /// node is at its room cap.
    pub(super) fn room(self: &Arc<Self>, topic: &Arc<str>) -> Result<RoomHandle, &'static str> {
        let mut rooms = self.node.rooms();
        if let Some(room) = rooms.get(topic) {
            return Ok(room.clone());
        }
        let route = self.router.route(topic).ok_or(reason::UNMATCHED_TOPIC)?;
        if rooms.len() >= self.node.limits.max_rooms as usize {
            Stats::bump(&self.node.stats.rooms_refused);
            if self.warnings.allow() {
                tracing::warn!(%topic, max_rooms = self.node.limits.max_rooms, "room cap reached: join refused");
            }
            return Err(reason::AT_CAPACITY);
        }
        let handle = room::start(&self.node, &mut rooms, topic, route);
        Ok(handle)
    }
}

/// Rooms swapping at once during an activation: bounds the spare instances (the pooling
/// allocator keeps headroom for them).
const SWAPS_IN_FLIGHT: usize = 8;

type PendingSwaps = VecDeque<(Arc<str>, Instant, oneshot::Receiver<SwapResult>)>;

/// Waits for the oldest pending swap, until its deadline: past it, the room is reported as
/// pending (it swaps once it gets to the message).
async fn collect_swap(pending: &mut PendingSwaps, results: &mut Vec<(Arc<str>, SwapResult)>) {
    if let Some((topic, deadline, result)) = pending.pop_front() {
        match tokio::time::timeout_at(deadline.into(), result).await {
            Ok(Ok(result)) => results.push((topic, result)),
            Ok(Err(_)) => {}
            Err(_) => results.push((topic, SwapResult::Pending)),
        }
    }
}

/// Hears what other nodes send this one, and the cluster's events, for the node's rooms.
pub struct Relay {
    node: std::sync::Weak<Node>,
}

impl Relay {
    fn new(node: std::sync::Weak<Node>) -> Self {
        Relay { node }
    }
}

impl DirectListener for Relay {
    fn message(&self, origin: &str, data: &[u8]) {
        let Some(node) = self.node.upgrade() else {
            return;
        };
        match Wire::decode(data) {
            Some(Wire::ToMember(answer)) => node.proxies.answer(answer, &node.stats),
            Some(Wire::ToOwner(call)) => node.call(origin.into(), call),
            None => Stats::bump(&node.stats.cluster_malformed),
        }
    }

    fn node_down(&self, gone: &str) {
        if let Some(node) = self.node.upgrade() {
            node.down(gone, true);
            node.tell_rooms(|| RemoteMsg::NodeDown(gone.into()));
        }
    }

    fn node_up(&self, up: &str) {
        if let Some(node) = self.node.upgrade() {
            node.down(up, false);
        }
    }

    fn reconnected(&self) {
        if let Some(node) = self.node.upgrade() {
            node.tell_rooms(|| RemoteMsg::Reconnected);
        }
    }
}
