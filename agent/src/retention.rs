//! Bounded retention of finished allocations on the agent's disk. An allocation's directory (its
//! logs, its outputs, its assignment record) stays after the unit ends, so that logs can be read
//! and a restart can report; it is removed once its `ended` marker is older than the retention
//! age, and the oldest go first when more ended directories than the limit remain. Directories
//! without the marker are never touched: their unit may still run.

use std::path::Path;
use std::time::{Duration, SystemTime};

/// The supervisor writes this file into an allocation's directory when it reports its end.
pub const ENDED_FILE: &str = "ended";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_age: Duration,
    pub max_count: usize,
}

/// Removes what the retention no longer keeps; returns how many directories went.
pub fn sweep(work_root: &Path, retention: Retention, now: SystemTime) -> usize {
    let Ok(entries) = std::fs::read_dir(work_root) else {
        return 0;
    };
    let mut ended: Vec<(SystemTime, std::path::PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let dir = e.path();
            let at = std::fs::metadata(dir.join(ENDED_FILE))
                .and_then(|m| m.modified())
                .ok()?;
            Some((at, dir))
        })
        .collect();
    // Newest first: the ones past the count limit are at the end.
    ended.sort_by(|a, b| b.cmp(a));
    let mut removed = 0;
    for (position, (at, dir)) in ended.into_iter().enumerate() {
        let too_old = now.duration_since(at).unwrap_or_default() > retention.max_age;
        if too_old || position >= retention.max_count {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), "cannot remove a finished allocation: {e}")
                }
            }
        }
    }
    if removed > 0 {
        tracing::info!(removed, "removed finished allocations past their retention");
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocation(root: &Path, name: &str, ended_ago: Option<Duration>) {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stdout.log"), b"output").unwrap();
        if let Some(ago) = ended_ago {
            let marker = std::fs::File::create(dir.join(ENDED_FILE)).unwrap();
            marker.set_modified(SystemTime::now() - ago).unwrap();
        }
    }

    #[test]
    fn removes_old_and_excess_finished_allocations_only() {
        let root = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        allocation(root.path(), "running", None);
        allocation(root.path(), "old", Some(30 * hour));
        allocation(root.path(), "recent-1", Some(hour));
        allocation(root.path(), "recent-2", Some(2 * hour));
        allocation(root.path(), "recent-3", Some(3 * hour));
        let retention = Retention {
            max_age: 24 * hour,
            max_count: 2,
        };
        assert_eq!(sweep(root.path(), retention, SystemTime::now()), 2);
        let mut left: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["recent-1", "recent-2", "running"]);
        assert_eq!(sweep(root.path(), retention, SystemTime::now()), 0);
        assert_eq!(
            sweep(&root.path().join("missing"), retention, SystemTime::now()),
            0
        );
    }
}
