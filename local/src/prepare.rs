//! Before a run starts: the Pipeline read, checked and laid out, and what would only fail later inside a
//! stage process (a missing program, script or input file) found now.

use std::path::{Path, PathBuf};

use switchyard_crds::layout::{layout, trace_retention, Layout, Names};
use switchyard_crds::load::{load, LoadError};
use switchyard_crds::topology::Topology;
use switchyard_crds::unit::UnitRole;
use switchyard_crds::validate::analyze;
use switchyard_crds::{ExecStep, FileSink, FileSource, HttpSource, SinkKind, SourceKind, StepKind};

/// Without `spec.tracing.sampleRate`, `switchyard run` traces every item while a source makes no
/// more than this many a second, and this share of the items beyond.
pub const LOCAL_TRACE_EVERY_UP_TO: u32 = 1000;
pub const LOCAL_SAMPLE_RATE_BEYOND: f64 = 0.01;

/// Everything a run needs to know about its Pipeline.
pub struct Prepared {
    pub name: String,
    /// `spec.tracing.sampleRate` as in force for the run.
    pub sample_rate: f64,
    pub topology: Topology,
    pub layout: Layout,
    /// `spec.nats.replicas` as the file says it (the layout holds its default when it does not).
    pub nats_replicas: Option<u32>,
    /// The Pipeline file's folder: units run there, so relative paths mean the same as in the file.
    pub base_dir: PathBuf,
    /// `spec.migration`: how `--watch` carries out an edit.
    pub policy: switchyard_crds::migration::Policy,
}

/// Why a Pipeline file cannot be run; shown as lines naming the file.
#[derive(Debug)]
pub enum PrepareError {
    Invalid {
        file: PathBuf,
        error: LoadError,
    },
    Folder {
        folder: PathBuf,
        source: std::io::Error,
    },
    /// What would fail later, inside a stage process.
    Preflight {
        file: PathBuf,
        problems: Vec<String>,
    },
}

impl std::fmt::Display for PrepareError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrepareError::Invalid { file, error } => f.write_str(&error.describe(file)),
            PrepareError::Folder { folder, source } => {
                writeln!(
                    f,
                    "{}: cannot resolve the folder: {source}",
                    folder.display()
                )
            }
            PrepareError::Preflight { file, problems } => {
                for p in problems {
                    writeln!(f, "{}: {p}", file.display())?;
                }
                writeln!(
                    f,
                    "{}: cannot run: {} problem{}",
                    file.display(),
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" }
                )
            }
        }
    }
}

/// Reads, checks and lays out the Pipeline in `file`.
pub fn prepare(file: &Path) -> Result<Prepared, PrepareError> {
    let prepared = lay_out(file)?;
    let problems = preflight(&prepared.topology, &prepared.layout, &prepared.base_dir);
    if !problems.is_empty() {
        return Err(PrepareError::Preflight {
            file: file.to_path_buf(),
            problems,
        });
    }
    Ok(prepared)
}

/// Reads, checks and lays out the Pipeline in `file`, as a run would, without looking for what its
/// units need (a day-2 command runs none of them).
pub fn lay_out(file: &Path) -> Result<Prepared, PrepareError> {
    let invalid = |error| PrepareError::Invalid {
        file: file.to_path_buf(),
        error,
    };
    let pipeline = load(file).map_err(invalid)?;
    let topology = analyze(&pipeline).map_err(|p| invalid(LoadError::Invalid(p)))?;
    let mut layout =
        layout(&topology, &pipeline.spec).map_err(|p| invalid(LoadError::Invalid(p)))?;
    if pipeline
        .spec
        .tracing
        .as_ref()
        .and_then(|t| t.sample_rate)
        .is_none()
    {
        // On one's own machine every item is worth a trace (`switchyard trace` finds any of them)
        // while they come at a pace a person follows; beyond that the trace events of a fast run
        // would outnumber its stored messages (frames hold hundreds of items), and a sample does.
        let names = Names::new(&topology.namespace, &topology.pipeline);
        layout.set_sample_rate(
            LOCAL_SAMPLE_RATE_BEYOND,
            &names,
            trace_retention(&pipeline.spec),
        );
        for unit in &mut layout.units {
            if let Some(trace) = &mut unit.trace {
                trace.every_up_to_per_second = Some(LOCAL_TRACE_EVERY_UP_TO);
            }
        }
    }
    let folder = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base_dir = folder
        .canonicalize()
        .map_err(|source| PrepareError::Folder {
            folder: folder.to_path_buf(),
            source,
        })?;
    let sample_rate = layout
        .units
        .first()
        .and_then(|u| u.trace.as_ref())
        .map_or(0.0, |t| t.sample_rate);
    Ok(Prepared {
        sample_rate,
        name: topology.pipeline.clone(),
        topology,
        layout,
        nats_replicas: pipeline.spec.nats.as_ref().and_then(|n| n.replicas),
        base_dir,
        policy: switchyard_crds::migration::Policy::of(&pipeline.spec),
    })
}

/// What would only fail later, inside a stage process: missing programs, input files that cannot be
/// read, output files that cannot be written.
fn preflight(topology: &Topology, layout: &Layout, base_dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for (unit, config) in topology.units.iter().zip(&layout.units) {
        let found = match &config.role {
            UnitRole::Process { steps, .. } => steps
                .iter()
                .flat_map(|step| match &step.kind {
                    StepKind::Exec(ExecStep { command }) => {
                        exec_problems(&step.path, command, base_dir)
                    }
                    _ => Vec::new(),
                })
                .collect(),
            UnitRole::Source {
                source: SourceKind::File(FileSource { path }),
                ..
            } => input_problems(path, base_dir).into_iter().collect(),
            UnitRole::Sink {
                sink: SinkKind::File(FileSink { path }),
                ..
            } => output_problems(path, base_dir).into_iter().collect(),
            UnitRole::Source {
                source:
                    SourceKind::Http(HttpSource {
                        bearer_token: Some(token),
                        ..
                    }),
                ..
            } if std::env::var(&token.env).map_or(true, |v| v.trim().is_empty()) => vec![format!(
                "http.bearerToken.env names `{}`, which is not set: export it with the token before `switchyard run` (a Secret is read only in a cluster)",
                token.env
            )],
            _ => Vec::new(),
        };
        problems.extend(
            found
                .into_iter()
                .map(|p| format!("{}: {p}", unit.spec_path)),
        );
    }
    problems
}

fn exec_problems(step: &str, command: &[String], base_dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(program) = command.first() else {
        return problems;
    };
    if !program_exists(program, base_dir) {
        problems.push(format!(
            "step `{step}` runs `{program}`, which is {}: {}",
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
        if looks_like_script && !base_dir.join(arg).exists() {
            problems.push(format!(
                "step `{step}` names `{arg}`, which is not in {}",
                base_dir.display()
            ));
        }
    }
    problems
}

/// A file source's file or folder must be there and readable.
fn input_problems(path: &str, base_dir: &Path) -> Option<String> {
    let full = base_dir.join(path);
    let readable = if full.is_dir() {
        std::fs::read_dir(&full).map(|_| ())
    } else {
        std::fs::File::open(&full).map(|_| ())
    };
    match readable {
        Ok(()) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(format!(
            "file source `{path}` is not in {} (relative paths start in the Pipeline file's folder)",
            base_dir.display()
        )),
        Err(e) => Some(format!("file source `{path}` cannot be read: {e}")),
    }
}

/// A file sink's file must be a file (or not there yet) in a folder this run can write.
fn output_problems(path: &str, base_dir: &Path) -> Option<String> {
    let full = base_dir.join(path);
    if full.is_dir() {
        return Some(format!(
            "file sink `{path}` is a folder in {}: name a file",
            base_dir.display()
        ));
    }
    // The sink creates missing folders; the nearest one that exists must take new files.
    let folder = full.ancestors().skip(1).find(|a| a.exists())?;
    if !folder.is_dir() {
        return Some(format!(
            "file sink `{path}`: {} is not a folder",
            folder.display()
        ));
    }
    let probe = tempfile::Builder::new()
        .prefix(".switchyard-write-check")
        .tempfile_in(folder);
    probe.err().map(|e| {
        format!(
            "file sink `{path}` cannot be written: {} does not take new files ({e})",
            folder.display()
        )
    })
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
