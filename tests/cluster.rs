//! A 3-node coordinator cluster on loopback, both as separate processes of the real binary and
//! inside this process: the leader is killed while 200 submissions are in flight, and every
//! submission that was acknowledged is present exactly once afterwards; the killed node catches
//! up when it comes back; a node cut off from the majority cannot commit and answers 503.

mod common;

use common::*;
use gantry_coordinator::api::types::{ClusterView, JobView};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const SUBMISSIONS: usize = 200;

enum Handle {
    Process(ChildGuard),
    Task {
        stop: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    },
    Stopped,
}

struct Node {
    dir: std::path::PathBuf,
    quic: String,
    http: String,
    handle: Handle,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Runner {
    Processes,
    InProcess,
}

struct Cluster {
    runner: Runner,
    _root: tempfile::TempDir,
    nodes: Vec<Node>,
    token: String,
    http: reqwest::Client,
}

impl Cluster {
    fn launch(&self, node: &Node, membership: Option<String>, init: bool) -> Handle {
        match self.runner {
            Runner::Processes => {
                let mut command = gantry();
                command
                    .args(["coordinator", "--listen", &node.quic, "--http", &node.http])
                    .arg("--data-dir")
                    .arg(&node.dir);
                // Compact often, so the restarted node must catch up from a snapshot.
                command.args(["--snapshot-every-entries", "50", "--snapshot-by-count-only"]);
                if init {
                    command.arg("--init");
                }
                if let Some(join) = membership {
                    command.args(["--join", &join]);
                }
                let log = node.dir.with_extension("log");
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap();
                let child = command
                    .stdin(std::process::Stdio::null())
                    .stdout(file.try_clone().unwrap())
                    .stderr(file)
                    .spawn()
                    .unwrap();
                Handle::Process(ChildGuard(child))
            }
            Runner::InProcess => {
                if init && !gantry_coordinator::data_dir::is_initialized(&node.dir) {
                    gantry_coordinator::data_dir::init(&node.dir).unwrap();
                }
                let mut config = gantry_coordinator::CoordinatorConfig::new(node.dir.clone());
                config.snapshot_every_entries = 50;
                // Snapshots every 50 entries, whatever their size: restarted nodes catch up
                // from one.
                config.snapshot_amortized = false;
                let membership = match membership {
                    Some(join) => {
                        let (token, seed) = gantry_coordinator::join::parse_join(&join).unwrap();
                        gantry_coordinator::Membership::Join { token, seed }
                    }
                    None => gantry_coordinator::Membership::Existing,
                };
                let (stop, stopped) = oneshot::channel::<()>();
                let quic = node.quic.clone();
                let http = node.http.clone();
                let task = tokio::spawn(async move {
                    // A restarted node rebinds its ports as soon as the old sockets are gone.
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let listeners = loop {
                        match (
                            std::net::UdpSocket::bind(&quic),
                            std::net::TcpListener::bind(&http),
                        ) {
                            (Ok(quic), Ok(http)) => {
                                break gantry_coordinator::Listeners { quic, http }
                            }
                            _ if Instant::now() < deadline => {
                                tokio::time::sleep(Duration::from_millis(50)).await
                            }
                            (quic, http) => {
                                anyhow::bail!("cannot rebind: {:?} {:?}", quic.err(), http.err())
                            }
                        }
                    };
                    let outcome =
                        gantry_coordinator::run_with(config, listeners, membership, async {
                            let _ = stopped.await;
                        })
                        .await;
                    if let Err(e) = &outcome {
                        eprintln!("in-process coordinator at {http} stopped: {e:#}");
                    }
                    outcome
                });
                Handle::Task {
                    stop: Some(stop),
                    task,
                }
            }
        }
    }

    async fn start(runner: Runner) -> Self {
        let root = tempfile::tempdir().unwrap();
        let nodes: Vec<Node> = (0..3)
            .map(|i| Node {
                dir: root.path().join(format!("node{i}")),
                quic: format!("127.0.0.1:{}", free_udp_port()),
                http: format!("127.0.0.1:{}", free_tcp_port()),
                handle: Handle::Stopped,
            })
            .collect();
        let mut cluster = Self {
            runner,
            _root: root,
            nodes,
            token: String::new(),
            http: reqwest::Client::new(),
        };
        cluster.nodes[0].handle = cluster.launch(&cluster.nodes[0], None, true);
        let token_path = cluster.nodes[0].dir.join("admin.token");
        cluster.token = eventually(
            "the first node to write its admin token",
            Duration::from_secs(20),
            || {
                let token_path = token_path.clone();
                async move {
                    std::fs::read_to_string(&token_path)
                        .ok()
                        .filter(|t| !t.is_empty())
                }
            },
        )
        .await;
        let join_token = eventually(
            "a coordinator join token",
            Duration::from_secs(20),
            || async {
                let response = cluster
                    .http
                    .post(format!("http://{}/v1/tokens", cluster.nodes[0].http))
                    .bearer_auth(&cluster.token)
                    .json(&serde_json::json!({"role": "coordinator", "ttl_seconds": 600}))
                    .send()
                    .await
                    .ok()?;
                let body: serde_json::Value = response.json().await.ok()?;
                body["token"].as_str().map(str::to_string)
            },
        )
        .await;
        match runner {
            Runner::InProcess => {
                for i in 1..3 {
                    // Join through the previous node: a follower redirects the join to the
                    // leader.
                    let join = format!("{join_token}@{}", cluster.nodes[i - 1].quic);
                    cluster.nodes[i].handle = cluster.launch(&cluster.nodes[i], Some(join), false);
                    cluster.wait_voters(i + 1).await;
                }
            }
            Runner::Processes => {
                // Both join at once, as a script starting a cluster does: Raft takes one
                // membership change at a time, so one of them is told to retry, and does.
                let join = format!("{join_token}@{}", cluster.nodes[0].quic);
                for i in 1..3 {
                    cluster.nodes[i].handle =
                        cluster.launch(&cluster.nodes[i], Some(join.clone()), false);
                }
                cluster.wait_voters(3).await;
            }
        }
        cluster
    }

    async fn status(&self, i: usize) -> Option<ClusterView> {
        let response = self
            .http
            .get(format!(
                "http://{}/v1/cluster?stale=true",
                self.nodes[i].http
            ))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    async fn wait_voters(&self, n: usize) -> ClusterView {
        eventually(
            &format!("{n} voters and a leader"),
            Duration::from_secs(30),
            || async {
                let view = self.status(0).await.or(self.status(1).await)?;
                let voters = view.members.iter().filter(|m| m.role == "voter").count();
                (voters == n && view.leader.is_some()).then_some(view)
            },
        )
        .await
    }

    fn index_of(&self, view: &ClusterView, id: u64) -> usize {
        let addr = &view.members.iter().find(|m| m.id == id).unwrap().addr;
        self.nodes.iter().position(|n| &n.quic == addr).unwrap()
    }

    async fn kill(&mut self, i: usize) {
        match std::mem::replace(&mut self.nodes[i].handle, Handle::Stopped) {
            Handle::Process(mut guard) => {
                guard.0.kill().unwrap(); // SIGKILL
                guard.0.wait().unwrap();
            }
            Handle::Task { task, .. } => {
                task.abort();
                let _ = task.await;
            }
            Handle::Stopped => {}
        }
    }

    fn restart(&mut self, i: usize) {
        self.nodes[i].handle = self.launch(&self.nodes[i], None, false);
    }

    /// Waits until node `i`, restarted, has applied `expected` jobs; fails if it stops.
    async fn wait_caught_up(&self, i: usize, expected: usize, what: &str, timeout: Duration) {
        eventually(what, timeout, || async {
            if let Handle::Task { task, .. } = &self.nodes[i].handle {
                assert!(!task.is_finished(), "the restarted node stopped");
            }
            self.jobs(i, true)
                .await
                .ok()
                .filter(|jobs| jobs.len() == expected)
        })
        .await;
    }

    async fn jobs(&self, i: usize, stale: bool) -> Result<Vec<JobView>, u16> {
        let response = self
            .http
            .get(format!(
                "http://{}/v1/jobs{}",
                self.nodes[i].http,
                if stale { "?stale=true" } else { "" }
            ))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|_| 0u16)?;
        if !response.status().is_success() {
            return Err(response.status().as_u16());
        }
        response.json().await.map_err(|_| 1u16)
    }

    async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            if let Handle::Task { stop, task } = &mut self.nodes[i].handle {
                let _ = stop.take().unwrap().send(());
                let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
            }
            self.nodes[i].handle = Handle::Stopped;
        }
    }
}

/// Submits `key` to the nodes in turn until one acknowledges it (2xx), or gives up at the
/// deadline. Returns the job id and the status of the acknowledgement.
async fn submit_until_acknowledged(
    http: reqwest::Client,
    bases: Vec<String>,
    token: String,
    key: String,
) -> Option<(String, u16)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = serde_json::json!({ "name": "load", "kind": "batch", "command": ["true"], "env": { "KEY": key } });
    let mut attempt = 0usize;
    while Instant::now() < deadline {
        let base = &bases[attempt % bases.len()];
        attempt += 1;
        let sent = http
            .post(format!("http://{base}/v1/jobs"))
            .bearer_auth(&token)
            .header("Idempotency-Key", &key)
            .json(&body)
            .timeout(Duration::from_secs(8))
            .send()
            .await;
        if let Ok(response) = sent {
            let status = response.status().as_u16();
            if status == 200 || status == 201 {
                let answer: serde_json::Value = response.json().await.ok()?;
                return Some((answer["id"].as_str()?.to_string(), status));
            }
            assert!(status == 503, "a submission got {status}, not 2xx or 503");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

async fn leader_failover_keeps_every_acknowledged_submission(runner: Runner) {
    let mut cluster = Cluster::start(runner).await;
    let view = cluster.wait_voters(3).await;
    let leader = cluster.index_of(&view, view.leader.unwrap());
    let bases: Vec<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();
    let acknowledged = Arc::new(tokio::sync::Mutex::new(BTreeMap::new()));
    let mut tasks = Vec::new();
    for n in 0..SUBMISSIONS {
        let (http, bases, token, acknowledged) = (
            cluster.http.clone(),
            bases.clone(),
            cluster.token.clone(),
            acknowledged.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let key = format!("load-{n}");
            if let Some((id, _)) = submit_until_acknowledged(http, bases, token, key.clone()).await
            {
                acknowledged.lock().await.insert(key, id);
            }
        }));
        if n == SUBMISSIONS / 4 {
            // Kill the leader with a quarter of the submissions sent and the rest on their way.
            cluster.kill(leader).await;
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let acknowledged = acknowledged.lock().await.clone();
    assert_eq!(
        acknowledged.len(),
        SUBMISSIONS,
        "every submission is acknowledged once a new leader is elected"
    );

    let survivor = (0..3).find(|&i| i != leader).unwrap();
    let jobs = cluster
        .jobs(survivor, false)
        .await
        .expect("a linearizable read after failover");
    for (key, id) in &acknowledged {
        let matching: Vec<&JobView> = jobs
            .iter()
            .filter(|j| j.idempotency_key.as_deref() == Some(key))
            .collect();
        assert_eq!(
            matching.len(),
            1,
            "{key} must be present exactly once, found {}",
            matching.len()
        );
        assert_eq!(&matching[0].id, id, "{key} was acknowledged as {id}");
    }

    // The killed node comes back and catches up.
    cluster.restart(leader);
    let expected = jobs.len();
    cluster
        .wait_caught_up(
            leader,
            expected,
            "the restarted node to catch up",
            Duration::from_secs(30),
        )
        .await;

    // A node cut off from the majority cannot commit, and says so with a 503.
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &i in &others {
        cluster.kill(i).await;
    }
    let started = Instant::now();
    let response = cluster
        .http
        .post(format!("http://{}/v1/jobs", cluster.nodes[leader].http))
        .bearer_auth(&cluster.token)
        .json(&serde_json::json!({"name": "minority", "kind": "batch", "command": ["true"]}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("the minority node answers");
    assert_eq!(
        response.status(),
        503,
        "{}",
        response.text().await.unwrap_or_default()
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the refusal comes within the request timeout"
    );
    assert_eq!(
        cluster.jobs(leader, false).await.unwrap_err(),
        503,
        "linearizable reads need a majority too"
    );
    assert_eq!(
        cluster.jobs(leader, true).await.unwrap().len(),
        expected,
        "stale reads still answer"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_leader_killed_during_load_loses_nothing_acknowledged() {
    leader_failover_keeps_every_acknowledged_submission(Runner::Processes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_leader_killed_during_load_loses_nothing_acknowledged() {
    leader_failover_keeps_every_acknowledged_submission(Runner::InProcess).await;
}

/// A state larger than one frame of the peer transport (4 MiB) still reaches a member that must
/// catch up from a snapshot: the snapshot travels in parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_catches_up_from_a_snapshot_larger_than_a_frame() {
    let mut cluster = Cluster::start(Runner::InProcess).await;
    let view = cluster.wait_voters(3).await;
    let leader = cluster.index_of(&view, view.leader.unwrap());
    let behind = (0..3).find(|&i| i != leader).unwrap();
    cluster.kill(behind).await;
    // Eight jobs of about 700 KB each (a long argument list), then enough small ones for the
    // members to compact their logs past them (every 50 entries in these tests).
    let big_arg = "x".repeat(700 * 1024);
    let mut submitted = 0;
    for n in 0..68 {
        let command = if n < 8 {
            serde_json::json!(["echo", big_arg])
        } else {
            serde_json::json!(["true"])
        };
        let response = cluster
            .http
            .post(format!("http://{}/v1/jobs", cluster.nodes[leader].http))
            .bearer_auth(&cluster.token)
            .json(&serde_json::json!({"name": format!("big-{n}"), "kind": "batch", "command": command}))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        submitted += 1;
    }
    cluster.restart(behind);
    cluster
        .wait_caught_up(
            behind,
            submitted,
            "the member that was down to catch up from a snapshot of over 4 MiB",
            Duration::from_secs(60),
        )
        .await;
    cluster.shutdown().await;
}
