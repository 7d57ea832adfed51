//! A socket's outbound queue: what the server writes to one socket besides its rooms'
//! fastlane broadcasts (replies, pushes, channel closes), in the order it was made, bounded
//! in bytes so a client that does not read is cut off instead of growing server memory.
//! Also the sequence that orders these items against the rooms' feeds, and the rule that
//! says when a socket is too slow ([`Slowness`]), shared with the feeds.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::MemberId;
use crate::config::Limits;
use crate::protocol::{Payload, Status};
use crate::pubsub::Broadcast;

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
    /// The socket closed a channel itself (leave, duplicate join): `phx_close`.
    Close {
        /// Topic.
        topic: Arc<str>,
        /// Join reference of the channel.
        join_ref: Option<String>,
    },
    /// A `disconnect` broadcast on the socket's id: close the socket.
    Disconnect,
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
        match self {
            Outbound::Reply { payload, .. } | Outbound::Push { payload, .. } => {
                ITEM_OVERHEAD + payload.len()
            }
            Outbound::Close { .. } | Outbound::ChannelDown { .. } | Outbound::Disconnect => {
                ITEM_OVERHEAD
            }
        }
    }
}

/// Approximate bytes an item holds beside its payload.
const ITEM_OVERHEAD: usize = 64;

/// Bytes a broadcast counts for, in a queue or behind in a feed.
pub(super) fn broadcast_cost(b: &Broadcast) -> usize {
    ITEM_OVERHEAD + b.payload.len()
}

/// When a socket is too slow: more than `soft` bytes behind for longer than `grace` (a
/// backlog that stays, not a burst the reader drains), or more than `hard` bytes behind
/// at any moment (what bounds the memory a backlog holds). Phoenix never cuts a socket;
/// Centrifugo cuts at a queue cap; judging over time cuts only sockets that do not read.
#[derive(Debug, Clone, Copy)]
pub struct Slowness {
    /// Bytes behind that start the grace period (`outbound_queue_bytes`).
    pub soft: usize,
    /// Bytes behind that cut at once (`outbound_queue_max_bytes`).
    pub hard: usize,
    /// How long a socket may stay over `soft` (`slow_client_grace_ms`).
    pub grace: Duration,
}

impl Slowness {
    /// The rule the limits set.
    pub fn from_limits(limits: &Limits) -> Self {
        Slowness {
            soft: limits.outbound_queue_bytes,
            hard: limits
                .outbound_queue_max_bytes
                .max(limits.outbound_queue_bytes),
            grace: Duration::from_millis(limits.slow_client_grace_ms),
        }
    }

    /// Whether a socket `behind` bytes behind is too slow now, given since when it was
    /// over `soft` (`over_since`, milliseconds of [`now_ms`]; 0 when it was not), which it
    /// updates.
    pub(super) fn too_slow(&self, behind: usize, over_since: &AtomicU64) -> bool {
        if behind > self.hard {
            return true;
        }
        if behind <= self.soft {
            over_since.store(0, Ordering::Relaxed);
            return false;
        }
        let now = now_ms();
        match over_since.load(Ordering::Relaxed) {
            0 => {
                over_since.store(now, Ordering::Relaxed);
                false
            }
            since => now.saturating_sub(since) >= self.grace.as_millis() as u64,
        }
    }
}

/// Milliseconds since the first call, from 1 (0 means "never" to [`Slowness::too_slow`]).
pub(super) fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// The node-wide order of everything written to sockets: each queued item and each feed
/// entry takes the next number when it is added, under its queue's or feed's lock.
static SEQ: AtomicU64 = AtomicU64::new(1);

/// The next number of the node-wide order. Acquire-release, so whatever was added before
/// an item took its number is visible to whoever sees an item with a higher number (the
/// socket's merge relies on it).
pub(super) fn next_seq() -> u64 {
    SEQ.fetch_add(1, Ordering::AcqRel)
}

/// An item as the queue holds it: 16 bytes (a backlog of small slots), with its place in
/// the node-wide order.
struct Queued {
    seq: u64,
    item: Box<Outbound>,
}

/// Slots an emptied queue keeps for the next burst (1 KiB); a larger buffer, left by a
/// burst, is given back.
const KEEP_SLOTS: usize = 64;

/// The queue itself. A plain `VecDeque` behind a lock: an idle socket's queue allocates
/// nothing until its first item (a channel would keep a block of slots per socket).
struct QueueState {
    items: Mutex<Items>,
    /// Items in `items.queue`, readable without the lock.
    len: AtomicUsize,
    slowness: Slowness,
    /// Since when the backlog is over `slowness.soft` (0: it is not).
    over_since: AtomicU64,
    overflow: Notify,
    /// The backlog went over the limit: the socket is being cut off, drop what is sent.
    overflowed: AtomicBool,
    ready: Notify,
}

#[derive(Default)]
struct Items {
    queue: VecDeque<Queued>,
    bytes: usize,
    /// The receiver is gone: drop what is sent.
    closed: bool,
}

impl QueueState {
    fn items(&self) -> MutexGuard<'_, Items> {
        // Held for a push or a pop, never across an await.
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sending side of a socket's outbound queue, bounded in bytes. Cheap to clone.
#[derive(Clone)]
pub struct OutboundTx {
    state: Arc<QueueState>,
}

/// Receiving side of a socket's outbound queue. It takes the whole queue at once (one lock
/// per burst) and hands the items out from there. What it has taken no longer counts
/// toward the limit, and it takes again only once that is written: a socket holds at most
/// twice the hard limit.
pub struct OutboundRx {
    state: Arc<QueueState>,
    taken: VecDeque<Queued>,
}

/// A queue for one socket, cut off when `slowness` says its backlog shows it too slow.
pub fn outbound_queue(slowness: Slowness) -> (OutboundTx, OutboundRx) {
    let state = Arc::new(QueueState {
        items: Mutex::default(),
        len: AtomicUsize::new(0),
        slowness,
        over_since: AtomicU64::new(0),
        overflow: Notify::new(),
        overflowed: AtomicBool::new(false),
        ready: Notify::new(),
    });
    (
        OutboundTx {
            state: state.clone(),
        },
        OutboundRx {
            state,
            taken: VecDeque::new(),
        },
    )
}

impl OutboundTx {
    /// Enqueues without waiting. When the backlog shows the client too slow (see
    /// [`Slowness`]) the queue is marked overflowed (the socket task then disconnects it)
    /// and the item is dropped. An item reaching an empty queue is always taken.
    pub fn send(&self, item: Outbound) {
        let cost = item.cost();
        let item = Box::new(item);
        {
            let mut items = self.state.items();
            if items.closed || self.state.overflowed.load(Ordering::Relaxed) {
                return;
            }
            // The limits bound the backlog: one item larger than them (a big
            // presence_state) is still delivered to a client that has read everything else.
            if items.bytes > 0
                && self
                    .state
                    .slowness
                    .too_slow(items.bytes + cost, &self.state.over_since)
            {
                drop(items);
                self.cut_off();
                return;
            }
            items.bytes += cost;
            items.queue.push_back(Queued {
                seq: next_seq(),
                item,
            });
            self.state.len.store(items.queue.len(), Ordering::Release);
            if items.queue.len() > 1 {
                // The receiver has not yet taken the queue since it was woken for the
                // first item: it takes this one without another wake-up.
                return;
            }
        }
        self.wake();
    }

    /// Wakes the socket task (a feed it reads has something new).
    pub(super) fn wake(&self) {
        self.state.ready.notify_one();
    }

    /// Cuts the socket off as too slow (it fell too far behind in a feed).
    pub(super) fn cut_off(&self) {
        self.state.overflowed.store(true, Ordering::Release);
        self.state.overflow.notify_one();
    }
}

impl OutboundRx {
    /// The sequence number of the next item, if one is ready.
    pub fn peek(&mut self) -> Option<u64> {
        if self.taken.is_empty() && self.state.len.load(Ordering::Acquire) > 0 {
            let mut items = self.state.items();
            std::mem::swap(&mut items.queue, &mut self.taken);
            items.bytes = 0;
            self.state.len.store(0, Ordering::Release);
        }
        self.taken.front().map(|q| q.seq)
    }

    /// The next item, if one is ready.
    pub fn pop(&mut self) -> Option<Outbound> {
        self.peek()?;
        let item = self.taken.pop_front()?;
        if self.taken.is_empty() && self.taken.capacity() > KEEP_SLOTS {
            // Give the memory of a large burst back.
            self.taken = VecDeque::new();
        }
        Some(*item.item)
    }

    /// Waits until something was queued or a feed of this socket was appended to since
    /// the last wake-up (a wake-up before this call is not lost).
    pub async fn ready(&self) {
        self.state.ready.notified().await;
    }

    /// A handle that resolves once the queue went over its limit.
    pub fn overflow(&self) -> Overflow {
        Overflow(self.state.clone())
    }
}

impl Drop for OutboundRx {
    fn drop(&mut self) {
        let mut items = self.state.items();
        items.closed = true;
        items.queue.clear();
    }
}

/// Watches a queue for overflow.
pub struct Overflow(Arc<QueueState>);

impl Overflow {
    /// Whether the queue went over its limit.
    pub fn happened(&self) -> bool {
        self.0.overflowed.load(Ordering::Acquire)
    }

    /// Resolves once the queue went over its limit.
    pub async fn wait(&self) {
        loop {
            let notified = self.0.overflow.notified();
            if self.0.overflowed.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(n: usize) -> Outbound {
        Outbound::Push {
            join_ref: None,
            topic: "t".into(),
            event: "e".into(),
            payload: Payload::Binary(vec![0; n].into()),
        }
    }

    fn strict(limit: usize) -> Slowness {
        Slowness {
            soft: limit,
            hard: limit,
            grace: Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn items_come_out_in_order_and_a_backlog_past_the_limit_overflows() {
        let (tx, mut rx) = outbound_queue(strict(1000));
        tx.send(push(10));
        tx.send(push(20));
        tokio::time::timeout(std::time::Duration::from_secs(1), rx.ready())
            .await
            .expect("woken");
        let first = rx.peek().expect("ready");
        assert!(matches!(rx.pop(), Some(Outbound::Push { payload, .. }) if payload.len() == 10));
        assert!(rx.peek().expect("ready") > first);
        assert!(matches!(rx.pop(), Some(Outbound::Push { payload, .. }) if payload.len() == 20));
        assert!(rx.pop().is_none());
        // Alone, an item larger than the limit is taken; behind a backlog it overflows.
        tx.send(push(5000));
        tx.send(push(10));
        tokio::time::timeout(std::time::Duration::from_secs(1), rx.overflow().wait())
            .await
            .expect("overflowed");
        assert!(rx.pop().is_some());
        assert!(rx.pop().is_none(), "nothing is queued after an overflow");
    }

    #[test]
    fn a_queued_item_is_two_words() {
        assert_eq!(std::mem::size_of::<Queued>(), 16);
    }

    #[tokio::test]
    async fn a_backlog_over_the_soft_limit_is_cut_only_after_the_grace() {
        let slowness = Slowness {
            soft: 1000,
            hard: 10_000,
            grace: Duration::from_millis(100),
        };
        let (tx, mut rx) = outbound_queue(slowness);
        for _ in 0..20 {
            tx.send(push(100));
        }
        assert!(
            !rx.overflow().happened(),
            "over the soft limit, within the grace"
        );
        // The reader drains: the grace starts over.
        while rx.pop().is_some() {}
        tx.send(push(100));
        std::thread::sleep(Duration::from_millis(150));
        tx.send(push(100));
        assert!(
            !rx.overflow().happened(),
            "under the soft limit, no grace runs"
        );
        for _ in 0..20 {
            tx.send(push(100));
        }
        std::thread::sleep(Duration::from_millis(150));
        tx.send(push(100));
        assert!(
            rx.overflow().happened(),
            "over the soft limit past the grace"
        );
        // Past the hard limit, at once.
        let (tx, rx) = outbound_queue(slowness);
        for _ in 0..200 {
            tx.send(push(100));
        }
        assert!(rx.overflow().happened());
    }

    #[tokio::test]
    async fn sends_after_the_receiver_is_gone_are_dropped() {
        let (tx, rx) = outbound_queue(strict(1000));
        drop(rx);
        tx.send(push(10));
        assert!(tx.state.items().queue.is_empty());
        assert_eq!(tx.state.len.load(Ordering::Relaxed), 0);
    }
}
