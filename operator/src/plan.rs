//! The plan: everything the operator creates for a Pipeline — its NATS stream, bucket and consumers, and
//! for each unit a ConfigMap (the unit's configuration) and a Deployment. Pure: `switchyard plan` prints
//! it, the operator applies exactly it, and `switchyard run` runs its unit configurations locally.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    SeccompProfile, SecretKeySelector, SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use serde::Serialize;
use switchyard_crds::layout::{layout, NatsLayout};
use switchyard_crds::problem::Problem;
use switchyard_crds::topology::{replicas_of, type_of, Replicas, Topology, Unit, UnitType};
use switchyard_crds::unit::{UnitConfig, UnitRole};
use switchyard_crds::validate::analyze;
use switchyard_crds::Pipeline;
use switchyard_crds::{HttpSource, SourceKind};

mod pod;

use pod::{
    empty_dir, env_value, mount, restricted_container, LAST_WORDS, OTLP_ENDPOINT,
    OTLP_TRACES_ENDPOINT,
};

/// What the plan needs besides the Pipeline: facts about the installation.
#[derive(Clone, Debug)]
pub struct PlanSettings {
    /// Image that holds `switchyard-stage`; it runs units that name no image of their own.
    pub stage_image: String,
    /// NATS server for units, unless the Pipeline names one.
    pub nats_url: String,
    /// Where every unit exports its spans over OTLP (`OTEL_EXPORTER_OTLP_ENDPOINT`), unless its stage's
    /// `env` says otherwise.
    pub otlp_endpoint: Option<String>,
}

impl Default for PlanSettings {
    fn default() -> Self {
        PlanSettings {
            stage_image: default_image(),
            nats_url: "nats://nats:4222".to_string(),
            otlp_endpoint: None,
        }
    }
}

pub fn default_image() -> String {
    format!(
        "ghcr.io/switchyard-dev/switchyard:{}",
        env!("CARGO_PKG_VERSION")
    )
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub pipeline: String,
    pub namespace: String,
    pub nats: NatsLayout,
    pub units: Vec<UnitPlan>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UnitPlan {
    pub name: String,
    pub kind: UnitType,
    /// Where the unit comes from in the Pipeline.
    pub from: String,
    /// The stages that run together in this unit's process, in flow order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<String>,
    pub replicas: Replicas,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reads: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publishes: Option<String>,
    pub dead_letters: String,
    #[serde(skip)]
    pub config: UnitConfig,
    #[serde(skip)]
    pub config_map: ConfigMap,
    #[serde(skip)]
    pub deployment: Deployment,
}

impl UnitPlan {
    /// A switcher's replicas belong to the autoscaler.
    pub fn is_switcher(&self) -> bool {
        self.kind == UnitType::Switcher
    }
}

/// Labels every object of a unit carries; the selector uses the last two.
/// The key of a unit's configuration in its ConfigMap.
pub const CONFIG_KEY: &str = "unit.json";
pub const LABEL_PIPELINE: &str = "switchyard.dev/pipeline";
pub const LABEL_UNIT: &str = "switchyard.dev/unit";
/// Annotation on the pod template: changes when the unit's configuration does, so pods roll.
pub const ANNOTATION_CONFIG_CHECKSUM: &str = "switchyard.dev/config-checksum";
/// Where the init container puts `switchyard-stage`, so that any image can run it.
use switchyard_platform::image::{RUNTIME_DIR, STAGE_PROGRAM};
const CONFIG_DIR: &str = "/etc/switchyard";
const CREDENTIALS_DIR: &str = "/etc/switchyard/nats";
/// Where a stage process serves /metrics, /healthz and /readyz.
const METRICS_PORT: i32 = 9090;
/// A writable working directory (the pod's root filesystem is read-only).
const WORK_DIR: &str = "/work";
/// Same user as the distroless `nonroot` user our image runs as.
const RUN_AS_USER: i64 = 65532;

/// Checks the Pipeline and plans it; every problem is reported at once.
pub fn plan(pipeline: &Pipeline, settings: &PlanSettings) -> Result<Plan, Vec<Problem>> {
    let topology = analyze(pipeline)?;
    let mut layout = layout(&topology, &pipeline.spec)?;
    // Publishers a migration moved to later subjects stay there (the status keeps their epochs).
    if let Some(epochs) = pipeline.status.as_ref().map(|s| &s.epochs) {
        if !epochs.is_empty() {
            layout = switchyard_crds::migration::with_epochs(layout, epochs);
        }
    }
    let problems = cluster_problems(&pipeline.spec);
    if !problems.is_empty() {
        return Err(problems);
    }
    let nats_url = pipeline
        .spec
        .nats
        .as_ref()
        .and_then(|n| n.url.clone())
        .unwrap_or_else(|| settings.nats_url.clone());
    let credentials = pipeline
        .spec
        .nats
        .as_ref()
        .and_then(|n| n.credentials_secret.clone());
    let owner = owner_reference(pipeline);
    let units = topology
        .units
        .iter()
        .zip(&layout.units)
        .map(|(unit, config)| {
            let objects = ObjectsFor {
                topology: &topology,
                unit,
                config,
                settings,
                nats_url: &nats_url,
                credentials: credentials.as_deref(),
                owner: owner.as_ref(),
            };
            UnitPlan {
                name: unit.name.clone(),
                kind: type_of(unit),
                from: unit.spec_path.clone(),
                steps: unit.steps.iter().map(|s| s.path.clone()).collect(),
                replicas: replicas_of(unit),
                reads: config
                    .input
                    .as_ref()
                    .map(|i| i.filter_subjects.clone())
                    .unwrap_or_default(),
                publishes: config.output_subject.clone(),
                dead_letters: config.dead_letter_subject.clone(),
                config: config.clone(),
                config_map: objects.config_map(),
                deployment: objects.deployment(),
            }
        })
        .collect();
    Ok(Plan {
        pipeline: topology.pipeline.clone(),
        namespace: topology.namespace.clone(),
        nats: layout.nats,
        units,
    })
}

/// What a local run can do but a cluster cannot: a secret (a token, a password) read from a variable
/// that nothing in the unit's pod would set.
fn cluster_problems(spec: &switchyard_crds::PipelineSpec) -> Vec<Problem> {
    let sources = spec.sources.iter().enumerate().filter_map(|(i, source)| {
        let secrets = source.kind.one()?.secrets();
        Some((format!("sources[{i}] {}", source.name), secrets))
    });
    let sinks = spec.sinks.iter().enumerate().filter_map(|(i, sink)| {
        let secrets = sink.kind.one()?.secrets();
        Some((format!("sinks[{i}] {}", sink.name), secrets))
    });
    sources
        .chain(sinks)
        .flat_map(|(path, secrets)| {
            secrets
                .into_iter()
                .filter(|(_, secret)| secret.secret_key_ref.is_none())
                .map(move |(field, secret)| Problem::at(
                    path.clone(),
                    format!("{field}.env `{}` is set by nothing in a cluster: add {field}.secretKeyRef (the Secret and key that hold it)", secret.env),
                ))
        })
        .collect()
}

fn owner_reference(pipeline: &Pipeline) -> Option<OwnerReference> {
    let uid = pipeline.metadata.uid.clone()?;
    Some(OwnerReference {
        api_version: Pipeline::api_version(&()).to_string(),
        kind: Pipeline::kind(&()).to_string(),
        name: pipeline.metadata.name.clone().unwrap_or_default(),
        uid,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// A stable checksum of the unit's configuration (FNV-1a, 64 bits): only needs to change when it does.
pub fn checksum(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The unit's configuration as the ConfigMap holds it.
pub fn config_text(config: &UnitConfig) -> String {
    // Serializing plain data with string keys cannot fail.
    serde_json::to_string_pretty(config).unwrap_or_default()
}

pub use switchyard_crds::layout::object_name;

struct ObjectsFor<'a> {
    topology: &'a Topology,
    unit: &'a Unit,
    config: &'a UnitConfig,
    settings: &'a PlanSettings,
    nats_url: &'a str,
    credentials: Option<&'a str>,
    owner: Option<&'a OwnerReference>,
}

impl ObjectsFor<'_> {
    fn name(&self) -> String {
        object_name(&self.topology.pipeline, &self.unit.name)
    }

    fn selector_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_PIPELINE.to_string(), self.topology.pipeline.clone()),
            (LABEL_UNIT.to_string(), self.unit.name.clone()),
        ])
    }

    fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.selector_labels();
        labels.insert("app.kubernetes.io/name".into(), "switchyard-stage".into());
        labels.insert(
            "app.kubernetes.io/instance".into(),
            self.topology.pipeline.clone(),
        );
        labels.insert("app.kubernetes.io/component".into(), self.unit.name.clone());
        labels.insert("app.kubernetes.io/part-of".into(), "switchyard".into());
        labels.insert(
            "app.kubernetes.io/managed-by".into(),
            "switchyard-operator".into(),
        );
        labels
    }

    fn metadata(&self) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.name()),
            namespace: Some(self.topology.namespace.clone()),
            labels: Some(self.labels()),
            owner_references: self.owner.map(|o| vec![o.clone()]),
            ..ObjectMeta::default()
        }
    }

    fn config_map(&self) -> ConfigMap {
        ConfigMap {
            metadata: self.metadata(),
            data: Some(BTreeMap::from([(
                CONFIG_KEY.to_string(),
                config_text(self.config),
            )])),
            ..ConfigMap::default()
        }
    }

    fn deployment(&self) -> Deployment {
        let replicas = replicas_of(self.unit);
        let annotations = BTreeMap::from([
            (
                ANNOTATION_CONFIG_CHECKSUM.to_string(),
                checksum(&config_text(self.config)),
            ),
            ("prometheus.io/scrape".to_string(), "true".to_string()),
            ("prometheus.io/port".to_string(), METRICS_PORT.to_string()),
        ]);
        Deployment {
            metadata: self.metadata(),
            spec: Some(DeploymentSpec {
                replicas: Some(replicas.min as i32),
                selector: LabelSelector {
                    match_labels: Some(self.selector_labels()),
                    ..LabelSelector::default()
                },
                strategy: Some(self.strategy()),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(self.labels()),
                        annotations: Some(annotations),
                        ..ObjectMeta::default()
                    }),
                    spec: Some(self.pod_spec()),
                },
                ..DeploymentSpec::default()
            }),
            ..Deployment::default()
        }
    }

    /// A source or sink must never run twice at once; everything else rolls without a gap.
    fn strategy(&self) -> DeploymentStrategy {
        if replicas_of(self.unit).max == 1 && self.unit.switcher.is_none() {
            DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..DeploymentStrategy::default()
            }
        } else {
            DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".into())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }
        }
    }

    /// The restricted pod: the runtime is copied in by an init container, so that a unit's own image
    /// (with its handlers' language) runs it.
    fn pod_spec(&self) -> PodSpec {
        let (volumes, mounts) = self.volumes();
        let install = Container {
            name: "install-runtime".into(),
            image: Some(self.settings.stage_image.clone()),
            command: Some(vec![STAGE_PROGRAM.into()]),
            args: Some(vec!["--install-to".into(), RUNTIME_DIR.into()]),
            security_context: Some(restricted_container()),
            volume_mounts: Some(vec![mount("runtime", RUNTIME_DIR, false)]),
            termination_message_policy: Some(LAST_WORDS.into()),
            ..Container::default()
        };
        PodSpec {
            init_containers: Some(vec![install]),
            containers: vec![self.stage_container(mounts)],
            volumes: Some(volumes),
            node_selector: self.unit.node_selector.clone(),
            tolerations: self.unit.tolerations.clone(),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS_USER),
                run_as_group: Some(RUN_AS_USER),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            // In-flight messages finish within 25 s of SIGTERM.
            termination_grace_period_seconds: Some(30),
            automount_service_account_token: Some(false),
            ..PodSpec::default()
        }
    }

    fn stage_container(&self, mounts: Vec<VolumeMount>) -> Container {
        // Validation ensures the steps of one unit agree on their image, if any names one.
        let image = self
            .unit
            .steps
            .iter()
            .find_map(|s| s.image.clone())
            .or_else(|| self.unit.image.clone())
            .unwrap_or_else(|| self.settings.stage_image.clone());
        let probe = |path: &str, period: i32| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.into()),
                port: IntOrString::String("metrics".into()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(period),
            ..Probe::default()
        };
        Container {
            name: "stage".into(),
            image: Some(image),
            command: Some(vec![format!("{RUNTIME_DIR}/switchyard-stage")]),
            working_dir: Some(WORK_DIR.into()),
            env: Some(self.env()),
            ports: Some(self.ports()),
            // Ready once connected with its consumer open (or its source running).
            readiness_probe: Some(probe("/readyz", 5)),
            liveness_probe: Some(probe("/healthz", 10)),
            resources: self.unit.resources.clone(),
            security_context: Some(restricted_container()),
            volume_mounts: Some(mounts),
            termination_message_policy: Some(LAST_WORDS.into()),
            ..Container::default()
        }
    }

    fn env(&self) -> Vec<EnvVar> {
        let mut env = vec![
            env_value("SWITCHYARD_CONFIG", &format!("{CONFIG_DIR}/unit.json")),
            env_value("SWITCHYARD_NATS_URL", self.nats_url),
            env_value("SWITCHYARD_LOG_FORMAT", "json"),
            env_value(
                "SWITCHYARD_METRICS_ADDR",
                &format!("0.0.0.0:{METRICS_PORT}"),
            ),
            EnvVar {
                name: "SWITCHYARD_REPLICA".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".into(),
                        ..ObjectFieldSelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
        ];
        if self.credentials.is_some() {
            // The runtime reads whichever keys the Secret has (token, nats.creds, ca.crt, …).
            env.push(env_value(
                switchyard_platform::credentials::env::DIR,
                CREDENTIALS_DIR,
            ));
        }
        let secrets = match &self.config.role {
            UnitRole::Source { source, .. } => source.secrets(),
            UnitRole::Sink { sink, .. } => sink.secrets(),
            _ => Vec::new(),
        };
        for (_, secret_env) in secrets {
            if let Some(secret) = &secret_env.secret_key_ref {
                env.push(EnvVar {
                    name: secret_env.env.clone(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: secret.name.clone(),
                            key: secret.key.clone(),
                            optional: Some(false),
                        }),
                        ..EnvVarSource::default()
                    }),
                    ..EnvVar::default()
                });
            }
        }
        if let Some(endpoint) = &self.settings.otlp_endpoint {
            // A name twice in `env` is refused by server-side apply: the stage's own setting wins.
            let own = self
                .unit
                .env
                .iter()
                .any(|e| e.name == OTLP_ENDPOINT || e.name == OTLP_TRACES_ENDPOINT);
            if !own {
                env.push(env_value(OTLP_ENDPOINT, endpoint));
            }
        }
        env.extend(self.unit.env.iter().cloned());
        env
    }

    /// The pod's volumes, and where the stage container mounts them.
    fn volumes(&self) -> (Vec<Volume>, Vec<VolumeMount>) {
        let mut volumes = vec![
            Volume {
                name: "config".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: self.name(),
                    ..ConfigMapVolumeSource::default()
                }),
                ..Volume::default()
            },
            empty_dir("runtime"),
            // The root filesystem is read-only; handlers and runtimes (Python, Ruby) still want a /tmp.
            empty_dir("tmp"),
            // The unit's working directory: relative paths of file sinks land here.
            empty_dir("work"),
        ];
        let mut mounts = vec![
            mount("config", CONFIG_DIR, true),
            mount("runtime", RUNTIME_DIR, true),
            mount("tmp", "/tmp", false),
            mount("work", WORK_DIR, false),
        ];
        if let Some(secret) = self.credentials {
            volumes.push(Volume {
                name: "nats-credentials".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.to_string()),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            });
            mounts.push(mount("nats-credentials", CREDENTIALS_DIR, true));
        }
        (volumes, mounts)
    }

    fn ports(&self) -> Vec<ContainerPort> {
        let port = |name: &str, number: i32| ContainerPort {
            name: Some(name.into()),
            container_port: number,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        };
        let mut ports = vec![port("metrics", METRICS_PORT)];
        if let UnitRole::Source {
            source: SourceKind::Http(HttpSource { port: http, .. }),
            ..
        } = &self.config.role
        {
            ports.push(port("http", i32::from(*http)));
        }
        ports
    }
}

/// The plan as YAML documents: first the summary (units, subjects, stream and consumers), then the
/// Kubernetes objects in unit order.
pub fn render(plan: &Plan, only: Only) -> Result<String, serde_norway::Error> {
    let mut docs = Vec::new();
    if only != Only::Kubernetes {
        docs.push(format!(
            "# Switchyard plan for Pipeline {}/{}: units, subjects and the JetStream objects.\n# Not a Kubernetes object; `--only kubernetes` prints just those.\n{}",
            plan.namespace,
            plan.pipeline,
            serde_norway::to_string(plan)?
        ));
    }
    if only != Only::Nats {
        for unit in &plan.units {
            docs.push(serde_norway::to_string(&unit.config_map)?);
            docs.push(serde_norway::to_string(&unit.deployment)?);
        }
    }
    Ok(docs.join("---\n"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    /// Everything.
    All,
    /// Only the Kubernetes objects (for kubectl or a validator).
    Kubernetes,
    /// Only the summary and the JetStream configuration.
    Nats,
}

#[cfg(test)]
mod tests;
