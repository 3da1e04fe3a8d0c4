//! Authentication: `username@hostname` identities, argon2id password hashes, sessions.
//!
//! Unknown users cost the same as known ones (a dummy hash is verified), and hashing runs on a
//! bounded number of blocking threads so that login floods cannot exhaust memory.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use tokio::sync::Semaphore;
// tokio's clock: real time in production, pausable and advanced by hand in tests (no sleeps).
use tokio::time::Instant;

use coffer_proto::v1::{self, Disclosure};
use coffer_proto::ChunkId;

use crate::access::rules::Rule;
use crate::catalog::Catalog;
use crate::error::ApplianceError;
use crate::reach::Reach;

/// argon2id for account passwords: 19 MiB, 2 passes, 1 lane (OWASP's minimum).
fn hasher() -> argon2::Argon2<'static> {
    let params = argon2::Params::new(19 * 1024, 2, 1, None).expect("static parameters are valid");
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
}

/// Shortest password accepted for an account.
pub const MIN_PASSWORD_CHARS: usize = 8;

/// Hashes a password into a PHC string.
///
/// # Errors
/// When argon2 fails (it does not for these parameters).
pub fn hash_password(password: &str) -> Result<String, ApplianceError> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())
        .map_err(|e| ApplianceError::Internal(e.to_string()))?;
    hasher()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApplianceError::Internal(e.to_string()))
}

/// Whether `password` matches the PHC string `phc`.
#[must_use]
pub fn verify_password(phc: &str, password: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| hasher().verify_password(password.as_bytes(), &h).is_ok())
}

/// Checks and normalises `username@hostname`: lower-case ASCII letters, digits, `.`, `_`, `-`;
/// a username of 1–64 and a hostname of 1–253 characters; no `..`, no leading dot or dash.
///
/// # Errors
/// [`ApplianceError::InvalidArgument`] saying what is wrong.
pub fn normalise_identity(raw: &str) -> Result<String, ApplianceError> {
    let bad =
        |why: &str| ApplianceError::InvalidArgument(format!("invalid identity {raw:?}: {why}"));
    let lower = raw.to_ascii_lowercase();
    let (user, host) = lower
        .split_once('@')
        .ok_or_else(|| bad("expected username@hostname"))?;
    for (part, max) in [(user, 64), (host, 253)] {
        if part.is_empty() || part.len() > max {
            return Err(bad(
                "each side of @ must be 1 to 64 (user) / 253 (host) characters",
            ));
        }
        if !part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(bad("only letters, digits, '.', '_' and '-' are allowed"));
        }
        if part.contains("..") || part.starts_with(['.', '-']) {
            return Err(bad("no '..' and no leading '.' or '-'"));
        }
    }
    Ok(lower)
}

/// Snapshots one session may hold open at once; opening another forgets the least recently
/// opened. The client opens at most 17 per backup (its 16 newest paths and the parent), so a
/// command backing up several paths keeps what its current backup relies on.
pub const MAX_OPENED: usize = 64;
/// Sessions one account may hold at once; a new login ends the least recently used.
pub const MAX_SESSIONS_PER_ACCOUNT: usize = 32;
/// Longest password accepted (argon2 hashes the whole input).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// A snapshot a session opened: the record it was opened as (to re-check access when rules
/// change) and everything reachable from it.
#[derive(Debug, Clone)]
pub struct Opened {
    pub snapshot: v1::Snapshot,
    pub reach: Arc<Reach>,
}

/// What a session knows: chunks it uploaded or proved it holds, and everything reachable from
/// the snapshots it opened. Reads and snapshot references are limited to what it knows.
#[derive(Debug)]
pub struct SessionState {
    /// Key of this session's possession proofs.
    pub possession_key: [u8; 32],
    /// The account's ownership key (chunks its sessions uploaded; see `shard::Owned`); `None`
    /// for the server control user.
    pub owner: Option<[u8; 16]>,
    uploaded: Mutex<HashSet<ChunkId>>,
    opened: Mutex<Vec<Opened>>,
    /// Set when the session is ended (account deleted, password changed, idle): streams already
    /// running check it before every message.
    revoked: AtomicBool,
    last_used: Mutex<Instant>,
}

impl SessionState {
    fn new(owner: Option<[u8; 16]>, now: Instant) -> Self {
        Self {
            possession_key: rand::random(),
            owner,
            uploaded: Mutex::new(HashSet::new()),
            opened: Mutex::new(Vec::new()),
            revoked: AtomicBool::new(false),
            last_used: Mutex::new(now),
        }
    }

    /// Records chunks the session uploaded (verified against their ids) or proved.
    pub fn add_uploaded(&self, ids: impl IntoIterator<Item = ChunkId>) {
        lock(&self.uploaded).extend(ids);
    }

    /// Records the reachable set of a snapshot the session opened.
    pub fn add_opened(&self, snapshot: v1::Snapshot, reach: Arc<Reach>) {
        let mut o = lock(&self.opened);
        // Opening again makes it the most recent (the end of the list).
        o.retain(|r| r.snapshot.id != snapshot.id);
        o.push(Opened { snapshot, reach });
        if o.len() > MAX_OPENED {
            o.remove(0);
        }
    }

    /// Keeps only the opened snapshots for which `keep` holds (access re-checked on reload).
    pub fn retain_opened(&self, keep: impl Fn(&v1::Snapshot) -> bool) -> usize {
        let mut o = lock(&self.opened);
        let before = o.len();
        o.retain(|x| keep(&x.snapshot));
        before - o.len()
    }

    /// The snapshots this session opened.
    #[must_use]
    pub fn opened_snapshots(&self) -> Vec<v1::Snapshot> {
        lock(&self.opened)
            .iter()
            .map(|o| o.snapshot.clone())
            .collect()
    }

    /// Whether `id` is reachable from a snapshot the session opened.
    #[must_use]
    pub fn opened(&self, id: &ChunkId) -> bool {
        lock(&self.opened).iter().any(|r| r.reach.contains(id))
    }

    /// Whether `id` is a tree object of a snapshot the session opened (a subtree a commit need
    /// not walk again).
    #[must_use]
    pub fn opened_tree(&self, id: &ChunkId) -> bool {
        lock(&self.opened)
            .iter()
            .any(|r| r.reach.trees.contains(id))
    }

    /// Whether the session uploaded, proved or opened `id`.
    #[must_use]
    pub fn knows(&self, id: &ChunkId) -> bool {
        lock(&self.uploaded).contains(id) || self.opened(id)
    }

    /// Ends the session for every call already in progress.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
        lock(&self.uploaded).clear();
        lock(&self.opened).clear();
    }

    /// Fails once the session was ended; marks it used otherwise. Called for every message of
    /// a stream, so that ending a session ends the streams it has open.
    ///
    /// # Errors
    /// [`ApplianceError::Unauthenticated`] once revoked.
    pub fn check(&self) -> Result<(), ApplianceError> {
        if self.revoked.load(Ordering::SeqCst) {
            return Err(ApplianceError::Unauthenticated(
                "session ended (account deleted, password changed, or idle too long): log in again"
                    .into(),
            ));
        }
        *lock(&self.last_used) = Instant::now();
        Ok(())
    }

    fn idle_since(&self) -> Instant {
        *lock(&self.last_used)
    }
}

/// An authenticated session.
#[derive(Debug, Clone)]
pub struct Session {
    pub identity: String,
    pub state: Arc<SessionState>,
    /// The server control user: may refresh and ask for status, nothing else.
    pub control: bool,
    expires: Instant,
    /// The password hash the session was opened with: a changed password ends the session.
    phc: String,
}

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

/// Login attempts counted against one key (an account, a source address, or an account from a
/// source it logged in from before).
#[derive(Debug, Clone, Copy)]
struct Attempts {
    /// Attempts that did not succeed, counted when they start (before hashing).
    count: u32,
    /// The time the latest attempt was allowed to check its password.
    next: Instant,
    last: Instant,
}

/// Failures after which each further attempt waits, doubling from [`BASE_DELAY`].
pub const FREE_FAILURES: u32 = 5;
const BASE_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(16);
/// An attempt that would have to wait longer than this for its turn is refused at once (without
/// hashing): concurrent attempts never queue up without limit.
const MAX_WAIT: Duration = MAX_DELAY;
/// Failures are forgotten this long after the last one.
const FAILURE_MEMORY: Duration = Duration::from_mins(15);
/// A source an account logged in from is trusted for it this long after the last success.
const TRUSTED_MEMORY: Duration = Duration::from_hours(24 * 30);
/// Most (account, source) pairs remembered as trusted.
const TRUSTED_MAX: usize = 100_000;
/// A session unused this long ends (its memory is released); the client logs in again.
pub const SESSION_IDLE: Duration = Duration::from_mins(30);

/// The wait before checking a password after `failures` failed attempts.
#[must_use]
pub fn login_delay(failures: u32) -> Duration {
    if failures < FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (failures - FREE_FAILURES).min(16);
    (BASE_DELAY * 2u32.pow(doublings)).min(MAX_DELAY)
}

/// The login throttle (S4). Every attempt takes a turn *before* its password is hashed: after
/// [`FREE_FAILURES`] failures of a key, turns are spaced by [`login_delay`], so concurrent
/// attempts cannot share one wait; an attempt whose turn is more than [`MAX_WAIT`] away is
/// refused at once. A source address an account logged in from before is counted on its own key
/// for that account, so an attacker elsewhere cannot lock the real user out.
#[derive(Debug, Default)]
pub struct Throttle {
    keys: HashMap<String, Attempts>,
    trusted: HashMap<(String, IpAddr), Instant>,
}

/// The key of a source address: the address itself, or its /64 for IPv6 (one host usually holds
/// a whole /64, so rotating addresses inside it must not reset the count).
fn source_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("ip:{v4}"),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("ip:{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// The keys an attempt is counted on; the first is the account's key.
fn throttle_keys(trusted: bool, identity: &str, source: Option<IpAddr>) -> Vec<String> {
    match source {
        Some(ip) if trusted => vec![format!("id:{identity}/{ip}"), source_key(ip)],
        Some(ip) => vec![format!("id:{identity}"), source_key(ip)],
        None => vec![format!("id:{identity}")],
    }
}

/// Most keys the throttle remembers; past it, keys that slow nobody down are forgotten first,
/// and if that is not enough, attempts are refused until old failures expire.
const THROTTLE_KEYS_MAX: usize = 200_000;
/// Attempts waiting for a hashing slot at most; more are refused at once.
const HASH_QUEUE_MAX: usize = 64;

impl Throttle {
    /// Takes a turn for an attempt at `now`: returns when it may check its password, or how long
    /// until it could try again when the queue is full.
    ///
    /// # Errors
    /// The wait that was refused.
    pub fn reserve(
        &mut self,
        identity: &str,
        source: Option<IpAddr>,
        now: Instant,
    ) -> Result<(Instant, Vec<String>), Duration> {
        self.keys
            .retain(|_, a| now.saturating_duration_since(a.last) < FAILURE_MEMORY);
        if self.keys.len() >= THROTTLE_KEYS_MAX {
            self.keys.retain(|_, a| a.count >= FREE_FAILURES);
            if self.keys.len() >= THROTTLE_KEYS_MAX {
                return Err(MAX_WAIT);
            }
        }
        let trusted = source.is_some_and(|ip| {
            self.trusted
                .get(&(identity.to_string(), ip))
                .is_some_and(|t| now.saturating_duration_since(*t) < TRUSTED_MEMORY)
        });
        let keys = throttle_keys(trusted, identity, source);
        let slot = keys
            .iter()
            .filter_map(|k| self.keys.get(k))
            .map(|a| {
                let d = login_delay(a.count);
                if d.is_zero() {
                    now
                } else {
                    (now + d).max(a.next + d)
                }
            })
            .max()
            .unwrap_or(now);
        if slot.saturating_duration_since(now) > MAX_WAIT {
            return Err(slot.saturating_duration_since(now));
        }
        for k in &keys {
            let a = self.keys.entry(k.clone()).or_insert(Attempts {
                count: 0,
                next: now,
                last: now,
            });
            a.count = a.count.saturating_add(1);
            a.next = a.next.max(slot);
            a.last = now;
        }
        Ok((slot, keys))
    }

    /// The attempt counted on `keys` succeeded: the account's key is cleared, the source's count
    /// gives back this attempt, and the source becomes trusted for the account.
    pub fn succeeded(
        &mut self,
        identity: &str,
        source: Option<IpAddr>,
        keys: &[String],
        now: Instant,
    ) {
        if let Some(k) = keys.first() {
            self.keys.remove(k);
        }
        for k in keys.iter().skip(1) {
            if let Some(a) = self.keys.get_mut(k) {
                a.count = a.count.saturating_sub(1);
            }
        }
        if let Some(ip) = source {
            if self.trusted.len() >= TRUSTED_MAX {
                self.trusted
                    .retain(|_, t| now.saturating_duration_since(*t) < TRUSTED_MEMORY);
            }
            if self.trusted.len() < TRUSTED_MAX {
                self.trusted.insert((identity.to_string(), ip), now);
            }
        }
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
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The ownership key of an account: its stored one, or for accounts created before ownership
/// keys existed one derived from the identity and creation time.
#[must_use]
pub fn owner_key(u: &crate::catalog::UserRecord) -> [u8; 16] {
    if let Some(k) = u.owner.as_deref().and_then(|h| hex::decode(h).ok()) {
        if let Ok(k) = <[u8; 16]>::try_from(k.as_slice()) {
            return k;
        }
    }
    let mut h = blake3::Hasher::new_derive_key("coffer 2026 account owner key v1");
    h.update(u.identity.as_bytes());
    h.update(&u.created_unix.to_le_bytes());
    let mut k = [0u8; 16];
    k.copy_from_slice(&h.finalize().as_bytes()[..16]);
    k
}

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
        };
        a.reload()?;
        Ok(a)
    }

    /// Reloads everything from the catalog: the access rules (the defaults when none are
    /// stored); ends the sessions of accounts deleted or whose password changed, and takes from
    /// every session the snapshots it opened that it may no longer read (or that are gone).
    ///
    /// # Errors
    /// Catalog errors (the previous state stays in force).
    pub fn reload(&self) -> Result<(), ApplianceError> {
        let stored = self
            .catalog
            .acl_rules()
            .map_err(|e| ApplianceError::Internal(e.to_string()))?;
        let rules = if stored.is_empty() {
            crate::access::rules::default_rules()
        } else {
            stored
        };
        let users: HashMap<String, String> = self
            .catalog
            .users()
            .map_err(|e| ApplianceError::Internal(e.to_string()))?
            .into_iter()
            .map(|u| (u.identity, u.password_hash))
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
            let keep = s.control || users.get(&s.identity).is_some_and(|h| *h == s.phc);
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
        let ok = {
            let _slot = self.hashing_slot().await?;
            self.checked.fetch_add(1, Ordering::Relaxed);
            let (phc, password) = (phc.clone(), password.to_string());
            tokio::task::spawn_blocking(move || verify_password(&phc, &password))
                .await
                .unwrap_or(false)
        };
        if !ok || (control.is_none() && user.is_none()) {
            return Err(denied());
        }
        lock(&self.throttle).succeeded(&identity, source, &keys, Instant::now());
        let token = hex::encode(rand::random::<[u8; 32]>());
        let now = Instant::now();
        let session = Session {
            identity: identity.clone(),
            state: Arc::new(SessionState::new(user.as_ref().map(owner_key), now)),
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

impl crate::reach::Known for SessionState {
    fn knows(&self, id: &ChunkId) -> bool {
        SessionState::knows(self, id)
    }

    fn opened_tree(&self, id: &ChunkId) -> bool {
        SessionState::opened_tree(self, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities() {
        assert_eq!(
            normalise_identity("Alice@Laptop-1").unwrap(),
            "alice@laptop-1"
        );
        for bad in [
            "alice", "@host", "a@", "a/b@h", "a@h/x", "..@h", "a@..", "a\0@h", "a@h@h", "-a@h",
            "a b@h", "é@h",
        ] {
            assert!(normalise_identity(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn delays_grow_after_five_failures() {
        for n in 0..FREE_FAILURES {
            assert_eq!(login_delay(n), Duration::ZERO);
        }
        assert_eq!(login_delay(5), Duration::from_millis(250));
        assert_eq!(login_delay(6), Duration::from_millis(500));
        assert!(login_delay(7) > login_delay(6));
        assert_eq!(login_delay(100), MAX_DELAY);
    }

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
                })
                .unwrap();
        }
        (dir, Auth::new(catalog, None).unwrap())
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
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

    #[test]
    fn hashes_are_argon2id_phc() {
        let h = hash_password("pw").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password(&h, "pw"));
        assert!(!verify_password(&h, "px"));
    }
}
