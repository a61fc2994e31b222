//! The scenarios of the benchmark: each a Pipeline (one unit, a chain, a group, an exec handler…)
//! and what of its input comes out.

use crate::args::Kind;

#[derive(Clone)]
pub struct Scenario {
    pub kind: Kind,
    pub title: &'static str,
    pub stages: &'static str,
    /// Units to run, in flow order; the last one's output is what comes out.
    pub units: &'static [&'static str],
    /// Run the raw loop instead of switchyard-stage.
    pub raw: bool,
    /// `spec.tracing.sampleRate`: off, except in the scenario that measures what tracing costs.
    pub sample_rate: f64,
    /// Every how many messages one never comes out (its handler answers it with a line that is no
    /// reply, and it is dead-lettered): what finding the culprit costs.
    pub lost_every: Option<u64>,
    /// Outputs of the last unit per item sent (three when three branches are fanned in).
    pub outputs_per_item: u64,
    /// Runs with frames too: a join's outputs come in frames whose number depends on which part
    /// completes an item, which the count of stored messages cannot follow.
    pub frames: bool,
    /// Its latency is measured: the output carries the input's timestamp where it stands (a join's
    /// holds it one level down).
    pub latency: bool,
}

impl Scenario {
    /// Of `sent` messages numbered from 0, how many come out.
    pub fn coming_out(&self, sent: u64) -> u64 {
        sent * self.outputs_per_item - self.lost_every.map_or(0, |n| sent / n)
    }
}

pub const ECHO_HANDLER: &str = "import json, sys\nfor line in sys.stdin:\n    m = json.loads(line)\n    sys.stdout.write(json.dumps({\"id\": m[\"id\"], \"outputs\": [m[\"data\"]]}) + \"\\n\")\n    sys.stdout.flush()\n";

/// The echo, except that it answers message 999, 1999, ... with a line that is no reply.
pub const BAD_LINE_HANDLER: &str = "import json, sys\nfor line in sys.stdin:\n    m = json.loads(line)\n    if m[\"data\"][\"i\"] % 1000 == 999:\n        sys.stdout.write(\"this is not json\\n\")\n    else:\n        sys.stdout.write(json.dumps({\"id\": m[\"id\"], \"outputs\": [m[\"data\"]]}) + \"\\n\")\n    sys.stdout.flush()\n";

/// What most scenarios share: one output an item, frames and latency measured.
const PLAIN: Scenario = Scenario {
    kind: Kind::Passthrough,
    title: "",
    stages: "",
    units: &[],
    raw: false,
    sample_rate: 0.0,
    lost_every: None,
    outputs_per_item: 1,
    frames: true,
    latency: true,
};

pub fn scenarios() -> Vec<Scenario> {
    let mut all = units();
    all.extend(steps_and_tracing());
    all.extend(fork_and_join());
    all
}

/// The raw limit, one unit, a chain of them, a group.
fn units() -> Vec<Scenario> {
    vec![
        Scenario {
            kind: Kind::Raw,
            title: "raw async-nats loop",
            stages: "    - {name: copy, passthrough: {}}\n",
            units: &["copy"],
            raw: true,
            sample_rate: 0.0,
            lost_every: None,
            ..PLAIN
        },
        Scenario {
            kind: Kind::Passthrough,
            title: "one passthrough unit",
            stages: "    - {name: copy, passthrough: {}}\n",
            units: &["copy"],
            raw: false,
            sample_rate: 0.0,
            lost_every: None,
            ..PLAIN
        },
        Scenario {
            kind: Kind::Chain,
            title: "chain of three units",
            stages: "    - {name: a, passthrough: {}}\n    - {name: b, passthrough: {}}\n    - {name: c, passthrough: {}}\n",
            units: &["a", "b", "c"],
            raw: false,
            sample_rate: 0.0,
            lost_every: None,
            ..PLAIN
        },
        Scenario {
            kind: Kind::Group,
            title: "one unit, three steps",
            stages: "    - name: g\n      stages: [{name: s1, passthrough: {}}, {name: s2, passthrough: {}}, {name: s3, passthrough: {}}]\n",
            units: &["g"],
            raw: false,
            sample_rate: 0.0,
            lost_every: None,
            ..PLAIN
        },
    ]
}

/// The steps a unit runs (jq, an exec handler, one that fails now and then), and what tracing costs.
fn steps_and_tracing() -> Vec<Scenario> {
    vec![
        Scenario {
            kind: Kind::Jq,
            title: "one jq step",
            stages: "    - {name: q, jq: '. + {ok: true}'}\n",
            units: &["q"],
            raw: false,
            sample_rate: 0.0,
            lost_every: None,
            ..PLAIN
        },
        Scenario {
            kind: Kind::Exec,
            title: "one exec step (Python echo)",
            stages: "    - {name: e, exec: {command: [python3, handler.py]}}\n",
            units: &["e"],
            raw: false,
            sample_rate: 0.0,
            lost_every: None,
            ..PLAIN
        },
        Scenario {
            kind: Kind::ExecBadLines,
            title: "exec, 1 bad line in 1,000",
            stages: "    - {name: e, exec: {command: [python3, bad-lines.py]}, retry: {maxAttempts: 1}}\n",
            units: &["e"],
            raw: false,
            sample_rate: 0.0,
            lost_every: Some(1000),
            ..PLAIN
        },
        Scenario {
            kind: Kind::Traced,
            title: "one passthrough unit, every item traced",
            stages: "    - {name: copy, passthrough: {}}\n",
            units: &["copy"],
            raw: false,
            sample_rate: 1.0,
            lost_every: None,
            ..PLAIN
        },
    ]
}

/// Three branches of every item, fanned in or joined.
fn fork_and_join() -> Vec<Scenario> {
    vec![
        Scenario {
            kind: Kind::Fork,
            title: "three branches fanned in (3 outputs an item)",
            stages: "    - {name: a, inputs: [feed], passthrough: {}}\n    - {name: b, inputs: [feed], passthrough: {}}\n    - {name: c, inputs: [feed], passthrough: {}}\n    - {name: m, inputs: [a, b, c], passthrough: {}}\n",
            units: &["a", "b", "c", "m"],
            outputs_per_item: 3,
            frames: false,
            latency: false,
            ..PLAIN
        },
        Scenario {
            kind: Kind::Join,
            title: "three branches joined (1 output an item)",
            stages: "    - {name: a, inputs: [feed], passthrough: {}}\n    - {name: b, inputs: [feed], passthrough: {}}\n    - {name: c, inputs: [feed], passthrough: {}}\n    - {name: j, join: {of: [a, b, c]}, passthrough: {}}\n",
            units: &["a", "b", "c", "j"],
            frames: false,
            latency: false,
            ..PLAIN
        },
    ]
}

/// A padded JSON message of exactly `size` bytes (or the smallest that holds its fields).
pub fn payload(size: usize, t: u128, i: u64) -> Vec<u8> {
    let head = format!("{{\"t\":{t},\"i\":{i},\"pad\":\"");
    let tail = "\"}";
    let pad = size.saturating_sub(head.len() + tail.len());
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(head.as_bytes());
    out.resize(out.len() + pad, b'x');
    out.extend_from_slice(tail.as_bytes());
    out
}
