//! Calls that can take history away or protect it: delete, protect/unprotect, lock, policy
//! changes and rule additions. Each checks access, then (for what weakens history) the caller's
//! step-up passphrase for this call alone, and leaves an audit entry — for a refusal too.
//!
//! Protections and locks themselves are enforced by the catalog (`Catalog::delete_snapshot`,
//! `protect_snapshot`, `extend_lock`), whoever calls it: the same checks hold for the admin CLI,
//! the admin socket and retention.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use coffer_proto::v1;
use tokio::time::Instant;

use super::snapshots::{no_snapshot, snapshot_id};
use super::{catalog_call, on_blocking_pool, Inner};
use crate::access::admin::until_detail;
use crate::access::rules::{self, snapshot_access, Access, TargetType};
use crate::access::RateWindow;
use crate::access::Session;
use crate::catalog::audit::Event;
use crate::catalog::policy::{resolve, Policy, PolicyTarget};
use crate::error::ApplianceError;

/// Refusals recorded per identity and minute at most; more are counted, and the count goes into
/// the next entry recorded (a client cannot grow the log by one synced write per request).
const REFUSALS_PER_MINUTE: u32 = 30;
/// Identities whose refusal counts are remembered at most (past it, the oldest windows go).
const REFUSAL_IDENTITIES_MAX: usize = 10_000;
/// The longest lock a client may set, from now (`LockSnapshot`, a policy's `lock_secs`): a
/// lock nobody can lift must not be a client's way to pin storage for ever. The operator's
/// commands have no such limit.
pub(super) const MAX_CLIENT_LOCK_SECS: u64 = 366 * 86_400;

/// The refusal budget of each identity.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    by: Mutex<HashMap<String, RateWindow>>,
}

impl Refusals {
    /// Whether to record one more refusal of `who` now, and how many were left out before it.
    fn admit(&self, who: &str) -> Option<u64> {
        let now = Instant::now();
        let mut by = self
            .by
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if by.len() >= REFUSAL_IDENTITIES_MAX && !by.contains_key(who) {
            by.retain(|_, w| w.current(now));
        }
        by.entry(who.to_string())
            .or_insert_with(|| RateWindow::new(now))
            .admit(now, REFUSALS_PER_MINUTE)
    }
}

/// The snapshot a request names, if the caller may see it (else "not found", the same answer as
/// for a snapshot that does not exist).
async fn visible(
    inner: &Inner,
    session: &Session,
    id: &coffer_proto::SnapshotId,
) -> Result<(v1::Snapshot, Access), ApplianceError> {
    let sid = *id;
    let snap = catalog_call(&inner.catalog, move |c| c.snapshot(&sid)).await?;
    snap.and_then(|s| snapshot_access(&inner.auth.rules(), &session.identity, &s).map(|a| (s, a)))
        .ok_or_else(|| no_snapshot(id))
}

impl Inner {
    /// Records a refusal of `action` on `target` (within the budget) and returns it.
    pub(super) async fn refused(
        &self,
        who: &str,
        action: &str,
        target: &str,
        e: ApplianceError,
    ) -> ApplianceError {
        if let Some(left_out) = self.refusals.admit(who) {
            let mut why = e.to_string();
            if left_out > 0 {
                why =
                    format!("{why} ({left_out} earlier refusals of {who} not recorded one by one)");
            }
            let event = Event::refused(who, action, target, &why);
            let r = catalog_call(&self.catalog, move |c| c.audit(&event)).await;
            if let Err(a) = r {
                tracing::warn!(error = %a, "audit entry for a refusal not written");
            }
        }
        e
    }

    /// Runs `what` and records a refusal when it is refused (not when the appliance failed).
    pub(super) async fn checked<T>(
        &self,
        session: &Session,
        action: &str,
        target: &str,
        what: impl std::future::Future<Output = Result<T, ApplianceError>>,
    ) -> Result<T, ApplianceError> {
        match what.await {
            Ok(v) => Ok(v),
            Err(
                e @ (ApplianceError::PermissionDenied(_)
                | ApplianceError::NotFound(_)
                | ApplianceError::InvalidArgument(_)
                | ApplianceError::ResourceExhausted(_)),
            ) => Err(self.refused(&session.identity, action, target, e).await),
            Err(e) => Err(e),
        }
    }

    /// FULL on the snapshot, then the step-up.
    async fn may_remove(
        &self,
        session: &Session,
        source: Option<IpAddr>,
        id: &coffer_proto::SnapshotId,
        passphrase: &str,
        verb: &str,
    ) -> Result<(), ApplianceError> {
        let (_, access) = visible(self, session, id).await?;
        if access < Access::Full {
            return Err(ApplianceError::PermissionDenied(format!(
                "{} may read snapshot {id} but not {verb} it",
                session.identity
            )));
        }
        self.auth
            .step_up(&session.identity, passphrase, source)
            .await
    }

    pub(super) async fn delete_snapshot(
        &self,
        session: &Session,
        source: Option<IpAddr>,
        req: v1::DeleteSnapshotRequest,
    ) -> Result<v1::DeleteSnapshotResponse, ApplianceError> {
        let id = snapshot_id(&req.id)?;
        let target = id.to_string();
        self.checked(
            session,
            "snapshot.delete",
            &target,
            self.may_remove(session, source, &id, &req.delete_passphrase, "delete"),
        )
        .await?;
        let event = Event::done(&session.identity, "snapshot.delete", target.clone());
        // The catalog refuses a protected or locked snapshot, whoever asks.
        self.checked(
            session,
            "snapshot.delete",
            &target,
            catalog_call(&self.catalog, move |c| c.delete_snapshot(&id, &event)),
        )
        .await?;
        // Sessions that opened it read from it no longer.
        self.auth.forget_snapshot(id.as_bytes());
        Ok(v1::DeleteSnapshotResponse {})
    }

    pub(super) async fn protect_snapshot(
        &self,
        session: &Session,
        source: Option<IpAddr>,
        req: v1::ProtectSnapshotRequest,
    ) -> Result<v1::ProtectSnapshotResponse, ApplianceError> {
        let id = snapshot_id(&req.id)?;
        let target = id.to_string();
        let until = match (req.protect, req.until_us) {
            (false, _) => 0,
            (true, 0) => i64::MAX,
            (true, t) if t <= crate::clock::now_us() => {
                return Err(ApplianceError::InvalidArgument(format!(
                    "protect until {}: that is in the past",
                    coffer_proto::when::format_us(t)
                )))
            }
            (true, t) => t,
        };
        let action = if req.protect {
            "snapshot.protect"
        } else {
            "snapshot.unprotect"
        };
        let weakens = self
            .checked(session, action, &target, async {
                let (snap, access) = visible(self, session, &id).await?;
                // Protecting adds (APPEND); removing or shortening a protection takes it away
                // (FULL and the step-up).
                let weakens =
                    until < crate::catalog::protection_in_force(&snap, crate::clock::now_us());
                if weakens {
                    self.may_remove(session, source, &id, &req.delete_passphrase, "unprotect")
                        .await?;
                } else if access < Access::Append {
                    return Err(ApplianceError::PermissionDenied(format!(
                        "{} may read snapshot {id} but not protect it",
                        session.identity
                    )));
                }
                Ok(weakens)
            })
            .await?;
        let event =
            Event::done(&session.identity, action, target.clone()).with_detail(if weakens {
                "protection removed or shortened".to_string()
            } else {
                until_detail(until)
            });
        // `weakens` came from the record as read above; the catalog decides again against the
        // record as it is when written, and without the step-up refuses to shorten anything.
        let snapshot = self
            .checked(
                session,
                action,
                &target,
                catalog_call(&self.catalog, move |c| {
                    c.protect_snapshot(&id, until, weakens, &event)
                }),
            )
            .await?;
        Ok(v1::ProtectSnapshotResponse {
            snapshot: Some(snapshot),
        })
    }

    pub(super) async fn lock_snapshot(
        &self,
        session: &Session,
        req: v1::LockSnapshotRequest,
    ) -> Result<v1::LockSnapshotResponse, ApplianceError> {
        let id = snapshot_id(&req.id)?;
        let target = id.to_string();
        self.checked(session, "snapshot.lock", &target, async {
            let (_, access) = visible(self, session, &id).await?;
            // A lock binds everyone, the account's own administrator too: only FULL may set one.
            if access < Access::Full {
                return Err(ApplianceError::PermissionDenied(format!(
                    "{} may not lock snapshot {id} (needs FULL on it)",
                    session.identity
                )));
            }
            Ok(())
        })
        .await?;
        let until = req.until_us;
        let event = Event::done(&session.identity, "snapshot.lock", target.clone())
            .with_detail(until_detail(until));
        let limit = crate::clock::now_us()
            .saturating_add(i64::try_from(MAX_CLIENT_LOCK_SECS).unwrap_or(i64::MAX) * 1_000_000);
        // The catalog refuses a shorter lock.
        let snapshot = self
            .checked(session, "snapshot.lock", &target, async move {
                if until > limit {
                    return Err(ApplianceError::PermissionDenied(format!(
                        "a client may lock a snapshot until {} at the latest; longer locks are \
                         set by the operator (coffer-appliance snapshot lock)",
                        coffer_proto::when::format_us(limit)
                    )));
                }
                catalog_call(&self.catalog, move |c| c.extend_lock(&id, until, &event)).await
            })
            .await?;
        Ok(v1::LockSnapshotResponse {
            snapshot: Some(snapshot),
        })
    }

    pub(super) async fn set_policy(
        &self,
        session: &Session,
        source: Option<IpAddr>,
        req: v1::SetPolicyRequest,
    ) -> Result<v1::SetPolicyResponse, ApplianceError> {
        let target = PolicyTarget::parse(&req.target)
            .map_err(|e| ApplianceError::InvalidArgument(e.to_string()))?;
        let set: Policy = serde_json::from_str(&req.policy_json)
            .map_err(|e| ApplianceError::InvalidArgument(format!("policy: {e}")))?;
        let name = target.to_string();
        let levels = catalog_call(&self.catalog, crate::catalog::Catalog::policies).await?;
        let stored = level_of(&levels, &target);
        let merged = crate::access::admin::merge(&stored, &set, &req.unset)?;
        let stepped_up = self
            .checked(session, "policy.set", &name, async {
                let over = set
                    .lock_secs
                    .filter(|l| *l > MAX_CLIENT_LOCK_SECS.max(stored.lock_secs.unwrap_or(0)));
                if over.is_some() {
                    return Err(ApplianceError::PermissionDenied(format!(
                        "a client may set a lock of at most {MAX_CLIENT_LOCK_SECS} s; longer \
                         locks are set by the operator (coffer-appliance policy set --lock)"
                    )));
                }
                if policy_access(&self.auth.rules(), &session.identity, &target)
                    .is_none_or(|a| a < Access::Full)
                {
                    return Err(ApplianceError::PermissionDenied(format!(
                        "{} may not change the {} policy {name}",
                        session.identity,
                        policy_labels(&target).0
                    )));
                }
                let Some(why) = weakened(&levels, &target, &merged) else {
                    return Ok(false);
                };
                self.auth
                    .step_up(&session.identity, &req.delete_passphrase, source)
                    .await
                    .map_err(|e| match e {
                        ApplianceError::PermissionDenied(m) => {
                            ApplianceError::PermissionDenied(format!("{why}: {m}"))
                        }
                        e => e,
                    })?;
                Ok(true)
            })
            .await?;
        // Read, merge, check and write again as one step: a change made meanwhile (by the
        // operator, say) is neither lost nor weakened without the step-up.
        let event = Event::done(&session.identity, "policy.set", name.clone());
        let (t, unset, catalog) = (target.clone(), req.unset.clone(), self.catalog.clone());
        let written = self
            .checked(
                session,
                "policy.set",
                &name,
                on_blocking_pool("policy change", move || {
                    let _one = catalog.policy_guard();
                    let levels = catalog.policies()?;
                    let stored = level_of(&levels, &t);
                    let merged = crate::access::admin::merge(&stored, &set, &unset)?;
                    if !stepped_up {
                        if let Some(why) = weakened(&levels, &t, &merged) {
                            return Err(ApplianceError::PermissionDenied(format!(
                                "{why}, after a change made meanwhile: that needs the delete \
                                 passphrase; ask again"
                            )));
                        }
                    }
                    let event =
                        event.with_detail(serde_json::to_string(&merged).unwrap_or_default());
                    catalog.audited(&event, |c| c.put_policy(&t, &merged))?;
                    Ok(merged)
                }),
            )
            .await?;
        Ok(v1::SetPolicyResponse {
            policy_json: serde_json::to_string(&written)
                .map_err(|e| ApplianceError::Internal(e.to_string()))?,
        })
    }

    pub(super) async fn add_rule(
        &self,
        session: &Session,
        source: Option<IpAddr>,
        req: v1::AddRuleRequest,
    ) -> Result<v1::AddRuleResponse, ApplianceError> {
        let rule = crate::access::rules::Rule::new(
            &req.user,
            req.access.parse()?,
            crate::access::rules::Target::parse(&req.target)?,
        )?;
        self.checked(session, "acl.add", &rule.to_string(), async {
            if rules::access(&self.auth.rules(), &session.identity, TargetType::Acl, &[])
                .is_none_or(|a| a < Access::Full)
            {
                return Err(ApplianceError::PermissionDenied(format!(
                    "{} may not change access rules",
                    session.identity
                )));
            }
            // A rule can hand FULL to an account without a passphrase: always stepped up.
            self.auth
                .step_up(&session.identity, &req.delete_passphrase, source)
                .await
        })
        .await?;
        let id = rule.id.clone();
        let auth = self.auth.clone();
        let who = session.identity.clone();
        let catalog = self.catalog.clone();
        on_blocking_pool("add rule", move || {
            let req = crate::access::admin::Request::AclAdd { rule };
            crate::access::admin::apply_as(&catalog, &req, &who)?;
            auth.reload()
        })
        .await?;
        Ok(v1::AddRuleResponse { id })
    }
}

/// The level stored at `target` (empty when none is).
fn level_of(levels: &[(PolicyTarget, Policy)], target: &PolicyTarget) -> Policy {
    levels
        .iter()
        .find(|(t, _)| t == target)
        .map(|(_, p)| p.clone())
        .unwrap_or_default()
}

/// The access `who` has on the policy at `target`.
pub(crate) fn policy_access(
    rules: &[crate::access::rules::Rule],
    who: &str,
    target: &PolicyTarget,
) -> Option<Access> {
    let (_, labels) = policy_labels(target);
    let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    rules::access(rules, who, TargetType::Policy, &labels)
}

/// The policy type and labels a rule matches a policy target on.
fn policy_labels(t: &PolicyTarget) -> (&'static str, Vec<(&'static str, String)>) {
    match t {
        PolicyTarget::Global => ("global", vec![("policyType", "global".into())]),
        PolicyTarget::Host(h) => (
            "host",
            vec![("policyType", "host".into()), ("hostname", h.clone())],
        ),
        PolicyTarget::User { user, host } => (
            "user",
            vec![
                ("policyType", "user".into()),
                ("username", user.clone()),
                ("hostname", host.clone()),
            ],
        ),
        PolicyTarget::Path { user, host, path } => (
            "path",
            vec![
                ("policyType", "path".into()),
                ("username", user.clone()),
                ("hostname", host.clone()),
                ("path", path.clone()),
            ],
        ),
    }
}

/// Whether storing `merged` at `target` weakens retention or the lock for anyone the level
/// reaches: compared on the effective policy (inheritance included) of every identity and path
/// that has a level below it, and of someone who has none.
fn weakened(
    levels: &[(PolicyTarget, Policy)],
    target: &PolicyTarget,
    merged: &Policy,
) -> Option<String> {
    let mut after: Vec<(PolicyTarget, Policy)> = levels
        .iter()
        .filter(|(t, _)| t != target)
        .cloned()
        .collect();
    after.push((target.clone(), merged.clone()));
    // Every identity and path the level reaches that has a level of its own, and for the
    // global and host levels the level as inherited by someone with no level below it.
    let reaches = |t: &PolicyTarget| match (target, t) {
        (PolicyTarget::Global, _) => true,
        (
            PolicyTarget::Host(h),
            PolicyTarget::User { host, .. } | PolicyTarget::Path { host, .. },
        ) => h == host,
        (
            PolicyTarget::User { user, host },
            PolicyTarget::User { user: u, host: h }
            | PolicyTarget::Path {
                user: u, host: h, ..
            },
        ) => user == u && host == h,
        (PolicyTarget::Path { .. }, t) => t == target,
        _ => false,
    };
    let mut scopes: Vec<(String, String)> = match target {
        // Names cannot contain `*`: nobody's own levels are found for these.
        PolicyTarget::Global => vec![("*@*".into(), String::new())],
        PolicyTarget::Host(h) => vec![(format!("*@{h}"), String::new())],
        PolicyTarget::User { user, host } => vec![(format!("{user}@{host}"), String::new())],
        PolicyTarget::Path { user, host, path } => vec![(format!("{user}@{host}"), path.clone())],
    };
    for (t, _) in levels
        .iter()
        .chain(std::iter::once(&(target.clone(), Policy::default())))
    {
        if reaches(t) {
            match t {
                PolicyTarget::Host(h) => scopes.push((format!("*@{h}"), String::new())),
                PolicyTarget::User { user, host } => {
                    scopes.push((format!("{user}@{host}"), String::new()));
                }
                PolicyTarget::Path { user, host, path } => {
                    scopes.push((format!("{user}@{host}"), path.clone()));
                }
                PolicyTarget::Global => {}
            }
        }
    }
    scopes
        .iter()
        .find_map(|(id, path)| resolve(levels, id, path).weakened_by(&resolve(&after, id, path)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(t: &str, json: &str) -> (PolicyTarget, Policy) {
        (
            PolicyTarget::parse(t).unwrap(),
            serde_json::from_str(json).unwrap(),
        )
    }

    fn weakens(levels: &[(PolicyTarget, Policy)], t: &str, json: &str) -> bool {
        weakened(
            levels,
            &PolicyTarget::parse(t).unwrap(),
            &serde_json::from_str(json).unwrap(),
        )
        .is_some()
    }

    #[test]
    fn a_level_weakens_what_it_inherits_and_what_inherits_from_it() {
        // A host level that unsets nothing but overrides an inherited lock or rule.
        let levels = [level(
            "global",
            r#"{"lock_secs": 31536000, "keep_weekly": 52}"#,
        )];
        assert!(weakens(&levels, "@db1", r#"{"keep_weekly": 1}"#));
        assert!(!weakens(&levels, "@db1", r#"{"keep_weekly": 60}"#));
        // A lower lock below cannot escape the one above (the longest binds): harmless.
        assert!(!weakens(&levels, "@db1", r#"{"lock_secs": 0}"#));
        assert!(!weakens(&levels, "alice@db1:/srv", r#"{"lock_secs": 60}"#));
        assert!(weakens(&levels, "global", r#"{"lock_secs": 60}"#));
        // A global change is judged where it lands: a user level below keeps its own rule.
        let levels = [
            level("global", r#"{"keep_daily": 7}"#),
            level("alice@db1", r#"{"keep_daily": 30}"#),
            level("@web", r#"{"lock_secs": 600}"#),
        ];
        assert!(weakens(&levels, "global", r#"{"keep_daily": 3}"#));
        assert!(!weakens(&levels, "global", r#"{"keep_daily": 8}"#));
        // Lowering a user level's rule weakens it even though global is lower still.
        assert!(weakens(&levels, "alice@db1", r#"{"keep_daily": 10}"#));
        assert!(!weakens(&levels, "bob@db1", r#"{"keep_daily": 10}"#));
        assert!(weakens(&levels, "@web", r#"{"lock_secs": 60}"#));
    }
}
