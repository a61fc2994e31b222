//! `switchyard-bench peer`: the job a user compares tools with, end to end on one machine. A JSONL
//! file of small records, a Python function that parses each, adds three fields and serializes it,
//! and a file of the results, through `switchyard run` and through Bytewax (with its recovery on,
//! so that both outputs are durable), on the same input in the same run. Each output is checked:
//! every record once, enriched.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use switchyard_local::thousands;

#[derive(Args, Debug)]
pub struct PeerArgs {
    /// Records in the input file.
    #[arg(long, default_value_t = 200_000)]
    items: u64,
    /// The Bytewax release to compare with, installed from PyPI into a virtual environment kept in
    /// `~/.cache/switchyard/bench` (or `$SWITCHYARD_CACHE/bench`); `none` runs Switchyard alone.
    #[arg(long, default_value = "0.21.1")]
    bytewax: String,
    /// The `switchyard` binary (default: the one beside this program).
    #[arg(long, env = "SWITCHYARD_BIN")]
    switchyard: Option<PathBuf>,
    /// Keep the working folder (input, outputs, the Pipeline and the flow) here: a new or empty
    /// folder.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
}

/// The user's function, the same in both tools.
const ENRICH: &str = r#"def enrich(r):
    r["total"] = round(r["price"] * r["qty"], 2)
    r["cheap"] = r["price"] < 10
    r["tag"] = r["name"].upper()
    return r
"#;

/// The exec handler of the README's shape: one request line in, one reply line out.
const HANDLER_LOOP: &str = r#"
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    print(json.dumps({"id": m["id"], "outputs": [enrich(m["data"])]}), flush=True)
"#;

const PIPELINE: &str = r#"apiVersion: switchyard.dev/v1alpha1
kind: Pipeline
metadata: {name: enrich}
spec:
  sources:
    - name: records
      file: {path: input.jsonl}
  stages:
    - name: enrich
      exec: {command: [python3, handler.py]}
  sinks:
    - name: out
      file: {path: switchyard-out.jsonl}
"#;

/// Bytewax 0.21's FileSource → map → FileSink (a partitioned sink: items are (key, line)).
const FLOW: &str = r#"
import json
from pathlib import Path
from bytewax.dataflow import Dataflow
import bytewax.operators as op
from bytewax.connectors.files import FileSource, FileSink

flow = Dataflow("enrich")
lines = op.input("in", flow, FileSource("input.jsonl"))
out = op.map("enrich", lines, lambda line: ("all", json.dumps(enrich(json.loads(line)))))
op.output("out", out, FileSink(Path("bytewax-out.jsonl")))
"#;

pub fn main(args: PeerArgs) -> std::process::ExitCode {
    match run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard-bench peer: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: &PeerArgs) -> anyhow::Result<()> {
    let temp = tempfile::tempdir()?;
    let dir = match &args.keep {
        Some(keep) => {
            std::fs::create_dir_all(keep)
                .with_context(|| format!("cannot create {}", keep.display()))?;
            // A store, a ledger or a recovery database left by an earlier run would resume it.
            if std::fs::read_dir(keep)?.next().is_some() {
                bail!(
                    "{} is not empty: --keep wants a new or empty folder",
                    keep.display()
                );
            }
            keep.clone()
        }
        None => temp.path().to_path_buf(),
    };
    let input_bytes = write_input(&dir.join("input.jsonl"), args.items)?;
    std::fs::write(dir.join("handler.py"), format!("{ENRICH}{HANDLER_LOOP}"))?;
    std::fs::write(dir.join("p.yaml"), PIPELINE)?;
    std::fs::write(dir.join("flow.py"), format!("{ENRICH}{FLOW}"))?;
    println!(
        "file → Python function → file, {} records of {} bytes on average, on {}",
        thousands(args.items),
        input_bytes / args.items.max(1),
        crate::args::machine()
    );
    let ours = switchyard_runs(args, &dir)?;
    if args.bytewax == "none" {
        return Ok(());
    }
    bytewax_runs(args, &dir, ours)
}

/// The job through `switchyard run`, then killed halfway and resumed; its seconds.
fn switchyard_runs(args: &PeerArgs, dir: &Path) -> anyhow::Result<f64> {
    let items = args.items;
    let switchyard = match &args.switchyard {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?.with_file_name("switchyard"),
    };
    let ours = timed(
        Command::new(&switchyard)
            .args(["run", "p.yaml"])
            .current_dir(dir),
    )
    .with_context(|| format!("`{} run p.yaml` in {}", switchyard.display(), dir.display()))?;
    check_output(&dir.join("switchyard-out.jsonl"), items).context("switchyard's output")?;
    println!(
        "  switchyard run (exec step, file sink with its ledger): {:.2} s, {} items/s",
        ours,
        thousands((items as f64 / ours) as u64)
    );
    let killed = dir.join("killed-switchyard");
    prepare_copy(dir, &killed, &["input.jsonl", "handler.py", "p.yaml"])?;
    let resumed = kill_and_resume(
        &killed,
        "switchyard-out.jsonl",
        items,
        &mut || {
            let mut c = Command::new(&switchyard);
            c.args(["run", "p.yaml"]);
            c
        },
        &mut || {
            let mut c = Command::new(&switchyard);
            c.args(["run", "p.yaml", "--resume"]);
            c
        },
    )
    .context("switchyard, killed and resumed")?;
    println!("  switchyard run, SIGKILLed halfway and run again with --resume: {resumed}");
    Ok(ours)
}

/// The same job as a Bytewax flow, then killed halfway and resumed, against `ours` seconds.
fn bytewax_runs(args: &PeerArgs, dir: &Path, ours: f64) -> anyhow::Result<()> {
    let items = args.items;
    let python = match bytewax_python(&args.bytewax) {
        Ok(python) => python,
        Err(e) => {
            println!(
                "  bytewax {}: skipped, it cannot be installed: {e:#}",
                args.bytewax
            );
            return Ok(());
        }
    };
    recovery_store(&python, dir)?;
    let theirs = timed(bytewax_run(&python).current_dir(dir)).context("the Bytewax flow")?;
    check_output(&dir.join("bytewax-out.jsonl"), items).context("Bytewax's output")?;
    println!(
        "  bytewax {} (FileSource → map → FileSink, recovery on): {:.2} s, {} items/s",
        args.bytewax,
        theirs,
        thousands((items as f64 / theirs) as u64)
    );
    println!(
        "  switchyard against bytewax: {:.2} × its throughput",
        theirs / ours
    );
    let killed = dir.join("killed-bytewax");
    prepare_copy(dir, &killed, &["input.jsonl", "flow.py"])?;
    recovery_store(&python, &killed)?;
    let resumed = kill_and_resume(
        &killed,
        "bytewax-out.jsonl",
        items,
        &mut || bytewax_run(&python),
        &mut || bytewax_run(&python),
    )
    .context("Bytewax, killed and resumed")?;
    println!(
        "  bytewax {}, SIGKILLed halfway and run again on its recovery store: {resumed}",
        args.bytewax
    );
    Ok(())
}

/// Bytewax's recovery store in `dir`, one partition.
fn recovery_store(python: &Path, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("recovery"))?;
    quiet(
        Command::new(python)
            .args(["-m", "bytewax.recovery", "recovery", "1"])
            .current_dir(dir),
    )
    .context("creating Bytewax's recovery store")
}

/// The flow with its recovery on: snapshots every 5 s, none kept longer, the cheapest it offers.
fn bytewax_run(python: &Path) -> Command {
    let mut c = Command::new(python);
    c.args([
        "-m",
        "bytewax.run",
        "flow:flow",
        "-r",
        "recovery",
        "-s",
        "5",
        "-b",
        "0",
    ]);
    c
}

/// A folder of its own for a run that is killed, with copies of `files` from `from`.
fn prepare_copy(from: &Path, to: &Path, files: &[&str]) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for file in files {
        std::fs::copy(from.join(file), to.join(file))
            .with_context(|| format!("cannot copy {file} to {}", to.display()))?;
    }
    Ok(())
}

/// What an output holds: records once, twice or more, missing, and lines that are not an enriched
/// record.
#[derive(Debug, Default, PartialEq)]
struct Tally {
    once: u64,
    repeated: u64,
    missing: u64,
    bad: u64,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.repeated == 0 && self.missing == 0 && self.bad == 0 {
            return write!(f, "every record once ({})", thousands(self.once));
        }
        write!(
            f,
            "{} records once, {} more than once, {} missing, {} lines that are no enriched record",
            thousands(self.once),
            thousands(self.repeated),
            thousands(self.missing),
            thousands(self.bad)
        )
    }
}

fn tally(path: &Path, count: u64) -> Tally {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut seen = std::collections::HashMap::<u64, u64>::new();
    let mut bad = 0;
    for line in text.lines() {
        let record: Option<serde_json::Value> = serde_json::from_str(line).ok();
        match record.as_ref().and_then(|r| Some((r["id"].as_u64()?, r))) {
            Some((id, r)) if r["tag"].as_str() == Some(format!("ITEM-{id:06}").as_str()) => {
                *seen.entry(id).or_default() += 1;
            }
            _ => bad += 1,
        }
    }
    Tally {
        once: seen.values().filter(|&&n| n == 1).count() as u64,
        repeated: seen.values().filter(|&&n| n > 1).count() as u64,
        missing: (0..count).filter(|id| !seen.contains_key(id)).count() as u64,
        bad,
    }
}

/// Starts `first` in `dir`, SIGKILLs it and everything it started once `output` holds half the
/// records, runs `again` to its end, and says what the output holds and how long it all took.
fn kill_and_resume(
    dir: &Path,
    output: &str,
    count: u64,
    first: &mut dyn FnMut() -> Command,
    again: &mut dyn FnMut() -> Command,
) -> anyhow::Result<String> {
    use std::os::unix::process::CommandExt as _;
    let out = dir.join(output);
    let started = Instant::now();
    let mut child = first()
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // A group of its own: the kill takes its servers and workers too, as a power cut would.
        .process_group(0)
        .spawn()
        .context("cannot start the first run")?;
    let lines = |path: &Path| {
        std::fs::read(path)
            .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
            .unwrap_or(0)
    };
    let mut at = 0;
    while started.elapsed() < std::time::Duration::from_secs(300) {
        at = lines(&out);
        if at >= count / 2 {
            break;
        }
        if child.try_wait()?.is_some() {
            bail!("the first run ended before it was killed, with {at} lines");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: kill(2) on the process group this function started; nothing else is in it.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    let _ = child.wait();
    let killed_at = started.elapsed().as_secs_f64();
    let again_took = timed(again().current_dir(dir))?;
    Ok(format!(
        "killed at {} lines after {killed_at:.2} s, the second run took {again_took:.2} s; {}",
        thousands(at),
        tally(&out, count)
    ))
}

/// Writes `count` records of about 100 bytes such as `{"id": 7, "name": "item-000007", "category":
/// "toys", "price": 54.33, "qty": 7, "warehouse": "north-7"}`; returns the file's size.
fn write_input(path: &Path, count: u64) -> anyhow::Result<u64> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut bytes = 0u64;
    for i in 0..count {
        // Prices spread over 0–100 without a random generator: the same file every run.
        let price = (i * 7919 % 10_000) as f64 / 100.0;
        let category = ["kitchen", "garden", "household", "toys", "books"][(i % 5) as usize];
        let line = format!(
            "{{\"id\": {i}, \"name\": \"item-{i:06}\", \"category\": \"{category}\", \"price\": {price:.2}, \"qty\": {}, \"warehouse\": \"north-{}\"}}\n",
            i % 17,
            i % 9
        );
        bytes += line.len() as u64;
        out.write_all(line.as_bytes())?;
    }
    out.flush()?;
    Ok(bytes)
}

/// Every record once, enriched.
fn check_output(path: &Path, count: u64) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut seen = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let record: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON: {line}", path.display(), n + 1))?;
        let Some(id) = record["id"].as_u64() else {
            bail!("{} line {}: no id: {line}", path.display(), n + 1);
        };
        if record["tag"].as_str() != Some(format!("ITEM-{id:06}").as_str()) {
            bail!("{} line {}: not enriched: {line}", path.display(), n + 1);
        }
        if !seen.insert(id) {
            bail!("{}: record {id} twice", path.display());
        }
    }
    if seen.len() as u64 != count {
        bail!(
            "{}: {} of {count} records",
            path.display(),
            thousands(seen.len() as u64)
        );
    }
    Ok(())
}

/// The Python of a virtual environment with Bytewax `version`, made once.
fn bytewax_python(version: &str) -> anyhow::Result<PathBuf> {
    // Where the test suite keeps what it builds (scripts/kube-binaries, the images) too.
    let cache = match std::env::var_os("SWITCHYARD_CACHE") {
        Some(cache) => PathBuf::from(cache),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
            .join(".cache/switchyard"),
    };
    let venv = cache.join(format!("bench/bytewax-{version}"));
    let python = venv.join("bin/python");
    let ready = venv.join(".installed");
    if ready.is_file() {
        return Ok(python);
    }
    eprintln!("installing bytewax {version} into {}", venv.display());
    quiet(Command::new("python3").arg("-m").arg("venv").arg(&venv)).context("python3 -m venv")?;
    quiet(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet"])
            .arg(format!("bytewax=={version}")),
    )
    .context("pip install")?;
    std::fs::write(&ready, "")?;
    Ok(python)
}

/// Runs `command` to its end, its output discarded unless it fails; seconds it took.
fn timed(command: &mut Command) -> anyhow::Result<f64> {
    let started = Instant::now();
    quiet(command)?;
    Ok(started.elapsed().as_secs_f64())
}

fn quiet(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {:?}", command.get_program()))?;
    if !output.status.success() {
        // The end of what it said: a `switchyard run` that fails ends with its summary and why.
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
        bail!(
            "{:?} {}:\n{}",
            command.get_program(),
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_passes_only_with_every_record_once_and_enriched() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out.jsonl");
        let record = |id: u64| format!("{{\"id\": {id}, \"tag\": \"ITEM-{id:06}\"}}\n");
        let check = |text: String| {
            std::fs::write(&file, text).unwrap();
            check_output(&file, 3).map_err(|e| e.to_string())
        };
        assert_eq!(check(record(0) + &record(2) + &record(1)), Ok(()));
        let twice = check(record(0) + &record(1) + &record(1)).unwrap_err();
        assert!(twice.ends_with("record 1 twice"), "{twice}");
        let short = check(record(0) + &record(1)).unwrap_err();
        assert!(short.ends_with("2 of 3 records"), "{short}");
        let plain = check(record(0) + "{\"id\": 1}\n" + &record(2)).unwrap_err();
        assert!(plain.contains("line 2: not enriched"), "{plain}");
    }

    #[test]
    fn a_tally_counts_records_once_repeated_missing_and_bad() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("out.jsonl");
        let record = |id: u64| format!("{{\"id\": {id}, \"tag\": \"ITEM-{id:06}\"}}\n");
        std::fs::write(&file, record(0) + &record(1) + &record(1) + "{\"id\": 3}\n").unwrap();
        let t = tally(&file, 4);
        assert_eq!(
            t,
            Tally {
                once: 1,
                repeated: 1,
                missing: 2,
                bad: 1
            }
        );
        assert_eq!(
            t.to_string(),
            "1 records once, 1 more than once, 2 missing, 1 lines that are no enriched record"
        );
        std::fs::write(&file, record(1) + &record(0)).unwrap();
        assert_eq!(tally(&file, 2).to_string(), "every record once (2)");
    }

    #[test]
    fn the_input_is_the_same_every_run_and_about_100_bytes_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let size = write_input(&a, 1000).unwrap();
        assert_eq!(write_input(&b, 1000).unwrap(), size);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert!((90..=120).contains(&(size / 1000)), "{size}");
    }
}
