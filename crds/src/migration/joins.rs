//! Edits of a join's branches while it runs. Removing a branch is safe: the join rolls, and an item
//! that waits only for the branch that went on goes on at once (`join_state::expire`). Adding one is
//! not: an item forked before the new branch read the fork is never given its part, and every item
//! waiting then would time out, so such an edit is refused with the way to make it.

use crate::unit_state::UnitState;

/// Why the edit from `running` to `desired` cannot be carried out in place: one reason per join
/// that would wait for a branch it does not wait for now.
pub(super) fn refused(running: &[UnitState], desired: &[UnitState]) -> Vec<String> {
    let mut reasons = Vec::new();
    for unit in desired {
        let Some(after) = &unit.config.join else {
            continue;
        };
        let before = running
            .iter()
            .find(|u| u.config.unit == unit.config.unit)
            .and_then(|u| u.config.join.as_ref());
        let Some(before) = before else {
            continue;
        };
        let added: Vec<&str> = after
            .branches
            .iter()
            .filter(|b| !before.branches.iter().any(|old| old.name == b.name))
            .map(|b| b.name.as_str())
            .collect();
        if !added.is_empty() {
            reasons.push(format!(
                "join `{}` would wait for {} too, which the items it is joining (and those on their way to it) never reach: each would time out. Add the branch in a join stage of another name (the old join finishes what it waits on before it goes), or stop the sources, let everything drain, then edit",
                unit.config.unit,
                added.iter().map(|b| format!("`{b}`")).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    reasons
}
