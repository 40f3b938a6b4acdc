//! The stored-response format, read back from a store: any bytes decode or fail with a
//! typed error, never a panic nor an allocation larger than the input; what decodes
//! re-encodes to bytes that decode to the same outcome.

#![no_main]

use idem_tower::stored::StoredOutcome;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(outcome) = StoredOutcome::decode(data) else {
        return;
    };
    let encoded = outcome.encode();
    assert_eq!(StoredOutcome::decode(&encoded).as_ref(), Ok(&outcome));
    // Encoding is canonical: a second round trip gives the same bytes.
    let Ok(again) = StoredOutcome::decode(&encoded) else {
        unreachable!()
    };
    assert_eq!(again.encode(), encoded);
});
