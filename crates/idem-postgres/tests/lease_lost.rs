//! A transition that loses to a concurrent one reports the winner's token.
//!
//! `complete`, `release` and `renew` are single statements under READ COMMITTED: when a
//! concurrent transaction changes the record first (a takeover by another replica), the
//! statement waits for it, re-checks the row and changes nothing. The error must then name
//! the token that won, not the one the statement saw when it started (the caller's own).
//!
//! The server comes from `IDEM_TEST_POSTGRES_URL` (`scripts/test` starts one and sets it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::url;
use std::time::Duration;

use idem_core::{ClaimOutcome, ClaimRequest, Error, FencingToken, Fingerprint, RecordId, Store};
use idem_postgres::{PostgresOptions, PostgresStore};
use tokio_postgres::NoTls;

#[derive(Clone, Copy, Debug)]
enum Transition {
    Complete,
    Release,
    Renew,
}

async fn loser_names_the_winning_token(transition: Transition) {
    let table = common::unique_name("t");
    let options = PostgresOptions {
        schema: "idem_lease_lost".into(),
        table: table.clone(),
        pool_size: 2,
        migrate: true,
    };
    let store = std::sync::Arc::new(PostgresStore::connect(&url(), options).await.unwrap());
    let id = RecordId::for_event("lease-lost", &table);
    let request = ClaimRequest::new(id, Fingerprint::of_bytes(b"op"));
    let ClaimOutcome::Acquired(lease) = store.claim(&request).await.unwrap() else {
        panic!("a fresh record is acquired");
    };

    // Another replica's takeover, in a transaction that has not committed yet.
    let (other, connection) = tokio_postgres::connect(&url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    other.batch_execute("BEGIN").await.unwrap();
    other
        .execute(
            &format!("UPDATE idem_lease_lost.{table} SET token = token + 1 WHERE id = $1"),
            &[&&id.as_bytes()[..]],
        )
        .await
        .unwrap();

    // The holder's transition waits on the row...
    let holder = store.clone();
    let token = lease.token;
    let attempt = tokio::spawn(async move {
        match transition {
            Transition::Complete => holder.complete(&id, token, "done".into()).await,
            Transition::Release => holder.release(&id, token).await,
            Transition::Renew => holder
                .renew(&id, token, Duration::from_secs(60))
                .await
                .map(drop),
        }
    });
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE wait_event_type = 'Lock' AND query LIKE '%{table}%'"
    );
    for round in 0.. {
        let row = other.query_one(&waiting, &[]).await.unwrap();
        if row.get::<_, i64>(0) > 0 {
            break;
        }
        assert!(round < 1000, "the {transition:?} never waited on the row");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ...until the takeover commits: it then changes nothing, and names the new token.
    other.batch_execute("COMMIT").await.unwrap();
    let result = attempt.await.unwrap();
    let winner = FencingToken::new(token.get() + 1);
    match result {
        Err(Error::LeaseLost { current, .. }) => {
            assert_eq!(current, Some(winner), "{transition:?}");
        }
        other => panic!("{transition:?}: expected a lost lease, got {other:?}"),
    }
    let record = store.get(&id).await.unwrap().unwrap();
    assert_eq!(record.token, winner);
}

#[tokio::test]
async fn a_completion_that_loses_to_a_concurrent_takeover_names_the_winning_token() {
    loser_names_the_winning_token(Transition::Complete).await;
}

#[tokio::test]
async fn a_release_that_loses_to_a_concurrent_takeover_names_the_winning_token() {
    loser_names_the_winning_token(Transition::Release).await;
}

#[tokio::test]
async fn a_renewal_that_loses_to_a_concurrent_takeover_names_the_winning_token() {
    loser_names_the_winning_token(Transition::Renew).await;
}
