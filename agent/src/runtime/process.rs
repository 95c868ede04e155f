//! The process runtime: runs each unit as a plain child process of the agent, in its own process
//! group, with a minimal environment, a working directory per allocation and bounded logs.
//!
//! Architecture invariant: nothing it starts outlives the agent. A unit's group is stopped on
//! `stop` and `shutdown`, is killed when the unit's main process exits by itself, and the main
//! process is SIGKILLed by the kernel (`PR_SET_PDEATHSIG`) if the agent dies abruptly.
//!
//! Deliberately absent: isolation and limits (`cpu_millis` and `memory_bytes` are not enforced:
//! no cgroups, no namespaces), and any state across agent restarts (see
//! [`previous_allocations`]). Processes that leave the unit's process group (`setsid`, a double
//! fork into a new group) escape `stop`, and processes the unit starts do not inherit
//! PDEATHSIG (the kernel clears it on fork), so when the agent is SIGKILLed only the unit's main
//! process is guaranteed to die; its children are then orphans. Containing those needs a cgroup
//! per unit, which is out of scope for this runtime.
//!
//! Environment policy: a unit sees exactly the agent's `PATH` (a default when unset), `HOME`,
//! `USER`, `LOGNAME`, `LANG`, `LC_ALL`, `TZ` and `TMPDIR` where set; then the unit's own env;
//! then, overriding the unit's env, `CUDA_VISIBLE_DEVICES` and `NVIDIA_VISIBLE_DEVICES` (the
//! assigned GPUs, comma-separated, by UUID where known, else by index; empty when no GPU is
//! assigned), `GANTRY_ALLOCATION_ID`, `GANTRY_JOB_ID`, and the allocation's directories
//! `GANTRY_ALLOC_DIR` (also the unit's working directory), `GANTRY_INPUT_DIR` and
//! `GANTRY_OUTPUT_DIR`. Nothing else of the agent's environment is passed on, in particular no
//! `GANTRY_*` variable (the join token may be one).
//!
//! Logs: stdout and stderr go to bounded files in the allocation's directory, with offsets
//! stable across rotations (see [`super::logs`]).

use super::logs::{
    is_safe_allocation_id, read_logs, read_logs_from, BoundedLog, ALLOCATION_ID_BYTES_MAX,
    STDERR_LOG, STDOUT_LOG,
};
use super::spawn::{self, SpawnRequest, Spawned, UnitProcess};
use super::{
    gantry_env, visible_devices, BoxFuture, Exit, LogRead, Runtime, RuntimeConfig, RuntimeError,
    RuntimeEvent, UnitSpec,
};
use gantry_protocol::RuntimeKind;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch, Mutex, RwLock};
use tokio::task::JoinHandle;

/// The agent variables a unit inherits; everything else of the agent's environment is withheld.
/// None may start with `GANTRY_` (the agent's join token can be one).
const INHERITED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR",
];
/// `PATH` for units when the agent has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The reason a restarted agent gives for units listed by [`previous_allocations`].
pub const RESTART_LOST_REASON: &str =
    "the agent restarted; the process runtime keeps no work across restarts";

/// After a unit's main process exits, how long its output is still drained (from members of its
/// group already killed, or from processes that escaped the group and hold the pipes).
const LOG_DRAIN_WAIT: Duration = Duration::from_secs(2);
/// How long `stop` waits for a unit to be reaped after SIGKILL before giving up with a warning
/// (only a process stuck in the kernel takes longer).
const KILL_WAIT: Duration = Duration::from_secs(10);
const LOG_READ_CHUNK_BYTES: usize = 64 * 1024;

/// Runs units as child processes. See the module documentation for the policies.
///
/// Children are started (see [`super::spawn`]: `clone(CLONE_VM | CLONE_VFORK)`, not `fork`) by
/// one dedicated spawner thread that lives exactly as long as this runtime. `PR_SET_PDEATHSIG`
/// fires when the *thread* that started a child exits, not the process, so spawning from tokio's
/// blocking pool (whose threads exit when idle) would kill units at random; the dedicated thread only exits when the runtime is dropped, and then killing the
/// units is what we want. Dropping the runtime without [`Runtime::shutdown`] kills its units'
/// groups without grace (they are reported `Stopped`).
pub struct ProcessRuntime {
    inner: Arc<Inner>,
    /// The spawner thread's queue, or why the thread could not be created. Not in `Inner`, which
    /// unit monitors keep alive: the thread must end with the runtime.
    spawner: Result<std::sync::mpsc::Sender<SpawnJob>, String>,
}

/// What the runtime shares with the monitor task of each unit.
struct Inner {
    config: RuntimeConfig,
    events: mpsc::UnboundedSender<RuntimeEvent>,
    /// Units being started, and units started and not yet reported exited. Held only briefly:
    /// starts run side by side, each reserving its allocation id with a [`Slot::Starting`] first,
    /// so a unit is never started twice and `stop` waits for a start in progress.
    units: Mutex<BTreeMap<String, Slot>>,
    shutting_down: AtomicBool,
    /// Held for writing while a log rotates (rare: once per `log_bytes_max` of output), for
    /// reading while logs are read.
    log_rotation: Arc<RwLock<()>>,
}

type SpawnJob = Box<dyn FnOnce() + Send>;

enum Slot {
    /// Its start is in progress; the receiver learns when that start ends (the sender drops).
    Starting(watch::Receiver<()>),
    Running(UnitHandle),
}

impl Slot {
    fn running(&self) -> Option<&UnitHandle> {
        match self {
            Slot::Running(handle) => Some(handle),
            Slot::Starting(_) => None,
        }
    }
}

/// What `stop` needs of a running unit; its monitor task owns the rest.
#[derive(Clone)]
struct UnitHandle {
    control: mpsc::UnboundedSender<Control>,
    /// Becomes true once the unit's exit has been reported (or its monitor is gone).
    exited: watch::Receiver<bool>,
}

#[derive(Debug, Clone, Copy)]
enum Control {
    Terminate,
    Kill,
}

impl Control {
    fn signal(self) -> libc::c_int {
        match self {
            Control::Terminate => libc::SIGTERM,
            Control::Kill => libc::SIGKILL,
        }
    }
}

impl ProcessRuntime {
    /// Events go to `events`, which is unbounded: the runtime never waits on the agent.
    pub fn new(config: RuntimeConfig, events: mpsc::UnboundedSender<RuntimeEvent>) -> Self {
        let spawner = start_spawner_thread().map_err(|e| {
            tracing::error!("cannot create the process runtime's spawner thread: {e}");
            format!("the spawner thread could not be created: {e}")
        });
        Self {
            inner: Arc::new(Inner {
                config,
                events,
                units: Mutex::new(BTreeMap::new()),
                shutting_down: AtomicBool::new(false),
                log_rotation: Arc::new(RwLock::new(())),
            }),
            spawner,
        }
    }
}

impl Drop for ProcessRuntime {
    fn drop(&mut self) {
        // The lock is only ever held briefly (no start can run: it borrows the runtime). Should
        // it be held anyway, the spawner thread's end still SIGKILLs every unit's main process
        // and its monitor then kills the rest of its group.
        if let Ok(units) = self.inner.units.try_lock() {
            for handle in units.values().filter_map(Slot::running) {
                let _ = handle.control.send(Control::Kill);
            }
        }
    }
}

impl Runtime for ProcessRuntime {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Process
    }

    fn start(&self, unit: UnitSpec) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(start_unit(&self.inner, &self.spawner, unit))
    }

    fn stop(&self, allocation_id: &str, grace: Duration) -> BoxFuture<'_, ()> {
        let allocation_id = allocation_id.to_owned();
        Box::pin(async move {
            let handle = loop {
                let starting = match self.inner.units.lock().await.get(&allocation_id) {
                    None => break None,
                    Some(Slot::Running(handle)) => break Some(handle.clone()),
                    Some(Slot::Starting(started)) => started.clone(),
                };
                // Wait for the start to end (its sender drops), then look again.
                let mut started = starting;
                if started.changed().await.is_err() {
                    // The start has ended; its slot may take a moment more to go.
                    tokio::task::yield_now().await;
                }
            };
            if let Some(handle) = handle {
                stop_units(vec![(allocation_id, handle)], grace).await;
            }
        })
    }

    /// Sorted. A unit is listed until its `Exited` event is sent.
    fn running(&self) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async move {
            let units = self.inner.units.lock().await;
            units
                .iter()
                .filter(|(_, slot)| slot.running().is_some())
                .map(|(id, _)| id.clone())
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
            read_logs(&self.inner.config.work_root, &allocation_id, stderr, bytes).await
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
                &self.inner.config.work_root,
                &allocation_id,
                stderr,
                offset,
                max_bytes,
            )
            .await
        })
    }

    fn shutdown(&self, grace: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let handles: Vec<_> = {
                let units = self.inner.units.lock().await;
                // Under the lock: no start can slip in between the flag and the snapshot.
                // A start still in progress sees the flag when it finishes and kills its unit.
                self.inner.shutting_down.store(true, Ordering::SeqCst);
                units
                    .iter()
                    .filter_map(|(id, slot)| Some((id.clone(), slot.running()?.clone())))
                    .collect()
            };
            if !handles.is_empty() {
                tracing::info!(
                    n_units = handles.len(),
                    "stopping every unit of the process runtime"
                );
            }
            stop_units(handles, grace).await;
        })
    }
}

/// Allocation directories under `work_root` left by an earlier run of the agent, sorted. The
/// process runtime keeps nothing across restarts (those units died with the agent), so the agent
/// reports each as `Exit::Lost(RESTART_LOST_REASON)`; their logs stay on disk. Call it before
/// starting any unit. Directories of units that had already ended before the restart are listed
/// too: the runtime cannot tell them apart, and a report about a finished allocation is moot.
pub fn previous_allocations(work_root: &Path) -> Vec<String> {
    let entries = match std::fs::read_dir(work_root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(work_root = %work_root.display(), "cannot list allocation directories: {e}");
            return Vec::new();
        }
    };
    let mut allocation_ids: Vec<String> = entries
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| is_safe_allocation_id(name))
        .collect();
    allocation_ids.sort();
    allocation_ids
}

fn start_error(allocation_id: &str, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Start {
        allocation_id: allocation_id.to_owned(),
        reason: reason.into(),
    }
}

/// Refusals that depend on the spec alone.
fn check_unit(unit: &UnitSpec) -> Result<(), RuntimeError> {
    if let Some(image) = &unit.image {
        return Err(RuntimeError::Unsupported {
            runtime: "process",
            reason: format!("it runs commands on the host and cannot run the image {image:?}"),
        });
    }
    if unit.command.is_empty() {
        return Err(RuntimeError::Unsupported {
            runtime: "process",
            reason: "the unit has no command (the process runtime has no image to take one from)"
                .into(),
        });
    }
    if !is_safe_allocation_id(&unit.allocation_id) {
        return Err(start_error(
            &unit.allocation_id,
            format!(
                "the allocation id must be 1 to {ALLOCATION_ID_BYTES_MAX} characters of [A-Za-z0-9._-], not . or .. (it names the working directory)"
            ),
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
    Ok(())
}

/// The unit's environment, from the agent's (`agent_env`) and the unit's. See the module
/// documentation for the policy.
fn unit_env(
    unit: &UnitSpec,
    work_dir: &Path,
    agent_env: impl IntoIterator<Item = (OsString, OsString)>,
) -> BTreeMap<OsString, OsString> {
    debug_assert!(INHERITED_ENV
        .iter()
        .all(|name| !name.starts_with("GANTRY_")));
    let mut env: BTreeMap<OsString, OsString> = agent_env
        .into_iter()
        .filter(|(name, _)| INHERITED_ENV.iter().any(|kept| OsStr::new(kept) == name))
        .collect();
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    env.extend(
        unit.env
            .iter()
            .map(|(name, value)| (name.into(), value.into())),
    );
    let visible_devices = visible_devices(&unit.gpus);
    env.insert(
        "CUDA_VISIBLE_DEVICES".into(),
        visible_devices.clone().into(),
    );
    env.insert("NVIDIA_VISIBLE_DEVICES".into(), visible_devices.into());
    env.extend(
        gantry_env(unit, work_dir)
            .into_iter()
            .map(|(name, value)| (name.into(), value.into())),
    );
    env
}

fn start_spawner_thread() -> io::Result<std::sync::mpsc::Sender<SpawnJob>> {
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<SpawnJob>();
    std::thread::Builder::new()
        .name("gantry-spawner".into())
        .spawn(move || {
            // Ends when the runtime is dropped (the queue closes); the kernel then SIGKILLs the
            // main process of every unit this thread forked.
            while let Ok(job) = jobs_rx.recv() {
                // This thread must not die while it has children: a panic fails one start only.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                    tracing::error!("spawning a unit panicked");
                }
            }
        })?;
    Ok(jobs_tx)
}

/// Starts a unit's process on the spawner thread (see [`spawn`] for how).
async fn spawn_on_spawner_thread(
    spawner: &Result<std::sync::mpsc::Sender<SpawnJob>, String>,
    unit: &UnitSpec,
    work_dir: &Path,
) -> io::Result<Spawned> {
    let spawner = spawner
        .as_ref()
        .map_err(|reason| io::Error::other(reason.clone()))?;
    let command = unit.command.clone();
    let env: Vec<(OsString, OsString)> = unit_env(unit, work_dir, std::env::vars_os())
        .into_iter()
        .collect();
    let work_dir = work_dir.to_path_buf();
    let (reply_tx, reply_rx) = oneshot::channel();
    spawner
        .send(Box::new(move || {
            let spawned = spawn::spawn(SpawnRequest {
                command: &command,
                env,
                cwd: &work_dir,
                agent_pid: std::process::id() as libc::pid_t,
            });
            if let Err(Ok(spawned)) = reply_tx.send(spawned) {
                // The start was cancelled while the child was starting: nobody would watch it.
                ProcessGroup {
                    pgid: spawned.pid,
                    armed: true,
                }
                .signal(libc::SIGKILL);
                spawn::reap_blocking(spawned.pid);
            }
        }))
        .map_err(|_| io::Error::other("the spawner thread has exited"))?;
    reply_rx
        .await
        .map_err(|_| io::Error::other("the spawner thread dropped the request"))?
}

async fn start_unit(
    inner: &Arc<Inner>,
    spawner: &Result<std::sync::mpsc::Sender<SpawnJob>, String>,
    unit: UnitSpec,
) -> Result<(), RuntimeError> {
    check_unit(&unit)?;
    let allocation_id = unit.allocation_id.clone();
    let _starting = {
        let mut units = inner.units.lock().await;
        if inner.shutting_down.load(Ordering::SeqCst) {
            return Err(start_error(
                &allocation_id,
                "the process runtime is shutting down",
            ));
        }
        if units.contains_key(&allocation_id) {
            tracing::debug!(allocation = %allocation_id, "already started; start ignored");
            return Ok(());
        }
        let (starting, started) = watch::channel(());
        units.insert(allocation_id.clone(), Slot::Starting(started));
        // Dropped when this start ends, however it ends: that wakes a `stop` waiting on it, and
        // a failed start frees the id.
        StartingGuard {
            inner: Arc::clone(inner),
            allocation_id: allocation_id.clone(),
            _starting: starting,
        }
    };

    let work_dir = inner.config.work_root.join(&allocation_id);
    let (stdout_log, stderr_log) = {
        let (dir, log_bytes_max) = (work_dir.clone(), inner.config.log_bytes_max);
        let rotation = Arc::clone(&inner.log_rotation);
        // One blocking-pool trip for the directory and both logs.
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("create the working directory {}: {e}", dir.display()))?;
            let open = |name: &str| {
                BoundedLog::open_blocking(&dir, name, log_bytes_max, &rotation)
                    .map_err(|e| format!("open {name}: {e}"))
            };
            Ok::<_, String>((open(STDOUT_LOG)?, open(STDERR_LOG)?))
        })
        .await
        .map_err(|e| start_error(&allocation_id, e.to_string()))?
        .map_err(|reason| start_error(&allocation_id, reason))?
    };

    let spawned = spawn_on_spawner_thread(spawner, &unit, &work_dir)
        .await
        .map_err(|e| start_error(&allocation_id, format!("run {:?}: {e}", unit.command[0])))?;
    let pid = spawned.pid;
    let group = ProcessGroup {
        pgid: pid,
        armed: true,
    };
    let watched = UnitProcess::new(pid, spawned.pidfd).and_then(|child| {
        let stdout = pipe::Receiver::from_owned_fd(spawned.stdout)?;
        let stderr = pipe::Receiver::from_owned_fd(spawned.stderr)?;
        Ok((child, stdout, stderr))
    });
    let (child, stdout, stderr) = watched
        .map_err(|e| start_error(&allocation_id, format!("watch the started process: {e}")))?;
    tracing::info!(allocation = %allocation_id, job = %unit.job_id, pid, "unit started");

    let log_copiers = [
        tokio::spawn(copy_output(stdout, stdout_log, allocation_id.clone())),
        tokio::spawn(copy_output(stderr, stderr_log, allocation_id.clone())),
    ];
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (exited_tx, exited_rx) = watch::channel(false);
    let mut units = inner.units.lock().await;
    if inner.shutting_down.load(Ordering::SeqCst) {
        // `shutdown` took its list while this unit was starting: it is not on it.
        drop(group);
        for copier in log_copiers {
            copier.abort();
        }
        return Err(start_error(
            &allocation_id,
            "the process runtime is shutting down",
        ));
    }
    units.insert(
        allocation_id.clone(),
        Slot::Running(UnitHandle {
            control: control_tx,
            exited: exited_rx,
        }),
    );
    // Before the monitor exists, so `Started` always precedes `Exited`.
    let _ = inner.events.send(RuntimeEvent::Started {
        allocation_id: allocation_id.clone(),
        image: None,
    });
    drop(units);
    tokio::spawn(monitor(
        Arc::clone(inner),
        allocation_id,
        child,
        group,
        control_rx,
        exited_tx,
        log_copiers,
    ));
    Ok(())
}

/// A start in progress. When it ends without the unit running (an error, or the start's future
/// dropped), the allocation's [`Slot::Starting`] is removed; dropping the watch sender wakes
/// whoever waits on it.
struct StartingGuard {
    inner: Arc<Inner>,
    allocation_id: String,
    _starting: watch::Sender<()>,
}

impl Drop for StartingGuard {
    fn drop(&mut self) {
        let inner = Arc::clone(&self.inner);
        let allocation_id = std::mem::take(&mut self.allocation_id);
        let remove = move |units: &mut BTreeMap<String, Slot>| {
            if matches!(units.get(&allocation_id), Some(Slot::Starting(_))) {
                units.remove(&allocation_id);
            }
        };
        if let Ok(mut units) = inner.units.try_lock() {
            remove(&mut units);
            return;
        }
        // Contended: finish in a task rather than block a drop.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { remove(&mut *inner.units.lock().await) });
        }
    }
}

/// A unit's process group (its id is the main process's pid). Killed with SIGKILL if dropped
/// while armed: a monitor dropped before the unit ended (the tokio runtime is shutting down)
/// leaves nothing behind.
struct ProcessGroup {
    pgid: libc::pid_t,
    armed: bool,
}

impl ProcessGroup {
    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill takes plain integers. A negative pid addresses the whole group.
        if unsafe { libc::kill(-self.pgid, signal) } != 0 {
            let error = io::Error::last_os_error();
            // ESRCH: the group is already empty.
            if error.raw_os_error() != Some(libc::ESRCH) {
                tracing::warn!(
                    pgid = self.pgid,
                    signal,
                    "cannot signal the unit's process group: {error}"
                );
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.armed {
            self.signal(libc::SIGKILL);
        }
    }
}

/// Owns a running unit: signals its group when asked, reaps it, kills what it left behind,
/// drains its output and reports its exit exactly once.
async fn monitor(
    inner: Arc<Inner>,
    allocation_id: String,
    mut child: UnitProcess,
    mut group: ProcessGroup,
    mut control: mpsc::UnboundedReceiver<Control>,
    exited: watch::Sender<bool>,
    log_copiers: [JoinHandle<()>; 2],
) {
    let mut stop_requested = false;
    let status = {
        let wait = child.wait();
        tokio::pin!(wait);
        loop {
            // Biased towards the exit: a signal is only sent while `wait` has just found the
            // main process unreaped, so its pid (the group id) cannot have been reused.
            tokio::select! {
                biased;
                status = &mut wait => break status,
                Some(request) = control.recv() => {
                    stop_requested = true;
                    group.signal(request.signal());
                }
            }
        }
    };
    // The main process is gone; kill whatever it left running in its group. (The group id stays
    // reserved while any member lives; if none does, this finds no one. Only a full wrap of the
    // pid space within these few instructions could make it reach another group.)
    group.signal(libc::SIGKILL);
    group.armed = false;

    let exit = match status {
        Ok(status) => classify_exit(status, stop_requested),
        Err(e) => {
            tracing::warn!(allocation = %allocation_id, "waiting for the unit failed: {e}");
            Exit::Lost(format!("waiting for the process failed: {e}"))
        }
    };
    for mut copier in log_copiers {
        if tokio::time::timeout(LOG_DRAIN_WAIT, &mut copier)
            .await
            .is_err()
        {
            tracing::warn!(allocation = %allocation_id, "a process outside the unit's group still holds its output; dropping the rest");
            copier.abort();
        }
    }
    tracing::info!(allocation = %allocation_id, ?exit, "unit ended");
    {
        let mut units = inner.units.lock().await;
        units.remove(&allocation_id);
        let _ = inner.events.send(RuntimeEvent::Exited {
            allocation_id,
            exit,
        });
    }
    let _ = exited.send(true);
}

/// `Stopped` whenever Gantry signalled the unit before it was reaped, whatever it then did.
fn classify_exit(status: ExitStatus, stop_requested: bool) -> Exit {
    if stop_requested {
        Exit::Stopped
    } else if let Some(code) = status.code() {
        Exit::Code(code)
    } else if let Some(signal) = status.signal() {
        Exit::Signal(signal)
    } else {
        Exit::Lost(format!("unrecognised wait status {status}"))
    }
}

/// SIGTERM to every group, SIGKILL to those still there after `grace`; returns when all are
/// reported exited (or, for a process stuck in the kernel, after [`KILL_WAIT`] more).
async fn stop_units(handles: Vec<(String, UnitHandle)>, grace: Duration) {
    for (_, handle) in &handles {
        let _ = handle.control.send(Control::Terminate);
    }
    let deadline = tokio::time::Instant::now() + grace;
    let mut lingering = Vec::new();
    for (allocation_id, handle) in handles {
        if tokio::time::timeout_at(deadline, wait_exited(&handle))
            .await
            .is_err()
        {
            tracing::info!(allocation = %allocation_id, ?grace, "unit still running after the grace; killing it");
            let _ = handle.control.send(Control::Kill);
            lingering.push((allocation_id, handle));
        }
    }
    for (allocation_id, handle) in lingering {
        if tokio::time::timeout(KILL_WAIT, wait_exited(&handle))
            .await
            .is_err()
        {
            tracing::warn!(allocation = %allocation_id, "unit not reaped {KILL_WAIT:?} after SIGKILL");
        }
    }
}

async fn wait_exited(handle: &UnitHandle) {
    let mut exited = handle.exited.clone();
    // An error means the monitor is gone, which also means the unit is.
    let _ = exited.wait_for(|exited| *exited).await;
}

/// Copies a unit's stream to its log until the stream closes. A failing disk never blocks the
/// unit: the output is then read and dropped.
async fn copy_output(mut pipe: impl AsyncRead + Unpin, mut log: BoundedLog, allocation_id: String) {
    let mut buffer = vec![0; LOG_READ_CHUNK_BYTES];
    let mut log_failed = false;
    loop {
        let n_bytes = match pipe.read(&mut buffer).await {
            Ok(0) => return,
            Ok(n_bytes) => n_bytes,
            Err(e) => {
                tracing::warn!(allocation = %allocation_id, "reading the unit's output failed: {e}");
                return;
            }
        };
        if log_failed {
            continue;
        }
        if let Err(e) = log.write(&buffer[..n_bytes]).await {
            tracing::warn!(allocation = %allocation_id, log = %log.path().display(), "writing the unit's output failed; dropping the rest: {e}");
            log_failed = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::logs::ROTATED_SUFFIX;
    use crate::runtime::GpuAssignment;
    use std::collections::BTreeSet;
    use std::path::PathBuf;
    use std::time::Instant;

    /// Every wait in these tests is bounded by this (or less).
    const EVENT_WAIT: Duration = Duration::from_secs(20);
    const LOG_BYTES_MAX: u64 = 64 * 1024;

    struct Harness {
        runtime: ProcessRuntime,
        events: mpsc::UnboundedReceiver<RuntimeEvent>,
        work_root: PathBuf,
        dir: tempfile::TempDir,
    }

    fn harness(log_bytes_max: u64) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let work_root = dir.path().join("work");
        let (events_tx, events) = mpsc::unbounded_channel();
        let runtime = ProcessRuntime::new(
            RuntimeConfig {
                work_root: work_root.clone(),
                log_bytes_max,
            },
            events_tx,
        );
        Harness {
            runtime,
            events,
            work_root,
            dir,
        }
    }

    fn unit(allocation_id: &str, command: &[&str]) -> UnitSpec {
        let job = gantry_protocol::jobspec::from_json_value(serde_json::json!({
            "name": "job", "kind": "batch", "command": ["true"],
            "resources": { "cpus": 1, "memory": "1GiB" },
        }))
        .expect("a valid spec");
        let mut unit = UnitSpec::new(
            allocation_id,
            "job-1",
            job,
            "node",
            &BTreeMap::new(),
            Vec::new(),
            false,
        );
        // Tests also give the runtime units no valid spec could describe.
        unit.command = command.iter().map(|arg| arg.to_string()).collect();
        unit
    }

    fn sh(allocation_id: &str, script: &str) -> UnitSpec {
        unit(allocation_id, &["/bin/sh", "-c", script])
    }

    impl Harness {
        async fn next_event(&mut self) -> RuntimeEvent {
            tokio::time::timeout(EVENT_WAIT, self.events.recv())
                .await
                .expect("an event within the wait")
                .expect("the runtime holds the sender")
        }

        async fn expect_started(&mut self, allocation_id: &str) {
            let event = self.next_event().await;
            assert_eq!(
                event,
                RuntimeEvent::Started {
                    allocation_id: allocation_id.into(),
                    image: None,
                }
            );
        }

        async fn expect_exited(&mut self, allocation_id: &str) -> Exit {
            match self.next_event().await {
                RuntimeEvent::Exited {
                    allocation_id: id,
                    exit,
                } if id == allocation_id => exit,
                other => panic!("expected {allocation_id} to exit, got {other:?}"),
            }
        }

        async fn run_to_exit(&mut self, unit: UnitSpec) -> Exit {
            let allocation_id = unit.allocation_id.clone();
            self.runtime.start(unit).await.unwrap();
            self.expect_started(&allocation_id).await;
            self.expect_exited(&allocation_id).await
        }

        /// Waits (bounded) until the unit's stdout holds `needle`; returns the stdout.
        async fn wait_for_stdout(&self, allocation_id: &str, needle: &str) -> String {
            let deadline = Instant::now() + EVENT_WAIT;
            loop {
                let stdout = self
                    .runtime
                    .logs(allocation_id, false, 1 << 20)
                    .await
                    .unwrap();
                let stdout = String::from_utf8(stdout).unwrap();
                if stdout.contains(needle) {
                    return stdout;
                }
                assert!(
                    Instant::now() < deadline,
                    "{needle:?} never appeared in {stdout:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        async fn assert_no_more_events(&mut self) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let extra = self.events.try_recv();
            assert!(extra.is_err(), "unexpected event {extra:?}");
        }
    }

    /// Alive and not a zombie (a zombie whose parent is gone may wait long for init to reap it).
    fn process_alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| stat_fields(&stat).map(|(state, _)| !matches!(state, 'Z' | 'X')))
            .unwrap_or(false)
    }

    /// Whether any live (non-zombie) process is in the group `pgid`.
    fn group_alive(pgid: i32) -> bool {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|entry| entry.ok())
            .any(|entry| {
                std::fs::read_to_string(entry.path().join("stat"))
                    .ok()
                    .and_then(|stat| stat_fields(&stat))
                    .is_some_and(|(state, group)| group == pgid && !matches!(state, 'Z' | 'X'))
            })
    }

    /// State and process group from `/proc/<pid>/stat`: `pid (comm) state ppid pgrp ...`.
    fn stat_fields(stat: &str) -> Option<(char, i32)> {
        let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
        let state = fields.next()?.chars().next()?;
        let _ppid = fields.next()?;
        Some((state, fields.next()?.parse().ok()?))
    }

    async fn wait_until(what: &str, condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `key=value` from a line `... key=value ...` of the output.
    fn field(output: &str, key: &str) -> i32 {
        output
            .split_whitespace()
            .find_map(|word| word.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= in {output:?}"))
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn reports_how_units_end() {
        let mut h = harness(LOG_BYTES_MAX);
        let cases = [
            (unit("true", &["true"]), Exit::Code(0)),
            (unit("false", &["false"]), Exit::Code(1)),
            (sh("exit-3", "exit 3"), Exit::Code(3)),
            (
                sh("self-killed", "kill -KILL $$"),
                Exit::Signal(libc::SIGKILL),
            ),
        ];
        for (unit, expected) in cases {
            let allocation_id = unit.allocation_id.clone();
            assert_eq!(h.run_to_exit(unit).await, expected, "{allocation_id}");
        }
        assert!(h.runtime.running().await.is_empty());
        h.assert_no_more_events().await;
    }

    #[test]
    fn unit_env_follows_the_policy() {
        let check = |agent_env: &[(&str, &str)], unit: &UnitSpec, expected: &[(&str, &str)]| {
            let agent_env = agent_env
                .iter()
                .map(|(name, value)| (name.into(), value.into()));
            let expected: BTreeMap<OsString, OsString> = expected
                .iter()
                .map(|(name, value)| (name.into(), value.into()))
                .collect();
            let work_dir = Path::new("/work").join(&unit.allocation_id);
            assert_eq!(unit_env(unit, &work_dir, agent_env), expected);
        };
        let mut with_gpus = unit("a-1", &["train"]);
        with_gpus.env = BTreeMap::from([
            ("RANK".to_string(), "0".to_string()),
            ("HOME".to_string(), "/home/job".to_string()),
            ("CUDA_VISIBLE_DEVICES".to_string(), "0,1,2,3".to_string()),
        ]);
        with_gpus.gpus = vec![
            GpuAssignment {
                index: 0,
                uuid: Some("GPU-uuid-a".into()),
                declared: false,
            },
            GpuAssignment {
                index: 1,
                uuid: None,
                declared: false,
            },
        ];
        check(
            &[
                ("PATH", "/opt/bin:/usr/bin"),
                ("HOME", "/home/agent"),
                ("LANG", "C.UTF-8"),
                ("GANTRY_JOIN_TOKEN", "secret"),
                ("AWS_SECRET_ACCESS_KEY", "secret"),
                ("LD_PRELOAD", "/tmp/evil.so"),
            ],
            &with_gpus,
            &[
                ("PATH", "/opt/bin:/usr/bin"),
                ("HOME", "/home/job"),
                ("LANG", "C.UTF-8"),
                ("RANK", "0"),
                ("CUDA_VISIBLE_DEVICES", "GPU-uuid-a,1"),
                ("NVIDIA_VISIBLE_DEVICES", "GPU-uuid-a,1"),
                ("GANTRY_ALLOCATION_ID", "a-1"),
                ("GANTRY_JOB_ID", "job-1"),
                ("GANTRY_ALLOC_DIR", "/work/a-1"),
                ("GANTRY_INPUT_DIR", "/work/a-1/in"),
                ("GANTRY_OUTPUT_DIR", "/work/a-1/out"),
            ],
        );
        check(
            &[("GANTRY_JOIN_TOKEN", "secret")],
            &unit("a-2", &["serve"]),
            &[
                ("PATH", DEFAULT_PATH),
                ("CUDA_VISIBLE_DEVICES", ""),
                ("NVIDIA_VISIBLE_DEVICES", ""),
                ("GANTRY_ALLOCATION_ID", "a-2"),
                ("GANTRY_JOB_ID", "job-1"),
                ("GANTRY_ALLOC_DIR", "/work/a-2"),
                ("GANTRY_INPUT_DIR", "/work/a-2/in"),
                ("GANTRY_OUTPUT_DIR", "/work/a-2/out"),
            ],
        );
    }

    #[tokio::test]
    async fn unit_sees_its_env_and_gpus_but_not_the_agents_secrets_and_runs_in_its_directory() {
        let mut h = harness(LOG_BYTES_MAX);
        // A unique name: tests run in parallel threads of one process.
        let secret_name = format!("GANTRY_TEST_SECRET_{:016x}", rand::random::<u64>());
        std::env::set_var(&secret_name, "hunter2");
        let mut unit = sh(
            "env-1",
            "env; echo \"cwd=$(pwd -P)\"; echo \"alloc=$(cd \"$GANTRY_ALLOC_DIR\" && pwd -P)\"; echo to-stderr >&2",
        );
        unit.env = BTreeMap::from([("MY_SETTING".to_string(), "hello world".to_string())]);
        unit.gpus = vec![
            GpuAssignment {
                index: 0,
                uuid: Some("GPU-uuid-a".into()),
                declared: false,
            },
            GpuAssignment {
                index: 1,
                uuid: None,
                declared: false,
            },
        ];
        let exit = h.run_to_exit(unit).await;
        std::env::remove_var(&secret_name);
        assert_eq!(exit, Exit::Code(0));

        let work_dir = h.work_root.join("env-1");
        let stdout = std::fs::read_to_string(work_dir.join(STDOUT_LOG)).unwrap();
        let lines: Vec<&str> = stdout.lines().collect();
        for expected in [
            "MY_SETTING=hello world",
            "CUDA_VISIBLE_DEVICES=GPU-uuid-a,1",
            "NVIDIA_VISIBLE_DEVICES=GPU-uuid-a,1",
            "GANTRY_ALLOCATION_ID=env-1",
            "GANTRY_JOB_ID=job-1",
            format!("GANTRY_ALLOC_DIR={}", work_dir.display()).as_str(),
            format!("GANTRY_INPUT_DIR={}", work_dir.join("in").display()).as_str(),
            format!("GANTRY_OUTPUT_DIR={}", work_dir.join("out").display()).as_str(),
        ] {
            assert!(
                lines.contains(&expected),
                "{expected:?} missing from {stdout}"
            );
        }
        assert!(
            !stdout.contains(&secret_name),
            "the agent's secret leaked: {stdout}"
        );
        let gantry_names: Vec<&str> = lines
            .iter()
            .filter(|line| line.starts_with("GANTRY_"))
            .map(|line| line.split('=').next().unwrap())
            .collect();
        assert_eq!(gantry_names.len(), 5, "{gantry_names:?}");
        for key in ["cwd=", "alloc="] {
            let dir = stdout
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .unwrap();
            assert_eq!(Path::new(dir), work_dir.canonicalize().unwrap(), "{key}");
        }
        assert_eq!(
            std::fs::read_to_string(work_dir.join(STDERR_LOG)).unwrap(),
            "to-stderr\n"
        );
        assert_eq!(
            h.runtime.logs("env-1", true, 1024).await.unwrap(),
            b"to-stderr\n"
        );
    }

    #[tokio::test]
    async fn logs_are_bounded_and_keep_the_newest_output() {
        let mut h = harness(LOG_BYTES_MAX);
        // About 1 MB, not a multiple of the bound, every 8-byte word distinct.
        let output: Vec<u8> = (0..125_000u64)
            .flat_map(|word| format!("{word:07}\n").into_bytes())
            .chain(*b"end")
            .collect();
        let source = h.dir.path().join("output.txt");
        std::fs::write(&source, &output).unwrap();
        let exit = h
            .run_to_exit(unit("chatty", &["cat", source.to_str().unwrap()]))
            .await;
        assert_eq!(exit, Exit::Code(0));

        let work_dir = h.work_root.join("chatty");
        let newest = std::fs::read(work_dir.join(STDOUT_LOG)).unwrap();
        let older = std::fs::read(work_dir.join(format!("{STDOUT_LOG}{ROTATED_SUFFIX}"))).unwrap();
        assert!(newest.len() as u64 <= LOG_BYTES_MAX && older.len() as u64 <= LOG_BYTES_MAX);
        assert!((newest.len() + older.len()) as u64 >= LOG_BYTES_MAX);
        let kept = [older, newest].concat();
        assert!(
            output.ends_with(&kept),
            "what is kept is not the newest output"
        );

        let max = LOG_BYTES_MAX as usize;
        let logs = |bytes| h.runtime.logs("chatty", false, bytes);
        assert_eq!(
            logs(LOG_BYTES_MAX).await.unwrap(),
            output[output.len() - max..]
        );
        assert_eq!(logs(10).await.unwrap(), b"124999\nend");
        assert_eq!(logs(10 * LOG_BYTES_MAX).await.unwrap(), kept);
        assert_eq!(h.runtime.logs("chatty", true, 100).await.unwrap(), b"");
        assert!(h.runtime.logs("unknown", false, 100).await.is_err());
        assert!(h.runtime.logs("../chatty", false, 100).await.is_err());
    }

    #[tokio::test]
    async fn offsets_stay_stable_across_rotations() {
        let mut h = harness(LOG_BYTES_MAX);
        let output: Vec<u8> = (0..125_000u64)
            .flat_map(|word| format!("{word:07}\n").into_bytes())
            .chain(*b"end")
            .collect();
        let source = h.dir.path().join("output.txt");
        std::fs::write(&source, &output).unwrap();
        let exit = h
            .run_to_exit(unit("chatty", &["cat", source.to_str().unwrap()]))
            .await;
        assert_eq!(exit, Exit::Code(0));
        let work_dir = h.work_root.join("chatty");
        let newest_len = std::fs::metadata(work_dir.join(STDOUT_LOG)).unwrap().len();
        let older_len = std::fs::metadata(work_dir.join(format!("{STDOUT_LOG}{ROTATED_SUFFIX}")))
            .unwrap()
            .len();
        let end = output.len() as u64;
        let base = end - newest_len;
        let kept_from = base - older_len;

        // (asked offset, max bytes) -> (offset read from, bytes read)
        for (asked, max_bytes, from, n_bytes) in [
            (0, 100, kept_from, 100),
            (kept_from + 5, 100, kept_from + 5, 100),
            (base - 10, 20, base - 10, 20),
            (end - 3, 100, end - 3, 3),
            (end, 100, end, 0),
            (end + 50, 100, end, 0),
        ] {
            let read = h
                .runtime
                .logs_from("chatty", false, asked, max_bytes)
                .await
                .unwrap();
            assert_eq!((read.offset, read.end_offset), (from, end), "asked {asked}");
            assert_eq!(
                read.data,
                &output[from as usize..(from + n_bytes) as usize],
                "asked {asked}"
            );
        }
        let stderr = h.runtime.logs_from("chatty", true, 0, 100).await.unwrap();
        assert_eq!(
            (stderr.offset, stderr.end_offset, stderr.data.len()),
            (0, 0, 0)
        );
        assert!(h.runtime.logs_from("unknown", false, 0, 100).await.is_err());
        assert!(h
            .runtime
            .logs_from("../chatty", false, 0, 100)
            .await
            .is_err());

        // Read while the unit writes and rotates: every byte read is the byte at its offset.
        h.runtime
            .start(unit("racer", &["cat", source.to_str().unwrap()]))
            .await
            .unwrap();
        h.expect_started("racer").await;
        let deadline = Instant::now() + EVENT_WAIT;
        let mut offset = 0;
        let mut n_reads = 0;
        while offset < end {
            assert!(Instant::now() < deadline, "reading stopped at {offset}");
            let read = h
                .runtime
                .logs_from("racer", false, offset, 4096)
                .await
                .unwrap();
            let at = read.offset as usize;
            assert_eq!(read.data, &output[at..at + read.data.len()], "at {at}");
            offset = read.offset + read.data.len() as u64;
            n_reads += 1;
        }
        assert!(n_reads > 1);
        h.expect_exited("racer").await;
    }

    #[tokio::test]
    async fn stop_reports_stopped_for_a_unit_that_exits_on_sigterm() {
        let mut h = harness(LOG_BYTES_MAX);
        h.runtime
            .start(sh(
                "polite",
                "trap 'exit 0' TERM; echo ready; sleep 30 & wait",
            ))
            .await
            .unwrap();
        h.expect_started("polite").await;
        h.wait_for_stdout("polite", "ready").await;

        let started = Instant::now();
        h.runtime.stop("polite", Duration::from_secs(10)).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(h.expect_exited("polite").await, Exit::Stopped);
        assert!(h.runtime.running().await.is_empty());
        // Stopping again, or stopping what never ran, is a no-op.
        h.runtime.stop("polite", Duration::from_secs(10)).await;
        h.runtime.stop("never-ran", Duration::from_secs(10)).await;
        h.assert_no_more_events().await;
    }

    #[tokio::test]
    async fn stop_kills_a_unit_that_ignores_sigterm_after_the_grace() {
        let mut h = harness(LOG_BYTES_MAX);
        h.runtime
            .start(sh("stubborn", "trap '' TERM; echo ready; sleep 30"))
            .await
            .unwrap();
        h.expect_started("stubborn").await;
        h.wait_for_stdout("stubborn", "ready").await;

        let grace = Duration::from_secs(1);
        let started = Instant::now();
        h.runtime.stop("stubborn", grace).await;
        let elapsed = started.elapsed();
        assert!(
            elapsed >= grace && elapsed < Duration::from_secs(10),
            "took {elapsed:?}"
        );
        assert_eq!(h.expect_exited("stubborn").await, Exit::Stopped);
    }

    #[tokio::test]
    async fn stop_kills_the_whole_process_group() {
        let mut h = harness(LOG_BYTES_MAX);
        h.runtime
            .start(sh("family", "sleep 300 & echo \"group=$$ child=$!\"; wait"))
            .await
            .unwrap();
        h.expect_started("family").await;
        let stdout = h.wait_for_stdout("family", "child=").await;
        let (pgid, child_pid) = (field(&stdout, "group"), field(&stdout, "child"));
        assert!(group_alive(pgid) && process_alive(child_pid));

        h.runtime.stop("family", Duration::from_secs(5)).await;
        assert_eq!(h.expect_exited("family").await, Exit::Stopped);
        wait_until("the unit's group is gone", || !group_alive(pgid)).await;
        assert!(!process_alive(child_pid));
    }

    #[tokio::test]
    async fn a_unit_that_exits_takes_what_it_left_in_its_group_along() {
        let mut h = harness(LOG_BYTES_MAX);
        let exit = h
            .run_to_exit(sh("leaver", "sleep 300 & echo \"group=$$ child=$!\""))
            .await;
        assert_eq!(exit, Exit::Code(0));
        let stdout =
            String::from_utf8(h.runtime.logs("leaver", false, 1024).await.unwrap()).unwrap();
        let pgid = field(&stdout, "group");
        wait_until("the unit's group is gone", || !group_alive(pgid)).await;
    }

    #[tokio::test]
    async fn starting_a_running_allocation_again_is_a_noop() {
        let mut h = harness(LOG_BYTES_MAX);
        h.runtime
            .start(unit("twice", &["sleep", "30"]))
            .await
            .unwrap();
        h.runtime
            .start(unit("twice", &["sleep", "30"]))
            .await
            .unwrap();
        h.expect_started("twice").await;
        h.assert_no_more_events().await;
        assert_eq!(h.runtime.running().await, ["twice"]);

        h.runtime.stop("twice", Duration::from_secs(5)).await;
        assert_eq!(h.expect_exited("twice").await, Exit::Stopped);
        h.assert_no_more_events().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn starts_run_side_by_side_and_a_stop_waits_for_a_start_in_progress() {
        let mut h = harness(LOG_BYTES_MAX);
        let runtime = Arc::new(h.runtime);
        let ids: Vec<String> = (0..24).map(|i| format!("side-{i}")).collect();
        let starts: Vec<_> = ids
            .iter()
            .map(|id| {
                let (runtime, unit) = (Arc::clone(&runtime), unit(id, &["sleep", "30"]));
                tokio::spawn(async move { runtime.start(unit).await })
            })
            .collect();
        // Once every start has reserved its id, and while most are still in flight: a stop that
        // finds its unit starting waits for the start, then stops the unit.
        let deadline = Instant::now() + EVENT_WAIT;
        while runtime.inner.units.lock().await.len() < ids.len() {
            assert!(
                Instant::now() < deadline,
                "the starts never reserved their ids"
            );
            tokio::task::yield_now().await;
        }
        let stops: Vec<_> = ids
            .iter()
            .step_by(2)
            .map(|id| {
                let (runtime, id) = (Arc::clone(&runtime), id.clone());
                tokio::spawn(async move { runtime.stop(&id, Duration::from_secs(5)).await })
            })
            .collect();
        for start in starts {
            start.await.unwrap().unwrap();
        }
        for stop in stops {
            stop.await.unwrap();
        }
        let mut started = BTreeSet::new();
        let mut exited = BTreeMap::new();
        let deadline = Instant::now() + EVENT_WAIT;
        while started.len() < ids.len() || exited.len() < ids.len() / 2 {
            assert!(
                Instant::now() < deadline,
                "started {started:?}, exited {exited:?}"
            );
            match tokio::time::timeout(EVENT_WAIT, h.events.recv()).await {
                Ok(Some(RuntimeEvent::Started { allocation_id, .. })) => {
                    assert!(started.insert(allocation_id), "a unit started twice");
                }
                Ok(Some(RuntimeEvent::Exited {
                    allocation_id,
                    exit,
                })) => {
                    assert!(started.contains(&allocation_id), "exit before start");
                    exited.insert(allocation_id, exit);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // A stop that found its unit starting never returned before the unit was there to stop:
        // exactly the stopped half exited, as `Stopped`; the other half still runs.
        let stopped: BTreeMap<String, Exit> = ids
            .iter()
            .step_by(2)
            .map(|id| (id.clone(), Exit::Stopped))
            .collect();
        assert_eq!(exited, stopped);
        let running: Vec<String> = ids.iter().skip(1).step_by(2).cloned().collect();
        let mut listed = runtime.running().await;
        listed.sort();
        let mut expected = running.clone();
        expected.sort();
        assert_eq!(listed, expected);
        runtime.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn a_unit_starts_with_default_signal_handling_and_a_path_search() {
        let mut h = harness(LOG_BYTES_MAX);
        // `grep` found through the unit's PATH; nothing blocked, SIGPIPE not ignored (Rust
        // ignores it in the agent), so a unit writing to a closed pipe ends as a shell expects.
        let exit = h
            .run_to_exit(unit(
                "signals",
                &["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"],
            ))
            .await;
        assert_eq!(exit, Exit::Code(0));
        let stdout = h.wait_for_stdout("signals", "SigIgn").await;
        let mask = |name: &str| {
            let line = stdout.lines().find(|l| l.starts_with(name)).unwrap();
            u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
        };
        assert_eq!(mask("SigBlk:"), 0, "{stdout}");
        assert_eq!(mask("SigIgn:") & (1 << (libc::SIGPIPE - 1)), 0, "{stdout}");

        let missing = h
            .runtime
            .start(unit("missing", &["no-such-program-here"]))
            .await;
        let Err(RuntimeError::Start { reason, .. }) = missing else {
            panic!("{missing:?}")
        };
        assert!(reason.contains("No such file or directory"), "{reason}");
        // The failed start left nothing behind: the id can be started again.
        assert_eq!(h.runtime.running().await, Vec::<String>::new());
        h.assert_no_more_events().await;
    }

    #[tokio::test]
    async fn refuses_units_it_cannot_run() {
        let mut h = harness(LOG_BYTES_MAX);
        let mut with_image = unit("image", &["serve"]);
        with_image.image = Some("nvcr.io/nvidia/pytorch:24.05".into());
        assert!(matches!(
            h.runtime.start(with_image).await,
            Err(RuntimeError::Unsupported {
                runtime: "process",
                ..
            })
        ));
        assert!(matches!(
            h.runtime.start(unit("no-command", &[])).await,
            Err(RuntimeError::Unsupported { .. })
        ));
        for bad_id in [
            "",
            ".",
            "..",
            "a/b",
            "../escape",
            "with space",
            "ünï",
            &"a".repeat(256),
        ] {
            let refused = h.runtime.start(unit(bad_id, &["true"])).await;
            assert!(
                matches!(refused, Err(RuntimeError::Start { .. })),
                "{bad_id:?}: {refused:?}"
            );
        }
        let mut bad_env = unit("bad-env", &["true"]);
        bad_env.env.insert("A=B".into(), "c".into());
        assert!(matches!(
            h.runtime.start(bad_env).await,
            Err(RuntimeError::Start { .. })
        ));
        let missing_program = h
            .runtime
            .start(unit("missing", &["/nonexistent/program"]))
            .await;
        assert!(
            matches!(missing_program, Err(RuntimeError::Start { .. })),
            "{missing_program:?}"
        );

        assert!(h.runtime.running().await.is_empty());
        h.assert_no_more_events().await;
        assert_eq!(
            previous_allocations(&h.work_root),
            ["missing"],
            "only a valid id made a directory"
        );
    }

    #[tokio::test]
    async fn shutdown_stops_every_unit_and_refuses_new_ones() {
        let mut h = harness(LOG_BYTES_MAX);
        h.runtime.start(unit("b", &["sleep", "30"])).await.unwrap();
        h.runtime
            .start(sh("a", "trap '' TERM; echo ready; sleep 30"))
            .await
            .unwrap();
        h.expect_started("b").await;
        h.expect_started("a").await;
        h.wait_for_stdout("a", "ready").await;
        assert_eq!(h.runtime.running().await, ["a", "b"]);

        let started = Instant::now();
        h.runtime.shutdown(Duration::from_secs(1)).await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        let mut exits = BTreeMap::new();
        for _ in 0..2 {
            match h.next_event().await {
                RuntimeEvent::Exited {
                    allocation_id,
                    exit,
                } => exits.insert(allocation_id, exit),
                other => panic!("expected an exit, got {other:?}"),
            };
        }
        assert_eq!(
            exits,
            BTreeMap::from([("a".into(), Exit::Stopped), ("b".into(), Exit::Stopped)])
        );
        assert!(h.runtime.running().await.is_empty());
        assert!(matches!(
            h.runtime.start(unit("late", &["true"])).await,
            Err(RuntimeError::Start { .. })
        ));
        h.assert_no_more_events().await;
    }

    #[tokio::test]
    async fn dropping_the_runtime_kills_its_units() {
        let Harness {
            runtime,
            mut events,
            dir: _dir,
            ..
        } = harness(LOG_BYTES_MAX);
        runtime
            .start(sh("dropped", "sleep 300 & wait"))
            .await
            .unwrap();
        drop(runtime);
        let mut seen = Vec::new();
        while let Ok(Some(event)) = tokio::time::timeout(EVENT_WAIT, events.recv()).await {
            seen.push(event);
        }
        let dropped = || "dropped".to_string();
        assert_eq!(
            seen,
            [
                RuntimeEvent::Started {
                    allocation_id: dropped(),
                    image: None,
                },
                RuntimeEvent::Exited {
                    allocation_id: dropped(),
                    exit: Exit::Stopped
                },
            ]
        );
    }

    #[test]
    fn previous_allocations_lists_the_directories_left_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        assert!(previous_allocations(&dir.path().join("missing")).is_empty());
        for name in ["b.2", "a-1", "not an id"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        std::fs::write(dir.path().join("a-file"), b"").unwrap();
        assert_eq!(previous_allocations(dir.path()), ["a-1", "b.2"]);
    }

    /// The environment variable that turns [`agent_helper`] into a stand-in agent.
    const AGENT_HELPER_DIR: &str = "GANTRY_TEST_AGENT_HELPER_DIR";

    /// Does nothing unless run by [`units_die_when_the_agent_is_killed`], which re-executes this
    /// test binary as an agent that starts a unit and waits to be SIGKILLed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn agent_helper() {
        let Some(work_root) = std::env::var_os(AGENT_HELPER_DIR) else {
            return;
        };
        let (events_tx, _events) = mpsc::unbounded_channel();
        let runtime = ProcessRuntime::new(
            RuntimeConfig {
                work_root: work_root.into(),
                log_bytes_max: LOG_BYTES_MAX,
            },
            events_tx,
        );
        let script = "echo $$ > leader.tmp && mv leader.tmp leader.pid && exec sleep 300";
        runtime.start(sh("orphan-to-be", script)).await.unwrap();
        // Outlive the parent test's patience; it kills this process long before.
        tokio::time::sleep(Duration::from_secs(60)).await;
    }

    struct KillOnDrop(i32);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            if process_alive(self.0) {
                // SAFETY: kill takes plain integers.
                unsafe { libc::kill(self.0, libc::SIGKILL) };
            }
        }
    }

    #[tokio::test]
    async fn units_die_when_the_agent_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let mut agent = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "runtime::process::tests::agent_helper",
                "--test-threads=1",
            ])
            .env(AGENT_HELPER_DIR, dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid_file = dir.path().join("orphan-to-be").join("leader.pid");
        let deadline = Instant::now() + EVENT_WAIT;
        let leader_pid: i32 = loop {
            if let Ok(pid) = std::fs::read_to_string(&pid_file) {
                break pid.trim().parse().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "the helper agent never started its unit"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(process_alive(leader_pid));
        // Should this test fail, the unit must not outlive it either.
        let _cleanup = KillOnDrop(leader_pid);

        agent.kill().unwrap();
        agent.wait().unwrap();
        wait_until("the unit dies with its agent", || {
            !process_alive(leader_pid)
        })
        .await;
    }
}
