//! A room's feed: the topic's fastlane broadcasts, appended once for all members, which
//! each member's socket reads at its own cursor. A broadcast to 10,000 members is one
//! append and a wake-up for the sockets that were idle, not 10,000 queue pushes.
//!
//! Feed entries and a socket's own queue items carry numbers from one sequence
//! ([`super::outbound::next_seq`]); the socket writes whatever is lowest first, so
//! broadcasts, replies and pushes leave in the order they were made. A member that falls
//! too far behind for too long is cut off, by the same rule as its queue
//! ([`super::outbound::Slowness`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use super::MemberId;
use super::outbound::{OutboundTx, Slowness, broadcast_cost, next_seq};
use crate::protocol::{Frame, Vsn};
use crate::pubsub::Broadcast;

/// Entries per segment. A cursor touches a segment's reference count once per segment,
/// not once per entry (per entry, the count's cache line bounced between the cores
/// reading the feed: an eighth of the server's time in a fan-out). A segment holds its
/// entries until every cursor has left it, so an idle feed keeps its last few broadcasts.
const SEGMENT: usize = 16;

/// One broadcast in the feed.
struct Entry {
    seq: u64,
    /// Bytes appended up to and including this entry, for the lag limit.
    bytes: u64,
    broadcast: Arc<Broadcast>,
}

/// A run of entries, linked to the next run. Aligned to a cache line, so its reference
/// count does not share a line with the entries every cursor reads.
#[repr(align(64))]
struct Segment {
    entries: [OnceLock<Entry>; SEGMENT],
    next: OnceLock<Arc<Segment>>,
}

impl Segment {
    fn new() -> Arc<Self> {
        Arc::new(Segment {
            entries: std::array::from_fn(|_| OnceLock::new()),
            next: OnceLock::new(),
        })
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // Unlinks iteratively: dropping a long chain recursively would overflow the stack.
        let mut next = self.next.take();
        while let Some(segment) = next {
            next = Arc::into_inner(segment).and_then(|mut segment| segment.next.take());
        }
    }
}

/// What the feed knows of one member's cursor.
struct Reader {
    /// `bytes` of the last entry the cursor read.
    read: AtomicU64,
    /// Since when it is over the soft limit behind (0: it is not).
    over_since: AtomicU64,
    /// Registered in the feed's waiters (its socket task is idle).
    waiting: AtomicBool,
    out: OutboundTx,
}

struct State {
    tail: Arc<Segment>,
    /// Entries filled in `tail`.
    filled: usize,
    /// `bytes` of the last entry.
    bytes: u64,
    /// Readers to wake on the next append.
    waiters: Vec<Arc<Reader>>,
    readers: Vec<Weak<Reader>>,
    /// Cursors dropped since `readers` and `waiters` were last pruned.
    departed: usize,
    /// The tail's `bytes` at which readers are next checked for lag.
    next_check: u64,
}

/// The fastlane broadcasts of one room.
pub struct Feed {
    state: Mutex<State>,
    /// When a reader is too far behind.
    slowness: Slowness,
}

impl Feed {
    /// An empty feed whose readers are cut off when `slowness` says so.
    pub fn new(slowness: Slowness) -> Arc<Self> {
        Arc::new(Feed {
            state: Mutex::new(State {
                tail: Segment::new(),
                filled: 0,
                bytes: 0,
                waiters: Vec::new(),
                readers: Vec::new(),
                departed: 0,
                next_check: slowness.soft as u64 / 4,
            }),
            slowness,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Held for an append or a registration, never across an await.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a broadcast and wakes the readers that were idle.
    pub fn append(&self, broadcast: &Arc<Broadcast>) {
        let waiters = {
            let mut state = self.state();
            if state.filled == SEGMENT {
                let segment = Segment::new();
                // Only this lock's holder links and fills: the slots are always empty here.
                let _ = state.tail.next.set(segment.clone());
                state.tail = segment;
                state.filled = 0;
            }
            let bytes = state.bytes + broadcast_cost(broadcast) as u64;
            let entry = Entry {
                seq: next_seq(),
                bytes,
                broadcast: broadcast.clone(),
            };
            let _ = state.tail.entries[state.filled].set(entry);
            state.filled += 1;
            state.bytes = bytes;
            if bytes >= state.next_check {
                state.next_check = bytes + self.slowness.soft as u64 / 4;
                self.cut_off_laggards(&mut state);
            }
            std::mem::take(&mut state.waiters)
        };
        for reader in waiters {
            reader.waiting.store(false, Ordering::Relaxed);
            reader.out.wake();
        }
    }

    /// Cuts off readers too slow to follow (their sockets stopped reading), and forgets
    /// readers that are gone. Runs every quarter of the soft limit appended.
    fn cut_off_laggards(&self, state: &mut State) {
        let tail = state.bytes;
        state.readers.retain(|reader| match reader.upgrade() {
            Some(reader) => {
                let behind = tail.saturating_sub(reader.read.load(Ordering::Relaxed));
                let behind = usize::try_from(behind).unwrap_or(usize::MAX);
                if self.slowness.too_slow(behind, &reader.over_since) {
                    reader.out.cut_off();
                }
                true
            }
            None => false,
        });
    }

    /// A cursor for `member` at the end of the feed: it reads what is appended from now
    /// on. `out` is the member's socket queue, woken when there is something to read.
    pub fn cursor(self: &Arc<Self>, member: MemberId, out: OutboundTx) -> Cursor {
        let mut state = self.state();
        let reader = Arc::new(Reader {
            read: AtomicU64::new(state.bytes),
            over_since: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
            out,
        });
        state.readers.push(Arc::downgrade(&reader));
        Cursor {
            feed: self.clone(),
            segment: state.tail.clone(),
            index: state.filled,
            reader,
            member,
        }
    }
}

/// One member's position in a room's feed.
pub struct Cursor {
    feed: Arc<Feed>,
    segment: Arc<Segment>,
    /// The next entry to read in `segment` (`SEGMENT`: the next segment's first).
    index: usize,
    reader: Arc<Reader>,
    member: MemberId,
}

impl Cursor {
    /// The next entry, if one is there, without taking it.
    fn next(&mut self) -> Option<&Entry> {
        if self.index == SEGMENT {
            let next = self.segment.next.get()?.clone();
            self.segment = next;
            self.index = 0;
        }
        self.segment.entries[self.index].get()
    }

    /// The sequence number of the next broadcast for this member, if one is there.
    /// Broadcasts that exclude this member, or that `vsn` cannot carry, are passed over.
    pub fn peek(&mut self, vsn: Vsn) -> Option<u64> {
        loop {
            let member = self.member;
            let entry = self.next()?;
            if entry.broadcast.except != Some(member) && entry.broadcast.frame(vsn).is_some() {
                return Some(entry.seq);
            }
            let bytes = entry.bytes;
            self.passed(bytes);
        }
    }

    fn passed(&mut self, bytes: u64) {
        self.reader.read.store(bytes, Ordering::Relaxed);
        self.index += 1;
    }

    /// Takes the next broadcast, encoded for `vsn`. The frame is lent, not cloned: the
    /// socket copies it into its write buffer, and nothing shared by the members is
    /// counted once per member (per member, a reference count's cache line bounced
    /// between the cores: a seventh of the server's time in a fan-out).
    pub fn take(&mut self, vsn: Vsn) -> Option<&Frame> {
        self.peek(vsn)?;
        let bytes = self.next()?.bytes;
        self.passed(bytes);
        self.segment.entries[self.index - 1]
            .get()?
            .broadcast
            .frame(vsn)
    }

    /// Asks the feed to wake this member's socket on the next append. False when there is
    /// something to read already (no need to wait).
    pub fn park(&mut self, vsn: Vsn) -> bool {
        if self.peek(vsn).is_some() {
            return false;
        }
        let mut state = self.feed.state();
        // Under the lock, nothing is being appended: empty now means empty until woken.
        let appended = match self.segment.entries.get(self.index) {
            Some(slot) => slot.get().is_some(),
            None => self.segment.next.get().is_some(),
        };
        if appended {
            return false;
        }
        if !self.reader.waiting.swap(true, Ordering::Relaxed) {
            state.waiters.push(self.reader.clone());
        }
        true
    }
}

impl Drop for Cursor {
    fn drop(&mut self) {
        // A quiet room whose members come and go would otherwise keep every departed
        // reader until its next append: pruned once as many have left as remain listed.
        let mut state = self.feed.state();
        state.departed += 1;
        if state.departed * 2 > state.readers.len() {
            // Gone: readers whose cursor was dropped, and this one's (still held here).
            let own = Arc::as_ptr(&self.reader);
            state
                .readers
                .retain(|reader| reader.strong_count() > 0 && reader.as_ptr() != own);
            state
                .waiters
                .retain(|reader| Arc::strong_count(reader) > 1 && Arc::as_ptr(reader) != own);
            state.departed = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::outbound_queue;
    use crate::protocol::Payload;
    use std::time::Duration;

    fn strict(limit: usize) -> Slowness {
        Slowness {
            soft: limit,
            hard: limit,
            grace: Duration::ZERO,
        }
    }

    fn broadcast(event: &str, except: Option<MemberId>) -> Arc<Broadcast> {
        Arc::new(Broadcast::new(
            "t".into(),
            event.into(),
            Payload::empty(),
            except,
        ))
    }

    fn read_all(cursor: &mut Cursor) -> Vec<String> {
        std::iter::from_fn(|| cursor.take(Vsn::V2).cloned())
            .map(|frame| {
                let Frame::Text(text) = frame else {
                    panic!("a text frame")
                };
                crate::protocol::decode_text(Vsn::V2, text.as_str())
                    .expect("a message")
                    .event
            })
            .collect()
    }

    #[tokio::test]
    async fn each_cursor_reads_from_its_join_on_in_order_without_its_own_exclusions() {
        let feed = Feed::new(strict(1 << 20));
        let (out, _rx) = outbound_queue(strict(1 << 20));
        feed.append(&broadcast("before", None));
        let mut a = feed.cursor(1, out.clone());
        feed.append(&broadcast("one", None));
        let mut b = feed.cursor(2, out);
        feed.append(&broadcast("two", Some(1)));
        feed.append(&broadcast("three", Some(2)));
        assert_eq!(read_all(&mut a), ["one", "three"]);
        assert_eq!(read_all(&mut b), ["two"]);
        assert!(a.peek(Vsn::V2).is_none());
    }

    #[tokio::test]
    async fn a_cursor_reads_across_segments_in_order() {
        let feed = Feed::new(strict(1 << 20));
        let (out, _rx) = outbound_queue(strict(1 << 20));
        let mut cursor = feed.cursor(1, out);
        let events: Vec<String> = (0..SEGMENT * 3 + 5).map(|i| i.to_string()).collect();
        let mut read = Vec::new();
        for (i, event) in events.iter().enumerate() {
            feed.append(&broadcast(event, None));
            // Half read as they come, half in a run.
            if i % 2 == 0 {
                read.extend(read_all(&mut cursor));
            }
        }
        read.extend(read_all(&mut cursor));
        assert_eq!(read, events);
    }

    #[tokio::test]
    async fn a_parked_cursor_is_woken_by_the_next_append() {
        let feed = Feed::new(strict(1 << 20));
        let (out, rx) = outbound_queue(strict(1 << 20));
        let mut cursor = feed.cursor(1, out);
        assert!(cursor.park(Vsn::V2));
        assert!(cursor.park(Vsn::V2), "parking twice registers once");
        assert_eq!(feed.state().waiters.len(), 1);
        feed.append(&broadcast("e", None));
        tokio::time::timeout(std::time::Duration::from_secs(1), rx.ready())
            .await
            .expect("woken");
        assert!(!cursor.park(Vsn::V2), "something to read");
    }

    #[tokio::test]
    async fn members_that_leave_a_quiet_feed_are_forgotten() {
        let feed = Feed::new(strict(1 << 20));
        let (out, _rx) = outbound_queue(strict(1 << 20));
        for member in 0..1000 {
            let mut cursor = feed.cursor(member, out.clone());
            assert!(cursor.park(Vsn::V2));
        }
        let state = feed.state();
        assert!(state.readers.len() <= 2, "{} readers", state.readers.len());
        assert!(state.waiters.len() <= 2, "{} waiters", state.waiters.len());
    }

    #[tokio::test]
    async fn a_reader_that_falls_past_the_limit_is_cut_off_and_a_long_chain_frees() {
        let feed = Feed::new(strict(10_000));
        let (out, rx) = outbound_queue(strict(10_000));
        let cursor = feed.cursor(1, out);
        for _ in 0..1000 {
            feed.append(&broadcast("e", None));
        }
        tokio::time::timeout(std::time::Duration::from_secs(1), rx.overflow().wait())
            .await
            .expect("cut off");
        // A cursor far behind on a long chain drops without recursion.
        for _ in 0..200_000 {
            feed.append(&broadcast("e", None));
        }
        drop(cursor);
    }
}
