//! Durable groups on Valkey: the store operations of [`crate::durable::store`] as calls of the
//! library's `ff_group_heartbeat`, `ff_group_ack`, `ff_group_leave` and `ff_group_view`, each
//! naming one group's keys ([`keys::group`], one slot, so a cluster client routes it to the
//! primary that owns the group). The rules run in Lua beside the data, atomically, with the
//! server's clock.
//!
//! A partition's position is the stream id `(0, ms, seq)` in its own stream. The library
//! compares ids as Lua numbers (doubles), exact below 2^53: stream ids' milliseconds are far
//! below that, and so is any sequence a stream reaches in practice; larger words are refused
//! here as [`Error::Validation`] before anything is sent.

use async_trait::async_trait;
use ferriskey::{Client, Value};

use super::keys;
use super::library::fcall;
use super::stream::{format_id, parse_id, text};
use crate::backends::groups::{
    Ack, GroupStore, GroupView, Heartbeat, Lease, PartitionView, Sharing, check_heartbeat, check_member,
};
use crate::cursor::Position;
use crate::error::Error;
use crate::types::check_name;
use crate::types::{PARTITION_COUNT, TimestampMs};

/// The stream id words the library compares exactly are below this (a double's integer range).
const EXACT: u64 = 1 << 53;

/// A position as the stream id the library stores, refused when a word is [`EXACT`] or more or
/// it has a major word (Valkey positions have none). Its lane is not looked at.
fn stream_id(pos: Position) -> Result<String, Error> {
    if pos.major != 0 || pos.hi >= EXACT || pos.lo >= EXACT {
        return Err(Error::validation(format!(
            "position {pos:?} is not a Valkey stream id the group store compares exactly (words below 2^53)"
        )));
    }
    Ok(format_id(pos))
}

/// A reply that is not what the library answers.
fn malformed(function: &'static str, what: impl std::fmt::Display) -> Error {
    Error::schema(function, format!("unexpected reply: {what}"))
}

/// The elements of an array reply.
fn array(function: &'static str, v: Value) -> Result<Vec<Value>, Error> {
    match v {
        Value::Array(items) => items.into_iter().map(|r| r.map_err(|e| malformed(function, e))).collect(),
        other => Err(malformed(function, format!("{other:?}"))),
    }
}

fn int(function: &'static str, v: &Value) -> Result<u64, Error> {
    text(v).and_then(|t| t.parse().ok()).ok_or_else(|| malformed(function, format!("{v:?} is not a count")))
}

fn id(function: &'static str, v: &Value) -> Result<Position, Error> {
    text(v).as_deref().and_then(parse_id).ok_or_else(|| malformed(function, format!("{v:?} is not a stream id")))
}

/// One heartbeat (see [`crate::durable::store`]): the leases the member holds afterwards.
///
/// # Errors
/// [`Error::Validation`] for a bad name, a ttl outside 1 ms to a day or a start position with a
/// word of 2^53 or more;
/// connection failures as the library's other calls.
pub(super) async fn heartbeat(client: &Client, beat: &Heartbeat<'_>) -> Result<Vec<Lease>, Error> {
    const F: &str = "ff_group_heartbeat";
    let ttl = check_heartbeat(beat)?;
    let sharing = match beat.sharing {
        Sharing::Exclusive => "exclusive",
        Sharing::Shared => "shared",
    };
    let mut args = vec![beat.member.to_owned(), ttl.to_string(), sharing.to_owned(), u8::from(beat.rejoin).to_string()];
    for partition in 0..PARTITION_COUNT {
        args.push(stream_id(beat.start.get(partition))?);
    }
    let reply: Value = fcall(client, F, &keys::group(beat.group), &args).await?;
    array(F, reply)?
        .into_iter()
        .map(|lease| match array(F, lease)?.as_slice() {
            [p, token, acked] => Ok(Lease {
                partition: u16::try_from(int(F, p)?).map_err(|e| malformed(F, e))?,
                token: int(F, token)?,
                acked: id(F, acked)?,
            }),
            other => Err(malformed(F, format!("{other:?}"))),
        })
        .collect()
}

/// Applies `acks` all together, or none ([`Error::Fenced`]).
///
/// # Errors
/// [`Error::Validation`] for bad names or positions and for an unknown group;
/// [`Error::Fenced`] when the member no longer holds one of the partitions with the ack's
/// token; connection failures as the library's other calls.
pub(super) async fn ack(client: &Client, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
    const F: &str = "ff_group_ack";
    check_member(group, member)?;
    let mut args = vec![member.to_owned()];
    for a in acks {
        if a.partition >= PARTITION_COUNT {
            return Err(Error::validation(format!("partition {} out of range", a.partition)));
        }
        args.extend([a.partition.to_string(), a.token.to_string(), stream_id(a.position)?]);
    }
    let reply: Value = fcall(client, F, &keys::group(group), &args).await?;
    let reply = array(F, reply)?;
    match reply.as_slice() {
        [ok] if text(ok).as_deref() == Some("ok") => Ok(()),
        [fenced, p] if text(fenced).as_deref() == Some("fenced") => {
            let partition = u16::try_from(int(F, p)?).map_err(|e| malformed(F, e))?;
            Err(Error::fenced(group, member, partition))
        }
        other => Err(malformed(F, format!("{other:?}"))),
    }
}

/// Removes a member and frees its partitions.
///
/// # Errors
/// [`Error::Validation`] for bad names; connection failures as the library's other calls.
pub(super) async fn leave(client: &Client, group: &str, member: &str) -> Result<(), Error> {
    check_member(group, member)?;
    let _freed: i64 = fcall(client, "ff_group_leave", &keys::group(group), &[member]).await?;
    Ok(())
}

/// The stored group, `None` when it was never created.
///
/// # Errors
/// [`Error::Validation`] for a bad name; connection failures as the library's other calls.
pub(super) async fn view(client: &Client, group: &str) -> Result<Option<GroupView>, Error> {
    const F: &str = "ff_group_view";
    check_name("group name", group)?;
    let no_args: &[&str] = &[];
    let reply: Value = fcall(client, F, &keys::group(group), no_args).await?;
    if matches!(reply, Value::Nil) {
        return Ok(None);
    }
    let [members, partitions]: [Value; 2] =
        array(F, reply)?.try_into().map_err(|v: Vec<Value>| malformed(F, format!("{v:?}")))?;
    let members = array(F, members)?
        .into_iter()
        .map(|m| match array(F, m)?.as_slice() {
            [name, expiry] => Ok((
                text(name).ok_or_else(|| malformed(F, format!("{name:?}")))?,
                TimestampMs(i64::try_from(int(F, expiry)?).map_err(|e| malformed(F, e))?),
            )),
            other => Err(malformed(F, format!("{other:?}"))),
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let partitions = array(F, partitions)?
        .into_iter()
        .zip(0..PARTITION_COUNT)
        .map(|(p, partition)| match array(F, p)?.as_slice() {
            [owner, expiry, token, acked] => {
                let owner = text(owner).ok_or_else(|| malformed(F, format!("{owner:?}")))?;
                let expiry = TimestampMs(i64::try_from(int(F, expiry)?).map_err(|e| malformed(F, e))?);
                Ok(PartitionView {
                    partition,
                    owner: (!owner.is_empty()).then_some((owner, expiry)),
                    token: int(F, token)?,
                    acked: id(F, acked)?,
                })
            }
            other => Err(malformed(F, format!("{other:?}"))),
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Some(GroupView { members, partitions }))
}

#[async_trait]
impl GroupStore for super::source::ValkeySource {
    async fn heartbeat(&self, beat: &Heartbeat<'_>) -> Result<Vec<Lease>, Error> {
        heartbeat(&self.client, beat).await
    }

    async fn ack(&self, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
        ack(&self.client, group, member, acks).await
    }

    async fn leave(&self, group: &str, member: &str) -> Result<(), Error> {
        leave(&self.client, group, member).await
    }

    async fn view(&self, group: &str) -> Result<Option<GroupView>, Error> {
        view(&self.client, group).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_beyond_what_a_double_holds_exactly_are_refused() {
        assert_eq!(stream_id(Position::new(1_700_000_000_000, 3)).expect("fits"), "1700000000000-3");
        let max = EXACT - 1;
        assert_eq!(stream_id(Position::new(max, max).in_lane(7)).expect("fits"), format!("{max}-{max}"));
        for bad in [Position::new(EXACT, 0), Position::new(0, EXACT + 1), Position::with_major(1, 0, 0)] {
            assert!(matches!(stream_id(bad), Err(Error::Validation { .. })), "{bad:?}");
        }
    }
}
