//! Presence at scale: what a join or a leave costs in a topic where 10,000 users are
//! present, through the host's tracker and a PubSub with 10,000 subscribers (each delivery
//! a queue push, as for a socket). Also the `presence_state` a joiner receives.
//!
//! Run with `cargo bench -p cinder --bench presence`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cinder::presence::Tracker;
use cinder::pubsub::{Broadcast, LocalPubSub, PubSub, Subscriber};

/// Stands in for a socket's outbound queue: one push per delivery.
struct Sink(std::sync::Mutex<Vec<Arc<Broadcast>>>, AtomicU64);

impl Subscriber for Sink {
    fn deliver(&self, b: &Arc<Broadcast>) {
        self.1.fetch_add(1, Ordering::Relaxed);
        let mut q = self.0.lock().expect("lock");
        if q.len() > 64 {
            q.clear();
        }
        q.push(b.clone());
    }
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e6;
    println!(
        "{name:<58} median {:>9.2} µs   p99 {:>9.2} µs   (n={})",
        at(0.5),
        at(0.99),
        samples.len()
    );
}

fn main() {
    const MEMBERS: u64 = 10_000;
    let pubsub = Arc::new(LocalPubSub::new());
    let topic: Arc<str> = "presence:big".into();
    for id in 0..MEMBERS {
        pubsub.subscribe(
            &topic,
            id,
            Arc::new(Sink(Default::default(), AtomicU64::new(0))),
        );
    }
    let tracker = Tracker::new(pubsub.clone(), usize::MAX, usize::MAX);
    let meta = r#"{"online_at":1764000000}"#;
    let account = Arc::new(cinder::presence::Account::default());
    for id in 0..MEMBERS {
        tracker
            .track(&topic, id, &format!("user{id}"), meta, &account)
            .expect("track");
    }

    let mut joins = Vec::new();
    let mut leaves = Vec::new();
    for i in 0..500u64 {
        let owner = MEMBERS + i;
        let key = format!("newcomer{i}");
        let start = Instant::now();
        tracker
            .track(&topic, owner, &key, meta, &account)
            .expect("track");
        joins.push(start.elapsed());
        let start = Instant::now();
        tracker.untrack_owner(&topic, owner);
        leaves.push(start.elapsed());
    }
    report(
        "join into 10k present (track + diff to 10k subscribers)",
        joins,
    );
    report(
        "leave from 10k present (untrack + diff to 10k subscribers)",
        leaves,
    );

    let mut states = Vec::new();
    let mut size = 0;
    for _ in 0..50 {
        let start = Instant::now();
        let state = tracker.list(&topic);
        states.push(start.elapsed());
        size = state.len();
    }
    report(
        &format!("presence_state of 10k present ({} KiB)", size / 1024),
        states,
    );

    // The same join without subscribers: the tracker's own share of the cost.
    let quiet = Tracker::new(Arc::new(LocalPubSub::new()), usize::MAX, usize::MAX);
    let topic: Arc<str> = "presence:quiet".into();
    for id in 0..MEMBERS {
        quiet
            .track(&topic, id, &format!("user{id}"), meta, &account)
            .expect("track");
    }
    let mut joins = Vec::new();
    let mut leaves = Vec::new();
    for i in 0..2000u64 {
        let owner = MEMBERS + i;
        let start = Instant::now();
        quiet
            .track(&topic, owner, &format!("n{i}"), meta, &account)
            .expect("track");
        joins.push(start.elapsed());
        let start = Instant::now();
        quiet.untrack_owner(&topic, owner);
        leaves.push(start.elapsed());
    }
    report("join into 10k present, tracker only (no fan-out)", joins);
    report("leave from 10k present, tracker only (no fan-out)", leaves);
}
