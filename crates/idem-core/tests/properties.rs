//! Property tests: key parsing, fingerprint canonicalisation, and the record state machine
//! (through the memory store) against a small reference model.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use idem_core::{
    ClaimOutcome, ClaimRequest, Error, FencingToken, Fingerprint, Fingerprinter, IdempotencyKey,
    KeyError, MAX_KEY_LEN, ManualClock, MemoryStore, RecordId, Store, Timestamp,
};
use proptest::prelude::*;

// ---------------------------------------------------------------- keys

fn visible() -> impl Strategy<Value = char> {
    (0x21u8..=0x7e).prop_map(char::from)
}

fn valid_key() -> impl Strategy<Value = String> {
    prop::collection::vec(visible(), 1..=MAX_KEY_LEN).prop_map(|c| c.into_iter().collect())
}

fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

proptest! {
    #[test]
    fn valid_keys_round_trip_in_both_forms(key in valid_key()) {
        let quoted = IdempotencyKey::parse(quote(&key).as_bytes()).unwrap();
        prop_assert_eq!(quoted.as_str(), key.as_str());
        prop_assert_eq!(IdempotencyKey::parse(quoted.to_sf_string().as_bytes()).unwrap(), quoted.clone());
        if !key.starts_with('"') {
            prop_assert_eq!(IdempotencyKey::parse(key.as_bytes()).unwrap(), quoted);
        }
    }

    #[test]
    fn keys_with_a_byte_outside_visible_ascii_are_rejected(
        key in valid_key(),
        position in any::<prop::sample::Index>(),
        bad in prop_oneof![0u8..=0x20, Just(0x7fu8), 0x80u8..=0xff],
    ) {
        let mut bytes = key.into_bytes();
        bytes[0] = b'k'; // bare form
        let at = position.index(bytes.len() + 1);
        bytes.insert(at, bad);
        let err = IdempotencyKey::parse(&bytes).unwrap_err();
        prop_assert!(
            matches!(err, KeyError::InvalidByte { byte, .. } if byte == bad)
                || (bytes.len() > MAX_KEY_LEN && matches!(err, KeyError::TooLong { .. })),
            "{:?}", err
        );
        // The same in quoted form (a space or a control byte inside the quotes).
        let mut quoted = b"\"".to_vec();
        quoted.extend_from_slice(&bytes);
        quoted.push(b'"');
        prop_assert!(IdempotencyKey::parse(&quoted).is_err());
    }

    #[test]
    fn keys_over_the_limit_are_rejected(len in (MAX_KEY_LEN + 1)..(MAX_KEY_LEN * 4)) {
        let key = "x".repeat(len);
        prop_assert_eq!(IdempotencyKey::parse(key.as_bytes()), Err(KeyError::TooLong { len }));
        let quoted = IdempotencyKey::parse(quote(&key).as_bytes());
        prop_assert!(matches!(quoted, Err(KeyError::TooLong { .. })), "{:?}", quoted);
    }

    #[test]
    fn quoted_keys_with_a_bad_escape_are_rejected(key in valid_key(), escaped in visible()) {
        prop_assume!(escaped != '"' && escaped != '\\');
        let input = format!("\"\\{escaped}{}\"", quote(&key).trim_matches('"'));
        prop_assert_eq!(
            IdempotencyKey::parse(input.as_bytes()),
            Err(KeyError::InvalidEscape { position: 1 })
        );
    }

    #[test]
    fn quoted_keys_without_closing_quote_or_with_trailing_bytes_are_rejected(key in valid_key(), tail in valid_key()) {
        let open = format!("\"{}", quote(&key).trim_end_matches('"'));
        let open = open.trim_start_matches('"').to_string();
        let unterminated = format!("\"{}", open.trim_start_matches('"'));
        prop_assert!(IdempotencyKey::parse(unterminated.as_bytes()).is_err());
        let trailing = format!("{}{}", quote(&key), tail);
        let parsed = IdempotencyKey::parse(trailing.as_bytes());
        prop_assert!(matches!(parsed, Err(KeyError::TrailingCharacters { .. })), "{:?}", parsed);
    }
}

// ---------------------------------------------------------------- fingerprints

#[derive(Clone, Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

fn json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i64>().prop_map(Json::Int),
        "[a-zé\"\\\\ ]{0,8}".prop_map(Json::Str),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Json::Arr),
            prop::collection::btree_map("[a-d]{1,3}", inner, 0..6)
                .prop_map(|m| Json::Obj(m.into_iter().collect())),
        ]
    })
}

/// Renders JSON with the object keys rotated by `seed`, whitespace where `seed` says, and
/// non-ASCII characters escaped or not.
fn render(value: &Json, seed: u64, out: &mut String) {
    let ws = |out: &mut String, n: u64| {
        for _ in 0..(n % 3) {
            out.push(if n % 2 == 0 { ' ' } else { '\n' });
        }
    };
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Int(i) => out.push_str(&i.to_string()),
        Json::Str(s) => {
            if seed % 2 == 0 {
                out.push_str(&serde_json::to_string(s).unwrap());
            } else {
                out.push('"');
                for c in s.chars() {
                    out.push_str(&format!("\\u{:04x}", c as u32));
                }
                out.push('"');
            }
        }
        Json::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                ws(out, seed.rotate_left(i as u32));
                render(item, seed.rotate_left(7 + i as u32), out);
            }
            out.push(']');
        }
        Json::Obj(entries) => {
            out.push('{');
            let n = entries.len().max(1);
            for i in 0..entries.len() {
                let (k, v) = &entries[(i + seed as usize) % n];
                if i > 0 {
                    out.push(',');
                }
                ws(out, seed >> (i % 60));
                out.push_str(&serde_json::to_string(k).unwrap());
                ws(out, seed >> 3);
                out.push(':');
                render(v, seed.rotate_left(13 + i as u32), out);
            }
            out.push('}');
        }
    }
}

fn rendered(value: &Json, seed: u64) -> String {
    let mut s = String::new();
    render(value, seed, &mut s);
    s
}

proptest! {
    #[test]
    fn key_order_whitespace_and_escapes_do_not_change_the_fingerprint(
        value in json(), a in any::<u64>(), b in any::<u64>()
    ) {
        let f = Fingerprinter::new();
        let x = rendered(&value, a);
        let y = rendered(&value, b);
        prop_assert_eq!(
            f.fingerprint("POST", "/p", Some("application/json"), x.as_bytes()),
            f.fingerprint("POST", "/p", Some("application/json"), y.as_bytes()),
            "{} vs {}", x, y
        );
    }

    #[test]
    fn different_json_values_have_different_fingerprints(a in json(), b in json()) {
        let f = Fingerprinter::new();
        let x = rendered(&a, 0);
        let y = rendered(&b, 0);
        let canonical_x: serde_json::Value = serde_json::from_str(&x).unwrap();
        let canonical_y: serde_json::Value = serde_json::from_str(&y).unwrap();
        prop_assume!(canonical_x != canonical_y);
        prop_assert_ne!(
            f.fingerprint("POST", "/p", Some("application/json"), x.as_bytes()),
            f.fingerprint("POST", "/p", Some("application/json"), y.as_bytes())
        );
    }

    #[test]
    fn arbitrary_bodies_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let f = Fingerprinter::new().exclude_field("a.b");
        let _ = f.fingerprint("POST", "/", Some("application/json"), &body);
    }
}

// ---------------------------------------------------------------- state machine model

const LEASE_MS: u64 = 2_000;
const RETENTION_MS: u64 = 3_000;

#[derive(Clone, Debug)]
enum Op {
    Claim { id: usize, fp: u8 },
    Complete { id: usize, back: usize },
    Release { id: usize, back: usize },
    Renew { id: usize, back: usize },
    Advance { ms: u64 },
    Purge,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..2u8).prop_map(|(id, fp)| Op::Claim { id, fp }),
        2 => (0..3usize, 0..3usize).prop_map(|(id, back)| Op::Complete { id, back }),
        1 => (0..3usize, 0..3usize).prop_map(|(id, back)| Op::Release { id, back }),
        1 => (0..3usize, 0..3usize).prop_map(|(id, back)| Op::Renew { id, back }),
        2 => (0..4_000u64).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Purge),
    ]
}

/// The reference model: what a record id looks like from outside.
#[derive(Clone, Debug, PartialEq)]
enum Model {
    Free,
    Held {
        fp: u8,
        token: u64,
        lease_end: u64,
    },
    Done {
        fp: u8,
        response: Vec<u8>,
        until: u64,
    },
    Tombstone {
        until: u64,
    },
}

impl Model {
    /// The model state at `now`, with anything past its retention forgotten.
    fn at(&self, now: u64) -> Model {
        match *self {
            Model::Held { lease_end, .. } if lease_end + RETENTION_MS <= now => Model::Free,
            Model::Done { until, .. } | Model::Tombstone { until } if until <= now => Model::Free,
            _ => self.clone(),
        }
    }
}

struct Ref {
    state: Model,
    /// Every token the store issued for this id, in order.
    tokens: Vec<u64>,
}

fn record_id(i: usize) -> RecordId {
    RecordId::for_event("model", &i.to_string())
}

fn run_model(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let clock = ManualClock::new(Timestamp::from_millis(1_000_000));
    let store = MemoryStore::with_clock(Arc::new(clock.clone()));
    let mut refs: HashMap<usize, Ref> = (0..3)
        .map(|i| {
            (
                i,
                Ref {
                    state: Model::Free,
                    tokens: Vec::new(),
                },
            )
        })
        .collect();
    for (step, op) in ops.into_iter().enumerate() {
        let now = clock.now_millis();
        match op {
            Op::Claim { id, fp } => {
                let req = ClaimRequest::new(record_id(id), Fingerprint::of_bytes(&[fp]))
                    .with_lease(Duration::from_millis(LEASE_MS))
                    .with_retention(Duration::from_millis(RETENTION_MS));
                let got = rt.block_on(store.claim(&req)).unwrap();
                let r = refs.get_mut(&id).unwrap();
                let issue = |r: &mut Ref, got: &ClaimOutcome| -> Result<u64, TestCaseError> {
                    let token = got.lease().unwrap().token.get();
                    prop_assert!(
                        r.tokens.iter().all(|t| *t < token),
                        "step {}: token not increasing",
                        step
                    );
                    r.tokens.push(token);
                    Ok(token)
                };
                match (r.state.at(now), &got) {
                    (Model::Free | Model::Tombstone { .. }, ClaimOutcome::Acquired(lease)) => {
                        prop_assert_eq!(lease.lease_until.as_millis(), now + LEASE_MS);
                        let token = issue(r, &got)?;
                        r.state = Model::Held {
                            fp,
                            token,
                            lease_end: now + LEASE_MS,
                        };
                    }
                    (
                        Model::Done {
                            fp: f, response, ..
                        },
                        ClaimOutcome::Completed(c),
                    ) if f == fp => {
                        prop_assert_eq!(&c.response[..], &response[..]);
                    }
                    (Model::Done { fp: f, .. }, ClaimOutcome::Mismatch)
                    | (Model::Held { fp: f, .. }, ClaimOutcome::Mismatch)
                        if f != fp => {}
                    (
                        Model::Held {
                            fp: f, lease_end, ..
                        },
                        ClaimOutcome::InFlight {
                            lease_until,
                            now: at,
                        },
                    ) if f == fp && lease_end > now => {
                        prop_assert_eq!(lease_until.as_millis(), lease_end);
                        prop_assert_eq!(at.as_millis(), now);
                    }
                    (
                        Model::Held {
                            fp: f,
                            token: old,
                            lease_end,
                        },
                        ClaimOutcome::TookOver {
                            previous_token,
                            previous_lease_until,
                            ..
                        },
                    ) if f == fp && lease_end <= now => {
                        prop_assert_eq!(previous_token.get(), old);
                        prop_assert_eq!(previous_lease_until.as_millis(), lease_end);
                        let token = issue(r, &got)?;
                        r.state = Model::Held {
                            fp,
                            token,
                            lease_end: now + LEASE_MS,
                        };
                    }
                    (model, got) => {
                        return Err(TestCaseError::fail(format!(
                            "step {step}: model {model:?}, store {got:?}"
                        )));
                    }
                }
            }
            Op::Complete { id, back } | Op::Release { id, back } | Op::Renew { id, back } => {
                let r = refs.get_mut(&id).unwrap();
                let Some(&token) = r.tokens.iter().rev().nth(back) else {
                    continue;
                };
                let held = matches!(r.state.at(now), Model::Held { token: t, .. } if t == token);
                let rid = record_id(id);
                let result = match &op {
                    Op::Complete { .. } => {
                        let response = format!("{step}").into_bytes();
                        let res = rt.block_on(store.complete(
                            &rid,
                            FencingToken::new(token),
                            response.clone().into(),
                        ));
                        if held && res.is_ok() {
                            let Model::Held { fp, .. } = r.state else {
                                unreachable!()
                            };
                            r.state = Model::Done {
                                fp,
                                response,
                                until: now + RETENTION_MS,
                            };
                        }
                        res
                    }
                    Op::Release { .. } => {
                        let res = rt.block_on(store.release(&rid, FencingToken::new(token)));
                        if held && res.is_ok() {
                            r.state = Model::Tombstone {
                                until: now + RETENTION_MS,
                            };
                        }
                        res
                    }
                    _ => {
                        let res = rt.block_on(store.renew(
                            &rid,
                            FencingToken::new(token),
                            Duration::from_millis(LEASE_MS),
                        ));
                        if let (true, Ok(until)) = (held, &res) {
                            let Model::Held {
                                fp,
                                token,
                                lease_end,
                            } = r.state
                            else {
                                unreachable!()
                            };
                            let expected = lease_end.max(now + LEASE_MS);
                            prop_assert_eq!(until.as_millis(), expected);
                            r.state = Model::Held {
                                fp,
                                token,
                                lease_end: expected,
                            };
                        }
                        res.map(drop)
                    }
                };
                match result {
                    Ok(()) => {
                        prop_assert!(held, "step {}: {:?} succeeded without holding", step, op)
                    }
                    Err(Error::LeaseLost { .. }) => {
                        prop_assert!(!held, "step {}: {:?} lost a held lease", step, op)
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("step {step}: {e}"))),
                }
            }
            Op::Advance { ms } => clock.advance(Duration::from_millis(ms)),
            Op::Purge => {
                rt.block_on(store.purge_expired(usize::MAX)).unwrap();
            }
        }
    }
    Ok(())
}

trait NowMillis {
    fn now_millis(&self) -> u64;
}

impl NowMillis for ManualClock {
    fn now_millis(&self) -> u64 {
        idem_core::Clock::now(self).as_millis()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn the_memory_store_follows_the_reference_model(ops in prop::collection::vec(op(), 1..60)) {
        run_model(ops)?;
    }
}
