//! The store's own parameters in a connection URL: schema, table and pool size.
//!
//! The server comes from `IDEM_TEST_POSTGRES_URL` (`scripts/test` starts one and sets it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::url;
use idem_core::{ClaimOutcome, ClaimRequest, Error, Fingerprint, RecordId, Store};
use idem_postgres::{PostgresOptions, PostgresStore};
use tokio_postgres::NoTls;

#[tokio::test]
async fn the_url_names_the_schema_the_table_and_the_pool_size() {
    let table = common::unique_name("u");
    let separator = if url().contains('?') { '&' } else { '?' };
    let with_parameters = format!(
        "{}{separator}table={table}&schema=idem_url&pool_size=3",
        url()
    );
    let (driver_url, options) = PostgresOptions::default()
        .with_url_parameters(&with_parameters)
        .unwrap();
    assert_eq!(driver_url, url());
    assert_eq!(options.pool_size, 3);
    assert_eq!(options.schema, "idem_url");
    let store = PostgresStore::connect(&driver_url, options).await.unwrap();
    let id = RecordId::for_event("url", &table);
    assert!(matches!(
        store
            .claim(&ClaimRequest::new(id, Fingerprint::of_bytes(b"x")))
            .await
            .unwrap(),
        ClaimOutcome::Acquired(_)
    ));
    let (client, connection) = tokio_postgres::connect(&url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            &format!("SELECT count(*) FROM idem_url.{table} WHERE id = $1"),
            &[&&id.as_bytes()[..]],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
}

#[test]
fn bad_parameters_are_invalid_requests() {
    for bad in [
        "pool_size=0",
        "pool_size=1001",
        "pool_size=x",
        "table=Bad-Name",
        "schema=",
    ] {
        let e = PostgresOptions::default()
            .with_url_parameters(&format!("postgres://h/db?{bad}"))
            .unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { .. }), "{bad}: {e}");
    }
    let (kept, _) = PostgresOptions::default()
        .with_url_parameters("postgres://h/db?sslmode=disable&pool_size=4")
        .unwrap();
    assert_eq!(kept, "postgres://h/db?sslmode=disable");
}
