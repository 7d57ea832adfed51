//! The node's link to the cluster's Redis: this node's id, one RESP3 connection for
//! commands and for the channels it subscribes to, the state of that link (an outage is
//! logged once when it starts and once when it ends, and counted), the membership
//! heartbeat, and the members' view. It moves bytes on named channels and knows nothing of
//! topics, sockets or rooms (that is [`crate::pubsub`]'s Redis adapter).
//!
//! Everything the node asks of Redis goes through one worker task, in order: subscribes,
//! unsubscribes and publishes are applied as they were asked, publishes batched into one
//! pipeline per wake, so a room's broadcasts leave in the order it made them. While Redis
//! is unreachable the worker drops publishes (counted in `cluster_dropped`) and keeps the
//! set of channels the node wants; once a heartbeat gets through again it subscribes them
//! all anew. Nothing here blocks a caller: asking is a send on an unbounded queue, whose
//! size is bounded by dropping publishes past `MAX_QUEUED`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::stats::Stats;

/// The set of member ids.
const MEMBERS: &str = "cinder:nodes";
/// The key prefix of a member's heartbeat record (`cinder:node:<id>`), which expires after
/// three fifths of the down period (two missed heartbeats).
const NODE_PREFIX: &str = "cinder:node:";
/// How long a command may take before the link counts as down.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Publishes waiting for the worker at most; past it they are dropped and counted, so a
/// stalled Redis cannot grow the node's memory.
const MAX_QUEUED: usize = 65_536;
/// Publishes sent in one pipeline at most.
const BATCH: usize = 512;

/// What hears the link: the messages of the channels the node subscribed to, members that
/// are gone, and the link coming back. Called on the link's tasks: it must not block.
pub trait Listener: Send + Sync {
    /// A message on `channel`.
    fn message(&self, channel: &[u8], data: &[u8]);
    /// Member `node` is gone: its heartbeat record expired, or it started anew.
    fn node_down(&self, node: &str);
    /// Member `node` is there: it joined, or it was taken for gone and its heartbeat came
    /// back (a stall longer than the down period).
    fn node_up(&self, node: &str);
    /// The link is up again after an outage, every channel subscribed anew: what was
    /// published meanwhile did not arrive.
    fn reconnected(&self);
}

/// Consecutive subscribes (or unsubscribes), sent as one command.
#[derive(Default)]
struct Run {
    channels: Vec<String>,
    unsubscribing: bool,
}

/// One thing asked of Redis, in order.
enum Op {
    Subscribe(String),
    Unsubscribe(String),
    Publish(String, Vec<u8>),
    /// A publish answered with how many subscribers (nodes) heard it.
    PublishCounted(String, Vec<u8>, oneshot::Sender<usize>),
    /// Answered once everything asked before it is done (or could not be).
    Ready(oneshot::Sender<()>),
    /// Leave the cluster: remove this node's record, then stop.
    Leave(oneshot::Sender<()>),
}

/// A member as its heartbeat record says.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Member {
    /// Its node id.
    pub id: String,
    /// Where it serves clients.
    pub address: String,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// Its last heartbeat, in milliseconds since the Unix epoch.
    pub heartbeat_ms: u64,
    /// The version it serves of each plugin, as of its last heartbeat.
    #[serde(default)]
    pub versions: BTreeMap<String, String>,
}

/// The link to Redis. Cheap to share; every method returns at once.
pub struct Link {
    node: Arc<str>,
    ops: mpsc::UnboundedSender<Op>,
    queued: Arc<AtomicUsize>,
    up: Arc<AtomicBool>,
    listener: Arc<OnceLock<Box<dyn Listener>>>,
    conn: Arc<Mutex<Option<ConnectionManager>>>,
    stats: Arc<Stats>,
    taps: Taps,
    versions: Arc<Mutex<BTreeMap<String, String>>>,
    ups: Arc<tokio::sync::watch::Sender<u64>>,
}

/// Channels whose messages go to a queue of their own (not to the listener).
type Taps = Arc<Mutex<HashMap<Vec<u8>, mpsc::UnboundedSender<Vec<u8>>>>>;

/// What the worker needs.
struct Worker {
    client: redis::Client,
    node: Arc<str>,
    record: Member,
    down_after: Duration,
    conn: Arc<Mutex<Option<ConnectionManager>>>,
    up: Arc<AtomicBool>,
    /// Set by the connection when it dropped: its subscriptions are gone.
    lost: Arc<AtomicBool>,
    listener: Arc<OnceLock<Box<dyn Listener>>>,
    taps: Taps,
    versions: Arc<Mutex<BTreeMap<String, String>>>,
    ups: Arc<tokio::sync::watch::Sender<u64>>,
    queued: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    /// The channels the node wants, whatever the link's state.
    wanted: HashSet<String>,
    /// The other members as last read, with their start times.
    known: HashMap<String, u64>,
    /// After an outage, members are not declared gone before this: a Redis that restarted
    /// empty holds no record until each member's next heartbeat.
    settling_until: Option<tokio::time::Instant>,
    /// Whether the link was ever up (its first coming up is no recovery).
    was_ever_up: bool,
    /// Whether the first failure to reach Redis was said.
    said_unreachable: bool,
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A node id for a node started without one: random, short, and unlike any other.
pub fn generated_node_id() -> String {
    format!("node-{:08x}", rand::random::<u32>())
}

impl Link {
    /// Starts the link to `url` for node `node` serving at `address`, whose members are
    /// down after `down_after` without a heartbeat. Returns at once: a Redis that cannot be
    /// reached yet is said in one line and tried again at every heartbeat.
    pub fn start(
        url: &str,
        node: &str,
        address: String,
        down_after: Duration,
        stats: Arc<Stats>,
    ) -> anyhow::Result<Arc<Link>> {
        let info: redis::ConnectionInfo = url
            .parse()
            .map_err(|e| anyhow::anyhow!("redis_url {url:?}: {e}"))?;
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let info = info.set_redis_settings(settings);
        let client = redis::Client::open(info)?;
        let (ops, rx) = mpsc::unbounded_channel();
        let node: Arc<str> = node.into();
        let started = now_ms();
        let link = Arc::new(Link {
            node: node.clone(),
            ops,
            queued: Arc::default(),
            up: Arc::default(),
            listener: Arc::default(),
            conn: Arc::default(),
            stats: stats.clone(),
            taps: Arc::default(),
            versions: Arc::default(),
            ups: Arc::new(tokio::sync::watch::Sender::new(0)),
        });
        let worker = Worker {
            client,
            node,
            record: Member {
                id: link.node.to_string(),
                address,
                started_ms: started,
                heartbeat_ms: started,
                versions: BTreeMap::new(),
            },
            down_after,
            conn: link.conn.clone(),
            up: link.up.clone(),
            lost: Arc::default(),
            listener: link.listener.clone(),
            taps: link.taps.clone(),
            versions: link.versions.clone(),
            ups: link.ups.clone(),
            queued: link.queued.clone(),
            stats,
            wanted: HashSet::new(),
            known: HashMap::new(),
            settling_until: None,
            was_ever_up: false,
            said_unreachable: false,
        };
        tokio::spawn(worker.run(rx));
        Ok(link)
    }

    /// This node's id.
    pub fn node(&self) -> &Arc<str> {
        &self.node
    }

    /// Whether Redis answered the last thing asked of it.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Who hears the link; set once, before any subscribe.
    pub fn listen(&self, listener: Box<dyn Listener>) {
        let _ = self.listener.set(listener);
    }

    /// The messages of `channel` from now on, in a queue of their own; the node subscribes
    /// to it (now, or once Redis is back).
    pub fn tap(&self, channel: &str) -> mpsc::UnboundedReceiver<Vec<u8>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.taps
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(channel.as_bytes().to_vec(), tx);
        self.subscribe(channel.to_owned());
        rx
    }

    /// The connection, for commands of a layer above (the plugin store's records); `None`
    /// while there is none yet. A command that fails there does not mark the link down.
    pub fn connection(&self) -> Option<ConnectionManager> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many times the link came up (at start, and after each outage), watched.
    pub fn ups(&self) -> tokio::sync::watch::Receiver<u64> {
        self.ups.subscribe()
    }

    /// What this node's heartbeat record says it serves, from its next heartbeat on.
    pub fn describe(&self, versions: BTreeMap<String, String>) {
        *self.versions.lock().unwrap_or_else(|p| p.into_inner()) = versions;
    }

    /// Subscribes the node to `channel` (now, or once Redis is back).
    pub fn subscribe(&self, channel: String) {
        let _ = self.ops.send(Op::Subscribe(channel));
    }

    /// Drops the node's subscription to `channel`.
    pub fn unsubscribe(&self, channel: String) {
        let _ = self.ops.send(Op::Unsubscribe(channel));
    }

    /// Publishes `data` on `channel`, after everything asked before; dropped and counted
    /// while Redis is down or too far behind.
    pub fn publish(&self, channel: String, data: Vec<u8>) {
        if !self.is_up() || self.queued.load(Ordering::Relaxed) >= MAX_QUEUED {
            Stats::bump(&self.stats.cluster_dropped);
            return;
        }
        self.queued.fetch_add(1, Ordering::Relaxed);
        let _ = self.ops.send(Op::Publish(channel, data));
    }

    /// Publishes `data` on `channel` after everything asked before, resolving to how many
    /// subscribers heard it (this node among them when it is subscribed); 0 while Redis is
    /// down or when it does not answer within `wait`.
    pub fn publish_counted(
        &self,
        channel: String,
        data: Vec<u8>,
        wait: Duration,
    ) -> impl Future<Output = usize> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let asked = self.is_up() && self.ops.send(Op::PublishCounted(channel, data, tx)).is_ok();
        async move {
            if !asked {
                return 0;
            }
            match tokio::time::timeout(wait, rx).await {
                Ok(Ok(n)) => n,
                _ => 0,
            }
        }
    }

    /// Resolves once everything asked before it is done: a channel subscribed before is
    /// then heard. At most `wait`, and at once while Redis is down.
    pub fn ready(&self, wait: Duration) -> impl Future<Output = ()> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let asked = self.is_up() && self.ops.send(Op::Ready(tx)).is_ok();
        async move {
            if asked {
                let _ = tokio::time::timeout(wait, rx).await;
            }
        }
    }

    /// The members whose heartbeat is current, this node among them while the link is up;
    /// empty while Redis is down.
    pub async fn members(&self) -> Vec<Member> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(conn) = conn else {
            return Vec::new();
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, read_members(conn)).await {
            Ok(Ok(members)) => members,
            _ => Vec::new(),
        }
    }

    /// Leaves the cluster at once (a graceful stop): this node's record is removed, so the
    /// others need not wait for it to expire. At most `wait`.
    pub async fn leave(&self, wait: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.ops.send(Op::Leave(tx)).is_ok() {
            let _ = tokio::time::timeout(wait, rx).await;
        }
    }
}

/// The members whose record has not expired, by id; the ids whose record expired are
/// taken out of the set.
async fn read_members(mut conn: ConnectionManager) -> redis::RedisResult<Vec<Member>> {
    let ids: Vec<String> = conn.smembers(MEMBERS).await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = ids.iter().map(|id| format!("{NODE_PREFIX}{id}")).collect();
    let records: Vec<Option<String>> = conn.mget(&keys).await?;
    let mut members = Vec::new();
    for (id, record) in ids.iter().zip(records) {
        match record.and_then(|r| serde_json::from_str::<Member>(&r).ok()) {
            Some(member) => members.push(member),
            None => {
                let _: () = conn.srem(MEMBERS, id).await?;
            }
        }
    }
    members.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(members)
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Op>) {
        let mut beat = tokio::time::interval(self.down_after / 5);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            tokio::select! {
                biased;
                n = rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        return;
                    }
                    if self.apply(&mut batch).await {
                        return;
                    }
                }
                _ = beat.tick() => self.heartbeat().await,
            }
        }
    }

    /// The connection, if there is one.
    fn conn(&self) -> Option<ConnectionManager> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies the ops in order, runs of publishes in one pipeline and runs of subscribes
    /// (or unsubscribes) in one command, so a storm of connecting sockets costs a round trip
    /// per run, not per socket; true when the node left.
    async fn apply(&mut self, batch: &mut Vec<Op>) -> bool {
        let mut pipe = redis::pipe();
        let mut publishes = 0;
        let mut run = Run::default();
        let ops = std::mem::take(batch);
        for op in ops {
            match op {
                Op::Publish(channel, data) => {
                    self.change(&mut run).await;
                    pipe.publish(channel, data).ignore();
                    publishes += 1;
                }
                Op::Subscribe(channel) => {
                    self.flush(&mut pipe, &mut publishes).await;
                    if run.unsubscribing {
                        self.change(&mut run).await;
                    }
                    if self.wanted.insert(channel.clone()) {
                        run.channels.push(channel);
                    }
                }
                Op::Unsubscribe(channel) => {
                    self.flush(&mut pipe, &mut publishes).await;
                    if !run.unsubscribing {
                        self.change(&mut run).await;
                        run.unsubscribing = true;
                    }
                    if self.wanted.remove(&channel) {
                        run.channels.push(channel);
                    }
                }
                other => {
                    self.flush(&mut pipe, &mut publishes).await;
                    self.change(&mut run).await;
                    match other {
                        Op::PublishCounted(channel, data, done) => {
                            let heard = self
                                .command(|mut c| async move { c.publish(channel, data).await })
                                .await;
                            let _ = done.send(heard.unwrap_or(0));
                        }
                        Op::Ready(done) => {
                            let _ = done.send(());
                        }
                        Op::Leave(done) => {
                            let id = self.node.to_string();
                            self.command(|mut c| async move {
                                let _: () = c.del(format!("{NODE_PREFIX}{id}")).await?;
                                c.srem::<_, _, ()>(MEMBERS, id).await
                            })
                            .await;
                            // The connection (and its subscriptions) goes with the worker.
                            *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
                            let _ = done.send(());
                            return true;
                        }
                        Op::Publish(..) | Op::Subscribe(_) | Op::Unsubscribe(_) => {}
                    }
                }
            }
        }
        self.flush(&mut pipe, &mut publishes).await;
        self.change(&mut run).await;
        false
    }

    /// Sends a run of subscribes or unsubscribes as one command, and starts a new run (of
    /// subscribes).
    async fn change(&mut self, run: &mut Run) {
        let Run {
            channels,
            unsubscribing,
        } = std::mem::take(run);
        if channels.is_empty() {
            return;
        }
        if unsubscribing {
            self.command(|mut c| async move { c.unsubscribe(channels).await })
                .await;
        } else {
            self.command(|mut c| async move { c.subscribe(channels).await })
                .await;
        }
    }

    /// Sends the publishes gathered in `pipe`.
    async fn flush(&mut self, pipe: &mut redis::Pipeline, publishes: &mut usize) {
        if *publishes == 0 {
            return;
        }
        let n = std::mem::take(publishes);
        self.queued.fetch_sub(n, Ordering::Relaxed);
        let sent = std::mem::take(pipe);
        let ok = self
            .command(|mut c| async move { sent.query_async::<()>(&mut c).await })
            .await;
        if ok.is_some() {
            self.stats
                .cluster_published
                .fetch_add(n as u64, Ordering::Relaxed);
        } else {
            self.stats
                .cluster_dropped
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Runs one command on the connection: its answer, or `None` (and the link down) when
    /// there is no connection or the command failed.
    async fn command<F, Fut, T>(&mut self, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn()?;
        match tokio::time::timeout(COMMAND_TIMEOUT, f(conn)).await {
            Ok(Ok(answer)) => Some(answer),
            Ok(Err(e)) => {
                self.down(&e.to_string());
                None
            }
            Err(_) => {
                self.down("no answer within 2 s");
                None
            }
        }
    }

    /// The link went down: said once, when it happens.
    fn down(&self, why: &str) {
        if self.up.swap(false, Ordering::Relaxed) {
            Stats::bump(&self.stats.cluster_outages);
            tracing::warn!(node = %self.node, error = %why, "cluster: Redis unreachable; serving local sockets only, broadcasts to other nodes are dropped and counted until it is back");
        }
    }

    /// Connects if need be, then writes this node's heartbeat record (it expires after
    /// three fifths of the down period: two missed beats), and reads the members: those
    /// gone since the last read (or started anew) are told to the listener. A link that
    /// was down and answers again subscribes the node's channels anew.
    async fn heartbeat(&mut self) {
        if self.conn().is_none() {
            match self.connect().await {
                Ok(conn) => *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn),
                Err(e) => {
                    self.first_failure(&e.to_string());
                    return;
                }
            }
        }
        if self.lost.swap(false, Ordering::Relaxed) {
            // The connection dropped (and reconnects by itself): its subscriptions are gone.
            self.down("the connection to Redis dropped");
        }
        let was_up = self.up.load(Ordering::Relaxed);
        self.record.heartbeat_ms = now_ms();
        self.record.versions = self
            .versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let key = format!("{NODE_PREFIX}{}", self.node);
        let record = serde_json::to_string(&self.record).unwrap_or_default();
        let ttl = (self.down_after.as_millis() as u64 * 3 / 5).max(1);
        let id = self.node.to_string();
        let beat = self
            .command(|mut c| async move {
                let _: () = c.pset_ex(key, record, ttl).await?;
                c.sadd::<_, _, ()>(MEMBERS, id).await
            })
            .await;
        if beat.is_none() {
            return;
        }
        if !was_up {
            let wanted: Vec<String> = self.wanted.iter().cloned().collect();
            if !wanted.is_empty()
                && self
                    .command(|mut c| async move { c.subscribe(wanted).await })
                    .await
                    .is_none()
            {
                return;
            }
            self.up.store(true, Ordering::Relaxed);
            if std::mem::replace(&mut self.was_ever_up, true) {
                self.settling_until = Some(tokio::time::Instant::now() + self.down_after);
            }
            tracing::info!(node = %self.node, channels = self.wanted.len(), "cluster: Redis link up");
            if let Some(listener) = self.listener.get() {
                listener.reconnected();
            }
            self.ups.send_modify(|n| *n += 1);
        }
        let Some(members) = self.command(read_members).await else {
            return;
        };
        let mut now: HashMap<String, u64> = members
            .into_iter()
            .filter(|m| *m.id != *self.node)
            .map(|m| (m.id, m.started_ms))
            .collect();
        if self
            .settling_until
            .is_some_and(|t| tokio::time::Instant::now() < t)
        {
            for (id, started) in &self.known {
                now.entry(id.clone()).or_insert(*started);
            }
        }
        for (id, started) in &self.known {
            if now.get(id) != Some(started) {
                tracing::info!(node = %self.node, member = %id, "cluster: member gone");
                if let Some(listener) = self.listener.get() {
                    listener.node_down(id);
                }
            }
        }
        for (id, started) in &now {
            if self.known.get(id) != Some(started)
                && let Some(listener) = self.listener.get()
            {
                listener.node_up(id);
            }
        }
        self.known = now;
    }

    /// A link that never came up says so once.
    fn first_failure(&mut self, why: &str) {
        if !std::mem::replace(&mut self.said_unreachable, true) {
            Stats::bump(&self.stats.cluster_outages);
            tracing::warn!(node = %self.node, error = %why, "cluster: cannot reach Redis; serving local sockets only and trying again at every heartbeat");
        }
    }

    /// A RESP3 connection whose pushes (channel messages, a dropped connection) reach the
    /// listener and the `lost` flag.
    async fn connect(&self) -> redis::RedisResult<ConnectionManager> {
        let listener = self.listener.clone();
        let taps = self.taps.clone();
        let lost = self.lost.clone();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_push_sender(move |push: redis::PushInfo| {
                match push.kind {
                    redis::PushKind::Message => {
                        if let (Some(listener), [channel, data, ..]) =
                            (listener.get(), push.data.as_slice())
                            && let (
                                redis::Value::BulkString(channel),
                                redis::Value::BulkString(data),
                            ) = (channel, data)
                        {
                            let tap = taps
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get(channel)
                                .cloned();
                            match tap {
                                Some(tap) => {
                                    let _ = tap.send(data.clone());
                                }
                                None => listener.message(channel, data),
                            }
                        }
                    }
                    redis::PushKind::Disconnection => lost.store(true, Ordering::Relaxed),
                    _ => {}
                }
                Ok::<(), redis::aio::SendError>(())
            });
        tokio::time::timeout(
            COMMAND_TIMEOUT,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| {
            redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer within 2 s",
            ))
        })?
    }
}
