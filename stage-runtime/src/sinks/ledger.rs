//! The file sink's ledger: the id of every message written and, after each group of writes, the file's
//! length. On start the file is cut back to the last length the ledger confirms, so lines whose ids never
//! reached the ledger (the process died in between) are written again rather than twice. The ledger
//! names the stream's life (its creation time): ids of an earlier stream mean nothing now.
//!
//! Only the latest ids matter: a message comes again only while it is unacknowledged, and a sink's
//! consumer lets at most `max_ack_pending` (1,024) be. So the sink remembers the last
//! `REMEMBERED_IDS`, and the ledger is rewritten with just those once it holds twice as many: memory
//! and disk stay flat however long the sink runs.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use tokio::sync::oneshot;

use switchyard_crds::unit::ledger_path;

use super::sink::Written;

/// Ids remembered for de-duplication: about a hundred times what a sink can hold unacknowledged. (It
/// was 2,000,000, which is 300 MiB of ids in a process that otherwise holds 16.)
pub const REMEMBERED_IDS: usize = 100_000;

/// One line to append, with the id that makes it unique.
pub struct WriteRequest {
    pub id: String,
    pub line: Vec<u8>,
    pub done: oneshot::Sender<io::Result<Written>>,
}

pub struct LedgerWriter {
    data: File,
    ledger: File,
    ledger_path: std::path::PathBuf,
    header: String,
    data_len: u64,
    /// Ids the ledger file holds, to know when to rewrite it.
    ledger_ids: usize,
    remember: usize,
    seen: HashSet<Arc<str>>,
    order: VecDeque<Arc<str>>,
}

impl LedgerWriter {
    pub fn open(path: &Path, instance: &str) -> io::Result<LedgerWriter> {
        LedgerWriter::open_remembering(path, instance, REMEMBERED_IDS)
    }

    /// `open`, remembering the last `remember` ids.
    pub fn open_remembering(
        path: &Path,
        instance: &str,
        remember: usize,
    ) -> io::Result<LedgerWriter> {
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
            Ok(f) => read_ledger(BufReader::new(f), &header, remember)?,
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
                    ledger_path,
                    header,
                    data_len: state.confirmed_len.min(data_len),
                    ledger_ids: state.ids_in_file,
                    remember,
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
                    ledger_path,
                    header,
                    data_len,
                    ledger_ids: 0,
                    remember,
                    seen: HashSet::new(),
                    order: VecDeque::new(),
                }
            }
        };
        writer.data.seek(SeekFrom::End(0))?;
        writer.ledger.seek(SeekFrom::End(0))?;
        Ok(writer)
    }

    fn remember(mut self, ids: VecDeque<String>) -> Self {
        for id in ids {
            self.insert(id);
        }
        self
    }

    fn insert(&mut self, id: String) {
        let id: Arc<str> = id.into();
        if self.seen.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > self.remember {
                if let Some(old) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
    }

    /// Rewrites the ledger with only the ids remembered. The new ledger is complete before it replaces
    /// the old one (a rename), so a crash at any point leaves one or the other, both valid.
    fn compact(&mut self) -> io::Result<()> {
        let mut text = Vec::with_capacity(self.header.len() + self.order.len() * 40);
        text.extend_from_slice(self.header.as_bytes());
        for id in &self.order {
            text.push(b'=');
            text.extend_from_slice(id.as_bytes());
            text.push(b'\n');
        }
        text.extend_from_slice(format!("@{}\n", self.data_len).as_bytes());
        let fresh = self.ledger_path.with_extension("sy-ledger-new");
        let mut file = File::create(&fresh)?;
        file.write_all(&text)?;
        file.sync_data()?;
        std::fs::rename(&fresh, &self.ledger_path)?;
        self.ledger = OpenOptions::new().append(true).open(&self.ledger_path)?;
        self.ledger_ids = self.order.len();
        Ok(())
    }

    /// Appends a group of lines and then their ids; answers every request.
    pub fn write_group(&mut self, group: Vec<WriteRequest>) {
        let mut lines = Vec::new();
        let mut record = Vec::new();
        let mut outcomes = Vec::with_capacity(group.len());
        let mut in_group = HashSet::new();
        for request in &group {
            if self.seen.contains(request.id.as_str()) || !in_group.insert(request.id.as_str()) {
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
                self.ledger_ids += 1;
            }
            let reply = match &result {
                Ok(()) => Ok(outcome),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            let _ = request.done.send(reply);
        }
        if self.ledger_ids > self.remember.saturating_mul(2) {
            // The data is written and confirmed either way; a ledger left long is only longer.
            if let Err(e) = self.compact() {
                tracing::warn!(ledger = %self.ledger_path.display(), "cannot rewrite the file sink's ledger shorter: {e}");
            }
        }
    }
}

struct Recovered {
    /// The last ids confirmed, at most as many as are remembered.
    ids: VecDeque<String>,
    /// Ids the file holds in all.
    ids_in_file: usize,
    confirmed_len: u64,
    /// Length of the ledger up to its last complete group; a torn tail is cut off.
    ledger_len: u64,
}

/// Reads a ledger; None when it belongs to another life of the stream (or is not one of ours).
fn read_ledger(
    mut reader: impl BufRead,
    header: &str,
    remember: usize,
) -> io::Result<Option<Recovered>> {
    let mut first = String::new();
    reader.read_line(&mut first)?;
    if first != header {
        return Ok(None);
    }
    let mut offset = first.len() as u64;
    let mut state = Recovered {
        ids: VecDeque::new(),
        ids_in_file: 0,
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
                state.ids_in_file += group.len();
                state.ids.extend(group.drain(..));
                while state.ids.len() > remember {
                    state.ids.pop_front();
                }
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

    fn write(writer: &mut LedgerWriter, ids: impl IntoIterator<Item = String>) -> Vec<Written> {
        let mut answers = Vec::new();
        let group = ids
            .into_iter()
            .map(|id| {
                let (done, answer) = oneshot::channel();
                answers.push(answer);
                WriteRequest {
                    line: format!("{id}\n").into_bytes(),
                    id,
                    done,
                }
            })
            .collect();
        writer.write_group(group);
        answers
            .into_iter()
            .map(|mut a| a.try_recv().unwrap().unwrap())
            .collect()
    }

    /// Before, every id ever written stayed in memory (up to two million) and in the ledger file (for
    /// ever), which a restart read back whole.
    #[test]
    fn memory_and_the_ledger_stay_bounded_and_a_restart_still_knows_the_latest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let mut writer = LedgerWriter::open_remembering(&path, "s1", 10).unwrap();
        for group in 0..20 {
            let ids = (0..5).map(|i| format!("m{}", group * 5 + i));
            assert!(write(&mut writer, ids).iter().all(|w| *w == Written::New));
            assert!(writer.order.len() <= 10 && writer.seen.len() <= 10);
        }
        let ledger_lines = std::fs::read_to_string(ledger_path(&path))
            .unwrap()
            .lines()
            .count();
        assert!(ledger_lines <= 2 * 10 + 1 + 20, "{ledger_lines} lines");
        drop(writer);
        let mut restarted = LedgerWriter::open_remembering(&path, "s1", 10).unwrap();
        assert_eq!(
            write(
                &mut restarted,
                ["m99".to_string(), "m90".to_string(), "m100".to_string()]
            ),
            vec![Written::Duplicate, Written::Duplicate, Written::New]
        );
        drop(restarted);
        let data = std::fs::read_to_string(&path).unwrap();
        assert_eq!(data.lines().count(), 101);
        assert!(data.ends_with("m99\nm100\n"));
    }
}
