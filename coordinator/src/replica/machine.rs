//! The replicated state machine as the replica sees it: log bytes in, outcomes out.

use super::StateMachine;
use crate::core::state::{Outcome, State};
use gantry_protocol::replicated::{self, Command, MemberChange};
use raft::eraftpb::{ConfChange, ConfChangeType};

impl StateMachine for State {
    type Outcome = Outcome;

    fn apply(&mut self, index: u64, data: &[u8]) -> (Option<u64>, Outcome) {
        match replicated::decode::<Command>(data) {
            Ok(command) => (
                Some(command.request_id),
                State::apply(self, index, &command),
            ),
            Err(e) => (
                None,
                self.skip(index, format!("entry {index} does not decode: {e}")),
            ),
        }
    }

    fn apply_conf_change(&mut self, index: u64, change: &ConfChange) -> (Option<u64>, Outcome) {
        let added = matches!(
            change.get_change_type(),
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode
        );
        match replicated::decode::<MemberChange>(&change.context) {
            Ok(member) => (
                Some(member.request_id),
                self.apply_member_change(index, added, &member),
            ),
            // A change proposed without context (a promotion) leaves the member table as it is.
            Err(_) if added => (
                None,
                Outcome::MemberAdded {
                    node_id: change.node_id,
                },
            ),
            Err(_) => {
                let member = MemberChange {
                    request_id: 0,
                    node_id: change.node_id,
                    quic_addr: String::new(),
                    http_addr: String::new(),
                };
                (None, self.apply_member_change(index, false, &member))
            }
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        self.encode_snapshot()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), String> {
        *self = State::decode_snapshot(data)?;
        Ok(())
    }
}
