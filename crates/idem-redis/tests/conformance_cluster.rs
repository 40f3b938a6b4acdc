//! The conformance suite against a real Redis Cluster (three masters).
//!
//! The cluster comes from `IDEM_TEST_REDIS_CLUSTER_URL`
//! (`redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3`; `scripts/test` starts one with
//! `scripts/redis-servers`). Each check gets its own key prefix; time moves for real.

mod common;

async fn harness() -> common::RedisHarness {
    common::RedisHarness::new(common::CLUSTER).await
}

idem_core::conformance_tests!(harness);
