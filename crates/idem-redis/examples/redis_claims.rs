//! Claims per second of the Redis store, standalone or cluster: N tasks claiming fresh ids
//! for a fixed time (the driver is `bench/stores/load.rs`; `bench/stores/run.sh` runs it
//! against redis-benchmark).
//!
//! ```sh
//! cargo run --release -p idem-redis --example redis_claims -- \
//!     redis://127.0.0.1:16379 --concurrency 16 --seconds 10
//! ```

use std::sync::Arc;

use idem_redis::{RedisOptions, RedisStore};

#[path = "../../../bench/stores/load.rs"]
mod load;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = load::args()?;
    if args.pool_size.is_some() {
        eprintln!("--pool-size ignored: the Redis store multiplexes one connection per node");
    }
    let options = RedisOptions {
        key_prefix: "idem-bench".into(),
        ..RedisOptions::default()
    };
    let store = RedisStore::connect(&args.url, options).await?;
    load::run(Arc::new(store), &args).await?;
    Ok(())
}
