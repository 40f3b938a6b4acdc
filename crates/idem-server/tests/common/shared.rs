//! Shared stores in tests: the servers `scripts/test` starts and exports, names no other
//! test uses, and `idem` processes configured for them.
//!
//! A test that needs a server it cannot find prints why and returns, except under
//! `CI=true`, where a missing server fails the run: such a test never skips in CI.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Binary, Upstream, req};

/// The PostgreSQL server's URL variable.
pub const POSTGRES: &str = "IDEM_TEST_POSTGRES_URL";
/// The standalone Redis server's URL variable.
pub const REDIS: &str = "IDEM_TEST_REDIS_URL";
/// The Redis Cluster's URL variable (`redis+cluster://host:port,...`).
pub const REDIS_CLUSTER: &str = "IDEM_TEST_REDIS_CLUSTER_URL";

/// The principal secret every replica in these tests shares.
pub const SECRET: &str = "one principal secret shared by every replica";

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// `Some(())` when `what` is there; otherwise fails under `CI=true`, or prints `why` and
/// returns `None` so the test can return.
pub fn require(present: bool, what: &str, why: &str) -> Option<()> {
    if present {
        return Some(());
    }
    if in_ci() {
        panic!("{what} is missing under CI=true: {why}; a test that needs it never skips in CI");
    }
    eprintln!("skipping: {what} is missing: {why}");
    None
}

/// The URL in `var` (set by `scripts/test`), or `None` when it is not set (see [`require`]).
pub fn server_url(var: &str) -> Option<String> {
    let url = std::env::var(var).ok().filter(|u| !u.is_empty());
    require(
        url.is_some(),
        var,
        "run scripts/test, which starts PostgreSQL and Redis and exports the URLs, or point it \
         at a server",
    )?;
    url
}

/// A name no other test, process or earlier run against the same server uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Writes `idem.toml` into `dir`: the upstream, the store, the shared secret, the
/// `[defaults]` table with a key required and `defaults` appended.
pub fn write_config(dir: &Path, upstream: &Upstream, store: &str, defaults: &str) {
    let text = format!(
        "upstream = \"{}\"\nstore = \"{store}\"\nprincipal_secret = \"{SECRET}\"\n\n\
         [defaults]\nkey = \"required\"\n{defaults}\n",
        upstream.url()
    );
    std::fs::write(dir.join("idem.toml"), text).unwrap();
}

/// `idem serve --config idem.toml` in `dir` on loopback ports, with an admin listener: one
/// replica, with its own store connections.
pub fn replica(dir: &Path) -> Binary {
    Binary::serve(
        dir,
        &[
            "--config",
            "idem.toml",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
    )
}

/// The value of a counter of a replica's `/metrics`, summed over the lines that contain
/// every one of `labels` (0 when there is none).
pub async fn metric(replica: &Binary, name: &str, labels: &[&str]) -> u64 {
    let admin = replica.admin.expect("the replica has an admin listener");
    let text = req("GET", format!("http://{admin}/metrics")).send().await;
    let text = String::from_utf8_lossy(&text.body).into_owned();
    text.lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}
