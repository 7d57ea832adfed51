//! Prometheus metrics: the families `GET /metrics` exports, the handles the server bumps
//! where things happen, and the text a scrape gets. Built on the `prometheus` crate
//! (docs/operations.md says why): its text encoder writes the exposition format, and a
//! handle resolved once (a plugin version's, a transport's) costs one relaxed atomic add
//! per event, with no label lookup.
//!
//! What is counted on the per-message path (messages in, deliveries out, their bytes) goes
//! to [`Sharded`] counters: one cache line per thread, summed at scrape time, so sockets on
//! different cores never write the same line. Topics are never labels (a client chooses
//! them, without bound); plugin names and versions are (an operator chooses them).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The content type of a scrape's answer.
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

/// Every family's name starts with this.
const PREFIX: &str = "cinder";

/// Buckets of plugin call latency, in seconds: 5 µs to about 1.3 s (calls are cut at
/// `plugin_call_ms`, at most 1 s).
const CALL_BUCKETS: [f64; 17] = [
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1,
    0.25, 0.5, 1.0,
];

/// Buckets of pauses (a room's swap, a presence sync): 100 µs to 10 s.
const PAUSE_BUCKETS: [f64; 11] = [
    1e-4, 2.5e-4, 1e-3, 2.5e-3, 1e-2, 2.5e-2, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// Shards of a [`Sharded`] counter: more than the cores a node is likely to have, so
/// that threads rarely share one.
const SHARDS: usize = 32;

/// One shard, alone on its cache line (128 bytes: two lines on x86, as prefetching pairs
/// them).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(AtomicU64);

/// A counter many threads add to at once: each thread adds to its own shard.
#[derive(Debug)]
pub struct Sharded {
    shards: Box<[Shard]>,
}

impl Default for Sharded {
    fn default() -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

/// The shard of the calling thread, given out in turn as threads first count.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: Cell<usize> = Cell::new(NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
    }
    SHARD.with(Cell::get)
}

impl Sharded {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.shards[shard_index()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// The sum of every shard.
    pub fn get(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

/// A plugin export a call enters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Export {
    /// `join`.
    Join,
    /// `handle-in`.
    HandleIn,
    /// `handle-out`.
    HandleOut,
    /// `handle-info`.
    HandleInfo,
    /// `terminate`.
    Terminate,
    /// `snapshot` (hot reload, owned rooms).
    Snapshot,
    /// `restore`.
    Restore,
}

impl Export {
    const ALL: [Export; 7] = [
        Export::Join,
        Export::HandleIn,
        Export::HandleOut,
        Export::HandleInfo,
        Export::Terminate,
        Export::Snapshot,
        Export::Restore,
    ];

    /// The export's name in the WIT world, as logs and labels give it.
    pub fn name(self) -> &'static str {
        match self {
            Export::Join => "join",
            Export::HandleIn => "handle-in",
            Export::HandleOut => "handle-out",
            Export::HandleInfo => "handle-info",
            Export::Terminate => "terminate",
            Export::Snapshot => "snapshot",
            Export::Restore => "restore",
        }
    }
}

/// Why a plugin call or instantiation trapped, as the `cause` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapCause {
    /// Past its CPU time (`plugin_call_ms`).
    Deadline,
    /// Past its memory cap (`plugin_memory_bytes`).
    MemoryCap,
    /// The node's plugin memory budget was used up (not the plugin's doing).
    NodeMemory,
    /// Its wasm stack overflowed.
    StackOverflow,
    /// Any other trap: a panic, `unreachable`, an out-of-bounds access.
    Other,
}

impl TrapCause {
    const ALL: [TrapCause; 5] = [
        TrapCause::Deadline,
        TrapCause::MemoryCap,
        TrapCause::NodeMemory,
        TrapCause::StackOverflow,
        TrapCause::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            TrapCause::Deadline => "deadline",
            TrapCause::MemoryCap => "memory_cap",
            TrapCause::NodeMemory => "node_memory",
            TrapCause::StackOverflow => "stack_overflow",
            TrapCause::Other => "trap",
        }
    }
}

/// How a join ended, as the `result` label says it.
#[derive(Debug, Clone, Copy)]
pub enum JoinResult {
    /// Joined.
    Ok,
    /// Refused by the plugin, or by the host before any plugin is asked: no plugin for the
    /// topic, a limit (channels per socket, rooms per node), the room busy.
    Refused,
    /// The plugin's `join` crashed (a trap or an error).
    Crashed,
    /// The room has no instance to ask: its version quarantined or failing to
    /// instantiate, the node out of plugin memory, an owned room that could not be placed.
    Unavailable,
}

impl JoinResult {
    const ALL: [JoinResult; 4] = [
        JoinResult::Ok,
        JoinResult::Refused,
        JoinResult::Crashed,
        JoinResult::Unavailable,
    ];

    fn label(self) -> &'static str {
        match self {
            JoinResult::Ok => "ok",
            JoinResult::Refused => "refused",
            JoinResult::Crashed => "crashed",
            JoinResult::Unavailable => "unavailable",
        }
    }
}

/// A transport a client connects with.
#[derive(Debug, Clone, Copy)]
pub enum Transport {
    /// A WebSocket.
    WebSocket,
    /// A LongPoll session.
    LongPoll,
}

/// The families, registered once; the server's handles come from here.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    plugin: PluginFamilies,
    /// Open sockets by transport and serializer: `[transport][serializer]`, V1 first.
    sockets: [[IntGauge; 2]; 2],
    /// Joined channels on this node.
    pub channels: IntGauge,
    joins: [IntCounter; 4],
    /// Client messages read (frames, and LongPoll batch lines).
    pub messages_in: Sharded,
    /// Bytes of those messages.
    pub bytes_in: Sharded,
    /// Frames written to clients (replies, pushes, broadcasts).
    pub deliveries_out: Sharded,
    /// Bytes of those frames.
    pub bytes_out: Sharded,
    presence_sync: Histogram,
}

#[derive(Debug)]
struct PluginFamilies {
    calls: IntCounterVec,
    call_seconds: HistogramVec,
    errors: IntCounterVec,
    traps: IntCounterVec,
    deadline_hits: IntCounterVec,
    memory_cap_hits: IntCounterVec,
    quarantines: IntCounterVec,
    instantiations: IntCounterVec,
    swap_pause: HistogramVec,
}

fn name(short: &str) -> String {
    format!("{PREFIX}_{short}")
}

/// Registers `collector` (names are this module's constants: registering cannot clash).
fn registered<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    if let Err(e) = registry.register(Box::new(collector.clone())) {
        tracing::error!(error = %e, "metric not registered");
    }
    collector
}

fn counter_vec(registry: &Registry, short: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name(short), help), labels)
        .unwrap_or_else(|e| unreachable!("{short}: {e}"));
    registered(registry, vec)
}

fn histogram_vec(
    registry: &Registry,
    short: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let opts = HistogramOpts::new(name(short), help).buckets(buckets.to_vec());
    let vec = HistogramVec::new(opts, labels).unwrap_or_else(|e| unreachable!("{short}: {e}"));
    registered(registry, vec)
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let pv = &["plugin", "version"];
        let plugin = PluginFamilies {
            calls: counter_vec(
                r,
                "plugin_calls_total",
                "Calls into a plugin's exports.",
                &["plugin", "version", "export"],
            ),
            call_seconds: histogram_vec(
                r,
                "plugin_call_duration_seconds",
                "Wall time of a plugin call, from entering the export to its result.",
                &["plugin", "version", "export"],
                &CALL_BUCKETS,
            ),
            errors: counter_vec(
                r,
                "plugin_errors_total",
                "Calls that returned an error (the channel crashes, the room lives).",
                pv,
            ),
            traps: counter_vec(
                r,
                "plugin_traps_total",
                "Calls and instantiations that trapped, by cause (the room's instance is discarded).",
                &["plugin", "version", "cause"],
            ),
            deadline_hits: counter_vec(
                r,
                "plugin_deadline_hits_total",
                "Calls cut off at their CPU time (plugin_call_ms).",
                pv,
            ),
            memory_cap_hits: counter_vec(
                r,
                "plugin_memory_cap_hits_total",
                "Memory growth refused at the instance's cap (plugin_memory_bytes).",
                pv,
            ),
            quarantines: counter_vec(
                r,
                "plugin_quarantines_total",
                "Times the plugin version was quarantined for crashing too often.",
                pv,
            ),
            instantiations: counter_vec(
                r,
                "plugin_instantiations_total",
                "Room instances made.",
                pv,
            ),
            swap_pause: histogram_vec(
                r,
                "room_swap_pause_seconds",
                "How long a live room paused to move to this version (hot reload).",
                pv,
                &PAUSE_BUCKETS,
            ),
        };
        let sockets_vec = registered(
            r,
            IntGaugeVec::new(
                Opts::new(name("sockets"), "Open client connections."),
                &["transport", "serializer"],
            )
            .unwrap_or_else(|e| unreachable!("sockets: {e}")),
        );
        let socket = |t: &str, s: &str| sockets_vec.with_label_values(&[t, s]);
        let sockets = [
            [socket("websocket", "1.0.0"), socket("websocket", "2.0.0")],
            [socket("longpoll", "1.0.0"), socket("longpoll", "2.0.0")],
        ];
        let channels = registered(
            r,
            IntGauge::new(name("channels"), "Joined channels.")
                .unwrap_or_else(|e| unreachable!("channels: {e}")),
        );
        let joins_vec = counter_vec(
            r,
            "joins_total",
            "Channel joins, by how they ended.",
            &["result"],
        );
        let joins = JoinResult::ALL.map(|j| joins_vec.with_label_values(&[j.label()]));
        let presence_sync = registered(
            r,
            Histogram::with_opts(
                HistogramOpts::new(
                    name("presence_sync_seconds"),
                    "On a cluster: how long a topic opening here waited for the other nodes' presence (their full syncs).",
                )
                .buckets(PAUSE_BUCKETS.to_vec()),
            )
            .unwrap_or_else(|e| unreachable!("presence_sync: {e}")),
        );
        Metrics {
            registry,
            plugin,
            sockets,
            channels,
            joins,
            messages_in: Sharded::default(),
            bytes_in: Sharded::default(),
            deliveries_out: Sharded::default(),
            bytes_out: Sharded::default(),
            presence_sync,
        }
    }
}

/// Counts one open socket until dropped.
pub struct SocketGauge(IntGauge);

impl Drop for SocketGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Counts one joined channel until dropped.
#[derive(Debug)]
pub struct ChannelGauge(IntGauge);

impl Drop for ChannelGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What a scrape reads beside the registered families: the server's counters and gauges
/// at this moment.
pub struct Scrape<'a> {
    /// Event counters (`Stats`), each with its help text.
    pub counters: Vec<(&'static str, &'static str, u64)>,
    /// Gauges: name, help, value.
    pub gauges: Vec<(&'static str, &'static str, i64)>,
    /// Live rooms by plugin and version.
    pub rooms: &'a BTreeMap<(Arc<str>, Arc<str>), usize>,
}

impl Metrics {
    /// The handles of one plugin version.
    pub fn plugin(&self, plugin: &str, version: &str) -> PluginMetrics {
        let f = &self.plugin;
        let pv = [plugin, version];
        PluginMetrics {
            calls: Export::ALL.map(|e| f.calls.with_label_values(&[plugin, version, e.name()])),
            seconds: Export::ALL.map(|e| {
                f.call_seconds
                    .with_label_values(&[plugin, version, e.name()])
            }),
            errors: f.errors.with_label_values(&pv),
            traps: TrapCause::ALL.map(|c| f.traps.with_label_values(&[plugin, version, c.label()])),
            deadline_hits: f.deadline_hits.with_label_values(&pv),
            memory_cap_hits: f.memory_cap_hits.with_label_values(&pv),
            quarantines: f.quarantines.with_label_values(&pv),
            instantiations: f.instantiations.with_label_values(&pv),
            swap_pause: f.swap_pause.with_label_values(&pv),
        }
    }

    /// Counts a socket open until the guard is dropped.
    pub fn socket_opened(&self, transport: Transport, v2: bool) -> SocketGauge {
        let gauge = self.sockets[transport as usize][usize::from(v2)].clone();
        gauge.inc();
        SocketGauge(gauge)
    }

    /// Counts a channel joined until the guard is dropped.
    pub fn channel_joined(&self) -> ChannelGauge {
        self.channels.inc();
        ChannelGauge(self.channels.clone())
    }

    /// Counts how a join ended.
    pub fn joined(&self, result: JoinResult) {
        self.joins[result as usize].inc();
    }

    /// Records how long a topic waited for the other nodes' presence.
    pub fn presence_synced(&self, waited: Duration) {
        self.presence_sync.observe(waited.as_secs_f64());
    }

    /// The exposition text of every family.
    pub fn render(&self, scrape: &Scrape<'_>) -> String {
        let mut families = self.registry.gather();
        let extra = Registry::new();
        let add = |collector: Box<dyn Collector>| {
            if let Err(e) = extra.register(collector) {
                tracing::error!(error = %e, "metric not exported");
            }
        };
        for (short, help, value) in &scrape.counters {
            if let Ok(c) = IntCounter::new(name(&format!("{short}_total")), *help) {
                c.inc_by(*value);
                add(Box::new(c));
            }
        }
        let hot = [
            (
                "messages_in_total",
                "Client messages read.",
                &self.messages_in,
            ),
            (
                "message_bytes_in_total",
                "Bytes of client messages read.",
                &self.bytes_in,
            ),
            (
                "deliveries_out_total",
                "Frames written to clients (replies, pushes, broadcasts).",
                &self.deliveries_out,
            ),
            (
                "delivery_bytes_out_total",
                "Bytes of frames written to clients.",
                &self.bytes_out,
            ),
        ];
        for (short, help, counter) in hot {
            if let Ok(c) = IntCounter::new(name(short), help) {
                c.inc_by(counter.get());
                add(Box::new(c));
            }
        }
        for (short, help, value) in &scrape.gauges {
            if let Ok(g) = IntGauge::new(name(short), *help) {
                g.set(*value);
                add(Box::new(g));
            }
        }
        if let Ok(rooms) = IntGaugeVec::new(
            Opts::new(name("plugin_rooms"), "Live rooms by plugin and version."),
            &["plugin", "version"],
        ) {
            for ((plugin, version), n) in scrape.rooms {
                rooms
                    .with_label_values(&[&**plugin, &**version])
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
            add(Box::new(rooms));
        }
        families.extend(extra.gather());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# metrics could not be encoded: {e}\n"))
    }
}

/// One plugin version's handles, resolved when the version is loaded.
#[derive(Debug)]
pub struct PluginMetrics {
    calls: [IntCounter; 7],
    seconds: [Histogram; 7],
    errors: IntCounter,
    traps: [IntCounter; 5],
    deadline_hits: IntCounter,
    memory_cap_hits: IntCounter,
    quarantines: IntCounter,
    instantiations: IntCounter,
    swap_pause: Histogram,
}

impl PluginMetrics {
    /// A call of `export` that took `took`.
    pub fn called(&self, export: Export, took: Duration) {
        let i = export as usize;
        self.calls[i].inc();
        self.seconds[i].observe(took.as_secs_f64());
    }

    /// A call that returned an error.
    pub fn failed(&self) {
        self.errors.inc();
    }

    /// A call or an instantiation that trapped.
    pub fn trapped(&self, cause: TrapCause) {
        self.traps[cause as usize].inc();
        match cause {
            TrapCause::Deadline => self.deadline_hits.inc(),
            TrapCause::MemoryCap => self.memory_cap_hits.inc(),
            _ => {}
        }
    }

    /// The version was quarantined.
    pub fn quarantined(&self) {
        self.quarantines.inc();
    }

    /// A room instance was made.
    pub fn instantiated(&self) {
        self.instantiations.inc();
    }

    /// A live room moved to this version after pausing `pause`.
    pub fn swapped(&self, pause: Duration) {
        self.swap_pause.observe(pause.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_counts_add_up_across_threads() {
        let counter = Arc::new(Sharded::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counter = counter.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| counter.add(2)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().expect("counts"));
        assert_eq!(counter.get(), 8000);
    }

    #[test]
    fn a_scrape_holds_the_plugin_families_the_counters_and_the_rooms() {
        let metrics = Metrics::default();
        let chat = metrics.plugin("chat", "0.1.0");
        chat.called(Export::HandleIn, Duration::from_micros(30));
        chat.trapped(TrapCause::Deadline);
        metrics.messages_in.add(3);
        let _socket = metrics.socket_opened(Transport::LongPoll, true);
        let rooms = BTreeMap::from([(("chat".into(), "0.1.0".into()), 2)]);
        let text = metrics.render(&Scrape {
            counters: vec![("room_crashes", "Rooms crashed.", 4)],
            gauges: vec![("connections", "Open connections.", 9)],
            rooms: &rooms,
        });
        for line in [
            "cinder_plugin_calls_total{export=\"handle-in\",plugin=\"chat\",version=\"0.1.0\"} 1",
            "cinder_plugin_call_duration_seconds_bucket{export=\"handle-in\",plugin=\"chat\",version=\"0.1.0\",le=\"0.00005\"} 1",
            "cinder_plugin_traps_total{cause=\"deadline\",plugin=\"chat\",version=\"0.1.0\"} 1",
            "cinder_plugin_deadline_hits_total{plugin=\"chat\",version=\"0.1.0\"} 1",
            "cinder_sockets{serializer=\"2.0.0\",transport=\"longpoll\"} 1",
            "cinder_messages_in_total 3",
            "cinder_room_crashes_total 4",
            "cinder_connections 9",
            "cinder_plugin_rooms{plugin=\"chat\",version=\"0.1.0\"} 2",
            "# TYPE cinder_room_crashes_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }
}
