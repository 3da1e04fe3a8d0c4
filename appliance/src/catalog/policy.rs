//! Policies: what the appliance decides for backups, at four levels — global, `@host`,
//! `user@host`, `user@host:/path` — each field inherited from the level above unless set there
//! (Kopia's model). Stored in the catalog under `policy/<target>`; [`resolve`] gives the
//! effective policy of one identity and path with the level each field came from.

use std::collections::BTreeMap;
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
    /// Retention lock (compliance mode), seconds: every snapshot committed under this policy is
    /// locked until its commit time plus this; nobody can delete, forget or unprotect it before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_secs: Option<u64>,
}

/// The effective policy of one identity and path: each field set by the most specific level
/// that sets it (`policy`; unset when no level does) and that level (`from`, by field name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effective {
    pub policy: Policy,
    pub from: BTreeMap<String, PolicyTarget>,
}

impl Effective {
    /// Whether going from `self` to `after` weakens retention: a snapshot `self` would keep
    /// could be forgotten sooner, or the lock is shorter. No `keep_*` rule at all keeps
    /// everything; with rules, a rule removed or lowered weakens.
    #[must_use]
    pub fn weakened_by(&self, after: &Self) -> Option<String> {
        let (b, a) = (self.retention(), after.retention());
        if b.is_empty() && !a.is_empty() {
            return Some("retention rules where none kept everything".into());
        }
        // No rule after keeps everything: never a weakening.
        if !b.is_empty() && !a.is_empty() {
            let fields = [
                ("keep_last", b.keep_last, a.keep_last),
                ("keep_hourly", b.keep_hourly, a.keep_hourly),
                ("keep_daily", b.keep_daily, a.keep_daily),
                ("keep_weekly", b.keep_weekly, a.keep_weekly),
                ("keep_monthly", b.keep_monthly, a.keep_monthly),
                ("keep_yearly", b.keep_yearly, a.keep_yearly),
            ];
            for (name, before, now) in fields {
                if let Some(x) = before {
                    if now.is_none_or(|y| y < x) {
                        return Some(format!("{name} lowered"));
                    }
                }
            }
            if let Some(x) = b.keep_within_us {
                if a.keep_within_us.is_none_or(|y| y < x) {
                    return Some("keep_within_secs lowered".into());
                }
            }
        }
        if after.policy.lock_secs.unwrap_or(0) < self.policy.lock_secs.unwrap_or(0) {
            return Some("lock shortened".into());
        }
        None
    }

    /// The retention rules in force.
    #[must_use]
    pub fn retention(&self) -> Retention {
        let p = &self.policy;
        Retention {
            keep_last: p.keep_last,
            keep_hourly: p.keep_hourly,
            keep_daily: p.keep_daily,
            keep_weekly: p.keep_weekly,
            keep_monthly: p.keep_monthly,
            keep_yearly: p.keep_yearly,
            keep_within_us: p
                .keep_within_secs
                .map(|s| i64::try_from(s.saturating_mul(1_000_000)).unwrap_or(i64::MAX)),
        }
    }
}

/// The effective policy for `identity` backing up `path`, from the stored `levels` (any order,
/// any targets: those that do not apply are ignored). Fields are merged as the JSON objects
/// they are stored as, so a field added to [`Policy`] is inherited without more code.
#[must_use]
pub fn resolve(levels: &[(PolicyTarget, Policy)], identity: &str, path: &str) -> Effective {
    let mut merged = serde_json::Map::new();
    let mut from = BTreeMap::new();
    for target in PolicyTarget::chain(identity, path) {
        let Some((_, p)) = levels.iter().find(|(t, _)| *t == target) else {
            continue;
        };
        if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(p) {
            for (field, value) in fields {
                // The lock is the exception: the longest at any level binds (a more specific
                // level can add a lock, never escape one set above it).
                if field == LOCK_FIELD
                    && merged.get(LOCK_FIELD).and_then(serde_json::Value::as_u64) > value.as_u64()
                {
                    continue;
                }
                from.insert(field.clone(), target.clone());
                merged.insert(field, value);
            }
        }
    }
    Effective {
        policy: serde_json::from_value(serde_json::Value::Object(merged))
            .expect("the fields of policies make a policy"),
        from,
    }
}

/// The field of [`Policy::lock_secs`].
const LOCK_FIELD: &str = "lock_secs";

#[cfg(test)]
mod tests {
    use super::*;

    fn eff(json: &str) -> Effective {
        Effective {
            policy: serde_json::from_str(json).unwrap(),
            ..Effective::default()
        }
    }

    #[test]
    fn the_longest_lock_of_the_chain_binds() {
        let levels = vec![
            (PolicyTarget::Global, eff(r#"{"lock_secs": 600}"#).policy),
            (
                PolicyTarget::parse("alice@laptop").unwrap(),
                eff(r#"{"lock_secs": 0, "keep_last": 3}"#).policy,
            ),
        ];
        let e = resolve(&levels, "alice@laptop", "/home");
        assert_eq!(e.policy.lock_secs, Some(600));
        assert_eq!(e.from["lock_secs"], PolicyTarget::Global);
        assert_eq!(e.policy.keep_last, Some(3));
    }

    #[test]
    fn weakening_is_any_rule_lowered_or_removed_and_any_shorter_lock() {
        let weakens = |a: &str, b: &str| eff(a).weakened_by(&eff(b));
        // No rule keeps everything: any rule weakens it.
        assert!(weakens("{}", r#"{"keep_last": 100}"#).is_some());
        assert!(weakens(r#"{"compression": "lz4"}"#, r#"{"keep_within_secs": 1}"#).is_some());
        // Lowered or removed rules weaken; raised or added ones do not.
        assert!(weakens(r#"{"keep_daily": 7}"#, r#"{"keep_daily": 6}"#).is_some());
        assert!(weakens(
            r#"{"keep_daily": 7, "keep_last": 2}"#,
            r#"{"keep_last": 2}"#
        )
        .is_some());
        assert!(weakens(r#"{"keep_within_secs": 60}"#, r#"{"keep_within_secs": 59}"#).is_some());
        assert!(weakens(r#"{"keep_daily": 7}"#, r#"{"keep_daily": 8}"#).is_none());
        assert!(weakens(
            r#"{"keep_daily": 7}"#,
            r#"{"keep_daily": 7, "keep_weekly": 1}"#
        )
        .is_none());
        // Going back to no rule at all keeps more, not less.
        assert!(weakens(r#"{"keep_daily": 7}"#, "{}").is_none());
        // The lock: shorter or gone weakens.
        assert!(weakens(r#"{"lock_secs": 60}"#, r#"{"lock_secs": 59}"#).is_some());
        assert!(weakens(r#"{"lock_secs": 60}"#, "{}").is_some());
        assert!(weakens("{}", r#"{"lock_secs": 60}"#).is_none());
        // Other fields never need the step-up.
        assert!(weakens(r#"{"compression": "lz4"}"#, r#"{"compression": "none"}"#).is_none());
    }

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
        let from = |f: &str| e.from.get(f).map(ToString::to_string);
        assert_eq!(e.policy.keep_daily, Some(3));
        assert_eq!(
            from("keep_daily").as_deref(),
            Some("alice@laptop:/home/alice")
        );
        assert_eq!(e.policy.keep_weekly, Some(4));
        assert_eq!(from("keep_weekly").as_deref(), Some("global"));
        assert_eq!((e.policy.keep_last, from("keep_last")), (None, None));
        assert_eq!(e.policy.compression.as_deref(), Some("lz4"));
        assert_eq!(from("compression").as_deref(), Some("@laptop"));
        assert_eq!(e.policy.excludes, Some(vec!["*.iso".to_string()]));
        assert_eq!(e.retention().keep_daily, Some(3));
        // Another path of the same user inherits the global list.
        let other = resolve(&levels, "alice@laptop", "/srv");
        assert_eq!(other.policy.keep_daily, Some(7));
        assert_eq!(other.policy.excludes, Some(vec!["*.tmp".to_string()]));
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_str::<Policy>(r#"{"keep_dialy": 3}"#).is_err());
        let p: Policy = serde_json::from_str(r#"{"keep_daily": 3}"#).unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), r#"{"keep_daily":3}"#);
    }
}
