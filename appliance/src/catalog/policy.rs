//! Policies: what the appliance decides for backups, at four levels — global, `@host`,
//! `user@host`, `user@host:/path` — each field inherited from the level above unless set there
//! (Kopia's model). Stored in the catalog under `policy/<target>`; [`resolve`] gives the
//! effective policy of one identity and path with the level each field came from.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::maintenance::retention::Retention;

/// Where a policy applies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PolicyTarget {
    Global,
    Host(String),
    User {
        user: String,
        host: String,
    },
    Path {
        user: String,
        host: String,
        path: String,
    },
}

/// Why a target could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "policy target {0:?}: expected `global`, `@host`, `user@host` or `user@host:/absolute/path`"
)]
pub struct BadTarget(pub String);

impl PolicyTarget {
    /// Parses `global`, `@host`, `user@host` or `user@host:/path` (names lower-cased like
    /// identities).
    ///
    /// # Errors
    /// [`BadTarget`] for anything else.
    pub fn parse(s: &str) -> Result<Self, BadTarget> {
        let bad = || BadTarget(s.to_string());
        if s == "global" {
            return Ok(Self::Global);
        }
        let (id, path) = match s.split_once(':') {
            Some((id, p)) if p.starts_with('/') => (id, Some(p)),
            Some(_) => return Err(bad()),
            None => (s, None),
        };
        let (user, host) = id.split_once('@').ok_or_else(bad)?;
        let ok = |n: &str| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        };
        if !ok(host) || (!user.is_empty() && !ok(user)) {
            return Err(bad());
        }
        // A path is written as the client records it: absolute, no `.` or `..`, no empty
        // component, no trailing `/` (but `/` itself) — else it would never match a snapshot.
        if let Some(p) = path {
            let clean = p == "/"
                || p[1..]
                    .split('/')
                    .all(|c| !c.is_empty() && c != "." && c != "..");
            if !clean {
                return Err(bad());
            }
        }
        let (user, host) = (user.to_ascii_lowercase(), host.to_ascii_lowercase());
        match (user.is_empty(), path) {
            (true, None) => Ok(Self::Host(host)),
            (true, Some(_)) => Err(bad()),
            (false, None) => Ok(Self::User { user, host }),
            (false, Some(p)) => Ok(Self::Path {
                user,
                host,
                path: p.to_string(),
            }),
        }
    }

    /// The levels that apply to `identity` (`user@host`) backing up `path`, most general first.
    #[must_use]
    pub fn chain(identity: &str, path: &str) -> Vec<Self> {
        let (user, host) = identity.split_once('@').unwrap_or((identity, ""));
        vec![
            Self::Global,
            Self::Host(host.to_string()),
            Self::User {
                user: user.to_string(),
                host: host.to_string(),
            },
            Self::Path {
                user: user.to_string(),
                host: host.to_string(),
                path: path.to_string(),
            },
        ]
    }
}

impl fmt::Display for PolicyTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Global => f.write_str("global"),
            Self::Host(h) => write!(f, "@{h}"),
            Self::User { user, host } => write!(f, "{user}@{host}"),
            Self::Path { user, host, path } => write!(f, "{user}@{host}:{path}"),
        }
    }
}

/// One level's settings; `None` (absent in JSON): inherited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
    /// Seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within_secs: Option<u64>,
    /// `none`, `zstd:N` or `lz4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<String>,
    /// gitignore-syntax lines; a level that sets them replaces the inherited list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excludes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_caches: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_file_system: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_file_size: Option<u64>,
    /// An interval (`6h`) or a calendar expression (`daily 02:30`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
}

/// A field of the effective policy and the level it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced<T> {
    pub value: T,
    pub from: PolicyTarget,
}

/// The effective policy of one identity and path: each field set by the most specific level
/// that sets it, `None` when no level does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effective {
    pub keep_last: Option<Sourced<u32>>,
    pub keep_hourly: Option<Sourced<u32>>,
    pub keep_daily: Option<Sourced<u32>>,
    pub keep_weekly: Option<Sourced<u32>>,
    pub keep_monthly: Option<Sourced<u32>>,
    pub keep_yearly: Option<Sourced<u32>>,
    pub keep_within_secs: Option<Sourced<u64>>,
    pub compression: Option<Sourced<String>>,
    pub excludes: Option<Sourced<Vec<String>>>,
    pub exclude_caches: Option<Sourced<bool>>,
    pub one_file_system: Option<Sourced<bool>>,
    pub max_file_size: Option<Sourced<u64>>,
    pub schedule: Option<Sourced<String>>,
}

impl Effective {
    /// The retention rules in force.
    #[must_use]
    pub fn retention(&self) -> Retention {
        let v = |f: &Option<Sourced<u32>>| f.as_ref().map(|s| s.value);
        Retention {
            keep_last: v(&self.keep_last),
            keep_hourly: v(&self.keep_hourly),
            keep_daily: v(&self.keep_daily),
            keep_weekly: v(&self.keep_weekly),
            keep_monthly: v(&self.keep_monthly),
            keep_yearly: v(&self.keep_yearly),
            keep_within_us: self
                .keep_within_secs
                .as_ref()
                .map(|s| i64::try_from(s.value.saturating_mul(1_000_000)).unwrap_or(i64::MAX)),
        }
    }
}

/// The effective policy for `identity` backing up `path`, from the stored `levels` (any order,
/// any targets: those that do not apply are ignored).
#[must_use]
pub fn resolve(levels: &[(PolicyTarget, Policy)], identity: &str, path: &str) -> Effective {
    let mut e = Effective::default();
    for target in PolicyTarget::chain(identity, path) {
        let Some((_, p)) = levels.iter().find(|(t, _)| *t == target) else {
            continue;
        };
        macro_rules! take {
            ($($field:ident),*) => {$(
                if let Some(value) = p.$field.clone() {
                    e.$field = Some(Sourced {
                        value,
                        from: target.clone(),
                    });
                }
            )*};
        }
        take!(
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            keep_within_secs,
            compression,
            excludes,
            exclude_caches,
            one_file_system,
            max_file_size,
            schedule
        );
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_print_back() {
        for s in ["global", "@db1", "alice@laptop", "alice@laptop:/home/alice"] {
            assert_eq!(PolicyTarget::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(
            PolicyTarget::parse("Alice@Laptop").unwrap().to_string(),
            "alice@laptop"
        );
        for bad in [
            "",
            "alice",
            "@",
            "a@b:rel",
            "@h:/p",
            "a b@h",
            "a@h/x",
            "a@h:/x/",
            "a@h://x",
            "a@h:/x/../y",
            "a@h:/./x",
        ] {
            assert!(PolicyTarget::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn each_field_comes_from_the_most_specific_level_that_sets_it() {
        let t = |s| PolicyTarget::parse(s).unwrap();
        let levels = vec![
            (
                t("alice@laptop:/home/alice"),
                Policy {
                    keep_daily: Some(3),
                    excludes: Some(vec!["*.iso".into()]),
                    ..Policy::default()
                },
            ),
            (
                t("global"),
                Policy {
                    keep_daily: Some(7),
                    keep_weekly: Some(4),
                    compression: Some("zstd:3".into()),
                    excludes: Some(vec!["*.tmp".into()]),
                    ..Policy::default()
                },
            ),
            (
                t("@laptop"),
                Policy {
                    compression: Some("lz4".into()),
                    ..Policy::default()
                },
            ),
            // Another user's level does not apply.
            (
                t("bob@laptop"),
                Policy {
                    keep_last: Some(1),
                    ..Policy::default()
                },
            ),
        ];
        let e = resolve(&levels, "alice@laptop", "/home/alice");
        let from = |s: &Option<Sourced<u32>>| s.as_ref().map(|x| (x.value, x.from.to_string()));
        assert_eq!(
            from(&e.keep_daily),
            Some((3, "alice@laptop:/home/alice".into()))
        );
        assert_eq!(from(&e.keep_weekly), Some((4, "global".into())));
        assert_eq!(e.keep_last, None);
        let c = e.compression.as_ref().unwrap();
        assert_eq!(
            (c.value.as_str(), c.from.to_string()),
            ("lz4", "@laptop".into())
        );
        assert_eq!(
            e.excludes.as_ref().unwrap().value,
            vec!["*.iso".to_string()]
        );
        assert_eq!(e.retention().keep_daily, Some(3));
        // Another path of the same user inherits the global list.
        let other = resolve(&levels, "alice@laptop", "/srv");
        assert_eq!(other.keep_daily.unwrap().value, 7);
        assert_eq!(other.excludes.unwrap().value, vec!["*.tmp".to_string()]);
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_str::<Policy>(r#"{"keep_dialy": 3}"#).is_err());
        let p: Policy = serde_json::from_str(r#"{"keep_daily": 3}"#).unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), r#"{"keep_daily":3}"#);
    }
}
