//! The store decorator.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use idem_core::{
    ClaimOutcome, ClaimRequest, Completion, Error, FencingToken, Inspect, ListFilter, Record,
    RecordId, RecordState, Store, Timestamp, WaitForCompletion,
};

use crate::envelope::{self, OpenError};
use crate::keyring::Keyring;

/// A [`Store`] that seals responses on [`complete`](Store::complete) and opens them on
/// every read: [`claim`](Store::claim) (a replay), [`get`](Store::get),
/// [`claim_batch`](Store::claim_batch) and the inspector's [`list`](Inspect::list). Every
/// other operation, the completion waiter and the inspector's `remove` go to the inner
/// store unchanged.
///
/// A stored response that does not open is an [`Error::Corrupt`]: tampered with, moved
/// from another record, sealed with a key the [`Keyring`] lacks, or — unless
/// [`with_plaintext_reads`](Self::with_plaintext_reads) — stored in clear.
#[derive(Clone)]
pub struct EncryptingStore {
    inner: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    plaintext_reads: bool,
}

impl EncryptingStore {
    /// Seals the responses of `inner` with `keyring`.
    pub fn new(inner: Arc<dyn Store>, keyring: Keyring) -> Self {
        Self {
            inner,
            keyring: Arc::new(keyring),
            plaintext_reads: false,
        }
    }

    /// Whether responses stored in clear (by a gateway without encryption) are still
    /// returned as they are. Default: `false`, they are corrupt. Turn it on only while a
    /// store that held clear responses is migrated, for one retention period: whoever can
    /// write to the store could otherwise plant a clear response to be replayed.
    pub fn with_plaintext_reads(mut self, allowed: bool) -> Self {
        self.plaintext_reads = allowed;
        self
    }

    /// The inner store.
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    /// The keyring.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    fn open(&self, id: &RecordId, stored: &Bytes) -> Result<Bytes, Error> {
        if self.plaintext_reads && !envelope::is_sealed(stored) {
            return Ok(stored.clone());
        }
        envelope::open(&self.keyring, id, stored).map_err(|e| corrupt(id, e))
    }

    fn open_completion(
        &self,
        id: &RecordId,
        mut completion: Completion,
    ) -> Result<Completion, Error> {
        completion.response = self.open(id, &completion.response)?;
        Ok(completion)
    }

    fn open_outcome(&self, id: &RecordId, outcome: ClaimOutcome) -> Result<ClaimOutcome, Error> {
        match outcome {
            ClaimOutcome::Completed(completion) => Ok(ClaimOutcome::Completed(
                self.open_completion(id, completion)?,
            )),
            other => Ok(other),
        }
    }

    fn open_record(&self, mut record: Record) -> Result<Record, Error> {
        if let RecordState::Completed { response, .. } = &mut record.state {
            *response = self.open(&record.id, response)?;
        }
        Ok(record)
    }
}

fn corrupt(id: &RecordId, error: OpenError) -> Error {
    Error::corrupt_with(
        format!("the stored response of record {id} does not open"),
        error,
    )
}

impl fmt::Debug for EncryptingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptingStore")
            .field("inner", &self.inner)
            .field("keyring", &self.keyring)
            .field("plaintext_reads", &self.plaintext_reads)
            .finish()
    }
}

#[async_trait]
impl Store for EncryptingStore {
    async fn claim(&self, request: &ClaimRequest) -> Result<ClaimOutcome, Error> {
        let outcome = self.inner.claim(request).await?;
        self.open_outcome(&request.id, outcome)
    }

    async fn complete(
        &self,
        id: &RecordId,
        token: FencingToken,
        response: Bytes,
    ) -> Result<(), Error> {
        let sealed = envelope::seal(&self.keyring, id, &response).map_err(|e| Error::Backend {
            message: "sealing the response failed".into(),
            source: Some(Box::new(e)),
        })?;
        self.inner.complete(id, token, sealed).await
    }

    async fn release(&self, id: &RecordId, token: FencingToken) -> Result<(), Error> {
        self.inner.release(id, token).await
    }

    async fn renew(
        &self,
        id: &RecordId,
        token: FencingToken,
        lease: Duration,
    ) -> Result<Timestamp, Error> {
        self.inner.renew(id, token, lease).await
    }

    async fn get(&self, id: &RecordId) -> Result<Option<Record>, Error> {
        self.inner
            .get(id)
            .await?
            .map(|record| self.open_record(record))
            .transpose()
    }

    async fn claim_batch(&self, requests: &[ClaimRequest]) -> Result<Vec<ClaimOutcome>, Error> {
        let outcomes = self.inner.claim_batch(requests).await?;
        if outcomes.len() != requests.len() {
            return Err(Error::Backend {
                message: format!(
                    "the store answered {} outcomes to {} claims",
                    outcomes.len(),
                    requests.len()
                ),
                source: None,
            });
        }
        requests
            .iter()
            .zip(outcomes)
            .map(|(request, outcome)| self.open_outcome(&request.id, outcome))
            .collect()
    }

    async fn purge_expired(&self, limit: usize) -> Result<usize, Error> {
        self.inner.purge_expired(limit).await
    }

    async fn now(&self) -> Result<Timestamp, Error> {
        self.inner.now().await
    }

    fn completion_waiter(&self) -> Option<&dyn WaitForCompletion> {
        self.inner.completion_waiter()
    }

    fn inspector(&self) -> Option<&dyn Inspect> {
        self.inner.inspector().map(|_| self as &dyn Inspect)
    }
}

#[async_trait]
impl Inspect for EncryptingStore {
    async fn list(&self, filter: &ListFilter) -> Result<Vec<Record>, Error> {
        let inspector = self.inner.inspector().ok_or_else(|| Error::Backend {
            message: "the inner store cannot list records".into(),
            source: None,
        })?;
        inspector
            .list(filter)
            .await?
            .into_iter()
            .map(|record| self.open_record(record))
            .collect()
    }

    async fn remove(&self, id: &RecordId) -> Result<bool, Error> {
        let inspector = self.inner.inspector().ok_or_else(|| Error::Backend {
            message: "the inner store cannot remove records".into(),
            source: None,
        })?;
        inspector.remove(id).await
    }
}
