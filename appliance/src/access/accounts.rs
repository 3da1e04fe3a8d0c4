//! Accounts: `username@hostname` identities, argon2id password hashes, ownership keys.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

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

/// Longest password accepted (argon2 hashes the whole input).
pub const MAX_PASSWORD_BYTES: usize = 1024;

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
}
