//! The route table: which requests a policy applies to.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use http::Method;

use crate::policy::{Policy, PolicyError};

/// A path pattern and the policy of the requests it matches.
#[derive(Clone, Debug)]
pub struct Route {
    pattern: Arc<str>,
    policy: Arc<Policy>,
}

impl Route {
    /// The pattern as written (`/v1/charges/{id}`): the route part of record scopes.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The route's policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub(crate) fn pattern_arc(&self) -> &Arc<str> {
        &self.pattern
    }

    pub(crate) fn policy_arc(&self) -> &Arc<Policy> {
        &self.policy
    }
}

/// Routes and their policies, matched on the request path.
///
/// Patterns are `/`-separated segments, each one of:
/// - an exact segment (`charges`);
/// - a parameter, `{name}`, matching any one non-empty segment;
/// - `*`, as the last segment only: the route matches every path under the prefix, the
///   prefix itself included (`/v1/*` matches `/v1`, `/v1/` and `/v1/charges/7`).
///
/// The most specific pattern wins (exact segments over parameters over `*`). Several
/// routes may share a pattern with different methods; a request whose method none of the
/// most specific pattern's routes lists, or whose path no pattern matches, is passed
/// through untouched. An empty table stands for one route `/*` with the default
/// [`Policy`].
///
/// Records are scoped by the *pattern*, not the concrete path: a key sent to
/// `/v1/charges/{id}` names the same record whichever `id` the path carries (the path is
/// part of the fingerprint, so a different `id` with the same key is a mismatch).
///
/// ```
/// use http::Method;
/// use idem_tower::{KeyRequirement, Policy, Routes};
///
/// let routes = Routes::new()
///     .route("/v1/charges", Policy::new().with_key(KeyRequirement::Required))?
///     .route("/v1/charges/{id}/refunds", Policy::new())?
///     .route("/v1/*", Policy::new().with_methods([Method::POST, Method::PUT]))?;
/// let found = routes.find(&Method::POST, "/v1/charges/ch_1/refunds").unwrap();
/// assert_eq!(found.pattern(), "/v1/charges/{id}/refunds");
/// assert_eq!(routes.find(&Method::PUT, "/v1/customers/7").unwrap().pattern(), "/v1/*");
/// assert!(routes.find(&Method::POST, "/v2/charges").is_none());
/// # Ok::<(), idem_tower::RouteError>(())
/// ```
#[derive(Clone, Default)]
pub struct Routes {
    routes: Vec<Route>,
    router: matchit::Router<Vec<usize>>,
}

/// Why a route cannot be added.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The pattern is malformed.
    #[error("invalid route pattern {pattern:?}: {reason}")]
    InvalidPattern {
        /// The pattern.
        pattern: String,
        /// What is wrong.
        reason: String,
    },
    /// The pattern conflicts with another one (the same shape with other parameter names).
    #[error("route pattern {pattern:?} conflicts with another route: {reason}")]
    Conflict {
        /// The pattern.
        pattern: String,
        /// The router's explanation.
        reason: String,
    },
    /// Two routes with the same pattern both list a method.
    #[error("two routes {pattern:?} list the method {method}")]
    DuplicateMethod {
        /// The pattern.
        pattern: String,
        /// The method listed twice.
        method: Method,
    },
    /// The route's policy is invalid.
    #[error("invalid policy for route {pattern:?}: {source}")]
    InvalidPolicy {
        /// The pattern.
        pattern: String,
        /// What is wrong with the policy.
        #[source]
        source: PolicyError,
    },
}

/// A pattern translated to the router's syntax.
struct Compiled {
    /// The path the pattern is registered under.
    primary: String,
    /// Paths a `/*` prefix also matches (the bare prefix, with and without its slash),
    /// registered unless another route claims them explicitly.
    extra: Vec<String>,
}

const CATCH_ALL: &str = "{*idem_rest}";

fn compile(pattern: &str) -> Result<Compiled, String> {
    let Some(rest) = pattern.strip_prefix('/') else {
        return Err("a pattern starts with '/'".into());
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    let mut prefix = String::new();
    for (i, segment) in segments.iter().enumerate() {
        if *segment == "*" {
            if i != last {
                return Err("'*' is allowed only as the last segment".into());
            }
            let mut extra = vec![format!("{prefix}/")];
            if !prefix.is_empty() {
                extra.push(prefix.clone());
            }
            return Ok(Compiled {
                primary: format!("{prefix}/{CATCH_ALL}"),
                extra,
            });
        }
        if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                return Err(format!(
                    "parameter {segment:?} must be '{{name}}' with a name of letters, digits, '_' or '-'"
                ));
            }
        } else if segment.is_empty() && i != last {
            return Err("empty segment ('//')".into());
        } else if segment.contains(['{', '}', '*']) {
            return Err(format!(
                "segment {segment:?}: '{{', '}}' and '*' are allowed only as a whole segment"
            ));
        }
        prefix.push('/');
        prefix.push_str(segment);
    }
    Ok(Compiled {
        primary: prefix,
        extra: Vec::new(),
    })
}

impl Routes {
    /// An empty table (which stands for one `/*` route with the default policy).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a route; see [`add`](Self::add).
    pub fn route(mut self, pattern: &str, policy: Policy) -> Result<Self, RouteError> {
        self.add(pattern, policy)?;
        Ok(self)
    }

    /// Adds a route. Fails on a malformed pattern, a conflict with an existing pattern, a
    /// method listed by two routes of the same pattern, or an invalid policy.
    pub fn add(&mut self, pattern: &str, policy: Policy) -> Result<(), RouteError> {
        policy
            .validate()
            .map_err(|source| RouteError::InvalidPolicy {
                pattern: pattern.into(),
                source,
            })?;
        compile(pattern).map_err(|reason| RouteError::InvalidPattern {
            pattern: pattern.into(),
            reason,
        })?;
        let mut routes = self.routes.clone();
        routes.push(Route {
            pattern: pattern.into(),
            policy: Arc::new(policy),
        });
        self.router = build(&routes)?;
        self.routes = routes;
        Ok(())
    }

    /// How many routes the table has.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when no route was added.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The routes, in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// The route of a request: the most specific pattern matching `path`, and of its
    /// routes the one listing `method`.
    pub fn find(&self, method: &Method, path: &str) -> Option<&Route> {
        let matched = self.router.at(path).ok()?;
        matched
            .value
            .iter()
            .filter_map(|&i| self.routes.get(i))
            .find(|route| route.policy.applies_to(method))
    }
}

fn build(routes: &[Route]) -> Result<matchit::Router<Vec<usize>>, RouteError> {
    let mut primary: Vec<(String, Vec<usize>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut extra: Vec<(String, Vec<usize>)> = Vec::new();
    let mut extra_index: HashMap<String, usize> = HashMap::new();
    for (i, route) in routes.iter().enumerate() {
        let compiled = compile(&route.pattern).map_err(|reason| RouteError::InvalidPattern {
            pattern: route.pattern.to_string(),
            reason,
        })?;
        let slot = *index.entry(compiled.primary.clone()).or_insert_with(|| {
            primary.push((compiled.primary.clone(), Vec::new()));
            primary.len() - 1
        });
        for &other in &primary[slot].1 {
            let other: &Route = &routes[other];
            if let Some(method) = route
                .policy
                .methods()
                .iter()
                .find(|m| other.policy.applies_to(m))
            {
                return Err(RouteError::DuplicateMethod {
                    pattern: route.pattern.to_string(),
                    method: method.clone(),
                });
            }
        }
        primary[slot].1.push(i);
        for path in compiled.extra {
            let slot = *extra_index.entry(path.clone()).or_insert_with(|| {
                extra.push((path, Vec::new()));
                extra.len() - 1
            });
            extra[slot].1.push(i);
        }
    }
    let mut router = matchit::Router::new();
    for (path, indices) in primary {
        let pattern = indices
            .first()
            .map_or_else(String::new, |&i| routes[i].pattern.to_string());
        router
            .insert(path, indices)
            .map_err(|e| RouteError::Conflict {
                pattern,
                reason: e.to_string(),
            })?;
    }
    for (path, indices) in extra {
        if index.contains_key(&path) {
            continue;
        }
        // The bare prefix of a `/*` route yields to any explicit route.
        let _ = router.insert(path, indices);
    }
    Ok(router)
}

impl fmt::Debug for Routes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.routes
                    .iter()
                    .map(|r| (r.pattern(), r.policy.methods())),
            )
            .finish()
    }
}

/// The name a request's record is scoped by, for a route `pattern` without an explicit
/// scope: the pattern itself, so every path a `{param}` route matches is one endpoint —
/// except for prefix routes (`/v1/*`, the implicit `/*`), where each concrete path is its
/// own endpoint and the name is `"<pattern> <path>"`. The same key sent to two paths under
/// a prefix route names two records.
///
/// ```
/// assert_eq!(idem_tower::scope_name("/v1/charges/{id}", "/v1/charges/7"), "/v1/charges/{id}");
/// assert_eq!(idem_tower::scope_name("/*", "/v1/refunds"), "/* /v1/refunds");
/// ```
pub fn scope_name<'a>(pattern: &'a str, path: &str) -> std::borrow::Cow<'a, str> {
    if pattern.ends_with("/*") {
        std::borrow::Cow::Owned(format!("{pattern} {path}"))
    } else {
        std::borrow::Cow::Borrowed(pattern)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(routes: &Routes, path: &str) -> Option<String> {
        routes
            .find(&Method::POST, path)
            .map(|r| r.pattern().to_string())
    }

    #[test]
    fn exact_parameter_and_prefix_segments() {
        let routes = Routes::new()
            .route("/v1/charges", Policy::new())
            .unwrap()
            .route("/v1/charges/{id}", Policy::new())
            .unwrap()
            .route("/v1/*", Policy::new())
            .unwrap();
        assert_eq!(post(&routes, "/v1/charges").as_deref(), Some("/v1/charges"));
        assert_eq!(
            post(&routes, "/v1/charges/ch_1").as_deref(),
            Some("/v1/charges/{id}")
        );
        assert_eq!(
            post(&routes, "/v1/charges/ch_1/capture").as_deref(),
            Some("/v1/*")
        );
        assert_eq!(post(&routes, "/v1").as_deref(), Some("/v1/*"));
        assert_eq!(post(&routes, "/v1/").as_deref(), Some("/v1/*"));
        assert_eq!(post(&routes, "/v2/charges"), None);
        assert_eq!(post(&routes, "/"), None);
    }

    #[test]
    fn root_prefix_matches_everything() {
        let routes = Routes::new().route("/*", Policy::new()).unwrap();
        for path in ["/", "/a", "/a/b/c"] {
            assert_eq!(post(&routes, path).as_deref(), Some("/*"), "{path}");
        }
    }

    #[test]
    fn methods_select_among_routes_of_one_pattern() {
        let routes = Routes::new()
            .route("/orders/{id}", Policy::new().with_methods([Method::PATCH]))
            .unwrap()
            .route("/orders/{id}", Policy::new().with_methods([Method::POST]))
            .unwrap();
        assert!(routes.find(&Method::PATCH, "/orders/1").is_some());
        assert!(routes.find(&Method::POST, "/orders/1").is_some());
        assert!(routes.find(&Method::PUT, "/orders/1").is_none());
        let dup = routes.clone().route("/orders/{id}", Policy::new());
        assert!(matches!(dup, Err(RouteError::DuplicateMethod { .. })));
    }

    #[test]
    fn explicit_route_wins_over_a_prefix_bare_path() {
        let routes = Routes::new()
            .route("/v1/*", Policy::new())
            .unwrap()
            .route("/v1", Policy::new())
            .unwrap();
        assert_eq!(post(&routes, "/v1").as_deref(), Some("/v1"));
    }

    #[test]
    fn malformed_patterns_are_rejected() {
        for pattern in [
            "v1", "/v1/*/x", "/{}", "/{a b}", "/a{b}", "/{*rest}", "/a//b", "/a*",
        ] {
            assert!(
                matches!(
                    Routes::new().route(pattern, Policy::new()),
                    Err(RouteError::InvalidPattern { .. })
                ),
                "{pattern}"
            );
        }
        let conflict = Routes::new()
            .route("/a/{x}", Policy::new())
            .unwrap()
            .route("/a/{y}", Policy::new());
        assert!(
            matches!(conflict, Err(RouteError::Conflict { .. })),
            "{conflict:?}"
        );
    }

    #[test]
    fn invalid_policies_are_rejected() {
        let policy = Policy::new()
            .with_lease(std::time::Duration::from_secs(60))
            .with_retention(std::time::Duration::from_secs(10));
        assert!(matches!(
            Routes::new().route("/a", policy),
            Err(RouteError::InvalidPolicy { .. })
        ));
    }
}
