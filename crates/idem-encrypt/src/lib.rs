//! Encryption at rest for idem stores: [`EncryptingStore`] wraps any
//! [`idem_core::Store`] and seals every stored response with XChaCha20-Poly1305 before the
//! inner store sees it, so a database dump, a Redis snapshot or a backup holds no response
//! body, header or status in clear.
//!
//! Each sealed response carries the id of the key it was sealed with, so keys rotate: a
//! [`Keyring`] holds every key that may still be needed to read (one per id) and one
//! *active* key that seals new responses. The record id is authenticated with the
//! ciphertext, so a sealed response copied onto another record does not open. A response
//! that does not open — tampered with, truncated, sealed under a key the keyring does not
//! have, moved between records, or stored in clear where encryption is required — is an
//! [`Error::Corrupt`](idem_core::Error::Corrupt): it is never replayed, and the HTTP layer
//! answers such a record with an error instead of executing the request again.
//!
//! ```
//! use std::sync::Arc;
//! use idem_core::*;
//! use idem_encrypt::{EncryptingStore, Keyring};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let inner: Arc<dyn Store> = Arc::new(MemoryStore::new());
//! let keyring = Keyring::new("k1", [7u8; 32])?;
//! let store = EncryptingStore::new(inner.clone(), keyring);
//!
//! let request = ClaimRequest::new(RecordId::for_event("ns", "evt-1"), Fingerprint::of_bytes(b"x"));
//! let ClaimOutcome::Acquired(lease) = store.claim(&request).await? else { panic!() };
//! store.complete(&lease.id, lease.token, "card charged".into()).await?;
//!
//! // The inner store holds only the sealed form...
//! let RecordState::Completed { response, .. } = inner.get(&lease.id).await?.unwrap().state
//! else { panic!() };
//! assert!(!response.windows(7).any(|w| w == b"charged"));
//! // ...and the decorator opens it for a replay.
//! let ClaimOutcome::Completed(replay) = store.claim(&request).await? else { panic!() };
//! assert_eq!(&replay.response[..], b"card charged");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # Sealed format, version 1
//!
//! ```text
//! magic     4 bytes  "IDEN"
//! version   u8       1
//! key id    u8 length (1 to 64), then the id's bytes (visible ASCII)
//! nonce     24 bytes, random per response
//! sealed    the ciphertext and its 16-byte Poly1305 tag
//! ```
//!
//! The associated data is everything before the ciphertext followed by the 32 bytes of
//! the record id. Random 192-bit nonces make nonce reuse under one key negligible
//! however many responses a key seals.
//!
//! # Features
//!
//! This crate has no optional features.

mod envelope;
mod keyring;
mod store;

pub use envelope::{MAGIC, OpenError, VERSION, is_sealed, open, seal};
pub use keyring::{KEY_LEN, KeyId, Keyring, KeyringError, MAX_KEY_ID_LEN};
pub use store::EncryptingStore;
