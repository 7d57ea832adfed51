//! Presence owned by the host (Phoenix.Presence): who is in each topic, with metadata.
//!
//! [`state`] is the pure CRDT (testable alone, ready to replicate between nodes). The
//! [`Tracker`] here is the thin layer around it: one state per topic, channels as owners of
//! their entries, `phx_ref`s, and the `presence_state` / `presence_diff` payloads, each diff
//! published once through PubSub. A join or leave costs O(1) state work plus one diff for
//! the whole topic; only a joining channel's `presence_state` is as large as the topic.
//!
//! On a cluster the CRDT is what replicates (as Phoenix.Tracker does): every local change
//! ships its delta to the other nodes with a room on the topic, each of which merges it
//! and publishes the diff that made to its own subscribers; a room opening on a node asks
//! the others for their own entries first (a full sync, waited for up to
//! [`SYNC_WAIT`]), and so does every topic after an outage of the link. A node that is
//! gone has its entries leave everywhere, as one diff per topic; a node that started anew
//! under the same id has its old entries leave too; a node taken for gone that proves
//! alive (its heartbeat is back) is synced with again, and its entries join again.

pub mod state;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use base64::Engine as _;

use self::state::{Delta, Diff, Dot, Replica, State};
use crate::protocol::{self, Payload};
use crate::pubsub::{Broadcast, ClusterListener, PubSub};

/// How long a room opening on a cluster node waits for the other nodes' entries at most.
pub const SYNC_WAIT: Duration = Duration::from_secs(1);

/// Why a presence call was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PresenceError {
    /// Metadata must be a JSON object.
    #[error("presence meta must be a JSON object")]
    MetaNotObject,
    /// The channel does not track this key.
    #[error("not tracking key {0:?}")]
    NotTracked(String),
    /// The channel already tracks this key.
    #[error("already tracking key {0:?}")]
    AlreadyTracked(String),
    /// Metadata over [`MAX_META_BYTES`].
    #[error("presence meta over {MAX_META_BYTES} bytes")]
    MetaTooLarge,
    /// Metadata nested deeper than [`MAX_META_DEPTH`].
    #[error("presence meta nests deeper than {MAX_META_DEPTH} levels")]
    MetaTooDeep,
    /// A key over [`MAX_KEY_BYTES`].
    #[error("presence key over {MAX_KEY_BYTES} bytes")]
    KeyTooLong,
    /// The channel tracks [`MAX_KEYS_PER_CHANNEL`] keys already.
    #[error("a channel may track at most {MAX_KEYS_PER_CHANNEL} keys")]
    TooManyKeys,
    /// The socket's channels hold as many presence bytes as one socket may.
    #[error("presence budget per socket ({0} bytes, presence_bytes_per_socket) used up")]
    SocketBudget(usize),
    /// The node holds as many presence bytes as it may.
    #[error("presence budget of the node ({0} bytes, presence_bytes_total) used up")]
    NodeBudget(usize),
}

/// Largest meta one entry may carry: presence lives in host memory.
pub const MAX_META_BYTES: usize = 64 << 10;
/// Deepest meta: `presence_state` and `presence_diff` wrap it in four more levels, and
/// the whole must stay within what clients and plugins are sent.
pub const MAX_META_DEPTH: usize = 32;
/// Longest key (a user id, say).
pub const MAX_KEY_BYTES: usize = 256;
/// Keys one channel may track at once.
pub const MAX_KEYS_PER_CHANNEL: usize = 32;
/// What an entry costs besides its key and meta, for the budgets.
const ENTRY_OVERHEAD: usize = 64;

/// The presence bytes one socket's channels hold, shared by its channels, charged when
/// they track and given back when their entries leave.
#[derive(Debug, Default)]
pub struct Account(AtomicUsize);

impl Account {
    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// One tracked entry as its owner holds it: where it is and what it was charged.
struct Owned {
    dot: Dot,
    bytes: usize,
    account: Arc<Account>,
}

#[derive(Default)]
struct Topic {
    state: Option<State>,
    /// owner -> key -> the entry: a channel's entries in O(1).
    owned: HashMap<u64, HashMap<String, Owned>>,
    /// A room of the topic is open on this node: the topic is kept while it is, and
    /// other nodes' deltas are taken.
    open: bool,
    /// The nodes whose full sync arrived since the topic opened.
    synced_from: HashSet<String>,
}

impl Topic {
    /// Adds an entry for `owner` under `key` and records that the owner holds it.
    fn add(
        &mut self,
        replica: Replica,
        owner: u64,
        key: &str,
        meta: &str,
        prev: Option<Dot>,
        charge: (usize, Arc<Account>),
    ) -> (Delta, Diff) {
        let state = self.state.get_or_insert_with(|| State::new(replica));
        let (delta, diff) = state.add(key, owner, meta.to_owned(), prev);
        if let Some((dot, _)) = diff.joins.first() {
            let (bytes, account) = charge;
            self.owned.entry(owner).or_default().insert(
                key.to_owned(),
                Owned {
                    dot: *dot,
                    bytes,
                    account,
                },
            );
        }
        (delta, diff)
    }
}

/// A replication message between nodes' trackers (JSON): a delta, or a node's own entries
/// (a full sync), asking the others for theirs when `ask`.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Replication {
    Delta {
        replica: Replica,
        delta: serde_json::Value,
    },
    Sync {
        replica: Replica,
        own: serde_json::Value,
        ask: bool,
    },
}

/// The presence of every topic on this node.
pub struct Tracker {
    replica: Replica,
    pubsub: Arc<dyn PubSub>,
    topics: Mutex<HashMap<Arc<str>, Arc<Mutex<Topic>>>>,
    /// Bytes every entry of the node holds.
    held: AtomicUsize,
    per_socket: usize,
    total: usize,
    /// The replica of each other node, learned from what it sent.
    replicas: Mutex<HashMap<String, Replica>>,
    /// Woken at every full sync that arrives.
    synced: tokio::sync::Notify,
    /// Whether other nodes hold replicas (a cluster member): on one node, no delta is
    /// encoded.
    replicating: bool,
}

impl Tracker {
    /// [`Tracker::new`], taking the cluster's replication messages and events when
    /// `pubsub` is a cluster adapter.
    pub fn start(pubsub: Arc<dyn PubSub>, per_socket: usize, total: usize) -> Arc<Tracker> {
        Arc::new_cyclic(|me| {
            let replicating = pubsub.on_cluster(Box::new(Replicas(me.clone())));
            Tracker {
                replicating,
                ..Tracker::new(pubsub, per_socket, total)
            }
        })
    }

    /// A tracker publishing diffs through `pubsub`, holding at most `total` bytes of
    /// presence, `per_socket` for one socket; a random replica id keeps `phx_ref`s unique
    /// across restarts.
    pub fn new(pubsub: Arc<dyn PubSub>, per_socket: usize, total: usize) -> Self {
        Tracker {
            replica: rand::random(),
            pubsub,
            topics: Mutex::default(),
            held: AtomicUsize::new(0),
            per_socket,
            total,
            replicas: Mutex::default(),
            synced: tokio::sync::Notify::new(),
            replicating: false,
        }
    }

    /// Bytes of presence the node holds now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Charges `bytes` to `account` and the node, or says which budget is used up.
    fn charge(&self, account: &Account, bytes: usize) -> Result<(), PresenceError> {
        if account.held().saturating_add(bytes) > self.per_socket {
            return Err(PresenceError::SocketBudget(self.per_socket));
        }
        let node = self.held.fetch_add(bytes, Ordering::Relaxed);
        if node.saturating_add(bytes) > self.total {
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            return Err(PresenceError::NodeBudget(self.total));
        }
        account.0.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Charges an entry's account and the node for `bytes` instead of what it holds.
    fn recharge(&self, owned: &Owned, bytes: usize) -> Result<(), PresenceError> {
        match bytes.checked_sub(owned.bytes) {
            Some(growth) => self.charge(&owned.account, growth),
            None => {
                let shrink = owned.bytes - bytes;
                owned.account.0.fetch_sub(shrink, Ordering::Relaxed);
                self.held.fetch_sub(shrink, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Gives back what an entry was charged.
    fn release(&self, owned: &Owned) {
        owned.account.0.fetch_sub(owned.bytes, Ordering::Relaxed);
        self.held.fetch_sub(owned.bytes, Ordering::Relaxed);
    }

    fn topic(&self, topic: &Arc<str>) -> Arc<Mutex<Topic>> {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.entry(topic.clone()).or_default().clone()
    }

    fn existing(&self, topic: &str) -> Option<Arc<Mutex<Topic>>> {
        self.topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(topic)
            .cloned()
    }

    /// Runs `f` on a topic's state (created on demand), publishes the diff it made to
    /// this node's subscribers, ships the delta to the other nodes, and forgets the topic
    /// once no one is present and no room of it is open here.
    fn mutate<T>(
        &self,
        topic: &Arc<str>,
        f: impl FnOnce(&mut Topic, Replica) -> (T, Diff, Delta),
    ) -> T {
        let cell = self.topic(topic);
        let (value, idle) = {
            let mut t = cell.lock().unwrap_or_else(|p| p.into_inner());
            let (value, diff, delta) = f(&mut t, self.replica);
            // Under the topic's lock, so deltas leave in the order they were made.
            if !delta.is_empty() && self.replicating {
                self.replicate(
                    topic,
                    &Replication::Delta {
                        replica: self.replica,
                        delta: delta.to_wire(),
                    },
                );
            }
            self.publish_diff(topic, &diff);
            let idle =
                !t.open && t.owned.is_empty() && t.state.as_ref().is_none_or(State::is_empty);
            (value, idle)
        };
        if idle {
            self.forget_if_idle(topic);
        }
        value
    }

    /// Publishes a diff to this node's subscribers of `topic`.
    fn publish_diff(&self, topic: &Arc<str>, diff: &Diff) {
        if diff.is_empty() {
            return;
        }
        self.pubsub.publish_local(Arc::new(Broadcast::new(
            topic.clone(),
            protocol::presence::DIFF.into(),
            diff_payload(diff),
            None,
        )));
    }

    /// Forgets `topic` if no one else holds it and it has nothing.
    fn forget_if_idle(&self, topic: &str) {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        let idle = topics.get(topic).is_some_and(|c| {
            let t = c.lock().unwrap_or_else(|p| p.into_inner());
            Arc::strong_count(c) <= 2
                && !t.open
                && t.owned.is_empty()
                && t.state.as_ref().is_none_or(State::is_empty)
        });
        if idle {
            topics.remove(topic);
        }
    }

    /// Sends a replication message to the other nodes with a room on `topic`.
    fn replicate(&self, topic: &str, message: &Replication) {
        if let Ok(data) = serde_json::to_vec(message) {
            self.pubsub.replicate(topic, data);
        }
    }

    /// This node's own entries of `topic`, as a full sync.
    fn own_sync(&self, t: &Topic, ask: bool) -> Replication {
        let own = t
            .state
            .as_ref()
            .map(State::own)
            .unwrap_or_default()
            .to_wire();
        Replication::Sync {
            replica: self.replica,
            own,
            ask,
        }
    }

    /// A room of `topic` opens on this node: the topic is kept until [`Tracker::close`],
    /// and on a cluster the other nodes' entries are asked for and waited for (at most
    /// [`SYNC_WAIT`]), so a member joining now is sent the whole topic. Returns how long
    /// it waited, when it asked other nodes.
    pub async fn open(&self, topic: &Arc<str>) -> Option<std::time::Duration> {
        let cell = self.topic(topic);
        let ask = {
            let mut t = cell.lock().unwrap_or_else(|p| p.into_inner());
            t.open = true;
            t.synced_from.clear();
            if !self.replicating {
                return None;
            }
            serde_json::to_vec(&self.own_sync(&t, true)).unwrap_or_default()
        };
        let asked = std::time::Instant::now();
        let others = self.pubsub.replicate_counted(topic, ask).await;
        if others == 0 {
            return None;
        }
        let all_synced = async {
            loop {
                let woken = self.synced.notified();
                if cell
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .synced_from
                    .len()
                    >= others
                {
                    return;
                }
                woken.await;
            }
        };
        let _ = tokio::time::timeout(SYNC_WAIT, all_synced).await;
        Some(asked.elapsed())
    }

    /// The room of `topic` on this node ended (its members' entries left before): what
    /// other nodes' entries this node held for it is dropped, without a diff (no one here
    /// listens).
    pub fn close(&self, topic: &str) {
        if let Some(cell) = self.existing(topic) {
            let mut t = cell.lock().unwrap_or_else(|p| p.into_inner());
            t.open = false;
            t.synced_from.clear();
            if t.owned.is_empty() {
                t.state = None;
            }
        }
        self.forget_if_idle(topic);
    }

    /// Notes that node `origin` speaks as `replica`; a node that started anew under the
    /// same id speaks as a new replica, and the entries of its old one leave.
    fn learn(&self, origin: &str, replica: Replica) {
        let old = self
            .replicas
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(origin.to_owned(), replica);
        if let Some(old) = old
            && old != replica
        {
            self.drop_replica(old);
        }
    }

    /// Every topic held now, to walk without holding the map.
    fn every_topic(&self) -> Vec<(Arc<str>, Arc<Mutex<Topic>>)> {
        self.topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Every entry of `replica` leaves, in every topic, one diff per topic.
    fn drop_replica(&self, replica: Replica) {
        for (topic, cell) in self.every_topic() {
            let mut t = cell.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(state) = t.state.as_mut() {
                let diff = state.drop_replica(replica);
                self.publish_diff(&topic, &diff);
            }
        }
    }

    /// A replication message from node `origin` for `topic`.
    fn received(&self, origin: &str, topic: &str, data: &[u8]) {
        let Ok(message) = serde_json::from_slice::<Replication>(data) else {
            return;
        };
        let (replica, delta, sync, ask) = match message {
            Replication::Delta { replica, delta } => (replica, delta, false, false),
            Replication::Sync { replica, own, ask } => (replica, own, true, ask),
        };
        let Some(delta) = Delta::from_wire(delta) else {
            return;
        };
        // Deltas of this node's own replica come only from this node.
        if replica == self.replica {
            return;
        }
        self.learn(origin, replica);
        let Some(cell) = self.existing(topic) else {
            return;
        };
        let topic: Arc<str> = topic.into();
        let mut t = cell.lock().unwrap_or_else(|p| p.into_inner());
        if !t.open {
            return;
        }
        let state = t.state.get_or_insert_with(|| State::new(self.replica));
        let diff = state.merge(&delta);
        self.publish_diff(&topic, &diff);
        if sync {
            t.synced_from.insert(origin.to_owned());
            self.synced.notify_waiters();
        }
        if ask {
            let answer = self.own_sync(&t, false);
            self.replicate(&topic, &answer);
        }
    }

    /// After an outage (or a member back from one), every open topic syncs again both ways.
    fn resync(&self) {
        for (topic, cell) in self.every_topic() {
            let t = cell.lock().unwrap_or_else(|p| p.into_inner());
            if t.open {
                let sync = self.own_sync(&t, true);
                self.replicate(&topic, &sync);
            }
        }
    }

    /// `owner` (a channel of the socket whose presence is `account`) tracks `key` with
    /// `meta` (a JSON object) on `topic`.
    pub fn track(
        &self,
        topic: &Arc<str>,
        owner: u64,
        key: &str,
        meta: &str,
        account: &Arc<Account>,
    ) -> Result<(), PresenceError> {
        check_entry(key, meta)?;
        self.mutate(topic, |t, replica| {
            if let Some(keys) = t.owned.get(&owner) {
                let refused = if keys.contains_key(key) {
                    Some(PresenceError::AlreadyTracked(key.to_owned()))
                } else if keys.len() >= MAX_KEYS_PER_CHANNEL {
                    Some(PresenceError::TooManyKeys)
                } else {
                    None
                };
                if let Some(e) = refused {
                    return (Err(e), Diff::default(), Delta::default());
                }
            }
            let bytes = cost(key, meta);
            if let Err(e) = self.charge(account, bytes) {
                return (Err(e), Diff::default(), Delta::default());
            }
            let (delta, diff) = t.add(replica, owner, key, meta, None, (bytes, account.clone()));
            (Ok(()), diff, delta)
        })
    }

    /// `owner` replaces its meta for `key`: a leave of the old entry and a join of the new
    /// one, which carries `phx_ref_prev`.
    pub fn update(
        &self,
        topic: &Arc<str>,
        owner: u64,
        key: &str,
        meta: &str,
    ) -> Result<(), PresenceError> {
        check_entry(key, meta)?;
        self.mutate(topic, |t, replica| {
            let Some(old) = t.owned.get_mut(&owner).and_then(|keys| keys.remove(key)) else {
                return (
                    Err(PresenceError::NotTracked(key.to_owned())),
                    Diff::default(),
                    Delta::default(),
                );
            };
            // Only growth is charged: an update that does not fit leaves the entry as it was.
            let bytes = cost(key, meta);
            if let Err(e) = self.recharge(&old, bytes) {
                t.owned
                    .entry(owner)
                    .or_default()
                    .insert(key.to_owned(), old);
                return (Err(e), Diff::default(), Delta::default());
            }
            let state = t.state.get_or_insert_with(|| State::new(replica));
            let (mut delta, mut diff) = state.remove(&[old.dot]);
            let (added, joined) = t.add(
                replica,
                owner,
                key,
                meta,
                Some(old.dot),
                (bytes, old.account),
            );
            delta.absorb(added);
            diff.joins = joined.joins;
            (Ok(()), diff, delta)
        })
    }

    /// `owner` stops tracking `key`.
    pub fn untrack(&self, topic: &Arc<str>, owner: u64, key: &str) -> Result<(), PresenceError> {
        self.mutate(topic, |t, _| {
            let keys = t.owned.get_mut(&owner);
            let Some(owned) = keys.and_then(|keys| keys.remove(key)) else {
                return (
                    Err(PresenceError::NotTracked(key.to_owned())),
                    Diff::default(),
                    Delta::default(),
                );
            };
            self.release(&owned);
            if t.owned.get(&owner).is_some_and(HashMap::is_empty) {
                t.owned.remove(&owner);
            }
            let (delta, diff) = t
                .state
                .as_mut()
                .map(|s| s.remove(&[owned.dot]))
                .unwrap_or_default();
            (Ok(()), diff, delta)
        })
    }

    /// Every entry of `owner` leaves (its channel left, closed or crashed).
    pub fn untrack_owner(&self, topic: &Arc<str>, owner: u64) {
        if self.existing(topic).is_none() {
            return;
        }
        self.mutate(topic, |t, _| {
            let dots: Vec<Dot> = t
                .owned
                .remove(&owner)
                .map(|keys| {
                    keys.into_values()
                        .map(|owned| {
                            self.release(&owned);
                            owned.dot
                        })
                        .collect()
                })
                .unwrap_or_default();
            let (delta, diff) = match (&mut t.state, dots.is_empty()) {
                (Some(state), false) => state.remove(&dots),
                _ => Default::default(),
            };
            ((), diff, delta)
        })
    }

    /// The `presence_state` payload of `topic`: `{key: {"metas": [...]}}`.
    pub fn list(&self, topic: &str) -> Payload {
        json(self.list_json(topic))
    }

    /// [`Tracker::list`] as JSON text.
    pub fn list_json(&self, topic: &str) -> String {
        let mut out = String::from("{");
        if let Some(cell) = self.existing(topic) {
            let t = cell.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(state) = &t.state {
                for (i, (key, entries)) in state.by_key().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    push_key_metas(&mut out, key, entries);
                }
            }
        }
        out.push('}');
        out
    }
}

/// What an entry costs the budgets.
fn cost(key: &str, meta: &str) -> usize {
    key.len() + meta.len() + ENTRY_OVERHEAD
}

fn check_entry(key: &str, meta: &str) -> Result<(), PresenceError> {
    if key.len() > MAX_KEY_BYTES {
        return Err(PresenceError::KeyTooLong);
    }
    check_meta(meta)
}

fn check_meta(meta: &str) -> Result<(), PresenceError> {
    if meta.len() > MAX_META_BYTES {
        return Err(PresenceError::MetaTooLarge);
    }
    if !crate::protocol::nests_within(meta, MAX_META_DEPTH) {
        return Err(PresenceError::MetaTooDeep);
    }
    match serde_json::from_str::<serde_json::Value>(meta) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        _ => Err(PresenceError::MetaNotObject),
    }
}

fn json(text: String) -> Payload {
    Payload::json(text).unwrap_or_else(|e| unreachable!("presence payloads are built as JSON: {e}"))
}

/// `phx_ref` of an entry: url-safe base64 of its dot, unique per entry.
pub fn phx_ref(dot: &Dot) -> String {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&dot.replica.to_be_bytes());
    bytes[8..].copy_from_slice(&dot.counter.to_be_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn push_key_metas<'a>(
    out: &mut String,
    key: &str,
    entries: impl Iterator<Item = (&'a Dot, &'a state::Entry)>,
) {
    let metas = entries.map(|(dot, entry)| protocol::presence::Meta {
        meta: &entry.meta,
        phx_ref: phx_ref(dot),
        prev: entry.prev.as_ref().map(phx_ref),
    });
    protocol::presence::push_key(out, key, metas);
}

fn push_group(out: &mut String, entries: &[(Dot, state::Entry)]) {
    let mut keys: Vec<&str> = entries.iter().map(|(_, e)| e.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    out.push('{');
    for (i, key) in keys.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_key_metas(
            out,
            key,
            entries
                .iter()
                .filter(|(_, e)| e.key == *key)
                .map(|(d, e)| (d, e)),
        );
    }
    out.push('}');
}

/// The `presence_diff` payload: `{"joins": {...}, "leaves": {...}}`.
fn diff_payload(diff: &Diff) -> Payload {
    json(protocol::presence::diff(
        |out| push_group(out, &diff.joins),
        |out| push_group(out, &diff.leaves),
    ))
}

/// The tracker as the cluster's listener; it holds the tracker weakly (the PubSub it
/// listens to is the tracker's own).
struct Replicas(Weak<Tracker>);

impl ClusterListener for Replicas {
    fn replica(&self, origin: &str, topic: &str, data: &[u8]) {
        if let Some(tracker) = self.0.upgrade() {
            tracker.received(origin, topic, data);
        }
    }

    fn node_down(&self, node: &str) {
        if let Some(tracker) = self.0.upgrade() {
            let replica = tracker
                .replicas
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(node);
            if let Some(replica) = replica {
                tracker.drop_replica(replica);
            }
        }
    }

    fn node_up(&self, _node: &str) {
        // A node taken for gone had its entries dropped here: sync again to have them back
        // (a node that just joined has nothing yet, and the sync costs one message a topic).
        if let Some(tracker) = self.0.upgrade() {
            tracker.resync();
        }
    }

    fn reconnected(&self) {
        if let Some(tracker) = self.0.upgrade() {
            tracker.resync();
        }
    }
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pubsub::{LocalPubSub, Subscriber};
    use serde_json::{Value, json};

    #[derive(Default)]
    struct Collect(Mutex<Vec<Value>>);
    impl Subscriber for Collect {
        fn deliver(&self, b: &Arc<Broadcast>) {
            let Payload::Json(raw) = &b.payload else {
                panic!("json")
            };
            self.0
                .lock()
                .expect("lock")
                .push(serde_json::from_str(raw.get()).expect("valid JSON"));
        }
    }

    fn setup() -> (Tracker, Arc<Collect>, Arc<str>) {
        let pubsub = Arc::new(LocalPubSub::new());
        let seen = Arc::new(Collect::default());
        let topic: Arc<str> = "presence:lobby".into();
        pubsub.subscribe(&topic, 1, seen.clone());
        (Tracker::new(pubsub, 1 << 20, 1 << 20), seen, topic)
    }

    fn account() -> Arc<Account> {
        Arc::new(Account::default())
    }

    fn parse(p: Payload) -> Value {
        let Payload::Json(raw) = p else {
            panic!("json")
        };
        serde_json::from_str(raw.get()).expect("valid JSON")
    }

    #[test]
    fn track_lists_and_diffs_in_phoenix_shapes() {
        let (tracker, seen, topic) = setup();
        let acct = account();
        tracker
            .track(&topic, 10, "alice", r#"{"online_at":1}"#, &acct)
            .expect("tracks");
        tracker
            .track(&topic, 11, "alice", r#"{"online_at":2}"#, &acct)
            .expect("tracks");
        tracker
            .track(&topic, 12, "bob", "{}", &acct)
            .expect("tracks");
        let state = parse(tracker.list(&topic));
        assert_eq!(state["alice"]["metas"].as_array().map(Vec::len), Some(2));
        assert_eq!(state["alice"]["metas"][0]["online_at"], 1);
        assert!(state["bob"]["metas"][0]["phx_ref"].is_string());
        let diffs = seen.0.lock().expect("lock").clone();
        assert_eq!(diffs.len(), 3);
        assert_eq!(diffs[0]["joins"]["alice"]["metas"][0]["online_at"], 1);
        assert_eq!(diffs[0]["leaves"], json!({}));
    }

    #[test]
    fn update_is_a_leave_and_a_join_with_phx_ref_prev() {
        let (tracker, seen, topic) = setup();
        let acct = account();
        tracker
            .track(&topic, 10, "alice", r#"{"status":"here"}"#, &acct)
            .expect("tracks");
        tracker
            .update(&topic, 10, "alice", r#"{"status":"away"}"#)
            .expect("updates");
        let diffs = seen.0.lock().expect("lock").clone();
        let old_ref = diffs[0]["joins"]["alice"]["metas"][0]["phx_ref"].clone();
        assert_eq!(diffs[1]["leaves"]["alice"]["metas"][0]["phx_ref"], old_ref);
        assert_eq!(
            diffs[1]["joins"]["alice"]["metas"][0]["phx_ref_prev"],
            old_ref
        );
        assert_eq!(diffs[1]["joins"]["alice"]["metas"][0]["status"], "away");
        assert_eq!(
            parse(tracker.list(&topic))["alice"]["metas"]
                .as_array()
                .map(Vec::len),
            Some(1)
        );
    }

    #[test]
    fn an_owner_leaving_removes_its_entries_and_empty_topics_are_forgotten() {
        let (tracker, seen, topic) = setup();
        let acct = account();
        tracker
            .track(&topic, 10, "alice", "{}", &acct)
            .expect("tracks");
        tracker
            .track(&topic, 10, "alice-bot", "{}", &acct)
            .expect("tracks");
        tracker.untrack_owner(&topic, 10);
        let diffs = seen.0.lock().expect("lock").clone();
        let leaves = diffs[2]["leaves"].as_object().expect("object");
        assert_eq!(leaves.len(), 2);
        assert_eq!(parse(tracker.list(&topic)), json!({}));
        assert!(tracker.existing(&topic).is_none());
    }

    #[test]
    fn bad_calls_are_errors() {
        let (tracker, _, topic) = setup();
        let acct = account();
        assert_eq!(
            tracker.track(&topic, 1, "a", "[1]", &acct),
            Err(PresenceError::MetaNotObject)
        );
        assert_eq!(
            tracker.untrack(&topic, 1, "a"),
            Err(PresenceError::NotTracked("a".into()))
        );
        assert_eq!(
            tracker.update(&topic, 1, "a", "{}"),
            Err(PresenceError::NotTracked("a".into()))
        );
        tracker.track(&topic, 1, "a", "{}", &acct).expect("tracks");
        assert_eq!(
            tracker.track(&topic, 1, "a", "{}", &acct),
            Err(PresenceError::AlreadyTracked("a".into()))
        );
        let big = format!("{{\"x\":\"{}\"}}", "y".repeat(MAX_META_BYTES));
        assert_eq!(
            tracker.track(&topic, 2, "b", &big, &acct),
            Err(PresenceError::MetaTooLarge)
        );
        for i in 1..MAX_KEYS_PER_CHANNEL {
            tracker
                .track(&topic, 1, &format!("k{i}"), "{}", &acct)
                .expect("tracks");
        }
        assert_eq!(
            tracker.track(&topic, 1, "one-more", "{}", &acct),
            Err(PresenceError::TooManyKeys)
        );
    }

    #[test]
    fn budgets_per_socket_and_per_node_are_charged_and_given_back() {
        let pubsub = Arc::new(LocalPubSub::new());
        let tracker = Tracker::new(pubsub, 1000, 1400);
        let topic: Arc<str> = "t".into();
        let (a, b) = (account(), account());
        let meta = format!("{{\"p\":\"{}\"}}", "x".repeat(300));
        let mut tracked = 0;
        while tracker
            .track(&topic, 1, &format!("k{tracked}"), &meta, &a)
            .is_ok()
        {
            tracked += 1;
        }
        assert_eq!(tracked, 2, "370 bytes an entry, 1000 a socket");
        assert_eq!(
            tracker.track(&topic, 1, "more", &meta, &a),
            Err(PresenceError::SocketBudget(1000))
        );
        tracker
            .track(&topic, 2, "b0", &meta, &b)
            .expect("fits the node");
        assert_eq!(
            tracker.track(&topic, 2, "b1", &meta, &b),
            Err(PresenceError::NodeBudget(1400))
        );
        // An update that grows past the budget leaves the entry as it was.
        let bigger = format!("{{\"p\":\"{}\"}}", "x".repeat(900));
        assert_eq!(
            tracker.update(&topic, 2, "b0", &bigger),
            Err(PresenceError::NodeBudget(1400))
        );
        assert_eq!(tracker.held(), a.held() + b.held());
        tracker.untrack_owner(&topic, 1);
        tracker.untrack(&topic, 2, "b0").expect("untracks");
        assert_eq!((tracker.held(), a.held(), b.held()), (0, 0, 0));
        assert_eq!(
            tracker.track(&topic, 3, &"k".repeat(MAX_KEY_BYTES + 1), "{}", &a),
            Err(PresenceError::KeyTooLong)
        );
        let deep = format!(
            "{{\"a\":{}{}}}",
            "[".repeat(MAX_META_DEPTH),
            "]".repeat(MAX_META_DEPTH)
        );
        assert_eq!(
            tracker.track(&topic, 3, "k", &deep, &a),
            Err(PresenceError::MetaTooDeep)
        );
    }
}
