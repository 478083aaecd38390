//! Durable groups on Valkey: the store operations of [`crate::backends::groups`] as calls of
//! the library's `ff_group_*` functions (heartbeat, ack, settle, nack, leave, move, parked,
//! parked_mark, view), each naming one group's keys ([`keys::group`], one slot, so a cluster
//! client routes it to the primary that owns the group). The rules run in Lua beside the data,
//! atomically, with the server's clock.
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
    Ack, GroupStore, GroupView, Heartbeat, Lease, Nack, Nacked, Parked, ParkedMark, PartitionView, Sharing,
    check_heartbeat, check_member,
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

/// One heartbeat (see [`crate::backends::groups`]): the leases the incarnation holds afterwards.
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
    let unacked: serde_json::Map<String, serde_json::Value> =
        beat.unacked.iter().map(|(p, n)| (p.to_string(), serde_json::Value::from(*n))).collect();
    let mut args = vec![
        beat.member.to_owned(),
        beat.incarnation.to_owned(),
        ttl.to_string(),
        sharing.to_owned(),
        u8::from(beat.rejoin).to_string(),
        serde_json::Value::Object(unacked).to_string(),
    ];
    for partition in 0..PARTITION_COUNT {
        args.push(stream_id(beat.start.get(partition))?);
    }
    let reply: Value = fcall(client, F, &keys::group(beat.group), &args).await?;
    let reply = array(F, reply)?;
    if let [word] = reply.as_slice()
        && text(word).as_deref() == Some("superseded")
    {
        return Err(Error::superseded(beat.group, beat.member));
    }
    reply
        .into_iter()
        .map(|lease| match array(F, lease)?.as_slice() {
            [p, token, acked, parked, replays] => Ok(Lease {
                partition: u16::try_from(int(F, p)?).map_err(|e| malformed(F, e))?,
                token: int(F, token)?,
                acked: id(F, acked)?,
                parked: u32::try_from(int(F, parked)?).map_err(|e| malformed(F, e))?,
                replays: u32::try_from(int(F, replays)?).map_err(|e| malformed(F, e))?,
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
    fenced_call(client, "ff_group_ack", group, member, acks).await
}

/// Acknowledges replayed parked events (removes them), all or none ([`Error::Fenced`]).
///
/// # Errors
/// As [`ack`].
pub(super) async fn settle(client: &Client, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
    fenced_call(client, "ff_group_settle", group, member, acks).await
}

/// `F` (`ff_group_ack` or `ff_group_settle`) of `acks`, as `<member> [<partition> <token> <id>]..`.
async fn fenced_call(client: &Client, f: &'static str, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
    check_member(group, member)?;
    let mut args = vec![member.to_owned()];
    for a in acks {
        args.extend([partition_arg(a.partition)?, a.token.to_string(), stream_id(a.position)?]);
    }
    let reply: Value = fcall(client, f, &keys::group(group), &args).await?;
    let reply = array(f, reply)?;
    match reply.as_slice() {
        [ok, ..] if text(ok).as_deref() == Some("ok") => Ok(()),
        [fenced, p] if text(fenced).as_deref() == Some("fenced") => {
            let partition = u16::try_from(int(f, p)?).map_err(|e| malformed(f, e))?;
            Err(Error::fenced(group, member, partition))
        }
        other => Err(malformed(f, format!("{other:?}"))),
    }
}

/// A partition as the library takes it, refused when out of range.
fn partition_arg(partition: u16) -> Result<String, Error> {
    if partition >= PARTITION_COUNT {
        return Err(Error::validation(format!("partition {partition} out of range")));
    }
    Ok(partition.to_string())
}

/// Refuses an event (see [`crate::backends::groups`]).
///
/// # Errors
/// As [`ack`].
pub(super) async fn nack(client: &Client, group: &str, member: &str, nack: &Nack<'_>) -> Result<Nacked, Error> {
    const F: &str = "ff_group_nack";
    check_member(group, member)?;
    let args = [
        member.to_owned(),
        partition_arg(nack.partition)?,
        nack.token.to_string(),
        stream_id(nack.position)?,
        nack.reason.to_owned(),
        nack.park_after.max(1).to_string(),
        nack.event.to_owned(),
        u8::from(nack.replayed).to_string(),
    ];
    let reply: Value = fcall(client, F, &keys::group(group), &args).await?;
    let reply = array(F, reply)?;
    let attempts = |v: &Value| int(F, v).and_then(|n| u32::try_from(n).map_err(|e| malformed(F, e)));
    match reply.as_slice() {
        [word, n] if text(word).as_deref() == Some("retry") => Ok(Nacked::Retry { attempts: attempts(n)? }),
        [word, n] if text(word).as_deref() == Some("parked") => Ok(Nacked::Parked { attempts: attempts(n)? }),
        [word, p] if text(word).as_deref() == Some("fenced") => {
            Err(Error::fenced(group, member, u16::try_from(int(F, p)?).map_err(|e| malformed(F, e))?))
        }
        other => Err(malformed(F, format!("{other:?}"))),
    }
}

/// Sets positions, raising their tokens; refused while a member holds one unless `force`.
///
/// # Errors
/// [`Error::Validation`] for bad names or positions, an unknown group, or a held partition.
pub(super) async fn move_positions(
    client: &Client,
    group: &str,
    moves: &[(u16, Position)],
    force: bool,
) -> Result<(), Error> {
    const F: &str = "ff_group_move";
    check_name("group name", group)?;
    let mut args = vec![u8::from(force).to_string()];
    for (partition, position) in moves {
        args.extend([partition_arg(*partition)?, stream_id(*position)?]);
    }
    let reply: Value = fcall(client, F, &keys::group(group), &args).await?;
    let reply = array(F, reply)?;
    match reply.as_slice() {
        [ok, _] if text(ok).as_deref() == Some("ok") => Ok(()),
        [held, p, owner] if text(held).as_deref() == Some("held") => Err(Error::validation(format!(
            "member {:?} holds partition {} of group {group:?}; stop its members or move with force",
            text(owner).unwrap_or_default(),
            int(F, p)?
        ))),
        other => Err(malformed(F, format!("{other:?}"))),
    }
}

/// The group's parked events, by partition and position.
///
/// # Errors
/// [`Error::Validation`] for a bad name; connection failures as the library's other calls.
pub(super) async fn parked(client: &Client, group: &str) -> Result<Vec<Parked>, Error> {
    const F: &str = "ff_group_parked";
    check_name("group name", group)?;
    let no_args: &[&str] = &[];
    let reply: Value = fcall(client, F, &keys::group(group), no_args).await?;
    let mut parked = array(F, reply)?
        .into_iter()
        .map(|row| match array(F, row)?.as_slice() {
            [p, pos, event, reason, attempts, at, replay] => Ok(Parked {
                partition: u16::try_from(int(F, p)?).map_err(|e| malformed(F, e))?,
                position: id(F, pos)?,
                event: text(event).unwrap_or_default(),
                reason: text(reason).unwrap_or_default(),
                attempts: u32::try_from(int(F, attempts)?).map_err(|e| malformed(F, e))?,
                parked_at: TimestampMs(i64::try_from(int(F, at)?).map_err(|e| malformed(F, e))?),
                replay: int(F, replay)? == 1,
            }),
            other => Err(malformed(F, format!("{other:?}"))),
        })
        .collect::<Result<Vec<_>, Error>>()?;
    parked.sort_by_key(|p| (p.partition, p.position));
    Ok(parked)
}

/// Marks parked events for replay or removes them (every one for `None`).
///
/// # Errors
/// [`Error::Validation`] for a bad name or position; connection failures.
pub(super) async fn mark_parked(
    client: &Client,
    group: &str,
    which: Option<&[(u16, Position)]>,
    mark: ParkedMark,
) -> Result<u64, Error> {
    const F: &str = "ff_group_parked_mark";
    check_name("group name", group)?;
    let mut args = vec![match mark {
        ParkedMark::Replay => "replay".to_owned(),
        ParkedMark::Discard => "discard".to_owned(),
    }];
    for (partition, position) in which.unwrap_or_default() {
        args.extend([partition_arg(*partition)?, stream_id(*position)?]);
    }
    let n: i64 = fcall(client, F, &keys::group(group), &args).await?;
    Ok(n.max(0) as u64)
}

/// Removes a member and frees its partitions.
///
/// # Errors
/// [`Error::Validation`] for bad names; connection failures as the library's other calls.
pub(super) async fn leave(client: &Client, group: &str, member: &str, incarnation: &str) -> Result<(), Error> {
    check_member(group, member)?;
    let _freed: i64 = fcall(client, "ff_group_leave", &keys::group(group), &[member, incarnation]).await?;
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
            [owner, expiry, token, acked, unacked, attempts, reason, parked] => {
                let owner = text(owner).ok_or_else(|| malformed(F, format!("{owner:?}")))?;
                let expiry = TimestampMs(i64::try_from(int(F, expiry)?).map_err(|e| malformed(F, e))?);
                let count = |v: &Value| int(F, v).and_then(|n| u32::try_from(n).map_err(|e| malformed(F, e)));
                Ok(PartitionView {
                    partition,
                    owner: (!owner.is_empty()).then_some((owner, expiry)),
                    token: int(F, token)?,
                    acked: id(F, acked)?,
                    unacked: count(unacked)?,
                    attempts: count(attempts)?,
                    reason: text(reason).filter(|r| !r.is_empty()),
                    parked: count(parked)?,
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

    async fn leave(&self, group: &str, member: &str, incarnation: &str) -> Result<(), Error> {
        leave(&self.client, group, member, incarnation).await
    }

    async fn view(&self, group: &str) -> Result<Option<GroupView>, Error> {
        view(&self.client, group).await
    }

    async fn nack(&self, group: &str, member: &str, refusal: &Nack<'_>) -> Result<Nacked, Error> {
        nack(&self.client, group, member, refusal).await
    }

    async fn settle(&self, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
        settle(&self.client, group, member, acks).await
    }

    async fn move_positions(&self, group: &str, moves: &[(u16, Position)], force: bool) -> Result<(), Error> {
        move_positions(&self.client, group, moves, force).await
    }

    async fn parked(&self, group: &str) -> Result<Vec<Parked>, Error> {
        parked(&self.client, group).await
    }

    async fn mark_parked(
        &self,
        group: &str,
        which: Option<&[(u16, Position)]>,
        mark: ParkedMark,
    ) -> Result<u64, Error> {
        mark_parked(&self.client, group, which, mark).await
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
