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

/// Reads, checks and lays out the Pipeline in `file`; on failure, what to print, naming the file.
pub fn prepare(file: &Path) -> Result<Prepared, String> {
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
    let problems = preflight(&topology, &layout, &base_dir);
    if !problems.is_empty() {
        let mut text = String::new();
        for p in &problems {
            text.push_str(&format!("{}: {p}\n", file.display()));
        }
        text.push_str(&format!(
            "{}: cannot run: {} problem{}\n",
            file.display(),
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        ));
        return Err(text);
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
