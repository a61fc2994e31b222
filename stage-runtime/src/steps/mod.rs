//! The steps of a unit, run in-process in flow order, each with its timeout and retry policy. One file
//! per kind of step, each a [`Handler`] (`handler.rs`), registered in one line of `kinds!` below;
//! `Step` adds what every kind shares (timeout, retries, turns).

mod exec;
mod handler;
mod http;
mod jq;
mod passthrough;
mod sleep;

use std::time::Duration;

use switchyard_crds::unit::{RetryConfig, StepConfig};
use switchyard_crds::StepKind;
use tokio::sync::Semaphore;

use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::retry::{humanize, GaveUp, Retrying, StepError};

pub use crate::http::{http_client, LazyClient};
pub use exec::{parse_reply, shown, ReplyOf};
pub use handler::{BuildContext, BuildError, Handler};

/// Every kind of step, one line each: `Variant => handler type`, the variant named as in
/// `StepKind`. From this list the macro writes `Runner` (one variant a kind) and its dispatch: an
/// enum rather than a boxed trait object, because a step runs for every message and this keeps
/// each call free of an allocation. A kind missing here is a compile error in `Runner::build`.
macro_rules! kinds {
    ($($kind:ident => $handler:ty,)*) => {
        enum Runner {
            $($kind($handler),)*
        }

        impl Runner {
            fn build(config: &StepConfig, context: &BuildContext) -> Result<Runner, BuildError> {
                Ok(match &config.kind {
                    $(StepKind::$kind(settings) => {
                        Runner::$kind(<$handler as Handler>::build(settings, config, context)?)
                    })*
                })
            }

            fn hands_off(&self) -> bool {
                match self {
                    $(Runner::$kind(h) => h.hands_off(),)*
                }
            }

            fn isolates_itself(&self) -> bool {
                match self {
                    $(Runner::$kind(h) => h.isolates_itself(),)*
                }
            }

            fn times_itself(&self) -> bool {
                match self {
                    $(Runner::$kind(h) => h.times_itself(),)*
                }
            }

            async fn handle(
                &self,
                item: Payload,
                lineage: &Lineage,
                out: &mut Vec<Payload>,
            ) -> Result<(), StepError> {
                match self {
                    $(Runner::$kind(h) => h.handle(item, lineage, out).await,)*
                }
            }

            async fn handle_alone(
                &self,
                item: Payload,
                lineage: &Lineage,
                out: &mut Vec<Payload>,
            ) -> Result<(), StepError> {
                match self {
                    $(Runner::$kind(h) => h.handle_alone(item, lineage, out).await,)*
                }
            }

            async fn shutdown(&self) {
                match self {
                    $(Runner::$kind(h) => h.shutdown().await,)*
                }
            }
        }
    };
}

kinds! {
    Jq => jq::JqStep,
    Exec => exec::ExecStep,
    Http => http::HttpStep,
    Sleep => sleep::SleepStep,
    Passthrough => passthrough::Passthrough,
}

/// An item that failed for good at a step: it goes to the dead-letter subject.
#[derive(Debug)]
pub struct Failure {
    pub item: Payload,
    pub error: String,
    /// Attempts made, at most the step's `retry.maxAttempts`.
    pub attempts: u32,
    /// For a message that kept crashing its unit's process: how often it was delivered.
    pub deliveries: Option<u64>,
}

/// An item that left the chain at a step, for the dead-letter subject.
#[derive(Debug)]
pub struct StepFailure {
    /// The step's path, such as `machines > wash`.
    pub stage: String,
    /// The step's place in the unit, and the item's among those that reached it.
    pub step_index: usize,
    pub item_index: usize,
    /// Where a replay of the failed item starts: the failed step, whose input the item is; the first
    /// step when the item is the unit's input (an output too large, a message that kept crashing).
    pub replay_step: usize,
    pub failure: Failure,
}

/// What a chain of steps made of one input: its outputs, and the items that failed on the way.
#[derive(Debug, Default)]
pub struct Chained {
    pub outputs: Vec<Payload>,
    pub failures: Vec<StepFailure>,
}

/// Runs `steps` in order over one input; failed items leave the chain with the step that failed.
/// Two vectors serve the whole chain, whatever its length: a step costs no allocation of its own.
pub async fn run_chain(steps: &[Step], input: Payload, lineage: &Lineage) -> Chained {
    run_chain_from(steps, 0, input, lineage).await
}

/// Like `run_chain`, starting at step `first` (a replayed item that failed there); failures keep
/// their places in the whole chain.
pub async fn run_chain_from(
    steps: &[Step],
    first: usize,
    input: Payload,
    lineage: &Lineage,
) -> Chained {
    let mut items = vec![input];
    let mut next = Vec::new();
    let mut failures = Vec::new();
    for (step_index, step) in steps.iter().enumerate().skip(first) {
        next.clear();
        for (item_index, item) in items.drain(..).enumerate() {
            if let Err(failure) = step.run_into(item, lineage, &mut next).await {
                tracing::debug!(step = %step.path, error = %failure.error, attempts = failure.attempts, "dead-lettering an item");
                failures.push(StepFailure {
                    stage: step.path.clone(),
                    step_index,
                    item_index,
                    replay_step: step_index,
                    failure,
                });
            }
        }
        std::mem::swap(&mut items, &mut next);
        if items.is_empty() {
            break;
        }
    }
    Chained {
        outputs: items,
        failures,
    }
}

/// Messages one exec child or one HTTP endpoint holds at a time. A unit keeps `concurrency` (512 by
/// default) messages in flight; handed to a handler that works one at a time, the last would wait
/// 511 handler-times and fail a timeout set for one, and a user's web service would see 512
/// concurrent requests. 64 is enough to keep a child's pipes full. Messages wait their turn outside
/// the timeout.
pub const OUTSTANDING_CALLS: usize = 64;

pub struct Step {
    /// `machines > wash`, for logs and dead-letter headers.
    pub path: String,
    timeout: Option<Duration>,
    retry: RetryConfig,
    runner: Runner,
    /// For the steps that hand messages to somebody else (exec, http): see `OUTSTANDING_CALLS`.
    turns: Option<Semaphore>,
    /// Held while a suspect is tried alone: one at a time, so that its failure is its own.
    alone: tokio::sync::Mutex<()>,
}

impl Step {
    pub fn build(config: &StepConfig, http: &LazyClient) -> Result<Step, BuildError> {
        let runner = Runner::build(config, &BuildContext { http })?;
        let turns = runner
            .hands_off()
            .then(|| Semaphore::new(OUTSTANDING_CALLS));
        Ok(Step {
            path: config.path.clone(),
            timeout: config
                .timeout_ms
                .map(Duration::from_millis)
                .filter(|_| !runner.times_itself()),
            retry: config.retry,
            runner,
            turns,
            alone: tokio::sync::Mutex::new(()),
        })
    }

    /// Runs the step on one item with its timeout, retrying as its policy says.
    pub async fn run(&self, item: Payload, lineage: &Lineage) -> Result<Vec<Payload>, Failure> {
        let mut outputs = Vec::new();
        self.run_into(item, lineage, &mut outputs).await?;
        Ok(outputs)
    }

    /// Like `run`, appending the outputs to `out` (nothing is appended when it fails).
    pub async fn run_into(
        &self,
        item: Payload,
        lineage: &Lineage,
        out: &mut Vec<Payload>,
    ) -> Result<(), Failure> {
        let mut retry = Retrying::new(&self.retry, &self.path);
        loop {
            // The attempt stays inline: a future of its own per attempt measurably slows the hot path
            // (0.08 → 0.10 µs a message for one passthrough step in `switchyard-bench`).
            let attempt = {
                // Held for this attempt only, not while backing off before the next.
                let _turn = match &self.turns {
                    Some(turns) => turns.acquire().await.ok(),
                    None => None,
                };
                let handled = self.runner.handle(item.clone(), lineage, out);
                match self.timeout {
                    None => handled.await,
                    Some(limit) => tokio::time::timeout(limit, handled)
                        .await
                        .unwrap_or_else(|_| Err(timed_out(limit))),
                }
            };
            let error = match attempt {
                Ok(()) => return Ok(()),
                // Boxed: rare, and kept out of the hot path's future.
                Err(e) if e.suspect => {
                    match Box::pin(self.attempt_alone(&item, lineage, out)).await {
                        Ok(()) => return Ok(()),
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            if let Err(GaveUp { error, attempts }) = retry.after(error).await {
                return Err(Failure {
                    item,
                    error: error.message,
                    attempts,
                    deliveries: None,
                });
            }
        }
    }

    /// The attempt of a suspect, alone: no other suspect beside it, and for a handler that cannot
    /// isolate it by itself, no other call at all. What fails here counts.
    async fn attempt_alone(
        &self,
        item: &Payload,
        lineage: &Lineage,
        out: &mut Vec<Payload>,
    ) -> Result<(), StepError> {
        let _alone = self.alone.lock().await;
        let _every_turn = match &self.turns {
            Some(turns) if !self.runner.isolates_itself() => {
                turns.acquire_many(OUTSTANDING_CALLS as u32).await.ok()
            }
            _ => None,
        };
        let handled = self.runner.handle_alone(item.clone(), lineage, out);
        let result = match self.timeout {
            None => handled.await,
            Some(limit) => tokio::time::timeout(limit, handled)
                .await
                .unwrap_or_else(|_| Err(timed_out(limit))),
        };
        result.map_err(|e| StepError {
            suspect: false,
            ..e
        })
    }

    /// Attempts a message gets here, the first included.
    pub fn max_attempts(&self) -> u32 {
        self.retry.max_attempts
    }

    /// Stops what the step runs beside the unit (an exec child) once no more messages will come.
    pub async fn shutdown(&self) {
        self.runner.shutdown().await;
    }
}

/// An attempt that outlived the step's timeout.
fn timed_out(limit: Duration) -> StepError {
    StepError::transient(format!("timed out after {}", humanize(limit)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(kind: StepKind, timeout_ms: Option<u64>, max_attempts: u32) -> Step {
        Step::build(
            &StepConfig {
                path: "u > s".into(),
                kind,
                env: Vec::new(),
                timeout_ms,
                retry: RetryConfig {
                    max_attempts,
                    backoff_ms: 1,
                    max_backoff_ms: 5,
                },
            },
            &LazyClient::default(),
        )
        .unwrap()
    }

    fn lineage() -> Lineage {
        Lineage::at_source("s", "1".into(), "s:1".into())
    }

    fn text(outputs: Vec<Payload>) -> Vec<String> {
        outputs
            .into_iter()
            .map(|p| String::from_utf8(p.into_bytes().to_vec()).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn jq_gives_zero_one_or_many_outputs() {
        let s = step(StepKind::Jq(".[] | select(. > 1)".into()), None, 1);
        let out = s
            .run(Payload::Bytes("[1,2,3]".into()), &lineage())
            .await
            .unwrap();
        assert_eq!(text(out), vec!["2", "3"]);
        let out = s
            .run(Payload::Bytes("[0]".into()), &lineage())
            .await
            .unwrap();
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn jq_errors_are_not_retried() {
        let s = step(StepKind::Jq(".a".into()), None, 5);
        let failure = s
            .run(Payload::Bytes("not json".into()), &lineage())
            .await
            .unwrap_err();
        assert_eq!(failure.attempts, 1);
        assert!(failure.error.contains("not JSON"), "{}", failure.error);
    }

    #[tokio::test]
    async fn a_step_that_takes_too_long_times_out_on_every_attempt() {
        let s = step(StepKind::Sleep("200ms".into()), Some(20), 3);
        let started = std::time::Instant::now();
        let failure = s
            .run(Payload::Bytes("1".into()), &lineage())
            .await
            .unwrap_err();
        assert_eq!(failure.attempts, 3);
        assert_eq!(failure.error, "timed out after 20ms");
        assert!(started.elapsed() < Duration::from_millis(190));
    }

    #[tokio::test]
    async fn a_chain_fans_out_and_keeps_failures_with_their_step() {
        let steps = vec![
            step(StepKind::Jq(".[]".into()), None, 1),
            step(
                StepKind::Jq("if . == 2 then error(\"two\") else . * 10 end".into()),
                None,
                1,
            ),
            step(StepKind::Passthrough(Default::default()), None, 1),
        ];
        let chained = run_chain(&steps, Payload::Bytes("[1,2,3]".into()), &lineage()).await;
        assert_eq!(text(chained.outputs), vec!["10", "30"]);
        assert_eq!(chained.failures.len(), 1);
        let f = &chained.failures[0];
        assert_eq!((f.step_index, f.item_index), (1, 1));
        assert!(f.failure.error.contains("two"), "{}", f.failure.error);
        assert_eq!(text(vec![f.failure.item.clone()]), vec!["2"]);
        assert_eq!(f.replay_step, 1);
        // The replay of that item starts where it failed, with what it was there.
        let replayed =
            run_chain_from(&steps, f.replay_step, f.failure.item.clone(), &lineage()).await;
        assert!(replayed.outputs.is_empty());
        assert_eq!(replayed.failures[0].step_index, 1);
        let fixed = run_chain_from(&steps, 1, Payload::Bytes("4".into()), &lineage()).await;
        assert_eq!(text(fixed.outputs), vec!["40"]);
    }

    /// A message sent while the child's stdin is already gone, before the child has been replaced,
    /// never reached a child: it waits for the next one instead of spending its retries at once and
    /// being dead-lettered (which lost a message in CI). A child that stops reading but lingers is
    /// stopped, so what it holds is retried now, not whenever it chooses to exit.
    #[tokio::test]
    async fn messages_wait_for_a_new_child_when_the_old_one_stops_reading() {
        let dir = tempfile::tempdir().unwrap();
        let first_life = dir.path().join("first-life");
        // First life: close stdin, say so with a file, and linger. Later lives: echo.
        let code = "import json, os, sys, time\n\
                    if not os.path.exists(sys.argv[1]):\n    os.close(0)\n    open(sys.argv[1], 'w').close()\n    time.sleep(30)\n    sys.exit(0)\n\
                    for line in sys.stdin:\n    m = json.loads(line)\n    print(json.dumps({'id': m['id'], 'outputs': [m['data']]}), flush=True)\n";
        let s = step(
            StepKind::Exec(switchyard_crds::ExecStep {
                command: vec![
                    "python3".into(),
                    "-c".into(),
                    code.into(),
                    first_life.display().to_string(),
                ],
            }),
            None,
            1,
        );
        // The file appears once the child's stdin is closed.
        while !first_life.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let lineage = lineage();
        let (first, second) = tokio::time::timeout(Duration::from_secs(10), async {
            // The first write finds the pipe closed; the second comes while the child still lingers.
            let first = s.run(Payload::Bytes("1".into()), &lineage);
            let second = async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                s.run(Payload::Bytes("2".into()), &lineage).await
            };
            tokio::join!(first, second)
        })
        .await
        .expect("the messages waited for the lingering child instead of a new one");
        assert_eq!(text(first.unwrap()), vec!["1"]);
        assert_eq!(text(second.unwrap()), vec!["2"]);
        s.shutdown().await;
    }

    /// A handler that answers with something that is no reply: the message fails each attempt at once,
    /// with the line in its error, instead of waiting for its timeout.
    #[tokio::test]
    async fn a_line_that_is_no_reply_fails_the_attempt_and_is_quoted() {
        let code =
            "import sys\nfor line in sys.stdin:\n    print('this is not json', flush=True)\n";
        let s = step(
            StepKind::Exec(switchyard_crds::ExecStep {
                command: vec!["python3".into(), "-c".into(), code.into()],
            }),
            Some(3000),
            2,
        );
        let started = std::time::Instant::now();
        let failure = s
            .run(Payload::Bytes("1".into()), &lineage())
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "it waited for the timeout"
        );
        assert_eq!(failure.attempts, 2);
        assert_eq!(
            failure.error,
            format!("the handler of step u > s wrote `this is not json` instead of a reply (expected ident at line 1 column 2); {}", exec::REPLY_FORM),
            "the line quoted, the step named, what a reply looks like, nothing said twice"
        );
        s.shutdown().await;
    }

    fn python_step(code: &str, timeout_ms: Option<u64>, max_attempts: u32) -> Step {
        step(
            StepKind::Exec(switchyard_crds::ExecStep {
                command: vec!["python3".into(), "-c".into(), code.into()],
            }),
            timeout_ms,
            max_attempts,
        )
    }

    /// Runs `count` items (`0`, `1`, ...) through `s` all at once, as a unit does, and returns the
    /// items that failed with their errors and attempts.
    async fn failures_of(s: &Step, count: usize) -> Vec<(String, String, u32)> {
        let lineage = lineage();
        let runs = (0..count).map(|n| s.run(Payload::Bytes(n.to_string().into()), &lineage));
        let results =
            tokio::time::timeout(Duration::from_secs(60), futures::future::join_all(runs))
                .await
                .expect("the step did not finish its items in a minute");
        let mut failed = Vec::new();
        for (n, result) in results.into_iter().enumerate() {
            match result {
                Ok(outputs) => assert_eq!(text(outputs), vec![n.to_string()]),
                Err(f) => failed.push((text(vec![f.item]).remove(0), f.error, f.attempts)),
            }
        }
        failed.sort_by_key(|(item, _, _)| item.parse::<u64>().unwrap_or(u64::MAX));
        failed
    }

    /// Found by trying it as a new user: a handler that answered every 50th of 1,000 items with a line
    /// that is no reply sent 285 items to the dead letters, most of them good, because every item the
    /// child held when the line came failed its attempt with it. Only the culprits may fail now.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_line_that_is_no_reply_fails_only_the_item_that_provoked_it() {
        // The runtime writes up to 64 items before the child answers the first: a bad line comes
        // with many good items held.
        let code = "import json, sys\nfor line in sys.stdin:\n    m = json.loads(line)\n    if m['data'] % 50 == 7:\n        print('this is not json', flush=True)\n    else:\n        print(json.dumps({'id': m['id'], 'outputs': [m['data']]}), flush=True)\n";
        for max_attempts in [1, 2] {
            let s = python_step(code, None, max_attempts);
            let failed = failures_of(&s, 1000).await;
            let items: Vec<&str> = failed.iter().map(|(item, _, _)| item.as_str()).collect();
            let expected: Vec<String> = (0..1000)
                .filter(|n| n % 50 == 7)
                .map(|n| n.to_string())
                .collect();
            assert_eq!(items, expected, "maxAttempts {max_attempts}");
            for (_, error, attempts) in &failed {
                assert_eq!(*attempts, max_attempts);
                assert!(
                    error.contains("wrote `this is not json` instead of a reply"),
                    "{error}"
                );
            }
            s.shutdown().await;
        }
    }

    /// A child that dies on one item used to fail every item it held (three times free, then for
    /// good); a child stuck on one item held up every item after it until each timed out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_or_a_hang_fails_only_the_item_that_caused_it() {
        let code = "import json, os, sys, time\nfor line in sys.stdin:\n    m = json.loads(line)\n    if m['data'] == 33:\n        os._exit(3)\n    if m['data'] == 66:\n        time.sleep(600)\n    print(json.dumps({'id': m['id'], 'outputs': [m['data']]}), flush=True)\n";
        let s = python_step(code, Some(1000), 1);
        let failed = failures_of(&s, 200).await;
        assert_eq!(failed.len(), 2, "{failed:?}");
        let (item, error, attempts) = &failed[0];
        assert_eq!((item.as_str(), *attempts), ("33", 1));
        assert_eq!(
            error,
            "the handler of step u > s ended while it worked on the message: exit status: 3"
        );
        let (item, error, attempts) = &failed[1];
        assert_eq!((item.as_str(), *attempts), ("66", 1));
        assert_eq!(
            error,
            "timed out after 1s: the handler of step u > s did not answer, and was restarted"
        );
        s.shutdown().await;
    }

    #[tokio::test]
    async fn passthrough_and_sleep_keep_the_message() {
        for kind in [
            StepKind::Passthrough(Default::default()),
            StepKind::Sleep("1ms".into()),
        ] {
            let out = step(kind, None, 1)
                .run(Payload::Bytes("x".into()), &lineage())
                .await
                .unwrap();
            assert_eq!(text(out), vec!["x"]);
        }
    }
}
