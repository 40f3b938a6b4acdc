//! Holder nonces: 16-byte values a store writes with a claim or a settlement, so that a
//! call sent again after its answer was lost can recognise its own write.
//!
//! A nonce only has to differ from every other nonce, in this process and in every other
//! one writing to the same store; nothing depends on it being unpredictable. [`Nonces`]
//! draws one random seed and hands out `seed XOR n` for n = 0, 1, 2, ...: never the same
//! value twice in a process (XOR with the seed is one-to-one), and, across processes, as
//! unlikely to collide as independent random values. A nonce then costs an atomic increment
//! instead of a call into the operating system's random source.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::Error;

/// A source of distinct 16-byte nonces, from one random seed.
pub struct Nonces {
    seed: u128,
    issued: AtomicU64,
}

impl std::fmt::Debug for Nonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nonces")
            .field("issued", &self.issued.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

static SHARED: OnceLock<Nonces> = OnceLock::new();

impl Nonces {
    /// Nonces from `seed`, which must be random (16 bytes from the operating system's
    /// random source): two sources with the same seed hand out the same nonces.
    pub const fn new(seed: [u8; 16]) -> Self {
        Nonces {
            seed: u128::from_le_bytes(seed),
            issued: AtomicU64::new(0),
        }
    }

    /// The process's shared source, seeded by `seed` on first use. If `seed` fails, the
    /// error is returned and a later call tries again.
    pub fn shared(
        seed: impl FnOnce() -> Result<[u8; 16], Error>,
    ) -> Result<&'static Nonces, Error> {
        if let Some(nonces) = SHARED.get() {
            return Ok(nonces);
        }
        let seed = seed()?;
        // Two threads may both draw a seed here; the first to store its source wins.
        Ok(SHARED.get_or_init(|| Nonces::new(seed)))
    }

    /// The next nonce. A source hands out 2^64 nonces before its counter wraps (at a
    /// million a second, after half a million years).
    pub fn next(&self) -> [u8; 16] {
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        (self.seed ^ u128::from(n)).to_le_bytes()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_source_never_repeats_itself_across_threads() {
        let nonces = Arc::new(Nonces::new([0x5a; 16]));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let nonces = nonces.clone();
                std::thread::spawn(move || (0..10_000).map(|_| nonces.next()).collect::<Vec<_>>())
            })
            .collect();
        let mut seen = HashSet::new();
        for thread in threads {
            for nonce in thread.join().unwrap() {
                assert!(seen.insert(nonce), "nonce handed out twice: {nonce:?}");
            }
        }
        assert_eq!(seen.len(), 40_000);
    }

    #[test]
    fn sources_with_different_seeds_hand_out_different_nonces() {
        let (a, b) = (Nonces::new([1; 16]), Nonces::new([2; 16]));
        let from_a: HashSet<_> = (0..1000).map(|_| a.next()).collect();
        assert!((0..1000).all(|_| !from_a.contains(&b.next())));
        // The seed itself is the first nonce: the counter starts at zero.
        assert_eq!(Nonces::new([7; 16]).next(), [7; 16]);
    }

    #[test]
    fn the_shared_source_is_seeded_once() {
        let first = Nonces::shared(|| Ok([3; 16])).unwrap();
        let again = Nonces::shared(|| Err(Error::backend("not called", "seeded"))).unwrap();
        assert!(std::ptr::eq(first, again));
        assert_ne!(first.next(), again.next());
    }
}
