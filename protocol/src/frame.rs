//! Length-prefixed frames: a 4-byte big-endian length, then that many bytes of postcard.
//!
//! The decoder is sans-IO: bytes in, whole frames out. A length over the limit is an error the
//! moment its prefix is read, before any of the body is buffered, so a peer cannot make us
//! allocate more than the limit.

use serde::{de::DeserializeOwned, Serialize};

/// Hard upper bound on one frame's body. A register message from an agent fronting a large
/// Kubernetes cluster (thousands of nodes) stays well under this.
pub const FRAME_BYTES_MAX: usize = 4 * 1024 * 1024;

const LENGTH_PREFIX_BYTES: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len_bytes} bytes exceeds the limit of {max_bytes} bytes")]
    TooLarge { len_bytes: usize, max_bytes: usize },
    #[error("frame body could not be decoded: {0}")]
    Decode(String),
    #[error("message could not be encoded: {0}")]
    Encode(String),
}

/// Encodes `message` as one frame (prefix and body).
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; LENGTH_PREFIX_BYTES];
    let mut out = postcard::to_extend(message, std::mem::take(&mut out))
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let len_bytes = out.len() - LENGTH_PREFIX_BYTES;
    if len_bytes > FRAME_BYTES_MAX {
        return Err(FrameError::TooLarge {
            len_bytes,
            max_bytes: FRAME_BYTES_MAX,
        });
    }
    out[..LENGTH_PREFIX_BYTES].copy_from_slice(&(len_bytes as u32).to_be_bytes());
    Ok(out)
}

/// Decodes one frame body (without its prefix).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(body).map_err(|e| FrameError::Decode(e.to_string()))
}

/// Reads the length a prefix announces, refusing it if it is over `max_bytes`.
pub fn parse_length_prefix(prefix: [u8; 4], max_bytes: usize) -> Result<usize, FrameError> {
    let len_bytes = u32::from_be_bytes(prefix) as usize;
    if len_bytes > max_bytes {
        return Err(FrameError::TooLarge {
            len_bytes,
            max_bytes,
        });
    }
    Ok(len_bytes)
}

/// Accumulates bytes from a stream and yields whole frame bodies.
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    max_bytes: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(FRAME_BYTES_MAX)
    }
}

impl FrameDecoder {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            buffer: Vec::new(),
            max_bytes,
        }
    }

    /// Bytes received and not yet returned as a frame.
    pub fn buffered_bytes(&self) -> usize {
        self.buffer.len()
    }

    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole frame body, `Ok(None)` if more bytes are needed, or an error after which
    /// the stream must be closed (framing is lost).
    pub fn poll_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        if self.buffer.len() < LENGTH_PREFIX_BYTES {
            return Ok(None);
        }
        let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
        prefix.copy_from_slice(&self.buffer[..LENGTH_PREFIX_BYTES]);
        let len_bytes = parse_length_prefix(prefix, self.max_bytes)?;
        if self.buffer.len() < LENGTH_PREFIX_BYTES + len_bytes {
            return Ok(None);
        }
        let body = self.buffer[LENGTH_PREFIX_BYTES..LENGTH_PREFIX_BYTES + len_bytes].to_vec();
        self.buffer.drain(..LENGTH_PREFIX_BYTES + len_bytes);
        Ok(Some(body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_split_across_reads_come_out_whole() {
        let a = encode(&"first".to_string()).unwrap();
        let b = encode(&"second".to_string()).unwrap();
        let stream: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
        let mut decoder = FrameDecoder::default();
        let mut out = Vec::new();
        for byte in stream {
            decoder.handle_bytes(&[byte]);
            while let Some(body) = decoder.poll_frame().unwrap() {
                out.push(decode_body::<String>(&body).unwrap());
            }
        }
        assert_eq!(out, vec!["first", "second"]);
        assert_eq!(decoder.buffered_bytes(), 0);
    }

    #[test]
    fn oversized_prefix_is_refused_before_the_body_arrives() {
        let mut decoder = FrameDecoder::new(16);
        decoder.handle_bytes(&17u32.to_be_bytes());
        assert_eq!(
            decoder.poll_frame(),
            Err(FrameError::TooLarge {
                len_bytes: 17,
                max_bytes: 16
            })
        );
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut decoder = FrameDecoder::new(1024);
            decoder.handle_bytes(&bytes);
            while let Ok(Some(body)) = decoder.poll_frame() {
                let _ = decode_body::<crate::messages::AgentMessage>(&body);
                let _ = decode_body::<crate::messages::CoordinatorMessage>(&body);
            }
        }
    }
}
