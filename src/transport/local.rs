//! The in-process transports: a request is handed straight to the
//! destination agent, and its response straight back to the caller's.
//! `world` joins the ranks of an in-process world; `to_self` carries a
//! process's calls to its own rank (no socket).

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Result, RpcError};

use super::{Dispatch, InRequest, OutRequest, Outcome, Payload, ReplySink, Transport};

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

/// The request as the destination gets it.
fn in_request(src: usize, request: &OutRequest<'_>, inline_here: bool, reply_to: LocalReply) -> InRequest {
    InRequest {
        src,
        id: request.id,
        function: crate::wire::Name::new(request.function.as_bytes()),
        internal: request.internal,
        deadline: request.deadline,
        args: request.args.concat(),
        inline_here,
        reply_to: Arc::new(reply_to),
    }
}

fn freed(rank: usize) -> RpcError {
    RpcError::PeerLost {
        rank,
        reason: "the agent was freed".into(),
    }
}

impl Transport for LocalTransport {
    fn send_request(&self, dst: usize, request: &OutRequest<'_>) -> Result<()> {
        let target = self.agents[dst].upgrade().ok_or_else(|| freed(dst))?;
        let reply_to = LocalReply {
            caller: self.agents[self.me].clone(),
            from: dst,
        };
        target.on_request(in_request(self.me, request, true, reply_to), None);
        Ok(())
    }

    fn send_cancel(&self, dst: usize, id: u64) {
        if let Some(target) = self.agents[dst].upgrade() {
            target.on_cancel(self.me, id);
        }
    }

    fn close(&self, _graceful: bool, _deadline: Instant) {}

    fn listen_addr(&self) -> String {
        "local".into()
    }

    /// `"self"` for this rank, `"local"` for the others (no first
    /// connection to wait for).
    fn peer_transport(&self, dst: usize) -> Option<&'static str> {
        Some(if dst == self.me { "self" } else { "local" })
    }
}

/// A rank's calls to itself, handed to its own agent on the caller's
/// thread. They keep what calls to another rank promise:
/// - a pool handler runs on the pool; an inline one runs on the caller's
///   thread as a nested call (so it is served even when every worker is
///   busy, as the I/O thread serves it over TCP), unless that thread must
///   not block (an inline handler or a completion callback runs on it):
///   then it goes to the pool, so chains of calls never recurse on one
///   stack;
/// - the caller's own memory stays bounded: while the agent's backlog of
///   requests waiting for a worker is full, a call waits for room up to its
///   deadline (`Timeout`), or fails at once with `Busy` where the thread
///   must not block, as with a full send window;
/// - the agent's own requests (barrier, shutdown) are served as the I/O
///   thread serves them, never blocking on a socket.
struct SelfTransport {
    me: usize,
    agent: Weak<dyn Dispatch>,
    /// Signalled when the backlog drains below half (`resume_reading`)
    /// or the agent closes.
    room: Condvar,
    /// True once the agent closed: waiters for room give up.
    room_lock: Mutex<bool>,
}

/// A caller waiting for room in the backlog looks again at least this often
/// (the backlog also drains without crossing the half-full mark).
const ROOM_SLICE: Duration = Duration::from_millis(5);

/// The transport of rank `me`'s calls to itself, delivered to `agent`.
pub(crate) fn to_self(me: usize, agent: Weak<dyn Dispatch>) -> Arc<dyn Transport> {
    Arc::new(SelfTransport {
        me,
        agent,
        room: Condvar::new(),
        room_lock: Mutex::new(false),
    })
}

impl SelfTransport {
    /// Waits while the agent's backlog is full, for a user call the pool
    /// will run (`here`: an inline one runs on this thread, outside the
    /// backlog; the registry is asked only when the backlog is full).
    fn wait_for_room(&self, agent: &Arc<dyn Dispatch>, request: &OutRequest<'_>, here: bool) -> Result<()> {
        if request.internal || !agent.backlog_full() || (here && agent.is_inline(request.function)) {
            return Ok(());
        }
        if !here {
            return Err(RpcError::Busy(format!(
                "call to '{}' on rank {}: this rank's backlog is full and this thread must not wait",
                request.function, self.me
            )));
        }
        let mut closed = self.room_lock.lock();
        while agent.backlog_full() {
            if *closed {
                return Err(RpcError::Shutdown(format!("rank {} is shut down", self.me)));
            }
            let now = Instant::now();
            if request.deadline.is_some_and(|d| d <= now) {
                return Err(RpcError::Timeout(format!(
                    "call to '{}' on rank {} timed out waiting for room in its backlog",
                    request.function, self.me
                )));
            }
            let slice = request.deadline.map_or(ROOM_SLICE, |d| (d - now).min(ROOM_SLICE));
            self.room.wait_for(&mut closed, slice);
        }
        Ok(())
    }
}

impl Transport for SelfTransport {
    fn send_request(&self, dst: usize, request: &OutRequest<'_>) -> Result<()> {
        let target = self.agent.upgrade().ok_or_else(|| freed(dst))?;
        // An inline function is served here and now where this thread may
        // block; anything else is queued for the pool, which the backlog bounds.
        let here = crate::threads::may_block();
        self.wait_for_room(&target, request, here)?;
        let reply_to = LocalReply {
            caller: self.agent.clone(),
            from: dst,
        };
        let request = in_request(self.me, request, here, reply_to);
        crate::threads::must_not_block(|| target.on_request(request, None));
        Ok(())
    }

    fn send_cancel(&self, _dst: usize, id: u64) {
        if let Some(target) = self.agent.upgrade() {
            target.on_cancel(self.me, id);
        }
    }

    fn close(&self, _graceful: bool, _deadline: Instant) {
        *self.room_lock.lock() = true;
        self.room.notify_all();
    }

    fn listen_addr(&self) -> String {
        "self".into()
    }

    fn peer_transport(&self, _dst: usize) -> Option<&'static str> {
        Some("self")
    }

    fn resume_reading(&self) {
        let _guard = self.room_lock.lock();
        self.room.notify_all();
    }
}

impl ReplySink for LocalReply {
    fn send_reply(&self, id: u64, outcome: Outcome, _more_follow: bool) {
        if let Some(caller) = self.caller.upgrade() {
            caller.on_response(self.from, id, outcome.map(Payload::into_vec));
        }
    }
}
