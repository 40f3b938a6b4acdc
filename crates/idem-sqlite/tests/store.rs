//! Behaviour specific to the SQLite store: the file, durability, group commit, the reaper.
//! The shared contract is checked by `tests/conformance.rs`.

// The helpers, like the tests, fail loudly.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use idem_core::{
    ClaimOutcome, ClaimRequest, Error, Fingerprint, ListFilter, ManualClock, RecordId, RecordState,
    Store, Timestamp,
};
use idem_sqlite::{APPLICATION_ID, SCHEMA_VERSION, SqliteOptions, SqliteStore};
use tempfile::TempDir;

const START: Timestamp = Timestamp::from_millis(1_767_225_600_000);
const DEADLINE: Duration = Duration::from_secs(60);

struct Fixture {
    dir: TempDir,
    clock: ManualClock,
}

impl Fixture {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            clock: ManualClock::new(START),
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("idem.db")
    }

    /// Options on the manual clock, without a reaper unless a test asks for one.
    fn options(&self) -> SqliteOptions {
        SqliteOptions::default()
            .with_clock(Arc::new(self.clock.clone()))
            .with_reaper_interval(None)
    }

    fn open(&self) -> SqliteStore {
        SqliteStore::open(self.path(), self.options()).unwrap()
    }

    /// A connection of the test's own, beside the store's.
    fn sqlite(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(self.path()).unwrap();
        conn.busy_timeout(DEADLINE).unwrap();
        conn
    }
}

fn id(n: usize) -> RecordId {
    RecordId::for_event("store-tests", &n.to_string())
}

fn request(n: usize) -> ClaimRequest {
    ClaimRequest::new(
        id(n),
        Fingerprint::of_bytes(format!("payload {n}").as_bytes()),
    )
}

async fn acquire(store: &SqliteStore, request: &ClaimRequest) -> idem_core::Lease {
    match store.claim(request).await.unwrap() {
        ClaimOutcome::Acquired(lease) => lease,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

/// Bytes that are neither text nor a pattern SQLite could mistake for anything.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// Polls `check` until it holds; fails after a generous deadline (never a timing claim).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn expect_corrupt(result: Result<SqliteStore, Error>, path: &Path) -> String {
    match result {
        Err(Error::Corrupt { message, .. }) => {
            assert!(
                message.contains(&path.display().to_string()),
                "the message names the file: {message}"
            );
            message
        }
        other => panic!("expected Error::Corrupt, got {other:?}"),
    }
}

fn pragma(conn: &rusqlite::Connection, name: &str) -> i64 {
    conn.pragma_query_value(None, name, |row| row.get(0))
        .unwrap()
}

#[tokio::test]
async fn records_survive_closing_and_reopening() {
    let fx = Fixture::new();
    let store = fx.open();

    let in_flight = acquire(&store, &request(1).with_lease(Duration::from_secs(90))).await;
    let completed = acquire(&store, &request(2)).await;
    let response = Bytes::from(noise(1 << 20, 7));
    store
        .complete(&completed.id, completed.token, response.clone())
        .await
        .unwrap();
    let released = acquire(&store, &request(3)).await;
    store.release(&released.id, released.token).await.unwrap();

    let before = [
        store.get(&id(1)).await.unwrap().unwrap(),
        store.get(&id(2)).await.unwrap().unwrap(),
        store.get(&id(3)).await.unwrap().unwrap(),
    ];
    drop(store);
    assert!(
        !fx.dir.path().join("idem.db-wal").exists(),
        "dropping the store closed every connection"
    );

    let store = fx.open();
    for record in &before {
        assert_eq!(store.get(&record.id).await.unwrap().as_ref(), Some(record));
    }
    assert_eq!(
        before[0].state,
        RecordState::InFlight {
            lease_until: in_flight.lease_until
        }
    );
    assert_eq!(before[0].token, in_flight.token);

    // The in-flight lease still holds, the completion replays byte for byte, the tombstone
    // keeps its token.
    assert!(matches!(
        store.claim(&request(1)).await.unwrap(),
        ClaimOutcome::InFlight { lease_until, .. } if lease_until == in_flight.lease_until
    ));
    store
        .renew(&in_flight.id, in_flight.token, Duration::from_secs(120))
        .await
        .unwrap();
    let ClaimOutcome::Completed(replay) = store.claim(&request(2)).await.unwrap() else {
        panic!("expected a replay")
    };
    assert_eq!((replay.response, replay.token), (response, completed.token));
    let again = acquire(&store, &request(3)).await;
    assert!(again.token > released.token);
}

#[tokio::test]
async fn acknowledged_claims_survive_kill_9() {
    const CHILD: &str = "IDEM_SQLITE_KILL_9_CHILD";
    if let Ok(path) = std::env::var(CHILD) {
        // The child: claim until killed, announcing each claim once it is acknowledged.
        let store = SqliteStore::open(path, SqliteOptions::default()).unwrap();
        for n in 0.. {
            let lease = acquire(&store, &request(n)).await;
            println!("claimed {n} {}", lease.token);
        }
        return;
    }

    let fx = Fixture::new();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "acknowledged_claims_survive_kill_9",
            "--nocapture",
        ])
        .env(CHILD, fx.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let acknowledged = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut acknowledged = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(claim) = line.strip_prefix("claimed ") {
                let (n, token) = claim.split_once(' ').unwrap();
                acknowledged.push((n.parse::<usize>().unwrap(), token.parse::<u64>().unwrap()));
                if acknowledged.len() == 50 {
                    break;
                }
            }
        }
        acknowledged
    })
    .await
    .unwrap();
    // SIGKILL: no destructor, no checkpoint. (It may have died already: the count says.)
    let _ = child.kill();
    child.wait().unwrap();
    assert_eq!(acknowledged.len(), 50, "the child acknowledged claims");

    let store = SqliteStore::open(fx.path(), SqliteOptions::default()).unwrap();
    for (n, token) in acknowledged {
        let record = store
            .get(&id(n))
            .await
            .unwrap()
            .expect("an acknowledged claim");
        assert_eq!(record.token.get(), token);
        assert!(matches!(record.state, RecordState::InFlight { .. }));
    }
}

#[tokio::test]
async fn garbage_files_are_refused_as_corrupt() {
    let fx = Fixture::new();
    for (name, bytes) in [
        ("random bytes", noise(64 * 1024, 42)),
        ("a few bytes", b"hello".to_vec()),
        (
            "a bare header",
            b"SQLite format 3\0 and then nothing".to_vec(),
        ),
    ] {
        std::fs::write(fx.path(), &bytes).unwrap();
        let message = expect_corrupt(SqliteStore::open(fx.path(), fx.options()), &fx.path());
        assert!(message.contains("not"), "{name}: {message}");
        assert_eq!(
            std::fs::read(fx.path()).unwrap(),
            bytes,
            "{name}: the file is untouched"
        );
    }
}

#[tokio::test]
async fn a_truncated_store_is_refused_as_corrupt() {
    let fx = Fixture::new();
    let store = fx.open();
    for n in 0..200 {
        let lease = acquire(&store, &request(n)).await;
        store
            .complete(
                &lease.id,
                lease.token,
                Bytes::from(noise(2048, n as u64 + 1)),
            )
            .await
            .unwrap();
    }
    drop(store);
    let full = std::fs::read(fx.path()).unwrap();
    assert!(full.len() > 200 * 2048);

    for keep in [full.len() / 2, full.len() - 100, 4096 + 10, 60] {
        std::fs::write(fx.path(), &full[..keep]).unwrap();
        expect_corrupt(SqliteStore::open(fx.path(), fx.options()), &fx.path());
    }
}

#[tokio::test]
async fn another_applications_database_is_refused_as_corrupt() {
    let fx = Fixture::new();

    // An SQLite database with tables of its own and no application id.
    let conn = fx.sqlite();
    conn.execute_batch("CREATE TABLE users (name TEXT); INSERT INTO users VALUES ('ada');")
        .unwrap();
    drop(conn);
    let before = std::fs::read(fx.path()).unwrap();
    let message = expect_corrupt(SqliteStore::open(fx.path(), fx.options()), &fx.path());
    assert!(message.contains("another application"), "{message}");
    assert_eq!(
        std::fs::read(fx.path()).unwrap(),
        before,
        "the file is untouched"
    );

    // An empty database that another application marked as its own.
    std::fs::remove_file(fx.path()).unwrap();
    let conn = fx.sqlite();
    conn.pragma_update(None, "application_id", 0x0f0f_0f0f)
        .unwrap();
    drop(conn);
    let message = expect_corrupt(SqliteStore::open(fx.path(), fx.options()), &fx.path());
    assert!(message.contains("0x0f0f0f0f"), "{message}");
}

#[tokio::test]
async fn a_newer_schema_version_is_refused() {
    let fx = Fixture::new();
    drop(fx.open());
    let conn = fx.sqlite();
    assert_eq!(pragma(&conn, "application_id"), i64::from(APPLICATION_ID));
    assert_eq!(pragma(&conn, "user_version"), i64::from(SCHEMA_VERSION));
    assert_eq!(pragma(&conn, "auto_vacuum"), 2, "incremental");
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);

    match SqliteStore::open(fx.path(), fx.options()) {
        Err(Error::Backend { message, .. }) => {
            assert!(message.contains("newer"), "{message}");
            assert!(
                message.contains(&fx.path().display().to_string()),
                "{message}"
            );
        }
        other => panic!("expected a version error, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_rows_are_reported_as_corrupt_not_replayed() {
    let fx = Fixture::new();
    let store = fx.open();
    for n in 0..3 {
        let lease = acquire(&store, &request(n)).await;
        store
            .complete(&lease.id, lease.token, "ok".into())
            .await
            .unwrap();
    }

    let conn = fx.sqlite();
    conn.pragma_update(None, "ignore_check_constraints", true)
        .unwrap();
    conn.execute(
        "UPDATE records SET state = 9 WHERE id = ?1",
        [&id(0).as_bytes()[..]],
    )
    .unwrap();
    conn.execute(
        "UPDATE records SET fingerprint = x'00' WHERE id = ?1",
        [&id(1).as_bytes()[..]],
    )
    .unwrap();
    conn.execute(
        "UPDATE records SET token = -5 WHERE id = ?1",
        [&id(2).as_bytes()[..]],
    )
    .unwrap();

    for n in 0..3 {
        let get = store.get(&id(n)).await;
        assert!(
            matches!(get, Err(Error::Corrupt { .. })),
            "get {n}: {get:?}"
        );
        let claim = store.claim(&request(n)).await;
        assert!(
            matches!(claim, Err(Error::Corrupt { .. })),
            "claim {n}: {claim:?}"
        );
    }
    let inspector = store.inspector().unwrap();
    let list = inspector.list(&ListFilter::default()).await;
    assert!(matches!(list, Err(Error::Corrupt { .. })), "{list:?}");

    // The store goes on serving the other records.
    acquire(&store, &request(100)).await;
}

#[tokio::test]
async fn the_reaper_purges_expired_records_by_itself() {
    let fx = Fixture::new();
    let options = fx
        .options()
        .with_reaper_interval(Some(Duration::from_millis(10)))
        .with_purge_batch(7);
    let store = Arc::new(SqliteStore::open(fx.path(), options).unwrap());
    let retention = Duration::from_secs(60);
    for n in 0..40 {
        let lease = acquire(&store, &request(n).with_retention(retention)).await;
        match n % 3 {
            0 => store
                .complete(&lease.id, lease.token, "done".into())
                .await
                .unwrap(),
            1 => store.release(&lease.id, lease.token).await.unwrap(),
            _ => {} // left in flight
        }
    }
    // A waiter on a record left in flight is woken when the reaper purges it.
    let waiter = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .completion_waiter()
                .unwrap()
                .wait_settled(&id(2))
                .await
        }
    });

    fx.clock.advance(Duration::from_secs(3600));
    eventually("the reaper purged every record", || {
        store.stats().purged == 40
    })
    .await;
    tokio::time::timeout(DEADLINE, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let rows: i64 = fx
        .sqlite()
        .query_row("SELECT count(*) FROM records", [], |row| row.get(0))
        .unwrap();
    assert_eq!(rows, 0);
    assert_eq!(store.stats().reaper_errors, 0);
}

#[tokio::test]
async fn the_file_does_not_grow_over_fill_expire_purge_cycles() {
    const RECORDS: usize = 300;
    let fx = Fixture::new();
    let options = fx
        .options()
        .with_reaper_interval(Some(Duration::from_millis(10)))
        .with_purge_batch(100)
        .with_vacuum_pages(64);
    let store = Arc::new(SqliteStore::open(fx.path(), options).unwrap());
    let observer = fx.sqlite();
    let mut peaks = Vec::new();
    let mut floors = Vec::new();

    for cycle in 0..5 {
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..RECORDS {
            let store = store.clone();
            let request = request(cycle * RECORDS + n).with_retention(Duration::from_secs(60));
            tasks.spawn(async move {
                let lease = acquire(&store, &request).await;
                let response = Bytes::from(noise(4096, n as u64 + 1));
                store
                    .complete(&lease.id, lease.token, response)
                    .await
                    .unwrap();
            });
        }
        tasks.join_all().await;
        peaks.push(pragma(&observer, "page_count"));

        fx.clock.advance(Duration::from_secs(3600));
        let expected = ((cycle + 1) * RECORDS) as u64;
        eventually("the reaper purged the cycle's records", || {
            store.stats().purged == expected
        })
        .await;
        eventually("the reaper handed the free pages back", || {
            pragma(&observer, "freelist_count") == 0
        })
        .await;
        floors.push(pragma(&observer, "page_count"));
    }

    // Loose bounds: the same load needs about the same space every cycle, and emptied
    // space goes back to the file system.
    assert!(peaks[4] <= peaks[0] * 3 / 2 + 16, "peaks {peaks:?}");
    for (peak, floor) in peaks.iter().zip(&floors) {
        assert!(floor * 4 < *peak, "peaks {peaks:?}, floors {floors:?}");
    }
    // Closing checkpoints the log into the file, which then shrinks to what is in use.
    let page_size = pragma(&observer, "page_size") as u64;
    drop(observer);
    drop(store);
    let size = std::fs::metadata(fx.path()).unwrap().len();
    assert!(
        size * 4 < peaks[0] as u64 * page_size,
        "{size} bytes after the last purge"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_are_grouped_and_elect_exactly_one_owner() {
    const TASKS: usize = 64;
    let fx = Fixture::new();
    let store =
        Arc::new(SqliteStore::open(fx.path(), fx.options().with_busy_timeout(DEADLINE)).unwrap());

    // Another connection holds the write lock, so the claims queue up behind the writer's
    // first transaction instead of racing an idle disk.
    let blocker = fx.sqlite();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let store = store.clone();
        tasks.spawn(async move { store.claim(&request(0)).await.unwrap() });
    }
    eventually("every claim is queued", || {
        store.stats().submitted == TASKS as u64
    })
    .await;
    blocker.execute_batch("COMMIT").unwrap();

    let outcomes = tasks.join_all().await;
    let owners = outcomes
        .iter()
        .filter(|o| matches!(o, ClaimOutcome::Acquired(_)))
        .count();
    let waiting = outcomes
        .iter()
        .filter(|o| matches!(o, ClaimOutcome::InFlight { .. }))
        .count();
    assert_eq!((owners, waiting), (1, TASKS - 1), "{outcomes:?}");

    let stats = store.stats();
    assert_eq!(stats.ops, TASKS as u64);
    assert!(stats.commits < stats.ops, "{stats:?}");
    assert!(stats.largest_batch > 1, "{stats:?}");
}

#[tokio::test]
async fn a_failing_operation_does_not_fail_the_others_in_its_transaction() {
    let fx = Fixture::new();
    let store =
        Arc::new(SqliteStore::open(fx.path(), fx.options().with_busy_timeout(DEADLINE)).unwrap());
    // A record that cannot be read back: a claim_batch that reaches it fails.
    let lease = acquire(&store, &request(9)).await;
    let conn = fx.sqlite();
    conn.pragma_update(None, "ignore_check_constraints", true)
        .unwrap();
    conn.execute(
        "UPDATE records SET state = 9 WHERE id = ?1",
        [&lease.id.as_bytes()[..]],
    )
    .unwrap();

    // Another connection holds the write lock. A first claim goes into the writer's next
    // transaction, which waits for the lock; the batch and a single claim queue behind it
    // and share the transaction after.
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    let first = tokio::spawn({
        let store = store.clone();
        async move { store.claim(&request(3)).await }
    });
    eventually("the writer took the first claim", || {
        let stats = store.stats();
        stats.submitted == 2 && stats.queued == 0
    })
    .await;
    let batch = tokio::spawn({
        let store = store.clone();
        async move { store.claim_batch(&[request(1), request(9)]).await }
    });
    let single = tokio::spawn({
        let store = store.clone();
        async move { store.claim(&request(2)).await }
    });
    eventually("the batch and the claim are queued", || {
        let stats = store.stats();
        stats.submitted == 4 && stats.queued == 2
    })
    .await;
    conn.execute_batch("COMMIT").unwrap();

    assert!(matches!(
        first.await.unwrap(),
        Ok(ClaimOutcome::Acquired(_))
    ));
    let batch = batch.await.unwrap();
    assert!(matches!(batch, Err(Error::Corrupt { .. })), "{batch:?}");
    assert!(matches!(
        single.await.unwrap(),
        Ok(ClaimOutcome::Acquired(_))
    ));
    let stats = store.stats();
    assert_eq!(
        (stats.ops, stats.commits),
        (4, 3),
        "the last two shared a transaction"
    );
    // The failed batch left nothing behind, not even its first claim.
    assert_eq!(store.get(&id(1)).await.unwrap(), None);
    assert!(store.get(&id(2)).await.unwrap().is_some());
}

#[tokio::test]
async fn a_claim_batch_is_one_operation_applied_in_order() {
    let fx = Fixture::new();
    let store = fx.open();
    let outcomes = store
        .claim_batch(&[request(1), request(1), request(2)])
        .await
        .unwrap();
    assert!(matches!(outcomes[0], ClaimOutcome::Acquired(_)));
    assert!(matches!(outcomes[1], ClaimOutcome::InFlight { .. }));
    assert!(matches!(outcomes[2], ClaimOutcome::Acquired(_)));
    let stats = store.stats();
    assert_eq!((stats.ops, stats.commits), (1, 1));
}

#[tokio::test]
async fn replays_are_answered_without_the_writer() {
    let fx = Fixture::new();
    let store = fx.open();
    let lease = acquire(&store, &request(1)).await;
    store
        .complete(&lease.id, lease.token, "done".into())
        .await
        .unwrap();
    let ops = store.stats().ops;
    for _ in 0..3 {
        assert!(matches!(
            store.claim(&request(1)).await.unwrap(),
            ClaimOutcome::Completed(_)
        ));
    }
    let stats = store.stats();
    assert_eq!((stats.ops, stats.replays_from_readers), (ops, 3));

    // A different fingerprint still goes to the writer, which reports the mismatch.
    let other = ClaimRequest::new(id(1), Fingerprint::of_bytes(b"another payload"));
    assert_eq!(store.claim(&other).await.unwrap(), ClaimOutcome::Mismatch);
}

#[tokio::test]
async fn invalid_options_are_refused() {
    let fx = Fixture::new();
    for options in [
        fx.options().with_readers(0),
        fx.options().with_max_batch(0),
        fx.options().with_queue_capacity(0),
        fx.options().with_purge_batch(0),
        fx.options().with_vacuum_pages(0),
        fx.options().with_reaper_interval(Some(Duration::ZERO)),
    ] {
        let result = SqliteStore::open(fx.path(), options.clone());
        assert!(
            matches!(result, Err(Error::InvalidRequest { .. })),
            "{options:?}: {result:?}"
        );
    }
    assert!(!fx.path().exists(), "nothing was created");
}

/// A claim whose caller went away before the writer applied it is not applied: its record
/// stays free, and the next claim acquires it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_abandoned_while_queued_is_not_applied() {
    let fx = Fixture::new();
    let store = SqliteStore::open(fx.path(), fx.options().with_busy_timeout(DEADLINE)).unwrap();
    // Another connection holds the write lock, so the writer waits.
    let blocker = fx.sqlite();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let abandoned =
        tokio::time::timeout(Duration::from_millis(100), store.claim(&request(1))).await;
    assert!(abandoned.is_err(), "the claim waits for the writer");
    blocker.execute_batch("COMMIT").unwrap();
    // Operations run in order: once this one is answered, the abandoned one was passed.
    acquire(&store, &request(2)).await;
    assert_eq!(store.get(&id(1)).await.unwrap(), None);
    acquire(&store, &request(1)).await;
}
