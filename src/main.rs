//! `gantry`: every role (coordinator, agent) and the CLI in one static binary, so an air-gapped
//! site installs by copying one file.

mod bundle;
mod client;
mod demo;
mod output;
mod render;
mod templates;
mod workloads;

use anyhow::{bail, Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand};
use client::ApiClient;
use gantry_coordinator::api::types::{
    ClusterView, CreateTokenRequest, CreateTokenResponse, EndpointView, JobView, NodeView,
    SubmitJobResponse,
};
pub(crate) use output::print_table;
use output::{emit, local_time_ago, now_unix_ms, Output};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "gantry",
    version,
    about = "Run ML work across a hybrid fleet of GPU servers, Docker hosts and Kubernetes clusters.",
    after_help = output::EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ApiArgs {
    /// Coordinator HTTP API addresses, comma-separated; the next is tried when one is down.
    #[arg(
        long,
        env = "GANTRY_API",
        default_value = "127.0.0.1:7080",
        global = true
    )]
    api: String,
    /// Bearer token for the API (the admin token is in the coordinator's DATA_DIR/admin.token).
    #[arg(long, env = "GANTRY_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a coordinator: the agents' QUIC endpoint and the HTTP API.
    Coordinator(CoordinatorArgs),
    /// Run an agent on this host, or print what it would report.
    Agent(AgentArgs),
    /// Manage join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Start a whole local fleet in this process (three coordinators and three agents standing
    /// for on-prem, cloud and CPU-only sites, on loopback) and show it working: training,
    /// batch inference that survives a killed agent, serving, and what each job cost.
    Demo {
        /// Leave the fleet running afterwards (until Ctrl-C) and print how to point the CLI at it.
        #[arg(long)]
        keep: bool,
        /// `table`: the story on stdout. `json`, `yaml`: the story on stderr and a summary
        /// (jobs, placements, GPU-hours, costs, the killed agent, the prediction) on stdout.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// The same as `-o json`.
        #[arg(long, conflicts_with = "output")]
        json: bool,
        /// What the agents run the jobs with: `process`es of this binary, or `docker`
        /// containers of the local daemon from an image of this binary built offline (kept for
        /// the next run; the containers are removed at the end).
        #[arg(long, value_enum, default_value_t = demo::DemoRuntime::Process)]
        runtime: demo::DemoRuntime,
    },
    /// Submit a job file (YAML, TOML or JSON); prints the job id alone on stdout.
    Submit {
        /// The job spec; its extension (.yaml, .yml, .toml, .json) says its format.
        file: PathBuf,
        /// Makes retries safe: the same key and spec give the same job [default: a new random key].
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List jobs.
    Jobs {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show one job.
    Status {
        /// The job id `gantry submit` printed.
        job: String,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Give a serving job a new spec; its replicas roll over to it (max_surge, max_unavailable).
    Update {
        job: String,
        /// The new spec (YAML, TOML or JSON), with the job's name and team.
        file: PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Cancel a job.
    Cancel {
        job: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Why a job's waiting units are not placed: nodes removed by each filter, best candidates.
    Explain {
        job: String,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Cluster-wide rules checked when a job is accepted.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// A job's artifacts: list them, or write one to a file (or stdout).
    Artifacts {
        job: String,
        /// The artifact to fetch; without it, the job's artifacts are listed.
        name: Option<String>,
        /// Where to write the artifact; stdout when absent.
        #[arg(long, requires = "name")]
        out: Option<PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Team GPU quotas.
    Quota {
        #[command(subcommand)]
        command: QuotaCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The coordinators' Raft group: status and membership.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Print what a runtime would create for each unit of a job file, without running anything.
    Render {
        /// The job spec (.yaml, .yml, .toml or .json).
        file: PathBuf,
        #[arg(long, value_enum)]
        runtime: render::Target,
        /// The Kubernetes namespace the agent is configured with.
        #[arg(long, default_value = "gantry")]
        namespace: String,
        /// The Docker agent's allocations directory (its data dir + `/allocations`).
        #[arg(long, default_value = "/var/lib/gantry/agent/allocations")]
        work_root: PathBuf,
        #[arg(short, long, value_enum, default_value_t = Output::Yaml)]
        output: Output,
    },
    /// Container images on this host's Docker daemon (for an agent with the Docker runtime).
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
    /// Print a job's output (raw bytes) as kept on the agents that ran it. Without
    /// --allocation, each allocation in unit order, after a `==> ALLOCATION ... <==` line.
    Logs {
        job: String,
        /// Keep printing as the output grows, until the allocation (or the whole job) ends.
        #[arg(short, long)]
        follow: bool,
        /// One allocation of the job (an id from `gantry status JOB`).
        #[arg(long)]
        allocation: Option<String>,
        /// Standard error instead of standard output.
        #[arg(long)]
        stderr: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Serving jobs: their gateway paths (/serve/NAME/ on any coordinator) and replicas.
    Endpoints {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the fleet's nodes with their capacity and status.
    Nodes {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Write a commented job file to start from: the job in a few lines, every default shown.
    New(templates::NewArgs),
    /// Run a small example ML program built into gantry (train, batch-infer or serve a model);
    /// what the job templates and examples/ run, with no files or network needed.
    Workload(workloads::WorkloadArgs),
    /// Write one tarball from which a site with no network installs Gantry: the static binary,
    /// an image of it for Docker hosts, systemd units, configs and an install script.
    Bundle(bundle::BundleArgs),
    /// Print a shell completion script: `gantry completions bash > /etc/bash_completion.d/gantry`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum ImagesCommand {
    /// Load the images of a tarball (from `docker save`) into the local Docker daemon, so that
    /// jobs naming them run here without a registry. Prints each image loaded.
    Load {
        /// The tarball, as written by `docker save IMAGE -o FILE.tar`.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum QuotaCommand {
    /// Limit the GPUs a team may hold at once.
    Set {
        team: String,
        /// GPUs; omit with --unlimited to remove the limit.
        #[arg(long, required_unless_present = "unlimited")]
        gpus: Option<u32>,
        #[arg(long, conflicts_with = "gpus")]
        unlimited: bool,
    },
    /// List the quotas.
    List {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Show the policy.
    Show,
    /// Change the policy.
    Set {
        /// Refuse images named by a tag alone: jobs must pin `name@sha256:...` or an image id.
        #[arg(long, action = clap::ArgAction::Set)]
        require_digest: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Leader, term, and each member's address, role and applied index.
    Status {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Remove a member (by the id `gantry cluster status` shows).
    Remove { node_id: u64 },
}

#[derive(Args)]
struct CoordinatorArgs {
    /// TOML file with any of: data_dir, listen, http, heartbeat_interval, agent_ttl, agent_cert_ttl.
    /// Flags and GANTRY_* variables override it.
    #[arg(long, env = "GANTRY_COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Directory for the cluster CA, keys and state.
    #[arg(long, env = "GANTRY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// QUIC address agents (and later peer coordinators) connect to [default: 0.0.0.0:7443].
    #[arg(long, env = "GANTRY_LISTEN")]
    listen: Option<SocketAddr>,
    /// HTTP API address [default: 127.0.0.1:7080].
    #[arg(long, env = "GANTRY_HTTP")]
    http: Option<SocketAddr>,
    /// Create a new cluster (CA, cluster key, admin token) if the data dir holds none.
    #[arg(long, conflicts_with = "join")]
    init: bool,
    /// Join an existing cluster: a token from `gantry token create --role coordinator`, '@', and
    /// any member's --listen address. Needed only the first time; a restart uses the data dir.
    #[arg(
        long,
        env = "GANTRY_COORDINATOR_JOIN",
        hide_env_values = true,
        value_name = "TOKEN@SEED_ADDR"
    )]
    join: Option<String>,
    /// The QUIC address other coordinators and agents use to reach this one [default: --listen].
    #[arg(long, env = "GANTRY_ADVERTISE_QUIC")]
    advertise_quic: Option<SocketAddr>,
    /// The HTTP address other coordinators forward writes to [default: --http].
    #[arg(long, env = "GANTRY_ADVERTISE_HTTP")]
    advertise_http: Option<SocketAddr>,
    /// Snapshot the state and compact the Raft log every this many entries at least
    /// [default: 10000]; by default also only once the log since the last snapshot weighs as
    /// many bytes as that snapshot did.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_every_entries: Option<u64>,
    /// Snapshot every --snapshot-every-entries entries, whatever their size (for tests that
    /// need frequent snapshots).
    #[arg(long)]
    snapshot_by_count_only: bool,
    /// How often agents heartbeat [default: 3s].
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// An agent silent for longer than this is down [default: 15s].
    #[arg(long, value_parser = humantime::parse_duration)]
    agent_ttl: Option<Duration>,
    /// Lifetime of the certificates issued to agents; they renew at two thirds [default: 24h].
    #[arg(long, value_parser = humantime::parse_duration)]
    agent_cert_ttl: Option<Duration>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CoordinatorFile {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    http: Option<SocketAddr>,
    advertise_quic: Option<SocketAddr>,
    advertise_http: Option<SocketAddr>,
    #[serde(default, with = "humantime_serde_opt")]
    heartbeat_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    agent_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    agent_cert_ttl: Option<Duration>,
}

mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(deserializer)?;
        text.map(|t| {
            humantime::parse_duration(&t)
                .map_err(|e| serde::de::Error::custom(format!("{t:?}: {e}")))
        })
        .transpose()
    }
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AgentArgs {
    #[command(subcommand)]
    command: Option<AgentCommand>,
    /// Coordinator QUIC addresses (HOST:PORT), comma-separated; tried in turn.
    #[arg(long, env = "GANTRY_COORDINATORS", value_delimiter = ',')]
    coordinator: Vec<String>,
    /// Join token from `gantry token create --role agent`; needed only the first time.
    #[arg(long, env = "GANTRY_JOIN_TOKEN", hide_env_values = true)]
    join: Option<String>,
    /// Directory for the agent's certificate and key.
    #[arg(long, env = "GANTRY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Agent config file (TOML): site, kind, costs, labels, declared GPUs, allow_process.
    #[arg(long, env = "GANTRY_AGENT_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Print, as JSON, what this host would report: capacity, GPUs and usable runtimes.
    Fingerprint {
        /// Agent config file (TOML).
        #[arg(long, env = "GANTRY_AGENT_CONFIG")]
        config: Option<PathBuf>,
        /// Directory whose file system's size is reported [default: current directory].
        #[arg(long, env = "GANTRY_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a join token. The token alone goes to stdout; explanations go to stderr.
    Create {
        /// Who may join with it.
        #[arg(long, value_parser = ["agent", "coordinator"])]
        role: String,
        /// How long it stays valid (such as 30m, 1h, 7d).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

fn main() {
    let cli = Cli::parse();
    // A coordinator serves HTTP, QUIC and its Raft loop on one thread (raft log writes go to a
    // blocking thread): a request then crosses no threads on its way to the log and back, which
    // measured 15% more one-client commits than a multi-threaded runtime and as many at 512.
    let runtime = if matches!(cli.command, Command::Coordinator(_)) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build()
    .expect("start the tokio runtime");
    runtime.block_on(main_async(cli));
}

async fn main_async(cli: Cli) {
    let daemon = matches!(
        cli.command,
        Command::Coordinator(_) | Command::Agent(AgentArgs { command: None, .. })
    );
    // The demo tells its own story; its fleet's warnings (an agent down, on purpose) would only
    // interrupt it. RUST_LOG still shows them.
    let demo = matches!(cli.command, Command::Demo { .. });
    init_tracing(if daemon {
        "info"
    } else if demo {
        "error"
    } else {
        "warn"
    });
    let long_running = daemon || matches!(cli.command, Command::Demo { .. } | Command::Workload(_));
    if !long_running {
        // A command whose output goes to `head` ends quietly when the reader goes away, as
        // other command-line tools do; servers keep Rust's default (SIGPIPE ignored).
        // SAFETY: setting a signal's disposition to the default touches no Rust state.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(error) = dispatch(cli).await {
        eprintln!("error: {error:#}");
        std::process::exit(output::exit_code_for(&error));
    }
}

async fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Coordinator(args) => run_coordinator(args).await,
        Command::Agent(args) => run_agent(args).await,
        Command::Token {
            command: TokenCommand::Create { role, ttl },
            api,
        } => create_token(&api, role, ttl).await,
        Command::Nodes { output, api } => list_nodes(&api, output).await,
        Command::Submit {
            file,
            idempotency_key,
            api,
        } => submit(&api, &file, idempotency_key).await,
        Command::Jobs { output, api } => list_jobs(&api, output).await,
        Command::Status { job, output, api } => job_status(&api, &job, output).await,
        Command::Cancel { job, api } => cancel(&api, &job).await,
        Command::Update { job, file, api } => update(&api, &job, &file).await,
        Command::Cluster { command, api } => cluster(&api, command).await,
        Command::Explain { job, output, api } => explain(&api, &job, output).await,
        Command::Quota { command, api } => quota(&api, command).await,
        Command::Policy { command, api } => policy(&api, command).await,
        Command::Artifacts {
            job,
            name,
            out,
            api,
        } => artifacts(&api, &job, name.as_deref(), out.as_deref()).await,
        Command::Logs {
            job,
            follow,
            allocation,
            stderr,
            api,
        } => logs(&api, &job, allocation, stderr, follow).await,
        Command::Endpoints { output, api } => endpoints(&api, output).await,
        Command::Demo {
            keep,
            output,
            json,
            runtime,
        } => {
            let output = if json { Output::Json } else { output };
            demo::run(demo::DemoOptions {
                keep,
                runtime,
                output,
            })
            .await
        }
        Command::New(args) => templates::run(args),
        Command::Workload(args) => workloads::run(args).await,
        Command::Bundle(args) => bundle::run(args).await,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "gantry", &mut std::io::stdout());
            Ok(())
        }
        Command::Images {
            command: ImagesCommand::Load { file },
        } => load_images(&file).await,
        Command::Render {
            file,
            runtime,
            namespace,
            work_root,
            output,
        } => {
            let spec = read_job_file(&file)?;
            let documents = render::render(&spec, runtime, &namespace, &work_root)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            match output {
                // Several YAML documents, as `kubectl apply -f` takes them.
                Output::Yaml | Output::Table => {
                    for document in &documents {
                        print!("---\n{}", serde_yaml_ng::to_string(document)?);
                    }
                    Ok(())
                }
                Output::Json => output::emit(output, &documents, |_| {}),
            }
        }
    }
}

async fn load_images(file: &Path) -> Result<()> {
    let docker = gantry_agent::runtime::docker::connect()
        .await
        .map_err(anyhow::Error::msg)
        .context("connect to the local Docker daemon")?;
    let loaded = gantry_agent::runtime::docker::load_image(&docker, file)
        .await
        .map_err(anyhow::Error::msg)?;
    for image in loaded {
        println!("{image}");
    }
    Ok(())
}

fn read_toml<T: for<'de> Deserialize<'de>>(path: &Path, what: &str) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("read {what} {}", path.display()))?;
    toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{what} {}: {}", path.display(), e.to_string().trim_end()))
}

async fn run_coordinator(args: CoordinatorArgs) -> Result<()> {
    let file: CoordinatorFile = match &args.config {
        Some(path) => read_toml(path, "coordinator config")?,
        None => CoordinatorFile::default(),
    };
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .context("no data dir: pass --data-dir DIR (or set data_dir in the config file)")?;
    let listen = args
        .listen
        .or(file.listen)
        .unwrap_or_else(|| "0.0.0.0:7443".parse().expect("literal"));
    let http = args
        .http
        .or(file.http)
        .unwrap_or_else(|| "127.0.0.1:7080".parse().expect("literal"));
    let mut config = gantry_coordinator::CoordinatorConfig::new(data_dir.clone());
    if let Some(interval) = args.heartbeat_interval.or(file.heartbeat_interval) {
        config.heartbeat_interval = interval;
    }
    if let Some(ttl) = args.agent_ttl.or(file.agent_ttl) {
        config.agent_ttl = ttl;
    }
    if let Some(ttl) = args.agent_cert_ttl.or(file.agent_cert_ttl) {
        config.agent_cert_ttl = ttl;
    }
    if config.heartbeat_interval.is_zero() || config.agent_ttl <= config.heartbeat_interval {
        bail!(
            "--agent-ttl ({:?}) must be longer than --heartbeat-interval ({:?}), which must not be zero",
            config.agent_ttl,
            config.heartbeat_interval
        );
    }
    if config.agent_cert_ttl < Duration::from_secs(3) {
        bail!(
            "--agent-cert-ttl must be at least 3s, got {:?}",
            config.agent_cert_ttl
        );
    }
    if let Some(every) = args.snapshot_every_entries {
        config.snapshot_every_entries = every;
    }
    config.snapshot_amortized = !args.snapshot_by_count_only;
    config.advertise_quic = args.advertise_quic.or(file.advertise_quic);
    config.advertise_http = args.advertise_http.or(file.advertise_http);
    let mut membership = gantry_coordinator::Membership::Existing;
    if !gantry_coordinator::data_dir::is_initialized(&data_dir) {
        if let Some(join) = &args.join {
            let (token, seed) = gantry_coordinator::join::parse_join(join)?;
            membership = gantry_coordinator::Membership::Join { token, seed };
        } else if args.init {
            gantry_coordinator::data_dir::init(&data_dir)?;
            eprintln!(
                "created a new cluster in {}; the admin API token is in {}",
                data_dir.display(),
                data_dir.join("admin.token").display()
            );
        } else {
            bail!(
                "data dir {} holds no cluster: pass --init to create one, or --join TOKEN@SEED_ADDR to join one",
                data_dir.display()
            );
        }
    } else if args.join.is_some() {
        eprintln!(
            "{} already belongs to a cluster; --join is ignored",
            data_dir.display()
        );
    }
    let listeners = gantry_coordinator::Listeners {
        quic: std::net::UdpSocket::bind(listen)
            .with_context(|| format!("bind QUIC address {listen}"))?,
        http: std::net::TcpListener::bind(http)
            .with_context(|| format!("bind HTTP address {http}"))?,
    };
    gantry_coordinator::run_with(config, listeners, membership, shutdown_signal()).await
}

async fn run_agent(args: AgentArgs) -> Result<()> {
    if let Some(AgentCommand::Fingerprint { config, data_dir }) = args.command {
        let config = load_agent_config(config.as_deref())?;
        let data_dir = data_dir
            .or(config.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from("."));
        let register = gantry_agent::fingerprint(&config, &data_dir).await;
        println!("{}", serde_json::to_string_pretty(&register)?);
        return Ok(());
    }
    let config = load_agent_config(args.config.as_deref())?;
    let coordinators = if args.coordinator.is_empty() {
        config.coordinators.clone()
    } else {
        args.coordinator
    };
    let data_dir = args
        .data_dir
        .or(config.data_dir.clone())
        .context("no data dir: pass --data-dir DIR (or set data_dir in the agent config)")?;
    let mut options = gantry_agent::AgentOptions::new(coordinators, data_dir, config);
    options.join_token = args.join;
    gantry_agent::run(options, shutdown_signal()).await
}

fn load_agent_config(path: Option<&Path>) -> Result<gantry_agent::config::AgentConfig> {
    Ok(match path {
        Some(path) => gantry_agent::config::AgentConfig::load(path)?,
        None => gantry_agent::config::AgentConfig::default(),
    })
}

async fn create_token(api: &ApiArgs, role: String, ttl: Duration) -> Result<()> {
    let client = ApiClient::new(&api.api, api.token.clone())?;
    let request = CreateTokenRequest {
        role,
        ttl_seconds: Some(ttl.as_secs().max(1)),
    };
    let response: CreateTokenResponse = client.post("/v1/tokens", &request).await?;
    eprintln!(
        "join token for role {}, valid for {} (until unix time {}):",
        response.role,
        humantime::format_duration(ttl),
        response.expires_at_unix_s
    );
    println!("{}", response.token);
    Ok(())
}

fn gib(bytes: u64) -> String {
    format!("{:.1}GiB", bytes as f64 / (1u64 << 30) as f64)
}

async fn list_nodes(api: &ApiArgs, output: Output) -> Result<()> {
    let client = ApiClient::new(&api.api, api.token.clone())?;
    let nodes: Vec<NodeView> = client.get("/v1/nodes").await?;
    emit(output, &nodes, |nodes| {
        let now_ms = now_unix_ms();
        let rows: Vec<[String; 9]> = nodes
            .iter()
            .map(|node| {
                let gpus = if node.gpus.is_empty() {
                    "-".to_string()
                } else {
                    format!("{}x {}", node.gpus.len(), node.gpus[0].model)
                };
                [
                    node.id.clone(),
                    node.name.clone(),
                    node.site.clone(),
                    node.status.clone(),
                    output::ago(node.status_since_unix_ms, now_ms),
                    node.cpu_cores.to_string(),
                    gib(node.memory_bytes),
                    gpus,
                    node.runtimes.join(","),
                ]
            })
            .collect();
        output::print_table_coloured(
            &[
                "ID", "NAME", "SITE", "STATUS", "SINCE", "CPUS", "MEMORY", "GPUS", "RUNTIMES",
            ],
            &rows,
            output::state_column(3),
        );
    })
}

fn random_key() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("cli-{nanos:x}-{:x}", std::process::id())
}

/// A job file (YAML, TOML or JSON by its extension), parsed and validated.
fn read_job_file(file: &Path) -> Result<gantry_protocol::jobspec::JobSpec> {
    use gantry_protocol::jobspec::{parse_spec, SpecFormat};
    let format = SpecFormat::from_path(file).with_context(|| {
        format!(
            "{}: name the file .yaml, .yml, .toml or .json so its format is known",
            file.display()
        )
    })?;
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("read job file {}", file.display()))?;
    parse_spec(&text, format).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

async fn submit(api: &ApiArgs, file: &Path, idempotency_key: Option<String>) -> Result<()> {
    let spec = read_job_file(file)?;
    let client = ApiClient::new(&api.api, api.token.clone())?;
    let key = idempotency_key.unwrap_or_else(random_key);
    let response: SubmitJobResponse = client.post_idempotent("/v1/jobs", &spec, &key).await?;
    if !response.created {
        eprintln!(
            "this Idempotency-Key was used before: job {} already exists",
            response.id
        );
    }
    println!("{}", response.id);
    Ok(())
}

/// How long a job took from submission to its end, once it has ended.
fn job_took(job: &JobView) -> Option<String> {
    ["succeeded", "failed", "cancelled"]
        .contains(&job.state.as_str())
        .then(|| {
            let took_ms = job
                .updated_at_unix_ms
                .saturating_sub(job.submitted_at_unix_ms);
            format!(
                "took {}",
                output::human_duration(Duration::from_millis(took_ms))
            )
        })
}

async fn list_jobs(api: &ApiArgs, output: Output) -> Result<()> {
    let client = ApiClient::new(&api.api, api.token.clone())?;
    let jobs: Vec<JobView> = client.get("/v1/jobs").await?;
    emit(output, &jobs, |jobs| {
        let now_ms = now_unix_ms();
        let rows: Vec<[String; 7]> = jobs
            .iter()
            .map(|j| {
                [
                    j.id.clone(),
                    j.name.clone(),
                    j.team.clone(),
                    j.kind.clone(),
                    j.state.clone(),
                    local_time_ago(j.submitted_at_unix_ms, now_ms),
                    job_took(j).unwrap_or_else(|| "-".into()),
                ]
            })
            .collect();
        output::print_table_coloured(
            &[
                "ID",
                "NAME",
                "TEAM",
                "KIND",
                "STATE",
                "SUBMITTED",
                "DURATION",
            ],
            &rows,
            output::state_column(4),
        );
    })
}

async fn job_status(api: &ApiArgs, job: &str, output: Output) -> Result<()> {
    let client = ApiClient::new(&api.api, api.token.clone())?;
    let view: JobView = client.get(&format!("/v1/jobs/{job}")).await?;
    emit(output, &view, print_job)
}

fn print_job(view: &JobView) {
    let now_ms = now_unix_ms();
    let mut rows = vec![
        ["ID".to_string(), view.id.clone()],
        ["NAME".into(), view.name.clone()],
        ["TEAM".into(), view.team.clone()],
        ["KIND".into(), view.kind.clone()],
        ["STATE".into(), view.state.clone()],
        [
            "SUBMITTED".into(),
            format!(
                "{} by {}",
                local_time_ago(view.submitted_at_unix_ms, now_ms),
                view.submitted_by
            ),
        ],
        [
            "UPDATED".into(),
            local_time_ago(view.updated_at_unix_ms, now_ms),
        ],
    ];
    if let Some(took) = job_took(view) {
        rows.push(["DURATION".into(), took]);
    }
    output::print_table_coloured(&["FIELD", "VALUE"], &rows, output::state_column(1));
    println!(
        "progress {}/{}, restarts {}",
        view.progress.succeeded, view.progress.total, view.restarts
    );
    if let Some(failure) = &view.failure {
        println!("failed: {failure}");
    }
    if !view.allocations.is_empty() {
        println!();
        let rows: Vec<[String; 6]> = view
            .allocations
            .iter()
            .map(|a| {
                let exit = a
                    .exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into());
                [
                    a.id.clone(),
                    a.unit.to_string(),
                    format!("{}/{}", a.agent, a.node),
                    a.state.clone(),
                    exit,
                    a.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        output::print_table_coloured(
            &["ALLOCATION", "UNIT", "NODE", "STATE", "EXIT", "REASON"],
            &rows,
            output::state_column(3),
        );
    }
}

async fn cancel(api: &ApiArgs, job: &str) -> Result<()> {
    let client = ApiClient::new(&api.api, api.token.clone())?;
    let _: serde_json::Value = client.delete(&format!("/v1/jobs/{job}")).await?;
    eprintln!("cancelled {job}");
    Ok(())
}

async fn cluster(api: &ApiArgs, command: ClusterCommand) -> Result<()> {
    let client = ApiClient::new(&api.api, api.token.clone())?;
    match command {
        ClusterCommand::Status { output } => {
            let view: ClusterView = client.get("/v1/cluster").await?;
            emit(output, &view, |view| {
                let leader = view
                    .leader
                    .map(|id| id.to_string())
                    .unwrap_or_else(|| "none".into());
                println!(
                    "leader {leader}, term {}, commit index {}",
                    view.term, view.commit_index
                );
                let rows: Vec<[String; 5]> = view
                    .members
                    .iter()
                    .map(|m| {
                        let role = if Some(m.id) == view.leader {
                            "leader".to_string()
                        } else {
                            m.role.clone()
                        };
                        let applied = m
                            .applied_index
                            .map(|i| i.to_string())
                            .unwrap_or_else(|| "?".into());
                        [
                            m.id.to_string(),
                            m.addr.clone(),
                            m.http_addr.clone(),
                            role,
                            applied,
                        ]
                    })
                    .collect();
                output::print_table_coloured(
                    &["ID", "ADDR", "HTTP", "ROLE", "APPLIED"],
                    &rows,
                    output::state_column(3),
                );
            })?;
        }
        ClusterCommand::Remove { node_id } => {
            let _: serde_json::Value = client
                .delete(&format!("/v1/cluster/members/{node_id}"))
                .await?;
            eprintln!("removed member {node_id}");
        }
    }
    Ok(())
}

async fn explain(api: &ApiArgs, job: &str, output: Output) -> Result<()> {
    let client = ApiClient::new(&api.api, api.token.clone())?;
    let view: gantry_coordinator::api::types::ExplainView =
        client.get(&format!("/v1/jobs/{job}/explain")).await?;
    emit(output, &view, |view| {
        if view.units.is_empty() {
            println!(
                "{} is {}: no unit is waiting for a node",
                view.job, view.state
            );
        }
        for unit in &view.units {
            println!("unit {}: {}", unit.unit, unit.reason);
            let filtered: Vec<String> = unit
                .filtered
                .iter()
                .map(|f| format!("{} {}", f.filter, f.nodes))
                .collect();
            println!(
                "  {} nodes; removed by filter: {}",
                unit.nodes_total,
                if filtered.is_empty() {
                    "none".into()
                } else {
                    filtered.join(", ")
                }
            );
            for candidate in &unit.candidates {
                println!("  candidate {} score {}", candidate.node, candidate.score);
            }
        }
    })
}

async fn quota(api: &ApiArgs, command: QuotaCommand) -> Result<()> {
    let client = ApiClient::new(&api.api, api.token.clone())?;
    match command {
        QuotaCommand::Set { team, gpus, .. } => {
            let _: serde_json::Value = client
                .put(
                    &format!("/v1/quotas/{team}"),
                    &serde_json::json!({ "gpus": gpus }),
                )
                .await?;
            match gpus {
                Some(gpus) => eprintln!("team {team} may hold {gpus} GPU(s)"),
                None => eprintln!("team {team} has no GPU limit"),
            }
        }
        QuotaCommand::List { output } => {
            let quotas: std::collections::BTreeMap<String, u32> = client.get("/v1/quotas").await?;
            emit(output, &quotas, |quotas| {
                let rows: Vec<[String; 2]> = quotas
                    .iter()
                    .map(|(team, gpus)| [team.clone(), gpus.to_string()])
                    .collect();
                print_table(&["TEAM", "GPUS"], &rows);
            })?;
        }
    }
    Ok(())
}

async fn policy(api: &ApiArgs, command: PolicyCommand) -> Result<()> {
    let client = ApiClient::new(&api.api, api.token.clone())?;
    let policy: serde_json::Value = match command {
        PolicyCommand::Show => client.get("/v1/policy").await?,
        PolicyCommand::Set { require_digest } => {
            client
                .put(
                    "/v1/policy",
                    &serde_json::json!({ "require_digest": require_digest }),
                )
                .await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&policy)?);
    Ok(())
}

async fn artifacts(api: &ApiArgs, job: &str, name: Option<&str>, out: Option<&Path>) -> Result<()> {
    let client = ApiClient::new(&api.api, api.token.clone())?;
    let Some(name) = name else {
        let view: JobView = client.get(&format!("/v1/jobs/{job}")).await?;
        let rows: Vec<[String; 3]> = view
            .artifacts
            .iter()
            .map(|a| [a.name.clone(), a.size_bytes.to_string(), a.sha256.clone()])
            .collect();
        print_table(&["NAME", "BYTES", "SHA256"], &rows);
        return Ok(());
    };
    let data = client
        .get_bytes(&format!("/v1/jobs/{job}/artifacts/{name}"))
        .await?;
    match out {
        Some(path) => {
            std::fs::write(path, &data).with_context(|| format!("write {}", path.display()))?;
            eprintln!("wrote {} ({} bytes)", path.display(), data.len());
        }
        None => std::io::Write::write_all(&mut std::io::stdout(), &data)?,
    }
    Ok(())
}

async fn update(api: &ApiArgs, job: &str, file: &Path) -> Result<()> {
    let spec = read_job_file(file)?;
    let client = ApiClient::new(&api.api, api.token.clone())?;
    let answer: serde_json::Value = client.put(&format!("/v1/jobs/{job}"), &spec).await?;
    eprintln!(
        "{job} is at generation {}; its replicas roll over",
        answer["generation"]
    );
    Ok(())
}

/// Times a broken `--follow` stream of one allocation is resumed from where it broke off.
const LOG_RESUMES_MAX: u32 = 5;

async fn logs(
    api: &ApiArgs,
    job: &str,
    allocation: Option<String>,
    stderr: bool,
    follow: bool,
) -> Result<()> {
    use std::io::Write;
    let client = ApiClient::new(&api.api, api.token.clone())?;
    let stream = if stderr { "stderr" } else { "stdout" };
    let mut offset: Option<u64> = None;
    let mut resumes = 0;
    let mut stdout = std::io::stdout().lock();
    loop {
        let mut path = format!("/v1/jobs/{job}/logs?stream={stream}&follow={follow}");
        if let Some(allocation) = &allocation {
            path += &format!("&allocation={allocation}&offset={}", offset.unwrap_or(0));
        }
        let mut response = client.get_stream(&path).await?;
        let start = response
            .headers()
            .get(gantry_coordinator::api::logs::OFFSET_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let (Some(start), Some(asked)) = (start, offset.or(allocation.as_ref().map(|_| 0))) {
            if start > asked {
                eprintln!(
                    "({} bytes of older output were rotated away on the agent)",
                    start - asked
                );
            }
        }
        let mut received = 0u64;
        let broke = loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    received += chunk.len() as u64;
                    stdout.write_all(&chunk).context("write to stdout")?;
                    stdout.flush().context("write to stdout")?;
                }
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        };
        let Some(error) = broke else {
            return Ok(());
        };
        // Only one allocation's stream can resume at a byte offset.
        match (follow, start) {
            (true, Some(start)) if allocation.is_some() && resumes < LOG_RESUMES_MAX => {
                resumes += 1;
                offset = Some(start + received);
                eprintln!("(the log stream broke off: {error}; resuming)");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            _ => bail!("the log stream broke off: {error}"),
        }
    }
}

async fn endpoints(api: &ApiArgs, output: Output) -> Result<()> {
    let client = ApiClient::new(&api.api, api.token.clone())?;
    let endpoints: Vec<EndpointView> = client.get("/v1/endpoints").await?;
    match output {
        Output::Json | Output::Yaml => output::emit(output, &endpoints, |_| {})?,
        Output::Table => {
            let mut rows: Vec<[String; 6]> = Vec::new();
            for endpoint in &endpoints {
                let path = if endpoint.routed {
                    endpoint.path.clone()
                } else {
                    format!("{} (taken by a newer job)", endpoint.path)
                };
                let replicas: Vec<[String; 3]> = endpoint
                    .replicas
                    .iter()
                    .map(|r| {
                        let state = if r.healthy {
                            "healthy".to_string()
                        } else if r.state == "healthy" {
                            "healthy (not routed)".to_string()
                        } else {
                            r.state.clone()
                        };
                        [
                            r.allocation.clone(),
                            r.address.clone().unwrap_or_else(|| "-".into()),
                            state,
                        ]
                    })
                    .collect();
                if replicas.is_empty() {
                    rows.push([
                        endpoint.name.clone(),
                        endpoint.job.clone(),
                        path.clone(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                    ]);
                }
                for [allocation, address, state] in replicas {
                    rows.push([
                        endpoint.name.clone(),
                        endpoint.job.clone(),
                        path.clone(),
                        allocation,
                        address,
                        state,
                    ]);
                }
            }
            print_table(
                &["NAME", "JOB", "PATH", "REPLICA", "ADDRESS", "STATE"],
                &rows,
            );
        }
    }
    Ok(())
}
