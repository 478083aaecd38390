//! The Postgres durable-group store: the SQL functions of `migrations/postgres/0006_durable_groups.sql`
//! called by name (heartbeat, ack, leave; each one statement, atomic on the server), and the
//! view read with plain SELECTs in one snapshot. [`ack_in`] runs an ack inside the caller's own
//! transaction: a fenced ack raises, which aborts that transaction and the effect written in it.

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::PgConnection;
use sqlx::postgres::PgDatabaseError;

use super::Db;

use crate::backends::groups::{
    Ack, AckConnection, GroupStore, GroupView, Heartbeat, Lease, PartitionView, Sharing, check_heartbeat, check_member,
    sealed,
};
use crate::cursor::Position;
use crate::error::Error;
use crate::types::TimestampMs;
use crate::types::check_name;

/// One heartbeat: `(group, member, ttl_ms, exclusive, rejoin, start major, hi, lo)`.
const HEARTBEAT: &str = "\
SELECT o_partition, o_token, o_acked_major, o_acked_hi, o_acked_lo \
  FROM ff_completion_group_heartbeat($1, $2, $3, $4, $5, $6, $7, $8)";

/// One atomic ack: `(group, member, partitions, tokens, majors, his, los, once)`.
const ACK: &str = "SELECT ff_completion_group_ack($1, $2, $3, $4, $5, $6, $7, $8)";

/// Removes a member.
const LEAVE: &str = "SELECT ff_completion_group_leave($1, $2)";

/// Whether the group exists.
const VIEW_GROUP: &str = "SELECT EXISTS (SELECT 1 FROM ff_completion_group WHERE group_name = $1)";

/// Live members and their expiry in epoch milliseconds.
const VIEW_MEMBERS: &str = "\
SELECT member, floor(extract(epoch FROM expires_at) * 1000)::int8 FROM ff_completion_group_member \
 WHERE group_name = $1 AND expires_at > clock_timestamp() ORDER BY member";

/// Every partition of the group.
const VIEW_PARTITIONS: &str = "\
SELECT partition, owner, floor(extract(epoch FROM expires_at) * 1000)::int8, token, acked_major, acked_hi, acked_lo \
  FROM ff_completion_group_partition WHERE group_name = $1 ORDER BY partition";

/// The SQLSTATEs the functions raise: fenced, unknown group, malformed call.
const FENCED: &str = "FFG01";
const UNKNOWN_GROUP: &str = "FFG02";
const MALFORMED: &str = "FFG03";
const ALREADY_ACKNOWLEDGED: &str = "FFG04";

type LeaseRow = (i16, i64, i64, i64, i64);
type PartitionRow = (i16, Option<String>, Option<i64>, i64, i64, i64, i64);

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

fn lease((partition, token, major, hi, lo): LeaseRow) -> Lease {
    Lease { partition: partition.max(0) as u16, token: token.max(0) as u64, acked: from_sql_words(major, hi, lo) }
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
            _ => {}
        }
    }
    Error::from_sqlx(op, err)
}

pub(crate) async fn heartbeat(db: &Db, beat: &Heartbeat<'_>) -> Result<Vec<Lease>, Error> {
    let ttl_ms = check_heartbeat(beat)?;
    let [major, hi, lo] = sql_words(beat.start.single())?;
    let query = db
        .query_as::<LeaseRow>(HEARTBEAT)
        .bind(beat.group.to_owned())
        .bind(beat.member.to_owned())
        .bind(ttl_ms as i64)
        .bind(beat.sharing == Sharing::Exclusive)
        .bind(beat.rejoin)
        .bind(major)
        .bind(hi)
        .bind(lo);
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
    ack_query(group, member, acks, once, true)?
        .execute(conn)
        .await
        .map_err(|e| group_error("postgres group ack", group, member, e))?;
    Ok(())
}

/// The statement of an ack (see [`ack_in`]); `named`: prepared once per session.
fn ack_query(
    group: &str,
    member: &str,
    acks: &[Ack],
    once: bool,
    named: bool,
) -> Result<sqlx::query::Query<'static, sqlx::Postgres, sqlx::postgres::PgArguments>, Error> {
    check_member(group, member)?;
    let n = acks.len();
    let (mut partitions, mut tokens) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut majors, mut his, mut los) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    for ack in acks {
        let [major, hi, lo] = sql_words(ack.position)?;
        let token = i64::try_from(ack.token).map_err(|_| Error::fenced(group, member, ack.partition))?;
        partitions.push(i32::from(ack.partition));
        tokens.push(token);
        majors.push(major);
        his.push(hi);
        los.push(lo);
    }
    Ok(sqlx::query(ACK)
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

pub(crate) async fn ack(db: &Db, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
    let query = ack_query(group, member, acks, false, !db.pooled())?;
    db.run_raw(|conn| Box::pin(query.execute(conn)))
        .await
        .map_err(|e| group_error("postgres group ack", group, member, e))?;
    Ok(())
}

pub(crate) async fn leave(db: &Db, group: &str, member: &str) -> Result<(), Error> {
    check_member(group, member)?;
    let query = db.query(LEAVE).bind(group.to_owned()).bind(member.to_owned());
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
            .map(|(partition, owner, expires, token, major, hi, lo)| PartitionView {
                partition: partition.max(0) as u16,
                owner: owner.map(|o| (o, TimestampMs(expires.unwrap_or_default()))),
                token: token.max(0) as u64,
                acked: from_sql_words(major, hi, lo),
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

    async fn leave(&self, group: &str, member: &str) -> Result<(), Error> {
        leave(&self.db, group, member).await
    }

    async fn view(&self, group: &str) -> Result<Option<GroupView>, Error> {
        view(&self.db, group).await
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
}
