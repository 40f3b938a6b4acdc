//! The `idem` binary as operators run it: `--check-config`, the defaults without a
//! configuration file, kill -9 and restart on the embedded store, SIGTERM, `idem keys`
//! and `idem migrate`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Binary, Upstream, idem, post};

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn check_config_exits_0_on_a_valid_file_and_64_naming_the_field_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        dir.path(),
        "good.toml",
        r#"
listen = "127.0.0.1:8080"
upstream = "http://127.0.0.1:3000"
store = "sqlite://./idem.db"
admin_listen = "127.0.0.1:9090"

[defaults]
key = "optional"
methods = ["POST", "PATCH"]
retention = "24h"
lease = "60s"
in_flight = "conflict"
max_wait = "10s"
server_errors = "store"
ambiguous = "store"
max_request_body = "1MiB"
max_stored_response = "1MiB"
principal_header = "authorization"
fail = "closed"

[[routes]]
path = "/v1/charges/{id}"
methods = ["POST", "PATCH"]
key = "required"
"#,
    );
    let (code, stdout, _) = idem(dir.path(), &["serve", "--config", &good, "--check-config"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("configuration is valid"), "{stdout}");
    // --check-config opens nothing.
    assert!(!dir.path().join("idem.db").exists());

    for (name, text, field) in [
        (
            "unknown.toml",
            "upstream = \"http://127.0.0.1:3000\"\n[defaults]\nretentoin = \"1h\"\n",
            "retentoin",
        ),
        (
            "short.toml",
            "upstream = \"http://127.0.0.1:3000\"\n[[routes]]\npath = \"/a\"\nretention = \"1s\"\nlease = \"5s\"\n",
            "routes[0].retention",
        ),
        (
            "pattern.toml",
            "upstream = \"http://127.0.0.1:3000\"\n[[routes]]\npath = \"/a/*/b\"\n",
            "routes[0].path",
        ),
        ("noupstream.toml", "listen = \"127.0.0.1:1\"\n", "upstream"),
        (
            "duration.toml",
            "upstream = \"http://127.0.0.1:3000\"\n[defaults]\nlease = \"soon\"\n",
            "defaults.lease",
        ),
        (
            "secret.toml",
            "upstream = \"http://127.0.0.1:3000\"\nstore = \"postgres://u@127.0.0.1/db\"\n",
            "principal_secret",
        ),
        ("syntax.toml", "upstream = \n", "config"),
    ] {
        let path = write(dir.path(), name, text);
        let (code, _, stderr) = idem(dir.path(), &["serve", "--config", &path, "--check-config"]);
        assert_eq!(code, 64, "{name}: {stderr}");
        assert!(stderr.contains(field), "{name}: {stderr}");
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{name}: one line: {stderr}"
        );
    }
    let (code, _, _) = idem(dir.path(), &["serve", "--no-such-flag"]);
    assert_eq!(code, 64);
    let (code, _, _) = idem(
        dir.path(),
        &["serve", "--config", "missing.toml", "--check-config"],
    );
    assert_eq!(code, 64);
}

#[tokio::test]
async fn without_a_config_the_gateway_uses_the_embedded_store_in_the_working_directory() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gateway = Binary::serve(
        dir.path(),
        &["--upstream", &up.url(), "--listen", "127.0.0.1:0"],
    );
    for _ in 0..2 {
        post(gateway.url("/anything"))
            .key("k")
            .json("{}")
            .send()
            .await;
    }
    assert_eq!(up.calls(), 1);
    assert!(dir.path().join("idem.db").exists());
    let secret = dir.path().join("idem.db.secret");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    #[cfg(not(unix))]
    assert!(secret.exists());
}

fn crash_config(dir: &Path, up: &Upstream, lease: &str) -> String {
    write(
        dir,
        "idem.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\n\
             upstream = \"{}\"\n\
             store = \"sqlite://./data/idem.db\"\n\
             [defaults]\n\
             lease = \"{lease}\"\n\
             [[routes]]\n\
             path = \"/v1/charges\"\n\
             key = \"required\"\n\
             [[routes]]\n\
             path = \"/hang\"\n\
             key = \"required\"\n",
            up.url()
        ),
    )
}

#[tokio::test]
async fn kill_9_after_completion_then_restart_replays() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = crash_config(dir.path(), &up, "60s");
    let charge = |gw: &Binary| {
        post(gw.url("/v1/charges"))
            .key("order-1")
            .header("authorization", "Bearer merchant-1")
            .json(r#"{"amount": 100}"#)
            .send()
    };
    let gateway = Binary::serve(dir.path(), &["--config", &config]);
    let first = charge(&gateway).await;
    assert_eq!(first.status, 201);
    gateway.kill9();

    // A new process: the record is on disk, and the principal secret is the same.
    let gateway = Binary::serve(dir.path(), &["--config", &config]);
    let retry = charge(&gateway).await;
    assert_eq!(retry.status, 201);
    assert_eq!(retry.replayed(), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn kill_9_while_the_upstream_works_then_409_within_the_lease_and_never_a_second_execution() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = crash_config(dir.path(), &up, "5s");
    let send = |gw: &Binary| {
        post(gw.url("/hang"))
            .key("order-2")
            .header("authorization", "Bearer merchant-1")
            .json(r#"{"amount": 100}"#)
            .try_send()
    };
    let gateway = Binary::serve(dir.path(), &["--config", &config]);
    let url = gateway.url("/hang");
    let lost = tokio::spawn(
        post(url)
            .key("order-2")
            .header("authorization", "Bearer merchant-1")
            .json(r#"{"amount": 100}"#)
            .try_send(),
    );
    up.wait_for_calls(1).await;
    gateway.kill9();
    assert!(lost.await.unwrap().is_err(), "the gateway died: no answer");

    let gateway = Binary::serve(dir.path(), &["--config", &config]);
    // Within the lease: the claim of the dead process still holds the key.
    let retry = send(&gateway).await.unwrap();
    assert_eq!(
        retry.status,
        409,
        "{}",
        String::from_utf8_lossy(&retry.body)
    );
    assert_eq!(retry.problem(), "in-flight");

    // After the lease: an unknown outcome, not a second execution.
    let mut answer = retry;
    for _ in 0..100 {
        if answer.status != 409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        answer = send(&gateway).await.unwrap();
    }
    assert_eq!(
        answer.status,
        502,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.problem(), "outcome-unknown");
    assert_eq!(answer.json()["reason"], "lease-expired");
    let again = send(&gateway).await.unwrap();
    assert_eq!(again.status, 502);
    assert_eq!(again.replayed(), Some("true"));
    assert_eq!(up.calls(), 1);
}

#[tokio::test]
async fn sigterm_finishes_requests_in_flight_then_exits_0() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut gateway = Binary::serve(
        dir.path(),
        &[
            "--upstream",
            &up.url(),
            "--listen",
            "127.0.0.1:0",
            "--store",
            "memory://",
        ],
    );
    let running = tokio::spawn(
        post(gateway.url("/slow?ms=1000"))
            .key("k")
            .json("{}")
            .send(),
    );
    up.wait_for_calls(1).await;
    gateway.terminate();
    let answer = running.await.unwrap();
    assert_eq!(answer.status, 201);
    let status = tokio::task::spawn_blocking(move || gateway.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn logs_carry_a_request_id_and_never_the_key_the_principal_the_body_or_a_secret() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Every secret the gateway holds, each distinctive enough to be found in a log line.
    let encryption_key = "c2VjcmV0LWVuY3J5cHRpb24ta2V5LTMyLWJ5dGVzISE=";
    let config = write(
        dir.path(),
        "idem.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\n\
             upstream = \"{}\"\n\
             store = \"memory://\"\n\
             principal_secret = \"principal-secret-c0ffee\"\n\
             admin_token = \"admin-token-d00d\"\n\
             [encryption]\n\
             keys = {{ k1 = \"{encryption_key}\" }}\n",
            up.url()
        ),
    );
    let gateway = Binary::serve(
        dir.path(),
        &["--config", &config, "--admin-listen", "127.0.0.1:0"],
    );
    for _ in 0..2 {
        let answer = post(gateway.url("/v1/charges"))
            .key("key-7f3a9c")
            .header("authorization", "Bearer principal-5e1d")
            .header("x-request-id", "req-42")
            .json(r#"{"card": "body-91b2"}"#)
            .send()
            .await;
        assert_eq!(answer.header("x-request-id"), Some("req-42"));
    }
    // A malformed key, a mismatching body, and an admin call with a wrong token: the
    // error paths log too.
    post(gateway.url("/v1/charges"))
        .key("\"badkey-3e3e")
        .json("{}")
        .send()
        .await;
    post(gateway.url("/v1/charges"))
        .key("key-7f3a9c")
        .header("authorization", "Bearer principal-5e1d")
        .json(r#"{"card": "body-other-4d4d"}"#)
        .send()
        .await;
    let admin = format!("http://{}/metrics", gateway.admin.unwrap());
    let denied = common::req("GET", admin)
        .header("authorization", "Bearer wrong-token-abab")
        .send()
        .await;
    assert_eq!(denied.status, 401);

    let finished = |logs: &[String]| {
        logs.iter()
            .filter(|l| l.contains("request finished") && l.contains("req-42"))
            .count()
    };
    for _ in 0..100 {
        if finished(&gateway.logs.lock().unwrap()) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = gateway.logs.lock().unwrap().clone();
    assert_eq!(finished(&logs), 2, "{logs:#?}");
    for secret in [
        "key-7f3a9c",
        "principal-5e1d",
        "body-91b2",
        "badkey-3e3e",
        "body-other-4d4d",
        "principal-secret-c0ffee",
        "admin-token-d00d",
        "wrong-token-abab",
        encryption_key,
        "c2VjcmV0",
    ] {
        assert!(
            logs.iter().all(|l| !l.contains(secret)),
            "{secret} was logged: {logs:#?}"
        );
    }
}

#[tokio::test]
async fn idem_keys_shows_releases_and_purges_records_of_the_embedded_store() {
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = crash_config(dir.path(), &up, "60s");
    let gateway = Binary::serve(dir.path(), &["--config", &config]);
    let charge = || {
        post(gateway.url("/v1/charges"))
            .key("order-3")
            .header("authorization", "Bearer merchant-1")
            .json(r#"{"amount": 100}"#)
            .send()
    };
    charge().await;
    let scope = [
        "--config",
        config.as_str(),
        "--route",
        "/v1/charges",
        "--key",
        "order-3",
        "--principal",
        "Bearer merchant-1",
    ];
    let run = |args: &[&str]| {
        let mut all = vec!["keys"];
        all.extend_from_slice(args);
        idem(dir.path(), &all)
    };

    let (code, shown, stderr) = run(&[&["show"][..], &scope[..]].concat());
    assert_eq!(code, 0, "{stderr}");
    let record: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(record["state"], "completed");
    assert!(record["response"].get("body").is_none());
    let id = record["id"].as_str().unwrap().to_string();

    let (code, id_line, _) = run(&[&["id"][..], &scope[..]].concat());
    assert_eq!(code, 0);
    assert_eq!(id_line.trim(), id);

    let (code, with_body, _) = run(&["show", "--config", &config, "--id", &id, "--body"]);
    assert_eq!(code, 0);
    assert!(with_body.contains("execution"), "{with_body}");

    let (code, _, stderr) = run(&["release", "--config", &config, "--id", &id]);
    assert_eq!(code, 1, "a completed record is not released");
    assert!(stderr.contains("not in flight"), "{stderr}");

    let (code, _, stderr) = run(&[&["purge"][..], &scope[..]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(charge().await.replayed(), Some("false"));
    assert_eq!(up.calls(), 2);

    // An in-flight record: listed, then released.
    let hang = tokio::spawn(
        post(gateway.url("/hang"))
            .key("order-4")
            .json("{}")
            .try_send(),
    );
    up.wait_for_calls(3).await;
    let (code, listed, _) = run(&["in-flight", "--config", &config]);
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let (code, _, stderr) = run(&[
        "release", "--config", &config, "--route", "/hang", "--key", "order-4",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let retry = tokio::spawn(
        post(gateway.url("/hang"))
            .key("order-4")
            .json("{}")
            .try_send(),
    );
    up.wait_for_calls(4).await;
    up.state.unhang.notify_waiters();
    let _ = hang.await;
    let _ = retry.await;
    drop(gateway);

    let (code, _, stderr) = run(&["show", "--config", &config, "--id", "nothex"]);
    assert_eq!(code, 64, "{stderr}");
}

#[test]
fn idem_migrate_succeeds_on_the_embedded_store_and_fails_in_one_line_when_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = idem(dir.path(), &["migrate", "--store", "sqlite://./m/idem.db"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("schema is current"), "{stdout}");
    let (code, _, stderr) = idem(
        dir.path(),
        &["migrate", "--store", "postgres://idem@127.0.0.1:1/idem"],
    );
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("idem: "), "{stderr}");
    let (code, _, _) = idem(dir.path(), &["migrate"]);
    assert_eq!(code, 64);
}

#[test]
fn the_demo_charges_every_payment_once_with_idem() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = idem(dir.path(), &["demo", "--payments", "40"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("duplicate charges"), "{stdout}");
    assert!(
        stdout.contains("every payment was charged exactly once"),
        "{stdout}"
    );
}
