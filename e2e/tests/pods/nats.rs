//! The chart's NATS as the test reaches it (a `kubectl port-forward` of its Service), and a stream
//! of the test's own that keeps what a Pipeline's nats sink publishes: a sink whose items outlive
//! its pod, as a file sink's do not (its pod's emptyDir goes when a pause or an edit replaces it).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;

use crate::harness::{Suite, SYSTEM};

pub struct PortForward {
    child: Child,
    pub port: u16,
}

impl PortForward {
    /// `kubectl port-forward` of `target` (such as `svc/switchyard-nats`) in `namespace`, on a free
    /// local port.
    pub fn open(suite: &Suite, namespace: &str, target: &str, remote: u16) -> PortForward {
        let mut child = Command::new(suite.cluster.programs.kube_bin.join("kubectl"))
            .env("KUBECONFIG", suite.cluster.layout.admin_kubeconfig())
            .args([
                "port-forward",
                "-n",
                namespace,
                target,
                &format!(":{remote}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl port-forward");
        let stdout = child.stdout.take().expect("port-forward's output");
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        // "Forwarding from 127.0.0.1:PORT -> 4222"
        let port = loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                let _ = child.kill();
                panic!("kubectl port-forward {target} ended before it forwarded");
            }
            if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
                break rest
                    .split_whitespace()
                    .next()
                    .and_then(|p| p.parse().ok())
                    .expect("a port");
            }
        };
        // Keep reading its output, so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in reader.lines() {});
        PortForward { child, port }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The chart's NATS, through a port-forward, with a runtime to talk to it.
pub struct Nats {
    _forward: PortForward,
    pub runtime: tokio::runtime::Runtime,
    pub js: jetstream::Context,
}

impl Nats {
    pub fn connect(suite: &Suite) -> Nats {
        let forward = PortForward::open(suite, SYSTEM, "svc/switchyard-nats", 4222);
        let runtime = tokio::runtime::Runtime::new().expect("a runtime");
        let url = forward.url();
        let js = runtime.block_on(async {
            let client = async_nats::connect(url)
                .await
                .expect("connect to the chart's NATS");
            jetstream::new(client)
        });
        Nats {
            _forward: forward,
            runtime,
            js,
        }
    }

    /// A stream that keeps `subject` (what a nats sink publishes there), deduplicating by the sink's
    /// message ids over ten minutes, as a downstream JetStream consumer of a Pipeline would.
    pub fn results(&self, name: &str, subject: &str) {
        self.runtime.block_on(async {
            let _ = self.js.delete_stream(name).await;
            self.js
                .create_stream(stream::Config {
                    name: name.to_string(),
                    subjects: vec![subject.to_string()],
                    duplicate_window: Duration::from_secs(600),
                    ..stream::Config::default()
                })
                .await
                .expect("create the results stream");
        });
    }

    /// How many messages the stream holds.
    pub fn count(&self, name: &str) -> u64 {
        self.runtime.block_on(async {
            match self.js.get_stream(name).await {
                Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
                Err(_) => 0,
            }
        })
    }

    /// Every message of the stream, as text.
    pub fn read_all(&self, name: &str) -> Vec<String> {
        self.runtime.block_on(async {
            let stream = self.js.get_stream(name).await.expect("the results stream");
            let total = {
                let mut s = stream.clone();
                s.info().await.map(|i| i.state.messages).unwrap_or(0)
            };
            let consumer = stream
                .create_consumer(consumer::pull::Config {
                    ack_policy: consumer::AckPolicy::None,
                    ..consumer::pull::Config::default()
                })
                .await
                .expect("a consumer");
            let mut messages = consumer.messages().await.expect("messages");
            let mut all = Vec::new();
            while (all.len() as u64) < total {
                match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
                    Ok(Some(Ok(m))) => all.push(String::from_utf8_lossy(&m.payload).into_owned()),
                    _ => break,
                }
            }
            all
        })
    }
}
