//! `serve --metrics-listen ADDR`: `GET /metrics` in plain HTTP, for a Prometheus on the same host
//! or a private network. With `--metrics-token-file`, a scrape must carry
//! `Authorization: Bearer <token>`; anything else is answered 401 without a body worth reading.
//! Values that are cheaper to read than to track are read here, at each scrape.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::budget::Budget;
use super::ServeError;
use crate::access::admin::StatusReport;
use crate::access::Auth;
use crate::index::ChunkIndex;
use crate::metrics::{Metrics, ShardLabels};

/// What a scrape reads besides the counters.
pub(super) struct Scrape {
    pub(super) metrics: Arc<Metrics>,
    pub(super) token: Option<String>,
    pub(super) auth: Arc<Auth>,
    pub(super) root: PathBuf,
    pub(super) indexes: Vec<Arc<dyn ChunkIndex>>,
    /// The upload and read budgets.
    pub(super) budgets: (Budget, Budget),
    pub(super) mode: crate::repo::Mode,
    /// (when, chunk bytes received so far), every [`SAMPLE_EVERY`], the last minute's.
    pub(super) samples: Mutex<VecDeque<(Instant, u64)>>,
    /// The object store behind the packs, if any (staging and cache gauges).
    pub(super) tier: Option<Arc<crate::pack::store::s3::Tier>>,
}

/// How often [`Scrape::sample`] runs.
pub(super) const SAMPLE_EVERY: Duration = Duration::from_secs(10);

impl Scrape {
    /// Records the bytes received so far (for the one-minute rate of `status`).
    pub(super) fn sample(&self) {
        let mut s = crate::net::limits::lock(&self.samples);
        s.push_back((Instant::now(), self.metrics.chunk_received_bytes.get()));
        while s.len() > 7 {
            s.pop_front();
        }
    }

    /// The status report: the metrics, refreshed.
    pub(super) fn status(&self) -> StatusReport {
        self.refresh();
        let m = &self.metrics;
        let u = |g: i64| u64::try_from(g).unwrap_or(0);
        let received = m.chunk_received_bytes.get();
        let rate = {
            let s = crate::net::limits::lock(&self.samples);
            s.front().map_or(0.0, |(t, b)| {
                let dt = t.elapsed().as_secs_f64();
                if dt > 0.5 {
                    received.saturating_sub(*b) as f64 / dt
                } else {
                    0.0
                }
            })
        };
        let started_us = m.start_time_seconds.get() * 1_000_000;
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            mode: match self.mode {
                crate::repo::Mode::Managed => "managed",
                crate::repo::Mode::Sealed => "sealed",
            }
            .into(),
            started_us,
            uptime_secs: u((crate::clock::now_us() - started_us) / 1_000_000),
            shards: self.indexes.len() as u64,
            index_entries: self
                .indexes
                .iter()
                .filter_map(|i| i.approximate_len().ok())
                .sum(),
            sessions: u(m.sessions.get()),
            rpcs_in_flight: u(m.calls_in_flight.get()),
            upload_bytes_in_flight: u(m.upload_bytes_in_flight.get()),
            read_bytes_in_flight: u(m.read_bytes_in_flight.get()),
            snapshots_committed: m.snapshots_committed.get(),
            logical_bytes: m.logical_bytes.get(),
            received_bytes: received,
            stored_bytes: m.chunk_stored_bytes.get(),
            receive_rate_1m: rate,
            disk_free_bytes: u(m.disk_free_bytes.get()),
            disk_size_bytes: u(m.disk_size_bytes.get()),
            maintenance_last_run_us: m.maintenance_last_run_timestamp_seconds.get() * 1_000_000,
            maintenance_last_duration_secs: m.maintenance_last_duration_seconds.get(),
            maintenance_runs: m.maintenance_runs.get(),
            maintenance_errors: m.maintenance_errors.get(),
            maintenance_freed_bytes: m.maintenance_freed_bytes.get(),
        }
    }

    fn refresh(&self) {
        let m = &self.metrics;
        m.sessions
            .set(i64::try_from(self.auth.session_count()).unwrap_or(i64::MAX));
        if let Ok(st) = rustix::fs::statvfs(&self.root) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            let size = st.f_blocks.saturating_mul(st.f_frsize);
            m.disk_free_bytes
                .set(i64::try_from(free).unwrap_or(i64::MAX));
            m.disk_size_bytes
                .set(i64::try_from(size).unwrap_or(i64::MAX));
        }
        if let Some(t) = &self.tier {
            let (packs, staged, cached, _) = t.counts();
            let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            m.object_store_staged_packs.set(g(packs as u64));
            m.object_store_staged_bytes.set(g(staged));
            m.object_store_cached_bytes.set(g(cached));
        }
        let bytes = |b: &Budget| i64::try_from(b.in_use_bytes()).unwrap_or(i64::MAX);
        m.upload_bytes_in_flight.set(bytes(&self.budgets.0));
        m.read_bytes_in_flight.set(bytes(&self.budgets.1));
        for (i, ix) in self.indexes.iter().enumerate() {
            if let Ok(n) = ix.approximate_len() {
                m.index_entries
                    .get_or_create(&ShardLabels {
                        shard: i.to_string(),
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }
}

/// Compares in time independent of where the first difference is.
pub(super) fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(State(s): State<Arc<Scrape>>, headers: HeaderMap) -> Response {
    if let Some(want) = &s.token {
        let got = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same_token(got.as_bytes(), want.as_bytes()) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a bearer token is required\n",
            )
                .into_response();
        }
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let s2 = s.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        s2.refresh();
        s2.metrics.render(accept.as_deref())
    })
    .await;
    match rendered {
        Ok((ct, body)) => ([(header::CONTENT_TYPE, ct)], body).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Binds `addr` for the metrics endpoint.
///
/// # Errors
/// The address does not parse or cannot be bound.
pub(super) async fn bind(addr: &str) -> Result<tokio::net::TcpListener, ServeError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ServeError::io(format!("--metrics-listen {addr}"), e))
}

/// Serves `/metrics` on `listener` until the appliance stops.
pub(super) async fn serve(listener: tokio::net::TcpListener, scrape: Arc<Scrape>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(scrape);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metrics endpoint stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::same_token;

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"abc", b"abcd"));
        assert!(!same_token(b"", b"a"));
    }
}
