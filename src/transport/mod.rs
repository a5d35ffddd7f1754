//! How frames move between ranks. The agent talks only to [`Transport`] (out)
//! and is called back through [`Dispatch`] (in); `local` carries frames
//! between agents of one process, `tcp` between processes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Result, Status};

pub(crate) mod local;
pub(crate) mod tcp;

/// A request on its way out.
pub(crate) struct OutRequest<'a> {
    pub id: u64,
    pub function: &'a str,
    pub internal: bool,
    /// Time left to the caller's deadline (`None`: no deadline).
    pub timeout: Option<Duration>,
    /// That deadline on this rank's clock.
    pub deadline: Option<Instant>,
    /// The arguments, in parts (their concatenation is what the handler
    /// gets): sent from where they are, or copied where they must wait.
    pub args: &'a [&'a [u8]],
    /// The caller waits for the reply right away (and so may read it itself).
    pub will_wait: bool,
    /// Calls in flight to the destination, this one included, as it started.
    pub in_flight: usize,
}

/// Bytes in `parts` (a request's arguments, a frame's pieces), together.
pub(crate) fn total_len(parts: &[&[u8]]) -> usize {
    parts.iter().map(|p| p.len()).sum()
}

/// A request that arrived.
pub(crate) struct InRequest {
    pub src: usize,
    pub id: u64,
    /// The name (UTF-8, which the transport checked), kept as bytes: it is
    /// looked up as they are.
    pub function: crate::wire::Name,
    pub internal: bool,
    /// The caller's deadline on this rank's clock.
    pub deadline: Option<Instant>,
    pub args: Vec<u8>,
    /// An inline function's handler may run on the thread delivering the
    /// request (an I/O thread, or a caller calling its own rank); false for
    /// a rank's call to itself from a thread that must not block (inside an
    /// inline handler or a callback), which goes to a worker instead of
    /// recursing.
    pub inline_here: bool,
    pub reply_to: Arc<dyn ReplySink>,
}

impl InRequest {
    /// The function name, for messages.
    pub fn name(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.function)
    }
}

/// The outcome a destination sends back: the reply bytes, or a status and
/// message.
pub(crate) type Outcome = std::result::Result<Payload, (Status, String)>;

/// A response as its caller gets it.
pub(crate) type Response = std::result::Result<Vec<u8>, (Status, String)>;

/// Bytes the application lends the library to send (a reply set with
/// `rpcagent_reply_set_owned`): read where they are; dropping the value
/// gives them back (the application's release runs).
pub(crate) trait Lent: Send {
    fn bytes(&self) -> &[u8];
}

/// A reply's bytes: the library's own, or lent by the application.
pub(crate) enum Payload {
    Owned(Vec<u8>),
    Lent(Box<dyn Lent>),
}

impl Payload {
    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            Payload::Owned(v) => v,
            Payload::Lent(l) => l.bytes(),
        }
    }

    /// The bytes as the library's own (lent ones are copied, then given back).
    pub(crate) fn into_vec(self) -> Vec<u8> {
        match self {
            Payload::Owned(v) => v,
            Payload::Lent(l) => l.bytes().to_vec(),
        }
    }
}

/// Where the response to one request goes.
pub(crate) trait ReplySink: Send + Sync {
    /// Sends the response to request `id`; a reply that can no longer be
    /// delivered (the caller is gone) is dropped. `more_follow`: the
    /// sending thread has more requests to answer right away, so the reply
    /// may wait for their company in one write (it leaves at the latest
    /// when [`Transport::flush_batches`] runs, or within about a
    /// millisecond).
    fn send_reply(&self, id: u64, outcome: Outcome, more_follow: bool);

    /// Whether the caller marked request `id` cancelled where this side
    /// sees it without reading (shared memory), ahead of the cancel's
    /// frame: a polling handler learns of it at its next poll even while
    /// the reader sleeps.
    fn cancel_marked(&self, _id: u64) -> bool {
        false
    }
}

/// Carries requests out of one agent. An agent may hold several (the
/// process transport and the self transport), each carrying the calls to
/// the ranks [`Transports`] routes to it; everything here is per
/// destination or per transport, never for the whole world at once.
pub(crate) trait Transport: Send + Sync {
    /// Sends a request to `dst`; responses come back through
    /// [`Dispatch::on_response`]. An error means the request did not leave.
    fn send_request(&self, dst: usize, request: &OutRequest<'_>) -> Result<()>;

    /// Tells `dst` that this rank cancelled its call `id` (already failed
    /// here). Never blocks; a cancel that cannot leave is dropped (the
    /// destination answers into the void at worst).
    fn send_cancel(&self, dst: usize, id: u64);

    /// Closes every connection. `graceful`: queued frames are flushed first
    /// (until `deadline`) and peers are told it is on purpose.
    fn close(&self, graceful: bool, deadline: Instant);

    /// The address other ranks reach this one at (for logs).
    fn listen_addr(&self) -> String;

    /// How calls to `dst` travel, as `rpcagent_peer_transport` names it
    /// (`"tcp"`, `"self"`, ...), or `None` before this rank's first call to
    /// `dst`.
    fn peer_transport(&self, dst: usize) -> Option<&'static str>;

    /// Called by a caller about to wait for a reply from `dst`: the
    /// transport may use the caller's thread to read that reply itself until
    /// `done()` or `deadline`, instead of waking it from another thread.
    /// Answered, it may leave the connection parked for this thread.
    fn drive(&self, _dst: usize, _waiting: Waiting<'_>, _done: &dyn Fn() -> bool, _deadline: Option<Instant>) {}

    /// Ends the parkings `drive` left for this thread (it is about to sleep).
    fn unpark_mine(&self) {}

    /// The pool's backlog fell below half full: connections whose reading
    /// stopped for it are read again.
    fn resume_reading(&self) {}

    /// Writes every frame held back to share a write with others (a thread
    /// is about to wait, or a worker ran out of work).
    fn flush_batches(&self) {}

    /// The calling thread is about to wait: if it serves requests in place
    /// for this transport's I/O loop, the loop moves to another thread
    /// first (the wait may be for what only the loop would read).
    fn leave_in_place(&self) {}
}

/// What a caller driving a connection waits for.
#[derive(Clone, Copy)]
pub(crate) enum Waiting<'a> {
    /// Its own reply: it reads the connection only when that reply is the
    /// one expected (with more in flight the I/O thread reads them in
    /// batches, and reading here would only move that work).
    OwnReply,
    /// Whichever reply comes (`wait_any`, a completion queue): it reads
    /// whatever is in flight, so a busy pipeline's completions are taken
    /// on the waiting thread with no wake-up from the I/O thread. `covers()`:
    /// how many of the calls still in flight the waiter will come back for
    /// (its pending entries, or calls attached to its queue); when no others
    /// are in flight to this destination, it may park the connection once
    /// answered (see `Conn::end_lead_parked`).
    AnyReply { covers: &'a dyn Fn() -> usize },
}

/// An agent's transports and the one that carries calls to each rank.
pub(crate) struct Transports {
    all: Vec<Arc<dyn Transport>>,
    /// Per destination rank: its transport's index in `all`.
    route: Vec<u8>,
}

impl Transports {
    /// One transport for every rank of a world of `world_size`.
    pub(crate) fn single(transport: Arc<dyn Transport>, world_size: usize) -> Transports {
        Transports {
            all: vec![transport],
            route: vec![0; world_size],
        }
    }

    /// `others` for every rank of a world of `world_size` but `me`, whose
    /// calls to itself go through `to_self`.
    pub(crate) fn with_self(
        others: Arc<dyn Transport>,
        to_self: Arc<dyn Transport>,
        me: usize,
        world_size: usize,
    ) -> Transports {
        let mut route = vec![0; world_size];
        route[me] = 1;
        Transports {
            all: vec![others, to_self],
            route,
        }
    }

    /// The transport that carries calls to `dst` (a rank of the world).
    pub(crate) fn to(&self, dst: usize) -> &Arc<dyn Transport> {
        &self.all[self.route[dst] as usize]
    }

    /// Every transport, in the order they were given.
    pub(crate) fn all(&self) -> &[Arc<dyn Transport>] {
        &self.all
    }
}

/// Pool requests a read pass kept for its own thread to serve: no wake-up
/// and no queue between reading a request and running it. Quick ones the
/// I/O loop serves in place, staying the loop; others once it has handed
/// its reading on to an idle thread. The agent decides what is kept and how
/// it is served; the transport only says where.
pub(crate) trait Kept: Send + 'static {
    /// Whether the kept requests' handlers have all been quick of late: an
    /// I/O loop serves them in place rather than first moving to another
    /// thread.
    fn quick(&self) -> bool;
    /// Serves the kept requests on this thread, in order, after queueing
    /// those it keeps for the pool. The agent takes back the rest if one
    /// of them stalls, and then calls `escape` (given by an I/O loop that
    /// serves them in place), from another thread, to move the loop on.
    fn serve_here(self: Box<Self>, escape: Option<Escape>);
    /// Queues them all on the pool, in order: no idle thread was there to
    /// take the reading on.
    fn queue_all(self: Box<Self>);
    /// For the agent to add to what it kept.
    fn as_any(&mut self) -> &mut dyn std::any::Any;
}

/// Moves an I/O loop that serves kept requests in place to another thread
/// (one of them stalled): see [`Kept::serve_here`].
pub(crate) type Escape = Box<dyn FnOnce() + Send>;

/// What one read pass of an I/O thread leaves behind: the requests for
/// the pool it kept (for its own thread, or to queue at the pass's end).
#[derive(Default)]
pub(crate) struct ReadPass {
    kept: Option<Box<dyn Kept>>,
}

impl ReadPass {
    /// True until the pass meets a request for the pool.
    pub(crate) fn is_empty(&self) -> bool {
        self.kept.is_none()
    }

    /// What the pass kept, made by `make` on its first request (the agent
    /// always keeps its own type, so the cast always succeeds).
    pub(crate) fn kept<K: Kept>(&mut self, make: impl FnOnce() -> K) -> &mut K {
        self.kept
            .get_or_insert_with(|| Box::new(make()))
            .as_any()
            .downcast_mut::<K>()
            .expect("a read pass keeps one agent's requests")
    }

    /// Takes what the pass kept; the pass is empty again.
    pub(crate) fn take_kept(&mut self) -> Option<Box<dyn Kept>> {
        self.kept.take()
    }
}

/// Library threads a transport may borrow. The TCP transport runs its I/O
/// loop as a job on the agent's pool, and moves the loop to another thread
/// when its own thread serves requests (or a connection) at length.
pub(crate) trait Executor: Send + Sync {
    /// Runs the I/O loop `job` before any queued work; false if stopped.
    fn run_io(&self, job: crate::pool::Work) -> bool;
    /// Runs the I/O loop at once: `job` on an idle worker (ahead of queued
    /// work), else `on_thread` on a thread started for it (every worker may
    /// be busy, some waiting for what only the loop reads); false if
    /// stopped. For a loop taken from a thread held by a handler.
    fn rescue_io(&self, job: crate::pool::Work, on_thread: crate::pool::Work) -> bool;
    /// Moves the I/O loop `job` to an idle library thread, if one is idle
    /// now (`over_queued`: even if jobs are queued, see
    /// `Pool::submit_first_if_idle`); otherwise gives `job` back.
    fn move_io(&self, job: crate::pool::Work, over_queued: bool) -> Result<(), crate::pool::Work>;
    /// Work is queued that no idle thread is there to take: a thread the
    /// transport borrowed should give itself back.
    fn starved(&self) -> bool;
}

/// What a transport delivers into its agent.
pub(crate) trait Dispatch: Send + Sync {
    /// A request arrived. `pass`: the I/O thread's read pass, which keeps
    /// requests for the pool, to serve some itself (`None`: queue them).
    fn on_request(&self, request: InRequest, pass: Option<&mut ReadPass>);
    fn on_response(&self, from: usize, id: u64, outcome: Response);
    /// Rank `src` cancelled its call `id` (one this rank does not know is
    /// ignored).
    fn on_cancel(&self, src: usize, id: u64);
    /// The connection to `rank` failed; every call in flight to it fails.
    fn on_peer_lost(&self, rank: usize, error: crate::RpcError);
    fn rank(&self) -> usize;
    fn max_message_bytes(&self) -> u64;
    /// Calls this rank has in flight to `rank`.
    fn calls_in_flight_to(&self, rank: usize) -> usize;
    /// The worker pool's backlog is full: read no more requests until
    /// [`Transport::resume_reading`] is called.
    fn backlog_full(&self) -> bool;
    /// `function` is registered to run inline.
    fn is_inline(&self, function: &str) -> bool;
}
