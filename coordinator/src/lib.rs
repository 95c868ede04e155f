//! The coordinator: the pure core (liveness now; the state machine and the scheduler with the
//! issues that bring them), and the shells around it: the QUIC endpoint for agents and peers, the
//! HTTP API, and the event loop that owns the state.
//!
//! Architecture invariant: `core` never touches tokio, the network, the disk or a clock. The
//! shells own all I/O and pass time in.

pub mod api;
pub mod core;
pub mod data_dir;
pub mod quic;
pub mod server;

pub use server::{run, CoordinatorConfig, Listeners};
