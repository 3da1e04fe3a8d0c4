//! Account calls: Hello (login), ChangePassword, and the control user's ServerStatus.

use std::sync::Arc;

use bytes::Bytes;
use coffer_proto::v1;
use tonic::Request;

use super::{catalog_call, on_blocking_pool, Inner};
use crate::access::accounts::MIN_PASSWORD_CHARS;
use crate::access::rules::{self, Access, TargetType};
use crate::access::Session;
use crate::error::ApplianceError;
use crate::net::calls::CallRecord;
use crate::repo::Mode;

impl Inner {
    /// The effective policy of one of the caller's paths: READ on that path's policy target
    /// (the built-in rules give every account FULL on its own levels).
    pub(super) async fn get_policy(
        &self,
        session: &Session,
        req: v1::GetPolicyRequest,
    ) -> Result<v1::GetPolicyResponse, ApplianceError> {
        let path = req.path;
        let target =
            crate::catalog::policy::PolicyTarget::parse(&format!("{}:{path}", session.identity))
                .map_err(|e| ApplianceError::InvalidArgument(e.to_string()))?;
        let (user, host) = session
            .identity
            .split_once('@')
            .unwrap_or((session.identity.as_str(), ""));
        let may = super::history::policy_access(&self.auth.rules(), &session.identity, &target);
        if may.is_none() {
            return Err(ApplianceError::PermissionDenied(format!(
                "{} may not read the policy of {path}",
                session.identity
            )));
        }
        let identity = session.identity.clone();
        let levels = catalog_call(&self.catalog, crate::catalog::Catalog::policies).await?;
        let e = crate::catalog::policy::resolve(&levels, &identity, &path);
        let mut scheduled = Vec::new();
        for (t, _) in &levels {
            if let crate::catalog::policy::PolicyTarget::Path {
                user: u,
                host: h,
                path: p,
            } = t
            {
                if u == user && h == host {
                    if let Some(schedule) = crate::catalog::policy::resolve(&levels, &identity, p)
                        .policy
                        .schedule
                    {
                        scheduled.push(v1::ScheduledPath {
                            path: p.clone(),
                            schedule,
                        });
                    }
                }
            }
        }
        Ok(v1::GetPolicyResponse {
            scheduled,
            fields: crate::access::admin::effective_fields(&e)
                .into_iter()
                .map(|f| v1::PolicyField {
                    name: f.field,
                    value_json: f.value,
                    level: f.from,
                })
                .collect(),
        })
    }

    pub(super) async fn hello(
        &self,
        req: Request<v1::HelloRequest>,
    ) -> Result<v1::HelloResponse, ApplianceError> {
        // The protocol version is checked before anything else, credentials included.
        same_protocol(req.get_ref().protocol_version)?;
        let source = crate::net::limits::source_of(&req);
        let call = req.extensions().get::<Arc<CallRecord>>().cloned();
        let req = req.into_inner();
        let (token, identity) = self
            .auth
            .login(&req.identity, &req.password, source)
            .await
            .inspect_err(|_| {
                self.metrics.logins_failed.inc();
            })?;
        if let Some(call) = call {
            call.set_identity(&identity);
        }
        let h = &self.hello;
        let who = identity.clone();
        let auth = self.auth.clone();
        let delete_passphrase_set =
            on_blocking_pool("account", move || auth.has_delete_passphrase(&who)).await?;
        Ok(v1::HelloResponse {
            delete_passphrase_set,
            protocol_version: coffer_proto::PROTOCOL_VERSION,
            repository_id: Bytes::copy_from_slice(h.repository_id.as_bytes()),
            mode: match h.mode {
                Mode::Managed => v1::EncryptionMode::Managed,
                Mode::Sealed => v1::EncryptionMode::Sealed,
            }
            .into(),
            chunker: Some(h.chunker),
            // Sealed: ids are keyed within the client's keyring; the appliance's key is its own.
            dedup_key: match h.mode {
                Mode::Managed => Bytes::copy_from_slice(h.dedup_key.as_bytes()),
                Mode::Sealed => Bytes::new(),
            },
            limits: Some(h.limits),
            appliance_version: env!("CARGO_PKG_VERSION").to_string(),
            disclosure: self.auth.disclosure().into(),
            possession_key: self
                .auth
                .state_of(&token)
                .map(|s| Bytes::copy_from_slice(&s.possession_key))
                .unwrap_or_default(),
            compressions: vec![v1::Compression::Lz4.into()],
            role: self
                .auth
                .session(Some(token.as_str()))
                .ok()
                .and_then(|s| s.role.name())
                .unwrap_or_default()
                .to_string(),
            identity,
            session_token: token,
        })
    }

    pub(super) async fn change_password(
        &self,
        session: &Session,
        req: v1::ChangePasswordRequest,
    ) -> Result<v1::ChangePasswordResponse, ApplianceError> {
        let (user, host) = session.identity.split_once('@').ok_or_else(|| {
            ApplianceError::Internal(format!("session identity {} without @", session.identity))
        })?;
        let allowed = rules::access(
            &self.auth.rules(),
            &session.identity,
            TargetType::User,
            &[("username", user), ("hostname", host)],
        );
        if allowed.is_none_or(|a| a < Access::Append) {
            return Err(ApplianceError::PermissionDenied(format!(
                "{} may not change its password",
                session.identity
            )));
        }
        let pw = req.new_password;
        if pw.chars().count() < MIN_PASSWORD_CHARS {
            return Err(ApplianceError::InvalidArgument(format!(
                "passwords must be at least {MIN_PASSWORD_CHARS} characters"
            )));
        }
        let hash = self.auth.hash_new_password(pw).await?;
        let identity = session.identity.clone();
        let event = crate::catalog::audit::Event::done(&identity, "user.password", &identity);
        catalog_call(&self.catalog, move |c| {
            c.audited(&event, |c| {
                let Some(mut u) = c.user(&identity)? else {
                    // Deleted while this call ran: no change, so no entry.
                    return Err(crate::catalog::CatalogError::NotFound(format!(
                        "no account {identity}: it was deleted"
                    )));
                };
                u.password_hash = hash;
                c.set_user(&u)
            })
        })
        .await?;
        // Every session of the account ends (the caller's too): the old password is gone.
        let auth = self.auth.clone();
        on_blocking_pool("reload", move || auth.reload()).await?;
        Ok(v1::ChangePasswordResponse {})
    }

    pub(super) async fn server_status(&self) -> Result<v1::ServerStatusResponse, ApplianceError> {
        let (users, stored) = catalog_call(&self.catalog, |c| {
            Ok((c.users()?.len(), c.acl_rules()?.len()))
        })
        .await?;
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(v1::ServerStatusResponse {
            appliance_version: env!("CARGO_PKG_VERSION").to_string(),
            shards: u32::from(self.shards.count()),
            users: count(users),
            sessions: count(self.auth.session_count()),
            acl_rules: count(self.auth.rules().len()),
            acl_defaults: stored == 0,
        })
    }
}

/// Refuses a client of another protocol version (checked before anything else, credentials
/// included).
pub(super) fn same_protocol(version: u32) -> Result<(), ApplianceError> {
    if version == coffer_proto::PROTOCOL_VERSION {
        return Ok(());
    }
    Err(ApplianceError::FailedPrecondition(format!(
        "this client speaks coffer protocol {version} but the appliance speaks {}; upgrade the \
         older side",
        coffer_proto::PROTOCOL_VERSION
    )))
}
