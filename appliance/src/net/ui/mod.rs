//! The web UI (`serve --ui`, `--ui-listen ADDR`): server-rendered pages over HTTPS with the
//! appliance's own TLS identity, for users (their snapshots, browsing, diff, downloads, their
//! policy) and operators (freshness, accounts, rules, policies, sessions, space, maintenance,
//! audit).
//!
//! Owns: the UI's sessions (a random cookie naming a server-side session; a user's UI session
//! holds an appliance session opened by [`Auth::login`], so throttling, audit, password changes
//! and account deletion apply as they do to clients), CSRF tokens, the security headers, and
//! the pages ([`user`], [`operator`]). Every page decides access with the same rules and roles
//! as the RPCs ([`Viewer`]); operator changes go through the admin socket's path
//! ([`Admin::call`]) and are audited under the operator's name. Must never serve anything
//! from outside the binary (no CDN, no files), put a secret in a URL, or log one.
//!
//! Invariants:
//! - Every response carries a strict Content-Security-Policy (no scripts at all), `no-store`
//!   and `nosniff`; cookies are `HttpOnly; Secure; SameSite=Strict`.
//! - Every POST carries the CSRF token of its session (or, for the login form, of its
//!   pre-login cookie); without it nothing is done.

mod content;
mod operator;
mod pages;
mod user;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use tonic::transport::server::Connected as _;

use super::admin_socket::Admin;
use super::limits::Connections;
use super::listen::accept_tls;
use super::ServeError;
use crate::access::rules::{self, Access, TargetType};
use crate::access::{Auth, Role};
use crate::catalog::Catalog;
use crate::error::ApplianceError;
use crate::shard::Shards;

/// The session cookie and the login form's cookie. `__Host-`: the browser keeps them only when
/// set over HTTPS for this host and path `/`, so a sibling domain cannot plant one.
const COOKIE: &str = "__Host-coffer_ui";
const LOGIN_COOKIE: &str = "__Host-coffer_login";
/// A UI session ends after this long unused, and after [`SESSION_MAX`] in any case.
const SESSION_IDLE: Duration = Duration::from_mins(30);
const SESSION_MAX: Duration = Duration::from_hours(12);
/// UI sessions kept at once, and per account (the least recently used one ends first).
const MAX_SESSIONS: usize = 4096;
const MAX_SESSIONS_PER_ACCOUNT: usize = 16;
/// Browse and diff pages being computed at once (each reads trees); more wait their turn.
const WALKS: usize = 4;
/// Downloads streaming at once, appliance-wide (each holds at most a read batch or a `.tar`
/// queue in memory).
const DOWNLOADS: usize = 16;
/// Downloads one account may have streaming at once: no account can take every slot (a client
/// that stops reading holds its slots until its connection's idle deadline closes it).
pub(super) const DOWNLOADS_PER_ACCOUNT: usize = 3;
/// The built-in local administrator of `--random-password` (not a valid `user@host`, so no
/// account can take the name).
pub(super) const BUILTIN_ADMIN: &str = "admin";

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// What the UI serves from.
pub(super) struct Ui {
    auth: Arc<Auth>,
    catalog: Arc<Catalog>,
    admin: Arc<Admin>,
    service: crate::net::service::CofferService,
    contents: content::Contents,
    mode: crate::repo::Mode,
    sessions: Mutex<HashMap<String, UiSession>>,
    /// Keys the CSRF tokens.
    key: [u8; 32],
    /// The built-in administrator's password (`--random-password`).
    builtin: Option<String>,
    downloads: Arc<tokio::sync::Semaphore>,
    /// Downloads streaming per account.
    downloading: Arc<Mutex<HashMap<String, usize>>>,
    walks: Arc<tokio::sync::Semaphore>,
    /// A space count is running (one at a time).
    counting: std::sync::atomic::AtomicBool,
}

/// A logged-in browser.
#[derive(Debug, Clone)]
struct UiSession {
    identity: String,
    /// The appliance session it holds (`None` for the built-in administrator).
    token: Option<String>,
    created: Instant,
    used: Instant,
    /// What the last change did (done, text), shown once by the next page.
    note: Option<(bool, String)>,
}

/// Who is asking, and what the rules let them do.
#[derive(Debug, Clone)]
pub(super) struct Viewer {
    pub(super) identity: String,
    /// FULL on the `acl` target (or the built-in administrator): the operator pages.
    pub(super) operator: bool,
    /// The built-in administrator sees every snapshot, as the admin socket does.
    pub(super) builtin: bool,
    pub(super) role: Role,
    /// This session's CSRF token.
    pub(super) csrf: String,
    pub(super) rules: Arc<Vec<rules::Rule>>,
    /// The appliance session of a user (`None` for the built-in administrator): changes that
    /// have an RPC go through it, with the RPC's checks.
    pub(super) session: Option<crate::access::Session>,
}

impl Viewer {
    /// Whether the snapshot list shows `s` (ListSnapshots' rule).
    pub(super) fn lists(&self, s: &coffer_proto::v1::Snapshot) -> bool {
        self.builtin
            || (self.role != Role::WriteOnly
                && rules::snapshot_access(&self.rules, &self.identity, s).is_some())
    }

    /// Whether `s` may be opened, browsed and downloaded (OpenSnapshot's rule).
    pub(super) fn reads(&self, s: &coffer_proto::v1::Snapshot) -> bool {
        self.builtin
            || (self.role == Role::Any
                && rules::snapshot_access(&self.rules, &self.identity, s).is_some())
    }
}

/// An error page: the status and what to tell the user. `SEE_OTHER` stands for "log in
/// first" and answers a redirect to the login page.
#[derive(Debug)]
pub(super) struct Failure(StatusCode, String);

impl From<ApplianceError> for Failure {
    fn from(e: ApplianceError) -> Self {
        let status = tonic::Status::from(e);
        let code = match status.code() {
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
            tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
            | tonic::Code::AlreadyExists => StatusCode::BAD_REQUEST,
            tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(code, status.message().to_string())
    }
}

impl Failure {
    pub(super) fn bad(why: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, why.into())
    }

    pub(super) fn forbidden(why: impl Into<String>) -> Self {
        Self(StatusCode::FORBIDDEN, why.into())
    }

    pub(super) fn not_found(why: impl Into<String>) -> Self {
        Self(StatusCode::NOT_FOUND, why.into())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        if self.0 == StatusCode::SEE_OTHER {
            // A page that needs a login, asked without one.
            return Redirect::to("/login").into_response();
        }
        (self.0, pages::failure(self.0, &self.1)).into_response()
    }
}

pub(super) type Page = Result<Response, Failure>;

/// The cookie `name` of a request.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

fn set_cookie(name: &str, value: &str, max_age: Option<u64>) -> HeaderValue {
    let age = max_age.map_or(String::new(), |s| format!("; Max-Age={s}"));
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; Secure; SameSite=Strict{age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("invalid=1"))
}

/// Compares secrets in time independent of where they differ (the metrics token's compare).
fn same(a: &str, b: &str) -> bool {
    super::metrics_http::same_token(a.as_bytes(), b.as_bytes())
}

impl Ui {
    fn csrf_of(&self, cookie: &str) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(b"coffer ui csrf v1\0");
        h.update(cookie.as_bytes());
        h.finalize().to_hex()[..32].to_string()
    }

    /// The viewer a request's cookie names; `None` when there is no live session (never
    /// logged in, logged out, expired, or its appliance session ended).
    fn viewer(&self, headers: &HeaderMap) -> Option<Viewer> {
        let token = cookie(headers, COOKIE)?;
        let now = Instant::now();
        let s = {
            let mut all = crate::net::limits::lock(&self.sessions);
            let s = all.get_mut(token)?;
            if now.duration_since(s.used) > SESSION_IDLE
                || now.duration_since(s.created) > SESSION_MAX
            {
                let gone = all.remove(token);
                drop(all);
                if let Some(t) = gone.and_then(|g| g.token) {
                    self.auth.end_session(&t);
                }
                return None;
            }
            s.used = now;
            s.clone()
        };
        let rules = self.auth.rules();
        let (operator, role, builtin, session) = match &s.token {
            None => (true, Role::Any, true, None),
            Some(t) => {
                let Ok(session) = self.auth.session(Some(t)) else {
                    crate::net::limits::lock(&self.sessions).remove(token);
                    return None;
                };
                // A restricted role (write-only, log-only) changes nothing, rules or not.
                let full = rules::access(&rules, &s.identity, TargetType::Acl, &[])
                    == Some(Access::Full)
                    && session.role == Role::Any;
                (full, session.role, false, Some(session))
            }
        };
        Some(Viewer {
            csrf: self.csrf_of(token),
            identity: s.identity,
            operator,
            builtin,
            role,
            rules,
            session,
        })
    }

    /// Starts a UI session; answers its cookie value.
    fn open(&self, identity: String, token: Option<String>) -> String {
        let cookie = hex::encode(rand::random::<[u8; 32]>());
        let now = Instant::now();
        let mut all = crate::net::limits::lock(&self.sessions);
        // Sessions that ended by themselves go first (looked up without touching them).
        all.retain(|_, s| {
            now.duration_since(s.used) <= SESSION_IDLE
                && now.duration_since(s.created) <= SESSION_MAX
                && s.token
                    .as_ref()
                    .is_none_or(|t| self.auth.state_of(t).is_some())
        });
        // Then the least recently used of this account's, or of everyone's.
        let mine = all.values().filter(|s| s.identity == identity).count();
        if mine >= MAX_SESSIONS_PER_ACCOUNT || all.len() >= MAX_SESSIONS {
            let oldest = all
                .iter()
                .filter(|(_, s)| mine < MAX_SESSIONS_PER_ACCOUNT || s.identity == identity)
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| k.clone());
            if let Some(t) = oldest.and_then(|k| all.remove(&k)).and_then(|s| s.token) {
                self.auth.end_session(&t);
            }
        }
        all.insert(
            cookie.clone(),
            UiSession {
                identity,
                token,
                created: now,
                used: now,
                note: None,
            },
        );
        cookie
    }

    /// Leaves a note for the next page of this request's session.
    fn set_note(&self, headers: &HeaderMap, note: (bool, String)) {
        if let Some(c) = cookie(headers, COOKIE) {
            if let Some(s) = crate::net::limits::lock(&self.sessions).get_mut(c) {
                s.note = Some(note);
            }
        }
    }

    /// Takes the note left for this request's session.
    fn take_note(&self, headers: &HeaderMap) -> Option<(bool, String)> {
        let c = cookie(headers, COOKIE)?;
        crate::net::limits::lock(&self.sessions)
            .get_mut(c)?
            .note
            .take()
    }

    /// Ends the UI session of a request (and the appliance session it holds).
    fn close(&self, headers: &HeaderMap) {
        if let Some(c) = cookie(headers, COOKIE) {
            let gone = crate::net::limits::lock(&self.sessions).remove(c);
            if let Some(t) = gone.and_then(|s| s.token) {
                self.auth.end_session(&t);
            }
        }
    }

    /// Refuses a form whose CSRF token is not its session's.
    fn check_csrf(v: &Viewer, got: &str) -> Result<(), Failure> {
        if same(got, &v.csrf) {
            Ok(())
        } else {
            Err(Failure::forbidden(
                "this form is stale or was not sent by this page (CSRF token missing or wrong); \
                 reload the page and try again",
            ))
        }
    }
}

/// A download's place: one of the appliance's slots and one of its account's, held until the
/// response's last byte (or until it is dropped).
pub(super) struct DownloadSlot {
    _slot: tokio::sync::OwnedSemaphorePermit,
    identity: String,
    counts: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for DownloadSlot {
    fn drop(&mut self) {
        let mut c = crate::net::limits::lock(&self.counts);
        if let Some(n) = c.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.identity);
            }
        }
    }
}

impl Ui {
    /// A slot for one more download of `identity`.
    pub(super) fn download_slot(&self, identity: &str) -> Result<DownloadSlot, Failure> {
        let busy = |why: &str| Failure(StatusCode::SERVICE_UNAVAILABLE, why.to_string());
        let mut c = crate::net::limits::lock(&self.downloading);
        let mine = c.get(identity).copied().unwrap_or(0);
        if mine >= DOWNLOADS_PER_ACCOUNT {
            return Err(busy(&format!(
                "this account already has {DOWNLOADS_PER_ACCOUNT} downloads running; let one \
                 finish first"
            )));
        }
        let slot = self.downloads.clone().try_acquire_owned().map_err(|_| {
            busy("too many downloads are running on this appliance; try again in a moment")
        })?;
        c.insert(identity.to_string(), mine + 1);
        Ok(DownloadSlot {
            _slot: slot,
            identity: identity.to_string(),
            counts: self.downloading.clone(),
        })
    }
}

/// The viewer of a page that needs a login: a browser without a session is sent to the login
/// page.
pub(super) fn need(ui: &Ui, headers: &HeaderMap) -> Result<Viewer, Failure> {
    ui.viewer(headers)
        .ok_or(Failure(StatusCode::SEE_OTHER, String::new()))
}

/// The viewer of a POST: logged in and carrying the session's CSRF token.
pub(super) fn need_post(ui: &Ui, headers: &HeaderMap, csrf: &str) -> Result<Viewer, Failure> {
    let v = ui.viewer(headers).ok_or_else(|| {
        Failure(
            StatusCode::UNAUTHORIZED,
            "not logged in (or the session ended): log in again".into(),
        )
    })?;
    Ui::check_csrf(&v, csrf)?;
    Ok(v)
}

/// The peer of a connection (login throttling by address).
#[derive(Debug, Clone, Copy)]
struct Peer(Option<IpAddr>);

/// What starting the UI needs.
pub(super) struct UiConfig {
    pub(super) auth: Arc<Auth>,
    pub(super) catalog: Arc<Catalog>,
    pub(super) admin: Arc<Admin>,
    pub(super) shards: Shards,
    pub(super) mode: crate::repo::Mode,
    pub(super) builtin: Option<String>,
    pub(super) service: crate::net::service::CofferService,
}

fn router(ui: Arc<Ui>) -> Router {
    Router::new()
        .route("/", get(user::snapshots))
        .route("/login", get(user::login_form).post(user::login))
        .route("/logout", post(user::logout))
        .route("/style.css", get(pages::style))
        .route("/snapshots/{id}", get(user::browse))
        .route("/snapshots/{id}/file", get(user::download))
        .route("/snapshots/{id}/tar", get(user::tar))
        .route("/diff", get(user::diff))
        .route("/policy", get(user::policy))
        .route(
            "/operator",
            get(operator::overview).post(operator::count_space),
        )
        .route(
            "/operator/accounts",
            get(operator::accounts).post(operator::account_change),
        )
        .route(
            "/operator/rules",
            get(operator::rules).post(operator::rule_change),
        )
        .route(
            "/operator/policies",
            get(operator::policies).post(operator::policy_change),
        )
        .route(
            "/operator/maintenance",
            get(operator::maintenance).post(operator::maintenance_run),
        )
        .route("/operator/audit", get(operator::audit))
        .fallback(|| async { Failure::not_found("no such page") })
        .layer(axum::middleware::from_fn(secure_headers))
        .with_state(ui)
}

/// The headers every answer carries.
async fn secure_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    r
}

/// TLS for the UI: the appliance's identity, HTTP/2 or HTTP/1.1.
fn acceptor(id: &crate::net::tls::TlsIdentity) -> Result<tokio_rustls::TlsAcceptor, ServeError> {
    let grpc = super::listen::tls_acceptor(id)?;
    let mut cfg = (**grpc.config()).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Binds `addr` (`HOST:PORT`).
///
/// # Errors
/// An address that does not parse or cannot be bound.
pub(super) async fn bind(addr: &str) -> Result<tokio::net::TcpListener, ServeError> {
    let a: std::net::SocketAddr = addr.parse().map_err(|e| {
        ServeError::Refused(format!("--ui-listen {addr}: {e} (expected HOST:PORT)"))
    })?;
    tokio::net::TcpListener::bind(a)
        .await
        .map_err(|e| ServeError::io(format!("cannot serve the UI on {a}"), e))
}

/// Serves the UI on `listener` until the process stops.
///
/// # Errors
/// The TLS identity.
pub(super) fn serve(
    listener: tokio::net::TcpListener,
    cfg: UiConfig,
    tls: &crate::net::tls::TlsIdentity,
    limits: &coffer_tuning::Limits,
) -> Result<(), ServeError> {
    let acceptor = acceptor(tls)?;
    let ui = Arc::new(Ui {
        contents: content::Contents { shards: cfg.shards },
        auth: cfg.auth,
        catalog: cfg.catalog,
        admin: cfg.admin,
        service: cfg.service,
        mode: cfg.mode,
        sessions: Mutex::new(HashMap::new()),
        key: rand::random(),
        builtin: cfg.builtin,
        downloads: Arc::new(tokio::sync::Semaphore::new(DOWNLOADS)),
        downloading: Arc::default(),
        walks: Arc::new(tokio::sync::Semaphore::new(WALKS)),
        counting: std::sync::atomic::AtomicBool::new(false),
    });
    let app = router(ui);
    let conns = Connections::new(limits.connections, Duration::from_secs(limits.idle_secs));
    let incoming = accept_tls(Arc::new(listener), acceptor, Duration::from_secs(10), conns);
    tokio::spawn(async move {
        use tokio_stream::StreamExt as _;
        let mut incoming = std::pin::pin!(incoming);
        while let Some(conn) = incoming.next().await {
            let Ok(conn) = conn else { continue };
            let peer = Peer(conn.connect_info().remote.map(|a| a.ip()));
            let svc = app.clone().layer(axum::Extension(peer));
            tokio::spawn(async move {
                let svc = hyper_util::service::TowerToHyperService::new(svc);
                let io = hyper_util::rt::TokioIo::new(conn);
                let b = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                if let Err(e) = b.serve_connection(io, svc).await {
                    tracing::debug!(error = %e, "UI connection ended");
                }
            });
        }
    });
    Ok(())
}

/// `State` of every handler.
pub(super) type St = State<Arc<Ui>>;
