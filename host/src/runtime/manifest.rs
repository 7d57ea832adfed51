//! A plugin's manifest (`<name>.toml`): name, version, topic patterns, intercepted events,
//! limits, and the rules every name, version, pattern and event a plugin gives must follow
//! before it names anything (a path, a topic).

use serde::Deserialize;

use crate::channel::{Placement, SnapshotEvery};
use crate::config::{Limits, MAX_PLUGIN_CALL_MS};
use crate::protocol;

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
    /// Where its rooms run on a cluster: `"owner"` (one instance per room for the
    /// cluster, the default) or `"local"` (one per node with members).
    #[serde(default)]
    pub placement: Placement,
    /// When an owned room saves its state for a takeover: `"message"` (after every
    /// message) or milliseconds (at most this often; 1000 by default).
    #[serde(default)]
    pub snapshot_every: SnapshotEvery,
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

    pub(super) fn validate(&self, server: &Limits) -> anyhow::Result<()> {
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
pub(super) fn truncated(text: &str) -> String {
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

pub(super) fn check_event(event: &str) -> Result<(), String> {
    if event.is_empty() || event.len() > 255 {
        return Err("event names must be 1 to 255 bytes".into());
    }
    if protocol::event::is_reserved_for_plugins(event) {
        return Err(format!("event {event} is reserved"));
    }
    Ok(())
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
            placement: Placement::default(),
            snapshot_every: SnapshotEvery::default(),
        }
    }

    #[test]
    fn placement_and_snapshot_every_are_read_and_checked() {
        let server = Limits::default();
        let head = "name = \"c\"\nversion = \"1.0.0\"\ntopics = [\"c:*\"]\n";
        let m = Manifest::parse(head, &server).expect("defaults");
        assert_eq!(m.placement, Placement::Owner);
        assert_eq!(
            m.snapshot_every,
            SnapshotEvery::Interval(std::time::Duration::from_secs(1))
        );
        let m = Manifest::parse(
            &format!("{head}placement = \"local\"\nsnapshot_every = \"message\"\n"),
            &server,
        )
        .expect("set");
        assert_eq!(m.placement, Placement::Local);
        assert_eq!(m.snapshot_every, SnapshotEvery::Message);
        let m = Manifest::parse(&format!("{head}snapshot_every = 250\n"), &server).expect("ms");
        assert_eq!(
            m.snapshot_every,
            SnapshotEvery::Interval(std::time::Duration::from_millis(250))
        );
        for bad in [
            "placement = \"everywhere\"",
            "snapshot_every = 0",
            "snapshot_every = \"often\"",
            "snapshot_every = 99999999999",
        ] {
            let err = Manifest::parse(&format!("{head}{bad}\n"), &server).expect_err(bad);
            assert!(!err.to_string().contains('/'), "{bad}: {err}");
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
