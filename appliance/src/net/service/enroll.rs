//! Enrollment tokens: an operator (or a keyring admin) creates a one-time token for an account
//! that does not exist yet; a fleet machine redeems it without any other secret. The appliance
//! stores only BLAKE3 of the token's authentication half and, in sealed mode, the member file
//! encrypted under a key only the token's key half derives (`docs/format.md`).

use std::net::IpAddr;

use bytes::Bytes;
use coffer_proto::v1;
use tonic::Request;

use super::{catalog_call, Inner};
use crate::access::accounts::{hash_password, normalise_identity, MIN_PASSWORD_CHARS};
use crate::access::rules::{self, Access, TargetType};
use crate::access::{Role, Session};
use crate::catalog::{CatalogError, EnrollmentRecord, UserRecord};
use crate::error::ApplianceError;
use crate::repo::Mode;

/// Longest a token may wait to be redeemed.
const MAX_TOKEN_LIFE_US: i64 = 30 * 24 * 3600 * 1_000_000;
/// Largest sealed member file a token carries.
const MAX_SEALED_KEYS: usize = 64 << 10;

/// The one answer for every token that cannot be redeemed: unknown, used, expired, or another
/// account's (no oracle on which).
fn no_token() -> ApplianceError {
    ApplianceError::Unauthenticated(
        "enrollment token unknown, used, expired or for another account; ask for a new one".into(),
    )
}

impl Inner {
    pub(super) async fn create_enrollment(
        &self,
        session: &Session,
        source: Option<IpAddr>,
        req: v1::CreateEnrollmentRequest,
    ) -> Result<v1::CreateEnrollmentResponse, ApplianceError> {
        let identity = normalise_identity(&req.identity)?;
        let role = Role::parse((!req.role.is_empty()).then_some(req.role.as_str()))
            .map_err(ApplianceError::InvalidArgument)?;
        let bad = |why: String| ApplianceError::InvalidArgument(why);
        if req.auth_hash.len() != 32 {
            return Err(bad(
                "auth_hash is BLAKE3 of the token's authentication half: 32 bytes".into(),
            ));
        }
        if req.sealed_keys.len() > MAX_SEALED_KEYS {
            return Err(bad(format!(
                "sealed keys of at most {MAX_SEALED_KEYS} bytes"
            )));
        }
        if (self.hello.mode == Mode::Sealed) == req.sealed_keys.is_empty() {
            return Err(bad(
                "a sealed repository's token carries the member's sealed keys, a managed \
                 repository's carries none"
                    .into(),
            ));
        }
        let now = crate::clock::now_us();
        if req.expires_us <= now || req.expires_us > now + MAX_TOKEN_LIFE_US {
            return Err(bad(
                "a token expires in the future, at most 30 days ahead".into()
            ));
        }
        let (user, host) = identity.split_once('@').expect("normalised");
        self.checked(session, "enroll.create", &identity, async {
            let rules = self.auth.rules();
            let full = |kind, labels: &[(&str, &str)]| {
                rules::access(&rules, &session.identity, kind, labels)
                    .is_some_and(|a| a >= Access::Full)
            };
            if !full(TargetType::User, &[("username", user), ("hostname", host)])
                || !full(TargetType::Acl, &[])
            {
                return Err(ApplianceError::PermissionDenied(format!(
                    "{} may not create accounts (needs FULL on the user and acl targets)",
                    session.identity
                )));
            }
            self.auth
                .step_up(&session.identity, &req.delete_passphrase, source)
                .await
        })
        .await?;
        let rec = EnrollmentRecord {
            identity,
            role: role.name().map(str::to_string),
            expires_us: req.expires_us,
            sealed_keys: hex::encode(&req.sealed_keys),
            created_by: session.identity.clone(),
        };
        let hash = hex::encode(&req.auth_hash);
        catalog_call(&self.catalog, move |c| c.put_enrollment(&hash, &rec)).await?;
        Ok(v1::CreateEnrollmentResponse {})
    }

    pub(super) async fn enroll(
        &self,
        req: Request<v1::EnrollRequest>,
    ) -> Result<v1::EnrollResponse, ApplianceError> {
        super::accounts::same_protocol(req.get_ref().protocol_version)?;
        let source = crate::net::limits::source_of(&req);
        let req = req.into_inner();
        let identity = normalise_identity(&req.identity)?;
        if req.password.chars().count() < MIN_PASSWORD_CHARS
            || req.password.len() > crate::access::accounts::MAX_PASSWORD_BYTES
        {
            return Err(ApplianceError::InvalidArgument(format!(
                "the new account's password must have {MIN_PASSWORD_CHARS} to {} bytes",
                crate::access::accounts::MAX_PASSWORD_BYTES
            )));
        }
        let keys = self.auth.enroll_turn(&identity, source).await?;
        let hash = hex::encode(blake3::hash(&req.auth).as_bytes());
        let phc = {
            let pw = req.password.clone();
            super::on_blocking_pool("hash", move || hash_password(&pw)).await?
        };
        let now = crate::clock::now_us();
        let who = identity.clone();
        let redeemed = {
            let _one = self.enrollments.lock().await;
            catalog_call(&self.catalog, move |c| {
                let Some(rec) = c.enrollment(&hash)? else {
                    return Ok(None);
                };
                if rec.expires_us <= now {
                    c.redeem_enrollment(&hash, None)?;
                    return Ok(None);
                }
                if rec.identity != who {
                    return Ok(None);
                }
                let user = UserRecord {
                    identity: who,
                    password_hash: phc,
                    created_unix: now / 1_000_000,
                    owner: Some(hex::encode(rand::random::<[u8; 16]>())),
                    quota: None,
                    delete_passphrase: None,
                    role: rec.role.clone(),
                };
                match c.redeem_enrollment(&hash, Some(&user)) {
                    Ok(()) => Ok(Some(rec)),
                    Err(CatalogError::Exists(_)) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?
        };
        self.auth
            .enroll_done(&identity, source, &keys, redeemed.is_some());
        let rec = redeemed.ok_or_else(no_token)?;
        let auth = self.auth.clone();
        super::on_blocking_pool("reload", move || auth.reload()).await?;
        Ok(v1::EnrollResponse {
            identity,
            role: rec.role.unwrap_or_default(),
            sealed_keys: Bytes::from(hex::decode(&rec.sealed_keys).unwrap_or_default()),
        })
    }
}
