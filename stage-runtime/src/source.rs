//! Source units: they create messages and store them in the pipeline's stream.
//!
//! Every message gets an id derived from what it is (the generator's sequence number, the file and line,
//! the timer tick), so a source restarted from its last checkpoint republishes what was not yet
//! checkpointed and JetStream drops what it already has.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use async_nats::jetstream::{self, context::PublishAckFuture, kv};
use async_nats::Subject;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use switchyard_crds::unit::{headers, SourceConfig};
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

use crate::lineage::Lineage;
use crate::stats::Stats;

/// Publishes in flight at once: enough to keep the server busy, well below the client's limit.
const WINDOW: usize = 1000;
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

pub struct SourceUnit {
    pub name: String,
    pub js: jetstream::Context,
    pub client: async_nats::Client,
    pub subject: Subject,
    pub checkpoints: kv::Store,
    pub stats: Arc<Stats>,
    pub shutdown: watch::Receiver<bool>,
    /// Prefix for names that must differ between pipelines (the NATS source's queue group).
    pub queue_group: String,
}

impl SourceUnit {
    /// Runs the source until it is finished (finite sources) or told to stop.
    pub async fn run(&mut self, config: &SourceConfig) -> anyhow::Result<()> {
        match config {
            SourceConfig::Generator {
                count,
                rate_per_second,
                payload,
            } => self.generator(*count, *rate_per_second, payload).await,
            SourceConfig::File { path } => self.file(Path::new(path)).await,
            SourceConfig::Timer {
                interval_ms,
                payload,
            } => self.timer(*interval_ms, payload).await,
            SourceConfig::Cron { schedule, payload } => self.cron(schedule, payload).await,
            SourceConfig::Http { port, path } => self.http(*port, path).await,
            SourceConfig::Nats { subject } => self.nats(subject).await,
        }
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    fn checkpoint_key(&self) -> String {
        format!("source.{}", self.name)
    }

    async fn load_checkpoint<T: for<'de> Deserialize<'de>>(&self) -> anyhow::Result<Option<T>> {
        let entry = self
            .checkpoints
            .get(self.checkpoint_key())
            .await
            .context("cannot read the source's checkpoint")?;
        Ok(match entry {
            None => None,
            Some(bytes) => match serde_json::from_slice(&bytes) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(
                        "ignoring an unreadable checkpoint ({e}); starting from the beginning"
                    );
                    None
                }
            },
        })
    }

    async fn save_checkpoint<T: Serialize>(&self, checkpoint: &T) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(checkpoint)?;
        self.checkpoints
            .put(self.checkpoint_key(), bytes.into())
            .await
            .context("cannot save the source's checkpoint")?;
        Ok(())
    }

    async fn publish(&self, lineage: &Lineage, payload: Bytes) -> anyhow::Result<PublishAckFuture> {
        let publish = jetstream::message::PublishMessage::build()
            .headers(lineage.source_headers())
            .payload(payload);
        self.js
            .send_publish(self.subject.clone(), publish)
            .await
            .with_context(|| format!("cannot publish to {}", self.subject))
    }

    /// Publishes one message and waits until the stream has it.
    async fn publish_stored(&self, lineage: &Lineage, payload: Bytes) -> anyhow::Result<bool> {
        let ack = self.publish(lineage, payload).await?.await?;
        Stats::add(&self.stats.processed, 1);
        Ok(ack.duplicate)
    }

    async fn generator(
        &mut self,
        count: Option<u64>,
        rate: Option<f64>,
        payload: &str,
    ) -> anyhow::Result<()> {
        let template = Template::new(payload);
        loop {
            let done: u64 = self
                .load_checkpoint::<SeqCheckpoint>()
                .await?
                .map_or(0, |c| c.seq);
            if count.is_some_and(|c| done >= c) {
                return Ok(());
            }
            match self.generate_from(done + 1, count, rate, &template).await {
                Ok(()) => return Ok(()),
                Err(e) if !self.stopping() => {
                    tracing::warn!("{e:#}; resuming from the last checkpoint in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn generate_from(
        &mut self,
        first: u64,
        count: Option<u64>,
        rate: Option<f64>,
        template: &Template,
    ) -> anyhow::Result<()> {
        let started = tokio::time::Instant::now();
        let mut window: Window<u64> = Window::default();
        let mut confirmed = first - 1;
        let mut saved = confirmed;
        let mut last_save = Instant::now();
        let mut seq = first;
        while count.is_none_or(|c| seq <= c) && !self.stopping() {
            if let Some(rate) = rate {
                let due = started + Duration::from_secs_f64((seq - first) as f64 / rate);
                if due > tokio::time::Instant::now() {
                    let mut shutdown = self.shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = shutdown.changed() => break,
                    }
                }
            }
            let id = format!("{}:{seq}", self.name);
            let lineage = Lineage::at_source(&self.name, seq.to_string(), id);
            let ack = self.publish(&lineage, template.render(seq)).await?;
            for done in window.push(seq, ack).await? {
                confirmed = done;
                Stats::add(&self.stats.processed, 1);
            }
            if confirmed > saved && last_save.elapsed() >= CHECKPOINT_EVERY {
                self.save_checkpoint(&SeqCheckpoint { seq: confirmed })
                    .await?;
                saved = confirmed;
                last_save = Instant::now();
            }
            seq += 1;
        }
        for done in window.drain().await? {
            confirmed = done;
            Stats::add(&self.stats.processed, 1);
        }
        if confirmed > saved {
            self.save_checkpoint(&SeqCheckpoint { seq: confirmed })
                .await?;
        }
        Ok(())
    }

    async fn file(&mut self, path: &Path) -> anyhow::Result<()> {
        loop {
            match self.read_files(path).await {
                Ok(()) => return Ok(()),
                Err(e) if !self.stopping() && !is_missing_input(&e) => {
                    tracing::warn!("{e:#}; resuming from the last checkpoint in 1s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn read_files(&mut self, path: &Path) -> anyhow::Result<()> {
        let files = list_files(path).await?;
        let checkpoint: Option<FileCheckpoint> = self.load_checkpoint().await?;
        let mut window: Window<(usize, u64)> = Window::default();
        let mut confirmed: Option<(usize, u64)> = None;
        let mut last_save = Instant::now();
        let mut dirty = false;
        for (index, file) in files.iter().enumerate() {
            let name = file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let skip_to = match &checkpoint {
                Some(c) if c.file.as_str() > name.as_str() => continue,
                Some(c) if c.file == name => c.line,
                _ => 0,
            };
            let handle = tokio::fs::File::open(file)
                .await
                .with_context(|| format!("cannot read {}", file.display()))?;
            let mut lines = tokio::io::BufReader::new(handle).split(b'\n');
            let mut line_no = 0u64;
            while let Some(line) = lines
                .next_segment()
                .await
                .with_context(|| format!("cannot read {}", file.display()))?
            {
                line_no += 1;
                if line_no <= skip_to || self.stopping() {
                    continue;
                }
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let position = format!("{name}:{line_no}");
                let id = format!("{}:{position}", self.name);
                let lineage = Lineage::at_source(&self.name, position, id);
                let ack = self.publish(&lineage, Bytes::copy_from_slice(line)).await?;
                for done in window.push((index, line_no), ack).await? {
                    confirmed = Some(done);
                    dirty = true;
                    Stats::add(&self.stats.processed, 1);
                }
                if dirty && last_save.elapsed() >= CHECKPOINT_EVERY {
                    if let Some((i, line)) = confirmed {
                        self.save_file_checkpoint(&files, i, line).await?;
                    }
                    dirty = false;
                    last_save = Instant::now();
                }
            }
            if self.stopping() {
                break;
            }
        }
        for done in window.drain().await? {
            confirmed = Some(done);
            dirty = true;
            Stats::add(&self.stats.processed, 1);
        }
        if let (true, Some((i, line))) = (dirty, confirmed) {
            self.save_file_checkpoint(&files, i, line).await?;
        }
        Ok(())
    }

    async fn save_file_checkpoint(
        &self,
        files: &[PathBuf],
        index: usize,
        line: u64,
    ) -> anyhow::Result<()> {
        let file = files[index]
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.save_checkpoint(&FileCheckpoint { file, line }).await
    }

    async fn timer(&mut self, interval_ms: u64, payload: &str) -> anyhow::Result<()> {
        let template = Template::new(payload);
        let interval_ms = interval_ms.max(1);
        loop {
            // Ticks fall on multiples of the interval since the epoch, so a restarted source (or a second
            // replica) produces the same tick ids, and JetStream keeps each tick once.
            let now = unix_ms();
            let tick = now / interval_ms + 1;
            let wait = Duration::from_millis(tick * interval_ms - now);
            if !self.sleep_or_stop(wait).await {
                return Ok(());
            }
            self.fire(tick, &template).await;
        }
    }

    async fn cron(&mut self, schedule: &str, payload: &str) -> anyhow::Result<()> {
        let cron: croner::Cron = schedule
            .parse()
            .map_err(|e| anyhow::anyhow!("`{schedule}` is not a cron schedule: {e}"))?;
        let template = Template::new(payload);
        loop {
            let now = chrono::Utc::now();
            let next = cron
                .find_next_occurrence(&now, false)
                .map_err(|e| anyhow::anyhow!("schedule `{schedule}` has no next time: {e}"))?;
            let wait = (next - now).to_std().unwrap_or_default();
            if !self.sleep_or_stop(wait).await {
                return Ok(());
            }
            self.fire(next.timestamp().max(0) as u64, &template).await;
        }
    }

    /// Publishes one tick, retrying for a while: a tick lost to a NATS outage is gone for good.
    async fn fire(&self, seq: u64, template: &Template) {
        let id = format!("{}:{seq}", self.name);
        let lineage = Lineage::at_source(&self.name, seq.to_string(), id);
        for attempt in 1..=5 {
            match self.publish_stored(&lineage, template.render(seq)).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(attempt, "cannot store tick {seq}: {e:#}");
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
            }
        }
        tracing::error!("tick {seq} was not stored after 5 attempts");
    }

    /// Sleeps; false when asked to stop meanwhile.
    async fn sleep_or_stop(&self, wait: Duration) -> bool {
        let mut shutdown = self.shutdown.clone();
        if *shutdown.borrow() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => true,
            _ = shutdown.changed() => false,
        }
    }

    async fn http(&mut self, port: u16, path: &str) -> anyhow::Result<()> {
        use axum::routing::{get, post};
        let max_body = self.client.server_info().max_payload;
        let state = Arc::new(HttpState {
            name: self.name.clone(),
            js: self.js.clone(),
            subject: self.subject.clone(),
            stats: self.stats.clone(),
        });
        let app = axum::Router::new()
            .route(path, post(ingest))
            .route("/healthz", get(|| async { "ok" }))
            .layer(axum::extract::DefaultBodyLimit::max(max_body))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("cannot listen on port {port}"))?;
        tracing::info!(port, path, "accepting POST requests");
        let mut shutdown = self.shutdown.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                crate::stopped(&mut shutdown).await;
            })
            .await
            .context("the HTTP server failed")
    }

    async fn nats(&mut self, subject: &str) -> anyhow::Result<()> {
        use futures::stream::FuturesUnordered;
        use futures::StreamExt;
        let mut subscriber = self
            .client
            .queue_subscribe(subject.to_string(), self.queue_group.clone())
            .await
            .with_context(|| format!("cannot subscribe to {subject}"))?;
        let mut acks = FuturesUnordered::new();
        let mut shutdown = self.shutdown.clone();
        loop {
            tokio::select! {
                Some((reply, stored)) = acks.next(), if !acks.is_empty() => {
                    self.confirm_nats(reply, stored).await;
                }
                message = subscriber.next(), if acks.len() < WINDOW => {
                    let Some(message) = message else { break };
                    let given = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(headers::MSG_ID))
                        .map(|v| v.as_str().to_string());
                    let key = given.unwrap_or_else(|| nuid::next().as_str().to_string());
                    let mut lineage =
                        Lineage::at_source(&self.name, key.clone(), format!("{}:{key}", self.name));
                    lineage.traceparent = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(headers::TRACEPARENT))
                        .map(|v| v.as_str().to_string());
                    let ack = self.publish(&lineage, message.payload).await?;
                    let reply = message.reply;
                    acks.push(async move { (reply, ack.await.map(|_| ())) });
                }
                _ = crate::stopped(&mut shutdown) => break,
            }
        }
        while let Some((reply, stored)) = acks.next().await {
            self.confirm_nats(reply, stored).await;
        }
        Ok(())
    }

    /// A request on the NATS source gets its answer once the message is stored (or was not).
    async fn confirm_nats<E: std::fmt::Display>(
        &self,
        reply: Option<Subject>,
        stored: Result<(), E>,
    ) {
        let answer = match stored {
            Ok(()) => {
                Stats::add(&self.stats.processed, 1);
                Bytes::from_static(b"{\"stored\":true}")
            }
            Err(e) => {
                // Core NATS cannot redeliver: say so loudly, and tell a requester to try again.
                tracing::error!("a message from the NATS source was not stored: {e}");
                Bytes::from(
                    serde_json::json!({"stored": false, "error": e.to_string()}).to_string(),
                )
            }
        };
        if let Some(reply) = reply {
            let _ = self.client.publish(reply, answer).await;
        }
    }
}

fn is_missing_input(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
    })
}

async fn list_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let meta = tokio::fs::metadata(path).await.with_context(|| {
        format!(
            "cannot read {} (relative paths start in {})",
            path.display(),
            std::env::current_dir().unwrap_or_default().display()
        )
    })?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut entries = tokio::fs::read_dir(path)
        .await
        .with_context(|| format!("cannot list {}", path.display()))?;
    while let Some(entry) = entries.next_entry().await? {
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && entry.file_type().await?.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

struct HttpState {
    name: String,
    js: jetstream::Context,
    subject: Subject,
    stats: Arc<Stats>,
}

async fn ingest(
    axum::extract::State(state): axum::extract::State<Arc<HttpState>>,
    request_headers: axum::http::HeaderMap,
    body: Bytes,
) -> (axum::http::StatusCode, String) {
    use axum::http::StatusCode;
    let header = |name: &str| {
        request_headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    // A client that sends an idempotency key may retry safely: the same key is stored once.
    let key = header("Idempotency-Key")
        .or_else(|| header(headers::MSG_ID))
        .unwrap_or_else(|| nuid::next().as_str().to_string());
    let mut lineage = Lineage::at_source(&state.name, key.clone(), format!("{}:{key}", state.name));
    lineage.traceparent = header(headers::TRACEPARENT);
    lineage.tracestate = header(headers::TRACESTATE);
    let publish = jetstream::message::PublishMessage::build()
        .headers(lineage.source_headers())
        .payload(body);
    let stored = async {
        state
            .js
            .send_publish(state.subject.clone(), publish)
            .await?
            .await
            .map_err(anyhow::Error::from)
    };
    match stored.await {
        Ok(ack) => {
            Stats::add(&state.stats.processed, 1);
            (
                StatusCode::ACCEPTED,
                serde_json::json!({"id": lineage.id, "duplicate": ack.duplicate}).to_string(),
            )
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": format!("the message was not stored: {e}; try again")})
                .to_string(),
        ),
    }
}

#[derive(Serialize, Deserialize)]
struct SeqCheckpoint {
    seq: u64,
}

#[derive(Serialize, Deserialize)]
struct FileCheckpoint {
    file: String,
    line: u64,
}

type AckFuture = <PublishAckFuture as std::future::IntoFuture>::IntoFuture;

/// Publishes waiting for their acknowledgements, in publish order, each with what it stands for.
struct Window<T> {
    pending: VecDeque<(T, AckFuture)>,
}

impl<T> Default for Window<T> {
    fn default() -> Self {
        Window {
            pending: VecDeque::new(),
        }
    }
}

impl<T> Window<T> {
    /// Adds a publish and returns, in order, what is confirmed by now; when the window is full, waits
    /// for the oldest first.
    async fn push(&mut self, item: T, ack: PublishAckFuture) -> anyhow::Result<Vec<T>> {
        use futures::FutureExt;
        self.pending
            .push_back((item, std::future::IntoFuture::into_future(ack)));
        let mut confirmed = Vec::new();
        while self.pending.len() > WINDOW {
            if let Some((item, ack)) = self.pending.pop_front() {
                ack.await.context("a publish was not acknowledged")?;
                confirmed.push(item);
            }
        }
        while let Some((_, ack)) = self.pending.front_mut() {
            match ack.now_or_never() {
                None => break,
                Some(result) => {
                    result.context("a publish was not acknowledged")?;
                    if let Some((item, _)) = self.pending.pop_front() {
                        confirmed.push(item);
                    }
                }
            }
        }
        Ok(confirmed)
    }

    async fn drain(&mut self) -> anyhow::Result<Vec<T>> {
        let mut confirmed = Vec::new();
        while let Some((item, ack)) = self.pending.pop_front() {
            ack.await.context("a publish was not acknowledged")?;
            confirmed.push(item);
        }
        Ok(confirmed)
    }
}

/// A payload with `{{seq}}` placeholders, split once.
struct Template {
    parts: Vec<String>,
}

impl Template {
    fn new(text: &str) -> Template {
        Template {
            parts: text.split("{{seq}}").map(str::to_string).collect(),
        }
    }

    fn render(&self, seq: u64) -> Bytes {
        let seq = seq.to_string();
        let mut out = Vec::with_capacity(self.parts.iter().map(String::len).sum::<usize>() + 8);
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(seq.as_bytes());
            }
            out.extend_from_slice(part.as_bytes());
        }
        Bytes::from(out)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_number_every_message() {
        let t = Template::new(r#"{"item": {{seq}}, "again": "{{seq}}"}"#);
        assert_eq!(&t.render(17)[..], br#"{"item": 17, "again": "17"}"#);
        assert_eq!(&Template::new("{}").render(1)[..], b"{}");
    }
}
