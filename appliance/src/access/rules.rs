//! Access rules: who may do what to which snapshots, policies, users and rules.
//!
//! A rule grants an access level (READ < APPEND < FULL) to the identities matching a user
//! pattern, on the targets whose labels match. Label values may be `OWN_USER` / `OWN_HOST`,
//! resolved against the caller. The access a caller has on a target is the highest level among
//! the rules that apply; with no stored rules, [`default_rules`] apply.
//!
//! * READ: read (list, get, restore).
//! * APPEND: read, and add new things (commit a snapshot, change one's own password), never
//!   delete or overwrite.
//! * FULL: everything, deletion included.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ApplianceError;

/// Access levels, ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Access {
    Read,
    Append,
    Full,
}

impl std::str::FromStr for Access {
    type Err = ApplianceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "READ" => Ok(Self::Read),
            "APPEND" => Ok(Self::Append),
            "FULL" => Ok(Self::Full),
            _ => Err(ApplianceError::InvalidArgument(format!(
                "access {s:?}: expected READ, APPEND or FULL"
            ))),
        }
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Read => "READ",
            Self::Append => "APPEND",
            Self::Full => "FULL",
        })
    }
}

/// What a rule can be about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetType {
    Snapshot,
    Policy,
    User,
    Acl,
}

impl TargetType {
    fn parse(s: &str) -> Result<Self, ApplianceError> {
        match s {
            "snapshot" => Ok(Self::Snapshot),
            "policy" => Ok(Self::Policy),
            "user" => Ok(Self::User),
            "acl" => Ok(Self::Acl),
            _ => Err(ApplianceError::InvalidArgument(format!(
                "target type {s:?}: expected snapshot, policy, user or acl"
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Snapshot => "snapshot",
            Self::Policy => "policy",
            Self::User => "user",
            Self::Acl => "acl",
        }
    }

    /// Labels a target of this type may be matched on.
    fn labels(self) -> &'static [&'static str] {
        match self {
            Self::Snapshot => &["username", "hostname", "path"],
            Self::Policy => &["username", "hostname", "path", "policyType"],
            Self::User => &["username", "hostname"],
            Self::Acl => &[],
        }
    }
}

/// A rule's target: a type and labels that must all match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    #[serde(rename = "type")]
    pub kind: TargetType,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl Target {
    /// Parses `type=snapshot,username=OWN_USER,hostname=laptop,path=/home`.
    ///
    /// # Errors
    /// Unknown types or labels, duplicates, empty values.
    pub fn parse(s: &str) -> Result<Self, ApplianceError> {
        let bad = |why: String| ApplianceError::InvalidArgument(format!("target {s:?}: {why}"));
        let mut kind = None;
        let mut labels = BTreeMap::new();
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not label=value")))?;
            if v.is_empty() || v.chars().any(char::is_control) {
                return Err(bad(format!("empty or invalid value for {k}")));
            }
            if k == "type" {
                if kind.replace(TargetType::parse(v)?).is_some() {
                    return Err(bad("type given twice".into()));
                }
            } else if labels.insert(k.to_string(), v.to_string()).is_some() {
                return Err(bad(format!("label {k} given twice")));
            }
        }
        let kind = kind.ok_or_else(|| bad("missing type=…".into()))?;
        for k in labels.keys() {
            if !kind.labels().contains(&k.as_str()) {
                return Err(bad(format!(
                    "label {k} does not apply to type {}; allowed: {}",
                    kind.name(),
                    kind.labels().join(", ")
                )));
            }
        }
        Ok(Self { kind, labels })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "type={}", self.kind.name())?;
        for (k, v) in &self.labels {
            write!(f, ",{k}={v}")?;
        }
        Ok(())
    }
}

/// One access rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Stable id (16 hex digits) for `acl remove`.
    pub id: String,
    /// `user@host` pattern; either side may be `*`.
    pub user: String,
    pub access: Access,
    pub target: Target,
}

impl Rule {
    /// A new rule with a fresh id.
    ///
    /// # Errors
    /// A malformed user pattern.
    pub fn new(user: &str, access: Access, target: Target) -> Result<Self, ApplianceError> {
        check_pattern(user)?;
        Ok(Self {
            id: hex::encode(rand::random::<[u8; 8]>()),
            user: user.to_ascii_lowercase(),
            access,
            target,
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}  user={}  access={}  target={}",
            self.id, self.user, self.access, self.target
        )
    }
}

/// A user pattern is `user@host` where each side is `*` or follows the identity grammar.
fn check_pattern(p: &str) -> Result<(), ApplianceError> {
    let (u, h) = p.split_once('@').ok_or_else(|| {
        ApplianceError::InvalidArgument(format!("user pattern {p:?}: expected user@host"))
    })?;
    let probe = format!(
        "{}@{}",
        if u == "*" { "x" } else { u },
        if h == "*" { "x" } else { h }
    );
    crate::access::normalise_identity(&probe)
        .map(|_| ())
        .map_err(|e| ApplianceError::InvalidArgument(format!("user pattern {p:?}: {e}")))
}

fn pattern_matches(pattern: &str, user: &str, host: &str) -> bool {
    let Some((pu, ph)) = pattern.split_once('@') else {
        return false;
    };
    (pu == "*" || pu == user) && (ph == "*" || ph == host)
}

/// What the built-in rules give each user on their own snapshots (catalog setting
/// `default_access`; absent in repositories made before it existed: `Full`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultAccess {
    /// Add, list and read their own snapshots; never delete them (retention is the
    /// appliance's). The default of new repositories.
    Append,
    /// Also delete their own snapshots and change their own policies.
    Full,
}

impl DefaultAccess {
    /// The catalog setting's name.
    pub const SETTING: &'static str = "default_access";
    /// The catalog setting that records that rules were enabled (stored explicitly): from then
    /// on an empty rule set means no access, never "the defaults".
    pub const ENABLED_SETTING: &'static str = "acl";

    /// Reads `full` or `append`.
    ///
    /// # Errors
    /// Anything else.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Self::Full),
            "append" => Ok(Self::Append),
            _ => Err(format!("default access {s:?}: expected `append` or `full`")),
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Append => "append",
        }
    }
}

/// The built-in rules of repositories made before append-only defaults (FULL on one's own
/// snapshots).
#[cfg(test)]
#[must_use]
pub fn default_rules() -> Vec<Rule> {
    defaults(DefaultAccess::Full)
}

/// The built-in rules for `d`.
#[must_use]
pub fn defaults(d: DefaultAccess) -> Vec<Rule> {
    let (snapshots, policies) = match d {
        DefaultAccess::Full => (Access::Full, Access::Full),
        DefaultAccess::Append => (Access::Append, Access::Read),
    };
    let own = |kind| Target {
        kind,
        labels: BTreeMap::from([
            ("username".into(), "OWN_USER".into()),
            ("hostname".into(), "OWN_HOST".into()),
        ]),
    };
    let policy = |labels: &[(&str, &str)]| Target {
        kind: TargetType::Policy,
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect(),
    };
    let rule = |id: &str, access, target| Rule {
        id: id.into(),
        user: "*@*".into(),
        access,
        target,
    };
    vec![
        rule(
            "default-own-snapshots",
            snapshots,
            own(TargetType::Snapshot),
        ),
        rule("default-own-policies", policies, own(TargetType::Policy)),
        rule(
            "default-global-policy",
            Access::Read,
            policy(&[("policyType", "global")]),
        ),
        rule(
            "default-host-policy",
            Access::Read,
            policy(&[("policyType", "host"), ("hostname", "OWN_HOST")]),
        ),
        // Read one's own account and change one's own password; never delete it.
        rule("default-own-user", Access::Append, own(TargetType::User)),
    ]
}

/// The rules in force with what `catalog` stores: its rules; none stored and rules never
/// enabled: the built-in defaults of its `default_access`; none stored but enabled: none (fail
/// closed — removing every rule never brings the defaults back by itself).
///
/// # Errors
/// Catalog errors; a `default_access` setting that does not parse.
pub fn in_force(
    catalog: &crate::catalog::Catalog,
) -> Result<(Vec<Rule>, Option<DefaultAccess>), crate::error::ApplianceError> {
    let stored = catalog.acl_rules()?;
    if !stored.is_empty() || enabled(catalog)? {
        return Ok((stored, None));
    }
    let d = default_access(catalog)?;
    Ok((defaults(d), Some(d)))
}

/// The repository's default access (absent: `Full`, repositories made before it existed).
///
/// # Errors
/// Catalog errors; a value that does not parse.
pub fn default_access(
    catalog: &crate::catalog::Catalog,
) -> Result<DefaultAccess, crate::error::ApplianceError> {
    match catalog.setting(DefaultAccess::SETTING)? {
        None => Ok(DefaultAccess::Full),
        Some(v) => DefaultAccess::parse(&v).map_err(crate::error::ApplianceError::Internal),
    }
}

/// Whether rules were enabled (stored explicitly) at some point.
///
/// # Errors
/// Catalog errors.
pub fn enabled(catalog: &crate::catalog::Catalog) -> Result<bool, crate::error::ApplianceError> {
    Ok(catalog.setting(DefaultAccess::ENABLED_SETTING)?.as_deref() == Some("enabled"))
}

/// The labels of a concrete target, e.g. a snapshot's owner and path.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// The highest access `identity` has on a target of `kind` with `labels`, if any.
#[must_use]
pub fn access(rules: &[Rule], identity: &str, kind: TargetType, labels: Labels) -> Option<Access> {
    let (user, host) = identity.split_once('@')?;
    rules
        .iter()
        .filter(|r| r.target.kind == kind && pattern_matches(&r.user, user, host))
        .filter(|r| {
            r.target.labels.iter().all(|(k, want)| {
                let want = match want.as_str() {
                    "OWN_USER" => user,
                    "OWN_HOST" => host,
                    w => w,
                };
                labels.iter().any(|(lk, lv)| lk == k && *lv == want)
            })
        })
        .map(|r| r.access)
        .max()
}

/// The access `who` has on snapshot `s` under `rules`.
#[must_use]
pub fn snapshot_access(
    rules: &[Rule],
    who: &str,
    s: &coffer_proto::v1::Snapshot,
) -> Option<Access> {
    let (user, host) = s
        .identity
        .split_once('@')
        .unwrap_or((s.identity.as_str(), ""));
    access(
        rules,
        who,
        TargetType::Snapshot,
        &[("username", user), ("hostname", host), ("path", &s.path)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(owner: &str, path: &str) -> Vec<(&'static str, String)> {
        let (u, h) = owner.split_once('@').unwrap();
        vec![
            ("username", u.to_string()),
            ("hostname", h.to_string()),
            ("path", path.to_string()),
        ]
    }

    fn on(rules: &[Rule], who: &str, owner: &str) -> Option<Access> {
        let l = snap(owner, "/data");
        let labels: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        access(rules, who, TargetType::Snapshot, &labels)
    }

    #[test]
    fn defaults_keep_users_to_their_own_snapshots() {
        let d = default_rules();
        assert_eq!(on(&d, "alice@laptop", "alice@laptop"), Some(Access::Full));
        assert_eq!(on(&d, "alice@laptop", "bob@laptop"), None);
        assert_eq!(on(&d, "alice@laptop", "alice@desktop"), None);
        assert_eq!(
            access(
                &d,
                "alice@laptop",
                TargetType::Policy,
                &[("policyType", "global")]
            ),
            Some(Access::Read)
        );
        assert_eq!(
            access(
                &d,
                "alice@laptop",
                TargetType::User,
                &[("username", "alice"), ("hostname", "laptop")]
            ),
            Some(Access::Append)
        );
        assert_eq!(access(&d, "alice@laptop", TargetType::Acl, &[]), None);
    }

    #[test]
    fn explicit_rules_grant_the_highest_matching_level() {
        let mut rules = default_rules();
        rules.push(
            Rule::new(
                "auditor@*",
                Access::Read,
                Target::parse("type=snapshot,hostname=laptop").unwrap(),
            )
            .unwrap(),
        );
        rules.push(
            Rule::new(
                "*@laptop",
                Access::Append,
                Target::parse("type=snapshot,username=bob,path=/data").unwrap(),
            )
            .unwrap(),
        );
        assert_eq!(
            on(&rules, "auditor@office", "bob@laptop"),
            Some(Access::Read)
        );
        assert_eq!(on(&rules, "auditor@office", "bob@desktop"), None);
        assert_eq!(
            on(&rules, "carol@laptop", "bob@laptop"),
            Some(Access::Append)
        );
        assert_eq!(on(&rules, "carol@desktop", "bob@laptop"), None);
    }

    #[test]
    fn targets_and_patterns_are_checked() {
        assert!(Target::parse("type=snapshot,username=OWN_USER").is_ok());
        for bad in [
            "",
            "username=x",
            "type=nope",
            "type=acl,username=x",
            "type=snapshot,policyType=global",
            "type=snapshot,path=",
            "type=snapshot,type=user",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad:?} accepted");
        }
        for bad in ["alice", "a/b@h", "*@..", "a@h@h"] {
            assert!(check_pattern(bad).is_err(), "{bad:?} accepted");
        }
        assert!(check_pattern("*@*").is_ok() && check_pattern("alice@*").is_ok());
        let t = Target::parse("type=snapshot,path=/x,username=OWN_USER").unwrap();
        assert_eq!(Target::parse(&t.to_string()).unwrap(), t);
    }
}
