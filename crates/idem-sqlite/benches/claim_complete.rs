//! Claim throughput of the memory and embedded stores, against the raw engine.
//!
//! Run: `cargo bench -p idem-sqlite --bench claim_complete`, then
//! `python3 bench/claims_report.py` for the table with ratios (docs/benchmarks.md).
//!
//! - `claim/<store>/<tasks>`: single claims of fresh ids from 1, 16 and 64 concurrent tasks;
//!   one element is one claim. Claims of the embedded store are durable (synced) when
//!   they return.
//! - `claim/raw-sqlite/<tasks>`: the baseline, SQLite itself doing what a claim must at
//!   least do: one durable single-row insert per operation (WAL, `synchronous=FULL`, one
//!   connection per task, autocommit), measured in the same run.
//! - `claim_complete/<store>/<tasks>`: a claim and its completion with a 200-byte result.
//! - `claim_batch/<store>/<size>`: batch claims of 100 and 1,000 fresh ids; one element is
//!   one id.

#![allow(missing_docs, clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idem_core::{ClaimOutcome, ClaimRequest, Fingerprint, MemoryStore, RecordId, Store};
use idem_sqlite::{SqliteOptions, SqliteStore};

const CONCURRENCY: [usize; 3] = [1, 16, 64];

fn fresh_id() -> RecordId {
    static N: AtomicU64 = AtomicU64::new(0);
    RecordId::for_event("bench", &N.fetch_add(1, Ordering::Relaxed).to_string())
}

fn request() -> ClaimRequest {
    ClaimRequest::new(fresh_id(), Fingerprint::of_bytes(b"{\"amount\":100}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `total` operations spread over `tasks` concurrent tasks; returns the elapsed time.
fn run_concurrent<F, Fut>(rt: &tokio::runtime::Runtime, tasks: usize, total: u64, op: F) -> Duration
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    rt.block_on(async move {
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let op = op.clone();
                let share = total / tasks as u64 + u64::from((t as u64) < total % tasks as u64);
                tokio::spawn(async move {
                    for _ in 0..share {
                        op().await;
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        start.elapsed()
    })
}

fn stores(dir: &Path) -> Vec<(&'static str, Arc<dyn Store>)> {
    let options = SqliteOptions::default().with_reaper_interval(None);
    vec![
        ("memory", Arc::new(MemoryStore::new()) as Arc<dyn Store>),
        (
            "sqlite",
            Arc::new(SqliteStore::open(dir.join("bench.db"), options).unwrap()),
        ),
    ]
}

fn raw_connection(path: &Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(60)).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn
}

fn claims(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let rt = runtime();
    let stores = rt.block_on(async { stores(dir.path()) });
    let raw_path = dir.path().join("raw.db");
    raw_connection(&raw_path)
        .execute_batch(
            "CREATE TABLE IF NOT EXISTS raw (id BLOB PRIMARY KEY, fingerprint BLOB NOT NULL, \
             token INTEGER NOT NULL, lease_until INTEGER NOT NULL)",
        )
        .unwrap();

    let mut group = c.benchmark_group("claim");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    for tasks in CONCURRENCY {
        for (name, store) in &stores {
            group.bench_with_input(BenchmarkId::new(*name, tasks), &tasks, |b, &tasks| {
                b.iter_custom(|iters| {
                    let store = store.clone();
                    run_concurrent(&rt, tasks, iters, move || {
                        let store = store.clone();
                        async move {
                            let outcome = store.claim(&request()).await.unwrap();
                            assert!(matches!(outcome, ClaimOutcome::Acquired(_)));
                        }
                    })
                })
            });
        }
        group.bench_with_input(BenchmarkId::new("raw-sqlite", tasks), &tasks, |b, &tasks| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                std::thread::scope(|scope| {
                    for t in 0..tasks {
                        let share = iters / tasks as u64 + u64::from((t as u64) < iters % tasks as u64);
                        let path = raw_path.clone();
                        scope.spawn(move || {
                            let conn = raw_connection(&path);
                            let mut insert = conn
                                .prepare("INSERT INTO raw (id, fingerprint, token, lease_until) VALUES (?1, ?2, ?3, ?4)")
                                .unwrap();
                            for _ in 0..share {
                                let req = request();
                                insert
                                    .execute(rusqlite::params![
                                        &req.id.as_bytes()[..],
                                        &req.fingerprint.as_bytes()[..],
                                        1i64,
                                        2i64
                                    ])
                                    .unwrap();
                            }
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("claim_complete");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    let response = Bytes::from(vec![b'x'; 200]);
    for tasks in CONCURRENCY {
        for (name, store) in &stores {
            group.bench_with_input(BenchmarkId::new(*name, tasks), &tasks, |b, &tasks| {
                b.iter_custom(|iters| {
                    let store = store.clone();
                    let response = response.clone();
                    run_concurrent(&rt, tasks, iters, move || {
                        let store = store.clone();
                        let response = response.clone();
                        async move {
                            let ClaimOutcome::Acquired(lease) =
                                store.claim(&request()).await.unwrap()
                            else {
                                panic!("fresh ids are acquired")
                            };
                            store
                                .complete(&lease.id, lease.token, response)
                                .await
                                .unwrap();
                        }
                    })
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("claim_batch");
    group.measurement_time(Duration::from_secs(5));
    for size in [100usize, 1_000] {
        group.throughput(Throughput::Elements(size as u64));
        for (name, store) in &stores {
            group.bench_with_input(BenchmarkId::new(*name, size), &size, |b, &size| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut elapsed = Duration::ZERO;
                        for _ in 0..iters {
                            let batch: Vec<ClaimRequest> = (0..size).map(|_| request()).collect();
                            let start = Instant::now();
                            let outcomes = store.claim_batch(&batch).await.unwrap();
                            elapsed += start.elapsed();
                            assert_eq!(outcomes.len(), size);
                        }
                        elapsed
                    })
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, claims);
criterion_main!(benches);
