//! The coordinator's pure core: no tokio, no I/O, no clock. Events in, decisions out.

pub mod liveness;
pub mod state;
