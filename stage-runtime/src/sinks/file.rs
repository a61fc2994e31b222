//! The file sink: one JSON line per message, each message exactly once even across restarts (the
//! ledger beside the file makes it so).

use std::path::Path;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

use super::ledger::{LedgerWriter, WriteRequest};
use super::sink::{OpenSink, Sink, SinkContext, SinkError, Written};
use crate::lineage::Lineage;
use crate::payload::write_bytes_as_json;
use crate::retry::StepError;

/// Appends one JSON line per message, each message exactly once even when it is delivered again after a
/// crash.
pub struct FileSink {
    requests: mpsc::Sender<WriteRequest>,
}

impl FileSink {
    pub fn open(path: &Path, instance: &str) -> Result<FileSink, SinkError> {
        let unusable = |source| SinkError::File {
            path: path.to_path_buf(),
            source,
        };
        let mut writer = LedgerWriter::open(path, instance).map_err(unusable)?;
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
            })
            .map_err(unusable)?;
        Ok(FileSink { requests })
    }

    async fn write_line(&self, id: &str, payload: Bytes) -> Result<Written, StepError> {
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

impl OpenSink for FileSink {
    type Settings = switchyard_crds::FileSink;

    async fn open_with(
        settings: &Self::Settings,
        context: &SinkContext<'_>,
    ) -> Result<FileSink, SinkError> {
        FileSink::open(Path::new(&settings.path), context.instance)
    }
}

impl Sink for FileSink {
    fn write<'a>(
        &'a self,
        lineage: &'a Lineage,
        payload: Bytes,
    ) -> BoxFuture<'a, Result<Written, StepError>> {
        self.write_line(&lineage.id, payload).boxed()
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::io::Write;

    use super::*;
    use switchyard_crds::unit::ledger_path;

    async fn write_all(sink: &FileSink, items: &[(&str, &str)]) -> Vec<Written> {
        let mut out = Vec::new();
        for (id, body) in items {
            out.push(
                sink.write_line(id, Bytes::copy_from_slice(body.as_bytes()))
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
