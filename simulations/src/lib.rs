//! The deterministic simulator: the real coordinator core (and, with the Raft issue, the real
//! raft-rs node and state machine) driven over a simulated network, clock, disk and fleet from one
//! seed, with invariants checked at every step. Today it holds the liveness scenario below; the
//! Raft issue grows it into the fault-injecting cluster simulation the design describes.
//!
//! Architecture invariant: nothing here reads a real clock or draws unseeded randomness.

use gantry_coordinator::core::liveness::{AgentStatus, LivenessTracker};

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

/// Agents heartbeat with jitter over a lossy link and sometimes crash; the tracker must report an
/// agent down exactly when it has been silent past its TTL, and ready whenever it was just heard.
/// Returns the number of down transitions seen, so a caller can check the run did something.
pub fn liveness_under_loss(seed: u64, n_agents: usize, steps: usize) -> Result<usize, String> {
    let mut rng = Rng::new(seed);
    let ttl_ms = 1_000;
    let mut tracker = LivenessTracker::new();
    let mut last_heard = vec![0u64; n_agents];
    let mut crashed = vec![false; n_agents];
    for (agent_idx, heard) in last_heard.iter_mut().enumerate() {
        tracker.handle_register(&format!("agent-{agent_idx:03}"), ttl_ms, 0);
        *heard = 0;
    }
    let mut downs = 0;
    let mut now_ms = 0;
    for _ in 0..steps {
        now_ms += 1 + rng.below(100);
        let agent_idx = rng.below(n_agents as u64) as usize;
        match rng.below(100) {
            0..=1 => crashed[agent_idx] = !crashed[agent_idx],
            2..=30 => {} // the heartbeat was lost
            _ if !crashed[agent_idx] => {
                tracker.handle_heartbeat(&format!("agent-{agent_idx:03}"), now_ms);
                last_heard[agent_idx] = now_ms;
            }
            _ => {}
        }
        for transition in tracker.poll_transitions(now_ms) {
            downs += 1;
            let idx: usize = transition.agent_id["agent-".len()..]
                .parse()
                .map_err(|e| format!("{e}"))?;
            if now_ms - last_heard[idx] <= ttl_ms {
                return Err(format!(
                    "seed {seed}: {} reported down {} ms after it was heard",
                    transition.agent_id,
                    now_ms - last_heard[idx]
                ));
            }
        }
        for (idx, &heard) in last_heard.iter().enumerate() {
            let status = tracker.status(&format!("agent-{idx:03}"));
            let silent_past_ttl = now_ms - heard > ttl_ms;
            let expected = if silent_past_ttl {
                AgentStatus::Down
            } else {
                AgentStatus::Ready
            };
            if status != Some(expected) {
                return Err(format!("seed {seed} at {now_ms} ms: agent-{idx:03} is {status:?}, expected {expected:?}"));
            }
        }
    }
    Ok(downs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_is_exact_under_loss_and_crashes_for_many_seeds() {
        let mut total_downs = 0;
        for seed in 0..200 {
            match liveness_under_loss(seed, 20, 2_000) {
                Ok(downs) => total_downs += downs,
                Err(failure) => panic!("{failure} (replay: liveness_under_loss({seed}, 20, 2000))"),
            }
        }
        assert!(
            total_downs > 0,
            "the faults never made an agent go down: the scenario tests nothing"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_run() {
        assert_eq!(
            liveness_under_loss(7, 10, 500),
            liveness_under_loss(7, 10, 500)
        );
    }
}
