//! Counters of what the server did and refused, for operators (`GET /api/stats`) and tests.
//! Plain atomics, bumped where the event happens; no I/O here.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Event counters since start.
#[derive(Debug, Default)]
pub struct Stats {
    /// Room instances discarded after a trap, a blown deadline or the memory cap.
    pub room_crashes: AtomicU64,
    /// Channels crashed by a plugin returning an error.
    pub channel_errors: AtomicU64,
    /// Times a plugin was quarantined for crashing too often.
    pub quarantines: AtomicU64,
    /// Joins refused because the node runs `max_rooms` rooms.
    pub rooms_refused: AtomicU64,
    /// Sockets cut off because their outbound queue overflowed.
    pub slow_disconnects: AtomicU64,
    /// Client messages refused by the rate limit.
    pub rate_limited: AtomicU64,
    /// Frames that could not be decoded.
    pub malformed_frames: AtomicU64,
    /// Plugin stdout/stderr lines dropped by the log rate limit.
    pub plugin_log_dropped: AtomicU64,
    /// Components compiled (a version new to the artifact cache).
    pub artifact_compiles: AtomicU64,
    /// Components loaded from the artifact cache instead of compiled.
    pub artifact_cache_hits: AtomicU64,
    /// Live rooms moved to another plugin version.
    pub room_swaps: AtomicU64,
    /// Live rooms that stayed on their version because the swap failed.
    pub room_swap_failures: AtomicU64,
}

/// A point-in-time copy of [`Stats`] plus gauges.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// Open sockets.
    pub sockets: usize,
    /// Live rooms (plugin instances).
    pub rooms: usize,
    /// See [`Stats::room_crashes`].
    pub room_crashes: u64,
    /// See [`Stats::channel_errors`].
    pub channel_errors: u64,
    /// See [`Stats::quarantines`].
    pub quarantines: u64,
    /// See [`Stats::rooms_refused`].
    pub rooms_refused: u64,
    /// See [`Stats::slow_disconnects`].
    pub slow_disconnects: u64,
    /// See [`Stats::rate_limited`].
    pub rate_limited: u64,
    /// See [`Stats::malformed_frames`].
    pub malformed_frames: u64,
    /// See [`Stats::plugin_log_dropped`].
    pub plugin_log_dropped: u64,
    /// See [`Stats::artifact_compiles`].
    pub artifact_compiles: u64,
    /// See [`Stats::artifact_cache_hits`].
    pub artifact_cache_hits: u64,
    /// See [`Stats::room_swaps`].
    pub room_swaps: u64,
    /// See [`Stats::room_swap_failures`].
    pub room_swap_failures: u64,
}

impl Stats {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now, with the given gauges.
    pub fn snapshot(&self, sockets: usize, rooms: usize) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            sockets,
            rooms,
            room_crashes: get(&self.room_crashes),
            channel_errors: get(&self.channel_errors),
            quarantines: get(&self.quarantines),
            rooms_refused: get(&self.rooms_refused),
            slow_disconnects: get(&self.slow_disconnects),
            rate_limited: get(&self.rate_limited),
            malformed_frames: get(&self.malformed_frames),
            plugin_log_dropped: get(&self.plugin_log_dropped),
            artifact_compiles: get(&self.artifact_compiles),
            artifact_cache_hits: get(&self.artifact_cache_hits),
            room_swaps: get(&self.room_swaps),
            room_swap_failures: get(&self.room_swap_failures),
        }
    }
}
