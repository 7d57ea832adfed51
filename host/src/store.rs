//! The durable plugin store in the data dir: every accepted version of every plugin, which
//! version of each is active (with the versions active before it, for rollback), and the
//! compiled-artifact cache.
//!
//! Crash safety: a version is written into a temporary directory, every file and the
//! directory are fsynced, and only then is it renamed into place (and its parent fsynced);
//! the active pointer is written to a temporary file, fsynced and renamed over the old one.
//! A crash at any moment therefore leaves either the old state or the new one; leftover
//! temporary entries are removed when the store is opened. Versions are immutable: a
//! name and version, once stored, always mean the same bytes.
//!
//! Layout under `<data dir>/plugins`:
//!
//! ```text
//! <name>/active.toml                     active = "1.2.0", history = ["1.1.0", ...]
//! <name>/versions/<version>/plugin.wasm  the component as uploaded
//! <name>/versions/<version>/cinder.toml  its manifest as uploaded
//! <name>/versions/<version>/record.toml  sha256, size, when and from where it came
//! ```
//!
//! Artifacts live in the cache dir as `<sha256 of the wasm>-<engine key>.cwasm`, each file
//! starting with the SHA-256 of the rest so a torn or corrupted file is never handed to
//! wasmtime.

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Prefix of temporary entries; never a valid plugin name or version.
const TMP: &str = ".tmp-";
const WASM_FILE: &str = "plugin.wasm";
const MANIFEST_FILE: &str = "cinder.toml";
const RECORD_FILE: &str = "record.toml";
const ACTIVE_FILE: &str = "active.toml";
/// Previously active versions remembered for rollback.
const MAX_HISTORY: usize = 32;

/// The store, rooted in the data dir.
pub struct PluginStore {
    plugins: PathBuf,
    cache: PathBuf,
}

/// Where a version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `POST /api/plugins` (or `cinder plugin push`).
    Upload,
    /// The plugins dir, at start.
    Dir,
    /// `cinder serve --watch`, on a change.
    Watch,
}

/// What the store knows of one version besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    /// SHA-256 of the wasm, hex.
    pub sha256: String,
    /// Size of the wasm in bytes.
    pub bytes: u64,
    /// When it was stored, in seconds since the Unix epoch.
    pub stored_at: u64,
    /// Where it came from.
    pub source: Source,
}

/// Which version of a plugin is active, and which were before it (most recent last).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveRecord {
    /// The active version.
    pub active: String,
    /// Versions active before, oldest first; `rollback` pops the last.
    #[serde(default)]
    pub history: Vec<String>,
}

impl ActiveRecord {
    /// `version` becomes active; the current one joins the history.
    pub fn activate(&mut self, version: &str) {
        if self.active == version {
            return;
        }
        if !self.active.is_empty() {
            let current = std::mem::take(&mut self.active);
            self.history.retain(|v| *v != current && v != version);
            self.history.push(current);
            if self.history.len() > MAX_HISTORY {
                self.history.remove(0);
            }
        }
        self.history.retain(|v| v != version);
        self.active = version.to_owned();
    }

    /// `version` becomes active without the current one joining the history (a rollback).
    pub fn roll_back_to(&mut self, version: &str) {
        self.history.retain(|v| v != version);
        self.active = version.to_owned();
    }
}

/// One stored version, read back.
pub struct StoredVersion {
    /// The version string.
    pub version: String,
    /// Its record.
    pub record: VersionRecord,
    /// Its manifest text.
    pub manifest: String,
}

/// SHA-256 of `bytes`, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes `bytes` to `path` and fsyncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Fsyncs a directory, so a rename or a new entry in it is durable.
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

/// Writes `bytes` to `path` atomically: a temporary sibling, fsync, rename, fsync the dir.
fn replace_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("a file path has a parent")?;
    let name = path.file_name().context("a file path has a name")?;
    let tmp = dir.join(format!(
        "{TMP}{}-{}",
        name.to_string_lossy(),
        rand::random::<u32>()
    ));
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    sync_dir(dir)
}

/// Creates `dir` (and its parents), fsyncing each parent that got a new entry.
fn create_dir_synced(dir: &Path) -> anyhow::Result<()> {
    // The empty path is the parent of a relative path's first component: the current dir.
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_synced(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => sync_dir(Path::new(".")),
    }
}

/// Removes temporary entries a crash left in `dir`.
fn remove_leftovers(dir: &Path) -> anyhow::Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(TMP) {
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing what an interrupted write left");
            let removed = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed.with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// `part` if it is one plain path component (no separator, not `.` or `..`, no NUL, not
/// a temporary entry's name).
fn component(part: &str) -> anyhow::Result<&str> {
    anyhow::ensure!(
        !part.is_empty()
            && part != "."
            && part != ".."
            && !part.starts_with(TMP)
            && !part.contains(['/', '\\', '\0']),
        "{:?} is not a plugin name or version",
        part.chars().take(64).collect::<String>()
    );
    Ok(part)
}

impl PluginStore {
    /// Opens (creating if needed) the store under `data_dir/plugins` with artifacts in
    /// `cache_dir`, and removes what interrupted writes left behind.
    pub fn open(data_dir: &Path, cache_dir: &Path) -> anyhow::Result<PluginStore> {
        let plugins = data_dir.join("plugins");
        create_dir_synced(&plugins)?;
        create_dir_synced(cache_dir)?;
        remove_leftovers(cache_dir)?;
        for entry in fs::read_dir(&plugins)
            .with_context(|| format!("reading {}", plugins.display()))?
            .flatten()
        {
            let path = entry.path();
            remove_leftovers(&path)?;
            remove_leftovers(&path.join("versions"))?;
        }
        remove_leftovers(&plugins)?;
        Ok(PluginStore {
            plugins,
            cache: cache_dir.to_owned(),
        })
    }

    /// The directory of plugin `name`. Names are checked by their callers (the registry,
    /// the manifest); this refuses anything that is not one plain path component anyway,
    /// so no input can reach outside the store.
    fn plugin_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        Ok(self.plugins.join(component(name)?))
    }

    fn version_dir(&self, name: &str, version: &str) -> anyhow::Result<PathBuf> {
        Ok(self
            .plugin_dir(name)?
            .join("versions")
            .join(component(version)?))
    }

    /// Names of stored plugins, sorted.
    pub fn names(&self) -> anyhow::Result<Vec<String>> {
        let mut names: Vec<String> = fs::read_dir(&self.plugins)
            .with_context(|| format!("reading {}", self.plugins.display()))?
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(TMP))
            .collect();
        names.sort();
        Ok(names)
    }

    /// The stored versions of `name`, in no particular order.
    pub fn versions(&self, name: &str) -> anyhow::Result<Vec<StoredVersion>> {
        let dir = self.plugin_dir(name)?.join("versions");
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(Vec::new());
        };
        let mut versions = Vec::new();
        for entry in entries.flatten() {
            let version = entry.file_name().to_string_lossy().into_owned();
            if version.starts_with(TMP) {
                continue;
            }
            match self.version(name, &version) {
                Ok(Some(v)) => versions.push(v),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(plugin = name, %version, error = %format!("{e:#}"), "unreadable stored version skipped");
                }
            }
        }
        Ok(versions)
    }

    /// One stored version's record and manifest, if it exists.
    pub fn version(&self, name: &str, version: &str) -> anyhow::Result<Option<StoredVersion>> {
        let dir = self.version_dir(name, version)?;
        if !dir.is_dir() {
            return Ok(None);
        }
        let record = fs::read_to_string(dir.join(RECORD_FILE))
            .with_context(|| format!("reading the record of {name} {version}"))?;
        let record: VersionRecord = toml::from_str(&record)
            .with_context(|| format!("parsing the record of {name} {version}"))?;
        let manifest = fs::read_to_string(dir.join(MANIFEST_FILE))
            .with_context(|| format!("reading the manifest of {name} {version}"))?;
        Ok(Some(StoredVersion {
            version: version.to_owned(),
            record,
            manifest,
        }))
    }

    /// The wasm of a stored version, checked against its recorded hash.
    pub fn wasm(&self, name: &str, version: &StoredVersion) -> anyhow::Result<Vec<u8>> {
        let path = self.version_dir(name, &version.version)?.join(WASM_FILE);
        let wasm = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        anyhow::ensure!(
            sha256_hex(&wasm) == version.record.sha256,
            "{} does not match its recorded SHA-256",
            path.display()
        );
        Ok(wasm)
    }

    /// Stores a new version durably; fails if the version exists.
    pub fn put(
        &self,
        name: &str,
        version: &str,
        manifest: &str,
        wasm: &[u8],
        source: Source,
    ) -> anyhow::Result<VersionRecord> {
        let versions = self.plugin_dir(name)?.join("versions");
        create_dir_synced(&versions)?;
        let target = versions.join(component(version)?);
        anyhow::ensure!(
            !target.exists(),
            "version {version} of {name} is already stored"
        );
        let record = VersionRecord {
            sha256: sha256_hex(wasm),
            bytes: wasm.len() as u64,
            stored_at: now_secs(),
            source,
        };
        let tmp = versions.join(format!("{TMP}{version}-{}", rand::random::<u32>()));
        fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        write_synced(&tmp.join(WASM_FILE), wasm)?;
        write_synced(&tmp.join(MANIFEST_FILE), manifest.as_bytes())?;
        write_synced(&tmp.join(RECORD_FILE), toml::to_string(&record)?.as_bytes())?;
        sync_dir(&tmp)?;
        fs::rename(&tmp, &target).with_context(|| format!("renaming into {}", target.display()))?;
        sync_dir(&versions)?;
        Ok(record)
    }

    /// The active record of `name`, if it has one.
    pub fn active(&self, name: &str) -> anyhow::Result<Option<ActiveRecord>> {
        let path = self.plugin_dir(name)?.join(ACTIVE_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Replaces the active record of `name` durably.
    pub fn set_active(&self, name: &str, record: &ActiveRecord) -> anyhow::Result<()> {
        replace_file(
            &self.plugin_dir(name)?.join(ACTIVE_FILE),
            toml::to_string(record)?.as_bytes(),
        )
    }

    /// Removes a stored version (never the active one: the caller checks).
    pub fn delete_version(&self, name: &str, version: &str) -> anyhow::Result<()> {
        let dir = self.version_dir(name, version)?;
        let parent = self.plugin_dir(name)?.join("versions");
        let doomed = parent.join(format!("{TMP}deleted-{version}-{}", rand::random::<u32>()));
        fs::rename(&dir, &doomed).with_context(|| format!("removing {}", dir.display()))?;
        sync_dir(&parent)?;
        fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))
    }

    /// Removes a plugin with every version.
    pub fn delete_plugin(&self, name: &str) -> anyhow::Result<()> {
        let dir = self.plugin_dir(name)?;
        let doomed = self
            .plugins
            .join(format!("{TMP}deleted-{name}-{}", rand::random::<u32>()));
        fs::rename(&dir, &doomed).with_context(|| format!("removing {}", dir.display()))?;
        sync_dir(&self.plugins)?;
        fs::remove_dir_all(&doomed).with_context(|| format!("removing {}", doomed.display()))
    }

    fn artifact_path(&self, key: &str) -> PathBuf {
        self.cache.join(format!("{key}.cwasm"))
    }

    /// A cached artifact, if one is stored under `key` and intact.
    pub fn artifact(&self, key: &str) -> Option<Vec<u8>> {
        let path = self.artifact_path(key);
        let mut bytes = fs::read(&path).ok()?;
        if bytes.len() < 32 || Sha256::digest(&bytes[32..])[..] != bytes[..32] {
            tracing::warn!(path = %path.display(), "corrupt compiled artifact ignored");
            let _ = fs::remove_file(&path);
            return None;
        }
        bytes.drain(..32);
        Some(bytes)
    }

    /// Caches an artifact under `key`; a failure only costs a later recompile.
    pub fn put_artifact(&self, key: &str, artifact: &[u8]) {
        let mut bytes = Vec::with_capacity(32 + artifact.len());
        bytes.extend_from_slice(&Sha256::digest(artifact));
        bytes.extend_from_slice(artifact);
        if let Err(e) = replace_file(&self.artifact_path(key), &bytes) {
            tracing::warn!(error = %format!("{e:#}"), "cannot cache a compiled artifact");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    fn temp() -> Dir {
        Dir(std::env::temp_dir().join(format!("cinder-store-{}", rand::random::<u64>())))
    }

    #[test]
    fn no_name_or_version_reaches_outside_the_store() -> anyhow::Result<()> {
        let dir = temp();
        let store = PluginStore::open(&dir.0, &dir.0.join("cache"))?;
        for (name, version) in [
            ("..", "1.0.0"),
            ("chat", ".."),
            ("chat", "/tmp/x"),
            ("a/b", "1"),
            ("chat", ".tmp-1"),
        ] {
            assert!(store.version(name, version).is_err(), "{name} {version}");
            assert!(
                store.put(name, version, "", b"x", Source::Upload).is_err(),
                "{name} {version}"
            );
            assert!(
                store.delete_version(name, version).is_err(),
                "{name} {version}"
            );
        }
        assert!(store.delete_plugin("..").is_err());
        assert!(store.active("/etc").is_err());
        Ok(())
    }

    #[test]
    fn versions_and_the_active_pointer_survive_reopening() -> anyhow::Result<()> {
        let dir = temp();
        let store = PluginStore::open(&dir.0, &dir.0.join("cache"))?;
        store.put("chat", "1.0.0", "name = \"chat\"", b"v1", Source::Upload)?;
        store.put("chat", "2.0.0", "name = \"chat\"", b"v2", Source::Upload)?;
        assert!(
            store
                .put("chat", "2.0.0", "", b"other", Source::Upload)
                .is_err()
        );
        let mut active = ActiveRecord::default();
        active.activate("1.0.0");
        active.activate("2.0.0");
        store.set_active("chat", &active)?;
        // What a crash mid-write leaves behind.
        fs::create_dir(dir.0.join("plugins/chat/versions/.tmp-3.0.0-1"))?;
        fs::write(dir.0.join("plugins/chat/.tmp-active.toml-1"), "garbage")?;

        let store = PluginStore::open(&dir.0, &dir.0.join("cache"))?;
        assert_eq!(store.names()?, vec!["chat"]);
        let mut versions: Vec<String> = store
            .versions("chat")?
            .into_iter()
            .map(|v| v.version)
            .collect();
        versions.sort();
        assert_eq!(versions, vec!["1.0.0", "2.0.0"]);
        assert!(!dir.0.join("plugins/chat/versions/.tmp-3.0.0-1").exists());
        let active = store.active("chat")?.expect("active");
        assert_eq!(active.active, "2.0.0");
        assert_eq!(active.history, vec!["1.0.0"]);
        let v2 = store.version("chat", "2.0.0")?.expect("stored");
        assert_eq!(store.wasm("chat", &v2)?, b"v2");
        Ok(())
    }

    #[test]
    fn a_tampered_wasm_or_artifact_is_refused() -> anyhow::Result<()> {
        let dir = temp();
        let store = PluginStore::open(&dir.0, &dir.0.join("cache"))?;
        store.put("chat", "1.0.0", "", b"v1", Source::Upload)?;
        fs::write(dir.0.join("plugins/chat/versions/1.0.0/plugin.wasm"), b"v2")?;
        let v1 = store.version("chat", "1.0.0")?.expect("stored");
        assert!(store.wasm("chat", &v1).is_err());

        store.put_artifact("k", b"compiled");
        assert_eq!(store.artifact("k").as_deref(), Some(&b"compiled"[..]));
        let path = dir.0.join("cache/k.cwasm");
        let mut bytes = fs::read(&path)?;
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, bytes)?;
        assert_eq!(store.artifact("k"), None);
        Ok(())
    }

    #[test]
    fn activation_history_supports_rollback() {
        let mut a = ActiveRecord::default();
        a.activate("1");
        a.activate("2");
        a.activate("3");
        assert_eq!(a.history, vec!["1", "2"]);
        a.activate("1");
        assert_eq!(
            (a.active.as_str(), a.history.clone()),
            ("1", vec!["2".to_string(), "3".into()])
        );
        let previous = a.history.last().cloned().expect("history");
        a.roll_back_to(&previous);
        assert_eq!(
            (a.active.as_str(), a.history.clone()),
            ("3", vec!["2".to_string()])
        );
    }
}
