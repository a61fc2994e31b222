//! The exec step itself: the shared child every message goes to first, and the child that tries
//! suspects one at a time, started when one needs it and stopped once none has for a while.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::retry::{humanize, StepError};
use crate::steps::handler::{BuildContext, BuildError, Handler};
use switchyard_crds::unit::StepConfig;

use super::child::{find_program, ChildSpec, Fate, Lane, Outcome, Reply};
use super::protocol::REPLY_FORM;
use crate::locks::lock;

pub struct ExecStep {
    spec: Arc<ChildSpec>,
    timeout: Option<Duration>,
    /// The child every message goes to first, many at a time.
    shared: Lane,
    /// The child that tries suspects one at a time: started when the first one needs it, stopped
    /// once none has needed it for `alone_idle` (a handler may hold a large model in memory, and
    /// suspects come seldom, in bursts).
    alone: Arc<Mutex<Option<AloneChild>>>,
    alone_idle: Duration,
}

struct AloneChild {
    lane: Arc<Lane>,
    last_used: Instant,
    stopper: tokio::task::JoinHandle<()>,
}

/// How long the child for suspects stays once no suspect needs it.
const ALONE_IDLE: Duration = Duration::from_secs(30);

impl ExecStep {
    pub fn start(
        path: &str,
        command: &[String],
        env: &[(String, String)],
        timeout: Option<Duration>,
    ) -> Result<ExecStep, BuildError> {
        if command.is_empty() {
            return Err(BuildError::Settings(format!(
                "step {path}: exec.command is empty"
            )));
        }
        // A handler whose program is not there will never start: say so now, and stop the unit,
        // rather than restart it for ever while every message waits.
        let search = env
            .iter()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.clone())
            .or_else(|| std::env::var("PATH").ok())
            .unwrap_or_default();
        if find_program(&command[0], &search).is_none() {
            return Err(BuildError::Settings(format!(
                "step {path}: cannot start the handler: `{}` is not {} (PATH={search}); use an image that has it (the stage's `image`), or install it",
                command[0],
                if command[0].contains('/') { "an executable file" } else { "on PATH" },
            )));
        }
        let spec = Arc::new(ChildSpec {
            path: path.to_string(),
            command: command.to_vec(),
            env: env.to_vec(),
        });
        Ok(ExecStep {
            shared: Lane::start(spec.clone(), ""),
            spec,
            timeout,
            alone: Arc::new(Mutex::new(None)),
            alone_idle: ALONE_IDLE,
        })
    }

    /// Sends `item` to the shared child. A failure it shares with the other messages that child
    /// held comes back as a suspect, for `call_alone`.
    pub async fn call(&self, item: &Payload, lineage: &Lineage) -> Reply {
        match self.shared.call(item, lineage, self.timeout).await {
            Outcome::Answered(reply) => reply,
            Outcome::Failed(shared_fate) => Err(StepError::suspect(self.describe(shared_fate))),
        }
    }

    /// Sends `item` to the child that holds one message at a time: whatever goes wrong there is
    /// this message's doing. The caller makes sure one such call runs at a time.
    pub async fn call_alone(&self, item: &Payload, lineage: &Lineage) -> Reply {
        let lane = self.alone_lane();
        let mut outcome = lane.call(item, lineage, self.timeout).await;
        if matches!(outcome, Outcome::Failed(Fate::Ended { .. })) {
            // A child may end for reasons of its own (a leak, a limit on its work) while it holds
            // an innocent item: blame the item only if a fresh child (the lane starts one) ends
            // on it too.
            outcome = lane.call(item, lineage, self.timeout).await;
        }
        drop(lane);
        if let Some(alone) = lock(&self.alone).as_mut() {
            alone.last_used = Instant::now();
        }
        match outcome {
            Outcome::Answered(reply) => reply,
            Outcome::Failed(own_fault) => Err(StepError::transient(self.describe(own_fault))),
        }
    }

    /// The child for suspects, started (with what stops it when idle) if it is not running.
    fn alone_lane(&self) -> Arc<Lane> {
        let mut slot = lock(&self.alone);
        let alone = slot.get_or_insert_with(|| AloneChild {
            lane: Arc::new(Lane::start(self.spec.clone(), " (alone)")),
            last_used: Instant::now(),
            stopper: tokio::spawn(stop_when_idle(
                Arc::downgrade(&self.alone),
                self.alone_idle,
                self.spec.path.clone(),
            )),
        });
        alone.last_used = Instant::now();
        alone.lane.clone()
    }

    fn describe(&self, fate: Fate) -> String {
        let path = &self.spec.path;
        match fate {
            Fate::NotAReply { line, why } => format!(
                "the handler of step {path} wrote `{line}` instead of a reply ({why}); {REPLY_FORM}"
            ),
            Fate::Ended { how } => {
                format!("the handler of step {path} ended while it worked on the message: {how}")
            }
            Fate::TimedOut(limit) => format!(
                "timed out after {}: the handler of step {path} did not answer, and was restarted",
                humanize(limit)
            ),
        }
    }

    /// Stops the children, once no message needs them any more.
    pub async fn shutdown(&self) {
        let alone = lock(&self.alone).take();
        if let Some(alone) = alone {
            alone.stopper.abort();
            alone.lane.shutdown().await;
        }
        self.shared.shutdown().await;
    }
}

/// Stops the child for suspects once none has used it for `idle`; a suspect after that starts
/// another.
async fn stop_when_idle(
    slot: std::sync::Weak<Mutex<Option<AloneChild>>>,
    idle: Duration,
    step: String,
) {
    let mut wait = idle;
    loop {
        tokio::time::sleep(wait).await;
        let Some(slot) = slot.upgrade() else { return };
        let idle_child = {
            let mut alone = lock(&slot);
            let Some(child) = alone.as_ref() else { return };
            let unused_for = child.last_used.elapsed();
            // A call holds the lane: it is busy however long ago it began.
            if Arc::strong_count(&child.lane) > 1 {
                wait = idle;
                None
            } else if unused_for < idle {
                wait = idle - unused_for;
                None
            } else {
                alone.take()
            }
        };
        if let Some(child) = idle_child {
            tracing::info!(step = %step, "handler (alone) stopped: no message has needed it for {}", humanize(idle));
            child.lane.shutdown().await;
            return;
        }
    }
}

impl Handler for ExecStep {
    type Settings = switchyard_crds::ExecStep;

    fn build(
        settings: &Self::Settings,
        step: &StepConfig,
        _: &BuildContext,
    ) -> Result<ExecStep, BuildError> {
        ExecStep::start(
            &step.path,
            &settings.command,
            &step.env,
            step.timeout_ms.map(Duration::from_millis),
        )
    }

    async fn handle(
        &self,
        item: Payload,
        lineage: &Lineage,
        out: &mut Vec<Payload>,
    ) -> Result<(), StepError> {
        out.extend(self.call(&item, lineage).await?);
        Ok(())
    }

    async fn handle_alone(
        &self,
        item: Payload,
        lineage: &Lineage,
        out: &mut Vec<Payload>,
    ) -> Result<(), StepError> {
        out.extend(self.call_alone(&item, lineage).await?);
        Ok(())
    }

    fn hands_off(&self) -> bool {
        true
    }

    fn isolates_itself(&self) -> bool {
        true
    }

    /// The timeout runs from when the child has the message: a message that waits for a child to
    /// start again (after another message's crash or hang) is not late, and must not fail for it.
    fn times_itself(&self) -> bool {
        true
    }

    async fn shutdown(&self) {
        ExecStep::shutdown(self).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found with pods: an exec step in an image without its program (a stage that names no
    /// `image`, so it runs in Switchyard's own) restarted the handler for ever while every message
    /// waited and went to the dead letters; the pod looked healthy.
    #[tokio::test]
    async fn a_handler_that_is_not_in_the_image_stops_the_unit_and_says_what_to_do() {
        let Err(BuildError::Settings(message)) = ExecStep::start(
            "machines > wash",
            &["python-that-is-not-here".into(), "-c".into(), "pass".into()],
            &[("PATH".into(), "/nonexistent:/also-not".into())],
            None,
        ) else {
            panic!("started a handler that cannot exist");
        };
        assert_eq!(
            message,
            "step machines > wash: cannot start the handler: `python-that-is-not-here` is not on PATH (PATH=/nonexistent:/also-not); use an image that has it (the stage's `image`), or install it"
        );
        assert!(find_program("sh", "/usr/bin:/bin").is_some());
        assert!(find_program("/bin/sh", "").is_some());
        assert!(find_program("./no-such-handler.sh", "/bin").is_none());
    }

    /// The child for suspects stayed for ever once one suspect had started it: a handler that
    /// holds a model in memory held it twice for the rest of the unit's life.
    #[tokio::test]
    async fn the_child_for_suspects_stops_once_none_needs_it_and_starts_again_for_the_next() {
        let handler = r#"
import json, os, sys
for line in sys.stdin:
    request = json.loads(line)
    print(json.dumps({"id": request["id"], "outputs": [os.getpid()]}), flush=True)
"#;
        let mut step = ExecStep::start(
            "s",
            &["python3".into(), "-c".into(), handler.into()],
            &[],
            None,
        )
        .expect("python3 is installed");
        step.alone_idle = Duration::from_secs(1);
        let lineage = Lineage::at_source("s", "1".into(), "s:1".into());
        let item = Payload::Bytes(r#"{"a":1}"#.into());
        let pid_of_alone_child = || async {
            let outputs = step.call_alone(&item, &lineage).await.expect("an answer");
            let Payload::Bytes(pid) = &outputs[0] else {
                panic!("{outputs:?}")
            };
            std::str::from_utf8(pid).unwrap().parse::<u32>().unwrap()
        };
        // Running: neither gone nor dead and waiting to be reaped.
        let alive = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                !stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
        };

        let first = pid_of_alone_child().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            pid_of_alone_child().await,
            first,
            "used again within its idle time"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(first) || lock(&step.alone).is_some() {
            assert!(
                Instant::now() < deadline,
                "the idle child for suspects {first} still runs"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let next = pid_of_alone_child().await;
        assert_ne!(next, first);
        assert!(alive(next));
        step.shutdown().await;
    }
}
