//! The exec step: a long-lived child process speaking the line protocol.
//!
//! For each message the runtime writes `{"id": "...", "data": <message>, "headers": {...}}` on the
//! child's stdin; the child answers, in any order, `{"id": "...", "outputs": [...]}` or
//! `{"id": "...", "error": "why"}` on its stdout.
//!
//! The child holds many messages at once (see `OUTSTANDING_CALLS`). When it fails them together —
//! it writes a line that is no reply, it exits, or one of them gets no answer in time and it is
//! restarted — nobody can tell which message provoked it, so none is charged: each is a *suspect*
//! (`StepError::suspect`), and the step tries it again alone (`ExecStep::call_alone`) on a second
//! child that holds one message at a time. There a failure is the message's own, and counts (an end
//! of the child only once a fresh child ends on it too). That second child stops once no suspect has
//! needed it for a while.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot, watch};

use super::{humanize, BuildError, Handler};
use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::retry::StepError;

type Reply = Result<Vec<Payload>, StepError>;

/// What a reply line looks like, for the errors that say a line was not one.
pub const REPLY_FORM: &str =
    r#"a reply is one JSON line, {"id": …, "outputs": […]} or {"id": …, "error": "…"}"#;

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

/// How to start the handler.
struct ChildSpec {
    path: String,
    command: Vec<String>,
    env: Vec<(String, String)>,
}

/// What became of one request sent to a child.
#[derive(Debug)]
enum Outcome {
    /// The child answered it: its outputs, its error, or a reply that says nothing usable.
    Answered(Reply),
    /// The child gave no answer of its own to it.
    Failed(Fate),
}

/// Why a request got no answer; on the shared child, any of these may be another request's doing.
#[derive(Debug)]
enum Fate {
    /// The child wrote a line that is no reply while it held this request.
    NotAReply { line: String, why: String },
    /// The child ended while it held this request.
    Ended { how: String },
    /// No answer within the step's timeout; the child was restarted.
    TimedOut(Duration),
}

impl Fate {
    fn stopped() -> Outcome {
        Outcome::Failed(Fate::Ended {
            how: "the handler was stopped".to_string(),
        })
    }
}

/// One child process, restarted whenever it ends, and the requests it holds.
struct Lane {
    state: Arc<LaneState>,
    /// The current child's stdin, or None while it is being (re)started.
    writer: watch::Receiver<Option<ChildInput>>,
    /// Asks the supervisor to kill the child of this life (a request to it timed out).
    kill: mpsc::UnboundedSender<u64>,
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

#[derive(Clone)]
struct ChildInput {
    /// Which start of the child this is: a kill asked for an earlier one is ignored.
    life: u64,
    stdin: mpsc::UnboundedSender<Vec<u8>>,
}

struct LaneState {
    spec: Arc<ChildSpec>,
    /// `""` for the shared child, `" (alone)"` for the one that tries suspects: for logs.
    role: &'static str,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
    stopping: AtomicBool,
}

/// Exit within this long after a start counts as failing to start, and backs off.
const HEALTHY_AFTER: Duration = Duration::from_secs(2);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(10);

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

impl Lane {
    fn start(spec: Arc<ChildSpec>, role: &'static str) -> Lane {
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

    async fn call(&self, item: &Payload, lineage: &Lineage, timeout: Option<Duration>) -> Outcome {
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

    async fn shutdown(&self) {
        self.state.stopping.store(true, Ordering::SeqCst);
        let handle = lock(&self.supervisor).take();
        if let Some(handle) = handle {
            handle.abort();
            let _ = handle.await;
        }
    }
}

/// A call abandoned (by its timeout) leaves no entry behind; a late answer is then ignored.
struct ForgetOnDrop<'a> {
    pending: &'a Mutex<HashMap<u64, oneshot::Sender<Outcome>>>,
    id: u64,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        lock(self.pending).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; carry on with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn request_line(id: u64, item: &Payload, lineage: &Lineage) -> Vec<u8> {
    let mut line = Vec::with_capacity(256);
    line.extend_from_slice(b"{\"id\":\"");
    line.extend_from_slice(id.to_string().as_bytes());
    line.extend_from_slice(b"\",\"data\":");
    item.write_as_json(&mut line);
    line.extend_from_slice(b",\"headers\":{");
    let mut first = true;
    let mut field = |name: &str, value: &str| {
        if !first {
            line.push(b',');
        }
        first = false;
        let _ = serde_json::to_writer(&mut line, name);
        line.push(b':');
        let _ = serde_json::to_writer(&mut line, value);
    };
    use switchyard_crds::unit::headers;
    field(headers::MSG_ID, &lineage.id);
    field(headers::ORIGIN, &lineage.origin);
    field(headers::ORIGIN_SEQ, &lineage.origin_seq);
    field(headers::PATH, &lineage.path);
    if let Some(t) = &lineage.traceparent {
        field(headers::TRACEPARENT, t);
    }
    if let Some(t) = &lineage.tracestate {
        field(headers::TRACESTATE, t);
    }
    line.extend_from_slice(b"}}\n");
    line
}

#[derive(Deserialize)]
struct ReplyLine<'a> {
    #[serde(borrow)]
    id: IdField<'a>,
    #[serde(default, borrow)]
    outputs: Option<Vec<&'a RawValue>>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

/// Handlers echo the id they were given; accept it back as a string or as a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum IdField<'a> {
    Text(&'a str),
    Owned(String),
    Number(u64),
}

impl IdField<'_> {
    fn number(&self) -> Option<u64> {
        match self {
            IdField::Text(t) => t.parse().ok(),
            IdField::Owned(t) => t.parse().ok(),
            IdField::Number(n) => Some(*n),
        }
    }
}

async fn supervise(
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

fn spawn_child(spec: &ChildSpec) -> std::io::Result<Child> {
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
async fn run_child(
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
    let (line_tx, mut line_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let mut writer = tokio::spawn(async move {
        let mut stdin = BufWriter::new(stdin);
        while let Some(line) = line_rx.recv().await {
            if stdin.write_all(&line).await.is_err() {
                return;
            }
            // Write what else is queued before flushing: one syscall for a burst of messages.
            while let Ok(line) = line_rx.try_recv() {
                if stdin.write_all(&line).await.is_err() {
                    return;
                }
            }
            if stdin.flush().await.is_err() {
                return;
            }
        }
    });
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
    let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(status)) => status.to_string(),
        Ok(Err(e)) => format!("unknown ({e})"),
        Err(_) => {
            let _ = child.kill().await;
            "it closed its stdout; stopped it".to_string()
        }
    };
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

/// How a child's life ended.
struct ChildEnd {
    /// Its exit status, or why the runtime stopped it: for logs and the messages it held.
    how: String,
    /// The runtime killed it (a message it held timed out) rather than it ending by itself.
    restarted_by_us: bool,
}

/// What one line on a handler's stdout is.
#[derive(Debug)]
pub enum ReplyOf {
    /// An empty line: nothing.
    Blank,
    /// The answer for the request `id`: its outputs, or the handler's error.
    Answer {
        id: u64,
        result: Result<Vec<Payload>, StepError>,
    },
    /// A reply to the request `id` that says nothing usable, and why.
    Malformed { id: u64, why: &'static str },
    /// Not a reply that can be matched to a request, and why.
    NotAReply(String),
}

/// Parses one line of a handler's stdout (pure: the fuzz target `exec_reply` drives it).
pub fn parse_reply(line: &[u8]) -> ReplyOf {
    let trimmed = line.strip_suffix(b"\r").unwrap_or(line);
    if trimmed.iter().all(u8::is_ascii_whitespace) {
        return ReplyOf::Blank;
    }
    let reply: ReplyLine = match serde_json::from_slice(trimmed) {
        Ok(r) => r,
        Err(e) => return ReplyOf::NotAReply(e.to_string()),
    };
    let Some(id) = reply.id.number() else {
        return ReplyOf::NotAReply("its id is not one the runtime sent".to_string());
    };
    let result = match (reply.outputs, reply.error) {
        (_, Some(error)) => Err(StepError::transient(match error {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        })),
        (Some(outputs), None) => Ok(outputs
            .into_iter()
            .map(|raw| Payload::Bytes(Bytes::copy_from_slice(raw.get().as_bytes())))
            .collect()),
        (None, None) => {
            return ReplyOf::Malformed {
                id,
                why: "it has neither `outputs` nor `error`",
            }
        }
    };
    ReplyOf::Answer { id, result }
}

fn dispatch(state: &LaneState, line: &[u8], complaints: &mut u32) {
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
fn complain(state: &LaneState, complaints: &mut u32, line: &[u8], why: &str) {
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
const STDERR_LINES_PER_SECOND: u32 = 50;
/// Longest stderr line logged whole.
const STDERR_LINE_CHARS: usize = 2000;

/// The handler's stderr, line by line, in the unit's log under the step's name.
async fn forward_stderr(step: String, stderr: tokio::process::ChildStderr) {
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
fn fail_held(state: &LaneState, line: &[u8], why: &str) {
    let drained: Vec<_> = lock(&state.pending).drain().collect();
    for (_, tx) in drained {
        let _ = tx.send(Outcome::Failed(Fate::NotAReply {
            line: shown(line),
            why: why.to_string(),
        }));
    }
}

/// The first 200 characters of a line, for messages.
pub fn shown(line: &[u8]) -> String {
    String::from_utf8_lossy(line).chars().take(200).collect()
}

fn fail_pending(state: &LaneState, how: &str) {
    let drained: Vec<_> = lock(&state.pending).drain().collect();
    for (_, tx) in drained {
        let _ = tx.send(Outcome::Failed(Fate::Ended {
            how: how.to_string(),
        }));
    }
}

impl Handler for ExecStep {
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

    #[test]
    fn request_lines_embed_json_and_quote_the_rest() {
        let l = Lineage::at_source("s", "1".into(), "s:1".into());
        let line = request_line(7, &Payload::Bytes(r#"{"a":1}"#.into()), &l);
        let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed["id"], "7");
        assert_eq!(parsed["data"]["a"], 1);
        assert_eq!(parsed["headers"]["Switchyard-Origin"], "s");
        assert!(line.ends_with(b"}\n"));
        let line = request_line(8, &Payload::Bytes("plain text".into()), &l);
        let parsed: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(parsed["data"], "plain text");
    }

    #[test]
    fn reply_lines_are_answers_errors_or_explained() {
        let answer = |line: &str| match parse_reply(line.as_bytes()) {
            ReplyOf::Answer { id, result } => (id, result.map(|o| o.len()).map_err(|e| e.message)),
            other => panic!("{line}: {other:?}"),
        };
        assert_eq!(
            answer(r#"{"id": "7", "outputs": [1, {"a": 2}]}"#),
            (7, Ok(2))
        );
        assert_eq!(answer("{\"id\": 8, \"outputs\": []}\r"), (8, Ok(0)));
        assert_eq!(
            answer(r#"{"id": "9", "error": "no"}"#),
            (9, Err("no".into()))
        );
        assert_eq!(
            answer(r#"{"id": "9", "error": {"code": 3}}"#),
            (9, Err(r#"{"code":3}"#.into()))
        );
        assert!(matches!(parse_reply(b"  \r"), ReplyOf::Blank));
        assert!(matches!(
            parse_reply(br#"{"id": "5"}"#),
            ReplyOf::Malformed { id: 5, .. }
        ));
        for line in [
            "this is not json",
            r#"{"id": "x1", "outputs": []}"#,
            "[1,2]",
            "{\"id\": -1}",
        ] {
            assert!(
                matches!(parse_reply(line.as_bytes()), ReplyOf::NotAReply(_)),
                "{line}"
            );
        }
        assert_eq!(shown("é".repeat(300).as_bytes()).chars().count(), 200);
    }
}
