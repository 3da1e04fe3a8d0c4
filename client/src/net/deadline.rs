//! Call deadlines: the client never waits on the appliance's word alone.
//!
//! HTTP/2 keepalive notices a dead or unreachable appliance; these deadlines notice a live one
//! that stops answering (a stuck call): a call's answer must begin within [`Deadlines::call`]
//! (for a unary call that is the whole call, since its answer comes when it is done), and a
//! streaming answer must bring its next message within [`Deadlines::idle`]. Either failure is
//! `DEADLINE_EXCEEDED`, naming what did not come.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Status;

/// How long the client waits for the appliance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Until a call's answer begins (a unary call's whole answer). A commit walks the
    /// snapshot's trees first: generous.
    pub call: Duration,
    /// Between two messages of a streaming answer (an appliance may hold a read for its
    /// admission wait, 30 s by default, several times over).
    pub idle: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        Self {
            call: Duration::from_mins(30),
            idle: Duration::from_mins(10),
        }
    }
}

/// The tower layer that applies [`Deadlines`] to every call of a channel.
#[derive(Debug, Clone)]
pub struct WithDeadlines<S> {
    inner: S,
    d: Deadlines,
}

impl<S> WithDeadlines<S> {
    pub fn new(inner: S, d: Deadlines) -> Self {
        Self { inner, d }
    }
}

type Body = tonic::body::Body;

impl<S, B> tower::Service<http::Request<B>> for WithDeadlines<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Into<tower::BoxError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = tower::BoxError;
    type Future =
        Pin<Box<dyn Future<Output = Result<http::Response<Body>, tower::BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let d = self.d;
        let what = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or("call")
            .to_string();
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(d.call, fut).await {
                Ok(r) => {
                    let resp = r.map_err(Into::into)?;
                    Ok(resp.map(|body| {
                        Body::new(IdleBody {
                            body,
                            idle: d.idle,
                            sleep: Box::pin(tokio::time::sleep(d.idle)),
                            what: what.clone(),
                        })
                    }))
                }
                Err(_) => Ok(Status::deadline_exceeded(format!(
                    "the appliance did not answer {what} within {} s",
                    d.call.as_secs()
                ))
                .into_http()),
            }
        })
    }
}

/// A response body whose every frame must come within `idle` of the one before.
struct IdleBody {
    body: Body,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    what: String,
}

impl http_body::Body for IdleBody {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(f) => {
                let next = tokio::time::Instant::now() + self.idle;
                self.sleep.as_mut().reset(next);
                Poll::Ready(f)
            }
            Poll::Pending => match self.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                    "the appliance sent nothing on {} for {} s",
                    self.what,
                    self.idle.as_secs()
                ))))),
                Poll::Pending => Poll::Pending,
            },
        }
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
    use tower::ServiceExt;

    fn req() -> http::Request<Body> {
        http::Request::builder()
            .uri("http://x/coffer.v1.Coffer/CommitSnapshot")
            .body(Body::empty())
            .unwrap()
    }

    fn deadlines() -> Deadlines {
        Deadlines {
            call: Duration::from_secs(5),
            idle: Duration::from_secs(2),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_never_answers_ends_at_its_deadline() {
        let never = tower::service_fn(|_: http::Request<Body>| {
            std::future::pending::<Result<http::Response<Body>, std::io::Error>>()
        });
        let resp = WithDeadlines::new(never, deadlines())
            .oneshot(req())
            .await
            .unwrap();
        let s = Status::from_header_map(resp.headers()).unwrap();
        assert_eq!(s.code(), tonic::Code::DeadlineExceeded);
        assert!(s.message().contains("CommitSnapshot within 5 s"), "{s}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_goes_silent_ends_and_a_busy_one_does_not() {
        use http_body_util::BodyExt;
        // A body that yields a frame every second for 5 s, then nothing.
        let (tx, rx) =
            tokio::sync::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, Status>>(1);
        tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let frame = http_body::Frame::data(bytes::Bytes::from_static(b"x"));
                tx.send(Ok(frame)).await.unwrap();
            }
            std::future::pending::<()>().await;
        });
        let mut rx = Some(rx);
        let slow = tower::service_fn(move |_: http::Request<Body>| {
            let rx = rx.take().expect("one call");
            async move {
                let body = http_body_util::StreamBody::new(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                );
                Ok::<_, std::io::Error>(http::Response::new(Body::new(body)))
            }
        });
        let resp = WithDeadlines::new(slow, deadlines())
            .oneshot(req())
            .await
            .unwrap();
        let mut body = resp.into_body();
        for _ in 0..5 {
            let f = body.frame().await.unwrap().unwrap();
            assert_eq!(f.into_data().unwrap(), &b"x"[..]);
        }
        let e = body.frame().await.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
        assert!(
            e.message().contains("nothing on CommitSnapshot for 2 s"),
            "{e}"
        );
    }
}
