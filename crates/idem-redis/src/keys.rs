//! Key and channel names: every key and channel of one record shares its hash slot.

use idem_core::{Error, RecordId};

/// The longest accepted key prefix.
const MAX_PREFIX_LEN: usize = 64;

/// Names under one key prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Keys {
    prefix: String,
    /// Redis Cluster: sharded pub/sub, one channel per record.
    cluster: bool,
}

impl Keys {
    /// Checks the prefix: 1 to 64 of `A-Z a-z 0-9 _ - . :`, so that it can neither carry a
    /// hash tag of its own (`{`, `}`) nor act as a pattern in `SCAN MATCH`.
    pub(crate) fn new(prefix: &str, cluster: bool) -> Result<Self, Error> {
        let valid = !prefix.is_empty()
            && prefix.len() <= MAX_PREFIX_LEN
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
        if !valid {
            return Err(Error::InvalidRequest {
                reason: format!(
                    "invalid Redis key prefix {prefix:?}: use 1 to {MAX_PREFIX_LEN} of A-Z, a-z, 0-9, _, -, . and :"
                ),
            });
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            cluster,
        })
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>:{<hex id>}`: the braces make the id the hash tag, so the record's slot
    /// depends on the id alone.
    pub(crate) fn record(&self, id: &RecordId) -> String {
        format!("{}:{{{}}}", self.prefix, id.to_hex())
    }

    /// The pattern matching every record key under the prefix.
    pub(crate) fn pattern(&self) -> String {
        format!("{}:{{*}}", self.prefix)
    }

    /// The record id of a key under the prefix.
    pub(crate) fn id_of_key(&self, key: &[u8]) -> Option<RecordId> {
        let rest = key.strip_prefix(self.prefix.as_bytes())?;
        let hex = rest.strip_prefix(b":{")?.strip_suffix(b"}")?;
        RecordId::from_hex(std::str::from_utf8(hex).ok()?)
    }

    /// The command the scripts publish settlements with.
    pub(crate) fn publish_command(&self) -> &'static str {
        if self.cluster { "SPUBLISH" } else { "PUBLISH" }
    }

    /// Standalone: one channel for the prefix, `<prefix>:settled`. Cluster: a sharded
    /// channel per record in the record's slot, `<prefix>:{<hex id>}:settled`.
    pub(crate) fn channel(&self, id: &RecordId) -> String {
        if self.cluster {
            format!("{}:{{{}}}:settled", self.prefix, id.to_hex())
        } else {
            self.prefix_channel()
        }
    }

    /// The standalone channel of the prefix.
    pub(crate) fn prefix_channel(&self) -> String {
        format!("{}:settled", self.prefix)
    }

    /// The record id of a cluster channel under the prefix.
    pub(crate) fn id_of_channel(&self, channel: &[u8]) -> Option<RecordId> {
        self.id_of_key(channel.strip_suffix(b":settled")?)
    }
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// 32 bytes from 64 hex digits.
pub(crate) fn unhex32(s: &[u8]) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16);
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_id_as_hash_tag() {
        let keys = Keys::new("idem", true).unwrap();
        let id = RecordId::for_event("ns", "e");
        let key = keys.record(&id);
        assert_eq!(key, format!("idem:{{{}}}", id.to_hex()));
        assert_eq!(keys.id_of_key(key.as_bytes()), Some(id));
        let channel = keys.channel(&id);
        assert_eq!(channel, format!("idem:{{{}}}:settled", id.to_hex()));
        assert_eq!(keys.id_of_channel(channel.as_bytes()), Some(id));
        assert_eq!(keys.id_of_key(b"other:{00}"), None);
        assert_eq!(keys.pattern(), "idem:{*}");
    }

    #[test]
    fn standalone_settlements_share_one_channel() {
        let keys = Keys::new("app:idem", false).unwrap();
        let a = RecordId::for_event("ns", "a");
        let b = RecordId::for_event("ns", "b");
        assert_eq!(keys.channel(&a), "app:idem:settled");
        assert_eq!(keys.channel(&a), keys.channel(&b));
        assert_eq!(keys.publish_command(), "PUBLISH");
    }

    #[test]
    fn prefixes_that_could_break_slots_or_patterns_are_rejected() {
        for bad in [
            "",
            "a{b",
            "a}b",
            "a*",
            "a?",
            "a[b]",
            "a b",
            "a\\b",
            &"x".repeat(65),
        ] {
            assert!(Keys::new(bad, false).is_err(), "{bad:?}");
        }
        assert!(Keys::new("tenant-1.idem:v1", false).is_ok());
    }

    #[test]
    fn hex_round_trips() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(unhex32(hex(&bytes).as_bytes()), Some(bytes));
        assert_eq!(unhex32(b"zz"), None);
    }
}
