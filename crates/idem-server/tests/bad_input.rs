//! Bad input over raw TCP: malformed and duplicate keys, keys at the length limit, sf-string
//! escapes, non-ASCII and control bytes, oversized and numerous headers, invalid and deeply
//! nested JSON, bodies at and over the limit, broken chunked encodings, `Content-Length`
//! mismatches, HTTP/1.0, pipelining, absolute-form targets, `Expect: 100-continue`.
//!
//! One table: each case is the bytes a client writes, the statuses it must get back (or
//! the connection closed), and how many times the counting upstream may execute — zero
//! for everything malformed, exactly once for the valid cases (and zero for their
//! retries). Then the attacks on the connection layer: slowloris clients trickling their
//! headers, connections dropped mid-body, more connections than allowed; the gateway
//! keeps serving a normal client throughout, and its memory stays bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Gateway, Upstream, config_for, post};
use idem_core::{MemoryStore, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn memory() -> Arc<dyn Store> {
    Arc::new(MemoryStore::new())
}

/// The limits the table is written against.
const LIMITS: &str = r#"
store = "memory://"
max_headers = 100
max_header_bytes = "16KiB"

[[routes]]
path = "/v1/charges"
key = "required"
max_request_body = 1024

[[routes]]
path = "/v1/deep"
key = "required"
max_request_body = "1MiB"
"#;

/// A bound on every wait for the gateway, so a hang fails the test instead of stalling it.
const PATIENCE: Duration = Duration::from_secs(20);

/// What a case must get back.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// These statuses, in order (several for pipelined requests).
    Statuses(&'static [u16]),
    /// An answer with this status, or the connection closed without one (the client
    /// broke the message framing, so the gateway may give up on the connection).
    StatusOrClose(u16),
}

struct Case {
    name: &'static str,
    /// The bytes written, then (when `half_close`) the write side is shut.
    bytes: Vec<u8>,
    half_close: bool,
    expect: Expect,
    /// Upstream executions this case may cause.
    executions: u64,
    /// The answers must say `Idempotent-Replayed: true` (a retry of an earlier case).
    replayed: bool,
}

fn case(name: &'static str, bytes: Vec<u8>, expect: Expect, executions: u64) -> Case {
    Case {
        name,
        bytes,
        half_close: false,
        expect,
        executions,
        replayed: false,
    }
}

/// A POST to `path` with `headers` (raw lines without CRLF) and `body`, closing the
/// connection after the answer.
fn post_raw(path: &str, headers: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let mut out = format!("POST {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n").into_bytes();
    for header in headers {
        out.extend_from_slice(header);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

/// A JSON POST to `/v1/charges` with one key header line.
fn charge(key: &[u8]) -> Vec<u8> {
    let mut line = b"Idempotency-Key: ".to_vec();
    line.extend_from_slice(key);
    post_raw(
        "/v1/charges",
        &[&line, b"Content-Type: application/json"],
        br#"{"amount":100}"#,
    )
}

fn key_line(key: &str) -> Vec<u8> {
    format!("Idempotency-Key: {key}").into_bytes()
}

fn chunked(key: &str, chunks: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST /v1/charges HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nIdempotency-Key: {key}\r\n\
         Transfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    out.extend_from_slice(chunks);
    out
}

fn table() -> Vec<Case> {
    use Expect::*;
    let k255 = "k".repeat(255);
    let k256 = "k".repeat(256);
    let escaped_255 = format!("\"{}\\\"\"", "e".repeat(254));
    let many_headers = |n: usize| {
        let lines: Vec<Vec<u8>> = (0..n)
            .map(|i| format!("X-Filler-{i}: v").into_bytes())
            .collect();
        let refs: Vec<&[u8]> = std::iter::once(&b"Idempotency-Key: many"[..])
            .chain(lines.iter().map(Vec::as_slice))
            .collect();
        post_raw("/v1/charges", &refs, b"{}")
    };
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut cases = vec![
        // --- keys ---
        case("no key on a required route", post_raw("/v1/charges", &[], b"{}"), Statuses(&[400]), 0),
        case("empty key", charge(b""), Statuses(&[400]), 0),
        case(
            "two key header lines",
            post_raw("/v1/charges", &[b"Idempotency-Key: a", b"Idempotency-Key: b"], b"{}"),
            Statuses(&[400]),
            0,
        ),
        case("two keys in one line", charge(b"a, b"), Statuses(&[400]), 0),
        case("key of 255 characters", charge(k255.as_bytes()), Statuses(&[201]), 1),
        Case {
            replayed: true,
            ..case(
                "the same 255 characters quoted: the same key, replayed",
                charge(format!("\"{k255}\"").as_bytes()),
                Statuses(&[201]),
                0,
            )
        },
        case("key of 256 characters", charge(k256.as_bytes()), Statuses(&[400]), 0),
        case("quoted key of 256 characters", charge(format!("\"{k256}\"").as_bytes()), Statuses(&[400]), 0),
        case("key of 64 KiB", charge("k".repeat(64 * 1024).as_bytes()), Statuses(&[431]), 0),
        case(
            "254 characters and an escaped quote: 255 after unquoting",
            charge(escaped_255.as_bytes()),
            Statuses(&[201]),
            1,
        ),
        case("sf-string with an invalid escape", charge(br#""a\nb""#), Statuses(&[400]), 0),
        case("sf-string without its closing quote", charge(br#""abc"#), Statuses(&[400]), 0),
        case("sf-string with parameters", charge(br#""abc";p=1"#), Statuses(&[400]), 0),
        case("empty sf-string", charge(br#""""#), Statuses(&[400]), 0),
        case("key with a space", charge(b"a b"), Statuses(&[400]), 0),
        case("key with a tab", charge(b"a\tb"), Statuses(&[400]), 0),
        case("key with UTF-8 bytes", charge("caf\u{e9}-1".as_bytes()), Statuses(&[400]), 0),
        case("key with a Latin-1 byte", charge(b"caf\xe9"), Statuses(&[400]), 0),
        case("key with DEL", charge(b"ab\x7f"), Statuses(&[400]), 0),
        case("key with a control byte", charge(b"ab\x01cd"), Statuses(&[400]), 0),
        case("key with NUL", charge(b"ab\x00cd"), Statuses(&[400]), 0),
        case("key header with a bare CR", charge(b"ab\rcd"), Statuses(&[400]), 0),
        case(
            "space before the header colon",
            post_raw("/v1/charges", &[b"Idempotency-Key : sp"], b"{}"),
            Statuses(&[400]),
            0,
        ),
        case(
            "obsolete line folding in the key",
            post_raw("/v1/charges", &[b"Idempotency-Key: fold", b" ed"], b"{}"),
            Statuses(&[400]),
            0,
        ),
        case(
            "key header name in upper case",
            post_raw("/v1/charges", &[b"IDEMPOTENCY-KEY: upper-1"], b"{}"),
            Statuses(&[201]),
            1,
        ),
        // --- header limits ---
        case(
            "one header line over max_header_bytes",
            post_raw("/v1/charges", &[b"Idempotency-Key: big", format!("X-Big: {}", "b".repeat(20_000)).as_bytes()], b"{}"),
            Statuses(&[431]),
            0,
        ),
        case("101 headers, over max_headers", many_headers(101), Statuses(&[431]), 0),
        case("5000 headers", many_headers(5000), Statuses(&[431]), 0),
        case(
            "a request target of 20 KiB",
            post_raw(&format!("/v1/charges?{}", "q".repeat(20_000)), &[b"Idempotency-Key: long-uri"], b"{}"),
            Statuses(&[431]),
            0,
        ),
        // --- bodies ---
        case(
            "invalid JSON in a JSON body: forwarded once, fingerprinted as bytes",
            post_raw("/v1/charges", &[b"Idempotency-Key: bad-json", b"Content-Type: application/json"], b"{\"amount\": 1,,}"),
            Statuses(&[201]),
            1,
        ),
        Case {
            replayed: true,
            ..case(
                "its retry",
                post_raw("/v1/charges", &[b"Idempotency-Key: bad-json", b"Content-Type: application/json"], b"{\"amount\": 1,,}"),
                Statuses(&[201]),
                0,
            )
        },
        case(
            "JSON nested 100000 deep: no stack overflow",
            post_raw("/v1/deep", &[b"Idempotency-Key: deep", b"Content-Type: application/json"], deep.as_bytes()),
            Statuses(&[201]),
            1,
        ),
        Case {
            replayed: true,
            ..case(
                "its retry",
                post_raw("/v1/deep", &[b"Idempotency-Key: deep", b"Content-Type: application/json"], deep.as_bytes()),
                Statuses(&[201]),
                0,
            )
        },
        case(
            "a body of exactly the limit",
            post_raw("/v1/charges", &[&key_line("at-limit")], &[b'a'; 1024]),
            Statuses(&[201]),
            1,
        ),
        case(
            "a body one byte over the limit",
            post_raw("/v1/charges", &[&key_line("over-limit")], &[b'a'; 1025]),
            Statuses(&[413]),
            0,
        ),
        case(
            "a chunked body over the limit",
            chunked("chunked-over", format!("400\r\n{}\r\n400\r\n{}\r\n0\r\n\r\n", "a".repeat(1024), "b".repeat(1024)).as_bytes()),
            Statuses(&[413]),
            0,
        ),
        case(
            "a chunk size that is not hex",
            chunked("chunk-zz", b"zz\r\nhello\r\n0\r\n\r\n"),
            StatusOrClose(400),
            0,
        ),
        case(
            "a chunk size that overflows",
            chunked("chunk-overflow", b"fffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
            StatusOrClose(400),
            0,
        ),
        Case {
            half_close: true,
            ..case(
                "a chunk larger than what follows, then EOF",
                chunked("chunk-short", b"100\r\nhello"),
                StatusOrClose(400),
                0,
            )
        },
        Case {
            half_close: true,
            ..case(
                "Content-Length larger than the body, then EOF",
                b"POST /v1/charges HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: cl-long\r\nContent-Length: 100\r\n\r\nshort".to_vec(),
                StatusOrClose(400),
                0,
            )
        },
        case(
            "Content-Length smaller than the body: the rest is a malformed next request",
            b"POST /v1/charges HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: cl-short\r\nContent-Length: 2\r\n\r\n{}garbage\r\n\r\n".to_vec(),
            Statuses(&[201, 400]),
            1,
        ),
        case(
            "two different Content-Length headers",
            b"POST /v1/charges HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: cl-two\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x".to_vec(),
            Statuses(&[400]),
            0,
        ),
        case(
            "a negative Content-Length",
            b"POST /v1/charges HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: cl-neg\r\nContent-Length: -1\r\n\r\n{}".to_vec(),
            Statuses(&[400]),
            0,
        ),
        case(
            "a Content-Length that is not a number",
            b"POST /v1/charges HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: cl-nan\r\nContent-Length: ten\r\n\r\n{}".to_vec(),
            Statuses(&[400]),
            0,
        ),
        case(
            "Content-Length and a chunked Transfer-Encoding: decoded by the latter (RFC 9112), \
             the length dropped, re-framed towards the upstream",
            b"POST /v1/charges HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nIdempotency-Key: cl-te\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec(),
            Statuses(&[201]),
            1,
        ),
        case(
            "Transfer-Encoding in HTTP/1.0",
            b"POST /v1/charges HTTP/1.0\r\nIdempotency-Key: te-10\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec(),
            StatusOrClose(400),
            0,
        ),
        case(
            "a Transfer-Encoding other than chunked",
            b"POST /v1/charges HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: te-gzip\r\nTransfer-Encoding: gzip\r\n\r\nxx".to_vec(),
            StatusOrClose(400),
            0,
        ),
        // --- protocol ---
        case(
            "HTTP/1.0 with a valid key",
            b"POST /v1/charges HTTP/1.0\r\nIdempotency-Key: http10\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            Statuses(&[201]),
            1,
        ),
        Case {
            replayed: true,
            ..case(
                "its HTTP/1.0 retry",
                b"POST /v1/charges HTTP/1.0\r\nIdempotency-Key: http10\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
                Statuses(&[201]),
                0,
            )
        },
        case("an HTTP/0.9 request line", b"POST /v1/charges\r\n\r\n".to_vec(), StatusOrClose(400), 0),
        case(
            "an HTTP/2 preface on the HTTP/1.1 port",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            StatusOrClose(400),
            0,
        ),
        case(
            "an unknown HTTP version",
            b"POST /v1/charges HTTP/3.7\r\nIdempotency-Key: v37\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            StatusOrClose(400),
            0,
        ),
        case(
            "a space in the request target",
            b"POST /v1/ch arges HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: sp-path\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            Statuses(&[400]),
            0,
        ),
        case(
            "NUL in the request target",
            b"POST /v1/charges\x00 HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: nul-path\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            Statuses(&[400]),
            0,
        ),
        case(
            "an absolute-form request target",
            b"POST http://gw.example/v1/charges HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\nIdempotency-Key: absolute\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            Statuses(&[201]),
            1,
        ),
        Case {
            replayed: true,
            ..case(
                "its retry in origin form names the same record",
                post_raw("/v1/charges", &[b"Idempotency-Key: absolute"], b"{}"),
                Statuses(&[201]),
                0,
            )
        },
        case(
            "two pipelined requests with one key: executed once, then replayed",
            [
                &b"POST /v1/charges HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: piped\r\nContent-Length: 2\r\n\r\n{}"[..],
                &b"POST /v1/charges HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nIdempotency-Key: piped\r\nContent-Length: 2\r\n\r\n{}"[..],
            ]
            .concat(),
            Statuses(&[201, 201]),
            1,
        ),
        case(
            "a valid pipelined request, then a malformed one",
            [
                &b"POST /v1/charges HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: piped-2\r\nContent-Length: 2\r\n\r\n{}"[..],
                &b"POST /v1/charges HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: \x01\r\nContent-Length: 2\r\n\r\n{}"[..],
            ]
            .concat(),
            Statuses(&[201, 400]),
            1,
        ),
        case(
            "Expect: 100-continue with a body over the limit: 413 before the body is sent",
            b"POST /v1/charges HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nIdempotency-Key: expect-big\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n".to_vec(),
            Statuses(&[413]),
            0,
        ),
        case(
            "Expect: 100-continue without a key on a required route",
            b"POST /v1/charges HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n".to_vec(),
            Statuses(&[400]),
            0,
        ),
    ];
    cases.shrink_to_fit();
    cases
}

/// Writes `bytes` on a fresh connection and reads every answer until the gateway closes
/// the connection.
async fn exchange(addr: SocketAddr, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The gateway may answer (and close) before reading everything: a failed write is
    // part of the scenario, not of the test.
    let _ = stream.write_all(bytes).await;
    if half_close {
        let _ = stream.shutdown().await;
    }
    let mut answer = Vec::new();
    let read = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "the gateway neither answered nor closed the connection"
    );
    answer
}

/// The status of every response in `answer` (interim `100 Continue` answers included).
/// Bodies here are JSON or empty, so a status line is any `HTTP/1.x NNN ` in the stream.
fn statuses(answer: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(answer);
    let mut found = Vec::new();
    let mut rest: &str = &text;
    while let Some(at) = rest.find("HTTP/1.") {
        let line = &rest[at..];
        if let Some(code) = line.get(9..12).and_then(|c| c.parse().ok()) {
            found.push(code);
        }
        rest = &rest[at + 7..];
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_bad_input_gets_its_status_and_nothing_executes() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, LIMITS), memory()).await;
    let cases = table();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut report = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let before = up.calls();
        let answer = exchange(gw.addr, &case.bytes, case.half_close).await;
        let got = statuses(&answer);
        let executions = up.calls() - before;
        let text = String::from_utf8_lossy(&answer[..answer.len().min(600)]).into_owned();
        let status_ok = match &case.expect {
            Expect::Statuses(expected) => got == *expected,
            Expect::StatusOrClose(status) => got.is_empty() || got == [*status],
        };
        let replay_ok = !case.replayed || text.contains("idempotent-replayed: true");
        if !(status_ok && replay_ok && executions == case.executions) {
            report.push(format!(
                "{}: expected {:?} with {} execution(s){}, got {got:?} with {executions}:\n{text}",
                case.name,
                case.expect,
                case.executions,
                if case.replayed { " (replayed)" } else { "" },
            ));
        }
        // A normal request still succeeds after every case.
        let normal = post(gw.url("/v1/charges"))
            .key(&format!("normal-after-{i}"))
            .json("{}")
            .try_send()
            .await;
        match normal {
            Ok(answer) if answer.status == 201 => {}
            other => report.push(format!(
                "{}: the next normal request failed: {other:?}",
                case.name
            )),
        }
    }
    assert!(
        report.is_empty(),
        "{} case(s) failed:\n\n{}",
        report.len(),
        report.join("\n\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expect_100_continue_gets_continue_then_executes_once() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, LIMITS), memory()).await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/charges HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nIdempotency-Key: expect-1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        .await
        .unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut interim))
        .await
        .unwrap()
        .unwrap();
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{:?}",
        String::from_utf8_lossy(&interim)
    );
    assert_eq!(up.calls(), 0, "nothing executes before the body arrives");
    stream.write_all(b"{}").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(statuses(&answer), [201]);
    assert_eq!(up.calls(), 1);
}

/// A client that sends one byte of its request head at a time, forever; returns once the
/// gateway has closed the connection.
async fn slowloris(addr: SocketAddr) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = b"POST /v1/charges HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: slow\r\n";
    let mut i = 0usize;
    loop {
        let byte = if i < head.len() { head[i] } else { b'x' };
        i += 1;
        if stream.write_all(&[byte]).await.is_err() {
            return;
        }
        // A closed connection shows up as a read of 0 bytes (or an error).
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(_)) => {} // a 408 answer, say; the close follows
            Err(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_clients_are_cut_off_while_a_normal_client_is_served() {
    let up = Upstream::start().await;
    let config = config_for(&up, &format!("header_read_timeout = \"1s\"\n{LIMITS}"));
    let gw = Gateway::start(config, memory()).await;
    let addr = gw.addr;
    let trickling: Vec<_> = (0..50).map(|_| tokio::spawn(slowloris(addr))).collect();
    // While they trickle, a normal client is served.
    for i in 0..20 {
        let answer = post(gw.url("/v1/charges"))
            .key(&format!("normal-{i}"))
            .json("{}")
            .send()
            .await;
        assert_eq!(answer.status, 201);
    }
    // Every trickling connection is closed by the gateway (a header that never ends would
    // otherwise hold its connection forever).
    for task in trickling {
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("the gateway cut off a slowloris client")
            .unwrap();
    }
    assert_eq!(up.calls(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_stall_mid_body_get_400_and_nothing_executes() {
    let up = Upstream::start().await;
    let config = config_for(&up, &format!("body_read_timeout = \"1s\"\n{LIMITS}"));
    let gw = Gateway::start(config, memory()).await;
    let addr = gw.addr;
    let stalled: Vec<_> = (0..50)
        .map(|i| {
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let head = format!(
                    "POST /v1/charges HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: stall-{i}\r\nContent-Length: 100\r\n\r\n0123456789"
                );
                stream.write_all(head.as_bytes()).await.unwrap();
                // ...and nothing more, with the connection kept open.
                let mut answer = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
                        Ok(Ok(0) | Err(_)) => break,
                        Ok(Ok(n)) => {
                            answer.extend_from_slice(&buf[..n]);
                            if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
                                break;
                            }
                        }
                        Err(_) => panic!("the gateway kept waiting for a stalled body"),
                    }
                }
                statuses(&answer)
            })
        })
        .collect();
    for i in 0..10 {
        let answer = post(gw.url("/v1/charges"))
            .key(&format!("steady-{i}"))
            .json("{}")
            .send()
            .await;
        assert_eq!(answer.status, 201);
    }
    for task in stalled {
        assert_eq!(task.await.unwrap(), [400]);
    }
    assert_eq!(up.calls(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_vanish_mid_body_execute_nothing_and_others_are_served() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, LIMITS), memory()).await;
    let addr = gw.addr;
    let vanishing: Vec<_> = (0..200)
        .map(|i| {
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let head = format!(
                    "POST /v1/charges HTTP/1.1\r\nHost: gw\r\nIdempotency-Key: vanish-{i}\r\nContent-Length: 1000\r\n\r\n"
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&[b'a'; 500]).await;
                // Reset rather than a graceful close, like a crashed client. (A zero linger
                // resets at once; the deprecation is about lingers that block on drop.)
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(Duration::ZERO));
                drop(stream);
            })
        })
        .collect();
    for i in 0..20 {
        let answer = post(gw.url("/v1/charges"))
            .key(&format!("steady-{i}"))
            .json("{}")
            .send()
            .await;
        assert_eq!(answer.status, 201);
    }
    for task in vanishing {
        task.await.unwrap();
    }
    // None of the vanished requests was forwarded: their bodies never completed. Their
    // keys are free: the same request, complete this time, executes once.
    assert_eq!(up.calls(), 20);
    let complete = post(gw.url("/v1/charges"))
        .key("vanish-7")
        .body(vec![b'a'; 1000])
        .send()
        .await;
    assert_eq!(complete.status, 201);
    assert_eq!(up.calls(), 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_over_the_limit_are_closed_at_once_and_served_again_when_freed() {
    let up = Upstream::start().await;
    let config = config_for(
        &up,
        &format!("max_connections = 8\nheader_read_timeout = \"5s\"\n{LIMITS}"),
    );
    let gw = Gateway::start(config, memory()).await;
    // Eight idle connections take every slot.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    // The ninth is closed without an answer (once the gateway has accepted the eight).
    let mut closed_at_once = false;
    for _ in 0..100 {
        let mut extra = TcpStream::connect(gw.addr).await.unwrap();
        let mut buf = [0u8; 16];
        match tokio::time::timeout(PATIENCE, extra.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {
                closed_at_once = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(closed_at_once);
    let metrics = reqwest_metrics(&gw).await;
    assert!(
        metrics.contains("idem_connections_rejected_total"),
        "{metrics}"
    );
    // The idle ones are cut off by the header timeout; then the gateway serves again.
    drop(idle);
    let mut served = false;
    for _ in 0..600 {
        if let Ok(answer) = post(gw.url("/v1/charges"))
            .key("after-limit")
            .json("{}")
            .try_send()
            .await
        {
            assert_eq!(answer.status, 201);
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served);
}

async fn reqwest_metrics(gw: &Gateway) -> String {
    let answer = common::req("GET", gw.admin_url("/metrics")).send().await;
    String::from_utf8_lossy(&answer.body).into_owned()
}

/// Resident memory of this process, in KiB (Linux).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_stays_bounded_under_a_malicious_burst_and_a_normal_request_then_succeeds() {
    let up = Upstream::start().await;
    let gw = Gateway::start(config_for(&up, LIMITS), memory()).await;
    let addr = gw.addr;
    // Warm up, so the baseline includes the runtime's and the gateway's steady state.
    for i in 0..20 {
        post(gw.url("/v1/charges"))
            .key(&format!("warm-{i}"))
            .json("{}")
            .send()
            .await;
    }
    let Some(before) = rss_kib() else {
        eprintln!("skipping the memory check: no /proc/self/status");
        return;
    };
    let cases = table();
    let malicious: Vec<&Case> = cases
        .iter()
        .filter(|c| c.executions == 0 && !c.replayed)
        .collect();
    for round in 0..10 {
        let tasks: Vec<_> = malicious
            .iter()
            .map(|case| {
                let bytes = case.bytes.clone();
                let half_close = case.half_close;
                tokio::spawn(async move { exchange(addr, &bytes, half_close).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            up.calls(),
            20,
            "round {round}: no malicious request executed"
        );
    }
    let after = rss_kib().unwrap();
    eprintln!(
        "resident memory: {before} KiB before, {after} KiB after 10 rounds of {} malicious cases",
        malicious.len()
    );
    // Loose: ten rounds of every malicious case may not grow the process by more than
    // 64 MiB over its baseline (an unbounded buffer would grow by the input size times
    // the rounds, or keep every connection's buffers).
    assert!(
        after < before + 64 * 1024,
        "resident memory grew from {before} KiB to {after} KiB"
    );
    assert_eq!(up.calls(), 20, "no malicious request executed");
    let normal = post(gw.url("/v1/charges"))
        .key("after-burst")
        .json("{}")
        .send()
        .await;
    assert_eq!(normal.status, 201);
}
