//! Rates and caps: a token bucket (a room's timer time), the same shared between threads
//! (a plugin's log lines), a socket's message rate, connects per client, the rate at which
//! the host writes warnings about one plugin, so that nothing a plugin does can flood the
//! log, and the node's connection slots. No I/O here.

use std::collections::HashMap;
use std::net::IpAddr;
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

/// A token bucket of client messages: `per_sec` sustained, `burst` at once. Past it,
/// messages are refused; `burst` refusals in a row end the socket.
pub struct RateLimit {
    bucket: Bucket,
    refused: u32,
}

impl RateLimit {
    /// `per_sec` messages a second, `burst` at once.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        RateLimit {
            bucket: Bucket::new(f64::from(per_sec), f64::from(burst)),
            refused: 0,
        }
    }

    /// Whether the next message may pass.
    pub fn allow(&mut self) -> bool {
        if self.bucket.take() {
            self.refused = 0;
            true
        } else {
            self.refused += 1;
            false
        }
    }

    /// Whether the client kept sending through a whole burst of refusals.
    pub fn exhausted(&self) -> bool {
        f64::from(self.refused) >= self.bucket.burst()
    }
}

/// Who a connect is counted against: the socket id its token names (one user, whatever
/// address it comes from), or else its address (IPv6 by its /64, what one host holds).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConnectKey {
    /// A token's socket id.
    Socket(Arc<str>),
    /// An address, for tokens without a user.
    Ip(IpAddr),
}

impl ConnectKey {
    /// The key of an address.
    pub fn ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => ConnectKey::Ip(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ConnectKey::Ip(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    ConnectKey::Ip(IpAddr::V6(prefix.into()))
                }
            },
        }
    }
}

/// Clients tracked at most; past it, those whose bucket is full again are forgotten, and
/// if that is not enough every bucket starts anew (memory stays bounded).
const CONNECT_KEYS: usize = 65_536;

/// Connects per client (`connects_per_sec` sustained, `connect_burst` at once): a client
/// that reconnects in a hot loop is told to wait, instead of costing a socket, a session
/// and a log line each time.
pub struct Connects {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<HashMap<ConnectKey, Bucket>>,
}

impl Connects {
    /// `per_sec` connects a second per client, `burst` at once.
    pub fn new(per_sec: u32, burst: u32) -> Self {
        Connects {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst),
            buckets: Mutex::default(),
        }
    }

    /// Takes a connect for `key`; when there is none left, the whole seconds until there
    /// is one.
    pub fn take(&self, key: ConnectKey) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= CONNECT_KEYS && !buckets.contains_key(&key) {
            let burst = self.burst;
            buckets.retain(|_, b| b.tokens() < burst);
            if buckets.len() >= CONNECT_KEYS {
                buckets.clear();
            }
        }
        let bucket = buckets
            .entry(key)
            .or_insert_with(|| Bucket::new(self.per_sec, self.burst));
        if bucket.take() {
            Ok(())
        } else {
            // At least one second: what Retry-After can say.
            Err(bucket.refill_secs().ceil().max(1.0) as u64)
        }
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
    fn the_rate_limit_allows_a_burst_then_refuses_then_gives_up() {
        let mut rate = RateLimit::new(1, 3);
        assert!((0..3).all(|_| rate.allow()));
        assert!(!rate.allow());
        assert!(!rate.exhausted());
        assert!(!rate.allow() && !rate.allow());
        assert!(rate.exhausted());
    }

    #[test]
    fn connects_are_counted_per_user_and_per_host() {
        let connects = Connects::new(1, 2);
        let alice = || ConnectKey::Socket("user_socket:alice".into());
        assert!(connects.take(alice()).is_ok() && connects.take(alice()).is_ok());
        assert_eq!(connects.take(alice()), Err(1));
        assert!(
            connects
                .take(ConnectKey::Socket("user_socket:bob".into()))
                .is_ok()
        );
        // One IPv6 host's addresses share a key; a mapped IPv4 address is that address.
        let a: IpAddr = "2001:db8::1".parse().expect("ip");
        let b: IpAddr = "2001:db8::ffff:2".parse().expect("ip");
        assert_eq!(ConnectKey::ip(a), ConnectKey::ip(b));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(
            ConnectKey::ip(mapped),
            ConnectKey::Ip("10.0.0.1".parse().expect("ip"))
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
