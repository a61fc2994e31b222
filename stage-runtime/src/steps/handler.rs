//! What a kind of step is: made once from its settings as the unit starts, then handed one item at
//! a time. Below every kind's file; `steps/mod.rs` registers the kinds and wraps each in a `Step`.
//!
//! A step that keeps state across items (a join, a window, a de-duplication) is meant to be a
//! `Handler` like any other: it declares the state it needs and borrows it from the unit through
//! `BuildContext` (a JetStream key-value bucket the unit opens and owns, keyed by the item's
//! lineage), so that its state is stored before the input is acknowledged and the step holds no
//! durability code of its own; its `handle` gives no output until the state says the item is
//! complete. No step keeps state yet (issue 26, the join): `BuildContext` is where it will be lent.

use std::future::Future;

use switchyard_crds::unit::StepConfig;

use crate::http::LazyClient;
use crate::lineage::Lineage;
use crate::payload::Payload;
use crate::retry::StepError;

/// What one kind of step does with one message. Timeouts, retries and turn-taking are `Step`'s.
pub trait Handler: Sized {
    /// The kind's settings: what its variant of `StepKind` holds.
    type Settings;

    /// Makes the step `step` of this kind, once, as the unit starts. Settings it cannot use are a
    /// `BuildError::Settings` naming the step (`step.path`); validation catches most before.
    fn build(
        settings: &Self::Settings,
        step: &StepConfig,
        context: &BuildContext,
    ) -> Result<Self, BuildError>;

    /// Appends the outputs made of `item` to `out` (nothing when it fails).
    fn handle(
        &self,
        item: Payload,
        lineage: &Lineage,
        out: &mut Vec<Payload>,
    ) -> impl Future<Output = Result<(), StepError>> + Send;

    /// Like `handle`, for a suspect (`StepError::suspect`) tried again alone: whatever fails now is
    /// the item's own doing. `Step` runs one such call at a time.
    fn handle_alone(
        &self,
        item: Payload,
        lineage: &Lineage,
        out: &mut Vec<Payload>,
    ) -> impl Future<Output = Result<(), StepError>> + Send {
        self.handle(item, lineage, out)
    }

    /// True for handlers that pass messages on to somebody else (a child, a web service): they get at
    /// most `OUTSTANDING_CALLS` at a time.
    fn hands_off(&self) -> bool {
        false
    }

    /// True when `handle_alone` isolates the item by itself (an exec step's second child); otherwise
    /// `Step` isolates it by letting no other call run beside it.
    fn isolates_itself(&self) -> bool {
        false
    }

    /// True when the handler applies the step's timeout itself (an exec step restarts its child).
    fn times_itself(&self) -> bool {
        false
    }

    /// Stops what the handler runs beside the unit (an exec child) once no more messages will come.
    fn shutdown(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Why a step cannot start.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The step's settings cannot be used (validation catches these before a unit runs).
    #[error("{0}")]
    Settings(String),
    #[error(transparent)]
    Endpoint(#[from] crate::http::EndpointError),
}

/// What a step may borrow from its unit when it is built.
pub struct BuildContext<'a> {
    /// The unit's HTTP clients, made on first use (one pool for every http step of the unit).
    pub http: &'a LazyClient,
}
