//! Before a run starts: the Pipeline read, checked and laid out, and what would only fail later inside a
//! stage process (a missing program, script or input file) found now.

use std::path::{Path, PathBuf};

use switchyard_crds::layout::{layout, Layout};
use switchyard_crds::load::{load, LoadError};
use switchyard_crds::topology::Topology;
use switchyard_crds::unit::UnitRole;
use switchyard_crds::validate::analyze;
use switchyard_crds::{ExecStep, FileSource, SourceKind, StepKind};

/// Everything a run needs to know about its Pipeline.
pub struct Prepared {
    pub name: String,
    pub topology: Topology,
    pub layout: Layout,
    /// The Pipeline file's folder: units run there, so relative paths mean the same as in the file.
    pub base_dir: PathBuf,
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
    let invalid = |error| PrepareError::Invalid {
        file: file.to_path_buf(),
        error,
    };
    let pipeline = load(file).map_err(invalid)?;
    let topology = analyze(&pipeline).map_err(|p| invalid(LoadError::Invalid(p)))?;
    let layout = layout(&topology, &pipeline.spec).map_err(|p| invalid(LoadError::Invalid(p)))?;
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
    let problems = preflight(&topology, &layout, &base_dir);
    if !problems.is_empty() {
        return Err(PrepareError::Preflight {
            file: file.to_path_buf(),
            problems,
        });
    }
    Ok(Prepared {
        name: topology.pipeline.clone(),
        topology,
        layout,
        base_dir,
    })
}

/// What would only fail later, inside a stage process: missing programs and input files.
fn preflight(topology: &Topology, layout: &Layout, base_dir: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for (unit, config) in topology.units.iter().zip(&layout.units) {
        match &config.role {
            UnitRole::Process { steps, .. } => {
                for step in steps {
                    if let StepKind::Exec(ExecStep { command }) = &step.kind {
                        let Some(program) = command.first() else {
                            continue;
                        };
                        if !program_exists(program, base_dir) {
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
                            if looks_like_script && !base_dir.join(arg).exists() {
                                problems.push(format!(
                                    "{}: step `{}` names `{arg}`, which is not in {}",
                                    unit.spec_path,
                                    step.path,
                                    base_dir.display()
                                ));
                            }
                        }
                    }
                }
            }
            UnitRole::Source {
                source: SourceKind::File(FileSource { path }),
                ..
            } if !base_dir.join(path).exists() => {
                problems.push(format!(
                    "{}: file source `{path}` is not in {} (relative paths start in the Pipeline file's folder)",
                    unit.spec_path,
                    base_dir.display()
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
