//! Reading the completion streams, lane by lane or many at once.
//!
//! - One lane: `FCALL ff_read_after` on its stream; ferriskey routes it to the primary owning
//!   the stream's slot and follows `MOVED`/`ASK` itself.
//! - Many lanes (a full read, a tail, a cursor's check): the lanes grouped by the primary that
//!   owns their stream's slot, one `FCALL ff_read_streams` per group (one call in all on a
//!   single node), routed by one of the group's streams. The grouping comes from
//!   `CLUSTER SLOTS` and is kept until a call finds a lane its node does not serve. Whatever a
//!   group's call cannot answer (a slot that moved, is migrating or importing; a call refused
//!   other than by the network) is read one lane at a time as above, so a stale grouping costs
//!   round trips, never events: each lane is answered by exactly one atomic look.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ferriskey::{Client, Value};
use tokio::sync::Semaphore;

use super::LEGACY_STREAM_KEY;
use super::keys;
use super::library::{fcall, map_err};
use super::stream::{ReadView, format_id, read_view, text};
use crate::backends::outbox::shown;
use crate::cursor::{Frontier, Position, VALKEY_LEGACY_LANE};
use crate::error::Error;

/// Slots of a Valkey Cluster.
const SLOTS: u16 = 16384;

/// `ff_read_streams` calls one source has in flight at most. Each looks at up to 257 streams
/// and reads up to a batch, so the server runs it for milliseconds: with one in flight per
/// catching-up subscriber, 256 of them queued on one primary outlasted the request timeout.
/// Waiting for a permit happens before the request is sent, outside its timeout.
const GROUP_CALLS_IN_FLIGHT: usize = 8;

/// The stream of a lane.
pub(super) fn lane_key(lane: u16) -> String {
    if lane == VALKEY_LEGACY_LANE { LEGACY_STREAM_KEY.to_owned() } else { keys::stream(lane) }
}

/// Every lane: the partitions, then the single stream of earlier versions.
pub(super) fn all_lanes() -> impl Iterator<Item = u16> {
    keys::partitions().chain(std::iter::once(VALKEY_LEGACY_LANE))
}

/// The cluster slot of `key`: crc16 (XMODEM) of its hash tag (the text between the first `{`
/// and the next `}`, when not empty) or of the whole key, modulo 16384.
pub(super) fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|b| *b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|b| *b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    crc16::State::<crc16::XMODEM>::calculate(hashed) % SLOTS
}

/// A lane's look: what its stream holds (and the entries read, when asked for), and how many
/// entries the read asked for (a read that got that many may have left more).
#[derive(Clone, Debug)]
pub(super) struct Looked {
    pub lane: u16,
    pub view: ReadView,
    pub asked: usize,
}

/// One atomic look at a lane's stream: up to `count` entries after `after`, and what was
/// trimmed (positions in that lane).
pub(super) async fn look(client: &Client, lane: u16, after: Position, count: usize) -> Result<ReadView, Error> {
    let args = [format_id(after), count.to_string()];
    let reply: Value = fcall(client, "ff_read_after", &[lane_key(lane)], &args).await?;
    let view = read_view(&reply).map_err(|detail| Error::schema("ff_read_after", detail))?;
    Ok(in_lane(view, lane))
}

fn in_lane(view: ReadView, lane: u16) -> ReadView {
    ReadView {
        first: view.first.map(|p| p.in_lane(lane)),
        last_generated: view.last_generated.map(|p| p.in_lane(lane)),
        ..view
    }
}

fn closed() -> Error {
    Error::Actor { detail: "the read permits were closed".into() }
}

/// Looks at `lanes` one call each (as many at a time as `reads` allows), each from `after`'s
/// position in it.
pub(super) async fn look_each(
    client: &Client,
    reads: &Semaphore,
    after: &Frontier,
    lanes: impl IntoIterator<Item = u16>,
    count: usize,
) -> Result<Vec<(u16, ReadView)>, Error> {
    futures::future::try_join_all(lanes.into_iter().map(|lane| async move {
        let _permit = reads.acquire().await.map_err(|_| closed())?;
        Ok((lane, look(client, lane, after.get(lane), count).await?))
    }))
    .await
}

/// Entries each lane with news gets of `budget`: an even share, at least 8 (or the budget).
fn share_of(budget: usize, lanes: usize) -> usize {
    if budget == 0 || lanes == 0 {
        return 0;
    }
    (budget / lanes).clamp(8.min(budget), budget)
}

/// Which lanes live together on one primary; kept by a source across reads.
pub(super) struct Shards {
    cluster: bool,
    groups: Mutex<Option<Arc<Vec<Vec<u16>>>>>,
    calls: Semaphore,
}

impl Shards {
    /// The grouping for a single node (one group) or a cluster (asked on first use).
    pub(super) fn new(cluster: bool) -> Self {
        Self { cluster, groups: Mutex::new(None), calls: Semaphore::new(GROUP_CALLS_IN_FLIGHT) }
    }

    fn cached(&self) -> Option<Arc<Vec<Vec<u16>>>> {
        self.groups.lock().ok().and_then(|g| g.clone())
    }

    fn keep(&self, groups: Option<Arc<Vec<Vec<u16>>>>) {
        if let Ok(mut g) = self.groups.lock() {
            *g = groups;
        }
    }

    /// Forgets the grouping: the next look asks the cluster again.
    fn forget(&self) {
        self.keep(None);
    }

    /// Every lane grouped by its primary; `None` when the cluster did not say (every lane is
    /// then read on its own).
    async fn groups(&self, client: &Client) -> Option<Arc<Vec<Vec<u16>>>> {
        if let Some(groups) = self.cached() {
            return Some(groups);
        }
        let groups = if self.cluster {
            let reply = client.cmd("CLUSTER").arg("SLOTS").execute::<Value>().await;
            match reply.map_err(map_err("valkey CLUSTER SLOTS")).map(|r| group_by_owner(&r)) {
                Ok(Some(groups)) => groups,
                Ok(None) => {
                    tracing::debug!("CLUSTER SLOTS did not cover every stream's slot; reading lane by lane");
                    return None;
                }
                Err(error) => {
                    tracing::debug!(%error, "CLUSTER SLOTS failed; reading lane by lane");
                    return None;
                }
            }
        } else {
            vec![all_lanes().collect()]
        };
        let groups = Arc::new(groups);
        self.keep(Some(groups.clone()));
        Some(groups)
    }
}

/// Every lane grouped by the primary serving its stream's slot, from a `CLUSTER SLOTS` reply
/// (`[[start, end, [host, port, ..], replicas..], ..]`); `None` when a slot is not covered or
/// the reply has another shape.
fn group_by_owner(reply: &Value) -> Option<Vec<Vec<u16>>> {
    let Value::Array(ranges) = reply else { return None };
    let mut owners: Vec<(u16, u16, String)> = Vec::new();
    for range in ranges {
        let Ok(Value::Array(parts)) = range else { return None };
        let [Ok(start), Ok(end), Ok(Value::Array(primary)), ..] = parts.as_slice() else { return None };
        let number = |v: &Value| text(v).and_then(|t| t.parse::<u16>().ok());
        let (Some(start), Some(end)) = (number(start), number(end)) else { return None };
        let [Ok(host), Ok(port), ..] = primary.as_slice() else { return None };
        owners.push((start, end, format!("{}:{}", text(host)?, text(port)?)));
    }
    let mut groups: BTreeMap<&str, Vec<u16>> = BTreeMap::new();
    for lane in all_lanes() {
        let slot = slot_of(&lane_key(lane));
        let (_, _, owner) = owners.iter().find(|(start, end, _)| (*start..=*end).contains(&slot))?;
        groups.entry(owner.as_str()).or_default().push(lane);
    }
    Some(groups.into_values().collect())
}

/// What one `ff_read_streams` call answered: the lanes with news, and those its node does
/// not serve.
#[derive(Debug, Default)]
struct GroupReply {
    looked: Vec<Looked>,
    elsewhere: Vec<u16>,
}

/// Parses `{share, lanes}` for the call over `lanes` (in the order they were passed).
fn group_reply(reply: &Value, lanes: &[u16]) -> Result<GroupReply, String> {
    let bad = || format!("ff_read_streams answered {}", shown(reply));
    let Value::Array(parts) = reply else { return Err(bad()) };
    let [Ok(share), Ok(Value::Array(records))] = parts.as_slice() else { return Err(bad()) };
    let asked = text(share).and_then(|t| t.parse::<usize>().ok()).ok_or_else(bad)?;
    let mut out = GroupReply::default();
    for record in records {
        let Ok(Value::Array(fields)) = record else { return Err(bad()) };
        let [Ok(index), Ok(status), rest @ ..] = fields.as_slice() else { return Err(bad()) };
        let lane = text(index)
            .and_then(|t| t.parse::<usize>().ok())
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| lanes.get(i).copied())
            .ok_or_else(bad)?;
        match text(status).as_deref() {
            Some("ok") => {
                let view = read_view(&Value::Array(rest.to_vec()))?;
                out.looked.push(Looked { lane, view: in_lane(view, lane), asked });
            }
            Some("elsewhere") => out.elsewhere.push(lane),
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

/// One `ff_read_streams` call over `lanes`, routed by the first lane's stream.
async fn look_group(
    client: &Client,
    calls: &Semaphore,
    after: &Frontier,
    lanes: &[u16],
    budget: usize,
) -> Result<GroupReply, Error> {
    let Some(first) = lanes.first() else { return Ok(GroupReply::default()) };
    let mut args = Vec::with_capacity(1 + 2 * lanes.len());
    args.push(budget.to_string());
    for lane in lanes {
        args.push(lane_key(*lane));
        args.push(format_id(after.get(*lane)));
    }
    let _permit = calls.acquire().await.map_err(|_| closed())?;
    let reply: Value = fcall(client, "ff_read_streams", &[lane_key(*first)], &args).await?;
    group_reply(&reply, lanes).map_err(|detail| Error::schema("ff_read_streams", detail))
}

/// A call refused by the server (a redirect it could not follow, a cross-slot refusal, an
/// unexpected reply), as opposed to one the network or the server's absence failed: the first
/// kind is retried lane by lane, the second is the read's error.
fn refused(error: &Error) -> bool {
    matches!(error, Error::Schema { .. } | Error::Validation { .. })
}

/// Looks at every lane of `lanes` from `after`'s position in it and returns those with entries
/// after that position (so every lane whose entries above it were trimmed, too). With a
/// `budget`, also reads entries: each primary's call splits `budget` over its lanes with news
/// (the single stream of earlier versions alone while it has news), and the lanes read on
/// their own split another `budget`.
pub(super) async fn look_many(
    client: &Client,
    reads: &Semaphore,
    shards: &Shards,
    after: &Frontier,
    lanes: impl IntoIterator<Item = u16>,
    budget: usize,
) -> Result<Vec<Looked>, Error> {
    let wanted: Vec<u16> = lanes.into_iter().collect();
    let (grouped, mut alone): (Vec<Vec<u16>>, Vec<u16>) = match shards.groups(client).await {
        Some(groups) => {
            let grouped = groups.iter().map(|g| g.iter().copied().filter(|l| wanted.contains(l)).collect::<Vec<_>>());
            (grouped.filter(|g| !g.is_empty()).collect(), Vec::new())
        }
        None => (Vec::new(), wanted),
    };
    let replies =
        futures::future::join_all(grouped.iter().map(|g| look_group(client, &shards.calls, after, g, budget))).await;
    let mut looked = Vec::new();
    for (group, reply) in grouped.iter().zip(replies) {
        match reply {
            Ok(reply) => {
                looked.extend(reply.looked);
                alone.extend(reply.elsewhere);
            }
            Err(error) if refused(&error) => {
                tracing::debug!(%error, lanes = group.len(), "a grouped read was refused; reading its lanes one by one");
                alone.extend(group.iter().copied());
            }
            Err(error) => return Err(error),
        }
    }
    if !alone.is_empty() {
        if shards.cluster {
            shards.forget();
        }
        looked.extend(look_alone(client, reads, after, alone, budget).await?);
    }
    Ok(looked)
}

/// The lanes with news among `lanes`, each looked at on its own, then read with a share of
/// `budget` (the single stream of earlier versions alone while it has news).
async fn look_alone(
    client: &Client,
    reads: &Semaphore,
    after: &Frontier,
    lanes: Vec<u16>,
    budget: usize,
) -> Result<Vec<Looked>, Error> {
    let with_news = |views: Vec<(u16, ReadView)>| -> Vec<(u16, ReadView)> {
        views
            .into_iter()
            .filter(|(lane, v)| v.last_generated.is_some_and(|last| !after.covers(last.in_lane(*lane))))
            .collect()
    };
    let news = with_news(look_each(client, reads, after, lanes, 0).await?);
    let mut pending: Vec<u16> = news.iter().map(|(lane, _)| *lane).collect();
    if pending.contains(&VALKEY_LEGACY_LANE) {
        pending = vec![VALKEY_LEGACY_LANE];
    }
    let asked = share_of(budget, pending.len());
    if asked == 0 {
        return Ok(news.into_iter().map(|(lane, view)| Looked { lane, view, asked }).collect());
    }
    // Read again: the entries, and a fresh look at what was trimmed meanwhile.
    let read = with_news(look_each(client, reads, after, pending.iter().copied(), asked).await?);
    let looked = news.into_iter().filter(|(lane, _)| !pending.contains(lane)).map(|(lane, view)| Looked {
        lane,
        view: ReadView { entries: Vec::new(), ..view },
        asked,
    });
    Ok(read.into_iter().map(|(lane, view)| Looked { lane, view, asked }).chain(looked).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec().into())
    }

    fn array(items: Vec<Value>) -> Value {
        Value::Array(items.into_iter().map(Ok).collect())
    }

    #[test]
    fn slots_follow_the_cluster_s_hash_tag_rule() {
        // Known values of CLUSTER KEYSLOT.
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("somekey"), 11058);
        assert_eq!(slot_of("{user1000}.following"), slot_of("{user1000}.followers"));
        assert_eq!(slot_of("foo{}{bar}"), crc16::State::<crc16::XMODEM>::calculate(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot_of("ff:completions:{fp:5}"), slot_of("fp:5"));
        assert_eq!(slot_of("{fp:5"), crc16::State::<crc16::XMODEM>::calculate(b"{fp:5") % SLOTS);
    }

    #[test]
    fn cluster_slots_group_every_lane_by_its_primary() {
        let node = |port: i64| array(vec![s("127.0.0.1"), Value::Int(port), s("id")]);
        let reply = array(vec![
            array(vec![Value::Int(0), Value::Int(5460), node(7000)]),
            array(vec![Value::Int(5461), Value::Int(10922), node(7001), node(7004)]),
            array(vec![Value::Int(10923), Value::Int(16383), node(7002)]),
        ]);
        let groups = group_by_owner(&reply).unwrap_or_else(|| panic!("no groups"));
        assert_eq!(groups.len(), 3);
        let mut every: Vec<u16> = groups.iter().flatten().copied().collect();
        every.sort_unstable();
        assert_eq!(every, all_lanes().collect::<Vec<_>>());
        for group in &groups {
            let range = |lane: u16| slot_of(&lane_key(lane)) / 5461;
            assert!(group.iter().all(|l| range(*l).min(2) == range(group[0]).min(2)), "{group:?}");
        }
        let hole = array(vec![array(vec![Value::Int(0), Value::Int(100), node(7000)])]);
        assert_eq!(group_by_owner(&hole), None);
        assert_eq!(group_by_owner(&Value::Nil), None);
        assert_eq!(group_by_owner(&array(vec![s("x")])), None);
    }

    #[test]
    fn a_grouped_reply_names_its_lanes_and_those_served_elsewhere() {
        let view = |last: &str| vec![Value::Int(0), s(""), s(last), array(vec![])];
        let ok = |i: i64, last: &str| array([vec![Value::Int(i), s("ok")], view(last)].concat());
        let reply = array(vec![Value::Int(64), array(vec![ok(1, "5-1"), array(vec![Value::Int(3), s("elsewhere")])])]);
        let got = group_reply(&reply, &[7, 9, 11]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.elsewhere, [11]);
        assert_eq!(got.looked.len(), 1);
        assert_eq!(got.looked[0].lane, 7);
        assert_eq!(got.looked[0].asked, 64);
        assert_eq!(got.looked[0].view.last_generated, Some(Position::new(5, 1).in_lane(7)));
        for bad in [
            Value::Nil,
            array(vec![Value::Int(1)]),
            array(vec![Value::Int(1), array(vec![ok(4, "1-0")])]),
            array(vec![Value::Int(1), array(vec![ok(0, "1-0")])]),
            array(vec![Value::Int(1), array(vec![array(vec![Value::Int(1), s("what")])])]),
            array(vec![s("x"), array(vec![])]),
        ] {
            assert!(group_reply(&bad, &[7, 9, 11]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shares_split_the_budget_with_a_floor_of_eight() {
        assert_eq!(share_of(512, 1), 512);
        assert_eq!(share_of(512, 256), 8);
        assert_eq!(share_of(512, 3), 170);
        assert_eq!(share_of(4, 10), 4);
        assert_eq!(share_of(0, 10), 0);
        assert_eq!(share_of(512, 0), 0);
    }
}
