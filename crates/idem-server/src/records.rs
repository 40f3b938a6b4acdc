//! Operator actions on records, shared by the admin API and `idem keys`: address a record
//! by id or by its scope parts, show it, release it, purge it, list what is in flight.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use idem_core::{
    IdempotencyKey, KeyError, ListFilter, PrincipalHash, PrincipalHasher, Record, RecordId,
    RecordState, Scope, StateKind, Store, Timestamp,
};
use idem_tower::stored::StoredOutcome;
use serde_json::{Map, Value, json};

/// The parts of a record's scope, as an operator knows them.
#[derive(Clone, Debug, Default)]
pub struct ScopeParts {
    /// The route's namespace (`default` unless the route sets one).
    pub namespace: Option<String>,
    /// The raw principal (the value of the route's principal header), if the request had
    /// one.
    pub principal: Option<String>,
    /// The method (upper-cased here).
    pub method: String,
    /// The route pattern as configured (`/v1/charges/{id}`), or the route's scope name.
    pub route: String,
    /// The request's path: needed for prefix routes (`/v1/*`, the implicit `/*`), where
    /// each concrete path is its own endpoint.
    pub path: Option<String>,
    /// The idempotency key, as the client sent it (sf-string or bare token).
    pub key: String,
}

impl ScopeParts {
    /// The record id these parts name, with principals hashed by `hasher`.
    pub fn record_id(&self, hasher: &PrincipalHasher) -> Result<RecordId, ScopeError> {
        let key = IdempotencyKey::parse(self.key.as_bytes())?;
        let route = match (&self.path, self.route.ends_with("/*")) {
            (Some(path), true) => idem_tower::scope_name(&self.route, path),
            (None, true) => return Err(ScopeError::PathNeeded(self.route.clone())),
            (_, false) => std::borrow::Cow::Borrowed(self.route.as_str()),
        };
        let principal = self
            .principal
            .as_ref()
            .map_or(PrincipalHash::ANONYMOUS, |p| hasher.hash(p.as_bytes()));
        let method = self.method.to_ascii_uppercase();
        let namespace = self.namespace.as_deref().unwrap_or("default");
        Ok(Scope::new(namespace, principal, &method, &route, &key).record_id())
    }
}

/// Why scope parts name no record.
#[derive(Debug, thiserror::Error)]
pub enum ScopeError {
    /// The key is malformed.
    #[error("invalid key: {0}")]
    Key(#[from] KeyError),
    /// A prefix route scopes records by the concrete path, which was not given.
    #[error(
        "route {0:?} is a prefix route: its records are scoped by the request's path, give it too"
    )]
    PathNeeded(String),
}

/// Parses a record id in hex, with a message naming what is wrong.
pub fn parse_id(hex: &str) -> Result<RecordId, String> {
    RecordId::from_hex(hex.trim())
        .ok_or_else(|| format!("invalid record id {hex:?}: expected 64 hex digits"))
}

fn time(ts: Timestamp) -> Value {
    let at = UNIX_EPOCH + Duration::from_millis(ts.as_millis());
    Value::from(humantime::format_rfc3339_millis(at).to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A record as JSON. The stored response's body and headers are included only when
/// `with_body` is set; otherwise only its status and size.
pub fn record_json(record: &Record, with_body: bool) -> Value {
    let mut out = Map::new();
    out.insert("id".into(), record.id.to_hex().into());
    out.insert("state".into(), record.state.kind().as_str().into());
    out.insert("token".into(), record.token.get().into());
    out.insert(
        "fingerprint".into(),
        hex(record.fingerprint.as_bytes()).into(),
    );
    out.insert(
        "retention_ms".into(),
        u64::try_from(record.retention.as_millis())
            .unwrap_or(u64::MAX)
            .into(),
    );
    out.insert("expires_at".into(), time(record.expires_at));
    match &record.state {
        RecordState::InFlight { lease_until } => {
            out.insert("lease_until".into(), time(*lease_until));
        }
        RecordState::Released { released_at } => {
            out.insert("released_at".into(), time(*released_at));
        }
        RecordState::Completed {
            response,
            completed_at,
        } => {
            out.insert("completed_at".into(), time(*completed_at));
            out.insert("response".into(), response_json(response, with_body));
        }
    }
    Value::Object(out)
}

fn response_json(stored: &[u8], with_body: bool) -> Value {
    match StoredOutcome::decode(stored) {
        Ok(StoredOutcome::Response(response)) => {
            let mut out = Map::new();
            out.insert("kind".into(), "response".into());
            out.insert("status".into(), response.status.as_u16().into());
            out.insert("body_bytes".into(), response.body.len().into());
            if with_body {
                let headers: Vec<Value> = response
                    .headers
                    .iter()
                    .map(|(name, value)| {
                        json!([name.as_str(), String::from_utf8_lossy(value.as_bytes())])
                    })
                    .collect();
                out.insert("headers".into(), Value::Array(headers));
                match std::str::from_utf8(&response.body) {
                    Ok(text) => out.insert("body".into(), text.into()),
                    Err(_) => out.insert(
                        "body_base64".into(),
                        base64::engine::general_purpose::STANDARD
                            .encode(&response.body)
                            .into(),
                    ),
                };
            }
            Value::Object(out)
        }
        Ok(StoredOutcome::NotStored(marker)) => json!({
            "kind": "too_large_to_replay",
            "status": marker.status.as_u16(),
            "max_stored_bytes": marker.limit,
        }),
        Ok(_) => json!({ "kind": "unknown" }),
        Err(error) => json!({ "kind": "unreadable", "error": error.to_string() }),
    }
}

/// What a release did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// The in-flight record was released: the next request with its key executes.
    Released,
    /// The record exists but is not in flight.
    NotInFlight(StateKind),
    /// No live record has this id.
    NotFound,
}

/// Releases an in-flight record, whoever holds it. Its holder, if still running, then
/// fails to store its answer (the lease is lost) and the next request executes again:
/// meant for holders known to be gone.
pub async fn release(store: &Arc<dyn Store>, id: &RecordId) -> Result<Released, idem_core::Error> {
    // The holder may renew or settle between the read and the release: try a few times.
    for _ in 0..3 {
        let Some(record) = store.get(id).await? else {
            return Ok(Released::NotFound);
        };
        if record.state.kind() != StateKind::InFlight {
            return Ok(Released::NotInFlight(record.state.kind()));
        }
        match store.release(id, record.token).await {
            Ok(()) => return Ok(Released::Released),
            Err(error) if error.is_lease_lost() => continue,
            Err(error) => return Err(error),
        }
    }
    match store.get(id).await? {
        None => Ok(Released::NotFound),
        Some(record) => Ok(Released::NotInFlight(record.state.kind())),
    }
}

/// What a purge did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purged {
    /// The record was deleted, whatever its state.
    Purged,
    /// No record has this id.
    NotFound,
    /// The store cannot delete single records.
    Unsupported,
}

/// Deletes a record whatever its state: the next request with its key executes again.
pub async fn purge(store: &Arc<dyn Store>, id: &RecordId) -> Result<Purged, idem_core::Error> {
    let Some(inspector) = store.inspector() else {
        return Ok(Purged::Unsupported);
    };
    Ok(if inspector.remove(id).await? {
        Purged::Purged
    } else {
        Purged::NotFound
    })
}

/// In-flight records after `after`, at most `limit`; `None` if the store cannot list.
pub async fn in_flight(
    store: &Arc<dyn Store>,
    after: Option<RecordId>,
    limit: usize,
) -> Result<Option<Vec<Record>>, idem_core::Error> {
    let Some(inspector) = store.inspector() else {
        return Ok(None);
    };
    let filter = ListFilter {
        state: Some(StateKind::InFlight),
        after,
        limit,
    };
    inspector.list(&filter).await.map(Some)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};
    use idem_core::{ClaimOutcome, ClaimRequest, Fingerprint, MemoryStore};
    use idem_tower::stored::StoredResponse;

    use super::*;

    #[tokio::test]
    async fn show_release_and_purge() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let hasher = PrincipalHasher::new(b"s");
        let parts = ScopeParts {
            principal: Some("Bearer a".into()),
            method: "post".into(),
            route: "/v1/charges".into(),
            key: "k1".into(),
            ..ScopeParts::default()
        };
        let id = parts.record_id(&hasher).unwrap();
        let request = ClaimRequest::new(id, Fingerprint::of_bytes(b"x"));
        let ClaimOutcome::Acquired(_) = store.claim(&request).await.unwrap() else {
            panic!()
        };
        let listed = in_flight(&store, None, 10).await.unwrap().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(release(&store, &id).await.unwrap(), Released::Released);
        assert_eq!(
            release(&store, &id).await.unwrap(),
            Released::NotInFlight(StateKind::Released)
        );
        let ClaimOutcome::Acquired(lease) = store.claim(&request).await.unwrap() else {
            panic!()
        };
        let stored = StoredOutcome::Response(StoredResponse {
            status: StatusCode::CREATED,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"secret body"),
        });
        store
            .complete(&id, lease.token, stored.encode())
            .await
            .unwrap();
        let record = store.get(&id).await.unwrap().unwrap();
        let shown = record_json(&record, false);
        assert_eq!(shown["response"]["status"], 201);
        assert!(!shown.to_string().contains("secret body"));
        assert_eq!(
            record_json(&record, true)["response"]["body"],
            "secret body"
        );
        assert_eq!(purge(&store, &id).await.unwrap(), Purged::Purged);
        assert_eq!(purge(&store, &id).await.unwrap(), Purged::NotFound);
    }
}
