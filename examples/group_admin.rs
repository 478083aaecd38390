//! Shows a durable group and moves its positions; lists, replays and discards its parked
//! events ([`ff_completions::GroupAdmin`]).
//!
//! ```text
//! cargo run --example group_admin -- --url postgres://user@host/db show promoter
//! cargo run --example group_admin -- --url valkey://host:6379 move promoter --to oldest --force
//! cargo run --example group_admin -- --url sqlite://dag.db move promoter --to cursor:02... --partition 17
//! cargo run --example group_admin -- --url sqlite://dag.db parked promoter
//! cargo run --example group_admin -- --url sqlite://dag.db replay promoter 17/0-1700000000000-3-0
//! ```
//!
//! The URL may also come from `FF_COMPLETIONS_URL`. `move` is refused while a member holds one
//! of the partitions (its lease has not run out) unless `--force`: a forced move raises the
//! partitions' tokens, so their holders' acknowledgements of what they read before are fenced,
//! and they read again from the new position.

use clap::{Parser, Subcommand};
use ff_completions::{BackendConfig, Backlog, Error, GroupAdmin, MoveTo, ParkedId, StreamCursor};

#[derive(Parser, Debug)]
#[command(about = "Show a durable group, move its positions, handle its parked events")]
struct Args {
    /// Backend URL: postgres://, valkey://, redis://, sqlite://path. Defaults to FF_COMPLETIONS_URL.
    #[arg(long, env = "FF_COMPLETIONS_URL")]
    url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Members, and per partition: holder, token, position, backlog, unacknowledged, refusals, parked.
    Show {
        /// The group (or durable subscription) name.
        group: String,
        /// Every partition, not only those with something to say (held, backlog, stalled, parked).
        #[arg(long)]
        all: bool,
    },
    /// Moves positions: `tail`, `oldest` (the oldest kept) or `cursor:<hex>`.
    Move {
        /// The group name.
        group: String,
        /// Where to: tail, oldest, or cursor:<hex>.
        #[arg(long)]
        to: String,
        /// Only these partitions (repeatable); every partition when absent.
        #[arg(long)]
        partition: Vec<u16>,
        /// Move even partitions a member holds (their holders read again from there).
        #[arg(long)]
        force: bool,
    },
    /// Lists parked events.
    Parked {
        /// The group name.
        group: String,
    },
    /// Asks the partitions' holders to hand parked events out again (every one when none named).
    Replay {
        /// The group name.
        group: String,
        /// Parked event ids, as `parked` prints them.
        ids: Vec<String>,
    },
    /// Removes parked events (every one when none named).
    Discard {
        /// The group name.
        group: String,
        /// Parked event ids, as `parked` prints them.
        ids: Vec<String>,
    },
}

fn target(to: &str) -> Result<MoveTo, Error> {
    match to {
        "tail" => Ok(MoveTo::Tail),
        "oldest" => Ok(MoveTo::Oldest),
        other => match other.strip_prefix("cursor:") {
            Some(hex) => Ok(MoveTo::Cursor(StreamCursor::from_hex(hex)?)),
            None => Err(Error::validation(format!("--to {other:?}: expected tail, oldest or cursor:<hex>"))),
        },
    }
}

fn ids(ids: &[String]) -> Result<Option<Vec<ParkedId>>, Error> {
    if ids.is_empty() {
        return Ok(None);
    }
    ids.iter().map(|id| id.parse()).collect::<Result<Vec<_>, _>>().map(Some)
}

async fn run(args: Args) -> Result<(), Error> {
    let admin = GroupAdmin::open(&BackendConfig::from_url(&args.url)?).await?;
    match args.command {
        Command::Show { group, all } => {
            let Some(report) = admin.show(&group).await? else {
                return Err(Error::validation(format!("no durable group {group:?}")));
            };
            println!("group {}: {} members, {} parked", report.group, report.members.len(), report.parked);
            for m in &report.members {
                println!(
                    "  member {} holds {} partitions, lease until {}",
                    m.member, m.partitions, m.lease_expires_at.0
                );
            }
            for p in &report.partitions {
                let backlog = match &p.backlog {
                    Backlog::Events { count, more } => format!("{count}{}", if *more { "+" } else { "" }),
                    Backlog::Stalled(why) => format!("STALLED ({why})"),
                    other => format!("{other:?}"),
                };
                let interesting = p.owner.is_some()
                    || p.parked > 0
                    || p.attempts > 0
                    || !matches!(p.backlog, Backlog::Events { count: 0, .. });
                if !all && !interesting {
                    continue;
                }
                let owner = p.owner.as_ref().map_or_else(|| "-".to_owned(), |(m, until)| format!("{m}@{}", until.0));
                let reason = p.reason.as_deref().unwrap_or("");
                println!(
                    "  {:>3} owner={owner} token={} backlog={backlog} unacked={} attempts={} parked={} position={} {reason}",
                    p.partition, p.token, p.unacked, p.attempts, p.parked, p.position
                );
            }
        }
        Command::Move { group, to, partition, force } => {
            let only = (!partition.is_empty()).then_some(partition.as_slice());
            let moved = admin.move_positions(&group, &target(&to)?, only, force).await?;
            println!("moved {} partitions of {group} to {to}", moved.len());
        }
        Command::Parked { group } => {
            for p in admin.parked(&group).await? {
                println!(
                    "{} {} {} attempts={} parked_at={} replay={} reason={}",
                    p.id, p.event.outcome, p.event.execution_id, p.attempts, p.parked_at.0, p.replay, p.reason
                );
            }
        }
        Command::Replay { group, ids: which } => {
            let n = admin.replay(&group, ids(&which)?.as_deref()).await?;
            println!("{n} parked events of {group} to replay");
        }
        Command::Discard { group, ids: which } => {
            let n = admin.discard(&group, ids(&which)?.as_deref()).await?;
            println!("{n} parked events of {group} discarded");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(err) = run(Args::parse()).await {
        eprintln!("error: {err}");
        std::process::exit(match err {
            Error::Validation { .. } => 2,
            _ => 1,
        });
    }
}
