//! The request and response bodies the layer passes on.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Inner { #[pin] body: B },
        Buffered { data: Option<Bytes> },
    }
}

pin_project! {
    /// The body the inner service receives: the client's body untouched when the request
    /// is passed through, or the buffered body the layer read to fingerprint it.
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

impl<B> RequestBody<B> {
    /// The client's body, passed on as it is.
    pub fn new(body: B) -> Self {
        Self {
            kind: RequestKind::Inner { body },
        }
    }

    /// A body already read into memory.
    pub fn buffered(data: Bytes) -> Self {
        Self {
            kind: RequestKind::Buffered { data: Some(data) },
        }
    }

    /// Whether the body was read by the layer.
    pub fn is_buffered(&self) -> bool {
        matches!(self.kind, RequestKind::Buffered { .. })
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            RequestKindProj::Inner { body } => body.poll_frame(cx),
            RequestKindProj::Buffered { data } => Poll::Ready(
                data.take()
                    .filter(|d| !d.is_empty())
                    .map(|d| Ok(Frame::data(d))),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Inner { body } => body.is_end_stream(),
            RequestKind::Buffered { data } => data.as_ref().is_none_or(Bytes::is_empty),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Inner { body } => body.size_hint(),
            RequestKind::Buffered { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

impl<B> std::fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            RequestKind::Inner { .. } => "inner",
            RequestKind::Buffered { .. } => "buffered",
        };
        f.debug_struct("RequestBody").field("kind", &kind).finish()
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        Inner { #[pin] body: B },
        Buffered { data: Option<Bytes>, trailers: Option<HeaderMap> },
        Prefixed { prefix: Option<Bytes>, rest: Pin<Box<B>> },
    }
}

pin_project! {
    /// The body of the layer's responses: the inner service's body (streamed, or buffered
    /// while it was stored), a replayed body, or a problem document.
    pub struct ResponseBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }
}

impl<B> ResponseBody<B> {
    /// The inner service's body, passed on as it is.
    pub fn new(body: B) -> Self {
        Self {
            kind: ResponseKind::Inner { body },
        }
    }

    /// A body in memory (replays, problems).
    pub fn full(data: Bytes) -> Self {
        Self::buffered(data, None)
    }

    pub(crate) fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: ResponseKind::Buffered {
                data: Some(data),
                trailers,
            },
        }
    }

    /// The part of a body already read, then the rest of it.
    pub(crate) fn prefixed(prefix: Bytes, rest: Pin<Box<B>>) -> Self {
        Self {
            kind: ResponseKind::Prefixed {
                prefix: Some(prefix).filter(|p| !p.is_empty()),
                rest,
            },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            ResponseKindProj::Inner { body } => body.poll_frame(cx),
            ResponseKindProj::Buffered { data, trailers } => {
                if let Some(data) = data.take().filter(|d| !d.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            ResponseKindProj::Prefixed { prefix, rest } => {
                if let Some(prefix) = prefix.take() {
                    return Poll::Ready(Some(Ok(Frame::data(prefix))));
                }
                rest.as_mut().poll_frame(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Inner { body } => body.is_end_stream(),
            ResponseKind::Buffered { data, trailers } => {
                data.as_ref().is_none_or(Bytes::is_empty) && trailers.is_none()
            }
            ResponseKind::Prefixed { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Inner { body } => body.size_hint(),
            ResponseKind::Buffered { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseKind::Prefixed { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower().saturating_add(extra));
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper.saturating_add(extra));
                }
                hint
            }
        }
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            ResponseKind::Inner { .. } => "inner",
            ResponseKind::Buffered { .. } => "buffered",
            ResponseKind::Prefixed { .. } => "prefixed",
        };
        f.debug_struct("ResponseBody").field("kind", &kind).finish()
    }
}
