//! Tiny jobs end to end: one coordinator and one agent (process runtime) on this host; N batch
//! jobs each running `true` are submitted by concurrent clients, and the clock stops when every
//! one has succeeded. Reports jobs per second from first submit to last success.
//!
//! cargo bench --bench tiny_jobs -- [--jobs 1000] [--clients 32]

use std::net::SocketAddr;
mod common;

use common::{free_port, Guard};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    common::check_flags(&["--jobs", "--clients"]);
    let n_jobs = common::number_arg("--jobs", 1000) as usize;
    let n_clients = common::number_arg("--clients", 32) as usize;
    let gantry = env!("CARGO_BIN_EXE_gantry");
    let dir = tempfile::tempdir().unwrap();
    let quic: SocketAddr = format!("127.0.0.1:{}", free_port(true)).parse().unwrap();
    let http = format!("127.0.0.1:{}", free_port(false));
    let _coordinator = Guard(
        Command::new(gantry)
            .args([
                "coordinator",
                "--init",
                "--listen",
                &quic.to_string(),
                "--http",
                &http,
            ])
            .arg("--data-dir")
            .arg(dir.path().join("c"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    while !dir.path().join("c/admin.token").exists() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin = std::fs::read_to_string(dir.path().join("c/admin.token")).unwrap();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let token = loop {
        let answer = client
            .post(format!("http://{http}/v1/tokens"))
            .bearer_auth(&admin)
            .json(&serde_json::json!({"role": "agent"}))
            .send()
            .await;
        if let Ok(response) = answer {
            let body: serde_json::Value = response.json().await.unwrap();
            break body["token"].as_str().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    std::fs::write(dir.path().join("agent.toml"), "allow_process = true\n").unwrap();
    let _agent = Guard(
        Command::new(gantry)
            .args([
                "agent",
                "--coordinator",
                &quic.to_string(),
                "--join",
                &token,
            ])
            .arg("--data-dir")
            .arg(dir.path().join("a"))
            .arg("--config")
            .arg(dir.path().join("agent.toml"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    loop {
        let nodes: serde_json::Value = client
            .get(format!("http://{http}/v1/nodes"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if nodes
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["status"] == "ready"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..n_clients {
        let (client, http, admin, next) =
            (client.clone(), http.clone(), admin.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n_jobs {
                    return;
                }
                let spec = serde_json::json!({"name": format!("tiny-{i}"), "kind": "batch", "command": ["true"],
                    "resources": {"cpus": 0.01, "memory": "1MiB"}});
                let response = client.post(format!("http://{http}/v1/jobs")).bearer_auth(&admin).json(&spec).send().await.unwrap();
                assert_eq!(response.status(), 201);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let submitted = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    let finished = loop {
        let jobs: serde_json::Value = client
            .get(format!("http://{http}/v1/jobs?stale=true"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let done = jobs
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["state"] == "succeeded")
            .count();
        let failed = jobs
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["state"] == "failed")
            .count();
        assert_eq!(failed, 0, "a tiny job failed");
        if done == n_jobs {
            let elapsed = started.elapsed();
            print_stages(&jobs);
            break elapsed;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {n_jobs} jobs finished in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("jobs                 {n_jobs} (each `true`, process runtime, one host)");
    println!("all submitted after  {:.2} s", submitted.as_secs_f64());
    println!("all succeeded after  {:.2} s", finished.as_secs_f64());
    println!(
        "throughput           {:.0} jobs/s",
        n_jobs as f64 / finished.as_secs_f64()
    );
}

/// Where the time went: from each job's submission to its unit's start, and from the start to
/// the end, on the coordinator's clock; and how many units started and ended in each 250 ms.
fn print_stages(jobs: &serde_json::Value) {
    let mut waits = Vec::new();
    let mut runs = Vec::new();
    let mut points = Vec::new();
    for job in jobs.as_array().unwrap() {
        let submitted = job["submitted_at_unix_ms"].as_u64().unwrap();
        for allocation in job["allocations"].as_array().unwrap() {
            let started = allocation["started_at_unix_ms"].as_u64();
            let ended = allocation["ended_at_unix_ms"].as_u64();
            if let (Some(started), Some(ended)) = (started, ended) {
                waits.push(started.saturating_sub(submitted));
                runs.push(ended.saturating_sub(started));
                points.push((submitted, started, ended));
            }
        }
    }
    if points.is_empty() {
        return;
    }
    waits.sort_unstable();
    runs.sort_unstable();
    let at = |v: &[u64], f: f64| v[((v.len() - 1) as f64 * f) as usize];
    println!(
        "submitted -> started p50 {} ms, p99 {} ms; started -> ended p50 {} ms, p99 {} ms",
        at(&waits, 0.5),
        at(&waits, 0.99),
        at(&runs, 0.5),
        at(&runs, 0.99)
    );
    let first = points.iter().map(|p| p.0).min().unwrap();
    let bucket = |t: u64| ((t - first) / 250) as usize;
    let last = points.iter().map(|p| bucket(p.2)).max().unwrap();
    let mut counts = vec![(0, 0, 0); last + 1];
    for (submitted, started, ended) in points {
        counts[bucket(submitted)].0 += 1;
        counts[bucket(started)].1 += 1;
        counts[bucket(ended)].2 += 1;
    }
    println!("per 250 ms (submitted, started, ended): {counts:?}");
}
