//! Encrypted stored responses, read back from a store: any bytes open or fail with a typed
//! error, never a panic; what seals opens to the same bytes, and a sealed response with
//! any one byte changed never opens.

#![no_main]

use arbitrary::Arbitrary;
use idem_core::RecordId;
use idem_encrypt::{Keyring, open, seal};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    stored: &'a [u8],
    plain: &'a [u8],
    flip_at: usize,
    flip: u8,
}

fuzz_target!(|input: Input<'_>| {
    let Ok(ring) = Keyring::new("k1", [7; 32]).and_then(|r| r.with_key("k2", [8; 32])) else {
        return;
    };
    let id = RecordId::for_event("fuzz", "record");
    // Arbitrary stored bytes: no panic, and nothing opens without the keys' tag.
    let _ = open(&ring, &id, input.stored);

    let sealed = seal(&ring, &id, input.plain).expect("sealing succeeds");
    assert_eq!(open(&ring, &id, &sealed).as_deref(), Ok(input.plain));
    let other = RecordId::for_event("fuzz", "other");
    assert!(open(&ring, &other, &sealed).is_err(), "bound to its record");
    if input.flip != 0 {
        let mut tampered = sealed.to_vec();
        let at = input.flip_at % tampered.len();
        tampered[at] ^= input.flip;
        assert!(open(&ring, &id, &tampered).is_err(), "byte {at} changed");
    }
});
