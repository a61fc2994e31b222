//! Accounts of followed jobs (`switchyard_crds::jobs`): what this unit made of the items of a
//! source whose rows are finished once their items are.

use async_nats::jetstream;
use async_nats::Subject;

use crate::lineage::{names, owned_header_value};

use super::input::{Pending, Processed};
use super::worker::{ConsumeError, Output, Worker};
use switchyard_platform::frame::HEADERS_ROOM;

impl Worker {
    /// Stores this unit's account of the items of followed jobs in one input message
    /// (`switchyard_crds::jobs`): for each, the tags of the item as this unit took it and of its
    /// outputs for every reader, or its dead letter's error. One message for the input's items
    /// (more only past the payload limit), under an id that names the items and what is said of
    /// them, so a redelivery that says the same within the duplicate window is stored once and one
    /// that says otherwise is stored too (the source settles each delivery once); before the input
    /// is acknowledged, like the outputs.
    pub(super) async fn account_for_jobs(
        &self,
        items: &[Processed],
        outputs: &[usize],
        acks: &mut Pending,
    ) -> Result<(), ConsumeError> {
        let Some(jobs) = &self.jobs else {
            return Ok(());
        };
        let readers: &[String] = match &self.output {
            Output::Publish(_) => &jobs.readers,
            Output::Sink { .. } => &[],
        };
        // By source: each source's tracker reads its own subject.
        let mut by_source: Vec<(&str, Vec<switchyard_crds::jobs::Contribution>, &str, &str)> =
            Vec::new();
        for (item, &count) in items.iter().zip(outputs) {
            let lineage = item.carried();
            if !jobs.config.sources.contains(&lineage.origin) {
                continue;
            }
            let account = match item.failures.first() {
                Some(failure) => switchyard_crds::jobs::Contribution::failed(
                    &lineage.origin_seq,
                    &lineage.id,
                    &self.unit,
                    &failure.failure.error,
                ),
                None => {
                    let ids: Vec<String> = (0..count)
                        .map(|index| lineage.output_id(&self.unit, index))
                        .collect();
                    switchyard_crds::jobs::Contribution::finished(
                        &lineage.origin_seq,
                        &lineage.id,
                        &self.unit,
                        &ids,
                        readers,
                    )
                }
            };
            match by_source
                .iter_mut()
                .find(|(source, ..)| *source == lineage.origin)
            {
                Some((_, accounts, _, last)) => {
                    accounts.push(account);
                    *last = &lineage.id;
                }
                None => by_source.push((&lineage.origin, vec![account], &lineage.id, &lineage.id)),
            }
        }
        let most_bytes = self.max_payload.saturating_sub(HEADERS_ROOM).max(1);
        for (source, accounts, first, last) in by_source {
            let subject: Subject = format!("{}.{source}", jobs.config.prefix).into();
            let messages = switchyard_crds::jobs::account_messages(&accounts, most_bytes);
            let items = if accounts.len() == 1 {
                format!("{}/{first}", self.unit)
            } else {
                format!("{}/{first}..{last}/{}", self.unit, accounts.len())
            };
            for payload in messages {
                let mut headers = async_nats::HeaderMap::new();
                let digest = switchyard_crds::unit::spread_hash(payload.iter().copied());
                headers.insert(
                    names::MSG_ID,
                    owned_header_value(format!("{items}:{digest:016x}")),
                );
                let publish = jetstream::message::PublishMessage::build()
                    .headers(headers)
                    .payload(payload.into());
                self.publish_into(acks, &subject, publish).await?;
            }
        }
        Ok(())
    }
}
