//! Shared helpers for the cross-process and in-process tests: a coordinator on loopback ports
//! chosen by the kernel, agents, the HTTP API, and polling with a deadline.
#![allow(dead_code)]

pub mod images;

use gantry_coordinator::api::types::{CreateTokenResponse, NodeView};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub const HEARTBEAT: Duration = Duration::from_millis(200);
pub const TTL: Duration = Duration::from_millis(1500);

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct Api {
    pub base: String,
    pub token: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(http_addr: SocketAddr, token: String) -> Self {
        Self {
            base: format!("http://{http_addr}"),
            token,
            http: reqwest::Client::new(),
        }
    }

    pub async fn nodes(&self) -> Vec<NodeView> {
        let response = self
            .http
            .get(format!("{}/v1/nodes", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "GET /v1/nodes: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    pub async fn token(&self, role: &str, ttl_seconds: u64) -> String {
        let response = self
            .http
            .post(format!("{}/v1/tokens", self.base))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({ "role": role, "ttl_seconds": ttl_seconds }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json::<CreateTokenResponse>().await.unwrap().token
    }

    /// The node with this agent id, if listed.
    pub async fn node(&self, agent_id: &str) -> Option<NodeView> {
        self.nodes()
            .await
            .into_iter()
            .find(|node| node.agent == agent_id)
    }

    pub async fn wait_status(&self, agent_id: &str, status: &str, timeout: Duration) -> NodeView {
        eventually(
            &format!("agent {agent_id} to be {status}"),
            timeout,
            || async {
                self.node(agent_id)
                    .await
                    .filter(|node| node.status == status)
            },
        )
        .await
    }
}

/// A coordinator running inside the test process.
pub struct InProcessCoordinator {
    pub dir: tempfile::TempDir,
    pub quic_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub api: Api,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcessCoordinator {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(
        adjust: impl FnOnce(&mut gantry_coordinator::CoordinatorConfig),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        gantry_coordinator::data_dir::init(dir.path()).unwrap();
        let mut config = gantry_coordinator::CoordinatorConfig::new(dir.path().to_path_buf());
        config.heartbeat_interval = HEARTBEAT;
        config.agent_ttl = TTL;
        adjust(&mut config);
        let listeners = gantry_coordinator::Listeners {
            quic: std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
            http: std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        };
        let quic_addr = listeners.quic.local_addr().unwrap();
        let http_addr = listeners.http.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gantry_coordinator::run(config, listeners, async {
            let _ = stopped.await;
        }));
        let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
        let api = Api::new(http_addr, token);
        let client = reqwest::Client::new();
        eventually(
            "coordinator HTTP to answer",
            Duration::from_secs(10),
            || {
                let client = client.clone();
                async move {
                    client
                        .get(format!("http://{http_addr}/healthz"))
                        .send()
                        .await
                        .ok()
                }
            },
        )
        .await;
        Self {
            dir,
            quic_addr,
            http_addr,
            api,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

/// An agent running inside the test process.
pub struct InProcessAgent {
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcessAgent {
    pub fn start(
        coordinator: SocketAddr,
        data_dir: &Path,
        token: Option<String>,
        config_toml: &str,
    ) -> Self {
        Self::start_with(vec![coordinator.to_string()], data_dir, token, config_toml)
    }

    pub fn start_with(
        coordinators: Vec<String>,
        data_dir: &Path,
        token: Option<String>,
        config_toml: &str,
    ) -> Self {
        let config =
            gantry_agent::config::AgentConfig::parse(config_toml, "test agent config").unwrap();
        let mut options =
            gantry_agent::AgentOptions::new(coordinators, data_dir.to_path_buf(), config);
        options.join_token = token;
        options.backoff_initial = Duration::from_millis(50);
        options.backoff_max = Duration::from_millis(500);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(gantry_agent::run(options, async {
            let _ = stopped.await;
        }));
        Self {
            data_dir: data_dir.to_path_buf(),
            stop: Some(stop),
            task,
        }
    }

    /// The id in the certificate the agent stored after joining.
    pub async fn wait_id(&self) -> String {
        let dir = self.data_dir.clone();
        eventually(
            "agent to store its certificate",
            Duration::from_secs(10),
            || {
                let dir = dir.clone();
                async move {
                    gantry_agent::credentials::AgentCredentials::load(&dir)
                        .ok()
                        .flatten()
                        .map(|c| c.agent_id)
                }
            },
        )
        .await
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// The `gantry` binary under test.
pub fn gantry() -> Command {
    Command::new(env!("CARGO_BIN_EXE_gantry"))
}

/// A child process killed when dropped, so a failing test leaves nothing running.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn_logged(mut command: Command, log: &Path) -> ChildGuard {
    let file = std::fs::File::create(log).unwrap();
    let child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    ChildGuard(child)
}

/// A free loopback port for a protocol (bound then released; the race is acceptable in tests).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A coordinator started with `--init` as a process of the binary under test, with short
/// heartbeats (200 ms, TTL 1.5 s), its data in `root/coordinator` and its log in
/// `root/coordinator.log`.
pub struct CoordinatorProcess {
    pub quic: String,
    pub http: String,
    /// The admin token it wrote.
    pub token: String,
    pub process: ChildGuard,
}

impl CoordinatorProcess {
    pub async fn start(root: &Path) -> Self {
        Self::start_with_ttl(root, "1500ms").await
    }

    /// As [`CoordinatorProcess::start`], with another agent TTL (a test that restarts an agent
    /// before it may be declared down wants a long one).
    pub async fn start_with_ttl(root: &Path, agent_ttl: &str) -> Self {
        let quic = format!("127.0.0.1:{}", free_udp_port());
        let http = format!("127.0.0.1:{}", free_tcp_port());
        let mut command = gantry();
        command
            .args(["coordinator", "--init", "--listen", &quic, "--http", &http])
            .args(["--heartbeat-interval", "200ms", "--agent-ttl", agent_ttl])
            .arg("--data-dir")
            .arg(root.join("coordinator"));
        let process = spawn_logged(command, &root.join("coordinator.log"));
        let token_path = root.join("coordinator/admin.token");
        let token = eventually("the admin token", Duration::from_secs(20), || {
            let token_path = token_path.clone();
            async move {
                std::fs::read_to_string(&token_path)
                    .ok()
                    .filter(|t| !t.is_empty())
            }
        })
        .await;
        Self {
            quic,
            http,
            token,
            process,
        }
    }

    /// A join token for `role` (`agent` or `coordinator`), asked of the API until it answers.
    pub async fn join_token(&self, role: &str) -> String {
        let client = reqwest::Client::new();
        eventually(
            &format!("a {role} join token"),
            Duration::from_secs(20),
            || async {
                let response = client
                    .post(format!("http://{}/v1/tokens", self.http))
                    .bearer_auth(&self.token)
                    .json(&serde_json::json!({ "role": role }))
                    .send()
                    .await
                    .ok()?;
                let body: serde_json::Value = response.json().await.ok()?;
                body["token"].as_str().map(str::to_string)
            },
        )
        .await
    }
}
