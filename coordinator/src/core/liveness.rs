//! The liveness tracker: which agents are `ready` and which are `down`, from heartbeats and the
//! passage of time. Pure: the caller passes `now_ms` (a monotonic clock reading) with every event.
//!
//! Architecture invariant: heartbeats never leave this tracker; only the transitions it returns
//! are worth recording (and, once the coordinator is replicated, proposing to Raft).

use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    Ready,
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub agent_id: String,
    pub status: AgentStatus,
    pub at_ms: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    last_heard_ms: u64,
    ttl_ms: u64,
    status: AgentStatus,
}

#[derive(Debug, Default)]
pub struct LivenessTracker {
    agents: BTreeMap<String, Entry>,
}

impl LivenessTracker {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn status(&self, agent_id: &str) -> Option<AgentStatus> {
        self.agents.get(agent_id).map(|entry| entry.status)
    }

    /// Milliseconds since the agent was last heard from.
    pub fn silence_ms(&self, agent_id: &str, now_ms: u64) -> Option<u64> {
        self.agents
            .get(agent_id)
            .map(|entry| now_ms.saturating_sub(entry.last_heard_ms))
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// An agent (re)registered. Returns its transition to `ready` if it was not already.
    pub fn handle_register(
        &mut self,
        agent_id: &str,
        ttl_ms: u64,
        now_ms: u64,
    ) -> Option<Transition> {
        let previous = self.agents.insert(
            agent_id.to_string(),
            Entry {
                last_heard_ms: now_ms,
                ttl_ms,
                status: AgentStatus::Ready,
            },
        );
        match previous {
            Some(entry) if entry.status == AgentStatus::Ready => None,
            _ => Some(Transition {
                agent_id: agent_id.to_string(),
                status: AgentStatus::Ready,
                at_ms: now_ms,
            }),
        }
    }

    /// A heartbeat arrived. An unknown agent must register first: its heartbeat is ignored.
    pub fn handle_heartbeat(&mut self, agent_id: &str, now_ms: u64) -> Option<Transition> {
        let entry = self.agents.get_mut(agent_id)?;
        entry.last_heard_ms = entry.last_heard_ms.max(now_ms);
        if entry.status == AgentStatus::Down {
            entry.status = AgentStatus::Ready;
            return Some(Transition {
                agent_id: agent_id.to_string(),
                status: AgentStatus::Ready,
                at_ms: now_ms,
            });
        }
        None
    }

    /// Agents whose silence has passed their TTL, in id order, each reported once.
    pub fn poll_transitions(&mut self, now_ms: u64) -> Vec<Transition> {
        let mut transitions = Vec::new();
        for (agent_id, entry) in &mut self.agents {
            if entry.status == AgentStatus::Ready
                && now_ms.saturating_sub(entry.last_heard_ms) > entry.ttl_ms
            {
                entry.status = AgentStatus::Down;
                transitions.push(Transition {
                    agent_id: agent_id.clone(),
                    status: AgentStatus::Down,
                    at_ms: now_ms,
                });
            }
        }
        transitions
    }

    /// The earliest time at which [`Self::poll_transitions`] could report something.
    pub fn poll_deadline_ms(&self) -> Option<u64> {
        self.agents
            .values()
            .filter(|entry| entry.status == AgentStatus::Ready)
            .map(|entry| entry.last_heard_ms + entry.ttl_ms + 1)
            .min()
    }

    /// Treats every agent as heard from at `now_ms`: a newly elected leader calls this so that an
    /// election never turns into a wave of false "down".
    pub fn grant_grace(&mut self, now_ms: u64) {
        for entry in self.agents.values_mut() {
            entry.last_heard_ms = entry.last_heard_ms.max(now_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(transitions: &[Transition]) -> Vec<(&str, AgentStatus)> {
        transitions
            .iter()
            .map(|t| (t.agent_id.as_str(), t.status))
            .collect()
    }

    #[test]
    fn silent_past_ttl_is_down_and_a_heartbeat_brings_it_back() {
        let mut tracker = LivenessTracker::new();
        assert!(tracker.handle_register("a", 15_000, 0).is_some());
        assert!(
            tracker.poll_transitions(15_000).is_empty(),
            "exactly at the TTL is still ready"
        );
        assert_eq!(
            ids(&tracker.poll_transitions(15_001)),
            vec![("a", AgentStatus::Down)]
        );
        assert!(
            tracker.poll_transitions(20_000).is_empty(),
            "down is reported once"
        );
        let back = tracker.handle_heartbeat("a", 21_000).unwrap();
        assert_eq!(back.status, AgentStatus::Ready);
        assert_eq!(tracker.status("a"), Some(AgentStatus::Ready));
    }

    #[test]
    fn heartbeats_keep_an_agent_ready() {
        let mut tracker = LivenessTracker::new();
        tracker.handle_register("a", 15_000, 0);
        for now_ms in (3_000..60_000).step_by(3_000) {
            assert!(tracker.handle_heartbeat("a", now_ms).is_none());
            assert!(tracker.poll_transitions(now_ms).is_empty());
        }
    }

    #[test]
    fn transitions_come_out_in_id_order() {
        let mut tracker = LivenessTracker::new();
        for id in ["c", "a", "b"] {
            tracker.handle_register(id, 10, 0);
        }
        assert_eq!(
            ids(&tracker.poll_transitions(11)),
            vec![
                ("a", AgentStatus::Down),
                ("b", AgentStatus::Down),
                ("c", AgentStatus::Down)
            ]
        );
    }

    #[test]
    fn grace_gives_every_agent_a_full_ttl() {
        let mut tracker = LivenessTracker::new();
        tracker.handle_register("a", 15_000, 0);
        tracker.grant_grace(14_000);
        assert!(tracker.poll_transitions(29_000).is_empty());
        assert_eq!(tracker.poll_deadline_ms(), Some(29_001));
        assert_eq!(tracker.poll_transitions(29_001).len(), 1);
    }

    #[test]
    fn unknown_agents_heartbeats_are_ignored() {
        let mut tracker = LivenessTracker::new();
        assert!(tracker.handle_heartbeat("ghost", 5).is_none());
        assert!(tracker.is_empty());
    }
}
