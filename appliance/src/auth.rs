//! Authentication: `username@hostname` identities, argon2id password hashes, sessions.
//!
//! Unknown users cost the same as known ones (a dummy hash is verified), and hashing runs on a
//! bounded number of blocking threads so that login floods cannot exhaust memory.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use tokio::sync::Semaphore;

use coffer_proto::v1::Disclosure;
use coffer_proto::ChunkId;

use crate::acl::Rule;
use crate::catalog::Catalog;
use crate::error::ApplianceError;

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

/// What a session knows: chunks it uploaded or proved it holds, and everything reachable from
/// the snapshots it opened. Reads and snapshot references are limited to what it knows.
#[derive(Debug)]
pub struct SessionState {
    /// Key of this session's possession proofs.
    pub possession_key: [u8; 32],
    uploaded: Mutex<HashSet<ChunkId>>,
    opened: Mutex<Vec<Arc<HashSet<ChunkId>>>>,
}

impl SessionState {
    fn new() -> Self {
        Self {
            possession_key: rand::random(),
            uploaded: Mutex::new(HashSet::new()),
            opened: Mutex::new(Vec::new()),
        }
    }

    /// Records chunks the session uploaded (verified against their ids) or proved.
    pub fn add_uploaded(&self, ids: impl IntoIterator<Item = ChunkId>) {
        lock(&self.uploaded).extend(ids);
    }

    /// Records the reachable set of a snapshot the session opened.
    pub fn add_opened(&self, reach: Arc<HashSet<ChunkId>>) {
        let mut o = lock(&self.opened);
        if !o.iter().any(|r| Arc::ptr_eq(r, &reach)) {
            o.push(reach);
        }
    }

    /// Whether `id` is reachable from a snapshot the session opened.
    #[must_use]
    pub fn opened(&self, id: &ChunkId) -> bool {
        lock(&self.opened).iter().any(|r| r.contains(id))
    }

    /// Whether the session uploaded, proved or opened `id`.
    #[must_use]
    pub fn knows(&self, id: &ChunkId) -> bool {
        lock(&self.uploaded).contains(id) || self.opened(id)
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

/// Failed logins of one account or one source address.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// Failures after which each further attempt waits, doubling from [`BASE_DELAY`].
pub const FREE_FAILURES: u32 = 5;
const BASE_DELAY: Duration = Duration::from_millis(250);
const MAX_DELAY: Duration = Duration::from_secs(16);
/// Failures are forgotten this long after the last one.
const FAILURE_MEMORY: Duration = Duration::from_mins(15);

/// The wait before checking a password after `failures` failed attempts.
#[must_use]
pub fn login_delay(failures: u32) -> Duration {
    if failures < FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (failures - FREE_FAILURES).min(16);
    (BASE_DELAY * 2u32.pow(doublings)).min(MAX_DELAY)
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
    failures: Mutex<HashMap<String, Failures>>,
    hashing: Semaphore,
    dummy_hash: String,
    control: Option<ControlUser>,
    ttl: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
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
            failures: Mutex::new(HashMap::new()),
            // At most two argon2id hashes (19 MiB each) at a time, whatever the login rate (S4).
            hashing: Semaphore::new(2),
            dummy_hash: hash_password("coffer-dummy-password-for-unknown-users")?,
            control,
            ttl: Duration::from_hours(24),
        };
        a.reload()?;
        Ok(a)
    }

    /// Reloads everything from the catalog: the access rules (the defaults when none are
    /// stored), and ends the sessions of accounts deleted or whose password changed.
    ///
    /// # Errors
    /// Catalog errors (the previous state stays in force).
    pub fn reload(&self) -> Result<(), ApplianceError> {
        let stored = self
            .catalog
            .acl_rules()
            .map_err(|e| ApplianceError::Internal(e.to_string()))?;
        let rules = if stored.is_empty() {
            crate::acl::default_rules()
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
        *self
            .rules
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(rules);
        *self
            .disclosure
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = disclosure;
        lock(&self.sessions)
            .retain(|_, s| s.control || users.get(&s.identity).is_some_and(|h| *h == s.phc));
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

    /// Open sessions (for status).
    #[must_use]
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    fn failures_of(&self, key: &str) -> u32 {
        let mut f = lock(&self.failures);
        f.retain(|_, v| v.last.elapsed() < FAILURE_MEMORY);
        f.get(key).map_or(0, |v| v.count)
    }

    fn record_failure(&self, key: String) {
        let mut f = lock(&self.failures);
        let e = f.entry(key).or_insert(Failures {
            count: 0,
            last: Instant::now(),
        });
        e.count = e.count.saturating_add(1);
        e.last = Instant::now();
    }

    /// The state of the session named by `token` (for Hello's answer).
    #[must_use]
    pub fn state_of(&self, token: &str) -> Option<Arc<SessionState>> {
        lock(&self.sessions).get(token).map(|s| s.state.clone())
    }

    /// Checks credentials and opens a session; returns its token and the normalised identity.
    ///
    /// After [`FREE_FAILURES`] failures of the same account or from the same address, each
    /// attempt first waits [`login_delay`]. Unknown accounts take the same path and time as
    /// known ones (a dummy hash is verified).
    ///
    /// # Errors
    /// [`ApplianceError::InvalidArgument`] for a malformed identity;
    /// [`ApplianceError::Unauthenticated`] with the same message for unknown users and wrong
    /// passwords.
    pub async fn login(
        &self,
        identity: &str,
        password: &str,
        source: Option<IpAddr>,
    ) -> Result<(String, String), ApplianceError> {
        let denied = || ApplianceError::Unauthenticated("unknown user or wrong password".into());
        let identity = normalise_identity(identity)?;
        let id_key = format!("id:{identity}");
        let addr_key = source.map(|a| format!("ip:{a}"));
        let failures = self
            .failures_of(&id_key)
            .max(addr_key.as_deref().map_or(0, |k| self.failures_of(k)));
        tokio::time::sleep(login_delay(failures)).await;

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
            let _slot = self.hashing.acquire().await.map_err(|_| denied())?;
            let (phc, password) = (phc.clone(), password.to_string());
            tokio::task::spawn_blocking(move || verify_password(&phc, &password))
                .await
                .unwrap_or(false)
        };
        if !ok || (control.is_none() && user.is_none()) {
            self.record_failure(id_key);
            if let Some(k) = addr_key {
                self.record_failure(k);
            }
            return Err(denied());
        }
        lock(&self.failures).remove(&id_key);
        let token = hex::encode(rand::random::<[u8; 32]>());
        let session = Session {
            identity: identity.clone(),
            state: Arc::new(SessionState::new()),
            control: control.is_some(),
            expires: Instant::now() + self.ttl,
            phc,
        };
        let mut s = lock(&self.sessions);
        s.retain(|_, v| v.expires > Instant::now());
        s.insert(token.clone(), session);
        Ok((token, identity))
    }

    /// The session a token names.
    ///
    /// # Errors
    /// [`ApplianceError::Unauthenticated`] for a missing, unknown or expired token.
    pub fn session(&self, token: Option<&str>) -> Result<Session, ApplianceError> {
        let token = token.ok_or_else(|| {
            ApplianceError::Unauthenticated(
                "no session: call Hello first and send its token".into(),
            )
        })?;
        match lock(&self.sessions).get(token) {
            Some(sess) if sess.expires > Instant::now() => Ok(sess.clone()),
            _ => Err(ApplianceError::Unauthenticated(
                "session expired or unknown: log in again".into(),
            )),
        }
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

    #[test]
    fn hashes_are_argon2id_phc() {
        let h = hash_password("pw").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password(&h, "pw"));
        assert!(!verify_password(&h, "px"));
    }
}
