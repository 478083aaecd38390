//! The cursor a subscriber persists: opaque bytes whose first byte names the backend family and
//! version (the codecs, and parsing a cursor from text, are in [`crate::cursor`]).

use std::fmt;

/// Opaque, backend-versioned cursor: the first byte names the backend family, the rest is that
/// backend's position. Persist its bytes (or hex); hand them back to resume.
///
/// ```
/// use ff_completions::StreamCursor;
///
/// // A cursor as an event carries it (here: SQLite, `0x03` + event id 5).
/// let cursor = StreamCursor::new(vec![0x03, 0, 0, 0, 0, 0, 0, 0, 5]);
/// let saved = cursor.to_hex(); // the family byte first
/// assert_eq!(saved, "030000000000000005");
/// assert_eq!(StreamCursor::from_hex(&saved)?, cursor);
/// assert!(StreamCursor::from_hex("01zz").is_err()); // malformed: a typed error, never a panic
/// # Ok::<(), ff_completions::Error>(())
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct StreamCursor(Vec<u8>);

/// A cursor serializes as its hex text (as [`StreamCursor::to_hex`] writes it).
#[cfg(feature = "serde")]
impl serde::Serialize for StreamCursor {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl StreamCursor {
    /// Wraps raw bytes (validated only when decoded).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The empty cursor: start from the tail.
    pub fn empty() -> Self {
        Self(Vec::new())
    }

    /// True for the empty (tail) cursor.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Lower-case hex, convenient for logs and command lines.
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }
}

impl fmt::Debug for StreamCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamCursor({})", self.to_hex())
    }
}

impl fmt::Display for StreamCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}
