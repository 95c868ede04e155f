//! What this host offers: CPUs, memory, the disk under the data dir, OS, architecture, hostname,
//! and GPUs, found through NVML loaded at run time or declared in the config.
//!
//! NVML is `dlopen`ed when the agent starts; a host without the NVIDIA driver simply has no NVML
//! GPUs. A static build, which cannot `dlopen`, asks the driver's `nvidia-smi` instead. Declared
//! GPUs stand in where neither finds any.

use crate::config::AgentConfig;
use gantry_protocol::units::parse_bytes;
use gantry_protocol::{Gpu, GpuSource, NodeCapacity};
use std::path::Path;

/// The name of a host agent's only node.
pub const LOCAL_NODE: &str = "local";

/// GPUs NVML reports, or why it reports none.
#[derive(Debug)]
pub enum NvmlOutcome {
    Found(Vec<Gpu>),
    Unavailable(String),
}

pub fn nvml_gpus() -> NvmlOutcome {
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(nvml) => nvml,
        // A static build cannot `dlopen` (musl's static loader has no dynamic loading), so
        // there the driver's own nvidia-smi, a dynamically linked program, is asked instead.
        Err(e) => {
            return match nvidia_smi_gpus() {
                Ok(gpus) => NvmlOutcome::Found(gpus),
                Err(smi) => NvmlOutcome::Unavailable(format!("NVML not loaded: {e}; {smi}")),
            }
        }
    };
    let count = match nvml.device_count() {
        Ok(count) => count,
        Err(e) => return NvmlOutcome::Unavailable(format!("NVML device count failed: {e}")),
    };
    let mut gpus = Vec::new();
    for index in 0..count {
        let device = match nvml.device_by_index(index) {
            Ok(device) => device,
            Err(e) => {
                tracing::warn!(index, "NVML could not open GPU: {e}");
                continue;
            }
        };
        gpus.push(Gpu {
            index,
            model: device.name().unwrap_or_else(|_| "unknown".into()),
            memory_bytes: device.memory_info().map(|m| m.total).unwrap_or(0),
            uuid: device.uuid().ok(),
            source: GpuSource::Nvml,
        });
    }
    NvmlOutcome::Found(gpus)
}

/// How long nvidia-smi may take to answer; a wedged driver can leave it hanging.
const NVIDIA_SMI_TIMEOUT_MS: u64 = 5_000;
const NVIDIA_SMI_QUERY: &str = "--query-gpu=index,uuid,name,memory.total";

/// GPUs as `nvidia-smi` lists them, for a binary that cannot load NVML itself.
fn nvidia_smi_gpus() -> Result<Vec<Gpu>, String> {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let mut child = Command::new("nvidia-smi")
        .args([NVIDIA_SMI_QUERY, "--format=csv,noheader,nounits"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("nvidia-smi not run: {e}"))?;
    let deadline = Instant::now() + Duration::from_millis(NVIDIA_SMI_TIMEOUT_MS);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "nvidia-smi did not answer within {NVIDIA_SMI_TIMEOUT_MS} ms"
                ));
            }
            Err(e) => return Err(format!("nvidia-smi not awaited: {e}")),
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("nvidia-smi's output not read: {e}"))?;
    if !output.status.success() {
        return Err(format!("nvidia-smi failed ({})", output.status));
    }
    parse_nvidia_smi(&String::from_utf8_lossy(&output.stdout))
}

/// `0, GPU-5c1e…, NVIDIA H100 80GB HBM3, 81559` per line: index, UUID, name, memory in MiB.
fn parse_nvidia_smi(text: &str) -> Result<Vec<Gpu>, String> {
    let mut gpus = Vec::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [index, uuid, name, memory_mib] = fields[..] else {
            return Err(format!("nvidia-smi printed {line:?}: expected 4 fields"));
        };
        let index = index
            .parse()
            .map_err(|_| format!("nvidia-smi printed {line:?}: index {index:?} is not a number"))?;
        let memory_bytes = memory_mib.parse::<u64>().map(|mib| mib << 20).unwrap_or(0);
        gpus.push(Gpu {
            index,
            model: name.to_string(),
            memory_bytes,
            uuid: (uuid.starts_with("GPU-")).then(|| uuid.to_string()),
            source: GpuSource::Nvml,
        });
    }
    Ok(gpus)
}

/// GPUs declared in the config, numbered from 0 in declaration order.
pub fn declared_gpus(config: &AgentConfig) -> Vec<Gpu> {
    let mut gpus = Vec::new();
    for group in &config.gpus {
        // Validated when the config was loaded.
        let memory_bytes = parse_bytes(&group.memory).unwrap_or(0);
        for _ in 0..group.count {
            gpus.push(Gpu {
                index: gpus.len() as u32,
                model: group.model.clone(),
                memory_bytes,
                uuid: None,
                source: GpuSource::Declared,
            });
        }
    }
    gpus
}

/// NVML's GPUs where it finds any, else the declared ones.
pub fn gpus(config: &AgentConfig) -> Vec<Gpu> {
    let declared = declared_gpus(config);
    match nvml_gpus() {
        NvmlOutcome::Found(found) if !found.is_empty() => {
            if !declared.is_empty() && declared.len() != found.len() {
                tracing::warn!(
                    nvml = found.len(),
                    declared = declared.len(),
                    "config declares GPUs but NVML found a different number; using NVML's"
                );
            }
            found
        }
        NvmlOutcome::Found(_) => declared,
        NvmlOutcome::Unavailable(reason) => {
            tracing::debug!("{reason}; using declared GPUs");
            declared
        }
    }
}

/// Logical CPUs this process may use (honours affinity and the cgroup CPU quota).
pub fn cpu_cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// Physical memory, or the cgroup's memory limit where that is lower.
pub fn memory_bytes(system: &sysinfo::System) -> u64 {
    let total = system.total_memory();
    match system.cgroup_limits() {
        Some(limits) if limits.total_memory > 0 && limits.total_memory < total => {
            limits.total_memory
        }
        _ => total,
    }
}

/// Size and free space of the file system that holds `path`.
pub fn disk_bytes(path: &Path) -> (u64, u64) {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let disks = sysinfo::Disks::new_with_refreshed_list();
    disks
        .list()
        .iter()
        .filter(|disk| path.starts_with(disk.mount_point()))
        .max_by_key(|disk| disk.mount_point().as_os_str().len())
        .map(|disk| (disk.total_space(), disk.available_space()))
        .unwrap_or((0, 0))
}

/// The host as one node.
pub fn local_node(config: &AgentConfig, data_dir: &Path) -> NodeCapacity {
    let mut system = sysinfo::System::new();
    system.refresh_memory();
    let (disk_bytes, disk_free_bytes) = disk_bytes(data_dir);
    NodeCapacity {
        name: LOCAL_NODE.into(),
        hostname: sysinfo::System::host_name().unwrap_or_else(|| "unknown".into()),
        os: sysinfo::System::long_os_version().unwrap_or_else(|| std::env::consts::OS.into()),
        arch: std::env::consts::ARCH.into(),
        cpu_cores: cpu_cores(),
        memory_bytes: memory_bytes(&system),
        disk_bytes,
        disk_free_bytes,
        gpus: gpus(config),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_lines_give_index_uuid_model_and_memory() {
        let text = "0, GPU-5c1e9f2a-1111-2222-3333-444455556666, NVIDIA H100 80GB HBM3, 81559\n1, GPU-0d7f0000-1111-2222-3333-444455556666, NVIDIA H100 80GB HBM3, 81559\n\n";
        let gpus = parse_nvidia_smi(text).unwrap();
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[1].index, 1);
        assert_eq!(gpus[0].model, "NVIDIA H100 80GB HBM3");
        assert_eq!(gpus[0].memory_bytes, 81559 << 20);
        assert_eq!(
            gpus[0].uuid.as_deref(),
            Some("GPU-5c1e9f2a-1111-2222-3333-444455556666")
        );
        assert!(gpus.iter().all(|g| g.source == GpuSource::Nvml));
        // A field nvidia-smi could not read ("[N/A]") leaves that value unknown, not the GPU.
        let odd = parse_nvidia_smi("0, [N/A], Tesla T4, [N/A]\n").unwrap();
        assert_eq!((odd[0].uuid.as_deref(), odd[0].memory_bytes), (None, 0));
        let error = parse_nvidia_smi("No devices were found\n").unwrap_err();
        assert!(error.contains("No devices were found"), "{error}");
    }

    #[test]
    fn declared_gpus_are_numbered_in_order() {
        let config = AgentConfig::parse(
            "[[gpus]]\nmodel = \"A100\"\nmemory = \"80GiB\"\ncount = 2\n[[gpus]]\nmodel = \"L4\"\nmemory = \"24GiB\"\n",
            "t",
        )
        .unwrap();
        let gpus = declared_gpus(&config);
        let summary: Vec<(u32, &str, u64)> = gpus
            .iter()
            .map(|g| (g.index, g.model.as_str(), g.memory_bytes))
            .collect();
        assert_eq!(
            summary,
            vec![
                (0, "A100", 80 << 30),
                (1, "A100", 80 << 30),
                (2, "L4", 24 << 30)
            ]
        );
        assert!(gpus
            .iter()
            .all(|g| g.source == GpuSource::Declared && g.uuid.is_none()));
    }

    #[test]
    fn the_local_node_matches_what_the_kernel_reports() {
        let dir = tempfile::tempdir().unwrap();
        let node = local_node(&AgentConfig::default(), dir.path());
        assert_eq!(
            node.cpu_cores as usize,
            std::thread::available_parallelism().unwrap().get()
        );
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
        assert!(node.memory_bytes <= kib * 1024 && node.memory_bytes > 0);
        assert!(node.disk_bytes > 0 && node.disk_free_bytes <= node.disk_bytes);
        assert_eq!(node.arch, std::env::consts::ARCH);
    }
}
