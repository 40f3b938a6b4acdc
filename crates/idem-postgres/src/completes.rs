//! Completions: one record's (`complete.sql`), or a batch's in one statement
//! (`complete_batch.sql`), each conditional on its token.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use deadpool_postgres::Pool;
use idem_core::{Error, FencingToken, RecordId};

use crate::claims::copy_error;
use crate::combine::Batch;
use crate::queries::Queries;
use crate::{pg_error, pool_error, prepared, row};
use tokio_postgres::types::Type;

/// One completion: the record, the token that holds it, the response to store.
pub(crate) type Completion = (RecordId, FencingToken, Bytes);

/// What a completion did.
#[derive(Debug)]
pub(crate) enum Settled {
    /// The record is completed; waiters in every replica are notified at commit.
    Changed,
    /// The token does not hold the record: nothing changed. The record's token as the
    /// statement saw it, if it exists.
    NotHeld(Option<FencingToken>),
}

/// Runs completion statements on connections from the pool.
#[derive(Clone)]
pub(crate) struct Completer {
    pub(crate) pool: Pool,
    pub(crate) queries: Arc<Queries>,
}

impl Batch for Completer {
    type Request = Completion;
    type Output = Settled;

    fn id(request: &Completion) -> RecordId {
        request.0
    }

    async fn run(&self, requests: &[Completion]) -> Vec<Result<Settled, Error>> {
        if requests.len() == 1 {
            return vec![self.complete_one(&requests[0]).await];
        }
        match self.complete_batch(requests).await {
            Ok(results) => results,
            // The statement failed on the server and so changed nothing: one at a time, a
            // completion that makes it fail fails alone.
            Err(Error::Backend { .. }) => {
                let mut results = Vec::with_capacity(requests.len());
                for request in requests {
                    results.push(self.complete_one(request).await);
                }
                results
            }
            Err(e) => requests.iter().map(|_| Err(copy_error(&e))).collect(),
        }
    }
}

impl Completer {
    async fn complete_one(&self, (id, token, response): &Completion) -> Result<Settled, Error> {
        let client = self.pool.get().await.map_err(pool_error)?;
        let statement = prepared(&client, &self.queries.complete, "complete").await?;
        let body: &[u8] = response;
        let row = client
            .query_one(
                &statement,
                &[&&id.as_bytes()[..], &row::token_param(*token)?, &body],
            )
            .await
            .map_err(|e| pg_error("complete", e))?;
        let changed: i64 = row.try_get("changed").map_err(row::decode_error)?;
        if changed == 1 {
            return Ok(Settled::Changed);
        }
        let current: Option<i64> = row.try_get("current").map_err(row::decode_error)?;
        Ok(Settled::NotHeld(current.map(row::token).transpose()?))
    }

    async fn complete_batch(
        &self,
        requests: &[Completion],
    ) -> Result<Vec<Result<Settled, Error>>, Error> {
        let ids: Vec<&[u8]> = requests
            .iter()
            .map(|(id, _, _)| &id.as_bytes()[..])
            .collect();
        let tokens = requests
            .iter()
            .map(|(_, token, _)| row::token_param(*token))
            .collect::<Result<Vec<i64>, Error>>()?;
        let responses: Vec<&[u8]> = requests.iter().map(|(_, _, r)| &r[..]).collect();
        let client = self.pool.get().await.map_err(pool_error)?;
        // Planned at every run, in one round trip (complete_batch.sql says why).
        let rows = client
            .query_typed(
                &self.queries.complete_batch,
                &[
                    (&ids, Type::BYTEA_ARRAY),
                    (&tokens, Type::INT8_ARRAY),
                    (&responses, Type::BYTEA_ARRAY),
                ],
            )
            .await
            .map_err(|e| pg_error("complete", e))?;
        let mut by_id = HashMap::with_capacity(rows.len());
        for row in &rows {
            let id: &[u8] = row.try_get("id").map_err(row::decode_error)?;
            let id = RecordId::from_slice(id)
                .ok_or_else(|| Error::corrupt("postgres: a record id is not 32 bytes"))?;
            let settled = (|| {
                let changed: bool = row.try_get("changed").map_err(row::decode_error)?;
                if changed {
                    return Ok(Settled::Changed);
                }
                let current: Option<i64> = row.try_get("current").map_err(row::decode_error)?;
                Ok(Settled::NotHeld(current.map(row::token).transpose()?))
            })();
            by_id.insert(id, settled);
        }
        Ok(requests
            .iter()
            .map(|(id, _, _)| {
                by_id
                    .remove(id)
                    .unwrap_or_else(|| Err(Error::backend("postgres: complete", "no outcome")))
            })
            .collect())
    }
}
