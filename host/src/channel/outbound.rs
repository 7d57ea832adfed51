//! A socket's outbound queue: everything the server writes to one socket (replies, pushes,
//! broadcasts, channel closes) in the order it was made, bounded in bytes so a client that
//! does not read is cut off instead of growing server memory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

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
            Outbound::Broadcast(b) => broadcast_cost(b),
            Outbound::Close { .. } | Outbound::ChannelDown { .. } | Outbound::Disconnect => {
                ITEM_OVERHEAD
            }
        }
    }
}

/// Approximate bytes an item holds beside its payload.
const ITEM_OVERHEAD: usize = 64;

fn broadcast_cost(b: &Broadcast) -> usize {
    ITEM_OVERHEAD + b.payload.len()
}

/// An item as the queue holds it: 16 bytes, so a fan-out that queues a hundred broadcasts
/// at each of 10,000 sockets touches 16 MB rather than the 112 MB of whole `Outbound`s
/// (page faults and cache misses were a fifth of the server's time in `cinder-bench
/// fanout`). Broadcasts, the bulk of any backlog, stay a shared pointer; the rest is boxed.
enum Queued {
    Broadcast(Arc<Broadcast>),
    Other(Box<Outbound>),
}

impl From<Outbound> for Queued {
    fn from(item: Outbound) -> Self {
        match item {
            Outbound::Broadcast(b) => Queued::Broadcast(b),
            other => Queued::Other(Box::new(other)),
        }
    }
}

impl From<Queued> for Outbound {
    fn from(item: Queued) -> Self {
        match item {
            Queued::Broadcast(b) => Outbound::Broadcast(b),
            Queued::Other(other) => *other,
        }
    }
}

impl Queued {
    fn cost(&self) -> usize {
        match self {
            Queued::Broadcast(b) => broadcast_cost(b),
            Queued::Other(other) => other.cost(),
        }
    }
}

/// Slots an emptied queue keeps for the next burst (1 KiB); a larger buffer, left by a
/// burst, is given back.
const KEEP_SLOTS: usize = 64;

/// The queue itself. A plain `VecDeque` behind a lock: an idle socket's queue allocates
/// nothing until its first item (a channel would keep a block of slots per socket).
struct QueueState {
    items: Mutex<Items>,
    limit: usize,
    overflow: Notify,
    ready: Notify,
}

#[derive(Default)]
struct Items {
    queue: VecDeque<Queued>,
    bytes: usize,
    /// The receiver is gone: drop what is sent.
    closed: bool,
    /// The backlog went over the limit: the socket is being cut off, drop what is sent.
    overflowed: bool,
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

/// Receiving side of a socket's outbound queue.
pub struct OutboundRx {
    state: Arc<QueueState>,
}

/// A queue for one socket holding at most `limit_bytes`.
pub fn outbound_queue(limit_bytes: usize) -> (OutboundTx, OutboundRx) {
    let state = Arc::new(QueueState {
        items: Mutex::default(),
        limit: limit_bytes,
        overflow: Notify::new(),
        ready: Notify::new(),
    });
    (
        OutboundTx {
            state: state.clone(),
        },
        OutboundRx { state },
    )
}

impl OutboundTx {
    /// Enqueues without waiting. Past the byte limit the queue is marked overflowed (the
    /// socket task then disconnects the slow client) and the item is dropped. An item
    /// reaching an empty queue is always taken.
    pub fn send(&self, item: Outbound) {
        let item = Queued::from(item);
        let cost = item.cost();
        {
            let mut items = self.state.items();
            if items.closed || items.overflowed {
                return;
            }
            // The limit bounds the backlog: one item larger than it (a big presence_state)
            // is still delivered to a client that has read everything else.
            if items.bytes > 0 && items.bytes + cost > self.state.limit {
                items.overflowed = true;
                drop(items);
                self.state.overflow.notify_one();
                return;
            }
            items.bytes += cost;
            items.queue.push_back(item);
            if items.queue.len() > 1 {
                // The receiver has not yet seen the queue empty since it was woken for the
                // first item: it takes this one without another wake-up.
                return;
            }
        }
        self.state.ready.notify_one();
    }
}

impl OutboundRx {
    /// The next item, waiting for one.
    pub async fn recv(&mut self) -> Outbound {
        loop {
            if let Some(item) = self.try_recv() {
                return item;
            }
            // A send between the check and here leaves a permit: no wake-up is lost.
            self.state.ready.notified().await;
        }
    }

    /// The next item if one is ready.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        let mut items = self.state.items();
        let item = items.queue.pop_front()?;
        items.bytes -= item.cost();
        if items.queue.is_empty() && items.queue.capacity() > KEEP_SLOTS {
            // Give the memory of a large burst back.
            items.queue = VecDeque::new();
        }
        Some(item.into())
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
    /// Resolves once the queue went over its limit.
    pub async fn wait(&self) {
        loop {
            let notified = self.0.overflow.notified();
            if self.0.items().overflowed {
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

    #[tokio::test]
    async fn items_come_out_in_order_and_a_backlog_past_the_limit_overflows() {
        let (tx, mut rx) = outbound_queue(1000);
        tx.send(push(10));
        tx.send(push(20));
        assert!(matches!(rx.recv().await, Outbound::Push { payload, .. } if payload.len() == 10));
        assert!(
            matches!(rx.try_recv(), Some(Outbound::Push { payload, .. }) if payload.len() == 20)
        );
        assert!(rx.try_recv().is_none());
        // Alone, an item larger than the limit is taken; behind a backlog it overflows.
        tx.send(push(5000));
        tx.send(push(10));
        tokio::time::timeout(std::time::Duration::from_secs(1), rx.overflow().wait())
            .await
            .expect("overflowed");
        assert!(rx.try_recv().is_some());
        assert!(
            rx.try_recv().is_none(),
            "nothing is queued after an overflow"
        );
    }

    #[test]
    fn a_queued_item_is_two_words() {
        assert_eq!(std::mem::size_of::<Queued>(), 16);
    }

    #[tokio::test]
    async fn sends_after_the_receiver_is_gone_are_dropped() {
        let (tx, rx) = outbound_queue(1000);
        drop(rx);
        tx.send(push(10));
        assert!(tx.state.items().queue.is_empty());
    }
}
