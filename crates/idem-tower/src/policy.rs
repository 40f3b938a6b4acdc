//! Per-route policies: which requests are deduplicated, and how.

use std::time::Duration;

use http::{HeaderName, Method};
use idem_core::Fingerprinter;
use idem_core::record::{DEFAULT_LEASE, DEFAULT_RETENTION};

/// Whether a route's requests must carry an idempotency key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyRequirement {
    /// A request without a key is answered `400` (`key-missing`).
    Required,
    /// A request without a key is passed through untouched, without deduplication.
    #[default]
    Optional,
    /// Keys are ignored: every request is passed through untouched.
    Ignored,
}

/// What a retry gets while the first request with its key is still running.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OnInFlight {
    /// `409` with `Retry-After`, unless the client asks to wait with `Prefer: wait=N`.
    #[default]
    Conflict,
    /// Wait up to the route's `max_wait` for the first request to finish, then replay it
    /// (or execute, if the first was released); `409` if the wait runs out.
    Wait,
}

/// Whether a class of outcomes is stored (and replayed) or released (executed again on
/// retry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Disposition {
    /// Store the outcome: retries replay it and nothing runs twice.
    #[default]
    Store,
    /// Release the claim: a retry executes again.
    Release,
}

/// What happens to a request when the store cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailMode {
    /// `503` with `Retry-After`; nothing is executed.
    #[default]
    Closed,
    /// Forward the request without deduplication.
    Open,
}

/// What happens to a running request whose response future is dropped (the client went
/// away, a timeout layer outside this one fired).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OnCancel {
    /// Drop the inner service's future and release the claim at once: a retry executes
    /// again. Only for handlers whose cancelled work provably has no effect (a database
    /// transaction that is rolled back when dropped): anything else could then run twice.
    Release,
    /// Run the inner service to completion on a spawned task and store its outcome as if
    /// the client were still there: a retry replays it. The default: a handler dropped
    /// half-way (a call to a payment provider under way, say) has an unknown effect, and
    /// releasing it would let a retry execute it a second time.
    #[default]
    RunToCompletion,
}

/// What a request without a principal (no principal header) gets on a route that
/// deduplicates it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Anonymous {
    /// Every request without a principal shares one anonymous scope: the same key from two
    /// anonymous clients names one record, and the second gets the first's answer. Fit
    /// for routes whose clients are not told apart anyway (a public endpoint).
    #[default]
    Shared,
    /// `400` `principal-missing`, not forwarded: a keyed request must name its principal,
    /// so no client can ever be replayed another's answer.
    Reject,
}

/// How one route deduplicates requests. Every setting has a default; see each setter.
///
/// ```
/// use std::time::Duration;
/// use idem_tower::{Disposition, KeyRequirement, Policy};
///
/// let policy = Policy::new()
///     .with_key(KeyRequirement::Required)
///     .with_retention(Duration::from_secs(7 * 24 * 3600))
///     .with_server_errors(Disposition::Release)
///     .exclude_field("metadata.sent_at");
/// assert!(policy.validate().is_ok());
/// ```
#[derive(Clone, Debug)]
pub struct Policy {
    key: KeyRequirement,
    methods: Vec<Method>,
    retention: Duration,
    lease: Duration,
    in_flight: OnInFlight,
    max_wait: Duration,
    server_errors: Disposition,
    ambiguous: Disposition,
    on_cancel: OnCancel,
    max_request_body: usize,
    max_stored_response: usize,
    principal_header: HeaderName,
    anonymous: Anonymous,
    fail: FailMode,
    namespace: String,
    scope: Option<String>,
    excluded_fields: Vec<String>,
    fingerprinter: Fingerprinter,
}

/// One mebibyte, the default body limits.
const MIB: usize = 1024 * 1024;

impl Default for Policy {
    fn default() -> Self {
        Self {
            key: KeyRequirement::default(),
            methods: vec![Method::POST, Method::PATCH],
            retention: DEFAULT_RETENTION,
            lease: DEFAULT_LEASE,
            in_flight: OnInFlight::default(),
            max_wait: Duration::from_secs(10),
            server_errors: Disposition::Store,
            ambiguous: Disposition::Store,
            on_cancel: OnCancel::default(),
            max_request_body: MIB,
            max_stored_response: MIB,
            principal_header: http::header::AUTHORIZATION,
            anonymous: Anonymous::default(),
            fail: FailMode::default(),
            namespace: "default".into(),
            scope: None,
            excluded_fields: Vec::new(),
            fingerprinter: Fingerprinter::new(),
        }
    }
}

impl Policy {
    /// The default policy.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether requests must carry a key. Default: [`KeyRequirement::Optional`].
    pub fn with_key(mut self, key: KeyRequirement) -> Self {
        self.key = key;
        self
    }

    /// The methods deduplicated on this route; others pass through. Default: `POST`,
    /// `PATCH`.
    pub fn with_methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// How long a completed record is replayed. Default: 24 hours. A retry after it
    /// executes again.
    pub fn with_retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How long a claim holds a key without renewal; running requests renew it every half
    /// lease. Default: 60 seconds.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// What a retry gets while the first request runs. Default: [`OnInFlight::Conflict`].
    pub fn with_in_flight(mut self, in_flight: OnInFlight) -> Self {
        self.in_flight = in_flight;
        self
    }

    /// The longest wait for a running duplicate, whether the route or the client's
    /// `Prefer: wait=N` asks for it. Default: 10 seconds.
    pub fn with_max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// What happens to 5xx answers other than 503. Default: [`Disposition::Store`]
    /// (at most once, as Stripe does).
    pub fn with_server_errors(mut self, disposition: Disposition) -> Self {
        self.server_errors = disposition;
        self
    }

    /// What happens when the outcome is unknown: the inner service returned an
    /// [`Ambiguous`](crate::Ambiguous) error, or a claim took over an expired lease whose
    /// holder may have executed. Default: [`Disposition::Store`], an `outcome-unknown`
    /// problem that retries replay.
    pub fn with_ambiguous(mut self, disposition: Disposition) -> Self {
        self.ambiguous = disposition;
        self
    }

    /// What happens when the response future is dropped while the inner service runs.
    /// Default: [`OnCancel::Release`].
    pub fn with_on_cancel(mut self, on_cancel: OnCancel) -> Self {
        self.on_cancel = on_cancel;
        self
    }

    /// The largest request body deduplicated requests may have, in bytes. Default: 1 MiB.
    pub fn with_max_request_body(mut self, bytes: usize) -> Self {
        self.max_request_body = bytes;
        self
    }

    /// The largest response body stored for replays, in bytes. Default: 1 MiB. A larger
    /// response reaches its first caller intact; retries get a
    /// `response-too-large-to-replay` problem.
    pub fn with_max_stored_response(mut self, bytes: usize) -> Self {
        self.max_stored_response = bytes;
        self
    }

    /// The request header that identifies the principal (tenant, credential). Default:
    /// `Authorization`. Its value is stored only as a keyed hash.
    pub fn with_principal_header(mut self, name: HeaderName) -> Self {
        self.principal_header = name;
        self
    }

    /// What a keyed request without a principal gets. Default: [`Anonymous::Shared`].
    pub fn with_anonymous(mut self, anonymous: Anonymous) -> Self {
        self.anonymous = anonymous;
        self
    }

    /// What happens when the store cannot be reached. Default: [`FailMode::Closed`].
    pub fn with_fail(mut self, fail: FailMode) -> Self {
        self.fail = fail;
        self
    }

    /// The namespace of this route's records. Default: `default`.
    pub fn with_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// A scope name used in place of the route pattern in record ids: routes that share a
    /// namespace and scope name share keys (Stripe-style per-account scope). Default: none,
    /// the route pattern.
    pub fn with_scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// Leaves a JSON field out of the fingerprint: a dotted path from the top-level
    /// object (`metadata.sent_at`).
    pub fn exclude_field(mut self, path: impl Into<String>) -> Self {
        let path = path.into();
        self.fingerprinter = self.fingerprinter.exclude_field(&path);
        self.excluded_fields.push(path);
        self
    }

    /// See [`with_key`](Self::with_key).
    pub fn key(&self) -> KeyRequirement {
        self.key
    }

    /// See [`with_methods`](Self::with_methods).
    pub fn methods(&self) -> &[Method] {
        &self.methods
    }

    /// Whether `method` is deduplicated on this route.
    pub fn applies_to(&self, method: &Method) -> bool {
        self.methods.contains(method)
    }

    /// See [`with_retention`](Self::with_retention).
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// See [`with_lease`](Self::with_lease).
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// See [`with_in_flight`](Self::with_in_flight).
    pub fn in_flight(&self) -> OnInFlight {
        self.in_flight
    }

    /// See [`with_max_wait`](Self::with_max_wait).
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// See [`with_server_errors`](Self::with_server_errors).
    pub fn server_errors(&self) -> Disposition {
        self.server_errors
    }

    /// See [`with_ambiguous`](Self::with_ambiguous).
    pub fn ambiguous(&self) -> Disposition {
        self.ambiguous
    }

    /// See [`with_on_cancel`](Self::with_on_cancel).
    pub fn on_cancel(&self) -> OnCancel {
        self.on_cancel
    }

    /// See [`with_max_request_body`](Self::with_max_request_body).
    pub fn max_request_body(&self) -> usize {
        self.max_request_body
    }

    /// See [`with_max_stored_response`](Self::with_max_stored_response).
    pub fn max_stored_response(&self) -> usize {
        self.max_stored_response
    }

    /// See [`with_principal_header`](Self::with_principal_header).
    pub fn principal_header(&self) -> &HeaderName {
        &self.principal_header
    }

    /// See [`with_anonymous`](Self::with_anonymous).
    pub fn anonymous(&self) -> Anonymous {
        self.anonymous
    }

    /// See [`with_fail`](Self::with_fail).
    pub fn fail(&self) -> FailMode {
        self.fail
    }

    /// See [`with_namespace`](Self::with_namespace).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// See [`with_scope`](Self::with_scope).
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// See [`exclude_field`](Self::exclude_field).
    pub fn excluded_fields(&self) -> &[String] {
        &self.excluded_fields
    }

    /// The fingerprinter built from the exclusions.
    pub fn fingerprinter(&self) -> &Fingerprinter {
        &self.fingerprinter
    }

    /// Checks the policy: a lease of at least 1 ms, a retention at least as long as the
    /// lease, at least one method.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.lease < Duration::from_millis(1) {
            return Err(PolicyError::LeaseTooShort);
        }
        if self.retention < self.lease {
            return Err(PolicyError::RetentionShorterThanLease {
                retention: self.retention,
                lease: self.lease,
            });
        }
        if self.methods.is_empty() {
            return Err(PolicyError::NoMethods);
        }
        Ok(())
    }
}

/// Why a [`Policy`] is rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The lease is shorter than a millisecond.
    #[error("the lease must be at least 1ms")]
    LeaseTooShort,
    /// Records would expire while their request could still be running.
    #[error("the retention ({retention:?}) is shorter than the lease ({lease:?})")]
    RetentionShorterThanLease {
        /// The retention.
        retention: Duration,
        /// The lease.
        lease: Duration,
    },
    /// The route applies to no method.
    #[error("the policy lists no methods")]
    NoMethods,
}
