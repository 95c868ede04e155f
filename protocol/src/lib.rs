//! Everything that crosses a process boundary between agents and coordinators, and between
//! coordinators: the messages, their framing, protocol version negotiation, and the PKI that
//! secures the connections (cluster CA, certificates with roles, join tokens).
//!
//! Architecture invariant: this crate (and the coordinator's HTTP API types module) is the only
//! place that defines a wire format. Internal types elsewhere convert at the boundary. A change to
//! any type here that alters its encoding bumps [`version::PROTOCOL_VERSION`].
//!
//! This crate never decides anything about scheduling or liveness; it only says how bytes look.

pub mod frame;
pub mod jobspec;
pub mod messages;
pub mod pki;
pub mod replicated;
pub mod tls;
pub mod token;
pub mod transport;
pub mod units;
pub mod version;

pub use frame::{FrameDecoder, FrameError, FRAME_BYTES_MAX};
pub use messages::*;
pub use version::{Hello, HelloReply, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};
