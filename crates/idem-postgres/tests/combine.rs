//! Claims combined into batches while every pooled connection is busy.
//!
//! To hold the pool's one connection, a claim is made to wait on a row that another
//! transaction has locked; the claims that come meanwhile queue, and go to the server
//! together once the lock is released.
//!
//! The server comes from `IDEM_TEST_POSTGRES_URL` (`scripts/test` starts one and sets it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::url;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use idem_core::{ClaimOutcome, ClaimRequest, Error, Fingerprint, RecordId, Store};
use idem_postgres::{PostgresOptions, PostgresStore};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};

const SCHEMA: &str = "idem_combine";

struct Setup {
    store: Arc<PostgresStore>,
    table: String,
    other: Client,
}

async fn setup(pool_size: usize) -> Setup {
    let table = common::unique_name("t");
    let options = PostgresOptions {
        schema: SCHEMA.into(),
        table: table.clone(),
        pool_size,
        migrate: true,
    };
    let store = Arc::new(PostgresStore::connect(&url(), options).await.unwrap());
    let (other, connection) = tokio_postgres::connect(&url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    Setup {
        store,
        table,
        other,
    }
}

fn request(table: &str, name: &str) -> ClaimRequest {
    ClaimRequest::new(
        RecordId::for_event(table, name),
        Fingerprint::of_bytes(b"body"),
    )
}

impl Setup {
    /// Takes the pool's only connection: a claim waiting on the row of its id that `other`
    /// has inserted (in flight, under a lease that has not passed) in a transaction it has
    /// not committed. Returns that claim's task, which answers "in flight" once `other`
    /// commits.
    async fn hold_the_connection(&self) -> JoinHandle<Result<ClaimOutcome, Error>> {
        let blocker = request(&self.table, "blocker");
        self.other.batch_execute("BEGIN").await.unwrap();
        self.other
            .execute(
                &format!(
                    "INSERT INTO {SCHEMA}.{} (id, fingerprint, token, state, lease_until, \
                     retention, expires_at) \
                     VALUES ($1, $2, 1, 0, $3::bigint, 60000, $3::bigint + 60000)",
                    self.table
                ),
                &[
                    &&blocker.id.as_bytes()[..],
                    &&blocker.fingerprint.as_bytes()[..],
                    &(i64::MAX / 4),
                ],
            )
            .await
            .unwrap();
        let store = self.store.clone();
        let task = tokio::spawn(async move { store.claim(&blocker).await });
        let waiting = format!(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND query LIKE '%{}%'",
            self.table
        );
        for round in 0.. {
            let row = self.other.query_one(&waiting, &[]).await.unwrap();
            if row.get::<_, i64>(0) > 0 {
                break;
            }
            assert!(round < 1000, "the blocking claim never waited on the row");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task
    }

    async fn wait_queued(&self, n: usize) {
        for round in 0.. {
            if self.store.queued_claims() == n {
                return;
            }
            assert!(
                round < 1000,
                "{} claims queued, expected {n}",
                self.store.queued_claims()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn spawn_claim(&self, request: &ClaimRequest) -> JoinHandle<Result<ClaimOutcome, Error>> {
        let store = self.store.clone();
        let request = request.clone();
        tokio::spawn(async move { store.claim(&request).await })
    }
}

#[tokio::test]
async fn queued_claims_go_as_one_statement_and_each_gets_its_own_answer() {
    let setup = setup(1).await;
    let corrupt = request(&setup.table, "corrupt");
    assert!(matches!(
        setup.store.claim(&corrupt).await.unwrap(),
        ClaimOutcome::Acquired(_)
    ));
    setup
        .other
        .execute(
            &format!(
                "UPDATE {SCHEMA}.{} SET state = 7, expires_at = expires_at + 3600000 WHERE id = $1",
                setup.table
            ),
            &[&&corrupt.id.as_bytes()[..]],
        )
        .await
        .unwrap();
    let blocker = setup.hold_the_connection().await;

    let fresh: Vec<ClaimRequest> = (0..20)
        .map(|i| request(&setup.table, &format!("fresh-{i}")))
        .collect();
    let mut tasks: Vec<_> = fresh.iter().map(|r| setup.spawn_claim(r)).collect();
    setup.wait_queued(20).await;
    // The same id again, while the first claim of it waits in the queue: it must see that
    // claim, not make a second one.
    let repeated = setup.spawn_claim(&fresh[0]);
    setup.wait_queued(21).await;
    let broken = setup.spawn_claim(&corrupt);
    setup.wait_queued(22).await;

    setup.other.batch_execute("COMMIT").await.unwrap();
    assert!(matches!(
        blocker.await.unwrap().unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    let mut leases = Vec::new();
    for task in tasks.drain(..) {
        match task.await.unwrap().unwrap() {
            ClaimOutcome::Acquired(lease) => leases.push(lease),
            other => panic!("a fresh id is acquired, not {other:?}"),
        }
    }
    assert!(matches!(
        repeated.await.unwrap().unwrap(),
        ClaimOutcome::InFlight { .. }
    ));
    // The corrupt record fails its own claim only.
    assert!(matches!(broken.await.unwrap(), Err(Error::Corrupt { .. })));

    // The twenty claims went to the server in one statement: one transaction wrote their
    // rows (one xmin), each with its claim's own holder nonce.
    let ids: Vec<&[u8]> = fresh.iter().map(|r| &r.id.as_bytes()[..]).collect();
    let written = setup
        .other
        .query_one(
            &format!(
                "SELECT count(DISTINCT xmin::text), count(DISTINCT holder), count(*) \
                 FROM {SCHEMA}.{} WHERE id = ANY($1)",
                setup.table
            ),
            &[&ids],
        )
        .await
        .unwrap();
    assert_eq!(written.get::<_, i64>(2), 20);
    assert_eq!(
        written.get::<_, i64>(0),
        1,
        "one statement, one transaction"
    );
    assert_eq!(written.get::<_, i64>(1), 20, "a nonce per claim");
    // Every lease is real: each completes.
    for lease in leases {
        setup
            .store
            .complete(&lease.id, lease.token, "done".into())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_claim_whose_caller_goes_away_while_queued_is_never_sent() {
    let setup = setup(1).await;
    let blocker = setup.hold_the_connection().await;
    let requests: Vec<ClaimRequest> = (0..5)
        .map(|i| request(&setup.table, &format!("queued-{i}")))
        .collect();
    let tasks: Vec<_> = requests.iter().map(|r| setup.spawn_claim(r)).collect();
    setup.wait_queued(5).await;
    let mut tasks = tasks.into_iter();
    let kept = tasks.next().unwrap();
    for cancelled in tasks {
        cancelled.abort();
        assert!(cancelled.await.unwrap_err().is_cancelled());
    }
    setup.wait_queued(1).await;

    setup.other.batch_execute("COMMIT").await.unwrap();
    blocker.await.unwrap().unwrap();
    assert!(matches!(
        kept.await.unwrap().unwrap(),
        ClaimOutcome::Acquired(_)
    ));
    for cancelled in &requests[1..] {
        assert!(
            setup.store.get(&cancelled.id).await.unwrap().is_none(),
            "a withdrawn claim was sent"
        );
    }
}

#[tokio::test]
async fn many_claims_of_one_id_through_a_small_pool_acquire_it_once() {
    let setup = setup(2).await;
    let one = request(&setup.table, "one");
    let tasks: Vec<_> = (0..200).map(|_| setup.spawn_claim(&one)).collect();
    let mut acquired = 0;
    for task in tasks {
        match task.await.unwrap().unwrap() {
            ClaimOutcome::Acquired(_) => acquired += 1,
            ClaimOutcome::InFlight { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acquired, 1);
}

#[tokio::test]
async fn many_fresh_claims_through_a_small_pool_each_acquire_a_real_lease() {
    let setup = setup(2).await;
    let requests: Vec<ClaimRequest> = (0..300)
        .map(|i| request(&setup.table, &format!("fresh-{i}")))
        .collect();
    let tasks: Vec<_> = requests.iter().map(|r| setup.spawn_claim(r)).collect();
    let mut ids = HashSet::new();
    for task in tasks {
        let ClaimOutcome::Acquired(lease) = task.await.unwrap().unwrap() else {
            panic!("a fresh id is acquired");
        };
        assert!(ids.insert(lease.id));
        setup
            .store
            .complete(&lease.id, lease.token, "done".into())
            .await
            .unwrap();
    }
    assert_eq!(ids.len(), 300);
}

#[tokio::test]
async fn queued_completions_go_as_one_statement_notify_every_replica_and_answer_each() {
    let setup = setup(1).await;
    let mut leases = Vec::new();
    for i in 0..10 {
        let ClaimOutcome::Acquired(lease) = setup
            .store
            .claim(&request(&setup.table, &format!("done-{i}")))
            .await
            .unwrap()
        else {
            panic!("a fresh id is acquired");
        };
        leases.push(lease);
    }
    let ClaimOutcome::Acquired(held) = setup
        .store
        .claim(&request(&setup.table, "held"))
        .await
        .unwrap()
    else {
        panic!("a fresh id is acquired");
    };
    // A replica over the same table waits for one of the records to settle.
    let replica = PostgresStore::connect(
        &url(),
        PostgresOptions {
            schema: SCHEMA.into(),
            table: setup.table.clone(),
            pool_size: 1,
            migrate: false,
        },
    )
    .await
    .unwrap();
    let watched = leases[3].id;
    let woken = tokio::spawn(async move {
        replica
            .completion_waiter()
            .unwrap()
            .wait_settled(&watched)
            .await
    });

    let blocker = setup.hold_the_connection().await;
    let tasks: Vec<_> = leases
        .iter()
        .map(|lease| {
            let (store, lease) = (setup.store.clone(), *lease);
            tokio::spawn(async move {
                store
                    .complete(
                        &lease.id,
                        lease.token,
                        format!("answer {:?}", lease.id).into(),
                    )
                    .await
            })
        })
        .collect();
    // A token that does not hold its record, in the same batch.
    let stale = {
        let store = setup.store.clone();
        let token = idem_core::FencingToken::new(held.token.get() + 5);
        tokio::spawn(async move { store.complete(&held.id, token, "no".into()).await })
    };
    for round in 0.. {
        if setup.store.queued_completions() == 11 {
            break;
        }
        assert!(round < 1000, "the completions never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    setup.other.batch_execute("COMMIT").await.unwrap();
    blocker.await.unwrap().unwrap();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    match stale.await.unwrap() {
        Err(Error::LeaseLost { current, .. }) => assert_eq!(current, Some(held.token)),
        other => panic!("a stale token loses, not {other:?}"),
    }
    // The replica's waiter hears the batch's notification (a bound, not a timing claim).
    tokio::time::timeout(Duration::from_secs(60), woken)
        .await
        .expect("the replica's waiter is woken")
        .unwrap()
        .unwrap();

    for lease in &leases {
        let record = setup.store.get(&lease.id).await.unwrap().unwrap();
        match record.state {
            idem_core::RecordState::Completed { response, .. } => {
                assert_eq!(response, format!("answer {:?}", lease.id).as_bytes());
            }
            other => panic!("completed, not {other:?}"),
        }
    }
    assert!(matches!(
        setup.store.get(&held.id).await.unwrap().unwrap().state,
        idem_core::RecordState::InFlight { .. }
    ));
    // One statement: one clock reading for all ten.
    let ids: Vec<&[u8]> = leases.iter().map(|l| &l.id.as_bytes()[..]).collect();
    let row = setup
        .other
        .query_one(
            &format!(
                "SELECT count(DISTINCT settled_at) FROM {SCHEMA}.{} WHERE id = ANY($1)",
                setup.table
            ),
            &[&ids],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1, "one statement, one settle time");
}
