//! Authentication: `username@hostname` identities, argon2id password hashes, sessions.
//!
//! Unknown users cost the same as known ones (a dummy hash is verified), and hashing runs on a
//! bounded number of blocking threads so that login floods cannot exhaust memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use tokio::sync::Semaphore;

use crate::catalog::Catalog;
use crate::error::ApplianceError;

/// argon2id for account passwords: 19 MiB, 2 passes, 1 lane (OWASP's minimum).
fn hasher() -> argon2::Argon2<'static> {
    let params = argon2::Params::new(19 * 1024, 2, 1, None).expect("static parameters are valid");
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
}

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

fn verify_password(phc: &str, password: &str) -> bool {
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

/// An authenticated session.
#[derive(Debug, Clone)]
pub struct Session {
    pub identity: String,
    expires: Instant,
}

/// Logins and sessions.
#[derive(Debug)]
pub struct Auth {
    catalog: Arc<Catalog>,
    sessions: Mutex<HashMap<String, Session>>,
    hashing: Semaphore,
    dummy_hash: String,
    ttl: Duration,
}

impl Auth {
    /// # Errors
    /// When the dummy hash cannot be made.
    pub fn new(catalog: Arc<Catalog>) -> Result<Self, ApplianceError> {
        Ok(Self {
            catalog,
            sessions: Mutex::new(HashMap::new()),
            hashing: Semaphore::new(2),
            dummy_hash: hash_password("coffer-dummy-password-for-unknown-users")?,
            ttl: Duration::from_hours(24),
        })
    }

    /// Checks credentials and opens a session; returns its token and the normalised identity.
    ///
    /// # Errors
    /// [`ApplianceError::Unauthenticated`] with the same message for unknown users and wrong
    /// passwords.
    pub async fn login(
        &self,
        identity: &str,
        password: &str,
    ) -> Result<(String, String), ApplianceError> {
        let denied = || ApplianceError::Unauthenticated("unknown user or wrong password".into());
        let identity = normalise_identity(identity).map_err(|_| denied())?;
        let user = self
            .catalog
            .user(&identity)
            .map_err(|e| ApplianceError::Internal(e.to_string()))?;
        let phc = user
            .as_ref()
            .map_or_else(|| self.dummy_hash.clone(), |u| u.password_hash.clone());
        let _slot = self.hashing.acquire().await.map_err(|_| denied())?;
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || verify_password(&phc, &password))
            .await
            .unwrap_or(false);
        if !ok || user.is_none() {
            return Err(denied());
        }
        let token = hex::encode(rand::random::<[u8; 32]>());
        let session = Session {
            identity: identity.clone(),
            expires: Instant::now() + self.ttl,
        };
        let mut s = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
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
        let s = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match s.get(token) {
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
    fn hashes_are_argon2id_phc() {
        let h = hash_password("pw").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password(&h, "pw"));
        assert!(!verify_password(&h, "px"));
    }
}
