//! Protocol version negotiation.
//!
//! The ALPN identifier of a connection says its purpose (agent session, join, peer coordinator).
//! The first frame on a connection's first stream is a [`Hello`] with the range of versions the
//! client speaks; the server answers a [`HelloReply`] naming the version both will use, or refusing
//! with both ranges in the message. `Hello` and `HelloReply` are frozen: their encoding never
//! changes, so peers of any version can always read each other's refusal.

use serde::{Deserialize, Serialize};

/// The version this build speaks best.
pub const PROTOCOL_VERSION: u16 = 4;
/// The oldest version this build still speaks. Versions 1 to 3 (before the container runtimes
/// reported image digests, Kubernetes agents their node changes, and a refused join could say
/// `ErrorCode::Unavailable`) were never released, so they are not kept.
pub const PROTOCOL_VERSION_MIN: u16 = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version_min: u16,
    pub version_max: u16,
    /// Free text for logs ("gantry-agent 0.1.0").
    pub software: String,
}

impl Hello {
    pub fn current(software: impl Into<String>) -> Self {
        Self {
            version_min: PROTOCOL_VERSION_MIN,
            version_max: PROTOCOL_VERSION,
            software: software.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Accepted { version: u16 },
    Refused { message: String },
}

/// The server side of negotiation: the highest version both speak, or a refusal naming both
/// ranges.
pub fn negotiate(client: &Hello, server_min: u16, server_max: u16) -> HelloReply {
    let version = client.version_max.min(server_max);
    if version < client.version_min.max(server_min) {
        return HelloReply::Refused {
            message: format!(
                "protocol version mismatch: {} speaks versions {}..={}, this coordinator speaks {}..={}",
                client.software, client.version_min, client.version_max, server_min, server_max
            ),
        };
    }
    HelloReply::Accepted { version }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(min: u16, max: u16) -> Hello {
        Hello {
            version_min: min,
            version_max: max,
            software: "gantry-agent 9".into(),
        }
    }

    #[test]
    fn picks_the_highest_common_version() {
        assert_eq!(
            negotiate(&hello(1, 3), 1, 2),
            HelloReply::Accepted { version: 2 }
        );
        assert_eq!(
            negotiate(&hello(2, 2), 1, 2),
            HelloReply::Accepted { version: 2 }
        );
    }

    #[test]
    fn refusal_names_both_ranges() {
        let HelloReply::Refused { message } = negotiate(&hello(3, 4), 1, 2) else {
            panic!("expected a refusal")
        };
        assert!(message.contains("3..=4"), "{message}");
        assert!(message.contains("1..=2"), "{message}");
    }
}
