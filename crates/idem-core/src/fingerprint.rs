//! Request fingerprints: what makes a retry "the same request".

use std::fmt;

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
        let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
        // Parsing must keep every object member. It does not for a key given twice (the
        // last one wins, so `{"amount":100,"amount":1}` would read as `{"amount":1}`, while
        // a first-wins upstream sees 100), nor, with serde_json's `arbitrary_precision`,
        // for an object spelling its private number token
        // (`{"$serde_json::private::Number":"2"}` reads as the number 2). Either way two
        // different bodies would share a canonical form and a changed request would be
        // replayed instead of answered 422: such a body is hashed as raw bytes instead.
        if members(&value) != raw_members(body) {
            return None;
        }
        for path in &self.excluded {
            remove_path(&mut value, path);
        }
        // `serde_json::Map` is ordered by key (the `preserve_order` feature is off) and the
        // compact writer emits no whitespace, so this is a canonical form.
        serde_json::to_vec(&value).ok()
    }
}

/// How many object members a parsed value holds.
fn members(value: &serde_json::Value) -> usize {
    match value {
        serde_json::Value::Object(map) => map.len() + map.values().map(members).sum::<usize>(),
        serde_json::Value::Array(items) => items.iter().map(members).sum(),
        _ => 0,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: Option<&str> = Some("application/json");

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
}
