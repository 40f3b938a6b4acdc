//! The canonical form of JSON request bodies, against the implementation it replaced.
//!
//! Run: `cargo bench -p idem-core --bench canonical_json`.
//!
//! - `canonical_json/streaming/<body>`: `Fingerprinter::canonical_json`, which writes the
//!   canonical form while serde_json parses the body.
//! - `canonical_json/value/<body>`: the same output through a `serde_json::Value` (parse,
//!   count members, remove excluded fields, `serde_json::to_vec`), as `canonical_json` did
//!   before; measured in the same run.
//!
//! Bodies: `payment`, a 122-byte compact payment request; `payment_pretty`, a 303-byte
//! one with whitespace, unsorted keys and a decimal; `payment_excluding`, the first with
//! two excluded fields.

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idem_core::Fingerprinter;

const PAYMENT: &str = r#"{"amount":1000,"currency":"usd","customer":"cus_123","metadata":{"order":"A-1","note":"x"},"items":[{"sku":"s1","qty":2}]}"#;

const PAYMENT_PRETTY: &str = r#"{
  "customer": "cus_123",
  "amount": 1000,
  "currency": "usd",
  "description": "Order A-1 \u2014 2 items",
  "tax_rate": 0.0825,
  "metadata": { "order": "A-1", "sent_at": "2025-01-01T00:00:00Z", "note": "x" },
  "items": [ { "sku": "s1", "qty": 2 }, { "sku": "s2", "qty": 1 } ],
  "capture": true
}"#;

/// The implementation `canonical_json` replaced.
fn canonical_json_via_value(excluded: &[Vec<String>], body: &[u8]) -> Option<Vec<u8>> {
    fn members(value: &serde_json::Value) -> usize {
        match value {
            serde_json::Value::Object(map) => map.len() + map.values().map(members).sum::<usize>(),
            serde_json::Value::Array(items) => items.iter().map(members).sum(),
            _ => 0,
        }
    }
    fn raw_members(json: &[u8]) -> usize {
        let (mut count, mut in_string, mut escaped) = (0, false, false);
        for &b in json {
            if in_string {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
            } else if b == b'"' {
                in_string = true;
            } else if b == b':' {
                count += 1;
            }
        }
        count
    }
    fn remove_path(value: &mut serde_json::Value, path: &[String]) {
        let Some((last, parents)) = path.split_last() else {
            return;
        };
        let mut current = value;
        for segment in parents {
            match current.get_mut(segment.as_str()) {
                Some(next) => current = next,
                None => return,
            }
        }
        if let Some(object) = current.as_object_mut() {
            object.remove(last.as_str());
        }
    }

    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    if members(&value) != raw_members(body) {
        return None;
    }
    for path in excluded {
        remove_path(&mut value, path);
    }
    serde_json::to_vec(&value).ok()
}

fn bench(c: &mut Criterion) {
    let excluded = ["metadata.sent_at", "metadata.note"];
    let cases = [
        ("payment", PAYMENT, &[][..]),
        ("payment_pretty", PAYMENT_PRETTY, &[][..]),
        ("payment_excluding", PAYMENT, &excluded[..]),
    ];
    let mut group = c.benchmark_group("canonical_json");
    for (name, body, excluded) in cases {
        let fp = excluded
            .iter()
            .fold(Fingerprinter::new(), |f, p| f.exclude_field(p));
        let paths: Vec<Vec<String>> = excluded
            .iter()
            .map(|p| p.split('.').map(str::to_owned).collect())
            .collect();
        let body = body.as_bytes();
        let expected = canonical_json_via_value(&paths, body);
        assert!(expected.is_some());
        assert_eq!(fp.canonical_json(body), expected, "{name}");
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("streaming", name), body, |b, body| {
            b.iter(|| fp.canonical_json(black_box(body)))
        });
        group.bench_with_input(BenchmarkId::new("value", name), body, |b, body| {
            b.iter(|| canonical_json_via_value(&paths, black_box(body)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
