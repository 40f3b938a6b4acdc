//! `idem demo`: the whole story on one machine, in a few seconds.
//!
//! An example payments upstream ([`crate::payments`]) and the gateway (embedded store in
//! a temporary directory) start on loopback ports. A client then makes N payments through
//! a lossy network: a share of the answers is dropped after the upstream answered, and the
//! client retries with the same idempotency key until it gets one. The same run is then
//! made straight against the upstream, without idem, to show what the retries would have
//! cost.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};

use crate::config::Config;
use crate::payments::{self, Ledger};
use crate::server::{self, App};
use crate::store::StoreUrl;

/// The most times the client sends one payment.
const MAX_ATTEMPTS: u64 = 50;

/// How the demo runs.
#[derive(Clone, Copy, Debug)]
pub struct DemoOptions {
    /// Payments to make.
    pub payments: usize,
    /// The share of answers dropped, 0 to 0.9.
    pub drop_rate: f64,
    /// Payments in flight at once.
    pub concurrency: usize,
    /// The seed of the network's dice.
    pub seed: u64,
}

/// What one run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    /// Requests the client sent.
    pub requests: u64,
    /// Requests beyond the first of each payment.
    pub retries: u64,
    /// Answers the gateway replayed from its store.
    pub replayed: u64,
    /// Charges the upstream made.
    pub executions: u64,
    /// Charges beyond the first of each payment.
    pub duplicate_charges: u64,
    /// Payments charged more than once.
    pub payments_charged_twice: u64,
    /// Payments that never got an answer through.
    pub failed: u64,
}

/// The outcome of the demo: the run with idem and the run without.
#[derive(Clone, Debug)]
pub struct Report {
    /// The options it ran with.
    pub options: DemoOptions,
    /// Through the gateway.
    pub with_idem: RunStats,
    /// Straight to the upstream.
    pub without_idem: RunStats,
    /// How long it all took.
    pub elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (w, wo) = (&self.with_idem, &self.without_idem);
        writeln!(
            f,
            "idem demo: {} payments through a network that drops {:.0}% of the answers \
             (seed {})\n",
            self.options.payments,
            self.options.drop_rate * 100.0,
            self.options.seed
        )?;
        writeln!(f, "  {:<34}{:>12}{:>15}", "", "with idem", "without idem")?;
        let rows: [(&str, u64, String); 6] = [
            ("requests sent", w.requests, wo.requests.to_string()),
            ("retries (same key)", w.retries, wo.retries.to_string()),
            ("answers replayed from the store", w.replayed, "-".into()),
            (
                "upstream executions",
                w.executions,
                wo.executions.to_string(),
            ),
            (
                "duplicate charges",
                w.duplicate_charges,
                wo.duplicate_charges.to_string(),
            ),
            (
                "duplicates prevented",
                w.requests.saturating_sub(w.executions),
                "0".into(),
            ),
        ];
        for (name, with, without) in rows {
            writeln!(f, "  {name:<34}{with:>12}{without:>15}")?;
        }
        writeln!(f)?;
        if w.duplicate_charges == 0 {
            writeln!(
                f,
                "with idem every payment was charged exactly once; without it {} payment(s) \
                 were charged more than once.",
                wo.payments_charged_twice
            )?;
        } else {
            writeln!(
                f,
                "FAILURE: {} payment(s) were charged more than once through idem.",
                w.payments_charged_twice
            )?;
        }
        if w.failed + wo.failed > 0 {
            writeln!(
                f,
                "{} payment(s) got no answer through after {MAX_ATTEMPTS} attempts.",
                w.failed + wo.failed
            )?;
        }
        writeln!(f, "finished in {:.1}s", self.elapsed.as_secs_f64())
    }
}

/// Runs the demo.
pub async fn run(options: DemoOptions) -> anyhow::Result<Report> {
    let start = Instant::now();
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;

    // The payments upstream.
    let ledger = Arc::new(Ledger::default());
    let (upstream_addr, stop_upstream, upstream) = start_payments(ledger.clone()).await?;

    // The gateway, on the embedded store.
    let store_url = StoreUrl::Sqlite(dir.path().join("idem.db"));
    let store = store_url
        .open()
        .await
        .context("cannot open the demo store")?;
    let config = Config::from_toml(&format!(
        "upstream = \"http://{upstream_addr}\"\n\
         [[routes]]\n\
         path = \"/v1/payments\"\n\
         key = \"required\"\n"
    ))
    .map_err(|e| anyhow::anyhow!("demo configuration: {e}"))?;
    let app = App::new(&config, store.clone(), b"idem demo secret")
        .map_err(|e| anyhow::anyhow!("cannot set up the gateway: {e}"))?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let gateway_addr = listener.local_addr()?;
    let (stop_gateway, gateway_stopped) = oneshot::channel::<()>();
    let gateway = tokio::spawn(server::run(listener, app, async {
        let _ = gateway_stopped.await;
    }));

    let with_idem = client_run(gateway_addr, options, &ledger).await;
    let _ = stop_gateway.send(());
    let _ = gateway.await;
    let _ = tokio::task::spawn_blocking(move || drop(store)).await;
    let _ = stop_upstream.send(());
    let _ = upstream.await;

    // The same run, straight to a fresh upstream.
    let ledger = Arc::new(Ledger::default());
    let (upstream_addr, stop_upstream, upstream) = start_payments(ledger.clone()).await?;
    let without_idem = client_run(upstream_addr, options, &ledger).await;
    let _ = stop_upstream.send(());
    let _ = upstream.await;

    Ok(Report {
        options,
        with_idem,
        without_idem,
        elapsed: start.elapsed(),
    })
}

type Stopper = oneshot::Sender<()>;
type Running = tokio::task::JoinHandle<std::io::Result<()>>;

async fn start_payments(ledger: Arc<Ledger>) -> anyhow::Result<(SocketAddr, Stopper, Running)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(payments::serve(listener, ledger, async {
        let _ = stopped.await;
    }));
    Ok((addr, stop, running))
}

/// A small deterministic generator for the network's dice (xorshift64*).
struct Dice(u64);

impl Dice {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// A number in [0, 1).
    fn roll(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    replayed: AtomicU64,
    failed: AtomicU64,
}

async fn client_run(target: SocketAddr, options: DemoOptions, ledger: &Ledger) -> RunStats {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let counters = Arc::new(Counters::default());
    let permits = Arc::new(Semaphore::new(options.concurrency));
    let mut tasks = Vec::with_capacity(options.payments);
    for i in 0..options.payments {
        let client = client.clone();
        let counters = counters.clone();
        let permits = permits.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(_permit) = permits.acquire_owned().await else {
                return;
            };
            pay(&client, target, options, i, &counters).await;
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let requests = counters.requests.load(Ordering::SeqCst);
    RunStats {
        requests,
        retries: requests.saturating_sub(options.payments as u64),
        replayed: counters.replayed.load(Ordering::SeqCst),
        executions: ledger.total(),
        duplicate_charges: ledger.duplicates(),
        payments_charged_twice: ledger.payments_charged_twice(),
        failed: counters.failed.load(Ordering::SeqCst),
    }
}

/// Sends one payment until an answer gets through the lossy network.
async fn pay(
    client: &Client<HttpConnector, Full<Bytes>>,
    target: SocketAddr,
    options: DemoOptions,
    i: usize,
    counters: &Counters,
) {
    let mut dice = Dice::new(options.seed ^ (i as u64).wrapping_mul(0x1000_0000_01b3));
    let payment = format!("pay_{i:05}");
    let body = Bytes::from(format!(
        r#"{{"payment_id":"{payment}","amount":{}}}"#,
        1000 + i
    ));
    for _ in 0..MAX_ATTEMPTS {
        counters.requests.fetch_add(1, Ordering::SeqCst);
        let request = Request::post(format!("http://{target}/v1/payments"))
            .header("content-type", "application/json")
            .header("idempotency-key", format!("\"{payment}\""))
            .header("authorization", "Bearer demo-merchant")
            .header("prefer", "wait=5")
            .body(Full::new(body.clone()));
        let Ok(request) = request else {
            break;
        };
        let answer = match client.request(request).await {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                body.collect().await.ok().map(|_| parts)
            }
            Err(_) => None,
        };
        let replayed = answer.as_ref().is_some_and(|parts| {
            parts
                .headers
                .get("idempotent-replayed")
                .is_some_and(|v| v == "true")
        });
        if replayed {
            counters.replayed.fetch_add(1, Ordering::SeqCst);
        }
        // The network loses this answer: the client never sees it and tries again.
        if dice.roll() < options.drop_rate {
            continue;
        }
        let Some(parts) = answer else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        if parts.status == StatusCode::CONFLICT || parts.status.is_server_error() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        return;
    }
    counters.failed.fetch_add(1, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dice_are_uniform_enough_and_deterministic() {
        let mut a = Dice::new(1);
        let mut b = Dice::new(1);
        let rolls: Vec<f64> = (0..10_000).map(|_| a.roll()).collect();
        assert!(rolls.iter().all(|r| (0.0..1.0).contains(r)));
        let below = rolls.iter().filter(|r| **r < 0.3).count();
        assert!((2_500..3_500).contains(&below), "{below}");
        assert_eq!(b.roll(), rolls[0]);
    }
}
