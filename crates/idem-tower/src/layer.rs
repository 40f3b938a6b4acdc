//! [`IdempotencyLayer`]: the configuration, and the layer that applies it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use idem_core::{PrincipalHasher, Store};
use tower_layer::Layer;

use crate::events::IdempotencyEvents;
use crate::extract::{HeaderKey, HeaderPrincipal, KeyExtractor, PrincipalExtractor};
use crate::policy::Policy;
use crate::routes::Routes;
use crate::service::Idempotency;

/// Applies the HTTP idempotency contract to a service: see the [crate docs](crate).
///
/// Cloning is cheap; every clone and every service it makes share one configuration.
#[derive(Clone)]
pub struct IdempotencyLayer {
    pub(crate) shared: Arc<Shared>,
}

#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) routes: Routes,
    pub(crate) hasher: PrincipalHasher,
    pub(crate) key_extractor: Arc<dyn KeyExtractor>,
    pub(crate) principal_extractor: Arc<dyn PrincipalExtractor>,
    pub(crate) events: Arc<dyn IdempotencyEvents>,
    pub(crate) store_retry_after: Duration,
    pub(crate) store_timeout: Option<Duration>,
}

/// The default bound on one store operation: see [`IdempotencyLayer::with_store_timeout`].
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_secs(5);

impl IdempotencyLayer {
    /// A layer over `store` with the default route table (every path, the default
    /// [`Policy`]). Principals are hashed with `principal_secret` (HMAC-SHA256): it must be
    /// the same for every process sharing the store and must stay the same across
    /// restarts, or retries stop finding their records. 32 random bytes is the
    /// recommendation.
    pub fn new(store: Arc<dyn Store>, principal_secret: impl AsRef<[u8]>) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                routes: implicit_routes(),
                hasher: PrincipalHasher::new(principal_secret.as_ref()),
                key_extractor: Arc::new(HeaderKey::default()),
                principal_extractor: Arc::new(HeaderPrincipal),
                events: Arc::new(()),
                store_retry_after: Duration::from_secs(1),
                store_timeout: Some(DEFAULT_STORE_TIMEOUT),
            }),
        }
    }

    fn update(mut self, f: impl FnOnce(&mut Shared)) -> Self {
        f(Arc::make_mut(&mut self.shared));
        self
    }

    /// The route table. An empty table stands for one `/*` route with the default policy.
    pub fn with_routes(self, routes: Routes) -> Self {
        let routes = if routes.is_empty() {
            implicit_routes()
        } else {
            routes
        };
        self.update(|s| s.routes = routes)
    }

    /// Reads the key from this header instead of `Idempotency-Key`.
    pub fn with_key_header(self, name: HeaderName) -> Self {
        self.with_key_extractor(HeaderKey::new(name))
    }

    /// Finds keys with a custom strategy (a closure or a [`KeyExtractor`]).
    pub fn with_key_extractor(self, extractor: impl KeyExtractor) -> Self {
        self.update(|s| s.key_extractor = Arc::new(extractor))
    }

    /// Finds principals with a custom strategy (a closure or a [`PrincipalExtractor`]).
    pub fn with_principal_extractor(self, extractor: impl PrincipalExtractor) -> Self {
        self.update(|s| s.principal_extractor = Arc::new(extractor))
    }

    /// Reports events and store latencies to `events`.
    pub fn with_events(self, events: Arc<dyn IdempotencyEvents>) -> Self {
        self.update(|s| s.events = events)
    }

    /// The `Retry-After` of `503 store-unavailable` answers. Default: 1 second.
    pub fn with_store_retry_after(self, after: Duration) -> Self {
        self.update(|s| s.store_retry_after = after)
    }

    /// How long one store operation (a claim, a completion, a release, a renewal, a clock
    /// read) may take; past it the operation counts as failed with its outcome unknown
    /// ([`Error::Unavailable`](idem_core::Error::Unavailable)), exactly as if the store had
    /// dropped the connection: a claim answers `503 store-unavailable` (the client retries;
    /// if the claim did land, the retry finds it in flight until its lease passes), a
    /// completion leaves the record in flight until its lease passes. `None` waits for as
    /// long as the store takes. Default: 5 seconds. Waits for another request's completion
    /// (`Prefer: wait`) have their own bound, the route's `max_wait`.
    pub fn with_store_timeout(self, timeout: Option<Duration>) -> Self {
        self.update(|s| s.store_timeout = timeout)
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// The route table in effect.
    pub fn routes(&self) -> &Routes {
        &self.shared.routes
    }
}

fn implicit_routes() -> Routes {
    // The pattern and the default policy are valid, so this cannot fail.
    Routes::new()
        .route("/*", Policy::default())
        .unwrap_or_default()
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::from_shared(inner, self.shared.clone())
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("store", &self.shared.store)
            .field("routes", &self.shared.routes)
            .finish_non_exhaustive()
    }
}
