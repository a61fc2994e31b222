use super::*;
use switchyard_crds::validate::parse_pipeline;

fn laundry() -> Pipeline {
    parse_pipeline(include_str!("../../../examples/laundry.yaml")).unwrap()
}

fn unit<'a>(plan: &'a Plan, name: &str) -> &'a UnitPlan {
    plan.units.iter().find(|u| u.name == name).unwrap()
}

/// The pod a unit's Deployment runs.
fn pod_of(plan: &Plan, name: &str) -> k8s_openapi::api::core::v1::PodSpec {
    unit(plan, name)
        .deployment
        .spec
        .clone()
        .unwrap()
        .template
        .spec
        .unwrap()
}

#[test]
fn laundry_plans_one_unit_per_top_level_stage_with_its_kind() {
    let plan = plan(&laundry(), &PlanSettings::default()).unwrap();
    let kinds: Vec<(&str, &str)> = plan
        .units
        .iter()
        .map(|u| (u.name.as_str(), u.kind.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("clothes", "source"),
            ("person", "group"),
            ("machines", "switcher"),
            ("another-person", "group"),
            ("closet", "sink"),
        ]
    );
    let machines = unit(&plan, "machines");
    assert_eq!(machines.replicas, Replicas { min: 1, max: 8 });
    assert_eq!(machines.steps, vec!["machines > wash", "machines > dry"]);
    assert_eq!(
        machines.reads,
        vec!["switchyard.default.laundry.data.person"]
    );
    assert_eq!(
        machines.publishes.as_deref(),
        Some("switchyard.default.laundry.data.machines")
    );
    assert_eq!(plan.nats.stream.name, "switchyard_default_laundry");
    assert_eq!(plan.nats.stream.retention, "interest");
    let consumers: Vec<&str> = plan
        .nats
        .consumers
        .iter()
        .map(|c| c.durable.as_str())
        .collect();
    assert_eq!(
        consumers,
        vec![
            "person",
            "machines",
            "another-person",
            "closet",
            "_dead_letters"
        ]
    );
}

#[test]
fn every_unit_gets_a_config_map_and_a_deployment_named_after_it() {
    let plan = plan(&laundry(), &PlanSettings::default()).unwrap();
    for u in &plan.units {
        let name = format!("laundry-{}", u.name);
        assert_eq!(u.config_map.metadata.name.as_deref(), Some(name.as_str()));
        assert_eq!(u.deployment.metadata.name.as_deref(), Some(name.as_str()));
        let text = &u.config_map.data.as_ref().unwrap()["unit.json"];
        let config: UnitConfig = serde_json::from_str(text).unwrap();
        assert_eq!(config, u.config);
        let spec = u.deployment.spec.as_ref().unwrap();
        let labels = spec.selector.match_labels.as_ref().unwrap();
        assert_eq!(labels[LABEL_UNIT], u.name);
        let template_labels = spec
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert_eq!(template_labels[LABEL_UNIT], u.name);
    }
    let machines = unit(&plan, "machines");
    assert_eq!(machines.deployment.spec.as_ref().unwrap().replicas, Some(1));
}

#[test]
fn pods_meet_the_restricted_pod_security_standard() {
    let plan = plan(&laundry(), &PlanSettings::default()).unwrap();
    for u in &plan.units {
        let pod = u
            .deployment
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap();
        let pod_security = pod.security_context.as_ref().unwrap();
        assert_eq!(pod_security.run_as_non_root, Some(true));
        assert_eq!(
            pod_security.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        for c in pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
        {
            let s = c.security_context.as_ref().unwrap();
            assert_eq!(s.allow_privilege_escalation, Some(false), "{}", c.name);
            assert_eq!(s.read_only_root_filesystem, Some(true), "{}", c.name);
            assert_eq!(
                s.capabilities.as_ref().unwrap().drop.as_deref(),
                Some(&["ALL".to_string()][..])
            );
        }
    }
}

#[test]
fn the_stage_runtime_reaches_any_image_through_an_init_container() {
    let plan = plan(&laundry(), &PlanSettings::default()).unwrap();
    let pod = |name: &str| pod_of(&plan, name);
    let person = pod("person");
    assert_eq!(person.containers[0].image.as_deref(), Some("ruby:3.3-slim"));
    assert_eq!(
        pod("machines").containers[0].image.as_deref(),
        Some("python:3.12-slim")
    );
    assert_eq!(
        person.containers[0].command.as_deref(),
        Some(&["/opt/switchyard/bin/switchyard-stage".to_string()][..])
    );
    assert_eq!(person.containers[0].working_dir.as_deref(), Some("/work"));
    let init = &person.init_containers.unwrap()[0];
    assert_eq!(init.image.as_deref(), Some(default_image().as_str()));
    assert_eq!(
        init.args.as_deref(),
        Some(
            &[
                "--install-to".to_string(),
                "/opt/switchyard/bin".to_string()
            ][..]
        )
    );
    // Units that name no image run in Switchyard's own.
    assert_eq!(
        pod("closet").containers[0].image.as_deref(),
        Some(default_image().as_str())
    );
}

#[test]
fn owner_references_appear_once_the_pipeline_exists_in_the_cluster() {
    let mut pipeline = laundry();
    let plain = plan(&pipeline, &PlanSettings::default()).unwrap();
    assert!(plain.units[0]
        .deployment
        .metadata
        .owner_references
        .is_none());
    pipeline.metadata.uid = Some("1234".into());
    let owned = plan(&pipeline, &PlanSettings::default()).unwrap();
    let refs = owned.units[0]
        .config_map
        .metadata
        .owner_references
        .clone()
        .unwrap();
    assert_eq!(refs[0].uid, "1234");
    assert_eq!(refs[0].kind, "Pipeline");
    assert_eq!(refs[0].api_version, "switchyard.dev/v1alpha1");
    assert_eq!(refs[0].controller, Some(true));
}

#[test]
fn the_config_checksum_changes_exactly_when_the_config_does() {
    let checksum_of = |text: &str| {
        let plan = plan(&parse_pipeline(text).unwrap(), &PlanSettings::default()).unwrap();
        unit(&plan, "another-person")
            .deployment
            .spec
            .clone()
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()[ANNOTATION_CONFIG_CHECKSUM]
            .clone()
    };
    let original = include_str!("../../../examples/laundry.yaml");
    assert_eq!(checksum_of(original), checksum_of(original));
    let changed = original.replace("folded: true", "folded: false");
    assert_ne!(checksum_of(original), checksum_of(&changed));
}

#[test]
fn credentials_come_from_the_named_secret() {
    let mut pipeline = laundry();
    pipeline.spec.nats = Some(switchyard_crds::NatsConfig {
        url: Some("nats://elsewhere:4222".into()),
        credentials_secret: Some("nats-creds".into()),
        replicas: None,
        redeliver_after: None,
    });
    let plan = plan(&pipeline, &PlanSettings::default()).unwrap();
    let pod = pod_of(&plan, "person");
    let env = pod.containers[0].env.clone().unwrap();
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(
        value("SWITCHYARD_NATS_URL").as_deref(),
        Some("nats://elsewhere:4222")
    );
    assert_eq!(
        value("SWITCHYARD_NATS_CREDENTIALS_DIR").as_deref(),
        Some("/etc/switchyard/nats")
    );
    let volumes = pod.volumes.unwrap();
    let secret = volumes
        .iter()
        .find(|v| v.name == "nats-credentials")
        .unwrap();
    assert_eq!(
        secret.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("nats-creds")
    );
}

#[test]
fn rendering_is_deterministic_and_kubernetes_only_on_request() {
    let plan = plan(&laundry(), &PlanSettings::default()).unwrap();
    let all = render(&plan, Only::All).unwrap();
    assert_eq!(all, render(&plan, Only::All).unwrap());
    assert!(all.starts_with("# Switchyard plan for Pipeline default/laundry"));
    let objects = render(&plan, Only::Kubernetes).unwrap();
    assert_eq!(objects.matches("kind: Deployment").count(), 5);
    assert_eq!(objects.matches("kind: ConfigMap").count(), 5);
    assert!(!objects.contains("duplicateWindowMs"));
    let nats = render(&plan, Only::Nats).unwrap();
    assert!(nats.contains("duplicateWindowMs: 120000"));
    assert!(!nats.contains("kind: Deployment"));
}

#[test]
fn an_invalid_pipeline_is_not_planned() {
    let mut pipeline = laundry();
    pipeline.spec.stages[0].name = "Person".into();
    let problems = plan(&pipeline, &PlanSettings::default()).unwrap_err();
    assert!(
        problems[0].path.starts_with("stages[0] Person"),
        "{problems:?}"
    );
}

#[test]
fn stage_pods_serve_metrics_and_are_ready_once_working() {
    let plan = plan(&laundry(), &PlanSettings::default()).unwrap();
    let pod = unit(&plan, "machines")
        .deployment
        .spec
        .clone()
        .unwrap()
        .template;
    let container = &pod.spec.as_ref().unwrap().containers[0];
    let ports: Vec<_> = container
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone(), p.container_port))
        .collect();
    assert!(ports.contains(&(Some("metrics".into()), 9090)), "{ports:?}");
    let readiness = container
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(readiness.path.as_deref(), Some("/readyz"));
    let env = container.env.as_ref().unwrap();
    assert!(
        env.iter()
            .any(|e| e.name == "SWITCHYARD_METRICS_ADDR"
                && e.value.as_deref() == Some("0.0.0.0:9090"))
    );
    assert_eq!(
        pod.metadata.unwrap().annotations.unwrap()["prometheus.io/scrape"],
        "true"
    );
}

#[test]
fn an_http_source_token_comes_from_its_secret_and_never_from_nowhere() {
    let guarded = |token: &str| {
        parse_pipeline(&format!(
            "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: p, namespace: default}}\nspec:\n  sources: [{{name: web, http: {{port: 8080, bearerToken: {token}}}}}]\n  stages: [{{name: copy, passthrough: {{}}}}]\n  sinks: [{{name: out, log: {{}}}}]\n"
        ))
        .unwrap()
    };
    let with_secret = guarded("{env: INGEST_TOKEN, secretKeyRef: {name: ingest, key: token}}");
    let planned = plan(&with_secret, &PlanSettings::default()).unwrap();
    let pod = pod_of(&planned, "web");
    let env = pod.containers[0].env.clone().unwrap();
    let token = env.iter().find(|e| e.name == "INGEST_TOKEN").unwrap();
    assert_eq!(token.value, None, "a reference, never the value");
    let selector = token
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .unwrap();
    assert_eq!(
        (selector.name.as_str(), selector.key.as_str()),
        ("ingest", "token")
    );

    let problems = plan(&guarded("{env: INGEST_TOKEN}"), &PlanSettings::default()).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].to_string().contains(
            "sources[0] web: http.bearerToken.env `INGEST_TOKEN` is set by nothing in a cluster"
        ),
        "{}",
        problems[0]
    );
}

#[test]
fn every_unit_exports_spans_where_the_operator_says_unless_its_stage_says_otherwise() {
    let pipeline = parse_pipeline(
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {name: p, namespace: default}\nspec:\n  sources: [{name: gen, generator: {count: 1}}]\n  stages:\n    - {name: copy, passthrough: {}}\n    - {name: own, passthrough: {}, env: [{name: OTEL_EXPORTER_OTLP_ENDPOINT, value: 'http://mine:4318'}]}\n  sinks: [{name: out, log: {}}]\n",
    )
    .unwrap();
    let endpoints = |settings: &PlanSettings, name: &str| -> Vec<String> {
        let planned = plan(&pipeline, settings).unwrap();
        pod_of(&planned, name).containers[0]
            .env
            .clone()
            .unwrap()
            .into_iter()
            .filter(|e| e.name == "OTEL_EXPORTER_OTLP_ENDPOINT")
            .filter_map(|e| e.value)
            .collect()
    };
    let settings = PlanSettings {
        otlp_endpoint: Some("http://collector.observability:4318".into()),
        ..PlanSettings::default()
    };
    for name in ["gen", "copy", "out"] {
        assert_eq!(
            endpoints(&settings, name),
            ["http://collector.observability:4318"],
            "{name}"
        );
    }
    // Once, the stage's own: a name twice in `env` would be refused by server-side apply.
    assert_eq!(endpoints(&settings, "own"), ["http://mine:4318"]);
    assert!(endpoints(&PlanSettings::default(), "copy").is_empty());
}

#[test]
fn a_postgres_sink_password_comes_from_its_secret_and_never_from_nowhere() {
    let sink = |password: &str| {
        parse_pipeline(&format!(
            "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: p, namespace: default}}\nspec:\n  sources: [{{name: src, generator: {{count: 3}}}}]\n  stages: [{{name: copy, passthrough: {{}}}}]\n  sinks: [{{name: db, postgres: {{connection: {{url: 'postgres://app@db/app', password: {password}}}, table: results, itemIdColumn: id}}}}]\n"
        ))
        .unwrap()
    };
    let planned = plan(
        &sink("{env: PGPASSWORD, secretKeyRef: {name: app-db, key: password}}"),
        &PlanSettings::default(),
    )
    .unwrap();
    let env = pod_of(&planned, "db").containers[0].env.clone().unwrap();
    let password = env.iter().find(|e| e.name == "PGPASSWORD").unwrap();
    assert_eq!(password.value, None, "a reference, never the value");
    let selector = password
        .value_from
        .as_ref()
        .and_then(|v| v.secret_key_ref.as_ref())
        .unwrap();
    assert_eq!(
        (selector.name.as_str(), selector.key.as_str()),
        ("app-db", "password")
    );

    let problems = plan(&sink("{env: PGPASSWORD}"), &PlanSettings::default()).unwrap_err();
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].to_string().contains(
            "sinks[0] db: postgres.connection.password.env `PGPASSWORD` is set by nothing in a cluster"
        ),
        "{}",
        problems[0]
    );
}
