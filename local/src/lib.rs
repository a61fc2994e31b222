//! `switchyard run`: a Pipeline on this machine, with real NATS and real `switchyard-stage` processes.

mod plot;
pub(crate) mod progress;
mod scaling;
mod summary;
mod supervisor;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use switchyard_crds::layout::{layout, Layout, Names, DEAD_LETTER_CONSUMER};
use switchyard_crds::topology::{Topology, UnitKind};
use switchyard_crds::unit::{headers, StatsReport, UnitConfig, UnitRole};
use switchyard_crds::validate::analyze;
use switchyard_crds::{
    ExecStep, FileSink, FileSource, GeneratorSource, SinkKind, SourceKind, StepKind,
};
use switchyard_stage::admin;
use switchyard_stage::embedded::{NatsServer, INSTALL_HINT};

pub use progress::thousands;
pub use progress::ProgressMode;
use progress::{Display, Row};
use summary::{Summary, UnitSummary};
use supervisor::{Event, OutputLine, Supervisor};
use switchyard_crds::load::{load, LoadError};
use switchyard_operator::plan::{replicas_of, UnitType};
use switchyard_operator::reports::Reports;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The Pipeline file. Relative paths in it (handlers, files) start in the file's folder.
    pub file: PathBuf,
    /// Use this NATS server instead of starting one; the Pipeline's stream there is reset first.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Append to the files of file sinks instead of starting them afresh.
    #[arg(long)]
    pub append: bool,
    /// How to show progress.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// The `switchyard-stage` program (default: next to this one, or on PATH).
    #[arg(long, env = "SWITCHYARD_STAGE_BIN")]
    pub stage_bin: Option<PathBuf>,
    /// Let stage processes log at debug level (their logs are kept in the run's folder).
    #[arg(long)]
    pub verbose: bool,
    /// Write the run's summary as JSON here, with every unit's replicas and lag over time and the
    /// scaling decisions.
    #[arg(long, value_name = "FILE")]
    pub summary_json: Option<PathBuf>,
    /// Draw lag and replicas per unit over time into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

pub fn main(args: RunArgs) -> ExitCode {
    switchyard_stage::logging::init("warn", false);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("switchyard run: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Everything a run needs to know about its Pipeline.
struct Prepared {
    name: String,
    topology: Topology,
    layout: Layout,
    /// The Pipeline file's folder: units run there, so relative paths mean the same as in the file.
    base_dir: PathBuf,
}

fn prepare(file: &Path) -> Result<Prepared, String> {
    let pipeline = load(file).map_err(|e| e.describe(file))?;
    let topology = analyze(&pipeline).map_err(|p| LoadError::Invalid(p).describe(file))?;
    let layout =
        layout(&topology, &pipeline.spec).map_err(|p| LoadError::Invalid(p).describe(file))?;
    let folder = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base_dir = folder
        .canonicalize()
        .map_err(|e| format!("{}: cannot resolve the folder: {e}\n", folder.display()))?;
    Ok(Prepared {
        name: topology.pipeline.clone(),
        topology,
        layout,
        base_dir,
    })
}

/// What would only fail later, inside a stage process: missing programs and input files.
fn preflight(prepared: &Prepared) -> Vec<String> {
    let mut problems = Vec::new();
    for (unit, config) in prepared.topology.units.iter().zip(&prepared.layout.units) {
        match &config.role {
            UnitRole::Process { steps, .. } => {
                for step in steps {
                    if let StepKind::Exec(ExecStep { command }) = &step.kind {
                        let Some(program) = command.first() else {
                            continue;
                        };
                        if !program_exists(program, &prepared.base_dir) {
                            problems.push(format!(
                                "{}: step `{}` runs `{program}`, which is {}: {}",
                                unit.spec_path,
                                step.path,
                                if program.contains('/') {
                                    "not there"
                                } else {
                                    "not on PATH"
                                },
                                install_hint(program)
                            ));
                        }
                        for arg in command.iter().skip(1) {
                            let looks_like_script = [".py", ".rb", ".js", ".sh", ".pl"]
                                .iter()
                                .any(|e| arg.ends_with(e));
                            if looks_like_script && !prepared.base_dir.join(arg).exists() {
                                problems.push(format!(
                                    "{}: step `{}` names `{arg}`, which is not in {}",
                                    unit.spec_path,
                                    step.path,
                                    prepared.base_dir.display()
                                ));
                            }
                        }
                    }
                }
            }
            UnitRole::Source {
                source: SourceKind::File(FileSource { path }),
                ..
            } if !prepared.base_dir.join(path).exists() => {
                problems.push(format!(
                    "{}: file source `{path}` is not in {} (relative paths start in the Pipeline file's folder)",
                    unit.spec_path,
                    prepared.base_dir.display()
                ));
            }
            _ => {}
        }
    }
    problems
}

fn program_exists(program: &str, base_dir: &Path) -> bool {
    if program.contains('/') {
        return base_dir.join(program).exists();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

fn install_hint(program: &str) -> String {
    match program {
        "ruby" => "install Ruby (for example `apt-get install ruby`)".to_string(),
        "python3" | "python" => {
            "install Python 3 (for example `apt-get install python3`)".to_string()
        }
        "node" => "install Node.js".to_string(),
        other => format!("install `{other}` or change the step's exec.command"),
    }
}

/// `switchyard-stage` next to this program (how cargo and the release archive lay them out), or on PATH.
pub fn locate_stage_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        anyhow::ensure!(path.is_file(), "{} does not exist", path.display());
        return Ok(path);
    }
    if let Ok(me) = std::env::current_exe() {
        if let Some(dir) = me.parent() {
            let beside = dir.join("switchyard-stage");
            if beside.is_file() {
                return Ok(beside);
            }
        }
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("switchyard-stage"))
                .find(|p| p.is_file())
        })
        .context("cannot find switchyard-stage next to switchyard or on PATH: build it with `cargo build --bins`, or pass --stage-bin")
}

/// Sum of the latest report of every replica a unit has had.
fn totals(stats: &Reports, unit: &str) -> StatsReport {
    let mut sum = StatsReport::default();
    for r in stats.latest(unit) {
        sum.processed += r.processed;
        sum.published += r.published;
        sum.dead_lettered += r.dead_lettered;
        sum.duplicates_skipped += r.duplicates_skipped;
        sum.in_flight += r.in_flight;
    }
    sum
}

/// Every unit of a layout comes from its topology, so the lookup always finds it.
fn kind_of(topology: &Topology, unit: &str) -> Option<UnitType> {
    topology.unit(unit).map(switchyard_operator::plan::type_of)
}

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let prepared = match prepare(&args.file) {
        Ok(p) => p,
        Err(text) => {
            eprint!("{text}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let problems = preflight(&prepared);
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("{}: {p}", args.file.display());
        }
        eprintln!(
            "{}: cannot run: {} problem{}",
            args.file.display(),
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        );
        return Ok(ExitCode::FAILURE);
    }
    let stage_bin = locate_stage_binary(args.stage_bin.clone())?;

    let mut display = Display::new(args.progress, prepared.layout.units.len());
    let (server, url) = match &args.nats_url {
        Some(url) => (None, url.clone()),
        None => {
            let server = NatsServer::start().map_err(|e| {
                if switchyard_stage::embedded::find_binary().is_none() {
                    anyhow::anyhow!("nats-server was not found on PATH: {INSTALL_HINT}")
                } else {
                    e
                }
            })?;
            let url = server.url();
            (Some(server), url)
        }
    };
    let client = async_nats::ConnectOptions::new()
        .name("switchyard run")
        .connect(url.as_str())
        .await
        .with_context(|| format!("cannot connect to NATS at {url}"))?;
    let js = switchyard_stage::jetstream_context(client.clone());
    if server.is_none() {
        // A run is a job: it starts from nothing, even on a server that saw this Pipeline before.
        admin::delete(&js, &prepared.layout.nats).await?;
    }
    admin::apply(&js, &prepared.layout.nats).await?;
    display.note(&format!(
        "{}: NATS at {url}{}; stream {}",
        prepared.name,
        if server.is_some() {
            " (private, temporary)"
        } else {
            ""
        },
        prepared.layout.nats.stream.name
    ));

    let mut sink_files = Vec::new();
    for config in &prepared.layout.units {
        if let UnitRole::Sink {
            sink: SinkKind::File(FileSink { path }),
            ..
        } = &config.role
        {
            let file = prepared.base_dir.join(path);
            if !args.append {
                remove_if_present(&file)?;
                remove_if_present(&switchyard_stage::sinks::ledger_path(&file))?;
            }
            sink_files.push(file.display().to_string());
        }
    }
    for config in &prepared.layout.units {
        if let UnitRole::Source { source, .. } = &config.role {
            if !source.is_finite() {
                display.note(&format!(
                    "source `{}` has no end: press Ctrl-C to stop",
                    config.unit
                ));
            }
        }
    }

    let run_dir = tempfile::Builder::new()
        .prefix(&format!("switchyard-run-{}-", prepared.name))
        .tempdir()
        .context("cannot create the run's folder")?;
    let logs_dir = run_dir.path().join("logs");
    std::fs::create_dir_all(&logs_dir)?;
    let stats = Reports::default();
    stats
        .listen(
            &client,
            Names::new(&prepared.topology.namespace, &prepared.name).all_stats_subjects(),
            |_, report| Some(report.unit.clone()),
        )
        .await?;
    client.flush().await?;

    let (output_tx, mut output_rx) = tokio::sync::mpsc::unbounded_channel::<OutputLine>();
    let mut supervisor = Supervisor::new(
        stage_bin,
        url.clone(),
        prepared.base_dir.clone(),
        logs_dir.clone(),
        output_tx,
        args.verbose,
    );
    // Readers first, so that every consumer is being pulled from before anything is produced.
    let mut order: Vec<(&switchyard_crds::topology::Unit, &UnitConfig)> = prepared
        .topology
        .units
        .iter()
        .zip(&prepared.layout.units)
        .collect();
    order.sort_by_key(|(u, _)| matches!(u.kind, UnitKind::Source(_)));
    for (unit, config) in order {
        let path = run_dir.path().join(format!("{}.json", unit.name));
        std::fs::write(&path, serde_json::to_vec_pretty(config)?)?;
        let (is_source, finite) = match &config.role {
            UnitRole::Source { source, .. } => (true, source.is_finite()),
            _ => (false, false),
        };
        // Switchers start at their minimum (perhaps zero); the autoscaler takes it from there.
        let wanted = replicas_of(unit).min as usize;
        supervisor.add(&unit.name, path, wanted, is_source, finite);
    }

    let stream = js.get_stream(&prepared.layout.nats.stream.name).await?;
    let consumer_of: HashMap<&str, &str> = prepared
        .layout
        .units
        .iter()
        .filter_map(|u| {
            u.input
                .as_ref()
                .map(|i| (u.unit.as_str(), i.durable.as_str()))
        })
        .collect();
    let topological: Vec<String> = prepared
        .topology
        .topological_order()
        .iter()
        .map(|u| u.name.clone())
        .collect();
    let totals_of_source: HashMap<String, u64> = prepared
        .layout
        .units
        .iter()
        .filter_map(|u| match &u.role {
            UnitRole::Source {
                source: SourceKind::Generator(GeneratorSource { count: Some(c), .. }),
                ..
            } => Some((u.unit.clone(), *c)),
            _ => None,
        })
        .collect();

    let started = Instant::now();
    let mut lags: HashMap<String, u64> = HashMap::new();
    let mut last_refresh = Instant::now() - Duration::from_secs(1);
    let mut scaler = scaling::LocalScaler::new(&prepared.topology);
    let mut last_scale = Instant::now();
    let mut interrupted = false;
    let mut completed = false;
    let mut events = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let failure: Option<supervisor::CrashLoop> = loop {
        tokio::select! {
            _ = &mut ctrl_c => {
                interrupted = true;
                display.note("stopping: finishing the messages in flight (Ctrl-C again to force)");
                break None;
            }
            Some(line) = output_rx.recv() => {
                display.output(&format!("[{}] {}", line.unit, line.line));
                continue;
            }
            _ = tick.tick() => {}
        }
        if let Err(crash) = supervisor.poll(&mut events) {
            break Some(crash);
        }
        for event in events.drain(..) {
            match event {
                Event::Restarted { unit, pid, status } => display.note(&format!(
                    "unit `{unit}`: process {pid} ended ({status}); restarting it, its messages will be delivered again"
                )),
            }
        }
        if last_refresh.elapsed() >= Duration::from_millis(300) {
            last_refresh = Instant::now();
            // Sources must be done before the pass starts: then a unit found empty, checked after all of
            // its inputs were found empty, can never receive anything again.
            let sources_done = supervisor.all_sources_finished();
            let mut all_empty = true;
            for unit in &topological {
                let Some(durable) = consumer_of.get(unit.as_str()) else {
                    continue;
                };
                match stream.consumer_info(*durable).await {
                    Ok(info) => {
                        let lag = info.num_pending + info.num_ack_pending as u64;
                        all_empty &= lag == 0;
                        lags.insert(unit.clone(), lag);
                    }
                    Err(e) => {
                        all_empty = false;
                        tracing::debug!("cannot read consumer {durable}: {e}");
                    }
                }
            }
            if last_scale.elapsed() >= switchyard_stage::stats::REPORT_EVERY {
                last_scale = Instant::now();
                let notes = scaler.step(
                    started.elapsed(),
                    &prepared.topology,
                    &prepared.layout,
                    &lags,
                    &stats.fresh_all(),
                    &mut supervisor,
                );
                for note in notes {
                    display.note(&note);
                }
            }
            let rows = rows(&prepared, &supervisor, &stats, &lags, &totals_of_source);
            display.update(started.elapsed(), &rows);
            if sources_done && all_empty {
                completed = true;
                break None;
            }
        }
    };
    let wall = started.elapsed();
    if let Some(crash) = failure {
        let rows = rows(&prepared, &supervisor, &stats, &lags, &totals_of_source);
        display.finish(wall, &rows);
        supervisor.stop_all(Duration::from_secs(10)).await;
        let logs = run_dir.keep();
        let log_text = if crash.log.as_os_str().is_empty() {
            String::new()
        } else {
            supervisor::tail(&crash.log, 15)
        };
        anyhow::bail!(
            "unit `{}` keeps failing ({}); its last words:\n{}\nall logs are in {}",
            crash.unit,
            crash.status,
            log_text,
            logs.join("logs").display()
        );
    }

    {
        let stopping = supervisor.stop_all(Duration::from_secs(30));
        tokio::pin!(stopping);
        tokio::select! {
            _ = &mut stopping => {}
            _ = tokio::signal::ctrl_c(), if interrupted => {
                display.note("forcing the stop");
            }
        }
    }
    // Last reports are published as processes exit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let final_rows = rows(&prepared, &supervisor, &stats, &lags, &totals_of_source);
    display.finish(wall, &final_rows);

    let dead_letters = save_dead_letters(&js, &prepared).await?;
    let end = RunEnd {
        completed,
        wall,
        sink_files,
        dead_letter_file: dead_letters,
        append: args.append,
    };
    let mut summary = summarize(&prepared, &supervisor, &stats, end);
    summary.switchers = scaler.settings();
    summary.scale_events = std::mem::take(&mut scaler.events);
    summary.timeline = std::mem::take(&mut scaler.timeline);
    if let Some(path) = &args.summary_json {
        let text = serde_json::to_string_pretty(&summary)?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, plot::render(&summary))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if server.is_none() && summary.dead_lettered == 0 {
        admin::delete(&js, &prepared.layout.nats).await?;
    }
    if completed {
        // A sink's ledger only means something to the stream it was kept for, which ends with the run.
        for file in &summary.sink_files {
            remove_if_present(&switchyard_stage::sinks::ledger_path(Path::new(file)))?;
        }
    }
    print!("{}", summary.render());
    drop(client);
    drop(server);
    if interrupted {
        Ok(ExitCode::from(130))
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

/// One row per unit. `replicas` counts running processes, or (once stopped) the most a unit had.
fn rows(
    prepared: &Prepared,
    supervisor: &Supervisor,
    stats: &Reports,
    lags: &HashMap<String, u64>,
    totals_of_source: &HashMap<String, u64>,
) -> Vec<Row> {
    prepared
        .layout
        .units
        .iter()
        .map(|config| {
            let t = totals(stats, &config.unit);
            let processes = supervisor.units.iter().find(|u| u.unit == config.unit);
            Row {
                unit: config.unit.clone(),
                kind: kind_of(&prepared.topology, &config.unit),
                replicas: processes.map_or(0, |p| {
                    if p.running() > 0 {
                        p.running()
                    } else {
                        p.most_replicas
                    }
                }),
                processed: t.processed,
                published: t.published,
                lag: lags.get(&config.unit).copied(),
                dead_lettered: t.dead_lettered,
                total: totals_of_source.get(&config.unit).copied(),
                finished: processes.is_some_and(|p| p.finished),
            }
        })
        .collect()
}

/// How a run ended, for its summary.
struct RunEnd {
    completed: bool,
    wall: Duration,
    sink_files: Vec<String>,
    dead_letter_file: Option<PathBuf>,
    append: bool,
}

fn summarize(
    prepared: &Prepared,
    supervisor: &Supervisor,
    stats: &Reports,
    end: RunEnd,
) -> Summary {
    let RunEnd {
        completed,
        wall,
        sink_files,
        dead_letter_file,
        append,
    } = end;
    let mut units = Vec::new();
    let (mut from_sources, mut at_sinks, mut dead) = (0, 0, 0);
    for config in &prepared.layout.units {
        let mut t = totals(stats, &config.unit);
        // A process killed mid-run takes its last second of counts with it. Where the truth can be read
        // off (a generator that finished, a file a sink started afresh), use it.
        if let Some(exact) = exact_count(prepared, supervisor, config, append) {
            t.processed = t.processed.max(exact);
            t.published = t.published.max(exact);
        }
        let kind = kind_of(&prepared.topology, &config.unit);
        match kind {
            Some(UnitType::Source) => from_sources += t.processed,
            Some(UnitType::Sink) => at_sinks += t.published,
            Some(UnitType::Group | UnitType::Switcher) | None => {}
        }
        dead += t.dead_lettered;
        let processes = supervisor.units.iter().find(|u| u.unit == config.unit);
        units.push(UnitSummary {
            name: config.unit.clone(),
            kind,
            most_replicas: processes.map_or(0, |p| p.most_replicas),
            processed: t.processed,
            published: t.published,
            dead_lettered: t.dead_lettered,
            duplicates_skipped: t.duplicates_skipped,
            restarts: processes.map_or(0, |p| p.restarts),
        });
    }
    let seconds = wall.as_secs_f64().max(0.001);
    Summary {
        pipeline: prepared.name.clone(),
        completed,
        wall_seconds: seconds,
        from_sources,
        at_sinks,
        dead_lettered: dead,
        throughput: from_sources as f64 / seconds,
        units,
        sink_files,
        dead_letter_file: dead_letter_file.map(|p| p.display().to_string()),
        switchers: BTreeMap::new(),
        scale_events: Vec::new(),
        timeline: BTreeMap::new(),
    }
}

/// How many messages a unit handled, when that can be known exactly rather than from its reports.
fn exact_count(
    prepared: &Prepared,
    supervisor: &Supervisor,
    config: &UnitConfig,
    append: bool,
) -> Option<u64> {
    match &config.role {
        UnitRole::Source {
            source:
                SourceKind::Generator(GeneratorSource {
                    count: Some(count), ..
                }),
            ..
        } => supervisor
            .units
            .iter()
            .any(|u| u.unit == config.unit && u.finished)
            .then_some(*count),
        UnitRole::Sink {
            sink: SinkKind::File(FileSink { path }),
            ..
        } if !append => std::fs::read(prepared.base_dir.join(path))
            .ok()
            .map(|bytes| bytes.iter().filter(|b| **b == b'\n').count() as u64),
        _ => None,
    }
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot start {} afresh", path.display())),
    }
}

/// Dead letters live in the run's stream, which a private server takes with it: save them beside the
/// Pipeline file, one JSON line each with its error and origin.
async fn save_dead_letters(
    js: &jetstream::Context,
    prepared: &Prepared,
) -> anyhow::Result<Option<PathBuf>> {
    let stream = js.get_stream(&prepared.layout.nats.stream.name).await?;
    let consumer: PullConsumer = stream
        .get_consumer(DEAD_LETTER_CONSUMER)
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the dead-letter consumer: {e}"))?;
    let info = stream.consumer_info(DEAD_LETTER_CONSUMER).await?;
    if info.num_pending == 0 {
        return Ok(None);
    }
    let path = prepared
        .base_dir
        .join(format!("{}.dead-letters.jsonl", prepared.name));
    let mut lines = Vec::new();
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_millis(300))
            .messages()
            .await?;
        let mut got = 0;
        while let Some(message) = batch.next().await {
            let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
            got += 1;
            let get = |name: &str| {
                message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default()
            };
            let data: serde_json::Value =
                serde_json::from_slice(&message.payload).unwrap_or_else(|_| {
                    serde_json::Value::String(
                        String::from_utf8_lossy(&message.payload).into_owned(),
                    )
                });
            let line = serde_json::json!({
                "unit": get(headers::FAILED_UNIT),
                "stage": get(headers::FAILED_STAGE),
                "error": get(headers::ERROR),
                "attempts": get(headers::ATTEMPTS).parse::<u64>().unwrap_or(0),
                "origin": get(headers::ORIGIN),
                "originSeq": get(headers::ORIGIN_SEQ),
                "data": data,
            });
            lines.push(line.to_string());
        }
        if got == 0 || lines.len() as u64 >= info.num_pending {
            break;
        }
    }
    lines.push(String::new());
    std::fs::write(&path, lines.join("\n"))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Some(path))
}
