//! The WebAssembly runtime: the wasmtime engine and its limits (epoch deadline per call,
//! memory cap per instance, pooling allocator), the only `bindgen!` of the `cinder:channel`
//! world, the host imports, the plugin manifest, compiling (through the artifact cache) and
//! checking a component against the world.
//!
//! It implements the channel module's [`RoomLogic`] and [`LogicFactory`] traits and knows
//! nothing of sockets; which plugin serves which topic is the registry's.

use std::collections::VecDeque;
use std::hash::{Hash as _, Hasher as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use serde::Deserialize;
use wasmtime::component::{Component, HasSelf, InstancePre, Linker, ResourceTable};
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits,
    StoreLimitsBuilder, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::channel::{
    BoxFuture, CallError, CallResult, ChannelSocket, Effect, Handled, InOutcome, InfoOutcome,
    JoinOutcome, LogicFactory, MemberId, RoomLogic,
};
use crate::config::{Limits, MAX_PLUGIN_CALL_MS};
use crate::presence::{PRESENCE_STATE, Tracker};
use crate::protocol::{self, Payload, Status};
use crate::stats::Stats;
use crate::store::PluginStore;

mod output;
mod ticker;
use output::{LogLimiter, LogTarget};
use ticker::Ticker;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "stateful-channel",
        exports: { default: async },
    });
}

use bindings::StatefulChannel;
use bindings::cinder::channel::types as wit;
use bindings::exports::cinder::channel::handler::{
    Guest as HandlerExports, GuestIndices as HandlerIndices,
};
use bindings::exports::cinder::channel::state::{
    Guest as StateExports, GuestIndices as StateIndices,
};

/// The handler interface every plugin exports.
const HANDLER_INTERFACE: &str = "cinder:channel/handler@0.1.0";
/// The optional state interface (hot reload).
const STATE_INTERFACE: &str = "cinder:channel/state@0.1.0";

/// Core instances one component may have (Python components have 14).
const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 20;
/// Memories and tables one component may have.
const MAX_MEMORIES_PER_COMPONENT: u32 = 4;
/// The channel of a call that is about no channel (snapshot, restore): host calls fail.
const NO_CHANNEL: MemberId = 0;
/// Bytes at the start of a freed linear memory kept resident, per pool slot: zeroed with
/// memset rather than given back with madvise, whose TLB shootdown and the page faults after
/// it were more than half the cost of a first join. A Rust plugin built as this workspace
/// builds them (a 64 KiB stack, then data and heap) touches less than this: first join
/// 22.8 -> 9.2 µs (`plugin_calls` bench, docs/benchmarks.md). The memset is paid when an
/// instance is freed; a hot-reload swap frees the old instance off the room's task for
/// that reason.
const MEMORY_KEEP_RESIDENT: usize = 128 << 10;
/// The same for tables.
const TABLE_KEEP_RESIDENT: usize = 16 << 10;
/// Largest assigns a channel may hold: the host keeps them per channel, so a plugin must not
/// be able to grow them without bound.
const MAX_ASSIGNS_BYTES: usize = 64 << 10;

/// The wasmtime engine with Cinder's configuration and its epoch ticker.
pub struct Runtime {
    engine: Engine,
    limits: Limits,
    stats: Arc<Stats>,
    presence: Arc<Tracker>,
    ticker: Arc<Ticker>,
}

impl Runtime {
    /// An engine sized from `limits`: pooling allocator slots for `max_rooms` instances,
    /// memories capped at `plugin_memory_bytes`, epoch interruption every millisecond while
    /// guest code runs.
    pub fn new(limits: &Limits, stats: Arc<Stats>, presence: Arc<Tracker>) -> anyhow::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        // Component-model async is not used; its bookkeeping costs every call.
        config.concurrency_support(false);
        config.max_wasm_stack(512 << 10);
        // A slot per room, plus headroom for the second instance a room holds while it
        // swaps versions and for the test instance of an upload.
        let slots = limits
            .max_rooms
            .saturating_add(limits.max_rooms / 8)
            .saturating_add(16);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(4))
            .total_memories(slots.saturating_mul(2))
            .total_tables(slots.saturating_mul(2))
            .total_stacks(slots)
            .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
            .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
            .max_tables_per_component(MAX_MEMORIES_PER_COMPONENT)
            .max_memory_size(limits.plugin_memory_bytes)
            // A freed slot's first pages are zeroed and stay mapped, so the next room in it
            // does not fault them in again.
            .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT)
            .table_keep_resident(TABLE_KEEP_RESIDENT);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine =
            Engine::new(&config).map_err(|e| anyhow::anyhow!("configuring wasmtime: {e}"))?;

        let ticker = Arc::new(Ticker::start(engine.weak()).context("starting the epoch ticker")?);
        Ok(Runtime {
            engine,
            limits: limits.clone(),
            stats,
            presence,
            ticker,
        })
    }

    /// The cache key of a component's compiled artifact: its hash and wasmtime's
    /// compatibility hash of the engine (target, compiler flags, tunables, features and the
    /// wasmtime version).
    fn artifact_key(&self, sha256: &str) -> String {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        format!("{sha256}-{:016x}", hasher.finish())
    }

    /// The compiled component of `wasm` (whose SHA-256 is `sha256`): from the artifact cache
    /// when it holds it, else compiled now and cached. Slow (up to seconds for big guests):
    /// call it off the async workers. Returns whether the cache served it.
    pub fn compile(
        &self,
        wasm: &[u8],
        sha256: &str,
        store: &PluginStore,
    ) -> anyhow::Result<(Component, bool)> {
        let key = self.artifact_key(sha256);
        if let Some(artifact) = store.artifact(&key) {
            #[allow(unsafe_code)]
            // SAFETY: artifacts are written only by `put_artifact` below, from
            // `Component::serialize` of an engine with this configuration and wasmtime
            // version (the key covers its compatibility hash), and `artifact` checked the
            // SHA-256 each carries before handing the bytes over; wasmtime checks its
            // version and settings again.
            // The cache dir is trusted like the binary itself (docs/plugins/versions.md).
            let component = unsafe { Component::deserialize(&self.engine, &artifact) };
            match component {
                Ok(component) => {
                    Stats::bump(&self.stats.artifact_cache_hits);
                    return Ok((component, true));
                }
                Err(e) => tracing::warn!(error = %e, "cached artifact refused: recompiling"),
            }
        }
        let component = self.compile_uncached(wasm)?;
        Stats::bump(&self.stats.artifact_compiles);
        match component.serialize() {
            Ok(artifact) => store.put_artifact(&key, &artifact),
            Err(e) => tracing::warn!(error = %e, "cannot serialize a compiled component"),
        }
        Ok((component, false))
    }

    /// Compiles a component without the cache.
    pub fn compile_uncached(&self, wasm: &[u8]) -> anyhow::Result<Component> {
        Component::new(&self.engine, wasm)
            .map_err(|e| anyhow::anyhow!("not a loadable component: {e:#}"))
    }

    /// Links a compiled component against the host; fails with a message naming the
    /// problem when it does not fit the `cinder:channel` world (an import the host does not
    /// offer, a missing export).
    pub fn load(&self, manifest: Manifest, component: &Component) -> anyhow::Result<Plugin> {
        manifest.validate(&self.limits)?;
        let mut linker: Linker<RoomData> = Linker::new(&self.engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| anyhow::anyhow!("linking WASI: {e}"))?;
        StatefulChannel::add_to_linker::<_, HasSelf<_>>(&mut linker, |d| d)
            .map_err(|e| anyhow::anyhow!("linking host: {e}"))?;
        let pre = linker
            .instantiate_pre(component)
            .map_err(|e| anyhow::anyhow!("imports do not match what the host offers: {e:#}"))?;
        let handler = HandlerIndices::new(&pre)
            .map_err(|e| anyhow::anyhow!("missing export {HANDLER_INTERFACE}: {e:#}"))?;
        let state =
            match component.get_export_index(None, STATE_INTERFACE) {
                None => None,
                Some(_) => Some(StateIndices::new(&pre).map_err(|e| {
                    anyhow::anyhow!("export {STATE_INTERFACE} is incomplete: {e:#}")
                })?),
            };
        let memory_bytes = manifest
            .limits
            .memory_bytes
            .unwrap_or(self.limits.plugin_memory_bytes);
        let call_time = Duration::from_millis(
            manifest
                .limits
                .call_ms
                .unwrap_or(self.limits.plugin_call_ms),
        );
        let instantiate_time = Duration::from_millis(self.limits.plugin_instantiate_ms);
        Ok(Plugin {
            name: manifest.name.as_str().into(),
            version: manifest.version.as_str().into(),
            intercepts: manifest.intercept.clone().into(),
            manifest,
            pre,
            handler,
            state,
            engine: self.engine.clone(),
            limits: self.limits.clone(),
            memory_bytes,
            call_time,
            instantiate_time,
            crashes: Mutex::default(),
            stats: self.stats.clone(),
            presence: self.presence.clone(),
            ticker: self.ticker.clone(),
            log_limiter: Arc::new(LogLimiter::new(self.limits.plugin_log_lines_per_sec)),
        })
    }
}

/// What a plugin declares about itself: `<name>.toml` beside `<name>.wasm`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Unique plugin name.
    pub name: String,
    /// Version (semver).
    pub version: String,
    /// Topic patterns served: exact (`lobby`) or prefix (`room:*`).
    pub topics: Vec<String>,
    /// Events that go through `handle-out` instead of the fastlane.
    #[serde(default)]
    pub intercept: Vec<String>,
    /// What the plugin does.
    #[serde(default)]
    pub description: String,
    /// Limits of this plugin's instances, instead of the server's defaults.
    #[serde(default)]
    pub limits: PluginLimits,
}

/// Per-plugin overrides of the server's plugin limits.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    /// Linear memory per room instance, in bytes; at most the server's
    /// `plugin_memory_bytes` (the size of a pooling allocator slot).
    pub memory_bytes: Option<usize>,
    /// Time per call, in milliseconds (1 to 1000).
    pub call_ms: Option<u64>,
}

impl Manifest {
    /// Parses and checks a manifest.
    pub fn parse(text: &str, server: &Limits) -> anyhow::Result<Manifest> {
        let manifest: Manifest =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("manifest: {}", e.message()))?;
        manifest.validate(server)?;
        Ok(manifest)
    }

    /// Whether a topic pattern of this manifest overlaps one of `other`'s: some topic
    /// would match both. Returns the two patterns.
    pub fn clash<'a>(&'a self, other: &'a Manifest) -> Option<(&'a str, &'a str)> {
        self.topics.iter().find_map(|a| {
            other
                .topics
                .iter()
                .find(|b| patterns_overlap(a, b))
                .map(|b| (a.as_str(), b.as_str()))
        })
    }

    fn validate(&self, server: &Limits) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.name.is_empty()
                && self
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "plugin name {:?} must be non-empty ASCII letters, digits, - or _",
            self.name
        );
        anyhow::ensure!(
            semver::Version::parse(&self.version).is_ok(),
            "plugin {}: version {:?} is not semver (like 1.2.0)",
            self.name,
            self.version
        );
        anyhow::ensure!(
            !self.topics.is_empty(),
            "plugin {} serves no topics",
            self.name
        );
        for pattern in &self.topics {
            let stem = pattern.strip_suffix('*').unwrap_or(pattern);
            anyhow::ensure!(
                !stem.is_empty() && !stem.contains('*'),
                "plugin {}: topic pattern {pattern:?} must be a topic or a prefix ending in a single *",
                self.name
            );
            anyhow::ensure!(
                stem != protocol::PHOENIX_TOPIC,
                "plugin {}: the phoenix topic is reserved",
                self.name
            );
        }
        for event in &self.intercept {
            anyhow::ensure!(
                !protocol::event::is_reserved(event),
                "plugin {}: cannot intercept {event}",
                self.name
            );
        }
        if let Some(bytes) = self.limits.memory_bytes {
            anyhow::ensure!(
                ((1 << 20)..=server.plugin_memory_bytes).contains(&bytes),
                "plugin {}: limits.memory_bytes must be 1 MiB to the server's plugin_memory_bytes ({})",
                self.name,
                server.plugin_memory_bytes
            );
        }
        if let Some(ms) = self.limits.call_ms {
            anyhow::ensure!(
                (1..=MAX_PLUGIN_CALL_MS).contains(&ms),
                "plugin {}: limits.call_ms must be 1 to {MAX_PLUGIN_CALL_MS}",
                self.name
            );
        }
        Ok(())
    }
}

/// Whether `pattern` (exact or `prefix*`) covers `topic`.
pub fn pattern_matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

/// Whether some topic matches both patterns.
fn patterns_overlap(a: &str, b: &str) -> bool {
    match (a.strip_suffix('*'), b.strip_suffix('*')) {
        (Some(pa), Some(pb)) => pa.starts_with(pb) || pb.starts_with(pa),
        (Some(prefix), None) => b.starts_with(prefix),
        (None, Some(prefix)) => a.starts_with(prefix),
        (None, None) => a == b,
    }
}

/// A compiled plugin, ready to make room instances.
pub struct Plugin {
    name: Arc<str>,
    version: Arc<str>,
    intercepts: Arc<[String]>,
    manifest: Manifest,
    pre: InstancePre<RoomData>,
    handler: HandlerIndices,
    state: Option<StateIndices>,
    engine: Engine,
    limits: Limits,
    /// Memory cap of one instance.
    memory_bytes: usize,
    /// Time limit of one call.
    call_time: Duration,
    /// Time limit of making an instance.
    instantiate_time: Duration,
    crashes: Mutex<CrashRecord>,
    stats: Arc<Stats>,
    presence: Arc<Tracker>,
    ticker: Arc<Ticker>,
    log_limiter: Arc<LogLimiter>,
}

/// Recent room crashes of a plugin, for quarantine.
#[derive(Default)]
struct CrashRecord {
    recent: VecDeque<Instant>,
    quarantined_until: Option<Instant>,
}

impl Plugin {
    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The plugin's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The plugin's version.
    pub fn version(&self) -> &Arc<str> {
        &self.version
    }

    /// Events that go through `handle-out`.
    pub fn intercepts(&self) -> &Arc<[String]> {
        &self.intercepts
    }

    /// Whether the plugin exports `cinder:channel/state` (hands room state over).
    pub fn stateful(&self) -> bool {
        self.state.is_some()
    }

    /// Makes one instance in a throwaway store and checks every export's type, so a
    /// component that traps on start or declares the wrong signatures is refused before it
    /// serves a room.
    pub async fn check(&self) -> anyhow::Result<()> {
        let mut store = self.new_store("");
        arm(&mut store, self.instantiate_time);
        let instance = self.pre.instantiate_async(&mut store).await.map_err(|e| {
            anyhow::anyhow!(
                "instantiation failed: {}",
                trap_cause(&e, self.instantiate_time)
            )
        })?;
        if let Err(e) = self.handler.load(&mut store, &instance) {
            let function = mismatched_handler_function(&mut store, &instance)
                .map(|f| format!(" (function {f})"))
                .unwrap_or_default();
            anyhow::bail!("export {HANDLER_INTERFACE} does not match the world{function}: {e:#}");
        }
        if let Some(state) = &self.state
            && let Err(e) = state.load(&mut store, &instance)
        {
            anyhow::bail!("export {STATE_INTERFACE} does not match the world: {e:#}");
        }
        Ok(())
    }

    /// When the plugin's quarantine ends, if it is quarantined now.
    fn quarantined(&self) -> Option<Instant> {
        let mut record = self.crashes.lock().unwrap_or_else(|p| p.into_inner());
        match record.quarantined_until {
            Some(until) if until > Instant::now() => Some(until),
            Some(_) => {
                record.quarantined_until = None;
                record.recent.clear();
                None
            }
            None => None,
        }
    }

    fn new_store(&self, topic: &str) -> Store<RoomData> {
        let topic: Arc<str> = topic.into();
        let output = |stream| {
            LogTarget::new(
                self.name.clone(),
                topic.clone(),
                stream,
                self.log_limiter.clone(),
                self.stats.clone(),
            )
        };
        // No preopened directories, no environment, no arguments, every socket address
        // denied: clocks and random are all a plugin gets from WASI.
        let wasi = WasiCtx::builder()
            .stdout(output("stdout"))
            .stderr(output("stderr"))
            .build();
        let data = RoomData {
            wasi,
            table: ResourceTable::new(),
            store_limits: StoreLimitsBuilder::new()
                .memory_size(self.memory_bytes)
                .instances(MAX_CORE_INSTANCES_PER_COMPONENT as usize)
                .memories(MAX_MEMORIES_PER_COMPONENT as usize)
                .tables(MAX_MEMORIES_PER_COMPONENT as usize)
                .trap_on_grow_failure(true)
                .build(),
            effects: Vec::new(),
            effect_bytes: 0,
            deadline: Instant::now(),
            plugin: self.name.clone(),
            topic,
            limits: self.limits.clone(),
            presence: self.presence.clone(),
            channel: NO_CHANNEL,
            ticker: self.ticker.clone(),
        };
        let mut store = Store::new(&self.engine, data);
        store.limiter(|d| &mut d.store_limits);
        // On every epoch tick (1 ms) of a running call: trap once the call's time is up,
        // else yield to the executor so other rooms and sockets on this worker thread run.
        // tokio's `yield_now` (not a bare self-wake) lets the I/O driver run as well.
        store.epoch_deadline_callback(|ctx| {
            if Instant::now() >= ctx.data().deadline {
                Err(wasmtime::Trap::Interrupt.into())
            } else {
                Ok(UpdateDeadline::YieldCustom(
                    1,
                    Box::pin(tokio::task::yield_now()),
                ))
            }
        });
        store
    }
}

impl LogicFactory for Plugin {
    fn instantiate<'a>(
        &'a self,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn RoomLogic>, String>> {
        Box::pin(async move {
            if let Some(until) = self.quarantined() {
                let left = until.saturating_duration_since(Instant::now());
                return Err(format!(
                    "plugin {} is quarantined for {}s more after repeated crashes",
                    self.name,
                    left.as_secs()
                ));
            }
            let mut store = self.new_store(topic);
            arm(&mut store, self.instantiate_time);
            let loaded = match self.pre.instantiate_async(&mut store).await {
                Ok(instance) => self
                    .handler
                    .load(&mut store, &instance)
                    .and_then(|handler| {
                        let state = match &self.state {
                            Some(state) => Some(state.load(&mut store, &instance)?),
                            None => None,
                        };
                        Ok((handler, state))
                    }),
                Err(e) => Err(e),
            };
            match loaded {
                Ok((handler, state)) => Ok(Box::new(WasmRoom {
                    store,
                    handler,
                    state,
                    version: self.version.clone(),
                    call_time: self.call_time,
                    dead: None,
                }) as Box<dyn RoomLogic>),
                Err(e) => {
                    let cause = format!(
                        "instantiation failed: {}",
                        trap_cause(&e, self.instantiate_time)
                    );
                    self.crashed(topic, &cause);
                    Err(cause)
                }
            }
        })
    }

    fn crashed(&self, topic: &str, cause: &str) {
        Stats::bump(&self.stats.room_crashes);
        tracing::error!(plugin = %self.name, version = %self.version, %topic, %cause, "room crashed: instance discarded");
        let now = Instant::now();
        let window = Duration::from_secs(self.limits.crash_window_secs);
        let mut record = self.crashes.lock().unwrap_or_else(|p| p.into_inner());
        record.recent.push_back(now);
        while record
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            record.recent.pop_front();
        }
        if record.quarantined_until.is_none()
            && record.recent.len() >= self.limits.crash_limit as usize
        {
            record.quarantined_until = Some(now + Duration::from_secs(self.limits.quarantine_secs));
            Stats::bump(&self.stats.quarantines);
            tracing::error!(
                plugin = %self.name,
                version = %self.version,
                crashes = record.recent.len(),
                window_secs = self.limits.crash_window_secs,
                quarantine_secs = self.limits.quarantine_secs,
                "plugin quarantined: joins refused until the quarantine ends"
            );
        }
    }
}

/// The first function of the handler interface whose type is not the world's, so an
/// upload's refusal can name it.
fn mismatched_handler_function(
    store: &mut Store<RoomData>,
    instance: &wasmtime::component::Instance,
) -> Option<&'static str> {
    let iface = instance.get_export_index(&mut *store, None, HANDLER_INTERFACE)?;
    let mut index = |name| instance.get_export_index(&mut *store, Some(&iface), name);
    let (join, handle_in, handle_out, handle_info, terminate) = (
        index("join"),
        index("handle-in"),
        index("handle-out"),
        index("handle-info"),
        index("terminate"),
    );
    type Call<'a> = (&'a str, &'a wit::Payload, &'a wit::Socket);
    let fits = [
        ("join", join.is_some_and(|i| {
            instance
                .get_typed_func::<Call<'_>, (Result<wit::JoinOutcome, String>,)>(&mut *store, i)
                .is_ok()
        })),
        ("handle-in", handle_in.is_some_and(|i| {
            instance
                .get_typed_func::<Call<'_>, (Result<wit::InResult, String>,)>(&mut *store, i)
                .is_ok()
        })),
        ("handle-out", handle_out.is_some_and(|i| {
            instance
                .get_typed_func::<Call<'_>, (Result<wit::InfoResult, String>,)>(&mut *store, i)
                .is_ok()
        })),
        ("handle-info", handle_info.is_some_and(|i| {
            instance
                .get_typed_func::<(&wit::Payload, &wit::Socket), (Result<wit::InfoResult, String>,)>(
                    &mut *store,
                    i,
                )
                .is_ok()
        })),
        ("terminate", terminate.is_some_and(|i| {
            instance
                .get_typed_func::<(&str, &wit::Socket), ()>(&mut *store, i)
                .is_ok()
        })),
    ];
    fits.into_iter()
        .find(|(_, fits)| !fits)
        .map(|(name, _)| name)
}

/// Why a call or an instantiation trapped, in words for logs.
fn trap_cause(e: &wasmtime::Error, call_time: Duration) -> String {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => {
            format!("time limit of {} ms exceeded", call_time.as_millis())
        }
        Some(wasmtime::Trap::StackOverflow) => "wasm stack overflow".into(),
        Some(t) => format!("trap: {t}"),
        None => format!("{e:#}"),
    }
}

// ---------------------------------------------------------------------------------------
// One room's instance
// ---------------------------------------------------------------------------------------

/// Store data of one room instance.
struct RoomData {
    wasi: WasiCtx,
    table: ResourceTable,
    store_limits: StoreLimits,
    /// Host calls of the current call.
    effects: Vec<Effect>,
    /// Bytes of payload in `effects`.
    effect_bytes: usize,
    /// When the current call must have returned.
    deadline: Instant,
    plugin: Arc<str>,
    topic: Arc<str>,
    limits: Limits,
    presence: Arc<Tracker>,
    /// The channel the current call is about: owner of the presence it tracks.
    channel: MemberId,
    ticker: Arc<Ticker>,
}

/// Lets guest code in `store` run for `time` from now: sets its deadline and the epoch
/// deadline of the next tick, and keeps the ticker ticking until then.
fn arm(store: &mut Store<RoomData>, time: Duration) {
    let deadline = Instant::now() + time;
    let data = store.data_mut();
    data.deadline = deadline;
    data.ticker.keep_ticking(deadline);
    store.set_epoch_deadline(1);
}

impl WasiView for RoomData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl RoomData {
    fn payload(&self, payload: wit::Payload) -> Result<Payload, String> {
        from_wit_payload(payload).map_err(|e| e.to_string())
    }

    /// Host calls act on the channel of the current call; snapshot and restore have none.
    fn in_channel(&self) -> Result<(), String> {
        if self.channel == NO_CHANNEL {
            return Err("host calls are not available in snapshot and restore".into());
        }
        Ok(())
    }

    fn effect(
        &mut self,
        effect: impl FnOnce(&Self) -> Result<Effect, String>,
    ) -> Result<(), String> {
        self.in_channel()?;
        if self.effects.len() >= self.limits.max_messages_per_call {
            return Err(format!(
                "more than {} messages in one call",
                self.limits.max_messages_per_call
            ));
        }
        let effect = effect(self)?;
        let bytes = match &effect {
            Effect::Push { payload, .. } | Effect::Broadcast { payload, .. } => payload.len(),
            Effect::SendAfter { message, .. } => message.len(),
        };
        let max = self.limits.max_plugin_payload_bytes;
        if self.effect_bytes + bytes > max {
            return Err(format!("more than {max} bytes of messages in one call"));
        }
        self.effect_bytes += bytes;
        self.effects.push(effect);
        Ok(())
    }
}

fn check_event(event: &str) -> Result<(), String> {
    if event.is_empty() || event.len() > 255 {
        return Err("event names must be 1 to 255 bytes".into());
    }
    if protocol::event::is_reserved(event) {
        return Err(format!("event {event} is reserved"));
    }
    Ok(())
}

impl wit::Host for RoomData {}

impl bindings::cinder::channel::presence::Host for RoomData {
    fn track(&mut self, key: String, meta: String) -> Result<(), String> {
        self.in_channel()?;
        if self.effects.len() >= self.limits.max_messages_per_call {
            return Err(format!(
                "more than {} messages in one call",
                self.limits.max_messages_per_call
            ));
        }
        self.presence
            .track(&self.topic, self.channel, &key, &meta)
            .map_err(|e| e.to_string())?;
        // The tracking channel gets the whole presence once the call returns.
        let state = self.presence.list(&self.topic);
        self.effects.push(Effect::Push {
            event: PRESENCE_STATE.into(),
            payload: state,
        });
        Ok(())
    }

    fn update(&mut self, key: String, meta: String) -> Result<(), String> {
        self.in_channel()?;
        self.presence
            .update(&self.topic, self.channel, &key, &meta)
            .map_err(|e| e.to_string())
    }

    fn untrack(&mut self, key: String) -> Result<(), String> {
        self.in_channel()?;
        self.presence
            .untrack(&self.topic, self.channel, &key)
            .map_err(|e| e.to_string())
    }

    fn list(&mut self, topic: String) -> String {
        self.presence.list_json(&topic)
    }
}

impl bindings::cinder::channel::host::Host for RoomData {
    fn broadcast(&mut self, event: String, payload: wit::Payload) -> Result<(), String> {
        self.effect(|d| {
            check_event(&event)?;
            Ok(Effect::Broadcast {
                event,
                payload: d.payload(payload)?,
                exclude_self: false,
            })
        })
    }

    fn broadcast_from(&mut self, event: String, payload: wit::Payload) -> Result<(), String> {
        self.effect(|d| {
            check_event(&event)?;
            Ok(Effect::Broadcast {
                event,
                payload: d.payload(payload)?,
                exclude_self: true,
            })
        })
    }

    fn push(&mut self, event: String, payload: wit::Payload) -> Result<(), String> {
        self.effect(|d| {
            check_event(&event)?;
            Ok(Effect::Push {
                event,
                payload: d.payload(payload)?,
            })
        })
    }

    fn send_after(&mut self, delay_ms: u32, message: wit::Payload) -> Result<(), String> {
        self.effect(|d| {
            if delay_ms > d.limits.max_timer_delay_ms {
                return Err(format!(
                    "delay over the limit of {} ms",
                    d.limits.max_timer_delay_ms
                ));
            }
            Ok(Effect::SendAfter {
                delay: Duration::from_millis(delay_ms.into()),
                message: d.payload(message)?,
            })
        })
    }

    fn log(&mut self, level: wit::Level, message: String) {
        let mut message = message;
        if message.len() > output::MAX_LINE {
            let mut cut = output::MAX_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let (plugin, topic) = (&*self.plugin, &*self.topic);
        match level {
            wit::Level::Trace => tracing::trace!(target: "plugin", plugin, topic, "{message}"),
            wit::Level::Debug => tracing::debug!(target: "plugin", plugin, topic, "{message}"),
            wit::Level::Info => tracing::info!(target: "plugin", plugin, topic, "{message}"),
            wit::Level::Warn => tracing::warn!(target: "plugin", plugin, topic, "{message}"),
            wit::Level::Error => tracing::error!(target: "plugin", plugin, topic, "{message}"),
        }
    }
}

fn from_wit_payload(p: wit::Payload) -> Result<Payload, protocol::ProtocolError> {
    match p {
        wit::Payload::Json(text) => Payload::json(text),
        wit::Payload::Binary(bytes) => Ok(Payload::Binary(Bytes::from(bytes))),
    }
}

fn to_wit_payload(p: Payload) -> wit::Payload {
    match p {
        Payload::Json(raw) => wit::Payload::Json(String::from(Box::<str>::from(raw))),
        Payload::Binary(bytes) => wit::Payload::Binary(bytes.to_vec()),
    }
}

fn to_wit_socket(s: &ChannelSocket) -> wit::Socket {
    wit::Socket {
        id: s.id.as_deref().map(str::to_owned),
        topic: s.topic.to_string(),
        join_ref: s.join_ref.clone(),
        assigns: s.assigns.clone(),
    }
}

fn status(s: wit::Status) -> Status {
    match s {
        wit::Status::Ok => Status::Ok,
        wit::Status::Error => Status::Error,
    }
}

/// Assigns returned by a plugin must be a JSON object.
fn check_assigns(assigns: Option<String>) -> Result<Option<String>, CallError> {
    match assigns {
        None => Ok(None),
        Some(text) if text.len() > MAX_ASSIGNS_BYTES => Err(CallError::Failed(format!(
            "assigns of {} bytes are over the limit of {MAX_ASSIGNS_BYTES}",
            text.len()
        ))),
        Some(text) => match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(_)) => Ok(Some(text)),
            _ => Err(CallError::Failed("assigns must be a JSON object".into())),
        },
    }
}

fn json_payload(text: String, max: usize) -> Result<Payload, CallError> {
    reply_payload(wit::Payload::Json(text), max)
}

/// A reply from a plugin: valid JSON (or bytes) within the payload limit, else the channel
/// crashes.
fn reply_payload(p: wit::Payload, max: usize) -> Result<Payload, CallError> {
    let payload = from_wit_payload(p).map_err(|e| CallError::Failed(e.to_string()))?;
    if payload.len() > max {
        return Err(CallError::Failed(format!(
            "reply of {} bytes is over the limit of {max}",
            payload.len()
        )));
    }
    Ok(payload)
}

struct WasmRoom {
    store: Store<RoomData>,
    handler: HandlerExports,
    state: Option<StateExports>,
    version: Arc<str>,
    call_time: Duration,
    /// Why the instance can no longer be entered, once it trapped.
    dead: Option<String>,
}

impl WasmRoom {
    fn begin(&mut self, socket: &ChannelSocket) -> Result<(), CallError> {
        self.begin_for(socket.channel)
    }

    /// Starts a call about `channel` (`NO_CHANNEL` for snapshot and restore).
    fn begin_for(&mut self, channel: MemberId) -> Result<(), CallError> {
        if let Some(cause) = &self.dead {
            return Err(CallError::Crashed(cause.clone()));
        }
        let data = self.store.data_mut();
        data.effects.clear();
        data.effect_bytes = 0;
        data.channel = channel;
        arm(&mut self.store, self.call_time);
        Ok(())
    }

    /// Turns a call's result into outcome + effects; a trap kills the instance.
    fn finish<T>(
        &mut self,
        result: wasmtime::Result<Result<T, String>>,
    ) -> Result<(T, Vec<Effect>), CallError> {
        let effects = std::mem::take(&mut self.store.data_mut().effects);
        match result {
            Ok(Ok(value)) => Ok((value, effects)),
            Ok(Err(message)) => Err(CallError::Failed(message)),
            Err(trap) => {
                let cause = trap_cause(&trap, self.call_time);
                self.dead = Some(cause.clone());
                Err(CallError::Crashed(cause))
            }
        }
    }
}

impl RoomLogic for WasmRoom {
    fn version(&self) -> &str {
        &self.version
    }

    fn snapshot(&mut self) -> BoxFuture<'_, Result<Vec<u8>, CallError>> {
        Box::pin(async move {
            self.begin_for(NO_CHANNEL)?;
            let Some(state) = &self.state else {
                return Ok(Vec::new());
            };
            let r = state.call_snapshot(&mut self.store).await;
            self.finish(r.map(Ok)).map(|(bytes, _)| bytes)
        })
    }

    fn restore<'a>(
        &'a mut self,
        snapshot: Vec<u8>,
        from_version: &'a str,
    ) -> BoxFuture<'a, Result<bool, CallError>> {
        Box::pin(async move {
            self.begin_for(NO_CHANNEL)?;
            let Some(state) = &self.state else {
                return Ok(false);
            };
            let r = state
                .call_restore(&mut self.store, &snapshot, from_version)
                .await;
            self.finish(r).map(|((), _)| true)
        })
    }

    fn join<'a>(
        &'a mut self,
        payload: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<JoinOutcome>> {
        Box::pin(async move {
            self.begin(socket)?;
            let max = self.store.data().limits.max_plugin_payload_bytes;
            let r = self
                .handler
                .call_join(
                    &mut self.store,
                    &socket.topic,
                    &to_wit_payload(payload),
                    &to_wit_socket(socket),
                )
                .await;
            let (outcome, effects) = self.finish(r)?;
            match outcome {
                wit::JoinOutcome::Ok(ok) => Ok(Handled {
                    outcome: JoinOutcome::Ok(match ok.reply {
                        Some(reply) => json_payload(reply, max)?,
                        None => Payload::empty(),
                    }),
                    assigns: check_assigns(ok.assigns)?,
                    effects,
                }),
                wit::JoinOutcome::Error(reply) => Ok(Handled {
                    outcome: JoinOutcome::Refused(json_payload(reply, max)?),
                    assigns: None,
                    effects,
                }),
            }
        })
    }

    fn handle_in<'a>(
        &'a mut self,
        event: &'a str,
        payload: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<InOutcome>> {
        Box::pin(async move {
            self.begin(socket)?;
            let max = self.store.data().limits.max_plugin_payload_bytes;
            let r = self
                .handler
                .call_handle_in(
                    &mut self.store,
                    event,
                    &to_wit_payload(payload),
                    &to_wit_socket(socket),
                )
                .await;
            let (result, effects) = self.finish(r)?;
            let reply = |r: wit::Reply| {
                Ok::<_, CallError>((status(r.status), reply_payload(r.response, max)?))
            };
            let outcome = match result.outcome {
                wit::InOutcome::Noreply => InOutcome::NoReply,
                wit::InOutcome::Reply(r) => {
                    let (s, p) = reply(r)?;
                    InOutcome::Reply(s, p)
                }
                wit::InOutcome::Stop(stop) => {
                    InOutcome::Stop(stop.reason, stop.reply.map(reply).transpose()?)
                }
            };
            Ok(Handled {
                outcome,
                assigns: check_assigns(result.assigns)?,
                effects,
            })
        })
    }

    fn handle_out<'a>(
        &'a mut self,
        event: &'a str,
        payload: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<InfoOutcome>> {
        Box::pin(async move {
            self.begin(socket)?;
            let r = self
                .handler
                .call_handle_out(
                    &mut self.store,
                    event,
                    &to_wit_payload(payload),
                    &to_wit_socket(socket),
                )
                .await;
            let (result, effects) = self.finish(r)?;
            info_result(result, effects)
        })
    }

    fn handle_info<'a>(
        &'a mut self,
        message: Payload,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, CallResult<InfoOutcome>> {
        Box::pin(async move {
            self.begin(socket)?;
            let r = self
                .handler
                .call_handle_info(
                    &mut self.store,
                    &to_wit_payload(message),
                    &to_wit_socket(socket),
                )
                .await;
            let (result, effects) = self.finish(r)?;
            info_result(result, effects)
        })
    }

    fn terminate<'a>(
        &'a mut self,
        reason: &'a str,
        socket: &'a ChannelSocket,
    ) -> BoxFuture<'a, Result<Vec<Effect>, CallError>> {
        Box::pin(async move {
            self.begin(socket)?;
            let r = self
                .handler
                .call_terminate(&mut self.store, reason, &to_wit_socket(socket))
                .await;
            self.finish(r.map(Ok)).map(|((), effects)| effects)
        })
    }
}

fn info_result(result: wit::InfoResult, effects: Vec<Effect>) -> CallResult<InfoOutcome> {
    let outcome = match result.outcome {
        wit::InfoOutcome::Noreply => InfoOutcome::NoReply,
        wit::InfoOutcome::Stop(reason) => InfoOutcome::Stop(reason),
    };
    Ok(Handled {
        outcome,
        assigns: check_assigns(result.assigns)?,
        effects,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(name: &str, topics: &[&str]) -> Manifest {
        Manifest {
            name: name.into(),
            version: "1.0.0".into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            intercept: vec![],
            description: String::new(),
            limits: PluginLimits::default(),
        }
    }

    #[test]
    fn patterns_match_exact_topics_and_prefixes() {
        assert!(pattern_matches("room:*", "room:lobby"));
        assert!(pattern_matches("room:*", "room:"));
        assert!(!pattern_matches("room:*", "rooms"));
        assert!(pattern_matches("lobby", "lobby"));
        assert!(!pattern_matches("lobby", "lobby2"));
    }

    #[test]
    fn manifests_with_bad_patterns_names_or_limits_are_refused() {
        let server = Limits::default();
        assert!(manifest("chat", &["room:*"]).validate(&server).is_ok());
        assert!(manifest("chat", &[]).validate(&server).is_err());
        assert!(manifest("chat", &["*"]).validate(&server).is_err());
        assert!(manifest("chat", &["a*b*"]).validate(&server).is_err());
        assert!(manifest("chat", &["phoenix"]).validate(&server).is_err());
        assert!(manifest("../x", &["room:*"]).validate(&server).is_err());
        let mut m = manifest("chat", &["room:*"]);
        m.intercept = vec!["phx_join".into()];
        assert!(m.validate(&server).is_err());
        let mut m = manifest("chat", &["room:*"]);
        m.limits.memory_bytes = Some(server.plugin_memory_bytes * 2);
        assert!(m.validate(&server).is_err());
        m.limits.memory_bytes = Some(4 << 20);
        m.limits.call_ms = Some(5000);
        assert!(m.validate(&server).is_err());
        m.limits.call_ms = Some(50);
        assert!(m.validate(&server).is_ok());
    }
}
