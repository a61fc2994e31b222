//! The file sink's ledger: the id of every message written and, after each group of writes, the file's
//! length. On start the file is cut back to the last length the ledger confirms, so lines whose ids never
//! reached the ledger (the process died in between) are written again rather than twice. The ledger
//! names the stream's life (its creation time): ids of an earlier stream mean nothing now.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;

use tokio::sync::oneshot;

use switchyard_crds::unit::ledger_path;

use super::Written;

/// Ids remembered for de-duplication. A redelivery comes within minutes, long before this many newer
/// messages have been written.
const REMEMBERED_IDS: usize = 2_000_000;

/// One line to append, with the id that makes it unique.
pub struct WriteRequest {
    pub id: String,
    pub line: Vec<u8>,
    pub done: oneshot::Sender<io::Result<Written>>,
}

pub struct LedgerWriter {
    data: File,
    ledger: File,
    data_len: u64,
    seen: HashSet<String>,
    order: VecDeque<String>,
}

impl LedgerWriter {
    pub fn open(path: &Path, instance: &str) -> io::Result<LedgerWriter> {
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

    /// Appends a group of lines and then their ids; answers every request.
    pub fn write_group(&mut self, group: Vec<WriteRequest>) {
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
