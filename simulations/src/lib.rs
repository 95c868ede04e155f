//! Deterministic simulations: the real coordinator core and the real raft-rs replicas, driven over
//! a simulated network, clock and disk from one seed, with invariants checked at every step.
//! A failure prints its seed; the same seed replays the same run exactly.
//!
//! Architecture invariant: nothing here reads a real clock or draws unseeded randomness.

pub mod cluster;
pub mod liveness;

/// A small seeded generator (SplitMix64): the same seed gives the same run everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
