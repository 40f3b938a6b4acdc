//! Keys by id, and the one that seals new responses.

use std::collections::BTreeMap;
use std::fmt;

use chacha20poly1305::{KeyInit, XChaCha20Poly1305};

/// The length of a key, in bytes.
pub const KEY_LEN: usize = 32;
/// The longest key id, in bytes.
pub const MAX_KEY_ID_LEN: usize = 64;

/// A key id: 1 to [`MAX_KEY_ID_LEN`] visible ASCII characters (0x21–0x7E), stored in
/// clear with every sealed response.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(String);

impl KeyId {
    /// Checks and wraps an id.
    pub fn new(id: &str) -> Result<Self, KeyringError> {
        let valid = !id.is_empty()
            && id.len() <= MAX_KEY_ID_LEN
            && id.bytes().all(|b| (0x21..=0x7e).contains(&b));
        if valid {
            Ok(Self(id.to_string()))
        } else {
            Err(KeyringError::InvalidKeyId { id: id.to_string() })
        }
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a keyring cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyringError {
    /// A key id that is empty, too long, or not visible ASCII.
    #[error("invalid key id {id:?}: 1 to 64 visible ASCII characters")]
    InvalidKeyId {
        /// The id as given.
        id: String,
    },
    /// A key that is not 32 bytes.
    #[error("key {id:?} has {len} bytes; keys are 32 bytes")]
    InvalidKeyLength {
        /// The key's id.
        id: String,
        /// Its length.
        len: usize,
    },
    /// The same id twice with different keys.
    #[error("key id {id:?} is given twice")]
    DuplicateKeyId {
        /// The id.
        id: String,
    },
    /// The active id names no key of the ring.
    #[error("the active key {id:?} is not in the keyring")]
    UnknownActiveKey {
        /// The id.
        id: String,
    },
}

/// Every key that may be needed to open a stored response, by id, and the active one new
/// responses are sealed with.
///
/// Rotation: add the new key and make it active; keep the old one until every record it
/// sealed has expired (the longest retention), then remove it. A record sealed with a key
/// that is no longer in the ring is reported corrupt and never replayed.
///
/// ```
/// use idem_encrypt::Keyring;
///
/// let ring = Keyring::new("2026-01", [1u8; 32])?
///     .with_key("2026-02", [2u8; 32])?
///     .with_active("2026-02")?;
/// assert_eq!(ring.active_id().as_str(), "2026-02");
/// assert_eq!(ring.len(), 2);
/// # Ok::<(), idem_encrypt::KeyringError>(())
/// ```
#[derive(Clone)]
pub struct Keyring {
    keys: BTreeMap<KeyId, XChaCha20Poly1305>,
    active: KeyId,
}

impl Keyring {
    /// A ring with one key, active.
    pub fn new(id: &str, key: [u8; KEY_LEN]) -> Result<Self, KeyringError> {
        let id = KeyId::new(id)?;
        let mut keys = BTreeMap::new();
        keys.insert(id.clone(), XChaCha20Poly1305::new(&key.into()));
        Ok(Self { keys, active: id })
    }

    /// A ring from `(id, key bytes)` pairs (keys of any other length than 32 bytes are
    /// rejected) with `active` sealing new responses.
    pub fn from_keys<'a>(
        keys: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        active: &str,
    ) -> Result<Self, KeyringError> {
        let mut ring: BTreeMap<KeyId, XChaCha20Poly1305> = BTreeMap::new();
        for (id, bytes) in keys {
            let key: [u8; KEY_LEN] =
                bytes
                    .try_into()
                    .map_err(|_| KeyringError::InvalidKeyLength {
                        id: id.to_string(),
                        len: bytes.len(),
                    })?;
            let id = KeyId::new(id)?;
            if ring.contains_key(&id) {
                return Err(KeyringError::DuplicateKeyId {
                    id: id.as_str().to_string(),
                });
            }
            ring.insert(id, XChaCha20Poly1305::new(&key.into()));
        }
        let active = KeyId::new(active)?;
        if !ring.contains_key(&active) {
            return Err(KeyringError::UnknownActiveKey {
                id: active.as_str().to_string(),
            });
        }
        Ok(Self { keys: ring, active })
    }

    /// Adds a key (not active).
    pub fn with_key(mut self, id: &str, key: [u8; KEY_LEN]) -> Result<Self, KeyringError> {
        let id = KeyId::new(id)?;
        if self.keys.contains_key(&id) {
            return Err(KeyringError::DuplicateKeyId {
                id: id.as_str().to_string(),
            });
        }
        self.keys.insert(id, XChaCha20Poly1305::new(&key.into()));
        Ok(self)
    }

    /// Makes the key `id` the one new responses are sealed with.
    pub fn with_active(mut self, id: &str) -> Result<Self, KeyringError> {
        let id = KeyId::new(id)?;
        if !self.keys.contains_key(&id) {
            return Err(KeyringError::UnknownActiveKey {
                id: id.as_str().to_string(),
            });
        }
        self.active = id;
        Ok(self)
    }

    /// The id of the key new responses are sealed with.
    pub fn active_id(&self) -> &KeyId {
        &self.active
    }

    /// The ids of every key, in order.
    pub fn ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }

    /// How many keys the ring holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Never true: a ring holds at least its active key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The active key; always present (every constructor checks it), `None` otherwise.
    pub(crate) fn active(&self) -> Option<(&KeyId, &XChaCha20Poly1305)> {
        self.keys
            .get(&self.active)
            .map(|cipher| (&self.active, cipher))
    }

    pub(crate) fn get(&self, id: &[u8]) -> Option<&XChaCha20Poly1305> {
        let id = std::str::from_utf8(id).ok()?;
        self.keys.get(&KeyId::new(id).ok()?)
    }
}

/// Shows the ids, never the keys.
impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .field("active", &self.active)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn ids_and_lengths_are_checked() {
        assert!(KeyId::new("").is_err());
        assert!(KeyId::new("a b").is_err());
        assert!(KeyId::new(&"k".repeat(65)).is_err());
        assert!(KeyId::new(&"k".repeat(64)).is_ok());
        let short: &[u8] = &[0; 16];
        assert_eq!(
            Keyring::from_keys([("k1", short)], "k1").unwrap_err(),
            KeyringError::InvalidKeyLength {
                id: "k1".into(),
                len: 16
            }
        );
        let key: &[u8] = &[0; 32];
        assert!(matches!(
            Keyring::from_keys([("k1", key)], "k2"),
            Err(KeyringError::UnknownActiveKey { .. })
        ));
        assert!(matches!(
            Keyring::from_keys([("k1", key), ("k1", key)], "k1"),
            Err(KeyringError::DuplicateKeyId { .. })
        ));
    }

    #[test]
    fn debug_shows_no_key() {
        let ring = Keyring::new("k1", [0xab; 32]).unwrap();
        let shown = format!("{ring:?}");
        assert!(shown.contains("k1"), "{shown}");
        assert!(
            !shown.contains("171") && !shown.contains("ab, ab"),
            "{shown}"
        );
    }
}
