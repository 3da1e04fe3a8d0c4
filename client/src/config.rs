//! The client configuration written by `coffer connect`: plain data, JSON, mode 0600.
//!
//! Location: `$COFFER_CONFIG` if set, else `$XDG_CONFIG_HOME/coffer/client.json`, else
//! `~/.config/coffer/client.json`. It holds the password so that scheduled backups run unattended;
//! the file is created 0600 and the directory 0700.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ClientError;

/// What `coffer connect` saves.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub url: String,
    pub fingerprint: String,
    pub identity: String,
    pub password: String,
    /// Sealed repositories: the keyring member file (copied beside this file by `connect`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<PathBuf>,
}

/// Where the configuration lives, given the environment values that decide it.
#[must_use]
pub fn default_path(
    coffer_config: Option<PathBuf>,
    xdg: Option<PathBuf>,
    home: Option<PathBuf>,
) -> PathBuf {
    if let Some(p) = coffer_config {
        return p;
    }
    let base = xdg.unwrap_or_else(|| home.unwrap_or_else(|| PathBuf::from(".")).join(".config"));
    base.join("coffer").join("client.json")
}

impl ClientConfig {
    /// Reads the configuration.
    ///
    /// # Errors
    /// [`ClientError::NoConfig`] (telling to run `coffer connect`) when there is none,
    /// [`ClientError::BadConfig`] when it does not parse.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|error| ClientError::NoConfig {
            path: path.to_path_buf(),
            error,
        })?;
        serde_json::from_str(&text).map_err(|e| ClientError::BadConfig {
            path: path.to_path_buf(),
            error: e.to_string(),
        })
    }

    /// Writes the configuration atomically with mode 0600.
    ///
    /// # Errors
    /// [`ClientError::Io`] naming the directory or file that could not be written.
    pub fn save(&self, path: &Path) -> Result<(), ClientError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| ClientError::BadConfig {
            path: path.to_path_buf(),
            error: e.to_string(),
        })?;
        save_private(path, &text)
    }
}

/// Writes `text` to `path` atomically with mode 0600 (its directory 0700, created if missing).
///
/// # Errors
/// [`ClientError::Io`] naming the directory or file that could not be written.
pub fn save_private(path: &Path, text: &str) -> Result<(), ClientError> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ClientError::io("create", dir, e))?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| ClientError::io("create", &tmp, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| ClientError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| ClientError::io("replace", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn path_precedence() {
        assert_eq!(
            default_path(Some("/a".into()), Some("/x".into()), None),
            PathBuf::from("/a")
        );
        assert_eq!(
            default_path(None, Some("/x".into()), None),
            PathBuf::from("/x/coffer/client.json")
        );
        assert_eq!(
            default_path(None, None, Some("/h".into())),
            PathBuf::from("/h/.config/coffer/client.json")
        );
    }

    #[test]
    fn save_is_private_and_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/client.json");
        let c = ClientConfig {
            url: "https://h:1".into(),
            fingerprint: "ab".into(),
            identity: "a@b".into(),
            password: "pw".into(),
            keyring: None,
        };
        c.save(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(ClientConfig::load(&p).unwrap(), c);
        assert!(ClientConfig::load(&d.path().join("none"))
            .unwrap_err()
            .to_string()
            .contains("coffer connect"));
    }
}
