//! The last snapshot this machine committed of each path (S8, C9): an appliance restored from an
//! older copy, or rolled back, shows a history that ends before it; the next backup of that path
//! warns instead of carrying on silently.
//!
//! Kept in `$XDG_STATE_HOME/coffer/seen-<repository>-<identity>.json` (else
//! `~/.local/state/coffer/`): a JSON object from path to `{ "id": hex, "time_us": n }`, written
//! whole to a temporary file and renamed. A missing or unreadable file is an empty record (the
//! check is a warning, never a reason to refuse a backup).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use coffer_proto::v1;

/// One path's last snapshot as this machine knows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeenSnapshot {
    pub id: String,
    pub time_us: i64,
}

/// The record of last snapshots, per path.
#[derive(Debug, Default)]
pub struct Seen {
    file: Option<PathBuf>,
    paths: BTreeMap<String, SeenSnapshot>,
}

impl Seen {
    /// The record for `identity` on the repository `repository` (hex), under `dir` (none: kept
    /// in memory only).
    #[must_use]
    pub fn load(dir: Option<&Path>, repository: &str, identity: &str) -> Self {
        let file = dir.map(|d| d.join(format!("seen-{repository}-{identity}.json")));
        let paths = file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self { file, paths }
    }

    /// A warning when the appliance's newest snapshot of `path` (among `listed`, the caller's
    /// own) is older than the last one this machine committed, or when there is none at all.
    #[must_use]
    pub fn check(&self, path: &str, listed: &[v1::Snapshot]) -> Option<String> {
        let last = self.paths.get(path)?;
        let newest = listed
            .iter()
            .filter(|s| s.path == path)
            .max_by_key(|s| s.time_us);
        if newest.is_some_and(|s| s.time_us >= last.time_us) {
            return None;
        }
        let now = newest.map_or_else(
            || "has no snapshot of it".to_string(),
            |s| {
                format!(
                    "'s newest is {} of {}",
                    &hex::encode(&s.id)[..16],
                    coffer_proto::when::format_us(s.time_us)
                )
            },
        );
        Some(format!(
            "the appliance's history of {path} goes back: this machine last committed snapshot \
             {} of {}, and the appliance{now}. The appliance may have been restored from an \
             older copy or rolled back, or the snapshot was deleted; ask its operator (the audit \
             log records deletions)",
            &last.id[..16.min(last.id.len())],
            coffer_proto::when::format_us(last.time_us)
        ))
    }

    /// Records the snapshot just committed of `path`.
    ///
    /// # Errors
    /// Writing the record.
    pub fn record(&mut self, path: &str, id: &str, time_us: i64) -> std::io::Result<()> {
        self.paths.insert(
            path.to_string(),
            SeenSnapshot {
                id: id.to_string(),
                time_us,
            },
        );
        let Some(file) = &self.file else {
            return Ok(());
        };
        if let Some(d) = file.parent() {
            std::fs::create_dir_all(d)?;
        }
        let tmp = file.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.paths)?)?;
        std::fs::rename(&tmp, file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(path: &str, time_us: i64) -> v1::Snapshot {
        v1::Snapshot {
            id: vec![7; 16].into(),
            path: path.into(),
            time_us,
            ..v1::Snapshot::default()
        }
    }

    #[test]
    fn a_history_that_ends_before_what_was_committed_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut seen = Seen::load(Some(dir.path()), "r", "a@b");
        // Nothing recorded: nothing to compare.
        assert!(seen.check("/d", &[]).is_none());
        seen.record("/d", &"ab".repeat(16), 2_000).unwrap();
        let seen = Seen::load(Some(dir.path()), "r", "a@b");
        assert!(seen.check("/d", &[snap("/d", 2_000)]).is_none());
        assert!(seen
            .check("/d", &[snap("/d", 1_000), snap("/d", 3_000)])
            .is_none());
        let w = seen.check("/d", &[snap("/d", 1_000)]).unwrap();
        assert!(w.contains("goes back") && w.contains("abababab"), "{w}");
        let w = seen.check("/d", &[snap("/other", 5_000)]).unwrap();
        assert!(w.contains("has no snapshot"), "{w}");
        // Another repository or identity has its own record.
        assert!(Seen::load(Some(dir.path()), "s", "a@b")
            .check("/d", &[])
            .is_none());
    }
}
