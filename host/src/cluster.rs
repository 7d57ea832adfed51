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

use std::collections::HashSet;
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
/// the down period.
const NODE_PREFIX: &str = "cinder:node:";
/// How long a command may take before the link counts as down.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Publishes waiting for the worker at most; past it they are dropped and counted, so a
/// stalled Redis cannot grow the node's memory.
const MAX_QUEUED: usize = 65_536;
/// Publishes sent in one pipeline at most.
const BATCH: usize = 512;

/// What receives the messages of the channels the node subscribed to: the channel and
/// the bytes. Called on the connection's task: it must not block.
pub type Handler = Box<dyn Fn(&[u8], &[u8]) + Send + Sync>;

/// One thing asked of Redis, in order.
enum Op {
    Subscribe(String),
    Unsubscribe(String),
    Publish(String, Vec<u8>),
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
}

/// The link to Redis. Cheap to share; every method returns at once.
pub struct Link {
    node: Arc<str>,
    ops: mpsc::UnboundedSender<Op>,
    queued: Arc<AtomicUsize>,
    up: Arc<AtomicBool>,
    handler: Arc<OnceLock<Handler>>,
    conn: Arc<Mutex<Option<ConnectionManager>>>,
    stats: Arc<Stats>,
}

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
    handler: Arc<OnceLock<Handler>>,
    queued: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    /// The channels the node wants, whatever the link's state.
    wanted: HashSet<String>,
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
            handler: Arc::default(),
            conn: Arc::default(),
            stats: stats.clone(),
        });
        let worker = Worker {
            client,
            node,
            record: Member {
                id: link.node.to_string(),
                address,
                started_ms: started,
                heartbeat_ms: started,
            },
            down_after,
            conn: link.conn.clone(),
            up: link.up.clone(),
            lost: Arc::default(),
            handler: link.handler.clone(),
            queued: link.queued.clone(),
            stats,
            wanted: HashSet::new(),
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

    /// Where the messages of subscribed channels go; set once, before any subscribe.
    pub fn on_message(&self, handler: Handler) {
        let _ = self.handler.set(handler);
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
        let Some(mut conn) = conn else {
            return Vec::new();
        };
        let read = async {
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
                    // Its record expired: it is down; the set forgets it.
                    None => {
                        let _: redis::RedisResult<()> = conn.srem(MEMBERS, id).await;
                    }
                }
            }
            members.sort_by(|a, b| a.id.cmp(&b.id));
            redis::RedisResult::Ok(members)
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, read).await {
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

    /// Applies the ops in order; true when the node left.
    async fn apply(&mut self, batch: &mut Vec<Op>) -> bool {
        let mut pipe = redis::pipe();
        let mut publishes = 0;
        let ops = std::mem::take(batch);
        for op in ops {
            match op {
                Op::Publish(channel, data) => {
                    pipe.publish(channel, data).ignore();
                    publishes += 1;
                }
                other => {
                    self.flush(&mut pipe, &mut publishes).await;
                    match other {
                        Op::Subscribe(channel) => {
                            if self.wanted.insert(channel.clone()) {
                                self.command(|mut c| async move { c.subscribe(channel).await })
                                    .await;
                            }
                        }
                        Op::Unsubscribe(channel) => {
                            if self.wanted.remove(&channel) {
                                self.command(|mut c| async move { c.unsubscribe(channel).await })
                                    .await;
                            }
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
                            let _ = done.send(());
                            return true;
                        }
                        Op::Publish(..) => {}
                    }
                }
            }
        }
        self.flush(&mut pipe, &mut publishes).await;
        false
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
        if ok {
            self.stats
                .cluster_published
                .fetch_add(n as u64, Ordering::Relaxed);
        } else {
            self.stats
                .cluster_dropped
                .fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Runs one command on the connection; false (and the link down) when there is none
    /// or it failed.
    async fn command<F, Fut, T>(&mut self, f: F) -> bool
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let Some(conn) = self.conn() else {
            return false;
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, f(conn)).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                self.down(&e.to_string());
                false
            }
            Err(_) => {
                self.down("no answer within 2 s");
                false
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

    /// Connects if need be, then writes this node's heartbeat; a link that was down and
    /// answers again subscribes the node's channels anew.
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
        let key = format!("{NODE_PREFIX}{}", self.node);
        let record = serde_json::to_string(&self.record).unwrap_or_default();
        let ttl = self.down_after.as_millis() as u64;
        let id = self.node.to_string();
        let beat = self
            .command(|mut c| async move {
                let _: () = c.pset_ex(key, record, ttl).await?;
                c.sadd::<_, _, ()>(MEMBERS, id).await
            })
            .await;
        if !beat {
            return;
        }
        if !was_up {
            let wanted: Vec<String> = self.wanted.iter().cloned().collect();
            if !wanted.is_empty()
                && !self
                    .command(|mut c| async move { c.subscribe(wanted).await })
                    .await
            {
                return;
            }
            self.up.store(true, Ordering::Relaxed);
            tracing::info!(node = %self.node, channels = self.wanted.len(), "cluster: Redis link up");
        }
    }

    /// A link that never came up says so once.
    fn first_failure(&mut self, why: &str) {
        if !std::mem::replace(&mut self.said_unreachable, true) {
            Stats::bump(&self.stats.cluster_outages);
            tracing::warn!(node = %self.node, error = %why, "cluster: cannot reach Redis; serving local sockets only and trying again at every heartbeat");
        }
    }

    /// A RESP3 connection whose pushes (channel messages, a dropped connection) reach the
    /// handler and the `lost` flag.
    async fn connect(&self) -> redis::RedisResult<ConnectionManager> {
        let handler = self.handler.clone();
        let lost = self.lost.clone();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_push_sender(move |push: redis::PushInfo| {
                match push.kind {
                    redis::PushKind::Message => {
                        if let (Some(handler), [channel, data, ..]) =
                            (handler.get(), push.data.as_slice())
                            && let (
                                redis::Value::BulkString(channel),
                                redis::Value::BulkString(data),
                            ) = (channel, data)
                        {
                            handler(channel, data);
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
