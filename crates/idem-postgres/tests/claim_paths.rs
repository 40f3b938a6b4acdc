//! Claims, alone or in a batch: an insert for an id without a row, a plain read for an id
//! with one, and the locking claim statement only for a row the claim may take over.
//!
//! - answering a replay, a claim in flight or a mismatch takes no lock and writes nothing:
//!   the row's `xmax` stays 0 (a row lock would set it to the locking transaction), so the
//!   answer costs no commit;
//! - concurrent claims of an expired record, each alone on a connection of its own, take
//!   it over once; so do concurrent batches that hold it.
//!
//! The server comes from `IDEM_TEST_POSTGRES_URL` (`scripts/test` starts one and sets it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::url;
use idem_core::{ClaimOutcome, ClaimRequest, Fingerprint, RecordId, Store};
use idem_postgres::{PostgresOptions, PostgresStore};
use tokio_postgres::NoTls;

const SCHEMA: &str = "idem_claim_paths";

async fn store(table: &str, pool_size: usize) -> PostgresStore {
    let options = PostgresOptions {
        schema: SCHEMA.into(),
        table: table.into(),
        pool_size,
        migrate: true,
    };
    PostgresStore::connect(&url(), options).await.unwrap()
}

async fn raw() -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// The row's `xmax`: 0 unless a transaction deleted, updated or locked this version.
async fn xmax(client: &tokio_postgres::Client, table: &str, id: &RecordId) -> String {
    client
        .query_one(
            &format!("SELECT xmax::text FROM \"{SCHEMA}\".\"{table}\" WHERE id = $1"),
            &[&&id.as_bytes()[..]],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn answers_to_an_existing_row_take_no_lock() {
    let table = common::unique_name("t");
    let store = store(&table, 4).await;
    let client = raw().await;

    // In flight: a second claim is answered "in flight", a different body "mismatch".
    let request = ClaimRequest::new(
        RecordId::for_event("single", &format!("{table}-a")),
        Fingerprint::of_bytes(b"body"),
    );
    let lease = *store.claim(&request).await.unwrap().lease().unwrap();
    assert_eq!(xmax(&client, &table, &request.id).await, "0");
    assert!(matches!(
        store.claim(&request).await.unwrap(),
        ClaimOutcome::InFlight { lease_until, now } if lease_until == lease.lease_until && now < lease_until
    ));
    let other = ClaimRequest {
        fingerprint: Fingerprint::of_bytes(b"another body"),
        ..request.clone()
    };
    assert_eq!(store.claim(&other).await.unwrap(), ClaimOutcome::Mismatch);
    assert_eq!(xmax(&client, &table, &request.id).await, "0");

    // Completed: replays.
    store
        .complete(&request.id, lease.token, Bytes::from_static(b"done"))
        .await
        .unwrap();
    assert_eq!(xmax(&client, &table, &request.id).await, "0");
    for _ in 0..3 {
        match store.claim(&request).await.unwrap() {
            ClaimOutcome::Completed(c) => {
                assert_eq!(c.token, lease.token);
                assert_eq!(c.response, &b"done"[..]);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(store.claim(&other).await.unwrap(), ClaimOutcome::Mismatch);
    assert_eq!(xmax(&client, &table, &request.id).await, "0");
}

#[tokio::test]
async fn concurrent_claims_of_an_expired_record_take_it_over_once() {
    let table = common::unique_name("t");
    const CLAIMS: usize = 24;
    // A connection per claim: none waits for another, so none is combined with another.
    let store = Arc::new(store(&table, CLAIMS).await);
    for round in 0..5 {
        let request = ClaimRequest::new(
            RecordId::for_event("single", &format!("{table}-expired-{round}")),
            Fingerprint::of_bytes(b"body"),
        )
        .with_lease(Duration::from_millis(50));
        let first = *store.claim(&request).await.unwrap().lease().unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;

        let barrier = Arc::new(tokio::sync::Barrier::new(CLAIMS));
        let tasks: Vec<_> = (0..CLAIMS)
            .map(|_| {
                let (store, request, barrier) = (store.clone(), request.clone(), barrier.clone());
                let request = request.with_lease(Duration::from_secs(30));
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.claim(&request).await.unwrap()
                })
            })
            .collect();
        let mut took_over = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                ClaimOutcome::TookOver {
                    lease,
                    previous_token,
                    ..
                } => {
                    assert_eq!(previous_token, first.token);
                    took_over.push(lease);
                }
                ClaimOutcome::InFlight { .. } => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(took_over.len(), 1, "round {round}: {took_over:?}");
        assert!(took_over[0].token > first.token);
        // The winner holds the record.
        store
            .complete(&request.id, took_over[0].token, Bytes::new())
            .await
            .unwrap();
        assert!(
            store
                .complete(&request.id, first.token, Bytes::new())
                .await
                .is_err()
        );
    }
}

#[tokio::test]
async fn a_batch_answers_existing_rows_without_a_lock_and_takes_over_only_what_it_may() {
    let table = common::unique_name("t");
    let store = store(&table, 4).await;
    let client = raw().await;
    let request = |name: &str| {
        ClaimRequest::new(
            RecordId::for_event("batch", &format!("{table}-{name}")),
            Fingerprint::of_bytes(b"body"),
        )
    };
    let (completed, in_flight, expired) = (request("done"), request("busy"), request("gone"));
    let done = *store.claim(&completed).await.unwrap().lease().unwrap();
    store
        .complete(&completed.id, done.token, Bytes::from_static(b"done"))
        .await
        .unwrap();
    let busy = *store.claim(&in_flight).await.unwrap().lease().unwrap();
    let short = expired.clone().with_lease(Duration::from_millis(50));
    let gone = *store.claim(&short).await.unwrap().lease().unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;

    let fresh = request("new");
    let mismatch = ClaimRequest {
        fingerprint: Fingerprint::of_bytes(b"another body"),
        ..request("done")
    };
    let batch = [
        completed.clone(),
        in_flight.clone(),
        expired.clone(),
        fresh.clone(),
    ];
    let outcomes = store.claim_batch(&batch).await.unwrap();
    match &outcomes[0] {
        ClaimOutcome::Completed(c) => assert_eq!(c.response, &b"done"[..]),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        outcomes[1],
        ClaimOutcome::InFlight { lease_until, .. } if lease_until == busy.lease_until
    ));
    match &outcomes[2] {
        ClaimOutcome::TookOver {
            lease,
            previous_token,
            ..
        } => {
            assert_eq!(*previous_token, gone.token);
            assert!(lease.token > gone.token);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(outcomes[3], ClaimOutcome::Acquired(_)));
    assert_eq!(
        store.claim_batch(&[mismatch, fresh.clone()]).await.unwrap()[0],
        ClaimOutcome::Mismatch
    );
    // The rows the batches answered from were read, not locked.
    for id in [&completed.id, &in_flight.id] {
        assert_eq!(xmax(&client, &table, id).await, "0");
    }
}

#[tokio::test]
async fn concurrent_batches_holding_an_expired_record_take_it_over_once() {
    let table = common::unique_name("t");
    const BATCHES: usize = 12;
    let store = Arc::new(store(&table, BATCHES).await);
    for round in 0..3 {
        let expired = ClaimRequest::new(
            RecordId::for_event("batch", &format!("{table}-expired-{round}")),
            Fingerprint::of_bytes(b"body"),
        )
        .with_lease(Duration::from_millis(50));
        let first = *store.claim(&expired).await.unwrap().lease().unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;

        let barrier = Arc::new(tokio::sync::Barrier::new(BATCHES));
        let tasks: Vec<_> = (0..BATCHES)
            .map(|b| {
                let (store, barrier) = (store.clone(), barrier.clone());
                let batch = vec![
                    ClaimRequest::new(
                        RecordId::for_event("batch", &format!("{table}-{round}-{b}")),
                        Fingerprint::of_bytes(b"body"),
                    ),
                    expired.clone().with_lease(Duration::from_secs(30)),
                ];
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.claim_batch(&batch).await.unwrap()
                })
            })
            .collect();
        let mut took_over = 0;
        for task in tasks {
            let outcomes = task.await.unwrap();
            assert!(
                matches!(outcomes[0], ClaimOutcome::Acquired(_)),
                "{outcomes:?}"
            );
            match &outcomes[1] {
                ClaimOutcome::TookOver { previous_token, .. } => {
                    assert_eq!(*previous_token, first.token);
                    took_over += 1;
                }
                ClaimOutcome::InFlight { .. } => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(took_over, 1, "round {round}");
    }
}
