//! Placements committed through a 3-node coordinator cluster: three coordinator processes (Raft
//! logs on disk), simulated agents connected over QUIC with large declared capacity that accept
//! assignments and run nothing, and one batch job of N shards all allowed to run at once. The
//! clock runs from the submission until every shard has an allocation, each placed by the leader's
//! scheduler and committed through Raft.
//!
//! cargo bench --bench placements -- [--units 20000] [--agents 20]

use gantry_protocol::pki::{self, ClusterCa, COORDINATOR_SERVER_NAME};
use gantry_protocol::tls::{self, NodeCredentials};
use gantry_protocol::transport::{self, ALPN_AGENT};
use gantry_protocol::{
    AgentMessage, CoordinatorMessage, NodeCapacity, Register, Role, RuntimeKind, RuntimeReport,
    SiteKind,
};
use std::net::SocketAddr;
mod common;

use common::{free_port, Guard};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

fn register(i: usize) -> Register {
    Register {
        name: format!("sim-{i}"),
        software_version: "bench".into(),
        site: "bench".into(),
        site_kind: SiteKind::OnPrem,
        cost_per_gpu_hour: 1.0,
        cost_per_cpu_hour: 0.01,
        labels: Default::default(),
        runtimes: vec![RuntimeReport {
            kind: RuntimeKind::Process,
            detail: "simulated".into(),
        }],
        nodes: vec![NodeCapacity {
            name: "local".into(),
            hostname: format!("sim-{i}"),
            os: "sim".into(),
            arch: "sim".into(),
            cpu_cores: 1024,
            memory_bytes: 4 << 40,
            disk_bytes: 1 << 40,
            disk_free_bytes: 1 << 40,
            gpus: Vec::new(),
        }],
        serving_ports: (31_000, 32_999),
        address: None,
    }
}

/// A simulated agent: registers, heartbeats, reads its assignments and runs nothing.
async fn simulated_agent(addr: SocketAddr, credentials: NodeCredentials, register: Register) {
    let endpoint = transport::client_endpoint(addr).unwrap();
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
    let interval = match recv.expect::<CoordinatorMessage>().await.unwrap() {
        CoordinatorMessage::Welcome(welcome) => {
            Duration::from_millis(welcome.heartbeat_interval_ms)
        }
        other => panic!("expected Welcome from the leader, got {other:?}"),
    };
    let mut tick = tokio::time::interval(interval);
    let mut seq = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                if send.send(&AgentMessage::Heartbeat(gantry_protocol::Heartbeat { seq })).await.is_err() { return; }
            }
            message = recv.recv::<CoordinatorMessage>() => if !matches!(message, Ok(Some(_))) { return },
        }
    }
}

#[tokio::main]
async fn main() {
    common::check_flags(&["--units", "--agents"]);
    let n_units = common::number_arg("--units", 20_000) as usize;
    let n_agents = common::number_arg("--agents", 20) as usize;
    let gantry = env!("CARGO_BIN_EXE_gantry");
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let ports: Vec<(u16, u16)> = (0..3)
        .map(|_| (free_port(true), free_port(false)))
        .collect();
    let mut guards = Vec::new();
    let spawn = |i: usize, extra: &[String]| {
        let (quic, http) = ports[i];
        Guard(
            Command::new(gantry)
                .args([
                    "coordinator",
                    "--listen",
                    &format!("127.0.0.1:{quic}"),
                    "--http",
                    &format!("127.0.0.1:{http}"),
                ])
                .arg("--data-dir")
                .arg(dir.path().join(format!("c{i}")))
                .args(extra)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    guards.push(spawn(0, &["--init".into()]));
    let data = dir.path().join("c0");
    while !data.join("admin.token").exists() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let api = format!("http://127.0.0.1:{}", ports[0].1);
    let token = loop {
        if let Ok(response) = client
            .post(format!("{api}/v1/tokens"))
            .bearer_auth(&admin)
            .json(&serde_json::json!({"role": "coordinator"}))
            .send()
            .await
        {
            let body: serde_json::Value = response.json().await.unwrap();
            break body["token"].as_str().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for i in 1..3 {
        guards.push(spawn(
            i,
            &["--join".into(), format!("{token}@127.0.0.1:{}", ports[0].0)],
        ));
    }
    let leader_quic = loop {
        let view: serde_json::Value = client
            .get(format!("{api}/v1/cluster"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let members = view["members"].as_array().cloned().unwrap_or_default();
        if members.len() == 3 && members.iter().all(|m| m["role"] == "voter") {
            let leader = view["leader"].as_u64().unwrap();
            break members
                .iter()
                .find(|m| m["id"].as_u64() == Some(leader))
                .unwrap()["addr"]
                .as_str()
                .unwrap()
                .parse::<SocketAddr>()
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let read = |name: &str| std::fs::read_to_string(data.join(name)).unwrap();
    let ca = ClusterCa::from_pem(&read("ca.crt"), &read("ca.key")).unwrap();
    for i in 0..n_agents {
        let (key, csr) = pki::generate_key_and_csr("bench").unwrap();
        let cert = ca
            .issue(
                &csr,
                Role::Agent,
                &format!("agent-sim-{i:03}"),
                SystemTime::now(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let credentials = NodeCredentials {
            ca_der: ca.cert_der().clone(),
            cert_der: cert,
            key_der: pki::private_key_der(&key),
        };
        tokio::spawn(simulated_agent(leader_quic, credentials, register(i)));
    }
    loop {
        let nodes: serde_json::Value = client
            .get(format!("{api}/v1/nodes"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if nodes
            .as_array()
            .is_some_and(|n| n.iter().filter(|n| n["status"] == "ready").count() == n_agents)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spec = serde_json::json!({ "name": "wide", "kind": "batch", "command": ["true"],
        "resources": { "cpus": 0.001, "memory": "1MiB" }, "batch": { "shards": n_units, "parallelism": n_units } });
    let started = Instant::now();
    let answer: serde_json::Value = client
        .post(format!("{api}/v1/jobs"))
        .bearer_auth(&admin)
        .json(&spec)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job = answer["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(300);
    let placed_after = loop {
        let view: serde_json::Value = client
            .get(format!("{api}/v1/jobs/{job}?stale=true"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let placed = view["allocations"].as_array().map(|a| a.len()).unwrap_or(0);
        if placed >= n_units {
            break started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "only {placed} of {n_units} placed in 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("units                {n_units} (one batch job, all allowed at once) on {n_agents} simulated agents");
    println!(
        "all placed after     {:.2} s (polled every 250 ms)",
        placed_after.as_secs_f64()
    );
    println!(
        "placements committed {:.0} /s through a 3-node cluster",
        n_units as f64 / placed_after.as_secs_f64()
    );
    drop(guards);
}
