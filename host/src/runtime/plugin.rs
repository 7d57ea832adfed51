//! A compiled plugin: making a room's instance (and refusing to while quarantined),
//! checking an upload's component against the world, the crash record, and why a call or
//! an instantiation trapped.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::component::{InstancePre, ResourceTable};
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::WasiCtx;

use super::bindings::cinder::channel::types as wit;
use super::bindings::exports::cinder::channel::handler::GuestIndices as HandlerIndices;
use super::bindings::exports::cinder::channel::state::GuestIndices as StateIndices;
use super::clock::{CallClock, Tick};
use super::data::Spent;
use super::data::{InstanceData, arm};
use super::instance::PluginInstance;
use super::manifest::Manifest;
use super::memory::{Limiter, NodeMemory};
use super::output::LogTarget;
use super::ticker::Ticker;
use super::trap::{Cause, trap_cause, trap_kind};
use super::{
    HANDLER_INTERFACE, MAX_CORE_INSTANCES_PER_COMPONENT, MAX_MEMORIES_PER_COMPONENT, NO_CHANNEL,
    STATE_INTERFACE,
};
use crate::channel::{BoxFuture, CallBudget, LogicFactory, RoomLogic, Unavailable};
use crate::config::Limits;
use crate::limit::{SharedBucket, Warnings};
use crate::metrics::PluginMetrics;
use crate::presence::Tracker;
use crate::protocol::reason;
use crate::stats::Stats;

/// A compiled plugin, ready to make room instances.
pub struct Plugin {
    name: Arc<str>,
    version: Arc<str>,
    intercepts: Arc<[String]>,
    /// The manifest's topic patterns: the topics that are this plugin's.
    patterns: Arc<[String]>,
    manifest: Manifest,
    pre: InstancePre<InstanceData>,
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
    metrics: Arc<PluginMetrics>,
}

/// What the engine hands a plugin it linked: the component ready to instantiate, and the
/// indices of its exports.
pub(super) struct Linked {
    pub(super) pre: InstancePre<InstanceData>,
    pub(super) handler: HandlerIndices,
    pub(super) state: Option<StateIndices>,
}

/// The node's parts that every plugin shares.
pub(super) struct Node {
    pub(super) engine: Engine,
    pub(super) limits: Limits,
    pub(super) stats: Arc<Stats>,
    pub(super) presence: Arc<Tracker>,
    pub(super) ticker: Arc<Ticker>,
    pub(super) memory: Arc<NodeMemory>,
}

/// Recent room crashes of a plugin, for quarantine.
#[derive(Default)]
struct CrashRecord {
    recent: VecDeque<Instant>,
    quarantined_until: Option<Instant>,
}

impl Plugin {
    /// A plugin of `manifest`, linked, with the limits the manifest and the node give it.
    pub(super) fn new(manifest: Manifest, linked: Linked, node: &Node) -> Plugin {
        let limits = &node.limits;
        let memory_bytes = manifest
            .limits
            .memory_bytes
            .unwrap_or(limits.plugin_memory_bytes);
        let call_time =
            Duration::from_millis(manifest.limits.call_ms.unwrap_or(limits.plugin_call_ms));
        let metrics = Arc::new(node.stats.metrics.plugin(&manifest.name, &manifest.version));
        Plugin {
            name: manifest.name.as_str().into(),
            version: manifest.version.as_str().into(),
            intercepts: manifest.intercept.clone().into(),
            patterns: manifest.topics.clone().into(),
            manifest,
            pre: linked.pre,
            handler: linked.handler,
            state: linked.state,
            engine: node.engine.clone(),
            limits: limits.clone(),
            memory_bytes,
            call_time,
            instantiate_time: Duration::from_millis(limits.plugin_instantiate_ms),
            crashes: Mutex::default(),
            stats: node.stats.clone(),
            presence: node.presence.clone(),
            ticker: node.ticker.clone(),
            log_limiter: Arc::new(SharedBucket::per_sec(limits.plugin_log_lines_per_sec)),
            warnings: Arc::new(Warnings::new(node.stats.clone())),
            memory: node.memory.clone(),
            metrics,
        }
    }

    /// The version's counters.
    pub fn metrics(&self) -> &Arc<PluginMetrics> {
        &self.metrics
    }

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

    fn new_store(&self, topic: &str) -> Store<InstanceData> {
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
        let data = InstanceData {
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
                Ok((handler, state)) => {
                    self.metrics.instantiated();
                    Ok(Box::new(PluginInstance {
                        store,
                        handler,
                        state,
                        version: self.version.clone(),
                        call_time: self.call_time,
                        dead: None,
                        metrics: self.metrics.clone(),
                        call: None,
                    }) as Box<dyn RoomLogic>)
                }
                Err(e) => {
                    self.metrics.trapped(trap_kind(&e));
                    match trap_cause(&e, self.instantiate_time) {
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
                    }
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
            self.metrics.quarantined();
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
    store: &mut Store<InstanceData>,
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
