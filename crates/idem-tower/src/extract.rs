//! Pluggable strategies: where the key and the principal come from.
//!
//! Both are traits with a blanket implementation for closures, so a one-off strategy is a
//! closure and a reusable one is a type.

use http::request::Parts;
use http::{HeaderMap, HeaderName};
use idem_core::{IdempotencyKey, KeyError};

use crate::policy::Policy;

/// The name of the key header in the IETF draft and at Stripe.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// Finds a request's idempotency key.
///
/// `Ok(None)` means the request has no key (a `required` route answers `400`, an
/// `optional` one passes it through); an error is a malformed key (`400`).
///
/// ```
/// use http::request::Parts;
/// use idem_core::{IdempotencyKey, KeyError};
/// use idem_tower::KeyExtractor;
///
/// // Keys from a query parameter instead of a header.
/// let from_query = |parts: &Parts| -> Result<Option<IdempotencyKey>, KeyError> {
///     let query = parts.uri.query().unwrap_or("");
///     query
///         .split('&')
///         .find_map(|pair| pair.strip_prefix("idempotency_key="))
///         .map(|value| IdempotencyKey::parse(value.as_bytes()))
///         .transpose()
/// };
/// let (parts, ()) = http::Request::post("/charges?idempotency_key=k1").body(()).unwrap().into_parts();
/// assert_eq!(from_query.extract(&parts).unwrap().unwrap().as_str(), "k1");
/// ```
pub trait KeyExtractor: Send + Sync + 'static {
    /// The key of the request, if it has one.
    fn extract(&self, parts: &Parts) -> Result<Option<IdempotencyKey>, KeyError>;
}

impl<F> KeyExtractor for F
where
    F: Fn(&Parts) -> Result<Option<IdempotencyKey>, KeyError> + Send + Sync + 'static,
{
    fn extract(&self, parts: &Parts) -> Result<Option<IdempotencyKey>, KeyError> {
        self(parts)
    }
}

/// The default key extractor: one header (`Idempotency-Key` unless configured).
///
/// No header line: no key. Two or more lines: [`KeyError::Multiple`]. One line: its value
/// parsed with [`IdempotencyKey::parse`] (an sf-string or a bare token).
#[derive(Clone, Debug)]
pub struct HeaderKey {
    name: HeaderName,
}

impl HeaderKey {
    /// Reads the key from the header `name`.
    pub fn new(name: HeaderName) -> Self {
        Self { name }
    }

    /// The header read.
    pub fn name(&self) -> &HeaderName {
        &self.name
    }
}

impl Default for HeaderKey {
    fn default() -> Self {
        Self::new(IDEMPOTENCY_KEY)
    }
}

impl KeyExtractor for HeaderKey {
    fn extract(&self, parts: &Parts) -> Result<Option<IdempotencyKey>, KeyError> {
        key_from_headers(&parts.headers, &self.name)
    }
}

fn key_from_headers(
    headers: &HeaderMap,
    name: &HeaderName,
) -> Result<Option<IdempotencyKey>, KeyError> {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let more = values.count();
    if more > 0 {
        return Err(KeyError::Multiple { count: more + 1 });
    }
    IdempotencyKey::parse(first.as_bytes()).map(Some)
}

/// Finds the raw principal of a request (tenant, account, credential); the layer stores
/// only its keyed hash. `None` is the anonymous principal, shared by every request
/// without one.
///
/// ```
/// use http::request::Parts;
/// use idem_tower::{Policy, PrincipalExtractor};
///
/// // The tenant from a header set by an authenticating proxy in front.
/// let tenant = |parts: &Parts, _: &Policy| {
///     parts.headers.get("x-tenant-id").map(|v| v.as_bytes().to_vec())
/// };
/// let (parts, ()) = http::Request::post("/").header("x-tenant-id", "t1").body(()).unwrap().into_parts();
/// assert_eq!(tenant.principal(&parts, &Policy::new()), Some(b"t1".to_vec()));
/// ```
pub trait PrincipalExtractor: Send + Sync + 'static {
    /// The raw principal of the request on a route with `policy`.
    fn principal(&self, parts: &Parts, policy: &Policy) -> Option<Vec<u8>>;
}

impl<F> PrincipalExtractor for F
where
    F: Fn(&Parts, &Policy) -> Option<Vec<u8>> + Send + Sync + 'static,
{
    fn principal(&self, parts: &Parts, policy: &Policy) -> Option<Vec<u8>> {
        self(parts, policy)
    }
}

/// The default principal extractor: the value of the route's
/// [`principal_header`](Policy::principal_header) (`Authorization` unless configured).
/// Several lines of it are joined with newlines; none is the anonymous principal.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeaderPrincipal;

impl PrincipalExtractor for HeaderPrincipal {
    fn principal(&self, parts: &Parts, policy: &Policy) -> Option<Vec<u8>> {
        let mut values = parts.headers.get_all(policy.principal_header()).iter();
        let mut principal = values.next()?.as_bytes().to_vec();
        for value in values {
            // Header values cannot contain a newline, so the joined form is unambiguous.
            principal.push(b'\n');
            principal.extend_from_slice(value.as_bytes());
        }
        Some(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::post("/");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn header_key_counts_lines() {
        let key = HeaderKey::default();
        assert_eq!(key.extract(&parts(&[])), Ok(None));
        assert_eq!(
            key.extract(&parts(&[("idempotency-key", "\"k\"")]))
                .unwrap()
                .unwrap()
                .as_str(),
            "k"
        );
        assert_eq!(
            key.extract(&parts(&[
                ("idempotency-key", "a"),
                ("idempotency-key", "b")
            ])),
            Err(KeyError::Multiple { count: 2 })
        );
        assert_eq!(
            key.extract(&parts(&[("idempotency-key", "")])),
            Err(KeyError::Empty)
        );
    }

    #[test]
    fn principal_joins_lines() {
        let policy = Policy::new();
        assert_eq!(HeaderPrincipal.principal(&parts(&[]), &policy), None);
        assert_eq!(
            HeaderPrincipal.principal(
                &parts(&[("authorization", "a"), ("authorization", "b")]),
                &policy
            ),
            Some(b"a\nb".to_vec())
        );
    }
}
