//! Where a sink unit puts the messages it reads.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use switchyard_crds::unit::SinkConfig;
use tokio::sync::{mpsc, oneshot};

use crate::lineage::{header_value, Lineage};
use crate::payload::write_bytes_as_json;
use crate::steps::{http_client, HttpStep, StepError};

/// What became of a message handed to a sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    New,
    /// A redelivery of a message this sink already wrote: skipped, so it appears once.
    Duplicate,
}

pub enum Sink {
    File(FileSink),
    Log,
    Nats {
        client: async_nats::Client,
        subject: async_nats::Subject,
        unit: String,
    },
    Http {
        endpoint: HttpStep,
        /// See `steps::OUTSTANDING_CALLS`.
        turns: tokio::sync::Semaphore,
    },
}

impl Sink {
    /// `instance` names the life of the stream the sink reads (see `FileSink`).
    pub fn open(
        unit: &str,
        config: &SinkConfig,
        client: &async_nats::Client,
        instance: &str,
    ) -> anyhow::Result<Sink> {
        Ok(match config {
            SinkConfig::File { path } => Sink::File(FileSink::open(Path::new(path), instance)?),
            SinkConfig::Log => Sink::Log,
            SinkConfig::Nats { subject } => Sink::Nats {
                client: client.clone(),
                subject: async_nats::Subject::from(subject.as_str()),
                unit: unit.to_string(),
            },
            SinkConfig::Http { url, headers } => Sink::Http {
                endpoint: HttpStep::new(http_client()?, url, headers)?,
                turns: tokio::sync::Semaphore::new(crate::steps::OUTSTANDING_CALLS),
            },
        })
    }

    pub async fn write(&self, lineage: &Lineage, payload: Bytes) -> Result<Written, StepError> {
        match self {
            Sink::File(file) => file.write(&lineage.id, payload).await,
            Sink::Log => {
                let mut line = Vec::with_capacity(payload.len() + 1);
                write_bytes_as_json(&payload, &mut line);
                line.push(b'\n');
                let mut out = io::stdout().lock();
                out.write_all(&line)
                    .and_then(|_| out.flush())
                    .map_err(|e| StepError::transient(format!("cannot write to stdout: {e}")))?;
                Ok(Written::New)
            }
            Sink::Nats {
                client,
                subject,
                unit,
            } => {
                let mut headers = lineage.headers_after(unit);
                headers.insert(
                    switchyard_crds::unit::headers::MSG_ID,
                    header_value(&lineage.id),
                );
                client
                    .publish_with_headers(subject.clone(), headers, payload)
                    .await
                    .map_err(|e| {
                        StepError::transient(format!("cannot publish to {subject}: {e}"))
                    })?;
                Ok(Written::New)
            }
            Sink::Http { endpoint, turns } => {
                let _turn = turns.acquire().await.ok();
                endpoint.post(payload, lineage).await?;
                Ok(Written::New)
            }
        }
    }

    /// Makes sure everything written has left the process.
    pub async fn flush(&self) {
        if let Sink::Nats { client, .. } = self {
            if let Err(e) = client.flush().await {
                tracing::warn!("cannot flush the NATS sink: {e}");
            }
        }
    }
}

/// Appends one JSON line per message, each message exactly once even when it is delivered again after a
/// crash.
///
/// Beside the file, a ledger records the id of every message written and, after each group of writes,
/// the file's length. On start the file is cut back to the last length the ledger confirms, so lines
/// whose ids never reached the ledger (the process died in between) are written again rather than twice.
/// The ledger names the stream's life (its creation time): ids of an earlier stream mean nothing now.
pub struct FileSink {
    requests: mpsc::Sender<WriteRequest>,
}

struct WriteRequest {
    id: String,
    line: Vec<u8>,
    done: oneshot::Sender<io::Result<Written>>,
}

/// Ids remembered for de-duplication. A redelivery comes within minutes, long before this many newer
/// messages have been written.
const REMEMBERED_IDS: usize = 2_000_000;

impl FileSink {
    pub fn open(path: &Path, instance: &str) -> anyhow::Result<FileSink> {
        let mut writer = LedgerWriter::open(path, instance).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the sink file {} or its ledger: {e}",
                path.display()
            )
        })?;
        let (requests, mut rx) = mpsc::channel::<WriteRequest>(4096);
        // File writes block; a thread of its own keeps them off the async workers and lets one write
        // serve every request that queued up meanwhile.
        std::thread::Builder::new()
            .name("file-sink".to_string())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut group = vec![first];
                    while group.len() < 4096 {
                        match rx.try_recv() {
                            Ok(r) => group.push(r),
                            Err(_) => break,
                        }
                    }
                    writer.write_group(group);
                }
            })?;
        Ok(FileSink { requests })
    }

    async fn write(&self, id: &str, payload: Bytes) -> Result<Written, StepError> {
        let mut line = Vec::with_capacity(payload.len() + 1);
        write_bytes_as_json(&payload, &mut line);
        line.push(b'\n');
        let (done, result) = oneshot::channel();
        let request = WriteRequest {
            id: id.to_string(),
            line,
            done,
        };
        if self.requests.send(request).await.is_err() {
            return Err(StepError::transient("the file sink's writer stopped"));
        }
        match result.await {
            Ok(Ok(written)) => Ok(written),
            Ok(Err(e)) => Err(StepError::transient(format!("cannot write: {e}"))),
            Err(_) => Err(StepError::transient("the file sink's writer stopped")),
        }
    }
}

struct LedgerWriter {
    data: File,
    ledger: File,
    data_len: u64,
    seen: HashSet<String>,
    order: VecDeque<String>,
}

/// Where the ledger of the file sink writing `path` is kept (local mode removes it with a fresh run).
pub fn ledger_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.sy-ledger"))
}

impl LedgerWriter {
    fn open(path: &Path, instance: &str) -> io::Result<LedgerWriter> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let data = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(path)?;
        let ledger_path = ledger_path(path);
        let header = format!("#instance {instance}\n");
        let recovered = match File::open(&ledger_path) {
            Ok(f) => read_ledger(BufReader::new(f), &header)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let data_len = data.metadata()?.len();
        let mut writer = match recovered {
            Some(state) => {
                // Lines past the confirmed length belong to a group whose ids never reached the ledger.
                if state.confirmed_len < data_len {
                    tracing::info!(
                        file = %path.display(),
                        "cutting {} bytes written by a process that stopped before recording them; they will be written again",
                        data_len - state.confirmed_len
                    );
                    data.set_len(state.confirmed_len)?;
                }
                let ledger = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&ledger_path)?;
                ledger.set_len(state.ledger_len)?;
                LedgerWriter {
                    data,
                    ledger,
                    data_len: state.confirmed_len.min(data_len),
                    seen: HashSet::new(),
                    order: VecDeque::new(),
                }
                .remember(state.ids)
            }
            None => {
                // A new stream: keep what the file holds and start a new ledger from its end.
                let mut ledger = File::create(&ledger_path)?;
                ledger.write_all(header.as_bytes())?;
                ledger.write_all(format!("@{data_len}\n").as_bytes())?;
                LedgerWriter {
                    data,
                    ledger,
                    data_len,
                    seen: HashSet::new(),
                    order: VecDeque::new(),
                }
            }
        };
        writer.data.seek(SeekFrom::End(0))?;
        writer.ledger.seek(SeekFrom::End(0))?;
        Ok(writer)
    }

    fn remember(mut self, ids: Vec<String>) -> Self {
        for id in ids {
            self.insert(id);
        }
        self
    }

    fn insert(&mut self, id: String) {
        if self.seen.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > REMEMBERED_IDS {
                if let Some(old) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
    }

    fn write_group(&mut self, group: Vec<WriteRequest>) {
        let mut lines = Vec::new();
        let mut record = Vec::new();
        let mut outcomes = Vec::with_capacity(group.len());
        let mut in_group = HashSet::new();
        for request in &group {
            if self.seen.contains(&request.id) || !in_group.insert(request.id.as_str()) {
                outcomes.push(Written::Duplicate);
            } else {
                lines.extend_from_slice(&request.line);
                record.push(b'=');
                record.extend_from_slice(request.id.as_bytes());
                record.push(b'\n');
                outcomes.push(Written::New);
            }
        }
        let result = if lines.is_empty() {
            Ok(())
        } else {
            let end = self.data_len + lines.len() as u64;
            record.extend_from_slice(format!("@{end}\n").as_bytes());
            // Data first, then the ledger: a crash in between leaves data the ledger does not confirm,
            // which the next start cuts away.
            self.data
                .write_all(&lines)
                .and_then(|_| self.ledger.write_all(&record))
                .map(|_| self.data_len = end)
        };
        if let Err(e) = &result {
            // Put the file back to what the ledger confirms, so a retry does not leave half a group.
            let _ = self.data.set_len(self.data_len);
            let _ = self.data.seek(SeekFrom::End(0));
            tracing::error!("file sink write failed: {e}");
        }
        for (request, outcome) in group.into_iter().zip(outcomes) {
            if result.is_ok() && outcome == Written::New {
                self.insert(request.id);
            }
            let reply = match &result {
                Ok(()) => Ok(outcome),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            let _ = request.done.send(reply);
        }
    }
}

struct Recovered {
    ids: Vec<String>,
    confirmed_len: u64,
    /// Length of the ledger up to its last complete group; a torn tail is cut off.
    ledger_len: u64,
}

/// Reads a ledger; None when it belongs to another life of the stream (or is not one of ours).
fn read_ledger(mut reader: impl BufRead, header: &str) -> io::Result<Option<Recovered>> {
    let mut first = String::new();
    reader.read_line(&mut first)?;
    if first != header {
        return Ok(None);
    }
    let mut offset = first.len() as u64;
    let mut state = Recovered {
        ids: Vec::new(),
        confirmed_len: 0,
        ledger_len: offset,
    };
    let mut group = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            break;
        }
        offset += n as u64;
        let text = &line[..n - 1];
        match text.first() {
            Some(b'=') => group.push(String::from_utf8_lossy(&text[1..]).into_owned()),
            Some(b'@') => {
                let Ok(len) = std::str::from_utf8(&text[1..])
                    .unwrap_or_default()
                    .parse::<u64>()
                else {
                    break;
                };
                state.ids.append(&mut group);
                state.confirmed_len = len;
                state.ledger_len = offset;
            }
            _ => break,
        }
    }
    Ok(Some(state))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn write_all(sink: &FileSink, items: &[(&str, &str)]) -> Vec<Written> {
        let mut out = Vec::new();
        for (id, body) in items {
            out.push(
                sink.write(id, Bytes::copy_from_slice(body.as_bytes()))
                    .await
                    .unwrap(),
            );
        }
        out
    }

    #[tokio::test]
    async fn a_message_is_written_once_even_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        {
            let sink = FileSink::open(&path, "s1").unwrap();
            let w = write_all(
                &sink,
                &[("a", "{\"n\":1}"), ("b", "{\"n\":2}"), ("a", "{\"n\":1}")],
            )
            .await;
            assert_eq!(w, vec![Written::New, Written::New, Written::Duplicate]);
        }
        let sink = FileSink::open(&path, "s1").unwrap();
        let w = write_all(&sink, &[("b", "{\"n\":2}"), ("c", "{\"n\":3}")]).await;
        assert_eq!(w, vec![Written::Duplicate, Written::New]);
        drop(sink);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n");
    }

    #[tokio::test]
    async fn lines_not_confirmed_by_the_ledger_are_cut_and_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        {
            let sink = FileSink::open(&path, "s1").unwrap();
            write_all(&sink, &[("a", "1")]).await;
        }
        // A process killed between its data write and its ledger write leaves an unconfirmed line, and
        // perhaps half a ledger record.
        let mut data = OpenOptions::new().append(true).open(&path).unwrap();
        data.write_all(b"2\n").unwrap();
        let mut ledger = OpenOptions::new()
            .append(true)
            .open(ledger_path(&path))
            .unwrap();
        ledger.write_all(b"=b\n@4").unwrap();
        let sink = FileSink::open(&path, "s1").unwrap();
        let w = write_all(&sink, &[("b", "2"), ("a", "1")]).await;
        assert_eq!(w, vec![Written::New, Written::Duplicate]);
        drop(sink);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n2\n");
    }

    #[tokio::test]
    async fn a_new_stream_keeps_the_file_and_starts_a_new_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        {
            let sink = FileSink::open(&path, "s1").unwrap();
            write_all(&sink, &[("a", "1")]).await;
        }
        let sink = FileSink::open(&path, "s2").unwrap();
        assert_eq!(write_all(&sink, &[("a", "1")]).await, vec![Written::New]);
        drop(sink);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1\n1\n");
    }

    #[tokio::test]
    async fn every_message_becomes_one_json_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/out.jsonl");
        let sink = FileSink::open(&path, "s1").unwrap();
        write_all(&sink, &[("a", "{\n\"x\": 1\n}"), ("b", "plain text")]).await;
        drop(sink);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"x\":1}\n\"plain text\"\n"
        );
    }
}
