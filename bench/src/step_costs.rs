//! What in-process steps cost, measured by running chains of them in this process (no NATS).

use std::time::Instant;

use serde::Serialize;
use switchyard_stage::lineage::Lineage;

use crate::scenarios::payload;

/// What in-process steps cost, measured by running chains of them in this process.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepCosts {
    /// Per size: microseconds per message for one passthrough step, three, and one jq step.
    pub runs: Vec<StepRun>,
    /// Microseconds each step beyond the first adds, the largest over the sizes.
    pub per_step_micros: f64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepRun {
    pub size: usize,
    pub one_step_micros: f64,
    pub three_steps_micros: f64,
    pub jq_micros: f64,
}

/// Microseconds per message for `steps`, run on one message after another as a unit runs them.
async fn time_chain(
    steps: &[switchyard_stage::steps::Step],
    body: &bytes::Bytes,
    lineage: &Lineage,
    rounds: u32,
) -> f64 {
    use switchyard_stage::payload::Payload;
    let started = Instant::now();
    for _ in 0..rounds {
        let chained =
            switchyard_stage::steps::run_chain(steps, Payload::Bytes(body.clone()), lineage).await;
        // Every output is serialized, as the unit does before publishing it.
        for output in chained.outputs {
            std::hint::black_box(output.into_bytes());
        }
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
}

/// Times chains of in-process steps on one message after another, as a unit runs them.
pub async fn step_costs(sizes: &[usize]) -> anyhow::Result<StepCosts> {
    use switchyard_crds::unit::{RetryConfig, StepConfig};
    use switchyard_crds::StepKind;
    use switchyard_stage::steps::{LazyClient, Step};
    let http = LazyClient::default();
    let build = |kind: StepKind| {
        Step::build(
            &StepConfig {
                path: "bench".into(),
                kind,
                env: Vec::new(),
                timeout_ms: None,
                retry: RetryConfig::default(),
            },
            &http,
        )
    };
    let one = vec![build(StepKind::Passthrough(Default::default()))?];
    let three = vec![
        build(StepKind::Passthrough(Default::default()))?,
        build(StepKind::Passthrough(Default::default()))?,
        build(StepKind::Passthrough(Default::default()))?,
    ];
    let jq = vec![build(StepKind::Jq(". + {ok: true}".into()))?];
    let lineage = Lineage::at_source("feed", "1".into(), "feed:1".into());
    const ROUNDS: u32 = 200_000;
    let mut runs = Vec::new();
    for &size in sizes {
        let body = bytes::Bytes::from(payload(size, 0, 1));
        let one_step_micros = time_chain(&one, &body, &lineage, ROUNDS).await;
        let three_steps_micros = time_chain(&three, &body, &lineage, ROUNDS).await;
        let jq_micros = time_chain(&jq, &body, &lineage, ROUNDS).await;
        runs.push(StepRun {
            size,
            one_step_micros,
            three_steps_micros,
            jq_micros,
        });
    }
    let per_step_micros = runs
        .iter()
        .map(|r| ((r.three_steps_micros - r.one_step_micros) / 2.0).max(0.0))
        .fold(0.0, f64::max);
    Ok(StepCosts {
        runs,
        per_step_micros,
    })
}
