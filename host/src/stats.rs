//! Counters of what the server did and refused, for operators (`GET /api/stats`,
//! `GET /metrics`) and tests. Plain atomics, bumped where the event happens; no I/O here.
//! Every limit in docs/limits.md has a counter here that says how often it was hit. The
//! Prometheus families with labels (per plugin version, per transport) are in
//! [`Metrics`], which the counters travel with.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::metrics::Metrics;

/// Declares the counters once: the struct and the list a snapshot reads.
macro_rules! counters {
    ($($(#[doc = $doc:literal])+ $name:ident,)+) => {
        /// Event counters since start.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[doc = $doc])+ pub $name: AtomicU64,)+
            /// The labelled Prometheus families.
            pub metrics: Metrics,
        }

        impl Stats {
            fn counters(&self) -> BTreeMap<&'static str, u64> {
                BTreeMap::from([$((stringify!($name), self.$name.load(Ordering::Relaxed)),)+])
            }

            /// Every counter with its doc comment, as `/metrics` exports them.
            pub fn described(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((
                    stringify!($name),
                    concat!($($doc),+).trim_ascii(),
                    self.$name.load(Ordering::Relaxed),
                ),)+]
            }
        }
    };
}

counters! {
    /// Room instances discarded after a trap, a blown deadline or the memory cap.
    room_crashes,
    /// Channels crashed by a plugin returning an error.
    channel_errors,
    /// Times a plugin was quarantined for crashing too often.
    quarantines,
    /// Joins refused because the node runs `max_rooms` rooms.
    rooms_refused,
    /// Joins refused because the socket has `max_channels_per_socket` channels.
    channels_refused,
    /// Joins and swaps that waited longer than a room's answer may take (`room busy`).
    room_busy,
    /// Sockets cut off as too slow: over `outbound_queue_bytes` behind for longer than the
    /// grace, or past `outbound_queue_max_bytes`.
    slow_disconnects,
    /// Client messages refused by the rate limit.
    rate_limited,
    /// Frames that could not be decoded.
    malformed_frames,
    /// Frames over `max_frame_bytes`.
    oversized_frames,
    /// Sockets closed for sending nothing within `idle_timeout_secs`.
    idle_timeouts,
    /// Replies and pushes the socket's serializer cannot carry (binary for V1), answered
    /// or dropped instead.
    undeliverable,
    /// Host calls refused for a call's limits (messages, payload bytes, the broadcasts of
    /// one message's `handle_out` rounds, a topic not the plugin's).
    call_refusals,
    /// `send-after` calls refused at the pending-timer cap.
    timers_refused,
    /// Timers held back because their room used its `timer_cpu_ms_per_sec`.
    timers_deferred,
    /// Plugin stdout/stderr lines dropped by the log rate limit.
    plugin_log_dropped,
    /// Host warnings about a plugin dropped by their rate limit.
    plugin_warnings_dropped,
    /// Instances and memory growth refused at `plugin_memory_total_bytes`.
    plugin_memory_refused,
    /// Presence tracks and updates refused at a presence budget.
    presence_refused,
    /// Connect attempts refused (a missing, bad or expired token, an unknown serializer, an
    /// origin not in `check_origin`).
    connects_refused,
    /// Connect attempts refused because the client connected past `connects_per_sec`
    /// (429).
    connects_throttled,
    /// LongPoll sessions started.
    longpoll_sessions_started,
    /// LongPoll sessions ended because nobody polled them for 1.5 `longpoll_window_ms`.
    longpoll_sessions_expired,
    /// LongPoll requests for a session of another node, forwarded to it.
    longpoll_forwarded,
    /// Connections refused at `max_connections`.
    connections_refused,
    /// HTTP connections cut for sending their headers or body too slowly.
    http_timeouts,
    /// Failed accepts (out of file descriptors, say).
    accept_errors,
    /// Components compiled (a version new to the artifact cache).
    artifact_compiles,
    /// Components loaded from the artifact cache instead of compiled.
    artifact_cache_hits,
    /// Live rooms moved to another plugin version.
    room_swaps,
    /// Live rooms that stayed on their version because the swap failed.
    room_swap_failures,
    /// Broadcasts and disconnects published to the cluster (Redis).
    cluster_published,
    /// Broadcasts and disconnects from other nodes delivered here.
    cluster_received,
    /// Broadcasts and disconnects that could not cross to other nodes (Redis down or too
    /// far behind): delivered here only.
    cluster_dropped,
    /// Channel messages from Redis that did not parse.
    cluster_malformed,
    /// Times the link to Redis went down (or could not be made at start).
    cluster_outages,
    /// Calls (joins, messages, leaves) of channels here forwarded to the owner of their
    /// room on another node.
    owner_forwarded,
    /// Calls of channels on other nodes handled by rooms this node owns.
    owner_served,
    /// Owned rooms this node took over from an owner that was gone (or started here).
    room_leases_won,
    /// Owned rooms this node stopped running because its lease was gone (a stale owner
    /// fenced out).
    room_leases_lost,
    /// Answers from a stale owner (an older fence) dropped.
    fenced,
    /// Room snapshots saved to Redis.
    snapshots_saved,
    /// Room snapshots that could not be saved (Redis unreachable).
    snapshot_failures,
    /// Forwarded messages refused because the owned room's inbox was full (`room busy`).
    owner_refused,
    /// Intercepted broadcasts dropped because the room's mailbox was full (`room_mailbox`).
    room_mailbox_drops,
}

/// What is in use now, beside the counters.
#[derive(Debug, Default, Serialize)]
pub struct Gauges {
    /// Open WebSockets.
    pub sockets: usize,
    /// Live LongPoll sessions.
    pub longpoll_sessions: usize,
    /// Open connections (HTTP and WebSocket).
    pub connections: usize,
    /// Live rooms (plugin instances).
    pub rooms: usize,
    /// Linear memory of every plugin instance.
    pub plugin_memory_bytes: usize,
    /// Presence keys and metas held.
    pub presence_bytes: usize,
}

/// A point-in-time copy of [`Stats`] with the gauges, as `/api/stats` answers it: one
/// flat JSON object.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    #[serde(flatten)]
    gauges: Gauges,
    #[serde(flatten)]
    counters: BTreeMap<&'static str, u64>,
}

impl Stats {
    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now, with the given gauges.
    pub fn snapshot(&self, gauges: Gauges) -> Snapshot {
        Snapshot {
            gauges,
            counters: self.counters(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_one_flat_object_of_gauges_and_counters() {
        let stats = Stats::default();
        Stats::bump(&stats.room_crashes);
        let json = serde_json::to_value(stats.snapshot(Gauges {
            sockets: 2,
            ..Gauges::default()
        }))
        .expect("serializes");
        assert_eq!(json["sockets"], 2);
        assert_eq!(json["room_crashes"], 1);
        assert_eq!(json["timers_refused"], 0);
    }
}
