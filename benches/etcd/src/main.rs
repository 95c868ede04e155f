//! Closed-loop puts against an etcd cluster, reported the way `cargo bench --bench submit`
//! reports job submissions: committed writes per second, p50 and p99 latency, per concurrency
//! level. Each put is one 256-byte value under an 8-byte key, as in etcd's own benchmark
//! (`benchmark put --key-size 8 --val-size 256`); by default clients share one connection per
//! ten, as in etcd's published benchmark runs (100 connections for 1,000 clients).
//!
//! etcd-put-bench --endpoints URL,URL,URL [--clients 1,64,512] [--seconds 8]
//!                [--clients-per-connection 10]
//!
//! Writes go to the leader, found through the members' status.

use std::time::{Duration, Instant};

const VALUE_BYTES: usize = 256;
struct Options {
    endpoints: Vec<String>,
    client_counts: Vec<usize>,
    level_duration: Duration,
    clients_per_connection: usize,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        endpoints: Vec::new(),
        client_counts: vec![1, 64, 512],
        level_duration: Duration::from_secs(8),
        clients_per_connection: 10,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let [name, value] = pair else {
            return Err(format!("{} needs a value", pair[0]));
        };
        match name.as_str() {
            "--endpoints" => options.endpoints = value.split(',').map(str::to_string).collect(),
            "--clients" => {
                options.client_counts = value
                    .split(',')
                    .map(|n| match n.trim().parse::<usize>() {
                        Ok(count) if count > 0 => Ok(count),
                        _ => Err(format!("--clients needs positive numbers, got {n:?}")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--seconds" => match value.parse::<u64>() {
                Ok(seconds) if seconds > 0 => options.level_duration = Duration::from_secs(seconds),
                _ => return Err(format!("--seconds needs a positive number, got {value:?}")),
            },
            "--clients-per-connection" => match value.parse::<usize>() {
                Ok(n) if n > 0 => options.clients_per_connection = n,
                _ => {
                    return Err(format!(
                        "--clients-per-connection needs a positive number, got {value:?}"
                    ))
                }
            },
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if options.endpoints.is_empty() {
        return Err("--endpoints is required".into());
    }
    Ok(options)
}

/// The client URL of the member that leads now.
async fn leader_url(endpoints: &[String]) -> Result<String, etcd_client::Error> {
    let mut client = etcd_client::Client::connect(endpoints, None).await?;
    let leader = client.status().await?.leader();
    let members = client.member_list().await?;
    let url = members
        .members()
        .iter()
        .find(|member| member.id() == leader)
        .and_then(|member| member.client_urls().first().cloned())
        .unwrap_or_else(|| endpoints[0].clone());
    Ok(url)
}

async fn closed_loop_client(
    mut client: etcd_client::KvClient,
    client_idx: usize,
    deadline: Instant,
) -> (Vec<Duration>, u64) {
    let value = vec![b'v'; VALUE_BYTES];
    let mut latencies = Vec::new();
    let mut n_errors = 0;
    let mut seq: u64 = 0;
    while Instant::now() < deadline {
        seq += 1;
        // 8-byte keys, distinct per client.
        let key = format!("{:04x}{:04x}", client_idx % 0x10000, seq % 0x10000);
        let started = Instant::now();
        match client.put(key, value.clone(), None).await {
            Ok(_) => latencies.push(started.elapsed()),
            Err(_) => n_errors += 1,
        }
    }
    (latencies, n_errors)
}

fn percentile_ms(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let options = options().unwrap_or_else(|e| {
        eprintln!("etcd-put-bench: {e}");
        std::process::exit(2);
    });
    let leader = leader_url(&options.endpoints)
        .await
        .expect("ask the etcd members who leads");
    eprintln!("etcd leader at {leader}");
    for &n_clients in &options.client_counts {
        let n_connections = n_clients.div_ceil(options.clients_per_connection);
        let mut connections = Vec::new();
        for _ in 0..n_connections {
            let client = etcd_client::Client::connect([leader.as_str()], None)
                .await
                .expect("connect to the etcd leader");
            connections.push(client.kv_client());
        }
        let started = Instant::now();
        let deadline = started + options.level_duration;
        let tasks: Vec<_> = (0..n_clients)
            .map(|client_idx| {
                let kv = connections[client_idx % n_connections].clone();
                tokio::spawn(closed_loop_client(kv, client_idx, deadline))
            })
            .collect();
        let mut latencies = Vec::new();
        let mut n_errors = 0;
        for task in tasks {
            let (client_latencies, client_errors) = task.await.expect("a client does not panic");
            latencies.extend(client_latencies);
            n_errors += client_errors;
        }
        let elapsed_s = started.elapsed().as_secs_f64();
        latencies.sort_unstable();
        println!(
            "clients {n_clients:<6} committed/s {:<6.0} p50 {:.2} ms   p99 {:.2} ms   errors {n_errors}",
            latencies.len() as f64 / elapsed_s,
            percentile_ms(&latencies, 0.50),
            percentile_ms(&latencies, 0.99),
        );
    }
}
