//! Security end to end: tenant isolation on every store (the absent principal header
//! included), encryption at rest with tampering and key rotation, the admin API's token,
//! production mode, and late retries.
//!
//! PostgreSQL and Redis come from `IDEM_TEST_POSTGRES_URL` and `IDEM_TEST_REDIS_URL`;
//! without one its test is skipped with a message, except under `CI=true`, where a missing
//! server is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Gateway, Upstream, config_for, post, req};
use idem_core::{ClaimOutcome, ClaimRequest, ListFilter, MemoryStore, RecordState, Store};
use idem_encrypt::{EncryptingStore, Keyring};
use idem_server::admin::{self, AdminState};
use idem_server::store::StoreUrl;
use tokio::net::TcpListener;

fn memory() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

/// A key no earlier run used (shared stores keep records across runs).
fn fresh(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

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

const ISOLATION_ROUTES: &str = r#"
principal_secret = "isolation tests"

[[routes]]
path = "/v1/charges"
key = "required"

[[routes]]
path = "/v1/strict"
key = "required"
anonymous = "reject"
"#;

/// The same key from two principals never replays across them; requests without the
/// principal header share one anonymous scope on a `shared` route and are refused on a
/// `reject` route.
async fn tenants_are_isolated(store_line: &str, store: Arc<dyn Store>) {
    let up = Upstream::start().await;
    let config = config_for(&up, &format!("{store_line}\n{ISOLATION_ROUTES}"));
    let gw = Gateway::start_with_secret(config, store, b"isolation tests").await;
    let key = fresh("tenant");
    let charge = |principal: Option<&'static str>, path: &'static str| {
        let mut request = post(gw.url(path)).key(&key).json(r#"{"amount":100}"#);
        if let Some(principal) = principal {
            request = request.header("authorization", principal);
        }
        request.send()
    };

    let alice = charge(Some("Bearer alice"), "/v1/charges").await;
    let bob = charge(Some("Bearer bob"), "/v1/charges").await;
    assert_eq!((alice.status.as_u16(), bob.status.as_u16()), (201, 201));
    assert_eq!(alice.replayed(), Some("false"));
    assert_eq!(
        bob.replayed(),
        Some("false"),
        "bob never gets alice's answer"
    );
    assert_eq!(up.calls(), 2);
    // Each retry replays its own principal's answer.
    let alice_again = charge(Some("Bearer alice"), "/v1/charges").await;
    let bob_again = charge(Some("Bearer bob"), "/v1/charges").await;
    assert_eq!(alice_again.replayed(), Some("true"));
    assert_eq!(alice_again.json()["authorization"], "Bearer alice");
    assert_eq!(bob_again.json()["authorization"], "Bearer bob");
    assert_eq!(up.calls(), 2);

    // No principal header: its own scope, shared by every anonymous request on a
    // `shared` route, never alice's or bob's.
    let anonymous = charge(None, "/v1/charges").await;
    assert_eq!(anonymous.replayed(), Some("false"));
    assert_eq!(anonymous.json()["authorization"], serde_json::Value::Null);
    assert_eq!(up.calls(), 3);
    let anonymous_again = charge(None, "/v1/charges").await;
    assert_eq!(anonymous_again.replayed(), Some("true"));
    assert_eq!(up.calls(), 3);

    // On a `reject` route a keyed request without a principal is refused, not executed.
    let refused = charge(None, "/v1/strict").await;
    assert_eq!(refused.status, 400);
    assert_eq!(refused.problem(), "principal-missing");
    assert_eq!(up.calls(), 3);
    let strict = charge(Some("Bearer alice"), "/v1/strict").await;
    assert_eq!(strict.status, 201);
    assert_eq!(up.calls(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_isolation_on_the_memory_store() {
    tenants_are_isolated("store = \"memory://\"", memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_isolation_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("idem.db").display());
    let store = StoreUrl::parse(&url).unwrap().open().await.unwrap();
    tenants_are_isolated(&format!("store = \"{url}\""), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_isolation_on_postgres() {
    let Some(url) = server_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    let store = StoreUrl::parse(&url).unwrap().open().await.unwrap();
    tenants_are_isolated(&format!("store = \"{url}\""), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_isolation_on_redis() {
    let Some(url) = server_url("IDEM_TEST_REDIS_URL") else {
        return;
    };
    let store = StoreUrl::parse(&url).unwrap().open().await.unwrap();
    tenants_are_isolated(&format!("store = \"{url}\""), store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_isolation_through_the_encrypting_store() {
    let store: Arc<dyn Store> = Arc::new(EncryptingStore::new(
        memory(),
        Keyring::new("k1", [3; 32]).unwrap(),
    ));
    tenants_are_isolated("store = \"memory://\"", store).await;
}

fn completed_raw(record: &idem_core::Record) -> Bytes {
    match &record.state {
        RecordState::Completed { response, .. } => response.clone(),
        other => panic!("not completed: {other:?}"),
    }
}

/// The id of a completed record of the inner store.
async fn records_id(inner: &Arc<dyn Store>) -> String {
    let records = inner
        .inspector()
        .unwrap()
        .list(&ListFilter::default())
        .await
        .unwrap();
    records[0].id.to_hex()
}

const ENCRYPTED_ROUTES: &str = r#"
store = "memory://"

[[routes]]
path = "/v1/charges"
key = "required"

[[routes]]
path = "/v1/open"
key = "required"
fail = "open"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_sealed_at_rest_and_a_tampered_record_is_never_replayed_nor_executed() {
    let up = Upstream::start().await;
    let inner = memory();
    let store: Arc<dyn Store> = Arc::new(EncryptingStore::new(
        inner.clone(),
        Keyring::new("k1", [5; 32]).unwrap(),
    ));
    let gw = Gateway::start(config_for(&up, ENCRYPTED_ROUTES), store).await;

    for path in ["/v1/charges", "/v1/open"] {
        let calls = up.calls();
        let send = || {
            post(gw.url(path))
                .key("sealed-1")
                .header("authorization", "Bearer card-owner")
                .json(r#"{"card":"4242424242424242"}"#)
                .send()
        };
        let first = send().await;
        assert_eq!(first.status, 201);
        assert_eq!(up.calls(), calls + 1);
        assert_eq!(send().await.replayed(), Some("true"));

        // At rest: neither the body nor the headers in clear.
        let inspector = inner.inspector().unwrap();
        let records = inspector.list(&ListFilter::default()).await.unwrap();
        for record in &records {
            let raw = completed_raw(record);
            assert!(raw.starts_with(idem_encrypt::MAGIC));
            assert!(!raw.windows(7).any(|w| w == b"execute" || w == b"Bearer "));
        }

        // Tamper with every completed record through the inner store: one changed byte.
        for record in records {
            let mut raw = completed_raw(&record).to_vec();
            let last = raw.len() - 1;
            raw[last] = raw[last].wrapping_add(1);
            inspector.remove(&record.id).await.unwrap();
            let claim = ClaimRequest::new(record.id, record.fingerprint);
            let ClaimOutcome::Acquired(lease) = inner.claim(&claim).await.unwrap() else {
                panic!("re-planting the record")
            };
            inner
                .complete(&record.id, lease.token, Bytes::from(raw))
                .await
                .unwrap();
        }
        let retry = send().await;
        assert_eq!(
            retry.status,
            500,
            "{}",
            String::from_utf8_lossy(&retry.body)
        );
        assert_eq!(retry.problem(), "stored-response-unreadable");
        assert!(!String::from_utf8_lossy(&retry.body).contains("4242"));
        assert_eq!(
            up.calls(),
            calls + 1,
            "{path}: never executed again, even failing open"
        );
        assert_eq!(send().await.status, 500);
        // The admin API reports such a record as corrupt, without its bytes.
        let listed = req(
            "GET",
            gw.admin_url(&format!(
                "/admin/records/{}?body=true",
                records_id(&inner).await
            )),
        )
        .send()
        .await;
        assert_eq!(listed.status, 500);
        assert_eq!(listed.problem(), "admin/corrupt-record");
    }
    let metrics = req("GET", gw.admin_url("/metrics")).send().await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains(
            r#"idem_requests_total{route="/v1/open",outcome="stored_response_unreadable"} 2"#
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_old_records_replay_and_new_ones_are_sealed_with_the_active_key() {
    let up = Upstream::start().await;
    let inner = memory();
    let k1 = Keyring::new("k1", [1; 32]).unwrap();
    let config = config_for(&up, ENCRYPTED_ROUTES);
    let before = Gateway::start(
        config.clone(),
        Arc::new(EncryptingStore::new(inner.clone(), k1.clone())),
    )
    .await;
    let send = |gw: &Gateway, key: &str| post(gw.url("/v1/charges")).key(key).json("{}").send();
    let old = send(&before, "before-rotation").await;
    before.stop().await;

    let rotated = k1
        .with_key("k2", [2; 32])
        .unwrap()
        .with_active("k2")
        .unwrap();
    let after = Gateway::start(
        config,
        Arc::new(EncryptingStore::new(inner.clone(), rotated)),
    )
    .await;
    let replay = send(&after, "before-rotation").await;
    assert_eq!(replay.replayed(), Some("true"));
    assert_eq!(replay.body, old.body);
    send(&after, "after-rotation").await;
    assert_eq!(up.calls(), 2);

    let records = inner
        .inspector()
        .unwrap()
        .list(&ListFilter::default())
        .await
        .unwrap();
    let mut key_ids: Vec<Vec<u8>> = records
        .iter()
        .map(|r| completed_raw(r)[6..8].to_vec())
        .collect();
    key_ids.sort();
    assert_eq!(key_ids, [b"k1".to_vec(), b"k2".to_vec()]);
}

async fn admin_with_token(gw: &Gateway, token: &str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = AdminState::new(&gw.app).with_token(Some(token));
    tokio::spawn(admin::run(listener, state, std::future::pending()));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_requires_its_bearer_token_except_on_healthz() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, "store = \"memory://\"\n"), memory()).await;
    let admin = admin_with_token(&gw, "s3cr3t-admin-token").await;
    let url = |path: &str| format!("http://{admin}{path}");

    assert_eq!(req("GET", url("/healthz")).send().await.status, 200);
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/readyz"),
        ("GET", "/admin/in-flight"),
        ("GET", &format!("/admin/records/{}", "0".repeat(64))[..]),
        (
            "POST",
            &format!("/admin/records/{}/release", "0".repeat(64))[..],
        ),
        ("DELETE", &format!("/admin/records/{}", "0".repeat(64))[..]),
        ("GET", "/admin/records?route=/*&method=POST&key=k"),
        ("GET", "/no-such-endpoint"),
    ] {
        for authorization in [
            None,
            Some("Bearer wrong"),
            Some("Bearer s3cr3t-admin-token-and-more"),
            Some("Basic s3cr3t-admin-token"),
            Some("s3cr3t-admin-token"),
        ] {
            let mut request = req(method, url(path));
            if let Some(value) = authorization {
                request = request.header("authorization", value);
            }
            let answer = request.send().await;
            assert_eq!(answer.status, 401, "{method} {path} with {authorization:?}");
            assert_eq!(answer.problem(), "admin/unauthorized");
            assert!(
                answer
                    .header("www-authenticate")
                    .unwrap()
                    .starts_with("Bearer")
            );
        }
        let answer = req(method, url(path))
            .header("authorization", "Bearer s3cr3t-admin-token")
            .send()
            .await;
        assert_ne!(answer.status, 401, "{method} {path} with the token");
    }
    let metrics = req("GET", url("/metrics"))
        .header("authorization", "bearer s3cr3t-admin-token")
        .send()
        .await;
    assert_eq!(metrics.status, 200);
}

/// Runs `idem ARGS` with extra environment variables: (exit code, stderr).
fn idem_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_idem"));
    command
        .args(args)
        .current_dir(dir)
        .env_remove(idem_server::config::SECRET_ENV)
        .env_remove(idem_server::config::ADMIN_TOKEN_ENV)
        .env_remove(idem_server::config::MODE_ENV)
        .env_remove(idem_server::config::ENCRYPTION_KEYS_ENV)
        .env_remove(idem_server::config::ENCRYPTION_ACTIVE_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn production_mode_without_a_principal_secret_refuses_to_start_even_on_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("idem.toml");
    std::fs::write(
        &config,
        "mode = \"production\"\nupstream = \"http://127.0.0.1:9\"\nlisten = \"127.0.0.1:0\"\n\
         store = \"sqlite://./idem.db\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let (code, stderr) = idem_env(dir.path(), &["serve", "--config", config], &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("principal_secret"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        !dir.path().join("idem.db.secret").exists(),
        "no secret is generated"
    );
    assert!(!dir.path().join("idem.db").exists(), "nothing is opened");

    // The environment's mode counts too, and the environment's secret satisfies it.
    let plain = dir.path().join("plain.toml");
    std::fs::write(&plain, "upstream = \"http://127.0.0.1:9\"\n").unwrap();
    let plain = plain.to_str().unwrap();
    let (code, stderr) = idem_env(
        dir.path(),
        &["serve", "--config", plain, "--check-config"],
        &[("IDEM_MODE", "production")],
    );
    assert_eq!(code, 64, "{stderr}");
    let (code, stderr) = idem_env(
        dir.path(),
        &["serve", "--config", config, "--check-config"],
        &[("IDEM_PRINCIPAL_SECRET", "from the environment")],
    );
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn an_admin_api_beyond_loopback_needs_a_token_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "serve",
        "--upstream",
        "http://127.0.0.1:9",
        "--store",
        "memory://",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "0.0.0.0:0",
    ];
    let (code, stderr) = idem_env(dir.path(), &args, &[]);
    assert_eq!(code, 64, "{stderr}");
    assert!(
        stderr.contains("admin_listen") && stderr.contains("admin_token"),
        "{stderr}"
    );
    let mut checked = args.to_vec();
    checked.push("--check-config");
    let (code, stderr) = idem_env(dir.path(), &checked, &[("IDEM_ADMIN_TOKEN", "t0ken")]);
    assert_eq!(code, 0, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_retention_ended_is_counted_as_late() {
    let up = Upstream::start().await;
    let config = config_for(
        &up,
        "store = \"memory://\"\n[[routes]]\npath = \"/v1/charges\"\nkey = \"required\"\n\
         lease = \"200ms\"\nretention = \"300ms\"\n",
    );
    let gw = Gateway::start(config, memory()).await;
    let send = |key: &'static str| post(gw.url("/v1/charges")).key(key).json("{}").send();
    assert_eq!(send("late-1").await.replayed(), Some("false"));
    // Retried until the record has expired and the retry executes again.
    let mut executed_again = false;
    for _ in 0..200 {
        if send("late-1").await.replayed() == Some("false") {
            executed_again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(executed_again);
    // A new key is not late.
    assert_eq!(send("late-2").await.replayed(), Some("false"));
    let metrics = req("GET", gw.admin_url("/metrics")).send().await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains(r#"idem_late_retries_total{route="/v1/charges"} 1"#),
        "{text}"
    );
}
