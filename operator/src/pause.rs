//! `spec.paused`: the pure decision of where a pausing (or resuming) Pipeline stands, and what replicas
//! each unit gets there.
//!
//! Pausing goes in two steps, so that nothing is left half-done in a unit: the sources stop first; once
//! no source pod is left and every reading unit's consumer is empty, every unit scales to zero. Once
//! paused, a Pipeline stays paused until `spec.paused` is false (an unreadable lag does not bring the
//! units back). Resuming gives every unit its replicas again, a switcher those it had before the pause.

/// Where a Pipeline stands with `spec.paused`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PauseState {
    /// Not paused: every unit runs as planned.
    Running,
    /// Sources stopped (or stopping); the other units finish what is queued. Says what is awaited.
    Draining { waiting: Vec<String> },
    /// Every unit is at zero.
    Paused,
}

/// A unit as the pause decision sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitNow {
    pub name: String,
    pub is_source: bool,
    /// Pods its Deployment still has (any state).
    pub pods: i32,
    /// Its consumer's pending and unacknowledged messages (None: a source, or not readable now).
    pub lag: Option<u64>,
}

/// Pure: the state of a Pipeline whose spec says `paused`, which was `was_paused` at the last
/// reconcile, with its units as they are now.
pub fn decide(paused: bool, was_paused: bool, units: &[UnitNow]) -> PauseState {
    if !paused {
        return PauseState::Running;
    }
    if was_paused {
        return PauseState::Paused;
    }
    let mut waiting = Vec::new();
    for unit in units {
        if unit.is_source {
            if unit.pods > 0 {
                waiting.push(format!("source {} to stop ({} pods)", unit.name, unit.pods));
            }
        } else {
            match unit.lag {
                Some(0) => {}
                Some(lag) => waiting.push(format!("{} to drain ({lag} messages)", unit.name)),
                None => waiting.push(format!("{}'s lag to be readable", unit.name)),
            }
        }
    }
    if waiting.is_empty() {
        PauseState::Paused
    } else {
        PauseState::Draining { waiting }
    }
}

/// Pure: the replicas a unit is held at in `state` (None: what it would have anyway).
pub fn held_replicas(state: &PauseState, is_source: bool) -> Option<i32> {
    match state {
        PauseState::Running => None,
        PauseState::Draining { .. } if is_source => Some(0),
        PauseState::Draining { .. } => None,
        PauseState::Paused => Some(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(name: &str, is_source: bool, pods: i32, lag: Option<u64>) -> UnitNow {
        UnitNow {
            name: name.into(),
            is_source,
            pods,
            lag,
        }
    }

    #[test]
    fn sources_stop_first_then_everything_once_drained() {
        let running = [unit("src", true, 1, None), unit("work", false, 2, Some(40))];
        let state = decide(true, false, &running);
        assert_eq!(
            state,
            PauseState::Draining {
                waiting: vec![
                    "source src to stop (1 pods)".into(),
                    "work to drain (40 messages)".into()
                ]
            }
        );
        assert_eq!(held_replicas(&state, true), Some(0));
        assert_eq!(
            held_replicas(&state, false),
            None,
            "the units drain at full strength"
        );
        let drained = [unit("src", true, 0, None), unit("work", false, 2, Some(0))];
        let state = decide(true, false, &drained);
        assert_eq!(state, PauseState::Paused);
        assert_eq!(held_replicas(&state, false), Some(0));
    }

    #[test]
    fn an_unreadable_lag_holds_a_pause_back_but_does_not_undo_one() {
        let unknown = [unit("src", true, 0, None), unit("work", false, 0, None)];
        assert!(matches!(
            decide(true, false, &unknown),
            PauseState::Draining { .. }
        ));
        assert_eq!(decide(true, true, &unknown), PauseState::Paused);
    }

    #[test]
    fn unpausing_runs_everything_as_planned() {
        let any = [unit("src", true, 0, None)];
        assert_eq!(decide(false, true, &any), PauseState::Running);
        assert_eq!(held_replicas(&PauseState::Running, true), None);
    }
}
