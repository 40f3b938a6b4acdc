//! The gateway's configuration: a TOML file, flags that override it, and the validation
//! that turns both into a [`Config`] the server runs with.
//!
//! Every field, its unit and its default are listed in `docs/operating.md`. Errors name the
//! field they are about (`routes[1].retention: ...`), so an operator can fix the file
//! without reading the source.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http::{HeaderName, Method, Uri};
use idem_tower::{
    Disposition, FailMode, KeyRequirement, OnCancel, OnInFlight, Policy, RouteError, Routes,
};
use serde::Deserialize;

use crate::store::{Sharing, StoreUrl};

/// The address the gateway listens on when neither the file nor `--listen` sets one.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The store when neither the file nor `--store` sets one: the embedded store in the
/// working directory.
pub const DEFAULT_STORE: &str = "sqlite://./idem.db";
/// How long the upstream has to answer (response headers and the whole body).
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to the upstream may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a shutdown waits for requests in flight.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How often expired records are purged from stores without a reaper of their own.
pub const DEFAULT_PURGE_INTERVAL: Duration = Duration::from_secs(60);
/// The environment variable that holds the principal secret.
pub const SECRET_ENV: &str = "IDEM_PRINCIPAL_SECRET";

/// A configuration error: the field it is about and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// The field, as a path in the file (`routes[0].path`, `defaults.retention`), or the
    /// file itself.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl fmt::Display) -> Self {
        Self {
            field: field.into(),
            message: message.to_string(),
        }
    }
}

/// A duration written as text: `"250ms"`, `"60s"`, `"24h"`, `"1h 30m"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write it like \"500ms\", \"60s\" or \"24h\""
            ))
        })
    }
}

/// A size in bytes, written as a number of bytes or as text: `"64KiB"`, `"1MiB"`, `"1MB"`
/// (KiB, MiB, GiB are powers of 1024; kB, MB, GB powers of 1000).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        let invalid = |text: &str| {
            serde::de::Error::custom(format!(
                "invalid size {text:?}; write a number of bytes or a size like \"64KiB\" or \"1MiB\""
            ))
        };
        match Raw::deserialize(d).map_err(|_| invalid("?"))? {
            Raw::Bytes(n) => Ok(Size(n)),
            Raw::Text(text) => text
                .trim()
                .parse::<bytesize::ByteSize>()
                .map(|s| Size(s.as_u64()))
                .map_err(|_| invalid(&text)),
        }
    }
}

/// `key = "required" | "optional" | "ignored"`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum KeyField {
    Required,
    Optional,
    Ignored,
}

/// `in_flight = "conflict" | "wait"`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum InFlightField {
    Conflict,
    Wait,
}

/// `server_errors` and `ambiguous`: `"store" | "release"`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum DispositionField {
    Store,
    Release,
}

/// `fail = "closed" | "open"`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum FailField {
    Closed,
    Open,
}

/// `on_cancel = "complete" | "release"`: what happens to a request whose client went away
/// while the upstream worked on it.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum OnCancelField {
    Complete,
    Release,
}

/// The per-route fields, as written in `[defaults]` and in each `[[routes]]` table. Every
/// field is optional: a route inherits what it does not set from `[defaults]`, and
/// `[defaults]` from the built-in defaults.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct RouteFields {
    /// The path pattern (routes only).
    pub path: Option<String>,
    pub key: Option<KeyField>,
    pub methods: Option<Vec<String>>,
    pub retention: Option<Dur>,
    pub lease: Option<Dur>,
    pub in_flight: Option<InFlightField>,
    pub max_wait: Option<Dur>,
    pub server_errors: Option<DispositionField>,
    pub ambiguous: Option<DispositionField>,
    pub max_request_body: Option<Size>,
    pub max_stored_response: Option<Size>,
    pub principal_header: Option<String>,
    pub fail: Option<FailField>,
    pub on_cancel: Option<OnCancelField>,
    pub namespace: Option<String>,
    pub scope: Option<String>,
    pub exclude_fields: Option<Vec<String>>,
}

/// The configuration file as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub store: Option<String>,
    pub admin_listen: Option<String>,
    pub principal_secret: Option<String>,
    pub upstream_timeout: Option<Dur>,
    pub connect_timeout: Option<Dur>,
    pub shutdown_grace: Option<Dur>,
    pub purge_interval: Option<Dur>,
    pub key_header: Option<String>,
    pub forward_key: Option<bool>,
    #[serde(default)]
    pub defaults: RouteFields,
    #[serde(default)]
    pub routes: Vec<RouteFields>,
}

impl FileConfig {
    /// Parses a TOML document; errors name the field (`routes[0].lease`).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError::new("config", toml_message(&e, text)))?;
        serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            let field = if path.is_empty() || path == "." {
                "config".to_string()
            } else {
                path
            };
            ConfigError::new(field, toml_message(e.inner(), text))
        })
    }

    /// Reads and parses a file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new("config", format!("cannot read {}: {e}", path.display()))
        })?;
        Self::parse(&text)
    }
}

/// The one-line form of a TOML error: its message and the line it points at.
fn toml_message(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{message} (line {line})")
        }
        None => message,
    }
}

/// Values from the command line that take precedence over the file.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--upstream`.
    pub upstream: Option<String>,
    /// `--store`.
    pub store: Option<String>,
    /// `--admin-listen`.
    pub admin_listen: Option<String>,
}

/// The validated configuration the gateway runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the gateway listens.
    pub listen: SocketAddr,
    /// The upstream every request is forwarded to.
    pub upstream: Uri,
    /// Where records live.
    pub store: StoreUrl,
    /// Where the admin endpoints listen, if anywhere.
    pub admin_listen: Option<SocketAddr>,
    /// The principal secret from the file or the environment, if either sets one.
    pub principal_secret: Option<String>,
    /// How long the upstream has to answer, body included.
    pub upstream_timeout: Duration,
    /// How long connecting to the upstream may take.
    pub connect_timeout: Duration,
    /// How long a shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
    /// How often expired records are purged.
    pub purge_interval: Duration,
    /// The header the idempotency key is read from.
    pub key_header: HeaderName,
    /// Whether the key header is forwarded to the upstream.
    pub forward_key: bool,
    /// The route table, with the implicit `/*` route when the file lists none.
    pub routes: Routes,
}

impl Config {
    /// A configuration from a TOML document alone (tests, embedding).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::build(FileConfig::parse(text)?, Overrides::default(), None)
    }

    /// Reads the file (if any), applies the overrides and the environment's
    /// [`SECRET_ENV`], and validates the result.
    pub fn load(path: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let file = match path {
            Some(path) => FileConfig::read(path)?,
            None => FileConfig::default(),
        };
        let env_secret = std::env::var(SECRET_ENV).ok().filter(|s| !s.is_empty());
        Self::build(file, overrides, env_secret)
    }

    /// Validates a parsed file with overrides; `env_secret` takes precedence over the
    /// file's `principal_secret`.
    pub fn build(
        file: FileConfig,
        overrides: Overrides,
        env_secret: Option<String>,
    ) -> Result<Self, ConfigError> {
        let listen_text = overrides
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen = parse_addr("listen", &listen_text)?;
        let admin_listen = overrides
            .admin_listen
            .or(file.admin_listen)
            .map(|text| parse_addr("admin_listen", &text))
            .transpose()?;
        let upstream_text = overrides.upstream.or(file.upstream).ok_or_else(|| {
            ConfigError::new(
                "upstream",
                "missing: set `upstream` in the config file or pass --upstream URL",
            )
        })?;
        let upstream = parse_upstream(&upstream_text)?;
        let store_text = overrides
            .store
            .or(file.store)
            .unwrap_or_else(|| DEFAULT_STORE.into());
        let store = StoreUrl::parse(&store_text).map_err(|e| ConfigError::new("store", e))?;

        let principal_secret = env_secret.or(file.principal_secret);
        if principal_secret.as_deref() == Some("") {
            return Err(ConfigError::new("principal_secret", "must not be empty"));
        }
        if principal_secret.is_none() && store.sharing() == Sharing::Shared {
            return Err(ConfigError::new(
                "principal_secret",
                format!(
                    "required with a shared store ({}): every replica must hash principals \
                     with the same secret; set `principal_secret` or {SECRET_ENV}",
                    store.scheme()
                ),
            ));
        }

        let key_header_text = file.key_header.unwrap_or_else(|| "idempotency-key".into());
        let key_header = parse_header("key_header", &key_header_text)?;

        let positive = |field: &str, d: Option<Dur>, default: Duration| {
            let d = d.map_or(default, |d| d.0);
            if d.is_zero() {
                Err(ConfigError::new(field, "must be longer than zero"))
            } else {
                Ok(d)
            }
        };
        let upstream_timeout = positive(
            "upstream_timeout",
            file.upstream_timeout,
            DEFAULT_UPSTREAM_TIMEOUT,
        )?;
        let connect_timeout = positive(
            "connect_timeout",
            file.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        )?;
        let shutdown_grace = file.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0);
        let purge_interval = positive(
            "purge_interval",
            file.purge_interval,
            DEFAULT_PURGE_INTERVAL,
        )?;

        if file.defaults.path.is_some() {
            return Err(ConfigError::new(
                "defaults.path",
                "not allowed in [defaults]: a path belongs to a [[routes]] table",
            ));
        }
        let mut routes = Routes::new();
        if file.routes.is_empty() {
            let policy = policy("defaults", &RouteFields::default(), &file.defaults)?;
            add_route(&mut routes, "defaults", "/*", policy)?;
        }
        for (i, route) in file.routes.iter().enumerate() {
            let name = format!("routes[{i}]");
            let path = route
                .path
                .as_deref()
                .ok_or_else(|| ConfigError::new(format!("{name}.path"), "missing"))?;
            let policy = policy(&name, route, &file.defaults)?;
            add_route(&mut routes, &name, path, policy)?;
        }

        Ok(Self {
            listen,
            upstream,
            store,
            admin_listen,
            principal_secret,
            upstream_timeout,
            connect_timeout,
            shutdown_grace,
            purge_interval,
            key_header,
            forward_key: file.forward_key.unwrap_or(true),
            routes,
        })
    }
}

fn parse_addr(field: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        ConfigError::new(
            field,
            format!("invalid address {text:?}; write it like \"127.0.0.1:8080\""),
        )
    })
}

fn parse_header(field: &str, text: &str) -> Result<HeaderName, ConfigError> {
    HeaderName::from_bytes(text.as_bytes())
        .map_err(|_| ConfigError::new(field, format!("invalid header name {text:?}")))
}

fn parse_upstream(text: &str) -> Result<Uri, ConfigError> {
    let uri: Uri = text
        .parse()
        .map_err(|e| ConfigError::new("upstream", format!("invalid URL {text:?}: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(ConfigError::new(
                "upstream",
                format!(
                    "unsupported scheme {other:?}: the gateway speaks plain HTTP to its \
                     upstream (http://host:port)"
                ),
            ));
        }
        None => {
            return Err(ConfigError::new(
                "upstream",
                format!("{text:?} is not an absolute URL; write it like \"http://127.0.0.1:3000\""),
            ));
        }
    }
    if uri.authority().is_none() {
        return Err(ConfigError::new("upstream", "the URL has no host"));
    }
    if uri.query().is_some() {
        return Err(ConfigError::new(
            "upstream",
            "the URL must not have a query",
        ));
    }
    Ok(uri)
}

fn add_route(
    routes: &mut Routes,
    name: &str,
    path: &str,
    policy: Policy,
) -> Result<(), ConfigError> {
    routes.add(path, policy).map_err(|e| match e {
        RouteError::DuplicateMethod { method, .. } => ConfigError::new(
            format!("{name}.methods"),
            format!("another route with the path {path:?} already lists {method}"),
        ),
        RouteError::InvalidPolicy { source, .. } => ConfigError::new(name.to_string(), source),
        other => ConfigError::new(format!("{name}.path"), other),
    })
}

/// The effective policy of a route: its own fields over `[defaults]` over the built-in
/// defaults. Errors name the table the offending value came from.
fn policy(name: &str, route: &RouteFields, defaults: &RouteFields) -> Result<Policy, ConfigError> {
    // Which table a field's effective value was written in.
    let source = |route_has: bool, field: &str| {
        if route_has {
            format!("{name}.{field}")
        } else {
            format!("defaults.{field}")
        }
    };
    let mut policy = Policy::new().with_on_cancel(OnCancel::RunToCompletion);

    if let Some(key) = route.key.or(defaults.key) {
        policy = policy.with_key(match key {
            KeyField::Required => KeyRequirement::Required,
            KeyField::Optional => KeyRequirement::Optional,
            KeyField::Ignored => KeyRequirement::Ignored,
        });
    }
    if let Some(methods) = route.methods.as_ref().or(defaults.methods.as_ref()) {
        let field = source(route.methods.is_some(), "methods");
        if methods.is_empty() {
            return Err(ConfigError::new(field, "lists no methods"));
        }
        let mut parsed = Vec::new();
        for method in methods {
            let upper = method.to_ascii_uppercase();
            let m = Method::from_bytes(upper.as_bytes())
                .map_err(|_| ConfigError::new(&field, format!("invalid method {method:?}")))?;
            if !parsed.contains(&m) {
                parsed.push(m);
            }
        }
        policy = policy.with_methods(parsed);
    }
    if let Some(lease) = route.lease.or(defaults.lease) {
        if lease.0 < Duration::from_millis(1) {
            return Err(ConfigError::new(
                source(route.lease.is_some(), "lease"),
                "must be at least 1ms",
            ));
        }
        policy = policy.with_lease(lease.0);
    }
    if let Some(retention) = route.retention.or(defaults.retention) {
        policy = policy.with_retention(retention.0);
    }
    if policy.retention() < policy.lease() {
        let field = if route.retention.is_some() || route.lease.is_none() {
            source(route.retention.is_some(), "retention")
        } else {
            source(true, "lease")
        };
        return Err(ConfigError::new(
            field,
            format!(
                "the retention ({}) is shorter than the lease ({}): a record could expire \
                 while its request is still running",
                humantime::format_duration(policy.retention()),
                humantime::format_duration(policy.lease())
            ),
        ));
    }
    if let Some(in_flight) = route.in_flight.or(defaults.in_flight) {
        policy = policy.with_in_flight(match in_flight {
            InFlightField::Conflict => OnInFlight::Conflict,
            InFlightField::Wait => OnInFlight::Wait,
        });
    }
    if let Some(max_wait) = route.max_wait.or(defaults.max_wait) {
        policy = policy.with_max_wait(max_wait.0);
    }
    let disposition = |d: DispositionField| match d {
        DispositionField::Store => Disposition::Store,
        DispositionField::Release => Disposition::Release,
    };
    if let Some(d) = route.server_errors.or(defaults.server_errors) {
        policy = policy.with_server_errors(disposition(d));
    }
    if let Some(d) = route.ambiguous.or(defaults.ambiguous) {
        policy = policy.with_ambiguous(disposition(d));
    }
    let size =
        |value: Option<Size>, has: bool, field: &str| -> Result<Option<usize>, ConfigError> {
            value
                .map(|s| {
                    usize::try_from(s.0).map_err(|_| {
                        ConfigError::new(source(has, field), "too large for this machine")
                    })
                })
                .transpose()
        };
    if let Some(bytes) = size(
        route.max_request_body.or(defaults.max_request_body),
        route.max_request_body.is_some(),
        "max_request_body",
    )? {
        policy = policy.with_max_request_body(bytes);
    }
    if let Some(bytes) = size(
        route.max_stored_response.or(defaults.max_stored_response),
        route.max_stored_response.is_some(),
        "max_stored_response",
    )? {
        policy = policy.with_max_stored_response(bytes);
    }
    if let Some(header) = route
        .principal_header
        .as_ref()
        .or(defaults.principal_header.as_ref())
    {
        let field = source(route.principal_header.is_some(), "principal_header");
        policy = policy.with_principal_header(parse_header(&field, header)?);
    }
    if let Some(fail) = route.fail.or(defaults.fail) {
        policy = policy.with_fail(match fail {
            FailField::Closed => FailMode::Closed,
            FailField::Open => FailMode::Open,
        });
    }
    if let Some(on_cancel) = route.on_cancel.or(defaults.on_cancel) {
        policy = policy.with_on_cancel(match on_cancel {
            OnCancelField::Complete => OnCancel::RunToCompletion,
            OnCancelField::Release => OnCancel::Release,
        });
    }
    if let Some(namespace) = route.namespace.as_ref().or(defaults.namespace.as_ref()) {
        if namespace.is_empty() {
            return Err(ConfigError::new(
                source(route.namespace.is_some(), "namespace"),
                "must not be empty",
            ));
        }
        policy = policy.with_namespace(namespace.clone());
    }
    if let Some(scope) = route.scope.as_ref().or(defaults.scope.as_ref()) {
        if scope.is_empty() {
            return Err(ConfigError::new(
                source(route.scope.is_some(), "scope"),
                "must not be empty",
            ));
        }
        policy = policy.with_scope(scope.clone());
    }
    // Exclusions add up: the defaults' and the route's own.
    for field in defaults
        .exclude_fields
        .iter()
        .flatten()
        .chain(route.exclude_fields.iter().flatten())
    {
        policy = policy.exclude_field(field.clone());
    }
    policy
        .validate()
        .map_err(|e| ConfigError::new(name.to_string(), e))?;
    Ok(policy)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn err(text: &str) -> ConfigError {
        Config::from_toml(text).unwrap_err()
    }

    const UP: &str = "upstream = \"http://127.0.0.1:3000\"\nstore = \"memory://\"\n";

    #[test]
    fn the_issue_example_is_valid() {
        let text = r#"
            listen = "127.0.0.1:8080"
            upstream = "http://127.0.0.1:3000"
            store = "sqlite://./idem.db"
            admin_listen = "127.0.0.1:9090"

            [defaults]
            key = "optional"
            methods = ["POST", "PATCH"]
            retention = "24h"
            lease = "60s"
            in_flight = "conflict"
            max_wait = "10s"
            server_errors = "store"
            ambiguous = "store"
            max_request_body = "1MiB"
            max_stored_response = "1MiB"
            principal_header = "authorization"
            fail = "closed"

            [[routes]]
            path = "/v1/charges/{id}"
            methods = ["POST", "PATCH"]
            key = "required"
        "#;
        let config = Config::from_toml(text).unwrap();
        assert_eq!(config.routes.len(), 1);
        let route = config.routes.iter().next().unwrap();
        assert_eq!(route.pattern(), "/v1/charges/{id}");
        assert_eq!(route.policy().key(), KeyRequirement::Required);
        assert_eq!(route.policy().max_request_body(), 1024 * 1024);
        assert_eq!(route.policy().retention(), Duration::from_secs(86_400));
    }

    #[test]
    fn no_routes_means_one_implicit_route_with_the_defaults() {
        let config = Config::from_toml(&format!("{UP}[defaults]\nlease = \"5s\"\n")).unwrap();
        let routes: Vec<_> = config.routes.iter().collect();
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].pattern(), "/*");
        assert_eq!(routes[0].policy().lease(), Duration::from_secs(5));
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        let e = err(&format!("{UP}retentoin = \"1h\"\n"));
        assert!(e.message.contains("retentoin"), "{e}");
        let e = err(&format!("{UP}[[routes]]\npath = \"/a\"\nlaese = \"1s\"\n"));
        assert!(e.field.starts_with("routes[0]"), "{e}");
        assert!(e.message.contains("laese"), "{e}");
    }

    #[test]
    fn retention_shorter_than_lease_is_rejected() {
        let e = err(&format!(
            "{UP}[[routes]]\npath = \"/a\"\nretention = \"10s\"\nlease = \"60s\"\n"
        ));
        assert_eq!(e.field, "routes[0].retention", "{e}");
        let e = err(&format!("{UP}[defaults]\nretention = \"10s\"\n"));
        assert_eq!(e.field, "defaults.retention", "{e}");
        let e = err(&format!(
            "{UP}[defaults]\nretention = \"10s\"\n[[routes]]\npath = \"/a\"\nlease = \"1m\"\n"
        ));
        assert_eq!(e.field, "routes[0].lease", "{e}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let e = err(&format!("{UP}[[routes]]\npath = \"/a/*/b\"\n"));
        assert_eq!(e.field, "routes[0].path", "{e}");
        let e = err(&format!(
            "{UP}[[routes]]\npath = \"/a\"\nlease = \"soon\"\n"
        ));
        assert_eq!(e.field, "routes[0].lease", "{e}");
        let e = err(&format!("{UP}[defaults]\nmax_request_body = \"lots\"\n"));
        assert_eq!(e.field, "defaults.max_request_body", "{e}");
        let e = err(&format!("{UP}[defaults]\nkey = \"sometimes\"\n"));
        assert_eq!(e.field, "defaults.key", "{e}");
        let e = err(&format!("{UP}[[routes]]\nkey = \"required\"\n"));
        assert_eq!(e.field, "routes[0].path", "{e}");
        let e = err(&format!("{UP}[[routes]]\npath = \"/a\"\nmethods = []\n"));
        assert_eq!(e.field, "routes[0].methods", "{e}");
        let e = err("upstream = \"https://example.test\"\n");
        assert_eq!(e.field, "upstream", "{e}");
        let e = err("store = \"memory://\"\n");
        assert_eq!(e.field, "upstream", "{e}");
        let e = err(&format!("{UP}listen = \"nowhere\"\n"));
        assert_eq!(e.field, "listen", "{e}");
        let e = err("upstream = \"http://a:1\"\nstore = \"ftp://x\"\n");
        assert_eq!(e.field, "store", "{e}");
        let e = err(&format!("{UP}[defaults]\npath = \"/a\"\n"));
        assert_eq!(e.field, "defaults.path", "{e}");
    }

    #[test]
    fn shared_stores_require_a_secret() {
        let text = "upstream = \"http://a:1\"\nstore = \"postgres://u@h/db\"\n";
        let e = Config::build(FileConfig::parse(text).unwrap(), Overrides::default(), None)
            .unwrap_err();
        assert_eq!(e.field, "principal_secret", "{e}");
        let ok = Config::build(
            FileConfig::parse(text).unwrap(),
            Overrides::default(),
            Some("s".into()),
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn overrides_win_over_the_file() {
        let file = FileConfig::parse(&format!("{UP}listen = \"127.0.0.1:1\"\n")).unwrap();
        let config = Config::build(
            file,
            Overrides {
                listen: Some("127.0.0.1:2".into()),
                upstream: Some("http://127.0.0.1:4".into()),
                store: Some("memory://".into()),
                admin_listen: None,
            },
            None,
        )
        .unwrap();
        assert_eq!(config.listen.port(), 2);
        assert_eq!(config.upstream.port_u16(), Some(4));
    }

    #[test]
    fn sizes_and_durations() {
        let config = Config::from_toml(&format!(
            "{UP}[defaults]\nmax_request_body = 2048\nmax_stored_response = \"64KiB\"\nmax_wait = \"1m 30s\"\n"
        ))
        .unwrap();
        let policy = config.routes.iter().next().unwrap().policy().clone();
        assert_eq!(policy.max_request_body(), 2048);
        assert_eq!(policy.max_stored_response(), 64 * 1024);
        assert_eq!(policy.max_wait(), Duration::from_secs(90));
    }
}
