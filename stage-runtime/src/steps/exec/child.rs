//! A handler's child process, restarted whenever it ends (backing off when it ends at once), the
//! requests it holds, and what its stdout and stderr say: answers dispatched to their requests, a
//! line that is no reply or an end failing everything it held.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot, watch};

use crate::lineage::Lineage;
use crate::locks::lock;
use crate::payload::Payload;
use crate::retry::StepError;

use super::protocol::{parse_reply, request_line, shown, ReplyOf, REPLY_FORM};

pub(super) type Reply = Result<Vec<Payload>, StepError>;

/// How to start the handler.
pub(super) struct ChildSpec {
    pub(super) path: String,
    pub(super) command: Vec<String>,
    pub(super) env: Vec<(String, String)>,
}

/// What became of one request sent to a child.
#[derive(Debug)]
pub(super) enum Outcome {
    /// The child answered it: its outputs, its error, or a reply that says nothing usable.
    Answered(Reply),
    /// The child gave no answer of its own to it.
    Failed(Fate),
}

/// Why a request got no answer; on the shared child, any of these may be another request's doing.
#[derive(Debug)]
pub(super) enum Fate {
    /// The child wrote a line that is no reply while it held this request.
    NotAReply { line: String, why: String },
    /// The child ended while it held this request.
    Ended { how: String },
    /// No answer within the step's timeout; the child was restarted.
    TimedOut(Duration),
}

impl Fate {
    pub(super) fn stopped() -> Outcome {
        Outcome::Failed(Fate::Ended {
            how: "the handler was stopped".to_string(),
        })
    }
}

/// One child process, restarted whenever it ends, and the requests it holds.
pub(super) struct Lane {
    pub(super) state: Arc<LaneState>,
    /// The current child's stdin, or None while it is being (re)started.
    pub(super) writer: watch::Receiver<Option<ChildInput>>,
    /// Asks the supervisor to kill the child of this life (a request to it timed out).
    pub(super) kill: mpsc::UnboundedSender<u64>,
    pub(super) supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Clone)]
pub(super) struct ChildInput {
    /// Which start of the child this is: a kill asked for an earlier one is ignored.
    pub(super) life: u64,
    pub(super) stdin: mpsc::UnboundedSender<Vec<u8>>,
}

pub(super) struct LaneState {
    pub(super) spec: Arc<ChildSpec>,
    /// `""` for the shared child, `" (alone)"` for the one that tries suspects: for logs.
    pub(super) role: &'static str,
    pub(super) next_id: AtomicU64,
    pub(super) pending: Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
    pub(super) stopping: AtomicBool,
}

/// Exit within this long after a start counts as failing to start, and backs off.
pub(super) const HEALTHY_AFTER: Duration = Duration::from_secs(2);
pub(super) const MAX_RESTART_DELAY: Duration = Duration::from_secs(10);

impl Lane {
    pub(super) fn start(spec: Arc<ChildSpec>, role: &'static str) -> Lane {
        let state = Arc::new(LaneState {
            spec,
            role,
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
        });
        let (writer_tx, writer) = watch::channel(None);
        let (kill, kills) = mpsc::unbounded_channel();
        let supervisor = tokio::spawn(supervise(state.clone(), writer_tx, kills));
        Lane {
            state,
            writer,
            kill,
            supervisor: Mutex::new(Some(supervisor)),
        }
    }

    pub(super) async fn call(
        &self,
        item: &Payload,
        lineage: &Lineage,
        timeout: Option<Duration>,
    ) -> Outcome {
        let id = self.state.next_id.fetch_add(1, Ordering::Relaxed);
        let mut line = request_line(id, item, lineage);
        let mut writer = self.writer.clone();
        let (rx, life) = loop {
            let input = writer
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|w| w.clone());
            let Some(input) = input else {
                return Fate::stopped();
            };
            let (tx, rx) = oneshot::channel();
            // Register before sending: when the child dies, everything registered is failed after its
            // stdin is gone, so a request is either answered, failed, or refused by `send` below.
            lock(&self.state.pending).insert(id, tx);
            match input.stdin.send(line) {
                Ok(()) => break (rx, input.life),
                Err(refused) => {
                    lock(&self.state.pending).remove(&id);
                    // The child's stdin is gone (it exited, or stopped reading) and the supervisor has
                    // not replaced it yet. The message never reached that child, so it is not to blame:
                    // wait for the next child instead.
                    line = refused.0;
                    if writer.changed().await.is_err() {
                        return Fate::stopped();
                    }
                }
            }
        };
        let _guard = ForgetOnDrop {
            pending: &self.state.pending,
            id,
        };
        let answered = async { rx.await.unwrap_or_else(|_| Fate::stopped()) };
        match timeout {
            None => answered.await,
            Some(limit) => match tokio::time::timeout(limit, answered).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    // The child may be stuck on this message or on another it holds: restart it,
                    // so that it does not hold up every message after, and let the others it held
                    // be tried again.
                    lock(&self.state.pending).remove(&id);
                    let _ = self.kill.send(life);
                    Outcome::Failed(Fate::TimedOut(limit))
                }
            },
        }
    }

    pub(super) async fn shutdown(&self) {
        self.state.stopping.store(true, Ordering::SeqCst);
        let handle = lock(&self.supervisor).take();
        if let Some(handle) = handle {
            handle.abort();
            let _ = handle.await;
        }
    }
}

/// A call abandoned (by its timeout) leaves no entry behind; a late answer is then ignored.
pub(super) struct ForgetOnDrop<'a> {
    pub(super) pending: &'a Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
    pub(super) id: u64,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        lock(self.pending).remove(&self.id);
    }
}

pub(super) async fn supervise(
    state: Arc<LaneState>,
    writer_tx: watch::Sender<Option<ChildInput>>,
    mut kills: mpsc::UnboundedReceiver<u64>,
) {
    let mut delay = Duration::from_millis(100);
    let role = state.role;
    for life in 1u64.. {
        let started = Instant::now();
        let end = match spawn_child(&state.spec) {
            Ok(mut child) => {
                let pid = child.id().unwrap_or_default();
                tracing::info!(step = %state.spec.path, pid, command = ?state.spec.command, "handler{role} started");
                let end = run_child(&state, &mut child, life, &writer_tx, &mut kills).await;
                if state.stopping.load(Ordering::SeqCst) {
                    return;
                }
                tracing::warn!(step = %state.spec.path, pid, "handler{role} ended ({}); restarting it, and trying the messages it held again", end.how);
                end
            }
            Err(e) => {
                tracing::error!(step = %state.spec.path, command = ?state.spec.command, "cannot start the handler{role}: {e}; is the program installed and on PATH, and is the working directory right?");
                ChildEnd {
                    how: format!("it could not be started again ({e})"),
                    restarted_by_us: false,
                }
            }
        };
        fail_pending(&state, &end.how);
        // Killed for a message that got no answer in time, the handler did not fail to start: the
        // messages after it must not wait a growing back-off for it.
        if end.restarted_by_us {
            delay = Duration::from_millis(100);
            continue;
        }
        if started.elapsed() > HEALTHY_AFTER {
            delay = Duration::from_millis(100);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(MAX_RESTART_DELAY);
    }
}

/// Where `program` would be found: itself when it names a path, else the first executable file of
/// that name in `search` (a PATH).
pub fn find_program(program: &str, search: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let path = std::path::PathBuf::from(program);
        return executable(&path).then_some(path);
    }
    std::env::split_paths(search)
        .map(|dir| dir.join(program))
        .find(|p| executable(p))
}

pub(super) fn spawn_child(spec: &ChildSpec) -> std::io::Result<Child> {
    let mut command = Command::new(&spec.command[0]);
    // A handler is the user's code: it has no business with the unit's NATS credentials.
    switchyard_platform::credentials::env::withhold(command.as_std_mut());
    command
        .args(&spec.command[1..])
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    switchyard_platform::os::die_with_parent(command.as_std_mut());
    command.spawn()
}

/// Feeds the child and reads its answers until it exits; returns how it ended.
pub(super) async fn run_child(
    state: &Arc<LaneState>,
    child: &mut Child,
    life: u64,
    writer_tx: &watch::Sender<Option<ChildInput>>,
    kills: &mut mpsc::UnboundedReceiver<u64>,
) -> ChildEnd {
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return ChildEnd {
            how: "its pipes could not be opened".to_string(),
            restarted_by_us: false,
        };
    };
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(forward_stderr(state.spec.path.clone(), stderr));
    }
    let (line_tx, line_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let mut writer = tokio::spawn(write_lines(stdin, line_rx));
    writer_tx.send_replace(Some(ChildInput {
        life,
        stdin: line_tx,
    }));

    let mut lines = BufReader::new(stdout).split(b'\n');
    let mut complaints = 0u32;
    let mut writing = true;
    let mut killed_because = None;
    loop {
        tokio::select! {
            line = lines.next_segment() => match line {
                Ok(Some(line)) => dispatch(state, &line, &mut complaints),
                _ => break,
            },
            _ = &mut writer, if writing => {
                // Its stdin is closed: it died, or it stopped reading and can never take another
                // message. Stop offering it work, and make sure it goes, so that the messages it
                // holds are retried on the next child rather than waiting for this one forever.
                writing = false;
                writer_tx.send_replace(None);
                let _ = child.start_kill();
            }
            Some(asked) = kills.recv(), if killed_because.is_none() => {
                if asked == life {
                    killed_because = Some("it was restarted: a message it held got no answer within the step's timeout");
                    writer_tx.send_replace(None);
                    let _ = child.start_kill();
                }
            }
        }
    }
    // Refuse new requests first, then fail the ones in flight: see `Lane::call`.
    writer_tx.send_replace(None);
    if writing {
        writer.abort();
        let _ = writer.await;
    }
    let status = exit_status(child).await;
    match killed_because {
        Some(why) => ChildEnd {
            how: why.to_string(),
            restarted_by_us: true,
        },
        None => ChildEnd {
            how: status,
            restarted_by_us: false,
        },
    }
}

/// Writes the lines queued for the child until the queue closes or the child's stdin does.
async fn write_lines(stdin: ChildStdin, mut lines: mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut stdin = BufWriter::new(stdin);
    while let Some(line) = lines.recv().await {
        if stdin.write_all(&line).await.is_err() {
            return;
        }
        // Write what else is queued before flushing: one syscall for a burst of messages.
        while let Ok(line) = lines.try_recv() {
            if stdin.write_all(&line).await.is_err() {
                return;
            }
        }
        if stdin.flush().await.is_err() {
            return;
        }
    }
}

/// The child's exit status, once it has closed its stdout: killed if it does not exit within 5 s.
async fn exit_status(child: &mut Child) -> String {
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(status)) => status.to_string(),
        Ok(Err(e)) => format!("unknown ({e})"),
        Err(_) => {
            let _ = child.kill().await;
            "it closed its stdout; stopped it".to_string()
        }
    }
}

/// How a child's life ended.
pub(super) struct ChildEnd {
    /// Its exit status, or why the runtime stopped it: for logs and the messages it held.
    pub(super) how: String,
    /// The runtime killed it (a message it held timed out) rather than it ending by itself.
    pub(super) restarted_by_us: bool,
}

pub(super) fn dispatch(state: &LaneState, line: &[u8], complaints: &mut u32) {
    let trimmed = line.strip_suffix(b"\r").unwrap_or(line);
    match parse_reply(trimmed) {
        ReplyOf::Blank => {}
        ReplyOf::NotAReply(why) => {
            complain(state, complaints, trimmed, &why);
            fail_held(state, trimmed, &why);
        }
        ReplyOf::Malformed { id, why } => {
            complain(state, complaints, trimmed, why);
            if let Some(tx) = lock(&state.pending).remove(&id) {
                let _ = tx.send(Outcome::Answered(Err(StepError::transient(format!(
                    "the handler of step {} answered `{}`, but {why}; {REPLY_FORM}",
                    state.spec.path,
                    shown(trimmed)
                )))));
            }
        }
        ReplyOf::Answer { id, result } => {
            if let Some(tx) = lock(&state.pending).remove(&id) {
                let _ = tx.send(Outcome::Answered(result));
            }
        }
    }
}

/// Handlers sometimes print debugging output on stdout by mistake; say what is wrong without flooding
/// the log.
pub(super) fn complain(state: &LaneState, complaints: &mut u32, line: &[u8], why: &str) {
    *complaints += 1;
    if *complaints <= 5 || complaints.is_power_of_two() {
        let role = state.role;
        let then = if role.is_empty() {
            "the messages it held are tried again one at a time to find the one it answered so"
        } else {
            "the one message it held fails this attempt"
        };
        tracing::warn!(step = %state.spec.path, "the handler{role} wrote `{}`, which is not a reply ({why}); {REPLY_FORM}, and a handler writes its own logs to stderr; {then}", shown(line));
    }
}

/// Lines of a handler's stderr logged per second at most; a handler stuck in a loop of errors must not
/// drown the unit's own log (or fill a node's disk).
pub(super) const STDERR_LINES_PER_SECOND: u32 = 50;
/// Longest stderr line logged whole.
pub(super) const STDERR_LINE_CHARS: usize = 2000;

/// The handler's stderr, line by line, in the unit's log under the step's name.
pub(super) async fn forward_stderr(step: String, stderr: tokio::process::ChildStderr) {
    let mut lines = BufReader::new(stderr).split(b'\n');
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let (mut logged, mut skipped) = (0u32, 0u64);
    let say_skipped = |skipped: u64| {
        if skipped > 0 {
            tracing::warn!(step = %step, "skipped {skipped} lines of the handler's stderr");
        }
    };
    loop {
        tokio::select! {
            line = lines.next_segment() => {
                let Ok(Some(line)) = line else { break };
                if logged < STDERR_LINES_PER_SECOND {
                    logged += 1;
                    let text: String = String::from_utf8_lossy(&line)
                        .chars()
                        .take(STDERR_LINE_CHARS)
                        .collect();
                    tracing::info!(target: "handler", step = %step, "{}", text.trim_end());
                } else {
                    skipped += 1;
                }
            }
            _ = second.tick() => {
                say_skipped(skipped);
                (logged, skipped) = (0, 0);
            }
        }
    }
    say_skipped(skipped);
}

/// A line that is no reply cannot be matched to its message, so every message the child holds is a
/// suspect: none waits for its timeout, and the one that provoked the line is found alone.
pub(super) fn fail_held(state: &LaneState, line: &[u8], why: &str) {
    let drained: Vec<_> = lock(&state.pending).drain().collect();
    for (_, tx) in drained {
        let _ = tx.send(Outcome::Failed(Fate::NotAReply {
            line: shown(line),
            why: why.to_string(),
        }));
    }
}

pub(super) fn fail_pending(state: &LaneState, how: &str) {
    let drained: Vec<_> = lock(&state.pending).drain().collect();
    for (_, tx) in drained {
        let _ = tx.send(Outcome::Failed(Fate::Ended {
            how: how.to_string(),
        }));
    }
}
