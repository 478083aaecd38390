//! The SQLite durable-group store (`migrations/sqlite/0003_durable_groups.sql`,
//! `0004_groups_that_go_on.sql`): SQLite has no stored functions, so each operation keeps the
//! store's rules in one `BEGIN IMMEDIATE` transaction (the database's one writer, so each is
//! serialized against every other), with SQLite's clock read once after the transaction began,
//! in epoch milliseconds. [`ack_in`] and [`settle_in`] run inside the caller's own write
//! transaction. There are no row locks to skip: a consumer's open write transaction holds the
//! whole database, and every other writer (heartbeats included) waits for it, up to the pool's
//! busy timeout, after which the heartbeat fails and is retried.

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::SqliteConnection;
use sqlx::sqlite::SqlitePool;

use super::write_queue;
use crate::backends::groups::{
    Ack, AckConnection, GroupStore, GroupView, Heartbeat, Lease, Nack, Nacked, Parked, ParkedMark, PartitionView,
    Sharing, check_heartbeat, check_member, fair_share, from_sql_words, sealed, sql_words,
};
use crate::cursor::Position;
use crate::error::Error;
use crate::types::check_name;
use crate::types::{PARTITION_COUNT, TimestampMs};

/// SQLite's clock in epoch milliseconds (the form the outbox's triggers use).
const NOW_MS: &str = "SELECT CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)";

/// Creates the group; its partitions follow when a row was inserted.
const CREATE_GROUP: &str =
    "INSERT INTO ff_completion_group (group_name, created_at_ms) VALUES (?1, ?2) ON CONFLICT DO NOTHING";

/// Every partition of a new group: free, token 0, acknowledged at the start position.
const CREATE_PARTITIONS: &str = "\
WITH RECURSIVE p(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM p WHERE n + 1 < ?2) \
INSERT INTO ff_completion_group_partition (group_name, partition, acked_major, acked_hi, acked_lo) \
SELECT ?1, n, ?3, ?4, ?5 FROM p";

/// The incarnation that holds a member id.
const MEMBER_INCARNATION: &str =
    "SELECT incarnation FROM ff_completion_group_member WHERE group_name = ?1 AND member = ?2";

/// Joins or renews incarnation `?4` of the member until `?3`.
const UPSERT_MEMBER: &str = "\
INSERT INTO ff_completion_group_member (group_name, member, expires_at_ms, incarnation) VALUES (?1, ?2, ?3, ?4) \
ON CONFLICT (group_name, member) DO UPDATE SET expires_at_ms = excluded.expires_at_ms, incarnation = excluded.incarnation";

/// Removes the members lapsed at `?2`.
const REMOVE_LAPSED: &str = "DELETE FROM ff_completion_group_member WHERE group_name = ?1 AND expires_at_ms <= ?2";

/// Renews the member's leases until `?3` for incarnation `?5`, raising the token of those of
/// another incarnation (every one on a rejoin, `?4` = 1), and records the unacknowledged counts
/// of `?6` (a JSON object partition -> count).
const RENEW: &str = "\
UPDATE ff_completion_group_partition \
   SET expires_at_ms = ?3, \
       token = token + CASE WHEN ?4 = 1 OR owner_incarnation IS NOT ?5 THEN 1 ELSE 0 END, \
       unacked = CASE WHEN ?4 = 1 OR owner_incarnation IS NOT ?5 THEN 0 \
                      ELSE coalesce((SELECT j.value FROM json_each(?6) j WHERE j.key = CAST(partition AS TEXT)), 0) END, \
       owner_incarnation = ?5 \
 WHERE group_name = ?1 AND owner = ?2";

/// Partitions the member id holds.
const HELD_COUNT: &str = "SELECT count(*) FROM ff_completion_group_partition WHERE group_name = ?1 AND owner = ?2";

/// Live members at `?2`.
const LIVE: &str = "SELECT count(*) FROM ff_completion_group_member WHERE group_name = ?1 AND expires_at_ms > ?2";

/// Frees the member's `?3` highest partitions.
const FREE_HIGHEST: &str = "\
UPDATE ff_completion_group_partition SET owner = NULL, expires_at_ms = NULL, owner_incarnation = NULL, unacked = 0 \
 WHERE group_name = ?1 AND partition IN (SELECT partition FROM ff_completion_group_partition \
                                          WHERE group_name = ?1 AND owner = ?2 ORDER BY partition DESC LIMIT ?3)";

/// Takes up to `?5` free or lapsed (at `?3`) partitions, ascending, each with token + 1, until
/// `?4`, for incarnation `?6`.
const TAKE: &str = "\
UPDATE ff_completion_group_partition \
   SET owner = ?2, expires_at_ms = ?4, token = token + 1, owner_incarnation = ?6, unacked = 0 \
 WHERE group_name = ?1 AND partition IN (SELECT partition FROM ff_completion_group_partition \
                                          WHERE group_name = ?1 \
                                            AND (owner IS NULL OR (owner <> ?2 AND expires_at_ms <= ?3)) \
                                          ORDER BY partition LIMIT ?5)";

/// The incarnation's leases, ascending, with their parked events and those to replay.
const HELD: &str = "\
SELECT p.partition, p.token, p.acked_major, p.acked_hi, p.acked_lo, \
       (SELECT count(*) FROM ff_completion_group_parked x WHERE x.group_name = p.group_name AND x.partition = p.partition), \
       (SELECT count(*) FROM ff_completion_group_parked x \
         WHERE x.group_name = p.group_name AND x.partition = p.partition AND x.replay = 1) \
  FROM ff_completion_group_partition p WHERE p.group_name = ?1 AND p.owner = ?2 AND p.owner_incarnation = ?3 \
 ORDER BY p.partition";

/// Whether the group exists.
const GROUP_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM ff_completion_group WHERE group_name = ?1)";

/// A partition's holder, token and acknowledged position.
const HOLDER: &str = "\
SELECT owner, token, acked_major, acked_hi, acked_lo FROM ff_completion_group_partition \
 WHERE group_name = ?1 AND partition = ?2";

/// Moves a partition's acknowledged position up to `(?3, ?4, ?5)`, never down.
const ACK: &str = "\
UPDATE ff_completion_group_partition SET acked_major = ?3, acked_hi = ?4, acked_lo = ?5 \
 WHERE group_name = ?1 AND partition = ?2 AND (?3, ?4, ?5) > (acked_major, acked_hi, acked_lo)";

/// Removes incarnation `?3` of a member.
const REMOVE_MEMBER: &str =
    "DELETE FROM ff_completion_group_member WHERE group_name = ?1 AND member = ?2 AND incarnation IS ?3";

/// Frees the partitions incarnation `?3` of a member holds (tokens unchanged).
const FREE_ALL: &str = "\
UPDATE ff_completion_group_partition SET owner = NULL, expires_at_ms = NULL, owner_incarnation = NULL, unacked = 0 \
 WHERE group_name = ?1 AND owner = ?2 AND owner_incarnation IS ?3";

/// A partition's refused event and its attempts.
const RETRY: &str = "\
SELECT retry_major, retry_hi, retry_lo, attempts FROM ff_completion_group_partition \
 WHERE group_name = ?1 AND partition = ?2";

/// Records a refusal: `(group, partition, major, hi, lo, attempts, reason)`.
const SET_RETRY: &str = "\
UPDATE ff_completion_group_partition SET retry_major = ?3, retry_hi = ?4, retry_lo = ?5, attempts = ?6, last_reason = ?7 \
 WHERE group_name = ?1 AND partition = ?2";

/// Parks an event: `(group, partition, major, hi, lo, event, reason, attempts, now)`.
const PARK: &str = "\
INSERT INTO ff_completion_group_parked (group_name, partition, major, hi, lo, event, reason, attempts, parked_at_ms) \
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
ON CONFLICT (group_name, partition, major, hi, lo) \
DO UPDATE SET attempts = excluded.attempts, reason = excluded.reason, replay = 0";

/// One more refusal of a replayed parked event, which stays parked.
const REFUSE_PARKED: &str = "\
UPDATE ff_completion_group_parked SET attempts = attempts + 1, reason = ?6, replay = 0 \
 WHERE group_name = ?1 AND partition = ?2 AND major = ?3 AND hi = ?4 AND lo = ?5 RETURNING attempts";

/// Removes a parked event.
const UNPARK: &str = "\
DELETE FROM ff_completion_group_parked WHERE group_name = ?1 AND partition = ?2 AND major = ?3 AND hi = ?4 AND lo = ?5";

/// A member holds a partition with an unexpired lease at `?3`: the first such of `?2` (a JSON
/// array of partitions), with its holder.
const HELD_AMONG: &str = "\
SELECT partition, owner FROM ff_completion_group_partition \
 WHERE group_name = ?1 AND partition IN (SELECT value FROM json_each(?2)) AND owner IS NOT NULL AND expires_at_ms > ?3 \
 ORDER BY partition LIMIT 1";

/// Sets a partition's position, raising its token: `(group, partition, major, hi, lo)`.
const MOVE: &str = "\
UPDATE ff_completion_group_partition \
   SET acked_major = ?3, acked_hi = ?4, acked_lo = ?5, token = token + 1, \
       retry_major = NULL, retry_hi = NULL, retry_lo = NULL, attempts = 0 \
 WHERE group_name = ?1 AND partition = ?2";

/// A group's parked events.
const PARKED: &str = "\
SELECT partition, major, hi, lo, event, reason, attempts, parked_at_ms, replay FROM ff_completion_group_parked \
 WHERE group_name = ?1 ORDER BY partition, major, hi, lo";

/// Marks every parked event of a group for replay.
const REPLAY_ALL: &str = "UPDATE ff_completion_group_parked SET replay = 1 WHERE group_name = ?1";

/// Removes every parked event of a group.
const DISCARD_ALL: &str = "DELETE FROM ff_completion_group_parked WHERE group_name = ?1";

/// Marks one parked event for replay.
const REPLAY_ONE: &str = "\
UPDATE ff_completion_group_parked SET replay = 1 WHERE group_name = ?1 AND partition = ?2 AND major = ?3 AND hi = ?4 AND lo = ?5";

/// Live members at `?2`.
const VIEW_MEMBERS: &str = "\
SELECT member, expires_at_ms FROM ff_completion_group_member WHERE group_name = ?1 AND expires_at_ms > ?2 \
 ORDER BY member";

/// Every partition of the group, with its parked events.
const VIEW_PARTITIONS: &str = "\
SELECT p.partition, p.owner, p.expires_at_ms, p.token, p.acked_major, p.acked_hi, p.acked_lo, p.unacked, p.attempts, \
       p.last_reason, \
       (SELECT count(*) FROM ff_completion_group_parked x WHERE x.group_name = p.group_name AND x.partition = p.partition) \
  FROM ff_completion_group_partition p WHERE p.group_name = ?1 ORDER BY p.partition";

type LeaseRow = (i64, i64, i64, i64, i64, i64, i64);
/// A partition's owner, token and acknowledged position words.
type HolderRow = (Option<String>, i64, i64, i64, i64);
type PartitionRow = (i64, Option<String>, Option<i64>, i64, i64, i64, i64, i64, i64, Option<String>, i64);
type ParkedRow = (i64, i64, i64, i64, String, String, i64, i64, bool);

fn sql_err(op: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |e| Error::from_sqlx(op, e)
}

async fn now_ms(conn: &mut SqliteConnection, op: &'static str) -> Result<i64, Error> {
    sqlx::query_scalar(NOW_MS).fetch_one(conn).await.map_err(sql_err(op))
}

/// A write transaction once this process's earlier writers are done (as the engine's).
async fn write(
    pool: &SqlitePool,
    key: &str,
    op: &'static str,
) -> Result<(sqlx::Transaction<'static, sqlx::Sqlite>, tokio::sync::OwnedMutexGuard<()>), Error> {
    let turn = write_queue(key).turn(false).await;
    let tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(sql_err(op))?;
    Ok((tx, turn))
}

pub(crate) async fn heartbeat(pool: &SqlitePool, key: &str, beat: &Heartbeat<'_>) -> Result<Vec<Lease>, Error> {
    let op = "sqlite group heartbeat";
    let ttl_ms = check_heartbeat(beat)? as i64;
    let [major, hi, lo] = sql_words(beat.start.single())?;
    let (group, member) = (beat.group, beat.member);
    let (mut tx, _turn) = write(pool, key, op).await?;
    let now = now_ms(&mut tx, op).await?;
    let until = now.saturating_add(ttl_ms);
    let created = sqlx::query(CREATE_GROUP).bind(group).bind(now).execute(&mut *tx).await.map_err(sql_err(op))?;
    if created.rows_affected() == 1 {
        sqlx::query(CREATE_PARTITIONS)
            .bind(group)
            .bind(i64::from(PARTITION_COUNT))
            .bind(major)
            .bind(hi)
            .bind(lo)
            .execute(&mut *tx)
            .await
            .map_err(sql_err(op))?;
    }
    sqlx::query(REMOVE_LAPSED).bind(group).bind(now).execute(&mut *tx).await.map_err(sql_err(op))?;
    let live: Option<Option<String>> = sqlx::query_scalar(MEMBER_INCARNATION)
        .bind(group)
        .bind(member)
        .fetch_optional(&mut *tx)
        .await
        .map_err(sql_err(op))?;
    if let Some(live) = live
        && !beat.rejoin
        && live.as_deref() != Some(beat.incarnation)
    {
        return Err(Error::superseded(group, member));
    }
    sqlx::query(UPSERT_MEMBER)
        .bind(group)
        .bind(member)
        .bind(until)
        .bind(beat.incarnation)
        .execute(&mut *tx)
        .await
        .map_err(sql_err(op))?;
    let unacked: serde_json::Map<String, serde_json::Value> =
        beat.unacked.iter().map(|(p, n)| (p.to_string(), serde_json::Value::from(*n))).collect();
    sqlx::query(RENEW)
        .bind(group)
        .bind(member)
        .bind(until)
        .bind(i64::from(beat.rejoin))
        .bind(beat.incarnation)
        .bind(serde_json::Value::Object(unacked).to_string())
        .execute(&mut *tx)
        .await
        .map_err(sql_err(op))?;
    let held: i64 =
        sqlx::query_scalar(HELD_COUNT).bind(group).bind(member).fetch_one(&mut *tx).await.map_err(sql_err(op))?;
    let held = held.max(0) as usize;
    let share = match beat.sharing {
        Sharing::Exclusive => usize::from(PARTITION_COUNT),
        Sharing::Shared => {
            let live: i64 =
                sqlx::query_scalar(LIVE).bind(group).bind(now).fetch_one(&mut *tx).await.map_err(sql_err(op))?;
            fair_share(live.max(1) as usize)
        }
    };
    if held > share {
        let extra = (held - share) as i64;
        sqlx::query(FREE_HIGHEST).bind(group).bind(member).bind(extra).execute(&mut *tx).await.map_err(sql_err(op))?;
    } else if held < share {
        sqlx::query(TAKE)
            .bind(group)
            .bind(member)
            .bind(now)
            .bind(until)
            .bind((share - held) as i64)
            .bind(beat.incarnation)
            .execute(&mut *tx)
            .await
            .map_err(sql_err(op))?;
    }
    let rows: Vec<LeaseRow> = sqlx::query_as(HELD)
        .bind(group)
        .bind(member)
        .bind(beat.incarnation)
        .fetch_all(&mut *tx)
        .await
        .map_err(sql_err(op))?;
    tx.commit().await.map_err(sql_err(op))?;
    Ok(rows
        .into_iter()
        .map(|(partition, token, major, hi, lo, parked, replays)| Lease {
            partition: partition.clamp(0, i64::from(u16::MAX)) as u16,
            token: token.max(0) as u64,
            acked: from_sql_words(major, hi, lo),
            parked: parked.clamp(0, i64::from(u32::MAX)) as u32,
            replays: replays.clamp(0, i64::from(u32::MAX)) as u32,
        })
        .collect())
}

/// Applies `acks` for `member` of `group` inside the caller's write transaction on `conn`:
/// every ack is checked before any is written, so a fenced call writes nothing (the caller rolls
/// back whatever else it wrote). With `once` (an ack beside the engine's effect), each ack
/// must move its partition's position up.
///
/// # Errors
/// [`Error::Validation`] for a bad name, a position above `i64::MAX` or an unknown group;
/// [`Error::Fenced`] when `member` does not hold one of the partitions with the ack's
/// token (a lapsed lease nobody took yet still counts); with `once`, [`Error::AlreadyAcknowledged`] for a
/// position at or below the stored one.
pub(crate) async fn ack_in(
    conn: &mut SqliteConnection,
    group: &str,
    member: &str,
    acks: &[Ack],
    once: bool,
) -> Result<(), Error> {
    let op = "sqlite group ack";
    let words = acks.iter().map(|a| sql_words(a.position)).collect::<Result<Vec<_>, _>>()?;
    for (ack, acked) in acks.iter().zip(check_held(conn, op, group, member, acks).await?) {
        if once && ack.position <= acked {
            return Err(Error::already_acknowledged(group, ack.partition));
        }
    }
    for (ack, [major, hi, lo]) in acks.iter().zip(words) {
        sqlx::query(ACK)
            .bind(group)
            .bind(i64::from(ack.partition))
            .bind(major)
            .bind(hi)
            .bind(lo)
            .execute(&mut *conn)
            .await
            .map_err(sql_err(op))?;
    }
    Ok(())
}

/// Checks that `member` holds each ack's partition with its token (a lapsed lease nobody took
/// yet still counts) in an existing group; returns each partition's acknowledged position.
async fn check_held(
    conn: &mut SqliteConnection,
    op: &'static str,
    group: &str,
    member: &str,
    acks: &[Ack],
) -> Result<Vec<Position>, Error> {
    check_member(group, member)?;
    let exists: bool = sqlx::query_scalar(GROUP_EXISTS).bind(group).fetch_one(&mut *conn).await.map_err(sql_err(op))?;
    if !exists {
        return Err(Error::validation(format!("unknown durable group {group:?}")));
    }
    let mut acked = Vec::with_capacity(acks.len());
    for ack in acks {
        let holder: Option<HolderRow> = sqlx::query_as(HOLDER)
            .bind(group)
            .bind(i64::from(ack.partition))
            .fetch_optional(&mut *conn)
            .await
            .map_err(sql_err(op))?;
        let Some((owner, token, major, hi, lo)) = holder else {
            return Err(Error::fenced(group, member, ack.partition));
        };
        let holds = owner.as_deref() == Some(member) && u64::try_from(token).is_ok_and(|t| t == ack.token);
        if !holds {
            return Err(Error::fenced(group, member, ack.partition));
        }
        acked.push(from_sql_words(major, hi, lo));
    }
    Ok(acked)
}

/// Acknowledges replayed parked events inside the caller's write transaction on `conn`: every
/// ack is checked first (fenced as [`ack_in`]; with `once`, each must still be parked), then
/// each event is removed from the parked ones.
///
/// # Errors
/// As [`ack_in`].
pub(crate) async fn settle_in(
    conn: &mut SqliteConnection,
    group: &str,
    member: &str,
    acks: &[Ack],
    once: bool,
) -> Result<(), Error> {
    let op = "sqlite group settle";
    let words = acks.iter().map(|a| sql_words(a.position)).collect::<Result<Vec<_>, _>>()?;
    check_held(conn, op, group, member, acks).await?;
    let mut removed = Vec::with_capacity(acks.len());
    for (ack, [major, hi, lo]) in acks.iter().zip(words) {
        let done = sqlx::query(UNPARK)
            .bind(group)
            .bind(i64::from(ack.partition))
            .bind(major)
            .bind(hi)
            .bind(lo)
            .execute(&mut *conn)
            .await
            .map_err(sql_err(op))?;
        removed.push((ack.partition, done.rows_affected()));
    }
    // Checked after the deletes (the caller's transaction rolls them back on the error).
    if once && let Some((partition, _)) = removed.iter().find(|(_, n)| *n == 0) {
        return Err(Error::already_acknowledged(group, *partition));
    }
    Ok(())
}

pub(crate) async fn settle(pool: &SqlitePool, key: &str, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
    check_member(group, member)?;
    let (mut tx, _turn) = write(pool, key, "sqlite group settle").await?;
    settle_in(&mut tx, group, member, acks, false).await?;
    tx.commit().await.map_err(sql_err("sqlite group settle"))
}

pub(crate) async fn nack(
    pool: &SqlitePool,
    key: &str,
    group: &str,
    member: &str,
    nack: &Nack<'_>,
) -> Result<Nacked, Error> {
    let op = "sqlite group nack";
    let [major, hi, lo] = sql_words(nack.position)?;
    let (mut tx, _turn) = write(pool, key, op).await?;
    let probe = Ack { partition: nack.partition, token: nack.token, position: nack.position };
    check_held(&mut tx, op, group, member, &[probe]).await?;
    let partition = i64::from(nack.partition);
    let outcome = if nack.replayed {
        let attempts: Option<i64> = sqlx::query_scalar(REFUSE_PARKED)
            .bind(group)
            .bind(partition)
            .bind(major)
            .bind(hi)
            .bind(lo)
            .bind(nack.reason)
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql_err(op))?;
        Nacked::Parked { attempts: attempts.unwrap_or_default().max(0) as u32 }
    } else {
        let (r_major, r_hi, r_lo, attempts): (Option<i64>, Option<i64>, Option<i64>, i64) =
            sqlx::query_as(RETRY).bind(group).bind(partition).fetch_one(&mut *tx).await.map_err(sql_err(op))?;
        let attempts = if (r_major, r_hi, r_lo) == (Some(major), Some(hi), Some(lo)) { attempts.max(0) + 1 } else { 1 };
        let now = now_ms(&mut tx, op).await?;
        if attempts >= i64::from(nack.park_after.max(1)) {
            sqlx::query(PARK)
                .bind(group)
                .bind(partition)
                .bind(major)
                .bind(hi)
                .bind(lo)
                .bind(nack.event)
                .bind(nack.reason)
                .bind(attempts)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(sql_err(op))?;
            sqlx::query(ACK)
                .bind(group)
                .bind(partition)
                .bind(major)
                .bind(hi)
                .bind(lo)
                .execute(&mut *tx)
                .await
                .map_err(sql_err(op))?;
            let no_retry: Option<i64> = None;
            sqlx::query(SET_RETRY)
                .bind(group)
                .bind(partition)
                .bind(no_retry)
                .bind(no_retry)
                .bind(no_retry)
                .bind(0i64)
                .bind(nack.reason)
                .execute(&mut *tx)
                .await
                .map_err(sql_err(op))?;
            Nacked::Parked { attempts: attempts as u32 }
        } else {
            sqlx::query(SET_RETRY)
                .bind(group)
                .bind(partition)
                .bind(major)
                .bind(hi)
                .bind(lo)
                .bind(attempts)
                .bind(nack.reason)
                .execute(&mut *tx)
                .await
                .map_err(sql_err(op))?;
            Nacked::Retry { attempts: attempts as u32 }
        }
    };
    tx.commit().await.map_err(sql_err(op))?;
    Ok(outcome)
}

pub(crate) async fn move_positions(
    pool: &SqlitePool,
    key: &str,
    group: &str,
    moves: &[(u16, Position)],
    force: bool,
) -> Result<(), Error> {
    let op = "sqlite group move";
    check_name("group name", group)?;
    let words = moves.iter().map(|(_, p)| sql_words(*p)).collect::<Result<Vec<_>, _>>()?;
    let (mut tx, _turn) = write(pool, key, op).await?;
    let exists: bool = sqlx::query_scalar(GROUP_EXISTS).bind(group).fetch_one(&mut *tx).await.map_err(sql_err(op))?;
    if !exists {
        return Err(Error::validation(format!("unknown durable group {group:?}")));
    }
    if !force {
        let now = now_ms(&mut tx, op).await?;
        let partitions = serde_json::Value::from(moves.iter().map(|(p, _)| *p).collect::<Vec<u16>>()).to_string();
        let held: Option<(i64, String)> = sqlx::query_as(HELD_AMONG)
            .bind(group)
            .bind(partitions)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await
            .map_err(sql_err(op))?;
        if let Some((partition, owner)) = held {
            return Err(Error::validation(format!(
                "member {owner:?} holds partition {partition} of group {group:?}; stop its members or move with force"
            )));
        }
    }
    for ((partition, _), [major, hi, lo]) in moves.iter().zip(words) {
        sqlx::query(MOVE)
            .bind(group)
            .bind(i64::from(*partition))
            .bind(major)
            .bind(hi)
            .bind(lo)
            .execute(&mut *tx)
            .await
            .map_err(sql_err(op))?;
    }
    tx.commit().await.map_err(sql_err(op))
}

pub(crate) async fn parked(pool: &SqlitePool, group: &str) -> Result<Vec<Parked>, Error> {
    check_name("group name", group)?;
    let rows: Vec<ParkedRow> =
        sqlx::query_as(PARKED).bind(group).fetch_all(pool).await.map_err(sql_err("sqlite group parked"))?;
    Ok(rows
        .into_iter()
        .map(|(partition, major, hi, lo, event, reason, attempts, at, replay)| Parked {
            partition: partition.clamp(0, i64::from(u16::MAX)) as u16,
            position: from_sql_words(major, hi, lo),
            event,
            reason,
            attempts: attempts.clamp(0, i64::from(u32::MAX)) as u32,
            parked_at: TimestampMs(at),
            replay,
        })
        .collect())
}

pub(crate) async fn mark_parked(
    pool: &SqlitePool,
    key: &str,
    group: &str,
    which: Option<&[(u16, Position)]>,
    mark: ParkedMark,
) -> Result<u64, Error> {
    let op = "sqlite group parked";
    check_name("group name", group)?;
    let (mut tx, _turn) = write(pool, key, op).await?;
    let n = match which {
        None => {
            let sql = if mark == ParkedMark::Replay { REPLAY_ALL } else { DISCARD_ALL };
            sqlx::query(sql).bind(group).execute(&mut *tx).await.map_err(sql_err(op))?.rows_affected()
        }
        Some(which) => {
            let sql = if mark == ParkedMark::Replay { REPLAY_ONE } else { UNPARK };
            let mut n = 0;
            for (partition, position) in which {
                let [major, hi, lo] = sql_words(*position)?;
                n += sqlx::query(sql)
                    .bind(group)
                    .bind(i64::from(*partition))
                    .bind(major)
                    .bind(hi)
                    .bind(lo)
                    .execute(&mut *tx)
                    .await
                    .map_err(sql_err(op))?
                    .rows_affected();
            }
            n
        }
    };
    tx.commit().await.map_err(sql_err(op))?;
    Ok(n)
}

pub(crate) async fn ack(pool: &SqlitePool, key: &str, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
    check_member(group, member)?;
    let (mut tx, _turn) = write(pool, key, "sqlite group ack").await?;
    ack_in(&mut tx, group, member, acks, false).await?;
    tx.commit().await.map_err(sql_err("sqlite group ack"))
}

pub(crate) async fn leave(
    pool: &SqlitePool,
    key: &str,
    group: &str,
    member: &str,
    incarnation: &str,
) -> Result<(), Error> {
    let op = "sqlite group leave";
    check_member(group, member)?;
    let (mut tx, _turn) = write(pool, key, op).await?;
    sqlx::query(REMOVE_MEMBER)
        .bind(group)
        .bind(member)
        .bind(incarnation)
        .execute(&mut *tx)
        .await
        .map_err(sql_err(op))?;
    sqlx::query(FREE_ALL).bind(group).bind(member).bind(incarnation).execute(&mut *tx).await.map_err(sql_err(op))?;
    tx.commit().await.map_err(sql_err(op))
}

pub(crate) async fn view(pool: &SqlitePool, group: &str) -> Result<Option<GroupView>, Error> {
    let op = "sqlite group view";
    check_name("group name", group)?;
    // One read transaction: one snapshot for the reads.
    let mut tx = pool.begin().await.map_err(sql_err(op))?;
    let exists: bool = sqlx::query_scalar(GROUP_EXISTS).bind(group).fetch_one(&mut *tx).await.map_err(sql_err(op))?;
    if !exists {
        return Ok(None);
    }
    let now = now_ms(&mut tx, op).await?;
    let members: Vec<(String, i64)> =
        sqlx::query_as(VIEW_MEMBERS).bind(group).bind(now).fetch_all(&mut *tx).await.map_err(sql_err(op))?;
    let partitions: Vec<PartitionRow> =
        sqlx::query_as(VIEW_PARTITIONS).bind(group).fetch_all(&mut *tx).await.map_err(sql_err(op))?;
    tx.commit().await.map_err(sql_err(op))?;
    Ok(Some(GroupView {
        members: members.into_iter().map(|(m, at)| (m, TimestampMs(at))).collect(),
        partitions: partitions
            .into_iter()
            .map(|(partition, owner, expires, token, major, hi, lo, unacked, attempts, reason, parked)| PartitionView {
                partition: partition.clamp(0, i64::from(u16::MAX)) as u16,
                owner: owner.map(|o| (o, TimestampMs(expires.unwrap_or_default()))),
                token: token.max(0) as u64,
                acked: from_sql_words(major, hi, lo),
                unacked: unacked.clamp(0, i64::from(u32::MAX)) as u32,
                attempts: attempts.clamp(0, i64::from(u32::MAX)) as u32,
                reason,
                parked: parked.clamp(0, i64::from(u32::MAX)) as u32,
            })
            .collect(),
    }))
}

#[async_trait]
impl GroupStore for super::source::SqliteSource {
    async fn heartbeat(&self, beat: &Heartbeat<'_>) -> Result<Vec<Lease>, Error> {
        heartbeat(&self.pool, &self.key, beat).await
    }

    async fn ack(&self, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
        ack(&self.pool, &self.key, group, member, acks).await
    }

    async fn leave(&self, group: &str, member: &str, incarnation: &str) -> Result<(), Error> {
        leave(&self.pool, &self.key, group, member, incarnation).await
    }

    async fn view(&self, group: &str) -> Result<Option<GroupView>, Error> {
        view(&self.pool, group).await
    }

    async fn nack(&self, group: &str, member: &str, refusal: &Nack<'_>) -> Result<Nacked, Error> {
        nack(&self.pool, &self.key, group, member, refusal).await
    }

    async fn settle(&self, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
        settle(&self.pool, &self.key, group, member, acks).await
    }

    async fn move_positions(&self, group: &str, moves: &[(u16, Position)], force: bool) -> Result<(), Error> {
        move_positions(&self.pool, &self.key, group, moves, force).await
    }

    async fn parked(&self, group: &str) -> Result<Vec<Parked>, Error> {
        parked(&self.pool, group).await
    }

    async fn mark_parked(
        &self,
        group: &str,
        which: Option<&[(u16, Position)]>,
        mark: ParkedMark,
    ) -> Result<u64, Error> {
        mark_parked(&self.pool, &self.key, group, which, mark).await
    }
}

impl sealed::Sealed for SqliteConnection {}

impl AckConnection for SqliteConnection {
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
