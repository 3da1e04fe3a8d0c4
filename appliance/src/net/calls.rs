//! One record per RPC: the `coffer_rpcs_total` / `coffer_rpc_duration_seconds` metrics and one
//! log line (`target: coffer::rpc`) with the account, method, status, duration and bytes.
//!
//! A tower layer outside every service: it counts the request body as tonic reads it and the
//! answer as it is sent, takes the status from the answer's headers (a trailers-only error) or
//! trailers, and records when the answer ends or is dropped (a peer that went away: `Cancelled`).
//! The account is filled in by the service once the call's session is known
//! ([`CallRecord::set_identity`]); calls without one log `-`. Nothing else of the request is
//! logged: no metadata, so no session token, password or enrollment token.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::Frame;

use crate::metrics::{Metrics, RpcLabels};

/// The RPCs of `coffer.v1.Coffer`: a method label is one of these or `other`, so a peer calling
/// made-up paths cannot grow the label set.
pub const METHODS: &[&str] = &[
    "Hello",
    "FindMissing",
    "PutChunks",
    "GetChunks",
    "CommitSnapshot",
    "ListSnapshots",
    "GetSnapshot",
    "DeleteSnapshot",
    "OpenSnapshot",
    "ChangePassword",
    "Refresh",
    "ServerStatus",
    "EndSession",
    "GetPolicy",
    "ProtectSnapshot",
    "LockSnapshot",
    "SetPolicy",
    "AddRule",
    "CreateEnrollment",
    "Enroll",
];

/// What one call learned: in the request's extensions, so the service can name the account.
#[derive(Debug, Default)]
pub struct CallRecord {
    identity: OnceLock<String>,
    received: AtomicU64,
}

impl CallRecord {
    /// The account the call acts as (the first one set stays).
    pub fn set_identity(&self, identity: &str) {
        let _ = self.identity.set(identity.to_owned());
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct ObserveLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observed<S>;
    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// See [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct Observed<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type ResponseFuture<E> =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send>>;

fn method_of(path: &str) -> &'static str {
    path.strip_prefix("/coffer.v1.Coffer/")
        .and_then(|m| METHODS.iter().find(|k| **k == m))
        .copied()
        .unwrap_or("other")
}

fn code_name(code: i32) -> String {
    format!("{:?}", tonic::Code::from_i32(code))
}

impl<S, B> tower::Service<http::Request<B>> for Observed<S>
where
    S: tower::Service<http::Request<Counted<B>>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let record = Arc::new(CallRecord::default());
        let method = method_of(req.uri().path());
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(record.clone());
        let req = http::Request::from_parts(
            parts,
            Counted {
                body,
                record: record.clone(),
            },
        );
        let metrics = self.metrics.clone();
        metrics.calls_in_flight.inc();
        let mut end = CallEnd {
            metrics,
            record,
            method,
            start: Instant::now(),
            sent: 0,
            code: None,
            done: false,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = match fut.await {
                Ok(r) => r,
                Err(e) => {
                    end.code = Some("Unknown".into());
                    end.finish();
                    return Err(e);
                }
            };
            end.code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .map(code_name);
            Ok(resp.map(|body| tonic::body::Body::new(Watched { body, end })))
        })
    }
}

/// A request body that counts what tonic reads of it.
pub struct Counted<B> {
    body: B,
    record: Arc<CallRecord>,
}

impl<B> http_body::Body for Counted<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let p = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &p {
            if let Some(d) = f.data_ref() {
                self.record
                    .received
                    .fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Records the call once, when its answer ends or is dropped.
struct CallEnd {
    metrics: Arc<Metrics>,
    record: Arc<CallRecord>,
    method: &'static str,
    start: Instant,
    sent: u64,
    code: Option<String>,
    done: bool,
}

impl CallEnd {
    fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let m = &self.metrics;
        m.calls_in_flight.dec();
        let code = self.code.take().unwrap_or_else(|| "Cancelled".into());
        let took = self.start.elapsed();
        let secs = took.as_secs_f64();
        let received = self.record.received.load(Ordering::Relaxed);
        let labels = RpcLabels {
            method: self.method.to_owned(),
            code,
        };
        m.rpcs.get_or_create(&labels).inc();
        m.rpc_seconds.get_or_create(&labels).observe(secs);
        m.rpc_received_bytes.inc_by(received);
        m.rpc_sent_bytes.inc_by(self.sent);
        tracing::info!(
            target: "coffer::rpc",
            identity = self.record.identity.get().map_or("-", String::as_str),
            method = self.method,
            code = %labels.code,
            duration_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            received,
            sent = self.sent,
            "rpc"
        );
    }
}

impl Drop for CallEnd {
    fn drop(&mut self) {
        self.finish();
    }
}

/// An answer body that counts what is sent and sees the status in the trailers.
struct Watched {
    body: tonic::body::Body,
    end: CallEnd,
}

impl http_body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let p = Pin::new(&mut self.body).poll_frame(cx);
        match &p {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.end.sent += d.len() as u64;
                } else if let Some(code) = f
                    .trailers_ref()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                {
                    self.end.code = Some(code_name(code));
                }
            }
            Poll::Ready(None) => {
                if self.end.code.is_none() {
                    // Ended without trailers: a plain OK is not possible in gRPC, say so.
                    self.end.code = Some("Unknown".into());
                }
                self.end.finish();
            }
            Poll::Ready(Some(Err(_))) => {
                self.end.code.get_or_insert_with(|| "Internal".into());
                self.end.finish();
            }
            Poll::Pending => {}
        }
        p
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_of_the_protocol_has_its_label_and_nothing_else_does() {
        let proto = include_str!("../../../proto/proto/coffer/v1/coffer.proto");
        let mut rpcs: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .collect();
        rpcs.sort_unstable();
        let mut ours = METHODS.to_vec();
        ours.sort_unstable();
        assert_eq!(rpcs, ours);
        assert_eq!(method_of("/coffer.v1.Coffer/PutChunks"), "PutChunks");
        assert_eq!(method_of("/coffer.v1.Coffer/Made-Up"), "other");
        assert_eq!(method_of("/evil"), "other");
        assert_eq!(code_name(7), "PermissionDenied");
    }
}
