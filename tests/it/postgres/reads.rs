//! The Postgres outbox and its reader: adopting an outbox of the original shape, and reads that
//! follow the indexes (scans and pages touched).

use super::*;
use ff_completions::Completions;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_of_the_original_shape_is_adopted_and_its_rows_delivered() {
    init_tracing();
    let url = fresh_database().await;
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::query(
        "CREATE TABLE ff_completion_event (event_id bigserial PRIMARY KEY, execution_id uuid NOT NULL, flow_id uuid, \
         outcome text NOT NULL, namespace text, instance_tag text, occurred_at_ms bigint NOT NULL, \
         partition_key smallint NOT NULL)",
    )
    .execute(&mut conn)
    .await
    .expect("seed-shaped table");
    let old: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::new_v4()).collect();
    for id in &old {
        sqlx::query(
            "INSERT INTO ff_completion_event (execution_id, outcome, namespace, instance_tag, occurred_at_ms, partition_key) \
             VALUES ($1, 'failure', 'legacy', 'inst=9', 1, 3)",
        )
        .bind(id)
        .execute(&mut conn)
        .await
        .expect("seed row");
    }
    // A subscriber of the original design had seen the first row: it resumes from its 9-byte cursor.
    let first_id: i64 =
        sqlx::query_scalar("SELECT min(event_id) FROM ff_completion_event").fetch_one(&mut conn).await.expect("id");
    let f = {
        let engine =
            Arc::new(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("migrates the old table"));
        let (tree, _) =
            CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(BackendConfig::postgres(&url)))
                .await
                .expect("spawn");
        Fixture { url: url.clone(), tree, engine }
    };
    let mut sub =
        f.tree.subscribe(Completions::from_cursor(encode_postgres_event_cursor(first_id))).await.expect("sub");
    let events = take_events(&mut sub, 2, WAIT).await;
    let got: Vec<_> = events.iter().map(|e| e.execution_id.uuid()).collect();
    assert_eq!(got, old[1..].to_vec());
    assert!(
        events
            .iter()
            .all(|e| e.outcome == CompletionOutcome::Failed && e.tags.get("inst").map(String::as_str) == Some("9"))
    );
    let fresh = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &fresh, true);
}

/// `(seq_scan, idx_scan)` of the outbox, as the server's statistics have them now.
async fn outbox_scans(conn: &mut PgConnection) -> (i64, i64) {
    sqlx::query_as(
        "SELECT seq_scan, coalesce(idx_scan, 0) FROM pg_stat_user_tables WHERE relname = 'ff_completion_event'",
    )
    .fetch_one(conn)
    .await
    .expect("outbox statistics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_follow_the_txid_index_and_never_scan_the_whole_outbox() {
    const ROWS: usize = 50_000;
    init_tracing();
    let url = fresh_database().await;
    let config = BackendConfig::postgres(&url);
    drop(PostgresEngine::connect(&config).await.expect("engine installs the schema"));
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    sqlx::query(
        "INSERT INTO ff_completion_event (execution_id, outcome, namespace, occurred_at_ms, partition_key) \
         SELECT gen_random_uuid(), 'success', 'ns', 1, 0 FROM generate_series(1, $1)",
    )
    .bind(ROWS as i64)
    .execute(&mut conn)
    .await
    .expect("history");
    sqlx::query("ANALYZE ff_completion_event").execute(&mut conn).await.expect("analyze");
    let (seq_before, idx_before) = outbox_scans(&mut conn).await;

    let (tree, _) = CompletionSupervisorHandle::spawn(SupervisorConfig::new().with_backend(config.clone()))
        .await
        .expect("spawn tree");
    let mut events = tree.subscribe(Completions::from_cursor(encode_postgres_cursor(0, 0))).await.expect("subscribe");
    let replayed = take_events(&mut events, ROWS, Duration::from_secs(120)).await;
    assert_eq!(replayed.len(), ROWS);
    drop(events);
    // Server processes report their scans when they exit.
    tree.shutdown().await;
    let pages = (ROWS / 512) as i64;
    let deadline = std::time::Instant::now() + WAIT;
    let scans = loop {
        let scans = outbox_scans(&mut conn).await;
        if scans.1 - idx_before >= pages || std::time::Instant::now() > deadline {
            break scans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(scans.1 - idx_before >= pages, "the readers' index scans were reported: {scans:?}");
    assert_eq!(scans.0, seq_before, "no read scanned the whole outbox ({} index scans)", scans.1 - idx_before);
}

/// Pages of `table` and its indexes (hit or read) that `probe` touched, run with snapshots
/// `s1` and `s2` bound as `$1` and `$2`, as PL/pgSQL passes them: from the server's I/O
/// statistics of that table alone (flushed before and after), so the catalog pages a busy
/// server makes a backend read again do not count.
async fn pages_touched(conn: &mut PgConnection, table: &str, probe: &'static str, s1: &str, s2: &str) -> i64 {
    async fn pages_so_far(conn: &mut PgConnection, table: &str) -> i64 {
        sqlx::query("SELECT pg_stat_force_next_flush()").execute(&mut *conn).await.expect("flush statistics");
        sqlx::query_scalar(
            "SELECT heap_blks_hit + heap_blks_read + coalesce(idx_blks_hit, 0) + coalesce(idx_blks_read, 0) \
               FROM pg_statio_user_tables WHERE relname = $1",
        )
        .bind(table)
        .fetch_one(&mut *conn)
        .await
        .expect("outbox I/O statistics")
    }
    // The snapshots go in as literals, so the probe is planned knowing them, as the reader's
    // PL/pgSQL plans it with its variables' values.
    let probe = probe.replace("$1", &format!("'{s1}'")).replace("$2", &format!("'{s2}'"));
    let before = pages_so_far(conn, table).await;
    sqlx::query(sqlx::AssertSqlSafe(probe)).execute(&mut *conn).await.expect("probe");
    pages_so_far(conn, table).await - before
}

/// The reader's probes at the head of a large outbox touch a few pages, whatever its size: each
/// probe has one lower bound (a scalar bound beside a row comparison let a btree scan start at
/// the outbox's first page).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_at_the_head_of_a_large_outbox_touch_a_few_pages() {
    let row = "INSERT INTO ff_completion_event (execution_id, outcome, occurred_at_ms, partition_key) \
               SELECT gen_random_uuid(), 'success', 1, 0 FROM generate_series(1, $1)";
    head_probes_touch_a_few_pages("ff_completion_event", row).await;
}

/// The same for the lease-history and signal-delivery table: 100,000 heartbeats behind the head
/// cost the reader's probes a few pages of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_at_the_head_of_a_large_family_table_touch_a_few_pages() {
    let row = "INSERT INTO ff_completion_family_event (family, kind, execution_id, occurred_at_ms, partition_key) \
               SELECT 'lease_history', 'renewed', gen_random_uuid(), 1, 0 FROM generate_series(1, $1)";
    head_probes_touch_a_few_pages("ff_completion_family_event", row).await;
}

/// 100,000 rows written by `insert` (`$1` rows at a time) into `table` in one transaction, three
/// more at the head, transactions left open here and elsewhere: the reader's batch and wake-up
/// probes touch a few pages of `table`.
async fn head_probes_touch_a_few_pages(table: &str, insert: &'static str) {
    init_tracing();
    let url = fresh_database().await;
    drop(PostgresEngine::connect(&BackendConfig::postgres(&url)).await.expect("schema"));
    let mut conn = PgConnection::connect(&url).await.expect("connect");
    // Transactions opened before the history was written and left open, one here and some in
    // another database of the cluster: every tick below sees them in progress, so the lookups
    // of in-progress transactions run, with ids below the history's (against an outbox one
    // transaction wrote, the case where the planner once walked the primary key instead).
    let elsewhere = fresh_database().await;
    let mut bystanders = Vec::new();
    for db in [&url, &elsewhere, &elsewhere, &elsewhere, &elsewhere, &elsewhere] {
        let mut bystander = PgConnection::connect(db).await.expect("connect");
        sqlx::query("BEGIN").execute(&mut bystander).await.expect("begin");
        sqlx::query("SELECT pg_current_xact_id()").execute(&mut bystander).await.expect("a transaction id");
        bystanders.push(bystander);
    }
    // The counts below are the table's own I/O statistics: an autovacuum of the new rows,
    // started by the server in the middle, would add its whole scan to them.
    sqlx::query(sqlx::AssertSqlSafe(format!("ALTER TABLE {table} SET (autovacuum_enabled = false)")))
        .execute(&mut conn)
        .await
        .expect("no autovacuum");
    sqlx::query(insert).bind(100_000i64).execute(&mut conn).await.expect("history");
    sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {table}"))).execute(&mut conn).await.expect("analyze");
    sqlx::query("SELECT ff_completions_tick()").execute(&mut conn).await.expect("tick");
    for _ in 0..3 {
        sqlx::query(insert).bind(1i64).execute(&mut conn).await.expect("a row at the head");
    }
    sqlx::query("SELECT ff_completions_tick()").execute(&mut conn).await.expect("tick");
    let ticks: Vec<String> =
        sqlx::query_scalar("SELECT snapshot::text FROM ff_completion_tick ORDER BY tick_id DESC LIMIT 2")
            .fetch_all(&mut conn)
            .await
            .expect("ticks");
    let (newest, previous) = (&ticks[0], &ticks[1]);
    let batch = "SELECT * FROM ff_completions_page(6, NULL, $1::pg_snapshot, $2::pg_snapshot, 0, 0, -32769, 512)";
    let since = "SELECT ff_completions_committed_since($1::pg_snapshot), $2::text";
    let batch = pages_touched(&mut conn, table, batch, previous, newest).await;
    let (since, idle) = (
        pages_touched(&mut conn, table, since, previous, newest).await,
        pages_touched(&mut conn, table, since, newest, newest).await,
    );
    // One index lookup (a few pages) per transaction a tick saw in progress: the six opened
    // here, and any other test's on this shared server.
    let in_progress: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_snapshot_xip($1::pg_snapshot)")
        .bind(newest)
        .fetch_one(&mut conn)
        .await
        .expect("in progress");
    let most = 12 + 4 * in_progress;
    eprintln!(
        "pages of {table} read at the head of 100,000 rows with {in_progress} transactions in progress: batch {batch}, \
         wake-up probes {since} / {idle} (at most {most})"
    );
    assert!(batch <= most, "a batch of 3 rows at the head read {batch} pages");
    assert!(since <= most && idle <= most, "a wake-up probe read {since} / {idle} pages");
}
