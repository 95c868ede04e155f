//! Logs and the serving gateway with real processes: two coordinators (a leader and a follower)
//! and two agents running the process runtime, all separate processes of the real binary.
//!
//! `gantry logs` returns a finished shard's stdout and stderr through either coordinator, and a
//! whole job's output in unit order; `--follow` streams a running unit's lines as they are
//! printed (the first while the unit waits for the test) and ends when the unit ends. A serving job of two replicas (each a `gantry
//! coordinator`, which answers `/healthz`) is reached through `/serve/{name}/...` on the
//! follower and on the leader, requests spread over both replicas, and when one replica is
//! killed the gateway keeps answering from the other; `gantry endpoints` lists them. The logs of
//! an allocation on a killed agent are refused with a 503 naming the agent.

mod common;

use common::*;
use gantry_coordinator::api::types::{ClusterView, EndpointView, JobView};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

/// Every CLI run is bounded by this.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

struct Fleet {
    dir: tempfile::TempDir,
    /// HTTP addresses: the leader first, then the follower.
    leader: String,
    follower: String,
    token: String,
    _coordinators: Vec<ChildGuard>,
    agents: BTreeMap<String, ChildGuard>,
    http: reqwest::Client,
}

struct CliOutput {
    success: bool,
    stdout: Vec<u8>,
    stderr: String,
}

impl Fleet {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<(String, String)> = (0..2)
            .map(|_| {
                (
                    format!("127.0.0.1:{}", free_udp_port()),
                    format!("127.0.0.1:{}", free_tcp_port()),
                )
            })
            .collect();
        let http = reqwest::Client::new();
        let root = dir.path().to_path_buf();
        let launch = |i: usize, extra: &[&str]| {
            let mut command = gantry();
            command
                .args([
                    "coordinator",
                    "--listen",
                    &nodes[i].0,
                    "--http",
                    &nodes[i].1,
                ])
                .args(["--heartbeat-interval", "200ms", "--agent-ttl", "1500ms"])
                .arg("--data-dir")
                .arg(root.join(format!("coordinator{i}")))
                .args(extra);
            spawn_logged(command, &root.join(format!("coordinator{i}.log")))
        };
        let mut coordinators = vec![launch(0, &["--init"])];
        let token_path = dir.path().join("coordinator0/admin.token");
        let token = eventually("the admin token", Duration::from_secs(20), || {
            let token_path = token_path.clone();
            async move {
                std::fs::read_to_string(&token_path)
                    .ok()
                    .filter(|t| !t.is_empty())
            }
        })
        .await;
        let mut fleet = Self {
            dir,
            leader: nodes[0].1.clone(),
            follower: nodes[1].1.clone(),
            token,
            _coordinators: Vec::new(),
            agents: BTreeMap::new(),
            http,
        };
        let join = fleet.join_token("coordinator").await;
        coordinators.push(launch(1, &["--join", &format!("{join}@{}", nodes[0].0)]));
        fleet._coordinators = coordinators;
        let view = eventually(
            "two voters and a leader",
            Duration::from_secs(30),
            || async {
                let view: ClusterView = fleet
                    .get_json(&nodes[0].1, "/v1/cluster?stale=true")
                    .await?;
                let voters = view.members.iter().filter(|m| m.role == "voter").count();
                (voters == 2 && view.leader.is_some()).then_some(view)
            },
        )
        .await;
        let leader = view
            .members
            .iter()
            .find(|m| Some(m.id) == view.leader)
            .unwrap();
        if leader.http_addr != fleet.leader {
            std::mem::swap(&mut fleet.leader, &mut fleet.follower);
        }
        assert_eq!(leader.http_addr, fleet.leader);

        let join = fleet.join_token("agent").await;
        let ports = serving_ports();
        let coordinators = format!("{},{}", nodes[0].0, nodes[1].0);
        for name in ["alpha", "beta"] {
            let config = format!(
                "name = \"{name}\"\nallow_process = true\nserving_port_min = {ports}\nserving_port_max = {}\n",
                ports + 20
            );
            let config_path = fleet.dir.path().join(format!("{name}.toml"));
            std::fs::write(&config_path, config).unwrap();
            let mut command = gantry();
            command
                .args(["agent", "--coordinator", &coordinators, "--join", &join])
                .arg("--data-dir")
                .arg(fleet.agent_dir(name))
                .arg("--config")
                .arg(&config_path);
            let log = fleet.dir.path().join(format!("{name}.log"));
            fleet
                .agents
                .insert(name.to_string(), spawn_logged(command, &log));
        }
        eventually("two ready agents", Duration::from_secs(30), || async {
            let nodes: Vec<serde_json::Value> = fleet.get_json(&fleet.leader, "/v1/nodes").await?;
            (nodes.iter().filter(|n| n["status"] == "ready").count() == 2).then_some(())
        })
        .await;
        fleet
    }

    fn agent_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("agent-{name}"))
    }

    fn agent_name(&self, agent_id: &str) -> String {
        ["alpha", "beta"]
            .into_iter()
            .find(|name| {
                gantry_agent::credentials::AgentCredentials::load(&self.agent_dir(name))
                    .ok()
                    .flatten()
                    .is_some_and(|c| c.agent_id == agent_id)
            })
            .unwrap_or_else(|| panic!("no agent has id {agent_id}"))
            .to_string()
    }

    async fn join_token(&self, role: &str) -> String {
        eventually(
            &format!("a {role} join token"),
            Duration::from_secs(20),
            || async {
                let response = self
                    .http
                    .post(format!("http://{}/v1/tokens", self.leader))
                    .bearer_auth(&self.token)
                    .json(&serde_json::json!({ "role": role, "ttl_seconds": 600 }))
                    .send()
                    .await
                    .ok()?;
                let body: serde_json::Value = response.json().await.ok()?;
                body["token"].as_str().map(str::to_string)
            },
        )
        .await
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, api: &str, path: &str) -> Option<T> {
        let response = self
            .http
            .get(format!("http://{api}{path}"))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    async fn submit(&self, spec: serde_json::Value) -> String {
        let response = self
            .http
            .post(format!("http://{}/v1/jobs", self.leader))
            .bearer_auth(&self.token)
            .json(&spec)
            .send()
            .await
            .unwrap();
        let answer: serde_json::Value = response.json().await.unwrap();
        answer["id"]
            .as_str()
            .unwrap_or_else(|| panic!("submit {spec}: {answer}"))
            .to_string()
    }

    async fn job(&self, id: &str) -> Option<JobView> {
        self.get_json(&self.leader, &format!("/v1/jobs/{id}")).await
    }

    /// Waits (bounded) for the job to be `done`; on timeout, shows the job as last seen.
    async fn wait_job(&self, id: &str, what: &str, done: impl Fn(&JobView) -> bool) -> JobView {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let job = self.job(id).await;
            if let Some(job) = job.as_ref().filter(|job| done(job)) {
                return job.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for job {id}: {what}; last seen: {job:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `gantry ARGS --api API` with the admin token, bounded.
    async fn cli(&self, api: &str, args: &[&str]) -> CliOutput {
        let mut command = tokio::process::Command::from(self.cli_command(api, args));
        command.kill_on_drop(true);
        let output = tokio::time::timeout(CLI_TIMEOUT, command.output())
            .await
            .unwrap_or_else(|_| panic!("gantry {args:?} ran past {CLI_TIMEOUT:?}"))
            .unwrap();
        CliOutput {
            success: output.status.success(),
            stdout: output.stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    fn cli_command(&self, api: &str, args: &[&str]) -> std::process::Command {
        let mut command = gantry();
        command
            .args(args)
            .args(["--api", api])
            .env("GANTRY_TOKEN", &self.token)
            .stdin(std::process::Stdio::null());
        command
    }

    /// `GET /serve/...` on a coordinator: status, the replica that answered, the body.
    async fn through_gateway(
        &self,
        api: &str,
        path: &str,
        token: Option<&str>,
    ) -> (u16, Option<String>, String) {
        let mut request = self
            .http
            .get(format!("http://{api}{path}"))
            .timeout(Duration::from_secs(10));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let replica = response
            .headers()
            .get("x-gantry-allocation")
            .map(|v| v.to_str().unwrap().to_string());
        (status, replica, response.text().await.unwrap())
    }
}

/// The first of 21 free ports below the kernel's ephemeral range (32768 and up), so that no
/// outgoing connection or client socket of this test takes one while a replica needs it.
fn serving_ports() -> u16 {
    let start = 20_000 + (std::process::id() % 240) as u16 * 50;
    (0..240)
        .map(|i| 20_000 + (start - 20_000 + i * 50) % 12_000)
        .find(|&base| {
            (base..=base + 20).all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        })
        .expect("21 free ports below 32000")
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_and_the_serving_gateway() {
    let mut fleet = Fleet::start().await;
    let (leader, follower) = (fleet.leader.clone(), fleet.follower.clone());

    // A finished batch job: each shard's stdout and stderr, through either coordinator.
    let batch = fleet
        .submit(serde_json::json!({
            "name": "shards", "kind": "batch",
            "command": ["sh", "-c", "echo shard=$SHARD_INDEX line 1; echo shard=$SHARD_INDEX line 2; echo shard=$SHARD_INDEX oops >&2"],
            "resources": { "cpus": 0.1, "memory": "32MiB" },
            "batch": { "shards": 2 }
        }))
        .await;
    let job = fleet
        .wait_job(&batch, "succeeded", |job| job.state == "succeeded")
        .await;
    let mut allocations = job.allocations.clone();
    allocations.sort_by_key(|a| a.unit);
    for (allocation, api) in allocations.iter().zip([&follower, &leader]) {
        let unit = allocation.unit;
        let out = fleet
            .cli(api, &["logs", &batch, "--allocation", &allocation.id])
            .await;
        assert!(out.success, "{}", out.stderr);
        assert_eq!(
            text(&out.stdout),
            format!("shard={unit} line 1\nshard={unit} line 2\n")
        );
        let err = fleet
            .cli(
                api,
                &["logs", &batch, "--allocation", &allocation.id, "--stderr"],
            )
            .await;
        assert!(err.success, "{}", err.stderr);
        assert_eq!(text(&err.stdout), format!("shard={unit} oops\n"));
    }
    let whole = fleet.cli(&follower, &["logs", &batch]).await;
    assert!(whole.success, "{}", whole.stderr);
    let expected: String = allocations
        .iter()
        .map(|a| {
            format!(
                "==> {} (unit {u}, attempt {}) <==\nshard={u} line 1\nshard={u} line 2\n",
                a.id,
                a.attempt,
                u = a.unit
            )
        })
        .collect();
    assert_eq!(
        text(&whole.stdout),
        expected,
        "a job's output in unit order"
    );
    let missing = fleet
        .cli(&leader, &["logs", &batch, "--allocation", "nope"])
        .await;
    assert!(!missing.success);
    assert!(
        missing.stderr.contains("no allocation nope"),
        "{}",
        missing.stderr
    );

    // --follow on a running unit: lines arrive as they are printed; the stream ends with it. The
    // unit prints `ready`, then waits for a file the test creates once `ready` came through.
    let ticker = fleet
        .submit(serde_json::json!({
            "name": "ticker", "kind": "batch",
            "command": ["sh", "-c", "echo ready; n=0; while [ ! -e go ] && [ $n -lt 600 ]; do sleep 0.05; n=$((n+1)); done; i=1; while [ $i -le 20 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done"],
            "resources": { "cpus": 0.1, "memory": "32MiB" },
            "batch": { "shards": 1 }
        }))
        .await;
    let job = fleet
        .wait_job(&ticker, "running", |job| {
            job.allocations.iter().any(|a| a.state == "running")
        })
        .await;
    let (allocation, agent) = (
        job.allocations[0].id.clone(),
        job.allocations[0].agent.clone(),
    );
    let mut follow = tokio::process::Command::from(fleet.cli_command(
        &follower,
        &["logs", &ticker, "--allocation", &allocation, "--follow"],
    ));
    let mut follow = follow
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the first line while the unit runs")
        .unwrap();
    assert_eq!(first.as_deref(), Some("ready"));
    let go = fleet
        .agent_dir(&fleet.agent_name(&agent))
        .join("allocations")
        .join(&allocation)
        .join("go");
    std::fs::write(go, b"").unwrap();
    let mut arrivals = Vec::new();
    let followed = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            arrivals.push((Instant::now(), line));
        }
        follow.wait().await.unwrap()
    };
    let status = tokio::time::timeout(Duration::from_secs(30), followed)
        .await
        .expect("the follow to end with the unit");
    assert!(status.success());
    let received: Vec<&str> = arrivals.iter().map(|(_, line)| line.as_str()).collect();
    let printed: Vec<String> = (1..=20).map(|i| format!("tick {i}")).collect();
    assert_eq!(received, printed);
    let spread = arrivals.last().unwrap().0 - arrivals[0].0;
    assert!(
        spread >= Duration::from_millis(800),
        "lines arrived as they were printed (2 s), not all at the end: over {spread:?}"
    );
    fleet
        .wait_job(&ticker, "succeeded", |job| job.state == "succeeded")
        .await;

    // A serving job of two replicas, each a coordinator answering /healthz on its PORT.
    let binary = env!("CARGO_BIN_EXE_gantry");
    let serving = fleet
        .submit(serde_json::json!({
            "name": "echo", "kind": "serving",
            "command": ["sh", "-c", format!("echo $$ > pid; exec '{binary}' coordinator --init --data-dir ./replica --listen 127.0.0.1:0 --http 127.0.0.1:$PORT")],
            "resources": { "cpus": 0.1, "memory": "64MiB" },
            "serving": { "replicas": 2, "health": "/healthz" }
        }))
        .await;
    let job = fleet
        .wait_job(&serving, "two healthy replicas", |job| {
            job.allocations
                .iter()
                .filter(|a| a.state == "healthy")
                .count()
                == 2
        })
        .await;
    let replicas: Vec<String> = job.allocations.iter().map(|a| a.id.clone()).collect();
    for api in [&follower, &leader] {
        eventually(
            "the gateway to route to both replicas",
            Duration::from_secs(10),
            || async {
                let endpoints: Vec<EndpointView> = fleet.get_json(api, "/v1/endpoints").await?;
                let echo = endpoints.iter().find(|e| e.name == "echo")?;
                (echo.replicas.iter().filter(|r| r.healthy).count() == 2).then_some(())
            },
        )
        .await;
        let mut served: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..10 {
            let (status, replica, body) = fleet
                .through_gateway(api, "/serve/echo/healthz", None)
                .await;
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("ok"), "{body}");
            *served.entry(replica.unwrap()).or_default() += 1;
        }
        assert_eq!(
            served.keys().collect::<Vec<_>>(),
            replicas.iter().collect::<Vec<_>>(),
            "requests through {api} spread over both replicas: {served:?}"
        );
        // The replica's own answers pass through, and the cluster's admin token does not.
        let (status, _, body) = fleet
            .through_gateway(api, "/serve/echo/v1/jobs?stale=true", Some(&fleet.token))
            .await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("missing bearer token"), "{body}");
    }
    let (status, _, body) = fleet.through_gateway(&leader, "/serve/nope/", None).await;
    assert_eq!(status, 404, "{body}");
    // A body over the limit is refused from its declared length, before it is sent.
    let too_large = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(&leader).await.unwrap();
        let head = format!(
            "POST /serve/echo/healthz HTTP/1.1\r\nHost: {leader}\r\nContent-Length: {}\r\n\r\n",
            9 << 20
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&answer[..n]).into_owned()
    };
    assert!(too_large.starts_with("HTTP/1.1 413"), "{too_large}");

    let listed = fleet.cli(&follower, &["endpoints"]).await;
    assert!(listed.success, "{}", listed.stderr);
    let table = text(&listed.stdout);
    assert!(table.contains("/serve/echo/"), "{table}");
    for replica in &replicas {
        let row = table
            .lines()
            .find(|l| l.contains(replica.as_str()))
            .unwrap();
        assert!(
            row.contains("127.0.0.1:") && row.contains("healthy"),
            "{table}"
        );
    }
    let json = fleet.cli(&leader, &["endpoints", "-o", "json"]).await;
    let endpoints: Vec<EndpointView> = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0].job, serving);

    // One replica killed: the gateway keeps answering from the other.
    let victim = &job.allocations[0];
    let pid_file = fleet
        .agent_dir(&fleet.agent_name(&victim.agent))
        .join("allocations")
        .join(&victim.id)
        .join("pid");
    let pid = std::fs::read_to_string(pid_file).unwrap();
    let killed = std::process::Command::new("sh")
        .args(["-c", &format!("kill -9 {}", pid.trim())])
        .status()
        .unwrap();
    assert!(killed.success());
    for i in 0..20 {
        let api = if i % 2 == 0 { &leader } else { &follower };
        let (status, replica, body) = fleet
            .through_gateway(api, "/serve/echo/healthz", None)
            .await;
        assert_eq!(status, 200, "request {i} after the kill: {body}");
        assert_ne!(replica.as_deref(), Some(victim.id.as_str()));
    }

    // The logs of an allocation on a killed agent: a clear refusal naming the agent.
    let (shard, agent) = (&allocations[0].id, allocations[0].agent.clone());
    let name = fleet.agent_name(&agent);
    let mut guard = fleet.agents.remove(&name).unwrap();
    guard.0.kill().unwrap(); // SIGKILL: no goodbye to the coordinator
    guard.0.wait().unwrap();
    let refused = fleet
        .cli(&follower, &["logs", &batch, "--allocation", shard])
        .await;
    assert!(!refused.success);
    assert!(
        refused.stderr.contains("503") && refused.stderr.contains(&agent),
        "{}",
        refused.stderr
    );
    eventually(
        "the killed agent to be down",
        Duration::from_secs(15),
        || async {
            let nodes: Vec<serde_json::Value> = fleet.get_json(&leader, "/v1/nodes").await?;
            nodes
                .iter()
                .any(|n| n["agent"] == agent.as_str() && n["status"] == "down")
                .then_some(())
        },
    )
    .await;
    let response = fleet
        .http
        .get(format!(
            "http://{leader}/v1/jobs/{batch}/logs?allocation={shard}"
        ))
        .bearer_auth(&fleet.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&agent) && message.contains("is down"),
        "{message}"
    );
}
