//! The Raft log as raft-rs reads it: entries, hard state, conf state and the latest snapshot, in
//! memory. Every change is made durable first through a [`Durable`] (redb in production, a
//! simulated disk in the simulator); this type only mirrors what is on disk so raft-rs can read it
//! without I/O.

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{Error, GetEntriesContext, RaftState, Storage, StorageError};

/// One atomic, durable change to the log. Applied in field order: snapshot, entries, hard state,
/// conf state, compaction.
#[derive(Debug, Default, Clone)]
pub struct PersistBatch {
    /// A snapshot received from the leader or taken locally, with its state-machine bytes.
    pub snapshot: Option<Snapshot>,
    /// Entries to append; any stored entry at or after the first one's index is replaced.
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub conf_state: Option<ConfState>,
    /// Entries before this index may be dropped (a snapshot covers them); with a snapshot, the
    /// entries from here to its index stay (a leader keeps them for its followers).
    pub compact_before: Option<u64>,
}

impl PersistBatch {
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
            && self.conf_state.is_none()
            && self.compact_before.is_none()
    }
}

/// Where the log lives. `persist` returns only once the batch would survive a crash.
pub trait Durable {
    type Error: std::error::Error + Send + Sync + 'static;

    fn persist(&mut self, batch: &PersistBatch) -> Result<(), Self::Error>;

    /// Everything persisted so far, or `None` for a node that has never stored anything.
    fn load(&self) -> Result<Option<Recovered>, Self::Error>;
}

/// The log as read back after a restart.
#[derive(Debug, Default, Clone)]
pub struct Recovered {
    pub hard_state: HardState,
    pub conf_state: ConfState,
    pub snapshot: Snapshot,
    pub entries: Vec<Entry>,
}

/// raft-rs's view of the log.
#[derive(Debug, Default)]
pub struct LogStore {
    hard_state: HardState,
    conf_state: ConfState,
    /// The latest snapshot.
    snapshot: Snapshot,
    /// Contiguous, from at most just after the snapshot: a leader's own snapshot may leave the
    /// entries just before its index in place, for followers that lack only those.
    entries: Vec<Entry>,
    /// Raft asked for a snapshot the stored one cannot serve (it predates the follower joining,
    /// or is too old); the replica takes a fresh one and raft asks again.
    snapshot_requested: std::cell::Cell<bool>,
}

impl LogStore {
    pub fn from_recovered(recovered: Recovered) -> Self {
        let mut store = Self {
            hard_state: recovered.hard_state,
            conf_state: recovered.conf_state,
            snapshot: recovered.snapshot,
            entries: recovered.entries,
            snapshot_requested: Default::default(),
        };
        // The commit index is written lazily; a snapshot proves at least its index committed.
        let snapshot_index = store.snapshot_index();
        store.hard_state.commit = store.hard_state.commit.max(snapshot_index);
        store.hard_state.term = store
            .hard_state
            .term
            .max(store.snapshot.get_metadata().term);
        store.check();
        store
    }

    fn check(&self) {
        let first = self.first();
        assert!(
            first <= self.snapshot_index() + 1,
            "the log starts at {first}, after the snapshot at {}",
            self.snapshot_index()
        );
        if first <= self.snapshot_index() {
            assert!(
                self.last_entry_index() >= self.snapshot_index(),
                "entries kept before the snapshot at {} reach it",
                self.snapshot_index()
            );
        }
        for (i, entry) in self.entries.iter().enumerate() {
            assert_eq!(entry.index, first + i as u64, "log entries are contiguous");
            if entry.index == self.snapshot_index() {
                assert_eq!(
                    entry.term,
                    self.snapshot.get_metadata().term,
                    "the entry at the snapshot's index is of the snapshot's term"
                );
            }
        }
    }

    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    pub fn snapshot_metadata(&self) -> &SnapshotMetadata {
        self.snapshot.get_metadata()
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    fn first(&self) -> u64 {
        self.entries
            .first()
            .map_or(self.snapshot_index() + 1, |entry| entry.index)
    }

    fn last_entry_index(&self) -> u64 {
        self.entries.last().map_or(0, |entry| entry.index)
    }

    fn last(&self) -> u64 {
        self.entries
            .last()
            .map_or(0, |entry| entry.index)
            .max(self.snapshot_index())
    }

    /// Everything this store holds, as a disk would return it after a restart.
    pub fn to_recovered(&self) -> Recovered {
        Recovered {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
            snapshot: self.snapshot.clone(),
            entries: self.entries.clone(),
        }
    }

    pub fn entry_count(&self) -> usize {
        self.entries.len()
    }

    /// Mirrors a batch that has just been made durable.
    pub fn apply(&mut self, batch: &PersistBatch) {
        if let Some(snapshot) = &batch.snapshot {
            let index = snapshot.get_metadata().index;
            // Keep entries only if the log agrees with the snapshot: those after it, and those
            // from `compact_before` on that it covers (see [`Self::compaction_batch`]).
            let agrees = self
                .entries
                .iter()
                .any(|e| e.index == index && e.term == snapshot.get_metadata().term);
            if agrees {
                let keep_from = snapshot_keeps_from(batch);
                self.entries.retain(|e| e.index >= keep_from);
            } else {
                self.entries.clear();
            }
            self.snapshot = snapshot.clone();
            self.conf_state = snapshot.get_metadata().get_conf_state().clone();
            if self.hard_state.commit < index {
                self.hard_state.commit = index;
            }
            if self.hard_state.term < snapshot.get_metadata().term {
                self.hard_state.term = snapshot.get_metadata().term;
            }
        }
        if let Some(first) = batch.entries.first() {
            assert!(
                first.index > self.snapshot_index(),
                "append at {} at or below the snapshot at {}",
                first.index,
                self.snapshot_index()
            );
            assert!(
                first.index <= self.last() + 1,
                "append at {} leaves a gap after {}",
                first.index,
                self.last()
            );
            self.entries.truncate((first.index - self.first()) as usize);
            self.entries.extend_from_slice(&batch.entries);
        }
        if let Some(hard_state) = &batch.hard_state {
            self.hard_state = hard_state.clone();
        }
        if let Some(conf_state) = &batch.conf_state {
            self.conf_state = conf_state.clone();
        }
        if let Some(before) = batch.compact_before {
            // Only entries a snapshot covers can go.
            let before = before.min(self.snapshot_index() + 1);
            let drop = before.saturating_sub(self.first()) as usize;
            self.entries.drain(..drop.min(self.entries.len()));
        }
        // A walk of the whole log: in debug builds (the tests and the simulator) only.
        if cfg!(debug_assertions) {
            self.check();
        }
    }

    /// Whether raft asked for a fresh snapshot since the last call.
    pub fn take_snapshot_request(&self) -> bool {
        self.snapshot_requested.replace(false)
    }

    /// The snapshot of the state as of `index` replaces the log before `keep_from` (at most
    /// `index + 1`): the entries from there to `index` stay, for followers that lack only those.
    pub fn compaction_batch(&self, index: u64, data: Vec<u8>, keep_from: u64) -> PersistBatch {
        let mut snapshot = Snapshot::default();
        let metadata = snapshot.mut_metadata();
        metadata.index = index;
        metadata.term = self
            .term(index)
            .expect("a snapshot is taken at an index still in the log");
        metadata.set_conf_state(self.conf_state.clone());
        snapshot.data = data.into();
        PersistBatch {
            snapshot: Some(snapshot),
            compact_before: Some(keep_from.max(self.first()).min(index + 1)),
            ..Default::default()
        }
    }
}

/// The first entry a batch with a snapshot keeps, when the log agrees with the snapshot: its
/// `compact_before`, no later than just after the snapshot.
pub fn snapshot_keeps_from(batch: &PersistBatch) -> u64 {
    let after = batch
        .snapshot
        .as_ref()
        .map_or(0, |snapshot| snapshot.get_metadata().index + 1);
    batch
        .compact_before
        .map_or(after, |before| before.min(after))
}

impl Storage for LogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.conf_state.clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(Error::Store(StorageError::Unavailable));
        }
        let offset = self.first();
        let mut entries = self.entries[(low - offset) as usize..(high - offset) as usize].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.snapshot_index() {
            return Ok(self.snapshot.get_metadata().term);
        }
        if index < self.first() {
            return Err(Error::Store(StorageError::Compacted));
        }
        if index > self.last() {
            return Err(Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(index - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // The stored snapshot covers everything before the first stored entry (and maybe some
        // entries still stored), which is what a follower raft cannot send entries to lacks,
        // provided its configuration already names that follower.
        let conf = self.snapshot.get_metadata().get_conf_state();
        let names_follower = conf.voters.contains(&to) || conf.learners.contains(&to);
        if names_follower && self.snapshot_index() >= request_index {
            return Ok(self.snapshot.clone());
        }
        self.snapshot_requested.set(true);
        Err(Error::Store(StorageError::SnapshotTemporarilyUnavailable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            ..Default::default()
        }
    }

    #[test]
    fn appends_replace_conflicting_suffixes() {
        let mut store = LogStore::default();
        store.apply(&PersistBatch {
            entries: (1..=5).map(|i| entry(i, 1)).collect(),
            ..Default::default()
        });
        store.apply(&PersistBatch {
            entries: vec![entry(4, 2)],
            ..Default::default()
        });
        assert_eq!(store.last_index().unwrap(), 4);
        assert_eq!(store.term(4).unwrap(), 2);
        assert_eq!(store.term(3).unwrap(), 1);
    }

    #[test]
    fn compaction_keeps_the_tail_and_answers_compacted_below() {
        let mut store = LogStore::default();
        store.apply(&PersistBatch {
            entries: (1..=10).map(|i| entry(i, 1)).collect(),
            ..Default::default()
        });
        let batch = store.compaction_batch(6, b"state".to_vec(), 7);
        store.apply(&batch);
        assert_eq!(store.first_index().unwrap(), 7);
        assert_eq!(store.last_index().unwrap(), 10);
        assert_eq!(store.term(6).unwrap(), 1);
        assert!(matches!(
            store.term(5),
            Err(Error::Store(StorageError::Compacted))
        ));
        assert!(
            store.snapshot(0, 1).is_err(),
            "the stored snapshot does not name node 1"
        );
        assert!(store.take_snapshot_request());
    }

    #[test]
    fn a_snapshot_may_keep_entries_it_covers_until_one_from_elsewhere_replaces_them() {
        let mut store = LogStore::default();
        store.apply(&PersistBatch {
            entries: (1..=10).map(|i| entry(i, 1)).collect(),
            ..Default::default()
        });
        let batch = store.compaction_batch(8, b"state".to_vec(), 5);
        store.apply(&batch);
        assert_eq!(store.snapshot_index(), 8);
        assert_eq!(store.first_index().unwrap(), 5);
        assert_eq!(store.last_index().unwrap(), 10);
        assert_eq!(store.term(5).unwrap(), 1);
        assert_eq!(
            store
                .entries(5, 9, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            4
        );
        assert!(matches!(
            store.term(4),
            Err(Error::Store(StorageError::Compacted))
        ));
        let reopened = LogStore::from_recovered(store.to_recovered());
        assert_eq!(reopened.first_index().unwrap(), 5);
        // A leader's snapshot of another history replaces everything.
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().index = 12;
        snapshot.mut_metadata().term = 2;
        store.apply(&PersistBatch {
            snapshot: Some(snapshot),
            ..Default::default()
        });
        assert_eq!(store.first_index().unwrap(), 13);
        assert_eq!(store.last_index().unwrap(), 12);
    }
}
