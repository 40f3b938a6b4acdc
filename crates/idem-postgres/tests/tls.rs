//! TLS to the server: each `sslmode` encrypts and checks what it promises, client
//! certificates log in their role, and a URL that requires TLS never falls back to plain.
//!
//! The server comes from `IDEM_TEST_POSTGRES_TLS_URL` and its certificates from
//! `IDEM_TEST_POSTGRES_TLS_DIR` (`scripts/test` starts one with `scripts/pg-server start DIR
//! --tls`, whose comment says what the certificates are).

#![cfg(feature = "tls")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::error::Error as _;
use std::time::Duration;

use idem_core::{ClaimOutcome, ClaimRequest, Error, Fingerprint, RecordId, Store};
use idem_postgres::{PostgresOptions, PostgresStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::NoTls;

struct Server {
    port: u16,
    dir: String,
}

fn server() -> Server {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: run scripts/test, which starts a PostgreSQL server with \
                 TLS (scripts/pg-server start DIR --tls)"
            )
        })
    };
    let config: tokio_postgres::Config = var("IDEM_TEST_POSTGRES_TLS_URL").parse().unwrap();
    Server {
        port: config.get_ports()[0],
        dir: var("IDEM_TEST_POSTGRES_TLS_DIR"),
    }
}

impl Server {
    fn file(&self, name: &str) -> String {
        format!("{}/{name}", self.dir)
    }

    /// A URL to this server through `host` as `user`, with `query` appended.
    fn url(&self, host: &str, user: &str, query: &str) -> String {
        format!("postgres://{user}@{host}:{}/postgres?{query}", self.port)
    }

    /// A plain connection as the superuser, to look at the server's sessions.
    async fn admin(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.url("127.0.0.1", "postgres", "sslmode=disable"), NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        client
    }
}

/// The error and every source under it, on one line.
fn chain(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Connects a store with `query` (and an application name of its own), claims one id, and
/// returns how many of the store's sessions the server sees and whether all are encrypted.
async fn connect_and_claim(
    server: &Server,
    host: &str,
    user: &str,
    query: &str,
) -> Result<(i64, bool), Error> {
    let name = common::unique_name("tls");
    let options = PostgresOptions {
        schema: format!("s_{name}"),
        table: "records".into(),
        pool_size: 2,
        migrate: true,
    };
    let url = server.url(host, user, &format!("{query}&application_name={name}"));
    let store = PostgresStore::connect(&url, options).await?;
    let id = RecordId::for_event("tls", &name);
    let outcome = store
        .claim(&ClaimRequest::new(id, Fingerprint::of_bytes(b"x")))
        .await?;
    assert!(matches!(outcome, ClaimOutcome::Acquired(_)), "{outcome:?}");
    let row = server
        .admin()
        .await
        .query_one(
            "SELECT count(*), coalesce(bool_and(s.ssl), false) \
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = $1",
            &[&name],
        )
        .await
        .unwrap();
    drop(store);
    Ok((row.get(0), row.get(1)))
}

fn assert_encrypted(sessions: (i64, bool)) {
    // The notification listener and at least one pooled connection.
    assert!(sessions.0 >= 2, "{sessions:?}");
    assert!(sessions.1, "a session in plain: {sessions:?}");
}

fn assert_refused_for_the_certificate(result: Result<(i64, bool), Error>) {
    let e = result.expect_err("connected, though the certificate does not pass");
    // The handshake's refusal (rustls), not a failure before it.
    let text = chain(&e);
    assert!(text.contains("invalid peer certificate"), "{text}");
}

#[tokio::test]
async fn verify_full_connects_to_the_host_its_certificate_names() {
    let s = server();
    let query = format!("sslmode=verify-full&sslrootcert={}", s.file("ca.crt"));
    assert_encrypted(
        connect_and_claim(&s, "localhost", "postgres", &query)
            .await
            .unwrap(),
    );
}

#[tokio::test]
async fn verify_full_refuses_a_host_the_certificate_does_not_name_and_verify_ca_accepts_it() {
    let s = server();
    let ca = s.file("ca.crt");
    assert_refused_for_the_certificate(
        connect_and_claim(
            &s,
            "127.0.0.1",
            "postgres",
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        )
        .await,
    );
    assert_encrypted(
        connect_and_claim(
            &s,
            "127.0.0.1",
            "postgres",
            &format!("sslmode=verify-ca&sslrootcert={ca}"),
        )
        .await
        .unwrap(),
    );
}

#[tokio::test]
async fn a_certificate_no_trusted_authority_signed_is_refused() {
    let s = server();
    let other = s.file("other-ca.crt");
    for mode in ["verify-full", "verify-ca", "require"] {
        assert_refused_for_the_certificate(
            connect_and_claim(
                &s,
                "localhost",
                "postgres",
                &format!("sslmode={mode}&sslrootcert={other}"),
            )
            .await,
        );
    }
    // Without sslrootcert, verify-full trusts the system's authorities, none of which
    // signed this server's certificate.
    assert_refused_for_the_certificate(
        connect_and_claim(&s, "localhost", "postgres", "sslmode=verify-full").await,
    );
}

#[tokio::test]
async fn require_and_prefer_encrypt_without_checking_and_disable_does_not_encrypt() {
    let s = server();
    for query in ["sslmode=require", "sslmode=prefer", "connect_timeout=10"] {
        assert_encrypted(
            connect_and_claim(&s, "127.0.0.1", "postgres", query)
                .await
                .unwrap(),
        );
    }
    let (sessions, encrypted) = connect_and_claim(&s, "127.0.0.1", "postgres", "sslmode=disable")
        .await
        .unwrap();
    assert!(
        sessions >= 2 && !encrypted,
        "{sessions} sessions, encrypted: {encrypted}"
    );
}

#[tokio::test]
async fn a_client_certificate_logs_in_its_role_and_nothing_else_does() {
    let s = server();
    s.admin()
        .await
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE idem_cert LOGIN; \
             EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
             GRANT CREATE ON DATABASE postgres TO idem_cert",
        )
        .await
        .unwrap();
    let ca = s.file("ca.crt");
    let with_certificate = format!(
        "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
        s.file("client.crt"),
        s.file("client.key")
    );
    assert_encrypted(
        connect_and_claim(&s, "localhost", "idem_cert", &with_certificate)
            .await
            .unwrap(),
    );
    // The server asks for a certificate this client does not have: it refuses the login.
    let without = connect_and_claim(
        &s,
        "localhost",
        "idem_cert",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    )
    .await;
    let text = chain(&without.expect_err("logged in without a certificate"));
    assert!(text.contains("certificate"), "{text}");
    let plain = connect_and_claim(&s, "127.0.0.1", "idem_cert", "sslmode=disable").await;
    let text = chain(&plain.expect_err("logged in without TLS"));
    assert!(text.contains("pg_hba.conf rejects"), "{text}");
}

/// A server that answers "no TLS here" to the client's TLS request and returns what the
/// client sent after that answer (a startup message carries the user name in plain).
async fn refusing_tls() -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let (mut socket, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("the client never connected")
            .unwrap();
        let mut request = [0u8; 8];
        tokio::time::timeout(Duration::from_secs(10), socket.read_exact(&mut request))
            .await
            .expect("the client sent no TLS request")
            .unwrap();
        // Length 8, then the SSLRequest code 80877103.
        assert_eq!(request, [0, 0, 0, 8, 4, 210, 22, 47]);
        socket.write_all(b"N").await.unwrap();
        let mut after = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut after))
            .await
            .expect("the client neither sent more nor closed")
            .unwrap_or(0);
        after.truncate(n);
        after
    });
    (port, task)
}

#[tokio::test]
async fn require_never_falls_back_to_plain() {
    let ca = server().file("ca.crt");
    for (query, falls_back) in [
        ("sslmode=require".to_owned(), false),
        (format!("sslmode=verify-ca&sslrootcert={ca}"), false),
        (format!("sslmode=verify-full&sslrootcert={ca}"), false),
        ("sslmode=prefer".to_owned(), true),
        ("connect_timeout=10".to_owned(), true),
    ] {
        let (port, server) = refusing_tls().await;
        let url = format!("postgres://secret_user@127.0.0.1:{port}/db?{query}");
        let connected = PostgresStore::connect(&url, PostgresOptions::default()).await;
        assert!(
            connected.is_err(),
            "{query}: connected to a server that is not one"
        );
        let sent = server.await.unwrap();
        let user_sent = sent.windows(11).any(|w| w == b"secret_user");
        assert_eq!(user_sent, falls_back, "{query}: sent {sent:?}");
    }
}
