//! The Raft log on disk: redb holds the log, hard state, conf state and the snapshot's metadata;
//! a preallocated write-ahead file in front of it, `raft.wal`, makes each write durable with one
//! small fdatasync; the snapshot's bytes are a file of their own.
//!
//! A redb commit with `Durability::Immediate` rewrites the path to what changed (the log's leaf
//! and branch, the table tree, redb's freed-page tables) and its header: about seven scattered
//! blocks under one fsync. The quorum follower's fsync is most of a one-client submission, and
//! seven blocks cost nearly twice one here. So a write commits its batch to redb without
//! durability (`Durability::None`: later transactions see it, the next durable commit makes it
//! durable) and appends the batch to the write-ahead file as one checksummed record, fdatasynced
//! before `write` returns. The file was filled with zeros when it was made, so a record changes
//! no file metadata and the fdatasync flushes only its own blocks.
//!
//! Every [`WAL_RECORDS_MAX`] records, when the file is full, and for every snapshot, the batch is
//! committed to redb durably instead: that commit makes every earlier batch durable too, and it
//! records a new epoch for the write-ahead file, which voids the records already there; writing
//! starts again at the file's start. A record is `len: u32, crc32: u32, epoch: u64` (little
//! endian) and `len` bytes of batch; the checksum covers the length, the epoch and the batch.
//!
//! Opening replays the records of the current epoch in order, up to the first that is torn (a
//! bad checksum: the write a crash interrupted, never acknowledged) or of an older epoch, then
//! commits them to redb durably under a new epoch.
//!
//! A snapshot's state bytes go to a file of their own beside the database (`raft.snap-INDEX-TERM`
//! beside `raft.redb`), written, fdatasynced and renamed into place before the durable commit
//! that records the snapshot's metadata, the file's length and CRC-32 (checked when it is read)
//! and drops the log it covers (but the entries a leader keeps for its followers, from the
//! batch's `compact_before` on); files no commit names are removed after that commit and when
//! opening. Inserted into redb, a snapshot of 200 MB took up to 0.7 s and its commit 0.9 s, on
//! the loop's thread. A database written before snapshots had files holds the whole snapshot
//! under another key; that is read as before, and replaced by the next snapshot. (The new key
//! keeps an older build from reading metadata without bytes as an empty state: it finds no
//! snapshot and a log that does not start at 1, and stops.)

use super::storage::{snapshot_keeps_from, Durable, PersistBatch, Recovered};
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
/// A whole snapshot, bytes included, as databases written before snapshot files hold it.
const SNAPSHOT: &str = "snapshot";
/// The snapshot whose bytes are in [`SnapshotFiles::name`]: the bytes' length (u64) and CRC-32
/// (u32), little endian, then the snapshot without its bytes.
const SNAPSHOT_IN_FILE: &str = "snapshot_in_file";
/// The write-ahead file's epoch: only its records stamped with this one are valid.
const WAL_EPOCH: &str = "wal_epoch";

/// The write-ahead file's size when it is made. A batch larger than the file goes to redb
/// durably, as a snapshot does.
const WAL_BYTES: u64 = 4 << 20;
/// Records between durable redb commits: bounds what redb holds in memory undurably and what an
/// open replays.
const WAL_RECORDS_MAX: u32 = 1024;
const RECORD_HEADER: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("raft storage: {0}")]
    Redb(String),
    #[error("raft storage holds a record that does not decode: {0}")]
    Corrupt(String),
    #[error("raft write-ahead file {path}: {source}")]
    Wal {
        path: String,
        source: std::io::Error,
    },
    #[error("raft snapshot file {path}: {source}")]
    SnapshotFile {
        path: String,
        source: std::io::Error,
    },
}

fn snapshot_file_error(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::SnapshotFile {
        path: path.display().to_string(),
        source,
    }
}

fn redb_error(e: impl std::fmt::Display) -> DiskError {
    DiskError::Redb(e.to_string())
}

/// A snapshot file's length and CRC-32, recorded in redb when the file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seal {
    len: u64,
    crc: u32,
}

impl Seal {
    fn of(bytes: &[u8]) -> Self {
        Self {
            len: bytes.len() as u64,
            crc: crc32fast::hash(bytes),
        }
    }
}

/// Clones share one database and one write-ahead file; writes are serialised.
#[derive(Clone)]
pub struct RedbLog {
    db: Arc<Database>,
    wal: Arc<Mutex<Wal>>,
    snapshots: Arc<SnapshotFiles>,
}

/// Where snapshot files go: the database's directory, named after the database's file stem.
struct SnapshotFiles {
    dir: PathBuf,
    /// `raft.snap-` for `raft.redb`.
    prefix: String,
}

impl SnapshotFiles {
    fn new(db_path: &Path) -> Self {
        let dir = match db_path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let stem = db_path
            .file_stem()
            .map_or("raft".into(), |stem| stem.to_string_lossy().into_owned());
        Self {
            dir,
            prefix: format!("{stem}.snap-"),
        }
    }

    fn name(&self, metadata: &SnapshotMetadata) -> String {
        format!("{}{}-{}", self.prefix, metadata.index, metadata.term)
    }

    /// Whether `name` is one this type writes: `PREFIX<index>-<term>`, maybe `.partial`.
    fn is_ours(&self, name: &str) -> bool {
        let Some(rest) = name.strip_prefix(&self.prefix) else {
            return false;
        };
        let rest = rest.strip_suffix(".partial").unwrap_or(rest);
        rest.split_once('-').is_some_and(|(index, term)| {
            index.parse::<u64>().is_ok() && term.parse::<u64>().is_ok()
        })
    }

    /// Writes the snapshot's bytes under [`Self::name`], durably: a temporary file fdatasynced,
    /// renamed into place, the directory synced. Returns what [`Self::read`] checks.
    fn write(&self, snapshot: &Snapshot) -> Result<Seal, DiskError> {
        let name = self.name(snapshot.get_metadata());
        let path = self.dir.join(&name);
        let partial = self.dir.join(format!("{name}.partial"));
        let mut file = File::create(&partial).map_err(snapshot_file_error(&partial))?;
        std::io::Write::write_all(&mut file, &snapshot.data)
            .and_then(|()| file.sync_data())
            .map_err(snapshot_file_error(&partial))?;
        std::fs::rename(&partial, &path).map_err(snapshot_file_error(&path))?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(snapshot_file_error(&self.dir))?;
        Ok(Seal::of(&snapshot.data))
    }

    fn read(&self, metadata: &SnapshotMetadata, seal: Seal) -> Result<Vec<u8>, DiskError> {
        let path = self.dir.join(self.name(metadata));
        let bytes = std::fs::read(&path).map_err(snapshot_file_error(&path))?;
        let found = Seal::of(&bytes);
        if found != seal {
            return Err(DiskError::Corrupt(format!(
                "snapshot file {} holds {} bytes with CRC-32 {:08x}; the log recorded {} bytes with {:08x}",
                path.display(),
                found.len,
                found.crc,
                seal.len,
                seal.crc
            )));
        }
        Ok(bytes)
    }

    /// Removes every snapshot file but `keep`: older ones, and any a crash left before the
    /// commit that would have named it. Best effort: a file left over is only disk space.
    fn remove_all_but(&self, keep: Option<&str>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if self.is_ours(name) && Some(name) != keep {
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove an old snapshot file");
                }
            }
        }
    }
}

struct Wal {
    file: File,
    path: String,
    epoch: u64,
    /// Where the next record goes.
    end: u64,
    records: u32,
    capacity: u64,
}

impl Wal {
    fn error(&self, source: std::io::Error) -> DiskError {
        DiskError::Wal {
            path: self.path.clone(),
            source,
        }
    }
}

impl RedbLog {
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let db = Database::create(path).map_err(redb_error)?;
        let wal_path = path.with_extension("wal");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&wal_path)
            .map_err(|source| DiskError::Wal {
                path: wal_path.display().to_string(),
                source,
            })?;
        let mut wal = Wal {
            file,
            path: wal_path.display().to_string(),
            epoch: 0,
            end: 0,
            records: 0,
            capacity: 0,
        };

        // What the file holds for the current epoch becomes durable in redb under the next
        // epoch, which voids it. Records are stamped from epoch 1 on: a fresh database (epoch 0)
        // replays nothing from a file some earlier database left.
        let txn = db.begin_write().map_err(redb_error)?;
        txn.open_table(LOG).map_err(redb_error)?;
        let epoch = match txn
            .open_table(META)
            .map_err(redb_error)?
            .get(WAL_EPOCH)
            .map_err(redb_error)?
        {
            Some(bytes) => u64::from_le_bytes(
                bytes
                    .value()
                    .try_into()
                    .map_err(|_| DiskError::Corrupt("the write-ahead epoch".into()))?,
            ),
            None => 0,
        };
        for batch in read_records(&wal, epoch)? {
            // Records never hold a snapshot: a batch with one commits durably instead.
            apply(&txn, &batch, None)?;
        }
        set_epoch(&txn, epoch + 1)?;
        txn.commit().map_err(redb_error)?;
        wal.epoch = epoch + 1;

        let len = wal.file.metadata().map_err(|e| wal.error(e))?.len();
        if len < WAL_BYTES {
            // Zeros all the way: records then overwrite allocated blocks and change no metadata.
            // The file and its directory entry are durable before any record is acknowledged.
            let zeros = vec![0u8; (WAL_BYTES - len) as usize];
            wal.file
                .write_all_at(&zeros, len)
                .and_then(|()| wal.file.sync_all())
                .map_err(|e| wal.error(e))?;
            if let Some(dir) = wal_path.parent() {
                File::open(dir)
                    .and_then(|dir| dir.sync_all())
                    .map_err(|e| wal.error(e))?;
            }
        }
        wal.capacity = len.max(WAL_BYTES);
        let snapshots = SnapshotFiles::new(path);
        let in_file = snapshot_in_file(&db)?;
        snapshots.remove_all_but(
            in_file
                .as_ref()
                .map(|(snapshot, _)| snapshots.name(snapshot.get_metadata()))
                .as_deref(),
        );
        Ok(Self {
            db: Arc::new(db),
            wal: Arc::new(Mutex::new(wal)),
            snapshots: Arc::new(snapshots),
        })
    }
}

/// The snapshot whose bytes are in a file, without them, and the file's seal.
fn snapshot_in_file(db: &Database) -> Result<Option<(Snapshot, Seal)>, DiskError> {
    let txn = db.begin_read().map_err(redb_error)?;
    let meta = txn.open_table(META).map_err(redb_error)?;
    let value = meta.get(SNAPSHOT_IN_FILE).map_err(redb_error)?;
    value.map(|bytes| decode_in_file(bytes.value())).transpose()
}

fn encode_in_file(snapshot: &Snapshot, seal: Seal) -> Vec<u8> {
    let mut metadata_only = Snapshot::default();
    metadata_only.set_metadata(snapshot.get_metadata().clone());
    let mut bytes = seal.len.to_le_bytes().to_vec();
    bytes.extend_from_slice(&seal.crc.to_le_bytes());
    bytes.extend(encode(&metadata_only));
    bytes
}

fn decode_in_file(bytes: &[u8]) -> Result<(Snapshot, Seal), DiskError> {
    let corrupt = || DiskError::Corrupt("the snapshot's record is shorter than its header".into());
    let len = u64::from_le_bytes(
        bytes
            .get(0..8)
            .ok_or_else(corrupt)?
            .try_into()
            .expect("8 bytes"),
    );
    let crc = u32::from_le_bytes(
        bytes
            .get(8..12)
            .ok_or_else(corrupt)?
            .try_into()
            .expect("4 bytes"),
    );
    let snapshot = decode::<Snapshot>(&bytes[12..], "snapshot")?;
    Ok((snapshot, Seal { len, crc }))
}

fn set_epoch(txn: &WriteTransaction, epoch: u64) -> Result<(), DiskError> {
    txn.open_table(META)
        .map_err(redb_error)?
        .insert(WAL_EPOCH, epoch.to_le_bytes().as_slice())
        .map_err(redb_error)?;
    Ok(())
}

fn checksum(len: &[u8], epoch: &[u8], batch: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(len);
    hasher.update(epoch);
    hasher.update(batch);
    hasher.finalize()
}

/// The batches the file holds for `epoch`, in order, up to the first torn or foreign record.
fn read_records(wal: &Wal, epoch: u64) -> Result<Vec<PersistBatch>, DiskError> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut &wal.file, &mut bytes).map_err(|e| wal.error(e))?;
    let mut batches = Vec::new();
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + RECORD_HEADER) {
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let Some(batch) = bytes.get(at + RECORD_HEADER..at + RECORD_HEADER + len) else {
            break;
        };
        if len == 0
            || header[8..16] != epoch.to_le_bytes()
            || checksum(&header[0..4], &header[8..16], batch) != crc
        {
            break;
        }
        batches.push(decode_batch(batch)?);
        at += RECORD_HEADER + len;
    }
    Ok(batches)
}

/// A batch without a snapshot as a record's bytes: `compact_before` (u64, 0 for none), the hard
/// state and the conf state (each a u32 length, `u32::MAX` for none, and its protobuf bytes),
/// then the entries (a u32 count, and a u32 length and the protobuf bytes of each).
fn encode_batch(batch: &PersistBatch, record: &mut Vec<u8>) {
    fn put(record: &mut Vec<u8>, message: Option<&impl protobuf::Message>) {
        match message {
            Some(message) => {
                let at = record.len();
                record.extend_from_slice(&[0; 4]);
                message
                    .write_to_vec(record)
                    .expect("raft messages always encode");
                let len = (record.len() - at - 4) as u32;
                record[at..at + 4].copy_from_slice(&len.to_le_bytes());
            }
            None => record.extend_from_slice(&u32::MAX.to_le_bytes()),
        }
    }
    record.extend_from_slice(&batch.compact_before.unwrap_or(0).to_le_bytes());
    put(record, batch.hard_state.as_ref());
    put(record, batch.conf_state.as_ref());
    record.extend_from_slice(&(batch.entries.len() as u32).to_le_bytes());
    for entry in &batch.entries {
        put(record, Some(entry));
    }
}

fn decode_batch(mut bytes: &[u8]) -> Result<PersistBatch, DiskError> {
    fn corrupt() -> DiskError {
        DiskError::Corrupt("a write-ahead record with a valid checksum does not parse".into())
    }
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], DiskError> {
        if bytes.len() < n {
            return Err(corrupt());
        }
        let (head, tail) = bytes.split_at(n);
        *bytes = tail;
        Ok(head)
    }
    fn u32_at(bytes: &mut &[u8]) -> Result<u32, DiskError> {
        Ok(u32::from_le_bytes(
            take(bytes, 4)?.try_into().expect("4 bytes"),
        ))
    }
    fn message<M: protobuf::Message>(bytes: &mut &[u8]) -> Result<Option<M>, DiskError> {
        match u32_at(bytes)? {
            u32::MAX => Ok(None),
            len => Ok(Some(decode(
                take(bytes, len as usize)?,
                "write-ahead record",
            )?)),
        }
    }
    let compact_before = u64::from_le_bytes(take(&mut bytes, 8)?.try_into().expect("8 bytes"));
    let hard_state = message::<HardState>(&mut bytes)?;
    let conf_state = message::<ConfState>(&mut bytes)?;
    let count = u32_at(&mut bytes)?;
    let mut entries = Vec::with_capacity(count.min(1 << 16) as usize);
    for _ in 0..count {
        entries.push(message::<Entry>(&mut bytes)?.ok_or_else(corrupt)?);
    }
    if !bytes.is_empty() {
        return Err(corrupt());
    }
    Ok(PersistBatch {
        snapshot: None,
        entries,
        hard_state,
        conf_state,
        compact_before: (compact_before != 0).then_some(compact_before),
    })
}

fn encode(message: &impl protobuf::Message) -> Vec<u8> {
    message
        .write_to_bytes()
        .expect("raft messages always encode")
}

fn decode<M: protobuf::Message>(bytes: &[u8], what: &str) -> Result<M, DiskError> {
    M::parse_from_bytes(bytes).map_err(|e| DiskError::Corrupt(format!("{what}: {e}")))
}

/// Applies a batch in field order: snapshot, entries, hard state, conf state, compaction. A
/// snapshot's bytes are already in their file, sealed by `snapshot_seal`; redb gets the rest.
fn apply(
    txn: &WriteTransaction,
    batch: &PersistBatch,
    snapshot_seal: Option<Seal>,
) -> Result<(), DiskError> {
    let mut log = txn.open_table(LOG).map_err(redb_error)?;
    // A plain append (the common write) leaves the metadata table alone: each table a
    // transaction opens for writing costs pages in its commit.
    let mut meta =
        if batch.snapshot.is_some() || batch.hard_state.is_some() || batch.conf_state.is_some() {
            Some(txn.open_table(META).map_err(redb_error)?)
        } else {
            None
        };
    if let (Some(snapshot), Some(meta)) = (&batch.snapshot, &mut meta) {
        let index = snapshot.get_metadata().index;
        let term = snapshot.get_metadata().term;
        // Entries up to the snapshot go (but those from `compact_before` on, which a leader
        // keeps for followers); the rest stay only if the log agrees with it.
        let agrees = match log.get(index).map_err(redb_error)? {
            Some(bytes) => decode::<Entry>(bytes.value(), "log entry")?.term == term,
            None => false,
        };
        if agrees {
            log.retain_in(..snapshot_keeps_from(batch), |_, _| false)
                .map_err(redb_error)?;
        } else {
            log.retain(|_, _| false).map_err(redb_error)?;
        }
        let seal = snapshot_seal
            .ok_or_else(|| DiskError::Corrupt("a snapshot to store without its file".into()))?;
        meta.insert(SNAPSHOT_IN_FILE, encode_in_file(snapshot, seal).as_slice())
            .map_err(redb_error)?;
        meta.remove(SNAPSHOT).map_err(redb_error)?;
        meta.insert(
            CONF_STATE,
            encode(snapshot.get_metadata().get_conf_state()).as_slice(),
        )
        .map_err(redb_error)?;
    }
    if let Some(first) = batch.entries.first() {
        let last = log.last().map_err(redb_error)?.map(|(key, _)| key.value());
        if last.is_some_and(|last| last >= first.index) {
            log.retain_in(first.index.., |_, _| false)
                .map_err(redb_error)?;
        }
        for entry in &batch.entries {
            log.insert(entry.index, encode(entry).as_slice())
                .map_err(redb_error)?;
        }
    }
    if let (Some(hard_state), Some(meta)) = (&batch.hard_state, &mut meta) {
        meta.insert(HARD_STATE, encode(hard_state).as_slice())
            .map_err(redb_error)?;
    }
    if let (Some(conf_state), Some(meta)) = (&batch.conf_state, &mut meta) {
        meta.insert(CONF_STATE, encode(conf_state).as_slice())
            .map_err(redb_error)?;
    }
    if let Some(before) = batch.compact_before {
        // Only entries a snapshot covers can go: a compaction comes with its snapshot (see
        // `LogStore::compaction_batch`), so this is the batch's.
        let covered = batch.snapshot.as_ref().ok_or_else(|| {
            DiskError::Corrupt("a compaction of the log without its snapshot".into())
        })?;
        let before = before.min(covered.get_metadata().index + 1);
        log.retain_in(..before, |_, _| false).map_err(redb_error)?;
    }
    Ok(())
}

impl Durable for RedbLog {
    type Error = DiskError;

    fn persist(&mut self, batch: &PersistBatch) -> Result<(), DiskError> {
        self.write(batch)
    }

    fn load(&self) -> Result<Option<Recovered>, DiskError> {
        self.read()
    }
}

impl RedbLog {
    /// [`Durable::persist`] through a shared handle (from a thread other than the replica's).
    pub fn write(&self, batch: &PersistBatch) -> Result<(), DiskError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut wal = self
            .wal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut record = Vec::new();
        if batch.snapshot.is_none() && wal.records < WAL_RECORDS_MAX {
            record.extend_from_slice(&[0; RECORD_HEADER]);
            encode_batch(batch, &mut record);
        }
        let fits = !record.is_empty() && wal.end + record.len() as u64 <= wal.capacity;
        let snapshot_seal = match &batch.snapshot {
            Some(snapshot) => Some(self.snapshots.write(snapshot)?),
            None => None,
        };
        let mut txn = self.db.begin_write().map_err(redb_error)?;
        if fits {
            txn.set_durability(Durability::None).map_err(redb_error)?;
        }
        apply(&txn, batch, snapshot_seal)?;
        if !fits {
            // A durable commit: this batch and every one before it are in redb for good.
            set_epoch(&txn, wal.epoch + 1)?;
            txn.commit().map_err(redb_error)?;
            wal.epoch += 1;
            wal.end = 0;
            wal.records = 0;
            if let Some(snapshot) = &batch.snapshot {
                let name = self.snapshots.name(snapshot.get_metadata());
                self.snapshots.remove_all_but(Some(&name));
            }
            return Ok(());
        }
        txn.commit().map_err(redb_error)?;
        let len = (record.len() - RECORD_HEADER) as u32;
        record[0..4].copy_from_slice(&len.to_le_bytes());
        record[8..16].copy_from_slice(&wal.epoch.to_le_bytes());
        let crc = checksum(&record[0..4], &record[8..16], &record[RECORD_HEADER..]);
        record[4..8].copy_from_slice(&crc.to_le_bytes());
        wal.file
            .write_all_at(&record, wal.end)
            .and_then(|()| wal.file.sync_data())
            .map_err(|e| wal.error(e))?;
        wal.end += record.len() as u64;
        wal.records += 1;
        Ok(())
    }

    fn read(&self) -> Result<Option<Recovered>, DiskError> {
        let txn = self.db.begin_read().map_err(redb_error)?;
        let log = txn.open_table(LOG).map_err(redb_error)?;
        let meta = txn.open_table(META).map_err(redb_error)?;
        let hard_state = meta.get(HARD_STATE).map_err(redb_error)?;
        let in_file = meta.get(SNAPSHOT_IN_FILE).map_err(redb_error)?;
        let inside = meta.get(SNAPSHOT).map_err(redb_error)?;
        if hard_state.is_none()
            && in_file.is_none()
            && inside.is_none()
            && log.is_empty().map_err(redb_error)?
        {
            return Ok(None);
        }
        let mut recovered = Recovered::default();
        if let Some(bytes) = hard_state {
            recovered.hard_state = decode::<HardState>(bytes.value(), "hard state")?;
        }
        if let Some(bytes) = in_file {
            let (mut snapshot, seal) = decode_in_file(bytes.value())?;
            snapshot.data = self.snapshots.read(snapshot.get_metadata(), seal)?.into();
            recovered.snapshot = snapshot;
        } else if let Some(bytes) = inside {
            recovered.snapshot = decode::<Snapshot>(bytes.value(), "snapshot")?;
        }
        if let Some(bytes) = meta.get(CONF_STATE).map_err(redb_error)? {
            recovered.conf_state = decode::<ConfState>(bytes.value(), "conf state")?;
        }
        for item in log.iter().map_err(redb_error)? {
            let (_, value) = item.map_err(redb_error)?;
            recovered
                .entries
                .push(decode::<Entry>(value.value(), "log entry")?);
        }
        Ok(Some(recovered))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    /// A snapshot at `index` (term 1, voters 1 to 3) and the compaction of the log it covers.
    fn compaction(index: u64, data: &[u8]) -> PersistBatch {
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().index = index;
        snapshot.mut_metadata().term = 1;
        snapshot.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        snapshot.data = data.to_vec().into();
        PersistBatch {
            snapshot: Some(snapshot),
            compact_before: Some(index + 1),
            ..Default::default()
        }
    }

    #[test]
    fn what_was_persisted_is_what_is_loaded_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        {
            let mut disk = RedbLog::open(&path).unwrap();
            assert!(disk.load().unwrap().is_none());
            let hard_state = HardState {
                term: 2,
                vote: 1,
                commit: 3,
                ..Default::default()
            };
            disk.persist(&PersistBatch {
                entries: (1..=5).map(|i| entry(i, 1)).collect(),
                hard_state: Some(hard_state),
                ..Default::default()
            })
            .unwrap();
            disk.persist(&PersistBatch {
                entries: vec![entry(4, 2)],
                ..Default::default()
            })
            .unwrap();
        }
        let disk = RedbLog::open(&path).unwrap();
        let recovered = disk.load().unwrap().unwrap();
        let summary: Vec<(u64, u64)> = recovered
            .entries
            .iter()
            .map(|e| (e.index, e.term))
            .collect();
        assert_eq!(summary, vec![(1, 1), (2, 1), (3, 1), (4, 2)]);
        assert_eq!(recovered.hard_state.commit, 3);
    }

    #[test]
    fn a_snapshot_replaces_the_log_it_covers() {
        let dir = tempfile::tempdir().unwrap();
        let mut disk = RedbLog::open(&dir.path().join("raft.redb")).unwrap();
        disk.persist(&PersistBatch {
            entries: (1..=5).map(|i| entry(i, 1)).collect(),
            ..Default::default()
        })
        .unwrap();
        disk.persist(&compaction(3, b"state at 3")).unwrap();
        let recovered = disk.load().unwrap().unwrap();
        assert_eq!(
            recovered
                .entries
                .iter()
                .map(|e| e.index)
                .collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert_eq!(recovered.snapshot.data.as_ref(), b"state at 3");
        assert_eq!(recovered.conf_state.voters, vec![1, 2, 3]);
    }

    /// What a kill -9 leaves: the files as the page cache holds them, the process gone without
    /// closing the database.
    fn crash_image(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for file in std::fs::read_dir(from).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), to.join(file.file_name())).unwrap();
        }
    }

    fn snapshot_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|file| file.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.starts_with("raft.snap-"))
            .collect();
        names.sort();
        names
    }

    fn open_in(dir: &Path) -> RedbLog {
        std::fs::create_dir_all(dir).unwrap();
        RedbLog::open(&dir.join("raft.redb")).unwrap()
    }

    fn load_from(dir: &Path) -> Recovered {
        open_in(dir).load().unwrap().unwrap()
    }

    fn append(disk: &RedbLog, entry: Entry) {
        disk.write(&PersistBatch {
            entries: vec![entry],
            ..Default::default()
        })
        .unwrap();
    }

    fn indexes(recovered: &Recovered) -> Vec<(u64, u64)> {
        recovered
            .entries
            .iter()
            .map(|e| (e.index, e.term))
            .collect()
    }

    #[test]
    fn every_acknowledged_write_survives_a_crash_through_the_write_ahead_file() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let disk = open_in(&live);
        for i in 1..=3 {
            append(&disk, entry(i, 1));
        }
        disk.write(&compaction(2, b"state at 2")).unwrap();
        for i in 4..=6 {
            disk.write(&PersistBatch {
                entries: vec![entry(i, 2)],
                hard_state: (i == 4).then(|| HardState {
                    term: 2,
                    vote: 7,
                    commit: 3,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .unwrap();
        }
        // The last three writes are in the write-ahead file alone: redb by itself lost them.
        let redb_only = dir.path().join("redb-only");
        crash_image(&live, &redb_only);
        std::fs::remove_file(redb_only.join("raft.wal")).unwrap();
        assert_eq!(indexes(&load_from(&redb_only)), vec![(3, 1)]);

        let crashed = dir.path().join("crashed");
        crash_image(&live, &crashed);
        drop(disk);
        for _ in 0..2 {
            // Twice: the replay itself must leave what it replayed durable and the file void.
            let recovered = load_from(&crashed);
            assert_eq!(indexes(&recovered), vec![(3, 1), (4, 2), (5, 2), (6, 2)]);
            assert_eq!(recovered.snapshot.data.as_ref(), b"state at 2");
            assert_eq!(
                (recovered.hard_state.term, recovered.hard_state.vote),
                (2, 7)
            );
        }
    }

    #[test]
    fn a_record_torn_by_the_crash_is_dropped_with_nothing_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let disk = open_in(&live);
        append(&disk, entry(1, 1));
        append(&disk, entry(2, 1));
        let before = std::fs::read(live.join("raft.wal")).unwrap();
        append(&disk, entry(3, 1));
        let after = std::fs::read(live.join("raft.wal")).unwrap();
        // The third record half written: its first bytes new, the rest still what was there.
        let changed: Vec<usize> = (0..after.len())
            .filter(|&i| before[i] != after[i])
            .collect();
        let (first, last) = (changed[0], *changed.last().unwrap());
        let mut torn = after.clone();
        let middle = (first + last) / 2;
        torn[middle..=last].copy_from_slice(&before[middle..=last]);
        let crashed = dir.path().join("crashed");
        crash_image(&live, &crashed);
        std::fs::write(crashed.join("raft.wal"), &torn).unwrap();
        assert_eq!(indexes(&load_from(&crashed)), vec![(1, 1), (2, 1)]);
    }

    #[test]
    fn records_from_before_a_durable_commit_are_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let disk = open_in(&live);
        // A full file of records, then the write that commits durably and voids them, then one
        // record at the file's start. The voided records still follow it in the file; replayed,
        // they would cut the log back to their own entries. Entries of one size put the new
        // record's end exactly where an old one starts (indexes of one varint width too).
        let entry = |index| Entry {
            index,
            term: 1,
            data: format!("{index:08}").into_bytes().into(),
            ..Default::default()
        };
        let first = 200;
        let last = first + u64::from(WAL_RECORDS_MAX) + 1;
        for i in first..=last {
            append(&disk, entry(i));
        }
        let crashed = dir.path().join("crashed");
        crash_image(&live, &crashed);
        assert_eq!(
            indexes(&load_from(&crashed)),
            (first..=last).map(|i| (i, 1)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_snapshot_lives_in_a_file_of_its_own_until_the_next_one_is_committed() {
        let dir = tempfile::tempdir().unwrap();
        let disk = open_in(dir.path());
        for i in 1..=6 {
            append(&disk, entry(i, 1));
        }
        disk.write(&compaction(3, b"state at 3")).unwrap();
        assert_eq!(snapshot_files(dir.path()), vec!["raft.snap-3-1"]);
        assert_eq!(
            std::fs::read(dir.path().join("raft.snap-3-1")).unwrap(),
            b"state at 3"
        );
        disk.write(&compaction(5, b"state at 5")).unwrap();
        assert_eq!(snapshot_files(dir.path()), vec!["raft.snap-5-1"]);
        drop(disk);
        let recovered = load_from(dir.path());
        assert_eq!(recovered.snapshot.data.as_ref(), b"state at 5");
        assert_eq!(recovered.snapshot.get_metadata().index, 5);
        assert_eq!(indexes(&recovered), vec![(6, 1)]);
    }

    #[test]
    fn a_snapshot_file_that_no_commit_names_is_removed_on_opening() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let disk = open_in(&live);
        for i in 1..=4 {
            append(&disk, entry(i, 1));
        }
        disk.write(&compaction(3, b"state at 3")).unwrap();
        // A crash after the next snapshot's file was written (or half written), before the
        // commit that would have named it.
        let crashed = dir.path().join("crashed");
        crash_image(&live, &crashed);
        std::fs::write(crashed.join("raft.snap-4-1"), b"state at 4").unwrap();
        std::fs::write(crashed.join("raft.snap-4-1.partial"), b"sta").unwrap();
        // Not ours: an operator's copy, another database's files.
        std::fs::write(crashed.join("raft.snap-3-1.bak"), b"state at 3").unwrap();
        std::fs::write(crashed.join("raft-2.snap-4-1"), b"state at 4").unwrap();
        let recovered = load_from(&crashed);
        assert_eq!(recovered.snapshot.data.as_ref(), b"state at 3");
        assert_eq!(indexes(&recovered), vec![(4, 1)]);
        assert_eq!(
            snapshot_files(&crashed),
            vec!["raft.snap-3-1", "raft.snap-3-1.bak"]
        );
        assert!(crashed.join("raft-2.snap-4-1").exists());
    }

    #[test]
    fn a_missing_or_damaged_snapshot_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let disk = open_in(dir.path());
        append(&disk, entry(1, 1));
        disk.write(&compaction(1, b"state at 1")).unwrap();
        drop(disk);
        let file = dir.path().join("raft.snap-1-1");
        for damage in [&b"state at 2"[..], b"state at"] {
            std::fs::write(&file, damage).unwrap();
            let error = open_in(dir.path()).load().unwrap_err().to_string();
            assert!(
                error.contains("raft.snap-1-1") && error.contains("CRC-32"),
                "{error}"
            );
        }
        std::fs::remove_file(&file).unwrap();
        let error = open_in(dir.path()).load().unwrap_err().to_string();
        assert!(error.contains("raft.snap-1-1"), "{error}");
    }

    #[test]
    fn a_snapshot_stored_inside_the_database_still_loads() {
        // How a database written before snapshot files held its snapshot: the whole message,
        // bytes and all, in the metadata table.
        let dir = tempfile::tempdir().unwrap();
        let disk = open_in(dir.path());
        append(&disk, entry(1, 1));
        append(&disk, entry(2, 1));
        let PersistBatch {
            snapshot: Some(snapshot),
            ..
        } = compaction(1, b"state at 1")
        else {
            unreachable!()
        };
        let txn = disk.db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(SNAPSHOT, encode(&snapshot).as_slice())
            .unwrap();
        txn.commit().unwrap();
        drop(disk);
        let recovered = load_from(dir.path());
        assert_eq!(recovered.snapshot.data.as_ref(), b"state at 1");
        assert_eq!(recovered.snapshot.get_metadata().index, 1);
        // The next snapshot goes to a file and replaces the old record, which an older build
        // would otherwise still read.
        let disk = open_in(dir.path());
        disk.write(&compaction(2, b"state at 2")).unwrap();
        let txn = disk.db.begin_read().unwrap();
        assert!(txn
            .open_table(META)
            .unwrap()
            .get(SNAPSHOT)
            .unwrap()
            .is_none());
        drop(txn);
        drop(disk);
        assert_eq!(load_from(dir.path()).snapshot.data.as_ref(), b"state at 2");
    }

    #[test]
    fn entries_a_snapshot_keeps_are_there_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let disk = open_in(dir.path());
        for i in 1..=8 {
            append(&disk, entry(i, 1));
        }
        // A leader's snapshot at 6 that keeps the entries from 4 on for a follower.
        let mut batch = compaction(6, b"state at 6");
        batch.compact_before = Some(4);
        disk.write(&batch).unwrap();
        drop(disk);
        let recovered = load_from(dir.path());
        assert_eq!(recovered.snapshot.get_metadata().index, 6);
        assert_eq!(
            indexes(&recovered),
            (4..=8).map(|i| (i, 1)).collect::<Vec<_>>()
        );
        let store = super::super::storage::LogStore::from_recovered(recovered);
        assert_eq!(raft::Storage::first_index(&store).unwrap(), 4);
        assert_eq!(raft::Storage::term(&store, 5).unwrap(), 1);
    }
}
