//! The admin socket `<repo>/admin.sock` (mode 0600) and SIGHUP: account and rule changes applied
//! by the running appliance, in force when the command returns (see [`crate::access::admin`]).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;

use super::ServeError;
use crate::access::{admin, Auth};
use crate::catalog::Catalog;
use crate::error::ApplianceError;
use crate::maintenance::forget;
use crate::maintenance::gc::Collector;
use crate::maintenance::usage::{By, UsageReport};

/// What the admin socket and SIGHUP act on.
pub(super) struct Admin {
    pub(super) socket: PathBuf,
    pub(super) catalog: Arc<Catalog>,
    pub(super) auth: Arc<Auth>,
    pub(super) gc: Arc<Collector>,
    pub(super) metrics: Arc<crate::metrics::Metrics>,
    pub(super) scrape: Arc<super::metrics_http::Scrape>,
}

impl Admin {
    /// Binds the admin socket (mode 0600), replacing a stale one left by a crash.
    pub(super) fn bind(&self) -> Result<UnixListener, ServeError> {
        if self.socket.exists() {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Err(ServeError::Refused(format!(
                    "another appliance is serving this repository (its admin socket {} answers)",
                    self.socket.display()
                )));
            }
            std::fs::remove_file(&self.socket)
                .map_err(|e| ServeError::io("removing a stale admin socket", e))?;
        }
        let l = UnixListener::bind(&self.socket)
            .map_err(|e| ServeError::io(format!("admin socket {}", self.socket.display()), e))?;
        std::fs::set_permissions(&self.socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| ServeError::io("making the admin socket private", e))?;
        Ok(l)
    }

    pub(super) async fn serve(self: Arc<Self>, listener: UnixListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(self.clone().answer(stream));
        }
    }

    /// Maintenance (on a blocking thread): forget what retention no longer keeps, reload so that
    /// sessions drop what was forgotten, then collect garbage. With `dry_run`, report what
    /// would be forgotten and freed and change nothing.
    ///
    /// # Errors
    /// Catalog errors; the collector's (see [`Collector::run`]).
    pub(super) fn maintain(
        &self,
        rt: &tokio::runtime::Handle,
        dry_run: bool,
        now_us: Option<i64>,
    ) -> Result<admin::Reply, ApplianceError> {
        if dry_run {
            return self.maintain_once(rt, true, now_us);
        }
        let began = std::time::Instant::now();
        let outcome = self.maintain_once(rt, false, now_us);
        let m = &self.metrics;
        match &outcome {
            Ok(r) => {
                m.maintenance_runs.inc();
                m.maintenance_freed_bytes
                    .inc_by(r.gc.as_ref().map_or(0, |g| g.bytes_deleted));
            }
            Err(_) => {
                m.maintenance_errors.inc();
            }
        }
        m.maintenance_last_run_timestamp_seconds
            .set(crate::clock::now_us() / 1_000_000);
        m.maintenance_last_duration_seconds
            .set(began.elapsed().as_secs_f64());
        // Forgotten snapshots may have been a source's last ones.
        if let Ok(snaps) = self.catalog.snapshots() {
            m.reset_backups(&snaps);
        }
        outcome
    }

    fn maintain_once(
        &self,
        rt: &tokio::runtime::Handle,
        dry_run: bool,
        now_us: Option<i64>,
    ) -> Result<admin::Reply, ApplianceError> {
        self.catalog.repair_journal()?;
        let verdicts = forget::plan(&self.catalog, now_us.unwrap_or_else(crate::clock::now_us))?;
        let mut reply = admin::Reply {
            ok: true,
            ..admin::Reply::default()
        };
        let gc = if dry_run {
            let gone = verdicts
                .iter()
                .filter(|v| !v.kept())
                .filter_map(|v| coffer_proto::SnapshotId::from_hex(&v.snapshot).ok())
                .collect();
            self.gc.run(rt, true, &gone)?
        } else {
            reply.forgotten = forget::apply(&self.catalog, &verdicts)? as u64;
            crate::faults::point("maintenance.forgotten");
            self.auth.reload()?;
            self.gc.run(rt, false, &std::collections::HashSet::new())?
        };
        if !dry_run {
            self.catalog.audit(
                &crate::catalog::audit::Event::done("maintenance", "maintenance.run", "")
                    .with_detail(format!(
                        "forgot {} snapshots; removed {} chunks; deleted {} packs, compacted {}",
                        reply.forgotten, gc.condemned, gc.packs_deleted, gc.packs_compacted
                    )),
            )?;
        }
        reply.verdicts = verdicts;
        reply.gc = Some(gc);
        if !dry_run && self.auth.quotas.any() {
            // What retention and GC freed counts against the quotas at once.
            self.usage(rt, By::User)?;
        }
        Ok(reply)
    }

    /// Counts usage; a count by user also becomes the quotas' new base.
    ///
    /// # Errors
    /// As [`crate::maintenance::usage::count`].
    pub(super) fn usage(
        &self,
        rt: &tokio::runtime::Handle,
        by: By,
    ) -> Result<UsageReport, ApplianceError> {
        let r = self.gc.usage(rt, by)?;
        if by == By::User {
            let stored = r
                .owners
                .iter()
                .map(|o| (o.owner.clone(), o.stored_bytes()))
                .collect();
            self.auth.quotas.counted(&stored, &self.auth.live_uploads());
        }
        Ok(r)
    }

    /// Applies one administrative request on behalf of `actor` (`admin` for the socket, the
    /// operator's identity for the web UI), on a blocking thread: the socket and the UI share
    /// this one path, audit entries included.
    ///
    /// # Errors
    /// What the request was refused with.
    pub(super) async fn call(
        self: &Arc<Self>,
        req: admin::Request,
        actor: &str,
    ) -> Result<admin::Reply, ApplianceError> {
        let me = self.clone();
        let actor = actor.to_string();
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || -> Result<admin::Reply, ApplianceError> {
            if let admin::Request::MaintenanceRun { dry_run, now_us } = req {
                return me.maintain(&rt, dry_run, now_us);
            }
            if let admin::Request::Status = req {
                return Ok(admin::Reply {
                    ok: true,
                    status: Some(me.scrape.status()),
                    ..admin::Reply::default()
                });
            }
            if let admin::Request::Usage { by } = req {
                return Ok(admin::Reply {
                    ok: true,
                    usage: Some(me.usage(&rt, by)?),
                    ..admin::Reply::default()
                });
            }
            let reply = admin::apply_as(&me.catalog, &req, &actor)?;
            me.auth.reload()?;
            tracing::info!(request = ?std::mem::discriminant(&req), %actor, "admin change applied");
            Ok(reply)
        })
        .await
        .unwrap_or_else(|e| Err(ApplianceError::Internal(format!("admin request: {e}"))))
    }

    /// One request line in, one reply line out.
    async fn answer(self: Arc<Self>, stream: tokio::net::UnixStream) {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let (r, mut w) = stream.into_split();
        let mut line = String::new();
        let mut r = tokio::io::BufReader::new(r.take(1 << 20));
        if r.read_line(&mut line).await.is_err() {
            return;
        }
        let reply = match serde_json::from_str::<admin::Request>(&line) {
            Ok(req) => self.call(req, "admin").await,
            Err(e) => Err(ApplianceError::InvalidArgument(format!("bad request: {e}"))),
        };
        let reply = reply.unwrap_or_else(|e| admin::Reply {
            ok: false,
            kind: admin::kind_of(&e).into(),
            error: e.to_string(),
            ..admin::Reply::default()
        });
        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
        out.push(b'\n');
        let _ = w.write_all(&out).await;
    }
}
