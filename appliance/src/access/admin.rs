//! Account and rule administration, the same operations two ways:
//!
//! * while the appliance runs, through its admin socket `<repo>/admin.sock` (mode 0600: only the
//!   appliance's own user, normally root, can connect), so that a change is in force as soon as
//!   the command returns: the appliance writes the catalog and reloads ([`crate::access::auth::Auth::reload`]);
//! * when it does not run, directly on the catalog (the appliance reads it at start).
//!
//! Protocol on the socket: one JSON [`Request`] per line, one JSON [`Reply`] per line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::access::rules::{DefaultAccess, Rule};
use crate::catalog::audit::{self, Event};
use crate::catalog::policy::{resolve, Effective, Policy, PolicyTarget};
use crate::catalog::{Catalog, UserRecord};
use crate::error::ApplianceError;
use crate::maintenance::forget::{self, Verdict};
pub use crate::maintenance::usage::{By as UsageBy, UsageReport};

/// One administrative operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    UserAdd {
        user: UserRecord,
    },
    /// Replaces the password hash of an existing user.
    UserSet {
        user: UserRecord,
    },
    UserDelete {
        identity: String,
    },
    /// Sets (`Some`, hashed here; it must differ from the login password) or removes (`None`)
    /// an account's delete passphrase.
    UserDeletePassphrase {
        identity: String,
        passphrase: Option<String>,
    },
    /// Stores a one-time enrollment token (`user enroll`): BLAKE3 of its authentication half
    /// (hex) and what it creates. The catalog writes its own audit entry.
    EnrollmentAdd {
        auth_hash: String,
        record: crate::catalog::EnrollmentRecord,
    },
    /// Sets (`Some`) or lifts (`None`) an account's quota of stored bytes.
    UserQuota {
        identity: String,
        quota: Option<u64>,
    },
    /// Counts space per owner (running appliance only).
    Usage {
        #[serde(default)]
        by: UsageBy,
    },
    UserList,
    AclList,
    AclAdd {
        rule: Rule,
    },
    AclRemove {
        ids: Vec<String>,
    },
    /// Stores the default rules explicitly (when no rules are stored); from then on an empty
    /// rule set means no access. With `append_only`, the repository's defaults become
    /// append-only (stored rules: the own-snapshots and own-policies defaults lose delete and
    /// change). With `defaults`, stores the defaults again into an enabled, empty rule set.
    AclEnable {
        #[serde(default)]
        append_only: bool,
        #[serde(default)]
        defaults: bool,
    },
    /// Sets the built-in defaults of a new repository (`init --default-access`).
    DefaultAccess {
        access: String,
    },
    /// Reloads everything from the catalog.
    Refresh,
    /// Sets (with a value) or shows the disclosure mode: `user` or `repository`.
    Disclosure {
        mode: Option<String>,
    },
    /// Sets the fields given in `policy` at `target` (the others stay as stored) and clears
    /// the fields named in `unset`.
    PolicySet {
        target: String,
        policy: Policy,
        #[serde(default)]
        unset: Vec<String>,
    },
    PolicyDelete {
        target: String,
    },
    PolicyList,
    /// The effective policy of `identity` backing up `path`, each field with its level.
    PolicyShow {
        identity: String,
        path: String,
    },
    /// Every snapshot, with its protection and lock.
    SnapshotList,
    /// Deletes a snapshot (refused while it is protected or locked).
    SnapshotDelete {
        id: String,
    },
    /// Protects a snapshot until `until_us` (`i64::MAX`: until unprotected), or with 0 removes
    /// its protection (refused while it is locked).
    SnapshotProtect {
        id: String,
        until_us: i64,
    },
    /// Extends a snapshot's retention lock to `until_us` (never shortens it).
    SnapshotLock {
        id: String,
        until_us: i64,
    },
    /// Audit entries at or after `since_us`.
    AuditShow {
        #[serde(default)]
        since_us: i64,
    },
    /// Checks the audit chain.
    AuditVerify,
    /// Forgets the snapshots retention no longer keeps (with `dry_run`, only says which), at
    /// time `now_us` (default: now; tests inject it).
    MaintenanceRun {
        dry_run: bool,
        #[serde(default)]
        now_us: Option<i64>,
    },
    /// How the running appliance is doing (`status`).
    Status,
}

/// The running appliance at a glance (`coffer-appliance status`). Counts are since it started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    /// `managed` or `sealed`.
    pub mode: String,
    pub started_us: i64,
    pub uptime_secs: u64,
    pub shards: u64,
    /// RocksDB's estimate, all shards.
    pub index_entries: u64,
    pub sessions: u64,
    pub rpcs_in_flight: u64,
    pub upload_bytes_in_flight: u64,
    pub read_bytes_in_flight: u64,
    pub snapshots_committed: u64,
    /// Bytes the committed snapshots cover.
    pub logical_bytes: u64,
    /// Chunk bytes received (as sent) and how many of them were new.
    pub received_bytes: u64,
    pub stored_bytes: u64,
    /// Chunk bytes received per second over the last minute.
    pub receive_rate_1m: f64,
    pub disk_free_bytes: u64,
    pub disk_size_bytes: u64,
    /// 0: no maintenance run since the start.
    pub maintenance_last_run_us: i64,
    pub maintenance_last_duration_secs: f64,
    pub maintenance_runs: u64,
    pub maintenance_errors: u64,
    pub maintenance_freed_bytes: u64,
}

/// One field of an effective policy, for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyField {
    pub field: String,
    /// JSON of the value.
    pub value: String,
    /// The level it came from.
    pub from: String,
}

/// What an operation returned.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default)]
    pub error: String,
    /// With `ok: false`: `not_found`, `already_exists`, `invalid_argument`,
    /// `failed_precondition` or `internal` (absent from older appliances).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Whether the rules listed are the built-in defaults (nothing stored).
    #[serde(default)]
    pub defaults: bool,
    /// The repository's default access (`append` or `full`) and whether rules are enabled
    /// (`AclList`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub default_access: String,
    #[serde(default)]
    pub enabled: bool,
    /// The disclosure mode in force (for `Disclosure`).
    #[serde(default)]
    pub disclosure: String,
    /// Stored policies by target (`PolicyList`, and the level written by `PolicySet`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<(String, Policy)>,
    /// The effective policy (`PolicyShow`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub effective: Vec<PolicyField>,
    /// Every snapshot with retention's decision (`MaintenanceRun`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdicts: Vec<Verdict>,
    /// Snapshots forgotten (`MaintenanceRun` without `dry_run`).
    #[serde(default)]
    pub forgotten: u64,
    /// Space per owner (`Usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageReport>,
    /// Snapshots (`SnapshotList`, and the one changed by `SnapshotProtect` / `SnapshotLock`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotRow>,
    /// Audit entries (`AuditShow`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audit: Vec<audit::Entry>,
    /// The audit chain's check (`AuditVerify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<audit::Verified>,
    /// What garbage collection did, or with `dry_run` would do (`MaintenanceRun`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gc: Option<crate::maintenance::gc::GcReport>,
    /// The running appliance (`Status`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<StatusReport>,
}

/// A snapshot as the admin commands list it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRow {
    pub id: String,
    pub identity: String,
    pub path: String,
    pub time_us: i64,
    pub partial: bool,
    /// 0: not locked.
    pub lock_until_us: i64,
    /// 0: not protected; `i64::MAX`: until unprotected.
    pub protected_until_us: i64,
}

impl From<&coffer_proto::v1::Snapshot> for SnapshotRow {
    fn from(s: &coffer_proto::v1::Snapshot) -> Self {
        Self {
            id: hex::encode(&s.id),
            identity: s.identity.clone(),
            path: s.path.clone(),
            time_us: s.time_us,
            partial: s.partial,
            lock_until_us: s.lock_until_us,
            protected_until_us: s.protected_until_us,
        }
    }
}

/// The audit entry of an administrative change (`None`: reads, and changes that record their
/// own entry in the same write as the change).
fn admin_event(req: &Request, actor: &str) -> Option<Event> {
    let done = |action: &str, target: &str| Some(Event::done(actor, action, target));
    match req {
        Request::UserAdd { user } => done("user.add", &user.identity),
        Request::UserSet { user } => done("user.set", &user.identity),
        Request::UserDelete { identity } => done("user.delete", identity),
        Request::UserDeletePassphrase {
            identity,
            passphrase,
        } => done("user.delete_passphrase", identity).map(|e| {
            e.with_detail(if passphrase.is_some() {
                "set"
            } else {
                "removed"
            })
        }),
        Request::UserQuota { identity, quota } => done("user.quota", identity)
            .map(|e| e.with_detail(quota.map_or("none".into(), |q| q.to_string()))),
        Request::AclAdd { rule } => {
            done("acl.add", &rule.id).map(|e| e.with_detail(rule.to_string()))
        }
        Request::AclRemove { ids } => done("acl.remove", &ids.join(",")),
        Request::AclEnable {
            append_only,
            defaults,
        } => done("acl.enable", "")
            .map(|e| e.with_detail(format!("append_only={append_only} defaults={defaults}"))),
        Request::DefaultAccess { access } => done("acl.default_access", access),
        Request::Disclosure { mode: Some(m) } => done("disclosure.set", m),
        Request::PolicySet {
            target,
            policy,
            unset,
        } => done("policy.set", target).map(|e| {
            e.with_detail(format!(
                "{} unset={:?}",
                serde_json::to_string(policy).unwrap_or_default(),
                unset
            ))
        }),
        Request::PolicyDelete { target } => done("policy.delete", target),
        _ => None,
    }
}

/// Applies `req` to the catalog, and records each change in the audit chain (actor `admin`).
///
/// # Errors
/// What the catalog refused (an existing user, an unknown rule, …).
pub fn apply(catalog: &Catalog, req: &Request) -> Result<Reply, ApplianceError> {
    apply_as(catalog, req, "admin")
}

/// [`apply`] on behalf of `actor` (an account with the access the request needs).
///
/// # Errors
/// As [`apply`].
pub(crate) fn apply_as(
    catalog: &Catalog,
    req: &Request,
    actor: &str,
) -> Result<Reply, ApplianceError> {
    // A policy level is read, changed and written as one step (see `Catalog::policy_guard`).
    let _policy = matches!(
        req,
        Request::PolicySet { .. } | Request::PolicyDelete { .. }
    )
    .then(|| catalog.policy_guard());
    let out = match admin_event(req, actor) {
        // The change and its audit entry in one write, or neither.
        Some(e) => catalog.audited(&e, |c| apply_unaudited(c, req)),
        None => apply_unaudited(catalog, req),
    };
    if let (Err(ApplianceError::PermissionDenied(why)), Some((action, target))) =
        (&out, refusable(req))
    {
        // The operator is refused too (a protection or a lock): on the record. The refusal is
        // what the operator must see, even when its entry cannot be written.
        if let Err(e) = catalog.audit(&Event::refused(actor, action, target, why)) {
            tracing::warn!(error = %e, "audit entry for a refused operator request not written");
        }
    }
    out
}

/// The audit action and target of a request whose refusal is recorded.
fn refusable(req: &Request) -> Option<(&'static str, &str)> {
    match req {
        Request::SnapshotDelete { id } => Some(("snapshot.delete", id)),
        Request::SnapshotProtect { id, until_us: 0 } => Some(("snapshot.unprotect", id)),
        Request::SnapshotProtect { id, .. } => Some(("snapshot.protect", id)),
        Request::SnapshotLock { id, .. } => Some(("snapshot.lock", id)),
        _ => None,
    }
}

fn normalise_identity_checked(identity: &str) -> Result<(), ApplianceError> {
    if crate::access::accounts::normalise_identity(identity)? == identity {
        Ok(())
    } else {
        Err(ApplianceError::InvalidArgument(format!(
            "identity {identity:?} is not normalised (lower case)"
        )))
    }
}

fn snapshot_id(id: &str) -> Result<coffer_proto::SnapshotId, ApplianceError> {
    coffer_proto::SnapshotId::from_hex(id)
        .map_err(|e| ApplianceError::InvalidArgument(format!("snapshot id {id:?}: {e}")))
}

fn apply_unaudited(catalog: &Catalog, req: &Request) -> Result<Reply, ApplianceError> {
    let mut reply = Reply {
        ok: true,
        ..Reply::default()
    };
    match req {
        Request::UserAdd { user } => {
            check_user(user)?;
            catalog.add_user(user)?;
        }
        Request::UserSet { user } => {
            check_user(user)?;
            // A password change keeps everything else about the account.
            let mut rec = user.clone();
            if let Some(old) = catalog.user(&user.identity)? {
                rec.created_unix = old.created_unix;
                rec.owner = old.owner;
                rec.quota = old.quota;
                rec.delete_passphrase = old.delete_passphrase;
                rec.role = old.role;
            }
            catalog.set_user(&rec)?;
        }
        Request::UserDeletePassphrase {
            identity,
            passphrase,
        } => set_delete_passphrase(catalog, identity, passphrase.as_deref())?,
        Request::SnapshotList
        | Request::SnapshotDelete { .. }
        | Request::SnapshotProtect { .. }
        | Request::SnapshotLock { .. }
        | Request::AuditShow { .. }
        | Request::AuditVerify => apply_history(catalog, req, &mut reply)?,
        Request::UserDelete { identity } => catalog.delete_user(identity)?,
        Request::EnrollmentAdd { auth_hash, record } => {
            normalise_identity_checked(&record.identity)?;
            catalog.put_enrollment(auth_hash, record)?;
        }
        Request::UserQuota { identity, quota } => {
            let mut rec = catalog
                .user(identity)?
                .ok_or_else(|| ApplianceError::NotFound(format!("no user {identity}")))?;
            rec.quota = *quota;
            catalog.set_user(&rec)?;
        }
        Request::Status => {
            return Err(ApplianceError::FailedPrecondition(
                "the appliance is not running (no answer on its admin socket): nothing to report; \
                 start it with `coffer-appliance serve`"
                    .into(),
            ))
        }
        Request::Usage { .. } => {
            return Err(ApplianceError::FailedPrecondition(
                "usage is counted by the running appliance (it walks every snapshot's trees); \
                 start it first"
                    .into(),
            ))
        }
        Request::UserList => {
            reply.users = catalog.users()?.into_iter().map(|u| u.identity).collect();
        }
        Request::AclList
        | Request::DefaultAccess { .. }
        | Request::AclAdd { .. }
        | Request::AclRemove { .. }
        | Request::AclEnable { .. } => apply_acl(catalog, req, &mut reply)?,
        Request::Refresh => {}
        Request::PolicySet { .. }
        | Request::PolicyDelete { .. }
        | Request::PolicyList
        | Request::PolicyShow { .. } => apply_policy(catalog, req, &mut reply)?,
        Request::MaintenanceRun { dry_run, now_us } => {
            let verdicts = forget::plan(catalog, now_us.unwrap_or_else(crate::clock::now_us))?;
            if !dry_run {
                reply.forgotten = forget::apply(catalog, &verdicts)? as u64;
                catalog.audit(
                    &Event::done("maintenance", "maintenance.run", "")
                        .with_detail(format!("offline: forgot {} snapshots", reply.forgotten)),
                )?;
            }
            reply.verdicts = verdicts;
        }
        Request::Disclosure { mode } => {
            if let Some(m) = mode {
                crate::access::auth::parse_disclosure(Some(m))?;
                catalog.set_setting(crate::access::auth::DISCLOSURE_SETTING, m)?;
            }
            // The value just set (inside an audited change, reads do not see its writes).
            let v = match mode {
                Some(m) => Some(m.clone()),
                None => catalog.setting(crate::access::auth::DISCLOSURE_SETTING)?,
            };
            reply.disclosure = match crate::access::auth::parse_disclosure(v.as_deref())? {
                coffer_proto::v1::Disclosure::Repository => "repository".into(),
                _ => "user".into(),
            };
        }
    }
    Ok(reply)
}

/// Sets or removes an account's delete passphrase (hashed here; never its login password).
fn set_delete_passphrase(
    catalog: &Catalog,
    identity: &str,
    passphrase: Option<&str>,
) -> Result<(), ApplianceError> {
    let mut rec = catalog
        .user(identity)?
        .ok_or_else(|| ApplianceError::NotFound(format!("no user {identity}")))?;
    rec.delete_passphrase = match passphrase {
        None => None,
        Some(p) => {
            if p.chars().count() < crate::access::accounts::MIN_PASSWORD_CHARS {
                return Err(ApplianceError::InvalidArgument(format!(
                    "a delete passphrase has at least {} characters",
                    crate::access::accounts::MIN_PASSWORD_CHARS
                )));
            }
            if crate::access::accounts::verify_password(&rec.password_hash, p) {
                return Err(ApplianceError::InvalidArgument(
                    "the delete passphrase must differ from the login password (the \
                     client stores that one)"
                        .into(),
                ));
            }
            Some(crate::access::accounts::hash_password(p)?)
        }
    };
    catalog.set_user(&rec)?;
    Ok(())
}

/// How an audit entry states a time given to protect or lock.
pub(crate) fn until_detail(until_us: i64) -> String {
    match until_us {
        0 => "removed".into(),
        i64::MAX => "until unprotected".into(),
        t => format!("until {}", coffer_proto::when::format_us(t)),
    }
}

/// The snapshot and audit operations of [`apply`]: protections and locks are the catalog's to
/// enforce, for the operator as for everyone.
fn apply_history(
    catalog: &Catalog,
    req: &Request,
    reply: &mut Reply,
) -> Result<(), ApplianceError> {
    match req {
        Request::SnapshotList => {
            let mut all = catalog.snapshots()?;
            all.sort_by_key(|s| s.time_us);
            reply.snapshots = all.iter().map(SnapshotRow::from).collect();
        }
        Request::SnapshotDelete { id } => {
            let sid = snapshot_id(id)?;
            catalog.delete_snapshot(&sid, &Event::done("admin", "snapshot.delete", id.clone()))?;
        }
        Request::SnapshotProtect { id, until_us } => {
            let sid = snapshot_id(id)?;
            if *until_us != 0 && *until_us <= crate::clock::now_us() {
                return Err(ApplianceError::InvalidArgument(format!(
                    "protect until {}: that is in the past (`snapshot unprotect` removes a \
                     protection)",
                    coffer_proto::when::format_us(*until_us)
                )));
            }
            let action = if *until_us == 0 {
                "snapshot.unprotect"
            } else {
                "snapshot.protect"
            };
            let e = Event::done("admin", action, id.clone()).with_detail(until_detail(*until_us));
            reply.snapshots = vec![SnapshotRow::from(
                &catalog.protect_snapshot(&sid, *until_us, true, &e)?,
            )];
        }
        Request::SnapshotLock { id, until_us } => {
            let sid = snapshot_id(id)?;
            let e = Event::done("admin", "snapshot.lock", id.clone())
                .with_detail(until_detail(*until_us));
            reply.snapshots = vec![SnapshotRow::from(
                &catalog.extend_lock(&sid, *until_us, &e)?,
            )];
        }
        Request::AuditShow { since_us } => reply.audit = catalog.audit_entries(*since_us)?,
        Request::AuditVerify => reply.verified = Some(catalog.audit_verify()?),
        _ => unreachable!("apply passes snapshot and audit requests only"),
    }
    Ok(())
}

/// The policy operations of [`apply`].
fn apply_policy(catalog: &Catalog, req: &Request, reply: &mut Reply) -> Result<(), ApplianceError> {
    match req {
        Request::PolicySet {
            target,
            policy,
            unset,
        } => {
            let t = parse_target(target)?;
            let stored = catalog.policy(&t)?.unwrap_or_default();
            let merged = merge(&stored, policy, unset)?;
            catalog.put_policy(&t, &merged)?;
            reply.policies = vec![(t.to_string(), merged)];
        }
        Request::PolicyDelete { target } => catalog.delete_policy(&parse_target(target)?)?,
        Request::PolicyList => {
            reply.policies = catalog
                .policies()?
                .into_iter()
                .map(|(t, p)| (t.to_string(), p))
                .collect();
        }
        Request::PolicyShow { identity, path } => {
            let identity = crate::access::normalise_identity(identity)?;
            let e = resolve(&catalog.policies()?, &identity, path);
            reply.effective = effective_fields(&e);
        }
        _ => unreachable!("apply passes policy requests only"),
    }
    Ok(())
}

/// The access-rule operations of [`apply`].
fn apply_acl(catalog: &Catalog, req: &Request, reply: &mut Reply) -> Result<(), ApplianceError> {
    match req {
        Request::AclList => {
            let (rules, defaults) = crate::access::rules::in_force(catalog)?;
            reply.rules = rules;
            reply.defaults = defaults.is_some();
            reply.default_access = crate::access::rules::default_access(catalog)?
                .as_str()
                .into();
            reply.enabled = crate::access::rules::enabled(catalog)?;
        }
        Request::DefaultAccess { access } => {
            let d = DefaultAccess::parse(access).map_err(ApplianceError::InvalidArgument)?;
            catalog.set_setting(DefaultAccess::SETTING, d.as_str())?;
        }
        Request::AclAdd { rule } => {
            if catalog.acl_rules()?.is_empty() && !crate::access::rules::enabled(catalog)? {
                return Err(ApplianceError::FailedPrecondition(
                    "no rules are stored yet, so the built-in defaults apply; run `acl enable` \
                     first so that adding a rule does not silently drop the defaults"
                        .into(),
                ));
            }
            catalog.put_rule(rule)?;
        }
        Request::AclRemove { ids } => {
            for id in ids {
                catalog.delete_rule(id)?;
            }
        }
        Request::AclEnable {
            append_only,
            defaults,
        } => {
            // Inside an audited change, reads do not see its writes: `d` is decided here.
            let d = if *append_only {
                catalog.set_setting(DefaultAccess::SETTING, DefaultAccess::Append.as_str())?;
                DefaultAccess::Append
            } else {
                crate::access::rules::default_access(catalog)?
            };
            let stored = catalog.acl_rules()?;
            if stored.is_empty() {
                if crate::access::rules::enabled(catalog)? && !*defaults && !*append_only {
                    return Err(ApplianceError::FailedPrecondition(
                        "rules are enabled and none is stored, so nobody has access; `acl enable \
                         --defaults` stores the built-in defaults again"
                            .into(),
                    ));
                }
                for r in crate::access::rules::defaults(d) {
                    catalog.put_rule(&r)?;
                }
            } else if *append_only {
                // Stored rules stay, but the built-in ones that granted delete or change are
                // narrowed to the append-only defaults.
                for r in crate::access::rules::defaults(d) {
                    if stored.iter().any(|s| s.id == r.id) {
                        catalog.replace_rule(&r)?;
                    }
                }
            } else if !*defaults {
                return Err(ApplianceError::FailedPrecondition(
                    "rules are already stored".into(),
                ));
            }
            catalog.set_setting(DefaultAccess::ENABLED_SETTING, "enabled")?;
        }
        _ => unreachable!("apply passes rule requests only"),
    }
    Ok(())
}

fn parse_target(t: &str) -> Result<PolicyTarget, ApplianceError> {
    PolicyTarget::parse(t).map_err(|e| ApplianceError::InvalidArgument(e.to_string()))
}

/// `stored` with the fields set in `set` replaced and the fields named in `unset` cleared (a
/// schedule set must parse).
pub(crate) fn merge(
    stored: &Policy,
    set: &Policy,
    unset: &[String],
) -> Result<Policy, ApplianceError> {
    if let Some(s) = &set.schedule {
        crate::maintenance::schedule::Schedule::parse(s)
            .map_err(|e| ApplianceError::InvalidArgument(e.to_string()))?;
    }
    let bad = |e: serde_json::Error| ApplianceError::InvalidArgument(format!("policy: {e}"));
    let mut m = serde_json::to_value(stored).map_err(bad)?;
    let obj = m.as_object_mut().expect("a policy is a JSON object");
    if let serde_json::Value::Object(fields) = serde_json::to_value(set).map_err(bad)? {
        obj.extend(fields);
    }
    for f in unset {
        if obj.remove(f).is_none() && !POLICY_FIELDS.contains(&f.as_str()) {
            return Err(ApplianceError::InvalidArgument(format!(
                "no policy field {f:?}; fields: {}",
                POLICY_FIELDS.join(", ")
            )));
        }
    }
    serde_json::from_value(m).map_err(bad)
}

/// The fields of a policy, in display order.
pub const POLICY_FIELDS: &[&str] = &[
    "keep_last",
    "keep_hourly",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "keep_yearly",
    "keep_within_secs",
    "compression",
    "excludes",
    "exclude_caches",
    "one_file_system",
    "max_file_size",
    "schedule",
    "lock_secs",
];

/// The fields of an effective policy in [`POLICY_FIELDS`] order, each with its level.
pub(crate) fn effective_fields(e: &Effective) -> Vec<PolicyField> {
    let Ok(serde_json::Value::Object(values)) = serde_json::to_value(&e.policy) else {
        return Vec::new();
    };
    POLICY_FIELDS
        .iter()
        .filter_map(|f| {
            Some(PolicyField {
                field: (*f).to_string(),
                value: values.get(*f)?.to_string(),
                from: e.from.get(*f)?.to_string(),
            })
        })
        .collect()
}

/// Only well-formed identities and argon2id PHC strings are ever stored.
fn check_user(u: &UserRecord) -> Result<(), ApplianceError> {
    if crate::access::normalise_identity(&u.identity)? != u.identity {
        return Err(ApplianceError::InvalidArgument(format!(
            "identity {:?} is not in normal form",
            u.identity
        )));
    }
    if !u.password_hash.starts_with("$argon2id$") {
        return Err(ApplianceError::InvalidArgument(
            "only argon2id password hashes are stored".into(),
        ));
    }
    Ok(())
}

/// Sends `req` to the appliance running on the repository whose admin socket is `socket`;
/// `None` when no appliance listens there.
///
/// # Errors
/// I/O errors talking to a listening appliance, or its refusal.
pub fn call_socket(socket: &Path, req: &Request) -> Result<Option<Reply>, ApplianceError> {
    let Ok(mut s) = UnixStream::connect(socket) else {
        return Ok(None);
    };
    let io = |e: std::io::Error| {
        ApplianceError::Unavailable(format!("admin socket {}: {e}", socket.display()))
    };
    let mut line = serde_json::to_vec(req).map_err(|e| ApplianceError::Internal(e.to_string()))?;
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).map_err(io)?;
    let reply: Reply = serde_json::from_str(&answer)
        .map_err(|e| ApplianceError::Internal(format!("admin socket answered {answer:?}: {e}")))?;
    if !reply.ok {
        return Err(refusal(&reply.kind, reply.error));
    }
    Ok(Some(reply))
}

/// The kind of a refusal, as the admin socket carries it (`Reply::kind`).
#[must_use]
pub fn kind_of(e: &ApplianceError) -> &'static str {
    match e {
        ApplianceError::NotFound(_) => "not_found",
        ApplianceError::AlreadyExists(_) => "already_exists",
        ApplianceError::InvalidArgument(_) => "invalid_argument",
        ApplianceError::FailedPrecondition(_) => "failed_precondition",
        ApplianceError::PermissionDenied(_) => "permission_denied",
        _ => "internal",
    }
}

/// A refusal read back from the socket: the same kind of error as when applied offline.
fn refusal(kind: &str, message: String) -> ApplianceError {
    match kind {
        "not_found" => ApplianceError::NotFound(message),
        "already_exists" => ApplianceError::AlreadyExists(message),
        "invalid_argument" => ApplianceError::InvalidArgument(message),
        "internal" => ApplianceError::Internal(message),
        "permission_denied" => ApplianceError::PermissionDenied(message),
        // Older appliances send no kind.
        _ => ApplianceError::FailedPrecondition(message),
    }
}

/// Runs `req` on the running appliance if there is one, else directly on the catalog at
/// `catalog_dir`. Returns the reply and whether a running appliance applied it.
///
/// # Errors
/// See [`apply`] and [`call_socket`].
pub fn run(
    socket: &Path,
    catalog_dir: &Path,
    req: &Request,
) -> Result<(Reply, bool), ApplianceError> {
    if let Some(r) = call_socket(socket, req)? {
        return Ok((r, true));
    }
    let catalog = Catalog::open(catalog_dir, false)?;
    Ok((apply(&catalog, req)?, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(identity: &str) -> UserRecord {
        UserRecord {
            identity: identity.into(),
            password_hash: crate::access::accounts::hash_password("a long password").unwrap(),
            created_unix: 1,
            owner: None,
            quota: None,
            delete_passphrase: None,
            role: None,
        }
    }

    #[test]
    fn unknown_and_duplicate_accounts_are_named_not_internal() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("catalog"), true).unwrap();
        let delete = Request::UserDelete {
            identity: "nobody@host".into(),
        };
        let status = tonic::Status::from(apply(&catalog, &delete).unwrap_err());
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        assert!(status.message().contains("no user nobody@host"));
        let set = Request::UserSet {
            user: user("nobody@host"),
        };
        let status = tonic::Status::from(apply(&catalog, &set).unwrap_err());
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
        let add = Request::UserAdd {
            user: user("alice@host"),
        };
        apply(&catalog, &add).unwrap();
        let status = tonic::Status::from(apply(&catalog, &add).unwrap_err());
        assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status:?}");
    }

    #[test]
    fn refusals_keep_their_kind_through_the_socket() {
        for e in [
            ApplianceError::NotFound("no user x@y".into()),
            ApplianceError::AlreadyExists("user x@y already exists".into()),
            ApplianceError::InvalidArgument("bad".into()),
            ApplianceError::FailedPrecondition("run acl enable".into()),
            ApplianceError::PermissionDenied("locked".into()),
        ] {
            let msg = e.to_string();
            let back = refusal(kind_of(&e), msg.clone());
            assert_eq!(back.to_string(), msg);
            assert_eq!(
                tonic::Status::from(back).code(),
                tonic::Status::from(e).code()
            );
        }
        // An older appliance sends no kind.
        assert!(matches!(
            refusal("", "x".into()),
            ApplianceError::FailedPrecondition(_)
        ));
    }
}
