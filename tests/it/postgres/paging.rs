//! The reader against an order computed without it: a mixed history (one-row and many-row
//! transactions, rows in several statements and partitions, explicit, negative and repeated ids,
//! lease rows, a transaction open across ticks, a rolled-back one, runs of one-row batches) read
//! from the start in pages of every size gives each row once, in the order the ticks define:
//! batch of the first tick that sees the row's transaction, then `(txid, event_id, partition
//! key)`.

use super::*;
use ff_completions::Completions;

const FIXTURE: &str = include_str!("../../fixtures/partitioned_outbox.sql");

/// A row as the order names it: `(family, event_id, partition key)`; family `None` for the outbox.
type Row = (Option<String>, i64, Option<i32>);

/// A small deterministic generator, so a failure repeats.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

async fn insert(conn: &mut PgConnection, partition: i16, explicit: Option<i64>) {
    let sql = match explicit {
        Some(_) => {
            "INSERT INTO ff_completion_event (partition_key, event_id, execution_id, outcome, occurred_at_ms) \
             OVERRIDING SYSTEM VALUE VALUES ($1, $2, gen_random_uuid(), 'success', 1)"
        }
        None => {
            "INSERT INTO ff_completion_event (partition_key, execution_id, outcome, occurred_at_ms) \
             VALUES ($1, gen_random_uuid(), 'success', 1)"
        }
    };
    let mut query = sqlx::query(sql).bind(partition);
    if let Some(id) = explicit {
        query = query.bind(id);
    }
    query.execute(conn).await.expect("insert");
}

async fn insert_lease_row(conn: &mut PgConnection, partition: i16) {
    sqlx::query(
        "INSERT INTO ff_completion_family_event (family, kind, execution_id, occurred_at_ms, partition_key) \
         VALUES ('lease_history', 'renewed', gen_random_uuid(), 1, $1)",
    )
    .bind(partition)
    .execute(conn)
    .await
    .expect("lease row");
}

async fn tick(conn: &mut PgConnection) {
    sqlx::query("SELECT ff_completions_tick()").execute(conn).await.expect("tick");
}

/// Writes the mixed history; explicit ids repeat within a transaction only where the outbox's
/// key allows it (`partitioned`).
async fn mixed_history(url: &str, partitioned: bool) {
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let mut open = PgConnection::connect(url).await.expect("connect");
    let mut rng = Lcg(7);
    let mut next_explicit = -1_000_000i64;
    tick(&mut conn).await;
    let mut left_open = false;
    for step in 0..120 {
        match rng.below(8) {
            0 | 1 => insert(&mut conn, rng.below(256) as i16, None).await,
            2 => {
                let mut tx = conn.begin().await.expect("begin");
                for _ in 0..2 + rng.below(30) {
                    insert(&mut tx, rng.below(256) as i16, None).await;
                }
                if rng.below(2) == 0 {
                    insert_lease_row(&mut tx, rng.below(256) as i16).await;
                }
                tx.commit().await.expect("commit");
            }
            3 => {
                let mut tx = conn.begin().await.expect("begin");
                next_explicit += 1 + rng.below(1000) as i64;
                let id = if rng.below(3) == 0 { -next_explicit } else { next_explicit };
                insert(&mut tx, 3, Some(id)).await;
                if partitioned {
                    insert(&mut tx, 40, Some(id)).await;
                }
                insert(&mut tx, 5, None).await;
                tx.commit().await.expect("commit");
            }
            4 => insert_lease_row(&mut conn, rng.below(256) as i16).await,
            5 if !left_open => {
                sqlx::query("BEGIN").execute(&mut open).await.expect("begin");
                insert(&mut open, rng.below(256) as i16, None).await;
                insert(&mut open, rng.below(256) as i16, None).await;
                left_open = true;
            }
            5 => {
                sqlx::query("COMMIT").execute(&mut open).await.expect("commit the open one");
                left_open = false;
            }
            6 => {
                let mut tx = conn.begin().await.expect("begin");
                insert(&mut tx, rng.below(256) as i16, None).await;
                tx.rollback().await.expect("roll back");
            }
            _ => tick(&mut conn).await,
        }
        if step % 17 == 0 {
            tick(&mut conn).await;
        }
    }
    if left_open {
        sqlx::query("COMMIT").execute(&mut open).await.expect("commit the open one");
    }
    // A run of one-row batches, as a reader catching up meets them (read together), broken by a
    // batch of more transactions than are read together and by one with a lease row.
    for i in 0..150 {
        match i {
            60 => {
                for _ in 0..70 {
                    insert(&mut conn, rng.below(256) as i16, None).await;
                }
            }
            100 => insert_lease_row(&mut conn, 9).await,
            _ => insert(&mut conn, rng.below(256) as i16, None).await,
        }
        if i % 25 == 7 {
            next_explicit += 1 + rng.below(1000) as i64;
            insert(&mut conn, rng.below(256) as i16, Some(-next_explicit)).await;
        }
        tick(&mut conn).await;
    }
}

/// The order the ticks define, computed here without the reader.
async fn order_from_ticks(conn: &mut PgConnection) -> Vec<Row> {
    sqlx::query_as(
        "SELECT r.family, r.event_id, r.key FROM ( \
            SELECT NULL::text AS family, e.txid, e.event_id, e.partition_key::int4 AS key FROM ff_completion_event e \
            UNION ALL \
            SELECT f.family, f.txid, f.event_id, f.partition_key::int4 FROM ff_completion_family_event f) r \
          JOIN LATERAL (SELECT min(t.tick_id) AS tick FROM ff_completion_tick t \
                         WHERE pg_visible_in_snapshot(r.txid, t.snapshot)) b ON true \
         ORDER BY b.tick, r.txid, r.event_id, coalesce(r.key, -32769)",
    )
    .fetch_all(conn)
    .await
    .expect("order from the ticks")
}

/// Everything from the start, in pages of `page` rows, following the positions the reader hands
/// out as a listener does (the position of the last row of any kind).
async fn read_all(conn: &mut PgConnection, page: i32) -> Vec<Row> {
    type Out = (i32, i64, i64, i64, Option<i32>, Option<i64>, Option<String>);
    let (mut major, mut txid, mut event_id, mut key, mut fingerprint) = (0i64, 0i64, 0i64, -32769i32, None);
    let mut rows = Vec::new();
    for _ in 0..100_000 {
        let out: Vec<Out> = sqlx::query_as(
            "SELECT o_kind, o_major, o_txid, o_event_id, o_partition_key, o_fingerprint, o_family \
               FROM ff_completions_read($1, $2, $3, $4, $5, $6)",
        )
        .bind(major)
        .bind(txid)
        .bind(event_id)
        .bind(key)
        .bind(fingerprint)
        .bind(page)
        .fetch_all(&mut *conn)
        .await
        .expect("read");
        let mut more = false;
        let mut read = 0;
        for (kind, m, t, e, k, f, family) in out {
            assert!(kind != 1 && kind != 4, "kind {kind} at ({m}, {t}, {e})");
            let position = (m, t, e, k.unwrap_or(-32769));
            assert!(
                position >= (major, txid, event_id, key),
                "a position went back: {position:?} after {:?}",
                (major, txid, event_id, key)
            );
            if kind == 0 {
                rows.push((family, e, k));
                read += 1;
            }
            more |= kind == 3;
            (major, txid, event_id, key, fingerprint) = (m, t, e, k.unwrap_or(-32769), f);
        }
        if read == 0 && !more {
            return rows;
        }
    }
    panic!("the reader never caught up in pages of {page}");
}

async fn assert_every_page_size_reads_the_order(url: &str, partitioned: bool) {
    drop(PostgresEngine::connect(&BackendConfig::postgres(url)).await.expect("install"));
    mixed_history(url, partitioned).await;
    let mut conn = PgConnection::connect(url).await.expect("connect");
    let expected = order_from_ticks(&mut conn).await;
    assert!(expected.len() > 300, "a history of {} rows", expected.len());
    for page in [1, 2, 3, 7, 64, 100_000] {
        let read = read_all(&mut conn, page).await;
        assert_eq!(
            read.len(),
            expected.len(),
            "pages of {page}: {} rows read, {} in the order",
            read.len(),
            expected.len()
        );
        let first_wrong = read.iter().zip(&expected).position(|(r, e)| r != e);
        assert_eq!(first_wrong, None, "pages of {page}: the reader left the order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_in_pages_of_any_size_give_the_order_of_the_ticks() {
    init_tracing();
    assert_every_page_size_reads_the_order(&fresh_database().await, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_in_pages_of_any_size_give_the_order_of_the_ticks_on_a_partitioned_outbox() {
    init_tracing();
    let url = fresh_database().await;
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::raw_sql(FIXTURE).execute(&mut conn).await.expect("the partitioned outbox");
    assert_every_page_size_reads_the_order(&url, true).await;
}

/// A subscriber resuming 300 one-row batches behind: a read stops after 64 batches and says
/// more is waiting, and the subscriber reads on at once. (Taken for the live head, it waited
/// for the safety tick: an hour here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catching_up_over_many_small_batches_reads_on_without_waiting_for_a_tick() {
    let f = fixture_with(|c| c.with_tick(Duration::from_secs(3_600))).await;
    let mut live = f.tree.subscribe(Completions::tail()).await.expect("tail");
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let first = complete_n(&*f.engine, 1).await;
    let start = take_events(&mut live, 1, WAIT).await;
    assert_exactly_once(&start, &first, true);
    let mut rows = Vec::with_capacity(300);
    for _ in 0..300 {
        rows.push(insert_row(&mut conn, 1).await);
        tick(&mut conn).await;
    }
    assert_exactly_once(&take_events(&mut live, 300, WAIT).await, &rows, true);
    let mut behind = f.tree.subscribe(Completions::from_cursor(start[0].cursor.clone())).await.expect("resume");
    assert_exactly_once(&take_events(&mut behind, 300, Duration::from_secs(10)).await, &rows, true);
    assert_no_more(&mut behind, QUIET).await;
}
