//! What one peer may hold of the appliance: connections, streams, messages and time.
//!
//! Every limit is a `serve` flag whose default comes from the tuning plan
//! ([`coffer_tuning::Limits`], printed by `tune`). A limit that is hit answers
//! `RESOURCE_EXHAUSTED` naming what was exceeded and the flag that sets it; a connection closed
//! for idleness or displaced by a newer one has no call in progress to answer.
//!
//! - **Connections** ([`Connections`]): at most `--max-connections` are tracked. A new one past
//!   the cap closes the connection that has been idle (no call in progress) the longest; when
//!   every connection is busy the newcomer is served only `RESOURCE_EXHAUSTED` and closed soon
//!   after. Idle connections cannot starve working ones (S6).
//! - **Idle connections**: one with no call in progress for `--idle-timeout` is closed (the
//!   client's channel reconnects on its next call).
//! - **Streams**: `--max-streams-per-connection` (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`;
//!   further streams are refused by HTTP/2 itself) and `--max-streams-per-account` streaming
//!   calls over all of an account's connections ([`AccountStreams`]).
//! - **Request streams** ([`bounded`]): at most `--max-stream-messages` messages, and a message at
//!   least every `--stream-idle-timeout`; either ends the stream with `RESOURCE_EXHAUSTED`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tonic::Status;

use crate::error::ApplianceError;

/// `serve` flags that override the tuning plan's limits (`None`: the plan's value).
#[derive(Debug, Clone, Default)]
pub struct LimitFlags {
    pub connections: Option<usize>,
    pub streams_per_connection: Option<u32>,
    pub streams_per_account: Option<usize>,
    pub messages_per_stream: Option<u64>,
    pub idle_secs: Option<u64>,
    pub stream_idle_secs: Option<u64>,
    pub read_budget_bytes: Option<u64>,
    pub upload_bytes_per_account: Option<u64>,
    pub shard_queue_bytes: Option<u64>,
    pub session_chunks: Option<u64>,
    pub admission_wait_secs: Option<u64>,
}

impl LimitFlags {
    /// The plan's limits with these overrides applied.
    #[must_use]
    pub fn apply(&self, mut l: coffer_tuning::Limits) -> coffer_tuning::Limits {
        fn set<T: Copy>(to: &mut T, from: Option<T>) {
            if let Some(v) = from {
                *to = v;
            }
        }
        set(&mut l.connections, self.connections);
        set(&mut l.streams_per_connection, self.streams_per_connection);
        set(&mut l.streams_per_account, self.streams_per_account);
        set(&mut l.messages_per_stream, self.messages_per_stream);
        set(&mut l.idle_secs, self.idle_secs);
        set(&mut l.stream_idle_secs, self.stream_idle_secs);
        set(&mut l.read_budget_bytes, self.read_budget_bytes);
        set(
            &mut l.upload_bytes_per_account,
            self.upload_bytes_per_account,
        );
        set(&mut l.shard_queue_bytes, self.shard_queue_bytes);
        set(&mut l.admission_wait_secs, self.admission_wait_secs);
        if let Some(n) = self.session_chunks {
            l.session_chunks = n;
            l.all_session_chunks = l.all_session_chunks.max(n);
        }
        l
    }
}

/// How long a connection refused for the cap stays open to deliver its refusals.
const REFUSED_LINGER: Duration = Duration::from_secs(5);

/// The connections the appliance holds, and the cap on them.
#[derive(Debug)]
pub struct Connections {
    cap: usize,
    idle: Duration,
    next: AtomicUsize,
    open: Mutex<HashMap<usize, Arc<ConnState>>>,
    /// Connections being refused (over the cap while every connection was busy).
    refused: Arc<AtomicUsize>,
}

/// One connection: calls in progress, when it last had one, and whether it must close.
#[derive(Debug)]
pub struct ConnState {
    id: usize,
    active: AtomicUsize,
    last: Mutex<Instant>,
    closing: AtomicBool,
    waker: AtomicWaker,
    /// Over the cap: every call is answered `RESOURCE_EXHAUSTED`.
    refused: Option<String>,
    idle: Duration,
}

/// What a call learns of its connection (tonic puts it in the request's extensions).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    pub state: Arc<ConnState>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ConnState {
    fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Marks a call in progress until the guard is dropped.
    #[must_use]
    pub fn begin_call(self: &Arc<Self>) -> CallGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        *lock(&self.last) = Instant::now();
        CallGuard(self.clone())
    }

    fn idle_since(&self) -> Option<Instant> {
        (self.active.load(Ordering::SeqCst) == 0).then(|| *lock(&self.last))
    }
}

/// A call in progress on a connection.
#[derive(Debug)]
pub struct CallGuard(Arc<ConnState>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        *lock(&self.0.last) = Instant::now();
        self.0.active.fetch_sub(1, Ordering::SeqCst);
        // Wake the reader so that its idle deadline is measured from now.
        self.0.waker.wake();
    }
}

impl Connections {
    #[must_use]
    pub fn new(cap: usize, idle: Duration) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            idle,
            next: AtomicUsize::new(0),
            open: Mutex::new(HashMap::new()),
            refused: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Takes in a new connection: past the cap, the longest-idle connection is closed to make
    /// room; when none is idle the newcomer is refused (served `RESOURCE_EXHAUSTED` for a few
    /// seconds), and past twice the cap it is dropped at once (`None`).
    pub fn admit<IO>(self: &Arc<Self>, io: IO, remote: Option<SocketAddr>) -> Option<Tracked<IO>> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut open = lock(&self.open);
        let mut refused = None;
        if open.len() >= self.cap {
            let oldest = open
                .values()
                .filter_map(|c| c.idle_since().map(|t| (t, c.id)))
                .min()
                .map(|(_, id)| id);
            if let Some(victim) = oldest.and_then(|id| open.remove(&id)) {
                tracing::debug!("connection cap reached: closed the longest-idle connection");
                victim.close();
            } else {
                if self.refused.load(Ordering::SeqCst) >= self.cap {
                    tracing::warn!(
                        cap = self.cap,
                        "connection cap reached and every connection is busy: connection dropped"
                    );
                    return None;
                }
                refused = Some(format!(
                    "the appliance has {} connections open, all busy (--max-connections); \
                     try again later",
                    self.cap
                ));
            }
        }
        let state = Arc::new(ConnState {
            id,
            active: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
            closing: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            idle: if refused.is_some() {
                REFUSED_LINGER.min(self.idle)
            } else {
                self.idle
            },
            refused,
        });
        if state.refused.is_some() {
            self.refused.fetch_add(1, Ordering::SeqCst);
        } else {
            open.insert(id, state.clone());
        }
        drop(open);
        Some(Tracked {
            sleep: Box::pin(tokio::time::sleep(state.idle)),
            info: ConnInfo { remote, state },
            owner: self.clone(),
            io,
        })
    }

    /// Connections tracked now (not counting refused ones).
    #[cfg(test)]
    #[must_use]
    pub fn open(&self) -> usize {
        lock(&self.open).len()
    }
}

/// A connection's byte stream, closed when its state says so or when it stays idle.
pub struct Tracked<IO> {
    io: IO,
    info: ConnInfo,
    sleep: Pin<Box<Sleep>>,
    owner: Arc<Connections>,
}

impl<IO> Drop for Tracked<IO> {
    fn drop(&mut self) {
        let s = &self.info.state;
        if s.refused.is_some() {
            self.owner.refused.fetch_sub(1, Ordering::SeqCst);
        } else {
            lock(&self.owner.open).remove(&s.id);
        }
    }
}

impl<IO> Tracked<IO> {
    /// Whether the connection must close now (told to, or idle past its deadline); re-arms the
    /// idle timer otherwise.
    fn must_close(&mut self, cx: &mut Context<'_>) -> bool {
        let s = &self.info.state;
        s.waker.register(cx.waker());
        if s.closing.load(Ordering::SeqCst) {
            return true;
        }
        while self.sleep.as_mut().poll(cx).is_ready() {
            match s.idle_since() {
                Some(t) if t + s.idle <= Instant::now() => {
                    tracing::debug!(idle = ?s.idle, "idle connection closed");
                    s.closing.store(true, Ordering::SeqCst);
                    return true;
                }
                Some(t) => self.sleep.as_mut().reset(t + s.idle),
                None => self.sleep.as_mut().reset(Instant::now() + s.idle),
            }
        }
        false
    }
}

fn closed() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "connection closed by the appliance (idle, or displaced past --max-connections)",
    )
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.must_close(cx) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO> tonic::transport::server::Connected for Tracked<IO> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// The source address of a call, for throttling and the audit log.
pub fn source_of<T>(req: &tonic::Request<T>) -> Option<std::net::IpAddr> {
    req.extensions()
        .get::<ConnInfo>()
        .and_then(|c| c.remote)
        .map(|a| a.ip())
}

/// Tower layer marking calls in progress on their connection (for the idle deadline) and
/// answering every call of a refused connection with `RESOURCE_EXHAUSTED`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallLayer;

impl<S> tower::Layer<S> for CallLayer {
    type Service = Calls<S>;
    fn layer(&self, inner: S) -> Calls<S> {
        Calls(inner)
    }
}

/// See [`CallLayer`].
#[derive(Debug, Clone)]
pub struct Calls<S>(S);

type ResponseFuture<E> =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Calls<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let info = req.extensions().get::<ConnInfo>().cloned();
        if let Some(why) = info.as_ref().and_then(|i| i.state.refused.clone()) {
            return Box::pin(std::future::ready(Ok(
                Status::resource_exhausted(why).into_http()
            )));
        }
        let guard = info.map(|i| i.state.begin_call());
        let fut = self.0.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| {
                tonic::body::Body::new(Guarded {
                    body,
                    _guard: guard,
                })
            }))
        })
    }
}

/// A response body that keeps its call marked in progress until it is sent or dropped.
struct Guarded {
    body: tonic::body::Body,
    _guard: Option<CallGuard>,
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Streaming calls each account has open, capped.
#[derive(Debug)]
pub struct AccountStreams {
    cap: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One streaming call of an account: released when dropped.
#[derive(Debug)]
pub struct StreamSlot {
    owner: Arc<AccountStreams>,
    identity: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = lock(&self.owner.open);
        if let Some(n) = open.get_mut(&self.identity) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.identity);
            }
        }
    }
}

impl AccountStreams {
    #[must_use]
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more streaming call of `identity`.
    ///
    /// # Errors
    /// [`ApplianceError::ResourceExhausted`] when the account has its cap open.
    pub fn enter(self: &Arc<Self>, identity: &str) -> Result<StreamSlot, ApplianceError> {
        let mut open = lock(&self.open);
        let n = open.entry(identity.to_string()).or_insert(0);
        if *n >= self.cap {
            return Err(ApplianceError::ResourceExhausted(format!(
                "{identity} has {} streaming calls open (--max-streams-per-account); finish \
                 some first",
                self.cap
            )));
        }
        *n += 1;
        Ok(StreamSlot {
            owner: self.clone(),
            identity: identity.to_string(),
        })
    }
}

/// A request stream with a cap on its messages and a deadline between them: past either, one
/// `RESOURCE_EXHAUSTED` ends it. The deadline runs only while the stream is being read (a
/// pipeline that is busy does not count against its client).
pub fn bounded<T: Send + 'static>(
    input: tonic::Streaming<T>,
    max_messages: u64,
    idle: Duration,
) -> impl Stream<Item = Result<T, Status>> + Send {
    futures::stream::unfold(Some((input, 0u64)), move |st| async move {
        let (mut input, n) = st?;
        match tokio::time::timeout(idle, input.next()).await {
            Err(_) => Some((
                Err(Status::resource_exhausted(format!(
                    "no message on this stream for {} s (--stream-idle-timeout); stream ended",
                    idle.as_secs()
                ))),
                None,
            )),
            Ok(None) => None,
            Ok(Some(Err(e))) => Some((Err(e), None)),
            Ok(Some(Ok(_))) if n >= max_messages => Some((
                Err(Status::resource_exhausted(format!(
                    "more than {max_messages} messages on one stream (--max-stream-messages); \
                     open a new stream for the rest"
                ))),
                None,
            )),
            Ok(Some(Ok(m))) => Some((Ok(m), Some((input, n + 1)))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_longest_idle_connection_makes_room_and_busy_ones_refuse_newcomers() {
        let c = Connections::new(2, Duration::from_mins(5));
        let a = c.admit((), None).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let b = c.admit((), None).unwrap();
        // Full: the newcomer displaces `a`, idle the longest.
        let n = c.admit((), None).unwrap();
        assert!(a.info.state.closing.load(Ordering::SeqCst));
        assert!(!b.info.state.closing.load(Ordering::SeqCst));
        assert!(n.info.state.refused.is_none());
        drop(a);
        assert_eq!(c.open(), 2);
        // Both busy: the next one is refused, and past twice the cap dropped.
        let _cb = b.info.state.begin_call();
        let _cn = n.info.state.begin_call();
        let r1 = c.admit((), None).unwrap();
        assert!(r1
            .info
            .state
            .refused
            .as_deref()
            .unwrap()
            .contains("--max-connections"));
        let _r2 = c.admit((), None).unwrap();
        assert!(c.admit((), None).is_none());
        assert_eq!(c.open(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_account_holds_at_most_its_streams() {
        let s = AccountStreams::new(2);
        let one = s.enter("a@x").unwrap();
        let _two = s.enter("a@x").unwrap();
        let e = s.enter("a@x").unwrap_err();
        assert!(matches!(e, ApplianceError::ResourceExhausted(m) if m.contains("a@x")));
        let _other = s.enter("b@y").unwrap();
        drop(one);
        s.enter("a@x").unwrap();
    }
}
