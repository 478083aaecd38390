//! Scratch: the store promises on Valkey, until the shared `group_store_tests!` lands.

use std::time::Duration;

use ff_completions::testing::{Ack, GroupStore, Lease, Position, Sharing};
use ff_completions::{BackendConfig, EngineError};

const LONG: Duration = Duration::from_secs(60);
const SHARED: Sharing = Sharing::Shared;

async fn beat(store: &GroupStore, group: &str, member: &str) -> Vec<Lease> {
    store.heartbeat(group, member, LONG, SHARED, false).await.expect("heartbeat")
}

fn parts(leases: &[Lease]) -> Vec<u16> {
    leases.iter().map(|l| l.partition).collect()
}

pub async fn first_member_holds_everything_at_the_tail_with_token_one(config: BackendConfig) {
    let store = GroupStore::open(&config).await.expect("open");
    assert!(store.view("g1").await.expect("view").is_none());
    let leases = store.heartbeat("g1", "a", LONG, SHARED, true).await.expect("hb");
    assert_eq!(parts(&leases), (0..256).collect::<Vec<_>>());
    assert!(leases.iter().all(|l| l.token == 1 && l.acked == Position::default()), "{:?}", &leases[..2]);
    let view = store.view("g1").await.expect("view").expect("exists");
    assert_eq!(view.members.len(), 1);
    assert_eq!(view.partitions.len(), 256);
    assert!(view.partitions.iter().all(|p| p.owner.as_ref().map(|o| o.0.as_str()) == Some("a")));
}

pub async fn members_share_evenly(config: BackendConfig) {
    let store = GroupStore::open(&config).await.expect("open");
    beat(&store, "g", "a").await;
    beat(&store, "g", "b").await;
    let mut held = (Vec::new(), Vec::new());
    for _ in 0..3 {
        held = (beat(&store, "g", "a").await, beat(&store, "g", "b").await);
    }
    assert_eq!((held.0.len(), held.1.len()), (128, 128));
    let mut all: Vec<u16> = parts(&held.0).into_iter().chain(parts(&held.1)).collect();
    all.sort();
    assert_eq!(all, (0..256).collect::<Vec<_>>());
    let mut three = Vec::new();
    for _ in 0..4 {
        three = vec![beat(&store, "g", "a").await, beat(&store, "g", "b").await, beat(&store, "g", "c").await];
    }
    let mut counts: Vec<usize> = three.iter().map(Vec::len).collect();
    counts.sort();
    eprintln!("three members hold {counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), 256);
}

pub async fn a_silent_member_loses_its_partitions_with_token_up_and_acked_kept(config: BackendConfig) {
    let store = GroupStore::open(&config).await.expect("open");
    let short = Duration::from_millis(300);
    let a = store.heartbeat("g", "a", short, SHARED, true).await.expect("a");
    let p0 = a[0];
    store
        .ack(
            "g",
            "a",
            &[Ack { partition: p0.partition, token: p0.token, position: Position { lane: 0, major: 0, hi: 5, lo: 7 } }],
        )
        .await
        .expect("ack");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let taken = loop {
        let taken = beat(&store, "g", "b").await;
        if taken.len() == 256 {
            break taken;
        }
        assert!(std::time::Instant::now() < deadline, "b never took a's partitions: {}", taken.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(taken[0].token, p0.token + 1);
    assert_eq!(taken[0].acked, Position { lane: 0, major: 0, hi: 5, lo: 7 });
    let stale = store.ack("g", "a", &[Ack { partition: 0, token: p0.token, position: Position::default() }]).await;
    assert!(matches!(stale, Err(EngineError::Fenced { .. })), "{stale:?}");
}

pub async fn acks_move_up_only_and_a_fenced_batch_writes_nothing(config: BackendConfig) {
    let store = GroupStore::open(&config).await.expect("open");
    let a = beat(&store, "g", "a").await;
    let at = |hi, lo| Position { lane: 0, major: 0, hi, lo };
    let t = a[0].token;
    store.ack("g", "a", &[Ack { partition: 0, token: t, position: at(10, 2) }]).await.expect("ack");
    store.ack("g", "a", &[Ack { partition: 0, token: t, position: at(9, 99) }]).await.expect("lower ack");
    store.ack("g", "a", &[Ack { partition: 0, token: t, position: at(10, 10) }]).await.expect("ack");
    let view = store.view("g").await.expect("view").expect("exists");
    assert_eq!(view.partitions[0].acked, at(10, 10));
    let batch =
        [Ack { partition: 1, token: t, position: at(20, 0) }, Ack { partition: 2, token: t + 1, position: at(20, 0) }];
    let err = store.ack("g", "a", &batch).await;
    assert!(matches!(err, Err(EngineError::Fenced { .. })), "{err:?}");
    let view = store.view("g").await.expect("view").expect("exists");
    assert_eq!(view.partitions[1].acked, Position::default());
    let unknown = store.ack("nope", "a", &[Ack { partition: 0, token: 1, position: at(1, 1) }]).await;
    assert!(matches!(unknown, Err(EngineError::Validation { .. })), "{unknown:?}");
    assert!(store.view("nope").await.expect("view").is_none());
    let long = "x".repeat(65);
    for (g, m) in [(long.as_str(), "a"), ("a\0b", "a"), ("g", "a\0")] {
        let e = store.heartbeat(g, m, LONG, SHARED, false).await;
        assert!(matches!(e, Err(EngineError::Validation { .. })), "{e:?}");
    }
    assert!(store.view("a\0b").await.is_err());
}

pub async fn exclusive_rejoin_bumps_and_leave_frees(config: BackendConfig) {
    let store = GroupStore::open(&config).await.expect("open");
    let a = store.heartbeat("x", "a", LONG, Sharing::Exclusive, true).await.expect("a");
    assert_eq!(a.len(), 256);
    let b = store.heartbeat("x", "b", LONG, Sharing::Exclusive, true).await.expect("b");
    assert!(b.is_empty());
    let again = store.heartbeat("x", "a", LONG, Sharing::Exclusive, true).await.expect("a again");
    assert!(again.iter().all(|l| l.token == 2));
    let old = store.ack("x", "a", &[Ack { partition: 3, token: 1, position: Position::default() }]).await;
    assert!(matches!(old, Err(EngineError::Fenced { .. })), "{old:?}");
    store.leave("x", "a").await.expect("leave");
    store.leave("x", "zz").await.expect("leave unknown");
    store.leave("never", "zz").await.expect("leave unknown group");
    assert!(store.view("never").await.expect("view").is_none());
    let b = store.heartbeat("x", "b", LONG, Sharing::Exclusive, false).await.expect("b");
    assert_eq!(b.len(), 256);
    assert!(b.iter().all(|l| l.token == 3));
}

macro_rules! scratch {
    ($($name:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let (_guard, backend) = contract_backend().await;
            crate::valkey::groups_scratch::$name(backend).await;
        }
    )*};
}
pub(crate) use scratch;
