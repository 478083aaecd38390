//! The Postgres durable-group store: the SQL functions of `migrations/postgres/0006_durable_groups.sql`
//! and `0009_groups_that_go_on.sql` called by name (heartbeat, ack, leave, nack, settle, move,
//! parked marks; each one statement, atomic on the server, its lock waits bounded), and the
//! view and parked events read with plain SELECTs. [`ack_in`] and [`settle_in`] run inside the
//! caller's own transaction: a fenced ack raises, which aborts that transaction and the effect
//! written in it.

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::PgConnection;
use sqlx::postgres::{PgArguments, PgDatabaseError};
use sqlx::{Postgres, query::Query};

use super::Db;

use crate::backends::groups::{
    Ack, AckConnection, GroupStore, GroupView, Heartbeat, Lease, Nack, Nacked, Parked, ParkedMark, PartitionView,
    Sharing, check_heartbeat, check_member, sealed,
};
use crate::cursor::Position;
use crate::error::Error;
use crate::types::TimestampMs;
use crate::types::check_name;

/// One heartbeat: `(group, member, incarnation, ttl_ms, exclusive, rejoin, start major, hi, lo,
/// unacked partitions, unacked counts)`.
const HEARTBEAT: &str = "\
SELECT o_partition, o_token, o_acked_major, o_acked_hi, o_acked_lo, o_parked, o_replays \
  FROM ff_completion_group_heartbeat($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// Acknowledges replayed parked events: `(group, member, partitions, tokens, majors, his, los, once)`.
const SETTLE: &str = "SELECT ff_completion_group_settle($1, $2, $3, $4, $5, $6, $7, $8)";

/// One nack: `(group, member, partition, token, major, hi, lo, reason, park after, event, replayed)`.
const NACK: &str =
    "SELECT o_attempts, o_parked FROM ff_completion_group_nack($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// Sets positions: `(group, partitions, majors, his, los, force)`.
const MOVE: &str = "SELECT ff_completion_group_move($1, $2, $3, $4, $5, $6)";

/// Marks or removes parked events: `(group, partitions or NULL, majors, his, los, replay)`.
const MARK_PARKED: &str = "SELECT ff_completion_group_parked_mark($1, $2, $3, $4, $5, $6)";

/// A group's parked events.
const PARKED: &str = "\
SELECT partition, major, hi, lo, event, reason, attempts, floor(extract(epoch FROM parked_at) * 1000)::int8, replay \
  FROM ff_completion_group_parked WHERE group_name = $1 ORDER BY partition, major, hi, lo";

/// One atomic ack: `(group, member, partitions, tokens, majors, his, los, once)`.
const ACK: &str = "SELECT ff_completion_group_ack($1, $2, $3, $4, $5, $6, $7, $8)";

/// Removes an incarnation of a member.
const LEAVE: &str = "SELECT ff_completion_group_leave($1, $2, $3)";

/// Whether the group exists.
const VIEW_GROUP: &str = "SELECT EXISTS (SELECT 1 FROM ff_completion_group WHERE group_name = $1)";

/// Live members and their expiry in epoch milliseconds.
const VIEW_MEMBERS: &str = "\
SELECT member, floor(extract(epoch FROM expires_at) * 1000)::int8 FROM ff_completion_group_member \
 WHERE group_name = $1 AND expires_at > clock_timestamp() ORDER BY member";

/// Every partition of the group, with its parked events. A held partition's lease expires with
/// its holder's member row (that incarnation's); one whose member row is gone lapsed (NULL).
const VIEW_PARTITIONS: &str = "\
SELECT p.partition, p.owner, floor(extract(epoch FROM m.expires_at) * 1000)::int8, p.token, p.acked_major, \
       p.acked_hi, p.acked_lo, p.unacked, p.attempts, p.last_reason, \
       (SELECT count(*) FROM ff_completion_group_parked x WHERE x.group_name = p.group_name AND x.partition = p.partition) \
  FROM ff_completion_group_partition p \
  LEFT JOIN ff_completion_group_member m ON m.group_name = p.group_name AND m.member = p.owner \
                                        AND m.incarnation IS NOT DISTINCT FROM p.owner_incarnation \
 WHERE p.group_name = $1 ORDER BY p.partition";

/// The SQLSTATEs the functions raise: fenced, unknown group, malformed call, already
/// acknowledged, superseded by a newer incarnation, held by a member.
const FENCED: &str = "FFG01";
const UNKNOWN_GROUP: &str = "FFG02";
const MALFORMED: &str = "FFG03";
const ALREADY_ACKNOWLEDGED: &str = "FFG04";
const SUPERSEDED: &str = "FFG05";
const HELD: &str = "FFG06";

type LeaseRow = (i16, i64, i64, i64, i64, i32, i32);
type PartitionRow = (i16, Option<String>, Option<i64>, i64, i64, i64, i64, i32, i32, Option<String>, i64);
type ParkedRow = (i16, i64, i64, i64, String, String, i32, i64, bool);

/// A reader position as the group tables keep it: `(batch, txid, event_id)` bigints, compared
/// as the reader orders them.
fn sql_words(p: Position) -> Result<[i64; 3], Error> {
    let word = |w: u64| {
        i64::try_from(w).map_err(|_| Error::validation(format!("position {p:?} does not fit the group store")))
    };
    Ok([word(p.major)?, word(p.hi)?, p.postgres_event_id()])
}

/// The reader position of stored `(batch, txid, event_id)` bigints: past every row of that
/// event id (rows that share one in a transaction are acknowledged together).
fn from_sql_words(major: i64, hi: i64, event_id: i64) -> Position {
    Position::postgres_without_key(major.max(0) as u64, hi.max(0) as u64, event_id)
}

fn lease((partition, token, major, hi, lo, parked, replays): LeaseRow) -> Lease {
    Lease {
        partition: partition.max(0) as u16,
        token: token.max(0) as u64,
        acked: from_sql_words(major, hi, lo),
        parked: parked.max(0) as u32,
        replays: replays.max(0) as u32,
    }
}

/// Positions as the three arrays of SQL words the functions take.
type WordArrays = (Vec<i64>, Vec<i64>, Vec<i64>);

fn word_arrays<'a>(positions: impl Iterator<Item = &'a Position>) -> Result<WordArrays, Error> {
    let (mut majors, mut his, mut los) = (Vec::new(), Vec::new(), Vec::new());
    for p in positions {
        let [major, hi, lo] = sql_words(*p)?;
        majors.push(major);
        his.push(hi);
        los.push(lo);
    }
    Ok((majors, his, los))
}

/// Maps what the group functions raise to the crate's errors: fenced, already-acknowledged
/// and unknown-group codes first ([`Error::from_sqlx`] would call them transport errors), the rest as usual.
fn group_error(op: &'static str, group: &str, member: &str, err: sqlx::Error) -> Error {
    if let sqlx::Error::Database(db) = &err {
        // FFG01 and FFG04 name the partition in their DETAIL.
        let partition = || {
            db.try_downcast_ref::<PgDatabaseError>()
                .and_then(PgDatabaseError::detail)
                .and_then(|d| d.parse::<u16>().ok())
                .unwrap_or_default()
        };
        match db.code().as_deref() {
            Some(FENCED) => return Error::fenced(group, member, partition()),
            Some(ALREADY_ACKNOWLEDGED) => return Error::already_acknowledged(group, partition()),
            Some(UNKNOWN_GROUP) => return Error::validation(format!("unknown durable group {group:?}")),
            Some(MALFORMED) => return Error::validation(db.message().to_owned()),
            Some(SUPERSEDED) => return Error::superseded(group, member),
            Some(HELD) => return Error::validation(format!("{}; stop its members or move with force", db.message())),
            _ => {}
        }
    }
    Error::from_sqlx(op, err)
}

pub(crate) async fn heartbeat(db: &Db, beat: &Heartbeat<'_>) -> Result<Vec<Lease>, Error> {
    let ttl_ms = check_heartbeat(beat)?;
    let [major, hi, lo] = sql_words(beat.start.single())?;
    let (partitions, counts): (Vec<i32>, Vec<i32>) =
        beat.unacked.iter().map(|(p, n)| (i32::from(*p), i32::try_from(*n).unwrap_or(i32::MAX))).unzip();
    let query = db
        .query_as::<LeaseRow>(HEARTBEAT)
        .bind(beat.group.to_owned())
        .bind(beat.member.to_owned())
        .bind(beat.incarnation.to_owned())
        .bind(ttl_ms as i64)
        .bind(beat.sharing == Sharing::Exclusive)
        .bind(beat.rejoin)
        .bind(major)
        .bind(hi)
        .bind(lo)
        .bind(partitions)
        .bind(counts);
    let rows = db
        .run_raw(|conn| Box::pin(query.fetch_all(conn)))
        .await
        .map_err(|e| group_error("postgres group heartbeat", beat.group, beat.member, e))?;
    Ok(rows.into_iter().map(lease).collect())
}

/// Applies `acks` for `member` of `group` on `conn`, inside whatever transaction it has open:
/// all of them, or none and [`Error::Fenced`] (the transaction is then aborted and must
/// roll back, with anything else written in it). With `once` (an ack beside the engine's
/// effect), each ack must move its partition's position up.
///
/// # Errors
/// [`Error::Validation`] for a bad name, a position above `i64::MAX` or an unknown group;
/// [`Error::Fenced`]; with `once`, [`Error::AlreadyAcknowledged`] for a position at
/// or below the stored one; connection errors as usual.
pub(crate) async fn ack_in(
    conn: &mut PgConnection,
    group: &str,
    member: &str,
    acks: &[Ack],
    once: bool,
) -> Result<(), Error> {
    fenced_call(conn, ACK, "postgres group ack", group, member, acks, once).await
}

/// One of the fenced calls (`ACK`, `SETTLE`): `(group, member, partitions, tokens, majors,
/// his, los, once)`, on the caller's connection (prepared once per session).
async fn fenced_call(
    conn: &mut PgConnection,
    sql: &'static str,
    op: &'static str,
    group: &str,
    member: &str,
    acks: &[Ack],
    once: bool,
) -> Result<(), Error> {
    fenced_query(sql, group, member, acks, once, true)?
        .execute(conn)
        .await
        .map_err(|e| group_error(op, group, member, e))?;
    Ok(())
}

/// The statement of a fenced call (see [`fenced_call`]); `named`: prepared once per session.
fn fenced_query(
    sql: &'static str,
    group: &str,
    member: &str,
    acks: &[Ack],
    once: bool,
    named: bool,
) -> Result<Query<'static, Postgres, PgArguments>, Error> {
    check_member(group, member)?;
    let (majors, his, los) = word_arrays(acks.iter().map(|a| &a.position))?;
    let partitions: Vec<i32> = acks.iter().map(|a| i32::from(a.partition)).collect();
    let tokens = acks
        .iter()
        .map(|a| i64::try_from(a.token).map_err(|_| Error::fenced(group, member, a.partition)))
        .collect::<Result<Vec<i64>, Error>>()?;
    Ok(sqlx::query(sql)
        .persistent(named)
        .bind(group.to_owned())
        .bind(member.to_owned())
        .bind(partitions)
        .bind(tokens)
        .bind(majors)
        .bind(his)
        .bind(los)
        .bind(once))
}

/// A fenced call on a connection of the tree's own `db`.
async fn fenced_on(
    db: &Db,
    sql: &'static str,
    op: &'static str,
    group: &str,
    member: &str,
    acks: &[Ack],
) -> Result<(), Error> {
    let query = fenced_query(sql, group, member, acks, false, !db.pooled())?;
    db.run_raw(|conn| Box::pin(query.execute(conn))).await.map_err(|e| group_error(op, group, member, e))?;
    Ok(())
}

/// Acknowledges replayed parked events for `member` of `group` on `conn`, inside whatever
/// transaction it has open: all of them, or none ([`Error::Fenced`]; with `once`,
/// [`Error::AlreadyAcknowledged`] for one no longer parked).
///
/// # Errors
/// As [`ack_in`].
pub(crate) async fn settle_in(
    conn: &mut PgConnection,
    group: &str,
    member: &str,
    acks: &[Ack],
    once: bool,
) -> Result<(), Error> {
    fenced_call(conn, SETTLE, "postgres group settle", group, member, acks, once).await
}

pub(crate) async fn settle(db: &Db, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
    fenced_on(db, SETTLE, "postgres group settle", group, member, acks).await
}

pub(crate) async fn nack(db: &Db, group: &str, member: &str, nack: &Nack<'_>) -> Result<Nacked, Error> {
    check_member(group, member)?;
    let [major, hi, lo] = sql_words(nack.position)?;
    let token = i64::try_from(nack.token).map_err(|_| Error::fenced(group, member, nack.partition))?;
    let query = db
        .query_as::<(i32, bool)>(NACK)
        .bind(group.to_owned())
        .bind(member.to_owned())
        .bind(i32::from(nack.partition))
        .bind(token)
        .bind(major)
        .bind(hi)
        .bind(lo)
        .bind(nack.reason.to_owned())
        .bind(i32::try_from(nack.park_after.max(1)).unwrap_or(i32::MAX))
        .bind(nack.event.to_owned())
        .bind(nack.replayed);
    let (attempts, parked) = db
        .run_raw(|conn| Box::pin(query.fetch_one(conn)))
        .await
        .map_err(|e| group_error("postgres group nack", group, member, e))?;
    let attempts = attempts.max(0) as u32;
    Ok(if parked { Nacked::Parked { attempts } } else { Nacked::Retry { attempts } })
}

pub(crate) async fn move_positions(db: &Db, group: &str, moves: &[(u16, Position)], force: bool) -> Result<(), Error> {
    check_name("group name", group)?;
    let (majors, his, los) = word_arrays(moves.iter().map(|(_, p)| p))?;
    let partitions: Vec<i32> = moves.iter().map(|(p, _)| i32::from(*p)).collect();
    let query = db.query(MOVE).bind(group.to_owned()).bind(partitions).bind(majors).bind(his).bind(los).bind(force);
    db.run_raw(|conn| Box::pin(query.execute(conn)))
        .await
        .map_err(|e| group_error("postgres group move", group, "", e))?;
    Ok(())
}

pub(crate) async fn parked(db: &Db, group: &str) -> Result<Vec<Parked>, Error> {
    check_name("group name", group)?;
    let query = db.query_as::<ParkedRow>(PARKED).bind(group.to_owned());
    let rows = db.run("postgres group parked", |conn| Box::pin(query.fetch_all(conn))).await?;
    Ok(rows
        .into_iter()
        .map(|(partition, major, hi, lo, event, reason, attempts, at, replay)| Parked {
            partition: partition.max(0) as u16,
            position: from_sql_words(major, hi, lo),
            event,
            reason,
            attempts: attempts.max(0) as u32,
            parked_at: TimestampMs(at),
            replay,
        })
        .collect())
}

pub(crate) async fn mark_parked(
    db: &Db,
    group: &str,
    which: Option<&[(u16, Position)]>,
    mark: ParkedMark,
) -> Result<u64, Error> {
    check_name("group name", group)?;
    let (partitions, words) = match which {
        Some(which) => (
            Some(which.iter().map(|(p, _)| i32::from(*p)).collect::<Vec<i32>>()),
            word_arrays(which.iter().map(|(_, p)| p))?,
        ),
        None => (None, (Vec::new(), Vec::new(), Vec::new())),
    };
    let (majors, his, los) = words;
    let query = db
        .query_scalar::<i64>(MARK_PARKED)
        .bind(group.to_owned())
        .bind(partitions)
        .bind(majors)
        .bind(his)
        .bind(los)
        .bind(mark == ParkedMark::Replay);
    let n = db
        .run_raw(|conn| Box::pin(query.fetch_one(conn)))
        .await
        .map_err(|e| group_error("postgres group parked", group, "", e))?;
    Ok(n.max(0) as u64)
}

pub(crate) async fn ack(db: &Db, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
    fenced_on(db, ACK, "postgres group ack", group, member, acks).await
}

pub(crate) async fn leave(db: &Db, group: &str, member: &str, incarnation: &str) -> Result<(), Error> {
    check_member(group, member)?;
    let query = db.query(LEAVE).bind(group.to_owned()).bind(member.to_owned()).bind(incarnation.to_owned());
    db.run_raw(|conn| Box::pin(query.execute(conn)))
        .await
        .map_err(|e| group_error("postgres group leave", group, member, e))?;
    Ok(())
}

pub(crate) async fn view(db: &Db, group: &str) -> Result<Option<GroupView>, Error> {
    check_name("group name", group)?;
    let exists = db.query_scalar::<bool>(VIEW_GROUP).bind(group.to_owned());
    let members = db.query_as::<(String, i64)>(VIEW_MEMBERS).bind(group.to_owned());
    let partitions = db.query_as::<PartitionRow>(VIEW_PARTITIONS).bind(group.to_owned());
    // One snapshot for the three reads.
    let read = db
        .transaction("postgres group view", "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", |conn| {
            Box::pin(async move {
                if !exists.fetch_one(&mut *conn).await? {
                    return Ok(None);
                }
                let members = members.fetch_all(&mut *conn).await?;
                Ok(Some((members, partitions.fetch_all(conn).await?)))
            })
        })
        .await?;
    let Some((members, partitions)) = read else { return Ok(None) };
    Ok(Some(GroupView {
        members: members.into_iter().map(|(m, at)| (m, TimestampMs(at))).collect(),
        partitions: partitions
            .into_iter()
            .map(|(partition, owner, expires, token, major, hi, lo, unacked, attempts, reason, parked)| PartitionView {
                partition: partition.max(0) as u16,
                owner: owner.map(|o| (o, TimestampMs(expires.unwrap_or_default()))),
                token: token.max(0) as u64,
                acked: from_sql_words(major, hi, lo),
                unacked: unacked.max(0) as u32,
                attempts: attempts.max(0) as u32,
                reason,
                parked: parked.clamp(0, i64::from(u32::MAX)) as u32,
            })
            .collect(),
    }))
}

#[async_trait]
impl GroupStore for super::source::PostgresSource {
    async fn heartbeat(&self, beat: &Heartbeat<'_>) -> Result<Vec<Lease>, Error> {
        heartbeat(&self.db, beat).await
    }

    async fn ack(&self, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
        ack(&self.db, group, member, acks).await
    }

    async fn leave(&self, group: &str, member: &str, incarnation: &str) -> Result<(), Error> {
        leave(&self.db, group, member, incarnation).await
    }

    async fn view(&self, group: &str) -> Result<Option<GroupView>, Error> {
        view(&self.db, group).await
    }

    async fn nack(&self, group: &str, member: &str, refusal: &Nack<'_>) -> Result<Nacked, Error> {
        nack(&self.db, group, member, refusal).await
    }

    async fn settle(&self, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
        settle(&self.db, group, member, acks).await
    }

    async fn move_positions(&self, group: &str, moves: &[(u16, Position)], force: bool) -> Result<(), Error> {
        move_positions(&self.db, group, moves, force).await
    }

    async fn parked(&self, group: &str) -> Result<Vec<Parked>, Error> {
        parked(&self.db, group).await
    }

    async fn mark_parked(
        &self,
        group: &str,
        which: Option<&[(u16, Position)]>,
        mark: ParkedMark,
    ) -> Result<u64, Error> {
        mark_parked(&self.db, group, which, mark).await
    }
}

impl sealed::Sealed for PgConnection {}

impl AckConnection for PgConnection {
    fn ack_in<'a>(
        &'a mut self,
        group: &'a str,
        member: &'a str,
        acks: &'a [Ack],
        once: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(ack_in(self, group, member, acks, once))
    }

    fn settle_in<'a>(
        &'a mut self,
        group: &'a str,
        member: &'a str,
        acks: &'a [Ack],
        once: bool,
    ) -> BoxFuture<'a, Result<(), Error>> {
        Box::pin(settle_in(self, group, member, acks, once))
    }
}
