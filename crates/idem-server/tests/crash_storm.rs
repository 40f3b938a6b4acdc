//! Crash storms: the real `idem` binary is killed with SIGKILL at random moments and
//! restarted while clients push operations through it, each retried with its own key until
//! it gets a definitive answer. Afterwards the upstream's own journal, the clients' answers
//! and the store must agree: no key executed twice, every operation either executed once
//! and answered or told `outcome-unknown` (executed at most once), no record left in
//! flight.
//!
//! One test per store that survives the process: the embedded store (a file in a temporary
//! directory), PostgreSQL (`IDEM_TEST_POSTGRES_URL`), Redis (`IDEM_TEST_REDIS_URL`) and
//! Redis Cluster (`IDEM_TEST_REDIS_CLUSTER_URL`). The memory store forgets everything with
//! the process, by design, so it has no storm. Without a server's variable its storm is
//! skipped with a message, except under `CI=true`, where that is a failure.
//!
//! The quick run (300 operations, at least 10 kills per store) runs with the other tests.
//! The long run is the same tests with more operations and kills:
//!
//! ```sh
//! IDEM_CRASH_STORM_OPS=2000 IDEM_CRASH_STORM_KILLS=30 \
//!   cargo test -p idem-server --test crash_storm -- --nocapture --test-threads 1
//! ```
//!
//! `IDEM_CRASH_STORM_SEED` replays a run's random choices (kill moments, upstream delays,
//! client timeouts); the interleaving itself still depends on the machine.
//! `IDEM_CRASH_STORM_AMBIGUOUS=release` is the negative control: with the route's
//! `ambiguous = "release"`, documented to execute a taken-over request again, the storm
//! must report duplicate executions (and fail).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use idem_core::{PrincipalHasher, RecordId, RecordState, Store};
use idem_server::records::ScopeParts;
use idem_server::store::StoreUrl;
use idem_tower::stored::StoredOutcome;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Operations per store in the quick run.
const DEFAULT_OPS: usize = 300;
/// Kills per store in the quick run (at least).
const DEFAULT_KILLS: usize = 10;
/// The lease of every claim: short, so the claims of a killed gateway can be taken over
/// soon after.
const LEASE: Duration = Duration::from_secs(2);
/// Operations running at once, at most.
const CONCURRENCY: usize = 64;
/// Attempts one operation may make before the run counts it as unresolved.
const MAX_ATTEMPTS: u32 = 400;
/// How long an operation waits for a restarted gateway before it gives up.
const MAX_DOWN: Duration = Duration::from_secs(120);
/// How long a gateway lives between two kills, at random in this range (milliseconds).
const UPTIME_MS: (u64, u64) = (250, 900);
/// The principal every operation is sent as.
const PRINCIPAL: &str = "Bearer merchant-storm";
const SECRET: &str = "crash storm principal secret";
const ROUTE: &str = "/v1/charges";

// ---------------------------------------------------------------------------------------
// Randomness: a small seeded generator, so a run's choices can be replayed.

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// splitmix64.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `low..=high`.
    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }

    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn fork(&mut self) -> Rng {
        Rng::new(self.next())
    }
}

// ---------------------------------------------------------------------------------------
// Settings.

struct Settings {
    ops: usize,
    kills: usize,
    seed: u64,
    /// The route's `ambiguous` setting: `store` (the default, and what the storm proves),
    /// or `release`, the negative control: documented to execute again after a takeover,
    /// the storm must then find duplicates.
    ambiguous: String,
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

fn settings() -> Settings {
    let ops = env_number("IDEM_CRASH_STORM_OPS").map_or(DEFAULT_OPS, |n| n as usize);
    let kills = env_number("IDEM_CRASH_STORM_KILLS").map_or(DEFAULT_KILLS, |n| n as usize);
    assert!(ops > 0 && kills > 0, "a storm needs operations and kills");
    let seed = env_number("IDEM_CRASH_STORM_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            ^ u64::from(std::process::id())
    });
    let ambiguous = std::env::var("IDEM_CRASH_STORM_AMBIGUOUS").unwrap_or_else(|_| "store".into());
    assert!(
        ambiguous == "store" || ambiguous == "release",
        "IDEM_CRASH_STORM_AMBIGUOUS is store or release, not {ambiguous:?}"
    );
    Settings {
        ops,
        kills,
        seed,
        ambiguous,
    }
}

/// The server URL in `var`; `None` (skip, with a message) when it is not set, except
/// under `CI=true`.
fn server_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{var} is not set under CI=true: the crash storm on this store must run in CI")
        }
        _ => {
            eprintln!("skipping the crash storm: {var} is not set (point it at a server)");
            None
        }
    }
}

// ---------------------------------------------------------------------------------------
// The upstream: journals every execution by key, works a random few milliseconds.

#[derive(Default)]
struct Journal {
    executions: AtomicU64,
    by_key: Mutex<HashMap<String, Vec<u64>>>,
}

struct Upstream {
    addr: SocketAddr,
    journal: Arc<Journal>,
}

/// The upstream's delay for one execution, drawn from the request's body so that every
/// execution of a run is reproducible from its seed.
fn work_for(body: &Value) -> Duration {
    Duration::from_millis(body["work_ms"].as_u64().unwrap_or(0))
}

async fn start_upstream(run: String) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let journal = Arc::new(Journal::default());
    let state = (journal.clone(), Arc::<str>::from(run));
    let router = axum::Router::new().fallback(
        |axum::extract::State((journal, run)): axum::extract::State<(Arc<Journal>, Arc<str>)>,
         request: Request<Body>| async move {
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20)
                .await
                .unwrap_or_default();
            let key = parts
                .headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            // The side effect: one entry in the journal, before any delay, so a gateway
            // killed mid-request still leaves its execution on record.
            let n = journal.executions.fetch_add(1, Ordering::SeqCst) + 1;
            journal
                .by_key
                .lock()
                .unwrap()
                .entry(key.clone())
                .or_default()
                .push(n);
            let doc: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            tokio::time::sleep(work_for(&doc)).await;
            let answer = serde_json::json!({ "run": &*run, "key": key, "execution": n });
            Response::builder()
                .status(201)
                .header("content-type", "application/json")
                .body(Body::from(answer.to_string()))
                .unwrap()
        },
    );
    let router = router.with_state(state);
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    Upstream { addr, journal }
}

// ---------------------------------------------------------------------------------------
// The gateway: the real binary, killed and restarted.

/// The store a storm runs on.
enum Target {
    Embedded,
    Shared { name: &'static str, url: String },
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Embedded => "embedded",
            Target::Shared { name, .. } => name,
        }
    }
}

struct Launcher {
    dir: tempfile::TempDir,
    config: PathBuf,
    store: String,
    /// Lines of every gateway's standard error that are not JSON log lines (a panic's
    /// message) or are at level ERROR.
    alarms: Arc<Mutex<Vec<String>>>,
    /// Log lines by level, over every gateway of the run.
    levels: Arc<Mutex<BTreeMap<String, u64>>>,
}

struct Running {
    child: Child,
    addr: SocketAddr,
}

impl Launcher {
    fn new(target: &Target, upstream: SocketAddr, namespace: &str, ambiguous: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = match target {
            Target::Embedded => format!("sqlite://{}", dir.path().join("idem.db").display()),
            Target::Shared { url, .. } => url.clone(),
        };
        let config = dir.path().join("idem.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\n\
                 upstream = \"http://{upstream}\"\n\
                 store = \"{store}\"\n\
                 principal_secret = \"{SECRET}\"\n\
                 upstream_timeout = \"10s\"\n\
                 shutdown_grace = \"1s\"\n\
                 [defaults]\n\
                 key = \"required\"\n\
                 lease = \"{}ms\"\n\
                 retention = \"1h\"\n\
                 ambiguous = \"{ambiguous}\"\n\
                 namespace = \"{namespace}\"\n\
                 [[routes]]\n\
                 path = \"{ROUTE}\"\n",
                LEASE.as_millis()
            ),
        )
        .unwrap();
        Self {
            dir,
            config,
            store,
            alarms: Arc::default(),
            levels: Arc::default(),
        }
    }

    /// Starts `idem serve` and waits until it listens (blocking).
    fn start(&self) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_idem"))
            .args(["--log-format", "json", "serve", "--config"])
            .arg(&self.config)
            .current_dir(self.dir.path())
            .env("RUST_LOG", "info")
            .env_remove(idem_server::config::SECRET_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<SocketAddr>();
        let alarms = self.alarms.clone();
        let levels = self.levels.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                    alarms.lock().unwrap().push(line);
                    continue;
                };
                let level = entry["level"].as_str().unwrap_or("?").to_string();
                if level == "ERROR" {
                    alarms.lock().unwrap().push(line.clone());
                }
                *levels.lock().unwrap().entry(level).or_default() += 1;
                let fields = &entry["fields"];
                if fields["message"] == "gateway listening" {
                    if let Some(addr) = fields["addr"].as_str().and_then(|a| a.parse().ok()) {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => Running { child, addr },
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "idem serve did not start: {:?}; {:#?}",
                    child.wait(),
                    self.alarms.lock().unwrap()
                );
            }
        }
    }

    async fn start_async(self: &Arc<Self>) -> Running {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.start())
            .await
            .unwrap()
    }
}

impl Running {
    /// kill -9, and reap.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// The clients.

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// How one operation ended, from its client's side.
#[derive(Clone, Debug)]
enum Ending {
    /// A `201` from the upstream: first hand (`replayed == false`) or replayed.
    Answered {
        replayed: bool,
        execution: u64,
        body: Bytes,
    },
    /// The documented `outcome-unknown` problem.
    Unknown {
        status: StatusCode,
        reason: String,
        body: Bytes,
    },
    /// An answer outside the contract.
    Unexpected { status: StatusCode, body: String },
    /// No definitive answer within `MAX_ATTEMPTS` (or the gateway stayed down).
    Unresolved,
}

#[derive(Default)]
struct ClientCounts {
    attempts: AtomicU64,
    errors: AtomicU64,
    conflicts: AtomicU64,
    unavailable: AtomicU64,
}

struct Op {
    key: String,
    body: Bytes,
}

fn op(run: &str, i: usize, rng: &mut Rng) -> Op {
    // Most executions take a few milliseconds; one in ten takes long enough to outlive the
    // client's timeout and to need a lease renewal.
    let work_ms = if rng.chance(10) {
        rng.range(300, 2_500)
    } else {
        rng.range(1, 40)
    };
    let body = serde_json::json!({ "op": i, "amount": 100 + i, "work_ms": work_ms });
    Op {
        key: format!("{run}-{i}"),
        body: Bytes::from(body.to_string()),
    }
}

fn request(addr: SocketAddr, op: &Op) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}{ROUTE}"))
        .header("idempotency-key", &op.key)
        .header("authorization", PRINCIPAL)
        .header("content-type", "application/json")
        .body(Full::new(op.body.clone()))
        .unwrap()
}

async fn send(
    client: &HttpClient,
    request: Request<Full<Bytes>>,
    timeout: Duration,
) -> Result<(StatusCode, http::HeaderMap, Bytes), String> {
    let exchange = async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((parts.status, parts.headers, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

fn problem_type(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|doc| doc["type"].as_str().map(str::to_string))
        .unwrap_or_default()
        .trim_start_matches("https://idem.dev/problems/")
        .to_string()
}

/// Sends one operation until it gets a definitive answer, following the gateway wherever
/// it restarts.
async fn drive(
    client: HttpClient,
    gateway: watch::Receiver<Option<SocketAddr>>,
    op: Op,
    run: Arc<str>,
    mut rng: Rng,
    counts: Arc<ClientCounts>,
) -> Ending {
    let mut gateway = gateway;
    let mut attempts = 0;
    let mut down_since: Option<Instant> = None;
    while attempts < MAX_ATTEMPTS {
        let Some(addr) = *gateway.borrow_and_update() else {
            // Down: wait for the restart, without counting it as an attempt (but not
            // forever, should the restart have failed).
            if down_since.get_or_insert_with(Instant::now).elapsed() > MAX_DOWN {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), gateway.changed()).await;
            continue;
        };
        down_since = None;
        attempts += 1;
        counts.attempts.fetch_add(1, Ordering::Relaxed);
        // Usually patient; sometimes a client gives up after a few milliseconds and retries
        // while its first attempt still runs.
        let timeout = if rng.chance(5) {
            Duration::from_millis(rng.range(5, 50))
        } else {
            Duration::from_secs(1)
        };
        let (status, headers, body) = match send(&client, request(addr, &op), timeout).await {
            Ok(answer) => answer,
            Err(_) => {
                counts.errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(rng.range(5, 50))).await;
                continue;
            }
        };
        let retry_after = || {
            headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
                .min(5)
        };
        match status.as_u16() {
            201 => {
                let doc: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                if doc["run"] != *run || doc["key"] != op.key.as_str() {
                    return Ending::Unexpected {
                        status,
                        body: String::from_utf8_lossy(&body).into_owned(),
                    };
                }
                let replayed = match headers.get("idempotent-replayed").map(|v| v.as_bytes()) {
                    Some(b"true") => true,
                    Some(b"false") => false,
                    _ => {
                        return Ending::Unexpected {
                            status,
                            body: format!("no Idempotent-Replayed header: {headers:?}"),
                        };
                    }
                };
                return Ending::Answered {
                    replayed,
                    execution: doc["execution"].as_u64().unwrap_or(0),
                    body,
                };
            }
            409 if problem_type(&body) == "in-flight" => {
                counts.conflicts.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(retry_after())).await;
            }
            503 if problem_type(&body) == "store-unavailable" => {
                counts.unavailable.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(retry_after())).await;
            }
            502 | 504 if problem_type(&body) == "outcome-unknown" => {
                let reason = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|doc| doc["reason"].as_str().map(str::to_string))
                    .unwrap_or_default();
                return Ending::Unknown {
                    status,
                    reason,
                    body,
                };
            }
            _ => {
                return Ending::Unexpected {
                    status,
                    body: String::from_utf8_lossy(&body).into_owned(),
                };
            }
        }
    }
    Ending::Unresolved
}

// ---------------------------------------------------------------------------------------
// The storm.

/// What a storm counted.
#[derive(Debug, Default)]
struct Figures {
    ops: usize,
    kills: usize,
    executions: u64,
    answered_fresh: usize,
    answered_replayed: usize,
    /// Answered `201`, but the journal does not hold exactly that one execution.
    answered_inconsistent: usize,
    unknown_executed: usize,
    unknown_not_executed: usize,
    unknown_reasons: BTreeMap<String, usize>,
    duplicates: usize,
    stuck: usize,
    violations: Vec<String>,
}

async fn storm(target: Target) {
    let Settings {
        ops,
        kills,
        seed,
        ambiguous,
    } = settings();
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let run: Arc<str> = format!(
        "storm-{}-{}-{:x}",
        target.name().to_lowercase().replace(' ', "-"),
        std::process::id(),
        rng.next() & 0xFFFF_FFFF
    )
    .into();
    let upstream = start_upstream(run.to_string()).await;
    let launcher = Arc::new(Launcher::new(&target, upstream.addr, &run, &ambiguous));

    let first = launcher.start_async().await;
    let (address, gateway) = watch::channel(Some(first.addr));
    let (kill_count, kills_seen) = watch::channel(0usize);
    let (all_started, mut all_started_seen) = watch::channel(false);

    // The killer: SIGKILL at a random moment, a random pause while the gateway is down,
    // a restart; for as long as operations are being started. The last one starts after
    // the last planned kill; the operations still running then settle on a gateway that
    // stays up (under `ambiguous = "release"`, an operation that takes longer than a
    // gateway lives would otherwise run again and again until its client gives up).
    let killer = {
        let launcher = launcher.clone();
        let mut rng = rng.fork();
        tokio::spawn(async move {
            let mut running = first;
            let mut kills = 0;
            loop {
                let uptime = Duration::from_millis(rng.range(UPTIME_MS.0, UPTIME_MS.1));
                tokio::select! {
                    () = tokio::time::sleep(uptime) => {}
                    _ = all_started_seen.wait_for(|done| *done) => break,
                }
                address.send_replace(None);
                tokio::task::spawn_blocking(move || running.kill9())
                    .await
                    .unwrap();
                kills += 1;
                kill_count.send_replace(kills);
                tokio::time::sleep(Duration::from_millis(rng.range(0, 150))).await;
                running = launcher.start_async().await;
                address.send_replace(Some(running.addr));
            }
            running
        })
    };

    // The driver: operation i starts at its place in the schedule, and not before the
    // killer has done its share of kills, so the kills spread over the whole run.
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let counts = Arc::new(ClientCounts::default());
    let mean_uptime = (UPTIME_MS.0 + UPTIME_MS.1) / 2;
    let step = Duration::from_millis(mean_uptime * kills as u64) / ops as u32;
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = Vec::with_capacity(ops);
    let mut keys = Vec::with_capacity(ops);
    let driver_start = tokio::time::Instant::now();
    for i in 0..ops {
        tokio::time::sleep_until(driver_start + step * i as u32).await;
        let due = (i + 1) * kills / ops;
        let mut kills_seen = kills_seen.clone();
        kills_seen.wait_for(|k| *k >= due).await.unwrap();
        let permit = permits.clone().acquire_owned().await.unwrap();
        let op = op(&run, i, &mut rng);
        keys.push((op.key.clone(), op.body.clone()));
        let task = tokio::spawn(drive(
            client.clone(),
            gateway.clone(),
            op,
            run.clone(),
            rng.fork(),
            counts.clone(),
        ));
        tasks.push(tokio::spawn(async move {
            let ending = task.await.unwrap();
            drop(permit);
            ending
        }));
    }
    all_started.send_replace(true);
    let mut endings = Vec::with_capacity(ops);
    for task in tasks {
        endings.push(task.await.unwrap());
    }
    let last = killer.await.unwrap();
    let kills_done = *kills_seen.borrow();
    let storm_time = started.elapsed();
    tokio::task::spawn_blocking(move || last.kill9())
        .await
        .unwrap();

    // The journal and the answers.
    let journal = upstream.journal.by_key.lock().unwrap().clone();
    let mut figures = Figures {
        ops,
        kills: kills_done,
        executions: upstream.journal.executions.load(Ordering::SeqCst),
        ..Figures::default()
    };
    for (key, executions) in &journal {
        if executions.len() > 1 {
            figures.duplicates += 1;
            figures
                .violations
                .push(format!("{key}: executed {} times", executions.len()));
        }
        if !keys.iter().any(|(k, _)| k == key) {
            figures
                .violations
                .push(format!("{key}: executed, but no operation has this key"));
        }
    }
    for ((key, _), ending) in keys.iter().zip(&endings) {
        let executed = journal.get(key).map_or(&[][..], Vec::as_slice);
        match ending {
            Ending::Answered {
                replayed,
                execution,
                ..
            } => {
                if executed != [*execution] {
                    figures.answered_inconsistent += 1;
                    figures.violations.push(format!(
                        "{key}: answered with execution {execution}, the journal has {executed:?}"
                    ));
                } else if *replayed {
                    figures.answered_replayed += 1;
                } else {
                    figures.answered_fresh += 1;
                }
            }
            Ending::Unknown { reason, .. } => {
                *figures.unknown_reasons.entry(reason.clone()).or_default() += 1;
                if executed.is_empty() {
                    figures.unknown_not_executed += 1;
                } else {
                    figures.unknown_executed += 1;
                }
            }
            Ending::Unexpected { status, body } => figures
                .violations
                .push(format!("{key}: unexpected answer {status}: {body}")),
            Ending::Unresolved => figures.violations.push(format!(
                "{key}: no definitive answer after {MAX_ATTEMPTS} attempts"
            )),
        }
    }

    // The store, once every lease has passed: no record of the run in flight, and every
    // record holds exactly the answer its client got.
    tokio::time::sleep(LEASE + Duration::from_millis(500)).await;
    let hasher = PrincipalHasher::new(SECRET.as_bytes());
    let ids: Vec<RecordId> = keys
        .iter()
        .map(|(key, _)| {
            ScopeParts {
                namespace: Some(run.to_string()),
                principal: Some(PRINCIPAL.into()),
                method: "POST".into(),
                route: ROUTE.into(),
                path: None,
                key: key.clone(),
            }
            .record_id(&hasher)
            .unwrap()
        })
        .collect();
    {
        let store = StoreUrl::parse(&launcher.store)
            .unwrap()
            .open()
            .await
            .unwrap();
        for ((id, (key, _)), ending) in ids.iter().zip(&keys).zip(&endings) {
            check_record(&*store, id, key, ending, &mut figures).await;
        }
        // Closing the embedded store waits for its writer thread.
        tokio::task::spawn_blocking(move || drop(store))
            .await
            .unwrap();
    }

    // One more retry of every operation, through a fresh gateway: each is a replay of
    // exactly the answer its client got, and nothing executes again.
    let executions_before = upstream.journal.executions.load(Ordering::SeqCst);
    let gateway = launcher.start_async().await;
    let verify = Arc::new(Semaphore::new(16));
    let mut checks = Vec::new();
    for ((key, body), ending) in keys.iter().zip(&endings) {
        let op = Op {
            key: key.clone(),
            body: body.clone(),
        };
        let client = client.clone();
        let addr = gateway.addr;
        let verify = verify.clone();
        let ending = ending.clone();
        checks.push(tokio::spawn(async move {
            let _permit = verify.acquire_owned().await.unwrap();
            let answer = send(&client, request(addr, &op), Duration::from_secs(30)).await;
            replay_matches(&op.key, answer, &ending)
        }));
    }
    for check in checks {
        if let Err(violation) = check.await.unwrap() {
            figures.violations.push(violation);
        }
    }
    let executions_after = upstream.journal.executions.load(Ordering::SeqCst);
    if executions_after != executions_before {
        figures.violations.push(format!(
            "the verification retries executed {} operation(s) again",
            executions_after - executions_before
        ));
    }
    tokio::task::spawn_blocking(move || gateway.kill9())
        .await
        .unwrap();

    let alarms = launcher.alarms.lock().unwrap().clone();
    let levels = launcher.levels.lock().unwrap().clone();
    report(
        &target, &ambiguous, seed, storm_time, &figures, &counts, &levels,
    );
    let panics: Vec<&String> = alarms.iter().filter(|l| l.contains("panicked")).collect();
    assert!(panics.is_empty(), "the gateway panicked: {panics:#?}");
    if !alarms.is_empty() {
        eprintln!("gateway errors:\n{}", alarms.join("\n"));
    }
    assert!(
        figures.violations.is_empty(),
        "{} violation(s) (seed {seed}):\n{}",
        figures.violations.len(),
        figures.violations.join("\n")
    );
    assert_eq!(figures.duplicates, 0);
    assert_eq!(figures.stuck, 0);
    assert!(
        figures.kills >= kills,
        "{} kills, wanted {kills}",
        figures.kills
    );
}

/// The record of one operation, after the storm: completed, holding the answer the client
/// got.
async fn check_record(
    store: &dyn Store,
    id: &RecordId,
    key: &str,
    ending: &Ending,
    figures: &mut Figures,
) {
    let record = match store.get(id).await {
        Ok(record) => record,
        Err(error) => {
            figures
                .violations
                .push(format!("{key}: reading its record failed: {error}"));
            return;
        }
    };
    let Some(record) = record else {
        figures.violations.push(format!("{key}: no record"));
        return;
    };
    let response = match &record.state {
        RecordState::Completed { response, .. } => response,
        RecordState::InFlight { lease_until } => {
            figures.stuck += 1;
            figures.violations.push(format!(
                "{key}: still in flight after its lease (lease until {lease_until:?})"
            ));
            return;
        }
        RecordState::Released { .. } => {
            figures
                .violations
                .push(format!("{key}: released, yet its client got {ending:?}"));
            return;
        }
    };
    let stored = match StoredOutcome::decode(response) {
        Ok(StoredOutcome::Response(stored)) => stored,
        other => {
            figures
                .violations
                .push(format!("{key}: unexpected stored outcome {other:?}"));
            return;
        }
    };
    let (status, body) = match ending {
        Ending::Answered { body, .. } => (StatusCode::CREATED, body),
        Ending::Unknown { status, body, .. } => (*status, body),
        _ => return,
    };
    if stored.status != status || stored.body != *body {
        figures.violations.push(format!(
            "{key}: the store holds {} {:?}, the client got {status} {:?}",
            stored.status, stored.body, body
        ));
    }
}

fn replay_matches(
    key: &str,
    answer: Result<(StatusCode, http::HeaderMap, Bytes), String>,
    ending: &Ending,
) -> Result<(), String> {
    let (status, headers, body) = answer.map_err(|e| format!("{key}: verification: {e}"))?;
    let (want_status, want_body) = match ending {
        Ending::Answered { body, .. } => (StatusCode::CREATED, body),
        Ending::Unknown { status, body, .. } => (*status, body),
        _ => return Ok(()),
    };
    let replayed = headers
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    if status != want_status || body != *want_body || !replayed {
        return Err(format!(
            "{key}: verification retry got {status} (replayed: {replayed}) {:?}, the client \
             had {want_status} {want_body:?}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(())
}

fn report(
    target: &Target,
    ambiguous: &str,
    seed: u64,
    elapsed: Duration,
    f: &Figures,
    counts: &ClientCounts,
    levels: &BTreeMap<String, u64>,
) {
    let answered = f.answered_fresh + f.answered_replayed;
    let unknown = f.unknown_executed + f.unknown_not_executed;
    println!(
        "crash storm on the {} store: {} operations, {} kills \
         (ambiguous = {ambiguous}, seed {seed}, {:.1} s)\n\
         \x20 upstream executions                     {:>6}\n\
         \x20 executed once and answered              {:>6}  (first hand {}, replayed {})\n\
         \x20 outcome-unknown, reported to the client {:>6}  (executed {}, never executed {}; reasons {:?})\n\
         \x20 answered, but the journal disagrees      {:>6}\n\
         \x20 duplicates                              {:>6}\n\
         \x20 keys stuck in flight                    {:>6}\n\
         \x20 client attempts                         {:>6}  (connection errors and timeouts {}, 409 {}, 503 {})\n\
         \x20 gateway log lines by level              {levels:?}",
        target.name(),
        f.ops,
        f.kills,
        elapsed.as_secs_f64(),
        f.executions,
        answered,
        f.answered_fresh,
        f.answered_replayed,
        unknown,
        f.unknown_executed,
        f.unknown_not_executed,
        f.unknown_reasons,
        f.answered_inconsistent,
        f.duplicates,
        f.stuck,
        counts.attempts.load(Ordering::Relaxed),
        counts.errors.load(Ordering::Relaxed),
        counts.conflicts.load(Ordering::Relaxed),
        counts.unavailable.load(Ordering::Relaxed),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_storm_on_the_embedded_store_never_executes_twice() {
    storm(Target::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_storm_on_postgres_never_executes_twice() {
    let Some(url) = server_url("IDEM_TEST_POSTGRES_URL") else {
        return;
    };
    storm(Target::Shared {
        name: "PostgreSQL",
        url,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_storm_on_redis_never_executes_twice() {
    let Some(url) = server_url("IDEM_TEST_REDIS_URL") else {
        return;
    };
    storm(Target::Shared { name: "Redis", url }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_storm_on_redis_cluster_never_executes_twice() {
    let Some(url) = server_url("IDEM_TEST_REDIS_CLUSTER_URL") else {
        return;
    };
    storm(Target::Shared {
        name: "Redis Cluster",
        url,
    })
    .await;
}
