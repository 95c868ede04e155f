//! Runtimes run allocations: one module per runtime behind one trait (`process`, `docker`,
//! `kubernetes`).
//!
//! Architecture invariant: a runtime decides nothing; it starts, stops and reports what it was
//! told to, and it can list what it is running so a restarted agent can reconcile.

pub mod docker;
pub mod kubernetes;
pub(crate) mod logs;
pub mod process;
mod spawn;

use gantry_protocol::jobspec::JobSpec;
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
    /// Declared in the agent config (`[[gpus]]`) rather than found through NVML. A container
    /// runtime has no device to hand over for it: NVIDIA's container toolkit finds devices
    /// through the same NVML that found none.
    pub declared: bool,
}

/// Everything a runtime needs to start one unit (a worker, a shard or a replica).
#[derive(Debug, Clone, PartialEq)]
pub struct UnitSpec {
    pub allocation_id: String,
    pub job_id: String,
    /// The job's spec as submitted (validated and canonical): the kind, its section, placement.
    /// The fields below are what a runtime needs most, already derived from it.
    pub job: JobSpec,
    /// The node the scheduler chose, as the agent reported it (a Kubernetes node name for the
    /// Kubernetes runtime; the host for the others).
    pub node: String,
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
    /// Serving replicas: the port the replica listens on (also `PORT` in `env`); a container
    /// runtime publishes it on the node.
    pub port: Option<u16>,
    /// The image may be pulled when it is not present (the job's `pull` or the agent's
    /// `allow_pull`); otherwise a missing image fails the start with a clear reason.
    pub pull: bool,
}

impl UnitSpec {
    /// The unit for one assignment: the job's env with what Gantry adds for this unit on top,
    /// the job's per-unit resources, the serving port from `PORT`.
    pub fn new(
        allocation_id: impl Into<String>,
        job_id: impl Into<String>,
        job: JobSpec,
        node: impl Into<String>,
        added_env: &BTreeMap<String, String>,
        gpus: Vec<GpuAssignment>,
        allow_pull: bool,
    ) -> Self {
        let mut env = job.env.clone();
        env.extend(added_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let port = if job.serving.is_some() {
            added_env.get("PORT").and_then(|p| p.parse().ok())
        } else {
            None
        };
        Self {
            allocation_id: allocation_id.into(),
            job_id: job_id.into(),
            node: node.into(),
            image: job.image.clone(),
            command: job.command.clone(),
            env,
            gpus,
            cpu_millis: u64::from(job.resources.cpu_millis),
            memory_bytes: job.resources.memory_bytes,
            port,
            pull: allow_pull || job.pull,
            job,
        }
    }
}

/// Inside an allocation's directory: where the supervisor puts the job's inputs before the unit
/// starts, and where the unit leaves its outputs.
pub const INPUT_DIR: &str = "in";
pub const OUTPUT_DIR: &str = "out";

/// The variable naming the allocation's directory: the working directory of a process unit,
/// bind-mounted at [`docker::ALLOC_DIR_IN_CONTAINER`] in a container.
pub const ALLOC_DIR_ENV: &str = "GANTRY_ALLOC_DIR";

/// What every runtime adds to a unit's environment, overriding the unit's own variables: its
/// allocation and job ids, and where its allocation directory and the input and output
/// directories in it are, as the unit sees them (`alloc_dir`: the host path for a process, the
/// mount point in a container).
pub(crate) fn gantry_env(
    unit: &UnitSpec,
    alloc_dir: &std::path::Path,
) -> [(&'static str, String); 5] {
    let shown = |path: &std::path::Path| path.to_string_lossy().into_owned();
    [
        ("GANTRY_ALLOCATION_ID", unit.allocation_id.clone()),
        ("GANTRY_JOB_ID", unit.job_id.clone()),
        (ALLOC_DIR_ENV, shown(alloc_dir)),
        ("GANTRY_INPUT_DIR", shown(&alloc_dir.join(INPUT_DIR))),
        ("GANTRY_OUTPUT_DIR", shown(&alloc_dir.join(OUTPUT_DIR))),
    ]
}

/// `GPU-uuid-a,1`: UUIDs where known (they survive index reordering), else the host's indexes.
pub(crate) fn visible_devices(gpus: &[GpuAssignment]) -> String {
    gpus.iter()
        .map(|gpu| gpu.uuid.clone().unwrap_or_else(|| gpu.index.to_string()))
        .collect::<Vec<_>>()
        .join(",")
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
    /// It failed for a reason the runtime can name: killed for memory (OOM), the image could not
    /// be found or pulled, the cluster could not schedule or evicted it.
    Failed {
        exit_code: Option<i32>,
        reason: String,
    },
}

/// What a runtime tells the agent, on the channel given at construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// Running. `image` is the image resolved to a digest or image id (containers only).
    Started {
        allocation_id: String,
        image: Option<String>,
    },
    /// From a runtime that checks serving health itself ([`Runtime::checks_health`]): the
    /// replica became ready (`true`) or stopped being ready (`false`).
    Health {
        allocation_id: String,
        healthy: bool,
    },
    Exited {
        allocation_id: String,
        exit: Exit,
    },
}

/// What a runtime found of an allocation from before the agent restarted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// Still running: the runtime watches it again and will report its end.
    Running { image: Option<String> },
    /// It ended while the agent was away.
    Ended(Exit),
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

/// What [`Runtime::logs_from`] read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRead {
    /// Where `data` starts: the offset asked for, or the oldest byte kept when that is later.
    pub offset: u64,
    pub data: Vec<u8>,
    /// The offset just after the last byte written so far.
    pub end_offset: u64,
}

impl LogRead {
    /// Up to `max_bytes` from `offset` of a stream whose kept bytes are `kept`, the first of
    /// them at `kept_from`. An offset before `kept_from` starts at `kept_from`; one past the end
    /// reads nothing.
    pub fn slice_of(kept: &[u8], offset: u64, max_bytes: u64) -> Self {
        Self::slice_of_kept(kept, 0, offset, max_bytes)
    }

    pub fn slice_of_kept(kept: &[u8], kept_from: u64, offset: u64, max_bytes: u64) -> Self {
        let end_offset = kept_from + kept.len() as u64;
        let start = offset.clamp(kept_from, end_offset);
        let stop = start.saturating_add(max_bytes).min(end_offset);
        Self {
            offset: start,
            data: kept[(start - kept_from) as usize..(stop - kept_from) as usize].to_vec(),
            end_offset,
        }
    }

    /// Bytes between `asked` and the start of `data` that were dropped before they were read.
    pub fn skipped_bytes(&self, asked: u64) -> u64 {
        self.offset.saturating_sub(asked)
    }
}

pub trait Runtime: Send + Sync {
    fn kind(&self) -> RuntimeKind;

    /// Called once, before any start: what this runtime still holds from an earlier run of the
    /// agent (containers found by their labels, pods by theirs). Running ones are adopted: the
    /// runtime watches them again. Ended ones are reported here and cleaned up. The process
    /// runtime finds nothing: its units died with the agent.
    fn recover(&self) -> BoxFuture<'_, Vec<(String, Recovered)>> {
        Box::pin(async { Vec::new() })
    }

    /// True when the runtime checks serving replicas' health itself (Kubernetes readiness
    /// probes) and reports [`RuntimeEvent::Health`]; otherwise the agent checks `PORT` on this
    /// host.
    fn checks_health(&self) -> bool {
        false
    }

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

    /// Up to `max_bytes` of a unit's stdout or stderr from byte `offset`, counted from the unit's
    /// first byte of output (offsets stay valid as the runtime drops old output). When the bytes
    /// at `offset` were dropped, the read starts at the oldest byte kept.
    ///
    /// The default reads everything [`Runtime::logs`] returns and takes it as the whole output
    /// from offset 0: right for a runtime that keeps all of it. A runtime that drops old output
    /// (the process runtime rotates its files) overrides this to keep offsets stable.
    fn logs_from(
        &self,
        allocation_id: &str,
        stderr: bool,
        offset: u64,
        max_bytes: u64,
    ) -> BoxFuture<'_, Result<LogRead, RuntimeError>> {
        let allocation_id = allocation_id.to_owned();
        Box::pin(async move {
            let all = self.logs(&allocation_id, stderr, u64::MAX).await?;
            Ok(LogRead::slice_of(&all, offset, max_bytes))
        })
    }

    /// The agent is exiting. The process runtime stops every unit (with `grace`), since nothing
    /// it starts may outlive the agent. The container runtimes (Docker, Kubernetes) leave their
    /// work running and only stop watching it: the next start of the agent adopts it through
    /// [`Runtime::recover`] (as Nomad's task drivers do).
    fn shutdown(&self, grace: Duration) -> BoxFuture<'_, ()>;
}

#[cfg(test)]
mod tests {
    use super::LogRead;

    #[test]
    fn a_slice_starts_at_the_oldest_kept_byte_and_stops_at_the_end() {
        let kept = b"abcdefghij";
        // (kept from, asked offset, max bytes) -> (offset read from, data)
        for (kept_from, asked, max_bytes, from, data) in [
            (0, 0, 4, 0, &b"abcd"[..]),
            (0, 8, 4, 8, b"ij"),
            (0, 10, 4, 10, b""),
            (0, 99, 4, 10, b""),
            (100, 0, 3, 100, b"abc"),
            (100, 105, 100, 105, b"fghij"),
            (100, 105, 0, 105, b""),
        ] {
            let read = LogRead::slice_of_kept(kept, kept_from, asked, max_bytes);
            assert_eq!(
                (read.offset, read.data.as_slice()),
                (from, data),
                "asked {asked}"
            );
            assert_eq!(read.end_offset, kept_from + 10);
        }
        assert_eq!(
            LogRead::slice_of_kept(kept, 100, 0, 3).skipped_bytes(0),
            100
        );
        assert_eq!(LogRead::slice_of(kept, 2, 3).data, b"cde");
    }
}
