//! What this host offers: CPUs, memory, the disk under the data dir, OS, architecture, hostname,
//! and GPUs, found through NVML loaded at run time or declared in the config.
//!
//! NVML is `dlopen`ed when the agent starts; a host without the NVIDIA driver simply has no NVML
//! GPUs. Declared GPUs stand in where NVML is absent.

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
        Err(e) => return NvmlOutcome::Unavailable(format!("NVML not loaded: {e}")),
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
