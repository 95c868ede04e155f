//! `gantry demo`: the whole platform in one process on loopback, with nothing to install and no
//! network. It starts a 3-node coordinator cluster (a fresh CA, Raft over QUIC) in a temporary
//! data dir and three agents standing for a hybrid fleet — an on-prem site with a few cheap GPUs,
//! a cloud site with more, dearer ones, a CPU-only site — which join with a token over mutual
//! TLS; then runs ML work on it (see [`ml`]): training on a GPU, batch inference whose shards
//! spread and survive the loss of an agent killed mid-run, serving, a served prediction checked
//! against the model; and ends with what each job cost (see [`summary`]).
//!
//! The fleet is real code on real sockets; only the GPUs are declared rather than found, and the
//! agents share this host.
//!
//! `--runtime docker` runs the same story with every agent on `runtime = "docker"`: the jobs name
//! an image built offline from this binary (see [`image`]) and run as containers of the local
//! daemon. The GPUs stay declared, so placement and costs are the same; the containers are given
//! no GPU device, as the Docker runtime asks the NVIDIA toolkit only for GPUs NVML found. Killing
//! an agent kills its host: its containers are removed with it. Whatever containers the demo
//! started are removed when it ends or is interrupted; the image is kept for the next run.

mod image;
mod ml;
mod progress;
mod summary;

use crate::client::ApiClient;
use crate::output::{format_table, Output};
use anyhow::{bail, Context, Result};
use gantry_coordinator::api::types::{
    ClusterView, CreateTokenRequest, CreateTokenResponse, NodeView,
};
use progress::Progress;
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use summary::{AgentPrices, JobFigures};
use tokio::sync::oneshot;

/// Short, so that the coordinators notice a dead agent within the demo: the default TTL is 15 s.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(250);
const AGENT_TTL: Duration = Duration::from_secs(2);
const N_COORDINATORS: usize = 3;
/// A bound on each step of starting the fleet.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// One agent of the demo fleet: its name and its config (site, prices, declared GPUs).
struct FleetAgent {
    name: &'static str,
    config: &'static str,
}

/// The on-prem site has few GPUs at an amortised price, the cloud more at on-demand prices, the
/// third site none. Every agent allows the process runtime, so every one can run the demo's jobs.
const FLEET: [FleetAgent; 3] = [
    FleetAgent {
        name: "onprem-gpu",
        config: "name = \"onprem-gpu\"\nsite = \"onprem-a\"\nkind = \"on-prem\"\nallow_process = true\ncost_per_gpu_hour = 1.10\ncost_per_cpu_hour = 0.01\n[[gpus]]\nmodel = \"H100\"\nmemory = \"80GiB\"\ncount = 4\n",
    },
    FleetAgent {
        name: "cloud-gpu",
        config: "name = \"cloud-gpu\"\nsite = \"aws-us-east-1\"\nkind = \"cloud\"\nallow_process = true\ncost_per_gpu_hour = 3.20\ncost_per_cpu_hour = 0.04\n[[gpus]]\nmodel = \"A100\"\nmemory = \"40GiB\"\ncount = 8\n",
    },
    FleetAgent {
        name: "cpu-only",
        config: "name = \"cpu-only\"\nsite = \"onprem-b\"\nkind = \"on-prem\"\nallow_process = true\ncost_per_cpu_hour = 0.01\n",
    },
];

/// What the demo's agents run their jobs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoRuntime {
    /// Plain processes of this binary.
    Process,
    /// Containers of the local Docker daemon, from an image of this binary.
    Docker,
}

/// The Docker side of a `--runtime docker` fleet.
struct DockerFleet {
    docker: bollard::Docker,
    /// What every job names.
    image: String,
    /// Removals of a killed agent's containers, not yet awaited.
    removals: Vec<tokio::task::JoinHandle<Result<usize, String>>>,
}

pub struct DemoOptions {
    /// Leave the fleet running until Ctrl-C.
    pub keep: bool,
    pub runtime: DemoRuntime,
    /// `table`: the story on stdout. `json`/`yaml`: the story on stderr and the summary
    /// document on stdout.
    pub output: Output,
}

/// A task of this process that runs until told to stop (or is aborted).
struct Task {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Task {
    fn spawn(
        run: impl FnOnce(oneshot::Receiver<()>) -> tokio::task::JoinHandle<Result<()>>,
    ) -> Self {
        let (stop, stopped) = oneshot::channel();
        Self {
            stop: Some(stop),
            task: run(stopped),
        }
    }

    /// Asks it to stop and waits, at most `timeout`, then aborts it.
    async fn stop(mut self, timeout: Duration) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(timeout, &mut self.task).await {
            Ok(joined) => joined.context("join a demo task")?,
            Err(_) => {
                self.task.abort();
                Ok(())
            }
        }
    }
}

struct Coordinator {
    quic: SocketAddr,
    http: SocketAddr,
    task: Task,
}

/// The demo's cluster: coordinators, agents, and an API client that knows every coordinator.
pub struct Fleet {
    dir: tempfile::TempDir,
    coordinators: Vec<Coordinator>,
    /// By name; `None` while killed.
    agents: BTreeMap<&'static str, Option<Task>>,
    api: Option<ApiClient>,
    admin_token: String,
    /// Agent config lines giving serving replicas a free port range.
    serving_ports: String,
    /// `--runtime docker`.
    docker: Option<DockerFleet>,
}

impl Fleet {
    fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("gantry-demo-")
            .tempdir()
            .context("create a temporary data dir")?;
        Ok(Self {
            dir,
            coordinators: Vec::new(),
            agents: BTreeMap::new(),
            api: None,
            admin_token: String::new(),
            serving_ports: ml::serving_ports()?,
            docker: None,
        })
    }

    /// The image jobs name, under `--runtime docker`.
    fn image(&self) -> Option<&str> {
        self.docker.as_ref().map(|d| d.image.as_str())
    }

    fn api(&self) -> &ApiClient {
        self.api
            .as_ref()
            .expect("the coordinators are started first")
    }

    /// `GANTRY_API` for this cluster: every coordinator's HTTP address.
    fn api_list(&self) -> String {
        self.coordinators
            .iter()
            .map(|c| c.http.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn_coordinator(&mut self, membership: gantry_coordinator::Membership) -> Result<()> {
        let idx = self.coordinators.len() + 1;
        let data_dir = self.dir.path().join(format!("coordinator-{idx}"));
        if matches!(membership, gantry_coordinator::Membership::Existing) {
            gantry_coordinator::data_dir::init(&data_dir)?;
        }
        let mut config = gantry_coordinator::CoordinatorConfig::new(data_dir);
        config.heartbeat_interval = HEARTBEAT_INTERVAL;
        config.agent_ttl = AGENT_TTL;
        let listeners = gantry_coordinator::Listeners {
            quic: std::net::UdpSocket::bind("127.0.0.1:0").context("bind QUIC")?,
            http: std::net::TcpListener::bind("127.0.0.1:0").context("bind HTTP")?,
        };
        let quic = listeners.quic.local_addr()?;
        let http = listeners.http.local_addr()?;
        let task = Task::spawn(|stopped| {
            tokio::spawn(gantry_coordinator::run_with(
                config,
                listeners,
                membership,
                async {
                    let _ = stopped.await;
                },
            ))
        });
        self.coordinators.push(Coordinator { quic, http, task });
        Ok(())
    }

    /// The first coordinator creates the cluster; the others join it with a coordinator token
    /// as learners and are promoted to voters once caught up.
    async fn start_coordinators(&mut self) -> Result<()> {
        self.spawn_coordinator(gantry_coordinator::Membership::Existing)?;
        self.admin_token =
            std::fs::read_to_string(self.dir.path().join("coordinator-1/admin.token"))
                .context("read the admin token")?
                .trim()
                .to_string();
        let first = ApiClient::new(
            &self.coordinators[0].http.to_string(),
            Some(self.admin_token.clone()),
        )?;
        let join: CreateTokenResponse = poll("a leader", START_TIMEOUT, || async {
            Ok(first
                .post(
                    "/v1/tokens",
                    &CreateTokenRequest {
                        role: "coordinator".into(),
                        ttl_seconds: Some(600),
                    },
                )
                .await
                .ok())
        })
        .await?;
        let seed = self.coordinators[0].quic.to_string();
        for n_voters in 2..=N_COORDINATORS {
            self.spawn_coordinator(gantry_coordinator::Membership::Join {
                token: join.token.clone(),
                seed: seed.clone(),
            })?;
            poll(
                &format!("{n_voters} voting coordinators"),
                START_TIMEOUT,
                || async {
                    let cluster: Option<ClusterView> = first.get("/v1/cluster").await.ok();
                    Ok(cluster.filter(|c| {
                        c.members.iter().filter(|m| m.role == "voter").count() == n_voters
                    }))
                },
            )
            .await?;
        }
        self.api = Some(ApiClient::new(
            &self.api_list(),
            Some(self.admin_token.clone()),
        )?);
        Ok(())
    }

    fn start_agent(&mut self, agent: &FleetAgent, join_token: Option<String>) -> Result<()> {
        // Top-level keys: before the config's tables.
        let runtime = if self.docker.is_some() {
            "runtime = \"docker\"\n"
        } else {
            ""
        };
        let config = gantry_agent::config::AgentConfig::parse(
            &format!("{}{runtime}{}", self.serving_ports, agent.config),
            agent.name,
        )?;
        let coordinators = self
            .coordinators
            .iter()
            .map(|c| c.quic.to_string())
            .collect();
        let mut options =
            gantry_agent::AgentOptions::new(coordinators, self.dir.path().join(agent.name), config);
        options.join_token = join_token;
        options.backoff_max = Duration::from_secs(1);
        let task = Task::spawn(|stopped| {
            tokio::spawn(gantry_agent::run(options, async {
                let _ = stopped.await;
            }))
        });
        self.agents.insert(agent.name, Some(task));
        Ok(())
    }

    /// Kills an agent the way SIGKILL would: its task is dropped mid-flight, without a word to
    /// the coordinators, and its process runtime with it (its units die with their spawner
    /// thread, as they do with an agent process). Containers outlive their agent, so under
    /// `--runtime docker` its host dies too: its containers are force-removed (see
    /// [`Fleet::settle_kills`]).
    fn kill_agent(&mut self, name: &str) {
        if let Some(task) = self.agents.get_mut(name).and_then(Option::take) {
            task.task.abort();
        }
        let root = self.dir.path().join(name);
        if let Some(docker) = &mut self.docker {
            let client = docker.docker.clone();
            docker.removals.push(tokio::spawn(async move {
                gantry_agent::runtime::docker::remove_containers_under(&client, &root).await
            }));
        }
    }

    /// Waits for the removal of killed agents' containers; how many there were.
    async fn settle_kills(&mut self) -> Result<usize> {
        let mut n_removed = 0;
        if let Some(docker) = &mut self.docker {
            for removal in docker.removals.drain(..) {
                n_removed += removal
                    .await
                    .context("join a container removal")?
                    .map_err(anyhow::Error::msg)
                    .context("remove a killed agent's containers")?;
            }
        }
        Ok(n_removed)
    }

    async fn nodes(&self) -> Result<Vec<NodeView>> {
        self.api().get("/v1/nodes").await
    }

    /// Waits until `check` holds for the nodes the API lists.
    async fn wait_nodes(
        &self,
        what: &str,
        check: impl Fn(&[NodeView]) -> bool,
    ) -> Result<Vec<NodeView>> {
        poll(what, START_TIMEOUT, || async {
            let nodes = self.nodes().await.ok();
            Ok(nodes.filter(|nodes| check(nodes)))
        })
        .await
    }

    /// Stops agents first (their units get SIGTERM), then the coordinators. Containers
    /// outlive their agent: under `--runtime docker` every one its agents made is removed last.
    async fn stop(mut self) -> Result<()> {
        for (_, task) in std::mem::take(&mut self.agents) {
            if let Some(task) = task {
                let _ = task.stop(Duration::from_secs(15)).await;
            }
        }
        for coordinator in self.coordinators.drain(..).rev() {
            let _ = coordinator.task.stop(Duration::from_secs(10)).await;
        }
        let settled = self.settle_kills().await;
        if let Some(docker) = &self.docker {
            gantry_agent::runtime::docker::remove_containers_under(&docker.docker, self.dir.path())
                .await
                .map_err(anyhow::Error::msg)
                .context("remove the demo's containers")?;
        }
        settled.map(|_| ())
    }
}

/// Calls `check` every 100 ms until it gives a value, for at most `timeout`.
async fn poll<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the demo writes to, and how.
pub struct Console {
    progress: Progress,
    /// Colour in tables.
    coloured: bool,
}

impl Console {
    fn new(output: Output) -> Self {
        let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
        let (out, terminal): (Box<dyn std::io::Write + Send>, bool) = match output {
            Output::Table => (Box::new(std::io::stdout()), std::io::stdout().is_terminal()),
            Output::Json | Output::Yaml => {
                (Box::new(std::io::stderr()), std::io::stderr().is_terminal())
            }
        };
        Self {
            progress: Progress::new(out, terminal && !dumb),
            coloured: output == Output::Table && crate::output::colour_enabled(),
        }
    }

    fn say(&mut self, text: &str) {
        self.progress.note(text);
    }

    /// Prints a table; `state_column_idx` names a column of state words to colour.
    fn table<const N: usize>(
        &mut self,
        header: &[&str; N],
        rows: &[[String; N]],
        state_column_idx: Option<usize>,
    ) {
        let colour = |column_idx: usize, cell: &str| {
            (Some(column_idx) == state_column_idx)
                .then(|| crate::output::state_colour(cell))
                .flatten()
        };
        let text = format_table(header, rows, self.coloured, colour);
        self.progress.note(text.trim_end());
    }
}

fn nodes_table(console: &mut Console, nodes: &[NodeView]) {
    let rows: Vec<[String; 6]> = nodes
        .iter()
        .map(|n| {
            [
                n.name.clone(),
                format!("{} ({})", n.site, n.site_kind),
                n.status.clone(),
                if n.gpus.is_empty() {
                    "-".into()
                } else {
                    format!(
                        "{}x {} at ${:.2}/GPU-h",
                        n.gpus.len(),
                        n.gpus[0].model,
                        n.cost_per_gpu_hour
                    )
                },
                format!("{} at ${:.2}/CPU-h", n.cpu_cores, n.cost_per_cpu_hour),
                n.runtimes.join(","),
            ]
        })
        .collect();
    console.table(
        &["AGENT", "SITE", "STATUS", "GPUS", "CPUS", "RUNTIMES"],
        &rows,
        Some(2),
    );
}

/// The summary document `-o json` prints.
#[derive(Debug, Serialize)]
struct Report {
    wall_seconds: f64,
    /// `process` or `docker`: what ran the jobs.
    runtime: &'static str,
    /// The image every job named, under `--runtime docker`.
    #[serde(skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    /// Each coordinator's HTTP API.
    coordinators: Vec<String>,
    /// Each agent's prices as it registered them (its config's), in agent id order.
    fleet: Vec<AgentPrices>,
    jobs: Vec<JobFigures>,
    gpu_hours: f64,
    cost: f64,
    killed: Option<ml::Killed>,
    prediction: ml::PredictionCheck,
    rows_scored: usize,
}

pub async fn run(options: DemoOptions) -> Result<()> {
    let mut console = Console::new(options.output);
    let mut fleet = Fleet::new()?;
    if options.runtime == DemoRuntime::Docker {
        let docker = gantry_agent::runtime::docker::connect()
            .await
            .map_err(|e| anyhow::anyhow!("`gantry demo --runtime docker` runs its jobs as containers of the local Docker daemon, and {e}; without one, `gantry demo` runs them as processes"))?;
        let started = Instant::now();
        let image = tokio::select! {
            image = image::ensure(&docker) => image.context("build the demo's image")?,
            Ok(()) = tokio::signal::ctrl_c() => bail!("interrupted"),
        };
        console.say(&format!(
            "0. Docker answered; the jobs run from {} ({}), {}",
            image.reference,
            &image.id[..image.id.len().min(19)],
            if image.reused {
                "already built from this binary".to_string()
            } else {
                format!(
                    "imported from this binary and its libraries in {:.1} s, offline",
                    started.elapsed().as_secs_f64()
                )
            }
        ));
        fleet.docker = Some(DockerFleet {
            docker,
            image: image.reference,
            removals: Vec::new(),
        });
    }
    // Ctrl-C midway still stops the fleet and removes its data dir.
    let outcome = tokio::select! {
        outcome = show(&mut fleet, &mut console, &options) => outcome,
        Ok(()) = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if outcome.is_ok() && options.keep {
        let _ = tokio::signal::ctrl_c().await;
        console.say("stopping the demo fleet");
    }
    let stopped = fleet.stop().await;
    outcome.and(stopped)
}

async fn show(fleet: &mut Fleet, console: &mut Console, options: &DemoOptions) -> Result<()> {
    let started = Instant::now();
    fleet.start_coordinators().await?;
    console.say(&format!(
        "1. {N_COORDINATORS} coordinators formed one Raft group over QUIC with mutual TLS (new CA in {}); HTTP APIs {}",
        fleet.dir.path().display(),
        fleet.api_list()
    ));

    let token: CreateTokenResponse = fleet
        .api()
        .post(
            "/v1/tokens",
            &CreateTokenRequest {
                role: "agent".into(),
                ttl_seconds: Some(600),
            },
        )
        .await?;
    for agent in &FLEET {
        fleet.start_agent(agent, Some(token.token.clone()))?;
    }
    let nodes = fleet
        .wait_nodes("three ready agents", |nodes| {
            nodes.len() == FLEET.len() && nodes.iter().all(|n| n.status == "ready")
        })
        .await?;
    console.say(&format!(
        "2. three agents joined with a token (it pins the CA) and reported their capacity; heartbeats every {} ms, down after {} s of silence:\n",
        HEARTBEAT_INTERVAL.as_millis(),
        AGENT_TTL.as_secs()
    ));
    nodes_table(console, &nodes);
    let prices: BTreeMap<String, AgentPrices> = nodes
        .iter()
        .map(|n| {
            (
                n.agent.clone(),
                AgentPrices {
                    agent: n.agent.clone(),
                    name: n.name.clone(),
                    site: n.site.clone(),
                    cost_per_gpu_hour: n.cost_per_gpu_hour,
                    cost_per_cpu_hour: n.cost_per_cpu_hour,
                },
            )
        })
        .collect();

    console.say(
        "\n3. ML work: the self-contained jobs of examples/ (`gantry workload ...`), passing the model along as artifacts",
    );
    let outcome = ml::run(fleet, console, &prices, options.keep).await?;

    let jobs: Vec<JobFigures> = outcome
        .jobs
        .iter()
        .map(|job| summary::job_figures(job, &prices, crate::output::now_unix_ms()))
        .collect();
    console.say("\n4. what each job used and cost, at each agent's configured prices:\n");
    console.table(&summary::TABLE_HEADER, &summary::table_rows(&jobs), None);
    let wall_seconds = started.elapsed().as_secs_f64();
    console.say(&format!("\ndemo finished in {wall_seconds:.1} s"));

    let report = Report {
        wall_seconds,
        runtime: match options.runtime {
            DemoRuntime::Process => "process",
            DemoRuntime::Docker => "docker",
        },
        image: fleet.image().map(str::to_string),
        coordinators: fleet
            .coordinators
            .iter()
            .map(|c| c.http.to_string())
            .collect(),
        fleet: prices.into_values().collect(),
        gpu_hours: jobs.iter().map(|j| j.gpu_hours).sum(),
        cost: jobs.iter().map(|j| j.cost).sum(),
        jobs,
        killed: outcome.killed,
        prediction: outcome.prediction,
        rows_scored: outcome.rows_scored,
    };
    crate::output::emit(options.output, &report, |_| {})?;

    if options.keep {
        keep_message(fleet, console, &outcome.ids, outcome.serving_port);
    }
    Ok(())
}

fn keep_message(fleet: &Fleet, console: &mut Console, ids: &ml::JobIds, port: Option<u16>) {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let mut lines = vec![
        "\nThe fleet stays up until Ctrl-C; the serving job keeps running. Point the CLI at it:\n"
            .to_string(),
    ];
    if let Some(dir) = exe_dir {
        lines.push(format!("  export PATH={}:$PATH", dir.display()));
    }
    lines.push(format!("  export GANTRY_API={}", fleet.api_list()));
    lines.push(format!("  export GANTRY_TOKEN={}", fleet.admin_token));
    lines.push(String::new());
    lines.push(
        "  gantry nodes                  # the three sites, one of them back from the dead".into(),
    );
    lines.push("  gantry cluster status         # the three coordinators".into());
    lines.push("  gantry jobs".into());
    lines.push(format!(
        "  gantry status {}   # the shards, the lost ones and their replacements",
        ids.infer
    ));
    lines.push(format!("  gantry artifacts {}", ids.train));
    lines.push(format!(
        "  gantry artifacts {} model.json --out model.json",
        ids.train
    ));
    lines.push(format!(
        "  gantry status {}   # the replicas and their ports",
        ids.serve
    ));
    if let Some(port) = port {
        lines.push(format!(
            "  curl -s -d '{{\"features\": [1, -1, 0.5, 0, 1, 0, 0, 1]}}' http://127.0.0.1:{port}/predict"
        ));
    }
    console.say(&lines.join("\n"));
}
