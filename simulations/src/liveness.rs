//! The liveness tracker under heartbeat loss and agent crashes.

use crate::Rng;
use gantry_coordinator::core::liveness::{AgentStatus, LivenessTracker};

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
