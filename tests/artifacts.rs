//! Artifacts and the digest policy, with the real binary: three coordinators and one agent (the
//! process runtime) as separate processes. A training job's declared output is stored, copied to
//! every coordinator, and placed in the input directory of a job that names it; a unit that exits
//! 0 without its declared output fails and says why; the cluster policy refuses tag-only images.

mod common;

use common::*;
use gantry_coordinator::api::types::JobView;
use std::path::PathBuf;
use std::time::Duration;

struct Setup {
    dir: tempfile::TempDir,
    http: Vec<String>,
    token: String,
    _children: Vec<ChildGuard>,
    client: reqwest::Client,
}

impl Setup {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<(String, String)> = (0..3)
            .map(|_| {
                (
                    format!("127.0.0.1:{}", free_udp_port()),
                    format!("127.0.0.1:{}", free_tcp_port()),
                )
            })
            .collect();
        let root = dir.path().to_path_buf();
        let launch = |i: usize, join: Option<String>| {
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
                .arg(root.join(format!("c{i}")));
            match join {
                Some(join) => command.args(["--join", &join]),
                None => command.arg("--init"),
            };
            spawn_logged(command, &root.join(format!("c{i}.log")))
        };
        let mut children = vec![launch(0, None)];
        let token_path = dir.path().join("c0/admin.token");
        let token = eventually("the admin token", Duration::from_secs(20), || {
            let token_path = token_path.clone();
            async move {
                std::fs::read_to_string(&token_path)
                    .ok()
                    .filter(|t| !t.is_empty())
            }
        })
        .await;
        let mut setup = Self {
            http: nodes.iter().map(|n| n.1.clone()).collect(),
            dir,
            token,
            _children: Vec::new(),
            client: reqwest::Client::new(),
        };
        let coordinator_token = setup.new_token("coordinator").await;
        for i in 1..3 {
            children.push(launch(
                i,
                Some(format!("{coordinator_token}@{}", nodes[0].0)),
            ));
            eventually(
                &format!("{} voters", i + 1),
                Duration::from_secs(40),
                || async {
                    let cluster = setup.get(0, "/v1/cluster").await?;
                    let voters = cluster["members"]
                        .as_array()?
                        .iter()
                        .filter(|m| m["role"] == "voter")
                        .count();
                    (voters == i + 1).then_some(())
                },
            )
            .await;
        }
        let agent_token = setup.new_token("agent").await;
        let config = setup.dir.path().join("agent.toml");
        std::fs::write(&config, "name = \"worker\"\nallow_process = true\n").unwrap();
        let mut agent = gantry();
        agent
            .args([
                "agent",
                "--coordinator",
                &nodes[0].0,
                "--join",
                &agent_token,
            ])
            .arg("--data-dir")
            .arg(setup.dir.path().join("agent"))
            .arg("--config")
            .arg(&config);
        children.push(spawn_logged(agent, &setup.dir.path().join("agent.log")));
        setup._children = children;
        eventually("a ready agent", Duration::from_secs(30), || async {
            let nodes = setup.get(0, "/v1/nodes").await?;
            nodes
                .as_array()?
                .iter()
                .any(|n| n["status"] == "ready")
                .then_some(())
        })
        .await;
        setup
    }

    async fn get(&self, node: usize, path: &str) -> Option<serde_json::Value> {
        let response = self
            .client
            .get(format!("http://{}{path}", self.http[node]))
            .bearer_auth(&self.token)
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    async fn new_token(&self, role: &str) -> String {
        eventually(
            &format!("a {role} token"),
            Duration::from_secs(20),
            || async {
                let response = self
                    .client
                    .post(format!("http://{}/v1/tokens", self.http[0]))
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

    /// Runs the CLI against every coordinator; its status, stdout and stderr.
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let output = gantry()
            .args(args)
            .env("GANTRY_API", self.http.join(","))
            .env("GANTRY_TOKEN", &self.token)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    fn submit(&self, name: &str, spec: serde_json::Value) -> Result<String, String> {
        let path = self.dir.path().join(format!("{name}.json"));
        std::fs::write(&path, spec.to_string()).unwrap();
        let (ok, stdout, stderr) = self.cli(&["submit", path.to_str().unwrap()]);
        if ok {
            Ok(stdout.trim().to_string())
        } else {
            Err(stderr)
        }
    }

    async fn wait_final(&self, id: &str) -> JobView {
        eventually(
            &format!("job {id} to end"),
            Duration::from_secs(60),
            || async {
                let job: JobView =
                    serde_json::from_value(self.get(0, &format!("/v1/jobs/{id}")).await?).ok()?;
                ["succeeded", "failed", "cancelled"]
                    .contains(&job.state.as_str())
                    .then_some(job)
            },
        )
        .await
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

const MODEL: &str = r#"{"weights":[0.5,-1.25],"bias":0.1}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_feed_inputs_and_reach_every_coordinator() {
    let setup = Setup::start().await;

    let train = setup
        .submit(
            "train",
            serde_json::json!({
                "name": "train", "kind": "training",
                "command": ["/bin/sh", "-c", format!("printf '%s' '{MODEL}' > \"$GANTRY_OUTPUT_DIR/model.json\"")],
                "resources": { "cpus": 0.1, "memory": "64MiB" },
                "outputs": ["model.json"],
            }),
        )
        .unwrap();
    let trained = setup.wait_final(&train).await;
    assert_eq!(trained.state, "succeeded", "{trained:?}");
    assert_eq!(trained.artifacts.len(), 1, "{trained:?}");
    assert_eq!(trained.artifacts[0].name, "model.json");
    assert_eq!(trained.artifacts[0].size_bytes, MODEL.len() as u64);

    // Every coordinator ends up holding the bytes, checked against their checksum.
    let sha = trained.artifacts[0].sha256.clone();
    for node in 0..3 {
        let data_dir = setup.path(&format!("c{node}/artifacts/{sha}"));
        eventually(
            &format!("coordinator {node} to hold the model"),
            Duration::from_secs(20),
            || {
                let data_dir = data_dir.clone();
                async move {
                    std::fs::read(&data_dir)
                        .ok()
                        .filter(|d| d == MODEL.as_bytes())
                }
            },
        )
        .await;
        let out = setup.path(&format!("model-{node}.json"));
        let (ok, _, stderr) = setup.cli(&[
            "artifacts",
            &train,
            "model.json",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{stderr}");
        assert_eq!(std::fs::read_to_string(&out).unwrap(), MODEL);
    }
    let (ok, listing, _) = setup.cli(&["artifacts", &train]);
    assert!(
        ok && listing.contains("model.json") && listing.contains(&sha),
        "{listing}"
    );

    // A consumer names it by the producer's name and finds the same bytes in its input dir.
    let check = format!("test \"$(cat \"$GANTRY_INPUT_DIR/model.json\")\" = '{MODEL}'");
    let infer = setup
        .submit(
            "infer",
            serde_json::json!({
                "name": "infer", "kind": "batch",
                "command": ["/bin/sh", "-c", check],
                "resources": { "cpus": 0.1, "memory": "64MiB" },
                "batch": { "shards": 2 },
                "inputs": ["train/model.json"],
            }),
        )
        .unwrap();
    let inferred = setup.wait_final(&infer).await;
    assert_eq!(inferred.state, "succeeded", "{inferred:?}");
    assert_eq!(inferred.inputs.len(), 1);
    assert_eq!(inferred.inputs[0].job, train);
    assert_eq!(inferred.inputs[0].sha256, sha);

    // Inputs that name nothing are refused at submit, naming the field.
    let err = setup
        .submit(
            "bad-input",
            serde_json::json!({ "name": "x", "kind": "batch", "command": ["true"], "inputs": ["train/weights.bin"] }),
        )
        .unwrap_err();
    assert!(
        err.contains("inputs[0]") && err.contains("weights.bin"),
        "{err}"
    );

    // A unit that exits 0 without its declared output fails, and says which output.
    let forgetful = setup
        .submit(
            "forgetful",
            serde_json::json!({
                "name": "forgetful", "kind": "batch", "command": ["true"],
                "resources": { "cpus": 0.1, "memory": "64MiB" },
                "batch": { "max_retries": 0 },
                "outputs": ["result.json"],
            }),
        )
        .unwrap();
    let failed = setup.wait_final(&forgetful).await;
    assert_eq!(failed.state, "failed");
    let reason = failed.allocations[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("result.json"), "{reason}");

    // The digest policy: tags refused at submit with the field named; pinned images accepted.
    let (ok, _, stderr) = setup.cli(&["policy", "set", "--require-digest", "true"]);
    assert!(ok, "{stderr}");
    let (ok, shown, _) = setup.cli(&["policy", "show"]);
    assert!(ok && shown.contains("\"require_digest\": true"), "{shown}");
    let err = setup
        .submit(
            "tagged",
            serde_json::json!({ "name": "tagged", "kind": "batch", "image": "trainer:latest" }),
        )
        .unwrap_err();
    assert!(
        err.contains("field `image`") && err.contains("pinned by digest"),
        "{err}"
    );
    let pinned = format!("trainer@sha256:{}", "c".repeat(64));
    setup
        .submit(
            "pinned",
            serde_json::json!({ "name": "pinned", "kind": "batch", "image": pinned }),
        )
        .unwrap();
}
