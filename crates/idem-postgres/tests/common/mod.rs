//! What the PostgreSQL store's test files share.

/// The test server, from `IDEM_TEST_POSTGRES_URL` (`scripts/test` starts one and sets it).
#[allow(dead_code)]
pub(crate) fn url() -> String {
    std::env::var("IDEM_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "IDEM_TEST_POSTGRES_URL is not set: run scripts/test, which starts PostgreSQL, \
             or point it at a server (postgres://user@127.0.0.1:port/db)"
        )
    })
}

/// A name no other test run uses: the process id and the time.
#[allow(dead_code)]
pub(crate) fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_nanos()
    )
}
