//! Room leases on a cluster: which node owns each live room of a plugin placed on an owner
//! (`placement = "owner"`), and the snapshots owners keep of their rooms. Knows nothing of
//! rooms or plugins: it holds keys in Redis for names (topics).
//!
//! - `cinder:lease:<topic>` holds `<fence> <node>`, set with `SET PX` by the script that
//!   takes it only when nobody else holds it. The fence comes from `cinder:fence`, one
//!   counter for the cluster, so every taking of a lease gets a number larger than any
//!   before it. The owner renews every lease it holds in one script call every quarter of
//!   the lease time, and deletes it (with the snapshot) when the room ends.
//! - An owner counts its lease as valid for four fifths of the lease time after it *sent*
//!   the renewal that Redis accepted (the key expires a full lease time after Redis got it,
//!   later still), on the monotonic clock, which goes on while a process is stopped. A room
//!   checks before it acts; a lease past its time is renewed (one round trip), and a room
//!   that cannot renew it steps down.
//!   A node stopped past its lease (SIGSTOP, a long pause) therefore finds its lease expired
//!   when it runs again and does not act on the room, whoever took it meanwhile.
//! - `cinder:snap:<topic>` is a hash (`fence`, `seq`, `version`, `state`) written only by
//!   the holder of the lease: the script compares the lease's value, fence included, so a
//!   stale owner's write is refused (fencing), and within one fence an older write never
//!   replaces a newer one. It expires three lease times after its last write or renewal.
//!
//! Scripts are sent by their SHA1 (`EVALSHA`, loaded on first use).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use tokio::sync::Notify;

use crate::cluster::Link;

/// The key prefix of a room's lease.
const LEASE: &str = "cinder:lease:";
/// The key prefix of a room's snapshot.
const SNAPSHOT: &str = "cinder:snap:";
/// The cluster's fencing counter.
const FENCE: &str = "cinder:fence";
/// How long a command may take before it counts as failed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Leases renewed in one script call at most.
const RENEW_BATCH: usize = 256;

/// Takes the lease of a room if nobody else holds it: `{1, fence, version, state}` (the
/// snapshot's fields, nil when there is none) or `{0, holder, fence, ms left}`. The fence is
/// above `ARGV[3]`, the newest the caller heard of, even if Redis lost its counter.
const ACQUIRE: &str = r"
local held = redis.call('GET', KEYS[1])
if held then
  local fence, node = string.match(held, '^(%d+) (.*)$')
  if node ~= ARGV[1] then
    return {0, node, tonumber(fence), redis.call('PTTL', KEYS[1])}
  end
end
local fence = redis.call('INCR', KEYS[3])
if fence <= tonumber(ARGV[3]) then
  fence = tonumber(ARGV[3]) + 1
  redis.call('SET', KEYS[3], fence)
end
redis.call('SET', KEYS[1], fence .. ' ' .. ARGV[1], 'PX', ARGV[2])
local snap = redis.call('HMGET', KEYS[2], 'version', 'state')
return {1, fence, snap[1], snap[2]}
";

/// Renews the leases `KEYS[1..n]` whose values are `ARGV[2..]`, and their snapshots
/// `KEYS[n+1..]`: 1 for each renewed, 0 for each no longer this node's.
const RENEW: &str = r"
local n = #ARGV - 1
local out = {}
for i = 1, n do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    redis.call('PEXPIRE', KEYS[n + i], ARGV[1] * 3)
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
";

/// Deletes a lease if it is still `ARGV[1]`, and its snapshot too unless `ARGV[2]` is 1
/// (a hand-off: the next owner restores it).
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] ~= '1' then
    redis.call('DEL', KEYS[2])
  end
  return 1
end
return 0
";

/// Writes a snapshot if the lease is still `ARGV[1]` (fence `ARGV[2]`), unless one of the
/// same fence and a later `seq` is there: 1 when the snapshot stands, 0 when fenced out.
const SAVE: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local stored = redis.call('HMGET', KEYS[2], 'fence', 'seq')
if stored[1] == ARGV[2] and tonumber(stored[2]) >= tonumber(ARGV[3]) then
  return 1
end
redis.call('HSET', KEYS[2], 'fence', ARGV[2], 'seq', ARGV[3], 'version', ARGV[4], 'state', ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[6] * 3)
return 1
";

/// Milliseconds on the monotonic clock since the first call.
fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// A lease this node holds.
pub struct Lease {
    topic: Arc<str>,
    /// The lease's value in Redis: `<fence> <node>`.
    token: String,
    fence: u64,
    /// Until when (milliseconds of [`now_ms`]) the lease is surely this node's.
    valid_until: AtomicU64,
    lost: AtomicBool,
    lost_notify: Notify,
}

impl Lease {
    /// The fencing number: larger than that of every earlier holder.
    pub fn fence(&self) -> u64 {
        self.fence
    }

    /// Whether the lease is surely still this node's now.
    pub fn valid(&self) -> bool {
        !self.lost.load(Ordering::Relaxed) && now_ms() < self.valid_until.load(Ordering::Relaxed)
    }

    /// Resolves once a renewal found the lease taken by another node.
    pub async fn lost(&self) {
        loop {
            let notified = self.lost_notify.notified();
            if self.lost.load(Ordering::Relaxed) {
                return;
            }
            notified.await;
        }
    }

    fn lose(&self) {
        self.lost.store(true, Ordering::Relaxed);
        self.lost_notify.notify_waiters();
    }

    fn renewed(&self, sent_ms: u64, ttl: Duration) {
        let until = sent_ms + ttl.as_millis() as u64 * 4 / 5;
        self.valid_until.fetch_max(until, Ordering::Relaxed);
    }
}

/// A room's state as its last owner saved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The plugin version that made it.
    pub version: String,
    /// What `snapshot` returned.
    pub state: Vec<u8>,
}

/// What asking for a lease gave.
pub enum Acquired {
    /// This node holds it now, and here is the room's last snapshot, if any.
    Won(Arc<Lease>, Option<Snapshot>),
    /// Node `node` holds it with fence `fence`, for `left` more at most.
    Held {
        /// The holder.
        node: Arc<str>,
        /// Its fence.
        fence: u64,
        /// How long the lease has left.
        left: Duration,
    },
    /// Redis did not answer.
    Unreachable,
}

/// How saving a snapshot went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// It stands.
    Stored,
    /// The lease is no longer this node's: nothing was written.
    Fenced,
    /// Redis did not answer.
    Unreachable,
}

/// This node's leases.
pub struct Leases {
    link: Arc<Link>,
    ttl: Duration,
    held: Mutex<HashMap<Arc<str>, Weak<Lease>>>,
    acquire: redis::Script,
    renew: redis::Script,
    release: redis::Script,
    save: redis::Script,
}

impl Leases {
    /// Leases of `ttl` over `link`, renewed by a task of their own from now on.
    pub fn start(link: Arc<Link>, ttl: Duration) -> Arc<Leases> {
        let leases = Arc::new(Leases {
            link,
            ttl,
            held: Mutex::default(),
            acquire: redis::Script::new(ACQUIRE),
            renew: redis::Script::new(RENEW),
            release: redis::Script::new(RELEASE),
            save: redis::Script::new(SAVE),
        });
        tokio::spawn(keep(Arc::downgrade(&leases)));
        leases
    }

    /// This node's id.
    pub fn node(&self) -> &Arc<str> {
        self.link.node()
    }

    /// How long a lease lasts without renewal.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn conn(&self) -> Option<ConnectionManager> {
        self.link.connection()
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Weak<Lease>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the lease of `topic` if nobody else holds it, with a fence above `heard` (the
    /// newest fence the caller heard of for the topic).
    pub async fn acquire(&self, topic: &Arc<str>, heard: u64) -> Acquired {
        let Some(mut conn) = self.conn() else {
            return Acquired::Unreachable;
        };
        let sent = now_ms();
        let ttl = self.ttl.as_millis() as u64;
        let mut invocation = self.acquire.prepare_invoke();
        invocation
            .key(format!("{LEASE}{topic}"))
            .key(format!("{SNAPSHOT}{topic}"))
            .key(FENCE)
            .arg(&**self.node())
            .arg(ttl)
            .arg(heard);
        let call = invocation.invoke_async::<Vec<redis::Value>>(&mut conn);
        let Ok(Ok(answer)) = tokio::time::timeout(COMMAND_TIMEOUT, call).await else {
            return Acquired::Unreachable;
        };
        let number = |v: Option<&redis::Value>| match v {
            Some(redis::Value::Int(n)) => u64::try_from(*n).ok(),
            _ => None,
        };
        let bytes = |v: Option<&redis::Value>| match v {
            Some(redis::Value::BulkString(b)) => Some(b.clone()),
            _ => None,
        };
        match number(answer.first()) {
            Some(1) => {
                let Some(fence) = number(answer.get(1)) else {
                    return Acquired::Unreachable;
                };
                let snapshot = match (bytes(answer.get(2)), bytes(answer.get(3))) {
                    (Some(version), Some(state)) => Some(Snapshot {
                        version: String::from_utf8_lossy(&version).into_owned(),
                        state,
                    }),
                    _ => None,
                };
                let lease = Arc::new(Lease {
                    topic: topic.clone(),
                    token: format!("{fence} {}", self.node()),
                    fence,
                    valid_until: AtomicU64::new(0),
                    lost: AtomicBool::new(false),
                    lost_notify: Notify::new(),
                });
                lease.renewed(sent, self.ttl);
                self.held().insert(topic.clone(), Arc::downgrade(&lease));
                Acquired::Won(lease, snapshot)
            }
            Some(0) => {
                let node = bytes(answer.get(1)).unwrap_or_default();
                Acquired::Held {
                    node: String::from_utf8_lossy(&node).into(),
                    fence: number(answer.get(2)).unwrap_or(0),
                    left: Duration::from_millis(number(answer.get(3)).unwrap_or(0)),
                }
            }
            _ => Acquired::Unreachable,
        }
    }

    /// Renews `lease` now: true when it is still this node's (and valid again).
    pub async fn renew(&self, lease: &Lease) -> bool {
        match self.renew_batch(&[lease]).await {
            Some(renewed) => renewed.first() == Some(&true),
            None => false,
        }
    }

    /// Renews a batch of leases in one script call: whether each is still this node's;
    /// `None` when Redis did not answer. Leases taken by another node are marked lost.
    async fn renew_batch(&self, leases: &[&Lease]) -> Option<Vec<bool>> {
        let mut conn = self.conn()?;
        let sent = now_ms();
        let mut call = self.renew.prepare_invoke();
        for lease in leases {
            call.key(format!("{LEASE}{}", lease.topic));
        }
        for lease in leases {
            call.key(format!("{SNAPSHOT}{}", lease.topic));
        }
        call.arg(self.ttl.as_millis() as u64);
        for lease in leases {
            call.arg(&lease.token);
        }
        let answer =
            tokio::time::timeout(COMMAND_TIMEOUT, call.invoke_async::<Vec<i64>>(&mut conn))
                .await
                .ok()?
                .ok()?;
        let renewed: Vec<bool> = answer.iter().map(|n| *n == 1).collect();
        for (lease, renewed) in leases.iter().zip(&renewed) {
            if *renewed {
                lease.renewed(sent, self.ttl);
            } else {
                lease.lose();
            }
        }
        Some(renewed)
    }

    /// Gives `lease` up (the room ended here): its key and the room's snapshot are deleted
    /// if it is still this node's. Returns at once.
    pub fn release(self: &Arc<Self>, lease: &Arc<Lease>) {
        let (leases, lease) = (self.clone(), lease.clone());
        tokio::spawn(async move { leases.give_up(&lease, false).await });
    }

    /// Lets `lease` go without ending the room (this node cannot serve it now): its key is
    /// deleted if it is still this node's, the room's snapshot stays for the next owner.
    /// Returns at once.
    pub fn let_go(self: &Arc<Self>, lease: &Arc<Lease>) {
        let (leases, lease) = (self.clone(), lease.clone());
        tokio::spawn(async move { leases.give_up(&lease, true).await });
    }

    /// Hands `lease` over (this node stops): its key is deleted if it is still this node's,
    /// the room's snapshot stays for the next owner. Resolves once Redis answered.
    pub async fn hand_off(&self, lease: &Lease) {
        self.give_up(lease, true).await;
    }

    async fn give_up(&self, lease: &Lease, keep_snapshot: bool) {
        {
            let mut held = self.held();
            if held
                .get(&lease.topic)
                .is_some_and(|h| std::ptr::eq(h.as_ptr(), lease))
            {
                held.remove(&lease.topic);
            }
        }
        lease.lose();
        let Some(mut conn) = self.conn() else {
            return;
        };
        let mut invocation = self.release.prepare_invoke();
        invocation
            .key(format!("{LEASE}{}", lease.topic))
            .key(format!("{SNAPSHOT}{}", lease.topic))
            .arg(&lease.token)
            .arg(u8::from(keep_snapshot));
        let call = invocation.invoke_async::<i64>(&mut conn);
        let _ = tokio::time::timeout(COMMAND_TIMEOUT, call).await;
    }

    /// Saves the room's state under `lease`: `seq` orders the saves of one holder.
    pub async fn save(&self, lease: &Lease, seq: u64, version: &str, state: &[u8]) -> Saved {
        let Some(mut conn) = self.conn() else {
            return Saved::Unreachable;
        };
        let mut invocation = self.save.prepare_invoke();
        invocation
            .key(format!("{LEASE}{}", lease.topic))
            .key(format!("{SNAPSHOT}{}", lease.topic))
            .arg(&lease.token)
            .arg(lease.fence)
            .arg(seq)
            .arg(version)
            .arg(state)
            .arg(self.ttl.as_millis() as u64);
        let call = invocation.invoke_async::<i64>(&mut conn);
        match tokio::time::timeout(COMMAND_TIMEOUT, call).await {
            Ok(Ok(1)) => Saved::Stored,
            Ok(Ok(_)) => {
                lease.lose();
                Saved::Fenced
            }
            _ => Saved::Unreachable,
        }
    }
}

/// Renews every lease the node holds each quarter of the lease time, until the leases are
/// dropped.
async fn keep(leases: Weak<Leases>) {
    let every = match leases.upgrade() {
        Some(leases) => leases.ttl / 4,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(leases) = leases.upgrade() else {
            return;
        };
        let live: Vec<Arc<Lease>> = {
            let mut held = leases.held();
            held.retain(|_, lease| lease.strong_count() > 0);
            held.values().filter_map(Weak::upgrade).collect()
        };
        for batch in live.chunks(RENEW_BATCH) {
            let batch: Vec<&Lease> = batch.iter().map(|l| &**l).collect();
            if leases.renew_batch(&batch).await.is_none() {
                break;
            }
        }
        let mut held = leases.held();
        held.retain(|_, lease| {
            lease
                .upgrade()
                .is_some_and(|l| !l.lost.load(Ordering::Relaxed))
        });
    }
}
