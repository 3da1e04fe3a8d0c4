//! Authentication: `username@hostname` identities, argon2id password hashes, sessions.
//!
//! Unknown users cost the same as known ones (a dummy hash is verified), and hashing runs on a
//! bounded number of blocking threads so that login floods cannot exhaust memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::Semaphore;
// tokio's clock: real time in production, pausable and advanced by hand in tests (no sleeps).
use tokio::time::Instant;

use coffer_proto::v1::Disclosure;

use crate::access::rules::Rule;
use crate::access::sessions::Role;
use crate::catalog::Catalog;
use crate::error::ApplianceError;

use super::accounts::{hash_password, verify_password, MAX_PASSWORD_BYTES};
use super::accounts::{normalise_identity, owner_key};
use super::sessions::{
    lock, ChunkAllowance, Session, SessionState, MAX_SESSIONS_PER_ACCOUNT, SESSION_IDLE,
};
use super::throttle::{RateWindow, Throttle, HASH_QUEUE_MAX};

/// Catalog setting naming the repository's disclosure mode (`user` or `repository`).
pub const DISCLOSURE_SETTING: &str = "disclosure";

/// Parses the disclosure setting; absent means `user` (no existence oracle).
///
/// # Errors
/// An unknown value.
pub fn parse_disclosure(v: Option<&str>) -> Result<Disclosure, ApplianceError> {
    match v {
        None | Some("user") => Ok(Disclosure::User),
        Some("repository") => Ok(Disclosure::Repository),
        Some(other) => Err(ApplianceError::InvalidArgument(format!(
            "disclosure {other:?}: expected user or repository"
        ))),
    }
}

/// The server control account (`serve --server-control-username`).
#[derive(Debug, Clone)]
pub struct ControlUser {
    pub identity: String,
    pub phc: String,
}

/// Logins, sessions and the access rules in force.
#[derive(Debug)]
pub struct Auth {
    catalog: Arc<Catalog>,
    sessions: Mutex<HashMap<String, Session>>,
    rules: RwLock<Arc<Vec<Rule>>>,
    disclosure: RwLock<Disclosure>,
    throttle: Mutex<Throttle>,
    hashing: Semaphore,
    dummy_hash: String,
    control: Option<ControlUser>,
    ttl: Duration,
    /// Passwords checked (argon2id verifications started), for tests and status.
    checked: AtomicU64,
    /// Attempts waiting for a hashing slot.
    queued: std::sync::atomic::AtomicUsize,
    /// Quotas in force and usage (refreshed at every reload).
    pub quotas: super::quota::Quotas,
    /// Audit entries for bursts of failures written this minute (capped appliance-wide).
    burst_entries: Mutex<RateWindow>,
    /// Chunk ids sessions may hold.
    chunks: Arc<ChunkAllowance>,
}

/// Audit entries for bursts of failures at most, per minute, appliance-wide: many sources guessing
/// many accounts must not grow the audit log faster than that.
const BURST_ENTRIES_PER_MINUTE: u32 = 60;

impl Auth {
    /// # Errors
    /// When the dummy hash cannot be made or the catalog cannot be read.
    pub fn new(
        catalog: Arc<Catalog>,
        control: Option<ControlUser>,
    ) -> Result<Self, ApplianceError> {
        let a = Self {
            catalog,
            sessions: Mutex::new(HashMap::new()),
            rules: RwLock::new(Arc::new(Vec::new())),
            disclosure: RwLock::new(Disclosure::User),
            throttle: Mutex::new(Throttle::default()),
            // At most two argon2id hashes (19 MiB each) at a time, whatever the login rate (S4).
            hashing: Semaphore::new(2),
            dummy_hash: hash_password("coffer-dummy-password-for-unknown-users")?,
            control,
            ttl: Duration::from_hours(24),
            checked: AtomicU64::new(0),
            queued: std::sync::atomic::AtomicUsize::new(0),
            quotas: super::quota::Quotas::default(),
            burst_entries: Mutex::new(RateWindow::new(Instant::now())),
            chunks: Arc::default(),
        };
        a.reload()?;
        Ok(a)
    }

    /// Sets how many chunk ids one session and all sessions together may hold (before any
    /// login).
    pub fn set_session_chunks(&mut self, per_session: u64, all_sessions: u64) {
        self.chunks = Arc::new(ChunkAllowance::new(per_session, all_sessions));
    }

    /// Reloads everything from the catalog: the access rules (the defaults when none are
    /// stored); ends the sessions of accounts deleted or whose password changed, and takes from
    /// every session the snapshots it opened that it may no longer read (or that are gone).
    ///
    /// # Errors
    /// Catalog errors (the previous state stays in force).
    pub fn reload(&self) -> Result<(), ApplianceError> {
        let (rules, _) = crate::access::rules::in_force(&self.catalog)?;
        let records = self
            .catalog
            .users()
            .map_err(|e| ApplianceError::Internal(e.to_string()))?;
        self.quotas
            .set_quotas(records.iter().map(|u| (u.identity.clone(), u.quota)));
        // A session lives while its account keeps the password and the role it was opened with.
        let users: HashMap<String, (String, Role)> = records
            .into_iter()
            .map(|u| {
                let role = Role::parse(u.role.as_deref()).unwrap_or(Role::WriteOnly);
                (u.identity, (u.password_hash, role))
            })
            .collect();
        let disclosure = parse_disclosure(
            self.catalog
                .setting(DISCLOSURE_SETTING)
                .map_err(|e| ApplianceError::Internal(e.to_string()))?
                .as_deref(),
        )?;
        // The new rules first: a snapshot opened from now on is checked against them (and
        // `open_snapshot` re-checks after adding), one opened before is in `open` below.
        let rules = Arc::new(rules);
        *self
            .rules
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = rules.clone();
        *self
            .disclosure
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = disclosure;
        // Which opened snapshots still exist (looked up before taking the sessions lock).
        let open: Vec<(String, Arc<SessionState>)> = lock(&self.sessions)
            .values()
            .map(|s| (s.identity.clone(), s.state.clone()))
            .collect();
        let mut exists: HashMap<Vec<u8>, bool> = HashMap::new();
        for (_, st) in &open {
            for snap in st.opened_snapshots() {
                if !exists.contains_key(snap.id.as_ref()) {
                    let id = coffer_proto::SnapshotId::from_slice(&snap.id)
                        .map_err(|e| ApplianceError::Internal(e.to_string()))?;
                    let there = self
                        .catalog
                        .snapshot(&id)
                        .map_err(|e| ApplianceError::Internal(e.to_string()))?
                        .is_some();
                    exists.insert(snap.id.to_vec(), there);
                }
            }
        }
        for (who, st) in &open {
            let dropped = st.retain_opened(|snap| {
                exists.get(snap.id.as_ref()).copied().unwrap_or(false)
                    && crate::access::rules::snapshot_access(&rules, who, snap).is_some()
            });
            if dropped > 0 {
                tracing::info!(identity = %who, dropped, "access to opened snapshots revoked");
            }
        }
        lock(&self.sessions).retain(|_, s| {
            let keep = s.control
                || users
                    .get(&s.identity)
                    .is_some_and(|(h, role)| *h == s.phc && *role == s.role);
            if !keep {
                s.state.revoke();
            }
            keep
        });
        Ok(())
    }

    /// The access rules in force.
    #[must_use]
    pub fn rules(&self) -> Arc<Vec<Rule>> {
        self.rules
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// How `FindMissing` answers chunks a session does not know.
    #[must_use]
    pub fn disclosure(&self) -> Disclosure {
        *self
            .disclosure
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Open sessions (for status), after ending expired and idle ones.
    #[must_use]
    pub fn session_count(&self) -> usize {
        self.sweep();
        lock(&self.sessions).len()
    }

    #[cfg(test)]
    /// Passwords checked so far (argon2id verifications started).
    #[must_use]
    pub fn passwords_checked(&self) -> u64 {
        self.checked.load(Ordering::Relaxed)
    }

    /// Ends sessions past their lifetime or idle for [`SESSION_IDLE`], releasing their memory.
    pub fn sweep(&self) {
        let now = Instant::now();
        lock(&self.sessions).retain(|_, s| {
            let keep = s.expires > now
                && now.saturating_duration_since(s.state.idle_since()) < SESSION_IDLE;
            if !keep {
                s.state.revoke();
            }
            keep
        });
    }

    /// Every live session's state (the GC's pins, read under its barrier).
    #[must_use]
    pub fn session_states(&self) -> Vec<Arc<SessionState>> {
        lock(&self.sessions)
            .values()
            .map(|s| s.state.clone())
            .collect()
    }

    /// Every live session: its identity and state (the web UI's sessions page).
    #[must_use]
    pub fn overview(&self) -> Vec<(String, Arc<SessionState>)> {
        lock(&self.sessions)
            .values()
            .map(|s| (s.identity.clone(), s.state.clone()))
            .collect()
    }

    /// Bytes the live sessions of each account uploaded (quotas).
    #[must_use]
    pub fn live_uploads(&self) -> HashMap<String, u64> {
        let mut out: HashMap<String, u64> = HashMap::new();
        for s in lock(&self.sessions).values() {
            *out.entry(s.identity.clone()).or_default() +=
                s.state.stored_bytes.load(Ordering::Relaxed);
        }
        out
    }

    /// The state of the session named by `token` (for Hello's answer).
    #[must_use]
    pub fn state_of(&self, token: &str) -> Option<Arc<SessionState>> {
        lock(&self.sessions).get(token).map(|s| s.state.clone())
    }

    /// Checks credentials and opens a session; returns its token and the normalised identity.
    ///
    /// Each attempt first takes its turn in the [`Throttle`] (before any hashing), then checks
    /// the password. Unknown accounts take the same path and time as known ones (a dummy hash
    /// is verified).
    ///
    /// # Errors
    /// [`ApplianceError::InvalidArgument`] for a malformed identity;
    /// [`ApplianceError::Unauthenticated`] with the same message for unknown users and wrong
    /// passwords; [`ApplianceError::ResourceExhausted`] when too many attempts are waiting.
    pub async fn login(
        &self,
        identity: &str,
        password: &str,
        source: Option<IpAddr>,
    ) -> Result<(String, String), ApplianceError> {
        let denied = || ApplianceError::Unauthenticated("unknown user or wrong password".into());
        let identity = normalise_identity(identity)?;
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(ApplianceError::InvalidArgument(format!(
                "passwords are at most {MAX_PASSWORD_BYTES} bytes"
            )));
        }
        let (slot, keys) = lock(&self.throttle)
            .reserve(&identity, source, Instant::now())
            .map_err(|wait| {
                ApplianceError::ResourceExhausted(format!(
                    "too many login attempts for this account or from this address; try again \
                     in {} s",
                    wait.as_secs().max(1)
                ))
            })?;
        tokio::time::sleep_until(slot).await;

        let control = self.control.as_ref().filter(|c| c.identity == identity);
        let user = if control.is_some() {
            None
        } else {
            self.catalog
                .user(&identity)
                .map_err(|e| ApplianceError::Internal(e.to_string()))?
        };
        let phc = match (control, &user) {
            (Some(c), _) => c.phc.clone(),
            (None, Some(u)) => u.password_hash.clone(),
            (None, None) => self.dummy_hash.clone(),
        };
        let ok = self.verify_in_slot(phc.clone(), password).await?;
        if !ok || (control.is_none() && user.is_none()) {
            if user.is_some() || control.is_some() {
                self.audit_failures(&identity, source, &keys, "login.failures");
            } else {
                // Invented names: one entry per burst from a source, never one per name.
                self.audit_failures(
                    "unknown accounts",
                    source,
                    keys.get(1..).unwrap_or_default(),
                    "login.failures",
                );
            }
            return Err(denied());
        }
        lock(&self.throttle).succeeded(&identity, source, &keys, Instant::now());
        let token = hex::encode(rand::random::<[u8; 32]>());
        let now = Instant::now();
        // A stored role this build does not know restricts to the least: listing nothing.
        let role = user
            .as_ref()
            .map_or(Ok(Role::Any), |u| Role::parse(u.role.as_deref()))
            .unwrap_or(Role::WriteOnly);
        let session = Session {
            role,
            identity: identity.clone(),
            state: Arc::new(SessionState::new(
                user.as_ref().map(owner_key),
                now,
                self.chunks.clone(),
            )),
            control: control.is_some(),
            expires: now + self.ttl,
            phc,
        };
        self.sweep();
        let mut sessions = lock(&self.sessions);
        // The password may have changed, or the account been deleted, while this attempt was
        // hashing: a reload that ran meanwhile could not see this session. Checked again under
        // the sessions lock, which every reload takes to end sessions.
        if control.is_none() {
            let now_phc = self
                .catalog
                .user(&identity)
                .map_err(|e| ApplianceError::Internal(e.to_string()))?
                .map(|u| u.password_hash);
            if now_phc.as_deref() != Some(session.phc.as_str()) {
                return Err(denied());
            }
        }
        // At most MAX_SESSIONS_PER_ACCOUNT sessions: the least recently used one ends.
        let mine: Vec<(String, Instant)> = sessions
            .iter()
            .filter(|(_, s)| s.identity == identity)
            .map(|(t, s)| (t.clone(), s.state.idle_since()))
            .collect();
        if mine.len() >= MAX_SESSIONS_PER_ACCOUNT {
            if let Some((oldest, _)) = mine.iter().min_by_key(|(_, at)| *at) {
                if let Some(s) = sessions.remove(oldest) {
                    s.state.revoke();
                }
            }
        }
        sessions.insert(token.clone(), session);
        drop(sessions);
        Ok((token, identity))
    }

    /// Records a burst of failures on `keys` in the audit log: at the failure that starts the
    /// throttle's delays, and every 100th after (an attacker cannot make the log grow by one
    /// entry a guess).
    fn audit_failures(
        &self,
        identity: &str,
        source: Option<IpAddr>,
        keys: &[String],
        action: &str,
    ) {
        let n = keys
            .iter()
            .map(|k| lock(&self.throttle).failures(k))
            .max()
            .unwrap_or(0);
        if n != super::throttle::FREE_FAILURES && (n == 0 || n % 100 != 0) {
            return;
        }
        let Some(left_out) =
            lock(&self.burst_entries).admit(Instant::now(), BURST_ENTRIES_PER_MINUTE)
        else {
            return;
        };
        let from = source.map_or("an unknown address".into(), |ip| ip.to_string());
        let why = if left_out > 0 {
            format!(
                "{n} failures in a row (from {from}); further attempts are slowed down \
                     ({left_out} earlier bursts not recorded: more than \
                     {BURST_ENTRIES_PER_MINUTE} a minute)"
            )
        } else {
            format!("{n} failures in a row (from {from}); further attempts are slowed down")
        };
        let event = crate::catalog::audit::Event::refused(identity, action, identity, &why);
        let catalog = self.catalog.clone();
        // Off the network threads; a failed write is logged, the refusal stands.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = catalog.audit(&event) {
                tracing::warn!(error = %e, "audit entry for failed attempts not written");
            }
        });
    }

    /// Whether the account has a delete passphrase.
    ///
    /// # Errors
    /// Catalog errors.
    pub fn has_delete_passphrase(&self, identity: &str) -> Result<bool, ApplianceError> {
        Ok(self
            .catalog
            .user(identity)
            .map_err(|e| ApplianceError::Internal(e.to_string()))?
            .is_some_and(|u| u.delete_passphrase.is_some()))
    }

    /// The step-up for one destructive operation (S4 applies: wrong passphrases are throttled
    /// like logins, on their own account key and the source's): passes when the account has no
    /// delete passphrase or `passphrase` is it. Nothing is remembered: the next operation
    /// needs the passphrase again.
    ///
    /// # Errors
    /// [`ApplianceError::PermissionDenied`] for a missing or wrong passphrase;
    /// [`ApplianceError::ResourceExhausted`] while throttled.
    pub async fn step_up(
        &self,
        identity: &str,
        passphrase: &str,
        source: Option<IpAddr>,
    ) -> Result<(), ApplianceError> {
        let Some(account) = self
            .catalog
            .user(identity)
            .map_err(|e| ApplianceError::Internal(e.to_string()))?
        else {
            // A session whose account was deleted meanwhile: fail closed.
            return Err(ApplianceError::PermissionDenied(format!(
                "no account {identity}: it was deleted"
            )));
        };
        let Some(phc) = account.delete_passphrase else {
            return Ok(());
        };
        if passphrase.is_empty() {
            return Err(ApplianceError::PermissionDenied(format!(
                "{identity} has a delete passphrase and this needs it (the client asks for it, \
                 or reads --delete-passphrase-file)"
            )));
        }
        if passphrase.len() > MAX_PASSWORD_BYTES {
            return Err(ApplianceError::InvalidArgument(format!(
                "passphrases are at most {MAX_PASSWORD_BYTES} bytes"
            )));
        }
        let key = format!("step-up:{identity}");
        let (slot, keys) = lock(&self.throttle)
            .reserve(&key, source, Instant::now())
            .map_err(|wait| {
                ApplianceError::ResourceExhausted(format!(
                    "too many wrong delete passphrases for this account or from this address; \
                     try again in {} s",
                    wait.as_secs().max(1)
                ))
            })?;
        tokio::time::sleep_until(slot).await;
        let ok = self.verify_in_slot(phc, passphrase).await?;
        if !ok {
            self.audit_failures(identity, source, &keys[..1], "step_up.failures");
            return Err(ApplianceError::PermissionDenied(format!(
                "wrong delete passphrase for {identity}"
            )));
        }
        lock(&self.throttle).succeeded(&key, source, &keys, Instant::now());
        Ok(())
    }

    /// Waits for a turn to redeem an enrollment token for `identity`, under the login
    /// throttle's rules (per account and per source); answers the throttle keys for
    /// [`Auth::enroll_done`].
    ///
    /// # Errors
    /// [`ApplianceError::ResourceExhausted`] while throttled.
    pub async fn enroll_turn(
        &self,
        identity: &str,
        source: Option<IpAddr>,
    ) -> Result<Vec<String>, ApplianceError> {
        let key = format!("enroll:{identity}");
        let (slot, keys) = lock(&self.throttle)
            .reserve(&key, source, Instant::now())
            .map_err(|wait| {
                ApplianceError::ResourceExhausted(format!(
                    "too many enrollment attempts for this account or from this address; try \
                     again in {} s",
                    wait.as_secs().max(1)
                ))
            })?;
        tokio::time::sleep_until(slot).await;
        Ok(keys)
    }

    /// Ends a turn of [`Auth::enroll_turn`]: a failure counts against the keys (and is
    /// audited as the login throttle's are), a success clears them.
    pub fn enroll_done(&self, identity: &str, source: Option<IpAddr>, keys: &[String], ok: bool) {
        let key = format!("enroll:{identity}");
        if ok {
            lock(&self.throttle).succeeded(&key, source, keys, Instant::now());
        } else {
            self.audit_failures(identity, source, &keys[..1], "enroll.failures");
        }
    }

    /// Checks `secret` against the PHC string `phc` in one of the hashing slots, off the
    /// network threads (logins and step-ups alike).
    async fn verify_in_slot(&self, phc: String, secret: &str) -> Result<bool, ApplianceError> {
        let _slot = self.hashing_slot().await?;
        self.checked.fetch_add(1, Ordering::Relaxed);
        let secret = secret.to_string();
        Ok(
            tokio::task::spawn_blocking(move || verify_password(&phc, &secret))
                .await
                .unwrap_or(false),
        )
    }

    /// One of the two argon2id slots; refused at once when [`HASH_QUEUE_MAX`] attempts already
    /// wait for one.
    async fn hashing_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, ApplianceError> {
        let busy = || {
            ApplianceError::ResourceExhausted(
                "too many password checks in progress; try again in a few seconds".into(),
            )
        };
        if self.queued.fetch_add(1, Ordering::SeqCst) >= HASH_QUEUE_MAX {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(busy());
        }
        let slot = self.hashing.acquire().await;
        self.queued.fetch_sub(1, Ordering::SeqCst);
        slot.map_err(|_| busy())
    }

    /// Hashes a new password in one of the hashing slots (`ChangePassword`).
    ///
    /// # Errors
    /// Too long, too many hashes queued, or argon2 failing.
    pub async fn hash_new_password(&self, password: String) -> Result<String, ApplianceError> {
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(ApplianceError::InvalidArgument(format!(
                "passwords are at most {MAX_PASSWORD_BYTES} bytes"
            )));
        }
        let _slot = self.hashing_slot().await?;
        tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|e| ApplianceError::Internal(e.to_string()))?
    }

    /// Takes snapshot `id` (deleted) from every session that opened it.
    pub fn forget_snapshot(&self, id: &[u8]) {
        let states: Vec<Arc<SessionState>> = lock(&self.sessions)
            .values()
            .map(|s| s.state.clone())
            .collect();
        for st in states {
            st.retain_opened(|s| s.id.as_ref() != id);
        }
    }

    /// Ends the session named by `token` (the client is done): calls in progress fail at their
    /// next message, and its memory and GC pins are released.
    pub fn end_session(&self, token: &str) {
        if let Some(s) = lock(&self.sessions).remove(token) {
            s.state.revoke();
        }
    }

    /// The session a token names.
    ///
    /// # Errors
    /// [`ApplianceError::Unauthenticated`] for a missing, unknown, expired or ended token.
    pub fn session(&self, token: Option<&str>) -> Result<Session, ApplianceError> {
        let token = token.ok_or_else(|| {
            ApplianceError::Unauthenticated(
                "no session: call Hello first and send its token".into(),
            )
        })?;
        let now = Instant::now();
        let found = lock(&self.sessions).get(token).cloned();
        match found {
            Some(sess)
                if sess.expires > now
                    && now.saturating_duration_since(sess.state.idle_since()) < SESSION_IDLE =>
            {
                sess.state.check()?;
                Ok(sess)
            }
            _ => Err(ApplianceError::Unauthenticated(
                "session expired or unknown: log in again".into(),
            )),
        }
    }
}

impl crate::maintenance::gc::Pins for Auth {
    fn pinned(&self, mark: &mut dyn FnMut(&coffer_proto::ChunkId)) {
        for s in self.session_states() {
            s.each_pinned(mark);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::throttle::*;
    use coffer_proto::ChunkId;

    fn auth_with_users(n: usize) -> (tempfile::TempDir, Auth) {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Arc::new(Catalog::open(&dir.path().join("catalog"), true).unwrap());
        let hash = hash_password("the-right-password").unwrap();
        for i in 0..n {
            catalog
                .add_user(&crate::catalog::UserRecord {
                    identity: format!("user{i}@host"),
                    password_hash: hash.clone(),
                    created_unix: 0,
                    owner: None,
                    quota: None,
                    delete_passphrase: None,
                    role: None,
                })
                .unwrap();
        }
        (dir, Auth::new(catalog, None).unwrap())
    }

    /// A runtime on tokio's paused clock: time moves only when a test advances it.
    fn paused_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    }

    fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v[v.len() / 2]
    }

    /// S4: an unknown account costs the same time as a known one with a wrong password (each
    /// attempt on a fresh account so that no delay applies; interleaved against drift).
    #[test]
    fn unknown_and_known_accounts_take_the_same_time() {
        let rounds = 15;
        let (_dir, auth) = auth_with_users(rounds);
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (mut known, mut unknown) = (Vec::new(), Vec::new());
        rt.block_on(async {
            for i in 0..rounds {
                let t = Instant::now();
                let r = auth.login(&format!("user{i}@host"), "wrong", None).await;
                known.push(t.elapsed());
                assert!(matches!(r, Err(ApplianceError::Unauthenticated(_))));
                let t = Instant::now();
                let r2 = auth.login(&format!("nobody{i}@host"), "wrong", None).await;
                unknown.push(t.elapsed());
                assert_eq!(r.unwrap_err().to_string(), r2.unwrap_err().to_string());
            }
        });
        let (k, u) = (median(known), median(unknown));
        let diff = k.abs_diff(u);
        eprintln!("median login: known {k:?}, unknown {u:?}");
        assert!(
            diff * 4 < k.max(u),
            "known {k:?} vs unknown {u:?}: the difference reveals which accounts exist"
        );
    }

    /// S4: after five failures of one account the next attempts wait, longer each time; a
    /// success clears the account's count.
    #[test]
    fn failed_logins_slow_down_further_attempts() {
        let (_dir, auth) = auth_with_users(1);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut took = Vec::new();
            for _ in 0..7 {
                let t = Instant::now();
                assert!(auth.login("user0@host", "wrong", None).await.is_err());
                took.push(t.elapsed());
            }
            assert!(took[..5].iter().all(|t| *t < login_delay(5)), "{took:?}");
            assert!(took[5] >= login_delay(5), "{took:?}");
            assert!(took[6] >= login_delay(6) && took[6] > took[5], "{took:?}");
            let t = Instant::now();
            auth.login("user0@host", "the-right-password", None)
                .await
                .unwrap();
            assert!(
                t.elapsed() >= login_delay(7),
                "the delay applies to the right password too"
            );
            let t = Instant::now();
            assert!(auth.login("user0@host", "wrong", None).await.is_err());
            assert!(t.elapsed() < login_delay(5), "a success clears the count");
        });
    }

    /// Issue 10, item 6: concurrent attempts cannot share one wait. 512 attempts at once and
    /// then 8 every 100 ms for ten minutes against one account from one address get at most the
    /// free attempts plus one turn per [`MAX_DELAY`]; a source the real user logged in from
    /// before is not slowed by the flood (no lock-out).
    #[test]
    fn concurrent_guesses_take_turns_and_do_not_lock_out_the_owner() {
        let mut t = Throttle::default();
        let attacker: IpAddr = "127.0.0.2".parse().unwrap();
        let home: IpAddr = "127.0.0.3".parse().unwrap();
        let start = Instant::now();
        // The owner logged in from home before the flood.
        let (slot, keys) = t.reserve("victim@host", Some(home), start).unwrap();
        assert_eq!(slot, start);
        t.succeeded("victim@host", Some(home), &keys, start);
        let mut granted: Vec<Instant> = Vec::new();
        let mut refused = 0u32;
        for step in 0..6000u32 {
            let now = start + Duration::from_millis(100 * u64::from(step));
            for _ in 0..if step == 0 { 512 } else { 8 } {
                match t.reserve("victim@host", Some(attacker), now) {
                    Ok((slot, _)) => {
                        assert!(slot >= now && slot - now <= MAX_WAIT);
                        granted.push(slot);
                    }
                    Err(_) => refused += 1,
                }
            }
            if step % 600 == 300 {
                let (slot, keys) = t.reserve("victim@host", Some(home), now).unwrap();
                assert_eq!(slot, now, "the owner's trusted source waits for nobody");
                t.succeeded("victim@host", Some(home), &keys, now);
            }
        }
        granted.sort();
        let minutes = 10;
        let bound = FREE_FAILURES as usize + 7 + minutes * 60 / 16;
        assert_eq!(MAX_DELAY, Duration::from_secs(16));
        assert!(
            granted.len() <= bound,
            "{} guesses checked in {minutes} minutes (bound {bound})",
            granted.len()
        );
        assert!(refused > 40_000);
        for w in granted[FREE_FAILURES as usize..].windows(2) {
            assert!(w[1] - w[0] >= BASE_DELAY, "turns are spaced: {w:?}");
        }
        // An address nobody logged in from is slowed by the account's failures.
        let stranger: IpAddr = "127.0.0.4".parse().unwrap();
        let late = start + Duration::from_mins(10);
        assert!(t
            .reserve("victim@host", Some(stranger), late)
            .map_or(true, |(slot, _)| slot > late));
    }

    /// Issue 10, item 6, through `Auth::login`: 64 wrong passwords sent at once check at most the
    /// free attempts plus the turns that fit in [`MAX_WAIT`]; the rest are refused before any
    /// hashing. (Paused tokio clock: the waits pass without sleeping.)
    #[test]
    fn parallel_logins_are_counted_before_hashing() {
        let (_dir, auth) = auth_with_users(1);
        let auth = Arc::new(auth);
        let rt = paused_runtime();
        let src: IpAddr = "127.0.0.2".parse().unwrap();
        let results = rt.block_on(async {
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let a = auth.clone();
                    tokio::spawn(async move { a.login("user0@host", "wrong", Some(src)).await })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        let refused = results
            .iter()
            .filter(|r| matches!(r, Err(ApplianceError::ResourceExhausted(_))))
            .count();
        let checked = auth.passwords_checked();
        // 5 free, then turns at 0.25, 0.75, 1.75, 3.75, 7.75 and 15.75 s.
        assert_eq!(checked, 11, "passwords checked");
        assert_eq!(refused, 64 - 11);
    }

    /// Issue 10 ("session memory released when the client leaves"): a session unused for
    /// [`SESSION_IDLE`] ends, releasing what it knew; calls with its token are refused.
    #[test]
    fn idle_sessions_end_and_release_their_memory() {
        let (_dir, auth) = auth_with_users(1);
        let rt = paused_runtime();
        rt.block_on(async {
            let (token, _) = auth
                .login("user0@host", "the-right-password", None)
                .await
                .unwrap();
            let s = auth.session(Some(&token)).unwrap();
            s.state.add_uploaded([ChunkId::from_bytes([9; 32])]);
            tokio::time::advance(SESSION_IDLE.saturating_sub(Duration::from_mins(1))).await;
            assert!(
                auth.session(Some(&token)).is_ok(),
                "used within the idle time"
            );
            tokio::time::advance(SESSION_IDLE + Duration::from_secs(1)).await;
            assert!(auth.session(Some(&token)).is_err());
            assert_eq!(auth.session_count(), 0);
            assert!(s.state.check().is_err(), "streams of the session end too");
            assert!(
                !s.state.knows(&ChunkId::from_bytes([9; 32])),
                "memory released"
            );
        });
    }

    /// C9: a session kept busy still ends at its lifetime (24 h): its token, replayed later,
    /// commits nothing (every call checks the session first).
    #[test]
    fn a_session_past_its_lifetime_is_refused_however_busy() {
        let (_dir, auth) = auth_with_users(1);
        let rt = paused_runtime();
        rt.block_on(async {
            let (token, _) = auth
                .login("user0@host", "the-right-password", None)
                .await
                .unwrap();
            // Used every 20 minutes for a day.
            for _ in 0..(24 * 3 - 1) {
                tokio::time::advance(Duration::from_mins(20)).await;
                assert!(auth.session(Some(&token)).is_ok());
            }
            tokio::time::advance(Duration::from_mins(21)).await;
            let e = auth.session(Some(&token)).unwrap_err();
            assert!(matches!(e, ApplianceError::Unauthenticated(_)), "{e}");
        });
    }

    /// Chunk ids a session may hold: refused before anything is done past the session's or all
    /// sessions' allowance, given back when a session ends.
    #[test]
    fn sessions_hold_at_most_their_chunk_allowance() {
        let (_dir, mut auth) = auth_with_users(2);
        auth.set_session_chunks(3, 4);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let id = |b: u8| ChunkId::from_bytes([b; 32]);
            let (t0, _) = auth
                .login("user0@host", "the-right-password", None)
                .await
                .unwrap();
            let (t1, _) = auth
                .login("user1@host", "the-right-password", None)
                .await
                .unwrap();
            let (a, b) = (
                auth.session(Some(&t0)).unwrap(),
                auth.session(Some(&t1)).unwrap(),
            );
            a.state.room_for(3).unwrap();
            a.state.add_uploaded([id(1), id(2)]);
            a.state.add_pinned([id(3), id(3)]);
            let e = a.state.room_for(1).unwrap_err();
            assert!(e.to_string().contains("--session-chunks"), "{e}");
            // All sessions: 3 held of 4.
            b.state.room_for(1).unwrap();
            let e = b.state.room_for(2).unwrap_err();
            assert!(e.to_string().contains("sessions hold 3"), "{e}");
            auth.end_session(&t0);
            b.state.room_for(3).unwrap();
        });
    }

    #[test]
    fn hashes_are_argon2id_phc() {
        let h = hash_password("pw").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password(&h, "pw"));
        assert!(!verify_password(&h, "px"));
    }
}
