//! The day-2 commands on a Pipeline file: `dlq`, `tap`, `trace`, `status`, `pause`, `resume`, `graph`.
//! Where the Pipeline's NATS is comes from `switchyard_local::reach`; what is done there from
//! `switchyard_ops`. The kubectl plugin (`kubectl.rs`) shares the printing.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use switchyard_ops::{books, dlq, graph, status, tap, trace, Target};
use switchyard_platform::credentials::NatsAuthArgs;

use crate::errors::CommandError;

/// Which Pipeline, and where its NATS is.
#[derive(Args, Debug)]
pub struct Reach {
    /// The Pipeline file. Its local state (`.switchyard/<pipeline>/` beside it) is used unless
    /// --nats-url is given.
    pub file: PathBuf,
    /// The NATS the Pipeline runs on (several servers separated by commas).
    #[arg(long)]
    pub nats_url: Option<String>,
    #[command(flatten)]
    pub nats_auth: NatsAuthArgs,
}

/// Which dead letters.
#[derive(Args, Debug, Clone, Default)]
pub struct Select {
    /// Only those of this unit.
    #[arg(long)]
    pub unit: Option<String>,
    /// Only those that failed at this stage (its name, or its path such as `machines > wash`).
    #[arg(long)]
    pub stage: Option<String>,
    /// Only those stored within this long (`10m`, `2h`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    /// At most this many, oldest first.
    #[arg(long)]
    pub limit: Option<usize>,
    /// JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl Select {
    pub fn selection(&self) -> dlq::Selection {
        dlq::Selection {
            unit: self.unit.clone(),
            stage: self.stage.clone(),
            since: self.since,
            limit: self.limit,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum DlqAction {
    /// Count the dead letters by unit, stage and error.
    List {
        #[command(flatten)]
        reach: Reach,
        #[command(flatten)]
        select: Select,
    },
    /// Each dead letter with its data, error, stage, attempts, origin and time.
    Show {
        #[command(flatten)]
        reach: Reach,
        #[command(flatten)]
        select: Select,
    },
    /// Put dead letters back into the input of the unit where they failed, at the step that failed;
    /// each leaves the queue once its copy is stored. A run (or `run --resume`) then processes them.
    Replay {
        #[command(flatten)]
        reach: Reach,
        #[command(flatten)]
        select: Select,
    },
    /// Remove dead letters for good.
    Purge {
        #[command(flatten)]
        reach: Reach,
        #[command(flatten)]
        select: Select,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args, Debug)]
pub struct TapArgs {
    #[command(flatten)]
    pub reach: Reach,
    #[command(flatten)]
    pub tap: TapWhat,
}

#[derive(Args, Debug)]
pub struct TraceArgs {
    #[command(flatten)]
    pub reach: Reach,
    /// The item: its origin (a source) and its sequence there, such as `clothes:17`.
    #[arg(value_name = "ORIGIN:SEQ")]
    pub item: String,
    /// The events as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum GraphFormat {
    Mermaid,
    Dot,
    Svg,
}

/// Runs an async command on a small runtime; errors are printed, the exit code says how it went.
pub fn block_on<F>(command: F) -> ExitCode
where
    F: std::future::Future<Output = Result<ExitCode, CommandError>>,
{
    switchyard_platform::logging::init("warn", false);
    match switchyard_platform::logging::block_on(Some(1), command) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("switchyard: {e}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn reached(reach: &Reach) -> Result<switchyard_local::Reached, CommandError> {
    Ok(switchyard_local::reach(&reach.file, reach.nats_url.as_deref(), &reach.nats_auth).await?)
}

/// What to do with the selected dead letters.
#[derive(Clone, Copy, Debug)]
pub enum DlqDo {
    List,
    Show,
    Replay,
    Purge { yes: bool },
}

pub async fn dlq_command(action: DlqAction) -> Result<ExitCode, CommandError> {
    let (reach, select, what) = match action {
        DlqAction::List { reach, select } => (reach, select, DlqDo::List),
        DlqAction::Show { reach, select } => (reach, select, DlqDo::Show),
        DlqAction::Replay { reach, select } => (reach, select, DlqDo::Replay),
        DlqAction::Purge { reach, select, yes } => (reach, select, DlqDo::Purge { yes }),
    };
    let r = reached(&reach).await?;
    let running = r.state.as_ref().is_some_and(|s| s.running().is_some());
    let after_replay = if running || reach.nats_url.is_some() {
        None
    } else {
        Some(format!(
            "they are processed when the pipeline runs again: switchyard run {} --resume",
            reach.file.display()
        ))
    };
    dlq_on(&r.target, &r.how, what, &select, after_replay.as_deref()).await
}

/// A dead-letter command on a Pipeline reached somehow; `after_replay` tells what makes the replayed
/// letters move, when something must.
pub async fn dlq_on(
    target: &Target,
    how: &str,
    what: DlqDo,
    select: &Select,
    after_replay: Option<&str>,
) -> Result<ExitCode, CommandError> {
    let selection = select.selection();
    let look = || dlq::letters(target, &selection);
    match what {
        DlqDo::List => {
            let mut letters = look().await?;
            let mut groups = dlq::Groups::default();
            while let Some(letter) = next(&mut letters).await? {
                groups.add(&letter);
            }
            print!("{}", render_groups(target, how, &groups, select.json));
        }
        DlqDo::Show => {
            let mut letters = look().await?;
            let mut out = std::io::stdout().lock();
            let mut shown = 0u64;
            while let Some(letter) = next(&mut letters).await? {
                out.write_all(render_letter(&letter, select.json).as_bytes())
                    .map_err(CommandError::Write)?;
                shown += 1;
            }
            if shown == 0 && !select.json {
                println!("no dead letters");
            }
        }
        DlqDo::Replay => {
            let report = dlq::replay(target, &selection).await?;
            print!("{}", render_replayed(&report, after_replay));
            if !report.kept.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        DlqDo::Purge { yes } => {
            let to_purge = dlq::to_purge(target, &selection).await?;
            let count = to_purge.count;
            if count == 0 {
                println!("no dead letters to purge");
                return Ok(ExitCode::SUCCESS);
            }
            if !yes
                && !confirm(&format!(
                    "remove {count} dead letter{} of {} for good?",
                    plural(count),
                    target.names.pipeline
                ))?
            {
                println!("nothing removed");
                return Ok(ExitCode::FAILURE);
            }
            let purged = dlq::purge(target, to_purge).await?;
            println!("purged {purged} dead letter{}", plural(purged));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn next(letters: &mut dlq::Letters) -> Result<Option<dlq::DeadLetter>, CommandError> {
    Ok(letters.next().await?)
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Asks on the terminal; without one, says how to go on instead of guessing.
fn confirm(question: &str) -> Result<bool, CommandError> {
    if !std::io::stdin().is_terminal() {
        return Err(CommandError::NoTerminal {
            question: question.to_string(),
        });
    }
    print!("{question} [y/N] ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(CommandError::Answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

pub fn render_groups(target: &Target, how: &str, counted: &dlq::Groups, json: bool) -> String {
    let groups = counted.sorted();
    if json {
        return groups
            .iter()
            .filter_map(|g| serde_json::to_string(g).ok())
            .map(|l| l + "\n")
            .collect();
    }
    let mut out = format!(
        "{}: {} dead letter{} (NATS: {how})\n",
        target.names.pipeline,
        counted.total(),
        plural(counted.total())
    );
    if groups.is_empty() {
        return out;
    }
    let unit_w = groups
        .iter()
        .map(|g| g.unit.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let stage_w = groups
        .iter()
        .map(|g| g.stage.len())
        .max()
        .unwrap_or(5)
        .max(5);
    out.push_str(&format!(
        "\n  {:>6}  {:<unit_w$}  {:<stage_w$}  {:<24}  {:<24}  error\n",
        "count", "unit", "stage", "first", "last"
    ));
    for g in &groups {
        let error: String = g.error.chars().take(100).collect();
        out.push_str(&format!(
            "  {:>6}  {:<unit_w$}  {:<stage_w$}  {:<24}  {:<24}  {error}\n",
            g.count, g.unit, g.stage, g.first, g.last
        ));
    }
    out
}

/// One dead letter as `dlq show` prints it: a JSON line, or a paragraph.
pub fn render_letter(d: &dlq::DeadLetter, json: bool) -> String {
    if json {
        return serde_json::to_string(d).map_or(String::new(), |line| line + "\n");
    }
    format!(
        "#{} {}:{} at {}\n  unit {}, stage {}, {} attempt{}{}{}\n  error: {}\n  path: {}\n  data: {}\n\n",
        d.seq,
        d.origin,
        d.origin_seq,
        d.time,
        d.unit,
        d.stage,
        d.attempts,
        plural(u64::from(d.attempts)),
        d.deliveries.map_or(String::new(), |n| format!(", {n} deliveries")),
        if d.replays > 0 {
            format!(", replayed {} time{} before", d.replays, plural(u64::from(d.replays)))
        } else {
            String::new()
        },
        d.error,
        d.path,
        d.data
    )
}

fn render_replayed(report: &dlq::Replayed, after: Option<&str>) -> String {
    let mut out = format!(
        "replayed {} dead letter{}",
        report.replayed,
        plural(report.replayed)
    );
    if !report.by_unit.is_empty() {
        let parts: Vec<String> = report
            .by_unit
            .iter()
            .map(|(unit, n)| format!("{n} into {unit}"))
            .collect();
        out.push_str(&format!(" ({})", parts.join(", ")));
    }
    out.push('\n');
    if let Some(after) = after.filter(|_| report.replayed > 0) {
        out.push_str(after);
        out.push('\n');
    }
    for kept in &report.kept {
        let named: Vec<String> = kept.seqs.iter().map(|seq| format!("#{seq}")).collect();
        let more = kept.count.saturating_sub(kept.seqs.len() as u64);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        out.push_str(&format!(
            "kept {} dead letter{} ({}{more}): {}\n",
            kept.count,
            plural(kept.count),
            named.join(", "),
            kept.why
        ));
    }
    out
}

pub async fn tap_command(args: TapArgs) -> Result<ExitCode, CommandError> {
    let r = reached(&args.reach).await?;
    tap_on(&r.target, &args.tap).await
}

/// What to tap and how.
#[derive(Args, Debug)]
pub struct TapWhat {
    /// The unit whose edge to show.
    pub unit: String,
    /// Show what the unit publishes (default: what it reads).
    #[arg(long)]
    pub output: bool,
    /// Stop after this many messages.
    #[arg(long, default_value_t = 10, conflicts_with = "follow")]
    pub count: u64,
    /// Keep showing messages until Ctrl-C.
    #[arg(long)]
    pub follow: bool,
    /// Also what is stored on the edge already (waiting for the unit), not only what comes now.
    #[arg(long)]
    pub from_start: bool,
    /// A jq filter over each message's record (`{subject, seq, time, headers, data}`), such as
    /// `select(.data.weight > 2) | .data`.
    #[arg(long, value_name = "JQ")]
    pub filter: Option<String>,
}

pub async fn tap_on(target: &Target, what: &TapWhat) -> Result<ExitCode, CommandError> {
    let options = tap::TapOptions {
        unit: what.unit.clone(),
        edge: if what.output {
            tap::Edge::Output
        } else {
            tap::Edge::Input
        },
        count: (!what.follow).then_some(what.count),
        from_start: what.from_start,
        filter: what.filter.clone(),
    };
    // Said on stderr, so that stdout stays JSON lines: a tap of a pipeline that is not running waits.
    // Said once the tap reads, not before: what is published after this line is shown.
    let opened = |subjects: &[String]| {
        eprintln!("tapping {} (Ctrl-C to stop)", subjects.join(", "));
    };
    let mut stdout = std::io::stdout().lock();
    tokio::select! {
        tapped = tap::tap(target, &options, &mut stdout, opened) => { tapped?; }
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn trace_command(args: TraceArgs) -> Result<ExitCode, CommandError> {
    trace::parse_item(&args.item)?;
    let r = reached(&args.reach).await?;
    trace_on(&r.target, &args.item, args.json, r.prepared.sample_rate).await
}

pub async fn trace_on(
    target: &Target,
    item: &str,
    json: bool,
    sample_rate: f64,
) -> Result<ExitCode, CommandError> {
    let (origin, seq) = trace::parse_item(item)?;
    let found = trace::read(target, &origin, &seq).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&found)?);
    } else {
        print!("{}", trace::render(&found, Some(sample_rate)));
    }
    Ok(if found.events.is_empty() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn status_command(reach: Reach) -> Result<ExitCode, CommandError> {
    let r = reached(&reach).await?;
    let units = status::read(&r.target, Duration::from_millis(2500)).await?;
    print!(
        "{}",
        render_status(&r.target.names.pipeline, &r.how, &units, &[])
    );
    match books::now(&r.target).await {
        Ok(now) => {
            print!("\n{}", books::render(&now));
            if !now.problems().is_empty() {
                return Ok(ExitCode::from(BOOKS_DO_NOT_BALANCE));
            }
        }
        Err(e) => println!("\n  The books cannot be read: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// The exit status of `switchyard status` and `run` when the books do not balance.
pub const BOOKS_DO_NOT_BALANCE: u8 = switchyard_local::BOOKS_DO_NOT_BALANCE;

/// The units' table; `scaling` adds each unit's last scaling reason (from the Pipeline's status).
pub fn render_status(
    pipeline: &str,
    how: &str,
    units: &[status::UnitStatus],
    scaling: &[(String, String)],
) -> String {
    let width = units.iter().map(|u| u.unit.len()).max().unwrap_or(4).max(4);
    let mut out = format!("{pipeline} (NATS: {how})\n\n");
    out.push_str(&format!(
        "  {:<width$}  {:<8}  {:>8}  {:>8}  {:>8}  {:>6}  last scaling\n",
        "unit", "kind", "replicas", "lag", "rate/s", "dead"
    ));
    for u in units {
        let reason = scaling
            .iter()
            .find(|(unit, _)| *unit == u.unit)
            .map_or("-", |(_, r)| r.as_str());
        out.push_str(&format!(
            "  {:<width$}  {:<8}  {:>8}  {:>8}  {:>8.0}  {:>6}  {reason}\n",
            u.unit,
            u.kind,
            u.replicas,
            u.lag.map_or("-".to_string(), |l| l.to_string()),
            u.rate,
            u.dead_letters,
        ));
    }
    out.push_str(&status::render_rows(
        units.iter().map(|u| (u.unit.as_str(), u.rows)),
    ));
    out.push_str(&status::render_joins(
        units.iter().map(|u| (u.unit.as_str(), u.join)),
    ));
    out
}

pub async fn control_command(file: PathBuf, request: &str) -> Result<ExitCode, CommandError> {
    let answer = switchyard_local::control(&file, request).await?;
    println!("{answer}");
    Ok(ExitCode::SUCCESS)
}

pub fn graph_command(file: PathBuf, format: GraphFormat) -> ExitCode {
    let pipeline = match switchyard_crds::load::load(&file) {
        Ok(p) => p,
        Err(e) => {
            eprint!("{}", e.describe(&file));
            return ExitCode::FAILURE;
        }
    };
    let topology = match switchyard_crds::validate::analyze(&pipeline) {
        Ok(t) => t,
        Err(problems) => {
            eprint!("{}", switchyard_crds::load::describe(&file, &problems));
            return ExitCode::FAILURE;
        }
    };
    let state = switchyard_local::state::LocalState::of(&file, &topology.pipeline);
    let counts = state
        .kept()
        .counts
        .into_iter()
        .map(|(unit, c)| {
            let counts = graph::Counts {
                processed: c.processed,
                published: c.published,
                dead_lettered: c.dead_lettered,
            };
            (unit, counts)
        })
        .collect();
    let text = match format {
        GraphFormat::Mermaid => graph::mermaid(&topology, &counts),
        GraphFormat::Dot => graph::dot(&topology, &counts),
        GraphFormat::Svg => graph::svg(&topology, &counts),
    };
    print!("{text}");
    ExitCode::SUCCESS
}
