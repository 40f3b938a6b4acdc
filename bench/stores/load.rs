//! The claim load driver behind the shared stores' load examples
//! (`crates/idem-postgres/examples/postgres_claims.rs`,
//! `crates/idem-redis/examples/redis_claims.rs`), included by both with `#[path]`.
//!
//! N tasks each claim fresh record ids one after the other (`Store::claim`, one claim in
//! flight per task), for a warm-up and then a measured period; the driver prints one line:
//! `claims/s <rate> concurrency <N> claims <count> seconds <elapsed>`. Every claim must be
//! `Acquired` (the ids are fresh), or the run fails. With `--complete`, each task completes
//! every record it claimed (a 200-byte response) before its next claim, as the gateway does
//! for every executed request: the rate is then of claim-and-complete pairs.
//!
//! ```text
//! postgres_claims|redis_claims URL [--concurrency N] [--seconds S] [--warmup S] [--pool-size P]
//!                                   [--complete]
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idem_core::{ClaimOutcome, ClaimRequest, Error, Fingerprint, RecordId, Store};

/// The response each completion stores with `--complete`: 200 bytes.
const RESPONSE: &[u8] = &[b'x'; 200];

/// The command line.
pub(crate) struct Args {
    /// The store's URL.
    pub(crate) url: String,
    /// Tasks claiming at once. Default 1.
    pub(crate) concurrency: usize,
    /// The measured period. Default 10 s.
    pub(crate) seconds: f64,
    /// The warm-up before it. Default 2 s.
    pub(crate) warmup: f64,
    /// Connections in the store's pool, where it has one.
    pub(crate) pool_size: Option<usize>,
    /// Complete each claimed record before the next claim.
    pub(crate) complete: bool,
}

const USAGE: &str = "usage: postgres_claims|redis_claims URL [--concurrency N] [--seconds S] [--warmup S] [--pool-size P] [--complete]";

/// Parses the command line.
pub(crate) fn args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        url: String::new(),
        concurrency: 1,
        seconds: 10.0,
        warmup: 2.0,
        pool_size: None,
        complete: false,
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        let number = |name: &str, v: String| {
            v.parse::<f64>()
                .map_err(|_| format!("{name}: not a number: {v}\n{USAGE}"))
        };
        match arg.as_str() {
            "--concurrency" => parsed.concurrency = number(&arg, value(&arg)?)?.max(1.0) as usize,
            "--seconds" => parsed.seconds = number(&arg, value(&arg)?)?,
            "--warmup" => parsed.warmup = number(&arg, value(&arg)?)?,
            "--pool-size" => parsed.pool_size = Some(number(&arg, value(&arg)?)?.max(1.0) as usize),
            "--complete" => parsed.complete = true,
            _ if parsed.url.is_empty() && !arg.starts_with('-') => parsed.url = arg,
            _ => return Err(format!("unexpected argument {arg}\n{USAGE}")),
        }
    }
    if parsed.url.is_empty() {
        return Err(USAGE.into());
    }
    Ok(parsed)
}

/// Runs the load and prints the result line.
pub(crate) async fn run(store: Arc<dyn Store>, args: &Args) -> Result<(), Error> {
    let run = format!(
        "bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let claims = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|task| {
            let (store, claims, stop, run) =
                (store.clone(), claims.clone(), stop.clone(), run.clone());
            let complete = args.complete;
            tokio::spawn(async move {
                let fingerprint = Fingerprint::of_bytes(b"claim_load");
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let id = RecordId::for_event(&run, &format!("{task}/{i}"));
                    let request = ClaimRequest::new(id, fingerprint)
                        .with_lease(Duration::from_secs(60))
                        .with_retention(Duration::from_secs(60));
                    match store.claim(&request).await? {
                        ClaimOutcome::Acquired(lease) if complete => {
                            store
                                .complete(&lease.id, lease.token, RESPONSE.into())
                                .await?;
                        }
                        ClaimOutcome::Acquired(_) => {}
                        other => {
                            return Err(Error::backend(
                                "claim_load: a fresh id was not acquired",
                                format!("{other:?}"),
                            ));
                        }
                    }
                    claims.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
                Ok(())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let (start, before) = (Instant::now(), claims.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs_f64(args.seconds)).await;
    let (elapsed, after) = (start.elapsed(), claims.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await
            .map_err(|e| Error::backend("claim_load: a task failed", e))??;
    }
    let count = after - before;
    println!(
        "claims/s {:.0} concurrency {} claims {count} seconds {:.3}",
        count as f64 / elapsed.as_secs_f64(),
        args.concurrency,
        elapsed.as_secs_f64()
    );
    Ok(())
}
