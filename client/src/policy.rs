//! The effective policy the appliance serves for a backup path (`GetPolicy`), as the backup
//! applies it: excludes (gitignore syntax, matched by the `ignore` crate), `exclude_caches`
//! (directories holding a valid `CACHEDIR.TAG`), `one_file_system`, `max_file_size` and
//! compression.

use std::path::Path;

use coffer_proto::v1;

use crate::error::ClientError;

/// Signature that opens a valid `CACHEDIR.TAG` (<https://bford.info/cachedir/>).
const CACHEDIR_SIGNATURE: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55";

/// One field of the effective policy with the level it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyField {
    pub name: String,
    pub value_json: String,
    pub level: String,
}

/// What a backup takes from the effective policy.
#[derive(Debug, Clone, Default)]
pub struct BackupPolicy {
    pub excludes: Vec<String>,
    pub exclude_caches: bool,
    pub one_file_system: bool,
    pub max_file_size: Option<u64>,
    /// `none`, `zstd:N` or `lz4` (`None`: the client's own choice).
    pub compression: Option<String>,
    /// The fields as served, for `coffer policy show`.
    pub fields: Vec<PolicyField>,
    /// The caller's paths whose policy has a schedule, with it.
    pub scheduled: Vec<(String, String)>,
}

/// The `[Timer]` lines of a systemd timer that fires on every schedule in `schedules`: `daily
/// HH:MM` (UTC) as `OnCalendar=`, an interval (`30m`, `6h`, `1d`) as `OnUnitActiveSec=`.
///
/// # Errors
/// [`ClientError::Protocol`] for a schedule that is neither.
pub fn systemd_timer(schedules: &[String]) -> Result<String, ClientError> {
    let mut out = Vec::new();
    let mut interval = false;
    for s in schedules {
        let t = s.trim();
        if let Some(hm) = t.strip_prefix("daily ") {
            let (h, m) = hm
                .trim()
                .split_once(':')
                .filter(|(h, m)| {
                    h.parse::<u8>().is_ok_and(|h| h < 24)
                        && m.len() == 2
                        && m.parse::<u8>().is_ok_and(|m| m < 60)
                })
                .ok_or_else(|| bad("schedule", format!("{s:?}")))?;
            out.push(format!("OnCalendar=*-*-* {h:0>2}:{m}:00 UTC"));
        } else {
            let unit = t.chars().last().filter(|u| matches!(u, 'm' | 'h' | 'd'));
            let n = unit
                .and_then(|u| t.strip_suffix(u))
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|n| *n > 0);
            match (n, unit) {
                (Some(n), Some(u)) => {
                    out.push(format!(
                        "OnUnitActiveSec={n}{}",
                        if u == 'm' {
                            "min"
                        } else if u == 'h' {
                            "h"
                        } else {
                            "d"
                        }
                    ));
                    interval = true;
                }
                _ => return Err(bad("schedule", format!("{s:?}"))),
            }
        }
    }
    if out.is_empty() {
        return Err(bad("schedule", "no path of this account has a schedule"));
    }
    if interval {
        // An interval counts from the last run; the first one comes shortly after boot.
        out.push("OnBootSec=5min".into());
    }
    out.sort();
    out.dedup();
    Ok(out.join("\n"))
}

fn bad(name: &str, e: impl std::fmt::Display) -> ClientError {
    ClientError::Protocol(format!("policy field {name} from the appliance: {e}"))
}

impl BackupPolicy {
    /// Reads the fields the appliance served.
    ///
    /// # Errors
    /// [`ClientError::Protocol`] for a value that does not decode.
    pub fn from_fields(fields: &[v1::PolicyField]) -> Result<Self, ClientError> {
        let mut p = Self::default();
        for f in fields {
            let v = &f.value_json;
            match f.name.as_str() {
                "excludes" => p.excludes = serde_json::from_str(v).map_err(|e| bad(&f.name, e))?,
                "exclude_caches" => {
                    p.exclude_caches = serde_json::from_str(v).map_err(|e| bad(&f.name, e))?;
                }
                "one_file_system" => {
                    p.one_file_system = serde_json::from_str(v).map_err(|e| bad(&f.name, e))?;
                }
                "max_file_size" => {
                    p.max_file_size = Some(serde_json::from_str(v).map_err(|e| bad(&f.name, e))?);
                }
                "compression" => {
                    p.compression = Some(serde_json::from_str(v).map_err(|e| bad(&f.name, e))?);
                }
                _ => {}
            }
            p.fields.push(PolicyField {
                name: f.name.clone(),
                value_json: f.value_json.clone(),
                level: f.level.clone(),
            });
        }
        Ok(p)
    }

    /// The zstd level and whether every file goes as LZ4, from `compression`; `default` when
    /// the policy does not say.
    ///
    /// # Errors
    /// [`ClientError::Protocol`] for a compression the client does not know.
    pub fn codec(&self, default: Option<i32>) -> Result<(Option<i32>, bool), ClientError> {
        match self.compression.as_deref() {
            None => Ok((default, false)),
            Some("none") => Ok((None, false)),
            Some("lz4") => Ok((Some(1), true)),
            Some(z) => z
                .strip_prefix("zstd:")
                .and_then(|l| l.parse::<i32>().ok())
                .filter(|l| (1..=19).contains(l))
                .map(|l| (Some(l), false))
                .ok_or_else(|| {
                    bad(
                        "compression",
                        format!("{z:?} is not none, lz4 or zstd:1..19"),
                    )
                }),
        }
    }

    /// The walk's filter for a backup of `root`.
    ///
    /// # Errors
    /// [`ClientError::Protocol`] for an exclude line that is not valid gitignore syntax.
    pub fn filter(&self, root: &Path) -> Result<Filter, ClientError> {
        let mut b = ignore::gitignore::GitignoreBuilder::new(root);
        for line in &self.excludes {
            b.add_line(None, line).map_err(|e| bad("excludes", e))?;
        }
        Ok(Filter {
            ignore: b.build().map_err(|e| bad("excludes", e))?,
            exclude_caches: self.exclude_caches,
            one_file_system: self.one_file_system,
            max_file_size: self.max_file_size,
        })
    }
}

/// What the walk leaves out.
#[derive(Debug, Clone)]
pub struct Filter {
    ignore: ignore::gitignore::Gitignore,
    exclude_caches: bool,
    one_file_system: bool,
    max_file_size: Option<u64>,
}

impl Default for Filter {
    fn default() -> Self {
        Self {
            ignore: ignore::gitignore::Gitignore::empty(),
            exclude_caches: false,
            one_file_system: false,
            max_file_size: None,
        }
    }
}

/// Why an entry was left out (reported as a warning, never an error: the snapshot is whole
/// for what the policy keeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    Excluded,
    CacheDir,
    OtherFileSystem,
    TooLarge,
}

impl Filter {
    /// Whether the walk leaves out `path` (under the root; `dev` of the root's file system).
    #[must_use]
    pub fn leaves_out(&self, path: &Path, m: &std::fs::Metadata, root_dev: u64) -> Option<Left> {
        use std::os::unix::fs::MetadataExt;
        let is_dir = m.is_dir();
        if self
            .ignore
            .matched_path_or_any_parents(path, is_dir)
            .is_ignore()
        {
            return Some(Left::Excluded);
        }
        if is_dir {
            if self.one_file_system && m.dev() != root_dev {
                return Some(Left::OtherFileSystem);
            }
            if self.exclude_caches && is_cache_dir(path) {
                return Some(Left::CacheDir);
            }
        } else if m.is_file() && self.max_file_size.is_some_and(|max| m.len() > max) {
            return Some(Left::TooLarge);
        }
        None
    }
}

fn is_cache_dir(dir: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; CACHEDIR_SIGNATURE.len()];
    std::fs::File::open(dir.join("CACHEDIR.TAG"))
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| head == CACHEDIR_SIGNATURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &str, v: &str) -> v1::PolicyField {
        v1::PolicyField {
            name: name.into(),
            value_json: v.into(),
            level: "global".into(),
        }
    }

    #[test]
    fn reads_fields_and_filters_like_gitignore() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("build/x")).unwrap();
        std::fs::create_dir_all(root.join("cache")).unwrap();
        std::fs::write(root.join("cache/CACHEDIR.TAG"), CACHEDIR_SIGNATURE).unwrap();
        std::fs::write(root.join("a.iso"), b"x").unwrap();
        std::fs::write(root.join("big"), vec![0u8; 2000]).unwrap();
        std::fs::write(root.join("keep.txt"), b"x").unwrap();
        let p = BackupPolicy::from_fields(&[
            field("excludes", r#"["*.iso","build/"]"#),
            field("exclude_caches", "true"),
            field("max_file_size", "1000"),
            field("compression", r#""zstd:7""#),
        ])
        .unwrap();
        assert_eq!(p.codec(Some(3)).unwrap(), (Some(7), false));
        let f = p.filter(root).unwrap();
        let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(root).unwrap());
        let check = |rel: &str| {
            let path = root.join(rel);
            f.leaves_out(&path, &std::fs::symlink_metadata(&path).unwrap(), dev)
        };
        assert_eq!(check("a.iso"), Some(Left::Excluded));
        assert_eq!(check("build"), Some(Left::Excluded));
        assert_eq!(check("cache"), Some(Left::CacheDir));
        assert_eq!(check("big"), Some(Left::TooLarge));
        assert_eq!(check("keep.txt"), None);
        assert!(
            BackupPolicy::from_fields(&[field("compression", r#""gzip""#)])
                .unwrap()
                .codec(None)
                .is_err()
        );
        assert_eq!(
            systemd_timer(&["daily 02:30".into(), "6h".into(), "daily 02:30".into()]).unwrap(),
            "OnBootSec=5min\nOnCalendar=*-*-* 02:30:00 UTC\nOnUnitActiveSec=6h"
        );
        assert!(systemd_timer(&["weekly".into()]).is_err() && systemd_timer(&[]).is_err());
        assert!(systemd_timer(&["6é".into()]).is_err() && systemd_timer(&["é".into()]).is_err());
        assert_eq!(
            BackupPolicy::from_fields(&[field("compression", r#""lz4""#)])
                .unwrap()
                .codec(None)
                .unwrap(),
            (Some(1), true)
        );
    }
}
