//! `gantry`: every role (coordinator, agent) and the CLI in one static binary, so an air-gapped
//! site installs by copying one file.

mod client;
mod demo;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use client::ApiClient;
use gantry_coordinator::api::types::{CreateTokenRequest, CreateTokenResponse, NodeView};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "gantry",
    version,
    about = "Run ML work across a hybrid fleet of GPU servers, Docker hosts and Kubernetes clusters."
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
    /// Start a whole local fleet in this process (coordinator and three agents on loopback) and
    /// show it working: join, capacity, an agent killed and brought back.
    Demo {
        /// Leave the cluster running afterwards and print how to point the CLI at it.
        #[arg(long)]
        keep: bool,
    },
    /// List the fleet's nodes with their capacity and status.
    Nodes {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        api: ApiArgs,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
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
    #[arg(long)]
    init: bool,
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

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let daemon = matches!(
        cli.command,
        Command::Coordinator(_) | Command::Agent(AgentArgs { command: None, .. })
    );
    init_tracing(if daemon { "info" } else { "warn" });
    if let Err(error) = dispatch(cli).await {
        eprintln!("error: {error:#}");
        std::process::exit(1);
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
        Command::Demo { keep } => demo::run(keep).await,
    }
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
    if !gantry_coordinator::data_dir::is_initialized(&data_dir) {
        if !args.init {
            bail!(
                "data dir {} holds no cluster: pass --init to create one",
                data_dir.display()
            );
        }
        gantry_coordinator::data_dir::init(&data_dir)?;
        eprintln!(
            "created a new cluster in {}; the admin API token is in {}",
            data_dir.display(),
            data_dir.join("admin.token").display()
        );
    }
    let listeners = gantry_coordinator::Listeners {
        quic: std::net::UdpSocket::bind(listen)
            .with_context(|| format!("bind QUIC address {listen}"))?,
        http: std::net::TcpListener::bind(http)
            .with_context(|| format!("bind HTTP address {http}"))?,
    };
    gantry_coordinator::run(config, listeners, shutdown_signal()).await
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
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&nodes)?),
        Output::Table => {
            let rows: Vec<[String; 8]> = nodes
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
                        node.cpu_cores.to_string(),
                        gib(node.memory_bytes),
                        gpus,
                        node.runtimes.join(","),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ID", "NAME", "SITE", "STATUS", "CPUS", "MEMORY", "GPUS", "RUNTIMES",
                ],
                &rows,
            );
        }
    }
    Ok(())
}

pub(crate) fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
