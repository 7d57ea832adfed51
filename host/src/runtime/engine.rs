//! The engine: wasmtime configured for Cinder (pooling allocator sized from the limits,
//! epoch interruption, no parallel compilation), the artifact cache key, compiling (on the
//! compile thread, through the cache) and linking a component into a [`Plugin`].

use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;

use anyhow::Context as _;
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::exports::cinder::channel::handler::GuestIndices as HandlerIndices;
use super::bindings::exports::cinder::channel::state::GuestIndices as StateIndices;
use super::compiler::CompileThread;
use super::data::InstanceData;
use super::manifest::Manifest;
use super::memory::NodeMemory;
use super::plugin::{Linked, Node, Plugin};
use super::ticker::Ticker;
use super::{
    HANDLER_INTERFACE, MAX_CORE_INSTANCES_PER_COMPONENT, MAX_MEMORIES_PER_COMPONENT,
    STATE_INTERFACE, imports,
};
use crate::config::Limits;
use crate::presence::Tracker;
use crate::stats::Stats;
use crate::store::PluginStore;

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

/// The wasmtime engine with Cinder's configuration, its epoch ticker, the node's plugin
/// memory and the compile thread.
pub struct Runtime {
    node: Node,
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
            node: Node {
                engine,
                limits: limits.clone(),
                stats,
                presence,
                ticker,
                memory: Arc::new(NodeMemory::new(limits.plugin_memory_total_bytes)),
            },
            compiler: CompileThread::start().context("starting the compile thread")?,
        })
    }

    /// Linear memory every instance of the node holds now.
    pub fn plugin_memory(&self) -> usize {
        self.node.memory.held()
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
        self.node
            .engine
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
            let component = unsafe { Component::deserialize(&self.node.engine, &artifact) };
            match component {
                Ok(component) => {
                    Stats::bump(&self.node.stats.artifact_cache_hits);
                    return Ok((component, true));
                }
                Err(e) => tracing::warn!(error = %e, "cached artifact refused: recompiling"),
            }
        }
        let component = self.compile_uncached(wasm)?;
        Stats::bump(&self.node.stats.artifact_compiles);
        match component.serialize() {
            Ok(artifact) => store.put_artifact(&key, &artifact),
            Err(e) => tracing::warn!(error = %e, "cannot serialize a compiled component"),
        }
        Ok((component, false))
    }

    /// Compiles a component without the cache.
    pub fn compile_uncached(&self, wasm: &[u8]) -> anyhow::Result<Component> {
        Component::new(&self.node.engine, wasm)
            .map_err(|e| anyhow::anyhow!("not a loadable component: {e:#}"))
    }

    /// Links a compiled component against the host; fails with a message naming the
    /// problem when it does not fit the `cinder:channel` world (an import the host does not
    /// offer, a missing export).
    pub fn load(&self, manifest: Manifest, component: &Component) -> anyhow::Result<Plugin> {
        manifest.validate(&self.node.limits)?;
        let mut linker: Linker<InstanceData> = Linker::new(&self.node.engine);
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
        Ok(Plugin::new(
            manifest,
            Linked {
                pre,
                handler,
                state,
            },
            &self.node,
        ))
    }
}
