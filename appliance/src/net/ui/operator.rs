//! The operator pages (FULL on the `acl` target, or the built-in administrator): the overview
//! (status, the freshness table, sessions, space), accounts, rules, policies, maintenance and
//! the audit log. Changes go through [`super::Admin::call`], audited under the operator's name.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Extension, Form, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use coffer_proto::v1;
use maud::{html, Markup};
use serde::Deserialize;

use super::pages::{self, bytes, csrf, dash, when};
use super::user::catalog;
use super::{need, need_post, Failure, Page, Peer, St, Ui, Viewer};
use crate::access::admin::{self, Request};
use crate::access::rules::{self, Access, Rule, Target, TargetType};
use crate::catalog::policy::{self, Policy, PolicyTarget};
use crate::error::ApplianceError;
use crate::maintenance::schedule::Schedule;

/// A source is late when its schedule fired this long ago without a successful backup since.
pub(super) const LATE_AFTER_US: i64 = 3600 * 1_000_000;
/// Audit entries one page shows at most (newest first).
const AUDIT_ROWS: usize = 500;

/// The operator viewing a page, or the answer to give instead (login, or 403).
fn operator(ui: &Ui, headers: &HeaderMap) -> Result<Viewer, Failure> {
    let v = need(ui, headers)?;
    if v.operator {
        Ok(v)
    } else {
        Err(Failure::forbidden(
            "operator pages need FULL access on the acl target (`acl add --access FULL --target type=acl`)",
        ))
    }
}

fn operator_post(ui: &Ui, headers: &HeaderMap, token: &str) -> Result<Viewer, Failure> {
    let v = need_post(ui, headers, token)?;
    if v.operator {
        Ok(v)
    } else {
        Err(Failure::forbidden(
            "operator changes need FULL access on the acl target",
        ))
    }
}

/// The delete-passphrase field of a change that may need the step-up (users only: the built-in
/// administrator acts as the admin socket does).
fn step_up(v: &Viewer) -> Markup {
    html! {
        @if !v.builtin {
            label { "Delete passphrase (if your account has one)" input type="password" name="delete_passphrase" autocomplete="off"; }
        }
    }
}

/// Back to `page`, with a note of what was done or refused kept in the session (never in the
/// URL: a link cannot put words on an operator's page).
fn back(
    ui: &Ui,
    headers: &HeaderMap,
    page: &str,
    outcome: Result<String, ApplianceError>,
) -> Response {
    let note = match outcome {
        Ok(d) => (true, d),
        Err(e) => (false, Failure::from(e).1),
    };
    ui.set_note(headers, note);
    Redirect::to(page).into_response()
}

/// The note a change left for this session's next page, shown once.
fn notes(ui: &Ui, headers: &HeaderMap) -> Markup {
    match ui.take_note(headers) {
        Some((true, d)) => pages::notes(Some(&d), None),
        Some((false, e)) => pages::notes(None, Some(&e)),
        None => pages::notes(None, None),
    }
}

/// One row of the freshness table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Fresh {
    pub(super) identity: String,
    pub(super) path: String,
    /// The last complete backup (appliance time; 0: none).
    pub(super) last_us: i64,
    /// A partial backup newer than the last complete one.
    pub(super) partial_since: bool,
    pub(super) schedule: Option<String>,
    pub(super) late: bool,
}

/// Every `identity:path` with its last complete backup, and whether it is late against the
/// schedule of its effective policy at `now_us`: late when the schedule fired after the last
/// complete backup more than [`LATE_AFTER_US`] ago.
pub(super) fn freshness(
    snaps: &[v1::Snapshot],
    levels: &[(PolicyTarget, Policy)],
    now_us: i64,
) -> Vec<Fresh> {
    let mut by: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    // Sealed snapshots count too: their path is an opaque tag, stable per source.
    for s in snaps {
        let at = if s.committed_us > 0 {
            s.committed_us
        } else {
            s.time_us
        };
        let e = by.entry((s.identity.clone(), s.path.clone())).or_default();
        if s.partial {
            e.1 = e.1.max(at);
        } else {
            e.0 = e.0.max(at);
        }
    }
    by.into_iter()
        .map(|((identity, path), (last, partial))| {
            let schedule = policy::resolve(levels, &identity, &path).policy.schedule;
            let late = schedule
                .as_deref()
                .and_then(|s| Schedule::parse(s).ok())
                .is_some_and(|s| {
                    let from = if last > 0 { last } else { partial };
                    now_us > s.next_after(from) + LATE_AFTER_US
                });
            Fresh {
                identity,
                path,
                last_us: last,
                partial_since: partial > last,
                schedule,
                late,
            }
        })
        .collect()
}

fn freshness_table(rows: &[Fresh]) -> Markup {
    html! {
        table id="freshness" {
            thead { tr { th { "Account" } th { "Path" } th { "Last complete backup" } th { "Schedule" } th { "State" } } }
            tbody { @for r in rows { tr {
                td { (r.identity) }
                td.mono { (r.path) }
                td { (when(r.last_us)) @if r.partial_since { " " span.tag.warn { "partial since" } } }
                td.mono { @match &r.schedule { Some(s) => (s), None => (dash()) } }
                td { @if r.late { span.late { "late" } } @else if r.schedule.is_some() { span.ok { "on time" } } @else { span.muted { "no schedule" } } }
            } } }
        }
        @if rows.is_empty() { p.muted { "No snapshots yet." } }
    }
}

/// A rate in whole bytes per second.
fn rate(r: f64) -> u64 {
    format!("{:.0}", r.max(0.0)).parse().unwrap_or(0)
}

fn status_cards(s: &admin::StatusReport) -> Markup {
    html! {
        div.cards {
            div.card { span.muted { "Version · mode" } b { (s.version) } (s.mode) }
            div.card { span.muted { "Uptime" } b { (pages::duration(s.uptime_secs)) } (s.shards) " shards" }
            div.card { span.muted { "Disk free" } b { (bytes(s.disk_free_bytes)) } "of " (bytes(s.disk_size_bytes)) }
            div.card { span.muted { "Received (1 min)" } b { (bytes(rate(s.receive_rate_1m))) "/s" } (s.sessions) " sessions" }
            div.card { span.muted { "Since start" } b { (s.snapshots_committed) " snapshots" } (bytes(s.stored_bytes)) " new of " (bytes(s.received_bytes)) }
            div.card { span.muted { "Last maintenance" } b { (when(s.maintenance_last_run_us)) }
                (s.maintenance_errors) " errors, " (bytes(s.maintenance_freed_bytes)) " freed" }
        }
    }
}

fn sessions_table(ui: &Ui) -> Markup {
    let now = tokio::time::Instant::now();
    let mut rows: Vec<(String, u64, u64, u64)> = ui
        .auth
        .overview()
        .into_iter()
        .map(|(id, s)| {
            let age = now.duration_since(s.started).as_secs();
            let idle = now.duration_since(s.idle_since()).as_secs();
            let stored = s.stored_bytes.load(std::sync::atomic::Ordering::Relaxed);
            (id, age, idle, stored)
        })
        .collect();
    rows.sort();
    html! {
        table {
            thead { tr { th { "Account" } th.num { "Open for" } th.num { "Idle" } th.num { "Stored" } th.num { "Throughput" } } }
            tbody { @for (id, age, idle, stored) in &rows { tr {
                td { (id) } td.num { (pages::duration(*age)) } td.num { (pages::duration(*idle)) }
                td.num { (bytes(*stored)) } td.num { (bytes(stored / age.max(&1))) "/s" }
            } } }
        }
        @if rows.is_empty() { p.muted { "No sessions." } }
    }
}

fn space_table(r: &admin::UsageReport, quotas: &BTreeMap<String, Option<u64>>) -> Markup {
    html! {
        table {
            thead { tr { th { "Account" } th.num { "Snapshots" } th.num { "Logical" } th.num { "Only theirs" } th.num { "Shared" } th.num { "Quota" } } }
            tbody { @for o in &r.owners { tr {
                td { (o.owner) } td.num { (o.snapshots) } td.num { (bytes(o.logical_bytes)) }
                td.num { (bytes(o.only_bytes)) } td.num { (bytes(o.shared_bytes)) }
                td.num { @match quotas.get(&o.owner).copied().flatten() { Some(q) => (bytes(q)), None => (dash()) } }
            } } }
        }
        p.muted { "Referenced in all: " (bytes(r.referenced_bytes)) }
    }
}

pub(super) async fn overview(State(ui): St, headers: HeaderMap) -> Page {
    let v = operator(&ui, &headers)?;
    overview_page(&ui, &v, None).await
}

#[derive(Debug, Deserialize)]
pub(super) struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

/// Counts space by account (a POST: it walks every snapshot and renews the quotas' base), one
/// count at a time, then shows the overview with it.
pub(super) async fn count_space(
    State(ui): St,
    headers: HeaderMap,
    Form(f): Form<CsrfOnly>,
) -> Page {
    use std::sync::atomic::Ordering;
    let v = operator_post(&ui, &headers, &f.csrf)?;
    if ui.counting.swap(true, Ordering::SeqCst) {
        return Err(Failure(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "a space count is already running; try again when it is done".into(),
        ));
    }
    let r = ui
        .admin
        .call(
            Request::Usage {
                by: admin::UsageBy::User,
            },
            &v.identity,
        )
        .await;
    ui.counting.store(false, Ordering::SeqCst);
    overview_page(&ui, &v, r?.usage).await
}

async fn overview_page(ui: &Arc<Ui>, v: &Viewer, space: Option<admin::UsageReport>) -> Page {
    let (snaps, levels, users) = catalog(ui, |c| {
        Ok::<_, crate::catalog::CatalogError>((c.snapshots()?, c.policies()?, c.users()?))
    })
    .await?;
    let rows = freshness(&snaps, &levels, crate::clock::now_us());
    let status = ui.admin.scrape.status();
    let quotas: BTreeMap<String, Option<u64>> =
        users.into_iter().map(|u| (u.identity, u.quota)).collect();
    let late = rows.iter().filter(|r| r.late).count();
    let body = html! {
        (status_cards(&status))
        h2 { "Freshness" @if late > 0 { " " span.late { "(" (late) " late)" } } }
        (freshness_table(&rows))
        h2 { "Sessions in progress" }
        (sessions_table(ui))
        h2 { "Space by account" }
        @match &space {
            Some(r) => (space_table(r, &quotas)),
            None => form method="post" action="/operator" {
                (csrf(v))
                button.quiet type="submit" { "Count space now" }
                span.muted { " (walks every snapshot)" }
            },
        }
    };
    Ok(pages::page(Some(v), "Overview", &body))
}

pub(super) async fn accounts(State(ui): St, headers: HeaderMap) -> Page {
    let v = operator(&ui, &headers)?;
    let mut users = catalog(&ui, crate::catalog::Catalog::users).await?;
    users.sort_by(|a, b| a.identity.cmp(&b.identity));
    let body = html! {
        (notes(&ui, &headers))
        form.panel method="post" action="/operator/accounts" {
            (csrf(&v))
            input type="hidden" name="op" value="add";
            label { "New account (user@host)" input type="text" name="identity" required; }
            label { "Password" input type="password" name="password" autocomplete="new-password" required; }
            button type="submit" { "Add account" }
        }
        table {
            thead { tr { th { "Account" } th { "Created" } th { "Role" } th.num { "Quota" } th { "Set a new password" } th { "" } } }
            tbody { @for u in &users { tr {
                td { (u.identity) }
                td { (when(u.created_unix.saturating_mul(1_000_000))) }
                td { @match &u.role { Some(r) => (r), None => (dash()) } }
                td.num { @match u.quota { Some(q) => (bytes(q)), None => (dash()) } }
                td { form.inline method="post" action="/operator/accounts" {
                    (csrf(&v))
                    input type="hidden" name="op" value="password";
                    input type="hidden" name="identity" value=(u.identity);
                    input type="password" name="password" autocomplete="new-password" required placeholder="new password";
                    " " button.quiet type="submit" { "Reset" }
                } }
                td { form.inline method="post" action="/operator/accounts" {
                    (csrf(&v))
                    input type="hidden" name="op" value="disable";
                    input type="hidden" name="identity" value=(u.identity);
                    button.danger type="submit" title="replaces the password with a random one nobody is told and ends the account's sessions" { "Disable" }
                } }
            } } }
        }
        p.muted { "Disabling replaces the password with a random one nobody is told and ends the account's sessions; setting a new password enables it again. Snapshots are kept." }
    };
    Ok(pages::page(Some(&v), "Accounts", &body))
}

/// An account change (no `Debug`: it holds a password).
#[derive(Deserialize)]
pub(super) struct AccountForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    op: String,
    #[serde(default)]
    identity: String,
    #[serde(default)]
    password: String,
}

/// Whether the operator may change account `identity` (normalised: the account a change
/// would reach) — FULL on its `user` target too.
fn may_change_account(v: &Viewer, identity: &str) -> bool {
    let Ok(identity) = crate::access::normalise_identity(identity) else {
        return false;
    };
    let (u, h) = identity.split_once('@').unwrap_or((&identity, ""));
    v.builtin
        || rules::access(
            &v.rules,
            &v.identity,
            TargetType::User,
            &[("username", u), ("hostname", h)],
        ) == Some(Access::Full)
}

async fn account_request(
    ui: &Arc<Ui>,
    f: &AccountForm,
) -> Result<(Request, String), ApplianceError> {
    let identity = crate::access::normalise_identity(&f.identity)?;
    let password = if f.op == "disable" {
        hex::encode(rand::random::<[u8; 32]>())
    } else if f.password.chars().count() < crate::access::accounts::MIN_PASSWORD_CHARS {
        return Err(ApplianceError::InvalidArgument(format!(
            "passwords have at least {} characters",
            crate::access::accounts::MIN_PASSWORD_CHARS
        )));
    } else {
        f.password.clone()
    };
    let hash = ui.auth.hash_new_password(password).await?;
    if f.op == "add" {
        let user = crate::catalog::UserRecord {
            identity: identity.clone(),
            password_hash: hash,
            created_unix: crate::clock::now_us() / 1_000_000,
            owner: Some(hex::encode(rand::random::<[u8; 16]>())),
            quota: None,
            delete_passphrase: None,
            role: None,
        };
        return Ok((Request::UserAdd { user }, format!("added {identity}")));
    }
    let id = identity.clone();
    let current = {
        let c = ui.catalog.clone();
        tokio::task::spawn_blocking(move || c.user(&id))
            .await
            .map_err(|e| ApplianceError::Internal(e.to_string()))??
    }
    .ok_or_else(|| ApplianceError::NotFound(format!("no user {identity}")))?;
    let user = crate::catalog::UserRecord {
        password_hash: hash,
        ..current
    };
    let done = match f.op.as_str() {
        "disable" => format!("disabled {identity}: its sessions ended"),
        "password" => format!("set a new password for {identity}"),
        o => {
            return Err(ApplianceError::InvalidArgument(format!(
                "unknown operation {o:?}"
            )))
        }
    };
    Ok((Request::UserSet { user }, done))
}

pub(super) async fn account_change(
    State(ui): St,
    headers: HeaderMap,
    Form(f): Form<AccountForm>,
) -> Response {
    let v = match operator_post(&ui, &headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let outcome = async {
        // A malformed identity is said to be one, before any access question.
        crate::access::normalise_identity(&f.identity)?;
        if !may_change_account(&v, &f.identity) {
            return Err(ApplianceError::PermissionDenied(format!(
                "{} may not change the account {}",
                v.identity, f.identity
            )));
        }
        let (req, done) = account_request(&ui, &f).await?;
        ui.admin.call(req, &v.identity).await?;
        Ok(done)
    }
    .await;
    back(&ui, &headers, "/operator/accounts", outcome)
}

pub(super) async fn rules(State(ui): St, headers: HeaderMap) -> Page {
    let v = operator(&ui, &headers)?;
    let reply = catalog(&ui, |c| admin::apply(c, &Request::AclList)).await?;
    let body = html! {
        (notes(&ui, &headers))
        @if reply.defaults { p.muted { "No rules are stored: the built-in defaults (" (reply.default_access) ") apply." } }
        table {
            thead { tr { th { "Id" } th { "Who" } th { "Access" } th { "Target" } th { "" } } }
            tbody { @for r in &reply.rules { tr {
                td.mono { (r.id) } td.mono { (r.user) } td { (r.access) } td.mono { (r.target) }
                td { @if !reply.defaults { form.inline method="post" action="/operator/rules" {
                    (csrf(&v))
                    input type="hidden" name="op" value="remove";
                    input type="hidden" name="id" value=(r.id);
                    @if !v.builtin { input type="password" name="delete_passphrase" autocomplete="off" placeholder="delete passphrase, if any"; " " }
                    button.danger type="submit" { "Remove" }
                } } }
            } } }
        }
        form.panel method="post" action="/operator/rules" {
            (csrf(&v))
            input type="hidden" name="op" value="add";
            label { "Who (user@host, * allowed)" input type="text" name="user" required placeholder="*@*"; }
            label { "Access" select name="access" { option { "READ" } option { "APPEND" } option { "FULL" } } }
            label { "Target" input type="text" name="target" required placeholder="type=snapshot,username=OWN_USER"; }
            (step_up(&v))
            button type="submit" { "Add rule" }
        }
    };
    Ok(pages::page(Some(&v), "Rules", &body))
}

#[derive(Debug, Deserialize)]
pub(super) struct RuleForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    op: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    access: String,
    #[serde(default)]
    target: String,
    #[serde(default)]
    delete_passphrase: String,
}

pub(super) async fn rule_change(
    State(ui): St,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(f): Form<RuleForm>,
) -> Response {
    let v = match operator_post(&ui, &headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let outcome = async {
        match (f.op.as_str(), &v.session) {
            // A user adds a rule as the RPC does: FULL on acl, and the step-up.
            ("add", Some(s)) => {
                let req = v1::AddRuleRequest {
                    user: f.user.clone(),
                    access: f.access.clone(),
                    target: f.target.clone(),
                    delete_passphrase: f.delete_passphrase.clone(),
                };
                let r = ui.service.add_rule_for(s, peer.0, req).await?;
                Ok(format!("added rule {}", r.id))
            }
            ("add", None) => {
                let access: Access = f.access.parse()?;
                let rule = Rule::new(&f.user, access, Target::parse(&f.target)?)?;
                let done = format!("added rule {}", rule.id);
                ui.admin.call(Request::AclAdd { rule }, &v.identity).await?;
                Ok(done)
            }
            ("remove", session) => {
                // Removing a rule can take access from others: the step-up, as for adding.
                if let Some(s) = session {
                    ui.service
                        .step_up_for(s, &f.delete_passphrase, peer.0)
                        .await?;
                }
                let req = Request::AclRemove {
                    ids: vec![f.id.clone()],
                };
                ui.admin.call(req, &v.identity).await?;
                Ok(format!("removed rule {}", f.id))
            }
            (o, _) => Err(ApplianceError::InvalidArgument(format!(
                "unknown operation {o:?}"
            ))),
        }
    }
    .await;
    back(&ui, &headers, "/operator/rules", outcome)
}

pub(super) async fn policies(State(ui): St, headers: HeaderMap) -> Page {
    let v = operator(&ui, &headers)?;
    let levels = catalog(&ui, crate::catalog::Catalog::policies).await?;
    let body = html! {
        (notes(&ui, &headers))
        table {
            thead { tr { th { "Level" } th { "Settings" } } }
            tbody { @for (t, p) in &levels { tr {
                td.mono { (t) } td.mono { (serde_json::to_string(p).unwrap_or_default()) }
            } } }
        }
        @if levels.is_empty() { p.muted { "No policies: every snapshot is kept, clients choose their settings." } }
        form.panel method="post" action="/operator/policies" {
            (csrf(&v))
            label { "Level" input type="text" name="target" required placeholder="global, @host, user@host or user@host:/path"; }
            label { "Setting" select name="field" { @for f in admin::POLICY_FIELDS { option { (f) } } } }
            label { "Value (JSON; empty unsets)" input type="text" name="value" placeholder="7 or 6h"; }
            (step_up(&v))
            button type="submit" { "Set" }
        }
        p.muted { "Weakening retention or a lock needs the delete passphrase, as it does from a client." }
    };
    Ok(pages::page(Some(&v), "Policies", &body))
}

#[derive(Debug, Deserialize)]
pub(super) struct PolicyForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    target: String,
    #[serde(default)]
    field: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    delete_passphrase: String,
}

fn policy_request(f: &PolicyForm) -> Result<Request, ApplianceError> {
    if !admin::POLICY_FIELDS.contains(&f.field.as_str()) {
        return Err(ApplianceError::InvalidArgument(format!(
            "unknown setting {:?}",
            f.field
        )));
    }
    let value = f.value.trim();
    if value.is_empty() {
        return Ok(Request::PolicySet {
            target: f.target.trim().to_string(),
            policy: Policy::default(),
            unset: vec![f.field.clone()],
        });
    }
    // A bare word is a string (`6h`), anything else JSON.
    let parsed = serde_json::from_str::<serde_json::Value>(value)
        .unwrap_or_else(|_| serde_json::Value::String(value.to_string()));
    let policy: Policy = serde_json::from_value(serde_json::json!({ f.field.clone(): parsed }))
        .map_err(|e| ApplianceError::InvalidArgument(format!("{}: {e}", f.field)))?;
    Ok(Request::PolicySet {
        target: f.target.trim().to_string(),
        policy,
        unset: Vec::new(),
    })
}

pub(super) async fn policy_change(
    State(ui): St,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(f): Form<PolicyForm>,
) -> Response {
    let v = match operator_post(&ui, &headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let outcome = async {
        let req = policy_request(&f)?;
        match &v.session {
            // A user changes a policy as the RPC does: FULL on the level, and the step-up
            // when it weakens retention or a lock.
            Some(s) => {
                let Request::PolicySet {
                    target,
                    policy,
                    unset,
                } = req
                else {
                    unreachable!("policy_request answers PolicySet");
                };
                let req = v1::SetPolicyRequest {
                    target,
                    policy_json: serde_json::to_string(&policy).unwrap_or_default(),
                    unset,
                    delete_passphrase: f.delete_passphrase.clone(),
                };
                ui.service.set_policy_for(s, peer.0, req).await?;
            }
            None => {
                ui.admin.call(req, &v.identity).await?;
            }
        }
        Ok(format!("{} set at {}", f.field, f.target.trim()))
    }
    .await;
    back(&ui, &headers, "/operator/policies", outcome)
}

fn runs_table(entries: &[crate::catalog::audit::Entry]) -> Markup {
    html! {
        table {
            thead { tr { th { "When" } th { "By" } th { "What it did" } } }
            tbody { @for e in entries { tr { td { (when(e.time_us)) } td { (e.actor) } td { (e.detail) } } } }
        }
        @if entries.is_empty() { p.muted { "No maintenance has run yet." } }
    }
}

pub(super) async fn maintenance(State(ui): St, headers: HeaderMap) -> Page {
    let v = operator(&ui, &headers)?;
    let mut runs = catalog(&ui, |c| c.audit_entries(0)).await?;
    runs.retain(|e| e.action == "maintenance.run");
    runs.reverse();
    runs.truncate(50);
    let s = ui.admin.scrape.status();
    let body = html! {
        (notes(&ui, &headers))
        p { "Last run " (when(s.maintenance_last_run_us)) " took " (format!("{:.1}", s.maintenance_last_duration_secs)) " s; "
            (s.maintenance_runs) " runs and " (s.maintenance_errors) " errors since start, " (bytes(s.maintenance_freed_bytes)) " freed." }
        form.panel method="post" action="/operator/maintenance" {
            (csrf(&v))
            label { "Mode" select name="mode" { option value="dry" { "dry run (change nothing)" } option value="run" { "run: forget and collect" } } }
            button type="submit" { "Run maintenance" }
        }
        h2 { "Recent runs" }
        (runs_table(&runs))
    };
    Ok(pages::page(Some(&v), "Maintenance", &body))
}

#[derive(Debug, Deserialize)]
pub(super) struct RunForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    mode: String,
}

pub(super) async fn maintenance_run(
    State(ui): St,
    headers: HeaderMap,
    Form(f): Form<RunForm>,
) -> Response {
    let v = match operator_post(&ui, &headers, &f.csrf) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let dry_run = f.mode != "run";
    let outcome = ui
        .admin
        .call(
            Request::MaintenanceRun {
                dry_run,
                now_us: None,
            },
            &v.identity,
        )
        .await
        .map(|r| {
            let gc = r.gc.unwrap_or_default();
            let forget = r.verdicts.iter().filter(|x| !x.kept()).count();
            if dry_run {
                format!(
                    "dry run: would forget {forget} snapshots and free {}",
                    bytes(gc.condemned_bytes)
                )
            } else {
                format!(
                    "forgot {} snapshots; removed {} chunks; freed {}",
                    r.forgotten,
                    gc.condemned,
                    bytes(gc.bytes_deleted)
                )
            }
        });
    back(&ui, &headers, "/operator/maintenance", outcome)
}

pub(super) async fn audit(State(ui): St, headers: HeaderMap, RawQuery(query): RawQuery) -> Page {
    let v = operator(&ui, &headers)?;
    let days: i64 = pages::query_text(query.as_deref(), "days")
        .and_then(|d| d.parse().ok())
        .unwrap_or(7)
        .clamp(1, 3660);
    let since = crate::clock::now_us() - days * 86_400 * 1_000_000;
    let verify = pages::query_text(query.as_deref(), "verify").is_some();
    let (mut entries, verified) = catalog(&ui, move |c| {
        let v = if verify {
            Some(c.audit_verify()?)
        } else {
            None
        };
        Ok::<_, crate::catalog::CatalogError>((c.audit_entries(since)?, v))
    })
    .await?;
    entries.reverse();
    let total = entries.len();
    entries.truncate(AUDIT_ROWS);
    let body = html! {
        p { "The last " (days) " days: " (total) " entries" @if total > AUDIT_ROWS { " (the newest " (AUDIT_ROWS) " shown)" } ". "
            a href=(format!("/operator/audit?days={days}&verify=1")) { "Check the chain" } }
        @if let Some(r) = &verified {
            @if r.problems.is_empty() { p.done { "The chain holds: " (r.entries) " entries checked." } }
            @else { p.error { (r.problems.len()) " problems: " (r.problems.join("; ")) } }
        }
        table {
            thead { tr { th.num { "#" } th { "When" } th { "Who" } th { "Action" } th { "Target" } th { "Outcome" } th { "Detail" } } }
            tbody { @for e in &entries { tr {
                td.num { (e.seq) } td { (when(e.time_us)) } td { (e.actor) } td.mono { (e.action) }
                td.mono { (e.target) }
                td { @match e.outcome { crate::catalog::audit::Outcome::Done => span.ok { "done" }, crate::catalog::audit::Outcome::Refused => span.late { "refused" } } }
                td { (e.detail) }
            } } }
        }
    };
    Ok(pages::page(Some(&v), "Audit log", &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(identity: &str, path: &str, at_s: i64, partial: bool) -> v1::Snapshot {
        v1::Snapshot {
            identity: identity.into(),
            path: path.into(),
            time_us: at_s * 1_000_000,
            committed_us: at_s * 1_000_000,
            partial,
            ..v1::Snapshot::default()
        }
    }

    #[test]
    fn a_source_is_late_an_hour_after_its_schedule_fired_without_a_complete_backup() {
        let levels = vec![(
            PolicyTarget::parse("alice@laptop").unwrap(),
            Policy {
                schedule: Some("6h".into()),
                ..Policy::default()
            },
        )];
        let h = 3600;
        let snaps = vec![
            snap("alice@laptop", "/home", 7 * h, false),
            snap("alice@laptop", "/home", 13 * h, true),
            snap("bob@desk", "/srv", h, false),
        ];
        // The 6h schedule fires at 12:00 after the 07:00 backup; late from 13:00 on (the
        // partial backup at 13:00 does not count).
        let at = |now_h: i64| freshness(&snaps, &levels, now_h * h * 1_000_000 + 1);
        let rows = at(12);
        assert_eq!(rows.len(), 2);
        let alice = &rows[0];
        assert_eq!(
            (alice.identity.as_str(), alice.late, alice.partial_since),
            ("alice@laptop", false, true)
        );
        assert_eq!(alice.last_us, 7 * h * 1_000_000);
        assert!(at(13)[0].late);
        // No schedule: never late.
        assert!(!at(1000)[1].late);
        assert_eq!(at(1000)[1].schedule, None);
    }
}
