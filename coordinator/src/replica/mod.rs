//! One coordinator's Raft replica: raft-rs's `RawNode`, the log it reads, the disk that makes the
//! log durable, and the replicated state machine, driven through the Ready contract.
//!
//! Sans-IO in the way that matters: no clock, no network, no tokio. The caller ticks it, feeds it
//! messages and proposals, and sends the messages [`Replica::handle_ready`] returns. The
//! coordinator's event loop and the simulator drive the same code.
//!
//! The Ready contract (raft-rs's `RawNode` docs), in the order `handle_ready` follows it:
//! 1. send the messages raft allows before persistence (a leader's appends to followers);
//! 2. persist the snapshot, the new entries and the hard state, and fsync, in one batch;
//! 3. restore the state machine from a received snapshot, then apply committed entries;
//! 4. `advance`, apply what `advance` committed;
//! 5. return every other message only now, after the writes they depend on are durable.
//!
//! The hard state is written only when its term or vote changes. The commit index is volatile in
//! Raft (section 5.3): a restarted node learns it again from the leader, and restarts from its
//! snapshot, whose index is committed by definition. So an append writes only the log.

pub mod disk;
pub mod logging;
pub mod machine;
pub mod storage;

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfState, Entry, EntryType, Message, Snapshot};
use raft::{RawNode, StateRole, Storage};
use storage::{Durable, LogStore, PersistBatch};

/// What a replicated state machine must offer the replica.
pub trait StateMachine {
    type Outcome: Clone + std::fmt::Debug;

    /// Applies a committed command. Returns the id of the request it answers, if any, and its
    /// outcome. Must be deterministic: the same entries give the same state on every replica.
    fn apply(&mut self, index: u64, data: &[u8]) -> (Option<u64>, Self::Outcome);

    /// Applies a committed membership change (already applied to Raft's configuration).
    fn apply_conf_change(
        &mut self,
        index: u64,
        change: &ConfChange,
    ) -> (Option<u64>, Self::Outcome);

    fn snapshot(&self) -> Vec<u8>;

    fn restore(&mut self, data: &[u8]) -> Result<(), String>;
}

#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub id: u64,
    /// Ticks without a leader's heartbeat before an election (randomised up to twice this).
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// Bounds of the randomised election timeout, `[min, max)` ticks; 0 means raft-rs's defaults
    /// (`election_tick` to twice it). raft-rs draws the timeout from its own thread-local random
    /// source, so the simulator pins a per-node value with `max = min + 1` to stay replayable.
    pub min_election_tick: usize,
    pub max_election_tick: usize,
    /// Take a snapshot and compact the log once this many entries were applied since the last.
    pub snapshot_every_entries: u64,
    /// Wait, besides, until the entries applied since the last snapshot hold at least as many
    /// bytes as that snapshot, so that writing snapshots costs at most as much as writing the
    /// log, however large the state grows (the Raft paper, section 7, sizes the log against the
    /// snapshot the same way). The log in memory then holds at most about one snapshot's worth.
    pub snapshot_amortized: bool,
}

impl ReplicaConfig {
    pub fn new(id: u64) -> Self {
        Self {
            id,
            election_tick: 10,
            heartbeat_tick: 2,
            min_election_tick: 0,
            max_election_tick: 0,
            snapshot_every_entries: 10_000,
            snapshot_amortized: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError<E: std::error::Error + 'static> {
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("disk: {0}")]
    Disk(#[source] E),
    #[error("state machine snapshot does not restore: {0}")]
    Restore(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProposeError {
    NotLeader { leader_id: Option<u64> },
    Dropped(String),
}

/// What one pass over Ready produced.
#[derive(Debug)]
pub struct Output<O> {
    pub messages: Vec<Message>,
    /// Committed and applied: (log index, request id it answers, outcome).
    pub applied: Vec<(u64, Option<u64>, O)>,
    /// Linearizable reads: (request context, index the state must reach before answering).
    pub reads: Vec<(Vec<u8>, u64)>,
    /// The leader this node now follows (or is), when that changed.
    pub leader_changed: Option<Option<u64>>,
}

impl<O> Default for Output<O> {
    fn default() -> Self {
        Self {
            messages: Vec::new(),
            applied: Vec::new(),
            reads: Vec::new(),
            leader_changed: None,
        }
    }
}

/// A Ready taken by [`Replica::start_ready`], its early messages sent, its writes not yet done.
pub struct StartedReady<O> {
    ready: raft::Ready,
    output: Output<O>,
    sent_early: bool,
    snapshot: Option<Snapshot>,
    /// What must be durable before the rest of the contract runs.
    write: Option<PersistBatch>,
}

impl<O> StartedReady<O> {
    /// Whether messages went out ahead of the writes.
    pub fn sent_early(&self) -> bool {
        self.sent_early
    }

    /// Log entries the writes hold.
    pub fn entries_to_write(&self) -> usize {
        self.write.as_ref().map_or(0, |batch| batch.entries.len())
    }

    /// Takes the writes, for the caller to make durable elsewhere (off its event loop) exactly
    /// as [`Durable::persist`] would, and to hand back to [`Replica::record_written`].
    pub fn take_write(&mut self) -> Option<PersistBatch> {
        self.write.take()
    }
}

pub struct Replica<M: StateMachine, D: Durable> {
    raw: RawNode<LogStore>,
    machine: M,
    disk: D,
    config: ReplicaConfig,
    applied: u64,
    /// Bytes of the entries applied since the last snapshot, and that snapshot's size.
    applied_bytes_since_snapshot: u64,
    snapshot_bytes: u64,
    leader: Option<u64>,
}

fn raft_config(config: &ReplicaConfig, applied: u64) -> raft::Config {
    raft::Config {
        id: config.id,
        election_tick: config.election_tick,
        heartbeat_tick: config.heartbeat_tick,
        min_election_tick: config.min_election_tick,
        max_election_tick: config.max_election_tick,
        applied,
        max_size_per_msg: 1024 * 1024,
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        read_only_option: raft::ReadOnlyOption::Safe,
        ..Default::default()
    }
}

impl<M: StateMachine, D: Durable> Replica<M, D> {
    /// Opens the replica stored on `disk`. A node that has never stored anything starts empty and
    /// waits for a leader to send it a snapshot, unless `bootstrap_voters` is given: then it
    /// starts a new cluster with those voters (just itself for `--init`; every node of a static
    /// cluster in the simulator, each bootstrapped identically).
    pub fn open(
        config: ReplicaConfig,
        mut machine: M,
        mut disk: D,
        bootstrap_voters: Option<&[u64]>,
        logger: &slog::Logger,
    ) -> Result<Self, ReplicaError<D::Error>> {
        let recovered = match disk.load().map_err(ReplicaError::Disk)? {
            Some(recovered) => recovered,
            None if bootstrap_voters.is_some() => {
                let voters = bootstrap_voters.unwrap_or_default().to_vec();
                // Like raft-rs's examples: an initial snapshot at index 1 carries the first
                // configuration, so every node that joins later starts from a snapshot.
                let mut snapshot = Snapshot::default();
                snapshot.mut_metadata().index = 1;
                snapshot.mut_metadata().term = 1;
                snapshot.mut_metadata().mut_conf_state().voters = voters;
                snapshot.data = machine.snapshot().into();
                let batch = PersistBatch {
                    snapshot: Some(snapshot),
                    ..Default::default()
                };
                disk.persist(&batch).map_err(ReplicaError::Disk)?;
                disk.load()
                    .map_err(ReplicaError::Disk)?
                    .expect("a bootstrap snapshot was just written")
            }
            None => Default::default(),
        };
        let store = LogStore::from_recovered(recovered);
        let snapshot = store.to_recovered().snapshot;
        if !snapshot.data.is_empty() {
            machine
                .restore(&snapshot.data)
                .map_err(ReplicaError::Restore)?;
        }
        let applied = store.snapshot_index();
        let snapshot_bytes = snapshot.data.len() as u64;
        let raw = RawNode::new(&raft_config(&config, applied), store, logger)?;
        Ok(Self {
            raw,
            machine,
            disk,
            config,
            applied,
            applied_bytes_since_snapshot: 0,
            snapshot_bytes,
            leader: None,
        })
    }

    pub fn id(&self) -> u64 {
        self.config.id
    }

    pub fn machine(&self) -> &M {
        &self.machine
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn commit(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    pub fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn leader_id(&self) -> Option<u64> {
        match self.raw.raft.leader_id {
            0 => None,
            id => Some(id),
        }
    }

    pub fn conf_state(&self) -> ConfState {
        self.raw.raft.prs().conf().to_conf_state()
    }

    /// The highest log index the leader knows `peer` holds (leader only).
    pub fn matched(&self, peer: u64) -> Option<u64> {
        self.raw
            .raft
            .prs()
            .get(peer)
            .map(|progress| progress.matched)
    }

    /// The entry at `index`, if the log still holds it.
    pub fn log_entry(&self, index: u64) -> Option<Entry> {
        self.raw
            .store()
            .entries(
                index,
                index + 1,
                None,
                raft::GetEntriesContext::empty(false),
            )
            .ok()?
            .pop()
    }

    pub fn tick(&mut self) -> Result<(), ReplicaError<D::Error>> {
        self.raw.tick();
        if self.raw.store().take_snapshot_request() {
            // A follower needs a snapshot that names it: take one of the current state.
            self.compact()?;
        }
        Ok(())
    }

    pub fn campaign(&mut self) -> Result<(), raft::Error> {
        self.raw.campaign()
    }

    /// Feeds a message from a peer. Messages that make no sense now (a stale term, an unknown
    /// peer) are dropped by raft; only a broken invariant is an error.
    pub fn step(&mut self, message: Message) -> Result<(), raft::Error> {
        match self.raw.step(message) {
            Ok(()) | Err(raft::Error::StepPeerNotFound) | Err(raft::Error::StepLocalMsg) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn propose(&mut self, data: Vec<u8>) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader {
                leader_id: self.leader_id(),
            });
        }
        self.raw
            .propose(Vec::new(), data)
            .map_err(|e| ProposeError::Dropped(e.to_string()))
    }

    pub fn propose_conf_change(&mut self, change: ConfChange) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader {
                leader_id: self.leader_id(),
            });
        }
        self.raw
            .propose_conf_change(Vec::new(), change)
            .map_err(|e| ProposeError::Dropped(e.to_string()))
    }

    /// Asks for a linearizable read; the answer comes back in [`Output::reads`] with `context`.
    pub fn read_index(&mut self, context: Vec<u8>) {
        self.raw.read_index(context);
    }

    /// The transport tells raft whether a snapshot it sent arrived. Until it hears, raft sends
    /// that follower nothing more, so a lost snapshot must be reported or the follower stalls.
    pub fn report_snapshot(&mut self, to: u64, delivered: bool) {
        let status = if delivered {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.raw.report_snapshot(to, status);
    }

    /// The transport could not reach `to`; raft slows down sending to it.
    pub fn report_unreachable(&mut self, to: u64) {
        self.raw.report_unreachable(to);
    }

    pub fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    fn persist(&mut self, batch: PersistBatch) -> Result<(), ReplicaError<D::Error>> {
        if let Some(batch) = self.plan_write(batch) {
            self.disk.persist(&batch).map_err(ReplicaError::Disk)?;
            self.record_written(&batch);
        }
        Ok(())
    }

    /// What of `batch` must reach the disk: `None` when nothing must. A hard state is written
    /// only when its term or vote changed: the commit index alone need not be durable (a
    /// restarted node learns it again from the leader, and a snapshot proves its own index
    /// committed), so it stays in memory and a follower's append writes only the log.
    fn plan_write(&mut self, mut batch: PersistBatch) -> Option<PersistBatch> {
        let stored = self.raw.store().hard_state();
        if let Some(hard_state) = &mut batch.hard_state {
            hard_state.commit = hard_state.commit.max(stored.commit);
            if hard_state.term == stored.term && hard_state.vote == stored.vote {
                let commit = hard_state.commit;
                batch.hard_state = None;
                self.note_commit(commit);
            }
        }
        (!batch.is_empty()).then_some(batch)
    }

    /// Records a commit index in the log raft-rs reads, without writing it.
    fn note_commit(&mut self, commit: u64) {
        let mut hard_state = self.raw.store().hard_state().clone();
        hard_state.commit = hard_state.commit.max(commit);
        self.raw.mut_store().apply(&PersistBatch {
            hard_state: Some(hard_state),
            ..Default::default()
        });
    }

    /// `batch` is durable (written here, or taken by [`StartedReady::take_write`] and written
    /// by the caller): raft-rs may now read it.
    pub fn record_written(&mut self, batch: &PersistBatch) {
        self.raw.mut_store().apply(batch);
    }

    fn apply_entries(
        &mut self,
        entries: Vec<Entry>,
        output: &mut Output<M::Outcome>,
    ) -> Result<(), ReplicaError<D::Error>> {
        for entry in entries {
            if entry.index <= self.applied {
                continue;
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => {}
                EntryType::EntryNormal => {
                    let (request_id, outcome) = self.machine.apply(entry.index, &entry.data);
                    output.applied.push((entry.index, request_id, outcome));
                }
                EntryType::EntryConfChange => {
                    let change = ConfChange::parse_from_bytes(&entry.data).map_err(|e| {
                        raft::Error::ConfChangeError(format!(
                            "committed conf change does not decode: {e}"
                        ))
                    })?;
                    let conf_state = self.raw.apply_conf_change(&change)?;
                    self.persist(PersistBatch {
                        conf_state: Some(conf_state),
                        ..Default::default()
                    })?;
                    let (request_id, outcome) =
                        self.machine.apply_conf_change(entry.index, &change);
                    output.applied.push((entry.index, request_id, outcome));
                }
                EntryType::EntryConfChangeV2 => {
                    return Err(raft::Error::ConfChangeError(
                        "joint consensus changes are not used".into(),
                    )
                    .into());
                }
            }
            self.applied = entry.index;
            self.applied_bytes_since_snapshot += entry.compute_size() as u64;
        }
        Ok(())
    }

    /// Runs the Ready contract once, if raft has anything ready.
    ///
    /// `send_early` receives the messages raft allows to go out before this node's own writes are
    /// durable (a leader's appends), so followers write in parallel with the leader.
    pub fn handle_ready(
        &mut self,
        send_early: &mut dyn FnMut(Vec<Message>),
    ) -> Result<Output<M::Outcome>, ReplicaError<D::Error>> {
        match self.start_ready(send_early) {
            Some(started) => self.finish_ready(started),
            None => Ok(Output::default()),
        }
    }

    /// The first step of [`Replica::handle_ready`]: takes the Ready and hands `send_early` the
    /// messages that may leave before the writes. The caller may let them reach the network
    /// (yield to its transport) before [`Replica::finish_ready`] writes and fsyncs; it must not
    /// step, tick or propose in between.
    pub fn start_ready(
        &mut self,
        send_early: &mut dyn FnMut(Vec<Message>),
    ) -> Option<StartedReady<M::Outcome>> {
        if !self.raw.has_ready() {
            return None;
        }
        let mut output = Output::default();
        let mut ready = self.raw.ready();
        if let Some(soft) = ready.ss() {
            let leader = match soft.leader_id {
                0 => None,
                id => Some(id),
            };
            if leader != self.leader {
                self.leader = leader;
                output.leader_changed = Some(leader);
            }
        }
        let early = ready.take_messages();
        let sent_early = !early.is_empty();
        if sent_early {
            send_early(early);
        }
        let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
        let write = self.plan_write(PersistBatch {
            snapshot: snapshot.clone(),
            entries: ready.take_entries(),
            hard_state: ready.hs().cloned(),
            ..Default::default()
        });
        Some(StartedReady {
            ready,
            output,
            sent_early,
            snapshot,
            write,
        })
    }

    /// The second step: makes the Ready's writes durable (fsynced here unless the caller took
    /// them and gave them back to [`Replica::record_written`]) and returns the messages that
    /// waited for them (a follower's acknowledgements), which may go out before
    /// [`Replica::finish_ready`] applies what committed.
    pub fn write_ready(
        &mut self,
        started: &mut StartedReady<M::Outcome>,
    ) -> Result<Vec<Message>, ReplicaError<D::Error>> {
        if let Some(batch) = started.write.take() {
            self.disk.persist(&batch).map_err(ReplicaError::Disk)?;
            self.record_written(&batch);
        }
        Ok(started.ready.take_persisted_messages())
    }

    /// The rest of the Ready contract for a Ready [`Replica::start_ready`] took: its writes and
    /// the messages that waited for them, if [`Replica::write_ready`] did not yet take them,
    /// then applying and `advance`.
    pub fn finish_ready(
        &mut self,
        mut started: StartedReady<M::Outcome>,
    ) -> Result<Output<M::Outcome>, ReplicaError<D::Error>> {
        let persisted = self.write_ready(&mut started)?;
        started.output.messages.extend(persisted);
        let StartedReady {
            mut ready,
            mut output,
            snapshot,
            ..
        } = started;
        if let Some(snapshot) = snapshot {
            self.machine
                .restore(&snapshot.data)
                .map_err(ReplicaError::Restore)?;
            self.applied = snapshot.get_metadata().index;
            self.snapshot_bytes = snapshot.data.len() as u64;
            self.applied_bytes_since_snapshot = 0;
        }
        self.apply_entries(ready.take_committed_entries(), &mut output)?;
        output.reads.extend(
            ready
                .take_read_states()
                .into_iter()
                .map(|state| (state.request_ctx, state.index)),
        );
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.note_commit(commit);
        }
        output.messages.extend(light.take_messages());
        self.apply_entries(light.take_committed_entries(), &mut output)?;
        self.raw.advance_apply_to(self.applied);
        self.maybe_compact()?;
        Ok(output)
    }

    /// The disk the log is written to.
    pub fn disk(&self) -> &D {
        &self.disk
    }

    fn maybe_compact(&mut self) -> Result<(), ReplicaError<D::Error>> {
        if self.applied < self.raw.store().snapshot_index() + self.config.snapshot_every_entries {
            return Ok(());
        }
        if self.config.snapshot_amortized && self.applied_bytes_since_snapshot < self.snapshot_bytes
        {
            return Ok(());
        }
        self.compact()
    }

    /// Where a snapshot taken now cuts the log. A leader keeps what a follower still lacks (and
    /// the follower's last entry, whose term the next append names), provided that follower
    /// holds entries past the previous snapshot: one further behind needs a snapshot anyway, and
    /// the log held stays within what was held just before. So a follower set back a little (a
    /// stall, a message dropped from a full queue) is sent entries, not the whole state. A
    /// follower keeps nothing: it sends no entries.
    fn compaction_keeps_from(&self) -> u64 {
        let after = self.applied + 1;
        if self.raw.raft.state != raft::StateRole::Leader {
            return after;
        }
        let previous = self.raw.store().snapshot_index();
        let own_id = self.raw.raft.id;
        self.raw
            .raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != own_id)
            // From the follower's last entry on: the next append names its term.
            .map(|(_, progress)| progress.matched)
            .filter(|&matched| matched > previous)
            .fold(after, u64::min)
    }

    /// Snapshots the state as applied and drops the log it covers.
    /// Both steps run on the caller's thread; the log line says how long they held it.
    fn compact(&mut self) -> Result<(), ReplicaError<D::Error>> {
        let started = std::time::Instant::now();
        let data = self.machine.snapshot();
        let encoded = started.elapsed();
        self.snapshot_bytes = data.len() as u64;
        self.applied_bytes_since_snapshot = 0;
        let keep_from = self.compaction_keeps_from();
        let batch = self
            .raw
            .store()
            .compaction_batch(self.applied, data, keep_from);
        self.persist(batch)?;
        tracing::info!(
            index = self.applied,
            kept = self.applied + 1 - keep_from.min(self.applied + 1),
            bytes = self.snapshot_bytes,
            encode_ms = encoded.as_millis() as u64,
            write_ms = (started.elapsed() - encoded).as_millis() as u64,
            "snapshot taken, log compacted"
        );
        Ok(())
    }
}

impl<M: StateMachine, D: Durable> Replica<M, D> {
    /// Whether a membership change was proposed and is not yet applied (raft-rs takes one at a
    /// time and turns a second into an empty entry).
    pub fn has_pending_conf_change(&self) -> bool {
        self.raw.raft.has_pending_conf()
    }

    /// Whether `peer` is a learner (not yet a voter).
    pub fn is_learner(&self, peer: u64) -> bool {
        self.raw.raft.prs().conf().learners().contains(&peer)
    }

    pub fn voters(&self) -> Vec<u64> {
        let mut voters: Vec<u64> = self.raw.raft.prs().conf().voters().ids().iter().collect();
        voters.sort_unstable();
        voters
    }

    pub fn learners(&self) -> Vec<u64> {
        let mut learners: Vec<u64> = self
            .raw
            .raft
            .prs()
            .conf()
            .learners()
            .iter()
            .copied()
            .collect();
        learners.sort_unstable();
        learners
    }
}

#[cfg(test)]
mod tests {
    use super::disk::RedbLog;
    use super::*;
    use crate::core::state::State;
    use gantry_protocol::replicated::{self, Command, Op};

    /// Submission `i` of a small batch job, answering request `i`.
    fn submission(i: u64) -> Command {
        Command {
            request_id: i,
            at_unix_ms: 1,
            actor: "admin".into(),
            op: Op::SubmitJob {
                job_id: format!("j-{i:04}"),
                idempotency_key: None,
                spec_json: r#"{"name":"n","kind":"batch","command":["true"]}"#.into(),
            },
        }
    }

    /// A one-node replica on redb; proposes `n` submissions one at a time and returns the log
    /// index of each snapshot taken, with the bytes applied since the one before and its size.
    fn compactions(amortized: bool, n: u64) -> Vec<(u64, u64, u64)> {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ReplicaConfig::new(1);
        config.snapshot_every_entries = 10;
        config.snapshot_amortized = amortized;
        let disk = RedbLog::open(&dir.path().join("raft.redb")).unwrap();
        let logger = logging::logger(1);
        let mut replica =
            Replica::open(config, State::default(), disk, Some(&[1]), &logger).unwrap();
        replica.campaign().unwrap();
        let drive = |replica: &mut Replica<State, RedbLog>| {
            while replica.has_ready() {
                replica.handle_ready(&mut |_| {}).unwrap();
            }
        };
        drive(&mut replica);
        assert!(replica.is_leader());
        let mut taken = Vec::new();
        for i in 0..n {
            let command = submission(i);
            let (snapshot_index, bytes_before) = (
                replica.raw.store().snapshot_index(),
                replica.applied_bytes_since_snapshot,
            );
            replica.propose(replicated::encode(&command)).unwrap();
            drive(&mut replica);
            if replica.raw.store().snapshot_index() != snapshot_index {
                taken.push((
                    replica.raw.store().snapshot_index(),
                    bytes_before,
                    replica.snapshot_bytes,
                ));
            }
        }
        taken
    }

    #[test]
    fn snapshots_follow_the_entry_count_or_also_the_log_bytes() {
        // Every 10 entries (the count alone).
        let plain = compactions(false, 60);
        assert!(plain.len() >= 5, "{plain:?}");
        // The state outgrows 10 small entries: snapshots come further apart, each once the
        // entries since the last weigh at least what it did.
        let amortized = compactions(true, 60);
        assert!(
            !amortized.is_empty() && amortized.len() < plain.len(),
            "{amortized:?}"
        );
        for pair in amortized.windows(2) {
            let (previous_size, applied_before_next) = (pair[0].2, pair[1].1);
            assert!(
                applied_before_next + 200 >= previous_size,
                "a snapshot of {previous_size} bytes followed after {applied_before_next}: {amortized:?}"
            );
        }
    }

    /// Redb, keeping what each write held: (entries, whether a hard state).
    #[derive(Clone)]
    struct Recording {
        inner: RedbLog,
        writes: std::rc::Rc<std::cell::RefCell<Vec<(usize, bool)>>>,
    }

    impl Durable for Recording {
        type Error = disk::DiskError;

        fn persist(&mut self, batch: &PersistBatch) -> Result<(), Self::Error> {
            let summary = (batch.entries.len(), batch.hard_state.is_some());
            self.writes.borrow_mut().push(summary);
            self.inner.persist(batch)
        }

        fn load(&self) -> Result<Option<storage::Recovered>, Self::Error> {
            self.inner.load()
        }
    }

    type Recorded = Replica<State, Recording>;

    /// Node `id` of a two-voter cluster, its log in `dir`, its writes recorded.
    fn recorded_node(id: u64, dir: &std::path::Path) -> (Recorded, Recording) {
        let disk = Recording {
            inner: RedbLog::open(&dir.join(format!("raft-{id}.redb"))).unwrap(),
            writes: Default::default(),
        };
        let replica = Replica::open(
            ReplicaConfig::new(id),
            State::default(),
            disk.clone(),
            Some(&[1, 2]),
            &logging::logger(id),
        )
        .unwrap();
        (replica, disk)
    }

    /// Runs both nodes' Readies and carries their messages until none is left.
    fn exchange(nodes: &mut [&mut Recorded; 2]) {
        loop {
            let mut messages = Vec::new();
            for node in nodes.iter_mut() {
                while node.has_ready() {
                    let output = node
                        .handle_ready(&mut |early| messages.extend(early))
                        .unwrap();
                    messages.extend(output.messages);
                }
            }
            if messages.is_empty() {
                return;
            }
            for message in messages {
                nodes[message.to as usize - 1].step(message).unwrap();
            }
        }
    }

    #[test]
    fn a_follower_writes_only_the_log_and_relearns_the_commit_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (mut leader, _) = recorded_node(1, dir.path());
        let (mut follower, follower_disk) = recorded_node(2, dir.path());
        let follower_writes = follower_disk.writes.clone();
        leader.campaign().unwrap();
        exchange(&mut [&mut leader, &mut follower]);
        assert!(leader.is_leader());
        assert!(
            follower_writes
                .borrow()
                .iter()
                .any(|&(_, hard_state)| hard_state),
            "the election's term and vote were written: {:?}",
            follower_writes.borrow()
        );
        follower_writes.borrow_mut().clear();
        for i in 0..20 {
            leader.propose(replicated::encode(&submission(i))).unwrap();
            exchange(&mut [&mut leader, &mut follower]);
        }
        assert_eq!(follower.machine().jobs.len(), 20);
        let writes = follower_writes.borrow().clone();
        assert!(
            writes.iter().any(|&(entries, _)| entries > 0),
            "the follower wrote the entries: {writes:?}"
        );
        assert!(
            writes.iter().all(|&(_, hard_state)| !hard_state),
            "the appends carried new commit indexes but no new term or vote, so no hard state \
             was written: {writes:?}"
        );
        // Restarted, the follower has its log but an old commit index: it applies nothing until
        // the leader's next heartbeat tells it what committed.
        drop(follower);
        let mut follower = Replica::open(
            ReplicaConfig::new(2),
            State::default(),
            follower_disk,
            None,
            &logging::logger(2),
        )
        .unwrap();
        assert_eq!(follower.last_index(), leader.last_index());
        for _ in 0..ReplicaConfig::new(1).heartbeat_tick {
            leader.tick().unwrap();
        }
        exchange(&mut [&mut leader, &mut follower]);
        assert_eq!(follower.machine().jobs.len(), 20);
    }

    /// The daemon's way through a Ready: it takes the write, makes it durable through another
    /// handle on the same redb file (on a blocking thread), and finishes. What it acknowledged
    /// must be what a restart finds.
    #[test]
    fn a_write_made_elsewhere_is_applied_and_found_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        let logger = logging::logger(1);
        let mut acknowledged = Vec::new();
        {
            let disk = RedbLog::open(&path).unwrap();
            let mut replica = Replica::open(
                ReplicaConfig::new(1),
                State::default(),
                disk,
                Some(&[1]),
                &logger,
            )
            .unwrap();
            replica.campaign().unwrap();
            let mut writes_taken = 0;
            for i in 0..5 {
                if replica.is_leader() {
                    replica.propose(replicated::encode(&submission(i))).unwrap();
                }
                while let Some(mut started) = replica.start_ready(&mut |_| {}) {
                    if let Some(batch) = started.take_write() {
                        writes_taken += 1;
                        let elsewhere = replica.disk().clone();
                        let batch = std::thread::spawn(move || {
                            elsewhere.write(&batch).unwrap();
                            batch
                        })
                        .join()
                        .unwrap();
                        replica.record_written(&batch);
                    }
                    let output = replica.finish_ready(started).unwrap();
                    acknowledged.extend(output.applied.iter().filter_map(|(_, id, _)| *id));
                }
            }
            assert!(
                writes_taken >= 5,
                "every proposal's entry was written elsewhere"
            );
            assert_eq!(replica.machine().jobs.len(), 5);
        }
        assert_eq!(acknowledged, vec![0, 1, 2, 3, 4]);
        let disk = RedbLog::open(&path).unwrap();
        let mut replica =
            Replica::open(ReplicaConfig::new(1), State::default(), disk, None, &logger).unwrap();
        replica.campaign().unwrap();
        while replica.has_ready() {
            replica.handle_ready(&mut |_| {}).unwrap();
        }
        assert_eq!(
            replica.machine().jobs.len(),
            5,
            "the restarted replica applies every entry written through the other handle"
        );
    }

    /// Three replicas on redb in `dir`, node 1 leading, with messages delivered by hand.
    struct Trio {
        replicas: Vec<Replica<State, RedbLog>>,
        /// Messages not yet delivered, and every one sent so far, by type and receiver.
        pending: Vec<Message>,
        sent: Vec<(raft::eraftpb::MessageType, u64)>,
    }

    impl Trio {
        fn new(dir: &std::path::Path) -> Self {
            let replicas = (1..=3)
                .map(|id| {
                    let mut config = ReplicaConfig::new(id);
                    config.snapshot_every_entries = 10;
                    let disk = RedbLog::open(&dir.join(format!("raft-{id}.redb"))).unwrap();
                    let logger = logging::logger(id);
                    Replica::open(config, State::default(), disk, Some(&[1, 2, 3]), &logger)
                        .unwrap()
                })
                .collect();
            let mut trio = Self {
                replicas,
                pending: Vec::new(),
                sent: Vec::new(),
            };
            trio.replicas[0].campaign().unwrap();
            trio.settle(&[]);
            assert!(trio.replicas[0].is_leader());
            trio
        }

        /// Runs every Ready and delivers messages until none is left, dropping those to or
        /// from a node in `cut_off`.
        fn settle(&mut self, cut_off: &[u64]) {
            loop {
                for replica in &mut self.replicas {
                    while replica.has_ready() {
                        let mut early = Vec::new();
                        let output = replica
                            .handle_ready(&mut |messages| early.extend(messages))
                            .unwrap();
                        self.pending.extend(early);
                        self.pending.extend(output.messages);
                    }
                }
                if self.pending.is_empty() {
                    return;
                }
                for message in std::mem::take(&mut self.pending) {
                    self.sent.push((message.get_msg_type(), message.to));
                    if cut_off.contains(&message.to) || cut_off.contains(&message.from) {
                        continue;
                    }
                    let to = (message.to - 1) as usize;
                    self.replicas[to].step(message).unwrap();
                }
            }
        }

        fn submit(&mut self, i: u64, cut_off: &[u64]) {
            self.replicas[0]
                .propose(replicated::encode(&submission(i)))
                .unwrap();
            self.settle(cut_off);
        }
    }

    #[test]
    fn a_follower_set_back_a_few_entries_by_a_leaders_snapshot_gets_entries_not_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut trio = Trio::new(dir.path());
        for i in 0..3 {
            trio.submit(i, &[]);
        }
        let behind = trio.replicas[2].applied();
        // Node 3 misses a few entries, and the leader snapshots meanwhile.
        for i in 3..13 {
            trio.submit(i, &[3]);
        }
        let leader_first = raft::Storage::first_index(trio.replicas[0].raw.store()).unwrap();
        assert!(
            trio.replicas[0].raw.store().snapshot_index() > behind,
            "the leader took a snapshot past node 3"
        );
        assert!(
            leader_first <= behind + 1,
            "the leader kept the entries node 3 lacks (its log starts at {leader_first})"
        );
        trio.sent.clear();
        // Heartbeats bring node 3 back; what it lacks comes as entries.
        for _ in 0..4 {
            trio.replicas[0].tick().unwrap();
        }
        trio.submit(13, &[]);
        assert_eq!(trio.replicas[2].applied(), trio.replicas[0].applied());
        assert!(
            !trio
                .sent
                .iter()
                .any(|(kind, _)| *kind == raft::eraftpb::MessageType::MsgSnapshot),
            "{:?}",
            trio.sent
        );
    }

    #[test]
    fn a_follower_behind_the_snapshot_before_gets_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut trio = Trio::new(dir.path());
        trio.submit(0, &[]);
        // Node 3 misses two snapshots' worth: keeping its entries would keep the log past the
        // previous snapshot, so the leader drops them and sends it a snapshot.
        for i in 1..30 {
            trio.submit(i, &[3]);
        }
        trio.sent.clear();
        for _ in 0..4 {
            trio.replicas[0].tick().unwrap();
        }
        trio.submit(30, &[]);
        assert_eq!(trio.replicas[2].applied(), trio.replicas[0].applied());
        assert!(trio
            .sent
            .iter()
            .any(|(kind, to)| *kind == raft::eraftpb::MessageType::MsgSnapshot && *to == 3));
    }
}
