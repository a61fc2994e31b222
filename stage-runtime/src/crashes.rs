//! Finding the message that crashes its unit's process, without blaming the others it held.
//!
//! When a process dies, JetStream delivers again every message it held: the one that killed it (if
//! one did) and the hundreds beside it, all with the same delivery count. Counting deliveries would
//! dead-letter the neighbours along with the culprit. Instead a message delivered again runs alone —
//! nothing else in flight in this process — after a record in the Pipeline's checkpoint bucket says
//! so. Its record is removed once it is finished. A record still there when the message comes back
//! means the process died while it ran alone: that is a crash it caused. After
//! `spec.deadLetter.afterCrashes` of them it is dead-lettered instead of run again.
//!
//! A frame (several items in one message) runs alone whole the first time. Should the process die
//! then, the culprit is one of its items: the next time they run one by one, the record naming each
//! item before it runs, and only the item that kills the process is counted and, in the end,
//! dead-lettered.

use async_nats::jetstream::kv;
use switchyard_crds::layout::CRASH_RECORD_PREFIX;

/// What to do with a message delivered again, from how often it crashed its process when alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Run it alone; it crashed the process this often before.
    Run { crashes: u32 },
    /// It crashed the process this often: dead-letter it.
    DeadLetter { crashes: u32 },
}

/// The verdict on a message that crashed its process `crashes` times while it ran alone.
pub fn verdict(crashes: u32, dead_letter_after: u32) -> Verdict {
    if crashes >= dead_letter_after.max(1) {
        Verdict::DeadLetter { crashes }
    } else {
        Verdict::Run { crashes }
    }
}

/// The crash record of a frame (several items in one message): it crashed the process while it ran
/// whole (the culprit unknown yet), or item `index` did, `crashes` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameRecord {
    Whole,
    Item { index: usize, crashes: u32 },
}

impl FrameRecord {
    /// Reads `item <index> <crashes>`; anything else (a count, as a whole frame's record is) is
    /// `Whole`.
    pub fn parse(text: &str) -> FrameRecord {
        let mut words = text.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("item"), Some(index), Some(crashes)) => match (index.parse(), crashes.parse()) {
                (Ok(index), Ok(crashes)) => FrameRecord::Item { index, crashes },
                _ => FrameRecord::Whole,
            },
            _ => FrameRecord::Whole,
        }
    }

    /// How often item `index` crashed the process, as far as the record knows.
    pub fn crashes_of(self, index: usize) -> u32 {
        match self {
            FrameRecord::Item { index: i, crashes } if i == index => crashes,
            _ => 0,
        }
    }
}

/// Why a crash record could not be read or written (NATS is unreachable, or the bucket is gone).
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} the crash record {key}: {source}")]
pub struct CrashRecordError {
    action: &'static str,
    key: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl CrashRecordError {
    fn new(
        action: &'static str,
        key: &str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> CrashRecordError {
        CrashRecordError {
            action,
            key: key.to_string(),
            source: Box::new(source),
        }
    }
}

/// A unit's crash records, in the Pipeline's checkpoint bucket.
pub struct CrashRecords {
    pub store: kv::Store,
    pub unit: String,
    pub dead_letter_after: u32,
}

impl CrashRecords {
    fn key(&self, stream_seq: u64) -> String {
        format!("{CRASH_RECORD_PREFIX}.{}.{stream_seq}", self.unit)
    }

    /// Reads how often the message at `stream_seq` crashed the process and, when it is to run again,
    /// records that it runs now, before it does: should the process die, the record stays.
    pub async fn before_running_alone(&self, stream_seq: u64) -> Result<Verdict, CrashRecordError> {
        // A record that does not parse is one this runtime did not write: count it as none.
        let crashes = self
            .read(stream_seq)
            .await?
            .and_then(|bytes| std::str::from_utf8(&bytes).ok()?.trim().parse().ok())
            .unwrap_or(0);
        let verdict = verdict(crashes, self.dead_letter_after);
        if matches!(verdict, Verdict::Run { .. }) {
            self.write(stream_seq, (crashes + 1).to_string()).await?;
        }
        Ok(verdict)
    }

    /// What the record of the frame at `stream_seq` says, if there is one: the frame crashed the
    /// process while it ran whole, or the item it names did.
    pub async fn frame_record(
        &self,
        stream_seq: u64,
    ) -> Result<Option<FrameRecord>, CrashRecordError> {
        Ok(self
            .read(stream_seq)
            .await?
            .map(|bytes| FrameRecord::parse(std::str::from_utf8(&bytes).unwrap_or_default())))
    }

    /// Records that the frame at `stream_seq` runs whole, alone.
    pub async fn whole_frame_runs(&self, stream_seq: u64) -> Result<(), CrashRecordError> {
        self.write(stream_seq, "1".to_string()).await
    }

    /// Records that item `index` of the frame at `stream_seq` runs, and that should the process die
    /// now it will have crashed it `crashes` times.
    pub async fn item_runs(
        &self,
        stream_seq: u64,
        index: usize,
        crashes: u32,
    ) -> Result<(), CrashRecordError> {
        self.write(stream_seq, format!("item {index} {crashes}"))
            .await
    }

    async fn read(&self, stream_seq: u64) -> Result<Option<bytes::Bytes>, CrashRecordError> {
        let key = self.key(stream_seq);
        self.store
            .get(&key)
            .await
            .map_err(|e| CrashRecordError::new("read", &key, e))
    }

    async fn write(&self, stream_seq: u64, text: String) -> Result<(), CrashRecordError> {
        let key = self.key(stream_seq);
        self.store
            .put(&key, text.into())
            .await
            .map(|_| ())
            .map_err(|e| CrashRecordError::new("write", &key, e))
    }

    /// Removes the record of a message that is finished: it did not crash the process this time.
    pub async fn forget(&self, stream_seq: u64) -> Result<(), CrashRecordError> {
        let key = self.key(stream_seq);
        self.store
            .purge(&key)
            .await
            .map_err(|e| CrashRecordError::new("remove", &key, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frames_record_names_the_item_that_crashed_the_process() {
        assert_eq!(FrameRecord::parse("1"), FrameRecord::Whole);
        assert_eq!(FrameRecord::parse("garbage"), FrameRecord::Whole);
        let record = FrameRecord::parse("item 17 2");
        assert_eq!(
            record,
            FrameRecord::Item {
                index: 17,
                crashes: 2
            }
        );
        assert_eq!(record.crashes_of(17), 2);
        assert_eq!(record.crashes_of(16), 0);
        assert_eq!(FrameRecord::Whole.crashes_of(0), 0);
    }

    #[test]
    fn a_message_runs_until_it_crashed_its_process_as_often_as_allowed() {
        assert_eq!(verdict(0, 3), Verdict::Run { crashes: 0 });
        assert_eq!(verdict(2, 3), Verdict::Run { crashes: 2 });
        assert_eq!(verdict(3, 3), Verdict::DeadLetter { crashes: 3 });
        assert_eq!(verdict(7, 3), Verdict::DeadLetter { crashes: 7 });
        // A limit of none would run a crashing message forever: one crash is the least.
        assert_eq!(verdict(1, 0), Verdict::DeadLetter { crashes: 1 });
    }
}
