//! The real `gantry` binary as separate processes on loopback: a coordinator, three agents, the
//! CLI. An agent killed with SIGKILL turns down after its TTL and ready again when restarted with
//! its stored certificate; bad tokens make the agent exit non-zero saying why. (`gantry demo` has
//! its own test, `tests/demo.rs`.)

mod common;

use common::*;
use gantry_coordinator::api::types::NodeView;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

struct Cluster {
    dir: tempfile::TempDir,
    quic: String,
    api: String,
    token: String,
    _coordinator: ChildGuard,
}

impl Cluster {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let quic = format!("127.0.0.1:{}", free_udp_port());
        let api = format!("127.0.0.1:{}", free_tcp_port());
        let mut command = gantry();
        command.args([
            "coordinator",
            "--init",
            "--listen",
            &quic,
            "--http",
            &api,
            "--heartbeat-interval",
            "200ms",
            "--agent-ttl",
            "1500ms",
        ]);
        command
            .arg("--data-dir")
            .arg(dir.path().join("coordinator"));
        let coordinator = spawn_logged(command, &dir.path().join("coordinator.log"));
        let token_path = dir.path().join("coordinator/admin.token");
        let token = eventually(
            "the coordinator to write its admin token",
            Duration::from_secs(20),
            || {
                let token_path = token_path.clone();
                async move { std::fs::read_to_string(&token_path).ok() }
            },
        )
        .await;
        let cluster = Self {
            dir,
            quic,
            api,
            token,
            _coordinator: coordinator,
        };
        eventually(
            "the coordinator API to answer",
            Duration::from_secs(20),
            || async {
                cluster
                    .cli(&["nodes", "-o", "json"])
                    .status
                    .success()
                    .then_some(())
            },
        )
        .await;
        cluster
    }

    fn cli(&self, args: &[&str]) -> Output {
        gantry()
            .args(args)
            .env("GANTRY_API", &self.api)
            .env("GANTRY_TOKEN", &self.token)
            .output()
            .unwrap()
    }

    fn nodes(&self) -> Vec<NodeView> {
        let output = self.cli(&["nodes", "-o", "json"]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }

    async fn wait_status(&self, agent_id: &str, status: &str) -> NodeView {
        eventually(
            &format!("{agent_id} to be {status}"),
            Duration::from_secs(20),
            || async {
                self.nodes()
                    .into_iter()
                    .find(|n| n.agent == agent_id && n.status == status)
            },
        )
        .await
    }

    fn agent(&self, name: &str, token: Option<&str>, config: &str) -> ChildGuard {
        let data_dir = self.dir.path().join(name);
        let config_path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let mut command = gantry();
        command.args(["agent", "--coordinator", &self.quic]);
        command
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--config")
            .arg(&config_path);
        if let Some(token) = token {
            command.args(["--join", token]);
        }
        spawn_logged(command, &self.dir.path().join(format!("{name}.log")))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

fn agent_id(data_dir: &Path) -> Option<String> {
    gantry_agent::credentials::AgentCredentials::load(data_dir)
        .ok()
        .flatten()
        .map(|c| c.agent_id)
}

#[tokio::test]
async fn agents_as_processes_register_die_and_come_back() {
    let cluster = Cluster::start().await;
    let output = cluster.cli(&["token", "create", "--role", "agent", "--ttl", "10m"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        stdout.lines().count(),
        1,
        "the token alone on stdout: {stdout:?}"
    );
    let token = stdout.trim().to_string();

    let configs = [
        "name = \"gpu-a\"\nsite = \"onprem-a\"\n[[gpus]]\nmodel = \"H100\"\nmemory = \"80GiB\"\ncount = 8\n",
        "name = \"gpu-b\"\nsite = \"cloud-b\"\nkind = \"cloud\"\n",
        "name = \"cpu-c\"\nsite = \"onprem-a\"\nallow_process = true\n",
    ];
    let mut agents: Vec<ChildGuard> = configs
        .iter()
        .enumerate()
        .map(|(i, config)| cluster.agent(&format!("agent{i}"), Some(&token), config))
        .collect();
    let mut ids = Vec::new();
    for i in 0..3 {
        let dir = cluster.dir.path().join(format!("agent{i}"));
        ids.push(
            eventually("agent to join", Duration::from_secs(20), || {
                let dir = dir.clone();
                async move { agent_id(&dir) }
            })
            .await,
        );
    }
    for id in &ids {
        cluster.wait_status(id, "ready").await;
    }
    let nodes = cluster.nodes();
    assert_eq!(nodes.len(), 3);
    let gpu_a = nodes.iter().find(|n| n.name == "gpu-a").unwrap();
    assert_eq!(gpu_a.gpus.len(), 8);
    assert_eq!(gpu_a.gpus[0].model, "H100");
    assert_eq!(
        gpu_a.cpu_cores,
        std::thread::available_parallelism().unwrap().get() as u32
    );
    let json: serde_json::Value =
        serde_json::from_slice(&cluster.cli(&["nodes", "-o", "json"]).stdout).unwrap();
    for field in [
        "id",
        "site",
        "status",
        "cpu_cores",
        "memory_bytes",
        "gpus",
        "runtimes",
    ] {
        assert!(
            json[0].get(field).is_some(),
            "nodes -o json lacks {field}: {json}"
        );
    }
    let table = String::from_utf8(cluster.cli(&["nodes"]).stdout).unwrap();
    assert!(
        table.starts_with("ID") && table.contains("gpu-a") && table.contains("8x H100"),
        "{table}"
    );

    // SIGKILL: no goodbye, only silence.
    agents[1].0.kill().unwrap();
    agents[1].0.wait().unwrap();
    let down = cluster.wait_status(&ids[1], "down").await;
    assert!(down.last_heard_ms_ago.unwrap() >= 1500, "{down:?}");
    assert_eq!(
        cluster.wait_status(&ids[0], "ready").await.agent,
        ids[0],
        "the others stay ready"
    );

    // Restarted without a token: the stored certificate is enough.
    agents[1] = cluster.agent("agent1", None, configs[1]);
    cluster.wait_status(&ids[1], "ready").await;
    assert_eq!(
        cluster.nodes().len(),
        3,
        "the restarted agent is the same node"
    );
}

#[tokio::test]
async fn bad_tokens_make_the_agent_exit_with_the_reason() {
    let cluster = Cluster::start().await;
    let output = cluster.cli(&["token", "create", "--role", "agent"]);
    let good = String::from_utf8(output.stdout).unwrap().trim().to_string();
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!(
        "{}.{}.{}.{}.{}.{}",
        parts[0],
        parts[1],
        parts[2],
        parts[3],
        parts[4],
        "00".repeat(32)
    );
    let wrong_ca = format!(
        "{}.{}.{}.{}.{}.{}",
        parts[0],
        "ab".repeat(32),
        parts[2],
        parts[3],
        parts[4],
        parts[5]
    );
    let coordinator_token = String::from_utf8(
        cluster
            .cli(&["token", "create", "--role", "coordinator"])
            .stdout,
    )
    .unwrap();
    for (name, token, needle) in [
        ("forged", forged.as_str(), "not issued by this cluster"),
        (
            "wrongca",
            wrong_ca.as_str(),
            "does not match the join token",
        ),
        (
            "role",
            coordinator_token.trim(),
            "for role coordinator, not agent",
        ),
        ("garbage", "hello", "malformed"),
    ] {
        let mut agent = cluster.agent(name, Some(token), "");
        let status = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(status) = agent.0.try_wait().unwrap() {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("a refused agent exits");
        assert!(!status.success(), "{name}: exit status {status}");
        let log = cluster.log(name);
        assert!(
            log.contains(needle),
            "{name}: expected {needle:?} in:\n{log}"
        );
    }
    let coordinator_log = cluster.log("coordinator");
    assert!(
        coordinator_log.contains("refused join: join token was not issued by this cluster"),
        "{coordinator_log}"
    );
    assert!(
        coordinator_log.contains("refused join: join token is for role coordinator"),
        "{coordinator_log}"
    );
    assert!(
        coordinator_log.contains("does not match the hash pinned"),
        "{coordinator_log}"
    );
}

#[test]
fn the_cli_explains_missing_setup() {
    let dir = tempfile::tempdir().unwrap();
    let output = gantry()
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("pass --init"),
        "{output:?}"
    );

    let output = gantry()
        .args(["agent", "--coordinator", "127.0.0.1:9"])
        .arg("--data-dir")
        .arg(dir.path().join("a"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--join TOKEN"),
        "{output:?}"
    );

    std::fs::write(dir.path().join("bad.toml"), "kind = \"edge\"\n").unwrap();
    let output = gantry()
        .args(["agent", "fingerprint", "--config"])
        .arg(dir.path().join("bad.toml"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("unknown variant `edge`"),
        "{output:?}"
    );

    let output = gantry()
        .args(["nodes", "--api", "127.0.0.1:9"])
        .env_remove("GANTRY_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no coordinator answered"),
        "{output:?}"
    );
}
