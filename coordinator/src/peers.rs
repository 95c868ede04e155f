//! Raft traffic between coordinators: one QUIC connection (mutual TLS, coordinator certificates
//! on both ends) from each node to each peer, carrying batches of Raft messages.
//!
//! Each peer has its own bounded queue and its own task, so a slow or dead peer never blocks the
//! others or the event loop: when a queue is full the newest messages are dropped, which Raft
//! tolerates (it retransmits), and a dropped snapshot is reported so raft-rs tries again.

use crate::core::state::Member;
use crate::server::{Event, Handle};
use gantry_protocol::pki::COORDINATOR_SERVER_NAME;
use gantry_protocol::tls::{self, NodeCredentials};
use gantry_protocol::transport::{self, FramedSend, ALPN_PEER};
use gantry_protocol::{PeerEnvelope, PeerPayload};
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;

/// Messages queued for one peer before new ones are dropped.
pub const PEER_QUEUE_LEN_MAX: usize = 4096;
/// Raft messages sent in one frame at most.
pub const PEER_BATCH_LEN_MAX: usize = 256;
/// A batch stops taking messages once it holds this many encoded bytes, so that a frame stays
/// under the frame limit (4 MiB): Raft sends at most 1 MiB of entries per message unless one
/// entry is larger, and no command is (artifact bytes never enter the log).
pub const PEER_BATCH_BYTES_MAX: usize = 2 * 1024 * 1024;
/// A Raft message that encodes to more than this (a snapshot) is sent alone, in parts of this
/// size, each in its own frame.
pub const PEER_PART_BYTES: usize = 1024 * 1024;
const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(2);

enum Outgoing {
    Raft(Message),
    Status { applied_index: u64 },
}

struct Link {
    addr: String,
    queue: mpsc::Sender<Outgoing>,
    task: tokio::task::JoinHandle<()>,
}

pub struct PeerTransport {
    self_id: u64,
    credentials: NodeCredentials,
    events: Handle,
    links: BTreeMap<u64, Link>,
}

impl Drop for PeerTransport {
    fn drop(&mut self) {
        for link in self.links.values() {
            link.task.abort();
        }
    }
}

impl PeerTransport {
    pub fn new(self_id: u64, credentials: NodeCredentials, events: Handle) -> Self {
        Self {
            self_id,
            credentials,
            events,
            links: BTreeMap::new(),
        }
    }

    /// Opens links to new members, closes links to removed ones, and re-opens a link whose
    /// address changed.
    pub fn set_members(&mut self, members: &BTreeMap<u64, Member>) {
        self.links.retain(|id, link| {
            let keep = members.get(id).is_some_and(|m| m.quic_addr == link.addr);
            if !keep {
                link.task.abort();
            }
            keep
        });
        for (&id, member) in members {
            if id == self.self_id || self.links.contains_key(&id) {
                continue;
            }
            let (queue, receiver) = mpsc::channel(PEER_QUEUE_LEN_MAX);
            let task = tokio::spawn(run_link(
                self.self_id,
                id,
                member.quic_addr.clone(),
                self.credentials.clone(),
                receiver,
                self.events.clone(),
            ));
            self.links.insert(
                id,
                Link {
                    addr: member.quic_addr.clone(),
                    queue,
                    task,
                },
            );
        }
    }

    /// Queues messages; never waits. Returns the ids of peers whose snapshots could not even be
    /// queued (to report to raft).
    pub fn send(&mut self, messages: Vec<Message>) -> Vec<u64> {
        let mut failed_snapshots = Vec::new();
        for message in messages {
            let to = message.to;
            let is_snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            let queued = self
                .links
                .get(&to)
                .is_some_and(|link| link.queue.try_send(Outgoing::Raft(message)).is_ok());
            if !queued && is_snapshot {
                failed_snapshots.push(to);
            }
        }
        failed_snapshots
    }

    pub fn broadcast_status(&mut self, applied_index: u64) {
        for link in self.links.values() {
            let _ = link.queue.try_send(Outgoing::Status { applied_index });
        }
    }
}

async fn connect(
    addr: &str,
    credentials: &NodeCredentials,
) -> Result<(quinn::Endpoint, quinn::Connection, FramedSend), String> {
    let remote = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolved to nothing"))?;
    let tls = tls::client_config(credentials, ALPN_PEER).map_err(|e| e.to_string())?;
    let config = transport::quinn_client_config(tls).map_err(|e| e.to_string())?;
    let endpoint = transport::client_endpoint(remote).map_err(|e| e.to_string())?;
    let connecting = endpoint
        .connect_with(config, remote, COORDINATOR_SERVER_NAME)
        .map_err(|e| e.to_string())?;
    let connection = tokio::time::timeout(Duration::from_secs(3), connecting)
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let (send, _recv, _version) = transport::client_hello(&connection, "gantry-coordinator")
        .await
        .map_err(|e| e.to_string())?;
    Ok((endpoint, connection, send))
}

async fn report_snapshots(events: &Handle, batch: &[Message], delivered: bool) {
    for message in batch
        .iter()
        .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
    {
        let _ = events
            .send(Event::SnapshotReport {
                to: message.to,
                delivered,
            })
            .await;
    }
}

async fn run_link(
    self_id: u64,
    peer_id: u64,
    addr: String,
    credentials: NodeCredentials,
    mut queue: mpsc::Receiver<Outgoing>,
    events: Handle,
) {
    let mut delay = Duration::from_millis(50);
    loop {
        let (_endpoint, connection, mut send) = match connect(&addr, &credentials).await {
            Ok(opened) => opened,
            Err(reason) => {
                tracing::debug!(peer = peer_id, %addr, "cannot reach peer: {reason}");
                let _ = events.send(Event::Unreachable { to: peer_id }).await;
                // What queued meanwhile is stale; raft will resend what still matters.
                let mut dropped = Vec::new();
                while let Ok(outgoing) = queue.try_recv() {
                    if let Outgoing::Raft(message) = outgoing {
                        dropped.push(message);
                    }
                }
                report_snapshots(&events, &dropped, false).await;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RECONNECT_DELAY_MAX);
                continue;
            }
        };
        delay = Duration::from_millis(50);
        tracing::debug!(peer = peer_id, %addr, "connected to peer");
        loop {
            let Some(first) = queue.recv().await else {
                connection.close(0u32.into(), b"peer removed");
                return;
            };
            let mut raft = Vec::new();
            let mut raft_bytes = 0usize;
            let mut status = None;
            let mut next = Some(first);
            while let Some(outgoing) = next.take() {
                match outgoing {
                    Outgoing::Raft(message) => {
                        raft_bytes += message.compute_size() as usize;
                        raft.push(message);
                    }
                    Outgoing::Status { applied_index } => status = Some(applied_index),
                }
                if raft.len() < PEER_BATCH_LEN_MAX && raft_bytes < PEER_BATCH_BYTES_MAX {
                    next = queue.try_recv().ok();
                }
            }
            let mut result = Ok(());
            let encoded = raft
                .iter()
                .map(|m| m.write_to_bytes().expect("raft messages encode"))
                .collect();
            for payload in payloads(encoded) {
                let envelope = PeerEnvelope {
                    from_node: self_id,
                    to_node: peer_id,
                    payload,
                };
                result = send.send(&envelope).await;
                if result.is_err() {
                    break;
                }
            }
            if let (Ok(()), Some(applied_index)) = (&result, status) {
                let envelope = PeerEnvelope {
                    from_node: self_id,
                    to_node: peer_id,
                    payload: PeerPayload::Status { applied_index },
                };
                result = send.send(&envelope).await;
            }
            report_snapshots(&events, &raft, result.is_ok()).await;
            if let Err(e) = result {
                tracing::debug!(peer = peer_id, "peer connection broke: {e}");
                let _ = events.send(Event::Unreachable { to: peer_id }).await;
                break;
            }
        }
    }
}

/// The frames for a batch of encoded Raft messages, in order: runs of ordinary messages together,
/// and each message larger than [`PEER_PART_BYTES`] alone, in parts.
fn payloads(encoded: Vec<Vec<u8>>) -> Vec<PeerPayload> {
    let mut payloads = Vec::new();
    let mut run = Vec::new();
    for bytes in encoded {
        if bytes.len() <= PEER_PART_BYTES {
            run.push(bytes);
            continue;
        }
        if !run.is_empty() {
            payloads.push(PeerPayload::Raft(std::mem::take(&mut run)));
        }
        let n_parts = bytes.len().div_ceil(PEER_PART_BYTES);
        for (i, part) in bytes.chunks(PEER_PART_BYTES).enumerate() {
            payloads.push(PeerPayload::RaftPart {
                bytes: part.to_vec(),
                last: i + 1 == n_parts,
            });
        }
    }
    if !run.is_empty() {
        payloads.push(PeerPayload::Raft(run));
    }
    payloads
}

/// Joins the parts of a large Raft message as they arrive (see [`PeerPayload::RaftPart`]).
#[derive(Default)]
pub struct Reassembly {
    bytes: Vec<u8>,
}

/// A Raft message sent in parts may hold at most this many bytes (a snapshot of the state).
pub const PEER_MESSAGE_BYTES_MAX: usize = 1 << 30;

impl Reassembly {
    /// Takes one part; returns the whole message's bytes after its last part.
    pub fn push(&mut self, part: Vec<u8>, last: bool) -> Result<Option<Vec<u8>>, String> {
        if self.bytes.len() + part.len() > PEER_MESSAGE_BYTES_MAX {
            return Err(format!(
                "a raft message sent in parts exceeds {PEER_MESSAGE_BYTES_MAX} bytes"
            ));
        }
        self.bytes.extend_from_slice(&part);
        Ok(last.then(|| std::mem::take(&mut self.bytes)))
    }

    /// Whether a message has parts still to come.
    pub fn in_progress(&self) -> bool {
        !self.bytes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_messages_go_alone_in_parts_and_come_back_whole() {
        let small = |n: u8| vec![n; 10];
        let large: Vec<u8> = (0..(PEER_PART_BYTES * 2 + 5)).map(|i| i as u8).collect();
        let frames = payloads(vec![small(1), small(2), large.clone(), small(3)]);
        assert_eq!(frames.len(), 5, "a run, three parts, a run");
        assert!(matches!(&frames[0], PeerPayload::Raft(run) if *run == vec![small(1), small(2)]));
        assert!(matches!(&frames[4], PeerPayload::Raft(run) if *run == vec![small(3)]));
        let mut reassembly = Reassembly::default();
        let mut whole = None;
        for frame in &frames[1..4] {
            let PeerPayload::RaftPart { bytes, last } = frame else {
                panic!("{frame:?}")
            };
            assert!(bytes.len() <= PEER_PART_BYTES);
            assert!(whole.is_none(), "only the last part completes the message");
            whole = reassembly.push(bytes.clone(), *last).unwrap();
        }
        assert_eq!(whole, Some(large));
        assert!(!reassembly.in_progress());
        // Every frame stays under the transport's limit.
        for frame in frames {
            let envelope = PeerEnvelope {
                from_node: 1,
                to_node: 2,
                payload: frame,
            };
            let encoded = gantry_protocol::frame::encode(&envelope).unwrap();
            assert!(encoded.len() < gantry_protocol::FRAME_BYTES_MAX);
        }
    }
}
