//! A request body that fails when its client stops sending: the body half of slowloris
//! protection (the header half is hyper's `header_read_timeout`).

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use idem_core::BoxError;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

pin_project! {
    /// Wraps a body: once it is being read, a wait of more than `idle` for its next frame
    /// ends it with a [`BodyStalled`] error. The clock starts at the first read that finds
    /// nothing to read, so a body nobody reads never times out.
    pub struct IdleTimeout<B> {
        #[pin]
        inner: B,
        idle: Duration,
        sleep: Option<Pin<Box<Sleep>>>,
    }
}

impl<B> IdleTimeout<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, idle: Duration) -> Self {
        Self {
            inner,
            idle,
            sleep: None,
        }
    }
}

/// The client sent nothing of its request body for longer than the timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyStalled(pub Duration);

impl fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the client sent nothing of the request body for {}",
            humantime::format_duration(self.0)
        )
    }
}

impl std::error::Error for BodyStalled {}

impl<B> Body for IdleTimeout<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.sleep = None;
                Poll::Ready(frame.map(|result| result.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = *this.idle;
                let sleep = this.sleep.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(Instant::now() + idle))
                });
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        *this.sleep = None;
                        Poll::Ready(Some(Err(Box::new(BodyStalled(idle)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use http_body_util::BodyExt;

    /// One frame, then nothing ever again (a client that stopped sending).
    struct OneThenNothing(bool);

    impl Body for OneThenNothing {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.0 {
                Poll::Pending
            } else {
                self.0 = true;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"a")))))
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_after_the_idle_time() {
        let mut body = IdleTimeout::new(OneThenNothing(false), Duration::from_secs(5));
        assert!(body.frame().await.unwrap().is_ok());
        let stalled = body.frame().await.unwrap().unwrap_err();
        assert_eq!(
            stalled.downcast_ref::<BodyStalled>(),
            Some(&BodyStalled(Duration::from_secs(5)))
        );
    }
}
