//! Event families: completions, lease history and signal delivery share each backend's order
//! (one listener reads them all); a subscription delivers one family, and a cursor of another
//! family than the completions' carries a tag after the backend byte (see [`crate::cursor`]).
//! A cursor of one family given to a subscription of another is a validation error.

use crate::cursor::{LEASE_HISTORY_CURSOR_TAG, SIGNAL_DELIVERY_CURSOR_TAG, StreamCursor};
use crate::error::Error;

/// The event family a cursor (and a subscription) belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// Completions: cursors without a family tag.
    Completion,
    /// Lease history: tag `0xF1`.
    LeaseHistory,
    /// Signal delivery: tag `0xF2`.
    SignalDelivery,
}

/// Second bytes at or above this are family tags (`0xF0..=0xFF`); completion cursors never
/// have one.
const FAMILY_TAG_FLOOR: u8 = 0xF0;

impl Family {
    /// Its name, for errors and logs.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Completion => "completion",
            Self::LeaseHistory => "lease history",
            Self::SignalDelivery => "signal delivery",
        }
    }

    fn tag(self) -> Option<u8> {
        match self {
            Self::Completion => None,
            Self::LeaseHistory => Some(LEASE_HISTORY_CURSOR_TAG),
            Self::SignalDelivery => Some(SIGNAL_DELIVERY_CURSOR_TAG),
        }
    }

    /// The cursor of this family at the backend position `cursor` (a completion-form cursor,
    /// as a source encodes it). The empty cursor stays empty.
    pub(crate) fn tag_cursor(self, cursor: StreamCursor) -> StreamCursor {
        match (self.tag(), cursor.as_bytes().split_first()) {
            (Some(tag), Some((&backend, rest))) => {
                let mut bytes = Vec::with_capacity(cursor.as_bytes().len() + 1);
                bytes.push(backend);
                bytes.push(tag);
                bytes.extend_from_slice(rest);
                StreamCursor::new(bytes)
            }
            _ => cursor,
        }
    }

    /// The backend position of `cursor`, a cursor of this family (empty: the tail).
    ///
    /// # Errors
    /// [`Error::Validation`] for a cursor of another family or an unknown tag.
    pub(crate) fn untag_cursor(self, cursor: &StreamCursor) -> Result<StreamCursor, Error> {
        let bytes = cursor.as_bytes();
        if bytes.is_empty() {
            return Ok(StreamCursor::empty());
        }
        let found = match bytes {
            [_, tag, ..] if *tag >= FAMILY_TAG_FLOOR => match *tag {
                LEASE_HISTORY_CURSOR_TAG => Self::LeaseHistory,
                SIGNAL_DELIVERY_CURSOR_TAG => Self::SignalDelivery,
                other => return Err(Error::validation(format!("cursor family tag 0x{other:02x} is unknown"))),
            },
            _ => Self::Completion,
        };
        if found != self {
            return Err(Error::validation(format!(
                "a {} cursor cannot resume a {} subscription",
                found.name(),
                self.name()
            )));
        }
        Ok(match (self.tag(), bytes) {
            (Some(_), [backend, _, rest @ ..]) => {
                let mut body = Vec::with_capacity(bytes.len() - 1);
                body.push(*backend);
                body.extend_from_slice(rest);
                StreamCursor::new(body)
            }
            _ => cursor.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cursor::{
        decode_sqlite_cursor, encode_postgres_batch_cursor, encode_postgres_cursor, encode_postgres_event_cursor,
        encode_postgres_tick_cursor, encode_sqlite_cursor, encode_valkey_cursor, encode_valkey_frontier,
    };

    const FAMILIES: [Family; 3] = [Family::Completion, Family::LeaseHistory, Family::SignalDelivery];

    fn backend_cursors() -> Vec<StreamCursor> {
        vec![
            encode_sqlite_cursor(5),
            encode_sqlite_cursor(i64::MAX),
            encode_postgres_tick_cursor(31, 900, -7, -3, u64::MAX),
            encode_postgres_batch_cursor(31, 900, 42),
            encode_postgres_cursor(900, 42),
            encode_postgres_event_cursor(42),
            encode_valkey_cursor(1_700_000_000_000, 7),
            encode_valkey_frontier(&[(0, 1_700_000_000_000, 1), (255, 1_700_000_000_001, 0)]),
        ]
    }

    #[test]
    fn completion_cursors_keep_their_bytes_and_every_family_round_trips() {
        for cursor in backend_cursors() {
            assert_eq!(Family::Completion.tag_cursor(cursor.clone()), cursor, "completion bytes unchanged");
            for family in FAMILIES {
                let tagged = family.tag_cursor(cursor.clone());
                assert_eq!(tagged.as_bytes()[0], cursor.as_bytes()[0], "the backend byte stays first");
                assert_eq!(family.untag_cursor(&tagged).ok(), Some(cursor.clone()), "{family:?} {cursor}");
            }
        }
        assert_eq!(Family::LeaseHistory.tag_cursor(encode_sqlite_cursor(9)).to_hex(), "03f10000000000000009");
        assert_eq!(Family::SignalDelivery.tag_cursor(encode_sqlite_cursor(9)).to_hex(), "03f20000000000000009");
        assert_eq!(Family::LeaseHistory.tag_cursor(StreamCursor::empty()), StreamCursor::empty());
        assert_eq!(Family::SignalDelivery.untag_cursor(&StreamCursor::empty()).ok(), Some(StreamCursor::empty()));
    }

    #[test]
    fn a_cursor_of_one_family_is_refused_by_every_other() {
        for cursor in backend_cursors() {
            for from in FAMILIES {
                let tagged = from.tag_cursor(cursor.clone());
                for to in FAMILIES.into_iter().filter(|f| *f != from) {
                    match to.untag_cursor(&tagged) {
                        Err(Error::Validation { detail }) => {
                            assert!(detail.contains(from.name()) && detail.contains(to.name()), "{detail}")
                        }
                        other => panic!("{from:?} cursor given to {to:?}: {other:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn malformed_family_bytes_are_validation_errors() {
        for bad in [vec![0x03, 0xf0, 0, 0], vec![0x03, 0xff], vec![0x02, 0xf3, 1, 2, 3]] {
            for family in FAMILIES {
                assert!(
                    matches!(family.untag_cursor(&StreamCursor::new(bad.clone())), Err(Error::Validation { .. })),
                    "{bad:?} {family:?}"
                );
            }
        }
        // A tag on a truncated body passes the family check; the backend's codec refuses it.
        let short = Family::LeaseHistory.untag_cursor(&StreamCursor::new(vec![0x03, 0xf1, 0])).unwrap_or_default();
        assert!(matches!(decode_sqlite_cursor(&short), Err(Error::Validation { .. })));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_tagging_round_trips(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)) {
            let cursor = StreamCursor::new(bytes);
            for family in FAMILIES {
                if let Ok(body) = family.untag_cursor(&cursor) {
                    proptest::prop_assert_eq!(family.tag_cursor(body), cursor.clone());
                }
            }
        }
    }
}
