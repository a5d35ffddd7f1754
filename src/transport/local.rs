//! The in-process transport: a request is handed straight to the
//! destination agent, and its response straight back to the caller's.

use std::sync::{Arc, Weak};
use std::time::Instant;

use crate::error::{Result, RpcError};

use super::{Dispatch, InRequest, OutRequest, Outcome, ReplySink, Transport};

struct LocalTransport {
    me: usize,
    agents: Arc<[Weak<dyn Dispatch>]>,
}

struct LocalReply {
    caller: Weak<dyn Dispatch>,
    from: usize,
}

/// Transports joining `agents` (in rank order) into one world.
pub(crate) fn world(agents: Vec<Weak<dyn Dispatch>>) -> Vec<Arc<dyn Transport>> {
    let agents: Arc<[Weak<dyn Dispatch>]> = agents.into();
    (0..agents.len())
        .map(|me| {
            Arc::new(LocalTransport {
                me,
                agents: agents.clone(),
            }) as Arc<dyn Transport>
        })
        .collect()
}

impl Transport for LocalTransport {
    fn send_request(&self, dst: usize, request: &OutRequest<'_>) -> Result<()> {
        let Some(target) = self.agents[dst].upgrade() else {
            return Err(RpcError::PeerLost {
                rank: dst,
                reason: "the agent was freed".into(),
            });
        };
        target.on_request(
            InRequest {
                src: self.me,
                id: request.id,
                function: request.function.as_bytes().to_vec(),
                internal: request.internal,
                deadline: request.deadline,
                args: request.args.to_vec(),
                reply_to: Arc::new(LocalReply {
                    caller: self.agents[self.me].clone(),
                    from: dst,
                }),
            },
            None,
        );
        Ok(())
    }

    fn close(&self, _graceful: bool, _deadline: Instant) {}

    fn listen_addr(&self) -> String {
        "local".into()
    }
}

impl ReplySink for LocalReply {
    fn send_reply(&self, id: u64, outcome: Outcome, _more_follow: bool) {
        if let Some(caller) = self.caller.upgrade() {
            caller.on_response(self.from, id, outcome);
        }
    }
}
