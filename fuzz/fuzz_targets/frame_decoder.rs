//! Feeds arbitrary bytes, split at arbitrary points, to the frame decoder and decodes every whole
//! frame as each message type a coordinator or agent reads from the network. Nothing may panic,
//! and no frame over the limit may be returned.
#![no_main]

use gantry_protocol::frame::{decode_body, FrameDecoder};
use gantry_protocol::{AgentMessage, CoordinatorMessage, Hello, JoinRequest, JoinResponse, PeerEnvelope};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let chunk = usize::from(split).max(1);
    let mut decoder = FrameDecoder::new(LIMIT);
    for piece in rest.chunks(chunk) {
        decoder.handle_bytes(piece);
        loop {
            match decoder.poll_frame() {
                Ok(Some(body)) => {
                    assert!(body.len() <= LIMIT);
                    let _ = decode_body::<Hello>(&body);
                    let _ = decode_body::<AgentMessage>(&body);
                    let _ = decode_body::<CoordinatorMessage>(&body);
                    let _ = decode_body::<JoinRequest>(&body);
                    let _ = decode_body::<JoinResponse>(&body);
                    let _ = decode_body::<PeerEnvelope>(&body);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
