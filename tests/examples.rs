//! The shipped job files and the CLI around them: every file in `examples/` is a valid spec and
//! is described in `examples/README.md`; the self-contained examples run for real, as a
//! pipeline, on a coordinator and an agent (separate processes of the real binary, the process
//! runtime allowed), passing the model along as artifacts, never through host paths: training's
//! model.json is stored and downloadable with `gantry artifacts`, four inference shards given it
//! as an input score every row exactly once in their collected prediction files, serving
//! replicas given it answer predictions that match it and stop cleanly on cancel.
//! Along the way: `-o yaml` says what `-o json` says, a missing job exits 3, `gantry new` and
//! `gantry completions` work, and only rank 0 of a training gang writes the model.

mod common;

use common::*;
use gantry_coordinator::api::types::JobView;
use gantry_protocol::jobspec::{parse_spec, JobSpec, SpecFormat};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// Every job file in `examples/` (all but the README), parsed and validated.
fn examples() -> BTreeMap<String, JobSpec> {
    let mut specs = BTreeMap::new();
    for entry in std::fs::read_dir(examples_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == "README.md" {
            continue;
        }
        let format = SpecFormat::from_path(&path)
            .unwrap_or_else(|| panic!("{name}: not .yaml, .yml, .toml or .json"));
        let text = std::fs::read_to_string(&path).unwrap();
        let spec = parse_spec(&text, format).unwrap_or_else(|e| panic!("{name}: {e}"));
        specs.insert(name, spec);
    }
    specs
}

#[test]
fn every_example_is_a_valid_spec_described_in_the_readme() {
    let specs = examples();
    assert!(specs.len() >= 6, "{:?}", specs.keys());
    let readme = std::fs::read_to_string(examples_dir().join("README.md")).unwrap();
    for name in specs.keys() {
        assert!(
            readme.contains(&format!("`{name}`")),
            "examples/README.md does not describe {name}"
        );
    }
    // The fleet examples ask for what their descriptions promise.
    let pretrain = &specs["llm-pretrain-h100.yaml"];
    assert_eq!(pretrain.units(), 4);
    assert_eq!(pretrain.resources.n_gpus, 8);
    assert_eq!(pretrain.resources.gpu_model.as_deref(), Some("H100"));
    let batch = &specs["batch-embeddings.yaml"];
    assert!(batch
        .command
        .iter()
        .any(|a| a.starts_with("/mnt/datasets/")));
    let vllm = &specs["vllm-serving.yaml"];
    assert_eq!(vllm.serving.as_ref().unwrap().health_path, "/health");
}

/// A job file from `examples/` as the API's JSON, as it is shipped.
fn example(name: &str) -> serde_json::Value {
    let spec = examples().remove(name).unwrap();
    serde_json::from_str(&spec.canonical_json()).unwrap()
}

#[test]
fn the_self_contained_examples_pass_the_model_as_artifacts_not_host_paths() {
    let specs = examples();
    for name in [
        "workload-train.yaml",
        "workload-infer.yaml",
        "workload-serve.yaml",
    ] {
        let spec = &specs[name];
        assert!(
            spec.env.keys().all(|key| !key.starts_with("GANTRY_")),
            "{name}: the agent sets GANTRY_INPUT_DIR and GANTRY_OUTPUT_DIR itself: {:?}",
            spec.env
        );
    }
    assert_eq!(specs["workload-train.yaml"].outputs, ["model.json"]);
    assert_eq!(
        specs["workload-infer.yaml"].outputs,
        ["predictions-*.jsonl"]
    );
    for consumer in ["workload-infer.yaml", "workload-serve.yaml"] {
        assert_eq!(
            specs[consumer].inputs,
            ["workload-train/model.json"],
            "{consumer}"
        );
    }
}

struct Fleet {
    dir: tempfile::TempDir,
    api: String,
    token: String,
    http: reqwest::Client,
    /// The coordinator, then the agent; killed when the fleet is dropped.
    processes: Vec<ChildGuard>,
}

impl Fleet {
    /// A coordinator and one agent that allows the process runtime, with the binary under test
    /// first on the agent's PATH, as an installed `gantry` would be.
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let coordinator = CoordinatorProcess::start(dir.path()).await;
        let join = coordinator.join_token("agent").await;
        let quic = coordinator.quic.clone();
        let mut fleet = Fleet {
            dir,
            api: coordinator.http.clone(),
            token: coordinator.token.clone(),
            http: reqwest::Client::new(),
            processes: vec![coordinator.process],
        };
        let port_min = free_tcp_port().min(65_000);
        let config = format!(
            "name = \"cpu\"\nsite = \"onprem-a\"\nallow_process = true\n\
             serving_port_min = {port_min}\nserving_port_max = {}\n",
            port_min + 20
        );
        let config_path = fleet.dir.path().join("agent.toml");
        std::fs::write(&config_path, config).unwrap();
        let bin_dir = Path::new(env!("CARGO_BIN_EXE_gantry")).parent().unwrap();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut command = gantry();
        command
            .args(["agent", "--coordinator", &quic, "--join", &join])
            .arg("--data-dir")
            .arg(fleet.dir.path().join("agent"))
            .arg("--config")
            .arg(&config_path)
            .env("PATH", path);
        let agent = spawn_logged(command, &fleet.dir.path().join("agent.log"));
        fleet.processes.push(agent);
        eventually("a ready agent", Duration::from_secs(30), || async {
            let nodes = fleet
                .request(reqwest::Method::GET, "/v1/nodes", None)
                .await?;
            (nodes.as_array()?.iter().any(|n| n["status"] == "ready")).then_some(())
        })
        .await;
        fleet
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
        request.send().await.ok()?.json().await.ok()
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

    /// Waits for a final state and checks it is `state`, showing the units' output if not.
    async fn wait_done(&self, id: &str, state: &str, timeout: Duration) -> JobView {
        let job = eventually(&format!("job {id} to end"), timeout, || async {
            let job = self.job(id).await;
            ["succeeded", "failed", "cancelled"]
                .contains(&job.state.as_str())
                .then_some(job)
        })
        .await;
        assert_eq!(job.state, state, "{job:?}\n{}", self.outputs(&job));
        job
    }

    /// What the job's units printed, for failure messages.
    fn outputs(&self, job: &JobView) -> String {
        job.allocations
            .iter()
            .map(|a| {
                let dir = self.dir.path().join("agent/allocations").join(&a.id);
                let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
                format!("--- {}\n{}{}", a.id, read("stdout.log"), read("stderr.log"))
            })
            .collect()
    }

    /// Runs the CLI against this fleet.
    fn cli(&self, args: &[&str]) -> std::process::Output {
        gantry()
            .args(args)
            .env("GANTRY_API", &self.api)
            .env("GANTRY_TOKEN", &self.token)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    }
}

/// The probability the model file gives `features`, computed here from its weights.
fn probability(model: &serde_json::Value, features: &[f64]) -> f64 {
    let weights: Vec<f64> = serde_json::from_value(model["weights"].clone()).unwrap();
    let z: f64 = weights
        .iter()
        .zip(features)
        .map(|(w, x)| w * x)
        .sum::<f64>()
        + model["bias"].as_f64().unwrap();
    1.0 / (1.0 + (-z).exp())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_contained_examples_run_as_a_pipeline() {
    let fleet = Fleet::start().await;

    // Train: a gang of two ranks; rank 0 writes model.json, the job's declared output.
    let train = fleet.submit(example("workload-train.yaml")).await;
    let job = fleet
        .wait_done(&train, "succeeded", Duration::from_secs(120))
        .await;
    assert_eq!(job.allocations.len(), 2, "{job:?}");
    let names: Vec<&str> = job.artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["model.json"], "{job:?}");
    // `gantry artifacts` lists it and downloads the bytes its checksum names.
    let listing = fleet.cli(&["artifacts", &train]);
    let listing = String::from_utf8(listing.stdout).unwrap();
    assert!(
        listing.contains("model.json") && listing.contains(&job.artifacts[0].sha256),
        "{listing}"
    );
    let model_path = fleet.dir.path().join("model.json");
    let download = fleet.cli(&[
        "artifacts",
        &train,
        "model.json",
        "--out",
        model_path.to_str().unwrap(),
    ]);
    assert!(download.status.success(), "{download:?}");
    let model_bytes = std::fs::read(&model_path).unwrap();
    assert_eq!(model_bytes.len() as u64, job.artifacts[0].size_bytes);
    let model: serde_json::Value = serde_json::from_slice(&model_bytes).unwrap();
    assert!(model["train_accuracy"].as_f64().unwrap() > 0.9, "{model}");
    assert_eq!(model["n_rows"], 4000);
    let logs = fleet.outputs(&job);
    assert!(logs.contains("epoch   300/300"), "{logs}");
    assert!(logs.contains("rank 1 does not write the model"), "{logs}");

    // The CLI shows the same job as YAML and as JSON; a job that does not exist exits 3.
    let as_yaml = fleet.cli(&["status", &train, "-o", "yaml"]);
    assert!(as_yaml.status.success(), "{as_yaml:?}");
    let from_yaml: JobView = serde_yaml_ng::from_slice(&as_yaml.stdout).unwrap();
    let as_json = fleet.cli(&["status", &train, "-o", "json"]);
    let from_json: JobView = serde_json::from_slice(&as_json.stdout).unwrap();
    assert_eq!(from_yaml, from_json);
    let jobs: Vec<JobView> =
        serde_yaml_ng::from_slice(&fleet.cli(&["jobs", "-o", "yaml"]).stdout).unwrap();
    assert_eq!(jobs.len(), 1);
    let table = String::from_utf8(fleet.cli(&["jobs"]).stdout).unwrap();
    assert!(
        table.contains("succeeded") && table.contains("took "),
        "{table}"
    );
    assert!(
        !table.contains('\x1b'),
        "no colour with NO_COLOR: {table:?}"
    );
    let missing = fleet.cli(&["status", "no-such-job"]);
    assert_eq!(missing.status.code(), Some(3), "{missing:?}");

    // Infer: four shards read the trained model, named by the training job's name, and their
    // four prediction files together score every row exactly once.
    let infer = fleet.submit(example("workload-infer.yaml")).await;
    let job = fleet
        .wait_done(&infer, "succeeded", Duration::from_secs(120))
        .await;
    assert_eq!(job.inputs.len(), 1, "{job:?}");
    assert_eq!(job.inputs[0].job, train);
    assert_eq!(
        job.inputs[0].sha256,
        fleet.job(&train).await.artifacts[0].sha256
    );
    let mut names: Vec<&str> = job.artifacts.iter().map(|a| a.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "predictions-0.jsonl",
            "predictions-1.jsonl",
            "predictions-2.jsonl",
            "predictions-3.jsonl"
        ]
    );
    let mut rows = Vec::new();
    for shard_idx in 0..4 {
        let name = format!("predictions-{shard_idx}.jsonl");
        let download = fleet.cli(&["artifacts", &infer, &name]);
        assert!(download.status.success(), "{download:?}");
        for line in String::from_utf8(download.stdout).unwrap().lines() {
            let prediction: serde_json::Value = serde_json::from_str(line).unwrap();
            let row = prediction["row"].as_u64().unwrap();
            assert_eq!(row % 4, shard_idx, "{name}: {line}");
            rows.push(row);
        }
    }
    rows.sort_unstable();
    assert_eq!(rows, (0..10_000).collect::<Vec<u64>>());

    // Serve: two replicas become healthy on their ports and answer what the model says.
    let serve = fleet.submit(example("workload-serve.yaml")).await;
    let job = eventually("two healthy replicas", Duration::from_secs(60), || async {
        let job = fleet.job(&serve).await;
        assert!(job.state != "failed", "{job:?}\n{}", fleet.outputs(&job));
        (job.allocations
            .iter()
            .filter(|a| a.state == "healthy")
            .count()
            == 2)
            .then_some(job)
    })
    .await;
    let features = [1.0, -1.0, 0.5, 0.0, 1.0, 0.0, 0.0, 1.0];
    for allocation in &job.allocations {
        let port = allocation.port.unwrap();
        let answer: serde_json::Value = fleet
            .http
            .post(format!("http://127.0.0.1:{port}/predict"))
            .json(&serde_json::json!({ "features": features }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let served = answer["probability"].as_f64().unwrap();
        assert!(
            (served - probability(&model, &features)).abs() < 1e-9,
            "{answer}"
        );
        assert_eq!(answer["label"], u8::from(served >= 0.5));
    }
    fleet
        .request(reqwest::Method::DELETE, &format!("/v1/jobs/{serve}"), None)
        .await
        .unwrap();
    let job = eventually("the replicas to stop", Duration::from_secs(30), || async {
        let job = fleet.job(&serve).await;
        job.allocations
            .iter()
            .all(|a| ["succeeded", "failed", "lost"].contains(&a.state.as_str()))
            .then_some(job)
    })
    .await;
    // The agent records a stopped unit as stopped, not its exit code; the server's own last
    // line shows it shut down by itself after SIGTERM rather than being killed.
    for allocation in &job.allocations {
        let stdout = std::fs::read_to_string(
            fleet
                .dir
                .path()
                .join("agent/allocations")
                .join(&allocation.id)
                .join("stdout.log"),
        )
        .unwrap();
        assert!(
            stdout.trim_end().ends_with("stopped"),
            "SIGTERM stops a replica cleanly: {stdout}"
        );
        assert!(
            stdout.contains("POST /predict 200"),
            "one line per request: {stdout}"
        );
    }
}

#[test]
fn only_rank_zero_writes_the_model() {
    let dir = tempfile::tempdir().unwrap();
    for rank in ["1", "0"] {
        let output = gantry()
            .args(["workload", "train", "--epochs", "5", "--rows", "200"])
            .env("GANTRY_OUTPUT_DIR", dir.path())
            .env("RANK", rank)
            .env("WORLD_SIZE", "2")
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        assert_eq!(dir.path().join("model.json").exists(), rank == "0");
    }
}

#[test]
fn new_writes_templates_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    let path_arg = path.to_str().unwrap();
    let stdout = gantry().args(["new", "batch"]).output().unwrap();
    assert!(stdout.status.success());
    let spec = parse_spec(&String::from_utf8(stdout.stdout).unwrap(), SpecFormat::Yaml).unwrap();
    assert_eq!(spec.units(), 4);

    let first = gantry()
        .args(["new", "training", "-o", path_arg])
        .output()
        .unwrap();
    assert!(first.status.success(), "{first:?}");
    let again = gantry()
        .args(["new", "serving", "-o", path_arg])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(4), "{again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert!(std::fs::read_to_string(&path)
        .unwrap()
        .contains("kind: training"));
    let forced = gantry()
        .args(["new", "serving", "-o", path_arg, "--force"])
        .output()
        .unwrap();
    assert!(forced.status.success(), "{forced:?}");
    assert!(std::fs::read_to_string(&path)
        .unwrap()
        .contains("kind: serving"));
}

#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, needle) in [
        ("bash", "_gantry()"),
        ("zsh", "#compdef gantry"),
        ("fish", "complete -c gantry"),
        ("powershell", "Register-ArgumentCompleter"),
        ("elvish", "edit:completion:arg-completer[gantry]"),
    ] {
        let output = gantry().args(["completions", shell]).output().unwrap();
        assert!(output.status.success(), "{shell}: {output:?}");
        let script = String::from_utf8(output.stdout).unwrap();
        assert!(script.contains(needle), "{shell}: lacks {needle:?}");
        // Subcommands added to the CLI are completed too.
        assert!(script.contains("workload"), "{shell}");
    }
    let unknown = gantry().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(unknown.status.code(), Some(2));
}
