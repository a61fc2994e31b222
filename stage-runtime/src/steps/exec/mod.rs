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
//!
//! `protocol` is the line protocol (pure), `child` a child process and the requests it holds,
//! `step` the step with its two children.

mod child;
mod protocol;
mod step;

#[cfg(test)]
pub use protocol::REPLY_FORM;
pub use protocol::{parse_reply, shown, ReplyOf};
pub use step::ExecStep;
