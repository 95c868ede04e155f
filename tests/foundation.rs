//! The foundation, in process on real QUIC over loopback: agents join, register the capacity the
//! host really has, heartbeat, go down and come back; every kind of bad credential and bad bytes
//! is refused without disturbing the other connections.

mod common;

use common::*;
use gantry_agent::credentials::{self, AgentCredentials, JoinError};
use gantry_protocol::pki::{self, ClusterCa, COORDINATOR_SERVER_NAME};
use gantry_protocol::tls::{self, NodeCredentials};
use gantry_protocol::token::JoinToken;
use gantry_protocol::transport::{self, close_code, FramedRecv, FramedSend, ALPN_AGENT, ALPN_PEER};
use gantry_protocol::{AgentMessage, CoordinatorMessage, Hello, HelloReply, Role};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

const DECLARED: &str = "site = \"onprem-a\"\ncost_per_gpu_hour = 1.5\n[[gpus]]\nmodel = \"A100\"\nmemory = \"80GiB\"\ncount = 4\n";

fn mem_total_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    kib * 1024
}

async fn join_probe(coordinator: &InProcessCoordinator) -> (tempfile::TempDir, AgentCredentials) {
    let dir = tempfile::tempdir().unwrap();
    let token = coordinator.api.token("agent", 600).await;
    let credentials = credentials::join(&[coordinator.quic_addr], &token, "probe", dir.path())
        .await
        .unwrap();
    (dir, credentials)
}

async fn connect(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let endpoint = transport::client_endpoint(addr).unwrap();
    let config = transport::quinn_client_config(tls).unwrap();
    endpoint
        .connect_with(config, addr, COORDINATOR_SERVER_NAME)
        .unwrap()
        .await
}

/// Waits for the coordinator to close `connection` and returns its close reason.
async fn close_reason(connection: &quinn::Connection) -> (u32, String) {
    match tokio::time::timeout(Duration::from_secs(10), connection.closed())
        .await
        .expect("the coordinator closes the connection")
    {
        quinn::ConnectionError::ApplicationClosed(close) => (
            close.error_code.into_inner() as u32,
            String::from_utf8_lossy(&close.reason).into_owned(),
        ),
        other => panic!("expected an application close, got {other}"),
    }
}

#[tokio::test]
async fn three_agents_register_with_the_capacity_the_host_has() {
    let coordinator = InProcessCoordinator::start().await;
    let token = coordinator.api.token("agent", 600).await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let configs = [
        DECLARED,
        "site = \"cloud-b\"\nkind = \"cloud\"\nallow_process = true\n",
        "",
    ];
    let agents: Vec<_> = dirs
        .iter()
        .zip(configs)
        .map(|(dir, config)| {
            InProcessAgent::start(
                coordinator.quic_addr,
                dir.path(),
                Some(token.clone()),
                config,
            )
        })
        .collect();
    let mut ids = Vec::new();
    for agent in &agents {
        ids.push(agent.wait_id().await);
    }
    let mut nodes = Vec::new();
    for id in &ids {
        nodes.push(
            coordinator
                .api
                .wait_status(id, "ready", Duration::from_secs(10))
                .await,
        );
    }
    let cpus = std::thread::available_parallelism().unwrap().get() as u32;
    for node in &nodes {
        assert_eq!(node.cpu_cores, cpus, "{node:?}");
        assert!(
            node.memory_bytes > 0 && node.memory_bytes <= mem_total_bytes(),
            "{node:?}"
        );
        assert!(node.disk_bytes >= node.disk_free_bytes && node.disk_bytes > 0);
        assert_eq!(node.arch, std::env::consts::ARCH);
    }
    assert_eq!(nodes[0].site, "onprem-a");
    assert_eq!(nodes[0].site_kind, "on-prem");
    assert_eq!(nodes[0].cost_per_gpu_hour, 1.5);
    assert_eq!(nodes[0].gpus.len(), 4);
    assert!(nodes[0].gpus.iter().all(|gpu| gpu.model == "A100"
        && gpu.memory_bytes == 80 << 30
        && gpu.source == "declared"));
    assert_eq!(nodes[1].site_kind, "cloud");
    assert!(
        nodes[1].runtimes.contains(&"process".to_string()),
        "allow_process = true offers the process runtime"
    );
    assert!(
        !nodes[2].runtimes.contains(&"process".to_string()),
        "the process runtime is off by default"
    );
    assert!(
        nodes[2].gpus.is_empty(),
        "no NVML and nothing declared: no GPUs"
    );
    assert_eq!(coordinator.api.nodes().await.len(), 3);
    for agent in agents {
        agent.stop().await;
    }
    coordinator.stop().await;
}

#[tokio::test]
async fn a_silent_agent_is_down_after_its_ttl_and_ready_after_a_restart_with_its_stored_certificate(
) {
    let coordinator = InProcessCoordinator::start().await;
    let token = coordinator.api.token("agent", 600).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = InProcessAgent::start(coordinator.quic_addr, dir.path(), Some(token), "");
    let id = agent.wait_id().await;
    coordinator
        .api
        .wait_status(&id, "ready", Duration::from_secs(10))
        .await;
    agent.task.abort();
    let down = coordinator.api.wait_status(&id, "down", TTL * 4).await;
    assert!(
        down.last_heard_ms_ago.unwrap() as u128 >= TTL.as_millis(),
        "down only after the TTL: {down:?}"
    );
    let restarted = InProcessAgent::start(coordinator.quic_addr, dir.path(), None, "");
    coordinator
        .api
        .wait_status(&id, "ready", Duration::from_secs(10))
        .await;
    assert_eq!(
        coordinator.api.nodes().await.len(),
        1,
        "the restart is the same agent, not a new one"
    );
    restarted.stop().await;
    coordinator.stop().await;
}

#[tokio::test]
async fn bad_tokens_are_refused_with_the_reason() {
    let coordinator = InProcessCoordinator::start().await;
    let addr = [coordinator.quic_addr];
    let dir = tempfile::tempdir().unwrap();
    let files = gantry_coordinator::data_dir::load(coordinator.dir.path()).unwrap();
    let ca_hash = files.ca.sha256_hex();
    let far = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;

    let forged = JoinToken::mint(b"not the cluster key", &ca_hash, Role::Agent, far).to_string();
    let err = credentials::join(&addr, &forged, "x", dir.path())
        .await
        .unwrap_err();
    assert!(
        matches!(err, JoinError::Refused { .. })
            && err.to_string().contains("not issued by this cluster"),
        "{err}"
    );

    let expired = JoinToken::mint(&files.cluster_key, &ca_hash, Role::Agent, 1).to_string();
    let err = credentials::join(&addr, &expired, "x", dir.path())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");

    let coordinator_token = coordinator.api.token("coordinator", 600).await;
    let err = credentials::join(&addr, &coordinator_token, "x", dir.path())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("for role coordinator, not agent"),
        "{err}"
    );

    let other_ca = ClusterCa::generate("elsewhere", SystemTime::now()).unwrap();
    let mismatched =
        JoinToken::mint(&files.cluster_key, &other_ca.sha256_hex(), Role::Agent, far).to_string();
    let err = credentials::join(&addr, &mismatched, "x", dir.path())
        .await
        .unwrap_err();
    match &err {
        JoinError::CaMismatch {
            pinned, presented, ..
        } => {
            assert_eq!(pinned, &other_ca.sha256_hex());
            assert_eq!(presented, &ca_hash);
        }
        other => panic!("expected a CA mismatch, got {other}"),
    }

    let err = credentials::join(&addr, "gantry1.nonsense", "x", dir.path())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("malformed"), "{err}");
    assert!(
        AgentCredentials::load(dir.path()).unwrap().is_none(),
        "no refused join stores anything"
    );
    coordinator.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let coordinator = InProcessCoordinator::start().await;
    let (_probe_dir, probe) = join_probe(&coordinator).await;
    let other_ca = ClusterCa::generate("elsewhere", SystemTime::now()).unwrap();
    let (key, csr) = pki::generate_key_and_csr("intruder").unwrap();
    let cert = other_ca
        .issue(
            &csr,
            Role::Agent,
            "agent-intruder",
            SystemTime::now(),
            Duration::from_secs(600),
        )
        .unwrap();
    // Trusts the real cluster CA, so only the client certificate can be at fault.
    let intruder = NodeCredentials {
        ca_der: probe.tls.ca_der.clone(),
        cert_der: cert,
        key_der: pki::private_key_der(&key),
    };
    let result = connect(
        coordinator.quic_addr,
        tls::client_config(&intruder, ALPN_AGENT).unwrap(),
    )
    .await;
    match result {
        Err(_) => {}
        // TLS 1.3 clients finish before the server checks their certificate: the refusal arrives
        // as the connection's close.
        Ok(connection) => {
            let error = tokio::time::timeout(Duration::from_secs(5), connection.closed())
                .await
                .unwrap();
            assert!(
                !matches!(error, quinn::ConnectionError::LocallyClosed),
                "{error}"
            );
        }
    }
    // The legitimate identity still works.
    let connection = connect(
        coordinator.quic_addr,
        tls::client_config(&probe.tls, ALPN_AGENT).unwrap(),
    )
    .await
    .unwrap();
    let (_send, _recv, version) = transport::client_hello(&connection, "probe").await.unwrap();
    assert_eq!(version, gantry_protocol::PROTOCOL_VERSION);
    coordinator.stop().await;
}

#[tokio::test]
async fn an_agent_certificate_cannot_act_as_a_coordinator() {
    let coordinator = InProcessCoordinator::start().await;
    let (_probe_dir, probe) = join_probe(&coordinator).await;

    // As a client on the coordinators' own ALPN.
    let connection = connect(
        coordinator.quic_addr,
        tls::client_config(&probe.tls, ALPN_PEER).unwrap(),
    )
    .await
    .unwrap();
    let (code, reason) = close_reason(&connection).await;
    assert_eq!(code, close_code::REFUSED);
    assert!(reason.contains("cannot act as a coordinator"), "{reason}");

    // As a server that an agent connects to.
    let server_tls = tls::server_config(&probe.tls, &[ALPN_AGENT]).unwrap();
    let rogue = transport::server_endpoint(
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        server_tls,
    )
    .unwrap();
    let rogue_addr = rogue.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = rogue.accept().await {
            let _ = incoming.await;
        }
    });
    let (_other_dir, other_agent) = join_probe(&coordinator).await;
    let result = connect(
        rogue_addr,
        tls::client_config(&other_agent.tls, ALPN_AGENT).unwrap(),
    )
    .await;
    let error = result.expect_err("an agent certificate must not pass as a coordinator's");
    assert!(
        error.to_string().to_lowercase().contains("certificate"),
        "{error}"
    );
    coordinator.stop().await;
}

#[tokio::test]
async fn garbage_and_oversized_frames_close_only_that_connection() {
    let coordinator = InProcessCoordinator::start().await;
    let token = coordinator.api.token("agent", 600).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = InProcessAgent::start(coordinator.quic_addr, dir.path(), Some(token), "");
    let id = agent.wait_id().await;
    coordinator
        .api
        .wait_status(&id, "ready", Duration::from_secs(10))
        .await;
    let (_probe_dir, probe) = join_probe(&coordinator).await;

    // Datagrams that are not QUIC at all.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for size in [1usize, 100, 1200, 1500] {
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 + 13) as u8).collect();
        udp.send_to(&bytes, coordinator.quic_addr).unwrap();
    }

    // Random bytes where the hello should be.
    let connection = connect(
        coordinator.quic_addr,
        tls::client_config(&probe.tls, ALPN_AGENT).unwrap(),
    )
    .await
    .unwrap();
    let (send, _recv) = connection.open_bi().await.unwrap();
    let mut send = FramedSend::new(send);
    send.send_raw(&[
        0, 0, 0, 9, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0xfa, 0xf9, 0xf8, 0xf7,
    ])
    .await
    .unwrap();
    let (code, reason) = close_reason(&connection).await;
    assert_eq!(code, close_code::PROTOCOL_VIOLATION, "{reason}");

    // A frame announcing more than the limit, after a proper hello and register.
    let connection = connect(
        coordinator.quic_addr,
        tls::client_config(&probe.tls, ALPN_AGENT).unwrap(),
    )
    .await
    .unwrap();
    let (mut send, mut recv, _) = transport::client_hello(&connection, "probe").await.unwrap();
    let register = gantry_agent::fingerprint(&Default::default(), dir.path()).await;
    send.send(&AgentMessage::Register(register)).await.unwrap();
    assert!(matches!(
        recv.expect::<CoordinatorMessage>().await.unwrap(),
        CoordinatorMessage::Welcome(_)
    ));
    let announced = (gantry_protocol::FRAME_BYTES_MAX as u32 + 1).to_be_bytes();
    send.send_raw(&announced).await.unwrap();
    let (code, reason) = close_reason(&connection).await;
    assert_eq!(code, close_code::PROTOCOL_VIOLATION);
    assert!(reason.contains("exceeds the limit"), "{reason}");

    // The well-behaved agent never noticed.
    tokio::time::sleep(TTL).await;
    let node = coordinator
        .api
        .wait_status(&id, "ready", Duration::from_secs(1))
        .await;
    assert!(
        node.last_heard_ms_ago.unwrap() < TTL.as_millis() as u64,
        "{node:?}"
    );
    agent.stop().await;
    coordinator.stop().await;
}

#[tokio::test]
async fn a_peer_speaking_another_version_is_refused_with_both_versions() {
    let coordinator = InProcessCoordinator::start().await;
    let (_probe_dir, probe) = join_probe(&coordinator).await;
    let connection = connect(
        coordinator.quic_addr,
        tls::client_config(&probe.tls, ALPN_AGENT).unwrap(),
    )
    .await
    .unwrap();
    let (send, recv) = connection.open_bi().await.unwrap();
    let (mut send, mut recv) = (FramedSend::new(send), FramedRecv::new(recv));
    send.send(&Hello {
        version_min: 7,
        version_max: 9,
        software: "gantry-agent 7.0".into(),
    })
    .await
    .unwrap();
    match recv.expect::<HelloReply>().await.unwrap() {
        HelloReply::Refused { message } => {
            assert!(message.contains("7..=9"), "{message}");
            assert!(
                message.contains(&format!("{0}..={0}", gantry_protocol::PROTOCOL_VERSION)),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    coordinator.stop().await;
}

#[tokio::test]
async fn agents_renew_their_certificates_before_they_expire() {
    let coordinator =
        InProcessCoordinator::start_with(|config| config.agent_cert_ttl = Duration::from_secs(3))
            .await;
    let token = coordinator.api.token("agent", 600).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = InProcessAgent::start(coordinator.quic_addr, dir.path(), Some(token), "");
    let id = agent.wait_id().await;
    let first = AgentCredentials::load(dir.path()).unwrap().unwrap();
    let renewed = eventually(
        "the agent to store a renewed certificate",
        Duration::from_secs(10),
        || async {
            AgentCredentials::load(dir.path())
                .ok()
                .flatten()
                .filter(|c| c.not_after_unix > first.not_after_unix)
        },
    )
    .await;
    assert_eq!(renewed.agent_id, id, "renewal keeps the identity");
    // Past the first certificate's expiry, a restarted agent gets in with the renewed one.
    agent.stop().await;
    let wait_s = (first.not_after_unix + 1 - credentials::now_unix_s()).max(0) as u64;
    tokio::time::sleep(Duration::from_secs(wait_s)).await;
    let restarted = InProcessAgent::start(coordinator.quic_addr, dir.path(), None, "");
    coordinator
        .api
        .wait_status(&id, "ready", Duration::from_secs(10))
        .await;
    restarted.stop().await;
    coordinator.stop().await;
}

/// Stands in for a follower coordinator (a real coordinator certificate from the cluster's CA):
/// it answers every agent session with a redirect to `leader`.
async fn redirecting_coordinator(coordinator: &InProcessCoordinator, leader: String) -> SocketAddr {
    let files = gantry_coordinator::data_dir::load(coordinator.dir.path()).unwrap();
    let (key, csr) = pki::generate_key_and_csr("follower").unwrap();
    let cert = files
        .ca
        .issue(
            &csr,
            Role::Coordinator,
            "coordinator-follower",
            SystemTime::now(),
            Duration::from_secs(600),
        )
        .unwrap();
    let credentials = NodeCredentials {
        ca_der: files.ca.cert_der().clone(),
        cert_der: cert,
        key_der: pki::private_key_der(&key),
    };
    let endpoint = transport::server_endpoint(
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
        tls::server_config(&credentials, &[ALPN_AGENT]).unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let leader = leader.clone();
            tokio::spawn(async move {
                let connection = incoming.await.ok()?;
                let (mut send, mut recv, _) = transport::server_hello(&connection).await.ok()?;
                let _register: AgentMessage = recv.expect().await.ok()?;
                send.send(&CoordinatorMessage::Redirect {
                    leader_addr: leader,
                })
                .await
                .ok()?;
                send.finish_and_flush(Duration::from_secs(2)).await;
                Some(())
            });
        }
    });
    addr
}

#[tokio::test]
async fn agents_follow_redirects_and_try_each_coordinator_in_turn() {
    let coordinator = InProcessCoordinator::start().await;
    let follower = redirecting_coordinator(&coordinator, coordinator.quic_addr.to_string()).await;

    let (redirected_dir, redirected) = join_probe(&coordinator).await;
    let agent =
        InProcessAgent::start_with(vec![follower.to_string()], redirected_dir.path(), None, "");
    coordinator
        .api
        .wait_status(&redirected.agent_id, "ready", Duration::from_secs(10))
        .await;
    agent.stop().await;

    // The first address never answers (a socket that reads nothing); the agent moves on.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (rotating_dir, rotating) = join_probe(&coordinator).await;
    let addresses = vec![
        silent.local_addr().unwrap().to_string(),
        coordinator.quic_addr.to_string(),
    ];
    let agent = InProcessAgent::start_with(addresses, rotating_dir.path(), None, "");
    coordinator
        .api
        .wait_status(&rotating.agent_id, "ready", Duration::from_secs(20))
        .await;
    agent.stop().await;
    coordinator.stop().await;
}
