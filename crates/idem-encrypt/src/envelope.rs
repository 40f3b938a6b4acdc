//! The sealed form of one stored response.

use bytes::{BufMut, Bytes, BytesMut};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use idem_core::RecordId;

use crate::keyring::Keyring;

/// The first bytes of every sealed response.
pub const MAGIC: &[u8; 4] = b"IDEN";
/// The format version [`seal`] writes.
pub const VERSION: u8 = 1;

const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;

/// Why stored bytes do not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The bytes are not in the sealed format (a response stored in clear, or garbage).
    #[error("not a sealed response")]
    NotSealed,
    /// A version this build cannot read.
    #[error("unsupported sealed response version {version}")]
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
    /// The header is cut short or its key id is malformed.
    #[error("malformed sealed response header")]
    Malformed,
    /// Sealed with a key the keyring does not hold (removed too early, or a foreign
    /// store).
    #[error("sealed with key {id:?}, which is not in the keyring")]
    UnknownKey {
        /// The key id found (visible ASCII, or the lossy form of other bytes).
        id: String,
    },
    /// The ciphertext, its header or the record id it is bound to were changed: the
    /// authentication tag does not match.
    #[error(
        "the sealed response fails authentication (tampered with, or moved from another record)"
    )]
    Authentication,
    /// The system has no randomness for a nonce.
    #[error("no randomness for a nonce: {0}")]
    Random(String),
}

/// Seals `plain` for the record `id` with the keyring's active key.
pub fn seal(keyring: &Keyring, id: &RecordId, plain: &[u8]) -> Result<Bytes, OpenError> {
    let (key_id, cipher) = keyring.active().ok_or_else(|| OpenError::UnknownKey {
        id: keyring.active_id().as_str().to_string(),
    })?;
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| OpenError::Random(e.to_string()))?;
    let key_id = key_id.as_str().as_bytes();
    let mut out =
        BytesMut::with_capacity(MAGIC.len() + 2 + key_id.len() + NONCE_LEN + plain.len() + TAG_LEN);
    out.put_slice(MAGIC);
    out.put_u8(VERSION);
    // Key ids are at most 64 bytes (checked when the keyring is built).
    out.put_u8(u8::try_from(key_id.len()).unwrap_or(u8::MAX));
    out.put_slice(key_id);
    out.put_slice(&nonce);
    let aad = associated_data(&out, id);
    let sealed = encrypt(cipher, &nonce, plain, &aad)?;
    out.put_slice(&sealed);
    Ok(out.freeze())
}

fn encrypt(
    cipher: &XChaCha20Poly1305,
    nonce: &[u8; NONCE_LEN],
    plain: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, OpenError> {
    cipher
        .encrypt(XNonce::from_slice(nonce), Payload { msg: plain, aad })
        // Encryption fails only for messages longer than the cipher's limit (256 GiB).
        .map_err(|_| OpenError::Authentication)
}

/// True when `bytes` start like a sealed response (whatever follows).
pub fn is_sealed(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Opens what [`seal`] made for the record `id`.
pub fn open(keyring: &Keyring, id: &RecordId, sealed: &[u8]) -> Result<Bytes, OpenError> {
    if !is_sealed(sealed) {
        return Err(OpenError::NotSealed);
    }
    let mut at = MAGIC.len();
    let version = *sealed.get(at).ok_or(OpenError::Malformed)?;
    if version != VERSION {
        return Err(OpenError::UnsupportedVersion { version });
    }
    at += 1;
    let id_len = usize::from(*sealed.get(at).ok_or(OpenError::Malformed)?);
    at += 1;
    let key_id = sealed.get(at..at + id_len).ok_or(OpenError::Malformed)?;
    if id_len == 0 {
        return Err(OpenError::Malformed);
    }
    at += id_len;
    let nonce: &[u8; NONCE_LEN] = sealed
        .get(at..at + NONCE_LEN)
        .and_then(|n| n.try_into().ok())
        .ok_or(OpenError::Malformed)?;
    at += NONCE_LEN;
    let header = &sealed[..at];
    let ciphertext = &sealed[at..];
    if ciphertext.len() < TAG_LEN {
        return Err(OpenError::Malformed);
    }
    let cipher = keyring.get(key_id).ok_or_else(|| OpenError::UnknownKey {
        id: String::from_utf8_lossy(key_id).into_owned(),
    })?;
    let aad = associated_data(header, id);
    cipher
        .decrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .map(Bytes::from)
        .map_err(|_| OpenError::Authentication)
}

/// The header followed by the record id: both are authenticated with the ciphertext.
fn associated_data(header: &[u8], id: &RecordId) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + 32);
    aad.extend_from_slice(header);
    aad.extend_from_slice(id.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ring() -> Keyring {
        Keyring::new("k1", [9; 32]).unwrap()
    }

    #[test]
    fn round_trips_and_hides_the_plaintext() {
        let id = RecordId::for_event("ns", "a");
        let sealed = seal(&ring(), &id, b"secret body").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(&open(&ring(), &id, &sealed).unwrap()[..], b"secret body");
        // Two seals of the same bytes differ (random nonces).
        assert_ne!(seal(&ring(), &id, b"secret body").unwrap(), sealed);
        // An empty response seals too.
        let empty = seal(&ring(), &id, b"").unwrap();
        assert_eq!(&open(&ring(), &id, &empty).unwrap()[..], b"");
    }

    #[test]
    fn every_flipped_bit_fails() {
        let id = RecordId::for_event("ns", "a");
        let sealed = seal(&ring(), &id, b"body").unwrap().to_vec();
        for i in 0..sealed.len() {
            for bit in 0..8 {
                let mut bad = sealed.clone();
                bad[i] ^= 1 << bit;
                assert!(open(&ring(), &id, &bad).is_err(), "byte {i} bit {bit}");
            }
        }
        for len in 0..sealed.len() {
            assert!(open(&ring(), &id, &sealed[..len]).is_err(), "prefix {len}");
        }
    }

    #[test]
    fn a_sealed_response_does_not_open_on_another_record_or_key() {
        let a = RecordId::for_event("ns", "a");
        let b = RecordId::for_event("ns", "b");
        let sealed = seal(&ring(), &a, b"body").unwrap();
        assert_eq!(open(&ring(), &b, &sealed), Err(OpenError::Authentication));
        let other = Keyring::new("k1", [8; 32]).unwrap();
        assert_eq!(open(&other, &a, &sealed), Err(OpenError::Authentication));
        let missing = Keyring::new("k2", [9; 32]).unwrap();
        assert_eq!(
            open(&missing, &a, &sealed),
            Err(OpenError::UnknownKey { id: "k1".into() })
        );
        assert_eq!(open(&ring(), &a, b"IDRS\x01"), Err(OpenError::NotSealed));
    }
}
