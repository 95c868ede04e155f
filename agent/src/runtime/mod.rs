//! Runtimes run allocations: one module per runtime behind one trait. Today: `process`; Docker and
//! Kubernetes follow with their issue.
//!
//! Architecture invariant: a runtime decides nothing; it starts, stops and reports what it was
//! told to, and it can list what it is running so a restarted agent can reconcile.

pub mod process;

use gantry_protocol::RuntimeKind;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A GPU given to a unit: its index on the node and, where NVML knows it, its UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuAssignment {
    pub index: u32,
    pub uuid: Option<String>,
}

/// Everything a runtime needs to start one unit (a worker, a shard or a replica).
#[derive(Debug, Clone, PartialEq)]
pub struct UnitSpec {
    pub allocation_id: String,
    pub job_id: String,
    /// Container image, for the container runtimes; the process runtime refuses a unit with one.
    pub image: Option<String>,
    /// argv; the first element is the program.
    pub command: Vec<String>,
    /// The job's env plus what Gantry adds (RANK, WORLD_SIZE, SHARD_INDEX, PORT, ...). The
    /// runtime adds CUDA_VISIBLE_DEVICES and NVIDIA_VISIBLE_DEVICES from `gpus`.
    pub env: BTreeMap<String, String>,
    pub gpus: Vec<GpuAssignment>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// How a unit ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Exited by itself with this code (0 is success).
    Code(i32),
    /// Killed by this signal (not by a stop Gantry asked for).
    Signal(i32),
    /// Stopped because Gantry asked (cancel, preemption).
    Stopped,
    /// The runtime lost track of it (the agent restarted and the process runtime keeps nothing
    /// across restarts; the work was stopped with the agent).
    Lost(String),
}

/// What a runtime tells the agent, on the channel given at construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEvent {
    Started { allocation_id: String },
    Exited { allocation_id: String, exit: Exit },
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the {runtime} runtime cannot run this unit: {reason}")]
    Unsupported {
        runtime: &'static str,
        reason: String,
    },
    #[error("could not start {allocation_id}: {reason}")]
    Start {
        allocation_id: String,
        reason: String,
    },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Where a runtime keeps per-allocation files, and how much output it keeps.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Each allocation gets `work_root/<allocation_id>/` as its working directory.
    pub work_root: PathBuf,
    /// Bytes of stdout and of stderr kept per allocation: each stream keeps at least its newest
    /// `log_bytes_max` bytes and holds at most twice that on disk; older output is dropped (the
    /// process runtime rotates each log to one `.1` file).
    pub log_bytes_max: u64,
}

pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;

    /// Starts the unit. Returns once it is running (or failed to start); its end is reported
    /// later as a [`RuntimeEvent::Exited`]. Starting an allocation id that already runs is a
    /// no-op (assignments can be delivered twice).
    fn start(&self, unit: UnitSpec) -> BoxFuture<'_, Result<(), RuntimeError>>;

    /// Stops the unit: a polite signal, then after `grace` a kill. Returns when it is gone.
    /// Stopping an unknown or finished allocation is a no-op.
    fn stop(&self, allocation_id: &str, grace: Duration) -> BoxFuture<'_, ()>;

    /// Allocation ids this runtime is running now.
    fn running(&self) -> BoxFuture<'_, Vec<String>>;

    /// The last `bytes` of a unit's stdout or stderr.
    fn logs(
        &self,
        allocation_id: &str,
        stderr: bool,
        bytes: u64,
    ) -> BoxFuture<'_, Result<Vec<u8>, RuntimeError>>;

    /// Stops everything (the agent is exiting): nothing may outlive the agent.
    fn shutdown(&self, grace: Duration) -> BoxFuture<'_, ()>;
}
