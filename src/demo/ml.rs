//! The demo's ML work: the three self-contained jobs of `examples/`, given what a fleet with
//! GPUs asks of them, passing the model along as artifacts.
//!
//! 1. Training: a gang of 2 ranks with 1 GPU each, `prefer: cheapest`, so it lands on the
//!    on-prem site; rank 0's `model.json` becomes the job's artifact.
//! 2. Batch inference: 8 shards with 1 GPU each, all at once, given the model as an input. The
//!    cheap site has 4 GPUs, so half the shards overflow to the cloud. Once shards are running,
//!    one GPU agent (the on-prem one, when it has shards) is killed; after its TTL the
//!    coordinators declare it down, its shards are lost and placed again on the other GPU site,
//!    and the job still succeeds. The killed agent then comes back with its stored certificate.
//! 3. Serving: 2 replicas of the model on CPUs; a prediction asked of the served model is
//!    compared with [`workloads::predict`] on the downloaded `model.json`.
//!
//! The process runtime finds `gantry` on the unit's `PATH`. The demo's agents run inside this
//! process, so each job's env puts this binary's own directory first on that `PATH`: the demo
//! works from a build tree as well as from an installed binary. Under `--runtime docker` each
//! job names the demo's image instead, which holds this binary on its own `PATH`; the model
//! travels the same way, through `$GANTRY_INPUT_DIR` and `$GANTRY_OUTPUT_DIR` in the allocation
//! directory the container has bind-mounted.

use super::progress::JobLine;
use super::summary::AgentPrices;
use super::{Console, Fleet, FLEET};
use crate::workloads::{self, Model, PredictResponse, MODEL_FILE};
use anyhow::{bail, Context, Result};
use gantry_coordinator::api::types::{JobView, SubmitJobResponse};
use gantry_protocol::jobspec::{parse_spec, JobSpec, PlacementPreference, SpecFormat};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const TRAIN: &str = include_str!("../../examples/workload-train.yaml");
const INFER: &str = include_str!("../../examples/workload-infer.yaml");
const SERVE: &str = include_str!("../../examples/workload-serve.yaml");

const N_SHARDS: u32 = 8;
/// Rows of the inference set (`gantry workload infer`'s default).
const N_ROWS: usize = 10_000;
/// Each shard scores its 1,250 rows at this pace, so it runs about three seconds: long enough
/// to be caught running when its agent is killed.
const ROWS_PER_SECOND: u32 = 400;
/// How long the victim's shards run before it is killed.
const KILL_AFTER: Duration = Duration::from_secs(1);
/// A bound on each job's step.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// The features the served model is asked about.
const FEATURES: [f64; 8] = [1.0, -1.0, 0.5, 0.0, 1.0, 0.0, 0.0, 1.0];

pub struct JobIds {
    pub train: String,
    pub infer: String,
    pub serve: String,
}

/// The agent killed mid-batch, and what became of its work.
#[derive(Debug, Clone, Serialize)]
pub struct Killed {
    pub agent: String,
    pub name: String,
    pub site: String,
    /// From the kill until the coordinators had declared its allocations lost.
    pub noticed_after_seconds: f64,
    /// Its allocations that were running when it died, all `lost`.
    pub lost_allocations: Vec<String>,
    pub moved: Vec<Moved>,
}

/// A unit lost with the killed agent and run to success elsewhere.
#[derive(Debug, Clone, Serialize)]
pub struct Moved {
    pub job: String,
    pub unit: u32,
    pub lost_allocation: String,
    pub succeeded_allocation: String,
    pub succeeded_on: String,
}

/// The served model's answer next to the one computed here from the model artifact.
#[derive(Debug, Clone, Serialize)]
pub struct PredictionCheck {
    pub features: Vec<f64>,
    /// `gateway`: the answer came through a coordinator's `/serve/NAME/` route.
    pub via: String,
    pub url: String,
    pub served_probability: f64,
    pub served_label: u8,
    /// `workloads::predict` on the downloaded `model.json`.
    pub direct_probability: f64,
    pub direct_label: u8,
}

pub struct Outcome {
    pub ids: JobIds,
    /// The three jobs as they ended (serving: as it runs, under `--keep`).
    pub jobs: Vec<JobView>,
    pub killed: Option<Killed>,
    pub prediction: PredictionCheck,
    pub rows_scored: usize,
    /// A healthy replica's port, when the serving job is left running.
    pub serving_port: Option<u16>,
}

/// An example job with `env` pointing at this binary (or naming `image`, which holds it), and
/// small CPU requests so that a laptop with two cores takes all of it; `adjust` adds what the
/// demo asks of it.
fn example(text: &str, image: Option<&str>, adjust: impl FnOnce(&mut JobSpec)) -> Result<JobSpec> {
    let mut spec = parse_spec(text, SpecFormat::Yaml).context("parse a shipped example")?;
    spec.resources.cpu_millis = 250;
    spec.placement.prefer = PlacementPreference::Cheapest;
    if let Some(image) = image {
        spec.image = Some(image.to_string());
        adjust(&mut spec);
        return Ok(spec);
    }
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
    adjust(&mut spec);
    Ok(spec)
}

/// Agent config lines (top-level keys: put them before any table) giving serving replicas ports
/// from a range the kernel just handed out, so that two demos on one host (or a service on the
/// default 31000) do not collide.
pub fn serving_ports() -> Result<String> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    let port_min = probe.local_addr()?.port().min(65_000);
    Ok(format!(
        "serving_port_min = {port_min}\nserving_port_max = {}\n",
        port_min + 50
    ))
}

/// Follows a job on screen while it runs (the demo runs one at a time).
struct Watch<'a> {
    /// Agent id to name.
    names: BTreeMap<String, String>,
    console: &'a mut Console,
}

impl Watch<'_> {
    /// Polls until `step` says the job `id` is where it should be, showing its progress
    /// meanwhile (left on screen afterwards); fails if the job fails. `step` sees each poll's
    /// view of the job, and may act on the fleet.
    async fn follow(
        &mut self,
        fleet: &mut Fleet,
        id: &str,
        what: &str,
        mut step: impl FnMut(&JobView, &mut Fleet, &mut Console) -> Result<bool>,
    ) -> Result<JobView> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let job: JobView = fleet.api().get(&format!("/v1/jobs/{id}")).await?;
            self.console
                .progress
                .update(&[JobLine::of(&job, &self.names)]);
            if step(&job, fleet, &mut *self.console)? {
                self.console.progress.finish();
                return Ok(job);
            }
            // Nothing in the demo cancels a job before `step` expects it.
            if job.state == "failed" {
                bail!(
                    "job {} ({}) {}: {}",
                    job.name,
                    job.id,
                    job.state,
                    job.failure.as_deref().unwrap_or("no reason given")
                );
            }
            if Instant::now() > deadline {
                bail!("timed out after {STEP_TIMEOUT:?} waiting for {what}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn name_of(&self, agent: &str) -> String {
        self.names
            .get(agent)
            .cloned()
            .unwrap_or_else(|| agent.to_string())
    }

    /// `onprem-gpu 2, cloud-gpu 1`: where a job's succeeded (or healthy) allocations ran.
    fn placed(&self, job: &JobView, states: &[&str]) -> String {
        let mut by_agent: BTreeMap<String, usize> = BTreeMap::new();
        for allocation in job
            .allocations
            .iter()
            .filter(|a| states.contains(&a.state.as_str()))
        {
            *by_agent.entry(self.name_of(&allocation.agent)).or_insert(0) += 1;
        }
        by_agent
            .iter()
            .map(|(name, n)| format!("{name} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

async fn submit(fleet: &Fleet, spec: &JobSpec) -> Result<String> {
    let response: SubmitJobResponse = fleet.api().post("/v1/jobs", spec).await?;
    Ok(response.id)
}

/// Where the kill stands during the batch job.
#[derive(Default)]
struct KillWatch {
    /// The agent chosen: the cheapest GPU agent given shards.
    victim: Option<String>,
    /// When its shards were first seen running.
    running_since: Option<Instant>,
    killed_at: Option<Instant>,
    killed: Option<Killed>,
    moved_noted: bool,
}

impl KillWatch {
    /// One poll of the batch job: picks the victim, kills it once its shards have run a while,
    /// and reports when the coordinators notice and when its shards move.
    fn step(
        &mut self,
        job: &JobView,
        fleet: &mut Fleet,
        console: &mut Console,
        prices: &BTreeMap<String, AgentPrices>,
    ) {
        let running_on = |agent: &str| -> Vec<u32> {
            job.allocations
                .iter()
                .filter(|a| a.agent == agent && a.state == "running")
                .map(|a| a.unit)
                .collect()
        };
        if self.killed_at.is_none() {
            // The cheapest GPU agent given shards: the site the work would rather be on.
            let mut gpu_agents: Vec<&AgentPrices> = prices
                .values()
                .filter(|p| p.cost_per_gpu_hour > 0.0)
                .collect();
            gpu_agents.sort_by(|a, b| a.cost_per_gpu_hour.total_cmp(&b.cost_per_gpu_hour));
            if self.victim.is_none() {
                self.victim = gpu_agents
                    .iter()
                    .find(|p| job.allocations.iter().any(|a| a.agent == p.agent))
                    .map(|p| p.agent.clone());
            }
            let Some(victim) = &self.victim else {
                return;
            };
            let units = running_on(victim);
            if units.is_empty() {
                return;
            }
            if self
                .running_since
                .get_or_insert_with(Instant::now)
                .elapsed()
                < KILL_AFTER
            {
                return;
            }
            let victim = prices[victim.as_str()].clone();
            fleet.kill_agent(&victim.name);
            self.killed_at = Some(Instant::now());
            let how = if fleet.docker.is_some() {
                "its task aborted and its containers force-removed, as the death of its host would end both"
            } else {
                "its task aborted, as SIGKILL would end an agent process"
            };
            console.say(&format!(
                "   killed {} ({}) mid-batch: {how}; its running shards {units:?} died with it. The coordinators hear nothing more and wait out its {} s TTL...",
                victim.name,
                victim.site,
                super::AGENT_TTL.as_secs()
            ));
            self.killed = Some(Killed {
                agent: victim.agent.clone(),
                name: victim.name.clone(),
                site: victim.site.clone(),
                noticed_after_seconds: 0.0,
                lost_allocations: Vec::new(),
                moved: Vec::new(),
            });
            return;
        }
        let (Some(killed_at), Some(killed)) = (self.killed_at, self.killed.as_mut()) else {
            return;
        };
        let on_victim: Vec<_> = job
            .allocations
            .iter()
            .filter(|a| a.agent == killed.agent)
            .collect();
        let lost: Vec<_> = on_victim.iter().filter(|a| a.state == "lost").collect();
        if killed.lost_allocations.is_empty()
            && !lost.is_empty()
            && on_victim
                .iter()
                .all(|a| ["lost", "succeeded", "failed"].contains(&a.state.as_str()))
        {
            killed.noticed_after_seconds = killed_at.elapsed().as_secs_f64();
            killed.lost_allocations = lost.iter().map(|a| a.id.clone()).collect();
            let units: Vec<u32> = lost.iter().map(|a| a.unit).collect();
            console.say(&format!(
                "   {:.1} s after the kill the coordinators declared {} down; its shards {units:?} are lost and go back to the scheduler",
                killed.noticed_after_seconds, killed.name
            ));
        }
        if !killed.lost_allocations.is_empty() && !self.moved_noted {
            let lost_units: BTreeSet<u32> = lost.iter().map(|a| a.unit).collect();
            let replacements: BTreeMap<u32, &str> = job
                .allocations
                .iter()
                .filter(|a| a.agent != killed.agent && a.state != "lost")
                .filter(|a| lost_units.contains(&a.unit) && a.attempt > 1)
                .map(|a| (a.unit, a.agent.as_str()))
                .collect();
            if replacements.len() == lost_units.len() {
                self.moved_noted = true;
                let agents: BTreeSet<&str> = replacements.values().copied().collect();
                let names: Vec<String> = agents
                    .iter()
                    .map(|agent| {
                        prices
                            .get(*agent)
                            .map_or_else(|| agent.to_string(), |p| p.name.clone())
                    })
                    .collect();
                console.say(&format!(
                    "   placed again on {}: the next cheapest GPUs with room",
                    names.join(", ")
                ));
            }
        }
    }

    /// The killed agent's record, with the units that moved, from the batch job as it ended.
    fn finish(self, job: &JobView, names: &BTreeMap<String, String>) -> Option<Killed> {
        let mut killed = self.killed?;
        for lost in job
            .allocations
            .iter()
            .filter(|a| a.agent == killed.agent && a.state == "lost")
        {
            if let Some(success) = job
                .allocations
                .iter()
                .find(|a| a.unit == lost.unit && a.state == "succeeded")
            {
                killed.moved.push(Moved {
                    job: job.id.clone(),
                    unit: lost.unit,
                    lost_allocation: lost.id.clone(),
                    succeeded_allocation: success.id.clone(),
                    succeeded_on: names
                        .get(&success.agent)
                        .cloned()
                        .unwrap_or_else(|| success.agent.clone()),
                });
            }
        }
        Some(killed)
    }
}

/// Runs the three jobs on `fleet`, telling `console` what happens.
pub async fn run(
    fleet: &mut Fleet,
    console: &mut Console,
    prices: &BTreeMap<String, AgentPrices>,
    keep: bool,
) -> Result<Outcome> {
    let names: BTreeMap<String, String> = prices
        .iter()
        .map(|(agent, p)| (agent.clone(), p.name.clone()))
        .collect();
    let mut watch = Watch {
        names: names.clone(),
        console,
    };

    // 1. Training on one GPU per rank, on the cheapest GPUs.
    let image = fleet.image().map(str::to_string);
    let image = image.as_deref();
    let train_spec = example(TRAIN, image, |spec| spec.resources.n_gpus = 1)?;
    let train_id = submit(fleet, &train_spec).await?;
    watch.console.say(&format!(
        "   training: {} ranks as one gang, 1 GPU each, placement.prefer cheapest",
        train_spec.units()
    ));
    let train = watch
        .follow(fleet, &train_id, "training", |job, _, _| {
            Ok(job.state == "succeeded")
        })
        .await?;
    let model_bytes = fleet
        .api()
        .get_bytes(&format!("/v1/jobs/{train_id}/artifacts/{MODEL_FILE}"))
        .await
        .context("download the model artifact")?;
    let model = Model::from_json(&String::from_utf8_lossy(&model_bytes))?;
    let artifact = train
        .artifacts
        .iter()
        .find(|a| a.name == MODEL_FILE)
        .context("the training job has no model artifact")?;
    watch.console.say(&format!(
        "   trained on {}: training accuracy {:.4}; {MODEL_FILE} stored on the coordinators as an artifact ({} bytes, sha256 {}...)",
        watch.placed(&train, &["succeeded"]),
        model.train_accuracy,
        artifact.size_bytes,
        &artifact.sha256[..12]
    ));

    // 2. Batch inference over both GPU sites, one of which dies.
    let infer_spec = example(INFER, image, |spec| {
        spec.resources.n_gpus = 1;
        let batch = spec.batch.get_or_insert_with(Default::default);
        batch.n_shards = N_SHARDS;
        batch.parallelism = Some(N_SHARDS);
        spec.command
            .extend(["--rows-per-second".to_string(), ROWS_PER_SECOND.to_string()]);
    })?;
    let infer_id = submit(fleet, &infer_spec).await?;
    watch.console.say(&format!(
        "\n   batch inference: {N_SHARDS} shards, 1 GPU each, all at once, given {MODEL_FILE} as an input; the cheap site has room for half"
    ));
    let mut kill = KillWatch::default();
    let infer = watch
        .follow(
            fleet,
            &infer_id,
            "batch inference",
            |job, fleet, console| {
                kill.step(job, fleet, console, prices);
                Ok(job.state == "succeeded")
            },
        )
        .await?;
    let killed = kill.finish(&infer, &names);
    watch.console.say(&format!(
        "   every shard succeeded; shards ran on {}",
        watch.placed(&infer, &["succeeded"])
    ));
    if let Some(killed) = &killed {
        let agent = FLEET
            .iter()
            .find(|a| a.name == killed.name)
            .context("the killed agent is one of the fleet")?;
        // Its host's containers are gone before it comes back: it has nothing to adopt.
        fleet.settle_kills().await?;
        fleet.start_agent(agent, None)?;
        fleet
            .wait_nodes("the killed agent to be back", |nodes| {
                nodes.iter().all(|n| n.status == "ready")
            })
            .await?;
        watch.console.say(&format!(
            "   restarted {} with no token: its stored certificate let it back in as the same node, and it runs none of its lost shards",
            killed.name
        ));
    }
    let rows_scored = check_predictions(fleet, &infer).await?;
    watch.console.say(&format!(
        "   the {N_SHARDS} predictions-*.jsonl artifacts hold {rows_scored} rows, each exactly once"
    ));

    // 3. Serving, and a prediction asked of the served model.
    let serve_spec = example(SERVE, image, |_| {})?;
    let serve_id = submit(fleet, &serve_spec).await?;
    let replicas = serve_spec.units() as usize;
    watch.console.say(&format!(
        "\n   serving: {replicas} replicas on CPUs, spread over nodes, each given {MODEL_FILE}; healthy once GET /healthz answers"
    ));
    let serving = watch
        .follow(fleet, &serve_id, "healthy replicas", |job, _, _| {
            Ok(job
                .allocations
                .iter()
                .filter(|a| a.state == "healthy")
                .count()
                == replicas)
        })
        .await?;
    let coordinator = fleet.coordinators[0].http;
    let (via, url, served) = call_served_model(coordinator, &serving, &FEATURES).await?;
    let direct = workloads::predict(&model, &FEATURES);
    let prediction = PredictionCheck {
        features: FEATURES.to_vec(),
        via,
        url,
        served_probability: served.probability,
        served_label: served.label,
        direct_probability: direct,
        direct_label: u8::from(direct >= 0.5),
    };
    watch.console.say(&format!(
        "   replicas healthy on {}\n   POST {} {{\"features\": {FEATURES:?}}}\n     served:    probability {:.12}, label {}\n     predict(): probability {:.12}, label {} (computed here from the downloaded {MODEL_FILE})",
        watch.placed(&serving, &["healthy"]),
        prediction.url,
        prediction.served_probability,
        prediction.served_label,
        prediction.direct_probability,
        prediction.direct_label,
    ));
    if (prediction.served_probability - prediction.direct_probability).abs() > 1e-9 {
        bail!(
            "the served prediction {} differs from the model's {}",
            prediction.served_probability,
            prediction.direct_probability
        );
    }
    let serving_port = if keep {
        serving
            .allocations
            .iter()
            .find(|a| a.state == "healthy")
            .and_then(|a| a.port)
    } else {
        let _: serde_json::Value = fleet.api().delete(&format!("/v1/jobs/{serve_id}")).await?;
        watch
            .follow(fleet, &serve_id, "the replicas to stop", |job, _, _| {
                Ok(job.state == "cancelled"
                    && job
                        .allocations
                        .iter()
                        .all(|a| ["succeeded", "failed", "lost"].contains(&a.state.as_str())))
            })
            .await?;
        watch
            .console
            .say("   cancelled the serving job: its replicas stopped on SIGTERM");
        None
    };

    let mut jobs = Vec::new();
    for id in [&train_id, &infer_id, &serve_id] {
        jobs.push(
            fleet
                .api()
                .get::<JobView>(&format!("/v1/jobs/{id}"))
                .await?,
        );
    }
    Ok(Outcome {
        ids: JobIds {
            train: train_id,
            infer: infer_id,
            serve: serve_id,
        },
        jobs,
        killed,
        prediction,
        rows_scored,
        serving_port,
    })
}

/// Downloads the batch job's prediction files and checks they cover the inference set, each row
/// once; the number of rows.
async fn check_predictions(fleet: &Fleet, job: &JobView) -> Result<usize> {
    let mut rows = vec![0u32; N_ROWS];
    let mut n_rows = 0;
    for artifact in &job.artifacts {
        let bytes = fleet
            .api()
            .get_bytes(&format!("/v1/jobs/{}/artifacts/{}", job.id, artifact.name))
            .await
            .with_context(|| format!("download {}", artifact.name))?;
        for line in String::from_utf8_lossy(&bytes).lines() {
            let prediction: workloads::Prediction = serde_json::from_str(line)
                .with_context(|| format!("parse a line of {}", artifact.name))?;
            let count = rows.get_mut(prediction.row).with_context(|| {
                format!("{}: row {} is out of range", artifact.name, prediction.row)
            })?;
            *count += 1;
            n_rows += 1;
        }
    }
    if let Some(row) = rows.iter().position(|&count| count != 1) {
        bail!(
            "row {row} was scored {} times in the prediction files, not once",
            rows[row]
        );
    }
    Ok(n_rows)
}

/// Asks the served model for a prediction, as a client of the platform would; returns how it
/// was reached (`via`), the URL and the answer.
///
/// Asks the served model through a coordinator's gateway: `POST /serve/{job name}/predict`,
/// which the coordinator routes to a healthy replica of the serving job of that name.
async fn call_served_model(
    coordinator: std::net::SocketAddr,
    job: &JobView,
    features: &[f64],
) -> Result<(String, String, PredictResponse)> {
    let url = format!("http://{coordinator}/serve/{}/predict", job.name);
    let answer: PredictResponse = reqwest::Client::new()
        .post(&url)
        .json(&serde_json::json!({ "features": features }))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .context("ask the served model for a prediction")?
        .error_for_status()
        .context("ask the served model for a prediction")?
        .json()
        .await
        .context("read the served model's prediction")?;
    Ok(("gateway".into(), url, answer))
}
