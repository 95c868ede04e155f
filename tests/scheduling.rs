//! Scheduling with real processes: a coordinator and three agents (declared GPUs, the process
//! runtime allowed) as separate processes of the real binary run training, batch and serving
//! jobs; an agent killed with SIGKILL has its work placed elsewhere and runs nothing twice when
//! it comes back; a failing shard exhausts its retries; an unplaceable job says why.

mod common;

use common::*;
use gantry_coordinator::api::types::JobView;
use std::path::PathBuf;
use std::time::Duration;

struct Fleet {
    dir: tempfile::TempDir,
    api: String,
    quic: String,
    token: String,
    _coordinator: ChildGuard,
    agents: Vec<Option<ChildGuard>>,
    http: reqwest::Client,
    serving_ports: (u16, u16),
}

const AGENTS: [(&str, &str); 3] = [
    ("onprem", "name = \"onprem\"\nsite = \"onprem-a\"\nkind = \"on-prem\"\ncost_per_gpu_hour = 1.0\nallow_process = true\nserving_port_min = PORTMIN\nserving_port_max = PORTMAX\n[[gpus]]\nmodel = \"A100\"\nmemory = \"80GiB\"\ncount = 4\n"),
    ("cloud", "name = \"cloud\"\nsite = \"cloud-b\"\nkind = \"cloud\"\ncost_per_gpu_hour = 3.0\nallow_process = true\nserving_port_min = PORTMIN\nserving_port_max = PORTMAX\n[[gpus]]\nmodel = \"A100\"\nmemory = \"80GiB\"\ncount = 4\n"),
    ("cpu", "name = \"cpu\"\nsite = \"onprem-a\"\nkind = \"on-prem\"\ncost_per_cpu_hour = 0.01\nallow_process = true\nserving_port_min = PORTMIN\nserving_port_max = PORTMAX\n"),
];

impl Fleet {
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
            api,
            quic,
            token,
            _coordinator: coordinator,
            agents: Vec::new(),
            http: reqwest::Client::new(),
            serving_ports: {
                // A port the kernel just handed out, and the few after it.
                let base = free_tcp_port().min(65_000);
                (base, base + 20)
            },
        };
        let join = eventually("an agent join token", Duration::from_secs(20), || async {
            let response = fleet
                .request(
                    reqwest::Method::POST,
                    "/v1/tokens",
                    Some(serde_json::json!({"role": "agent"})),
                )
                .await?;
            response["token"].as_str().map(str::to_string)
        })
        .await;
        for (name, config) in AGENTS {
            let agent = fleet.start_agent(name, config, Some(&join));
            fleet.agents.push(Some(agent));
        }
        eventually("three ready agents", Duration::from_secs(30), || async {
            let nodes = fleet
                .request(reqwest::Method::GET, "/v1/nodes", None)
                .await?;
            let ready = nodes
                .as_array()?
                .iter()
                .filter(|n| n["status"] == "ready")
                .count();
            (ready == 3).then_some(())
        })
        .await;
        fleet
    }

    fn start_agent(&self, name: &str, config: &str, token: Option<&str>) -> ChildGuard {
        let config_path = self.dir.path().join(format!("{name}.toml"));
        // Serving ports from a range no other test run on this host is using.
        let config = config
            .replace("PORTMIN", &self.serving_ports.0.to_string())
            .replace("PORTMAX", &self.serving_ports.1.to_string());
        std::fs::write(&config_path, config).unwrap();
        let mut command = gantry();
        command
            .args(["agent", "--coordinator", &self.quic])
            .arg("--data-dir")
            .arg(self.agent_dir(name))
            .arg("--config")
            .arg(&config_path);
        if let Some(token) = token {
            command.args(["--join", token]);
        }
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = command
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        ChildGuard(child)
    }

    fn agent_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("agent-{name}"))
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Option<serde_json::Value> {
        let mut request = self
            .http
            .request(method, format!("http://{}{path}", self.api))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.ok()?;
        response.json().await.ok()
    }

    async fn submit(&self, spec: serde_json::Value) -> String {
        let answer = self
            .request(reqwest::Method::POST, "/v1/jobs", Some(spec.clone()))
            .await
            .expect("submit answers");
        answer["id"]
            .as_str()
            .unwrap_or_else(|| panic!("submit {spec}: {answer}"))
            .to_string()
    }

    async fn job(&self, id: &str) -> JobView {
        let value = self
            .request(reqwest::Method::GET, &format!("/v1/jobs/{id}"), None)
            .await
            .unwrap();
        serde_json::from_value(value).unwrap()
    }

    async fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> JobView {
        eventually(&format!("job {id} to be {state}"), timeout, || async {
            let job = self.job(id).await;
            assert!(
                state == job.state
                    || !["succeeded", "failed", "cancelled"].contains(&job.state.as_str()),
                "job {id} ended {}: {job:?}",
                job.state
            );
            (job.state == state).then_some(job)
        })
        .await
    }

    /// The stdout an allocation left in its agent's work directory.
    fn stdout(&self, agent_id: &str, allocation: &str) -> String {
        let name = AGENTS
            .iter()
            .map(|(name, _)| *name)
            .find(|name| self.agent_id(name).as_deref() == Some(agent_id))
            .unwrap_or_else(|| panic!("no agent has id {agent_id}"));
        let path = self
            .agent_dir(name)
            .join("allocations")
            .join(allocation)
            .join("stdout.log");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    fn agent_id(&self, name: &str) -> Option<String> {
        gantry_agent::credentials::AgentCredentials::load(&self.agent_dir(name))
            .ok()
            .flatten()
            .map(|c| c.agent_id)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_batch_and_serving_run_as_real_processes() {
    let fleet = Fleet::start().await;

    // Training: a gang of two 2-GPU workers, each told its rank and the rendezvous.
    let training = fleet
        .submit(serde_json::json!({
            "name": "train", "kind": "training",
            "command": ["sh", "-c", "echo rank=$RANK world=$WORLD_SIZE node_rank=$NODE_RANK master=$MASTER_ADDR:$MASTER_PORT gpus=$CUDA_VISIBLE_DEVICES"],
            "resources": { "gpus": 2, "cpus": 0.1, "memory": "64MiB" },
            "training": { "workers": 2 }
        }))
        .await;
    let job = fleet
        .wait_state(&training, "succeeded", Duration::from_secs(60))
        .await;
    assert_eq!(job.allocations.len(), 2, "{job:?}");
    let mut ranks: Vec<String> = job
        .allocations
        .iter()
        .map(|a| fleet.stdout(&a.agent, &a.id))
        .collect();
    ranks.sort();
    assert!(ranks[0].starts_with("rank=0 world=2"), "{ranks:?}");
    assert!(ranks[1].starts_with("rank=1 world=2"), "{ranks:?}");
    assert!(
        ranks
            .iter()
            .all(|r| r.contains(":29500") && r.contains("gpus=")),
        "{ranks:?}"
    );
    let sites: std::collections::BTreeSet<&str> = job
        .allocations
        .iter()
        .map(|a| {
            if a.agent == fleet.agent_id("cloud").unwrap() {
                "cloud-b"
            } else {
                "onprem-a"
            }
        })
        .collect();
    assert_eq!(sites.len(), 1, "a gang stays on one site: {job:?}");
    assert!(job.allocations.iter().all(|a| a.gpus.len() == 2));

    // Batch: four shards, two at a time, each told its index.
    let batch = fleet
        .submit(serde_json::json!({
            "name": "infer", "kind": "batch",
            "command": ["sh", "-c", "echo shard=$SHARD_INDEX of=$SHARD_COUNT"],
            "resources": { "cpus": 0.1, "memory": "32MiB" },
            "batch": { "shards": 4, "parallelism": 2 }
        }))
        .await;
    let job = fleet
        .wait_state(&batch, "succeeded", Duration::from_secs(60))
        .await;
    assert_eq!((job.progress.succeeded, job.progress.total), (4, 4));
    let mut shards: Vec<String> = job
        .allocations
        .iter()
        .map(|a| fleet.stdout(&a.agent, &a.id).trim().to_string())
        .collect();
    shards.sort();
    assert_eq!(
        shards,
        vec![
            "shard=0 of=4",
            "shard=1 of=4",
            "shard=2 of=4",
            "shard=3 of=4"
        ]
    );

    // Serving: two replicas spread over nodes, each with its own PORT, ready once their health
    // check answers 2xx; cancel stops them.
    let serving = fleet
        .submit(serde_json::json!({
            "name": "serve", "kind": "serving",
            "command": ["sh", "-c", "exec python3 -m http.server --bind 127.0.0.1 $PORT"],
            "resources": { "cpus": 0.1, "memory": "64MiB" },
            "serving": { "replicas": 2, "health": "/" }
        }))
        .await;
    let job = eventually("two healthy replicas", Duration::from_secs(60), || async {
        let job = fleet.job(&serving).await;
        (job.allocations
            .iter()
            .filter(|a| a.state == "healthy")
            .count()
            == 2)
            .then_some(job)
    })
    .await;
    let nodes: std::collections::BTreeSet<&String> =
        job.allocations.iter().map(|a| &a.agent).collect();
    assert_eq!(nodes.len(), 2, "replicas spread over nodes: {job:?}");
    assert!(job.allocations.iter().all(|a| a.port.is_some()));

    // A new spec rolls the replicas over, one at a time (max_surge 1, max_unavailable 0).
    let updated = fleet
        .request(
            reqwest::Method::PUT,
            &format!("/v1/jobs/{serving}"),
            Some(serde_json::json!({
                "name": "serve", "kind": "serving", "env": { "VERSION": "2" },
                "command": ["sh", "-c", "exec python3 -m http.server --bind 127.0.0.1 $PORT"],
                "resources": { "cpus": 0.1, "memory": "64MiB" },
                "serving": { "replicas": 2, "health": "/", "max_surge": 1, "max_unavailable": 0 }
            })),
        )
        .await
        .unwrap();
    assert_eq!(updated["generation"], 1, "{updated}");
    eventually(
        "the replicas to roll over to generation 1",
        Duration::from_secs(90),
        || async {
            let job = fleet.job(&serving).await;
            let live: Vec<_> = job
                .allocations
                .iter()
                .filter(|a| !["succeeded", "failed", "lost"].contains(&a.state.as_str()))
                .collect();
            let healthy_now = live.iter().filter(|a| a.state == "healthy").count();
            assert!(
                healthy_now >= 1,
                "a rollout with max_unavailable 0 keeps replicas serving: {job:?}"
            );
            (live.len() == 2
                && live
                    .iter()
                    .all(|a| a.generation == 1 && a.state == "healthy"))
            .then_some(())
        },
    )
    .await;
    fleet
        .request(
            reqwest::Method::DELETE,
            &format!("/v1/jobs/{serving}"),
            None,
        )
        .await
        .unwrap();
    eventually("the replicas to stop", Duration::from_secs(30), || async {
        let job = fleet.job(&serving).await;
        job.allocations
            .iter()
            .all(|a| ["succeeded", "failed", "lost"].contains(&a.state.as_str()))
            .then_some(())
    })
    .await;

    // A shard that always fails uses its retries, then fails the job, saying why.
    let failing = fleet
        .submit(serde_json::json!({
            "name": "broken", "kind": "batch", "command": ["sh", "-c", "exit 3"],
            "resources": { "cpus": 0.1, "memory": "32MiB" }, "batch": { "shards": 1, "max_retries": 1 }
        }))
        .await;
    let job = fleet
        .wait_state(&failing, "failed", Duration::from_secs(60))
        .await;
    assert_eq!(job.allocations.len(), 2, "one try and one retry: {job:?}");
    assert!(job.allocations.iter().all(|a| a.exit_code == Some(3)));
    assert!(
        job.failure
            .as_deref()
            .unwrap_or_default()
            .contains("max_retries"),
        "{job:?}"
    );

    // Unplaceable: no node has an H200; explain says which filter removed the nodes.
    let waiting = fleet
        .submit(serde_json::json!({
            "name": "big", "kind": "training", "command": ["true"],
            "resources": { "gpus": 2, "gpu_model": "H200" }, "training": { "workers": 1 }
        }))
        .await;
    let explain = eventually("an explanation", Duration::from_secs(20), || async {
        let explain = fleet
            .request(
                reqwest::Method::GET,
                &format!("/v1/jobs/{waiting}/explain"),
                None,
            )
            .await?;
        (!explain["units"].as_array()?.is_empty()).then_some(explain)
    })
    .await;
    let unit = &explain["units"][0];
    assert_eq!(unit["nodes_total"], 3, "{explain}");
    let filtered = unit["filtered"].as_array().unwrap();
    assert!(
        filtered
            .iter()
            .any(|f| f["filter"] == "gpu_model" && f["nodes"].as_u64().unwrap() >= 2),
        "{explain}"
    );
    assert_eq!(fleet.job(&waiting).await.state, "pending");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_on_a_killed_agent_moves_and_nothing_runs_twice() {
    let mut fleet = Fleet::start().await;
    // Long shards that only the GPU agents can take (one GPU each), so their placement is known.
    let batch = fleet
        .submit(serde_json::json!({
            "name": "long", "kind": "batch",
            "command": ["sh", "-c", "echo start shard=$SHARD_INDEX; sleep 3; echo done"],
            "resources": { "gpus": 1, "cpus": 0.1, "memory": "32MiB" },
            "batch": { "shards": 2, "parallelism": 2 }
        }))
        .await;
    let job = eventually("both shards running", Duration::from_secs(60), || async {
        let job = fleet.job(&batch).await;
        (job.allocations
            .iter()
            .filter(|a| a.state == "running")
            .count()
            == 2)
            .then_some(job)
    })
    .await;
    let victim_id = job.allocations[0].agent.clone();
    let victim = AGENTS
        .iter()
        .position(|(name, _)| fleet.agent_id(name).as_deref() == Some(victim_id.as_str()))
        .unwrap();
    let mut guard = fleet.agents[victim].take().unwrap();
    guard.0.kill().unwrap(); // SIGKILL: the agent's processes die with it
    guard.0.wait().unwrap();

    let job = fleet
        .wait_state(&batch, "succeeded", Duration::from_secs(60))
        .await;
    let lost: Vec<_> = job
        .allocations
        .iter()
        .filter(|a| a.state == "lost")
        .collect();
    assert!(
        !lost.is_empty(),
        "the killed agent's shard was lost: {job:?}"
    );
    assert!(lost.iter().all(|a| a.agent == victim_id));
    let succeeded: Vec<u32> = job
        .allocations
        .iter()
        .filter(|a| a.state == "succeeded")
        .map(|a| a.unit)
        .collect();
    assert_eq!(
        succeeded.len(),
        2,
        "each shard succeeded exactly once: {job:?}"
    );
    assert!(
        job.allocations
            .iter()
            .filter(|a| a.state == "succeeded")
            .all(|a| a.agent != victim_id),
        "{job:?}"
    );

    // Back with its stored certificate: it runs nothing of the old work again.
    let (name, config) = AGENTS[victim];
    fleet.agents[victim] = Some(fleet.start_agent(name, config, None));
    eventually(
        "the agent to be ready again",
        Duration::from_secs(30),
        || async {
            let nodes = fleet
                .request(reqwest::Method::GET, "/v1/nodes", None)
                .await?;
            nodes
                .as_array()?
                .iter()
                .any(|n| n["agent"] == victim_id.as_str() && n["status"] == "ready")
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = fleet.job(&batch).await;
    assert_eq!(
        after.allocations.len(),
        job.allocations.len(),
        "no allocation was added after the job ended: {after:?}"
    );
    assert_eq!(after.state, "succeeded");
}
