//! Claims per second of the PostgreSQL store: N tasks claiming fresh ids for a fixed time
//! (the driver is `bench/stores/load.rs`; `bench/stores/run.sh` runs it against pgbench).
//!
//! ```sh
//! cargo run --release -p idem-postgres --example postgres_claims -- \
//!     postgres://postgres@127.0.0.1:45432/postgres --concurrency 16 --seconds 10
//! ```

use std::sync::Arc;

use idem_postgres::{PostgresOptions, PostgresStore};

#[path = "../../../bench/stores/load.rs"]
mod load;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = load::args()?;
    let mut options = PostgresOptions::default();
    if let Some(pool_size) = args.pool_size {
        options.pool_size = pool_size;
    }
    let store = PostgresStore::connect(&args.url, options).await?;
    load::run(Arc::new(store), &args).await?;
    Ok(())
}
