//! Durable subscriptions and groups through the public surface: resume from the stored
//! position with nothing kept by the engine, members splitting the partitions, acknowledgement
//! after delivery, stats and bad input. Written once and run by each backend's module (see
//! [`durable_tests`]); the OS-process scenarios (SIGKILL, SIGSTOP) are in `tests/groups`.

use std::collections::HashSet;
use std::time::Duration;

use ff_completions::__store::Store;
use ff_completions::{
    BackendConfig, CompletionEvent, DurableRequest, DurableSubscription, Error, ExecutionId, FlowId, Namespace,
    PARTITION_COUNT, Retention, ScannerFilter, StreamCursor,
};
use ff_completions_lab::{Engine, ExecutionSpec};
use futures::StreamExt;

use crate::contract::{QUIET, WAIT, complete_n, fixture, running};
use crate::support::{assert_exactly_once, assert_no_more, take_events, wait_until};

/// Declares, in the calling module, one test per durable-subscription promise, each run
/// against what the module's `async fn contract_backend() -> (impl Sized, BackendConfig)`
/// returns.
macro_rules! durable_tests {
    () => {
        $crate::durable::durable_tests! { @each
            a_durable_subscription_resumes_after_its_last_ack_with_nothing_kept_by_the_engine;
            a_second_subscriber_under_a_durable_name_takes_it_over_and_ends_the_first;
            two_members_of_a_group_split_the_partitions_and_each_completion_reaches_one_of_them;
            ack_after_delivery_acknowledges_what_the_consumer_moved_past;
            stats_show_the_members_their_partitions_and_what_is_unacknowledged;
            bad_names_and_acks_of_cursors_never_delivered_are_validation_errors_and_write_nothing;
            events_read_before_their_partition_moved_away_and_back_are_handed_out_once;
            positions_move_over_lease_entries_and_left_out_completions_so_trimming_what_was_read_ends_nothing;
            a_group_whose_positions_were_trimmed_away_while_no_member_ran_goes_on_and_names_what_it_cannot_read;
            a_second_process_under_a_member_id_fences_the_first_in_a_shared_group_and_the_firsts_end_frees_nothing;
            ack_and_ticket_of_an_event_whose_partition_moved_to_another_member_are_fenced;
            an_event_refused_as_often_as_allowed_is_parked_its_partition_goes_on_and_a_replay_hands_it_out_once;
            an_operator_moves_positions_of_held_partitions_only_when_forced_and_their_holder_reads_on_from_there;
        }
    };
    (@each $($name:ident;)*) => {
        $crate::contract::backend_tests! { durable: $($name;)* }
    };
}
pub(crate) use durable_tests;

pub(crate) const TTL: Duration = Duration::from_millis(1500);

pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// Completes `n` executions, each of its own flow (so they spread over the partitions).
pub(crate) async fn complete_spread(engine: &dyn ff_completions_lab::Engine, n: usize) -> Vec<ExecutionId> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.extend(complete_n(engine, 1).await);
    }
    ids
}

/// Completes `n` executions of one fresh flow whose partition `wanted` accepts; returns them in
/// commit order.
async fn complete_where(engine: &dyn Engine, n: usize, wanted: impl Fn(u16) -> bool) -> Vec<ExecutionId> {
    let flow = loop {
        let flow = FlowId::new();
        if wanted(ExecutionId::new_in(&flow).partition()) {
            break flow;
        }
    };
    engine.create_flow(&flow, None).await.expect("flow");
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let spec = ExecutionSpec::new(&flow);
        engine.create_execution(&spec).await.expect("create");
        ids.push(spec.id);
    }
    let mut claimed = 0;
    while claimed < n {
        claimed += engine.claim("test-worker", n).await.expect("claim").len();
    }
    for id in &ids {
        assert!(engine.complete(id).await.expect("complete"));
    }
    ids
}

/// A member joins the group: the partitions a holder of all 256 frees for it are its highest
/// (128 and up).
fn upper_half(partition: u16) -> bool {
    partition >= PARTITION_COUNT / 2
}

/// Removes every event retention may remove, as the tree's trim job would, trying again while
/// the backend is busy (SQLite: the tree's own writes hold its lock); returns how many.
async fn trim_everything(store: &Store) -> u64 {
    loop {
        match store.trim(&Retention::max_events(0)).await {
            Ok(removed) => return removed,
            Err(err) if err.is_transient() => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(err) => panic!("trim: {err}"),
        }
    }
}

/// Waits until the subscription holds `n` partitions.
pub(crate) async fn holding(sub: &DurableSubscription, n: usize) {
    wait_until(WAIT, &format!("{} holds {n} partitions", sub.member()), || async { sub.partitions().len() == n }).await;
}

pub async fn a_durable_subscription_resumes_after_its_last_ack_with_nothing_kept_by_the_engine(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    let name = unique("resume");
    let mut first = f.tree.subscribe(DurableRequest::exclusive(&name).with_lease_ttl(TTL)).await.expect("subscribe");
    holding(&first, usize::from(PARTITION_COUNT)).await;
    let ids = complete_n(f.engine.as_ref(), 6).await;
    let got = take_events(&mut first, 6, WAIT).await;
    assert_exactly_once(&got, &ids, true);
    first.ack(&got[2].cursor).await.expect("ack the third");
    drop(first);

    // A new subscriber under the name: nothing but the name is carried over.
    let mut second =
        f.tree.subscribe(DurableRequest::exclusive(&name).with_lease_ttl(TTL)).await.expect("subscribe again");
    let rest = take_events(&mut second, 3, WAIT).await;
    assert_exactly_once(&rest, &ids[3..], true);
    assert_no_more(&mut second, QUIET).await;
}

pub async fn a_second_subscriber_under_a_durable_name_takes_it_over_and_ends_the_first(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    let name = unique("takeover");
    let request = || DurableRequest::exclusive(&name).with_lease_ttl(TTL);
    let mut first = f.tree.subscribe(request()).await.expect("first");
    holding(&first, 256).await;
    let ids = complete_n(f.engine.as_ref(), 2).await;
    let got = take_events(&mut first, 2, WAIT).await;
    first.ack(&got[0].cursor).await.expect("ack the first event");

    let mut second = f.tree.subscribe(request()).await.expect("second");
    let rest = take_events(&mut second, 1, WAIT).await;
    assert_exactly_once(&rest, &ids[1..], true);
    match tokio::time::timeout(WAIT, first.next()).await {
        Ok(Some(Err(Error::Fenced { .. }))) => {}
        other => panic!("the first subscriber's stream should end fenced: {other:?}"),
    }
    assert!(first.ack(&got[1].cursor).await.is_err(), "the superseded subscriber acknowledges nothing");
    // The second keeps the name: it was not made to leave by the first's end.
    let more = complete_n(f.engine.as_ref(), 1).await;
    let got = take_events(&mut second, 1, WAIT).await;
    assert_exactly_once(&got, &more, true);
    assert_eq!(second.partitions().len(), 256);
}

pub async fn two_members_of_a_group_split_the_partitions_and_each_completion_reaches_one_of_them(
    backend: BackendConfig,
) {
    let f = fixture(backend, |c| c).await;
    let group = unique("split");
    let request = |member: &str| DurableRequest::group(&group).with_member(member).with_lease_ttl(TTL);
    let mut a = f.tree.subscribe(request("a")).await.expect("a");
    holding(&a, 256).await;
    let mut b = f.tree.subscribe(request("b")).await.expect("b");
    wait_until(WAIT, "a and b hold 128 each", || async { a.partitions().len() == 128 && b.partitions().len() == 128 })
        .await;
    let (held_a, held_b): (HashSet<u16>, HashSet<u16>) =
        (a.partitions().into_iter().collect(), b.partitions().into_iter().collect());
    assert!(held_a.is_disjoint(&held_b), "a partition held twice");

    let ids = complete_spread(f.engine.as_ref(), 40).await;
    let (in_a, in_b): (Vec<ExecutionId>, Vec<ExecutionId>) =
        ids.iter().partition(|id| held_a.contains(&id.partition()));
    let got_a = take_events(&mut a, in_a.len(), WAIT).await;
    let got_b = take_events(&mut b, in_b.len(), WAIT).await;
    assert_exactly_once(&got_a, &in_a, false);
    assert_exactly_once(&got_b, &in_b, false);
    assert_no_more(&mut a, QUIET).await;
    assert_no_more(&mut b, QUIET).await;
}

pub async fn ack_after_delivery_acknowledges_what_the_consumer_moved_past(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    let name = unique("auto");
    let request = || DurableRequest::exclusive(&name).with_lease_ttl(TTL).with_ack_after_delivery();
    let mut first = f.tree.subscribe(request()).await.expect("subscribe");
    holding(&first, 256).await;
    let ids = complete_n(f.engine.as_ref(), 4).await;
    take_events(&mut first, 4, WAIT).await;
    // Asking for a fifth marks the fourth handled; the flush writes it.
    assert_no_more(&mut first, QUIET).await;
    let stats = first.stats().await.expect("stats");
    assert_eq!(stats.partitions.iter().filter_map(|p| p.unacked).sum::<usize>(), 0, "{stats:?}");
    drop(first);

    let mut second = f.tree.subscribe(request()).await.expect("subscribe again");
    holding(&second, 256).await;
    assert_no_more(&mut second, QUIET).await;
    let more = complete_n(f.engine.as_ref(), 2).await;
    let got = take_events(&mut second, 2, WAIT).await;
    assert_exactly_once(&got, &more, true);
    assert!(!got.iter().any(|e| ids.contains(&e.execution_id)));
}

pub async fn stats_show_the_members_their_partitions_and_what_is_unacknowledged(backend: BackendConfig) {
    let f = fixture(backend, |c| c).await;
    let group = unique("stats");
    let mut a = f.tree.subscribe(DurableRequest::group(&group).with_member("a").with_lease_ttl(TTL)).await.expect("a");
    holding(&a, 256).await;
    let ids = complete_n(f.engine.as_ref(), 3).await;
    let got: Vec<CompletionEvent> = take_events(&mut a, 3, WAIT).await;
    let partition = ids[0].partition();
    let stats = a.stats().await.expect("stats");
    assert_eq!((stats.group.as_str(), stats.member.as_str()), (group.as_str(), "a"));
    assert_eq!(stats.members.len(), 1);
    assert_eq!((stats.members[0].member.as_str(), stats.members[0].partitions), ("a", 256));
    let row = &stats.partitions[usize::from(partition)];
    assert_eq!((row.owner.as_deref(), row.unacked), (Some("a"), Some(3)), "{row:?}");
    a.ack(&got[2].cursor).await.expect("ack");
    let row = a.stats().await.expect("stats").partitions[usize::from(partition)].clone();
    assert_eq!(row.unacked, Some(0), "{row:?}");
}

pub async fn bad_names_and_acks_of_cursors_never_delivered_are_validation_errors_and_write_nothing(
    backend: BackendConfig,
) {
    let f = fixture(backend.clone(), |c| c).await;
    let store = Store::open(&backend).await.expect("store");
    let too_long = "g".repeat(65);
    for (request, name) in [
        (DurableRequest::exclusive(&too_long), too_long.clone()),
        (DurableRequest::exclusive("a\0b"), "a\0b".to_owned()),
        (DurableRequest::group("ok-name").with_member("m\0"), "ok-name".to_owned()),
        (DurableRequest::group("ok-name").with_lease_ttl(Duration::from_secs(2 * 24 * 60 * 60)), "ok-name".to_owned()),
    ] {
        let err = f.tree.subscribe(request).await.expect_err("refused");
        assert!(matches!(err, Error::Validation { .. }), "{err:?}");
        if name.chars().count() <= 64 && !name.contains('\0') {
            assert_eq!(store.view(&name).await.expect("view"), None, "nothing was created for {name:?}");
        }
    }

    let name = unique("never");
    let mut sub = f.tree.subscribe(DurableRequest::exclusive(&name).with_lease_ttl(TTL)).await.expect("subscribe");
    holding(&sub, 256).await;
    let ids = complete_n(f.engine.as_ref(), 1).await;
    let got = take_events(&mut sub, 1, WAIT).await;
    assert_eq!(got[0].execution_id, ids[0]);
    // What an ack writes: tokens and positions (lease expiries move with every heartbeat).
    let written = |view: Option<ff_completions::__store::GroupView>| {
        view.map(|v| v.partitions.into_iter().map(|p| (p.partition, p.token, p.acked)).collect::<Vec<_>>())
    };
    let before = written(store.view(&name).await.expect("view"));
    let never =
        [StreamCursor::new(vec![0x03, 0, 0, 0, 0, 0, 0, 0x7f, 0xff]), StreamCursor::from_hex("01ff").expect("hex")];
    for cursor in &never {
        assert!(matches!(sub.ack(cursor).await, Err(Error::Validation { .. })), "{cursor}");
        assert!(matches!(sub.ticket(cursor), Err(Error::Validation { .. })), "{cursor}");
    }
    assert_eq!(written(store.view(&name).await.expect("view")), before, "nothing was written");
    sub.ack(&got[0].cursor).await.expect("the delivered one acknowledges");
    assert!(matches!(sub.ack(&got[0].cursor).await, Err(Error::Validation { .. })), "already acknowledged");
}

/// A member's partitions move away and come back with new tokens (another member joins, which
/// takes the upper half, and leaves, which frees it) while events it had read wait in its
/// buffer: it reads them again from the stored position and hands each out once, and each one
/// acknowledges.
pub async fn events_read_before_their_partition_moved_away_and_back_are_handed_out_once(backend: BackendConfig) {
    let f = fixture(backend.clone(), |c| c).await;
    let store = Store::open(&backend).await.expect("store");
    let group = unique("back");
    let request = |member: &str| DurableRequest::group(&group).with_member(member).with_lease_ttl(TTL);
    let mut first = f.tree.subscribe(request("a")).await.expect("first");
    holding(&first, 256).await;
    let ids = complete_where(f.engine.as_ref(), 5, upper_half).await;
    let partition = usize::from(ids[0].partition());
    wait_until(WAIT, "the first has read the five", || async {
        first.stats().await.is_ok_and(|s| s.partitions[partition].unacked == Some(5))
    })
    .await;
    let token = |view: &ff_completions::__store::GroupView| view.partitions[partition].token;
    let before = token(&store.view(&group).await.expect("view").expect("group"));

    let second = f.tree.subscribe(request("b")).await.expect("second");
    holding(&second, 128).await;
    drop(second);
    wait_until(WAIT, "the first holds the partition again with a newer token", || async {
        store.view(&group).await.ok().flatten().is_some_and(|v| {
            token(&v) >= before + 2 && v.partitions[partition].owner.as_ref().is_some_and(|(o, _)| o == "a")
        })
    })
    .await;
    holding(&first, 256).await;

    // Each event as it comes, acknowledged; then nothing more (a copy read before the move
    // would come now).
    let mut got: Vec<CompletionEvent> = Vec::new();
    for event in take_events(&mut first, ids.len(), WAIT).await {
        first.ack(&event.cursor).await.unwrap_or_else(|e| panic!("ack {}: {e}", event.execution_id));
        got.push(event);
    }
    assert_no_more(&mut first, QUIET).await;
    assert_exactly_once(&got, &ids, true);
}

/// A group's stored positions follow its read where nothing is delivered: a partition that only
/// receives lease entries, and completions its filter leaves out. Retention then removes all
/// the group has read; a member joins and leaves (each move reads the tree again from the
/// stored positions) and nothing ends; a completion the filter wants is delivered.
pub async fn positions_move_over_lease_entries_and_left_out_completions_so_trimming_what_was_read_ends_nothing(
    backend: BackendConfig,
) {
    let f = fixture(backend.clone(), |c| c).await;
    let store = Store::open(&backend).await.expect("store");
    let group = unique("moving");
    let wanted = ScannerFilter::new().with_namespace(Namespace::new("wanted"));
    let request = |member: &str| {
        DurableRequest::group(&group).with_member(member).with_lease_ttl(TTL).with_filter(wanted.clone())
    };
    let mut a = f.tree.subscribe(request("a")).await.expect("a");
    holding(&a, 256).await;
    // An execution whose lease is renewed again and again: its partition receives lease entries
    // only. Then completions the filter leaves out.
    let leased = running(&*f.engine, ExecutionSpec::new, 1).await[0];
    for _ in 0..20 {
        assert!(f.engine.renew_lease(&leased, "test-worker").await.expect("renew"));
    }
    complete_spread(f.engine.as_ref(), 10).await;
    let tail = store.tail().await.expect("tail");
    wait_until(WAIT, "every stored position at or past what was written", || async {
        store
            .view(&group)
            .await
            .ok()
            .flatten()
            .is_some_and(|view| view.partitions.iter().all(|p| p.acked >= crate::groups::tail_of(&tail, p.partition)))
    })
    .await;
    assert!(trim_everything(&store).await > 0, "retention removed what was read");

    let mut b = f.tree.subscribe(request("b")).await.expect("b");
    wait_until(WAIT, "a and b hold 128 each", || async { a.partitions().len() == 128 && b.partitions().len() == 128 })
        .await;
    assert_no_more(&mut b, QUIET).await;
    drop(b);
    holding(&a, 256).await;
    let ids = running(&*f.engine, |flow| ExecutionSpec::new(flow).with_namespace("wanted"), 1).await;
    assert!(f.engine.complete(&ids[0]).await.expect("complete"));
    assert_exactly_once(&take_events(&mut a, 1, WAIT).await, &ids, true);
    assert_no_more(&mut a, QUIET).await;
}

/// Every member of a group is gone while events of some partitions are written and then
/// trimmed away: their stored positions have lost events. A member that starts then does not
/// end: it goes on with what it can read.
pub async fn a_group_whose_positions_were_trimmed_away_while_no_member_ran_goes_on_and_names_what_it_cannot_read(
    backend: BackendConfig,
) {
    let f = fixture(backend.clone(), |c| c).await;
    let store = Store::open(&backend).await.expect("store");
    let group = unique("gap");
    let request = |member: &str| DurableRequest::group(&group).with_member(member).with_lease_ttl(TTL);
    let first = f.tree.subscribe(request("a")).await.expect("a");
    holding(&first, 256).await;
    drop(first);
    wait_until(WAIT, "the group has no member", || async {
        store.view(&group).await.ok().flatten().is_some_and(|v| v.members.is_empty())
    })
    .await;
    complete_where(f.engine.as_ref(), 3, |p| !upper_half(p)).await;
    assert!(trim_everything(&store).await > 0);

    let mut b = f.tree.subscribe(request("b")).await.expect("b");
    holding(&b, 256).await;
    let more = complete_where(f.engine.as_ref(), 2, upper_half).await;
    if store.tail().await.expect("tail").iter().any(|p| p.lane != 0) {
        // A stream per partition: those of the upper half lost nothing.
        assert_exactly_once(&take_events(&mut b, 2, WAIT).await, &more, true);
    }
    assert_no_more(&mut b, QUIET).await;
}

/// A process subscribing under a member id another live process of the group uses is the
/// member from then on: the earlier one's stream ends with `Fenced`, and its end (which leaves
/// the group) frees none of the partitions the new one holds.
pub async fn a_second_process_under_a_member_id_fences_the_first_in_a_shared_group_and_the_firsts_end_frees_nothing(
    backend: BackendConfig,
) {
    let f = fixture(backend.clone(), |c| c).await;
    let store = Store::open(&backend).await.expect("store");
    let group = unique("again");
    let request = || DurableRequest::group(&group).with_member("a").with_lease_ttl(TTL);
    let mut first = f.tree.subscribe(request()).await.expect("first");
    holding(&first, 256).await;
    let mut second = f.tree.subscribe(request()).await.expect("second");
    holding(&second, 256).await;
    match tokio::time::timeout(WAIT, first.next()).await {
        Ok(Some(Err(Error::Fenced { .. }))) => {}
        other => panic!("the earlier process's stream should end fenced: {other:?}"),
    }
    drop(first);
    let ids = complete_n(f.engine.as_ref(), 3).await;
    assert_exactly_once(&take_events(&mut second, 3, WAIT).await, &ids, true);
    let view = store.view(&group).await.expect("view").expect("group");
    assert!(
        view.partitions.iter().all(|p| p.owner.as_ref().is_some_and(|(owner, _)| owner == "a")),
        "the earlier process freed partitions of the newer one"
    );
    assert_eq!(second.partitions().len(), 256);
}

/// An event whose partition moved to another member (a rebalance) answers `ack` and `ticket`
/// with `Fenced`, as for any partition the member lost: the new holder delivers it again.
pub async fn ack_and_ticket_of_an_event_whose_partition_moved_to_another_member_are_fenced(backend: BackendConfig) {
    let f = fixture(backend.clone(), |c| c).await;
    let group = unique("moved");
    let request = |member: &str| DurableRequest::group(&group).with_member(member).with_lease_ttl(TTL);
    let mut a = f.tree.subscribe(request("a")).await.expect("a");
    holding(&a, 256).await;
    let ids = complete_where(f.engine.as_ref(), 1, upper_half).await;
    let got = take_events(&mut a, 1, WAIT).await;
    assert_exactly_once(&got, &ids, true);
    let mut b = f.tree.subscribe(request("b")).await.expect("b");
    wait_until(WAIT, "a and b hold 128 each", || async { a.partitions().len() == 128 && b.partitions().len() == 128 })
        .await;
    match a.ack(&got[0].cursor).await {
        Err(Error::Fenced { .. }) => {}
        other => panic!("ack of an event whose partition moved: {other:?}"),
    }
    match a.ticket(&got[0].cursor) {
        Err(Error::Fenced { .. }) => {}
        other => panic!("ticket of an event whose partition moved: {other:?}"),
    }
    assert_exactly_once(&take_events(&mut b, 1, WAIT).await, &ids, true);
}

/// An event refused (`nack`) is delivered again until the group's limit; then it is parked with
/// its reason and attempts, and its partition goes on with the next event. An operator lists it
/// and asks for a replay: the partition's holder hands it out once more, and its ack removes it.
pub async fn an_event_refused_as_often_as_allowed_is_parked_its_partition_goes_on_and_a_replay_hands_it_out_once(
    backend: BackendConfig,
) {
    let f = fixture(backend.clone(), |c| c).await;
    let admin = ff_completions::GroupAdmin::open(&backend).await.expect("admin");
    let group = unique("parks");
    let request = DurableRequest::group(&group).with_member("a").with_lease_ttl(TTL).with_park_after(2);
    let mut sub = f.tree.subscribe(request).await.expect("subscribe");
    holding(&sub, 256).await;
    let ids = complete_where(f.engine.as_ref(), 2, |_| true).await;
    let first = take_events(&mut sub, 1, WAIT).await.remove(0);
    assert_eq!(first.execution_id, ids[0]);
    assert_eq!(sub.nack(&first, "bad input").await.expect("nack"), ff_completions::Nacked::Retry { attempts: 1 });
    let again = take_events(&mut sub, 1, WAIT).await.remove(0);
    assert_eq!(again.execution_id, ids[0], "delivered again");
    assert_eq!(sub.nack(&again, "bad input").await.expect("nack"), ff_completions::Nacked::Parked { attempts: 2 });
    let next = take_events(&mut sub, 1, WAIT).await.remove(0);
    assert_eq!(next.execution_id, ids[1], "the partition goes on");
    sub.ack(&next.cursor).await.expect("ack");

    let parked = admin.parked(&group).await.expect("parked");
    assert_eq!(parked.len(), 1);
    assert_eq!((parked[0].event.execution_id, parked[0].attempts, parked[0].reason.as_str()), (ids[0], 2, "bad input"));
    assert_eq!(admin.replay(&group, Some(&[parked[0].id])).await.expect("replay"), 1);
    let replayed = take_events(&mut sub, 1, WAIT).await.remove(0);
    assert_eq!(replayed.execution_id, ids[0], "handed out again");
    sub.ack(&replayed.cursor).await.expect("the replay's ack");
    assert!(admin.parked(&group).await.expect("parked").is_empty(), "its ack removed it");
    assert_no_more(&mut sub, QUIET).await;
}

/// Moving a group's positions is refused while a member holds them, and done when forced: the
/// holder then reads on from the new position (here the tail: what was written before is
/// skipped, what comes after is delivered).
pub async fn an_operator_moves_positions_of_held_partitions_only_when_forced_and_their_holder_reads_on_from_there(
    backend: BackendConfig,
) {
    let f = fixture(backend.clone(), |c| c).await;
    let admin = ff_completions::GroupAdmin::open(&backend).await.expect("admin");
    let group = unique("moves");
    let request = DurableRequest::group(&group).with_member("a").with_lease_ttl(TTL);
    let mut sub = f.tree.subscribe(request).await.expect("subscribe");
    holding(&sub, 256).await;
    let skipped = complete_n(f.engine.as_ref(), 2).await;
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &skipped, true);
    wait_until(WAIT, "the report shows the member and its two unacknowledged events", || async {
        admin.show(&group).await.ok().flatten().is_some_and(|report| {
            report.members.len() == 1 && report.partitions.iter().map(|p| p.unacked).sum::<u32>() == 2
        })
    })
    .await;
    match admin.move_positions(&group, &ff_completions::MoveTo::Tail, None, false).await {
        Err(Error::Validation { .. }) => {}
        other => panic!("a move of held partitions without force: {other:?}"),
    }
    assert_eq!(admin.move_positions(&group, &ff_completions::MoveTo::Tail, None, true).await.expect("move").len(), 256);
    // The member learns the new tokens at a heartbeat (events it reads before then are read
    // again from the new position): it forgets its two unacknowledged events, and the heartbeat
    // after records none.
    wait_until(WAIT, "the member holds the moved partitions", || async {
        admin.show(&group).await.ok().flatten().is_some_and(|report| {
            report.partitions.iter().all(|p| p.owner.is_some()) && report.partitions.iter().all(|p| p.unacked == 0)
        })
    })
    .await;
    let later = complete_n(f.engine.as_ref(), 2).await;
    assert_exactly_once(&take_events(&mut sub, 2, WAIT).await, &later, true);
    assert_no_more(&mut sub, QUIET).await;
}
