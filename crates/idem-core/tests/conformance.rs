//! The conformance suite against the memory store.

use std::sync::Arc;

use idem_core::MemoryStore;
use idem_core::conformance::ManualHarness;

async fn harness() -> ManualHarness {
    ManualHarness::new(|clock| Arc::new(MemoryStore::with_clock(clock)))
}

idem_core::conformance_tests!(harness);
