//! Races on one record, against every store the gateway can run on: the memory store, the
//! embedded store, PostgreSQL, Redis and Redis Cluster.
//!
//! | race | exact expected outcome |
//! |---|---|
//! | a holder completes at the moment its lease passes, while a claim arrives | either the completion stands (the claim replays it, or found the lease still running) or the claim took over (and the completion is `LeaseLost`, naming the new token); never both |
//! | a holder releases at the moment its lease passes, while a claim arrives | either the release stands (the claim acquires a fresh lifecycle, or found the lease still running) or the claim took over (and the release is `LeaseLost`); never both |
//! | two replicas claim the same expired lease at once | exactly one `TookOver` (naming the dead holder's token), the other `InFlight` until the winner's lease end |
//! | a stale holder completes after a takeover, racing the new holder's completion | the stale completion is `LeaseLost` naming the new token; the new holder's result is the one replayed |
//!
//! Each race runs [`ITERATIONS`] times with random delays around the lease end, in waves
//! of concurrent iterations, and every iteration asserts its outcome. Time is real (the
//! shared stores decide on their server's clock). For PostgreSQL and Redis, the two parties
//! of a race are two store instances (two connection pools, as two gateway replicas have);
//! the memory and embedded stores live in one process, so both parties share one handle
//! and race on two tasks.
//!
//! The servers come from `IDEM_TEST_POSTGRES_URL`, `IDEM_TEST_REDIS_URL` and
//! `IDEM_TEST_REDIS_CLUSTER_URL`; without one, its tests are skipped with a message, except
//! under `CI=true`, where that is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use idem_core::{
    ClaimOutcome, ClaimRequest, Error, FencingToken, Fingerprint, Lease, MemoryStore, RecordId,
    RecordState, Store,
};
use idem_postgres::{PostgresOptions, PostgresStore};
use idem_redis::{RedisOptions, RedisStore};
use idem_sqlite::{SqliteOptions, SqliteStore};

/// Iterations of each race, per store.
const ITERATIONS: usize = 50;
/// Iterations running at once.
const WAVE: usize = 10;
/// The lease every claim takes.
const LEASE: Duration = Duration::from_millis(250);
const RETENTION: Duration = Duration::from_secs(60);
/// The racing moment is the lease end plus or minus up to this.
const JITTER_MS: u64 = 15;

// ---------------------------------------------------------------------------------------
// The stores.

/// The two parties' handles on one store, and what keeps it alive.
struct Replicas {
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
    name: &'static str,
    _dir: Option<tempfile::TempDir>,
}

fn server_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{var} is not set under CI=true: the races on this store must run in CI")
        }
        _ => {
            eprintln!("skipping: {var} is not set (point it at a server to run the races)");
            None
        }
    }
}

fn unique(label: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    format!(
        "{label}{}_{now}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn memory() -> Option<Replicas> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    Some(Replicas {
        a: store.clone(),
        b: store,
        name: "memory",
        _dir: None,
    })
}

async fn embedded() -> Option<Replicas> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("races.db");
    let store = tokio::task::spawn_blocking(move || {
        SqliteStore::open(&path, SqliteOptions::default()).unwrap()
    })
    .await
    .unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    Some(Replicas {
        a: store.clone(),
        b: store,
        name: "embedded",
        _dir: Some(dir),
    })
}

async fn postgres() -> Option<Replicas> {
    let url = server_url("IDEM_TEST_POSTGRES_URL")?;
    let options = PostgresOptions {
        schema: "idem_races".into(),
        table: unique("t"),
        pool_size: 8,
        migrate: true,
    };
    let a = PostgresStore::connect(&url, options.clone()).await.unwrap();
    let b = PostgresStore::connect(&url, options).await.unwrap();
    Some(Replicas {
        a: Arc::new(a),
        b: Arc::new(b),
        name: "PostgreSQL",
        _dir: None,
    })
}

async fn redis_on(var: &str, name: &'static str) -> Option<Replicas> {
    let url = server_url(var)?;
    let options = RedisOptions {
        key_prefix: unique("idem-races:"),
        ..RedisOptions::default()
    };
    let a = RedisStore::connect(&url, options.clone()).await.unwrap();
    let b = RedisStore::connect(&url, options).await.unwrap();
    Some(Replicas {
        a: Arc::new(a),
        b: Arc::new(b),
        name,
        _dir: None,
    })
}

async fn redis() -> Option<Replicas> {
    redis_on("IDEM_TEST_REDIS_URL", "Redis").await
}

async fn redis_cluster() -> Option<Replicas> {
    redis_on("IDEM_TEST_REDIS_CLUSTER_URL", "Redis Cluster").await
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// A small seeded generator (splitmix64): each iteration draws its own delays.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn request(id: RecordId) -> ClaimRequest {
    ClaimRequest::new(id, Fingerprint::of_bytes(b"the operation"))
        .with_lease(LEASE)
        .with_retention(RETENTION)
}

async fn acquire(store: &dyn Store, id: RecordId) -> Lease {
    match store.claim(&request(id)).await.unwrap() {
        ClaimOutcome::Acquired(lease) => lease,
        other => panic!("a fresh record must be acquired: {other:?}"),
    }
}

/// Sleeps until `lease`'s end by the store's clock, moved by `offset_ms - JITTER_MS`
/// milliseconds (so `offset_ms` in `0..=2 * JITTER_MS` lands around the end).
async fn sleep_to_lease_end(store: &dyn Store, lease: &Lease, offset_ms: u64) {
    let now = store.now().await.unwrap();
    let until_end = now.until(lease.lease_until);
    let target = (until_end + Duration::from_millis(offset_ms))
        .saturating_sub(Duration::from_millis(JITTER_MS));
    tokio::time::sleep(target).await;
}

/// Sleeps until `lease` has certainly passed by the store's clock, plus up to `extra_ms`.
async fn sleep_past_lease_end(store: &dyn Store, lease: &Lease, extra_ms: u64) {
    loop {
        let now = store.now().await.unwrap();
        if now > lease.lease_until {
            break;
        }
        tokio::time::sleep(now.until(lease.lease_until) + Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(extra_ms)).await;
}

/// Runs `first` and `second` on two tasks, spawned in a random order, each after a random
/// pause of up to 3 ms; returns their results in argument order.
async fn race<A, B>(rng: &mut Rng, first: A, second: B) -> (A::Output, B::Output)
where
    A: Future + Send + 'static,
    A::Output: Send + 'static,
    B: Future + Send + 'static,
    B::Output: Send + 'static,
{
    let pause_a = Duration::from_micros(rng.below(3_000));
    let pause_b = Duration::from_micros(rng.below(3_000));
    let a = async move {
        tokio::time::sleep(pause_a).await;
        first.await
    };
    let b = async move {
        tokio::time::sleep(pause_b).await;
        second.await
    };
    if rng.below(2) == 0 {
        let a = tokio::spawn(a);
        let b = tokio::spawn(b);
        (a.await.unwrap(), b.await.unwrap())
    } else {
        let b = tokio::spawn(b);
        let a = tokio::spawn(a);
        (a.await.unwrap(), b.await.unwrap())
    }
}

fn lease_lost_current(result: &Result<(), Error>) -> Option<Option<FencingToken>> {
    match result {
        Err(Error::LeaseLost { current, .. }) => Some(*current),
        _ => None,
    }
}

/// Runs `iteration` `ITERATIONS` times, `WAVE` at a time, and prints how often each
/// outcome happened.
async fn repeat<F, Fut>(stores: &Replicas, race_name: &str, iteration: F)
where
    F: Fn(Arc<dyn Store>, Arc<dyn Store>, RecordId, Rng) -> Fut,
    Fut: Future<Output = &'static str> + Send + 'static,
{
    let seed = seed();
    let mut rng = Rng::new(seed);
    let outcomes = Arc::new(Mutex::new(BTreeMap::<&'static str, usize>::new()));
    let run = unique("race-");
    for wave in 0..ITERATIONS.div_ceil(WAVE) {
        let mut tasks = Vec::new();
        for i in wave * WAVE..((wave + 1) * WAVE).min(ITERATIONS) {
            let id = RecordId::for_event("idem-races", &format!("{run}/{race_name}/{i}"));
            let iteration = iteration(stores.a.clone(), stores.b.clone(), id, Rng::new(rng.next()));
            let outcomes = outcomes.clone();
            tasks.push(tokio::spawn(async move {
                let outcome = iteration.await;
                *outcomes.lock().unwrap().entry(outcome).or_default() += 1;
            }));
        }
        for task in tasks {
            if let Err(error) = task.await {
                std::panic::resume_unwind(error.into_panic());
            }
        }
    }
    let outcomes = outcomes.lock().unwrap();
    println!(
        "{race_name} on the {} store: {ITERATIONS} iterations (seed {seed}), outcomes {outcomes:?}",
        stores.name
    );
    assert_eq!(outcomes.values().sum::<usize>(), ITERATIONS);
}

// ---------------------------------------------------------------------------------------
// The races.

/// A holder completes at the moment its lease passes while a second claim arrives.
async fn lease_expiry_racing_completion(stores: Replicas) {
    repeat(
        &stores,
        "lease expiry racing completion",
        |a, b, id, mut rng| async move {
            let holder = acquire(&*a, id).await;
            sleep_to_lease_end(&*a, &holder, rng.below(2 * JITTER_MS + 1)).await;
            let result = Bytes::from_static(b"the holder's result");
            let (completed, claimed) = {
                let (a, b, result) = (a.clone(), b.clone(), result.clone());
                race(
                    &mut rng,
                    async move { a.complete(&id, holder.token, result).await },
                    async move { b.claim(&request(id)).await.unwrap() },
                )
                .await
            };
            match (&completed, claimed) {
                // The completion came first: the claim replays it.
                (Ok(()), ClaimOutcome::Completed(replay)) => {
                    assert_eq!(replay.response, result);
                    assert_eq!(replay.token, holder.token);
                    "completed, then the claim replayed"
                }
                // The claim came while the lease still ran; the holder then completed.
                (Ok(()), ClaimOutcome::InFlight { lease_until, .. }) => {
                    assert_eq!(lease_until, holder.lease_until);
                    match b.claim(&request(id)).await.unwrap() {
                        ClaimOutcome::Completed(replay) => assert_eq!(replay.response, result),
                        other => panic!("after the completion, a claim replays: {other:?}"),
                    }
                    "the claim found the lease running, then completed"
                }
                // The claim took over: the holder's completion changed nothing.
                (
                    Err(Error::LeaseLost { current, .. }),
                    ClaimOutcome::TookOver {
                        lease,
                        previous_token,
                        previous_lease_until,
                    },
                ) => {
                    assert_eq!(previous_token, holder.token);
                    assert_eq!(previous_lease_until, holder.lease_until);
                    assert!(lease.token > holder.token);
                    assert_eq!(*current, Some(lease.token));
                    let record = a.get(&id).await.unwrap().unwrap();
                    assert_eq!(record.token, lease.token);
                    assert!(matches!(record.state, RecordState::InFlight { .. }));
                    b.complete(&id, lease.token, "the new holder's result".into())
                        .await
                        .unwrap();
                    match a.claim(&request(id)).await.unwrap() {
                        ClaimOutcome::Completed(replay) => {
                            assert_eq!(replay.response, "the new holder's result");
                            assert_eq!(replay.token, lease.token);
                        }
                        other => panic!("the new holder's result replays: {other:?}"),
                    }
                    "taken over, the completion was fenced off"
                }
                (completed, claimed) => panic!(
                    "impossible outcome of a completion racing a claim at the lease end: \
                     complete {completed:?}, claim {claimed:?}"
                ),
            }
        },
    )
    .await;
}

/// A holder releases at the moment its lease passes while a second claim arrives.
async fn release_racing_takeover(stores: Replicas) {
    repeat(
        &stores,
        "release racing takeover",
        |a, b, id, mut rng| async move {
            let holder = acquire(&*a, id).await;
            sleep_to_lease_end(&*a, &holder, rng.below(2 * JITTER_MS + 1)).await;
            let (released, claimed) = {
                let (a, b) = (a.clone(), b.clone());
                race(
                    &mut rng,
                    async move { a.release(&id, holder.token).await },
                    async move { b.claim(&request(id)).await.unwrap() },
                )
                .await
            };
            let (outcome, claimer) = match (&released, claimed) {
                // The release came first: the claim starts a new lifecycle.
                (Ok(()), ClaimOutcome::Acquired(lease)) => {
                    assert!(lease.token > holder.token);
                    ("released, then the claim acquired", lease)
                }
                // The claim came while the lease still ran; the holder then released, and
                // the next claim acquires.
                (Ok(()), ClaimOutcome::InFlight { lease_until, .. }) => {
                    assert_eq!(lease_until, holder.lease_until);
                    let lease = match b.claim(&request(id)).await.unwrap() {
                        ClaimOutcome::Acquired(lease) => lease,
                        other => panic!("after the release, a claim acquires: {other:?}"),
                    };
                    assert!(lease.token > holder.token);
                    ("the claim found the lease running, then released", lease)
                }
                // The claim took over: the release changed nothing.
                (
                    Err(Error::LeaseLost { current, .. }),
                    ClaimOutcome::TookOver {
                        lease,
                        previous_token,
                        ..
                    },
                ) => {
                    assert_eq!(previous_token, holder.token);
                    assert!(lease.token > holder.token);
                    assert_eq!(*current, Some(lease.token));
                    ("taken over, the release was fenced off", lease)
                }
                (released, claimed) => panic!(
                    "impossible outcome of a release racing a claim at the lease end: \
                     release {released:?}, claim {claimed:?}"
                ),
            };
            // Whatever the order, the claimer now holds the record and the old holder
            // can change nothing.
            let record = a.get(&id).await.unwrap().unwrap();
            assert_eq!(record.token, claimer.token);
            assert!(matches!(record.state, RecordState::InFlight { .. }));
            let stale = a.complete(&id, holder.token, "stale".into()).await;
            assert_eq!(lease_lost_current(&stale), Some(Some(claimer.token)));
            b.complete(&id, claimer.token, "the claimer's result".into())
                .await
                .unwrap();
            match a.claim(&request(id)).await.unwrap() {
                ClaimOutcome::Completed(replay) => {
                    assert_eq!(replay.response, "the claimer's result")
                }
                other => panic!("the claimer's result replays: {other:?}"),
            }
            outcome
        },
    )
    .await;
}

/// Two replicas claim the same expired lease at once.
async fn two_replicas_taking_over_one_expired_lease(stores: Replicas) {
    repeat(
        &stores,
        "two replicas taking over one expired lease",
        |a, b, id, mut rng| async move {
            // The holder dies: it never completes.
            let holder = acquire(&*a, id).await;
            sleep_past_lease_end(&*a, &holder, rng.below(2 * JITTER_MS + 1)).await;
            let (first, second) = {
                let (a, b) = (a.clone(), b.clone());
                race(
                    &mut rng,
                    async move { a.claim(&request(id)).await.unwrap() },
                    async move { b.claim(&request(id)).await.unwrap() },
                )
                .await
            };
            let (winner, loser, outcome) = match (first, second) {
                (won @ ClaimOutcome::TookOver { .. }, lost) => (won, lost, "replica a took over"),
                (lost, won @ ClaimOutcome::TookOver { .. }) => (won, lost, "replica b took over"),
                (first, second) => panic!(
                    "exactly one of two claims of an expired lease takes it over: \
                     {first:?}, {second:?}"
                ),
            };
            let ClaimOutcome::TookOver {
                lease,
                previous_token,
                previous_lease_until,
            } = winner
            else {
                unreachable!()
            };
            assert_eq!(previous_token, holder.token);
            assert_eq!(previous_lease_until, holder.lease_until);
            assert!(lease.token > holder.token);
            match loser {
                ClaimOutcome::InFlight { lease_until, .. } => {
                    assert_eq!(lease_until, lease.lease_until)
                }
                other => panic!("the other claim finds the winner's lease: {other:?}"),
            }
            let stale = a
                .complete(&id, holder.token, "the dead holder".into())
                .await;
            assert_eq!(lease_lost_current(&stale), Some(Some(lease.token)));
            outcome
        },
    )
    .await;
}

/// A stale holder completes after a takeover, racing the new holder's completion.
async fn stale_holder_completing_after_takeover(stores: Replicas) {
    repeat(
        &stores,
        "stale holder completing after takeover",
        |a, b, id, mut rng| async move {
            let stale = acquire(&*a, id).await;
            sleep_past_lease_end(&*a, &stale, rng.below(JITTER_MS)).await;
            let new = match b.claim(&request(id)).await.unwrap() {
                ClaimOutcome::TookOver {
                    lease,
                    previous_token,
                    ..
                } => {
                    assert_eq!(previous_token, stale.token);
                    lease
                }
                other => panic!("a claim after the lease end takes over: {other:?}"),
            };
            let (stale_completed, new_completed) = {
                let (a, b) = (a.clone(), b.clone());
                race(
                    &mut rng,
                    async move { a.complete(&id, stale.token, "stale".into()).await },
                    async move { b.complete(&id, new.token, "new".into()).await },
                )
                .await
            };
            assert_eq!(
                lease_lost_current(&stale_completed),
                Some(Some(new.token)),
                "the stale holder is fenced off: {stale_completed:?}"
            );
            new_completed.unwrap();
            for fenced in [
                a.release(&id, stale.token).await,
                a.renew(&id, stale.token, LEASE).await.map(drop),
            ] {
                assert_eq!(lease_lost_current(&fenced), Some(Some(new.token)));
            }
            match a.claim(&request(id)).await.unwrap() {
                ClaimOutcome::Completed(replay) => {
                    assert_eq!(replay.response, "new");
                    assert_eq!(replay.token, new.token);
                }
                other => panic!("the new holder's result replays: {other:?}"),
            }
            "fenced off"
        },
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// One test per race per store.

macro_rules! races {
    ($($store:ident),* $(,)?) => {$(
        mod $store {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn lease_expiry_racing_completion_has_exactly_one_winner() {
                let Some(stores) = super::$store().await else { return };
                super::lease_expiry_racing_completion(stores).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn release_racing_takeover_has_exactly_one_winner() {
                let Some(stores) = super::$store().await else { return };
                super::release_racing_takeover(stores).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn two_replicas_taking_over_one_expired_lease_elect_exactly_one() {
                let Some(stores) = super::$store().await else { return };
                super::two_replicas_taking_over_one_expired_lease(stores).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_stale_holder_completing_after_a_takeover_is_fenced_off() {
                let Some(stores) = super::$store().await else { return };
                super::stale_holder_completing_after_takeover(stores).await;
            }
        }
    )*};
}

races!(memory, embedded, postgres, redis, redis_cluster);
