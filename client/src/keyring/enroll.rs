//! One-time enrollment tokens (`docs/format.md`, "Enrollment token").
//!
//! A token is `coffer-enroll-v1:` followed by 32 hex digits of an *authentication half* and,
//! for a sealed repository, `.` and 32 hex digits of a *key half*. The admin client sends the
//! appliance BLAKE3 of the authentication half and the new member's file sealed under
//! argon2id(key half); the fleet machine sends the authentication half once (`Enroll`), gets
//! the sealed file back and opens it. The appliance never holds either half.

use bytes::Bytes;
use coffer_proto::v1::{self, coffer_client::CofferClient};
use zeroize::Zeroizing;

use super::{keyring, seal, Kdf, Master, Member, Role};
use crate::net::{channel, Session, Target};
use crate::ClientError;

const PREFIX: &str = "coffer-enroll-v1:";
const AAD: &[u8] = b"coffer 2026 enrollment token v1";
/// argon2id of the key half: the half is 128 random bits, so this only adds a cost per guess.
const KDF: Kdf = Kdf {
    m_cost_kib: 19 * 1024,
    t_cost: 2,
    p_cost: 1,
};

/// A parsed token.
struct Token {
    auth: [u8; 16],
    key: Option<Zeroizing<[u8; 16]>>,
}

impl Token {
    fn parse(text: &str) -> Result<Self, ClientError> {
        let bad = || keyring("not a coffer enrollment token (coffer-enroll-v1:…)");
        let body = text.trim().strip_prefix(PREFIX).ok_or_else(bad)?;
        let (auth_hex, key_hex) = match body.split_once('.') {
            Some((a, k)) => (a, Some(k)),
            None => (body, None),
        };
        let mut auth = [0u8; 16];
        hex::decode_to_slice(auth_hex, &mut auth).map_err(|_| bad())?;
        let key = key_hex
            .map(|k| {
                let mut key = Zeroizing::new([0u8; 16]);
                hex::decode_to_slice(k, &mut *key).map(|()| key)
            })
            .transpose()
            .map_err(|_| bad())?;
        Ok(Self { auth, key })
    }

    fn auth_hash(&self) -> [u8; 32] {
        *blake3::hash(&self.auth).as_bytes()
    }

    fn kek(&self, key: &[u8; 16]) -> Result<Zeroizing<[u8; 32]>, ClientError> {
        KDF.key(key, &self.auth_hash()[..16])
    }
}

fn aad(auth_hash: &[u8; 32]) -> Vec<u8> {
    let mut a = AAD.to_vec();
    a.extend_from_slice(auth_hash);
    a
}

/// Creates a one-time token for the new account `identity` with `role`, valid until
/// `expires_us`; with `master` (sealed repositories) it carries the member file of that role.
/// Answers the token to hand to the machine.
///
/// # Errors
/// RPC failures (the caller needs FULL on the account's user target and on acl); a sealed
/// appliance without `master` or a managed one with it.
pub async fn create(
    session: &Session,
    master: Option<&Master>,
    identity: &str,
    role: Role,
    expires_us: i64,
    delete_passphrase: &str,
) -> Result<String, ClientError> {
    let sealed = session.hello.mode == i32::from(v1::EncryptionMode::Sealed);
    let token = Token {
        auth: rand::random(),
        key: sealed.then(|| Zeroizing::new(rand::random())),
    };
    let sealed_keys = match (master, &token.key) {
        (Some(m), Some(key)) => {
            let file = Zeroizing::new(m.issue(identity, role).to_file()?);
            seal::aead_seal(&*token.kek(key)?, &aad(&token.auth_hash()), file.as_bytes())
        }
        (None, None) => Vec::new(),
        (None, Some(_)) => {
            return Err(keyring(
                "the appliance is sealed: a token carries the member's keys, so the keyring \
                 master file is needed (--master)",
            ))
        }
        (Some(_), None) => {
            return Err(keyring(
                "the appliance is managed: its tokens carry no keys; leave out --master",
            ))
        }
    };
    let account_role = match role {
        Role::ReadWrite => "",
        Role::WriteOnly => "write-only",
        Role::LogOnly => "log-only",
    };
    session
        .raw()
        .create_enrollment(v1::CreateEnrollmentRequest {
            identity: identity.to_string(),
            role: account_role.to_string(),
            expires_us,
            auth_hash: Bytes::copy_from_slice(&token.auth_hash()),
            sealed_keys: sealed_keys.into(),
            delete_passphrase: delete_passphrase.to_string(),
        })
        .await?;
    let mut text = format!("{PREFIX}{}", hex::encode(token.auth));
    if let Some(k) = &token.key {
        text.push('.');
        text.push_str(&hex::encode(**k));
    }
    Ok(text)
}

/// What redeeming a token gave: the account, its generated password, and (sealed) its member
/// file, checked.
#[derive(Debug)]
pub struct Enrolled {
    pub identity: String,
    pub password: String,
    pub member_file: Option<String>,
}

/// Redeems `token` at `target` as `identity`: the appliance creates the account with a
/// generated password; a sealed token's member file is opened and checked here.
///
/// # Errors
/// A malformed token; the appliance's refusal (unknown, used, expired or another account's
/// token: one answer); a member file that does not open or is another account's.
pub async fn redeem(target: &Target, identity: &str, token: &str) -> Result<Enrolled, ClientError> {
    let token = Token::parse(token)?;
    let password = hex::encode(rand::random::<[u8; 24]>());
    let mut client = CofferClient::new(channel(target).await?);
    let r = client
        .enroll(v1::EnrollRequest {
            protocol_version: coffer_proto::PROTOCOL_VERSION,
            identity: identity.to_string(),
            auth: Bytes::copy_from_slice(&token.auth),
            password: password.clone(),
        })
        .await?
        .into_inner();
    let member_file =
        match (&token.key, r.sealed_keys.is_empty()) {
            (None, true) => None,
            (Some(key), false) => {
                let plain =
                    seal::aead_open(&*token.kek(key)?, &aad(&token.auth_hash()), &r.sealed_keys)
                        .ok_or_else(|| {
                            keyring(
                            "the keys the appliance returned for this token do not open with it",
                        )
                        })?;
                let text = String::from_utf8(plain)
                    .map_err(|_| keyring("the token's member file is not text"))?;
                let m = Member::from_file(&text)?;
                if m.member != r.identity {
                    return Err(keyring(format!(
                        "the token's member file is for {}, not {}",
                        m.member, r.identity
                    )));
                }
                Some(text)
            }
            _ => return Err(keyring(
                "the token and the appliance disagree on the repository's mode (a sealed token \
                 for a managed appliance, or the reverse)",
            )),
        };
    Ok(Enrolled {
        identity: r.identity,
        password,
        member_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_refuse_garbage() {
        let t = Token::parse(&format!("{PREFIX}{}", "ab".repeat(16))).unwrap();
        assert!(t.key.is_none() && t.auth == [0xab; 16]);
        let t = Token::parse(&format!(
            " {PREFIX}{}.{}\n",
            "01".repeat(16),
            "02".repeat(16)
        ))
        .unwrap();
        assert_eq!(t.key.as_deref(), Some(&[2u8; 16]));
        for bad in [
            "",
            "coffer-enroll-v1:",
            "coffer-enroll-v1:zz",
            "x:abab",
            &format!("{PREFIX}{}.", "ab".repeat(16)),
        ] {
            assert!(Token::parse(bad).is_err(), "{bad:?}");
        }
    }
}
