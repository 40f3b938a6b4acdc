//! `retained-keys`: how the memory and embedded stores behave as completed records pile up.
//!
//! ```text
//! retained-keys --store memory|sqlite [--max 10000000] [--samples 2000]
//!               [--response-bytes 100] [--dir DIR]
//! ```
//!
//! Fills the store with completed records (a claim and a completion each, with a response
//! of `--response-bytes`, retention 24 h) and, at 10 K, 100 K, 1 M and 10 M retained
//! records (up to `--max`), measures:
//!
//! - the space per retained record: the process's resident memory over its level before
//!   the fill (memory store), or the database and WAL files' size (embedded store);
//! - single claims of fresh ids, one at a time: p50 and p99 (embedded: durable, so each
//!   one waits for its sync to disk);
//! - single claims of completed ids picked at random (replays): p50 and p99.
//!
//! The embedded store is filled with `claim_batch` in large batches and with many
//! completions in flight, so that group commit packs them into few transactions. Its file
//! lives in `--dir` (default: a temporary directory), deleted at the end. Prints one
//! Markdown table row per checkpoint on standard output, progress on standard error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use idem_bench::{flag, percentile};
use idem_core::{ClaimOutcome, ClaimRequest, Fingerprint, MemoryStore, RecordId, Store};
use idem_sqlite::{SqliteOptions, SqliteStore};

const CHECKPOINTS: [u64; 4] = [10_000, 100_000, 1_000_000, 10_000_000];
const FILL_BATCH: u64 = 10_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kind: String = flag(&args, "--store", "memory".to_string());
    let max: u64 = flag(&args, "--max", 10_000_000);
    let samples: usize = flag(&args, "--samples", 2_000);
    let response_bytes: usize = flag(&args, "--response-bytes", 100);
    let dir: String = flag(&args, "--dir", String::new());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let baseline_rss = rss_bytes();
        let tempdir = tempfile::Builder::new()
            .prefix("idem-retained-keys")
            .tempdir_in(if dir.is_empty() {
                std::env::temp_dir()
            } else {
                dir.into()
            })
            .expect("a temporary directory");
        let db_path = tempdir.path().join("retained.db");
        let store: Arc<dyn Store> = match kind.as_str() {
            "memory" => Arc::new(MemoryStore::new()),
            "sqlite" => {
                let path = db_path.clone();
                let opened = tokio::task::spawn_blocking(move || {
                    SqliteStore::open(&path, SqliteOptions::default())
                })
                .await
                .expect("open does not panic");
                Arc::new(opened.expect("the embedded store opens"))
            }
            other => panic!("--store memory|sqlite, not {other:?}"),
        };
        let bench = Bench {
            store,
            fingerprint: Fingerprint::of_bytes(b"{\"amount\":100}"),
            response_bytes,
        };
        println!(
            "| store | retained records | bytes per record | fresh claim p50 | fresh claim p99 | replay p50 | replay p99 |"
        );
        println!("|---|---|---|---|---|---|---|");
        let mut filled = 0u64;
        let fill_start = Instant::now();
        for checkpoint in CHECKPOINTS.into_iter().filter(|c| *c <= max) {
            bench.fill(filled, checkpoint).await;
            filled = checkpoint;
            eprintln!(
                "retained-keys: {kind}: {filled} records after {:.1?}",
                fill_start.elapsed()
            );
            let space = match kind.as_str() {
                "memory" => rss_bytes().saturating_sub(baseline_rss),
                _ => file_bytes(&db_path),
            };
            let fresh = bench.fresh_claims(checkpoint, samples).await;
            let replays = bench.replays(filled, samples).await;
            println!(
                "| {} | {} | {:.0} | {} | {} | {} | {} |",
                if kind == "memory" { "memory" } else { "embedded (sqlite)" },
                count(checkpoint),
                space as f64 / checkpoint as f64,
                micros(percentile(&fresh, 50.0)),
                micros(percentile(&fresh, 99.0)),
                micros(percentile(&replays, 50.0)),
                micros(percentile(&replays, 99.0)),
            );
        }
    });
}

struct Bench {
    store: Arc<dyn Store>,
    fingerprint: Fingerprint,
    response_bytes: usize,
}

impl Bench {
    fn request(&self, id: RecordId) -> ClaimRequest {
        ClaimRequest::new(id, self.fingerprint)
    }

    /// Adds completed records `from..to`.
    async fn fill(&self, from: u64, to: u64) {
        let mut next = from;
        while next < to {
            let end = (next + FILL_BATCH).min(to);
            let requests: Vec<ClaimRequest> =
                (next..end).map(|i| self.request(filled_id(i))).collect();
            let outcomes = self
                .store
                .claim_batch(&requests)
                .await
                .expect("claim_batch");
            let completions = outcomes.into_iter().map(|outcome| {
                let ClaimOutcome::Acquired(lease) = outcome else {
                    panic!("a fresh id was not acquired: {outcome:?}");
                };
                // One allocation per response, as a store holding real answers has.
                let response = Bytes::from(vec![b'r'; self.response_bytes]);
                let store = self.store.clone();
                async move {
                    store
                        .complete(&lease.id, lease.token, response)
                        .await
                        .expect("complete");
                }
            });
            join_all(completions).await;
            next = end;
        }
    }

    /// Times `samples` single claims of ids never seen before, one after the other.
    async fn fresh_claims(&self, checkpoint: u64, samples: usize) -> Vec<Duration> {
        let mut times = Vec::with_capacity(samples);
        for i in 0..samples {
            let request = self.request(RecordId::for_event(
                "retained-keys-probe",
                &format!("{checkpoint}-{i}"),
            ));
            let start = Instant::now();
            let outcome = self.store.claim(&request).await.expect("claim");
            times.push(start.elapsed());
            assert!(matches!(outcome, ClaimOutcome::Acquired(_)), "{outcome:?}");
        }
        times.sort_unstable();
        times
    }

    /// Times `samples` single claims of completed ids among the first `filled`, at random.
    async fn replays(&self, filled: u64, samples: usize) -> Vec<Duration> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ filled;
        let mut times = Vec::with_capacity(samples);
        for _ in 0..samples {
            // xorshift64*: a cheap, deterministic spread over the filled ids.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let i = state.wrapping_mul(0x2545_f491_4f6c_dd1d) % filled;
            let request = self.request(filled_id(i));
            let start = Instant::now();
            let outcome = self.store.claim(&request).await.expect("claim");
            times.push(start.elapsed());
            assert!(matches!(outcome, ClaimOutcome::Completed(_)), "{outcome:?}");
        }
        times.sort_unstable();
        times
    }
}

fn filled_id(i: u64) -> RecordId {
    RecordId::for_event("retained-keys", &i.to_string())
}

/// The process's resident set size (`VmRSS` in `/proc/self/status`).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// The database file and its WAL, in bytes.
fn file_bytes(db: &std::path::Path) -> u64 {
    let wal = db.with_extension("db-wal");
    [db.to_path_buf(), wal]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

fn micros(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} µs")
    }
}

fn count(n: u64) -> String {
    match n {
        n if n >= 1_000_000 => format!("{} M", n / 1_000_000),
        n if n >= 1_000 => format!("{} K", n / 1_000),
        n => n.to_string(),
    }
}
