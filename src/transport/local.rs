//! The in-process transport: a request is handed straight to the
//! destination agent, and its response straight back to the caller's. It
//! joins the ranks of an in-process world, and carries a process's calls to
//! its own rank (no socket).

use std::sync::{Arc, Weak};
use std::time::Instant;

use crate::error::{Result, RpcError};

use super::{Dispatch, InRequest, OutRequest, Outcome, ReplySink, Transport};

struct LocalTransport {
    me: usize,
    /// The agents it reaches, by rank from `first`: a whole in-process
    /// world (from rank 0), or this rank's own agent alone.
    agents: Arc<[Weak<dyn Dispatch>]>,
    first: usize,
    /// This rank's agent, where responses come back to.
    own: Weak<dyn Dispatch>,
}

impl LocalTransport {
    fn agent(&self, rank: usize) -> Option<&Weak<dyn Dispatch>> {
        rank.checked_sub(self.first).and_then(|i| self.agents.get(i))
    }
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
                first: 0,
                own: agents[me].clone(),
            }) as Arc<dyn Transport>
        })
        .collect()
}

/// The transport of rank `me`'s calls to itself, delivered to `agent`.
pub(crate) fn to_self(me: usize, agent: Weak<dyn Dispatch>) -> Arc<dyn Transport> {
    Arc::new(LocalTransport {
        me,
        agents: Arc::new([agent.clone()]),
        first: me,
        own: agent,
    })
}

impl Transport for LocalTransport {
    fn send_request(&self, dst: usize, request: &OutRequest<'_>) -> Result<()> {
        let Some(target) = self.agent(dst).and_then(Weak::upgrade) else {
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
                    caller: self.own.clone(),
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

    /// `"self"` for this rank; `"local"` for the other ranks of an
    /// in-process world (there is no first connection to wait for).
    fn peer_transport(&self, dst: usize) -> Option<&'static str> {
        match self.agent(dst) {
            Some(_) if dst == self.me => Some("self"),
            Some(_) => Some("local"),
            None => None,
        }
    }
}

impl ReplySink for LocalReply {
    fn send_reply(&self, id: u64, outcome: Outcome, _more_follow: bool) {
        if let Some(caller) = self.caller.upgrade() {
            caller.on_response(self.from, id, outcome);
        }
    }
}
