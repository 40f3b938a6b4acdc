//! Test support: an upstream that counts executions, a gateway on port 0, an HTTP client,
//! and the `idem` binary as a child process. For the shared stores: the servers' URLs and
//! replicas ([`shared`]), private servers to stop and restart ([`servers`]), and a proxy
//! that loses a chosen answer ([`proxy`]).

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, unreachable_pub)]

pub mod proxy;
pub mod servers;
pub mod shared;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idem_core::Store;
use idem_server::admin::{self, AdminState};
use idem_server::config::Config;
use idem_server::server::{self, App};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};

/// The test upstream's shared state.
#[derive(Default)]
pub struct UpstreamState {
    /// Requests the upstream started handling: its executions.
    calls: AtomicU64,
    by_path: Mutex<HashMap<String, u64>>,
    last_headers: Mutex<Option<HeaderMap>>,
    /// Wakes requests parked on `/hang`.
    pub unhang: Notify,
}

/// An upstream on a loopback port that counts every request it handles.
///
/// | path | behaviour |
/// |---|---|
/// | `/hang` | never answers (until `unhang`) |
/// | `/status/{code}` | answers `{code}` |
/// | `/big?bytes=N` | answers `N` bytes |
/// | `/echo` | answers the request body, as `application/octet-stream` |
/// | anything else | `201` with a JSON document naming the execution number |
///
/// Every path takes `?ms=N` to work N milliseconds before answering. Every answer
/// carries `Set-Cookie` and `X-Execution: N`.
pub struct Upstream {
    pub addr: SocketAddr,
    pub state: Arc<UpstreamState>,
    stop: Option<oneshot::Sender<()>>,
}

impl Upstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener).await
    }

    pub async fn start_on(listener: TcpListener) -> Self {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(UpstreamState::default());
        let router = axum::Router::new()
            .fallback(upstream_handler)
            .with_state(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            state,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every execution so far.
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Executions on one path.
    pub fn calls_to(&self, path: &str) -> u64 {
        self.state
            .by_path
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Executions per path so far: the upstream's journal.
    pub fn executions(&self) -> HashMap<String, u64> {
        self.state.by_path.lock().unwrap().clone()
    }

    /// The headers of the last request the upstream received.
    pub fn last_headers(&self) -> HeaderMap {
        self.state.last_headers.lock().unwrap().clone().unwrap()
    }

    /// Waits until the upstream has started `n` executions.
    pub async fn wait_for_calls(&self, n: u64) {
        for _ in 0..1000 {
            if self.calls() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "the upstream never reached {n} calls (has {})",
            self.calls()
        );
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.state.unhang.notify_waiters();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn query_param(query: Option<&str>, name: &str) -> Option<u64> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

async fn upstream_handler(
    axum::extract::State(state): axum::extract::State<Arc<UpstreamState>>,
    request: Request<Body>,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query();
    let n = state.calls.fetch_add(1, Ordering::SeqCst) + 1;
    *state
        .by_path
        .lock()
        .unwrap()
        .entry(path.clone())
        .or_default() += 1;
    *state.last_headers.lock().unwrap() = Some(parts.headers.clone());

    if path == "/hang" {
        let parked = state.unhang.notified();
        let _ = tokio::time::timeout(Duration::from_secs(120), parked).await;
    }
    if let Some(ms) = query_param(query, "ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("?").to_string())
    };
    let mut builder = Response::builder()
        .header("set-cookie", format!("session=s{n}; HttpOnly"))
        .header("x-execution", n.to_string());
    let response = if let Some(code) = path.strip_prefix("/status/") {
        builder
            .status(code.parse::<u16>().unwrap_or(500))
            .header("content-type", "application/json")
            .body(Body::from(format!(
                r#"{{"execution":{n},"status":{code}}}"#
            )))
    } else if path == "/big" {
        let size = query_param(query, "bytes").unwrap_or(1 << 20) as usize;
        let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        builder
            .status(200)
            .header("content-type", "application/octet-stream")
            .body(Body::from(data))
    } else if path == "/echo" {
        builder
            .status(200)
            .header("content-type", "application/octet-stream")
            .body(Body::from(body))
    } else {
        builder = builder
            .status(201)
            .header("content-type", "application/json");
        let doc = serde_json::json!({
            "execution": n,
            "path": path,
            "key": header("idempotency-key"),
            "authorization": header("authorization"),
        });
        builder.body(Body::from(doc.to_string()))
    };
    response.unwrap()
}

/// A gateway served in-process on a loopback port, with its admin listener.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub app: App,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    admin_task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// `upstream = "..."` followed by `rest`.
pub fn config_for(upstream: &Upstream, rest: &str) -> Config {
    let text = format!("upstream = \"{}\"\n{rest}", upstream.url());
    Config::from_toml(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

impl Gateway {
    pub async fn start(config: Config, store: Arc<dyn Store>) -> Self {
        Self::start_with_secret(config, store, b"test secret").await
    }

    pub async fn start_with_secret(config: Config, store: Arc<dyn Store>, secret: &[u8]) -> Self {
        let app = App::new(&config, store, secret).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = admin_listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(listener, app.clone(), async {
            let _ = stopped.await;
        }));
        let admin_task = tokio::spawn(admin::run(
            admin_listener,
            AdminState::new(&app),
            std::future::pending(),
        ));
        Self {
            addr,
            admin,
            app,
            stop: Some(stop),
            task: Some(task),
            admin_task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Signals shutdown and waits for the drain.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        self.admin_task.abort();
    }

    /// Signals shutdown without waiting.
    pub fn begin_stop(&mut self) -> tokio::task::JoinHandle<std::io::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.admin_task.abort();
    }
}

/// An answer, read in full.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {:?} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    pub fn replayed(&self) -> Option<&str> {
        self.header("idempotent-replayed")
    }

    /// The `type` of a problem document, without the common prefix.
    pub fn problem(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{:?} {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        let kind = self.json()["type"].as_str().unwrap().to_string();
        kind.trim_start_matches("https://idem.dev/problems/")
            .to_string()
    }

    /// The upstream's execution number in a `201` document.
    pub fn execution(&self) -> u64 {
        self.json()["execution"].as_u64().unwrap()
    }
}

/// A request under construction.
pub struct Req {
    method: Method,
    url: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

pub fn req(method: &str, url: impl Into<String>) -> Req {
    Req {
        method: Method::from_bytes(method.as_bytes()).unwrap(),
        url: url.into(),
        headers: Vec::new(),
        body: Bytes::new(),
    }
}

pub fn post(url: impl Into<String>) -> Req {
    req("POST", url)
}

impl Req {
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        ));
        self
    }

    pub fn key(self, key: &str) -> Self {
        self.header("idempotency-key", key)
    }

    pub fn json(self, body: &str) -> Self {
        let mut this = self.header("content-type", "application/json");
        this.body = Bytes::copy_from_slice(body.as_bytes());
        this
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    pub async fn send(self) -> Answer {
        self.try_send().await.unwrap()
    }

    pub async fn try_send(self) -> Result<Answer, String> {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        self.send_with(&client).await
    }

    pub async fn send_with(
        self,
        client: &Client<HttpConnector, Full<Bytes>>,
    ) -> Result<Answer, String> {
        let mut request = Request::builder().method(self.method).uri(&self.url);
        for (name, value) in self.headers {
            request = request.header(name, value);
        }
        let request = request.body(Full::new(self.body)).unwrap();
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("{e:?}"))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("{e:?}"))?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// The `idem` binary, running.
pub struct Binary {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// Every log line so far.
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Binary {
    /// Starts `idem serve` with `args` (plus `--log-format json`) in `dir`, and waits
    /// until it listens.
    pub fn serve(dir: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_idem"))
            .arg("--log-format")
            .arg("json")
            .arg("serve")
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .env_remove(idem_server::config::SECRET_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<(String, SocketAddr)>();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let kept = logs.clone();
        // Reads the log for the listening addresses, then keeps draining it.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                kept.lock().unwrap().push(line.clone());
                let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                    eprintln!("idem: {line}");
                    continue;
                };
                let fields = &entry["fields"];
                let message = fields["message"].as_str().unwrap_or_default().to_string();
                if let Some(addr) = fields["addr"].as_str().and_then(|a| a.parse().ok()) {
                    let _ = tx.send((message.clone(), addr));
                }
                if entry["level"] != "INFO" {
                    eprintln!("idem: {line}");
                }
            }
        });
        let mut addr = None;
        let mut admin = None;
        let wants_admin = args.contains(&"--admin-listen");
        while addr.is_none() || (wants_admin && admin.is_none()) {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok((message, a)) if message == "gateway listening" => addr = Some(a),
                Ok((message, a)) if message == "admin listening" => admin = Some(a),
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    panic!("idem serve did not start: {:?}", child.wait());
                }
            }
        }
        Self {
            child,
            addr: addr.unwrap(),
            admin,
            logs,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// kill -9.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `idem ARGS` to completion: (exit code, stdout, stderr).
pub fn idem(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .current_dir(dir)
        .env_remove(idem_server::config::SECRET_ENV)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
