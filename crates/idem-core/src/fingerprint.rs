//! Request fingerprints: what makes a retry "the same request".

use std::fmt;
use std::ops::Range;
use std::sync::OnceLock;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use sha2::{Digest, Sha256};

/// SHA-256 over a request's method, path and query, content type and body.
///
/// Two requests with the same key but different fingerprints are a key reused for a
/// different operation: the store reports a mismatch and nothing is executed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Rebuilds a fingerprint from stored bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Rebuilds a fingerprint from a slice; `None` unless it is exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// A fingerprint of an opaque payload (event pipelines, tests).
    pub fn of_bytes(payload: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(b"idem/payload/v1");
        h.update(payload);
        Self(h.finalize().into())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &crate::scope::hex(&self.0)[..16])
    }
}

/// Computes request fingerprints, optionally ignoring some JSON fields.
///
/// Bodies whose content type is JSON (`application/json` or any `+json` type) are
/// canonicalised first: object keys sorted, insignificant whitespace dropped, string
/// escapes normalised, excluded fields removed. Numbers keep their literal text, so
/// `10` and `10.0` differ (a conservative choice: it can only cause a mismatch, never a
/// wrong replay). A body that does not parse as JSON, nests deeper than the parser's
/// limit of 128 levels, repeats a key within an object, or spells serde_json's private
/// number token (`{"$serde_json::private::Number":"1"}`, which would read as a number), is
/// hashed as raw bytes.
///
/// ```
/// use idem_core::Fingerprinter;
///
/// let fp = Fingerprinter::new();
/// let a = fp.fingerprint("POST", "/v1/charges", Some("application/json"), br#"{"a":1,"b":[true]}"#);
/// let b = fp.fingerprint("POST", "/v1/charges", Some("application/json"), b"{ \"b\": [true], \"a\": 1 }");
/// assert_eq!(a, b);
/// ```
#[derive(Clone, Debug, Default)]
pub struct Fingerprinter {
    excluded: Vec<Vec<String>>,
}

impl Fingerprinter {
    /// A fingerprinter without exclusions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ignores a JSON field, given as a dotted path from the top-level object
    /// (`"metadata.sent_at"`). Arrays are not traversed.
    pub fn exclude_field(mut self, path: &str) -> Self {
        self.excluded
            .push(path.split('.').map(str::to_owned).collect());
        self
    }

    /// The fingerprint of a request.
    pub fn fingerprint(
        &self,
        method: &str,
        path_and_query: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Fingerprint {
        let mut h = Sha256::new();
        h.update(b"idem/request/v1");
        part(&mut h, method.as_bytes());
        part(&mut h, path_and_query.as_bytes());
        let content_type = content_type.map(|c| c.trim().to_ascii_lowercase());
        part(&mut h, content_type.as_deref().unwrap_or("").as_bytes());
        match content_type
            .as_deref()
            .filter(|c| is_json(c))
            .and_then(|_| self.canonical_json(body))
        {
            Some(canonical) => {
                h.update([1]);
                part(&mut h, &canonical);
            }
            None => {
                h.update([0]);
                part(&mut h, body);
            }
        }
        Fingerprint(h.finalize().into())
    }

    /// The canonical form of a JSON body, or `None` when it is not valid JSON, or when its
    /// parsed form lost object members (see below).
    pub fn canonical_json(&self, body: &[u8]) -> Option<Vec<u8>> {
        // The canonical form is written while serde_json parses the body, with no
        // `serde_json::Value` in between: the same parser accepts and rejects the same texts
        // (recursion limit, UTF-8, escapes, numbers, trailing characters), and the bytes are
        // those `serde_json::to_vec` writes for the `Value` that parsing would have built,
        // less the excluded fields; the member count is that `Value`'s too.
        let mut canonical = Canonical {
            excluded: &self.excluded,
            tokens: tokens(),
            // Room for the canonical form (rarely longer than the body) and for the largest
            // object reassembled after it.
            out: Vec::with_capacity(2 * body.len()),
            keys: Vec::with_capacity(body.len().min(256)),
            members: Vec::with_capacity(16),
            lossy: false,
        };
        let paths: Vec<(usize, usize)> = (0..self.excluded.len()).map(|p| (p, 0)).collect();
        let mut de = serde_json::Deserializer::from_slice(body);
        let members = ValueSeed {
            c: &mut canonical,
            paths: &paths,
            comma: false,
        }
        .deserialize(&mut de)
        .ok()?;
        de.end().ok()?;
        // Parsing must keep every object member. It does not for a key given twice (the
        // last one wins, so `{"amount":100,"amount":1}` would read as `{"amount":1}`, while
        // a first-wins upstream sees 100), nor, with serde_json's `arbitrary_precision`,
        // for an object spelling its private number token
        // (`{"$serde_json::private::Number":"2"}` reads as the number 2). Either way two
        // different bodies would share a canonical form and a changed request would be
        // replayed instead of answered 422: such a body is hashed as raw bytes instead.
        // Excluded members count too. In a text the parser accepted, the colons outside
        // strings are exactly the members, so only when some were not read as such can the
        // counts differ.
        if canonical.lossy {
            if members != raw_members(body) {
                return None;
            }
        } else {
            debug_assert_eq!(members, raw_members(body));
        }
        Some(canonical.out)
    }
}

/// The key serde_json (with `arbitrary_precision`) hands a visitor a number under, as a
/// one-entry map whose value is the number's text. `serde_json::Value` reads any object
/// whose first key is this as a number.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// The key serde_json (with `raw_value`, which other crates of a binary enable: axum does)
/// reserves for raw values. `serde_json::Value` reads an object whose first key is this as
/// the JSON text in that member's string value.
const RAW_TOKEN: &str = "$serde_json::private::RawValue";

/// Whether `serde_json::Value` reads the number token as a number. That depends on
/// serde_json's features in the build, so serde_json itself is asked, once.
#[derive(Clone, Copy)]
struct Tokens {
    number: bool,
}

fn tokens() -> Tokens {
    static TOKENS: OnceLock<Tokens> = OnceLock::new();
    *TOKENS.get_or_init(|| {
        let special = |json: &str| {
            serde_json::from_str::<serde_json::Value>(json).is_ok_and(|v| !v.is_object())
        };
        Tokens {
            number: special(r#"{"$serde_json::private::Number":"1"}"#),
        }
    })
}

/// The state of one canonicalisation: the output, and stacks shared by the objects being
/// read (an object's keys and members sit above those of the objects enclosing it).
struct Canonical<'x> {
    excluded: &'x [Vec<String>],
    tokens: Tokens,
    /// The canonical text so far. An object's members are written in the order they are
    /// read, then reordered when the object ends, unless already in order.
    out: Vec<u8>,
    /// The unescaped keys of the members in `members`.
    keys: Vec<u8>,
    members: Vec<Member>,
    /// Whether a member may have been lost: a key given twice, or a first key that is one
    /// of serde_json's private tokens.
    lossy: bool,
}

/// An object member already written to `Canonical::out`.
struct Member {
    /// Its unescaped key, in `Canonical::keys`.
    key: Range<usize>,
    /// `"key":value` in `Canonical::out`; empty when excluded.
    text: Range<usize>,
    /// How many object members its value holds.
    nested: usize,
    excluded: bool,
}

impl Canonical<'_> {
    /// Ends the object that starts at `start` in the output, whose members are
    /// `members[member_base..]`; returns how many members the object and its values hold.
    ///
    /// As `serde_json::Map` (a `BTreeMap` without `preserve_order`) holds them: sorted by
    /// key, the last one kept for a key given twice, each key counted once.
    fn close_object(
        &mut self,
        start: usize,
        key_base: usize,
        member_base: usize,
        in_order: bool,
    ) -> usize {
        let keys = &self.keys;
        let members = &mut self.members[member_base..];
        let mut count = 0;
        if in_order {
            // Keys strictly increasing and nothing excluded: already canonical.
            self.out.push(b'}');
            count += members.len();
            count += members.iter().map(|m| m.nested).sum::<usize>();
        } else {
            members.sort_by(|a, b| keys[a.key.clone()].cmp(&keys[b.key.clone()]));
            // Reassembled after the members as read, then moved over them.
            let end = self.out.len();
            self.out.push(b'{');
            for same_key in members.chunk_by(|a, b| keys[a.key.clone()] == keys[b.key.clone()]) {
                // The sort is stable: the last of a run is the last given.
                let Some(kept) = same_key.last() else {
                    continue;
                };
                self.lossy |= same_key.len() > 1;
                count += 1 + kept.nested;
                if !kept.excluded {
                    if self.out.len() > end + 1 {
                        self.out.push(b',');
                    }
                    self.out.extend_from_within(kept.text.clone());
                }
            }
            self.out.push(b'}');
            self.out.copy_within(end.., start);
            self.out.truncate(self.out.len() - (end - start));
        }
        self.members.truncate(member_base);
        self.keys.truncate(key_base);
        count
    }
}

/// Writes a value as `serde_json::to_vec` would.
fn write<T: serde::Serialize + ?Sized, E: de::Error>(
    out: &mut Vec<u8>,
    value: &T,
) -> Result<(), E> {
    serde_json::to_writer(out, value).map_err(E::custom)
}

/// Writes a string the parser lent from the input as `write` would. It lends one only when
/// the string held no escape, and rejects control characters, so nothing in it is one of
/// the characters the serializer escapes (`"`, `\\` and control characters).
fn write_unescaped(out: &mut Vec<u8>, v: &str) {
    debug_assert!(!v.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\'));
    out.push(b'"');
    out.extend_from_slice(v.as_bytes());
    out.push(b'"');
}

/// Any JSON value, written in canonical form; yields how many object members it holds.
struct ValueSeed<'c, 'x> {
    c: &'c mut Canonical<'x>,
    /// The excluded paths that lead through this value: (path, index of its next segment).
    paths: &'c [(usize, usize)],
    /// Whether to write a comma first (an array element after the first).
    comma: bool,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, '_> {
    type Value = usize;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        if self.comma {
            self.c.out.push(b',');
        }
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_, '_> {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<usize, E> {
        let text: &[u8] = if v { b"true" } else { b"false" };
        self.c.out.extend_from_slice(text);
        Ok(0)
    }

    // Without `arbitrary_precision` numbers arrive as these; with it, integers that fit 64
    // bits still do. `Value` writes them as the serializer writes these types (a non-finite
    // float, which the parser never yields, would be `null` both ways).
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<usize, E> {
        write(&mut self.c.out, &v).map(|()| 0)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<usize, E> {
        write(&mut self.c.out, &v).map(|()| 0)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<usize, E> {
        write(&mut self.c.out, &v).map(|()| 0)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<usize, E> {
        write(&mut self.c.out, v).map(|()| 0)
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<usize, E> {
        write_unescaped(&mut self.c.out, v);
        Ok(0)
    }

    fn visit_unit<E: de::Error>(self) -> Result<usize, E> {
        self.c.out.extend_from_slice(b"null");
        Ok(0)
    }

    fn visit_none<E: de::Error>(self) -> Result<usize, E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<usize, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let c = self.c;
        c.out.push(b'[');
        let (mut members, mut comma) = (0, false);
        // Excluded paths do not traverse arrays.
        while let Some(nested) = seq.next_element_seed(ValueSeed {
            c: &mut *c,
            paths: &[],
            comma,
        })? {
            members += nested;
            comma = true;
        }
        c.out.push(b']');
        Ok(members)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<usize, A::Error> {
        let c = self.c;
        let start = c.out.len();
        let key_base = c.keys.len();
        let member_base = c.members.len();
        c.out.push(b'{');
        let first = map.next_key_seed(KeySeed {
            c: &mut *c,
            first: true,
        })?;
        let mut next = match first {
            None => {
                c.out.push(b'}');
                return Ok(0);
            }
            // A number from the parser, or an object spelling the token, which `Value`
            // reads as a number too (its member then goes missing from the count). Any
            // further member is the parser's error once this returns.
            Some(Key::Number) => {
                c.out.truncate(start);
                map.next_value_seed(NumberSeed { c })?;
                return Ok(0);
            }
            Some(member) => Some(member),
        };
        let mut in_order = true;
        while let Some(Key::Member { key, text }) = next {
            let mut excluded = false;
            let mut paths = Vec::new();
            for &(p, segment) in self.paths {
                let path = &c.excluded[p];
                if path[segment].as_bytes() == &c.keys[key.clone()] {
                    if segment + 1 == path.len() {
                        excluded = true;
                    } else {
                        paths.push((p, segment + 1));
                    }
                }
            }
            let nested = map.next_value_seed(ValueSeed {
                c: &mut *c,
                paths: &paths,
                comma: false,
            })?;
            if excluded {
                // Read and counted, not written.
                c.out.truncate(text);
                in_order = false;
            }
            if let Some(previous) = c.members[member_base..].last() {
                in_order &= c.keys[previous.key.clone()] < c.keys[key.clone()];
            }
            c.members.push(Member {
                key,
                text: text..c.out.len(),
                nested,
                excluded,
            });
            next = map.next_key_seed(KeySeed {
                c: &mut *c,
                first: false,
            })?;
        }
        Ok(c.close_object(start, key_base, member_base, in_order))
    }
}

/// An object key, as `Value` tells them apart.
enum Key {
    /// The first key is serde_json's number token (with `arbitrary_precision`).
    Number,
    /// A member's key: unescaped in `Canonical::keys`, and written to the output (after a
    /// comma unless first) as `"key":` from `text` on.
    Member { key: Range<usize>, text: usize },
}

struct KeySeed<'c, 'x> {
    c: &'c mut Canonical<'x>,
    first: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_, '_> {
    type Value = Key;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Key, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_, '_> {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
        self.key(v, false)
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key, E> {
        self.key(v, true)
    }
}

impl KeySeed<'_, '_> {
    fn key<E: de::Error>(self, v: &str, lent: bool) -> Result<Key, E> {
        let c = self.c;
        if self.first {
            if c.tokens.number && v == NUMBER_TOKEN {
                c.lossy = true;
                return Ok(Key::Number);
            }
            if v == RAW_TOKEN {
                // `Value` (with `raw_value`) reads such an object as the JSON text in its
                // string, so `{"$serde_json::private::RawValue":"{\"amount\":1}"}` would
                // share `{"amount":1}`'s form while an upstream reads a different object:
                // such a body is hashed as raw bytes, whatever serde_json's features.
                return Err(E::custom("serde_json's private raw value token"));
            }
        } else {
            c.out.push(b',');
        }
        let key = c.keys.len()..c.keys.len() + v.len();
        c.keys.extend_from_slice(v.as_bytes());
        let text = c.out.len();
        if lent {
            write_unescaped(&mut c.out, v);
        } else {
            write(&mut c.out, v)?;
        }
        c.out.push(b':');
        Ok(Key::Member { key, text })
    }
}

/// The value under the number token: a number's text, written as the `serde_json::Number`
/// parsed from it writes.
struct NumberSeed<'c, 'x> {
    c: &'c mut Canonical<'x>,
}

impl<'de> DeserializeSeed<'de> for NumberSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for NumberSeed<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("string containing a number")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if is_scanned_number(v.as_bytes()) {
            // Always so for a number from the parser.
            self.c.out.extend_from_slice(v.as_bytes());
            Ok(())
        } else {
            let number: serde_json::Number = v.parse().map_err(E::custom)?;
            write(&mut self.c.out, &number)
        }
    }
}

/// Whether a number's text is as serde_json's `arbitrary_precision` scanner writes it,
/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?(e[+-][0-9]+)?`, which `serde_json::Number` parses back to
/// the same text (an integer that fits 64 bits is rewritten by `itoa`, to the same digits).
fn is_scanned_number(s: &[u8]) -> bool {
    fn digits(s: &[u8], i: &mut usize) -> usize {
        let from = *i;
        while s.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - from
    }
    let mut i = usize::from(s.first() == Some(&b'-'));
    match s.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            i += 1;
            digits(s, &mut i);
        }
        _ => return false,
    }
    if s.get(i) == Some(&b'.') {
        i += 1;
        if digits(s, &mut i) == 0 {
            return false;
        }
    }
    if s.get(i) == Some(&b'e') {
        i += 1;
        if !matches!(s.get(i), Some(b'+' | b'-')) {
            return false;
        }
        i += 1;
        if digits(s, &mut i) == 0 {
            return false;
        }
    }
    i == s.len()
}

/// How many object members a JSON text spells: its colons outside strings.
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

fn part(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_be_bytes());
    h.update(bytes);
}

fn is_json(content_type: &str) -> bool {
    let media = content_type.split(';').next().unwrap_or("").trim();
    media == "application/json" || media.ends_with("+json")
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: Option<&str> = Some("application/json");

    /// The implementation `canonical_json` replaced, through `serde_json::Value`: the
    /// oracle its output must equal byte for byte (stored fingerprints depend on it), but
    /// for one deliberate change: an object whose first key is serde_json's raw value
    /// token makes the body hashed raw (it was read as the JSON text in its string).
    fn canonical_json_via_value(f: &Fingerprinter, body: &[u8]) -> Option<Vec<u8>> {
        if spells_raw_token_first(body) {
            return None;
        }
        let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
        if members(&value) != raw_members(body) {
            return None;
        }
        for path in &f.excluded {
            remove_path(&mut value, path);
        }
        serde_json::to_vec(&value).ok()
    }

    /// Whether some object of `body` (valid JSON) has the raw value token as its first key,
    /// however the key is escaped. The deserializer hands plain keys to any visitor but
    /// `Value`'s, so a visitor of its own sees them as written.
    fn spells_raw_token_first(body: &[u8]) -> bool {
        struct Scan<'a>(&'a mut bool);
        impl<'de> serde::de::DeserializeSeed<'de> for Scan<'_> {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_any(self)
            }
        }
        impl<'de> serde::de::Visitor<'de> for Scan<'_> {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<(), E> {
                Ok(())
            }
            fn visit_i64<E>(self, _: i64) -> Result<(), E> {
                Ok(())
            }
            fn visit_u64<E>(self, _: u64) -> Result<(), E> {
                Ok(())
            }
            fn visit_f64<E>(self, _: f64) -> Result<(), E> {
                Ok(())
            }
            fn visit_str<E>(self, _: &str) -> Result<(), E> {
                Ok(())
            }
            fn visit_unit<E>(self) -> Result<(), E> {
                Ok(())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                while seq.next_element_seed(Scan(&mut *self.0))?.is_some() {}
                Ok(())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
                let mut first = true;
                while let Some(key) = map.next_key::<String>()? {
                    if first && key == RAW_TOKEN {
                        *self.0 = true;
                    }
                    first = false;
                    map.next_value_seed(Scan(&mut *self.0))?;
                }
                Ok(())
            }
        }
        let mut found = false;
        let mut de = serde_json::Deserializer::from_slice(body);
        let _ = serde::de::DeserializeSeed::deserialize(Scan(&mut found), &mut de);
        found
    }

    /// How many object members a parsed value holds.
    fn members(value: &serde_json::Value) -> usize {
        match value {
            serde_json::Value::Object(map) => map.len() + map.values().map(members).sum::<usize>(),
            serde_json::Value::Array(items) => items.iter().map(members).sum(),
            _ => 0,
        }
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

    /// Asserts that the two implementations agree on a body, without and with exclusions.
    fn assert_same(body: &[u8], excluded: &[&str]) {
        let plain = Fingerprinter::new();
        let mut excluding = Fingerprinter::new();
        for path in excluded {
            excluding = excluding.exclude_field(path);
        }
        for f in [&plain, &excluding] {
            assert_eq!(
                f.canonical_json(body).map(String::from_utf8),
                canonical_json_via_value(f, body).map(String::from_utf8),
                "{} excluding {:?}",
                String::from_utf8_lossy(body),
                f.excluded
            );
        }
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let f = Fingerprinter::new();
        let a = f.fingerprint("POST", "/x", JSON, br#"{"b":{"y":1,"x":2},"a":"\u00e9"}"#);
        let b = f.fingerprint(
            "POST",
            "/x",
            Some("Application/JSON; charset=utf-8 "),
            "{\n \"a\" : \"é\", \"b\": {\"x\":2, \"y\":1}}".as_bytes(),
        );
        // The content type differs (charset parameter), so these differ...
        assert_ne!(a, b);
        // ...but with the same content type they agree.
        let c = f.fingerprint(
            "POST",
            "/x",
            JSON,
            "{\n \"a\" : \"é\", \"b\": {\"x\":2, \"y\":1}}".as_bytes(),
        );
        assert_eq!(a, c);
    }

    #[test]
    fn every_part_matters() {
        let f = Fingerprinter::new();
        let base = f.fingerprint("POST", "/x?a=1", JSON, b"{}");
        assert_ne!(base, f.fingerprint("PATCH", "/x?a=1", JSON, b"{}"));
        assert_ne!(base, f.fingerprint("POST", "/x?a=2", JSON, b"{}"));
        assert_ne!(base, f.fingerprint("POST", "/x?a=1", None, b"{}"));
        assert_ne!(base, f.fingerprint("POST", "/x?a=1", JSON, b"[]"));
    }

    #[test]
    fn large_numbers_keep_their_digits() {
        let f = Fingerprinter::new();
        let a = f.fingerprint("POST", "/", JSON, br#"{"amount":12345678901234567890}"#);
        let b = f.fingerprint("POST", "/", JSON, br#"{"amount":12345678901234567891}"#);
        assert_ne!(a, b);
    }

    #[test]
    fn invalid_json_falls_back_to_raw_bytes() {
        let f = Fingerprinter::new();
        let a = f.fingerprint("POST", "/", JSON, b"{not json");
        let b = f.fingerprint("POST", "/", JSON, b"{not  json");
        assert_ne!(a, b);
        assert_eq!(a, f.fingerprint("POST", "/", JSON, b"{not json"));
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let f = Fingerprinter::new();
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let a = f.fingerprint("POST", "/", JSON, deep.as_bytes());
        assert_eq!(a, f.fingerprint("POST", "/", JSON, deep.as_bytes()));
    }

    #[test]
    fn objects_that_parse_to_fewer_members_are_hashed_as_bytes() {
        // With arbitrary_precision these objects once canonicalised as numbers.
        let f = Fingerprinter::new();
        for (object, number) in [
            (
                &br#"{"a":{"$serde_json::private::Number":"2"}}"#[..],
                &br#"{"a":2}"#[..],
            ),
            (br#"{"$serde_json::private::Number":"1"}"#, b"1"),
            (br#"{"\u0024serde_json::private::Number":"1"}"#, b"1"),
            (br#"{"$serde_json::private::\u004eumber":"1"}"#, b"1"),
            // With raw_value (the gateway's build has it) this read as the JSON in the string.
            (
                br#"{"$serde_json::private::RawValue":"{\"amount\":1}"}"#,
                br#"{"amount":1}"#,
            ),
            (
                br#"{"x":{"\u0024serde_json::private::RawValue":"2"}}"#,
                br#"{"x":2}"#,
            ),
        ] {
            assert_ne!(
                f.fingerprint("POST", "/", JSON, object),
                f.fingerprint("POST", "/", JSON, number),
                "{}",
                String::from_utf8_lossy(object)
            );
            assert_eq!(f.canonical_json(object), None);
        }
        // A key given twice is not the same as its last value.
        let twice = br#"{"amount":100,"amount":1}"#;
        assert_eq!(f.canonical_json(twice), None);
        assert_ne!(
            f.fingerprint("POST", "/", JSON, twice),
            f.fingerprint("POST", "/", JSON, br#"{"amount":1}"#)
        );
        // Colons inside strings are not members; escapes still canonicalise.
        assert_eq!(
            f.canonical_json(br#"{ "url" : "http://x:1/\"a:b\"" }"#),
            Some(br#"{"url":"http://x:1/\"a:b\""}"#.to_vec())
        );
        assert_eq!(
            f.canonical_json(br#"{"k":"\u00e9\u4e2d"}"#),
            Some("{\"k\":\"\u{e9}\u{4e2d}\"}".as_bytes().to_vec())
        );
    }

    #[test]
    fn excluded_fields_are_ignored() {
        let f = Fingerprinter::new()
            .exclude_field("sent_at")
            .exclude_field("meta.trace");
        let a = f.fingerprint(
            "POST",
            "/",
            JSON,
            br#"{"v":1,"sent_at":1,"meta":{"trace":"a","k":1}}"#,
        );
        let b = f.fingerprint(
            "POST",
            "/",
            JSON,
            br#"{"v":1,"sent_at":2,"meta":{"trace":"b","k":1}}"#,
        );
        let c = f.fingerprint(
            "POST",
            "/",
            JSON,
            br#"{"v":1,"sent_at":2,"meta":{"trace":"b","k":2}}"#,
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn non_json_bodies_are_not_canonicalised() {
        let f = Fingerprinter::new();
        let a = f.fingerprint("POST", "/", Some("text/plain"), br#"{"a":1,"b":2}"#);
        let b = f.fingerprint("POST", "/", Some("text/plain"), br#"{"b":2,"a":1}"#);
        assert_ne!(a, b);
    }

    #[test]
    fn canonical_json_equals_the_value_implementation_on_chosen_bodies() {
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let objects = |depth: usize| format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        let mut bodies: Vec<Vec<u8>> = [
            &br#"{"amount":1000,"currency":"usd","customer":"cus_123","metadata":{"order":"A-1","note":"x"},"items":[{"sku":"s1","qty":2}]}"#[..],
            br#"{"b":1,"a":2,"c":{"z":[],"y":{}},"\u0061":3}"#,
            br#"{"b":1,"a":2}"#,
            br#" {"a" : [ 1 , -0 , 1.0 , 1E+2 , 1e2, 1e-2, 2.5E-3 , 1e400 , -1e400 ] } "#,
            br#"[123456789012345678901234567890,-123456789012345678901234567890,18446744073709551615,18446744073709551616,-9223372036854775808,-9223372036854775809]"#,
            br#"[01]"#,
            br#"[-01]"#,
            br#"[1.]"#,
            br#"[.5]"#,
            br#"[+1]"#,
            br#"[1e]"#,
            br#"{"a":1}x"#,
            br#"{"a":1} "#,
            br#"{"a":1,}"#,
            br#"[1,]"#,
            br#""\u00e9\ud83d\ude00\n\/\\\"\u001f\u007f""#,
            br#""\ud800""#,
            b"\"\t\"",
            b"\"\xff\"",
            br#"{"\u00e9":1,"\u00e9":2}"#,
            br#"{"a":{"x":1},"a":2}"#,
            br#"{"a":1,"$serde_json::private::Number":"2"}"#,
            br#"{"$serde_json::private::Number":"2"}"#,
            br#"{"$serde_json::private::Number":"1E2"}"#,
            br#"{"$serde_json::private::Number":"x"}"#,
            br#"{"$serde_json::private::Number":2}"#,
            br#"{"$serde_json::private::Number":"2","a":1}"#,
            br#"{"a":{"$serde_json::private::Number":"2"},"b":{"$serde_json::private::RawValue":"{\"c\":1,\"d\":2}"}}"#,
            br#"{"$serde_json::private::RawValue":"{\"b\":1,\"a\":{\"c\":2}}"}"#,
            br#"{"$serde_json::private::RawValue":"{\"a\":1,\"a\":2}"}"#,
            br#"{"$serde_json::private::RawValue":"[1, 2]"}"#,
            br#"{"$serde_json::private::RawValue":"nope"}"#,
            br#"{"$serde_json::private::RawValue":"1","a":1}"#,
            br#"{"a":1,"$serde_json::private::RawValue":"1"}"#,
            br#"{"url":"http://x:1/\"a:b\""}"#,
            br#"{"":1,"a":{"":2,"b":3}}"#,
            b"",
            b" ",
            b"nul",
            b"null",
            b"true false",
        ]
        .iter()
        .map(|b| b.to_vec())
        .collect();
        for depth in [126, 127, 128, 129, 100_000] {
            bodies.push(nested(depth).into_bytes());
            bodies.push(objects(depth).into_bytes());
        }
        for body in &bodies {
            assert_same(body, &[]);
            assert_same(body, &["a", "metadata.note", "c.z", "b.c"]);
            assert_same(body, &["a.x", "", "\u{e9}", "$serde_json::private::Number"]);
        }
    }

    /// `canonical_json` against `canonical_json_via_value` on generated texts. The paths
    /// for serde_json's private tokens and for keys given twice only show a difference
    /// with the features the gateway binary has (axum enables `raw_value`): run these also
    /// with `cargo test -p idem-core --features serde_json/raw_value`.
    mod equivalence {
        use proptest::prelude::*;
        use proptest::sample::Index;

        use super::{Fingerprinter, canonical_json_via_value};

        /// A JSON text as a tree, so that most texts generated are valid.
        #[derive(Clone, Debug)]
        enum Node {
            /// A number, string, `true`...
            Literal(String),
            Array(Vec<Node>),
            /// Members as (key literal with the whitespace around it, value).
            Object(Vec<(String, Node)>),
            /// An object whose first key is serde_json's raw value token, and whose value
            /// is the JSON text of a node, quoted.
            Raw(Box<Node>),
            /// An object whose first key is serde_json's number token, with its value's
            /// text, then maybe more members.
            Number(String, Vec<(String, Node)>),
            Spaced(String, Box<Node>, String),
        }

        /// Writes a tree as text; one of its literals or keys (a slot), counted in the order
        /// written, may be replaced by an invalid one.
        struct Render {
            out: String,
            slot: usize,
            poison: Option<(usize, &'static str, &'static str)>,
        }

        impl Render {
            fn slot(&mut self, text: &str, key: bool) {
                match self.poison {
                    Some((at, literal, bad_key)) if at == self.slot => {
                        self.out.push_str(if key { bad_key } else { literal });
                    }
                    _ => self.out.push_str(text),
                }
                self.slot += 1;
            }

            fn members<'n>(&mut self, members: impl IntoIterator<Item = &'n (String, Node)>) {
                for (key, value) in members {
                    self.out.push(',');
                    self.slot(key, true);
                    self.out.push(':');
                    self.node(value);
                }
            }

            fn node(&mut self, node: &Node) {
                match node {
                    Node::Literal(text) => self.slot(text, false),
                    Node::Array(items) => {
                        self.out.push('[');
                        for (i, item) in items.iter().enumerate() {
                            if i > 0 {
                                self.out.push(',');
                            }
                            self.node(item);
                        }
                        self.out.push(']');
                    }
                    Node::Object(members) => {
                        self.out.push('{');
                        let start = self.out.len();
                        self.members(members);
                        if self.out.len() > start {
                            self.out.remove(start); // the first comma
                        }
                        self.out.push('}');
                    }
                    Node::Raw(inner) => {
                        let outer = std::mem::take(&mut self.out);
                        self.node(inner);
                        let text = std::mem::replace(&mut self.out, outer);
                        self.out.push_str(r#"{"$serde_json::private::RawValue":"#);
                        self.out
                            .push_str(&serde_json::to_string(&text).unwrap_or_default());
                        self.out.push('}');
                    }
                    Node::Number(value, more) => {
                        self.out.push_str(r#"{"$serde_json::private::Number":"#);
                        self.slot(value, false);
                        self.members(more);
                        self.out.push('}');
                    }
                    Node::Spaced(before, inner, after) => {
                        self.out.push_str(before);
                        self.node(inner);
                        self.out.push_str(after);
                    }
                }
            }
        }

        fn render(node: &Node) -> String {
            let mut render = Render {
                out: String::new(),
                slot: 0,
                poison: None,
            };
            render.node(node);
            render.out
        }

        /// Almost literals (not JSON) and almost keys.
        #[rustfmt::skip]
        const BAD_LITERALS: &[&str] = &[
            "01", "-01", "00", "1.", ".5", "+1", "1e", "1e+", "-", "NaN", "Infinity", "0x10",
            "1_0", "1.e2", "-e1", "nul", "tru", "True", "", "}", "]", r#""\ud800""#,
            r#""\udc00\ud800""#, r#""\ud83d\u0041""#, r#""\x""#, "\"\t\"", r#""\u00e""#,
            "\"abc", "\u{a0}1",
        ];
        #[rustfmt::skip]
        const BAD_KEYS: &[&str] = &[
            r#""\ud800""#, "\"\t\"", r#""\q""#, "a", "1", "\"a", "\u{a0}\"a\"", "\"\u{0}\"",
        ];

        fn whitespace() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => Just(String::new()),
                1 => "[ \t\n\r]{1,3}",
            ]
        }

        /// Numbers as JSON spells them (`1e400` is one, read with `arbitrary_precision`).
        #[rustfmt::skip]
        const NUMBERS: &[&str] = &[
            "0", "-0", "1", "-1", "1000", "1.0", "1.5", "-0.0", "0.0e0", "1e400", "-1e400",
            "1E+2", "1e2", "1e-2", "1E2", "2.5E-3", "123456789012345678901234567890",
            "-123456789012345678901234567890", "18446744073709551615", "18446744073709551616",
            "9223372036854775807", "-9223372036854775808", "-9223372036854775809",
        ];

        fn number() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(NUMBERS).prop_map(str::to_owned),
                "-?(0|[1-9][0-9]{0,25})(\\.[0-9]{1,5})?([eE][+-]?[0-9]{1,4})?",
            ]
        }

        #[rustfmt::skip]
        const STRINGS: &[&str] = &[
            r#""""#, r#""x""#, r#""usd""#, r#""\u00e9""#, "\"\u{e9}\"", r#""\ud83d\ude00""#,
            "\"\u{1f600}\"", r#""\n""#, r#""\/""#, r#""\\""#, r#""\"""#, r#""a:b""#,
            r#""{\"a\":1}""#, r#""\u001f""#, r#""\u007f""#, r#""\b\f\r\t""#, r#""1""#,
            r#""1E2""#, r#""-0""#, r#"" 1""#, r#""01""#, r#""1e400""#, r#""-5""#,
        ];

        /// A string literal: chosen, any text, or a number's text.
        fn string() -> impl Strategy<Value = String> {
            prop_oneof![
                4 => prop::sample::select(STRINGS).prop_map(str::to_owned),
                1 => any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap_or_default()),
                1 => number().prop_map(|n| format!("\"{n}\"")),
            ]
        }

        /// Keys as spelled between their quotes; some are the same key spelled differently.
        #[rustfmt::skip]
        const KEYS: &[&str] = &[
            r"\u0061", "\u{e9}", r"\u00e9", r"\ud83d\ude00", "\u{1f600}", r"\n", r"\\", r#"\""#,
            "a:b", "", "A", r"\/", r"\u0000", "x.y", "a.b", "$serde_json::private::Number",
            r"\u0024serde_json::private::Number", "$serde_json::private::RawValue",
            r"$serde_json::private::\u0052awValue",
        ];

        fn key() -> impl Strategy<Value = String> {
            let key = prop_oneof![
                6 => prop::sample::select(&["a", "b", "m", "amount"][..]).prop_map(str::to_owned),
                3 => prop::sample::select(KEYS).prop_map(str::to_owned),
                1 => "[a-zA-Z0-9_\u{e9}\u{1f600}]{0,6}",
            ];
            (whitespace(), key, whitespace())
                .prop_map(|(before, key, after)| format!("{before}\"{key}\"{after}"))
        }

        fn members(
            node: impl Strategy<Value = Node>,
            size: std::ops::Range<usize>,
        ) -> impl Strategy<Value = Vec<(String, Node)>> {
            prop::collection::vec((key(), node), size)
        }

        fn node() -> impl Strategy<Value = Node> {
            let leaf = prop_oneof![
                2 => number().prop_map(Node::Literal),
                2 => string().prop_map(Node::Literal),
                1 => prop::sample::select(&["null", "true", "false"][..])
                    .prop_map(|l| Node::Literal(l.to_owned())),
            ];
            leaf.prop_recursive(5, 32, 5, |inner| {
                prop_oneof![
                    3 => prop::collection::vec(inner.clone(), 0..5).prop_map(Node::Array),
                    6 => members(inner.clone(), 0..5).prop_map(Node::Object),
                    1 => inner.clone().prop_map(|n| Node::Raw(Box::new(n))),
                    1 => (
                        prop_oneof![
                            4 => number().prop_map(|n| format!("\"{n}\"")),
                            1 => string(),
                            1 => inner.clone().prop_map(|n| render(&n)),
                        ],
                        prop_oneof![3 => Just(Vec::new()), 1 => members(inner.clone(), 1..3)],
                    )
                        .prop_map(|(n, more)| Node::Number(n, more)),
                    2 => (whitespace(), inner, whitespace())
                        .prop_map(|(b, n, a)| Node::Spaced(b, Box::new(n), a)),
                ]
            })
        }

        /// Mostly an object, as request bodies are.
        fn body() -> impl Strategy<Value = Node> {
            prop_oneof![
                3 => members(node(), 0..7).prop_map(Node::Object),
                1 => node(),
            ]
        }

        /// A change to a text's bytes.
        #[derive(Clone, Debug)]
        enum Mutation {
            Truncate(Index),
            Replace(Index, u8),
            Insert(Index, u8),
            Remove(Index),
            Append(&'static str),
        }

        fn interesting_byte() -> impl Strategy<Value = u8> {
            prop_oneof![
                3 => prop::sample::select(b"\"\\:,{}[] 0919e-.u\n".to_vec()),
                1 => prop::sample::select(vec![0x00, 0x7f, 0x80, 0xc3, 0xe9, 0xff]),
                1 => any::<u8>(),
            ]
        }

        fn mutation() -> impl Strategy<Value = Mutation> {
            prop_oneof![
                any::<Index>().prop_map(Mutation::Truncate),
                (any::<Index>(), interesting_byte()).prop_map(|(i, b)| Mutation::Replace(i, b)),
                (any::<Index>(), interesting_byte()).prop_map(|(i, b)| Mutation::Insert(i, b)),
                any::<Index>().prop_map(Mutation::Remove),
                prop::sample::select(&[" ", "\n", "x", "{}", ",", "]"][..])
                    .prop_map(Mutation::Append),
            ]
        }

        fn mutate(text: &mut Vec<u8>, mutation: &Mutation) {
            match *mutation {
                Mutation::Truncate(i) => text.truncate(i.index(text.len() + 1)),
                Mutation::Replace(i, b) if !text.is_empty() => {
                    let at = i.index(text.len());
                    text[at] = b;
                }
                Mutation::Insert(i, b) => text.insert(i.index(text.len() + 1), b),
                Mutation::Remove(i) if !text.is_empty() => {
                    text.remove(i.index(text.len()));
                }
                Mutation::Append(s) => text.extend_from_slice(s.as_bytes()),
                _ => {}
            }
        }

        /// Something wrong with a text, or nothing: one slot poisoned, or bytes mutated.
        #[derive(Clone, Debug)]
        enum Damage {
            None,
            Poison(Index, &'static str, &'static str),
            Mutations(Vec<Mutation>),
        }

        fn damage() -> impl Strategy<Value = Damage> {
            prop_oneof![
                4 => Just(Damage::None),
                1 => (
                    any::<Index>(),
                    prop::sample::select(BAD_LITERALS),
                    prop::sample::select(BAD_KEYS),
                )
                    .prop_map(|(at, literal, key)| Damage::Poison(at, literal, key)),
                2 => prop::collection::vec(mutation(), 1..4).prop_map(Damage::Mutations),
            ]
        }

        fn text(node: &Node, damage: &Damage) -> Vec<u8> {
            match damage {
                Damage::None => render(node).into_bytes(),
                Damage::Poison(at, literal, key) => {
                    let mut count = Render {
                        out: String::new(),
                        slot: 0,
                        poison: None,
                    };
                    count.node(node);
                    let mut render = Render {
                        out: String::new(),
                        slot: 0,
                        poison: Some((at.index(count.slot.max(1)), literal, key)),
                    };
                    render.node(node);
                    render.out.into_bytes()
                }
                Damage::Mutations(mutations) => {
                    let mut text = render(node).into_bytes();
                    for m in mutations {
                        mutate(&mut text, m);
                    }
                    text
                }
            }
        }

        #[rustfmt::skip]
        const SEGMENTS: &[&str] = &[
            "a", "b", "m", "amount", "\u{e9}", "\u{1f600}", "\n", "", "A", "x",
            "$serde_json::private::Number", "$serde_json::private::RawValue",
        ];

        fn excluded() -> impl Strategy<Value = Vec<String>> {
            let segment = prop_oneof![
                3 => prop::sample::select(&["a", "b", "m"][..]),
                1 => prop::sample::select(SEGMENTS),
            ];
            let path = prop_oneof![
                segment.clone().prop_map(str::to_owned),
                prop::collection::vec(segment, 2..4).prop_map(|s| s.join(".")),
            ];
            prop::collection::vec(path, 1..4)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2048))]

            #[test]
            fn canonical_json_equals_the_value_implementation(
                node in body(),
                damage in damage(),
                excluded in excluded(),
            ) {
                let body = text(&node, &damage);
                let plain = Fingerprinter::new();
                let excluding = excluded.iter().fold(Fingerprinter::new(), |f, p| f.exclude_field(p));
                for f in [&plain, &excluding] {
                    prop_assert_eq!(
                        f.canonical_json(&body).map(String::from_utf8),
                        canonical_json_via_value(f, &body).map(String::from_utf8),
                        "{} excluding {:?}",
                        String::from_utf8_lossy(&body),
                        &f.excluded
                    );
                }
            }
        }
    }
}
