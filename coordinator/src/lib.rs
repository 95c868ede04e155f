//! The coordinator: the pure core (liveness tracker, replicated state machine), the Raft replica
//! that drives the state machine through raft-rs with its log in redb, and the shells around them:
//! the QUIC endpoint for agents and peers, the peer transport, the HTTP API, and the event loop
//! that owns the state.
//!
//! Architecture invariant: `core` never touches tokio, the network, the disk or a clock. The
//! shells own all I/O and pass time in.

pub mod api;
pub mod artifacts;
pub mod core;
pub mod data_dir;
pub mod join;
pub mod peers;
pub mod quic;
pub mod replica;
pub mod server;

pub use server::{run, run_with, CoordinatorConfig, Listeners, Membership};
