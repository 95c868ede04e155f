//! Per-allocation files shared by the runtimes: the allocation id check (ids name directories)
//! and bounded stdout/stderr logs.
//!
//! Log policy: stdout and stderr go to `stdout.log` and `stderr.log` in the allocation's
//! directory. When a file reaches `log_bytes_max` it is renamed to `<name>.1` (replacing the
//! previous `.1`) and a new file is started, so each stream holds at most `2 * log_bytes_max`
//! bytes on disk and always its newest `log_bytes_max` bytes (all of it when it wrote less).

use super::RuntimeError;
use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

pub(crate) const STDOUT_LOG: &str = "stdout.log";
pub(crate) const STDERR_LOG: &str = "stderr.log";
/// Appended to a log's name for the one older file kept.
pub(crate) const ROTATED_SUFFIX: &str = ".1";

/// Longest allocation id accepted (it names a directory; 255 bytes is the usual file-name limit).
pub(crate) const ALLOCATION_ID_BYTES_MAX: usize = 255;

/// Allocation ids name directories: only `[A-Za-z0-9._-]`, never `.` or `..`.
pub(crate) fn is_safe_allocation_id(allocation_id: &str) -> bool {
    !allocation_id.is_empty()
        && allocation_id.len() <= ALLOCATION_ID_BYTES_MAX
        && allocation_id != "."
        && allocation_id != ".."
        && allocation_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// One output stream of a unit on disk, bounded by rotation (see the module documentation).
pub(crate) struct BoundedLog {
    path: PathBuf,
    rotated_path: PathBuf,
    file: tokio::fs::File,
    len_bytes: u64,
    log_bytes_max: u64,
}

impl BoundedLog {
    /// Appends to what an earlier unit with the same allocation id left.
    pub(crate) async fn open(dir: &Path, name: &str, log_bytes_max: u64) -> io::Result<Self> {
        let path = dir.join(name);
        let file = open_append(&path).await?;
        let len_bytes = file.metadata().await?.len();
        Ok(Self {
            rotated_path: dir.join(format!("{name}{ROTATED_SUFFIX}")),
            path,
            file,
            len_bytes,
            log_bytes_max,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) async fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        if self.log_bytes_max == 0 {
            return Ok(());
        }
        while !data.is_empty() {
            if self.len_bytes >= self.log_bytes_max {
                self.rotate().await?;
            }
            let room = (self.log_bytes_max - self.len_bytes).min(data.len() as u64) as usize;
            self.file.write_all(&data[..room]).await?;
            self.len_bytes += room as u64;
            data = &data[room..];
        }
        // tokio's File writes in the background; make the bytes visible to `logs` now.
        self.file.flush().await
    }

    async fn rotate(&mut self) -> io::Result<()> {
        self.file.flush().await?;
        tokio::fs::rename(&self.path, &self.rotated_path).await?;
        self.file = open_append(&self.path).await?;
        self.len_bytes = 0;
        Ok(())
    }
}

async fn open_append(path: &Path) -> io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
}

/// The newest `bytes` of a stream: the end of `<name>.1` followed by `<name>`. A read that races
/// a rotation may miss or repeat what was rotated at that moment.
pub(crate) async fn read_logs(
    work_root: &Path,
    allocation_id: &str,
    stderr: bool,
    bytes: u64,
) -> Result<Vec<u8>, RuntimeError> {
    if !is_safe_allocation_id(allocation_id) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{allocation_id:?} is not an allocation id"),
        )
        .into());
    }
    let dir = work_root.join(allocation_id);
    if !tokio::fs::metadata(&dir)
        .await
        .is_ok_and(|meta| meta.is_dir())
    {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no logs for allocation {allocation_id}"),
        )
        .into());
    }
    let name = if stderr { STDERR_LOG } else { STDOUT_LOG };
    let newest = read_tail(&dir.join(name), bytes).await?;
    let wanted_older_bytes = bytes - newest.len() as u64;
    if wanted_older_bytes == 0 {
        return Ok(newest);
    }
    let mut output = read_tail(
        &dir.join(format!("{name}{ROTATED_SUFFIX}")),
        wanted_older_bytes,
    )
    .await?;
    output.extend_from_slice(&newest);
    Ok(output)
}

/// The last `bytes` of a file; nothing when it does not exist.
async fn read_tail(path: &Path, bytes: u64) -> io::Result<Vec<u8>> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len_bytes = file.metadata().await?.len();
    let start = len_bytes.saturating_sub(bytes);
    file.seek(SeekFrom::Start(start)).await?;
    let n_bytes = len_bytes - start;
    let mut output = Vec::with_capacity(n_bytes as usize);
    file.take(n_bytes).read_to_end(&mut output).await?;
    Ok(output)
}
