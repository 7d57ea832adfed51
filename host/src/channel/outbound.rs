//! A socket's outbound queue: everything the server writes to one socket (replies, pushes,
//! broadcasts, channel closes) in the order it was made, bounded in bytes so a client that
//! does not read is cut off instead of growing server memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::{Notify, mpsc};

use super::MemberId;
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
