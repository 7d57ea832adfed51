//! The plugin registry: which plugins exist, which version of each is active, and so which
//! plugin serves a topic (it is the channel module's [`Router`]). It takes new versions
//! (uploads, the plugins dir at start, a watched dir), refuses bad ones with the reason,
//! keeps them in the durable [`PluginStore`], and activates, rolls back and deletes
//! versions; activating moves every live room of the plugin to the new version through the
//! [`Hub`], and reports how each room's swap went.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::channel::{Hub, Route, Router, SwapResult};
use crate::config::Limits;
use crate::runtime::{Manifest, Plugin, Runtime, check_name, check_version, pattern_matches};
use crate::store::{ActiveRecord, PluginStore, Source, sha256_hex};

/// How often a watched dir is looked at.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// Why a change was refused; each kind maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The request or the manifest is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such plugin or version (404).
    #[error("{0}")]
    NotFound(String),
    /// It clashes with what is there: a topic pattern, a stored version, live rooms (409).
    #[error("{0}")]
    Conflict(String),
    /// The component cannot serve: not a component, a missing export, a WIT mismatch, a
    /// trap on start (422).
    #[error("{0}")]
    Invalid(String),
    /// The server failed (500).
    #[error("{0}")]
    Internal(String),
}

/// A store failure: the details (paths included) go to the log, the caller learns only
/// that the store failed.
fn internal(e: anyhow::Error) -> Refusal {
    tracing::error!(error = %format!("{e:#}"), "plugin store failure");
    Refusal::Internal("the plugin store failed; the server log has the details".into())
}

/// A plugin name from a request, checked before it names anything.
fn named(name: &str) -> Result<(), Refusal> {
    check_name(name).map_err(|e| Refusal::BadRequest(e.to_string()))
}

/// A plugin name and version from a request, checked before they name anything.
fn versioned(name: &str, version: &str) -> Result<(), Refusal> {
    named(name)?;
    check_version(version).map_err(|e| Refusal::BadRequest(e.to_string()))
}

/// What an activation did.
#[derive(Debug, Clone, Serialize)]
pub struct Activation {
    /// The plugin.
    pub plugin: String,
    /// The version now active.
    pub version: String,
    /// The version active before, if any.
    pub previous: Option<String>,
    /// Live rooms of the plugin asked to move.
    pub rooms: usize,
    /// Rooms now on `version`.
    pub swapped: usize,
    /// Rooms that stayed on their version, and why.
    pub failed: Vec<FailedSwap>,
    /// Rooms still busy with messages queued before the swap when the activation
    /// answered (after `ROOM_WAIT`): each moves once it reaches the swap.
    pub pending: Vec<String>,
    /// How long the swap paused each moved room, in microseconds.
    pub pause_us: Option<Pauses>,
    /// From the request to the last room's answer, in milliseconds.
    pub took_ms: f64,
}

/// A room that stayed on its version.
#[derive(Debug, Clone, Serialize)]
pub struct FailedSwap {
    /// Its topic.
    pub topic: String,
    /// Why.
    pub error: String,
}

/// Percentiles of the per-room swap pause.
#[derive(Debug, Clone, Serialize)]
pub struct Pauses {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Longest.
    pub max: u64,
}

/// What an upload did.
#[derive(Debug, Clone, Serialize)]
pub struct Uploaded {
    /// The plugin.
    pub plugin: String,
    /// The version stored.
    pub version: String,
    /// SHA-256 of the wasm.
    pub sha256: String,
    /// False when this exact version was already stored (nothing written).
    pub created: bool,
    /// Whether nothing had to be compiled: the artifact cache had it, or the version was
    /// already stored and not loaded.
    pub cached: bool,
    /// The activation, when the upload activated the version.
    pub activation: Option<Activation>,
}

/// One plugin, as `GET /api/plugins` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    /// Name.
    pub name: String,
    /// Active version, if any.
    pub active: Option<String>,
    /// Versions active before, most recent last (what `rollback` goes back to).
    pub history: Vec<String>,
    /// Topic patterns of the active version.
    pub topics: Vec<String>,
    /// Intercepted events of the active version.
    pub intercept: Vec<String>,
    /// Description of the active version.
    pub description: String,
    /// Whether the active version hands room state over on hot reload.
    pub stateful: bool,
    /// Live rooms on this node.
    pub live_rooms: usize,
    /// Every stored version, oldest first (semver order).
    pub versions: Vec<VersionInfo>,
}

/// One stored version.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    /// Version.
    pub version: String,
    /// SHA-256 of the wasm.
    pub sha256: String,
    /// Size of the wasm in bytes.
    pub bytes: u64,
    /// When it was stored (seconds since the Unix epoch).
    pub stored_at: u64,
    /// Where it came from.
    pub source: Source,
}

/// A change made on this node (by the API, the CLI, the plugins dir or the watched dir),
/// for whoever spreads it to the other nodes of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A version of the plugin was stored, or its active version changed (the API, the
    /// CLI, `--watch`): what this node's operator asked for.
    Plugin(String),
    /// The same, from the plugins dir at start: what this node brought, which a cluster
    /// that has a record of the plugin already outranks.
    FromDir(String),
    /// A version was deleted.
    VersionDeleted(String, String),
    /// The plugin was deleted with every version.
    PluginDeleted(String),
}

impl Change {
    /// The plugin changed.
    pub fn plugin(&self) -> &str {
        match self {
            Change::Plugin(p)
            | Change::FromDir(p)
            | Change::VersionDeleted(p, _)
            | Change::PluginDeleted(p) => p,
        }
    }
}

/// One stored version with its bytes, for copying it to another node.
pub struct Exported {
    /// Its version string.
    pub version: String,
    /// Its manifest text.
    pub manifest: String,
    /// SHA-256 of the wasm, hex.
    pub sha256: String,
    /// Where it came from.
    pub source: Source,
}

/// The plugins of this node.
pub struct Registry {
    /// Told of every change made on this node (set once, on a cluster member).
    on_change: std::sync::OnceLock<Box<dyn Fn(Change) + Send + Sync>>,
    runtime: Arc<Runtime>,
    store: Arc<PluginStore>,
    limits: Limits,
    /// The active version of each plugin: what routing reads.
    active: RwLock<BTreeMap<String, Arc<Plugin>>>,
    /// Serialises changes (upload, activate, rollback, delete), which are rare.
    changes: tokio::sync::Mutex<()>,
}

impl Router for Registry {
    /// The plugin whose pattern covers the topic most specifically: an exact pattern, else
    /// the longest prefix.
    fn route(&self, topic: &str) -> Option<Route> {
        let active = self.active.read().unwrap_or_else(|p| p.into_inner());
        let mut best: Option<(&Arc<Plugin>, usize)> = None;
        for plugin in active.values() {
            for pattern in &plugin.manifest().topics {
                if pattern_matches(pattern, topic) {
                    let score = if pattern.ends_with('*') {
                        pattern.len() - 1
                    } else {
                        usize::MAX
                    };
                    if best.is_none_or(|(_, s)| score > s) {
                        best = Some((plugin, score));
                    }
                }
            }
        }
        best.map(|(plugin, _)| route_of(plugin))
    }
}

fn route_of(plugin: &Arc<Plugin>) -> Route {
    Route {
        plugin: plugin.name().clone(),
        version: plugin.version().clone(),
        intercepts: plugin.intercepts().clone(),
        factory: plugin.clone(),
        warnings: plugin.warnings().clone(),
        metrics: plugin.metrics().clone(),
        placement: plugin.manifest().placement,
        snapshot_every: plugin.manifest().snapshot_every,
    }
}

fn pauses(mut pauses: Vec<Duration>) -> Option<Pauses> {
    if pauses.is_empty() {
        return None;
    }
    pauses.sort();
    let at = |q: f64| {
        let i = ((pauses.len() as f64 * q).ceil() as usize).clamp(1, pauses.len()) - 1;
        pauses[i].as_micros() as u64
    };
    Some(Pauses {
        p50: at(0.50),
        p99: at(0.99),
        max: at(1.0),
    })
}

/// Sorts versions by semver (unparsable ones last, by text).
fn semver_key(v: &str) -> (Option<semver::Version>, String) {
    (semver::Version::parse(v).ok(), v.to_owned())
}

impl Registry {
    /// Opens the registry on `store` and loads the active version of every stored plugin
    /// (from the artifact cache when it can). A plugin whose active version cannot be
    /// loaded is logged and left out; the others serve.
    pub async fn open(
        runtime: Arc<Runtime>,
        store: PluginStore,
        limits: Limits,
    ) -> anyhow::Result<Registry> {
        let registry = Registry {
            on_change: std::sync::OnceLock::new(),
            runtime,
            store: Arc::new(store),
            limits,
            active: RwLock::default(),
            changes: tokio::sync::Mutex::new(()),
        };
        for name in registry.store.names()? {
            let Some(record) = registry.store.active(&name)? else {
                continue;
            };
            match registry.load_stored(&name, &record.active).await {
                Ok((plugin, _)) => {
                    tracing::info!(plugin = %name, version = %record.active, topics = ?plugin.manifest().topics, "plugin loaded");
                    registry.set_live(plugin);
                }
                Err(e) => {
                    tracing::error!(plugin = %name, version = %record.active, error = %e, "active version cannot be loaded: plugin not served");
                }
            }
        }
        Ok(registry)
    }

    /// Who is told of the changes made on this node from now on; set once.
    pub fn on_change(&self, tell: Box<dyn Fn(Change) + Send + Sync>) {
        let _ = self.on_change.set(tell);
    }

    fn changed(&self, change: Change) {
        if let Some(tell) = self.on_change.get() {
            tell(change);
        }
    }

    /// The active record of `name` (active version and history), if it has one.
    pub fn active_record(&self, name: &str) -> Result<Option<ActiveRecord>, Refusal> {
        named(name)?;
        self.store.active(name).map_err(internal)
    }

    /// Every stored version of `name`, without bytes.
    pub fn exported(&self, name: &str) -> Result<Vec<Exported>, Refusal> {
        named(name)?;
        Ok(self
            .store
            .versions(name)
            .map_err(internal)?
            .into_iter()
            .map(|v| Exported {
                version: v.version,
                manifest: v.manifest,
                sha256: v.record.sha256,
                source: v.record.source,
            })
            .collect())
    }

    /// The wasm of a stored version.
    pub fn wasm(&self, name: &str, version: &str) -> Result<Vec<u8>, Refusal> {
        versioned(name, version)?;
        let stored = self
            .store
            .version(name, version)
            .map_err(internal)?
            .ok_or_else(|| Refusal::NotFound(format!("plugin {name} has no version {version}")))?;
        self.store.wasm(name, &stored).map_err(internal)
    }

    /// Every stored plugin's name.
    pub fn names(&self) -> Result<Vec<String>, Refusal> {
        self.store.names().map_err(internal)
    }

    /// Stores a version another node has (its manifest must name `name` and `version`,
    /// its bytes must hash to `sha256`), without loading it: it is compiled when it is
    /// activated. Not a change of this node's.
    pub async fn import(
        &self,
        name: &str,
        version: &str,
        manifest: &str,
        wasm: &[u8],
        sha256: &str,
        source: Source,
    ) -> Result<(), Refusal> {
        versioned(name, version)?;
        let parsed = Manifest::parse(manifest, &self.limits)
            .map_err(|e| Refusal::BadRequest(format!("{e:#}")))?;
        if parsed.name != name || parsed.version != version || sha256_hex(wasm) != sha256 {
            return Err(Refusal::BadRequest(format!(
                "plugin {name} {version} from the cluster does not match its record"
            )));
        }
        let _changing = self.changes.lock().await;
        if self
            .store
            .version(name, version)
            .map_err(internal)?
            .is_some()
        {
            return Ok(());
        }
        self.store
            .put(name, version, manifest, wasm, source)
            .map_err(internal)?;
        tracing::info!(plugin = %name, %version, "plugin version taken from the cluster");
        Ok(())
    }

    /// Makes `record` (the cluster's) this node's active record of `name` and moves the
    /// live rooms to its active version, if `still()` says so once no other change is under
    /// way: `None` when it does not (a change made here meanwhile wins: it is on its way to
    /// the cluster). Not a change of this node's.
    pub async fn follow(
        &self,
        hub: &Hub,
        name: &str,
        record: ActiveRecord,
        still: impl FnOnce() -> bool,
    ) -> Result<Option<Activation>, Refusal> {
        versioned(name, &record.active)?;
        let _changing = self.changes.lock().await;
        // Every change of this node's is told (`on_change`) before this lock is released.
        if !still() {
            return Ok(None);
        }
        let (plugin, _) = self.load_stored(name, &record.active).await?;
        self.activate_built(hub, plugin, How::Follow(record))
            .await
            .map(Some)
    }

    /// Deletes what the cluster deleted: a version (never the active one), or the plugin.
    /// Not a change of this node's.
    pub async fn forget(
        &self,
        hub: &Hub,
        name: &str,
        version: Option<&str>,
    ) -> Result<(), Refusal> {
        match version {
            Some(version) => self.remove_version(name, version).await,
            None => self.remove_plugin(hub, name).await,
        }
    }

    fn set_live(&self, plugin: Arc<Plugin>) {
        let mut active = self.active.write().unwrap_or_else(|p| p.into_inner());
        active.insert(plugin.name().to_string(), plugin);
    }

    fn live(&self, name: &str) -> Option<Arc<Plugin>> {
        let active = self.active.read().unwrap_or_else(|p| p.into_inner());
        active.get(name).cloned()
    }

    /// Compiles (or loads from the cache), links and, for a version new to this node,
    /// test-instantiates a component.
    async fn build(
        &self,
        manifest: Manifest,
        wasm: Arc<Vec<u8>>,
        sha256: String,
        check: bool,
    ) -> Result<(Arc<Plugin>, bool), Refusal> {
        let name = manifest.name.clone();
        let (component, cached) = self
            .runtime
            .compile_queued(wasm, sha256, self.store.clone())
            .await
            .map_err(|e| Refusal::Invalid(format!("plugin {name}: {e:#}")))?;
        let plugin = self
            .runtime
            .load(manifest, &component)
            .map_err(|e| Refusal::Invalid(format!("plugin {name}: {e:#}")))?;
        if check {
            plugin
                .check()
                .await
                .map_err(|e| Refusal::Invalid(format!("plugin {name}: {e:#}")))?;
        }
        Ok((Arc::new(plugin), cached))
    }

    async fn load_stored(&self, name: &str, version: &str) -> Result<(Arc<Plugin>, bool), Refusal> {
        let stored = self
            .store
            .version(name, version)
            .map_err(internal)?
            .ok_or_else(|| Refusal::NotFound(format!("plugin {name} has no version {version}")))?;
        let wasm = self.store.wasm(name, &stored).map_err(internal)?;
        let manifest = Manifest::parse(&stored.manifest, &self.limits).map_err(|e| {
            Refusal::Internal(format!("stored manifest of {name} {version}: {e:#}"))
        })?;
        self.build(manifest, Arc::new(wasm), stored.record.sha256, false)
            .await
    }

    /// A topic pattern of `manifest` that another plugin's active version already covers.
    fn clash(&self, manifest: &Manifest) -> Result<(), Refusal> {
        let active = self.active.read().unwrap_or_else(|p| p.into_inner());
        for other in active.values() {
            if other.name().as_ref() == manifest.name {
                continue;
            }
            if let Some((mine, theirs)) = manifest.clash(other.manifest()) {
                return Err(Refusal::Conflict(format!(
                    "plugin {}: topic pattern {mine:?} overlaps {theirs:?} of plugin {}",
                    manifest.name,
                    other.name()
                )));
            }
        }
        Ok(())
    }

    /// Takes a new version from an upload (`Source::Upload`: a stored version with other
    /// bytes is a conflict) or from a plugins dir (`Dir`, `Watch`: such bytes are stored as
    /// `<version>+<sha256 prefix>`, so an edited plugin needs no version bump). Activates
    /// it when `activate` is set.
    pub async fn add(
        &self,
        hub: &Hub,
        manifest_text: &str,
        wasm: Vec<u8>,
        source: Source,
        activate: bool,
    ) -> Result<Uploaded, Refusal> {
        let mut manifest = Manifest::parse(manifest_text, &self.limits)
            .map_err(|e| Refusal::BadRequest(format!("{e:#}")))?;
        let mut manifest_text = manifest_text.to_owned();
        let sha256 = sha256_hex(&wasm);
        let _changing = self.changes.lock().await;
        let name = manifest.name.clone();
        let mut existing = self
            .store
            .version(&name, &manifest.version)
            .map_err(internal)?;
        if let Some(stored) = &existing
            && stored.record.sha256 != sha256
        {
            if source == Source::Upload {
                return Err(Refusal::Conflict(format!(
                    "plugin {name} version {} is already stored with other bytes: versions are immutable, bump the version",
                    manifest.version
                )));
            }
            let version = format!(
                "{}+{}",
                manifest.version.split('+').next().unwrap_or_default(),
                &sha256[..12]
            );
            manifest_text = with_version(&manifest_text, &version)?;
            manifest.version = version;
            existing = self
                .store
                .version(&name, &manifest.version)
                .map_err(internal)?;
        }
        self.clash(&manifest)?;
        let version = manifest.version.clone();
        let created = existing.is_none();
        if !created && !activate {
            // Already stored, nothing to switch: no need to load it (at every start, each
            // file of the plugins dir lands here).
            return Ok(Uploaded {
                plugin: name,
                version,
                sha256,
                created,
                cached: true,
                activation: None,
            });
        }
        let wasm = Arc::new(wasm);
        let (plugin, cached) = self
            .build(manifest, wasm.clone(), sha256.clone(), created)
            .await?;
        if created {
            self.store
                .put(&name, &version, &manifest_text, &wasm, source)
                .map_err(internal)?;
            tracing::info!(plugin = %name, %version, sha256 = %sha256, ?source, "plugin version stored");
        }
        let activation = if activate {
            Some(self.activate_built(hub, plugin, How::Activate).await?)
        } else {
            None
        };
        if created || activation.is_some() {
            self.changed(change_of(source, &name));
        }
        Ok(Uploaded {
            plugin: name,
            version,
            sha256,
            created,
            cached,
            activation,
        })
    }

    /// Makes `version` of `name` the active one and moves its live rooms to it.
    pub async fn activate(
        &self,
        hub: &Hub,
        name: &str,
        version: &str,
    ) -> Result<Activation, Refusal> {
        self.activate_from(hub, name, version, Source::Upload).await
    }

    /// [`Registry::activate`], told as a change of `source`.
    async fn activate_from(
        &self,
        hub: &Hub,
        name: &str,
        version: &str,
        source: Source,
    ) -> Result<Activation, Refusal> {
        versioned(name, version)?;
        let _changing = self.changes.lock().await;
        let (plugin, _) = self.load_stored(name, version).await?;
        let activation = self.activate_built(hub, plugin, How::Activate).await?;
        self.changed(change_of(source, name));
        Ok(activation)
    }

    /// Goes back to `version`, or to the version active before the current one.
    pub async fn rollback(
        &self,
        hub: &Hub,
        name: &str,
        version: Option<&str>,
    ) -> Result<Activation, Refusal> {
        named(name)?;
        if let Some(version) = version {
            versioned(name, version)?;
        }
        let _changing = self.changes.lock().await;
        let record = self
            .store
            .active(name)
            .map_err(internal)?
            .ok_or_else(|| Refusal::NotFound(format!("plugin {name} has no active version")))?;
        let target = match version {
            Some(v) => v.to_owned(),
            None => record.history.last().cloned().ok_or_else(|| {
                Refusal::Conflict(format!(
                    "plugin {name} has no earlier version to roll back to"
                ))
            })?,
        };
        let (plugin, _) = self.load_stored(name, &target).await?;
        let activation = self.activate_built(hub, plugin, How::RollBack).await?;
        self.changed(Change::Plugin(name.to_owned()));
        Ok(activation)
    }

    /// Activates a loaded version: the active pointer is durable before any room moves.
    async fn activate_built(
        &self,
        hub: &Hub,
        plugin: Arc<Plugin>,
        how: How,
    ) -> Result<Activation, Refusal> {
        let started = Instant::now();
        let manifest = plugin.manifest();
        self.clash(manifest)?;
        let name = manifest.name.clone();
        let version = manifest.version.clone();
        let mut record = self
            .store
            .active(&name)
            .map_err(internal)?
            .unwrap_or_default();
        let previous = (!record.active.is_empty()).then(|| record.active.clone());
        match how {
            How::Activate => record.activate(&version),
            How::RollBack => record.roll_back_to(&version),
            How::Follow(theirs) => record = theirs,
        }
        self.store.set_active(&name, &record).map_err(internal)?;
        let route = route_of(&plugin);
        self.set_live(plugin);
        let results = hub.upgrade(&route).await;
        let rooms = results.len();
        let mut moved = Vec::new();
        let mut failed = Vec::new();
        let mut pending = Vec::new();
        for (topic, result) in results {
            match result {
                SwapResult::Moved(pause) => moved.push(pause),
                SwapResult::Stayed(error) => failed.push(FailedSwap {
                    topic: topic.to_string(),
                    error,
                }),
                SwapResult::Pending => pending.push(topic.to_string()),
                SwapResult::Elsewhere => {}
            }
        }
        let activation = Activation {
            plugin: name,
            version,
            previous,
            rooms,
            swapped: moved.len(),
            failed,
            pending,
            pause_us: pauses(moved),
            took_ms: started.elapsed().as_secs_f64() * 1000.0,
        };
        tracing::info!(
            plugin = %activation.plugin,
            version = %activation.version,
            previous = ?activation.previous,
            rooms = activation.rooms,
            swapped = activation.swapped,
            failed = activation.failed.len(),
            pause_us = ?activation.pause_us,
            "plugin version activated"
        );
        Ok(activation)
    }

    /// Deletes a stored version; never the active one.
    pub async fn delete_version(&self, name: &str, version: &str) -> Result<(), Refusal> {
        self.remove_version(name, version).await?;
        self.changed(Change::VersionDeleted(name.to_owned(), version.to_owned()));
        Ok(())
    }

    async fn remove_version(&self, name: &str, version: &str) -> Result<(), Refusal> {
        versioned(name, version)?;
        let _changing = self.changes.lock().await;
        if self
            .store
            .version(name, version)
            .map_err(internal)?
            .is_none()
        {
            return Err(Refusal::NotFound(format!(
                "plugin {name} has no version {version}"
            )));
        }
        let mut record = self.store.active(name).map_err(internal)?;
        if let Some(record) = &mut record {
            if record.active == version {
                return Err(Refusal::Conflict(format!(
                    "version {version} of {name} is active: activate another version first"
                )));
            }
            record.history.retain(|v| v != version);
            self.store.set_active(name, record).map_err(internal)?;
        }
        self.store.delete_version(name, version).map_err(internal)?;
        tracing::info!(plugin = %name, %version, "plugin version deleted");
        Ok(())
    }

    /// Deletes a plugin with every version; refused while it has live rooms.
    pub async fn delete_plugin(&self, hub: &Hub, name: &str) -> Result<(), Refusal> {
        self.remove_plugin(hub, name).await?;
        self.changed(Change::PluginDeleted(name.to_owned()));
        Ok(())
    }

    async fn remove_plugin(&self, hub: &Hub, name: &str) -> Result<(), Refusal> {
        named(name)?;
        let _changing = self.changes.lock().await;
        if !self
            .store
            .names()
            .map_err(internal)?
            .iter()
            .any(|n| n == name)
        {
            return Err(Refusal::NotFound(format!("no plugin {name}")));
        }
        let removed = {
            let mut active = self.active.write().unwrap_or_else(|p| p.into_inner());
            active.remove(name)
        };
        let rooms = hub.live_rooms(name);
        if rooms > 0 {
            if let Some(plugin) = removed {
                self.set_live(plugin);
            }
            return Err(Refusal::Conflict(format!(
                "plugin {name} has {rooms} live rooms: it can be deleted once they are empty"
            )));
        }
        self.store.delete_plugin(name).map_err(internal)?;
        tracing::info!(plugin = %name, "plugin deleted");
        Ok(())
    }

    /// Every stored plugin with its versions.
    pub fn list(&self, hub: &Hub) -> Result<Vec<PluginInfo>, Refusal> {
        let mut plugins = Vec::new();
        for name in self.store.names().map_err(internal)? {
            let record: Option<ActiveRecord> = self.store.active(&name).map_err(internal)?;
            let mut versions: Vec<VersionInfo> = self
                .store
                .versions(&name)
                .map_err(internal)?
                .into_iter()
                .map(|v| VersionInfo {
                    version: v.version,
                    sha256: v.record.sha256,
                    bytes: v.record.bytes,
                    stored_at: v.record.stored_at,
                    source: v.record.source,
                })
                .collect();
            versions.sort_by_key(|v| semver_key(&v.version));
            let live = self.live(&name);
            let m = live.as_ref().map(|p| p.manifest());
            plugins.push(PluginInfo {
                active: record.as_ref().map(|r| r.active.clone()),
                history: record.map(|r| r.history).unwrap_or_default(),
                topics: m.map(|m| m.topics.clone()).unwrap_or_default(),
                intercept: m.map(|m| m.intercept.clone()).unwrap_or_default(),
                description: m.map(|m| m.description.clone()).unwrap_or_default(),
                stateful: live.as_ref().is_some_and(|p| p.stateful()),
                live_rooms: hub.live_rooms(&name),
                name,
                versions,
            });
        }
        Ok(plugins)
    }

    /// Takes every `<name>.wasm` + `<name>.toml` of `dir` at start. A version new to the
    /// store becomes active, as does any version of a plugin with none active; a version
    /// already stored changes nothing (so an upload activated since is kept across
    /// restarts).
    pub async fn add_dir(&self, hub: &Hub, dir: &Path, source: Source) -> anyhow::Result<()> {
        for (wasm_path, manifest_path) in plugin_files(dir)? {
            let (manifest, wasm) = read_pair(&wasm_path, &manifest_path)?;
            self.add_file(hub, &manifest, wasm, source)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", wasm_path.display()))?;
        }
        Ok(())
    }

    async fn add_file(
        &self,
        hub: &Hub,
        manifest: &str,
        wasm: Vec<u8>,
        source: Source,
    ) -> Result<Uploaded, Refusal> {
        let uploaded = self.add(hub, manifest, wasm, source, false).await?;
        let live = self.live(&uploaded.plugin);
        let current = live
            .as_ref()
            .is_some_and(|p| **p.version() == *uploaded.version);
        // At start a known version changes nothing (an activation since is kept); a
        // watched file that changed is what the developer wants live.
        let wanted = uploaded.created || live.is_none() || source == Source::Watch;
        if !current && wanted {
            let activation = self
                .activate_from(hub, &uploaded.plugin, &uploaded.version, source)
                .await?;
            return Ok(Uploaded {
                activation: Some(activation),
                ..uploaded
            });
        }
        Ok(uploaded)
    }

    /// Follows `dir` until the process ends: a plugin whose wasm or manifest changes (and
    /// then holds still for one look) is taken as a new version and activated.
    pub async fn watch(self: Arc<Self>, hub: Arc<Hub>, dir: PathBuf) {
        let mut seen = fingerprints(&dir);
        let mut changed: HashMap<PathBuf, Fingerprint> = HashMap::new();
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            let now = fingerprints(&dir);
            for (wasm_path, print) in &now {
                if seen.get(wasm_path) == Some(print) {
                    changed.remove(wasm_path);
                    continue;
                }
                // Wait until the file holds still for one look (a build writes in steps).
                if changed.insert(wasm_path.clone(), *print) != Some(*print) {
                    continue;
                }
                changed.remove(wasm_path);
                seen.insert(wasm_path.clone(), *print);
                let manifest_path = wasm_path.with_extension("toml");
                let result = match read_pair(wasm_path, &manifest_path) {
                    Ok((manifest, wasm)) => self
                        .add_file(&hub, &manifest, wasm, Source::Watch)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(format!("{e:#}")),
                };
                match result {
                    Ok(up) => match up.activation {
                        Some(a) => {
                            tracing::info!(plugin = %up.plugin, version = %up.version, rooms = a.rooms, swapped = a.swapped, failed = a.failed.len(), "watch: reloaded")
                        }
                        None => {
                            tracing::info!(plugin = %up.plugin, version = %up.version, "watch: unchanged")
                        }
                    },
                    Err(e) => {
                        tracing::error!(path = %wasm_path.display(), error = %e, "watch: plugin refused; the running version stays")
                    }
                }
            }
        }
    }
}

/// The change a version or activation from `source` is.
fn change_of(source: Source, name: &str) -> Change {
    match source {
        Source::Dir => Change::FromDir(name.to_owned()),
        Source::Upload | Source::Watch => Change::Plugin(name.to_owned()),
    }
}

/// How an activation sets the active record.
enum How {
    /// The version becomes active; the one before joins the history.
    Activate,
    /// Back to the version, which leaves the history.
    RollBack,
    /// Exactly the record given (the cluster's).
    Follow(ActiveRecord),
}

/// Replaces the version in a manifest's text.
fn with_version(manifest: &str, version: &str) -> Result<String, Refusal> {
    let mut table: toml::Table =
        toml::from_str(manifest).map_err(|e| Refusal::BadRequest(format!("manifest: {e}")))?;
    table.insert("version".into(), toml::Value::String(version.into()));
    toml::to_string(&table).map_err(|e| Refusal::Internal(e.to_string()))
}

/// `<name>.wasm` files of `dir` with their `<name>.toml`, sorted.
fn plugin_files(dir: &Path) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("reading plugins dir {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
        .collect();
    files.sort();
    Ok(files
        .into_iter()
        .map(|wasm| {
            let manifest = wasm.with_extension("toml");
            (wasm, manifest)
        })
        .collect())
}

fn read_pair(wasm_path: &Path, manifest_path: &Path) -> anyhow::Result<(String, Vec<u8>)> {
    let manifest = std::fs::read_to_string(manifest_path).map_err(|e| {
        anyhow::anyhow!(
            "reading manifest {} for {}: {e}",
            manifest_path.display(),
            wasm_path.display()
        )
    })?;
    let wasm = std::fs::read(wasm_path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", wasm_path.display()))?;
    Ok((manifest, wasm))
}

/// Size and modification time of a plugin's wasm and manifest.
type Fingerprint = [(u64, Option<SystemTime>); 2];

fn fingerprints(dir: &Path) -> HashMap<PathBuf, Fingerprint> {
    let stat = |p: &Path| match std::fs::metadata(p) {
        Ok(m) => (m.len(), m.modified().ok()),
        Err(_) => (0, None),
    };
    plugin_files(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|(wasm, manifest)| {
            let print = [stat(&wasm), stat(&manifest)];
            (wasm, print)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_percentiles() {
        let ms = |n: u64| Duration::from_micros(n);
        let p = pauses((1..=100).map(ms).collect()).expect("some");
        assert_eq!((p.p50, p.p99, p.max), (50, 99, 100));
        assert!(pauses(Vec::new()).is_none());
    }

    #[test]
    fn a_manifest_gets_a_new_version() -> Result<(), Refusal> {
        let text = with_version(
            "name = \"a\"\nversion = \"1.0.0\"\ntopics = [\"a:*\"]\n",
            "1.0.0+abc",
        )?;
        let m: Manifest = toml::from_str(&text).map_err(|e| Refusal::Internal(e.to_string()))?;
        assert_eq!(m.version, "1.0.0+abc");
        assert_eq!(m.topics, vec!["a:*"]);
        Ok(())
    }
}
