//! Postgres cursors of the earlier forms: the original `event_id` cursor resumes, and expires
//! exactly when a row it had not seen was trimmed.

use super::*;
use ff_completions::{Completions, Error};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_event_id_cursor_still_resumes() {
    let f = fixture().await;
    let ids = complete_n(&*f.engine, 12).await;
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let eid = event_id_of(&mut conn, ids[4]).await;
    let mut sub = f.tree.subscribe(Completions::from_cursor(encode_postgres_event_cursor(eid))).await.expect("sub");
    assert_exactly_once(&take_events(&mut sub, 7, WAIT).await, &ids[5..], true);
    assert_no_more(&mut sub, QUIET).await;
}

async fn assert_expired_at_subscribe(f: &Fixture, event_id: i64, kept: &[ExecutionId]) {
    match f.tree.subscribe(Completions::from_cursor(encode_postgres_event_cursor(event_id))).await {
        Err(Error::CursorExpired { oldest: Some(oldest) }) => {
            let mut resumed = f.tree.subscribe(Completions::from_cursor(oldest)).await.expect("resume at oldest");
            assert_exactly_once(&take_events(&mut resumed, kept.len(), WAIT).await, kept, true);
        }
        other => {
            panic!("event id {event_id}: a trimmed row it had not seen must expire it, got {:?}", other.map(|s| s.id()))
        }
    }
}

/// Inserts one row in a batch of its own.
async fn insert_in_own_batch(conn: &mut PgConnection) -> ExecutionId {
    let id = insert_row(conn, 1).await;
    sqlx::query("SELECT ff_completions_tick()").execute(&mut *conn).await.expect("tick");
    id
}

/// An `event_id`-only cursor (the original 9-byte form) knows no transaction, so it is checked
/// against the highest `event_id` ever trimmed: it expires at subscribe when a row it had not
/// seen was trimmed (even one the reader-order cut alone would let it skip), and resumes right
/// after the trimmed rows when it had seen them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_id_cursor_expires_exactly_when_a_row_it_had_not_seen_was_trimmed() {
    let f = fixture().await;
    let mut conn = PgConnection::connect(&f.url).await.expect("connect");
    let a = insert_in_own_batch(&mut conn).await;
    let b = insert_in_own_batch(&mut conn).await;
    let c = insert_in_own_batch(&mut conn).await;
    let (ea, eb, ec) =
        (event_id_of(&mut conn, a).await, event_id_of(&mut conn, b).await, event_id_of(&mut conn, c).await);
    assert_eq!(trim_keeping(&mut conn, 1).await, 2, "a and b are trimmed");
    assert_expired_at_subscribe(&f, ea, &[c]).await;

    let mut tx = conn.begin().await.expect("begin");
    let (d, e) = (insert_row(&mut tx, 1).await, insert_row(&mut tx, 1).await);
    tx.commit().await.expect("commit d and e");
    sqlx::query("SELECT ff_completions_tick()").execute(&mut conn).await.expect("tick");
    let g = insert_in_own_batch(&mut conn).await;
    let ed = event_id_of(&mut conn, d).await;
    assert_eq!(trim_keeping(&mut conn, 2).await, 1, "c is trimmed: d and e share a batch, kept whole with g");
    for lost_after in [ea, eb] {
        assert_expired_at_subscribe(&f, lost_after, &[d, e, g]).await;
    }
    let mut resumed =
        f.tree.subscribe(Completions::from_cursor(encode_postgres_event_cursor(ec))).await.expect("resume at c");
    assert_exactly_once(&take_events(&mut resumed, 3, WAIT).await, &[d, e, g], true);
    let mut resumed =
        f.tree.subscribe(Completions::from_cursor(encode_postgres_event_cursor(ed))).await.expect("resume at d");
    assert_exactly_once(&take_events(&mut resumed, 2, WAIT).await, &[e, g], true);
    let more = complete_n(&*f.engine, 2).await;
    assert_exactly_once(&take_events(&mut resumed, 2, WAIT).await, &more, true);
    assert_no_more(&mut resumed, QUIET).await;
    // Trimmed before the highest event id was recorded: unknown, so every such cursor expires.
    sqlx::query("UPDATE ff_completion_retention SET trimmed_max_event_id = NULL")
        .execute(&mut conn)
        .await
        .expect("forget the highest trimmed event id");
    assert_expired_at_subscribe(&f, ed, &[d, e, g, more[0], more[1]]).await;
    assert_nothing_restarted(&f.tree.stats().await.expect("stats"));
}
