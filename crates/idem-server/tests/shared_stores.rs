//! The gateway on the shared stores, end to end: PostgreSQL (with `idem migrate`) and
//! Redis, each with two gateway replicas over one store.
//!
//! The servers come from `IDEM_TEST_POSTGRES_URL` and `IDEM_TEST_REDIS_URL` (`scripts/test`
//! starts both). Without one, its test is skipped with a message, except under `CI=true`,
//! where a missing server is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Gateway, Upstream, config_for, idem, post};

fn server_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{var} is not set under CI=true: this end-to-end test must run in CI")
        }
        _ => {
            eprintln!("skipping: {var} is not set (point it at a server to run this test)");
            None
        }
    }
}

/// A key no earlier run used.
fn fresh_key(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// Two gateway replicas over the store at `url`: a request through one, its retry
/// through the other.
async fn two_replicas_execute_once(url: &str) {
    let up = Upstream::start().await;
    let config = config_for(
        &up,
        &format!("store = \"{url}\"\nprincipal_secret = \"shared by every replica\"\n"),
    );
    let secret = config.principal_secret.clone().unwrap();
    let store = config.store.open().await.unwrap();
    let a = Gateway::start_with_secret(config.clone(), store.clone(), secret.as_bytes()).await;
    let b = Gateway::start_with_secret(config, store, secret.as_bytes()).await;
    let key = fresh_key("shared");
    let first = post(a.url("/v1/charges"))
        .key(&key)
        .header("authorization", "Bearer alice")
        .json(r#"{"amount": 100}"#)
        .send()
        .await;
    assert_eq!(first.status, 201);
    let retry = post(b.url("/v1/charges"))
        .key(&key)
        .header("authorization", "Bearer alice")
        .json(r#"{"amount": 100}"#)
        .send()
        .await;
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn the_gateway_deduplicates_on_a_postgres_store() {
    let Some(url) = server_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = idem(dir.path(), &["migrate", "--store", &url]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    two_replicas_execute_once(&url).await;
}

#[tokio::test]
async fn the_gateway_deduplicates_on_a_redis_store() {
    let Some(url) = server_url("IDEM_TEST_REDIS_URL") else {
        return;
    };
    two_replicas_execute_once(&url).await;
}

/// The TLS server's URL through `localhost` (the name its certificate carries), with
/// `query`.
#[cfg(feature = "postgres-tls")]
fn tls_url(query: &str) -> Option<String> {
    let url = server_url("IDEM_TEST_POSTGRES_TLS_URL")?;
    let dir = server_url("IDEM_TEST_POSTGRES_TLS_DIR")?;
    Some(format!(
        "{}?{}",
        url.replace("@127.0.0.1:", "@localhost:"),
        query.replace("DIR", &dir)
    ))
}

#[cfg(feature = "postgres-tls")]
#[tokio::test]
async fn the_gateway_deduplicates_on_a_postgres_store_over_verified_tls() {
    let Some(url) = tls_url("sslmode=verify-full&sslrootcert=DIR/ca.crt") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = idem(dir.path(), &["migrate", "--store", &url]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    two_replicas_execute_once(&url).await;
}

#[cfg(feature = "postgres-tls")]
#[test]
fn idem_migrate_refuses_a_tls_url_it_cannot_trust_in_one_line() {
    let cases = [
        ("sslmode=verify-ca", "sslrootcert"),
        (
            "sslmode=verify-full&sslrootcert=DIR/missing.crt",
            "missing.crt",
        ),
        (
            "sslmode=verify-full&sslrootcert=DIR/other-ca.crt",
            "certificate",
        ),
    ];
    for (query, expected) in cases {
        let Some(url) = tls_url(query) else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let (code, stdout, stderr) = idem(dir.path(), &["migrate", "--store", &url]);
        assert_ne!(code, 0, "{query}: {stdout}{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{query}: {stderr}");
        assert!(stderr.contains(expected), "{query}: {stderr}");
    }
}
