//! The conformance suite against the SQLite store, one fresh file per check.

use std::sync::Arc;

use idem_core::conformance::ManualHarness;
use idem_sqlite::{SqliteOptions, SqliteStore};

async fn harness() -> ManualHarness {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("idem.db");
    ManualHarness::new(|clock| {
        // No reaper: the checks purge by hand and count what they purge.
        let options = SqliteOptions::default()
            .with_clock(clock)
            .with_reaper_interval(None);
        Arc::new(SqliteStore::open(&path, options).expect("open the store"))
    })
    .with_guard(dir)
}

idem_core::conformance_tests!(harness);
