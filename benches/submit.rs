//! Committed job submissions through a 3-node coordinator cluster: three real `gantry`
//! coordinator processes on loopback, each with its own data dir (every write of the Raft log
//! fsynced before it is acknowledged), and closed-loop HTTP clients submitting jobs to the
//! leader. Reports, per concurrency level, committed submissions per second, p50 and p99 latency
//! of the committed ones, and errors.
//!
//! cargo bench --bench submit -- [--clients 1,64,512] [--seconds 10] [--nodes 3|1]
//!
//! `--nodes 1` runs one coordinator alone, to see what replication adds. The coordinators log at
//! `RUST_LOG` (default `warn`); `RUST_LOG=gantry_coordinator=info` shows each snapshot, its size
//! and how long it held the coordinator's loop.
mod common;

use common::{free_port, Guard};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::time::Instant as TokioInstant;

/// How long the cluster may take to form before the bench gives up.
const CLUSTER_FORM_TIMEOUT: Duration = Duration::from_secs(60);
/// The job every client submits; small and valid.
const JOB_SPEC_JSON: &str = r#"{"name":"bench","kind":"batch","command":["true"]}"#;

struct Options {
    client_counts: Vec<usize>,
    level_duration: Duration,
    /// 3, or 1 to see what replication costs.
    nodes: usize,
}

fn options() -> Options {
    let mut options = Options {
        client_counts: vec![1, 64, 512],
        level_duration: Duration::from_secs(10),
        nodes: 3,
    };
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut i = 0;
    while i < args.len() {
        let value = || {
            args.get(i + 1)
                .unwrap_or_else(|| panic!("{} needs a value", args[i]))
        };
        match args[i].as_str() {
            "--clients" => {
                options.client_counts = value()
                    .split(',')
                    .map(|n| match n.trim().parse::<usize>() {
                        Ok(count) if count > 0 => count,
                        _ => panic!(
                            "--clients needs positive numbers separated by commas, got {n:?}"
                        ),
                    })
                    .collect();
            }
            "--seconds" => {
                let seconds = value()
                    .parse::<u64>()
                    .ok()
                    .filter(|s| *s > 0)
                    .unwrap_or_else(|| panic!("--seconds needs a positive number"));
                options.level_duration = Duration::from_secs(seconds);
            }
            "--nodes" => {
                options.nodes = match value().as_str() {
                    "1" => 1,
                    "3" => 3,
                    other => panic!("--nodes is 1 or 3, got {other:?}"),
                };
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    options
}

/// Addresses of one coordinator: QUIC (`--listen`) and HTTP (`--http`).
struct NodeAddrs {
    quic: String,
    http: String,
}

impl NodeAddrs {
    fn new() -> Self {
        Self {
            quic: format!("127.0.0.1:{}", free_port(true)),
            http: format!("127.0.0.1:{}", free_port(false)),
        }
    }
}

fn start_coordinator(data_dir: &Path, addrs: &NodeAddrs, join: Option<&str>) -> Guard {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gantry"));
    command
        .args([
            "coordinator",
            "--listen",
            &addrs.quic,
            "--http",
            &addrs.http,
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    match join {
        None => command.arg("--init"),
        Some(join) => command.args(["--join", join]),
    };
    Guard(command.spawn().expect("start a gantry coordinator"))
}

/// Panics naming the coordinator that exited, so a failed start is not mistaken for slowness.
fn check_running(nodes: &mut [Guard]) {
    for (node_idx, node) in nodes.iter_mut().enumerate() {
        if let Some(status) = node.0.try_wait().unwrap() {
            panic!(
                "coordinator {} exited with {status} (its stderr is above)",
                node_idx + 1
            );
        }
    }
}

/// The leader's HTTP address once the cluster has 3 voters and a leader.
async fn wait_for_cluster(
    http: &reqwest::Client,
    node_1_http: &str,
    admin: &str,
    nodes: &mut [Guard],
) -> String {
    let started = Instant::now();
    let mut last_seen = String::from("no answer yet");
    loop {
        check_running(nodes);
        assert!(
            started.elapsed() < CLUSTER_FORM_TIMEOUT,
            "the cluster did not form 3 voters with a leader in {CLUSTER_FORM_TIMEOUT:?}; last seen: {last_seen}"
        );
        let answer = http
            .get(format!("http://{node_1_http}/v1/cluster"))
            .bearer_auth(admin)
            .send()
            .await;
        match answer {
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                last_seen = format!("{status} {text}");
                if status.is_success() {
                    if let Some(leader_http) = leader_http_if_formed(&text) {
                        return leader_http;
                    }
                }
            }
            Err(e) => last_seen = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn leader_http_if_formed(cluster_json: &str) -> Option<String> {
    let cluster: serde_json::Value = serde_json::from_str(cluster_json).ok()?;
    let members = cluster["members"].as_array()?;
    let all_voters = members.len() == 3 && members.iter().all(|m| m["role"] == "voter");
    let leader = cluster["leader"].as_u64()?;
    if !all_voters {
        return None;
    }
    members
        .iter()
        .find(|m| m["id"].as_u64() == Some(leader))
        .and_then(|m| m["http_addr"].as_str())
        .map(str::to_string)
}

/// What one closed-loop client saw during one level.
#[derive(Default)]
struct ClientResult {
    /// Latency of each committed (201) submission.
    latencies: Vec<Duration>,
    n_errors: u64,
    /// Requests still waiting for an answer at the deadline: neither committed nor errors.
    n_cut_off: u64,
    first_error: Option<String>,
}

/// One submission: Ok when a 201 with `created: true` came back, Err describing anything else.
async fn submit(http: &reqwest::Client, url: &str, admin: &str, key: &str) -> Result<(), String> {
    let response = http
        .post(url)
        .bearer_auth(admin)
        .header("Idempotency-Key", key)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(JOB_SPEC_JSON)
        .send()
        .await
        .map_err(|e| format!("request failed: {e}"))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("reading the answer failed: {e}"))?;
    let created = serde_json::from_slice::<serde_json::Value>(&body)
        .map(|answer| answer["created"] == true)
        .unwrap_or(false);
    if status == reqwest::StatusCode::CREATED && created {
        Ok(())
    } else {
        Err(format!("{status} {}", String::from_utf8_lossy(&body)))
    }
}

async fn closed_loop_client(
    http: reqwest::Client,
    url: String,
    admin: String,
    key_prefix: String,
    deadline: TokioInstant,
) -> ClientResult {
    let mut result = ClientResult::default();
    let mut seq: u64 = 0;
    while TokioInstant::now() < deadline {
        seq += 1;
        let key = format!("{key_prefix}-{seq}");
        let started = Instant::now();
        match tokio::time::timeout_at(deadline, submit(&http, &url, &admin, &key)).await {
            Ok(Ok(())) => result.latencies.push(started.elapsed()),
            Ok(Err(e)) => {
                result.n_errors += 1;
                result.first_error.get_or_insert(e);
            }
            Err(_) => result.n_cut_off += 1,
        }
    }
    result
}

/// Nearest-rank percentile of sorted latencies, in milliseconds.
fn percentile_ms(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

fn machine_summary() -> String {
    let n_cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!(", {:.0} GiB", kib as f64 / (1 << 20) as f64))
        })
        .unwrap_or_default();
    format!(
        "machine: {n_cpus} cores{memory}, {} {}; 3 coordinators and the clients share them",
        std::env::consts::ARCH,
        std::env::consts::OS
    )
}

#[tokio::main]
async fn main() {
    let options = options();
    // Declared before the guards so the children are killed before their data dirs go.
    let dir = tempfile::tempdir().unwrap();
    let data_dirs: Vec<_> = (1..=3).map(|n| dir.path().join(format!("c{n}"))).collect();
    let addrs: Vec<NodeAddrs> = (0..3).map(|_| NodeAddrs::new()).collect();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    let mut nodes = vec![start_coordinator(&data_dirs[0], &addrs[0], None)];
    let token_path = data_dirs[0].join("admin.token");
    let started = Instant::now();
    while !token_path.exists() {
        check_running(&mut nodes);
        assert!(
            started.elapsed() < CLUSTER_FORM_TIMEOUT,
            "coordinator 1 wrote no admin.token in {CLUSTER_FORM_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin = std::fs::read_to_string(&token_path)
        .unwrap()
        .trim()
        .to_string();

    // Node 1 may still be starting its API or electing itself: retry until a token comes back.
    let join_token = loop {
        check_running(&mut nodes);
        assert!(
            started.elapsed() < CLUSTER_FORM_TIMEOUT,
            "coordinator 1 gave no coordinator join token in {CLUSTER_FORM_TIMEOUT:?}"
        );
        let answer = http
            .post(format!("http://{}/v1/tokens", addrs[0].http))
            .bearer_auth(&admin)
            .json(&serde_json::json!({"role": "coordinator", "ttl_seconds": 600}))
            .send()
            .await;
        if let Ok(response) = answer {
            if response.status().is_success() {
                let token: serde_json::Value = response.json().await.unwrap();
                break token["token"]
                    .as_str()
                    .expect("the token answer has `token`")
                    .to_string();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let join = format!("{join_token}@{}", addrs[0].quic);
    for node_idx in 1..options.nodes {
        nodes.push(start_coordinator(
            &data_dirs[node_idx],
            &addrs[node_idx],
            Some(&join),
        ));
    }
    // A single node answered the token request as its leader.
    let leader_http = if options.nodes == 1 {
        addrs[0].http.clone()
    } else {
        wait_for_cluster(&http, &addrs[0].http, &admin, &mut nodes).await
    };
    eprintln!(
        "cluster formed in {:.1} s: {} voter(s), leader at {leader_http}",
        started.elapsed().as_secs_f64(),
        options.nodes
    );

    let url = format!("http://{leader_http}/v1/jobs");
    for &n_clients in &options.client_counts {
        let level_started = TokioInstant::now();
        let deadline = level_started + options.level_duration;
        let tasks: Vec<_> = (0..n_clients)
            .map(|client_idx| {
                tokio::spawn(closed_loop_client(
                    http.clone(),
                    url.clone(),
                    admin.clone(),
                    format!("bench-{n_clients}-{client_idx}"),
                    deadline,
                ))
            })
            .collect();
        let mut latencies = Vec::new();
        let mut n_errors = 0;
        let mut n_cut_off = 0;
        let mut first_error = None;
        for task in tasks {
            let result = task.await.expect("a client task does not panic");
            latencies.extend(result.latencies);
            n_errors += result.n_errors;
            n_cut_off += result.n_cut_off;
            first_error = first_error.or(result.first_error);
        }
        let elapsed_s = level_started.elapsed().as_secs_f64();
        latencies.sort_unstable();
        println!(
            "clients {n_clients:<6} committed/s {:<6.0} p50 {:.2} ms   p99 {:.2} ms   errors {n_errors}   in flight at deadline {n_cut_off}",
            latencies.len() as f64 / elapsed_s,
            percentile_ms(&latencies, 0.50),
            percentile_ms(&latencies, 0.99),
        );
        if let Some(error) = first_error {
            eprintln!("  first error at {n_clients} clients: {error}");
        }
        check_running(&mut nodes);
    }
    println!("{}", machine_summary());
    drop(nodes);
}
