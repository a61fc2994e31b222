//! What the scenarios share: the control plane, a NATS server, the chart installed per scenario, the
//! operator run as the chart's ServiceAccount, and small readers of what the cluster says.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchyard_e2e::control_plane::{free_port, ControlPlane};
use switchyard_platform::embedded::NatsServer;

pub struct Suite {
    pub plane: ControlPlane,
    pub nats: NatsServer,
    pub repo: PathBuf,
    /// The `switchyard` binary that runs as the operator (`SWITCHYARD_OPERATOR_BINARY` overrides it,
    /// to measure another build).
    pub operator_binary: PathBuf,
}

/// One scenario's slice of the cluster: the namespace its Pipelines live in, the Helm release that
/// installed the operator's RBAC for it, and the operator's kubeconfig (the chart's ServiceAccount).
pub struct Install {
    pub namespace: String,
    pub release_namespace: String,
    pub account: String,
    pub kubeconfig: PathBuf,
}

pub struct Operator {
    child: Child,
    pub metrics: std::net::SocketAddr,
    pub log: PathBuf,
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn succeeded(what: &str, output: Output) -> Output {
    assert!(
        output.status.success(),
        "{what} failed: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    output
}

/// Waits for `done`, failing after `limit`; returns how long it took.
pub fn wait_for(limit: Duration, what: &str, done: impl FnMut() -> bool) -> Duration {
    switchyard_e2e::wait_polling(limit, Duration::from_millis(200), what, done)
}

impl Suite {
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.plane.kubectl(args)
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> Output {
        succeeded(&format!("kubectl {}", args.join(" ")), self.kubectl(args))
    }

    /// `kubectl apply` of YAML text as the administrator (what a user does).
    pub fn apply(&self, yaml: &str) -> Output {
        self.plane.kubectl_with_input(&["apply", "-f", "-"], yaml)
    }

    pub fn apply_ok(&self, yaml: &str) {
        succeeded("kubectl apply", self.apply(yaml));
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.kubectl(&all);
        if !out.status.success() {
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    pub fn pipeline(&self, namespace: &str, name: &str) -> Value {
        self.json(&["get", "pipeline", name, "-n", namespace])
    }

    /// (status, reason, message) of a Pipeline's condition.
    pub fn condition(
        &self,
        namespace: &str,
        name: &str,
        type_: &str,
    ) -> Option<(String, String, String)> {
        condition_of(&self.pipeline(namespace, name), type_)
    }

    pub fn events(&self, namespace: &str) -> Vec<Value> {
        self.json(&["get", "events.events.k8s.io", "-n", namespace])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn has_event(&self, namespace: &str, reason: &str, note: &str) -> bool {
        self.events(namespace)
            .iter()
            .any(|e| e["reason"] == reason && e["note"].as_str().unwrap_or_default().contains(note))
    }

    /// Installs the chart, exactly as shipped, for Pipelines in `namespace`, and a token of its
    /// ServiceAccount.
    pub fn install(&self, namespace: &str) -> Install {
        let release_namespace = format!("{namespace}-system");
        self.kubectl_ok(&["create", "namespace", namespace]);
        let release = format!("sy-{namespace}");
        let chart = self.repo.join("charts/switchyard");
        let out = succeeded(
            "helm install",
            self.plane.helm(&[
                "install",
                &release,
                &chart.display().to_string(),
                "--namespace",
                &release_namespace,
                "--create-namespace",
                "--set",
                &format!("watchNamespace={namespace}"),
            ]),
        );
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            !said.to_lowercase().contains("warning"),
            "helm install warned: {said}"
        );
        let account = format!("{release}-switchyard");
        let kubeconfig = self
            .plane
            .service_account_kubeconfig(&release_namespace, &account);
        Install {
            namespace: namespace.to_string(),
            release_namespace,
            account,
            kubeconfig,
        }
    }

    /// Starts the operator as the chart's ServiceAccount, with leader election as the chart runs it.
    pub fn start_operator(&self, install: &Install, extra: &[&str]) -> Operator {
        let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("an address");
        let log = self.plane.dir.path().join(format!(
            "operator-{}-{}.log",
            install.namespace,
            free_port()
        ));
        let out = std::fs::File::create(&log).expect("create the operator's log");
        let err = out.try_clone().expect("clone a log file");
        let mut command = Command::new(&self.operator_binary);
        command
            .arg("operator")
            .arg(format!("--nats-url={}", self.nats.url()))
            .arg("--stage-image=switchyard:test")
            .arg(format!("--metrics-addr={metrics}"))
            .arg(format!("--watch-namespace={}", install.namespace))
            .arg("--leader-election")
            .args(extra)
            .env("KUBECONFIG", &install.kubeconfig)
            .env("POD_NAMESPACE", &install.release_namespace)
            .env("POD_NAME", format!("operator-{}", install.namespace))
            .env("SWITCHYARD_LOG", "info,switchyard_operator=debug")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // Should the suite be killed, so is the operator.
        switchyard_platform::os::die_with_parent(&mut command);
        let child = command.spawn().expect("start the operator");
        let operator = Operator {
            child,
            metrics,
            log,
        };
        wait_for(Duration::from_secs(30), "the operator's /healthz", || {
            operator.get("/healthz").0 == 200
        });
        operator
    }

    /// What a kubelet would report: every pod of `namespace` running and ready.
    pub fn mark_pods_ready(&self, namespace: &str) {
        let pods = self.json(&["get", "pods", "-n", namespace]);
        let ready = json!({"status": {
            "phase": "Running",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "Ready", "status": "True"}
            ]
        }})
        .to_string();
        for pod in pods["items"].as_array().into_iter().flatten() {
            let is_ready = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            if is_ready || !pod["metadata"]["deletionTimestamp"].is_null() {
                continue;
            }
            let name = pod["metadata"]["name"].as_str().unwrap_or_default();
            let _ = self.kubectl(&[
                "patch",
                "pod",
                name,
                "-n",
                namespace,
                "--subresource=status",
                "--type=merge",
                "-p",
                &ready,
            ]);
        }
    }

    /// Requests the operator made, from the API server's audit log.
    pub fn operator_requests(&self, install: &Install) -> Vec<Value> {
        self.plane.audit_events(&format!(
            "system:serviceaccount:{}:{}",
            install.release_namespace, install.account
        ))
    }

    /// A JetStream context on the suite's NATS server.
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(self.nats.url())
            .await
            .expect("connect to NATS");
        async_nats::jetstream::new(client)
    }
}

pub fn condition_of(pipeline: &Value, type_: &str) -> Option<(String, String, String)> {
    pipeline["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("status"), s("reason"), s("message"))
        })
}

impl Operator {
    /// (status code, body) of a GET on the operator's metrics server.
    pub fn get(&self, path: &str) -> (u16, String) {
        let Ok(mut stream) =
            std::net::TcpStream::connect_timeout(&self.metrics, Duration::from_secs(2))
        else {
            return (0, String::new());
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (code, response)
    }

    /// The sum of every series of a metric whose line starts with `prefix`.
    pub fn metric(&self, prefix: &str) -> f64 {
        self.get("/metrics")
            .1
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum()
    }

    pub fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(0.0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the operator as Kubernetes would (SIGTERM), and waits for it.
    pub fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Pipeline as YAML: one generator source, the given stages, one log sink.
pub fn pipeline_yaml(namespace: &str, name: &str, stages: &str) -> String {
    format!(
        "apiVersion: switchyard.dev/v1alpha1\nkind: Pipeline\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  sources: [{{name: src, generator: {{count: 10}}}}]\n  stages:\n{stages}\n  sinks: [{{name: out, log: {{}}}}]\n"
    )
}

/// A Pipeline with one switcher `work` between its source and sink.
pub fn switcher_yaml(namespace: &str, name: &str, extra: &str) -> String {
    pipeline_yaml(
        namespace,
        name,
        &format!("    - name: work\n      switcher: {{minReplicas: 1, maxReplicas: 4, targetLagPerReplica: 100}}\n      passthrough: {{}}\n{extra}"),
    )
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}
