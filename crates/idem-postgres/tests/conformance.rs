//! The conformance suite against a real PostgreSQL server.
//!
//! The server comes from `IDEM_TEST_POSTGRES_URL` (`scripts/test` starts one and sets it).
//! Each check gets its own table, so checks run in parallel without seeing each other's
//! records; time moves for real (the server's clock).

mod common;

use common::url;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use idem_core::Store;
use idem_core::conformance::Harness;
use idem_postgres::{PostgresOptions, PostgresStore};

struct PgHarness {
    store: Arc<dyn Store>,
    options: PostgresOptions,
}

#[async_trait]
impl Harness for PgHarness {
    fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    async fn advance(&self, by: Duration) {
        tokio::time::sleep(by).await;
    }

    async fn replica(&self) -> Option<Arc<dyn Store>> {
        let store = PostgresStore::connect(&url(), self.options.clone())
            .await
            .expect("connect a second store to PostgreSQL");
        Some(Arc::new(store))
    }
}

async fn harness() -> PgHarness {
    static N: AtomicU32 = AtomicU32::new(0);
    let options = PostgresOptions {
        schema: "idem_conformance".into(),
        table: format!(
            "t{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ),
        pool_size: 8,
        migrate: true,
    };
    let store = PostgresStore::connect(&url(), options.clone())
        .await
        .expect("connect to PostgreSQL");
    PgHarness {
        store: Arc::new(store),
        options,
    }
}

idem_core::conformance_tests!(harness);
