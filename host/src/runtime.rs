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
use wasmtime::component::{Component, InstancePre, Linker, ResourceTable};
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, UpdateDeadline,
};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::channel::{
    BoxFuture, CallBudget, CallError, CallResult, ChannelSocket, Effect, Handled, InOutcome,
    InfoOutcome, JoinOutcome, LogicFactory, MemberId, RoomLogic, Unavailable,
};
use crate::config::{Limits, MAX_PLUGIN_CALL_MS};
use crate::limit::{SharedBucket, Warnings};
use crate::presence::{Account, PRESENCE_STATE, PresenceError, Tracker};
use crate::protocol::{self, Payload, Status, reason};
use crate::stats::Stats;
use crate::store::PluginStore;

mod clock;
mod compiler;
mod imports;
mod memory;
mod output;
mod ticker;
use clock::{CallClock, Tick};
use compiler::CompileThread;
use memory::{InstanceMemoryFull, Limiter, NodeMemory, NodeMemoryFull};
use output::LogTarget;
use ticker::Ticker;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "stateful-channel",
        exports: { default: async },
    });
}

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

/// The wasmtime engine with Cinder's configuration, its epoch ticker, the node's plugin
/// memory and the compile thread.
pub struct Runtime {
    engine: Engine,
    limits: Limits,
    stats: Arc<Stats>,
    presence: Arc<Tracker>,
    ticker: Arc<Ticker>,
    memory: Arc<NodeMemory>,
    compiler: CompileThread,
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
        // Compiling runs on one low-priority thread (`compiler`), never on every core.
        config.parallel_compilation(false);
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
            memory: Arc::new(NodeMemory::new(limits.plugin_memory_total_bytes)),
            compiler: CompileThread::start().context("starting the compile thread")?,
        })
    }

    /// Linear memory every instance of the node holds now.
    pub fn plugin_memory(&self) -> usize {
        self.memory.held()
    }

    /// [`Runtime::compile`] on the compile thread: one compile at a time, at a lower
    /// priority than the threads that run rooms, so a large upload does not take their
    /// time.
    pub async fn compile_queued(
        self: &Arc<Self>,
        wasm: Arc<Vec<u8>>,
        sha256: String,
        store: Arc<PluginStore>,
    ) -> anyhow::Result<(Component, bool)> {
        let runtime = self.clone();
        self.compiler
            .run(move || runtime.compile(&wasm, &sha256, &store))
            .await
            .map_err(anyhow::Error::msg)?
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
        imports::add_to_linker(&mut linker).map_err(|e| anyhow::anyhow!("linking host: {e}"))?;
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
            patterns: manifest.topics.clone().into(),
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
            log_limiter: Arc::new(SharedBucket::per_sec(self.limits.plugin_log_lines_per_sec)),
            warnings: Arc::new(Warnings::new(self.stats.clone())),
            memory: self.memory.clone(),
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
        check_name(&self.name)?;
        check_version(&self.version).map_err(|e| anyhow::anyhow!("plugin {}: {e}", self.name))?;
        anyhow::ensure!(
            !self.topics.is_empty(),
            "plugin {} serves no topics",
            self.name
        );
        anyhow::ensure!(
            self.topics.len() <= MAX_LISTED && self.intercept.len() <= MAX_LISTED,
            "plugin {}: at most {MAX_LISTED} topic patterns and {MAX_LISTED} intercepted events",
            self.name
        );
        anyhow::ensure!(
            self.description.len() <= MAX_DESCRIPTION_BYTES,
            "plugin {}: description over {MAX_DESCRIPTION_BYTES} bytes",
            self.name
        );
        for pattern in &self.topics {
            let stem = pattern.strip_suffix('*').unwrap_or(pattern);
            anyhow::ensure!(
                !stem.is_empty()
                    && !stem.contains('*')
                    && pattern.len() <= MAX_PATTERN_BYTES
                    && !pattern.chars().any(char::is_control),
                "plugin {}: topic pattern {:?} must be a topic or a prefix ending in a single *, at most {MAX_PATTERN_BYTES} bytes without control characters",
                self.name,
                truncated(pattern)
            );
            if let Some(reserved) = protocol::RESERVED_TOPICS
                .iter()
                .find(|r| patterns_overlap(pattern, r))
            {
                anyhow::bail!(
                    "plugin {}: topic pattern {pattern:?} covers topics reserved by the server ({reserved}); reserved: {}",
                    self.name,
                    protocol::RESERVED_TOPICS.join(", ")
                );
            }
        }
        for event in &self.intercept {
            check_event(event).map_err(|e| {
                anyhow::anyhow!(
                    "plugin {}: cannot intercept {:?}: {e}",
                    self.name,
                    truncated(event)
                )
            })?;
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

/// Longest plugin name: it names a directory of the store.
pub const MAX_NAME_BYTES: usize = 64;
/// Longest version string: it names a directory of the store.
pub const MAX_VERSION_BYTES: usize = 64;
/// Topic patterns, and intercepted events, one manifest may list.
const MAX_LISTED: usize = 64;
/// Longest topic pattern.
const MAX_PATTERN_BYTES: usize = 1024;
/// Longest description.
const MAX_DESCRIPTION_BYTES: usize = 4096;

/// The start of `text`, for an error message about it.
fn truncated(text: &str) -> String {
    text.chars().take(64).collect()
}

/// Checks a plugin name: 1 to 64 ASCII letters, digits, `-` or `_`. Every name the
/// server takes (a manifest's, an admin request's) passes here before it names a path.
pub fn check_name(name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= MAX_NAME_BYTES
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "plugin name {:?} must be 1 to {MAX_NAME_BYTES} ASCII letters, digits, - or _",
        truncated(name)
    );
    Ok(())
}

/// Checks a version: semver (`1.2.0`, `1.2.0-rc.1+build.5`), at most 64 bytes. Semver's
/// characters (letters, digits, `.`, `-`, `+`, never an empty part) cannot make a path
/// other than one directory name.
pub fn check_version(version: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        version.len() <= MAX_VERSION_BYTES && semver::Version::parse(version).is_ok(),
        "version {:?} is not semver of at most {MAX_VERSION_BYTES} bytes (like 1.2.0)",
        truncated(version)
    );
    Ok(())
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
    /// The manifest's topic patterns: the topics that are this plugin's.
    patterns: Arc<[String]>,
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
    log_limiter: Arc<SharedBucket>,
    warnings: Arc<Warnings>,
    memory: Arc<NodeMemory>,
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

    /// How often the host may warn about this plugin.
    pub fn warnings(&self) -> &Arc<Warnings> {
        &self.warnings
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
                trap_cause(&e, self.instantiate_time).text()
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
            limiter: Limiter::new(
                self.memory.clone(),
                self.memory_bytes,
                MAX_CORE_INSTANCES_PER_COMPONENT as usize,
                MAX_MEMORIES_PER_COMPONENT as usize,
                MAX_MEMORIES_PER_COMPONENT as usize,
            ),
            effects: Vec::new(),
            spent: Spent::default(),
            budget: None,
            clock: CallClock::new(),
            plugin: self.name.clone(),
            patterns: self.patterns.clone(),
            topic,
            limits: self.limits.clone(),
            presence: self.presence.clone(),
            account: None,
            channel: NO_CHANNEL,
            ticker: self.ticker.clone(),
            stats: self.stats.clone(),
            warnings: self.warnings.clone(),
            log_limiter: self.log_limiter.clone(),
            allowed: CallBudget::full(&self.limits, 0),
        };
        let mut store = Store::new(&self.engine, data);
        store.limiter(|d| &mut d.limiter);
        // On every epoch tick (1 ms) of a running call: trap once the call used its CPU
        // time, else keep the ticker ticking and yield to the executor so other rooms and
        // sockets on this worker thread run. tokio's `yield_now` (not a bare self-wake)
        // lets the I/O driver run as well.
        store.epoch_deadline_callback(|mut ctx| {
            let data = ctx.data_mut();
            match data.clock.tick() {
                Tick::Spent => Err(wasmtime::Trap::Interrupt.into()),
                Tick::Left(left) => {
                    // A call descheduled past its wall-clock deadline still runs: the
                    // ticker must go on ticking for it.
                    data.ticker.keep_ticking(Instant::now() + left);
                    let resumed = data.clock.on_resume();
                    Ok(UpdateDeadline::YieldCustom(
                        1,
                        Box::pin(async move {
                            tokio::task::yield_now().await;
                            resumed();
                        }),
                    ))
                }
            }
        });
        store
    }
}

impl LogicFactory for Plugin {
    fn instantiate<'a>(
        &'a self,
        topic: &'a str,
    ) -> BoxFuture<'a, Result<Box<dyn RoomLogic>, Unavailable>> {
        Box::pin(async move {
            if let Some(until) = self.quarantined() {
                let left = until.saturating_duration_since(Instant::now());
                return Err(Unavailable {
                    reason: reason::PLUGIN_UNAVAILABLE,
                    detail: format!(
                        "plugin {} is quarantined for {}s more after repeated crashes",
                        self.name,
                        left.as_secs()
                    ),
                });
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
                Err(e) => match trap_cause(&e, self.instantiate_time) {
                    Cause::Evicted(why) => {
                        Stats::bump(&self.stats.plugin_memory_refused);
                        if self.warnings.allow() {
                            tracing::warn!(plugin = %self.name, %topic, cause = %why, "no instance made: the node's plugin memory is used up");
                        }
                        Err(Unavailable {
                            reason: reason::MEMORY_FULL,
                            detail: why,
                        })
                    }
                    Cause::Crashed(why) => {
                        let detail = format!("instantiation failed: {why}");
                        self.crashed(topic, &detail);
                        Err(Unavailable {
                            reason: reason::PLUGIN_UNAVAILABLE,
                            detail,
                        })
                    }
                },
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

/// Why a call or an instantiation trapped.
enum Cause {
    /// The plugin's own doing (a panic, its time, its memory cap).
    Crashed(String),
    /// The node's: its plugin memory budget is used up.
    Evicted(String),
}

impl Cause {
    fn text(self) -> String {
        match self {
            Cause::Crashed(why) | Cause::Evicted(why) => why,
        }
    }
}

/// Why a call or an instantiation trapped, in words for logs.
fn trap_cause(e: &wasmtime::Error, call_time: Duration) -> Cause {
    if let Some(full) = e.downcast_ref::<NodeMemoryFull>() {
        return Cause::Evicted(full.to_string());
    }
    if let Some(full) = e.downcast_ref::<InstanceMemoryFull>() {
        return Cause::Crashed(full.to_string());
    }
    Cause::Crashed(match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => {
            format!("CPU time limit of {} ms exceeded", call_time.as_millis())
        }
        Some(wasmtime::Trap::StackOverflow) => "wasm stack overflow".into(),
        Some(t) => format!("trap: {t}"),
        None => format!("{e:#}"),
    })
}

// ---------------------------------------------------------------------------------------
// One room's instance
// ---------------------------------------------------------------------------------------

/// Store data of one room instance.
struct RoomData {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: Limiter,
    /// Host calls of the current call.
    effects: Vec<Effect>,
    /// What the current call's host calls used of its limits.
    spent: Spent,
    /// What the room allows the next call (see [`CallBudget`]), until it starts.
    budget: Option<CallBudget>,
    /// What the current call is allowed beside the per-call limits.
    allowed: CallBudget,
    /// The current call's CPU time.
    clock: CallClock,
    plugin: Arc<str>,
    /// The plugin's topic patterns: what `presence.list` may read.
    patterns: Arc<[String]>,
    topic: Arc<str>,
    limits: Limits,
    presence: Arc<Tracker>,
    /// The presence account of the current call's socket.
    account: Option<Arc<Account>>,
    /// The channel the current call is about: owner of the presence it tracks.
    channel: MemberId,
    ticker: Arc<Ticker>,
    stats: Arc<Stats>,
    warnings: Arc<Warnings>,
    log_limiter: Arc<SharedBucket>,
}

/// What one call's host calls used.
#[derive(Default)]
struct Spent {
    /// Pushes, broadcasts, timers and tracks.
    messages: usize,
    /// Their payload bytes.
    bytes: usize,
    broadcasts: usize,
    broadcast_bytes: usize,
    timers: usize,
}

/// What a host call asks for, for the limits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ask {
    Push,
    Broadcast,
    Timer,
    Track,
}

/// Lets guest code in `store` run for `time` of CPU from now: starts its clock, arms the
/// epoch deadline of the next tick and keeps the ticker ticking until at least then.
fn arm(store: &mut Store<RoomData>, time: Duration) {
    let data = store.data_mut();
    let now = Instant::now();
    data.clock.start(time, now);
    data.ticker.keep_ticking(now + time);
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
    /// Starts a call about `channel`.
    fn begin(&mut self, channel: MemberId, account: Option<Arc<Account>>) {
        self.effects.clear();
        self.spent = Spent::default();
        self.allowed = self
            .budget
            .take()
            .unwrap_or_else(|| CallBudget::full(&self.limits, self.limits.max_timers_per_channel));
        self.channel = channel;
        self.account = account;
    }

    /// A host call refused for a limit: counted, warned about (at a bounded rate), and
    /// the plugin gets `why`.
    fn refuse(&self, why: String) -> String {
        Stats::bump(&self.stats.call_refusals);
        if self.warnings.allow() {
            tracing::warn!(plugin = %self.plugin, topic = %self.topic, error = %why, "host call refused");
        }
        why
    }

    /// Checks that a host call asking for `ask` with `bytes` of payload fits the call's
    /// limits; nothing of the payload has been looked at yet.
    fn check(&self, ask: Ask, bytes: usize) -> Result<(), String> {
        if self.channel == NO_CHANNEL {
            return Err("host calls are not available in snapshot and restore".into());
        }
        let limits = &self.limits;
        if self.spent.messages >= limits.max_messages_per_call {
            return Err(self.refuse(format!(
                "more than {} messages in one call",
                limits.max_messages_per_call
            )));
        }
        let max = limits.max_plugin_payload_bytes;
        if self.spent.bytes.saturating_add(bytes) > max {
            return Err(self.refuse(format!("more than {max} bytes of messages in one call")));
        }
        match ask {
            Ask::Broadcast
                if self.spent.broadcasts >= self.allowed.broadcasts
                    || self.spent.broadcast_bytes.saturating_add(bytes)
                        > self.allowed.broadcast_bytes =>
            {
                Err(self.refuse(format!(
                    "this message's broadcasts are used up: at most {} broadcasts and {} bytes, in its call and every handle_out round they cause",
                    limits.max_messages_per_call, max
                )))
            }
            Ask::Timer if self.spent.timers >= self.allowed.timers => {
                Stats::bump(&self.stats.timers_refused);
                if self.warnings.allow() {
                    tracing::warn!(plugin = %self.plugin, topic = %self.topic, "send-after refused: too many pending timers");
                }
                Err(format!(
                    "too many pending timers: {} per channel of the room",
                    limits.max_timers_per_channel
                ))
            }
            _ => Ok(()),
        }
    }

    /// Counts a host call that passed [`RoomData::check`].
    fn commit(&mut self, ask: Ask, bytes: usize) {
        let spent = &mut self.spent;
        spent.messages += 1;
        spent.bytes += bytes;
        match ask {
            Ask::Broadcast => {
                spent.broadcasts += 1;
                spent.broadcast_bytes += bytes;
            }
            Ask::Timer => spent.timers += 1,
            Ask::Push | Ask::Track => {}
        }
    }

    /// Checks a push or a broadcast (`target`) of `event` with `payload`, still in the
    /// plugin's memory: names and sizes first, then the payload is copied and parsed.
    fn accept_send(
        &self,
        target: Target,
        event: &str,
        payload: &imports::Seen<'_>,
    ) -> Result<(String, Payload), String> {
        check_event(event)?;
        let ask = match target {
            Target::Channel => Ask::Push,
            Target::Topic { .. } => Ask::Broadcast,
        };
        self.check(ask, payload.len())?;
        Ok((event.to_owned(), owned_payload(payload)?))
    }

    /// Records an accepted push or broadcast.
    fn send(&mut self, target: Target, event: String, payload: Payload) {
        let ask = match target {
            Target::Channel => Ask::Push,
            Target::Topic { .. } => Ask::Broadcast,
        };
        self.commit(ask, payload.len());
        self.effects.push(match target {
            Target::Channel => Effect::Push { event, payload },
            Target::Topic { exclude_self } => Effect::Broadcast {
                event,
                payload,
                exclude_self,
            },
        });
    }

    /// Checks a `send-after` of `message` in `delay_ms`.
    fn accept_timer(
        &self,
        delay_ms: u32,
        message: &imports::Seen<'_>,
    ) -> Result<(Duration, Payload), String> {
        if delay_ms > self.limits.max_timer_delay_ms {
            return Err(format!(
                "delay over the limit of {} ms",
                self.limits.max_timer_delay_ms
            ));
        }
        self.check(Ask::Timer, message.len())?;
        Ok((
            Duration::from_millis(delay_ms.into()),
            owned_payload(message)?,
        ))
    }

    /// Records an accepted timer.
    fn timer(&mut self, delay: Duration, message: Payload) {
        self.commit(Ask::Timer, message.len());
        self.effects.push(Effect::SendAfter { delay, message });
    }

    /// The `log` import: the line goes to the host's log at the plugin's line rate (shared
    /// with its stdout and stderr). Control characters in it are escaped by the log writer
    /// (crate::logging): no record can be forged.
    fn log(&mut self, level: imports::Level, line: &str) {
        if !self.log_limiter.take() {
            Stats::bump(&self.stats.plugin_log_dropped);
            return;
        }
        let (plugin, topic) = (&*self.plugin, &*self.topic);
        match level {
            imports::Level::Trace => tracing::trace!(target: "plugin", plugin, topic, "{line}"),
            imports::Level::Debug => tracing::debug!(target: "plugin", plugin, topic, "{line}"),
            imports::Level::Info => tracing::info!(target: "plugin", plugin, topic, "{line}"),
            imports::Level::Warn => tracing::warn!(target: "plugin", plugin, topic, "{line}"),
            imports::Level::Error => tracing::error!(target: "plugin", plugin, topic, "{line}"),
        }
    }

    /// A presence refusal, counted when a budget refused it.
    fn presence_error(&self, e: PresenceError) -> String {
        if matches!(
            e,
            PresenceError::SocketBudget(_) | PresenceError::NodeBudget(_)
        ) {
            Stats::bump(&self.stats.presence_refused);
        }
        e.to_string()
    }

    /// `presence.track`: one message of the call; the tracking channel is pushed the
    /// topic's whole presence once the call returns.
    fn track(&mut self, key: &str, meta: &str) -> Result<(), String> {
        self.check(Ask::Track, 0)?;
        let account = self.account.clone().unwrap_or_default();
        self.presence
            .track(&self.topic, self.channel, key, meta, &account)
            .map_err(|e| self.presence_error(e))?;
        self.commit(Ask::Track, 0);
        let state = self.presence.list(&self.topic);
        self.effects.push(Effect::Push {
            event: PRESENCE_STATE.into(),
            payload: state,
        });
        Ok(())
    }

    /// `presence.update`.
    fn update(&mut self, key: &str, meta: &str) -> Result<(), String> {
        self.check(Ask::Track, 0)?;
        self.presence
            .update(&self.topic, self.channel, key, meta)
            .map_err(|e| self.presence_error(e))
    }

    /// `presence.untrack`.
    fn untrack(&mut self, key: &str) -> Result<(), String> {
        self.check(Ask::Track, 0)?;
        self.presence
            .untrack(&self.topic, self.channel, key)
            .map_err(|e| e.to_string())
    }

    /// `presence.list`: the topics of other plugins are theirs, and their presence is not
    /// this plugin's to read (patterns of two plugins never overlap, so this is exact).
    fn list(&mut self, topic: &str) -> String {
        if !self.patterns.iter().any(|p| pattern_matches(p, topic)) {
            self.refuse(format!(
                "presence.list of {:?}: not a topic of this plugin",
                truncated(topic)
            ));
            return "{}".into();
        }
        self.presence.list_json(topic)
    }
}

/// A payload the plugin passed, copied out of its memory: JSON is checked (valid, nested
/// at most [`protocol::MAX_JSON_DEPTH`] levels).
fn owned_payload(p: &imports::Seen<'_>) -> Result<Payload, String> {
    match p {
        imports::Seen::Json(text) => {
            Payload::untrusted_json(text.to_string()).map_err(|e| e.to_string())
        }
        imports::Seen::Binary(bytes) => Ok(Payload::Binary(Bytes::copy_from_slice(bytes))),
    }
}

/// The part of a log line kept: at most [`output::MAX_LINE`] bytes.
fn cut_line(line: &str) -> &str {
    let mut cut = line.len().min(output::MAX_LINE);
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    &line[..cut]
}

/// Where a push or a broadcast goes.
#[derive(Clone, Copy)]
enum Target {
    /// The channel of the call (`push`).
    Channel,
    /// The call's topic (`broadcast`, or `broadcast-from` when `exclude_self`).
    Topic { exclude_self: bool },
}

fn check_event(event: &str) -> Result<(), String> {
    if event.is_empty() || event.len() > 255 {
        return Err("event names must be 1 to 255 bytes".into());
    }
    if protocol::event::is_reserved_for_plugins(event) {
        return Err(format!("event {event} is reserved"));
    }
    Ok(())
}

/// Bytes of a payload as the plugin handed it over, before anything parses it.
fn wit_len(p: &wit::Payload) -> usize {
    match p {
        wit::Payload::Json(text) => text.len(),
        wit::Payload::Binary(bytes) => bytes.len(),
    }
}

/// A payload a plugin handed over: JSON is checked (valid, nested at most
/// [`protocol::MAX_JSON_DEPTH`] levels).
fn from_wit_payload(p: wit::Payload) -> Result<Payload, String> {
    match p {
        wit::Payload::Json(text) => Payload::untrusted_json(text).map_err(|e| e.to_string()),
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
/// crashes. The size is checked first.
fn reply_payload(p: wit::Payload, max: usize) -> Result<Payload, CallError> {
    let len = wit_len(&p);
    if len > max {
        return Err(CallError::Failed(format!(
            "reply of {len} bytes is over the limit of {max}"
        )));
    }
    from_wit_payload(p).map_err(CallError::Failed)
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
        self.begin_for(socket.channel, Some(socket.presence.clone()))
    }

    /// Starts a call about `channel` (`NO_CHANNEL` for snapshot and restore).
    fn begin_for(
        &mut self,
        channel: MemberId,
        account: Option<Arc<Account>>,
    ) -> Result<(), CallError> {
        if let Some(cause) = &self.dead {
            return Err(CallError::Crashed(cause.clone()));
        }
        self.store.data_mut().begin(channel, account);
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
            Err(trap) => match trap_cause(&trap, self.call_time) {
                Cause::Crashed(cause) => {
                    self.dead = Some(cause.clone());
                    Err(CallError::Crashed(cause))
                }
                Cause::Evicted(cause) => {
                    Stats::bump(&self.store.data().stats.plugin_memory_refused);
                    self.dead = Some(cause.clone());
                    Err(CallError::Evicted(cause))
                }
            },
        }
    }
}

impl RoomLogic for WasmRoom {
    fn version(&self) -> &str {
        &self.version
    }

    fn budget(&mut self, budget: CallBudget) {
        self.store.data_mut().budget = Some(budget);
    }

    fn snapshot(&mut self) -> BoxFuture<'_, Result<Vec<u8>, CallError>> {
        Box::pin(async move {
            self.begin_for(NO_CHANNEL, None)?;
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
            self.begin_for(NO_CHANNEL, None)?;
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
        let mut m = manifest("chat", &["room:*"]);
        m.intercept = vec![String::new()];
        assert!(m.validate(&server).is_err());
        m.intercept = vec!["disconnect".into()];
        assert!(m.validate(&server).is_err());
        assert!(
            manifest(&"n".repeat(65), &["room:*"])
                .validate(&server)
                .is_err()
        );
        let mut m = manifest("chat", &["room:*"]);
        m.version = format!("1.0.0+{}", "b".repeat(64));
        assert!(m.validate(&server).is_err());
    }

    #[test]
    fn patterns_covering_reserved_topics_are_refused() {
        let server = Limits::default();
        for pattern in [
            "user_socket:*",
            "user_socket:42",
            "user_*",
            "u*",
            "phoenix",
            "phoeni*",
            "p*",
        ] {
            let err = manifest("x", &[pattern])
                .validate(&server)
                .expect_err(pattern);
            assert!(err.to_string().contains("reserved"), "{pattern}: {err}");
        }
        for pattern in ["users:*", "phoenix:*", "user_socket", "room:user_socket:*"] {
            assert!(
                manifest("x", &[pattern]).validate(&server).is_ok(),
                "{pattern}"
            );
        }
    }
}
