//! The `Idempotency-Key` header value.

use std::fmt;

/// The longest key accepted, in characters (after unquoting).
pub const MAX_KEY_LEN: usize = 255;

/// A validated idempotency key: 1 to [`MAX_KEY_LEN`] characters, each visible ASCII
/// (0x21–0x7E).
///
/// A header value is either an RFC 8941 sf-string (`"abc"`, where `\"` and `\\` are the
/// only escapes) or, for Stripe-style clients, the bare characters (`abc`). The quoted and
/// the bare form of the same characters parse to the same key.
///
/// The bare form is not an RFC 8941 token (UUID keys start with a digit, which the
/// structured-field grammar reads as a number), so the parser here accepts both forms
/// itself; the sf-string part of the grammar is just the two escapes.
///
/// ```
/// use idem_core::IdempotencyKey;
///
/// let quoted = IdempotencyKey::parse(br#""order-42""#)?;
/// let bare = IdempotencyKey::parse(b"order-42")?;
/// assert_eq!(quoted, bare);
/// assert_eq!(quoted.as_str(), "order-42");
/// assert!(IdempotencyKey::parse(b"").is_err());
/// # Ok::<(), idem_core::KeyError>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(String);

/// Why a header value is not a valid idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The value is empty (or the sf-string is `""`).
    #[error("the key is empty")]
    Empty,
    /// More than [`MAX_KEY_LEN`] characters after unquoting.
    #[error("the key has {len} characters, more than the maximum of {MAX_KEY_LEN}")]
    TooLong {
        /// Characters after unquoting (or bytes of the raw value when longer).
        len: usize,
    },
    /// A byte outside visible ASCII (0x21–0x7E).
    #[error("byte 0x{byte:02x} at position {position} is not visible ASCII (0x21-0x7e)")]
    InvalidByte {
        /// Offset in the header value.
        position: usize,
        /// The offending byte.
        byte: u8,
    },
    /// An sf-string without its closing quote.
    #[error("the quoted key has no closing quote")]
    UnterminatedString,
    /// A backslash not followed by `"` or `\`.
    #[error("invalid escape at position {position}: only \\\" and \\\\ are allowed")]
    InvalidEscape {
        /// Offset of the backslash in the header value.
        position: usize,
    },
    /// Characters after the closing quote (parameters are not accepted).
    #[error("unexpected characters after the closing quote at position {position}")]
    TrailingCharacters {
        /// Offset of the first trailing byte.
        position: usize,
    },
    /// The request carries more than one key header line.
    #[error("the request carries {count} idempotency key headers; exactly one is allowed")]
    Multiple {
        /// How many header lines were present.
        count: usize,
    },
}

impl IdempotencyKey {
    /// Parses a header value (quoted sf-string or bare form).
    pub fn parse(value: &[u8]) -> Result<Self, KeyError> {
        match value.first() {
            None => Err(KeyError::Empty),
            Some(b'"') => parse_quoted(value),
            Some(_) => parse_bare(value),
        }
    }

    /// The key's characters (unquoted).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key as an RFC 8941 sf-string, quoted and escaped.
    pub fn to_sf_string(&self) -> String {
        let mut out = String::with_capacity(self.0.len() + 2);
        out.push('"');
        for c in self.0.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
        out
    }
}

fn is_visible(byte: u8) -> bool {
    (0x21..=0x7e).contains(&byte)
}

fn parse_bare(value: &[u8]) -> Result<IdempotencyKey, KeyError> {
    if let Some(position) = value.iter().position(|&b| !is_visible(b)) {
        return Err(KeyError::InvalidByte {
            position,
            byte: value[position],
        });
    }
    if value.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong { len: value.len() });
    }
    // Every byte is visible ASCII, hence valid UTF-8.
    Ok(IdempotencyKey(value.iter().map(|&b| b as char).collect()))
}

fn parse_quoted(value: &[u8]) -> Result<IdempotencyKey, KeyError> {
    let mut out = String::new();
    let mut position = 1;
    loop {
        let Some(&byte) = value.get(position) else {
            return Err(KeyError::UnterminatedString);
        };
        match byte {
            b'"' => {
                if position + 1 != value.len() {
                    return Err(KeyError::TrailingCharacters {
                        position: position + 1,
                    });
                }
                break;
            }
            b'\\' => match value.get(position + 1) {
                Some(&escaped @ (b'"' | b'\\')) => {
                    out.push(escaped as char);
                    position += 2;
                }
                Some(_) => return Err(KeyError::InvalidEscape { position }),
                None => return Err(KeyError::UnterminatedString),
            },
            b if is_visible(b) => {
                out.push(b as char);
                position += 1;
            }
            b => return Err(KeyError::InvalidByte { position, byte: b }),
        }
        if out.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong { len: out.len() });
        }
    }
    if out.is_empty() {
        return Err(KeyError::Empty);
    }
    Ok(IdempotencyKey(out))
}

impl std::str::FromStr for IdempotencyKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s.as_bytes())
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Keys are client-chosen and may be sensitive; `Debug` shows only their length.
impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey(<{} chars>)", self.0.len())
    }
}

impl AsRef<str> for IdempotencyKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_both_forms() {
        let k = IdempotencyKey::parse(br#""a\"b\\c""#).unwrap();
        assert_eq!(k.as_str(), r#"a"b\c"#);
        assert_eq!(IdempotencyKey::parse(br#"a"b\c"#).unwrap(), k);
        assert_eq!(k.to_sf_string(), r#""a\"b\\c""#);
    }

    #[test]
    fn rejects_each_invalid_class() {
        use KeyError::*;
        let cases: &[(&[u8], KeyError)] = &[
            (b"", Empty),
            (b"\"\"", Empty),
            (
                b"a b",
                InvalidByte {
                    position: 1,
                    byte: b' ',
                },
            ),
            (
                b"\"a b\"",
                InvalidByte {
                    position: 2,
                    byte: b' ',
                },
            ),
            (
                b"ab\x7f",
                InvalidByte {
                    position: 2,
                    byte: 0x7f,
                },
            ),
            (
                b"\xc3\xa9",
                InvalidByte {
                    position: 0,
                    byte: 0xc3,
                },
            ),
            (b"\"abc", UnterminatedString),
            (b"\"abc\\", UnterminatedString),
            (b"\"a\\nb\"", InvalidEscape { position: 2 }),
            (b"\"abc\";p=1", TrailingCharacters { position: 5 }),
        ];
        for (input, expected) in cases {
            assert_eq!(
                IdempotencyKey::parse(input).unwrap_err(),
                *expected,
                "{input:?}"
            );
        }
    }

    #[test]
    fn length_limit_is_on_unquoted_characters() {
        let ok = "k".repeat(MAX_KEY_LEN);
        assert!(IdempotencyKey::parse(ok.as_bytes()).is_ok());
        assert!(IdempotencyKey::parse(format!("\"{ok}\"").as_bytes()).is_ok());
        let long = "k".repeat(MAX_KEY_LEN + 1);
        assert_eq!(
            IdempotencyKey::parse(long.as_bytes()).unwrap_err(),
            KeyError::TooLong { len: 256 }
        );
        assert!(matches!(
            IdempotencyKey::parse(format!("\"{long}\"").as_bytes()),
            Err(KeyError::TooLong { .. })
        ));
        // 254 characters plus one escaped quote: 255 after unquoting.
        let escaped = format!("\"{}\\\"\"", "k".repeat(MAX_KEY_LEN - 1));
        assert_eq!(
            IdempotencyKey::parse(escaped.as_bytes())
                .unwrap()
                .as_str()
                .len(),
            255
        );
    }

    #[test]
    fn debug_does_not_reveal_the_key() {
        let k = IdempotencyKey::parse(b"secret-key").unwrap();
        assert!(!format!("{k:?}").contains("secret"));
    }
}
