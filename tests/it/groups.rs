//! The durable-group store: the promises every backend's store keeps (heartbeat with rebalance,
//! fenced all-or-nothing acks, leave, view; see `src/backends/groups.rs`), written once and run by
//! each backend's module under the same test names (see [`group_store_tests`]). Leases are short
//! (a few hundred milliseconds) so that lapses happen within a test; every test uses its own
//! group names.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ff_completions::__store::{Ack, GroupView, Lease, Position, Sharing, Store};
use ff_completions::{BackendConfig, Error};

use crate::contract::WAIT;

/// Declares, in the calling module, one test per store promise under its own name, each run
/// against what the module's `async fn contract_backend() -> (impl Sized, BackendConfig)`
/// returns (as [`crate::contract::contract_tests`] does). `@each` names further tests of this
/// file (for instance the SQL backends' own).
macro_rules! group_store_tests {
    () => {
        $crate::groups::group_store_tests! { @each
            a_new_groups_first_member_holds_every_partition_at_the_tail_with_token_one;
            two_then_three_members_share_the_partitions_disjointly_and_evenly;
            a_member_below_its_share_takes_no_more_than_its_share_when_more_are_free;
            eight_members_heartbeating_at_once_on_a_new_group_all_succeed_and_settle_at_32_each;
            a_silent_members_partitions_are_taken_over_after_its_ttl_with_the_next_token_and_its_acks;
            acks_move_up_never_down_and_a_batch_with_one_fenced_entry_writes_nothing;
            a_member_whose_lease_was_taken_over_is_fenced_and_changes_nothing;
            an_ack_on_a_lease_that_ran_out_is_accepted_until_another_member_takes_the_partition;
            a_rejoin_bumps_the_tokens_and_fences_the_earlier_incarnation;
            an_exclusive_member_holds_every_partition_and_its_rejoin_fences_the_old_tokens_at_once;
            a_member_that_leaves_frees_its_partitions_at_once;
            an_ack_to_an_unknown_group_is_a_validation_error_and_creates_nothing;
            bad_group_names_and_member_ids_are_validation_errors_before_any_write;
        }
    };
    (@each $($name:ident;)*) => {
        $crate::contract::backend_tests! { groups: $($name;)* }
    };
}
pub(crate) use group_store_tests;

/// How long a lease lasts in these tests.
pub const TTL: Duration = Duration::from_millis(800);

/// Every flow partition.
pub const PARTITIONS: u16 = ff_completions::PARTITION_COUNT;

/// A group name of its own for each test (well under the 64-character limit).
pub fn group_name(tag: &str) -> String {
    format!("{tag}-{}", uuid::Uuid::new_v4().simple())
}

pub async fn open(backend: &BackendConfig) -> Store {
    Store::open(backend).await.unwrap_or_else(|e| panic!("open the group store: {e}"))
}

/// One shared heartbeat that must succeed.
pub async fn beat(store: &Store, group: &str, member: &str) -> Vec<Lease> {
    beat_as(store, group, member, Sharing::Shared, false).await
}

pub async fn beat_as(store: &Store, group: &str, member: &str, sharing: Sharing, rejoin: bool) -> Vec<Lease> {
    store
        .heartbeat(group, member, TTL, sharing, rejoin)
        .await
        .unwrap_or_else(|e| panic!("heartbeat of {member} in {group}: {e}"))
}

/// The partitions of `leases`.
pub fn held(leases: &[Lease]) -> BTreeSet<u16> {
    leases.iter().map(|l| l.partition).collect()
}

/// The stored group, which must exist.
pub async fn view(store: &Store, group: &str) -> GroupView {
    store.view(group).await.unwrap_or_else(|e| panic!("view {group}: {e}")).unwrap_or_else(|| panic!("{group} exists"))
}

/// A position `n` steps above `base` in its lowest word (a position of every backend's form).
pub fn above(base: Position, n: u64) -> Position {
    Position { lo: base.lo + n, ..base }
}

/// What a new group's partition starts at, given the backend's tail: the partition's lane on a
/// backend with a lane per partition (Valkey), else the single position of lane 0.
pub fn tail_of(tail: &[Position], partition: u16) -> Position {
    if tail.iter().any(|p| p.lane != 0) {
        let at = tail.iter().find(|p| p.lane == partition).copied().unwrap_or_default();
        Position { lane: 0, ..at }
    } else {
        tail.first().map(|p| Position { lane: 0, ..*p }).unwrap_or_default()
    }
}

/// Heartbeats `member` until it holds every partition (the others' leases lapsed).
pub async fn beat_until_all(store: &Store, group: &str, member: &str) -> Vec<Lease> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let leases = beat(store, group, member).await;
        if leases.len() == usize::from(PARTITIONS) {
            return leases;
        }
        assert!(tokio::time::Instant::now() < deadline, "{member} never held every partition of {group}");
        tokio::time::sleep(TTL / 6).await;
    }
}

/// Heartbeats every member in turn for `rounds` rounds; returns each one's leases from the last.
pub async fn rounds(store: &Store, group: &str, members: &[&str], rounds: usize) -> Vec<Vec<Lease>> {
    let mut last = Vec::new();
    for _ in 0..rounds {
        last.clear();
        for member in members {
            last.push(beat(store, group, member).await);
        }
    }
    last
}

/// The members' leases are disjoint and cover every partition.
#[track_caller]
pub fn assert_disjoint_and_covering(leases: &[Vec<Lease>]) {
    let mut seen = BTreeSet::new();
    for (i, member) in leases.iter().enumerate() {
        for lease in member {
            assert!(seen.insert(lease.partition), "partition {} held twice (member {i} among others)", lease.partition);
        }
    }
    assert_eq!(seen, (0..PARTITIONS).collect(), "every partition has a holder");
}

/// Asserts the error is [`Error::Fenced`].
#[track_caller]
pub fn assert_fenced(result: Result<(), Error>, what: &str) {
    match result {
        Err(Error::Fenced { .. }) => {}
        other => panic!("{what}: expected Fenced, got {other:?}"),
    }
}

/// Asserts the error is [`Error::Validation`].
#[track_caller]
pub fn assert_validation<T: std::fmt::Debug>(result: Result<T, Error>, what: &str) {
    match result {
        Err(Error::Validation { .. }) => {}
        other => panic!("{what}: expected a validation error, got {other:?}"),
    }
}

/// Each partition's `(token, acked)` in a view.
pub fn tokens_and_acks(view: &GroupView) -> BTreeMap<u16, (u64, Position)> {
    view.partitions.iter().map(|p| (p.partition, (p.token, p.acked))).collect()
}

pub async fn a_new_groups_first_member_holds_every_partition_at_the_tail_with_token_one(backend: BackendConfig) {
    let store = open(&backend).await;
    let group = group_name("first");
    let tail = store.tail().await.expect("tail");
    let leases = beat(&store, &group, "m1").await;
    assert_eq!(held(&leases), (0..PARTITIONS).collect(), "the first member holds every partition");
    for lease in &leases {
        assert_eq!(lease.token, 1, "partition {}: the first holder's token", lease.partition);
        assert_eq!(lease.acked, tail_of(&tail, lease.partition), "partition {} starts at the tail", lease.partition);
    }
    assert_eq!(beat(&store, &group, "m1").await, leases, "a renewal changes nothing it holds");
    let stored = view(&store, &group).await;
    assert_eq!(stored.members.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>(), ["m1"]);
    assert_eq!(stored.partitions.len(), usize::from(PARTITIONS));
    assert!(stored.partitions.iter().all(|p| p.owner.as_ref().is_some_and(|(o, _)| o == "m1")));
    assert_eq!(store.view(&group_name("never")).await.expect("view"), None, "a group never created");
}

pub async fn a_member_below_its_share_takes_no_more_than_its_share_when_more_are_free(backend: BackendConfig) {
    let store = open(&backend).await;
    let group = group_name("take");
    assert_eq!(beat(&store, &group, "a").await.len(), 256);
    assert!(beat(&store, &group, "b").await.is_empty(), "nothing is free yet");
    assert_eq!(beat(&store, &group, "a").await.len(), 128, "a frees what is above its share");
    // 128 partitions are free; with three live members c's share is 86.
    let c = beat(&store, &group, "c").await;
    assert_eq!(c.len(), 86, "c took more than its share of the free partitions");
    let b = beat(&store, &group, "b").await;
    assert_eq!(b.len(), 42, "b takes what is left");
    let a = beat(&store, &group, "a").await;
    assert_eq!(a.len(), 86, "a frees down to its share");
    let b = beat(&store, &group, "b").await;
    assert_eq!(b.len(), 84, "b takes what a freed");
    assert_disjoint_and_covering(&[a, b, c]);

    // Free and lapsed partitions at once: d holds 86 on a short lease and dies; e joins. (The
    // same on one Postgres connection, past its switch to generic plans:
    // `postgres::groups::on_one_connection_a_heartbeat_takes_exactly_its_share_of_free_and_lapsed_partitions`.)
    let group = group_name("take-lapsed");
    let (long, short) = (Duration::from_secs(30), Duration::from_millis(300));
    let beat_for = |member: &'static str, ttl: Duration| {
        let (store, group) = (&store, group.clone());
        async move { store.heartbeat(&group, member, ttl, Sharing::Shared, false).await.expect("heartbeat").len() }
    };
    assert_eq!(beat_for("a", long).await, 256);
    assert_eq!(beat_for("d", short).await, 0);
    assert_eq!(beat_for("c", long).await, 0);
    assert_eq!(beat_for("a", long).await, 86);
    assert_eq!(beat_for("d", short).await, 86);
    assert_eq!(beat_for("c", long).await, 84);
    assert_eq!(beat_for("e", long).await, 0, "four live members: nothing is free");
    assert_eq!(beat_for("a", long).await, 64, "a frees 22 down to a quarter");
    tokio::time::sleep(short + Duration::from_millis(200)).await;
    // d lapsed: three live members, 22 free and 86 lapsed partitions; a's share is 86.
    assert_eq!(beat_for("a", long).await, 86, "a took more than its share of the free and lapsed partitions");
}

pub async fn two_then_three_members_share_the_partitions_disjointly_and_evenly(backend: BackendConfig) {
    let store = open(&backend).await;
    let group = group_name("share");
    beat(&store, &group, "a").await;
    let two = rounds(&store, &group, &["a", "b"], 3).await;
    assert_disjoint_and_covering(&two);
    assert_eq!(two.iter().map(Vec::len).collect::<Vec<_>>(), [128, 128]);
    let three = rounds(&store, &group, &["a", "b", "c"], 3).await;
    assert_disjoint_and_covering(&three);
    // Each holds at most the ceiling of an even share (86), so none holds fewer than 84.
    let counts: Vec<usize> = three.iter().map(Vec::len).collect();
    assert!(counts.iter().all(|n| (84..=86).contains(n)), "{counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), usize::from(PARTITIONS));
    // A partition that changed hands has a higher token than its first holder's.
    let moved: Vec<&Lease> = three[1].iter().chain(&three[2]).collect();
    assert!(moved.iter().all(|l| l.token >= 2), "tokens of partitions that changed hands");
    assert!(three[0].iter().all(|l| l.token == 1), "the first member kept its first partitions");
}

pub async fn eight_members_heartbeating_at_once_on_a_new_group_all_succeed_and_settle_at_32_each(
    backend: BackendConfig,
) {
    let group = group_name("crowd");
    let members: Vec<String> = (0..8).map(|i| format!("m{i}")).collect();
    let tasks: Vec<_> = members
        .iter()
        .map(|member| {
            let (backend, group, member) = (backend.clone(), group.clone(), member.clone());
            tokio::spawn(async move {
                let store = open(&backend).await;
                for _ in 0..5 {
                    beat(&store, &group, &member).await;
                }
                store
            })
        })
        .collect();
    // Each member goes on as the process it is (its own store: another would be a newer
    // incarnation of the member id).
    let mut stores = Vec::new();
    for task in tasks {
        stores.push(task.await.expect("a member's heartbeats"));
    }
    let mut settled = Vec::new();
    for _ in 0..3 {
        settled.clear();
        for (store, member) in stores.iter().zip(&members) {
            settled.push(beat(store, &group, member).await);
        }
    }
    assert_disjoint_and_covering(&settled);
    assert!(settled.iter().all(|l| l.len() == 32), "{:?}", settled.iter().map(Vec::len).collect::<Vec<_>>());
}

pub async fn a_silent_members_partitions_are_taken_over_after_its_ttl_with_the_next_token_and_its_acks(
    backend: BackendConfig,
) {
    let store = open(&backend).await;
    let group = group_name("takeover");
    beat(&store, &group, "a").await;
    let pair = rounds(&store, &group, &["a", "b"], 3).await;
    let (a, b) = (&pair[0], &pair[1]);
    // `a` acknowledges a position on each of its partitions, then falls silent.
    let acks: Vec<Ack> = a
        .iter()
        .map(|l| Ack { partition: l.partition, token: l.token, position: above(l.acked, 5 + u64::from(l.partition)) })
        .collect();
    store.ack(&group, "a", &acks).await.expect("a's acks");
    let took = beat_until_all(&store, &group, "b").await;
    let by_partition: BTreeMap<u16, &Lease> = took.iter().map(|l| (l.partition, l)).collect();
    for ack in &acks {
        let now = by_partition[&ack.partition];
        assert_eq!(now.token, ack.token + 1, "partition {}: the next token", ack.partition);
        assert_eq!(now.acked, ack.position, "partition {}: the position a left", ack.partition);
    }
    for lease in b {
        assert_eq!(by_partition[&lease.partition].token, lease.token, "b's own partitions keep their tokens");
    }
    let stored = view(&store, &group).await;
    assert_eq!(stored.members.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>(), ["b"], "a was removed");
}

pub async fn acks_move_up_never_down_and_a_batch_with_one_fenced_entry_writes_nothing(backend: BackendConfig) {
    let store = open(&backend).await;
    let group = group_name("acks");
    let leases = beat(&store, &group, "a").await;
    let (p0, p1) = (leases[0], leases[1]);
    let ack =
        |lease: Lease, token: u64, n: u64| Ack { partition: lease.partition, token, position: above(lease.acked, n) };
    store.ack(&group, "a", &[ack(p0, p0.token, 10), ack(p1, p1.token, 20)]).await.expect("acks");
    store.ack(&group, "a", &[ack(p0, p0.token, 3)]).await.expect("a lower ack is accepted");
    store.ack(&group, "a", &[ack(p1, p1.token, 20)]).await.expect("an equal ack is accepted");
    let after = tokens_and_acks(&view(&store, &group).await);
    assert_eq!(after[&p0.partition], (p0.token, above(p0.acked, 10)), "a lower ack changes nothing");
    assert_eq!(after[&p1.partition], (p1.token, above(p1.acked, 20)));
    // The same member's later ack of both partitions moves both.
    store.ack(&group, "a", &[ack(p0, p0.token, 11), ack(p1, p1.token, 21)]).await.expect("acks");
    let moved = tokens_and_acks(&view(&store, &group).await);
    assert_eq!(moved[&p0.partition].1, above(p0.acked, 11));
    assert_eq!(moved[&p1.partition].1, above(p1.acked, 21));

    // One wrong token in a batch: none of it is written.
    let batch = [ack(p0, p0.token, 50), ack(p1, p1.token + 7, 50)];
    assert_fenced(store.ack(&group, "a", &batch).await, "a batch with a wrong token");
    assert_eq!(tokens_and_acks(&view(&store, &group).await), moved, "nothing of the batch was written");
    // A partition another member holds: the same.
    let pair = rounds(&store, &group, &["a", "b"], 3).await;
    let theirs = pair[1][0];
    let batch = [ack(p0, p0.token, 60), ack(theirs, theirs.token, 60)];
    assert_fenced(store.ack(&group, "a", &batch).await, "a batch with another member's partition");
    let untouched = tokens_and_acks(&view(&store, &group).await);
    assert_eq!(untouched[&p0.partition].1, above(p0.acked, 11), "nothing of the batch was written");
    assert_eq!(untouched[&theirs.partition].1, theirs.acked, "nothing of the batch was written");
}

pub async fn a_member_whose_lease_was_taken_over_is_fenced_and_changes_nothing(backend: BackendConfig) {
    let store = open(&backend).await;
    let group = group_name("stale");
    let old = beat(&store, &group, "a").await;
    beat_until_all(&store, &group, "b").await;
    let before = view(&store, &group).await;
    let stale = Ack { partition: old[0].partition, token: old[0].token, position: above(old[0].acked, 9) };
    assert_fenced(store.ack(&group, "a", &[stale]).await, "a stale member's ack");
    assert_eq!(view(&store, &group).await.partitions, before.partitions, "a fenced ack changes nothing");
    // Its new heartbeat takes nothing from a live holder.
    assert!(beat(&store, &group, "a").await.len() < usize::from(PARTITIONS));
}

/// A lease that ran out and that nobody took yet still takes its holder's ack: only a takeover
/// (token + 1) moves the partition's events to another member. Were the ack refused, the
/// member would renew the lease with the same token, acknowledge later events, and the refused
/// one would never be delivered again.
pub async fn an_ack_on_a_lease_that_ran_out_is_accepted_until_another_member_takes_the_partition(
    backend: BackendConfig,
) {
    let store = open(&backend).await;
    let group = group_name("ran-out");
    let short = Duration::from_millis(200);
    let leases = store.heartbeat(&group, "a", short, Sharing::Shared, false).await.expect("a's heartbeat");
    let lease = leases[0];
    tokio::time::sleep(short * 2).await;
    let lapsed = view(&store, &group).await;
    let (owner, expires) = lapsed.partitions[usize::from(lease.partition)].owner.clone().expect("still a's");
    assert!(owner == "a" && expires <= ff_completions::TimestampMs::now(), "a's lease ran out, untaken");
    let ack = Ack { partition: lease.partition, token: lease.token, position: above(lease.acked, 3) };
    store.ack(&group, "a", &[ack]).await.expect("an ack on a lease that ran out, untaken");
    assert_eq!(tokens_and_acks(&view(&store, &group).await)[&lease.partition], (lease.token, ack.position));

    beat_until_all(&store, &group, "b").await;
    let before = view(&store, &group).await;
    let later = Ack { position: above(lease.acked, 4), ..ack };
    assert_fenced(store.ack(&group, "a", &[later]).await, "an ack after another member took the partition");
    assert_eq!(view(&store, &group).await.partitions, before.partitions, "a fenced ack changes nothing");
}

pub async fn a_rejoin_bumps_the_tokens_and_fences_the_earlier_incarnation(backend: BackendConfig) {
    let store = open(&backend).await;
    let group = group_name("rejoin");
    let first = beat(&store, &group, "a").await;
    let again = beat_as(&store, &group, "a", Sharing::Shared, true).await;
    assert_eq!(held(&again), held(&first), "a rejoin keeps its partitions");
    assert!(again.iter().zip(&first).all(|(n, o)| n.token == o.token + 1), "every token is raised");
    let before = view(&store, &group).await;
    let old = Ack { partition: first[3].partition, token: first[3].token, position: above(first[3].acked, 4) };
    assert_fenced(store.ack(&group, "a", &[old]).await, "the earlier incarnation's ack");
    assert_eq!(view(&store, &group).await.partitions, before.partitions, "a fenced ack changes nothing");
    let new = Ack { token: again[3].token, ..old };
    store.ack(&group, "a", &[new]).await.expect("the new incarnation's ack");
    assert_eq!(tokens_and_acks(&view(&store, &group).await)[&old.partition], (again[3].token, old.position));
}

pub async fn an_exclusive_member_holds_every_partition_and_its_rejoin_fences_the_old_tokens_at_once(
    backend: BackendConfig,
) {
    let store = open(&backend).await;
    let group = group_name("exclusive");
    let first = beat_as(&store, &group, "solo", Sharing::Exclusive, true).await;
    assert_eq!(held(&first), (0..PARTITIONS).collect());
    assert!(first.iter().all(|l| l.token == 1));
    // Another exclusive member gets nothing while the holder is live.
    assert_eq!(beat_as(&store, &group, "other", Sharing::Exclusive, true).await, Vec::new());
    // Even with a second live member, the exclusive holder keeps everything.
    assert_eq!(held(&beat_as(&store, &group, "solo", Sharing::Exclusive, false).await), held(&first));
    let second = beat_as(&store, &group, "solo", Sharing::Exclusive, true).await;
    assert_eq!(held(&second), held(&first));
    assert!(second.iter().all(|l| l.token == 2), "every token raised at once");
    let old: Vec<Ack> = first
        .iter()
        .take(3)
        .map(|l| Ack { partition: l.partition, token: l.token, position: above(l.acked, 1) })
        .collect();
    assert_fenced(store.ack(&group, "solo", &old).await, "the old incarnation's acks");
    let new: Vec<Ack> = old.iter().map(|a| Ack { token: 2, ..*a }).collect();
    store.ack(&group, "solo", &new).await.expect("the new incarnation's acks");
}

pub async fn a_member_that_leaves_frees_its_partitions_at_once(backend: BackendConfig) {
    let store = open(&backend).await;
    let group = group_name("leave");
    beat(&store, &group, "a").await;
    let pair = rounds(&store, &group, &["a", "b"], 3).await;
    store.leave(&group, "b").await.expect("leave");
    let stored = view(&store, &group).await;
    assert!(stored.members.iter().all(|(m, _)| m != "b"), "b is no longer a member");
    for lease in &pair[1] {
        let p = &stored.partitions[usize::from(lease.partition)];
        assert_eq!(p.owner, None, "partition {} is free", lease.partition);
        assert_eq!((p.token, p.acked), (lease.token, lease.acked), "a leave keeps the token and position");
    }
    let all = beat(&store, &group, "a").await;
    assert_eq!(all.len(), usize::from(PARTITIONS), "a takes b's partitions at once");
    let tokens: BTreeMap<u16, u64> = all.iter().map(|l| (l.partition, l.token)).collect();
    assert!(pair[1].iter().all(|l| tokens[&l.partition] == l.token + 1), "with the next token");
    // Leaving twice, or a group that does not exist, changes nothing.
    store.leave(&group, "b").await.expect("leave again");
    store.leave(&group_name("nowhere"), "b").await.expect("leave an unknown group");
    assert_eq!(view(&store, &group).await.partitions.iter().filter(|p| p.owner.is_some()).count(), 256);
}

pub async fn an_ack_to_an_unknown_group_is_a_validation_error_and_creates_nothing(backend: BackendConfig) {
    let store = open(&backend).await;
    let group = group_name("unknown");
    let ack = Ack { partition: 1, token: 1, position: Position::default() };
    assert_validation(store.ack(&group, "a", &[ack]).await, "an ack to an unknown group");
    assert_eq!(store.view(&group).await.expect("view"), None, "the group was not created");
}

pub async fn bad_group_names_and_member_ids_are_validation_errors_before_any_write(backend: BackendConfig) {
    let store = open(&backend).await;
    let longest = format!("g{}", "x".repeat(63));
    let too_long = format!("{longest}y");
    let with_nul = format!("g\0{}", uuid::Uuid::new_v4().simple());
    for bad in [too_long.as_str(), with_nul.as_str(), ""] {
        assert_validation(store.heartbeat(bad, "a", TTL, Sharing::Shared, true).await, "heartbeat of a bad group");
        assert_validation(store.ack(bad, "a", &[]).await, "ack of a bad group");
        assert_validation(store.leave(bad, "a").await, "leave of a bad group");
        assert_validation(store.view(bad).await, "view of a bad group");
    }
    let group = group_name("badmember");
    for bad in ["m\0", &"m".repeat(65), ""] {
        assert_validation(store.heartbeat(&group, bad, TTL, Sharing::Shared, true).await, "heartbeat of a bad member");
        assert_validation(store.ack(&group, bad, &[]).await, "ack of a bad member");
        assert_validation(store.leave(&group, bad).await, "leave of a bad member");
    }
    assert_eq!(store.view(&group).await.expect("view"), None, "nothing was created");
    // The longest name is accepted.
    assert_eq!(beat(&store, &longest, "a").await.len(), usize::from(PARTITIONS));
    assert_validation(store.view(&too_long).await, "the name one character longer");
}

/// SQL stores keep positions as bigints: a word above `i64::MAX` (here the transaction or
/// stream word) is refused, never wrapped.
pub async fn a_position_above_i64_max_is_a_validation_error_and_changes_nothing(backend: BackendConfig) {
    let store = open(&backend).await;
    let group = group_name("huge");
    let leases = beat(&store, &group, "a").await;
    let before = view(&store, &group).await;
    let fits = Ack { partition: leases[0].partition, token: leases[0].token, position: above(leases[0].acked, 1) };
    let huge = Ack { position: Position { hi: i64::MAX as u64 + 1, ..leases[1].acked }, ..fits };
    let huge = Ack { partition: leases[1].partition, token: leases[1].token, ..huge };
    assert_validation(store.ack(&group, "a", &[fits, huge]).await, "an ack above i64::MAX");
    assert_eq!(view(&store, &group).await.partitions, before.partitions, "nothing was written");
}

/// An effect row and an ack in the caller's own transaction, as the SQL stores' `ack_in` serves
/// it: what a test needs to say about the transaction.
pub struct InTransaction {
    /// The ack went through.
    pub acked: Result<(), Error>,
    /// The effect row is there after the transaction committed (or rolled back on an error).
    pub effect_kept: bool,
}

/// The promise both SQL backends keep for an ack in the caller's transaction: not fenced, the
/// effect and the position commit together; fenced, or at or below the acknowledged position
/// (the event's effect committed before), the transaction rolls back and neither is written. `in_tx(group, acks, effect id)` runs an effect insert and `ack_in` in one
/// transaction, committing on success and rolling back on an error.
pub async fn assert_ack_in_transaction_commits_or_rolls_back_with_the_effect<F, Fut>(store: &Store, mut in_tx: F)
where
    F: FnMut(String, Vec<Ack>, i64) -> Fut,
    Fut: std::future::Future<Output = InTransaction>,
{
    let group = group_name("tx");
    let first = beat_as(store, &group, "a", Sharing::Shared, true).await;
    let lease = first[0];
    let good = Ack { partition: lease.partition, token: lease.token, position: above(lease.acked, 5) };
    let done = in_tx(group.clone(), vec![good], 1).await;
    done.acked.expect("an ack of a held partition");
    assert!(done.effect_kept, "the effect committed with the ack");
    assert_eq!(tokens_and_acks(&view(store, &group).await)[&lease.partition], (lease.token, good.position));

    // A newer incarnation fences the old token: the effect is rolled back with the ack.
    let second = beat_as(store, &group, "a", Sharing::Shared, true).await;
    let before = view(store, &group).await;
    let stale = Ack { position: above(lease.acked, 9), ..good };
    let done = in_tx(group.clone(), vec![stale], 2).await;
    assert_fenced(done.acked, "an ack with the old token in the caller's transaction");
    assert!(!done.effect_kept, "the effect rolled back with the fenced ack");
    assert_eq!(view(store, &group).await.partitions, before.partitions, "nothing of the ack was written");

    let fresh = Ack { token: second[0].token, ..stale };
    let done = in_tx(group.clone(), vec![fresh], 3).await;
    done.acked.expect("an ack with the new token");
    assert!(done.effect_kept);
    assert_eq!(tokens_and_acks(&view(store, &group).await)[&lease.partition], (second[0].token, fresh.position));

    // The same event's effect again (an event handed out twice, a transaction retried after an
    // unknown commit outcome), or an earlier one's: refused, the effect rolls back.
    let acked = view(store, &group).await;
    for (again, id) in [(fresh, 4), (Ack { position: above(lease.acked, 7), ..fresh }, 5)] {
        let done = in_tx(group.clone(), vec![again], id).await;
        assert!(
            matches!(done.acked, Err(Error::AlreadyAcknowledged { .. })),
            "an ack at or below the acknowledged position: {:?}",
            done.acked
        );
        assert!(!done.effect_kept, "the effect rolled back with the refused ack");
        assert_eq!(view(store, &group).await.partitions, acked.partitions, "nothing of the ack was written");
    }
}
