//! Scopes: who sent a key, to which endpoint, and the fixed-size record id they map to.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::IdempotencyKey;

/// The fixed-size identity of a record: SHA-256 over the length-prefixed parts of a
/// [`Scope`]. Two scopes that differ in any part give different ids.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId([u8; 32]);

impl RecordId {
    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Builds an id from raw bytes (as read back from a store).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Builds an id from a slice; `None` unless it is exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// An id for a plain event identifier in a namespace (the dedup API for event
    /// pipelines, where there is no principal, method or route).
    pub fn for_event(namespace: &str, event_id: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"idem/event/v1");
        update_part(&mut h, namespace.as_bytes());
        update_part(&mut h, event_id.as_bytes());
        Self(h.finalize().into())
    }

    /// Lower-case hex form.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses the lower- or upper-case hex form.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Self(out))
    }

    /// Which of `n` shards this id belongs to (ids are uniformly distributed).
    pub fn shard(&self, n: usize) -> usize {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        (u64::from_le_bytes(first) % n.max(1) as u64) as usize
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordId({})", &self.to_hex()[..16])
    }
}

/// A principal (tenant, account, API credential) as it is stored: an HMAC-SHA256 of the
/// raw value under a secret from the caller's configuration. The raw value never leaves
/// [`PrincipalHasher::hash`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrincipalHash([u8; 32]);

impl PrincipalHash {
    /// The hash of "no principal": requests without one share this scope.
    pub const ANONYMOUS: PrincipalHash = PrincipalHash([0; 32]);

    /// The hash's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for PrincipalHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrincipalHash({})", &hex(&self.0)[..12])
    }
}

/// Hashes raw principals with a secret key (HMAC-SHA256).
#[derive(Clone)]
pub struct PrincipalHasher {
    mac: Hmac<Sha256>,
}

impl PrincipalHasher {
    /// A hasher keyed by `secret`. Any length works; 32 random bytes is the recommendation.
    pub fn new(secret: &[u8]) -> Self {
        // HMAC accepts keys of every length, so this cannot fail.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        Self { mac }
    }

    /// The keyed hash of a raw principal value.
    pub fn hash(&self, principal: &[u8]) -> PrincipalHash {
        let mut mac = self.mac.clone();
        mac.update(principal);
        PrincipalHash(mac.finalize().into_bytes().into())
    }
}

impl fmt::Debug for PrincipalHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrincipalHasher(<secret>)")
    }
}

/// Everything that identifies a record: (namespace, principal, method, route, key).
///
/// The same key from two principals, or sent to two routes or with two methods, names two
/// different records. `route` is the route *pattern* (`/v1/charges/{id}`), or a fixed name
/// where the key is shared across routes (Stripe-style per-account scope).
///
/// ```
/// use idem_core::{IdempotencyKey, PrincipalHasher, Scope};
///
/// let hasher = PrincipalHasher::new(b"configured secret");
/// let key = IdempotencyKey::parse(b"k1").unwrap();
/// let a = Scope::new("payments", hasher.hash(b"Bearer alice"), "POST", "/v1/charges", &key);
/// let b = Scope::new("payments", hasher.hash(b"Bearer bob"), "POST", "/v1/charges", &key);
/// assert_ne!(a.record_id(), b.record_id());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope<'a> {
    /// Isolates deployments or products sharing one store.
    pub namespace: &'a str,
    /// The keyed hash of the principal.
    pub principal: PrincipalHash,
    /// The HTTP method (upper case), or any operation name.
    pub method: &'a str,
    /// The route pattern or scope name.
    pub route: &'a str,
    /// The client's key.
    pub key: &'a IdempotencyKey,
}

impl<'a> Scope<'a> {
    /// Assembles a scope.
    pub fn new(
        namespace: &'a str,
        principal: PrincipalHash,
        method: &'a str,
        route: &'a str,
        key: &'a IdempotencyKey,
    ) -> Self {
        Self {
            namespace,
            principal,
            method,
            route,
            key,
        }
    }

    /// The record id of this scope.
    pub fn record_id(&self) -> RecordId {
        let mut h = Sha256::new();
        h.update(b"idem/scope/v1");
        update_part(&mut h, self.namespace.as_bytes());
        update_part(&mut h, self.principal.as_bytes());
        update_part(&mut h, self.method.as_bytes());
        update_part(&mut h, self.route.as_bytes());
        update_part(&mut h, self.key.as_str().as_bytes());
        RecordId(h.finalize().into())
    }
}

/// Length-prefixing makes the encoding injective: ("ab", "c") and ("a", "bc") differ.
fn update_part(h: &mut Sha256, part: &[u8]) {
    h.update((part.len() as u64).to_be_bytes());
    h.update(part);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> IdempotencyKey {
        IdempotencyKey::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn every_part_changes_the_id() {
        let hasher = PrincipalHasher::new(b"s");
        let k = key("k");
        let k2 = key("k2");
        let base = Scope::new("ns", hasher.hash(b"p"), "POST", "/a", &k);
        let variants = [
            Scope::new("ns2", hasher.hash(b"p"), "POST", "/a", &k),
            Scope::new("ns", hasher.hash(b"q"), "POST", "/a", &k),
            Scope::new("ns", PrincipalHash::ANONYMOUS, "POST", "/a", &k),
            Scope::new("ns", hasher.hash(b"p"), "PATCH", "/a", &k),
            Scope::new("ns", hasher.hash(b"p"), "POST", "/b", &k),
            Scope::new("ns", hasher.hash(b"p"), "POST", "/a", &k2),
        ];
        for v in &variants {
            assert_ne!(base.record_id(), v.record_id(), "{v:?}");
        }
        assert_eq!(
            base.record_id(),
            Scope::new("ns", hasher.hash(b"p"), "POST", "/a", &k).record_id()
        );
    }

    #[test]
    fn parts_are_length_prefixed() {
        let k = key("k");
        let a = Scope::new("ab", PrincipalHash::ANONYMOUS, "c", "/", &k);
        let b = Scope::new("a", PrincipalHash::ANONYMOUS, "bc", "/", &k);
        assert_ne!(a.record_id(), b.record_id());
    }

    #[test]
    fn principal_hash_depends_on_the_secret() {
        let a = PrincipalHasher::new(b"one").hash(b"alice");
        let b = PrincipalHasher::new(b"two").hash(b"alice");
        assert_ne!(a, b);
        assert_ne!(a, PrincipalHash::ANONYMOUS);
    }

    #[test]
    fn hex_round_trips() {
        let id = RecordId::for_event("ns", "evt-1");
        assert_eq!(RecordId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(RecordId::from_hex("zz"), None);
    }
}
