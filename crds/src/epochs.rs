//! Epochs: how a publisher moves to a new subject (`data.<unit>_<n>`) so that a migration cuts
//! its stream at one point, and how a layout made afresh keeps the epochs a migrated Pipeline is at.
//! Below `migration.rs`.

use std::collections::BTreeMap;

use crate::layout::{Layout, Names};
use crate::unit::{ConsumerConfig, UnitConfig};

/// The subject `unit` publishes to in `epoch`: epoch 0 is the plain data subject, so a Pipeline that
/// was never migrated keeps the names it always had.
pub fn epoch_subject(data_subject: &str, epoch: u32) -> String {
    if epoch == 0 {
        data_subject.to_string()
    } else {
        // Unit names are DNS labels: `_` never occurs in one, so this cannot be another unit's subject.
        format!("{data_subject}_{epoch}")
    }
}

/// The epoch of a unit's output subject, given its plain data subject.
pub fn epoch_of(subject: &str, data_subject: &str) -> Option<u32> {
    if subject == data_subject {
        return Some(0);
    }
    subject
        .strip_prefix(data_subject)?
        .strip_prefix('_')?
        .parse()
        .ok()
}

/// Each publisher's epoch, read off the subject it publishes to; publishers at epoch 0 are left out.
pub fn epochs(units: &[UnitConfig]) -> BTreeMap<String, u32> {
    units
        .iter()
        .filter_map(|u| {
            let plain = Names::new(&u.namespace, &u.pipeline).data_subject(&u.unit);
            let epoch = epoch_of(u.output_subject.as_deref()?, &plain)?;
            (epoch > 0).then(|| (u.unit.clone(), epoch))
        })
        .collect()
}

/// A layout made afresh from a spec, with the epochs a migrated Pipeline's publishers are at: what
/// runs after a migration, and what the operator and `switchyard run --resume` lay out from then on.
pub fn with_epochs(mut layout: Layout, epochs: &BTreeMap<String, u32>) -> Layout {
    let mut moved: BTreeMap<String, String> = BTreeMap::new();
    for unit in &mut layout.units {
        let (Some(epoch), Some(subject)) = (epochs.get(&unit.unit), &mut unit.output_subject)
        else {
            continue;
        };
        let then = epoch_subject(subject, *epoch);
        moved.insert(subject.clone(), then.clone());
        *subject = then;
    }
    let rewrite = |consumer: &mut ConsumerConfig| {
        for subject in &mut consumer.filter_subjects {
            if let Some(then) = moved.get(subject) {
                *subject = then.clone();
            }
        }
    };
    for unit in &mut layout.units {
        if let Some(input) = &mut unit.input {
            rewrite(input);
        }
    }
    for consumer in &mut layout.nats.consumers {
        rewrite(consumer);
    }
    layout
}
