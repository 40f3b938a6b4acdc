//! The conformance suite against a real standalone Redis server.
//!
//! The server comes from `IDEM_TEST_REDIS_URL` (`scripts/test` starts one with
//! `scripts/redis-servers`). Each check gets its own key prefix, so checks run in parallel
//! without seeing each other's records; time moves for real (the server's clock).

mod common;

async fn harness() -> common::RedisHarness {
    common::RedisHarness::new(common::STANDALONE).await
}

idem_core::conformance_tests!(harness);
