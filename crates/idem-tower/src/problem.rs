//! Problem details (RFC 9457): how the layer answers when it does not forward a request.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use serde_json::{Map, Value};

/// The media type of problem details.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// The problems the layer reports, each with a stable `type` URI.
///
/// | problem | status | `type` |
/// |---|---|---|
/// | [`KeyMissing`](Self::KeyMissing) | 400 | `https://idem.dev/problems/key-missing` |
/// | [`KeyInvalid`](Self::KeyInvalid) | 400 | `https://idem.dev/problems/key-invalid` |
/// | [`BodyUnreadable`](Self::BodyUnreadable) | 400 | `https://idem.dev/problems/body-unreadable` |
/// | [`PrincipalMissing`](Self::PrincipalMissing) | 400 | `https://idem.dev/problems/principal-missing` |
/// | [`InFlight`](Self::InFlight) | 409 | `https://idem.dev/problems/in-flight` |
/// | [`BodyTooLarge`](Self::BodyTooLarge) | 413 | `https://idem.dev/problems/body-too-large` |
/// | [`FingerprintMismatch`](Self::FingerprintMismatch) | 422 | `https://idem.dev/problems/fingerprint-mismatch` |
/// | [`ResponseTooLargeToReplay`](Self::ResponseTooLargeToReplay) | 500 | `https://idem.dev/problems/response-too-large-to-replay` |
/// | [`StoredResponseUnreadable`](Self::StoredResponseUnreadable) | 500 | `https://idem.dev/problems/stored-response-unreadable` |
/// | [`OutcomeUnknown`](Self::OutcomeUnknown) | 502 or 504 | `https://idem.dev/problems/outcome-unknown` |
/// | [`StoreUnavailable`](Self::StoreUnavailable) | 503 | `https://idem.dev/problems/store-unavailable` |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemType {
    /// The route requires an idempotency key and the request has none.
    KeyMissing,
    /// The idempotency key is malformed, empty, too long, or sent twice.
    KeyInvalid,
    /// The request body could not be read.
    BodyUnreadable,
    /// A request with the same key is still being processed.
    InFlight,
    /// The request body exceeds the route's limit.
    BodyTooLarge,
    /// The key was used before for a different request.
    FingerprintMismatch,
    /// The request was executed, but its response was too large to store for replays.
    ResponseTooLargeToReplay,
    /// The stored response cannot be decoded; it is neither replayed nor executed again.
    StoredResponseUnreadable,
    /// The request may or may not have taken effect; it is not executed again.
    OutcomeUnknown,
    /// The idempotency store cannot be reached.
    StoreUnavailable,
    /// The route deduplicates per principal and rejects requests without one.
    PrincipalMissing,
}

impl ProblemType {
    /// The last path segment of the `type` URI (`key-missing`).
    pub fn slug(self) -> &'static str {
        match self {
            ProblemType::KeyMissing => "key-missing",
            ProblemType::KeyInvalid => "key-invalid",
            ProblemType::BodyUnreadable => "body-unreadable",
            ProblemType::InFlight => "in-flight",
            ProblemType::BodyTooLarge => "body-too-large",
            ProblemType::FingerprintMismatch => "fingerprint-mismatch",
            ProblemType::ResponseTooLargeToReplay => "response-too-large-to-replay",
            ProblemType::StoredResponseUnreadable => "stored-response-unreadable",
            ProblemType::OutcomeUnknown => "outcome-unknown",
            ProblemType::StoreUnavailable => "store-unavailable",
            ProblemType::PrincipalMissing => "principal-missing",
        }
    }

    /// The stable `type` URI.
    pub fn uri(self) -> &'static str {
        match self {
            ProblemType::KeyMissing => "https://idem.dev/problems/key-missing",
            ProblemType::KeyInvalid => "https://idem.dev/problems/key-invalid",
            ProblemType::BodyUnreadable => "https://idem.dev/problems/body-unreadable",
            ProblemType::InFlight => "https://idem.dev/problems/in-flight",
            ProblemType::BodyTooLarge => "https://idem.dev/problems/body-too-large",
            ProblemType::FingerprintMismatch => "https://idem.dev/problems/fingerprint-mismatch",
            ProblemType::ResponseTooLargeToReplay => {
                "https://idem.dev/problems/response-too-large-to-replay"
            }
            ProblemType::StoredResponseUnreadable => {
                "https://idem.dev/problems/stored-response-unreadable"
            }
            ProblemType::OutcomeUnknown => "https://idem.dev/problems/outcome-unknown",
            ProblemType::StoreUnavailable => "https://idem.dev/problems/store-unavailable",
            ProblemType::PrincipalMissing => "https://idem.dev/problems/principal-missing",
        }
    }

    /// A short, stable summary (the `title` member).
    pub fn title(self) -> &'static str {
        match self {
            ProblemType::KeyMissing => "Idempotency key missing",
            ProblemType::KeyInvalid => "Idempotency key invalid",
            ProblemType::BodyUnreadable => "Request body unreadable",
            ProblemType::InFlight => "Request in flight",
            ProblemType::BodyTooLarge => "Request body too large",
            ProblemType::FingerprintMismatch => "Idempotency key reused",
            ProblemType::ResponseTooLargeToReplay => "Response too large to replay",
            ProblemType::StoredResponseUnreadable => "Stored response unreadable",
            ProblemType::OutcomeUnknown => "Outcome unknown",
            ProblemType::StoreUnavailable => "Idempotency store unavailable",
            ProblemType::PrincipalMissing => "Principal missing",
        }
    }

    /// The status the problem is answered with by default.
    pub fn status(self) -> StatusCode {
        match self {
            ProblemType::KeyMissing
            | ProblemType::KeyInvalid
            | ProblemType::BodyUnreadable
            | ProblemType::PrincipalMissing => StatusCode::BAD_REQUEST,
            ProblemType::InFlight => StatusCode::CONFLICT,
            ProblemType::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemType::FingerprintMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            ProblemType::ResponseTooLargeToReplay | ProblemType::StoredResponseUnreadable => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ProblemType::OutcomeUnknown => StatusCode::BAD_GATEWAY,
            ProblemType::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl fmt::Display for ProblemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.slug())
    }
}

/// An `application/problem+json` answer: `type`, `title`, `status`, `detail`, extension
/// members, and headers to send with it (`Retry-After`).
///
/// ```
/// use idem_tower::{Problem, ProblemType};
///
/// let response = Problem::new(ProblemType::InFlight, "a request with this key is running")
///     .retry_after(3)
///     .into_response();
/// assert_eq!(response.status(), 409);
/// assert_eq!(response.headers()["retry-after"], "3");
/// assert_eq!(response.headers()["content-type"], "application/problem+json");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    type_uri: Cow<'static, str>,
    title: Cow<'static, str>,
    status: StatusCode,
    detail: String,
    extensions: Map<String, Value>,
    headers: HeaderMap,
}

impl Problem {
    /// One of the layer's problems, with its default status.
    pub fn new(kind: ProblemType, detail: impl Into<String>) -> Self {
        Self::custom(kind.uri(), kind.title(), kind.status(), detail)
    }

    /// Any other problem (the gateway's own, say).
    pub fn custom(
        type_uri: impl Into<Cow<'static, str>>,
        title: impl Into<Cow<'static, str>>,
        status: StatusCode,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            type_uri: type_uri.into(),
            title: title.into(),
            status,
            detail: detail.into(),
            extensions: Map::new(),
            headers: HeaderMap::new(),
        }
    }

    /// Answers with another status.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// Adds an extension member. The standard members cannot be overridden.
    pub fn with_extension(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        let name = name.into();
        if !matches!(
            name.as_str(),
            "type" | "title" | "status" | "detail" | "instance"
        ) {
            self.extensions.insert(name, value.into());
        }
        self
    }

    /// Adds a header to the response.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Adds `Retry-After: seconds`.
    pub fn retry_after(self, seconds: u64) -> Self {
        self.with_header(RETRY_AFTER, HeaderValue::from(seconds))
    }

    /// The `type` URI.
    pub fn type_uri(&self) -> &str {
        &self.type_uri
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The human-readable explanation.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// The JSON document.
    pub fn to_json(&self) -> Bytes {
        let mut object = Map::new();
        object.insert("type".into(), Value::from(self.type_uri.as_ref()));
        object.insert("title".into(), Value::from(self.title.as_ref()));
        object.insert("status".into(), Value::from(self.status.as_u16()));
        object.insert("detail".into(), Value::from(self.detail.as_str()));
        for (name, value) in &self.extensions {
            object.insert(name.clone(), value.clone());
        }
        // Serialising a `Value` cannot fail.
        Bytes::from(serde_json::to_vec(&Value::Object(object)).unwrap_or_default())
    }

    /// The response: status, headers, `Content-Type: application/problem+json`, the JSON
    /// document as the body.
    pub fn into_response(self) -> Response<Bytes> {
        let body = self.to_json();
        let mut response = Response::new(body);
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        headers.extend(self.headers);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_members_and_extensions() {
        let problem = Problem::new(ProblemType::ResponseTooLargeToReplay, "too big")
            .with_extension("original_status", 201)
            .with_extension("status", 1);
        let json: Value = serde_json::from_slice(&problem.to_json()).unwrap();
        assert_eq!(
            json["type"],
            "https://idem.dev/problems/response-too-large-to-replay"
        );
        assert_eq!(json["status"].as_u64(), Some(500));
        assert_eq!(json["original_status"].as_u64(), Some(201));
        assert_eq!(json["detail"], "too big");
    }

    #[test]
    fn every_type_uri_ends_with_its_slug() {
        use ProblemType::*;
        for kind in [
            KeyMissing,
            KeyInvalid,
            BodyUnreadable,
            InFlight,
            BodyTooLarge,
            FingerprintMismatch,
            ResponseTooLargeToReplay,
            StoredResponseUnreadable,
            OutcomeUnknown,
            StoreUnavailable,
            PrincipalMissing,
        ] {
            assert_eq!(
                kind.uri(),
                format!("https://idem.dev/problems/{}", kind.slug())
            );
        }
    }
}
