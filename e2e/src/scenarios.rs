//! The runner of the suites that keep one expensive fixture for all their scenarios (the real-API
//! suite, the pod suite: `harness = false`): which scenarios the command line chose, and each run in
//! turn, a failure costing only itself.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

/// A scenario: its name and what it does with the suite's fixture.
pub type Scenario<S> = (&'static str, fn(&S));

/// The scenarios whose name contains one of the command line's words (all without words; flags
/// such as cargo's `--nocapture` are ignored), and those words.
pub fn chosen<S>(all: &[Scenario<S>]) -> (Vec<&Scenario<S>>, Vec<String>) {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let chosen = all
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    (chosen, filters)
}

/// Runs each scenario, printing its name, outcome and time; `failed` is called after each failure
/// (to keep logs). How many passed, and the names of those that failed.
pub fn run_each<S>(
    chosen: &[&Scenario<S>],
    suite: &S,
    mut failed: impl FnMut(&'static str),
) -> (usize, Vec<&'static str>) {
    let (mut passed, mut failures) = (0, Vec::new());
    for (name, scenario) in chosen {
        let started = Instant::now();
        println!("scenario {name} ...");
        match std::panic::catch_unwind(AssertUnwindSafe(|| scenario(suite))) {
            Ok(()) => {
                passed += 1;
                println!(
                    "scenario {name} ... ok ({:.1}s)",
                    started.elapsed().as_secs_f64()
                );
            }
            Err(_) => {
                failures.push(*name);
                println!(
                    "scenario {name} ... FAILED ({:.1}s)",
                    started.elapsed().as_secs_f64()
                );
                failed(name);
            }
        }
    }
    (passed, failures)
}
