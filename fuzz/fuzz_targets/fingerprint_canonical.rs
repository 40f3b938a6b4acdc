//! Fingerprints and JSON canonicalisation over arbitrary bodies, content types and
//! exclusions: no panic, no stack overflow on deep nesting; the canonical form is valid
//! JSON, a fixed point, and fingerprints are deterministic.

#![no_main]

use arbitrary::Arbitrary;
use idem_core::Fingerprinter;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    method: &'a str,
    path: &'a str,
    content_type: Option<ContentType<'a>>,
    exclusions: Vec<&'a str>,
    body: &'a [u8],
}

#[derive(Arbitrary, Debug)]
enum ContentType<'a> {
    Json,
    JsonWithParameters,
    Problem,
    Text,
    Other(&'a str),
}

impl<'a> ContentType<'a> {
    fn as_str(&self) -> &'a str {
        match self {
            ContentType::Json => "application/json",
            ContentType::JsonWithParameters => " Application/JSON ; charset=utf-8",
            ContentType::Problem => "application/problem+json",
            ContentType::Text => "text/plain",
            ContentType::Other(other) => other,
        }
    }
}

/// How many objects, arrays and object members a JSON text spells, counted on the raw
/// bytes (brackets and colons outside strings).
fn containers(json: &[u8]) -> (usize, usize, usize) {
    let (mut objects, mut arrays, mut members) = (0, 0, 0);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'{' => objects += 1,
                b'[' => arrays += 1,
                b':' => members += 1,
                _ => {}
            }
        }
    }
    (objects, arrays, members)
}

fuzz_target!(|input: Input<'_>| {
    let mut fingerprinter = Fingerprinter::new();
    for path in input.exclusions.iter().take(8) {
        fingerprinter = fingerprinter.exclude_field(path);
    }
    let content_type = input.content_type.as_ref().map(ContentType::as_str);
    let a = fingerprinter.fingerprint(input.method, input.path, content_type, input.body);
    let b = fingerprinter.fingerprint(input.method, input.path, content_type, input.body);
    assert_eq!(a, b);

    if let Some(canonical) = fingerprinter.canonical_json(input.body) {
        let value: serde_json::Value =
            serde_json::from_slice(&canonical).expect("the canonical form is JSON");
        drop(value);
        // Without exclusions, every object, array and member of the body is in its
        // canonical form (an object spelling serde_json's private number token once
        // became a number, and a repeated key lost a member).
        if input.exclusions.is_empty() {
            assert_eq!(
                containers(input.body),
                containers(&canonical),
                "the canonical form lost or gained a container"
            );
        }
        let again = fingerprinter
            .canonical_json(&canonical)
            .expect("the canonical form canonicalises");
        assert_eq!(again, canonical, "canonicalisation is a fixed point");
        // A JSON body and its canonical form have the same fingerprint.
        let json = Some("application/json");
        assert_eq!(
            fingerprinter.fingerprint(input.method, input.path, json, input.body),
            fingerprinter.fingerprint(input.method, input.path, json, &canonical),
        );
    }
});
