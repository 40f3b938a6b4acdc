//! The harness shared by the standalone and cluster test files.

#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use idem_core::Store;
use idem_core::conformance::Harness;
use idem_redis::{RedisOptions, RedisStore};

/// The standalone server's URL variable.
pub const STANDALONE: &str = "IDEM_TEST_REDIS_URL";
/// The cluster's URL variable.
pub const CLUSTER: &str = "IDEM_TEST_REDIS_CLUSTER_URL";

pub fn url(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: run scripts/test, which starts Redis with scripts/redis-servers, \
             or start them yourself: eval \"$(scripts/redis-servers start <dir>)\""
        )
    })
}

/// A key prefix no other check (or earlier run against the same server) uses, so checks run
/// in parallel without seeing each other's records.
pub fn unique_prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!(
        "idem-test:{}:{run}:{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub async fn connect(var: &str) -> RedisStore {
    connect_with_prefix(var, unique_prefix()).await
}

pub async fn connect_with_prefix(var: &str, key_prefix: String) -> RedisStore {
    let options = RedisOptions {
        key_prefix,
        ..RedisOptions::default()
    };
    RedisStore::connect(&url(var), options)
        .await
        .unwrap_or_else(|e| panic!("connect to the Redis in {var}: {e}"))
}

pub struct RedisHarness {
    store: Arc<dyn Store>,
    var: &'static str,
    prefix: String,
}

impl RedisHarness {
    pub async fn new(var: &'static str) -> Self {
        let prefix = unique_prefix();
        Self {
            store: Arc::new(connect_with_prefix(var, prefix.clone()).await),
            var,
            prefix,
        }
    }
}

#[async_trait]
impl Harness for RedisHarness {
    fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// The server's clock moves for real.
    async fn advance(&self, by: Duration) {
        tokio::time::sleep(by).await;
    }

    fn expires_by_itself(&self) -> bool {
        true
    }

    async fn replica(&self) -> Option<Arc<dyn Store>> {
        Some(Arc::new(
            connect_with_prefix(self.var, self.prefix.clone()).await,
        ))
    }
}
