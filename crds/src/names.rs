//! Every name a Pipeline gets in NATS and Kubernetes, derived from its namespace and name alone,
//! so that `switchyard plan`, the operator, `switchyard run` and the day-2 commands agree on them.

/// The name of a unit's Kubernetes objects (its Deployment and ConfigMap).
pub fn object_name(pipeline: &str, unit: &str) -> String {
    format!("{pipeline}-{unit}")
}

/// The names of everything a Pipeline owns in NATS. Namespace and pipeline are DNS labels, so `_` and `.`
/// cannot occur in them and the names of two pipelines never collide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    pub namespace: String,
    pub pipeline: String,
}

impl Names {
    pub fn new(namespace: &str, pipeline: &str) -> Names {
        Names {
            namespace: namespace.to_string(),
            pipeline: pipeline.to_string(),
        }
    }

    pub fn stream(&self) -> String {
        format!("switchyard_{}_{}", self.namespace, self.pipeline)
    }

    pub fn checkpoint_bucket(&self) -> String {
        format!("switchyard_{}_{}", self.namespace, self.pipeline)
    }

    /// The key-value bucket where joins keep the parts of the items they wait on
    /// (`crate::join_state`); each join's keys begin with its unit's name.
    pub fn join_bucket(&self) -> String {
        format!("switchyard_{}_{}_joins", self.namespace, self.pipeline)
    }

    fn prefix(&self) -> String {
        format!("switchyard.{}.{}", self.namespace, self.pipeline)
    }

    /// Where a unit publishes its output.
    pub fn data_subject(&self, unit: &str) -> String {
        format!("{}.data.{unit}", self.prefix())
    }

    pub fn dead_letter_subject(&self, unit: &str) -> String {
        format!("{}.dlq.{unit}", self.prefix())
    }

    /// Core NATS (outside the stream): counters are reports, not data.
    pub fn stats_subject(&self, unit: &str) -> String {
        format!("{}.stats.{unit}", self.prefix())
    }

    pub fn all_stats_subjects(&self) -> String {
        format!("{}.stats.*", self.prefix())
    }

    /// The stream of trace events, apart from the data: it keeps events for a time, whoever reads them.
    pub fn trace_stream(&self) -> String {
        format!("switchyard_{}_{}_trace", self.namespace, self.pipeline)
    }

    /// Events of one item go to `<this>.<origin>.<seq>`.
    pub fn trace_prefix(&self) -> String {
        format!("{}.trace", self.prefix())
    }

    /// The stream of the Pipeline's books (`books.rs`): records, apart from the data, kept until a
    /// replica rolls them up.
    pub fn books_stream(&self) -> String {
        format!("switchyard_{}_{}_books", self.namespace, self.pipeline)
    }

    /// The stream of the accounts units give of jobs (see `crate::jobs`).
    pub fn jobs_stream(&self) -> String {
        format!("switchyard_{}_{}_jobs", self.namespace, self.pipeline)
    }

    /// What every jobs subject begins with: `<this>.<source>`.
    pub fn jobs_prefix(&self) -> String {
        format!("{}.jobs", self.prefix())
    }

    /// What every book subject begins with: `<this>.<unit>.<replica>`.
    pub fn books_root(&self) -> String {
        format!("{}.books", self.prefix())
    }

    /// Where the books of `unit` go: `<this>.<replica>` for each of its processes.
    pub fn books_prefix(&self, unit: &str) -> String {
        format!("{}.{unit}", self.books_root())
    }

    /// Where `switchyard pause` and `resume` reach a local run (core NATS).
    pub fn control_subject(&self) -> String {
        format!("{}.control", self.prefix())
    }

    pub(crate) fn all_data_subjects(&self) -> String {
        format!("{}.data.*", self.prefix())
    }

    pub(crate) fn all_dead_letter_subjects(&self) -> String {
        format!("{}.dlq.*", self.prefix())
    }
}
