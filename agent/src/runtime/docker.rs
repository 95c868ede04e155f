//! The Docker runtime: runs each unit as a container of the local Docker daemon, from an image
//! that is already on the host (offline first), and keeps it running through agent restarts.
//!
//! Images: `start` inspects the image locally. A missing image fails the start with the fix
//! (`gantry images load FILE.tar` on the agent host, or `pull: true` / `allow_pull = true`)
//! unless the unit may pull it. The image is resolved once, to `name@sha256:…` from its repo
//! digests or else to its image id, and the container is created from the image *id*, so a
//! retag between the inspect and the create cannot change what runs. The resolved reference is
//! reported in [`RuntimeEvent::Started`] and kept in the container's `gantry.image` label.
//!
//! Containers: named `gantry-<allocation_id>`, labelled with the job, the allocation and this
//! agent's work root (so two agents sharing a daemon never adopt each other's containers). The
//! allocation's directory is bind-mounted at [`ALLOC_DIR_IN_CONTAINER`] (the daemon must see the
//! agent's file system: a local daemon). CPU and memory limits are enforced (no swap beyond
//! the memory limit), GPUs are requested from the `nvidia` driver only when assigned and found
//! through NVML (a GPU declared in the config has no device to hand over), a serving
//! replica's `PORT` is published on the same host port (the agent's health check connects to
//! `127.0.0.1:PORT`). The environment is the unit's, then what Gantry adds (see [`render`]);
//! nothing of the agent's environment is passed on. No restart policy: Gantry decides retries.
//!
//! Logs: the container's stdout and stderr are followed into the same bounded files as the
//! process runtime's ([`super::logs`]). The follower asks Docker for timestamps and records the
//! newest one it wrote (`docker-logs.cursor`), so a follower resumed after an agent restart
//! skips what is already on disk. Should the agent die between writing a batch of output and
//! recording its cursor, that batch is written twice. The daemon copies stdout and stderr
//! separately, so one stream can deliver a line stamped before the other stream's previous line:
//! the skip bound is therefore the cursor as it stood when the follow began, never a stamp seen
//! in the same follow ([`LogCursor`]); a line delivered that far out of order across a resume
//! could still be skipped. The daemon keeps its own copy bounded too (json-file, two files of
//! `log_bytes_max`).
//!
//! Architecture invariant: containers outlive the agent. `shutdown` stops only the watchers; the
//! next start of the agent adopts running containers ([`Runtime::recover`]), reports those that
//! ended meanwhile, and removes them. A container is removed once its end has been reported; its
//! logs stay on disk with the allocation.
//!
//! Deliberately absent: registry credentials, host networking for multi-node training, and a
//! user mapping (a unit running as a non-root user may not be able to write the allocation
//! directory, which belongs to the agent's user).

use super::logs::{
    is_safe_allocation_id, read_logs, read_logs_from, BoundedLog, STDERR_LOG, STDOUT_LOG,
};
use super::{
    gantry_env, visible_devices, BoxFuture, Exit, GpuAssignment, LogRead, Recovered, Runtime,
    RuntimeConfig, RuntimeError, RuntimeEvent, UnitSpec,
};
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum,
    ContainerSummaryStateEnum, DeviceRequest, HostConfig, HostConfigLogConfig, Mount, MountType,
    PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ImportImageOptionsBuilder,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use gantry_protocol::RuntimeKind;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch, Mutex};
use tokio::task::JoinHandle;

/// Where the allocation's directory appears inside the container (`GANTRY_ALLOC_DIR`).
pub const ALLOC_DIR_IN_CONTAINER: &str = "/gantry/alloc";
pub const LABEL_JOB: &str = "gantry.job";
pub const LABEL_ALLOCATION: &str = "gantry.allocation";
/// The absolute work root of the agent that created the container: identifies the agent.
pub const LABEL_AGENT_ROOT: &str = "gantry.agent-root";
/// The image as resolved when the container was created (`name@sha256:…` or `sha256:…`).
pub const LABEL_IMAGE: &str = "gantry.image";
const CONTAINER_NAME_PREFIX: &str = "gantry-";
/// In the allocation's directory: the daemon's timestamp of the newest output written to disk.
const LOG_CURSOR_FILE: &str = "docker-logs.cursor";

/// A pull that takes longer fails the start.
const PULL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// After a container ends, how long its remaining output may take to arrive.
const LOG_DRAIN_WAIT: Duration = Duration::from_secs(5);
/// How long `stop` waits beyond the grace for the container to be gone before it kills it, and
/// then again for the kill.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// A watcher that cannot reach the daemon for this long reports its unit lost.
const DAEMON_UNREACHABLE_MAX: Duration = Duration::from_secs(10 * 60);
/// Waits and log follows are long polls, and the daemon sends a response's head only with its
/// first byte (the exit, the first output), so bollard's request timeout (2 minutes by default)
/// would cut them while a container runs or stays quiet: they get this one instead.
const LONG_POLL_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Between two tries to follow a container's output.
const LOG_RECONNECT_WAIT: Duration = Duration::from_secs(1);
/// Output frames written to disk before the log cursor is recorded.
const LOG_BATCH_FRAMES_MAX: usize = 256;
const LOAD_READ_CHUNK_BYTES: usize = 1024 * 1024;
/// The daemon's own copy of a container's output: two json-file files of this size. Fixed
/// rather than the agent's `log_bytes_max`, which `render` does not know; the agent's copy is the
/// one `logs` reads.
const DAEMON_LOG_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// A client of the local daemon (`DOCKER_HOST` or the default socket), speaking the newest API
/// version both sides know (bollard's default is newer than many installed daemons).
pub async fn connect() -> Result<Docker, String> {
    Docker::connect_with_local_defaults()
        .map_err(|e| format!("no Docker client: {e}"))?
        .negotiate_version()
        .await
        .map_err(|e| format!("the Docker daemon did not answer: {e}"))
}

/// Runs units as Docker containers. See the module documentation for the policies.
pub struct DockerRuntime {
    inner: Arc<Inner>,
}

/// What the runtime shares with the watcher task of each container.
struct Inner {
    docker: Docker,
    /// The same client with [`LONG_POLL_TIMEOUT`], for waits and log follows.
    long_poll: Docker,
    /// Absolute: it is bind-mounted and it names this agent in the containers' labels.
    work_root: PathBuf,
    log_bytes_max: u64,
    /// Held for writing while a log rotates, for reading while a log is read.
    log_rotation: Arc<tokio::sync::RwLock<()>>,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Containers watched, by allocation id, until their exit is reported.
    units: BTreeMap<String, UnitHandle>,
    /// Starts resolving (maybe pulling) their image, with whether a stop came meanwhile.
    resolving: BTreeMap<String, bool>,
    shutting_down: bool,
}

struct UnitHandle {
    container_id: String,
    stop_requested: Arc<AtomicBool>,
    /// Becomes true once the exit is reported and the container removed (or the watcher gone).
    gone: watch::Receiver<bool>,
    watcher: JoinHandle<()>,
}

impl DockerRuntime {
    /// `docker` should come from [`connect`]. Events go to `events`, which is unbounded: the
    /// runtime never waits on the agent.
    pub fn new(
        docker: Docker,
        config: RuntimeConfig,
        events: mpsc::UnboundedSender<RuntimeEvent>,
    ) -> Self {
        let work_root = std::path::absolute(&config.work_root).unwrap_or(config.work_root);
        Self {
            inner: Arc::new(Inner {
                long_poll: docker.clone().with_timeout(LONG_POLL_TIMEOUT),
                docker,
                work_root,
                log_bytes_max: config.log_bytes_max,
                log_rotation: Arc::default(),
                events,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The create-container request `start` would send for `unit` (see [`render`]).
    pub fn render(&self, unit: &UnitSpec) -> serde_json::Value {
        render(unit, &self.inner.work_root)
    }
}

impl Drop for DockerRuntime {
    fn drop(&mut self) {
        // The containers keep running (see the module documentation); their watchers, which
        // hold the runtime's state, must not.
        if let Ok(state) = self.inner.state.try_lock() {
            for handle in state.units.values() {
                handle.watcher.abort();
            }
        }
    }
}

impl Runtime for DockerRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Docker
    }

    fn recover(&self) -> BoxFuture<'_, Vec<(String, Recovered)>> {
        Box::pin(recover_units(&self.inner))
    }

    fn start(&self, unit: UnitSpec) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(start_unit(&self.inner, unit))
    }

    fn stop(&self, allocation_id: &str, grace: Duration) -> BoxFuture<'_, ()> {
        let allocation_id = allocation_id.to_owned();
        Box::pin(async move { stop_unit(&self.inner, &allocation_id, grace).await })
    }

    /// Sorted. A unit is listed until its `Exited` event is sent.
    fn running(&self) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async move {
            self.inner
                .state
                .lock()
                .await
                .units
                .keys()
                .cloned()
                .collect()
        })
    }

    fn logs(
        &self,
        allocation_id: &str,
        stderr: bool,
        bytes: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, RuntimeError>> {
        let allocation_id = allocation_id.to_owned();
        Box::pin(async move {
            let _reading = self.inner.log_rotation.read().await;
            read_logs(&self.inner.work_root, &allocation_id, stderr, bytes).await
        })
    }

    fn logs_from(
        &self,
        allocation_id: &str,
        stderr: bool,
        offset: u64,
        max_bytes: u64,
    ) -> BoxFuture<'_, Result<LogRead, RuntimeError>> {
        let allocation_id = allocation_id.to_owned();
        Box::pin(async move {
            let _reading = self.inner.log_rotation.read().await;
            read_logs_from(
                &self.inner.work_root,
                &allocation_id,
                stderr,
                offset,
                max_bytes,
            )
            .await
        })
    }

    /// Stops watching; the containers run on, for the next start of the agent to adopt.
    fn shutdown(&self, _grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut state = self.inner.state.lock().await;
            state.shutting_down = true;
            if !state.units.is_empty() {
                tracing::info!(
                    n_containers = state.units.len(),
                    "leaving the containers running for the next start of the agent to adopt"
                );
            }
            for (_, handle) in std::mem::take(&mut state.units) {
                handle.watcher.abort();
            }
        })
    }
}

fn start_error(allocation_id: &str, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Start {
        allocation_id: allocation_id.to_owned(),
        reason: reason.into(),
    }
}

/// The HTTP status of a daemon's refusal, if that is what the error is.
fn status_of(error: &DockerError) -> Option<u16> {
    match error {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Refusals that depend on the spec alone.
fn check_unit(unit: &UnitSpec) -> Result<&str, RuntimeError> {
    let Some(image) = unit.image.as_deref() else {
        return Err(RuntimeError::Unsupported {
            runtime: "docker",
            reason: "the unit names no image".into(),
        });
    };
    if !is_safe_allocation_id(&unit.allocation_id) {
        return Err(start_error(
            &unit.allocation_id,
            "the allocation id must be of [A-Za-z0-9._-], not . or .. (it names the allocation's directory and container)",
        ));
    }
    for (name, value) in &unit.env {
        if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
            return Err(start_error(
                &unit.allocation_id,
                format!("invalid environment variable {name:?}: names must be non-empty without '=' or NUL, values without NUL"),
            ));
        }
    }
    Ok(image)
}

/// The image a container is created from: its id, and the reference reported for it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResolvedImage {
    /// `sha256:…`: what the container is created from.
    id: String,
    /// `name@sha256:…` when the image has a repo digest, else the id.
    reference: String,
}

/// The repository of an image reference: without its digest or tag (`host:5000/a/b:1` →
/// `host:5000/a/b`).
fn repository(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    match without_digest.rsplit_once(':') {
        Some((repository, tag)) if !tag.contains('/') => repository,
        _ => without_digest,
    }
}

/// The reference to report for `image`: its repo digest in the same repository if it has one,
/// else its first repo digest, else its image id.
fn resolve_reference(image: &str, id: &str, repo_digests: &[String]) -> String {
    let wanted = repository(image);
    let same_repository = repo_digests.iter().find(|digest| {
        repository(digest) == wanted || repository(digest).ends_with(&format!("/{wanted}"))
    });
    same_repository
        .or(repo_digests.first())
        .cloned()
        .unwrap_or_else(|| id.to_string())
}

/// Why a start fails when the image is not on the host and may not be pulled.
pub fn missing_image_reason(image: &str) -> String {
    format!(
        "the image {image} is not on this host, and pulling is off: load it with `gantry images load FILE.tar` on the agent host (FILE.tar from `docker save {image}`), or allow pulling with `pull: true` in the job or `allow_pull = true` in the agent config"
    )
}

/// Finds the image locally, pulling it first when it is missing and `pull` allows it.
async fn resolve_image(docker: &Docker, image: &str, pull: bool) -> Result<ResolvedImage, String> {
    let inspect = match docker.inspect_image(image).await {
        Ok(inspect) => inspect,
        Err(e) if status_of(&e) == Some(404) => {
            if !pull {
                return Err(missing_image_reason(image));
            }
            pull_image(docker, image).await?;
            docker
                .inspect_image(image)
                .await
                .map_err(|e| format!("inspect the image {image} after pulling it: {e}"))?
        }
        Err(e) => return Err(format!("inspect the image {image}: {e}")),
    };
    let id = inspect
        .id
        .ok_or_else(|| format!("the daemon gave no id for the image {image}"))?;
    let reference = resolve_reference(image, &id, &inspect.repo_digests.unwrap_or_default());
    Ok(ResolvedImage { id, reference })
}

async fn pull_image(docker: &Docker, image: &str) -> Result<(), String> {
    tracing::info!(%image, "pulling the image");
    let options = CreateImageOptionsBuilder::default()
        .from_image(image)
        .build();
    let pull = async {
        let mut progress = std::pin::pin!(docker.create_image(Some(options), None, None));
        while let Some(step) = progress.next().await {
            step.map_err(|e| format!("pull the image {image}: {e}"))?;
        }
        Ok(())
    };
    tokio::time::timeout(PULL_TIMEOUT, pull)
        .await
        .map_err(|_| format!("pulling the image {image} took longer than {PULL_TIMEOUT:?}"))?
}

/// A create-container request: the container's name and its configuration.
struct CreateRequest {
    name: String,
    body: ContainerCreateBody,
}

fn container_name(allocation_id: &str) -> String {
    format!("{CONTAINER_NAME_PREFIX}{allocation_id}")
}

/// `CUDA_VISIBLE_DEVICES` inside the container: UUIDs where known, else the GPU's position
/// among the assigned ones in host index order, because a container sees only its GPUs and CUDA
/// numbers them from 0 (host GPU 2 may be the container's GPU 0).
fn container_cuda_devices(gpus: &[GpuAssignment]) -> String {
    let mut by_index: Vec<u32> = gpus.iter().map(|gpu| gpu.index).collect();
    by_index.sort_unstable();
    gpus.iter()
        .map(|gpu| match &gpu.uuid {
            Some(uuid) => uuid.clone(),
            None => by_index
                .iter()
                .position(|&index| index == gpu.index)
                .unwrap_or_default()
                .to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The container's environment: the unit's, then `NVIDIA_VISIBLE_DEVICES` (the host's UUIDs or
/// indexes, as the NVIDIA container toolkit reads them), `CUDA_VISIBLE_DEVICES` (as the
/// container sees its GPUs, see [`container_cuda_devices`]), `GANTRY_ALLOCATION_ID`,
/// `GANTRY_JOB_ID` and `GANTRY_ALLOC_DIR`, sorted by name.
fn container_env(unit: &UnitSpec) -> Vec<String> {
    let mut env = unit.env.clone();
    env.insert("NVIDIA_VISIBLE_DEVICES".into(), visible_devices(&unit.gpus));
    env.insert(
        "CUDA_VISIBLE_DEVICES".into(),
        container_cuda_devices(&unit.gpus),
    );
    env.extend(
        gantry_env(unit, std::path::Path::new(ALLOC_DIR_IN_CONTAINER))
            .into_iter()
            .map(|(name, value)| (name.to_string(), value)),
    );
    env.into_iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect()
}

/// The one place a unit becomes a container configuration, for `start` and `render` alike.
fn create_request(unit: &UnitSpec, work_root: &Path, image: &ResolvedImage) -> CreateRequest {
    let labels = HashMap::from([
        (LABEL_JOB.to_string(), unit.job_id.clone()),
        (LABEL_ALLOCATION.to_string(), unit.allocation_id.clone()),
        (
            LABEL_AGENT_ROOT.to_string(),
            work_root.display().to_string(),
        ),
        (LABEL_IMAGE.to_string(), image.reference.clone()),
    ]);
    let port = unit.port.map(|port| format!("{port}/tcp"));
    // Declared GPUs have no device behind them that the NVIDIA toolkit could find: asking for
    // one would fail every start on such a host, so the container gets only the found ones.
    let devices: Vec<&GpuAssignment> = unit.gpus.iter().filter(|gpu| !gpu.declared).collect();
    let device_requests = (!devices.is_empty()).then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            device_ids: Some(
                devices
                    .iter()
                    .map(|gpu| gpu.uuid.clone().unwrap_or_else(|| gpu.index.to_string()))
                    .collect(),
            ),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]
    });
    let memory_bytes = i64::try_from(unit.memory_bytes)
        .ok()
        .filter(|&bytes| bytes > 0);
    let nano_cpus = i64::try_from(unit.cpu_millis.saturating_mul(1_000_000))
        .ok()
        .filter(|&nanos| nanos > 0);
    let host_config = HostConfig {
        mounts: Some(vec![Mount {
            target: Some(ALLOC_DIR_IN_CONTAINER.into()),
            source: Some(work_root.join(&unit.allocation_id).display().to_string()),
            typ: Some(MountType::BIND),
            ..Default::default()
        }]),
        nano_cpus,
        memory: memory_bytes,
        // Equal to the memory limit: no swap on top, so the limit is the limit.
        memory_swap: memory_bytes,
        device_requests,
        port_bindings: port.clone().map(|port| {
            HashMap::from([(
                port,
                Some(vec![PortBinding {
                    host_ip: None,
                    host_port: unit.port.map(|p| p.to_string()),
                }]),
            )])
        }),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([
                ("max-size".into(), DAEMON_LOG_FILE_BYTES.to_string()),
                ("max-file".into(), "2".into()),
            ])),
        }),
        ..Default::default()
    };
    CreateRequest {
        name: container_name(&unit.allocation_id),
        body: ContainerCreateBody {
            image: Some(image.id.clone()),
            cmd: (!unit.command.is_empty()).then(|| unit.command.clone()),
            env: Some(container_env(unit)),
            labels: Some(labels),
            exposed_ports: port.map(|port| vec![port]),
            host_config: Some(host_config),
            ..Default::default()
        },
    }
}

/// The create-container request (`{"name": …, "body": …}`, the body as the Docker Engine API
/// takes it) that an agent whose work root is `work_root` sends for `unit`. Built by the same
/// code as `start`'s request; the one difference is the image: here as the unit names it, where
/// `start` puts the image id and the resolved reference (`Image`, label `gantry.image`).
pub fn render(unit: &UnitSpec, work_root: &Path) -> serde_json::Value {
    let image = unit.image.clone().unwrap_or_default();
    let unresolved = ResolvedImage {
        id: image.clone(),
        reference: image,
    };
    let request = create_request(unit, work_root, &unresolved);
    serde_json::json!({
        "name": request.name,
        "body": serde_json::to_value(&request.body).unwrap_or_default(),
    })
}

async fn start_unit(inner: &Arc<Inner>, unit: UnitSpec) -> Result<(), RuntimeError> {
    let image = check_unit(&unit)?.to_owned();
    let allocation_id = unit.allocation_id.clone();
    {
        let mut state = inner.state.lock().await;
        if state.shutting_down {
            return Err(start_error(
                &allocation_id,
                "the Docker runtime is shutting down",
            ));
        }
        if state.units.contains_key(&allocation_id) || state.resolving.contains_key(&allocation_id)
        {
            tracing::debug!(allocation = %allocation_id, "already running; start ignored");
            return Ok(());
        }
        state.resolving.insert(allocation_id.clone(), false);
    }
    // Outside the lock: a pull can take minutes, and stops must not wait for it.
    let resolved = resolve_image(&inner.docker, &image, unit.pull).await;
    let mut state = inner.state.lock().await;
    if state.resolving.remove(&allocation_id) == Some(true) {
        // Whatever became of the image: the allocation is no longer wanted.
        tracing::info!(allocation = %allocation_id, "stopped before its container was created");
        let _ = inner.events.send(RuntimeEvent::Exited {
            allocation_id,
            exit: Exit::Stopped,
        });
        return Ok(());
    }
    let resolved = resolved.map_err(|reason| start_error(&allocation_id, reason))?;
    if state.shutting_down {
        return Err(start_error(
            &allocation_id,
            "the Docker runtime is shutting down",
        ));
    }

    let alloc_dir = inner.work_root.join(&allocation_id);
    tokio::fs::create_dir_all(&alloc_dir).await.map_err(|e| {
        start_error(
            &allocation_id,
            format!(
                "create the allocation directory {}: {e}",
                alloc_dir.display()
            ),
        )
    })?;
    // A new container's output starts a new cursor (an earlier container of the same
    // allocation id has its own timestamps).
    match tokio::fs::remove_file(alloc_dir.join(LOG_CURSOR_FILE)).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(start_error(
                &allocation_id,
                format!("reset the log cursor: {e}"),
            ))
        }
        _ => {}
    }
    let request = create_request(&unit, &inner.work_root, &resolved);
    let container_id = create_container(inner, &allocation_id, request)
        .await
        .map_err(|reason| start_error(&allocation_id, reason))?;
    if let Err(e) = inner.docker.start_container(&container_id, None).await {
        remove_container(&inner.docker, &container_id).await;
        return Err(start_error(
            &allocation_id,
            format!("start the container: {e}"),
        ));
    }
    tracing::info!(allocation = %allocation_id, job = %unit.job_id, container = %container_id, image = %resolved.reference, "container started");
    // Before the watcher exists, so `Started` always precedes `Exited`.
    let _ = inner.events.send(RuntimeEvent::Started {
        allocation_id: allocation_id.clone(),
        image: Some(resolved.reference),
    });
    let handle = spawn_watcher(inner, &allocation_id, container_id);
    state.units.insert(allocation_id, handle);
    Ok(())
}

/// Creates the container. A container already holding the name that is this agent's, for this
/// allocation, is a leftover of an earlier try (the agent stopped between create and start):
/// it is removed and the create tried once more.
async fn create_container(
    inner: &Inner,
    allocation_id: &str,
    request: CreateRequest,
) -> Result<String, String> {
    let options = CreateContainerOptionsBuilder::default()
        .name(&request.name)
        .build();
    match inner
        .docker
        .create_container(Some(options.clone()), request.body.clone())
        .await
    {
        Ok(created) => return Ok(created.id),
        Err(e) if status_of(&e) == Some(409) => {}
        Err(e) => return Err(format!("create the container: {e}")),
    }
    let existing = inner
        .docker
        .inspect_container(&request.name, None)
        .await
        .map_err(|e| {
            format!(
                "a container named {} exists and cannot be inspected: {e}",
                request.name
            )
        })?;
    let labels = existing
        .config
        .as_ref()
        .and_then(|config| config.labels.clone())
        .unwrap_or_default();
    let ours = labels.get(LABEL_AGENT_ROOT) == Some(&inner.work_root.display().to_string())
        && labels.get(LABEL_ALLOCATION).map(String::as_str) == Some(allocation_id);
    if !ours {
        return Err(format!(
            "a container named {} exists that this agent did not create; remove it or give this agent another work root",
            request.name
        ));
    }
    tracing::warn!(allocation = %allocation_id, "removing a container left by an earlier try of this allocation");
    if let Some(id) = existing.id {
        remove_container(&inner.docker, &id).await;
    }
    inner
        .docker
        .create_container(Some(options), request.body)
        .await
        .map(|created| created.id)
        .map_err(|e| format!("create the container: {e}"))
}

/// Removes a container whatever its state (bounded: a failure is logged, not retried).
async fn remove_container(docker: &Docker, container_id: &str) {
    let options = RemoveContainerOptionsBuilder::default().force(true).build();
    match docker.remove_container(container_id, Some(options)).await {
        Ok(()) => {}
        Err(e) if status_of(&e) == Some(404) => {}
        Err(e) => tracing::warn!(container = %container_id, "cannot remove the container: {e}"),
    }
}

fn spawn_watcher(inner: &Arc<Inner>, allocation_id: &str, container_id: String) -> UnitHandle {
    let stop_requested = Arc::new(AtomicBool::new(false));
    let (gone_tx, gone) = watch::channel(false);
    let watcher = tokio::spawn(watch_container(
        Arc::clone(inner),
        allocation_id.to_owned(),
        container_id.clone(),
        Arc::clone(&stop_requested),
        gone_tx,
    ));
    UnitHandle {
        container_id,
        stop_requested,
        gone,
        watcher,
    }
}

/// Owns a running container: follows its output, waits for its end, reports it exactly once,
/// then removes the container.
async fn watch_container(
    inner: Arc<Inner>,
    allocation_id: String,
    container_id: String,
    stop_requested: Arc<AtomicBool>,
    gone: watch::Sender<bool>,
) {
    let alloc_dir = inner.work_root.join(&allocation_id);
    let follow = follow_logs(
        &inner.long_poll,
        &container_id,
        &alloc_dir,
        inner.log_bytes_max,
        &inner.log_rotation,
        &allocation_id,
    );
    tokio::pin!(follow);
    let wait = wait_for_end(&inner.docker, &inner.long_poll, &container_id);
    tokio::pin!(wait);
    let mut follow_done = false;
    let ended = loop {
        tokio::select! {
            ended = &mut wait => break ended,
            () = &mut follow, if !follow_done => follow_done = true,
        }
    };
    if !follow_done
        && tokio::time::timeout(LOG_DRAIN_WAIT, &mut follow)
            .await
            .is_err()
    {
        tracing::warn!(allocation = %allocation_id, "the container's output did not end {LOG_DRAIN_WAIT:?} after it; dropping the rest");
    }
    let exit = match ended {
        Ok(inspect) => classify_exit(&inspect, stop_requested.load(Ordering::SeqCst)),
        Err(reason) => Exit::Lost(reason),
    };
    tracing::info!(allocation = %allocation_id, ?exit, "container ended");
    {
        let mut state = inner.state.lock().await;
        state.units.remove(&allocation_id);
        let _ = inner.events.send(RuntimeEvent::Exited {
            allocation_id: allocation_id.clone(),
            exit,
        });
    }
    remove_container(&inner.docker, &container_id).await;
    let _ = gone.send(true);
}

fn is_running(inspect: &ContainerInspectResponse) -> bool {
    inspect.state.as_ref().is_some_and(|state| {
        matches!(
            state.status,
            Some(
                ContainerStateStatusEnum::RUNNING
                    | ContainerStateStatusEnum::PAUSED
                    | ContainerStateStatusEnum::RESTARTING
                    | ContainerStateStatusEnum::STOPPING
            )
        ) || state.running == Some(true)
    })
}

/// Waits until the container is no longer running and returns its final inspection; an error
/// names why its end cannot be known (removed behind Gantry's back, the daemon gone too long).
async fn wait_for_end(
    docker: &Docker,
    long_poll: &Docker,
    container_id: &str,
) -> Result<ContainerInspectResponse, String> {
    let mut unreachable_since: Option<Instant> = None;
    loop {
        let mut wait = std::pin::pin!(long_poll.wait_container(container_id, None));
        match wait.next().await {
            // Non-zero exit codes arrive as this error; the inspection below has the details.
            Some(Ok(_)) | Some(Err(DockerError::DockerContainerWaitError { .. })) | None => {}
            Some(Err(e)) => {
                tracing::debug!(container = %container_id, "waiting for the container failed: {e}");
            }
        }
        match docker.inspect_container(container_id, None).await {
            Ok(inspect) if !is_running(&inspect) => return Ok(inspect),
            Ok(_) => unreachable_since = None,
            Err(e) if status_of(&e) == Some(404) => {
                return Err("its container was removed outside Gantry".into())
            }
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= DAEMON_UNREACHABLE_MAX {
                    return Err(format!(
                        "the Docker daemon did not answer for {DAEMON_UNREACHABLE_MAX:?}: {e}"
                    ));
                }
                tracing::warn!(container = %container_id, "cannot inspect the container; retrying: {e}");
            }
        }
        // Bounds the loop when a wait ends early (the daemon restarting, a paused container).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How a container that is no longer running ended.
fn classify_exit(inspect: &ContainerInspectResponse, stop_requested: bool) -> Exit {
    if stop_requested {
        return Exit::Stopped;
    }
    let Some(state) = &inspect.state else {
        return Exit::Lost("the daemon reported no state for its container".into());
    };
    let exit_code = state
        .exit_code
        .and_then(|code| i32::try_from(code).ok())
        .unwrap_or(-1);
    if state.oom_killed == Some(true) {
        let limit = inspect
            .host_config
            .as_ref()
            .and_then(|host| host.memory)
            .and_then(|bytes| u64::try_from(bytes).ok())
            .filter(|&bytes| bytes > 0);
        let reason = match limit {
            Some(bytes) => format!(
                "killed for exceeding its memory limit of {}",
                gantry_protocol::units::format_bytes(bytes)
            ),
            None => "killed by the kernel for lack of memory (out of memory)".to_string(),
        };
        return Exit::Failed {
            exit_code: Some(exit_code),
            reason,
        };
    }
    if state.status == Some(ContainerStateStatusEnum::CREATED) {
        return Exit::Lost("its container was created but never started".into());
    }
    Exit::Code(exit_code)
}

/// `2024-05-01T12:34:56.123456789Z` (the daemon's log timestamps, always UTC) as seconds and
/// nanoseconds since the Unix epoch; `None` for anything else.
fn parse_timestamp(text: &str) -> Option<(i64, u32)> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut date_fields = date.splitn(3, '-').map(|f| f.parse::<i64>().ok());
    let (year, month, day) = (
        date_fields.next()??,
        date_fields.next()??,
        date_fields.next()??,
    );
    let (clock, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut clock_fields = clock.splitn(3, ':').map(|f| f.parse::<i64>().ok());
    let (hour, minute, second) = (
        clock_fields.next()??,
        clock_fields.next()??,
        clock_fields.next()??,
    );
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || !(0..24).contains(&hour)
        || !(0..60).contains(&minute)
        || !(0..=60).contains(&second)
        || fraction.len() > 9
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let nanos = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<9}").parse::<u32>().ok()?
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let year_of_era_base = if month <= 2 { year - 1 } else { year };
    let era = year_of_era_base.div_euclid(400);
    let year_of_era = year_of_era_base - era * 400;
    let day_of_year = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some((days * 86_400 + hour * 3_600 + minute * 60 + second, nanos))
}

/// A log frame with timestamps on: `<timestamp> <output>`.
fn split_timestamp(frame: &[u8]) -> (Option<(i64, u32)>, &[u8]) {
    let Some(space) = frame.iter().position(|&b| b == b' ') else {
        return (None, frame);
    };
    match std::str::from_utf8(&frame[..space])
        .ok()
        .and_then(parse_timestamp)
    {
        Some(stamp) => (Some(stamp), &frame[space + 1..]),
        None => (None, frame),
    }
}

/// Which of a follow's frames are new, and the newest stamp written.
#[derive(Debug, Clone, Copy, Default)]
struct LogCursor {
    /// Frames stamped at or before this were written by an earlier follow.
    written_through: Option<(i64, u32)>,
    newest: Option<(i64, u32)>,
}

impl LogCursor {
    fn new(newest: Option<(i64, u32)>) -> Self {
        Self {
            written_through: newest,
            newest,
        }
    }

    /// A follow starts (again) from the newest stamp written so far.
    fn restart(&mut self) {
        self.written_through = self.newest;
    }

    /// Whether a frame with this stamp is to be written; a written stamp newer than any before
    /// moves the cursor (the answer to `moved`).
    fn admit(&mut self, stamp: Option<(i64, u32)>) -> (bool, bool) {
        let Some(stamp) = stamp else {
            return (true, false);
        };
        if self.written_through.is_some_and(|seen| stamp <= seen) {
            return (false, false);
        }
        let moved = self.newest.is_none_or(|newest| stamp > newest);
        if moved {
            self.newest = Some(stamp);
        }
        (true, moved)
    }
}

/// Follows the container's output into its bounded logs until the output ends, skipping what
/// the cursor says is on disk already (see the module documentation).
async fn follow_logs(
    docker: &Docker,
    container_id: &str,
    alloc_dir: &Path,
    log_bytes_max: u64,
    rotation: &Arc<tokio::sync::RwLock<()>>,
    allocation_id: &str,
) {
    let cursor_path = alloc_dir.join(LOG_CURSOR_FILE);
    let mut cursor = LogCursor::new(
        tokio::fs::read_to_string(&cursor_path)
            .await
            .ok()
            .and_then(|text| parse_timestamp(text.trim())),
    );
    let mut logs = match (
        BoundedLog::open(alloc_dir, STDOUT_LOG, log_bytes_max, rotation).await,
        BoundedLog::open(alloc_dir, STDERR_LOG, log_bytes_max, rotation).await,
    ) {
        (Ok(stdout), Ok(stderr)) => [stdout, stderr],
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(allocation = %allocation_id, "cannot open the logs; the container's output is not kept: {e}");
            return;
        }
    };
    let mut log_failed = false;
    let mut n_reconnects = 0u32;
    loop {
        cursor.restart();
        let since = cursor
            .newest
            .and_then(|(seconds, _)| i32::try_from(seconds).ok())
            .unwrap_or(0);
        let options = LogsOptionsBuilder::default()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .timestamps(true)
            .since(since)
            .build();
        let mut batches = std::pin::pin!(docker
            .logs(container_id, Some(options))
            .ready_chunks(LOG_BATCH_FRAMES_MAX));
        let mut failure = None;
        while let Some(batch) = batches.next().await {
            let mut newest_text = None;
            for frame in batch {
                let (stream_idx, message) = match frame {
                    Ok(LogOutput::StdOut { message }) => (0, message),
                    Ok(LogOutput::StdErr { message }) => (1, message),
                    Ok(_) => continue,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                };
                let (stamp, output) = split_timestamp(&message);
                let (new, moved) = cursor.admit(stamp);
                if !new {
                    continue;
                }
                if !log_failed {
                    if let Err(e) = logs[stream_idx].write(output).await {
                        tracing::warn!(allocation = %allocation_id, log = %logs[stream_idx].path().display(), "writing the container's output failed; dropping the rest: {e}");
                        log_failed = true;
                    }
                }
                if moved {
                    newest_text = std::str::from_utf8(&message[..message.len() - output.len() - 1])
                        .ok()
                        .map(str::to_owned);
                }
            }
            if let Some(text) = newest_text {
                if let Err(e) = tokio::fs::write(&cursor_path, text).await {
                    tracing::debug!(allocation = %allocation_id, "cannot record the log cursor: {e}");
                }
            }
            if failure.is_some() {
                break;
            }
        }
        // A stream that ends by itself ends with the container; one that fails (the daemon
        // restarting, a dropped connection) is followed again from the cursor, for as long as
        // the watcher waits for the container.
        let Some(e) = failure else {
            return;
        };
        n_reconnects += 1;
        if n_reconnects == 1 {
            tracing::warn!(allocation = %allocation_id, "following the container's output failed; following it again: {e}");
        }
        tokio::time::sleep(LOG_RECONNECT_WAIT).await;
    }
}

async fn stop_unit(inner: &Arc<Inner>, allocation_id: &str, grace: Duration) {
    let (container_id, stop_requested, mut gone) = {
        let mut state = inner.state.lock().await;
        if let Some(stopped) = state.resolving.get_mut(allocation_id) {
            // Its start gives up before creating anything and reports it stopped.
            *stopped = true;
            return;
        }
        let Some(handle) = state.units.get(allocation_id) else {
            return;
        };
        (
            handle.container_id.clone(),
            Arc::clone(&handle.stop_requested),
            handle.gone.clone(),
        )
    };
    stop_requested.store(true, Ordering::SeqCst);
    // Docker counts the grace in whole seconds: rounded up, so a unit gets at least its grace.
    let grace_s = i32::try_from(grace.as_millis().div_ceil(1000)).unwrap_or(i32::MAX);
    let options = StopContainerOptionsBuilder::default().t(grace_s).build();
    // The daemon answers the stop once the container is down: up to the grace and the kill.
    let docker = inner.docker.clone().with_timeout(grace + KILL_WAIT);
    match docker.stop_container(&container_id, Some(options)).await {
        Ok(()) => {}
        // 304: already stopped; 404: already removed.
        Err(e) if matches!(status_of(&e), Some(304 | 404)) => {}
        Err(e) => {
            tracing::warn!(allocation = %allocation_id, "stopping the container failed; killing it: {e}");
            let kill = KillContainerOptionsBuilder::default()
                .signal("SIGKILL")
                .build();
            if let Err(e) = inner.docker.kill_container(&container_id, Some(kill)).await {
                tracing::warn!(allocation = %allocation_id, "killing the container failed: {e}");
            }
        }
    }
    if tokio::time::timeout(KILL_WAIT, gone.wait_for(|gone| *gone))
        .await
        .is_err()
    {
        tracing::warn!(allocation = %allocation_id, "the container is not gone {KILL_WAIT:?} after its stop");
    }
}

/// Adopts this agent's running containers and reports (and removes) those that ended.
async fn recover_units(inner: &Arc<Inner>) -> Vec<(String, Recovered)> {
    let root = inner.work_root.display().to_string();
    let filters = HashMap::from([("label", vec![format!("{LABEL_AGENT_ROOT}={root}")])]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let containers = match inner.docker.list_containers(Some(options)).await {
        Ok(containers) => containers,
        Err(e) => {
            tracing::error!("cannot list this agent's containers; none is adopted: {e}");
            return Vec::new();
        }
    };
    let mut recovered = Vec::new();
    let mut state = inner.state.lock().await;
    for container in containers {
        let labels = container.labels.unwrap_or_default();
        let (Some(container_id), Some(allocation_id)) =
            (container.id, labels.get(LABEL_ALLOCATION).cloned())
        else {
            continue;
        };
        // The label filter is exact, but a label is anyone's to set.
        if labels.get(LABEL_AGENT_ROOT) != Some(&root) || !is_safe_allocation_id(&allocation_id) {
            continue;
        }
        if state.units.contains_key(&allocation_id) {
            tracing::warn!(allocation = %allocation_id, container = %container_id, "a second container for one allocation; leaving it alone");
            continue;
        }
        let running = matches!(
            container.state,
            Some(
                ContainerSummaryStateEnum::RUNNING
                    | ContainerSummaryStateEnum::PAUSED
                    | ContainerSummaryStateEnum::RESTARTING
            )
        );
        if running {
            tracing::info!(allocation = %allocation_id, container = %container_id, "adopting a container that ran on through the agent's restart");
            let handle = spawn_watcher(inner, &allocation_id, container_id);
            state.units.insert(allocation_id.clone(), handle);
            let image = labels.get(LABEL_IMAGE).cloned();
            recovered.push((allocation_id, Recovered::Running { image }));
            continue;
        }
        let exit = match inner.docker.inspect_container(&container_id, None).await {
            Ok(inspect) => classify_exit(&inspect, false),
            Err(e) => Exit::Lost(format!("its container could not be inspected: {e}")),
        };
        tracing::info!(allocation = %allocation_id, ?exit, "a container ended while the agent was away");
        remove_container(&inner.docker, &container_id).await;
        recovered.push((allocation_id, Recovered::Ended(exit)));
    }
    recovered.sort_by(|a, b| a.0.cmp(&b.0));
    recovered
}

/// A file as a stream of chunks, for a request body; a read error ends it.
fn file_chunks(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    futures_util::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buffer = vec![0; LOAD_READ_CHUNK_BYTES];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(n_bytes) => {
                buffer.truncate(n_bytes);
                Some((Ok(bytes::Bytes::from(buffer)), Some(file)))
            }
            // The error ends the body, and the stream after it.
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// Loads the images of a tarball made by `docker save` into the local daemon (`docker load`),
/// returning what it loaded: `name:tag` for tagged images, `sha256:…` for the others.
pub async fn load_image(docker: &Docker, tar: &Path) -> Result<Vec<String>, String> {
    let file = tokio::fs::File::open(tar)
        .await
        .map_err(|e| format!("cannot open {}: {e}", tar.display()))?;
    let metadata = file
        .metadata()
        .await
        .map_err(|e| format!("cannot read {}: {e}", tar.display()))?;
    if !metadata.is_file() {
        return Err(format!(
            "{} is not a file (expected a tarball from `docker save`)",
            tar.display()
        ));
    }
    let chunks = file_chunks(file);
    let options = ImportImageOptionsBuilder::default().quiet(true).build();
    let mut progress = std::pin::pin!(docker.import_image_stream(options, chunks, None));
    let mut loaded = Vec::new();
    while let Some(step) = progress.next().await {
        let info = step.map_err(|e| {
            format!(
                "the daemon refused {} (is it a tarball from `docker save`?): {e}",
                tar.display()
            )
        })?;
        let text = info.stream.unwrap_or_default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(reference) = line
                .strip_prefix("Loaded image: ")
                .or_else(|| line.strip_prefix("Loaded image ID: "))
            {
                loaded.push(reference.to_string());
            }
        }
    }
    if loaded.is_empty() {
        return Err(format!(
            "{} held no image (expected a tarball from `docker save`)",
            tar.display()
        ));
    }
    Ok(loaded)
}

/// Imports a tarball of a root file system as an image (`docker import`) named `reference`
/// (`name:tag`), with Dockerfile instructions applied to it (`changes`: `ENV …`, `LABEL …`,
/// `CMD …`). Nothing is pulled. Returns the image id.
pub async fn import_root_filesystem(
    docker: &Docker,
    tar: &Path,
    reference: &str,
    changes: Vec<String>,
) -> Result<String, String> {
    let file = tokio::fs::File::open(tar)
        .await
        .map_err(|e| format!("cannot open {}: {e}", tar.display()))?;
    let (repository, tag) = match reference.rsplit_once(':') {
        Some((repository, tag)) if !tag.contains('/') => (repository, tag),
        _ => (reference, "latest"),
    };
    let options = CreateImageOptionsBuilder::default()
        .from_src("-")
        .repo(repository)
        .tag(tag)
        .changes(changes)
        .build();
    let body = bollard::body_try_stream(file_chunks(file));
    let mut progress = std::pin::pin!(docker.create_image(Some(options), Some(body), None));
    while let Some(step) = progress.next().await {
        step.map_err(|e| format!("import {} as {reference}: {e}", tar.display()))?;
    }
    let inspect = docker
        .inspect_image(reference)
        .await
        .map_err(|e| format!("inspect {reference} after importing it: {e}"))?;
    inspect
        .id
        .ok_or_else(|| format!("the daemon gave no id for the image {reference}"))
}

/// A local image's id and labels, or `None` when the daemon has no image by that reference.
pub async fn local_image(
    docker: &Docker,
    reference: &str,
) -> Result<Option<(String, HashMap<String, String>)>, String> {
    match docker.inspect_image(reference).await {
        Ok(inspect) => Ok(Some((
            inspect.id.unwrap_or_default(),
            inspect
                .config
                .and_then(|config| config.labels)
                .unwrap_or_default(),
        ))),
        Err(e) if status_of(&e) == Some(404) => Ok(None),
        Err(e) => Err(format!("inspect the image {reference}: {e}")),
    }
}

/// Force-removes, running or not, every container made by an agent whose work root lies under
/// `root` (its [`LABEL_AGENT_ROOT`]): what a host's death does to its containers, and how a
/// fleet of agents that share one data dir is cleared. Returns how many it removed.
pub async fn remove_containers_under(docker: &Docker, root: &Path) -> Result<usize, String> {
    let filters = HashMap::from([("label", vec![LABEL_AGENT_ROOT.to_string()])]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let containers = docker
        .list_containers(Some(options))
        .await
        .map_err(|e| format!("list containers: {e}"))?;
    let mut n_removed = 0;
    for container in containers {
        let under_root = container
            .labels
            .as_ref()
            .and_then(|labels| labels.get(LABEL_AGENT_ROOT))
            .is_some_and(|agent_root| Path::new(agent_root).starts_with(root));
        let Some(id) = container.id.filter(|_| under_root) else {
            continue;
        };
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match docker.remove_container(&id, Some(options)).await {
            Ok(()) => n_removed += 1,
            // Gone meanwhile: its agent removed it.
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => return Err(format!("remove the container {id}: {e}")),
        }
    }
    Ok(n_removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(allocation_id: &str) -> UnitSpec {
        let job = gantry_protocol::jobspec::from_json_value(serde_json::json!({
            "name": "job", "kind": "serving", "image": "registry.local/serve:1",
            "command": ["serve", "--port", "8080"], "env": { "MODEL": "m", "GANTRY_JOB_ID": "forged" },
            "resources": { "cpus": 1.5, "memory": "256MiB" },
        }))
        .expect("a valid spec");
        UnitSpec::new(
            allocation_id,
            "job-1",
            job,
            "node",
            &BTreeMap::from([("PORT".to_string(), "31005".to_string())]),
            vec![
                GpuAssignment {
                    index: 3,
                    uuid: None,
                    declared: false,
                },
                GpuAssignment {
                    index: 1,
                    uuid: Some("GPU-uuid-b".into()),
                    declared: false,
                },
            ],
            false,
        )
    }

    #[test]
    fn render_is_the_container_the_unit_describes() {
        let rendered = render(&unit("a-1"), Path::new("/var/lib/gantry/allocations"));
        let expected = serde_json::json!({
            "name": "gantry-a-1",
            "body": {
                "Image": "registry.local/serve:1",
                "Cmd": ["serve", "--port", "8080"],
                "Env": [
                    "CUDA_VISIBLE_DEVICES=1,GPU-uuid-b",
                    "GANTRY_ALLOCATION_ID=a-1",
                    "GANTRY_ALLOC_DIR=/gantry/alloc",
                    "GANTRY_INPUT_DIR=/gantry/alloc/in",
                    "GANTRY_JOB_ID=job-1",
                    "GANTRY_OUTPUT_DIR=/gantry/alloc/out",
                    "MODEL=m",
                    "NVIDIA_VISIBLE_DEVICES=3,GPU-uuid-b",
                    "PORT=31005",
                ],
                "Labels": {
                    "gantry.job": "job-1",
                    "gantry.allocation": "a-1",
                    "gantry.agent-root": "/var/lib/gantry/allocations",
                    "gantry.image": "registry.local/serve:1",
                },
                "ExposedPorts": { "31005/tcp": {} },
                "HostConfig": {
                    "Mounts": [{
                        "Target": "/gantry/alloc",
                        "Source": "/var/lib/gantry/allocations/a-1",
                        "Type": "bind",
                    }],
                    "NanoCpus": 1_500_000_000i64,
                    "Memory": 268_435_456i64,
                    "MemorySwap": 268_435_456i64,
                    "DeviceRequests": [{
                        "Driver": "nvidia",
                        "DeviceIDs": ["3", "GPU-uuid-b"],
                        "Capabilities": [["gpu"]],
                    }],
                    "PortBindings": { "31005/tcp": [{ "HostPort": "31005" }] },
                    "RestartPolicy": { "Name": "no" },
                    "LogConfig": {
                        "Type": "json-file",
                        "Config": { "max-size": "16777216", "max-file": "2" },
                    },
                },
            },
        });
        assert_eq!(
            rendered,
            expected,
            "{}",
            serde_json::to_string_pretty(&rendered).unwrap()
        );
    }

    #[test]
    fn render_leaves_out_what_the_unit_does_not_ask_for() {
        let mut plain = unit("b-2");
        plain.command.clear();
        plain.gpus.clear();
        plain.port = None;
        plain.cpu_millis = 0;
        plain.memory_bytes = 0;
        let rendered = render(&plain, Path::new("/w"));
        let body = &rendered["body"];
        for absent in ["Cmd", "ExposedPorts"] {
            assert!(body.get(absent).is_none(), "{absent}: {body}");
        }
        for absent in [
            "DeviceRequests",
            "PortBindings",
            "NanoCpus",
            "Memory",
            "MemorySwap",
        ] {
            assert!(body["HostConfig"].get(absent).is_none(), "{absent}: {body}");
        }
        let env = body["Env"].as_array().unwrap();
        assert!(env.contains(&"CUDA_VISIBLE_DEVICES=".into()), "{env:?}");
        assert!(env.contains(&"NVIDIA_VISIBLE_DEVICES=".into()), "{env:?}");
    }

    #[test]
    fn only_gpus_found_through_nvml_are_asked_of_the_driver() {
        let mut mixed = unit("c-3");
        mixed.gpus[0].declared = true;
        let body = &render(&mixed, Path::new("/w"))["body"];
        assert_eq!(
            body["HostConfig"]["DeviceRequests"][0]["DeviceIDs"],
            serde_json::json!(["GPU-uuid-b"]),
            "{body}"
        );

        let mut declared = unit("c-4");
        for gpu in &mut declared.gpus {
            gpu.declared = true;
        }
        let body = &render(&declared, Path::new("/w"))["body"];
        assert!(body["HostConfig"].get("DeviceRequests").is_none(), "{body}");
    }

    #[test]
    fn image_references_resolve_to_a_digest_in_the_same_repository() {
        let digests = |list: &[&str]| list.iter().map(|d| d.to_string()).collect::<Vec<_>>();
        let cases = [
            ("serve:1", digests(&[]), "sha256:id"),
            (
                "serve:1",
                digests(&["other@sha256:o", "serve@sha256:s"]),
                "serve@sha256:s",
            ),
            ("serve", digests(&["other@sha256:o"]), "other@sha256:o"),
            (
                "host:5000/team/serve:2",
                digests(&["host:5000/team/serve@sha256:s"]),
                "host:5000/team/serve@sha256:s",
            ),
            (
                "ubuntu:24.04",
                digests(&["docker.io/library/ubuntu@sha256:u"]),
                "docker.io/library/ubuntu@sha256:u",
            ),
            (
                "serve@sha256:s",
                digests(&["serve@sha256:s"]),
                "serve@sha256:s",
            ),
        ];
        for (image, repo_digests, expected) in cases {
            assert_eq!(
                resolve_reference(image, "sha256:id", &repo_digests),
                expected,
                "{image}"
            );
        }
    }

    #[test]
    fn a_line_stamped_before_the_other_streams_last_is_kept_and_skipped_only_after_a_resume() {
        // `echo out; echo err >&2`: the daemon's stderr copier delivered first.
        let (out, err, later) = ((10, 1), (10, 2), (11, 0));
        let mut cursor = LogCursor::new(None);
        assert_eq!(cursor.admit(Some(err)), (true, true));
        assert_eq!(
            cursor.admit(Some(out)),
            (true, false),
            "out of order, still new"
        );
        assert_eq!(cursor.newest, Some(err));
        assert_eq!(cursor.admit(None), (true, false));
        // The follow starts again from the newest stamp written: everything up to it is on disk.
        cursor.restart();
        assert_eq!(cursor.admit(Some(out)), (false, false));
        assert_eq!(cursor.admit(Some(err)), (false, false));
        assert_eq!(cursor.admit(Some(later)), (true, true));
        // An agent restarted with the cursor file starts where it said.
        let mut resumed = LogCursor::new(Some(err));
        assert_eq!(resumed.admit(Some(err)), (false, false));
        assert_eq!(resumed.admit(Some(later)), (true, true));
    }

    #[test]
    fn timestamps_parse_to_unix_time() {
        let cases = [
            ("1970-01-01T00:00:00Z", Some((0, 0))),
            (
                "2024-05-01T12:34:56.123456789Z",
                Some((1_714_566_896, 123_456_789)),
            ),
            ("2000-02-29T23:59:59.5Z", Some((951_868_799, 500_000_000))),
            ("2024-05-01T12:34:56.123456789+02:00", None),
            ("2024-13-01T00:00:00Z", None),
            ("2024-05-01T12:34:56.1234567890Z", None),
            ("output", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_timestamp(text), expected, "{text}");
        }
        assert_eq!(
            split_timestamp(b"2024-05-01T12:34:56.000000001Z hello world\n"),
            (Some((1_714_566_896, 1)), &b"hello world\n"[..])
        );
        assert_eq!(
            split_timestamp(b"no stamp here"),
            (None, &b"no stamp here"[..])
        );
    }

    #[test]
    fn ended_containers_are_classified_by_their_state() {
        let inspect = |status, exit_code, oom_killed, memory| ContainerInspectResponse {
            state: Some(bollard::models::ContainerState {
                status: Some(status),
                exit_code: Some(exit_code),
                oom_killed: Some(oom_killed),
                ..Default::default()
            }),
            host_config: Some(HostConfig {
                memory,
                ..Default::default()
            }),
            ..Default::default()
        };
        use ContainerStateStatusEnum::{CREATED, DEAD, EXITED};
        let cases = [
            (inspect(EXITED, 0, false, None), false, Exit::Code(0)),
            (inspect(EXITED, 3, false, None), false, Exit::Code(3)),
            (inspect(DEAD, 137, false, None), false, Exit::Code(137)),
            (inspect(EXITED, 143, false, None), true, Exit::Stopped),
            (
                inspect(EXITED, 137, true, Some(16 << 20)),
                true,
                Exit::Stopped,
            ),
            (
                inspect(EXITED, 137, true, Some(16 << 20)),
                false,
                Exit::Failed {
                    exit_code: Some(137),
                    reason: "killed for exceeding its memory limit of 16MiB".into(),
                },
            ),
            (
                inspect(EXITED, 137, true, None),
                false,
                Exit::Failed {
                    exit_code: Some(137),
                    reason: "killed by the kernel for lack of memory (out of memory)".into(),
                },
            ),
            (
                inspect(CREATED, 0, false, None),
                false,
                Exit::Lost("its container was created but never started".into()),
            ),
            (
                ContainerInspectResponse::default(),
                false,
                Exit::Lost("the daemon reported no state for its container".into()),
            ),
        ];
        for (inspect, stop_requested, expected) in cases {
            assert_eq!(
                classify_exit(&inspect, stop_requested),
                expected,
                "{inspect:?}"
            );
        }
    }

    #[test]
    fn missing_image_reason_says_how_to_fix_it() {
        let reason = missing_image_reason("registry.local/serve:1");
        for needle in [
            "registry.local/serve:1",
            "gantry images load",
            "pull: true",
            "allow_pull = true",
        ] {
            assert!(reason.contains(needle), "{needle:?} missing from {reason}");
        }
    }
}
