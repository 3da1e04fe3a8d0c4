//! The `coffer.v1.Coffer` service: one file per group of calls — [`chunks`] (FindMissing,
//! PutChunks, GetChunks), [`snapshots`] (commit, open, list, get, delete) and [`accounts`]
//! (Hello, ChangePassword, Refresh, ServerStatus).
//!
//! Owns: decoding requests, checking the session and its rights, answering. Handlers return
//! [`ApplianceError`]; the `?` in the trait methods below is where it becomes a `tonic::Status`
//! (through the one mapping in [`crate::net::status`]). Must never touch RocksDB indexes or pack
//! files: chunks go through [`Shards`], trees through [`Walker`], the catalog through the
//! blocking pool ([`catalog_call`]).

mod accounts;
mod chunks;
mod enroll;
mod history;
mod snapshots;

pub(crate) use history::policy_access;

use std::pin::Pin;
use std::sync::Arc;

use coffer_proto::v1::{self, coffer_server::Coffer};
use coffer_proto::{DedupKey, RepositoryId};
use futures::{Stream, StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::access::{Auth, Session, Use};
use crate::catalog::{Catalog, CatalogError};
use crate::error::ApplianceError;
use crate::maintenance::gc::Gate;
use crate::metrics::Metrics;
use crate::net::budget::Budget;
use crate::net::calls::CallRecord;
use crate::net::limits::{self, AccountStreams};
use crate::reach::Walker;
use crate::shard::Shards;

/// Batches of one stream processed concurrently (pipelining; answers stay in order).
const PIPELINE_DEPTH: usize = 4;

/// What `Hello` tells a client.
#[derive(Debug, Clone)]
pub struct HelloInfo {
    /// Sealed: `dedup_key` is never told, and chunks are client envelopes.
    pub mode: crate::repo::Mode,
    pub repository_id: RepositoryId,
    pub chunker: v1::ChunkerParams,
    pub dedup_key: DedupKey,
    pub limits: v1::Limits,
}

/// The `coffer.v1.Coffer` service.
#[derive(Debug, Clone)]
pub struct CofferService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shards: Shards,
    walker: Walker,
    catalog: Arc<Catalog>,
    auth: Arc<Auth>,
    hello: HelloInfo,
    /// Between index answers and the GC's barrier (see `maintenance::gc`).
    gate: Arc<Gate>,
    /// How many refused requests each identity may still leave in the audit log this minute.
    refusals: history::Refusals,
    /// Chunk bytes read and not yet sent, appliance-wide (each account has its share).
    read_budget: Budget,
    /// Upload bytes received and not yet stored, per account (all: the shards' queues).
    upload_budget: Budget,
    /// Streaming calls per account.
    streams: Arc<AccountStreams>,
    limits: coffer_tuning::Limits,
    /// One token redemption at a time: a token is used once.
    enrollments: tokio::sync::Mutex<()>,
    metrics: Arc<Metrics>,
}

impl CofferService {
    #[must_use]
    pub fn new(
        shards: Shards,
        catalog: Arc<Catalog>,
        auth: Arc<Auth>,
        hello: HelloInfo,
        gate: Arc<Gate>,
        limits: coffer_tuning::Limits,
        metrics: Arc<Metrics>,
    ) -> Self {
        let wait = std::time::Duration::from_secs(limits.admission_wait_secs);
        let read_budget = Budget::new("read", limits.read_budget_bytes, 256 << 20, wait);
        let upload_budget = Budget::new(
            "upload",
            limits.shard_queue_bytes * u64::from(shards.count()),
            limits.upload_bytes_per_account,
            wait,
        );
        Self {
            inner: Arc::new(Inner {
                walker: Walker::new(shards.clone()),
                shards,
                catalog,
                auth,
                hello,
                gate,
                refusals: history::Refusals::default(),
                read_budget,
                upload_budget,
                streams: AccountStreams::new(limits.streams_per_account),
                limits,
                enrollments: tokio::sync::Mutex::new(()),
                metrics,
            }),
        }
    }

    /// `SetPolicy` on behalf of the web UI: the RPC's checks, step-up and audit.
    ///
    /// # Errors
    /// As the RPC.
    pub(crate) async fn set_policy_for(
        &self,
        session: &Session,
        source: Option<std::net::IpAddr>,
        req: v1::SetPolicyRequest,
    ) -> Result<v1::SetPolicyResponse, ApplianceError> {
        session.role.allows(Use::Change)?;
        self.inner.set_policy(session, source, req).await
    }

    /// `AddRule` on behalf of the web UI: the RPC's checks, step-up and audit.
    ///
    /// # Errors
    /// As the RPC.
    pub(crate) async fn add_rule_for(
        &self,
        session: &Session,
        source: Option<std::net::IpAddr>,
        req: v1::AddRuleRequest,
    ) -> Result<v1::AddRuleResponse, ApplianceError> {
        session.role.allows(Use::Change)?;
        self.inner.add_rule(session, source, req).await
    }

    /// The step-up (delete passphrase) of `session`'s account, for a web UI change that has no
    /// RPC of its own (removing a rule).
    ///
    /// # Errors
    /// As [`Auth::step_up`]; a restricted role.
    pub(crate) async fn step_up_for(
        &self,
        session: &Session,
        passphrase: &str,
        source: Option<std::net::IpAddr>,
    ) -> Result<(), ApplianceError> {
        session.role.allows(Use::Change)?;
        self.inner
            .auth
            .step_up(&session.identity, passphrase, source)
            .await
    }

    /// The upload and read budgets (their bytes in use are exported as metrics).
    #[must_use]
    pub fn budgets(&self) -> (Budget, Budget) {
        (
            self.inner.upload_budget.clone(),
            self.inner.read_budget.clone(),
        )
    }
}

impl Inner {
    fn any_session<T>(&self, req: &Request<T>) -> Result<Session, ApplianceError> {
        let token = req
            .metadata()
            .get(coffer_proto::SESSION_HEADER)
            .and_then(|v| v.to_str().ok());
        let s = self.auth.session(token)?;
        if let Some(call) = req.extensions().get::<Arc<CallRecord>>() {
            call.set_identity(&s.identity);
        }
        Ok(s)
    }

    /// A user's session: the server control user may only refresh and read status.
    fn session<T>(&self, req: &Request<T>) -> Result<Session, ApplianceError> {
        let s = self.any_session(req)?;
        if s.control {
            return Err(ApplianceError::PermissionDenied(
                "the server control user may only call Refresh and ServerStatus".into(),
            ));
        }
        Ok(s)
    }

    fn control_session<T>(&self, req: &Request<T>) -> Result<Session, ApplianceError> {
        let s = self.any_session(req)?;
        if !s.control {
            return Err(ApplianceError::PermissionDenied(
                "only the server control user may call this".into(),
            ));
        }
        Ok(s)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Answers each message of a request stream with `f`, up to [`PIPELINE_DEPTH`] at a time, in
/// order; the first error ends the stream with its status. Every message first checks that the
/// session was not ended meanwhile.
///
/// The call takes one of the account's stream slots for its whole life; the stream is bounded
/// in messages and in time between them (`net::limits::bounded`). With `weigh`, each message's
/// bytes are admitted by the account's upload budget before the next message is read, and held
/// until `f` is done with it: a stream holds at most one message beyond what it was admitted.
fn pipelined<Req, Resp, F, Fut>(
    inner: &Arc<Inner>,
    session: Session,
    input: Streaming<Req>,
    weigh: Option<fn(&Req) -> u64>,
    f: F,
) -> Result<BoxStream<Resp>, ApplianceError>
where
    Req: Send + 'static,
    Resp: Send + 'static,
    F: Fn(Arc<Inner>, Session, Req) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Resp, ApplianceError>> + Send + 'static,
{
    let slot = inner.streams.enter(&session.identity)?;
    let l = &inner.limits;
    let input = limits::bounded(
        input,
        l.messages_per_stream,
        std::time::Duration::from_secs(l.stream_idle_secs),
    );
    let (budget, identity) = (inner.upload_budget.clone(), session.identity.clone());
    let admitted = input.then(move |m| {
        let (budget, identity) = (budget.clone(), identity.clone());
        async move {
            let m = m?;
            let held = match weigh {
                Some(w) => Some(budget.admit(&identity, w(&m)).await?),
                None => None,
            };
            Ok::<_, Status>((m, held))
        }
    });
    let inner = inner.clone();
    let f = Arc::new(f);
    Ok(Box::pin(
        admitted
            .map(move |m| {
                let (inner, f, session) = (inner.clone(), f.clone(), session.clone());
                async move {
                    let (m, held) = m?;
                    session.state.check()?;
                    let r = f(inner, session, m).await?;
                    drop(held);
                    Ok::<_, Status>(r)
                }
            })
            .buffered(PIPELINE_DEPTH)
            .map(move |r| {
                let _slot = &slot;
                r
            }),
    ))
}

/// Runs a catalog call on the blocking pool.
async fn catalog_call<T: Send + 'static>(
    catalog: &Arc<Catalog>,
    f: impl FnOnce(&Catalog) -> Result<T, CatalogError> + Send + 'static,
) -> Result<T, ApplianceError> {
    let catalog = catalog.clone();
    on_blocking_pool("catalog call", move || Ok(f(&catalog)?)).await
}

/// Runs blocking or CPU-heavy work (RocksDB, argon2 reloads) on tokio's blocking pool, off the
/// network threads.
async fn on_blocking_pool<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, ApplianceError> + Send + 'static,
) -> Result<T, ApplianceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApplianceError::Internal(format!("{what}: {e}")))?
}

#[tonic::async_trait]
impl Coffer for CofferService {
    async fn hello(
        &self,
        req: Request<v1::HelloRequest>,
    ) -> Result<Response<v1::HelloResponse>, Status> {
        Ok(Response::new(self.inner.hello(req).await?))
    }

    async fn enroll(
        &self,
        req: Request<v1::EnrollRequest>,
    ) -> Result<Response<v1::EnrollResponse>, Status> {
        Ok(Response::new(self.inner.enroll(req).await?))
    }

    async fn create_enrollment(
        &self,
        req: Request<v1::CreateEnrollmentRequest>,
    ) -> Result<Response<v1::CreateEnrollmentResponse>, Status> {
        let session = self.inner.session(&req)?;
        session.role.allows(Use::Change)?;
        let source = limits::source_of(&req);
        Ok(Response::new(
            self.inner
                .create_enrollment(&session, source, req.into_inner())
                .await?,
        ))
    }

    type FindMissingStream = BoxStream<v1::FindMissingResponse>;

    async fn find_missing(
        &self,
        req: Request<Streaming<v1::FindMissingRequest>>,
    ) -> Result<Response<Self::FindMissingStream>, Status> {
        let session = self.inner.session(&req)?;
        session.role.allows(Use::Write)?;
        Ok(Response::new(pipelined(
            &self.inner,
            session,
            req.into_inner(),
            None,
            |inner, session, m: v1::FindMissingRequest| async move {
                inner.find_missing(&session, m.ids, m.envelope_hashes).await
            },
        )?))
    }

    type PutChunksStream = BoxStream<v1::PutChunksResponse>;

    async fn put_chunks(
        &self,
        req: Request<Streaming<v1::PutChunksRequest>>,
    ) -> Result<Response<Self::PutChunksStream>, Status> {
        let session = self.inner.session(&req)?;
        session.role.allows(Use::Write)?;
        Ok(Response::new(pipelined(
            &self.inner,
            session,
            req.into_inner(),
            Some(|m: &v1::PutChunksRequest| m.chunks.iter().map(|c| c.data.len() as u64).sum()),
            |inner, session, m| async move { inner.put(&session, m).await },
        )?))
    }

    type GetChunksStream = BoxStream<v1::GetChunksResponse>;

    async fn get_chunks(
        &self,
        req: Request<Streaming<v1::GetChunksRequest>>,
    ) -> Result<Response<Self::GetChunksStream>, Status> {
        let session = self.inner.session(&req)?;
        session.role.allows(Use::Read)?;
        // One request message may be answered in several (by size): a stream of streams.
        let answers = pipelined(
            &self.inner,
            session,
            req.into_inner(),
            None,
            |inner, session, m: v1::GetChunksRequest| async move {
                Ok(inner.get(&session, m.ids).await?.map_err(Status::from))
            },
        )?;
        Ok(Response::new(Box::pin(answers.try_flatten())))
    }

    async fn commit_snapshot(
        &self,
        req: Request<v1::CommitSnapshotRequest>,
    ) -> Result<Response<v1::CommitSnapshotResponse>, Status> {
        let session = self.inner.session(&req)?;
        session.role.allows(Use::Write)?;
        Ok(Response::new(
            self.inner
                .commit_snapshot(&session, req.into_inner())
                .await?,
        ))
    }

    async fn open_snapshot(
        &self,
        req: Request<v1::OpenSnapshotRequest>,
    ) -> Result<Response<v1::OpenSnapshotResponse>, Status> {
        let session = self.inner.session(&req)?;
        session.role.allows(Use::Read)?;
        Ok(Response::new(
            self.inner.open_snapshot(&session, req.into_inner()).await?,
        ))
    }

    async fn list_snapshots(
        &self,
        req: Request<v1::ListSnapshotsRequest>,
    ) -> Result<Response<v1::ListSnapshotsResponse>, Status> {
        let session = self.inner.session(&req)?;
        session.role.allows(Use::List)?;
        Ok(Response::new(
            self.inner
                .list_snapshots(&session, req.into_inner())
                .await?,
        ))
    }

    async fn delete_snapshot(
        &self,
        req: Request<v1::DeleteSnapshotRequest>,
    ) -> Result<Response<v1::DeleteSnapshotResponse>, Status> {
        let session = self.inner.session(&req)?;
        session.role.allows(Use::Change)?;
        let source = limits::source_of(&req);
        Ok(Response::new(
            self.inner
                .delete_snapshot(&session, source, req.into_inner())
                .await?,
        ))
    }

    async fn protect_snapshot(
        &self,
        req: Request<v1::ProtectSnapshotRequest>,
    ) -> Result<Response<v1::ProtectSnapshotResponse>, Status> {
        let session = self.inner.session(&req)?;
        session.role.allows(Use::Change)?;
        let source = limits::source_of(&req);
        Ok(Response::new(
            self.inner
                .protect_snapshot(&session, source, req.into_inner())
                .await?,
        ))
    }

    async fn lock_snapshot(
        &self,
        req: Request<v1::LockSnapshotRequest>,
    ) -> Result<Response<v1::LockSnapshotResponse>, Status> {
        let session = self.inner.session(&req)?;
        session.role.allows(Use::Change)?;
        Ok(Response::new(
            self.inner.lock_snapshot(&session, req.into_inner()).await?,
        ))
    }

    async fn set_policy(
        &self,
        req: Request<v1::SetPolicyRequest>,
    ) -> Result<Response<v1::SetPolicyResponse>, Status> {
        let session = self.inner.session(&req)?;
        session.role.allows(Use::Change)?;
        let source = limits::source_of(&req);
        Ok(Response::new(
            self.inner
                .set_policy(&session, source, req.into_inner())
                .await?,
        ))
    }

    async fn add_rule(
        &self,
        req: Request<v1::AddRuleRequest>,
    ) -> Result<Response<v1::AddRuleResponse>, Status> {
        let session = self.inner.session(&req)?;
        session.role.allows(Use::Change)?;
        let source = limits::source_of(&req);
        Ok(Response::new(
            self.inner
                .add_rule(&session, source, req.into_inner())
                .await?,
        ))
    }

    async fn get_snapshot(
        &self,
        req: Request<v1::GetSnapshotRequest>,
    ) -> Result<Response<v1::GetSnapshotResponse>, Status> {
        let session = self.inner.session(&req)?;
        session.role.allows(Use::List)?;
        Ok(Response::new(
            self.inner.get_snapshot(&session, req.into_inner()).await?,
        ))
    }

    async fn change_password(
        &self,
        req: Request<v1::ChangePasswordRequest>,
    ) -> Result<Response<v1::ChangePasswordResponse>, Status> {
        let session = self.inner.session(&req)?;
        Ok(Response::new(
            self.inner
                .change_password(&session, req.into_inner())
                .await?,
        ))
    }

    async fn refresh(
        &self,
        req: Request<v1::RefreshRequest>,
    ) -> Result<Response<v1::RefreshResponse>, Status> {
        self.inner.control_session(&req)?;
        let auth = self.inner.auth.clone();
        on_blocking_pool("reload", move || auth.reload()).await?;
        Ok(Response::new(v1::RefreshResponse {}))
    }

    async fn end_session(
        &self,
        req: Request<v1::EndSessionRequest>,
    ) -> Result<Response<v1::EndSessionResponse>, Status> {
        // Any session may end itself, the server control user's too.
        self.inner.any_session(&req)?;
        if let Some(t) = req
            .metadata()
            .get(coffer_proto::SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            self.inner.auth.end_session(t);
        }
        Ok(Response::new(v1::EndSessionResponse {}))
    }

    async fn get_policy(
        &self,
        req: Request<v1::GetPolicyRequest>,
    ) -> Result<Response<v1::GetPolicyResponse>, Status> {
        let s = self.inner.session(&req)?;
        Ok(Response::new(
            self.inner.get_policy(&s, req.into_inner()).await?,
        ))
    }

    async fn server_status(
        &self,
        req: Request<v1::ServerStatusRequest>,
    ) -> Result<Response<v1::ServerStatusResponse>, Status> {
        self.inner.control_session(&req)?;
        Ok(Response::new(self.inner.server_status().await?))
    }
}
