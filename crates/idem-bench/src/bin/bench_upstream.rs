//! `bench-upstream`: the upstream of the gateway benchmark.
//!
//! ```text
//! bench-upstream [--listen 127.0.0.1:3000] [--delay-ms 0]
//! ```
//!
//! Answers every `POST` (any path) with `201` and a small JSON charge (about 100 bytes),
//! after `--delay-ms` when given, and counts them; `GET /stats` answers
//! `{"posts":N}`, so a benchmark can check how many requests reached the upstream. Other
//! requests get `404`. HTTP/1.1 with keep-alive; one tokio worker per available core.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use idem_bench::flag;
use tokio::net::TcpListener;

struct State {
    posts: AtomicU64,
    delay: Duration,
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let listen: SocketAddr = flag(&args, "--listen", ([127, 0, 0, 1], 3000).into());
    let delay = Duration::from_millis(flag(&args, "--delay-ms", 0u64));
    let state = Arc::new(State {
        posts: AtomicU64::new(0),
        delay,
    });
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(listen, state))
}

async fn serve(listen: SocketAddr, state: Arc<State>) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!(
        "bench-upstream listening on {} (delay {:?})",
        listener.local_addr()?,
        state.delay
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(state.clone(), request));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    state: Arc<State>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    // Read the request in full, as an API would.
    let _ = body.collect().await;
    let (status, body) = match (parts.method, parts.uri.path()) {
        (Method::POST, _) => {
            let n = state.posts.fetch_add(1, Ordering::Relaxed) + 1;
            if !state.delay.is_zero() {
                tokio::time::sleep(state.delay).await;
            }
            let body = format!(
                r#"{{"id":"ch_{n:012}","object":"charge","amount":100,"currency":"eur","status":"succeeded"}}"#
            );
            (StatusCode::CREATED, body)
        }
        (Method::GET, "/stats") => {
            let posts = state.posts.load(Ordering::Relaxed);
            (StatusCode::OK, format!(r#"{{"posts":{posts}}}"#))
        }
        _ => (
            StatusCode::NOT_FOUND,
            r#"{"error":"not found"}"#.to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}
