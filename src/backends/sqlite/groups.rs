//! The SQLite durable-group store (`migrations/sqlite/0003_durable_groups.sql`): SQLite has no
//! stored functions, so each operation keeps the store's rules in one `BEGIN IMMEDIATE`
//! transaction (the database's one writer, so each is serialized against every other), with
//! SQLite's clock read once after the transaction began, in epoch milliseconds. [`ack_in`] runs
//! an ack inside the caller's own write transaction.

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::SqliteConnection;
use sqlx::sqlite::SqlitePool;

use super::write_queue;
use crate::backends::groups::{
    Ack, AckConnection, GroupStore, GroupView, Heartbeat, Lease, PartitionView, Sharing, check_heartbeat, check_member,
    fair_share, from_sql_words, sealed, sql_words,
};
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

/// Joins or renews the member until `?3`.
const UPSERT_MEMBER: &str = "\
INSERT INTO ff_completion_group_member (group_name, member, expires_at_ms) VALUES (?1, ?2, ?3) \
ON CONFLICT (group_name, member) DO UPDATE SET expires_at_ms = excluded.expires_at_ms";

/// Removes the members lapsed at `?2`.
const REMOVE_LAPSED: &str = "DELETE FROM ff_completion_group_member WHERE group_name = ?1 AND expires_at_ms <= ?2";

/// Renews the member's leases until `?3`, raising each token by `?4` (1 on a rejoin).
const RENEW: &str = "\
UPDATE ff_completion_group_partition SET expires_at_ms = ?3, token = token + ?4 \
 WHERE group_name = ?1 AND owner = ?2";

/// Live members at `?2`.
const LIVE: &str = "SELECT count(*) FROM ff_completion_group_member WHERE group_name = ?1 AND expires_at_ms > ?2";

/// Frees the member's `?3` highest partitions.
const FREE_HIGHEST: &str = "\
UPDATE ff_completion_group_partition SET owner = NULL, expires_at_ms = NULL \
 WHERE group_name = ?1 AND partition IN (SELECT partition FROM ff_completion_group_partition \
                                          WHERE group_name = ?1 AND owner = ?2 ORDER BY partition DESC LIMIT ?3)";

/// Takes up to `?5` free or lapsed (at `?3`) partitions, ascending, each with token + 1, until `?4`.
const TAKE: &str = "\
UPDATE ff_completion_group_partition SET owner = ?2, expires_at_ms = ?4, token = token + 1 \
 WHERE group_name = ?1 AND partition IN (SELECT partition FROM ff_completion_group_partition \
                                          WHERE group_name = ?1 \
                                            AND (owner IS NULL OR (owner <> ?2 AND expires_at_ms <= ?3)) \
                                          ORDER BY partition LIMIT ?5)";

/// The member's leases, ascending.
const HELD: &str = "\
SELECT partition, token, acked_major, acked_hi, acked_lo FROM ff_completion_group_partition \
 WHERE group_name = ?1 AND owner = ?2 ORDER BY partition";

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

/// Removes a member.
const REMOVE_MEMBER: &str = "DELETE FROM ff_completion_group_member WHERE group_name = ?1 AND member = ?2";

/// Frees a member's partitions (tokens unchanged).
const FREE_ALL: &str = "\
UPDATE ff_completion_group_partition SET owner = NULL, expires_at_ms = NULL WHERE group_name = ?1 AND owner = ?2";

/// Live members at `?2`.
const VIEW_MEMBERS: &str = "\
SELECT member, expires_at_ms FROM ff_completion_group_member WHERE group_name = ?1 AND expires_at_ms > ?2 \
 ORDER BY member";

/// Every partition of the group.
const VIEW_PARTITIONS: &str = "\
SELECT partition, owner, expires_at_ms, token, acked_major, acked_hi, acked_lo FROM ff_completion_group_partition \
 WHERE group_name = ?1 ORDER BY partition";

type LeaseRow = (i64, i64, i64, i64, i64);
/// A partition's owner, token and acknowledged position words.
type HolderRow = (Option<String>, i64, i64, i64, i64);
type PartitionRow = (i64, Option<String>, Option<i64>, i64, i64, i64, i64);

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
    sqlx::query(UPSERT_MEMBER).bind(group).bind(member).bind(until).execute(&mut *tx).await.map_err(sql_err(op))?;
    sqlx::query(REMOVE_LAPSED).bind(group).bind(now).execute(&mut *tx).await.map_err(sql_err(op))?;
    let renewed = sqlx::query(RENEW)
        .bind(group)
        .bind(member)
        .bind(until)
        .bind(i64::from(beat.rejoin))
        .execute(&mut *tx)
        .await
        .map_err(sql_err(op))?;
    let held = renewed.rows_affected() as usize;
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
            .execute(&mut *tx)
            .await
            .map_err(sql_err(op))?;
    }
    let rows: Vec<LeaseRow> =
        sqlx::query_as(HELD).bind(group).bind(member).fetch_all(&mut *tx).await.map_err(sql_err(op))?;
    tx.commit().await.map_err(sql_err(op))?;
    Ok(rows
        .into_iter()
        .map(|(partition, token, major, hi, lo)| Lease {
            partition: partition.clamp(0, i64::from(u16::MAX)) as u16,
            token: token.max(0) as u64,
            acked: from_sql_words(major, hi, lo),
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
    check_member(group, member)?;
    let words = acks.iter().map(|a| sql_words(a.position)).collect::<Result<Vec<_>, _>>()?;
    let exists: bool = sqlx::query_scalar(GROUP_EXISTS).bind(group).fetch_one(&mut *conn).await.map_err(sql_err(op))?;
    if !exists {
        return Err(Error::validation(format!("unknown durable group {group:?}")));
    }
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
        if once && ack.position <= from_sql_words(major, hi, lo) {
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

pub(crate) async fn ack(pool: &SqlitePool, key: &str, group: &str, member: &str, acks: &[Ack]) -> Result<(), Error> {
    check_member(group, member)?;
    let (mut tx, _turn) = write(pool, key, "sqlite group ack").await?;
    ack_in(&mut tx, group, member, acks, false).await?;
    tx.commit().await.map_err(sql_err("sqlite group ack"))
}

pub(crate) async fn leave(pool: &SqlitePool, key: &str, group: &str, member: &str) -> Result<(), Error> {
    let op = "sqlite group leave";
    check_member(group, member)?;
    let (mut tx, _turn) = write(pool, key, op).await?;
    sqlx::query(REMOVE_MEMBER).bind(group).bind(member).execute(&mut *tx).await.map_err(sql_err(op))?;
    sqlx::query(FREE_ALL).bind(group).bind(member).execute(&mut *tx).await.map_err(sql_err(op))?;
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
            .map(|(partition, owner, expires, token, major, hi, lo)| PartitionView {
                partition: partition.clamp(0, i64::from(u16::MAX)) as u16,
                owner: owner.map(|o| (o, TimestampMs(expires.unwrap_or_default()))),
                token: token.max(0) as u64,
                acked: from_sql_words(major, hi, lo),
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

    async fn leave(&self, group: &str, member: &str) -> Result<(), Error> {
        leave(&self.pool, &self.key, group, member).await
    }

    async fn view(&self, group: &str) -> Result<Option<GroupView>, Error> {
        view(&self.pool, group).await
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
}
