//! The Raft log on disk, in redb: every batch is one write transaction committed with
//! `Durability::Immediate`, so it is fsynced before `persist` returns.

use super::storage::{Durable, PersistBatch, Recovered};
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::path::Path;
use std::sync::Arc;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
const SNAPSHOT: &str = "snapshot";

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("raft storage: {0}")]
    Redb(String),
    #[error("raft storage holds a record that does not decode: {0}")]
    Corrupt(String),
}

fn redb_error(e: impl std::fmt::Display) -> DiskError {
    DiskError::Redb(e.to_string())
}

/// Clones share one database; redb runs one write transaction at a time.
#[derive(Clone)]
pub struct RedbLog {
    db: Arc<Database>,
}

impl RedbLog {
    pub fn open(path: &Path) -> Result<Self, DiskError> {
        let db = Database::create(path).map_err(redb_error)?;
        let txn = db.begin_write().map_err(redb_error)?;
        txn.open_table(LOG).map_err(redb_error)?;
        txn.open_table(META).map_err(redb_error)?;
        txn.commit().map_err(redb_error)?;
        Ok(Self { db: Arc::new(db) })
    }
}

fn encode(message: &impl protobuf::Message) -> Vec<u8> {
    message
        .write_to_bytes()
        .expect("raft messages always encode")
}

fn decode<M: protobuf::Message>(bytes: &[u8], what: &str) -> Result<M, DiskError> {
    M::parse_from_bytes(bytes).map_err(|e| DiskError::Corrupt(format!("{what}: {e}")))
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
        let txn = self.db.begin_write().map_err(redb_error)?;
        {
            let mut log = txn.open_table(LOG).map_err(redb_error)?;
            // A plain append (the common write) leaves the metadata table alone: each table a
            // transaction opens for writing costs pages in its commit.
            let mut meta = if batch.snapshot.is_some()
                || batch.hard_state.is_some()
                || batch.conf_state.is_some()
            {
                Some(txn.open_table(META).map_err(redb_error)?)
            } else {
                None
            };
            if let (Some(snapshot), Some(meta)) = (&batch.snapshot, &mut meta) {
                let index = snapshot.get_metadata().index;
                let term = snapshot.get_metadata().term;
                // Entries up to the snapshot go; later ones stay only if the log agrees with it.
                let agrees = match log.get(index).map_err(redb_error)? {
                    Some(bytes) => decode::<Entry>(bytes.value(), "log entry")?.term == term,
                    None => false,
                };
                if agrees {
                    log.retain_in(..=index, |_, _| false).map_err(redb_error)?;
                } else {
                    log.retain(|_, _| false).map_err(redb_error)?;
                }
                meta.insert(SNAPSHOT, encode(snapshot).as_slice())
                    .map_err(redb_error)?;
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
                log.retain_in(..before, |_, _| false).map_err(redb_error)?;
            }
        }
        txn.commit().map_err(redb_error)?;
        Ok(())
    }

    fn read(&self) -> Result<Option<Recovered>, DiskError> {
        let txn = self.db.begin_read().map_err(redb_error)?;
        let log = txn.open_table(LOG).map_err(redb_error)?;
        let meta = txn.open_table(META).map_err(redb_error)?;
        let hard_state = meta.get(HARD_STATE).map_err(redb_error)?;
        let snapshot = meta.get(SNAPSHOT).map_err(redb_error)?;
        if hard_state.is_none() && snapshot.is_none() && log.is_empty().map_err(redb_error)? {
            return Ok(None);
        }
        let mut recovered = Recovered::default();
        if let Some(bytes) = hard_state {
            recovered.hard_state = decode::<HardState>(bytes.value(), "hard state")?;
        }
        if let Some(bytes) = snapshot {
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
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().index = 3;
        snapshot.mut_metadata().term = 1;
        snapshot.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        snapshot.data = b"state at 3".to_vec().into();
        disk.persist(&PersistBatch {
            snapshot: Some(snapshot),
            compact_before: Some(4),
            ..Default::default()
        })
        .unwrap();
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
}
