//! The store factory: a store URL from the configuration or the command line, turned into
//! the `Arc<dyn Store>` the gateway, the admin API and `idem keys` run on.
//!
//! | URL | store | shared between gateways |
//! |---|---|---|
//! | `memory://` | [`MemoryStore`]: nothing survives the process | no |
//! | `sqlite://PATH` (`sqlite://./idem.db`, `sqlite:///var/lib/idem/idem.db`) | the embedded [`SqliteStore`] | no (one node) |
//! | `postgres://...`, `postgresql://...` | [`PostgresStore`] | yes |
//! | `redis://HOST:PORT[/DB]` | [`RedisStore`], standalone server | yes |
//! | `redis+cluster://HOST:PORT,HOST:PORT,...` | [`RedisStore`], Redis Cluster | yes |
//!
//! A new backend is one variant of [`StoreUrl`], one arm in [`StoreUrl::parse`] and one in
//! [`StoreUrl::open`].

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use idem_core::{Error, MemoryStore, Store};
use idem_postgres::{PostgresOptions, PostgresStore};
use idem_redis::{RedisOptions, RedisStore};
use idem_sqlite::{SqliteOptions, SqliteStore};

/// A parsed store URL.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `memory://`.
    Memory,
    /// `sqlite://PATH`: the embedded store in the file at `PATH`.
    Sqlite(PathBuf),
    /// `postgres://...` or `postgresql://...`, passed to the driver as written.
    Postgres(String),
    /// `redis://...` or `redis+cluster://...`, passed to the driver as written.
    Redis(String),
}

/// Who else sees a store's records: decides where the principal secret may come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sharing {
    /// Only this process (a memory store): a random secret per process is enough.
    Process,
    /// Whoever opens this file (the embedded store): a secret kept next to it.
    File(PathBuf),
    /// Every replica connected to a server: the secret must come from the configuration.
    Shared,
}

/// Why a store URL is not usable.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct StoreUrlError(String);

impl StoreUrl {
    /// Parses a store URL (see the [module docs](self)).
    pub fn parse(url: &str) -> Result<Self, StoreUrlError> {
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            StoreUrlError(format!(
                "invalid store URL {url:?}: expected memory://, sqlite://PATH, postgres://... \
                 or redis://..."
            ))
        })?;
        match scheme.to_ascii_lowercase().as_str() {
            "memory" if rest.is_empty() => Ok(StoreUrl::Memory),
            "memory" => Err(StoreUrlError(format!(
                "invalid store URL {url:?}: memory:// takes nothing after the scheme"
            ))),
            "sqlite" if rest.is_empty() => Err(StoreUrlError(format!(
                "invalid store URL {url:?}: sqlite:// needs a file path (sqlite://./idem.db)"
            ))),
            "sqlite" => Ok(StoreUrl::Sqlite(PathBuf::from(rest))),
            "postgres" | "postgresql" => {
                // The driver reads the scheme in lower case only.
                let url = format!("{}://{rest}", scheme.to_ascii_lowercase());
                // The store's own parameters (schema, table, pool_size) and the TLS ones
                // are checked now.
                PostgresOptions::default()
                    .with_url_parameters(&url)
                    .map_err(|e| match e {
                        Error::InvalidRequest { reason } => StoreUrlError(reason),
                        other => StoreUrlError(other.to_string()),
                    })?;
                Ok(StoreUrl::Postgres(url))
            }
            "redis" | "redis+cluster" => Ok(StoreUrl::Redis(url.to_string())),
            "rediss" | "rediss+cluster" => Err(StoreUrlError(format!(
                "{scheme}:// (Redis over TLS) is not supported: the gateway talks to Redis in \
                 plain text (redis://...)"
            ))),
            other => Err(StoreUrlError(format!(
                "unknown store scheme {other:?} in {url:?}: expected memory://, sqlite://PATH, \
                 postgres://..., redis://... or redis+cluster://..."
            ))),
        }
    }

    /// The URL's scheme, for messages (never the credentials a URL may carry).
    pub fn scheme(&self) -> &'static str {
        match self {
            StoreUrl::Memory => "memory://",
            StoreUrl::Sqlite(_) => "sqlite://",
            StoreUrl::Postgres(_) => "postgres://",
            StoreUrl::Redis(url) if url.starts_with("redis+cluster") => "redis+cluster://",
            StoreUrl::Redis(_) => "redis://",
        }
    }

    /// Who shares this store's records.
    pub fn sharing(&self) -> Sharing {
        match self {
            StoreUrl::Memory => Sharing::Process,
            StoreUrl::Sqlite(path) => Sharing::File(path.clone()),
            StoreUrl::Postgres(_) | StoreUrl::Redis(_) => Sharing::Shared,
        }
    }

    /// Opens the store. The embedded store's file and its directory are created if missing;
    /// PostgreSQL's pending migrations are applied.
    pub async fn open(&self) -> Result<Arc<dyn Store>, Error> {
        Ok(match self {
            StoreUrl::Memory => Arc::new(MemoryStore::new()),
            StoreUrl::Sqlite(path) => {
                let path = path.clone();
                // Opening does blocking file I/O.
                let store = tokio::task::spawn_blocking(move || {
                    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir).map_err(|e| {
                            Error::unavailable(format!("cannot create {}", dir.display()), e)
                        })?;
                    }
                    SqliteStore::open(&path, SqliteOptions::default())
                })
                .await
                .map_err(|e| Error::backend("opening the embedded store panicked", e))??;
                Arc::new(store)
            }
            StoreUrl::Postgres(url) => {
                let (url, options) = PostgresOptions::default().with_url_parameters(url)?;
                Arc::new(PostgresStore::connect(&url, options).await?)
            }
            StoreUrl::Redis(url) => {
                Arc::new(RedisStore::connect(url, RedisOptions::default()).await?)
            }
        })
    }

    /// Applies pending schema migrations; returns a line saying what was done.
    pub async fn migrate(&self) -> Result<String, Error> {
        match self {
            StoreUrl::Memory => Ok("memory://: nothing to migrate".into()),
            StoreUrl::Sqlite(path) => {
                // Opening the embedded store migrates its file forward.
                drop(self.open().await?);
                Ok(format!("{}: schema is current", path.display()))
            }
            StoreUrl::Postgres(url) => {
                let (url, options) = PostgresOptions::default().with_url_parameters(url)?;
                let applied = idem_postgres::migrate(&url, &options).await?;
                Ok(if applied.is_empty() {
                    "postgres: schema is current".to_string()
                } else {
                    format!("postgres: applied migrations {applied:?}")
                })
            }
            StoreUrl::Redis(_) => {
                // Redis keeps no schema; connecting checks the server version.
                drop(self.open().await?);
                Ok(format!("{}: nothing to migrate", self.scheme()))
            }
        }
    }
}

/// Records deleted per purge call.
const PURGE_BATCH: usize = 1000;

/// Deletes expired records every `interval`, in bounded batches, for as long as it runs
/// (spawn it, abort it). Stores that expire records by themselves (the embedded store's
/// reaper, Redis TTLs) find nothing to do; the memory and PostgreSQL stores need it, or
/// expired records would pile up.
pub async fn purge_expired_every(store: Arc<dyn Store>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let mut total = 0;
        loop {
            match store.purge_expired(PURGE_BATCH).await {
                Ok(n) => {
                    total += n;
                    if n < PURGE_BATCH {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "purging expired records failed");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::debug!(purged = total, "expired records purged");
        }
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A PostgreSQL or Redis URL may carry a password: show the scheme only.
        match self {
            StoreUrl::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            other => f.write_str(other.scheme()),
        }
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parses_every_scheme() {
        assert_eq!(StoreUrl::parse("memory://").unwrap(), StoreUrl::Memory);
        assert_eq!(
            StoreUrl::parse("sqlite://./idem.db").unwrap(),
            StoreUrl::Sqlite("./idem.db".into())
        );
        assert_eq!(
            StoreUrl::parse("sqlite:///var/lib/idem.db").unwrap(),
            StoreUrl::Sqlite("/var/lib/idem.db".into())
        );
        assert!(matches!(
            StoreUrl::parse("postgres://u:p@h/db").unwrap(),
            StoreUrl::Postgres(_)
        ));
        assert!(matches!(
            StoreUrl::parse("postgres://u:p@h/db?pool_size=64&table=keys").unwrap(),
            StoreUrl::Postgres(_)
        ));
        let e = StoreUrl::parse("postgres://u:p@h/db?pool_size=0").unwrap_err();
        assert!(e.to_string().contains("pool_size"), "{e}");
        assert_eq!(
            StoreUrl::parse("PostgreSQL://u:p@h/db").unwrap(),
            StoreUrl::Postgres("postgresql://u:p@h/db".into())
        );
        let e = StoreUrl::parse("postgres://u:p@h/db?sslmode=verify-ca").unwrap_err();
        assert!(e.to_string().contains("needs sslrootcert"), "{e}");
        let e = StoreUrl::parse("postgres://u:p@h/db?table=Bad-Name").unwrap_err();
        assert!(e.to_string().contains("table"), "{e}");
        assert!(matches!(
            StoreUrl::parse("redis+cluster://10.0.0.1:6379,10.0.0.2:6379").unwrap(),
            StoreUrl::Redis(_)
        ));
        assert_eq!(
            StoreUrl::parse("redis://h:6379/0").unwrap().sharing(),
            Sharing::Shared
        );
        for bad in [
            "",
            "idem.db",
            "sqlite://",
            "memory://x",
            "ftp://x",
            "rediss://h",
        ] {
            assert!(StoreUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expired_records_are_purged_periodically() {
        use idem_core::{ClaimRequest, Clock, Fingerprint, ManualClock, RecordId, Timestamp};

        let clock = ManualClock::new(Timestamp::from_millis(1_000_000));
        let memory = Arc::new(MemoryStore::with_clock(Arc::new(clock.clone())));
        let store: Arc<dyn Store> = memory.clone();
        let request = ClaimRequest::new(RecordId::for_event("n", "e"), Fingerprint::of_bytes(b""))
            .with_lease(Duration::from_secs(1))
            .with_retention(Duration::from_secs(1));
        store.claim(&request).await.unwrap();
        let purger = tokio::spawn(purge_expired_every(store, Duration::from_secs(60)));
        clock.advance(Duration::from_secs(3));
        assert!(clock.now() > Timestamp::from_millis(1_002_000));
        assert_eq!(memory.len(), 1);
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(memory.len(), 0);
        purger.abort();
    }

    #[test]
    fn display_hides_credentials() {
        let url = StoreUrl::parse("postgres://user:hunter2@h/db").unwrap();
        assert!(!url.to_string().contains("hunter2"));
        assert_eq!(url.sharing(), Sharing::Shared);
    }
}
