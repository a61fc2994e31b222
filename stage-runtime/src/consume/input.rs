//! One input as it goes through the unit: the work of one future (a message, or a batch of
//! them), its items, what each came to, what storing them waits on, and the books of the input.

use async_nats::jetstream::{self, Message};
use switchyard_crds::books::Counts;
use switchyard_crds::unit::TraceOutcome;
use switchyard_platform::frame;

use crate::crashes::{FrameRecord, Verdict};
use crate::lineage::Lineage;
use crate::otlp::ItemSpan;
use crate::payload::Payload;
use crate::steps::StepFailure;
use crate::trace::{Began, Done};

/// Work for one future: a single input, or a batch of them.
// The single message is the hot path: keep it inline rather than boxing it per message.
#[allow(clippy::large_enum_variant)]
pub(super) enum Work {
    One(Message),
    Batch(Vec<Message>),
}

impl Work {
    /// The items the work's messages hold.
    pub(super) fn items(&self) -> usize {
        match self {
            Work::One(m) => items_held(m),
            Work::Batch(ms) => ms.iter().map(items_held).sum(),
        }
    }
}

/// The items a stored message holds: a frame's count, one otherwise.
pub(super) fn items_held(message: &Message) -> usize {
    frame::frame_count(message.headers.as_ref())
        .and_then(Result::ok)
        .unwrap_or(1)
        .max(1)
}

/// How the items of one message run.
pub(super) enum Items {
    /// All at once, each with this verdict.
    Together(Verdict),
    /// One after the other, behind a crash record naming each as it runs.
    OneByOne(FrameRecord),
}

/// One item of an input message, with its own lineage.
pub(super) struct Input {
    pub(super) lineage: Lineage,
    pub(super) payload: Payload,
    /// The step a replay starts at (0 for everything but a replayed dead letter).
    pub(super) first_step: usize,
    /// A dead letter of this unit's, replayed.
    pub(super) replayed: bool,
}

/// What one item came to in this unit, until it is stored.
pub(super) struct Processed {
    /// As it came in (its trace event is recorded under it).
    pub(super) lineage: Lineage,
    /// The lineage its outputs and dead letters carry, when its span changed it.
    pub(super) carried: Option<Lineage>,
    pub(super) began: Option<Began>,
    pub(super) span: Option<ItemSpan>,
    pub(super) outputs: Vec<Payload>,
    pub(super) failures: Vec<StepFailure>,
    /// What a join does once the outputs and dead letters are stored (`joining`).
    pub(super) after: Option<AfterStored>,
    /// Why the item's input must come again later rather than be acknowledged now.
    pub(super) again_later: Option<super::worker::ConsumeError>,
    /// What a join did with the item, for its trace event.
    pub(super) joined: Option<(TraceOutcome, String)>,
}

/// What a join notes in its bucket once what an item made is stored.
pub(super) enum AfterStored {
    /// The failed item's letter is stored.
    LetterStored(String),
    /// The item went on at its timeout with what arrived.
    Closed(String),
}

impl Processed {
    pub(super) fn of(
        lineage: Lineage,
        began: Option<Began>,
        span: Option<ItemSpan>,
        outputs: Vec<Payload>,
        failures: Vec<StepFailure>,
    ) -> Processed {
        Processed {
            lineage,
            carried: None,
            began,
            span,
            outputs,
            failures,
            after: None,
            again_later: None,
            joined: None,
        }
    }

    pub(super) fn carried(&self) -> &Lineage {
        self.carried.as_ref().unwrap_or(&self.lineage)
    }
}

/// What storing one input's results came to, for its trace event.
#[derive(Clone, Default)]
pub(super) struct Emitted {
    /// Published downstream, or written by the sink.
    pub(super) stored: u64,
    pub(super) duplicates: u64,
    /// Dead letters stored.
    pub(super) dead_letters: u64,
    /// The first dead letter's stage and error, and the most attempts any failure took.
    pub(super) dead: Option<(String, String)>,
    pub(super) attempts: u32,
}

impl Emitted {
    pub(super) fn done(self, sink: bool, deliveries: u64) -> Done {
        let outcome = match (&self.dead, sink) {
            (Some(_), _) => TraceOutcome::DeadLettered,
            (None, true) if self.stored == 0 && self.duplicates > 0 => TraceOutcome::Duplicate,
            (None, true) => TraceOutcome::Written,
            (None, false) => TraceOutcome::Published,
        };
        let (stage, error) = self.dead.unzip();
        Done {
            outcome,
            outputs: self.stored,
            deliveries,
            attempts: self.attempts.max(1),
            error,
            stage,
            note: None,
        }
    }
}

/// The publishes of one input awaiting their acknowledgements, and the disconnect count when the input
/// began: a connection lost since then took their acknowledgements with it.
pub(super) struct Pending {
    pub(super) acks: Vec<jetstream::context::PublishAckFuture>,
    pub(super) epoch: u64,
}

/// The books of one input message that held `received` items, from what its items came to: each
/// is dead-lettered (whatever else it made), passed on (it made an output, or a sink found it
/// written), or filtered out. What a sink finds written when the message comes `again` was written
/// by its delivery before (whose process died before it recorded that): written, not a duplicate.
pub(super) fn counts_of(received: u64, emitted: &[Emitted], again: bool) -> Counts {
    let mut counts = Counts {
        received,
        ..Counts::default()
    };
    for item in emitted {
        if item.dead_letters > 0 {
            counts.dead_lettered += 1;
        } else if item.stored + item.duplicates > 0 {
            counts.passed += 1;
        } else {
            counts.filtered += 1;
        }
        if again {
            counts.out += item.stored + item.duplicates;
        } else {
            counts.out += item.stored;
            counts.duplicates += item.duplicates;
        }
    }
    counts
}

/// The books of a message that could not be read as the frame it says it is: every item it says it
/// holds is dead-lettered with it.
pub(super) fn unreadable_counts(message: &Message) -> Counts {
    let items = items_held(message) as u64;
    Counts {
        received: items,
        dead_lettered: items,
        ..Counts::default()
    }
}
