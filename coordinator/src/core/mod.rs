//! The coordinator's pure core: no tokio, no I/O, no clock. Events in, decisions out.

pub mod allocations;
pub mod artifacts;
pub mod liveness;
pub mod scheduler;
pub mod serving;
pub mod state;
pub mod usage;
