//! The pages every user has: login, their snapshots, browsing a snapshot, downloads (a file,
//! or a directory as a streamed `.tar`), the diff of two snapshots, and their policy.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Extension, Form, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use coffer_proto::v1::{self, Node, NodeKind};
use coffer_proto::{ChunkId, SnapshotId};
use futures::StreamExt;
use maud::{html, Markup};
use serde::Deserialize;

use super::content::{Found, Still, MAX_CHANGES};
use super::pages::{self, bytes, dash, enc, name, when};
use super::{cookie, need, need_post, same, set_cookie, Failure, Page, Peer, St, Ui, Viewer};
use super::{BUILTIN_ADMIN, COOKIE, LOGIN_COOKIE};
use crate::catalog::policy::PolicyTarget;
use crate::error::ApplianceError;

/// Entries one page of a listing shows.
const PAGE_ENTRIES: usize = 1000;

/// The login form (no `Debug`: it holds a password).
#[derive(Deserialize)]
pub(super) struct LoginForm {
    #[serde(default)]
    identity: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct CsrfForm {
    #[serde(default)]
    pub(super) csrf: String,
}

/// Runs a catalog read on the blocking pool.
pub(super) async fn catalog<T: Send + 'static, E: Into<ApplianceError> + Send + 'static>(
    ui: &Arc<Ui>,
    f: impl FnOnce(&crate::catalog::Catalog) -> Result<T, E> + Send + 'static,
) -> Result<T, Failure> {
    let c = ui.catalog.clone();
    tokio::task::spawn_blocking(move || f(&c))
        .await
        .map_err(|e| Failure::from(ApplianceError::Internal(format!("catalog read: {e}"))))?
        .map_err(|e| Failure::from(e.into()))
}

fn login_page(ui: &Ui, csrf: &str, error: Option<&str>, identity: &str) -> Response {
    let body = html! {
        form.login method="post" action="/login" {
            (pages::notes(None, error))
            input type="hidden" name="csrf" value=(csrf);
            label { "Account (user@host)"
                input type="text" name="identity" value=(identity) autocomplete="username" required autofocus;
            }
            label { "Password"
                input type="password" name="password" autocomplete="current-password" required;
            }
            button type="submit" { "Log in" }
            @if ui.builtin.is_some() {
                p.muted { "The local administrator is " code { (BUILTIN_ADMIN) } ", with the password the appliance printed when it started." }
            }
        }
    };
    pages::page(None, "Log in", &body)
}

pub(super) async fn login_form(State(ui): St, headers: HeaderMap) -> Response {
    if ui.viewer(&headers).is_some() {
        return Redirect::to("/").into_response();
    }
    let pre = hex::encode(rand::random::<[u8; 32]>());
    let mut r = login_page(&ui, &ui.csrf_of(&pre), None, "");
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(LOGIN_COOKIE, &pre, Some(3600)),
    );
    r
}

pub(super) async fn login(
    State(ui): St,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let Some(pre) = cookie(&headers, LOGIN_COOKIE)
        .filter(|p| same(&ui.csrf_of(p), &f.csrf))
        .map(str::to_string)
    else {
        return Failure::forbidden(
            "this login form is stale or was not sent by this site; open the login page again",
        )
        .into_response();
    };
    let outcome = match &ui.builtin {
        Some(pw) if f.identity == BUILTIN_ADMIN => {
            if same(pw, &f.password) {
                Ok((BUILTIN_ADMIN.to_string(), None))
            } else {
                let from = peer
                    .0
                    .map_or("an unknown address".into(), |ip| ip.to_string());
                let event = crate::catalog::audit::Event::refused(
                    BUILTIN_ADMIN,
                    "ui.login",
                    BUILTIN_ADMIN,
                    &format!("wrong password from {from}"),
                );
                if let Err(e) = catalog(&ui, move |c| c.audit(&event)).await {
                    tracing::warn!(error = %e.1, "audit entry for a failed UI login not written");
                }
                Err(ApplianceError::Unauthenticated(
                    "unknown user or wrong password".into(),
                ))
            }
        }
        _ => match ui.auth.login(&f.identity, &f.password, peer.0).await {
            Ok((token, identity)) => {
                if ui.auth.session(Some(&token)).is_ok_and(|s| s.control) {
                    ui.auth.end_session(&token);
                    Err(ApplianceError::PermissionDenied(
                        "the server control user cannot use the web UI".into(),
                    ))
                } else {
                    Ok((identity, Some(token)))
                }
            }
            Err(e) => Err(e),
        },
    };
    match outcome {
        Ok((identity, token)) => {
            let to = if token.is_none() { "/operator" } else { "/" };
            tracing::info!(%identity, "web UI login");
            let c = ui.open(identity, token);
            let mut r = Redirect::to(to).into_response();
            let h = r.headers_mut();
            h.append(header::SET_COOKIE, set_cookie(COOKIE, &c, None));
            h.append(header::SET_COOKIE, set_cookie(LOGIN_COOKIE, "", Some(0)));
            r
        }
        Err(e) => {
            let Failure(code, why) = Failure::from(e);
            let mut r = login_page(&ui, &ui.csrf_of(&pre), Some(&why), &f.identity);
            *r.status_mut() = code;
            r
        }
    }
}

pub(super) async fn logout(State(ui): St, headers: HeaderMap, Form(f): Form<CsrfForm>) -> Response {
    if let Err(r) = need_post(&ui, &headers, &f.csrf) {
        return r.into_response();
    }
    ui.close(&headers);
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut()
        .append(header::SET_COOKIE, set_cookie(COOKIE, "", Some(0)));
    r
}

fn host_of(s: &v1::Snapshot) -> &str {
    if s.hostname.is_empty() {
        s.identity.split_once('@').map_or("", |(_, h)| h)
    } else {
        &s.hostname
    }
}

/// Seconds between the client's start and the appliance's commit (`None` when unknown: a
/// snapshot committed before the appliance recorded its commit time, or a client clock ahead).
fn took(s: &v1::Snapshot) -> Option<u64> {
    (s.committed_us > 0 && s.committed_us >= s.time_us)
        .then(|| u64::try_from((s.committed_us - s.time_us) / 1_000_000).unwrap_or(0))
}

fn flags(s: &v1::Snapshot, now_us: i64) -> Markup {
    html! {
        @if s.partial { span.tag.warn title="some files could not be read" { "partial" } }
        @if s.lock_until_us > now_us { span.tag title=(format!("locked until {}", when(s.lock_until_us))) { "locked" } }
        @if s.protected_until_us > now_us { span.tag title="protected from deletion and retention" { "protected" } }
        @if !s.sealed.is_empty() { span.tag { "sealed" } }
    }
}

pub(super) async fn snapshots(
    State(ui): St,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Page {
    let v = need(&ui, &headers)?;
    let host = pages::query_text(query.as_deref(), "host");
    let path = pages::query_text(query.as_deref(), "path");
    let all = catalog(&ui, crate::catalog::Catalog::snapshots).await?;
    let mut shown: Vec<v1::Snapshot> = all.into_iter().filter(|s| v.lists(s)).collect();
    let hosts: std::collections::BTreeSet<String> =
        shown.iter().map(|s| host_of(s).to_string()).collect();
    let paths: std::collections::BTreeSet<String> = shown.iter().map(|s| s.path.clone()).collect();
    shown.retain(|s| host.as_deref().is_none_or(|h| host_of(s) == h));
    shown.retain(|s| path.as_deref().is_none_or(|p| s.path == p));
    shown.sort_by_key(|s| std::cmp::Reverse(s.time_us));
    let now = crate::clock::now_us();
    let body = html! {
        @if v.role == crate::access::Role::WriteOnly {
            p.muted { "This account may add snapshots but not list them (write-only)." }
        }
        form.panel method="get" action="/" {
            label { "Host"
                select name="host" {
                    option value="" { "all" }
                    @for h in &hosts { option value=(h) selected[host.as_deref() == Some(h)] { (h) } }
                }
            }
            label { "Path"
                select name="path" {
                    option value="" { "all" }
                    @for p in &paths { option value=(p) selected[path.as_deref() == Some(p)] { (p) } }
                }
            }
            button.quiet type="submit" { "Filter" }
        }
        form method="get" action="/diff" {
            table {
                thead { tr {
                    th { "Time" } th { "Id" } th { "Account" } th { "Path" } th.num { "Size" } th.num { "Files" }
                    th.num { "Took" } th { "" } th title="choose a snapshot to compare from, and one to compare to" { "From · To" }
                } }
                tbody {
                    @for s in &shown {
                        @let id = hex::encode(&s.id);
                        tr {
                            td { @if v.reads(s) { a href=(format!("/snapshots/{id}")) { (when(s.time_us)) } } @else { (when(s.time_us)) } }
                            td.mono.muted title=(id) { (id[..8.min(id.len())]) }
                            td { (s.identity) }
                            td.mono { (s.path) }
                            td.num { (bytes(s.stats.as_ref().map_or(0, |t| t.bytes))) }
                            td.num { (s.stats.as_ref().map_or(0, |t| t.files)) }
                            td.num { @match took(s) { None => (dash()), Some(0) => "< 1 s", Some(t) => (pages::duration(t)) } }
                            td { (flags(s, now)) }
                            td { input type="radio" name="a" value=(id) title="from"; " " input type="radio" name="b" value=(id) title="to"; }
                        }
                    }
                }
            }
            @if shown.is_empty() { p.muted { "No snapshots to show." } }
            @else { p { button.quiet type="submit" { "Compare the two selected" } } }
        }
    };
    Ok(pages::page(Some(&v), "Snapshots", &body))
}

/// What a download checks before each batch: the viewer's session still lives (not logged out,
/// not ended by a password, role or account change) and the rules still let it read `s`.
fn still(ui: &Arc<Ui>, v: &Viewer, s: &v1::Snapshot) -> Still {
    let (session, auth, identity, snap) = (
        v.session.clone(),
        ui.auth.clone(),
        v.identity.clone(),
        s.clone(),
    );
    Arc::new(move || {
        if let Some(session) = &session {
            session.state.check()?;
            if crate::access::rules::snapshot_access(&auth.rules(), &identity, &snap).is_none() {
                return Err(ApplianceError::PermissionDenied(
                    "access to this snapshot was revoked".into(),
                ));
            }
        }
        Ok(())
    })
}

/// The snapshot named in a URL, if the viewer may read it; the same answer whether it does
/// not exist or may not be read (the disclosure rule of the RPCs).
async fn readable(ui: &Arc<Ui>, v: &Viewer, id: &str) -> Result<v1::Snapshot, Failure> {
    let missing = || Failure::not_found(format!("no snapshot {id} that you may read"));
    let sid = SnapshotId::from_hex(id).map_err(|_| missing())?;
    let s = catalog(ui, move |c| c.snapshot(&sid)).await?;
    match s {
        Some(s) if v.reads(&s) => Ok(s),
        _ => Err(missing()),
    }
}

fn root_of(s: &v1::Snapshot) -> Result<ChunkId, Failure> {
    ChunkId::from_slice(&s.root)
        .map_err(|e| Failure::from(ApplianceError::Internal(format!("a snapshot's root: {e}"))))
}

fn managed(ui: &Ui) -> Result<(), Failure> {
    if ui.mode == crate::repo::Mode::Sealed {
        Err(Failure::bad(
            "this repository is sealed: the appliance cannot read its contents; browse and \
             restore with `coffer ls` and `coffer restore` on a machine holding the keyring",
        ))
    } else {
        Ok(())
    }
}

fn crumbs(id: &str, root: &str, path: &[Vec<u8>]) -> Markup {
    html! {
        div.crumbs.mono {
            a href=(format!("/snapshots/{id}")) { (root) }
            @for i in 0..path.len() {
                " / "
                a href=(format!("/snapshots/{id}?path={}", enc(&path[..=i].join(&b'/')))) { (name(&path[i])) }
            }
        }
    }
}

fn entry_row(id: &str, at: &[u8], n: &Node) -> Markup {
    let full: Vec<u8> = if at.is_empty() {
        n.name.to_vec()
    } else {
        [at, b"/", &n.name].concat()
    };
    let kind = match n.kind() {
        NodeKind::Dir => 'd',
        NodeKind::Symlink => 'l',
        _ => '-',
    };
    html! {
        tr {
            td.mono { (pages::mode(kind, n.mode)) }
            td.mono {
                @match n.kind() {
                    NodeKind::Dir => a href=(format!("/snapshots/{id}?path={}", enc(&full))) { (name(&n.name)) "/" },
                    NodeKind::File => a href=(format!("/snapshots/{id}/file?path={}", enc(&full))) download { (name(&n.name)) },
                    _ => { (name(&n.name)) " → " (name(&n.symlink_target)) },
                }
            }
            td.num { @if n.kind() == NodeKind::File { (bytes(n.size)) } @else { (dash()) } }
            td { (when(n.mtime_ns / 1000)) }
            td.mono { (n.uid) ":" (n.gid) }
        }
    }
}

pub(super) async fn browse(
    State(ui): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Page {
    let v = need(&ui, &headers)?;
    let s = readable(&ui, &v, &id).await?;
    let raw = pages::query_bytes(query.as_deref(), "path").unwrap_or_default();
    let path = pages::components(&raw);
    let from: usize = pages::query_text(query.as_deref(), "from")
        .and_then(|f| f.parse().ok())
        .unwrap_or(0)
        .min(super::content::MAX_LISTING);
    let summary = html! {
        p.muted {
            (s.identity) " · " span.mono { (s.path) } " · " (when(s.time_us)) " · "
            (bytes(s.stats.as_ref().map_or(0, |t| t.bytes))) " in "
            (s.stats.as_ref().map_or(0, |t| t.files)) " files " (flags(&s, crate::clock::now_us()))
        }
    };
    if ui.mode == crate::repo::Mode::Sealed {
        let body = html! {
            (summary)
            p { "This repository is sealed: the appliance cannot read what the snapshot holds. Browse and restore it with "
                code { "coffer ls" } " and " code { "coffer restore" } " on a machine holding the keyring." }
        };
        return Ok(pages::page(Some(&v), "Snapshot", &body));
    }
    let found = {
        let _turn = ui
            .walks
            .acquire()
            .await
            .map_err(|_| Failure::not_found("shutting down"))?;
        ui.contents.find(root_of(&s)?, &path).await?
    };
    let Found::Dir(_, mut entries) = found else {
        let to = format!("/snapshots/{id}/file?path={}", enc(&raw));
        return Ok(Redirect::to(&to).into_response());
    };
    entries.sort_by(|a, b| {
        (a.kind() != NodeKind::Dir, a.name.as_ref())
            .cmp(&(b.kind() != NodeKind::Dir, b.name.as_ref()))
    });
    let at = path.join(&b'/');
    let total = entries.len();
    let page: Vec<&Node> = entries.iter().skip(from).take(PAGE_ENTRIES).collect();
    let body = html! {
        (summary)
        (crumbs(&id, &s.path, &path))
        p { a href=(format!("/snapshots/{id}/tar?path={}", enc(&at))) { "Download this directory as .tar" } }
        table {
            thead { tr { th { "Mode" } th { "Name" } th.num { "Size" } th { "Modified" } th { "Owner" } } }
            tbody { @for n in &page { (entry_row(&id, &at, n)) } }
        }
        @if total > from + PAGE_ENTRIES {
            p { a href=(format!("/snapshots/{id}?path={}&from={}", enc(&at), from + PAGE_ENTRIES)) {
                "Next " (PAGE_ENTRIES) " of " (total) " entries" } }
        }
    };
    Ok(pages::page(Some(&v), "Snapshot", &body))
}

/// `attachment; filename="…"; filename*=UTF-8''…` for a raw name.
fn attachment(raw: &[u8]) -> HeaderValue {
    // Control and direction-changing characters never reach the name a browser saves.
    let shown: String = String::from_utf8_lossy(raw)
        .chars()
        .map(|c| {
            if c.is_control() || pages::bidi(c) {
                '_'
            } else {
                c
            }
        })
        .collect();
    let raw = shown.as_bytes();
    let plain: String = String::from_utf8_lossy(raw)
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    HeaderValue::from_str(&format!(
        "attachment; filename=\"{plain}\"; filename*=UTF-8''{}",
        pages::enc_attr(raw)
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// What a download names: the viewer, the snapshot (one it may read, in a managed
/// repository), the path's components and what they name.
async fn download_target(
    ui: &Arc<Ui>,
    headers: &HeaderMap,
    id: &str,
    query: Option<&str>,
) -> Result<(Viewer, v1::Snapshot, Vec<Vec<u8>>, Found), Failure> {
    let v = need(ui, headers)?;
    let s = readable(ui, &v, id).await?;
    managed(ui)?;
    let path = pages::components(&pages::query_bytes(query, "path").unwrap_or_default());
    let found = ui.contents.find(root_of(&s)?, &path).await?;
    Ok((v, s, path, found))
}

pub(super) async fn download(
    State(ui): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Page {
    let (v, s, _, found) = download_target(&ui, &headers, &id, query.as_deref()).await?;
    let Found::Leaf(node) = found else {
        return Err(Failure::bad("that is a directory: download it as .tar"));
    };
    if node.kind() != NodeKind::File {
        return Err(Failure::bad(
            "only files can be downloaded (that is a symbolic link)",
        ));
    }
    let permit = ui.download_slot(&v.identity)?;
    tracing::info!(identity = %v.identity, snapshot = %id, "web UI download");
    let size = node.size;
    let fname = node.name.clone();
    let stream = ui.contents.file(&node, still(&ui, &v, &s))?.map(move |r| {
        let _held = &permit;
        r.map_err(|e| std::io::Error::other(e.to_string()))
    });
    let mut r = Body::from_stream(stream).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(header::CONTENT_DISPOSITION, attachment(&fname));
    Ok(r)
}

pub(super) async fn tar(
    State(ui): St,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Page {
    let (v, s, path, found) = download_target(&ui, &headers, &id, query.as_deref()).await?;
    let Found::Dir(node, entries) = found else {
        return Err(Failure::bad("that is a file: download it directly"));
    };
    // The snapshot's root has no entry of its own: it is shown as a directory of the
    // snapshot's time.
    let node = node.unwrap_or_else(|| Node {
        kind: NodeKind::Dir.into(),
        mode: 0o755,
        mtime_ns: s.time_us.saturating_mul(1000),
        ..Node::default()
    });
    let node = Some(node);
    let permit = ui.download_slot(&v.identity)?;
    let top: Vec<u8> = path
        .last()
        .cloned()
        .unwrap_or_else(|| format!("snapshot-{}", &id[..id.len().min(8)]).into_bytes());
    tracing::info!(identity = %v.identity, snapshot = %id, "web UI .tar download");
    let top_path = std::path::PathBuf::from(
        <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(top.clone()),
    );
    let stream = ui
        .contents
        .tar(top_path, node, entries, still(&ui, &v, &s))
        .map(move |r| {
            let _held = &permit;
            r
        });
    let mut r = Body::from_stream(stream).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        attachment(&[top.as_slice(), b".tar"].concat()),
    );
    Ok(r)
}

pub(super) async fn diff(State(ui): St, headers: HeaderMap, RawQuery(query): RawQuery) -> Page {
    let v = need(&ui, &headers)?;
    let (Some(from), Some(to)) = (
        pages::query_text(query.as_deref(), "a"),
        pages::query_text(query.as_deref(), "b"),
    ) else {
        return Err(Failure::bad("choose two snapshots to compare (a and b)"));
    };
    let (sa, sb) = (
        readable(&ui, &v, &from).await?,
        readable(&ui, &v, &to).await?,
    );
    managed(&ui)?;
    let (changes, cut) = {
        let _turn = ui
            .walks
            .acquire()
            .await
            .map_err(|_| Failure::not_found("shutting down"))?;
        ui.contents.diff(root_of(&sa)?, root_of(&sb)?).await?
    };
    let body = html! {
        p.muted {
            "From " a href=(format!("/snapshots/{from}")) { (when(sa.time_us)) } " (" (sa.identity) " " span.mono { (sa.path) } ")"
            " to " a href=(format!("/snapshots/{to}")) { (when(sb.time_us)) } " (" (sb.identity) " " span.mono { (sb.path) } ")"
        }
        @if changes.is_empty() { p { "No differences." } }
        @else {
            table {
                thead { tr { th { "" } th { "Path" } th.num { "Before" } th.num { "After" } } }
                tbody { @for c in &changes { tr {
                    td.mono { (c.mark) }
                    td.mono { (name(&c.path)) }
                    td.num { @match c.before { Some(n) => (bytes(n)), None => (dash()) } }
                    td.num { @match c.after { Some(n) => (bytes(n)), None => (dash()) } }
                } } }
            }
            @if cut { p.muted { "Only the first " (MAX_CHANGES) " differences are shown." } }
        }
    };
    Ok(pages::page(Some(&v), "Differences", &body))
}

pub(super) async fn policy(State(ui): St, headers: HeaderMap) -> Page {
    let v = need(&ui, &headers)?;
    let me = v.identity.clone();
    if v.role == crate::access::Role::WriteOnly {
        let body =
            html! { p.muted { "This account may add snapshots but not list them (write-only)." } };
        return Ok(pages::page(Some(&v), "Policy", &body));
    }
    let (snaps, levels) = catalog(&ui, |c| {
        Ok::<_, crate::catalog::CatalogError>((c.snapshots()?, c.policies()?))
    })
    .await?;
    let mut paths: Vec<String> = snaps
        .into_iter()
        .filter(|s| s.identity == me && s.sealed.is_empty())
        .map(|s| s.path)
        .collect();
    paths.sort();
    paths.dedup();
    let rules = v.rules.clone();
    let shown: Vec<(String, Vec<crate::access::admin::PolicyField>)> = paths
        .into_iter()
        .filter(|p| {
            PolicyTarget::parse(&format!("{me}:{p}")).is_ok_and(|t| {
                v.builtin || crate::net::service::policy_access(&rules, &me, &t).is_some()
            })
        })
        .map(|p| {
            let e = crate::catalog::policy::resolve(&levels, &me, &p);
            let fields = crate::access::admin::effective_fields(&e);
            (p, fields)
        })
        .collect();
    let body = html! {
        @if shown.is_empty() { p.muted { "No snapshots of yours yet: a policy shows here for each path you back up." } }
        @for (p, fields) in &shown {
            h2.mono { (p) }
            @if fields.is_empty() { p.muted { "No policy set: everything is kept." } }
            @else {
                table {
                    thead { tr { th { "Setting" } th { "Value" } th { "Set at" } } }
                    tbody { @for f in fields { tr { td { (f.field) } td.mono { (f.value) } td.mono { (f.from) } } } }
                }
            }
        }
    };
    Ok(pages::page(Some(&v), "Policy", &body))
}
