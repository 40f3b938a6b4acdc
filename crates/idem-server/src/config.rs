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
    Anonymous, Disposition, FailMode, KeyRequirement, OnCancel, OnInFlight, Policy, RouteError,
    Routes,
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
/// The environment variable that overrides `mode`.
pub const MODE_ENV: &str = "IDEM_MODE";
/// The environment variable that holds the admin API's bearer token.
pub const ADMIN_TOKEN_ENV: &str = "IDEM_ADMIN_TOKEN";
/// The environment variable that replaces `[encryption] keys`: `id:base64,id:base64`.
pub const ENCRYPTION_KEYS_ENV: &str = "IDEM_ENCRYPTION_KEYS";
/// The environment variable that overrides `[encryption] active`.
pub const ENCRYPTION_ACTIVE_ENV: &str = "IDEM_ENCRYPTION_ACTIVE";
/// How long after its record expired a retry still counts as late.
pub const DEFAULT_LATE_RETRY_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// How long a client has to send a request's headers.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client may pause while sending a request body.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The most header lines a request may have.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// The largest request head (request line and headers), in bytes.
pub const DEFAULT_MAX_HEADER_BYTES: u64 = 64 * 1024;
/// The most client connections served at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

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

/// `anonymous = "shared" | "reject"`: what a keyed request without a principal gets.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
#[allow(missing_docs)]
pub enum AnonymousField {
    Shared,
    Reject,
}

/// `mode = "development" | "production"`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Conveniences for a laptop: a generated principal secret for the memory and embedded
    /// stores, anonymous requests sharing one scope unless a route says otherwise.
    #[default]
    Development,
    /// Safe defaults: the principal secret must be configured whatever the store, and
    /// keyed requests without a principal are rejected unless a route says
    /// `anonymous = "shared"`.
    Production,
}

impl Mode {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "development" => Some(Mode::Development),
            "production" => Some(Mode::Production),
            _ => None,
        }
    }
}

/// The `[encryption]` table as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionFields {
    /// Key id → 32 bytes in standard base64.
    #[serde(default)]
    pub keys: std::collections::BTreeMap<String, String>,
    /// The id of the key new responses are sealed with.
    pub active: Option<String>,
    /// Whether responses stored in clear are still replayed (while migrating).
    pub allow_plaintext: Option<bool>,
}

/// Encryption at rest of stored responses, validated.
#[derive(Clone, Debug)]
pub struct Encryption {
    /// The keys and the active one.
    pub keyring: idem_encrypt::Keyring,
    /// Whether responses stored in clear are still replayed.
    pub allow_plaintext: bool,
}

impl Encryption {
    /// Wraps a store so that its responses are sealed at rest.
    pub fn wrap(
        &self,
        store: std::sync::Arc<dyn idem_core::Store>,
    ) -> std::sync::Arc<dyn idem_core::Store> {
        std::sync::Arc::new(
            idem_encrypt::EncryptingStore::new(store, self.keyring.clone())
                .with_plaintext_reads(self.allow_plaintext),
        )
    }
}

/// The environment variables the configuration reads.
#[derive(Clone, Debug, Default)]
pub struct Env {
    /// [`SECRET_ENV`].
    pub principal_secret: Option<String>,
    /// [`MODE_ENV`].
    pub mode: Option<String>,
    /// [`ADMIN_TOKEN_ENV`].
    pub admin_token: Option<String>,
    /// [`ENCRYPTION_KEYS_ENV`].
    pub encryption_keys: Option<String>,
    /// [`ENCRYPTION_ACTIVE_ENV`].
    pub encryption_active: Option<String>,
}

impl Env {
    /// The variables of this process (an empty variable counts as unset).
    pub fn from_process() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|s| !s.is_empty());
        Self {
            principal_secret: var(SECRET_ENV),
            mode: var(MODE_ENV),
            admin_token: var(ADMIN_TOKEN_ENV),
            encryption_keys: var(ENCRYPTION_KEYS_ENV),
            encryption_active: var(ENCRYPTION_ACTIVE_ENV),
        }
    }
}

/// The encryption settings of a file and the environment (the environment's keys replace
/// the file's); `None` when neither configures any key.
pub fn encryption(
    file: Option<&EncryptionFields>,
    env: &Env,
) -> Result<Option<Encryption>, ConfigError> {
    use base64::Engine as _;
    let mut keys: Vec<(String, String, String)> = Vec::new();
    if let Some(text) = &env.encryption_keys {
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (id, key) = entry.split_once(':').ok_or_else(|| {
                ConfigError::new(ENCRYPTION_KEYS_ENV, "write the keys as id:base64,id:base64")
            })?;
            keys.push((
                id.trim().into(),
                key.trim().into(),
                ENCRYPTION_KEYS_ENV.into(),
            ));
        }
    } else if let Some(fields) = file {
        for (id, key) in &fields.keys {
            keys.push((id.clone(), key.clone(), format!("encryption.keys.{id}")));
        }
    }
    let active = env
        .encryption_active
        .clone()
        .or_else(|| file.and_then(|f| f.active.clone()));
    if keys.is_empty() {
        if active.is_some() || file.is_some_and(|f| f.allow_plaintext.is_some()) {
            return Err(ConfigError::new(
                "encryption.keys",
                format!("no keys: set [encryption] keys or {ENCRYPTION_KEYS_ENV}"),
            ));
        }
        return Ok(None);
    }
    let mut decoded = Vec::new();
    for (id, key, field) in &keys {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key)
            .map_err(|_| ConfigError::new(field, "not standard base64"))?;
        if bytes.len() != idem_encrypt::KEY_LEN {
            return Err(ConfigError::new(
                field,
                format!(
                    "{} bytes; a key is 32 random bytes (`head -c 32 /dev/urandom | base64`)",
                    bytes.len()
                ),
            ));
        }
        decoded.push((id.as_str(), bytes));
    }
    let active = match active {
        Some(active) => active,
        None if decoded.len() == 1 => decoded[0].0.to_string(),
        None => {
            return Err(ConfigError::new(
                "encryption.active",
                format!(
                    "missing: name the key that seals new responses (or {ENCRYPTION_ACTIVE_ENV})"
                ),
            ));
        }
    };
    let keyring = idem_encrypt::Keyring::from_keys(
        decoded.iter().map(|(id, bytes)| (*id, bytes.as_slice())),
        &active,
    )
    .map_err(|e| ConfigError::new("encryption", e))?;
    Ok(Some(Encryption {
        keyring,
        allow_plaintext: file.and_then(|f| f.allow_plaintext).unwrap_or(false),
    }))
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
    pub anonymous: Option<AnonymousField>,
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
    pub store_timeout: Option<Dur>,
    pub shutdown_grace: Option<Dur>,
    pub purge_interval: Option<Dur>,
    pub key_header: Option<String>,
    pub forward_key: Option<bool>,
    pub mode: Option<Mode>,
    pub admin_token: Option<String>,
    pub late_retry_window: Option<Dur>,
    pub header_read_timeout: Option<Dur>,
    pub body_read_timeout: Option<Dur>,
    pub max_headers: Option<usize>,
    pub max_header_bytes: Option<Size>,
    pub max_connections: Option<usize>,
    pub encryption: Option<EncryptionFields>,
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
    /// How long one store operation may take before it counts as failed, outcome unknown.
    pub store_timeout: Duration,
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
    /// Development or production defaults.
    pub mode: Mode,
    /// The admin API's bearer token, if any.
    pub admin_token: Option<String>,
    /// Encryption at rest of stored responses, if configured.
    pub encryption: Option<Encryption>,
    /// How long after its record expired a retry counts as late (zero: not tracked).
    pub late_retry_window: Duration,
    /// How long a client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// How long a client may pause while sending a request body.
    pub body_read_timeout: Duration,
    /// The most header lines a request may have.
    pub max_headers: usize,
    /// The largest request head, in bytes.
    pub max_header_bytes: usize,
    /// The most client connections served at once.
    pub max_connections: usize,
}

impl Config {
    /// A configuration from a TOML document alone (tests, embedding).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::build(
            FileConfig::parse(text)?,
            Overrides::default(),
            &Env::default(),
        )
    }

    /// Reads the file (if any), applies the overrides and the environment ([`Env`]), and
    /// validates the result.
    pub fn load(path: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let file = match path {
            Some(path) => FileConfig::read(path)?,
            None => FileConfig::default(),
        };
        Self::build(file, overrides, &Env::from_process())
    }

    /// Validates a parsed file with overrides; the environment's values take precedence
    /// over the file's.
    pub fn build(file: FileConfig, overrides: Overrides, env: &Env) -> Result<Self, ConfigError> {
        let mode = match &env.mode {
            Some(text) => Mode::parse(text).ok_or_else(|| {
                ConfigError::new(
                    MODE_ENV,
                    format!("{text:?}: expected development or production"),
                )
            })?,
            None => file.mode.unwrap_or_default(),
        };
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

        let principal_secret = env.principal_secret.clone().or(file.principal_secret);
        if principal_secret.as_deref() == Some("") {
            return Err(ConfigError::new("principal_secret", "must not be empty"));
        }
        if principal_secret.is_none() && mode == Mode::Production {
            return Err(ConfigError::new(
                "principal_secret",
                format!(
                    "required in production mode, whatever the store: set `principal_secret` \
                     or {SECRET_ENV}"
                ),
            ));
        }
        let admin_token = env.admin_token.clone().or(file.admin_token);
        if admin_token.as_deref() == Some("") {
            return Err(ConfigError::new("admin_token", "must not be empty"));
        }
        if let Some(addr) = admin_listen {
            if !addr.ip().is_loopback() && admin_token.is_none() {
                return Err(ConfigError::new(
                    "admin_listen",
                    format!(
                        "{addr} is not a loopback address: an admin API reachable from other \
                         machines needs `admin_token` (or {ADMIN_TOKEN_ENV})"
                    ),
                ));
            }
        }
        let encryption = encryption(file.encryption.as_ref(), env)?;
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
        let store_timeout = positive(
            "store_timeout",
            file.store_timeout,
            idem_tower::DEFAULT_STORE_TIMEOUT,
        )?;
        let shutdown_grace = file.shutdown_grace.map_or(DEFAULT_SHUTDOWN_GRACE, |d| d.0);
        let purge_interval = positive(
            "purge_interval",
            file.purge_interval,
            DEFAULT_PURGE_INTERVAL,
        )?;
        let header_read_timeout = positive(
            "header_read_timeout",
            file.header_read_timeout,
            DEFAULT_HEADER_READ_TIMEOUT,
        )?;
        let body_read_timeout = positive(
            "body_read_timeout",
            file.body_read_timeout,
            DEFAULT_BODY_READ_TIMEOUT,
        )?;
        let late_retry_window = file
            .late_retry_window
            .map_or(DEFAULT_LATE_RETRY_WINDOW, |d| d.0);
        let max_headers = file.max_headers.unwrap_or(DEFAULT_MAX_HEADERS);
        if !(1..=10_000).contains(&max_headers) {
            return Err(ConfigError::new(
                "max_headers",
                "must be between 1 and 10000",
            ));
        }
        let max_header_bytes = file
            .max_header_bytes
            .map_or(DEFAULT_MAX_HEADER_BYTES, |s| s.0);
        if !(8192..=16 * 1024 * 1024).contains(&max_header_bytes) {
            return Err(ConfigError::new(
                "max_header_bytes",
                "must be between 8KiB and 16MiB",
            ));
        }
        let max_header_bytes = usize::try_from(max_header_bytes)
            .map_err(|_| ConfigError::new("max_header_bytes", "too large for this machine"))?;
        let max_connections = file.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            return Err(ConfigError::new("max_connections", "must be at least 1"));
        }

        if file.defaults.path.is_some() {
            return Err(ConfigError::new(
                "defaults.path",
                "not allowed in [defaults]: a path belongs to a [[routes]] table",
            ));
        }
        let mut routes = Routes::new();
        if file.routes.is_empty() {
            let policy = policy("defaults", &RouteFields::default(), &file.defaults, mode)?;
            add_route(&mut routes, "defaults", "/*", policy)?;
        }
        for (i, route) in file.routes.iter().enumerate() {
            let name = format!("routes[{i}]");
            let path = route
                .path
                .as_deref()
                .ok_or_else(|| ConfigError::new(format!("{name}.path"), "missing"))?;
            let policy = policy(&name, route, &file.defaults, mode)?;
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
            store_timeout,
            shutdown_grace,
            purge_interval,
            key_header,
            forward_key: file.forward_key.unwrap_or(true),
            routes,
            mode,
            admin_token,
            encryption,
            late_retry_window,
            header_read_timeout,
            body_read_timeout,
            max_headers,
            max_header_bytes,
            max_connections,
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
fn policy(
    name: &str,
    route: &RouteFields,
    defaults: &RouteFields,
    mode: Mode,
) -> Result<Policy, ConfigError> {
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
    let anonymous = match route.anonymous.or(defaults.anonymous) {
        Some(AnonymousField::Shared) => Anonymous::Shared,
        Some(AnonymousField::Reject) => Anonymous::Reject,
        None if mode == Mode::Production => Anonymous::Reject,
        None => Anonymous::Shared,
    };
    policy = policy.with_anonymous(anonymous);
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
    fn the_store_timeout_defaults_to_five_seconds_and_must_be_positive() {
        let config = Config::from_toml(UP).unwrap();
        assert_eq!(config.store_timeout, Duration::from_secs(5));
        let config = Config::from_toml(&format!("{UP}store_timeout = \"250ms\"\n")).unwrap();
        assert_eq!(config.store_timeout, Duration::from_millis(250));
        let e = err(&format!("{UP}store_timeout = \"0s\"\n"));
        assert_eq!(e.field, "store_timeout", "{e}");
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
        let e = Config::build(
            FileConfig::parse(text).unwrap(),
            Overrides::default(),
            &Env::default(),
        )
        .unwrap_err();
        assert_eq!(e.field, "principal_secret", "{e}");
        let ok = Config::build(
            FileConfig::parse(text).unwrap(),
            Overrides::default(),
            &Env {
                principal_secret: Some("s".into()),
                ..Env::default()
            },
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn production_mode_requires_a_secret_and_rejects_anonymous_requests_by_default() {
        let e = err(&format!("{UP}mode = \"production\"\n"));
        assert_eq!(e.field, "principal_secret", "{e}");
        let text = format!(
            "{UP}mode = \"production\"\nprincipal_secret = \"s\"\n[[routes]]\npath = \"/a\"\n[[routes]]\npath = \"/b\"\nanonymous = \"shared\"\n"
        );
        let config = Config::from_toml(&text).unwrap();
        let anonymous: Vec<_> = config
            .routes
            .iter()
            .map(|r| r.policy().anonymous())
            .collect();
        assert_eq!(anonymous, [Anonymous::Reject, Anonymous::Shared]);
        let dev = Config::from_toml(&format!("{UP}[[routes]]\npath = \"/a\"\n")).unwrap();
        assert_eq!(
            dev.routes.iter().next().unwrap().policy().anonymous(),
            Anonymous::Shared
        );
        // The environment's mode wins over the file's.
        let env = Env {
            mode: Some("production".into()),
            ..Env::default()
        };
        let e =
            Config::build(FileConfig::parse(UP).unwrap(), Overrides::default(), &env).unwrap_err();
        assert_eq!(e.field, "principal_secret", "{e}");
        let env = Env {
            mode: Some("prod".into()),
            ..Env::default()
        };
        let e =
            Config::build(FileConfig::parse(UP).unwrap(), Overrides::default(), &env).unwrap_err();
        assert_eq!(e.field, MODE_ENV, "{e}");
    }

    #[test]
    fn an_admin_api_beyond_loopback_needs_a_token() {
        let e = err(&format!("{UP}admin_listen = \"0.0.0.0:9090\"\n"));
        assert_eq!(e.field, "admin_listen", "{e}");
        let ok = Config::from_toml(&format!(
            "{UP}admin_listen = \"0.0.0.0:9090\"\nadmin_token = \"t\"\n"
        ))
        .unwrap();
        assert_eq!(ok.admin_token.as_deref(), Some("t"));
        let env = Env {
            admin_token: Some("from-env".into()),
            ..Env::default()
        };
        let file = FileConfig::parse(&format!("{UP}admin_listen = \"[::]:9090\"\n")).unwrap();
        let config = Config::build(file, Overrides::default(), &env).unwrap();
        assert_eq!(config.admin_token.as_deref(), Some("from-env"));
        assert!(Config::from_toml(&format!("{UP}admin_listen = \"127.0.0.1:0\"\n")).is_ok());
    }

    #[test]
    fn encryption_keys_come_from_the_file_or_the_environment() {
        let k1 = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
        let k2 = "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=";
        let config = Config::from_toml(&format!(
            "{UP}[encryption]\nkeys = {{ k1 = \"{k1}\", k2 = \"{k2}\" }}\nactive = \"k2\"\n"
        ))
        .unwrap();
        let encryption = config.encryption.unwrap();
        assert_eq!(encryption.keyring.active_id().as_str(), "k2");
        assert_eq!(encryption.keyring.len(), 2);
        assert!(!encryption.allow_plaintext);
        // One key needs no `active`; two do.
        assert!(
            Config::from_toml(&format!("{UP}[encryption]\nkeys = {{ k1 = \"{k1}\" }}\n")).is_ok()
        );
        let e = err(&format!(
            "{UP}[encryption]\nkeys = {{ k1 = \"{k1}\", k2 = \"{k2}\" }}\n"
        ));
        assert_eq!(e.field, "encryption.active", "{e}");
        let e = err(&format!(
            "{UP}[encryption]\nkeys = {{ k1 = \"c2hvcnQ=\" }}\n"
        ));
        assert_eq!(e.field, "encryption.keys.k1", "{e}");
        let e = err(&format!(
            "{UP}[encryption]\nkeys = {{ k1 = \"not base64!\" }}\n"
        ));
        assert_eq!(e.field, "encryption.keys.k1", "{e}");
        let e = err(&format!("{UP}[encryption]\nactive = \"k1\"\n"));
        assert_eq!(e.field, "encryption.keys", "{e}");
        // The environment's keys replace the file's.
        let env = Env {
            encryption_keys: Some(format!("old:{k1}, new:{k2}")),
            encryption_active: Some("new".into()),
            ..Env::default()
        };
        let config =
            Config::build(FileConfig::parse(UP).unwrap(), Overrides::default(), &env).unwrap();
        let ids: Vec<_> = config
            .encryption
            .unwrap()
            .keyring
            .ids()
            .map(|id| id.as_str().to_string())
            .collect();
        assert_eq!(ids, ["new", "old"]);
        let env = Env {
            encryption_keys: Some("no-colon".into()),
            ..Env::default()
        };
        let e =
            Config::build(FileConfig::parse(UP).unwrap(), Overrides::default(), &env).unwrap_err();
        assert_eq!(e.field, ENCRYPTION_KEYS_ENV, "{e}");
    }

    #[test]
    fn connection_limits_have_bounds() {
        let config = Config::from_toml(UP).unwrap();
        assert_eq!(config.max_headers, DEFAULT_MAX_HEADERS);
        assert_eq!(config.header_read_timeout, DEFAULT_HEADER_READ_TIMEOUT);
        assert_eq!(err(&format!("{UP}max_headers = 0\n")).field, "max_headers");
        assert_eq!(
            err(&format!("{UP}max_header_bytes = \"1KiB\"\n")).field,
            "max_header_bytes"
        );
        assert_eq!(
            err(&format!("{UP}max_connections = 0\n")).field,
            "max_connections"
        );
        assert_eq!(
            err(&format!("{UP}header_read_timeout = \"0s\"\n")).field,
            "header_read_timeout"
        );
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
            &Env::default(),
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
