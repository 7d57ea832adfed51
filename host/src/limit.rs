//! Rates and caps: a token bucket (a socket's messages, a room's timer time), the same
//! shared between threads (a plugin's log lines), the rate at which the host writes
//! warnings about one plugin, so that nothing a plugin does can flood the log, and the
//! node's connection slots. No I/O here.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::stats::Stats;

/// `rate` tokens a second, at most `burst` saved up; starts full.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> Self {
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// The tokens now (negative after [`Bucket::spend`] overdrew them).
    pub fn tokens(&mut self) -> f64 {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        self.tokens
    }

    /// Takes one token if there is one.
    pub fn take(&mut self) -> bool {
        if self.tokens() >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `amount` whatever is left (what something already used is paid after).
    pub fn spend(&mut self, amount: f64) {
        self.tokens();
        self.tokens -= amount;
    }

    /// Seconds until the bucket holds a token again.
    pub fn refill_secs(&mut self) -> f64 {
        let missing = 1.0 - self.tokens().min(1.0);
        if self.rate > 0.0 {
            missing / self.rate
        } else {
            f64::INFINITY
        }
    }

    /// The most the bucket saves up.
    pub fn burst(&self) -> f64 {
        self.burst
    }
}

/// A [`Bucket`] shared between threads.
#[derive(Debug)]
pub struct SharedBucket(Mutex<Bucket>);

impl SharedBucket {
    /// `per_sec` tokens a second, with a burst of as many.
    pub fn per_sec(per_sec: u32) -> Self {
        let rate = f64::from(per_sec);
        SharedBucket(Mutex::new(Bucket::new(rate, rate)))
    }

    /// Takes one token if there is one.
    pub fn take(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Warnings the host writes about one plugin (refused host calls, dropped timers, failed
/// joins, channels crashed by its errors): at most [`WARNINGS_PER_SEC`] a second; the
/// rest are counted in `plugin_warnings_dropped`.
pub struct Warnings {
    bucket: SharedBucket,
    stats: Arc<Stats>,
}

/// Host warnings logged per second per plugin (fixed).
pub const WARNINGS_PER_SEC: u32 = 5;

impl Warnings {
    /// The warnings of one plugin, counted in `stats`.
    pub fn new(stats: Arc<Stats>) -> Self {
        Warnings {
            bucket: SharedBucket::per_sec(WARNINGS_PER_SEC),
            stats,
        }
    }

    /// Whether a warning may be written now; when not, it is counted as dropped.
    pub fn allow(&self) -> bool {
        let allowed = self.bucket.take();
        if !allowed {
            Stats::bump(&self.stats.plugin_warnings_dropped);
        }
        allowed
    }
}

/// The node's connection slots (`max_connections`): one per open connection, held by its
/// HTTP task and, once it is upgraded, by its WebSocket.
pub struct Slots {
    slots: Arc<Semaphore>,
    max: usize,
}

/// One connection's slot, free again once every holder dropped it: held, not read.
#[derive(Clone)]
pub struct Slot {
    _permit: Arc<OwnedSemaphorePermit>,
}

impl Slots {
    /// `max` slots, all free.
    pub fn new(max: usize) -> Self {
        Slots {
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A free slot, if there is one.
    pub fn take(&self) -> Option<Slot> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        Some(Slot {
            _permit: Arc::new(permit),
        })
    }

    /// Slots taken now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// How many there are.
    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refuses_and_an_overdraft_waits() {
        let mut b = Bucket::new(1.0, 3.0);
        assert_eq!((0..5).filter(|_| b.take()).count(), 3);
        let mut time = Bucket::new(20.0, 20.0);
        time.spend(30.0);
        assert!(time.tokens() < 0.0);
        assert!(
            (0.5..0.6).contains(&time.refill_secs()),
            "{}",
            time.refill_secs()
        );
    }

    #[test]
    fn warnings_past_the_rate_are_counted() {
        let stats = Arc::new(Stats::default());
        let w = Warnings::new(stats.clone());
        let allowed = (0..20).filter(|_| w.allow()).count();
        assert_eq!(allowed, WARNINGS_PER_SEC as usize);
        let dropped = stats
            .plugin_warnings_dropped
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(dropped, 20 - allowed as u64);
    }
}
