//! Per-allocation files shared by the runtimes: the allocation id check (ids name directories)
//! and bounded stdout/stderr logs.
//!
//! Log policy: stdout and stderr go to `stdout.log` and `stderr.log` in the allocation's
//! directory. When a file reaches `log_bytes_max` it is renamed to `<name>.1` (replacing the
//! previous `.1`) and a new file is started, so each stream holds at most `2 * log_bytes_max`
//! bytes on disk and always its newest `log_bytes_max` bytes (all of it when it wrote less).
//! `<name>.base` holds the offset of the first byte of `<name>` within the whole stream (absent:
//! 0), so that offsets stay stable across rotations: `<name>.1` holds the bytes just before it.
//! Rotation and reads take a lock of the runtime's, so a read never sees a rotation half done.
//! (A crash in the middle of a rotation can leave the offsets of that allocation's older file
//! off by its length; the bytes themselves are kept.)

use super::{LogRead, RuntimeError};
use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::RwLock;

pub(crate) const STDOUT_LOG: &str = "stdout.log";
pub(crate) const STDERR_LOG: &str = "stderr.log";
/// Appended to a log's name for the one older file kept.
pub(crate) const ROTATED_SUFFIX: &str = ".1";
/// Appended to a log's name for the file holding its offset within the stream.
const BASE_SUFFIX: &str = ".base";

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
    base_path: PathBuf,
    file: tokio::fs::File,
    len_bytes: u64,
    /// The offset of the file's first byte within the stream.
    base_bytes: u64,
    log_bytes_max: u64,
    rotation: Arc<RwLock<()>>,
}

impl BoundedLog {
    /// Appends to what an earlier unit with the same allocation id left.
    pub(crate) async fn open(
        dir: &Path,
        name: &str,
        log_bytes_max: u64,
        rotation: &Arc<RwLock<()>>,
    ) -> io::Result<Self> {
        let (dir, name, rotation) = (dir.to_path_buf(), name.to_string(), Arc::clone(rotation));
        tokio::task::spawn_blocking(move || {
            Self::open_blocking(&dir, &name, log_bytes_max, &rotation)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// [`BoundedLog::open`] for a caller already off the async threads: a few small file
    /// operations, done in one go rather than one blocking-pool trip each.
    pub(crate) fn open_blocking(
        dir: &Path,
        name: &str,
        log_bytes_max: u64,
        rotation: &Arc<RwLock<()>>,
    ) -> io::Result<Self> {
        let path = dir.join(name);
        let base_path = dir.join(format!("{name}{BASE_SUFFIX}"));
        let base_bytes = read_base_blocking(&base_path)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let len_bytes = file.metadata()?.len();
        let file = tokio::fs::File::from_std(file);
        Ok(Self {
            rotated_path: dir.join(format!("{name}{ROTATED_SUFFIX}")),
            base_path,
            path,
            file,
            len_bytes,
            base_bytes,
            log_bytes_max,
            rotation: Arc::clone(rotation),
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
        let _rotating = self.rotation.write().await;
        self.file.flush().await?;
        tokio::fs::rename(&self.path, &self.rotated_path).await?;
        self.file = open_append(&self.path).await?;
        self.base_bytes += self.len_bytes;
        self.len_bytes = 0;
        let temporary = self.base_path.with_extension("base.tmp");
        tokio::fs::write(&temporary, self.base_bytes.to_string()).await?;
        tokio::fs::rename(&temporary, &self.base_path).await
    }
}

async fn open_append(path: &Path) -> io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
}

/// An allocation's directory, if it has one.
async fn allocation_dir(work_root: &Path, allocation_id: &str) -> Result<PathBuf, RuntimeError> {
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
    Ok(dir)
}

/// The newest `bytes` of a stream: the end of `<name>.1` followed by `<name>`. Call it holding
/// the rotation lock for reading.
pub(crate) async fn read_logs(
    work_root: &Path,
    allocation_id: &str,
    stderr: bool,
    bytes: u64,
) -> Result<Vec<u8>, RuntimeError> {
    let dir = allocation_dir(work_root, allocation_id).await?;
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

/// The offset of a log's first byte within its stream, from its `.base` file (0 when absent).
async fn read_base(path: &Path) -> io::Result<u64> {
    parse_base(tokio::fs::read_to_string(path).await, path)
}

fn read_base_blocking(path: &Path) -> io::Result<u64> {
    parse_base(std::fs::read_to_string(path), path)
}

/// A `.base` file's offset; a missing file means 0.
fn parse_base(read: io::Result<String>, path: &Path) -> io::Result<u64> {
    match read {
        Ok(text) => text.trim().parse().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} does not hold an offset: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Up to `max_bytes` of a stream from `offset`: the rotated file holds the bytes just before
/// the current one, which starts at the offset in the `.base` file. Call it holding the rotation
/// lock for reading.
pub(crate) async fn read_logs_from(
    work_root: &Path,
    allocation_id: &str,
    stderr: bool,
    offset: u64,
    max_bytes: u64,
) -> Result<LogRead, RuntimeError> {
    let dir = allocation_dir(work_root, allocation_id).await?;
    let name = if stderr { STDERR_LOG } else { STDOUT_LOG };
    let newest = dir.join(name);
    let older = dir.join(format!("{name}{ROTATED_SUFFIX}"));
    let base = read_base(&dir.join(format!("{name}{BASE_SUFFIX}"))).await?;
    let newest_len = file_len(&newest).await?;
    let older_len = file_len(&older).await?;
    let kept_from = base.saturating_sub(older_len);
    let end_offset = base + newest_len;
    let start = offset.clamp(kept_from, end_offset);
    let stop = start.saturating_add(max_bytes).min(end_offset);
    let mut data = Vec::with_capacity((stop - start) as usize);
    if start < base {
        let older_stop = stop.min(base);
        data.extend(read_range(&older, start - kept_from, older_stop - start).await?);
    }
    if stop > base {
        let newest_start = start.max(base);
        data.extend(read_range(&newest, newest_start - base, stop - newest_start).await?);
    }
    Ok(LogRead {
        offset: start,
        data,
        end_offset,
    })
}

async fn file_len(path: &Path) -> io::Result<u64> {
    match tokio::fs::metadata(path).await {
        Ok(meta) => Ok(meta.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// `len_bytes` of a file from `start` (fewer if it is shorter).
async fn read_range(path: &Path, start: u64, len_bytes: u64) -> io::Result<Vec<u8>> {
    if len_bytes == 0 {
        return Ok(Vec::new());
    }
    let mut file = tokio::fs::File::open(path).await?;
    file.seek(SeekFrom::Start(start)).await?;
    let mut output = Vec::with_capacity(len_bytes as usize);
    file.take(len_bytes).read_to_end(&mut output).await?;
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
