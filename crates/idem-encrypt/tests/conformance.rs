//! The store conformance suite, run through the decorator over the memory store: sealing
//! and opening responses changes nothing a caller of the store can observe.

use std::sync::Arc;

use idem_core::MemoryStore;
use idem_core::conformance::ManualHarness;
use idem_encrypt::{EncryptingStore, Keyring};

async fn harness() -> ManualHarness {
    ManualHarness::new(|clock| {
        let keyring = Keyring::new("k1", [42; 32]).expect("a valid keyring");
        Arc::new(EncryptingStore::new(
            Arc::new(MemoryStore::with_clock(clock)),
            keyring,
        ))
    })
}

idem_core::conformance_tests!(harness);
