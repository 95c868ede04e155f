//! `gantry demo`: a whole local fleet in one process on loopback, with nothing to install and no
//! network: a coordinator with a fresh CA, three agents standing for a hybrid fleet (on-prem GPUs,
//! cloud GPUs, a CPU-only host) that join with a token over QUIC and mutual TLS, one of them
//! killed and brought back with its stored certificate; then ML work on it (see [`ml`]).

mod ml;

use crate::client::ApiClient;
use anyhow::{bail, Context, Result};
use gantry_coordinator::api::types::{CreateTokenRequest, CreateTokenResponse, NodeView};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const FLEET: [(&str, &str); 3] = [
    (
        "onprem-gpu",
        "name = \"onprem-gpu\"\nsite = \"onprem-a\"\nkind = \"on-prem\"\ncost_per_gpu_hour = 1.10\ncost_per_cpu_hour = 0.01\n[[gpus]]\nmodel = \"H100\"\nmemory = \"80GiB\"\ncount = 8\n",
    ),
    (
        "cloud-gpu",
        "name = \"cloud-gpu\"\nsite = \"aws-us-east-1\"\nkind = \"cloud\"\ncost_per_gpu_hour = 3.20\ncost_per_cpu_hour = 0.04\n[[gpus]]\nmodel = \"A100\"\nmemory = \"40GiB\"\ncount = 8\n",
    ),
    (
        "cpu-only",
        "name = \"cpu-only\"\nsite = \"onprem-b\"\nkind = \"on-prem\"\ncost_per_cpu_hour = 0.01\nallow_process = true\n",
    ),
];

struct Agent {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<()>>,
}

fn start_agent(
    quic: std::net::SocketAddr,
    dir: &Path,
    name: &str,
    config: &str,
    token: Option<String>,
) -> Result<Agent> {
    let config = gantry_agent::config::AgentConfig::parse(config, name)?;
    let mut options =
        gantry_agent::AgentOptions::new(vec![quic.to_string()], dir.join(name), config);
    options.join_token = token;
    options.backoff_max = Duration::from_secs(1);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(gantry_agent::run(options, async {
        let _ = stopped.await;
    }));
    Ok(Agent {
        stop: Some(stop),
        task,
    })
}

async fn wait_for(
    api: &ApiClient,
    what: &str,
    timeout: Duration,
    check: impl Fn(&[NodeView]) -> bool,
) -> Result<Vec<NodeView>> {
    let deadline = Instant::now() + timeout;
    loop {
        let nodes: Vec<NodeView> = api.get("/v1/nodes").await?;
        if check(&nodes) {
            return Ok(nodes);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn print_nodes(nodes: &[NodeView]) {
    let rows: Vec<[String; 7]> = nodes
        .iter()
        .map(|n| {
            [
                n.name.clone(),
                n.site.clone(),
                n.site_kind.clone(),
                n.status.clone(),
                n.cpu_cores.to_string(),
                if n.gpus.is_empty() {
                    "-".into()
                } else {
                    format!(
                        "{}x {} (${:.2}/GPU-h)",
                        n.gpus.len(),
                        n.gpus[0].model,
                        n.cost_per_gpu_hour
                    )
                },
                n.runtimes.join(","),
            ]
        })
        .collect();
    crate::print_table(
        &["NAME", "SITE", "KIND", "STATUS", "CPUS", "GPUS", "RUNTIMES"],
        &rows,
    );
}

pub async fn run(keep: bool) -> Result<()> {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("gantry-demo-")
        .tempdir()
        .context("create a temporary data dir")?;
    let coordinator_dir = dir.path().join("coordinator");
    gantry_coordinator::data_dir::init(&coordinator_dir)?;
    let mut config = gantry_coordinator::CoordinatorConfig::new(coordinator_dir.clone());
    config.heartbeat_interval = Duration::from_millis(500);
    config.agent_ttl = Duration::from_secs(3);
    let listeners = gantry_coordinator::Listeners {
        quic: std::net::UdpSocket::bind("127.0.0.1:0").context("bind QUIC")?,
        http: std::net::TcpListener::bind("127.0.0.1:0").context("bind HTTP")?,
    };
    let quic = listeners.quic.local_addr()?;
    let http = listeners.http.local_addr()?;
    let (stop_coordinator, coordinator_stopped) = oneshot::channel::<()>();
    let coordinator = tokio::spawn(gantry_coordinator::run(config, listeners, async {
        let _ = coordinator_stopped.await;
    }));
    let admin_token = std::fs::read_to_string(coordinator_dir.join("admin.token"))?;
    let api = ApiClient::new(&http.to_string(), Some(admin_token.clone()))?;
    println!(
        "1. coordinator up: QUIC {quic}, HTTP API {http}, new cluster CA in {}",
        coordinator_dir.display()
    );

    let token: CreateTokenResponse = api
        .post(
            "/v1/tokens",
            &CreateTokenRequest {
                role: "agent".into(),
                ttl_seconds: Some(600),
            },
        )
        .await?;
    println!("2. join token created (pins the CA's SHA-256, valid 10 minutes)");

    let serving_ports = ml::serving_ports()?;
    let mut agents = Vec::new();
    for (name, config) in FLEET {
        agents.push(start_agent(
            quic,
            dir.path(),
            name,
            &format!("{serving_ports}{config}"),
            Some(token.token.clone()),
        )?);
    }
    let nodes = wait_for(
        &api,
        "three ready agents",
        Duration::from_secs(30),
        |nodes| nodes.len() == 3 && nodes.iter().all(|n| n.status == "ready"),
    )
    .await?;
    println!("3. three agents joined over QUIC with mutual TLS and reported their capacity:\n");
    print_nodes(&nodes);

    let victim = agents.remove(1);
    victim.task.abort();
    let killed_at = Instant::now();
    println!("\n4. stopped the cloud agent abruptly; the coordinator waits out its 3 s TTL...");
    let nodes = wait_for(
        &api,
        "the cloud agent to be down",
        Duration::from_secs(30),
        |nodes| {
            nodes
                .iter()
                .any(|n| n.name == "cloud-gpu" && n.status == "down")
        },
    )
    .await?;
    println!(
        "   declared down {:.1} s after it went silent:\n",
        killed_at.elapsed().as_secs_f64()
    );
    print_nodes(&nodes);

    agents.insert(
        1,
        start_agent(
            quic,
            dir.path(),
            FLEET[1].0,
            &format!("{serving_ports}{}", FLEET[1].1),
            None,
        )?,
    );
    let nodes = wait_for(
        &api,
        "the cloud agent to be back",
        Duration::from_secs(30),
        |nodes| nodes.len() == 3 && nodes.iter().all(|n| n.status == "ready"),
    )
    .await?;
    println!("\n5. restarted it with no token: its stored certificate let it back in as the same node:\n");
    print_nodes(&nodes);

    println!(
        "\n6. ML work, as the self-contained jobs in examples/: train, batch inference and serving, \
         run by the CPU-only agent's process runtime as `gantry workload ...`"
    );
    ml::run(&api, &dir.path().join("ml")).await?;
    println!(
        "\ndemo finished in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    if keep {
        println!("\nThe cluster stays up until Ctrl-C. Point the CLI at it:\n");
        println!("  export GANTRY_API={http}");
        println!("  export GANTRY_TOKEN={}", admin_token.trim());
        println!("  gantry nodes");
        let _ = tokio::signal::ctrl_c().await;
    }
    for mut agent in agents {
        if let Some(stop) = agent.stop.take() {
            let _ = stop.send(());
        }
        let _ = agent.task.await;
    }
    let _ = stop_coordinator.send(());
    coordinator.await.context("coordinator task")??;
    Ok(())
}
