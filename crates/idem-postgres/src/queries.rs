//! The SQL of every operation, with the configured schema and table names filled in.

use idem_core::Error;

/// Every statement the store runs, for one table.
#[derive(Debug)]
pub(crate) struct Queries {
    pub(crate) schema: String,
    /// `"schema"."table"`.
    pub(crate) table: String,
    /// `"schema"."table_migrations"`.
    pub(crate) migrations_table: String,
    /// The NOTIFY channel of this table.
    pub(crate) channel: String,
    pub(crate) migrations: Vec<(i32, &'static str, String)>,
    /// Claims a batch of distinct ids (arrays), taking over rows that may be.
    pub(crate) claim: String,
    /// Claims the ids of a batch without a row, reads the others (`claim_first.sql`).
    pub(crate) claim_first: String,
    /// Claims one id without a row, else reads its row (scalars; `claim_one.sql` says why).
    pub(crate) claim_one: String,
    /// Claims one id whose row may be taken over (`take_over_one.sql`).
    pub(crate) take_over_one: String,
    pub(crate) claim_by_holder: String,
    /// Releases the records lost claims still hold (`release_lost.sql`).
    pub(crate) release_lost: String,
    pub(crate) complete: String,
    /// Completes a batch of distinct ids (arrays).
    pub(crate) complete_batch: String,
    pub(crate) release: String,
    pub(crate) renew: String,
    pub(crate) get: String,
    pub(crate) list: String,
    pub(crate) purge: String,
    pub(crate) remove: String,
    pub(crate) now: String,
}

/// Migrations in order: (version, name, SQL). Never edit a released one; add the next.
const MIGRATIONS: &[(i32, &str, &str)] =
    &[(1, "records", include_str!("../migrations/0001_records.sql"))];

/// The schema version this build knows.
pub(crate) const CURRENT_VERSION: i32 = 1;

/// Schema and table names are interpolated into SQL, so only plain lower-case identifiers
/// are accepted.
fn identifier(kind: &str, name: &str) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidRequest {
            reason: format!(
                "invalid PostgreSQL {kind} name {name:?}: use 1 to 40 of a-z, 0-9 and _, not starting with a digit"
            ),
        })
    }
}

impl Queries {
    pub(crate) fn new(schema: &str, table: &str) -> Result<Self, Error> {
        identifier("schema", schema)?;
        identifier("table", table)?;
        let qualified = format!("\"{schema}\".\"{table}\"");
        let channel = format!("idem_{schema}_{table}");
        // Comment lines stay in the files: the server would only show them (and cut the
        // statement at `track_activity_query_size`) in `pg_stat_activity`.
        let fill = |sql: &str| {
            sql.lines()
                .filter(|line| !line.trim_start().starts_with("--"))
                .collect::<Vec<_>>()
                .join("\n")
                .replace("{{table}}", &qualified)
                .replace("{{index_prefix}}", table)
                .replace("{{channel}}", &channel)
        };
        Ok(Self {
            schema: schema.to_owned(),
            migrations_table: format!("\"{schema}\".\"{table}_migrations\""),
            migrations: MIGRATIONS
                .iter()
                .map(|(version, name, sql)| (*version, *name, fill(sql)))
                .collect(),
            claim: fill(include_str!("../queries/claim.sql")),
            claim_first: fill(include_str!("../queries/claim_first.sql")),
            claim_one: fill(include_str!("../queries/claim_one.sql")),
            take_over_one: fill(include_str!("../queries/take_over_one.sql")),
            claim_by_holder: fill(include_str!("../queries/claim_by_holder.sql")),
            release_lost: fill(include_str!("../queries/release_lost.sql")),
            complete: fill(include_str!("../queries/complete.sql")),
            complete_batch: fill(include_str!("../queries/complete_batch.sql")),
            release: fill(include_str!("../queries/release.sql")),
            renew: fill(include_str!("../queries/renew.sql")),
            get: fill(include_str!("../queries/get.sql")),
            list: fill(include_str!("../queries/list.sql")),
            purge: fill(include_str!("../queries/purge.sql")),
            remove: fill(include_str!("../queries/remove.sql")),
            now: fill(include_str!("../queries/now.sql")),
            table: qualified,
            channel,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_they_reach_sql() {
        assert!(Queries::new("public", "idem_records").is_ok());
        for bad in [
            "",
            "1abc",
            "a-b",
            "A",
            "x\"; drop table y; --",
            &"a".repeat(41),
        ] {
            assert!(Queries::new("public", bad).is_err(), "{bad:?}");
            assert!(Queries::new(bad, "t").is_err(), "{bad:?}");
        }
    }

    /// The text from `ON CONFLICT` to the end of `RETURNING`'s column list.
    fn conflict_clause(sql: &str) -> &str {
        let start = sql.find("ON CONFLICT (id)").unwrap();
        let end = start + sql[start..].find("\n)").unwrap();
        &sql[start..end]
    }

    #[test]
    fn single_and_batch_claims_resolve_conflicts_alike() {
        let q = Queries::new("s", "t").unwrap();
        assert_eq!(conflict_clause(&q.claim), conflict_clause(&q.take_over_one));
        assert!(conflict_clause(&q.claim).contains("RETURNING"));
    }

    #[test]
    fn every_placeholder_is_filled() {
        let q = Queries::new("s", "t").unwrap();
        for sql in [
            &q.claim,
            &q.claim_first,
            &q.claim_one,
            &q.take_over_one,
            &q.release_lost,
            &q.complete,
            &q.release,
            &q.renew,
            &q.get,
            &q.list,
            &q.purge,
        ] {
            assert!(!sql.contains("{{"), "{sql}");
        }
        assert!(q.migrations.iter().all(|(_, _, sql)| !sql.contains("{{")));
    }
}
