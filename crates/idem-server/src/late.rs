//! Late retries: a retry that arrives after its record's retention ended executes again.
//! The gateway cannot prevent that (the record is gone), but it can count it, so operators
//! see when a route's retention is shorter than its clients' retry horizon.
//!
//! [`ExpiredFilter`] remembers, for every record this gateway completed, when it expires:
//! its id goes into a Bloom filter of the time bucket of its expiry. When a claim later
//! *acquires* a record (it was absent), the buckets whose expiry lies within the last
//! `window` are asked whether they hold the id; a yes is a late retry.
//!
//! Memory is bounded: at most [`MAX_BUCKETS`] live buckets of [`FILTER_BITS`] bits
//! (128 KiB each), allocated when first written, dropped once older than the window. The
//! count is approximate: a Bloom filter has rare false positives (well under one in a
//! million below ~50,000 completions per bucket), bucket edges blur the window by one
//! bucket width, and each gateway only knows the records it completed itself, since its
//! last start.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem_core::RecordId;

/// Bits of one bucket's Bloom filter.
pub const FILTER_BITS: usize = 1 << 20;
/// Hash functions per id (each reads 20 bits of the uniformly distributed record id).
const HASHES: usize = 4;
/// The most buckets alive at once.
pub const MAX_BUCKETS: u64 = 64;

/// Recently expired record ids, in time buckets of Bloom filters.
#[derive(Debug)]
pub struct ExpiredFilter {
    window_ms: u64,
    width_ms: u64,
    buckets: Mutex<BTreeMap<u64, Box<[u64]>>>,
}

impl ExpiredFilter {
    /// A filter counting retries up to `window` after expiry, for records kept up to
    /// `longest_retention`.
    pub fn new(window: Duration, longest_retention: Duration) -> Self {
        let window_ms = millis(window);
        let span = window_ms.saturating_add(millis(longest_retention));
        Self {
            window_ms,
            width_ms: (span / (MAX_BUCKETS - 2)).max(1),
            buckets: Mutex::new(BTreeMap::new()),
        }
    }

    /// Remembers that `id` expires `retention` after now.
    pub fn completed(&self, id: &RecordId, retention: Duration) {
        let now = now_ms();
        self.completed_at(id, now.saturating_add(millis(retention)), now);
    }

    /// Whether `id` expired within the window before now (approximately).
    pub fn expired_recently(&self, id: &RecordId) -> bool {
        self.expired_recently_at(id, now_ms())
    }

    fn completed_at(&self, id: &RecordId, expires_ms: u64, now: u64) {
        if self.window_ms == 0 {
            return;
        }
        let bucket = expires_ms / self.width_ms;
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bits = buckets
            .entry(bucket)
            .or_insert_with(|| vec![0u64; FILTER_BITS / 64].into_boxed_slice());
        for bit in positions(id) {
            bits[bit / 64] |= 1 << (bit % 64);
        }
        // Buckets past the window are dropped, and never more than MAX_BUCKETS are kept.
        self.evict(&mut buckets, now);
    }

    fn evict(&self, buckets: &mut BTreeMap<u64, Box<[u64]>>, now: u64) {
        let oldest = now.saturating_sub(self.window_ms) / self.width_ms;
        while let Some((&first, _)) = buckets.first_key_value() {
            if first + 1 < oldest || buckets.len() as u64 > MAX_BUCKETS {
                buckets.pop_first();
            } else {
                break;
            }
        }
    }

    fn expired_recently_at(&self, id: &RecordId, now: u64) -> bool {
        if self.window_ms == 0 {
            return false;
        }
        let from = now.saturating_sub(self.window_ms) / self.width_ms;
        let to = now / self.width_ms;
        let buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        buckets.range(from..=to).any(|(_, bits)| {
            positions(id)
                .into_iter()
                .all(|bit| bits[bit / 64] & (1 << (bit % 64)) != 0)
        })
    }

    /// How many buckets hold ids (for tests).
    pub fn buckets(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

/// The filter bits of an id: record ids are SHA-256 outputs, so their bytes are already
/// independent uniform hashes.
fn positions(id: &RecordId) -> [usize; HASHES] {
    let bytes = id.as_bytes();
    let mut out = [0; HASHES];
    for (i, slot) in out.iter_mut().enumerate() {
        let chunk = [
            bytes[i * 4],
            bytes[i * 4 + 1],
            bytes[i * 4 + 2],
            bytes[i * 4 + 3],
        ];
        *slot = (u32::from_le_bytes(chunk) as usize) % FILTER_BITS;
    }
    out
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;

    #[test]
    fn an_id_is_late_only_within_the_window_after_its_expiry() {
        let filter = ExpiredFilter::new(
            Duration::from_secs(24 * 3600),
            Duration::from_secs(24 * 3600),
        );
        let id = RecordId::for_event("ns", "a");
        let other = RecordId::for_event("ns", "b");
        let t0 = 1_000 * HOUR;
        filter.completed_at(&id, t0 + 24 * HOUR, t0);
        // Before expiry (the record was purged by an operator, say): not late.
        assert!(!filter.expired_recently_at(&id, t0 + 2 * HOUR));
        // Within the window after expiry: late; another id is not.
        assert!(filter.expired_recently_at(&id, t0 + 25 * HOUR));
        assert!(filter.expired_recently_at(&id, t0 + 47 * HOUR));
        assert!(!filter.expired_recently_at(&other, t0 + 25 * HOUR));
        // Long after the window: forgotten.
        assert!(!filter.expired_recently_at(&id, t0 + 60 * HOUR));
    }

    #[test]
    fn memory_stays_bounded() {
        let filter = ExpiredFilter::new(Duration::from_secs(3600), Duration::from_secs(3600));
        for i in 0..10_000u64 {
            let id = RecordId::for_event("ns", &i.to_string());
            filter.completed_at(&id, i * 60_000, 0);
        }
        assert!(
            filter.buckets() as u64 <= MAX_BUCKETS + 1,
            "{}",
            filter.buckets()
        );
    }

    #[test]
    fn a_zero_window_tracks_nothing() {
        let filter = ExpiredFilter::new(Duration::ZERO, Duration::from_secs(60));
        let id = RecordId::for_event("ns", "a");
        filter.completed_at(&id, 10, 0);
        assert!(!filter.expired_recently_at(&id, 20));
    }
}
