//! The demo's ML step: the three self-contained jobs of `examples/` — train, batch inference,
//! serving — submitted to the demo fleet and run by its CPU-only agent (the one that allows the
//! process runtime) as `gantry workload ...`, then checked: the model is good, the shards scored
//! every row once, and the served prediction is the one `predict` computes here.
//!
//! The process runtime finds `gantry` on the unit's `PATH`. The demo's agents run inside this
//! process, so each job's env puts this binary's own directory first on that `PATH`: the demo
//! works from a build tree as well as from an installed binary.

use crate::client::ApiClient;
use crate::workloads::{self, Model, MODEL_FILE};
use anyhow::{bail, Context, Result};
use gantry_coordinator::api::types::{JobView, SubmitJobResponse};
use gantry_protocol::jobspec::{parse_spec, JobSpec, SpecFormat};
use std::path::Path;
use std::time::{Duration, Instant};

const TRAIN: &str = include_str!("../../examples/workload-train.yaml");
const INFER: &str = include_str!("../../examples/workload-infer.yaml");
const SERVE: &str = include_str!("../../examples/workload-serve.yaml");

/// An example job, with `env` pointing at this demo's directories and this binary, and small
/// CPU requests so that a laptop with two cores takes all of it.
fn example(text: &str, env: &[(&str, &Path)]) -> Result<JobSpec> {
    let mut spec = parse_spec(text, SpecFormat::Yaml).context("parse a shipped example")?;
    let exe = std::env::current_exe().context("find this binary")?;
    let exe_dir = exe.parent().context("find this binary's directory")?;
    let path = match std::env::var_os("PATH") {
        Some(path) => {
            let mut dirs = vec![exe_dir.to_path_buf()];
            dirs.extend(std::env::split_paths(&path));
            std::env::join_paths(dirs).context("build PATH")?
        }
        None => exe_dir.as_os_str().to_owned(),
    };
    spec.env
        .insert("PATH".into(), path.to_string_lossy().into_owned());
    for (name, dir) in env {
        spec.env.insert(name.to_string(), dir.display().to_string());
    }
    spec.resources.cpu_millis = 250;
    Ok(spec)
}

/// Agent config lines (top-level keys: put them before any table) giving serving replicas ports from a range the kernel just handed out, so
/// that two demos on one host (or a service on the default 31000) do not collide.
pub fn serving_ports() -> Result<String> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    let port_min = probe.local_addr()?.port().min(65_000);
    Ok(format!(
        "serving_port_min = {port_min}\nserving_port_max = {}\n",
        port_min + 50
    ))
}

async fn submit(api: &ApiClient, spec: &JobSpec) -> Result<String> {
    let response: SubmitJobResponse = api.post("/v1/jobs", spec).await?;
    Ok(response.id)
}

async fn wait_job(
    api: &ApiClient,
    id: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&JobView) -> bool,
) -> Result<JobView> {
    let deadline = Instant::now() + timeout;
    loop {
        let job: JobView = api.get(&format!("/v1/jobs/{id}")).await?;
        if done(&job) {
            return Ok(job);
        }
        if job.state == "failed" {
            bail!(
                "job {id} failed: {}",
                job.failure.as_deref().unwrap_or("no reason given")
            );
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs the pipeline in `dir`; prints what each step showed.
pub async fn run(api: &ApiClient, dir: &Path) -> Result<()> {
    let model_dir = dir.join("model");
    let predictions_dir = dir.join("predictions");

    let train = example(TRAIN, &[("GANTRY_OUTPUT_DIR", &model_dir)])?;
    let id = submit(api, &train).await?;
    let started = Instant::now();
    wait_job(api, &id, "training", Duration::from_secs(120), |job| {
        job.state == "succeeded"
    })
    .await?;
    let model = Model::load(&model_dir.join(MODEL_FILE))?;
    println!(
        "   training ({} ranks, gang-placed): {:.1} s, training accuracy {:.4}, {} written by rank 0",
        train.units(),
        started.elapsed().as_secs_f64(),
        model.train_accuracy,
        MODEL_FILE
    );

    let infer = example(
        INFER,
        &[
            ("GANTRY_INPUT_DIR", &model_dir),
            ("GANTRY_OUTPUT_DIR", &predictions_dir),
        ],
    )?;
    let id = submit(api, &infer).await?;
    wait_job(
        api,
        &id,
        "batch inference",
        Duration::from_secs(120),
        |job| job.state == "succeeded",
    )
    .await?;
    let (mut n_rows, mut n_positive) = (0usize, 0usize);
    for shard_idx in 0..infer.units() {
        let path = predictions_dir.join(format!("predictions-{shard_idx}.jsonl"));
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        for line in text.lines() {
            let prediction: workloads::Prediction =
                serde_json::from_str(line).with_context(|| format!("parse {}", path.display()))?;
            n_rows += 1;
            n_positive += usize::from(prediction.label);
        }
    }
    println!(
        "   batch inference ({} shards): scored {n_rows} rows, positive rate {:.4}",
        infer.units(),
        n_positive as f64 / n_rows.max(1) as f64
    );

    let serve = example(SERVE, &[("GANTRY_INPUT_DIR", &model_dir)])?;
    let id = submit(api, &serve).await?;
    let replicas = serve.units() as usize;
    let job = wait_job(
        api,
        &id,
        "healthy replicas",
        Duration::from_secs(60),
        |job| {
            job.allocations
                .iter()
                .filter(|a| a.state == "healthy")
                .count()
                == replicas
        },
    )
    .await?;
    let port = job
        .allocations
        .iter()
        .find_map(|a| a.port)
        .context("a replica without a port")?;
    let features = [1.0, -1.0, 0.5, 0.0, 1.0, 0.0, 0.0, 1.0];
    let answer: workloads::PredictResponse = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/predict"))
        .json(&serde_json::json!({ "features": features }))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .context("ask a replica for a prediction")?
        .json()
        .await
        .context("read the replica's prediction")?;
    let local = workloads::predict(&model, &features);
    println!(
        "   serving ({replicas} replicas, healthy): POST /predict on port {port} answered probability {:.6}, label {}; predict() here gives {local:.6}",
        answer.probability, answer.label
    );
    if (answer.probability - local).abs() > 1e-9 {
        bail!(
            "the served prediction {} differs from the local one {local}",
            answer.probability
        );
    }
    let _: serde_json::Value = api.delete(&format!("/v1/jobs/{id}")).await?;
    wait_job(
        api,
        &id,
        "the replicas to stop",
        Duration::from_secs(30),
        |job| {
            job.allocations
                .iter()
                .all(|a| ["succeeded", "failed", "lost"].contains(&a.state.as_str()))
        },
    )
    .await?;
    println!("   cancelled the serving job: its replicas stopped on SIGTERM");
    Ok(())
}
