//! The same job file, unchanged, runs on a Docker agent and on a Kubernetes agent: a coordinator
//! as a process, first an agent with `runtime = "auto"` on this host (Docker answers, no cluster
//! is configured: it picks Docker and says why), then, once that agent is gone, an agent whose
//! `KUBECONFIG` names a fake Kubernetes API server (auto picks Kubernetes). Each runs the job's
//! shards its own way; the job succeeds both times. Needs the Docker daemon.

mod common;
#[path = "common/fake_kube.rs"]
mod fake_kube;

use common::images::test_image;
use common::*;
use fake_kube::{node, FakeKube, Kind};
use gantry_coordinator::api::types::JobView;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

struct Coordinator {
    dir: tempfile::TempDir,
    quic: String,
    http: String,
    token: String,
    _process: ChildGuard,
}

impl Coordinator {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let started = CoordinatorProcess::start(dir.path()).await;
        Self {
            dir,
            quic: started.quic,
            http: started.http,
            token: started.token,
            _process: started.process,
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let output = gantry()
            .args(args)
            .env("GANTRY_API", &self.http)
            .env("GANTRY_TOKEN", &self.token)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "gantry {args:?}: {stderr}");
        String::from_utf8(output.stdout).unwrap()
    }

    fn agent(&self, name: &str, config: &str, env: &[(&str, &std::path::Path)]) -> ChildGuard {
        let token = self.cli(&["token", "create", "--role", "agent"]);
        let config_path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&config_path, config).unwrap();
        let mut command = gantry();
        command
            .args(["agent", "--coordinator", &self.quic, "--join", token.trim()])
            .arg("--data-dir")
            .arg(self.dir.path().join(name))
            .arg("--config")
            .arg(&config_path);
        for (key, value) in env {
            command.env(key, value);
        }
        spawn_logged(command, &self.dir.path().join(format!("{name}.log")))
    }

    fn job(&self, id: &str) -> JobView {
        serde_json::from_str(&self.cli(&["status", id, "-o", "json"])).unwrap()
    }

    async fn wait_state(&self, id: &str, state: &str) -> JobView {
        eventually(&format!("job {id} to be {state}"), WAIT, || async {
            let job = self.job(id);
            assert!(job.state != "failed", "{job:?}");
            (job.state == state).then_some(job)
        })
        .await
    }

    async fn ready_runtime(&self, runtime: &str) -> String {
        eventually(&format!("a ready {runtime} agent"), WAIT, || async {
            let nodes: serde_json::Value =
                serde_json::from_str(&self.cli(&["nodes", "-o", "json"])).ok()?;
            nodes.as_array()?.iter().find_map(|n| {
                let ready = n["status"] == "ready" && n["runtimes"][0] == runtime;
                ready.then(|| {
                    n["runtime_details"][0]["detail"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
            })
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_job_file_runs_on_docker_and_on_kubernetes() {
    let image = test_image();
    let coordinator = Coordinator::start().await;
    let job_file = coordinator.dir.path().join("shards.yaml");
    std::fs::write(
        &job_file,
        format!(
            "name: shards\nkind: batch\nimage: {}\ncommand: [\"sh\", \"-c\", \"echo shard $SHARD_INDEX\"]\nresources: {{ cpus: 0.25, memory: 64MiB }}\nbatch: {{ shards: 2 }}\n",
            image.tag
        ),
    )
    .unwrap();
    let file = job_file.to_str().unwrap();

    // A host where Docker answers and no cluster is configured: auto picks Docker.
    let empty_kubeconfig = coordinator.dir.path().join("no-kubeconfig");
    let docker_agent = coordinator.agent(
        "docker-host",
        "name = \"docker-host\"\n",
        &[
            ("KUBECONFIG", &empty_kubeconfig),
            ("HOME", coordinator.dir.path()),
        ],
    );
    let detail = coordinator.ready_runtime("docker").await;
    assert!(detail.contains("runtime = auto chose Docker"), "{detail}");
    let on_docker = coordinator.cli(&["submit", file]).trim().to_string();
    let job = coordinator.wait_state(&on_docker, "succeeded").await;
    assert_eq!(job.allocations.len(), 2);
    for allocation in &job.allocations {
        assert_eq!(
            allocation.image.as_deref(),
            Some(image.id.as_str()),
            "{allocation:?}"
        );
    }
    drop(docker_agent);

    // A cluster: auto picks Kubernetes; the same file becomes one Kubernetes Job per shard.
    let fake = FakeKube::start().await;
    fake.add_node(node("node-a", "4", "16Gi", 0, serde_json::json!({})));
    let kubeconfig = coordinator.dir.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig);
    let _kubernetes_agent = coordinator.agent(
        "cluster",
        "name = \"cluster\"\n",
        &[
            ("KUBECONFIG", &kubeconfig),
            ("HOME", coordinator.dir.path()),
        ],
    );
    let detail = coordinator.ready_runtime("kubernetes").await;
    assert!(
        detail.contains("runtime = auto chose Kubernetes"),
        "{detail}"
    );
    // The Docker agent must be down first, or the job could be placed on it again.
    eventually("the Docker agent to be down", WAIT, || async {
        let nodes: serde_json::Value =
            serde_json::from_str(&coordinator.cli(&["nodes", "-o", "json"])).ok()?;
        nodes
            .as_array()?
            .iter()
            .any(|n| n["name"] == "docker-host" && n["status"] == "down")
            .then_some(())
    })
    .await;
    let on_kubernetes = coordinator.cli(&["submit", file]).trim().to_string();
    let selector = format!("gantry.job={on_kubernetes}");
    let pods = eventually("a pod per shard in the cluster", WAIT, || {
        let pods = fake.names(Kind::Pod, "gantry", &selector);
        async move { (pods.len() == 2).then_some(pods) }
    })
    .await;
    assert_eq!(fake.list(Kind::Job, Some("gantry"), &selector).len(), 2);
    for pod in &pods {
        fake.run_pod("gantry", pod, &image.id, false);
        fake.end_pod("gantry", pod, 0, "Completed");
    }
    let job = coordinator.wait_state(&on_kubernetes, "succeeded").await;
    assert!(
        job.allocations.iter().all(|a| a.node == "node-a"),
        "{:?}",
        job.allocations
    );
}
