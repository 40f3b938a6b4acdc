//! `Idempotency-Key` header values: any bytes parse to a key or a typed error, never a
//! panic; a key always satisfies the documented rules and survives its own sf-string form.

#![no_main]

use idem_core::{IdempotencyKey, MAX_KEY_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(key) = IdempotencyKey::parse(data) else {
        return;
    };
    let text = key.as_str();
    assert!(
        !text.is_empty() && text.len() <= MAX_KEY_LEN,
        "{} chars",
        text.len()
    );
    assert!(text.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    // The quoted form names the same key.
    let quoted = key.to_sf_string();
    assert_eq!(IdempotencyKey::parse(quoted.as_bytes()).as_ref(), Ok(&key));
    // So does the bare form, unless it starts with a quote (then it reads as an sf-string).
    if !text.starts_with('"') {
        assert_eq!(IdempotencyKey::parse(text.as_bytes()).as_ref(), Ok(&key));
    }
    // A bare value that parses is the key itself.
    if data.first() != Some(&b'"') {
        assert_eq!(text.as_bytes(), data);
    }
});
