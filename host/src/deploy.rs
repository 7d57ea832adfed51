//! Plugin versions on a cluster: every version stored on any node is also kept in Redis,
//! content-addressed (`cinder:blob:<sha256>`, with its manifest in `cinder:plugin:<name>`),
//! beside the cluster's active record of each plugin (active version, history, and a
//! generation that grows with every change). A node that changes a plugin (the API, the
//! CLI, the plugins dir, `--watch`) writes the record and announces the plugin on
//! `cinder:control`; every node then converges: it takes the versions it lacks into its own
//! store, and makes the cluster's active record its own, compiling through its own artifact
//! cache and moving its own live rooms as a local activation does. Each node reports what
//! it applied (`cinder:applied:<name>`: the version, or why it could not), which the
//! activating node waits for, and its heartbeat record lists the versions it serves.
//!
//! A node converges at start (before its plugins dir, so a node that starts later serves the
//! cluster's active versions, not its dir's), on every announcement, and every
//! [`CONVERGE_EVERY`] (what an announcement missed during an outage). Versions stored on a
//! node while Redis was unreachable are written to Redis once it is back; their activation
//! is the cluster's only where the cluster had none.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::AsyncCommands as _;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::channel::Hub;
use crate::cluster::Link;
use crate::registry::{Change, Refusal, Registry};
use crate::store::{ActiveRecord, Source};

/// The channel changes are announced on.
const CONTROL: &str = "cinder:control";
/// The set of plugin names.
const PLUGINS: &str = "cinder:plugins";
/// How often a node converges without an announcement.
pub const CONVERGE_EVERY: Duration = Duration::from_secs(5);
/// How long an activation waits for the other nodes' reports at most.
pub const REPORT_WAIT: Duration = Duration::from_secs(10);
/// How long a starting node waits for Redis before it serves without the cluster's
/// versions (it converges once Redis answers).
const START_WAIT: Duration = Duration::from_secs(3);

fn plugin_key(name: &str) -> String {
    format!("cinder:plugin:{name}")
}

fn applied_key(name: &str) -> String {
    format!("cinder:applied:{name}")
}

fn blob_key(sha256: &str) -> String {
    format!("cinder:blob:{sha256}")
}

/// The field of a version in a plugin's hash.
fn version_field(version: &str) -> String {
    format!("v:{version}")
}

/// A version's record in Redis (its bytes are the blob of its hash).
#[derive(Serialize, Deserialize)]
struct VersionEntry {
    manifest: String,
    sha256: String,
    source: Source,
}

/// The cluster's active record of a plugin.
#[derive(Serialize, Deserialize)]
struct ActiveEntry {
    generation: u64,
    active: String,
    history: Vec<String>,
}

/// What a node applied of a plugin: the version it serves, and why it could not serve the
/// cluster's, if it could not.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Applied {
    /// The version this node serves.
    pub version: Option<String>,
    /// The cluster's active version this node could not activate, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<Failed>,
}

/// An activation that failed on a node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Failed {
    /// The version it was asked to activate.
    pub version: String,
    /// Why it could not.
    pub error: String,
}

/// An announcement on [`CONTROL`].
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Announcement {
    /// The plugin's versions or active record changed.
    Changed { plugin: String },
    /// A version was deleted.
    VersionDeleted { plugin: String, version: String },
    /// The plugin was deleted.
    PluginDeleted { plugin: String },
}

/// The cluster's side of the registry on one node.
pub struct Deploy {
    link: Arc<Link>,
    registry: Arc<Registry>,
    hub: Arc<Hub>,
    /// Local changes that have not reached Redis yet, in order, each with whether it was
    /// made while Redis answered (and so overrules the cluster's record).
    pending: Mutex<Vec<(Change, bool)>>,
    /// Plugins changed here whose change is not yet written to Redis: converging leaves
    /// them be, so a change made here is never undone by the record it is about to replace.
    unwritten: Arc<Mutex<HashSet<String>>>,
    /// Held by a pass over every plugin: the one at start and the task's do not overlap.
    converging: tokio::sync::Mutex<()>,
}

impl Deploy {
    /// Starts following the cluster until `stopping` turns true: changes made on this node
    /// are written to Redis and announced, announcements are converged on. Call
    /// [`Deploy::converge_all`] before taking the plugins dir.
    pub fn start(
        link: Arc<Link>,
        registry: Arc<Registry>,
        hub: Arc<Hub>,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Arc<Deploy> {
        let deploy = Arc::new(Deploy {
            link: link.clone(),
            registry: registry.clone(),
            hub,
            pending: Mutex::default(),
            unwritten: Arc::default(),
            converging: tokio::sync::Mutex::new(()),
        });
        let (tx, changes) = mpsc::unbounded_channel();
        let up = link.clone();
        let unwritten = deploy.unwritten.clone();
        registry.on_change(Box::new(move |change| {
            unwritten
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(change.plugin().to_owned());
            // A change made while Redis answers was let through the API (or made by
            // `--watch`): it is the cluster's. One from the plugins dir, or made while Redis
            // was away, is only this node's until the cluster has none of its own.
            let now = up.is_up() && !matches!(change, Change::FromDir(_));
            let _ = tx.send((change, now));
        }));
        let announcements = link.tap(CONTROL);
        let ups = link.ups();
        tokio::spawn(deploy.clone().run(changes, announcements, ups, stopping));
        deploy
    }

    /// Whether changes can be made now: Redis answers. While it does not, plugin changes
    /// through the API are refused (503) so that no node's record drifts from the cluster's.
    pub fn writable(&self) -> bool {
        self.link.is_up()
    }

    async fn run(
        self: Arc<Self>,
        mut changes: mpsc::UnboundedReceiver<(Change, bool)>,
        mut announcements: mpsc::UnboundedReceiver<Vec<u8>>,
        mut ups: tokio::sync::watch::Receiver<u64>,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(CONVERGE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Stopping, or the server is gone.
                changed = stopping.changed() => {
                    if changed.is_err() || *stopping.borrow() {
                        return;
                    }
                }
                Some((change, now)) = changes.recv() => {
                    self.push(change, now).await;
                    self.describe();
                }
                Some(message) = announcements.recv() => {
                    match serde_json::from_slice::<Announcement>(&message) {
                        Ok(Announcement::Changed { plugin }) => self.converge(&plugin).await,
                        Ok(Announcement::VersionDeleted { plugin, version }) => {
                            self.forget(&plugin, Some(&version)).await;
                        }
                        Ok(Announcement::PluginDeleted { plugin }) => self.forget(&plugin, None).await,
                        Err(_) => tracing::warn!("cluster: an announcement that does not parse, ignored"),
                    }
                    self.describe();
                }
                // The link is up again: what was announced meanwhile did not arrive, and
                // what was kept waits for Redis. Both now, not at the next tick.
                Ok(()) = ups.changed() => self.catch_up().await,
                _ = tick.tick() => self.catch_up().await,
                else => return,
            }
        }
    }

    /// Writes what was kept for Redis, then converges on every plugin.
    async fn catch_up(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        for (change, now) in pending {
            self.push(change, now).await;
        }
        self.converge_all().await;
    }

    /// Converges every plugin the cluster has (one pass at a time), and writes to Redis
    /// the plugins this node has that the cluster has no record of (the first node to
    /// start, or a Redis that lost its keys); at start, waits for Redis up to
    /// [`START_WAIT`] first.
    pub async fn converge_all(&self) {
        let _one_pass = self.converging.lock().await;
        let start = tokio::time::Instant::now();
        while !self.link.is_up() && start.elapsed() < START_WAIT {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let Some(mut conn) = self.link.connection() else {
            return;
        };
        let names: Vec<String> = match conn.smembers(PLUGINS).await {
            Ok(names) => names,
            Err(_) => return,
        };
        for name in &names {
            self.converge(name).await;
        }
        for name in self.registry.names().unwrap_or_default() {
            if !names.contains(&name) {
                self.push(Change::FromDir(name), false).await;
            }
        }
        self.describe();
    }

    /// Tells the heartbeat which version of each plugin this node serves: once per event
    /// the task handles (and after each pass over every plugin), not once per plugin.
    fn describe(&self) {
        let mut versions = BTreeMap::new();
        for name in self.registry.names().unwrap_or_default() {
            if let Ok(Some(record)) = self.registry.active_record(&name) {
                versions.insert(name, record.active);
            }
        }
        self.link.describe(versions);
    }

    /// Writes a change made on this node to Redis and announces it; kept for later when
    /// Redis does not answer. A change made `now` (while Redis answered) overrules the
    /// cluster's active record; one made while it was away only fills in a record the
    /// cluster does not have.
    async fn push(&self, change: Change, now: bool) {
        let plugin = change.plugin().to_owned();
        let result = match &change {
            Change::Plugin(plugin) | Change::FromDir(plugin) => self.push_plugin(plugin, now).await,
            Change::VersionDeleted(plugin, version) => {
                self.push_deletion(plugin, Some(version)).await
            }
            Change::PluginDeleted(plugin) => self.push_deletion(plugin, None).await,
        };
        if result.is_ok() {
            self.unwritten
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&plugin);
        }
        if let Err(e) = result {
            tracing::warn!(%plugin, error = %e, "cluster: plugin change not written to Redis yet; trying again");
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            if !pending.contains(&(change.clone(), now)) {
                pending.push((change, now));
            }
        }
    }

    /// Writes the plugin's versions Redis lacks and, when it differs (and `overrule`, or the
    /// cluster has none), its active record.
    async fn push_plugin(&self, name: &str, overrule: bool) -> anyhow::Result<()> {
        let mut conn = self
            .link
            .connection()
            .ok_or_else(|| anyhow::anyhow!("no connection to Redis"))?;
        let key = plugin_key(name);
        let fields: HashMap<String, String> = conn.hgetall(&key).await?;
        for version in self.registry.exported(name)? {
            if fields.contains_key(&version_field(&version.version)) {
                continue;
            }
            let wasm = self.registry.wasm(name, &version.version)?;
            let _: () = redis::cmd("SET")
                .arg(blob_key(&version.sha256))
                .arg(wasm)
                .arg("NX")
                .query_async(&mut conn)
                .await?;
            let entry = serde_json::to_string(&VersionEntry {
                manifest: version.manifest,
                sha256: version.sha256,
                source: version.source,
            })?;
            let _: () = conn
                .hset(&key, version_field(&version.version), entry)
                .await?;
        }
        let _: () = conn.sadd(PLUGINS, name).await?;
        if let Some(record) = self.registry.active_record(name)? {
            let theirs = fields
                .get("active")
                .and_then(|a| serde_json::from_str::<ActiveEntry>(a).ok());
            let same = theirs
                .as_ref()
                .is_some_and(|t| t.active == record.active && t.history == record.history);
            if !same && (overrule || theirs.is_none()) {
                let generation: u64 = conn.hincr(&key, "generation", 1).await?;
                let entry = serde_json::to_string(&ActiveEntry {
                    generation,
                    active: record.active.clone(),
                    history: record.history.clone(),
                })?;
                let _: () = conn.hset(&key, "active", entry).await?;
            }
            if same || overrule || theirs.is_none() {
                self.report(
                    name,
                    &Applied {
                        version: Some(record.active),
                        failed: None,
                    },
                )
                .await;
            }
        }
        self.announce(&Announcement::Changed {
            plugin: name.to_owned(),
        })
        .await
    }

    /// Writes a deletion and announces it.
    async fn push_deletion(&self, name: &str, version: Option<&str>) -> anyhow::Result<()> {
        let mut conn = self
            .link
            .connection()
            .ok_or_else(|| anyhow::anyhow!("no connection to Redis"))?;
        let key = plugin_key(name);
        match version {
            Some(version) => {
                let _: () = conn.hdel(&key, version_field(version)).await?;
                self.announce(&Announcement::VersionDeleted {
                    plugin: name.to_owned(),
                    version: version.to_owned(),
                })
                .await
            }
            None => {
                let _: () = conn.del(&[key, applied_key(name)]).await?;
                let _: () = conn.srem(PLUGINS, name).await?;
                self.announce(&Announcement::PluginDeleted {
                    plugin: name.to_owned(),
                })
                .await
            }
        }
    }

    async fn announce(&self, announcement: &Announcement) -> anyhow::Result<()> {
        let mut conn = self
            .link
            .connection()
            .ok_or_else(|| anyhow::anyhow!("no connection to Redis"))?;
        let _: () = conn
            .publish(CONTROL, serde_json::to_vec(announcement)?)
            .await?;
        Ok(())
    }

    /// Records what this node applied of `name`.
    async fn report(&self, name: &str, applied: &Applied) {
        let Some(mut conn) = self.link.connection() else {
            return;
        };
        if let Ok(text) = serde_json::to_string(applied) {
            let _: redis::RedisResult<()> = conn
                .hset(applied_key(name), &**self.link.node(), text)
                .await;
        }
    }

    /// Takes the cluster's versions of `name` this node lacks and makes the cluster's
    /// active record its own.
    async fn converge(&self, name: &str) {
        let Some(mut conn) = self.link.connection() else {
            return;
        };
        let Ok(fields) = conn
            .hgetall::<_, HashMap<String, String>>(plugin_key(name))
            .await
        else {
            return;
        };
        if fields.is_empty() {
            return;
        }
        let local: BTreeSet<String> = self
            .registry
            .exported(name)
            .unwrap_or_default()
            .into_iter()
            .map(|v| v.version)
            .collect();
        // Why a version could not be taken, for the report if it is the active one.
        let mut refused: HashMap<String, String> = HashMap::new();
        for (field, entry) in &fields {
            let Some(version) = field.strip_prefix("v:") else {
                continue;
            };
            if local.contains(version) {
                continue;
            }
            let Ok(entry) = serde_json::from_str::<VersionEntry>(entry) else {
                continue;
            };
            let wasm: Option<Vec<u8>> = conn.get(blob_key(&entry.sha256)).await.ok().flatten();
            let Some(wasm) = wasm else {
                tracing::warn!(plugin = %name, %version, "cluster: a version's bytes are missing from Redis");
                continue;
            };
            if let Err(e) = self
                .registry
                .import(
                    name,
                    version,
                    &entry.manifest,
                    &wasm,
                    &entry.sha256,
                    entry.source,
                )
                .await
            {
                tracing::warn!(plugin = %name, %version, error = %e, "cluster: version not taken");
                refused.insert(version.to_owned(), e.to_string());
            }
        }
        let Some(theirs) = fields
            .get("active")
            .and_then(|a| serde_json::from_str::<ActiveEntry>(a).ok())
        else {
            return;
        };
        let mine = self.registry.active_record(name).ok().flatten();
        let same = mine
            .as_ref()
            .is_some_and(|m| m.active == theirs.active && m.history == theirs.history);
        let applied = if same {
            Applied {
                version: Some(theirs.active),
                failed: None,
            }
        } else {
            let record = ActiveRecord {
                active: theirs.active.clone(),
                history: theirs.history,
            };
            let still = || {
                !self
                    .unwritten
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(name)
            };
            match self.registry.follow(&self.hub, name, record, still).await {
                // Changed here, not yet written: that change is on its way to Redis.
                Ok(None) => return,
                Ok(Some(activation)) => {
                    tracing::info!(plugin = %name, version = %activation.version, rooms = activation.rooms, swapped = activation.swapped, "cluster: activated the cluster's version");
                    Applied {
                        version: Some(activation.version),
                        failed: None,
                    }
                }
                Err(e) => {
                    let e = refused
                        .remove(&theirs.active)
                        .unwrap_or_else(|| e.to_string());
                    tracing::error!(plugin = %name, version = %theirs.active, error = %e, "cluster: cannot activate the cluster's version; this node stays on its own");
                    Applied {
                        version: mine.map(|m| m.active),
                        failed: Some(Failed {
                            version: theirs.active,
                            error: e,
                        }),
                    }
                }
            }
        };
        self.report(name, &applied).await;
    }

    /// Deletes locally what the cluster deleted.
    async fn forget(&self, name: &str, version: Option<&str>) {
        let known = self.registry.names().unwrap_or_default();
        if !known.iter().any(|n| n == name) {
            return;
        }
        match self.registry.forget(&self.hub, name, version).await {
            Ok(()) => tracing::info!(plugin = %name, ?version, "cluster: deleted here too"),
            Err(Refusal::NotFound(_)) => {}
            Err(e) => {
                tracing::warn!(plugin = %name, ?version, error = %e, "cluster: cannot delete here")
            }
        }
    }

    /// What each member applied of `name`, waiting (at most [`REPORT_WAIT`]) until every
    /// member serves `version` or said why it cannot: node id -> its report (`null` for a
    /// member that did not report in time).
    pub async fn reports(&self, name: &str, version: &str) -> BTreeMap<String, Option<Applied>> {
        let deadline = tokio::time::Instant::now() + REPORT_WAIT;
        loop {
            let members = self.link.members().await;
            let reports: HashMap<String, String> = match self.link.connection() {
                Some(mut conn) => conn.hgetall(applied_key(name)).await.unwrap_or_default(),
                None => HashMap::new(),
            };
            let mut out = BTreeMap::new();
            let mut done = true;
            for member in members {
                let report = reports
                    .get(&member.id)
                    .and_then(|r| serde_json::from_str::<Applied>(r).ok());
                let settled = report.as_ref().is_some_and(|r| {
                    r.version.as_deref() == Some(version)
                        || r.failed.as_ref().is_some_and(|f| f.version == version)
                });
                done &= settled;
                out.insert(member.id, report.filter(|_| settled));
            }
            if done || tokio::time::Instant::now() >= deadline {
                return out;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
