//! Versioned schema migrations, for the store at start-up and for operators
//! (`idem migrate --store postgres://...`).

use deadpool_postgres::Pool;
use idem_core::Error;

use crate::connect::Target;
use crate::queries::{CURRENT_VERSION, Queries};
use crate::{PostgresOptions, pg_error};

/// Applies pending migrations to the database at `url`; returns the versions applied.
/// Safe to run from several replicas at once (they serialise on an advisory lock per
/// schema).
pub async fn migrate(url: &str, options: &PostgresOptions) -> Result<Vec<i32>, Error> {
    let target = Target::parse(url)?;
    run(&target, &Queries::new(&options.schema, &options.table)?).await
}

pub(crate) async fn run(target: &Target, queries: &Queries) -> Result<Vec<i32>, Error> {
    let (mut client, connection) = target.connect().await.map_err(|e| pg_error("connect", e))?;
    let driver = tokio::spawn(connection);
    let result = async {
        let tx = client
            .transaction()
            .await
            .map_err(|e| pg_error("begin migration", e))?;
        // One lock per schema: migrations of two tables in a new schema would otherwise
        // race to create it.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('idem-migrate:' || $1))",
            &[&queries.schema],
        )
        .await
        .map_err(|e| pg_error("migration lock", e))?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\";
             CREATE TABLE IF NOT EXISTS {migrations} (
                 version    INTEGER PRIMARY KEY,
                 name       TEXT NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             );",
            schema = queries.schema,
            migrations = queries.migrations_table,
        ))
        .await
        .map_err(|e| pg_error("create the migrations table", e))?;
        let row = tx
            .query_one(
                &format!(
                    "SELECT COALESCE(max(version), 0) AS version FROM {}",
                    queries.migrations_table
                ),
                &[],
            )
            .await
            .map_err(|e| pg_error("read the schema version", e))?;
        let current: i32 = row.get("version");
        if current > CURRENT_VERSION {
            return Err(newer(current));
        }
        let mut applied = Vec::new();
        for (version, name, sql) in &queries.migrations {
            if *version <= current {
                continue;
            }
            tx.batch_execute(sql)
                .await
                .map_err(|e| pg_error(&format!("migration {version} ({name})"), e))?;
            tx.execute(
                &format!(
                    "INSERT INTO {} (version, name) VALUES ($1, $2)",
                    queries.migrations_table
                ),
                &[version, name],
            )
            .await
            .map_err(|e| pg_error("record the migration", e))?;
            applied.push(*version);
        }
        tx.commit()
            .await
            .map_err(|e| pg_error("commit migration", e))?;
        Ok(applied)
    }
    .await;
    drop(client);
    let _ = driver.await;
    result
}

fn newer(version: i32) -> Error {
    Error::corrupt(format!(
        "postgres: the schema is at version {version}, newer than this build knows ({CURRENT_VERSION}); upgrade idem"
    ))
}

/// Checks that the schema is migrated to the version this build knows.
pub(crate) async fn check(pool: &Pool, queries: &Queries) -> Result<(), Error> {
    let client = pool
        .get()
        .await
        .map_err(|e| Error::unavailable("postgres: no connection from the pool", e))?;
    let row = client
        .query_opt(
            "SELECT to_regclass($1) IS NOT NULL AS present",
            &[&queries.migrations_table],
        )
        .await
        .map_err(|e| pg_error("check the schema", e))?;
    let present = row.is_some_and(|r| r.get::<_, bool>("present"));
    let version: i32 = if present {
        client
            .query_one(
                &format!(
                    "SELECT COALESCE(max(version), 0) AS version FROM {}",
                    queries.migrations_table
                ),
                &[],
            )
            .await
            .map_err(|e| pg_error("read the schema version", e))?
            .get("version")
    } else {
        0
    };
    match version {
        v if v == CURRENT_VERSION => Ok(()),
        v if v > CURRENT_VERSION => Err(newer(v)),
        v => Err(Error::Backend {
            message: format!(
                "postgres: the schema is at version {v}, this build needs {CURRENT_VERSION}: run `idem migrate` or enable migrations"
            ),
            source: None,
        }),
    }
}
