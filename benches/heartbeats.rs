//! Heartbeat load on one coordinator: N simulated agents, each with its own certificate and QUIC
//! connection over loopback, register and heartbeat at a fixed interval. Reports heartbeats per
//! second and the coordinator process's CPU (whole process, from /proc), and the RSS of one real
//! idle agent process.
//!
//! cargo bench --bench heartbeats -- [--agents 5000] [--interval-ms 5000] [--measure-s 30]
mod common;

use common::{free_port, Guard};

use gantry_protocol::pki::{self, ClusterCa, COORDINATOR_SERVER_NAME};
use gantry_protocol::tls::{self, NodeCredentials};
use gantry_protocol::transport::{self, ALPN_AGENT};
use gantry_protocol::{AgentMessage, CoordinatorMessage, Heartbeat, Role};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

struct Options {
    agents: usize,
    interval: Duration,
    measure: Duration,
}

fn options() -> Options {
    let mut options = Options {
        agents: 5000,
        interval: Duration::from_secs(5),
        measure: Duration::from_secs(30),
    };
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut i = 0;
    while i < args.len() {
        let value = || {
            args.get(i + 1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--agents" => options.agents = value() as usize,
            "--interval-ms" => options.interval = Duration::from_millis(value()),
            "--measure-s" => options.measure = Duration::from_secs(value()),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    options
}

/// User plus system CPU time of a process, in clock ticks turned into seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

struct SimulatedAgent {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    credentials: NodeCredentials,
    register: gantry_protocol::Register,
    interval: Duration,
    /// Offset of this agent's first heartbeat, spreading the fleet over the interval.
    phase: Duration,
    sent: Arc<AtomicU64>,
    registered: Arc<AtomicU64>,
}

async fn simulated_agent(agent: SimulatedAgent) {
    let SimulatedAgent {
        endpoint,
        addr,
        credentials,
        register,
        interval,
        phase,
        sent,
        registered,
    } = agent;
    let config =
        transport::quinn_client_config(tls::client_config(&credentials, ALPN_AGENT).unwrap())
            .unwrap();
    let connection = endpoint
        .connect_with(config, addr, COORDINATOR_SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv, _) = transport::client_hello(&connection, "bench-agent")
        .await
        .unwrap();
    send.send(&AgentMessage::Register(register)).await.unwrap();
    match recv.expect::<CoordinatorMessage>().await.unwrap() {
        CoordinatorMessage::Welcome(_) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    registered.fetch_add(1, Ordering::Relaxed);
    tokio::spawn(async move { while let Ok(Some(_)) = recv.recv::<CoordinatorMessage>().await {} });
    tokio::time::sleep(phase).await;
    let mut tick = tokio::time::interval(interval);
    let mut seq = 0;
    loop {
        tick.tick().await;
        seq += 1;
        if send
            .send(&AgentMessage::Heartbeat(Heartbeat { seq }))
            .await
            .is_err()
        {
            return;
        }
        sent.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::main]
async fn main() {
    let options = options();
    let gantry = env!("CARGO_BIN_EXE_gantry");
    let dir = tempfile::tempdir().unwrap();
    let quic: SocketAddr = format!("127.0.0.1:{}", free_port(true)).parse().unwrap();
    let http = format!("127.0.0.1:{}", free_port(false));
    let interval_ms = options.interval.as_millis().to_string();
    let coordinator = Guard(
        Command::new(gantry)
            .args([
                "coordinator",
                "--init",
                "--listen",
                &quic.to_string(),
                "--http",
                &http,
            ])
            .args([
                "--heartbeat-interval",
                &format!("{interval_ms}ms"),
                "--agent-ttl",
                &format!("{}ms", options.interval.as_millis() * 6),
            ])
            .arg("--data-dir")
            .arg(dir.path().join("c"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let data = dir.path().join("c");
    while !data.join("ca.crt").exists() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = |name: &str| std::fs::read_to_string(data.join(name)).unwrap();
    let ca = ClusterCa::from_pem(&read("ca.crt"), &read("ca.key")).unwrap();
    let admin = read("admin.token");

    eprintln!("issuing {} agent certificates...", options.agents);
    let now = SystemTime::now();
    let credentials: Vec<NodeCredentials> = (0..options.agents)
        .map(|i| {
            let (key, csr) = pki::generate_key_and_csr("bench").unwrap();
            let cert = ca
                .issue(
                    &csr,
                    Role::Agent,
                    &format!("agent-bench-{i:05}"),
                    now,
                    Duration::from_secs(3600),
                )
                .unwrap();
            NodeCredentials {
                ca_der: ca.cert_der().clone(),
                cert_der: cert,
                key_der: pki::private_key_der(&key),
            }
        })
        .collect();
    let register = gantry_agent::fingerprint(&Default::default(), dir.path()).await;

    let sent = Arc::new(AtomicU64::new(0));
    let registered = Arc::new(AtomicU64::new(0));
    let endpoints: Vec<quinn::Endpoint> = (0..8)
        .map(|_| transport::client_endpoint(quic).unwrap())
        .collect();
    let connect_started = Instant::now();
    for (i, credentials) in credentials.into_iter().enumerate() {
        let phase = options.interval.mul_f64(i as f64 / options.agents as f64);
        tokio::spawn(simulated_agent(SimulatedAgent {
            endpoint: endpoints[i % endpoints.len()].clone(),
            addr: quic,
            credentials,
            register: register.clone(),
            interval: options.interval,
            phase,
            sent: sent.clone(),
            registered: registered.clone(),
        }));
        // Keep the handshake rate within what a fleet coming up would produce.
        while i as u64 + 1 - registered.load(Ordering::Relaxed) > 64 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    while (registered.load(Ordering::Relaxed) as usize) < options.agents {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    eprintln!(
        "{} agents registered in {connect_s:.1} s; settling for one interval...",
        options.agents
    );
    tokio::time::sleep(options.interval + Duration::from_secs(1)).await;

    let pid = coordinator.0.id();
    let cpu_before = cpu_seconds(pid);
    let sent_before = sent.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(options.measure).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu_before;
    let heartbeats = sent.load(Ordering::Relaxed) - sent_before;
    let coordinator_rss = rss_bytes(pid);

    let nodes: serde_json::Value = reqwest::Client::new()
        .get(format!("http://{http}/v1/nodes"))
        .bearer_auth(admin.trim())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ready = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["status"] == "ready")
        .count();

    // One real agent process, idle after registering.
    let token: serde_json::Value = reqwest::Client::new()
        .post(format!("http://{http}/v1/tokens"))
        .bearer_auth(admin.trim())
        .json(&serde_json::json!({"role": "agent"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let agent = Guard(
        Command::new(gantry)
            .args([
                "agent",
                "--coordinator",
                &quic.to_string(),
                "--join",
                token["token"].as_str().unwrap(),
            ])
            .arg("--data-dir")
            .arg(dir.path().join("a"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let agent_rss = rss_bytes(agent.0.id());

    let core_fraction = cpu / elapsed;
    println!("agents                      {}", options.agents);
    println!(
        "heartbeat interval          {} ms",
        options.interval.as_millis()
    );
    println!("agents ready at the end     {ready}");
    println!(
        "registration                {:.0} agents/s",
        options.agents as f64 / connect_s
    );
    println!(
        "heartbeats handled          {:.0} /s over {elapsed:.0} s",
        heartbeats as f64 / elapsed
    );
    println!(
        "coordinator CPU             {:.1}% of one core",
        core_fraction * 100.0
    );
    println!(
        "coordinator CPU per 1,000   {:.2}% of one core",
        core_fraction * 100.0 * 1000.0 / options.agents as f64
    );
    println!(
        "coordinator RSS             {:.1} MiB",
        coordinator_rss as f64 / (1 << 20) as f64
    );
    println!(
        "idle agent RSS              {:.1} MiB",
        agent_rss as f64 / (1 << 20) as f64
    );
    drop(agent);
    drop(coordinator);
}
