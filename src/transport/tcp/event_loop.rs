//! The I/O loop: one epoll set (edge-triggered for connections) over the
//! listeners, its waker and every connection, run as a job on one pool
//! thread at a time (or on a thread of its own while a handler holds the
//! loop's thread and no worker is idle: see `io_loop`). It reads frames
//! and hands them to the agent, writes what a full socket made a sender
//! hand over, flushes corked batches, and times out handshakes. When a read pass kept requests for the pool (the
//! agent decides which, `agent/kept.rs`), the loop's thread serves them:
//! quick ones in place, staying the loop (should one stall, the agent's
//! deadline thread moves the loop to another thread), others after moving
//! the loop to an idle thread. When a connection's requests were all
//! served inline, the thread stays with that connection as its responder,
//! waiting in a blocking `recv`.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::error::{Result, RpcError};
use crate::log::log_at;
use crate::net::framing::{Frame, FrameReader, ReadEnd};
use crate::net::sys::Event;
use crate::threads::Role;
use crate::transport::{Escape, InRequest, Kept, ReadPass};
use crate::wire::{self, FLAG_INTERNAL, Kind};

use super::Shared;
use super::conn::{Conn, Greeting};
use super::open::HANDSHAKE_SWEEP;
use super::stream::{How, Part, Stream};

/// A responder that has waited this long for a request gives its connection
/// back to the I/O loop (and its thread back to the pool). The kernel rounds
/// it up to its timer tick (4 ms at 250 Hz): that long, plus one pass, is
/// how long a job may wait for a thread while the responder waits, when
/// every other pool thread is busy.
pub(super) const RESPONDER_IDLE: Duration = Duration::from_millis(2);

/// How long the I/O loop reads bytes its spin found without polling its
/// other descriptors (see `io_loop`).
const POLL_WHILE_SPINNING: Duration = Duration::from_micros(25);

pub(super) const LISTENER: u64 = 0;

pub(super) const WAKER: u64 = 1;

/// The Unix socket ranks on this host connect to.
pub(super) const SAME_HOST_LISTENER: u64 = 2;

/// Connections' tokens count up from here.
pub(super) const FIRST_CONN_TOKEN: u64 = 3;

impl Shared {
    pub(super) fn io_loop_job(self: Arc<Self>) -> crate::pool::Work {
        self.loop_job(false)
    }

    /// The loop as a job; `rescued`: on a thread started for it (see
    /// `io_loop`).
    fn loop_job(self: Arc<Self>, rescued: bool) -> crate::pool::Work {
        Box::new(move || {
            // A panic in the loop (a log sink's, say) must not leave the
            // agent with nobody reading its connections. The requests its
            // pass kept are moved out of the loop first.
            let mut pass = ReadPass::default();
            if catch_unwind(AssertUnwindSafe(|| self.clone().io_loop(&mut pass, rescued))).is_err() {
                self.restart_after_panic(pass);
            }
        })
    }

    /// This transport's identity in [`Role::IoLoop`] and
    /// [`Role::LoopServing`].
    fn transport_id(&self) -> usize {
        self as *const Shared as usize
    }

    fn loop_role(&self) -> Role {
        Role::IoLoop {
            transport: self.transport_id(),
        }
    }

    /// Whether the calling thread runs this transport's I/O loop.
    pub(super) fn on_io_loop(&self) -> bool {
        crate::threads::role() == self.loop_role()
    }

    /// The I/O loop panicked: it starts again on the pool, and every
    /// connection is looked at anew (the edge-triggered events it was
    /// handling would not be reported again by themselves).
    fn restart_after_panic(self: &Arc<Self>, mut pass: ReadPass) {
        // Requests the interrupted pass kept for this thread go to the pool.
        if let Some(kept) = pass.take_kept() {
            kept.queue_all();
        }
        // The log sink may be what panicked.
        let me = self.me;
        let _ = catch_unwind(|| log_at!(Error, Some(me), "the I/O loop panicked; it starts again"));
        if !self.stopping.load(Ordering::Acquire) {
            let conns: Vec<Arc<Conn>> = self.conns.lock().values().cloned().collect();
            for conn in conns {
                if let Err(e) = conn.rearm() {
                    self.drop_conn(&conn, Some(RpcError::Io(format!("epoll: {e}"))));
                }
            }
            // Every worker may be blocked in a handler waiting for what
            // only the loop reads.
            if self.rescue() {
                return;
            }
        }
        *self.io_loop.lock() = false;
        self.io_loop_done.notify_all();
    }

    /// The I/O loop: runs on one library thread at a time. When a read pass
    /// kept requests for the pool, this thread serves them: in place if
    /// they are quick, else once the loop moved to an idle thread.
    /// `pass`: what the current pass keeps (the caller's, so that a panic
    /// does not lose it). `rescued`: this thread was started for the loop
    /// because no worker was idle (see `rescue`); it runs the loop only
    /// (what passes keep is queued, it becomes no responder) and, at the
    /// top of a turn, hands it to a worker if one is idle, then ends.
    pub(super) fn io_loop(self: Arc<Self>, pass: &mut ReadPass, rescued: bool) {
        let role = crate::threads::enter(self.loop_role());
        let mut events = Vec::with_capacity(128);
        let mut last_sweep = Instant::now();
        let mut polled_at: Option<Instant> = None;
        // The last pass served requests in place (see `poll_spinning`).
        let mut served_in_place = false;
        // Same-host connections read in the last pass, without asking their
        // peers to ring: looked at again before the loop sleeps, and asked
        // to ring only then (see `Hot`).
        let mut hot = Hot {
            conns: std::mem::take(&mut *self.hot_handed_on.lock()),
        };
        while !self.stopping.load(Ordering::Acquire) {
            // Over the requests its last pass queued: a worker woken for
            // them takes the loop first (else a stream of pool requests
            // would keep the loop here for good).
            if rescued
                && let Some(ex) = self.executor.upgrade()
                && self.move_loop(&ex, &mut hot, true).is_ok()
            {
                return;
            }
            let handshakes = self.handshaking.load(Ordering::Acquire) > 0;
            // Corks met while spinning are written at the end of the pass.
            let mut flush_now = false;
            let spin_on_epoll = std::mem::take(&mut served_in_place) && hot.conns.is_empty();
            let spun = if hot.conns.is_empty() {
                Spun::Nothing
            } else {
                self.spin_for_data(&mut hot)
            };
            let timeout_ms = match spun {
                Spun::Data => 0,
                Spun::Corks => {
                    flush_now = true;
                    0
                }
                Spun::Nothing => {
                    hot.arm(&self);
                    // Corked batches are written, and parked connections looked
                    // at, within about a millisecond. Idle first, then look:
                    // a cork added or a connection parked after the look sees the
                    // flag and nudges the loop.
                    self.io_loop_idle.store(true, Ordering::SeqCst);
                    let soon = self.has_corks.load(Ordering::SeqCst) || self.has_parked.load(Ordering::SeqCst);
                    if soon {
                        self.io_loop_idle.store(false, Ordering::SeqCst);
                    }
                    match (soon, handshakes) {
                        (true, _) => 1,
                        (false, true) => HANDSHAKE_SWEEP.as_millis() as i32,
                        (false, false) => -1,
                    }
                }
            };
            // Bytes found by the spin are read at once; other descriptors
            // are polled at least every `POLL_WHILE_SPINNING` meanwhile (a
            // large transfer finds bytes every few microseconds, and a
            // system call each time was a third of its cost).
            let waited = if matches!(spun, Spun::Data) && polled_at.is_some_and(|t| t.elapsed() < POLL_WHILE_SPINNING) {
                events.clear();
                Ok(())
            } else {
                polled_at = Some(Instant::now());
                if spin_on_epoll && timeout_ms != 0 {
                    self.poll_spinning(&mut events, timeout_ms)
                } else {
                    self.epoll.wait(&mut events, timeout_ms)
                }
            };
            self.io_loop_idle.store(false, Ordering::SeqCst);
            if let Err(e) = waited {
                log_at!(Error, Some(self.me), "epoll_wait failed: {e}; the I/O loop stops");
                break;
            }
            // Woken only to learn of a new cork (or parked connection):
            // give the batch its millisecond to fill.
            let nudged_only = !events.is_empty() && events.iter().all(|e| e.token == WAKER);
            // A connection whose requests this round served.
            let mut served = None;
            // The connections the spin found bytes on, read as if epoll had
            // reported them.
            let found: Vec<Arc<Conn>> = std::mem::take(&mut hot.conns);
            for conn in found {
                if self.on_event(&conn, Event::readable_now(conn.token), Part::Main, pass, &mut hot) {
                    served = Some(conn);
                }
            }
            for ev in &events {
                match ev.token {
                    LISTENER => self.accept_all(),
                    SAME_HOST_LISTENER => self.accept_same_host(),
                    WAKER => {
                        let mut drain = [0u8; 64];
                        let _ = io::Read::read(&mut &self.waker, &mut drain);
                    }
                    _ => {
                        let (token, part, ev) = Part::split(*ev);
                        let conn = self.conns.lock().get(&token).cloned();
                        if let Some(conn) = &conn
                            && part == Part::Wake
                        {
                            conn.stream.drain_bell(part);
                        }
                        if let Some(conn) = conn
                            && self.on_event(&conn, ev, part, pass, &mut hot)
                        {
                            served = Some(conn);
                        }
                    }
                }
            }
            self.look_at_parked();
            if handshakes && last_sweep.elapsed() >= HANDSHAKE_SWEEP {
                last_sweep = Instant::now();
                self.close_stale_handshakes();
            }
            if !nudged_only || flush_now {
                self.flush_batches();
            }
            match pass.take_kept() {
                Some(kept) if rescued => kept.queue_all(),
                Some(kept) if kept.quick() => {
                    if !self.serve_in_place(kept, &mut hot) {
                        // A handler stalled: the loop went on elsewhere
                        // (a panic here must not start another). What its
                        // handlers held back for company leaves.
                        drop(role);
                        run_contained(|| self.flush_batches());
                        return;
                    }
                    // Replies held back for company (the pool had work
                    // queued) leave now, not with the loop's next turn.
                    self.flush_batches();
                    served_in_place = true;
                }
                Some(kept) => match self.executor.upgrade() {
                    Some(ex) => match self.move_loop(&ex, &mut hot, false) {
                        Ok(()) => {
                            drop(role);
                            // The loop runs elsewhere now: a panic here must
                            // not reach `io_loop_job`, which would start a
                            // second loop.
                            run_contained(|| kept.serve_here(None));
                            return;
                        }
                        // Nobody idle: the loop stays here, the pool queues the
                        // requests (a stopped pool means the agent is closing).
                        Err(_) => kept.queue_all(),
                    },
                    None => drop(kept),
                },
                // Requests served inline (nothing for the pool): the next
                // ones on that connection likely are too.
                None => {
                    if let Some(conn) = served
                        && !rescued
                        && self.become_responder(&mut hot)
                    {
                        drop(role);
                        run_contained(|| self.respond(&conn));
                        return;
                    }
                }
            }
        }
        drop(role);
        *self.io_loop.lock() = false;
        self.io_loop_done.notify_all();
    }

    /// Before the loop sleeps: looks at the hot connections (no system
    /// call: the rings' counters) for up to the spin time, yielding the CPU
    /// between looks, until bytes come on one (it stays in `hot`; the
    /// others are asked to ring and leave it) or a batch is corked.
    fn spin_for_data(&self, hot: &mut Hot) -> Spun {
        // A connection closed or led meanwhile is no longer this loop's to read.
        hot.conns.retain(|c| !c.is_closed() && !c.is_led());
        let until = Instant::now() + self.spin;
        let executor = self.executor.upgrade();
        loop {
            if hot.conns.iter().any(|c| c.stream.has_data()) {
                let (with_data, idle): (Vec<_>, Vec<_>) = hot.conns.drain(..).partition(|c| c.stream.has_data());
                Hot { conns: idle }.arm(self);
                hot.conns = with_data;
                return Spun::Data;
            }
            if self.has_corks.load(Ordering::Relaxed) {
                return Spun::Corks;
            }
            let starved = || executor.as_ref().is_some_and(|ex| ex.starved());
            if self.stopping.load(Ordering::Acquire) || Instant::now() >= until || starved() {
                return Spun::Nothing;
            }
            std::thread::yield_now();
        }
    }

    /// Polls without sleeping, yielding the CPU between looks, for up to
    /// the spin time, then sleeps up to `timeout_ms`. After a pass that
    /// served requests in place over TCP (same-host connections are looked
    /// at without a system call, in `spin_for_data`): the next request of
    /// a busy caller is often a few microseconds away, and being woken
    /// from a sleep costs more (measured: an 8 B round trip to a pool
    /// handler over loopback TCP, 33 us sleeping at once, 13 us with this).
    fn poll_spinning(&self, events: &mut Vec<Event>, timeout_ms: i32) -> io::Result<()> {
        let until = Instant::now() + self.spin;
        loop {
            self.epoll.wait(events, 0)?;
            if !events.is_empty() || self.stopping.load(Ordering::Acquire) || Instant::now() >= until {
                break;
            }
            std::thread::yield_now();
        }
        if events.is_empty() {
            self.epoll.wait(events, timeout_ms)?;
        }
        Ok(())
    }

    /// Serves the quick requests a pass kept on this thread, which stays
    /// the I/O loop's: no other thread woken, and none competing for the
    /// CPU, per pass. Should one of them stall, the agent's deadline thread
    /// moves the loop on ([`Shared::escape_in_place`]). False if it did:
    /// this thread is then no longer the loop's.
    ///
    /// `in_place` is `generation << 1 | serving`. Each turn of serving
    /// takes a new generation and sets `serving` (only the loop's thread
    /// does, here); the turn ends by clearing it, here or in an escape,
    /// whichever comes first, with that generation. So an escape meant for
    /// a turn that has ended never ends a later one, and a thread left
    /// behind never takes a later turn for its own.
    fn serve_in_place(self: &Arc<Self>, kept: Box<dyn Kept>, hot: &mut Hot) -> bool {
        let generation = (self.in_place.load(Ordering::Acquire) >> 1).wrapping_add(1);
        // Where a loop moved on finds them (taken back below otherwise).
        let handed_hot = !hot.conns.is_empty();
        if handed_hot {
            self.hot_handed_on.lock().append(&mut hot.conns);
        }
        self.in_place.store(generation << 1 | 1, Ordering::Release);
        let me = self.clone();
        let escape: Escape = Box::new(move || me.escape_in_place(generation));
        {
            // A worker meanwhile: its handlers may block, and its waits
            // move the loop on first (`leave_in_place`).
            let _serving = crate::threads::enter(Role::LoopServing {
                transport: self.transport_id(),
                generation,
            });
            run_contained(|| kept.serve_here(Some(escape)));
        }
        let still_loop = self.end_turn(generation);
        if still_loop && handed_hot {
            hot.conns = std::mem::take(&mut *self.hot_handed_on.lock());
        }
        still_loop
    }

    /// Ends turn `generation` of serving in place; false if it had ended.
    fn end_turn(&self, generation: u64) -> bool {
        let serving = generation << 1 | 1;
        let ended = generation << 1;
        self.in_place
            .compare_exchange(serving, ended, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Moves the I/O loop on from its thread serving in place (turn
    /// `generation`): the loop starts again at once on another thread.
    /// Nothing if that turn has ended.
    pub(super) fn escape_in_place(self: &Arc<Self>, generation: u64) {
        if !self.end_turn(generation) {
            return;
        }
        // The loop first: nothing below may keep it from starting.
        if !self.rescue() {
            // The pool has stopped: the agent is closing, and so is the loop.
            *self.io_loop.lock() = false;
            self.io_loop_done.notify_all();
        }
        let me = self.me;
        let _ = catch_unwind(|| {
            log_at!(
                Debug,
                Some(me),
                "the I/O loop's thread is held by a handler; the loop moved to another thread"
            )
        });
    }

    /// Starts the loop at once on another thread: an idle worker, else one
    /// started for it (every worker may be blocked in a handler waiting for
    /// what only the loop reads); false if the pool has stopped.
    fn rescue(self: &Arc<Self>) -> bool {
        let Some(ex) = self.executor.upgrade() else {
            return false;
        };
        ex.rescue_io(self.clone().io_loop_job(), self.clone().loop_job(true))
    }

    /// The calling thread is about to wait: if it serves requests in place
    /// for this transport's loop, the loop moves on first, rather than wait
    /// for the deadline thread to see the stall (the wait may be for a
    /// reply only the loop would read).
    pub(super) fn leave_in_place(&self) {
        if let Role::LoopServing { transport, generation } = crate::threads::role()
            && transport == self.transport_id()
            && let Some(me) = self.this.upgrade()
        {
            me.escape_in_place(generation);
        }
    }

    /// Moves the I/O loop to an idle library thread, handing it the hot
    /// connections (it looks at them first); if none is idle, gives the
    /// job back and keeps them.
    /// `over_queued`: see `Executor::move_io`.
    fn move_loop(
        self: &Arc<Self>,
        ex: &Arc<dyn crate::transport::Executor>,
        hot: &mut Hot,
        over_queued: bool,
    ) -> Result<(), crate::pool::Work> {
        *self.hot_handed_on.lock() = std::mem::take(&mut hot.conns);
        let moved = ex.move_io(self.clone().io_loop_job(), over_queued);
        if moved.is_err() {
            hot.conns = std::mem::take(&mut *self.hot_handed_on.lock());
        }
        moved
    }

    /// Claims the responder's place and moves the I/O loop to an idle pool
    /// thread (with the `hot` connections); false (and nothing changed) if
    /// either is taken.
    pub(super) fn become_responder(self: &Arc<Self>, hot: &mut Hot) -> bool {
        if self.stopping.load(Ordering::Acquire) || self.responder.swap(true, Ordering::AcqRel) {
            return false;
        }
        let moved = self
            .executor
            .upgrade()
            .is_some_and(|ex| self.move_loop(&ex, hot, false).is_ok());
        if !moved {
            self.responder.store(false, Ordering::Release);
        }
        moved
    }

    /// Stops reading `conn` until the pool's backlog drains (its unread
    /// bytes raise no new event by themselves: `resume_reading` re-arms it).
    fn pause_reading(&self, conn: &Arc<Conn>) {
        self.paused.lock().push(conn.clone());
        self.has_paused.store(true, Ordering::Release);
        // The backlog may have drained before the connection was listed.
        if !self.dispatch().is_some_and(|d| d.backlog_full()) {
            self.resume_reading();
        }
    }

    /// Reads again every connection paused for a full backlog.
    pub(super) fn resume_reading(&self) {
        if !self.has_paused.swap(false, Ordering::AcqRel) {
            return;
        }
        let paused = std::mem::take(&mut *self.paused.lock());
        for conn in paused {
            if let Err(e) = conn.rearm() {
                self.drop_conn(&conn, Some(RpcError::Io(format!("epoll: {e}"))));
            }
        }
    }

    /// Serves `conn` on this thread, which the I/O loop has just left. It
    /// waits for the next requests in `recv` itself: per request, one system
    /// call and one epoll wake-up fewer than the loop (measured: ~0.4 us of a
    /// 15 us round trip on one CPU). It gives the connection back to the loop
    /// when idle for [`RESPONDER_IDLE`], when a request needs the pool (the
    /// requests its pass kept it then serves itself, as the loop would), when
    /// the pool has work and no idle thread, or at shutdown.
    pub(super) fn respond(&self, conn: &Arc<Conn>) {
        let responding = Responding::new(self, conn);
        let mut pass = self.serve_requests(conn);
        drop(responding);
        if let Some(kept) = pass.take_kept() {
            // Older jobs waiting for a thread go first.
            match self.executor.upgrade() {
                Some(ex) if ex.starved() => kept.queue_all(),
                _ => kept.serve_here(None),
            }
        }
    }

    /// The responder's reading: returns what its last pass kept.
    pub(super) fn serve_requests(&self, conn: &Arc<Conn>) -> ReadPass {
        let Some(mut reader) = conn.reader.try_lock() else {
            return ReadPass::default();
        };
        if conn.begin_lead().is_err() {
            return ReadPass::default();
        }
        let starved = || self.executor.upgrade().is_none_or(|ex| ex.starved());
        let dispatch = self.dispatch();
        let (outcome, kept) = loop {
            if self.stopping.load(Ordering::Acquire) || starved() {
                break (Ok(()), ReadPass::default());
            }
            // Corked only once requests came, not for the wait: other
            // threads' frames must not queue behind it meanwhile.
            let mut corked = None;
            let mut kept = ReadPass::default();
            let mut stream = conn.stream.incoming(How::Waiting {
                spin: self.spin,
                idle: RESPONDER_IDLE,
            });
            let found = PassLookups::new(dispatch.as_deref());
            let result = reader.read_from(&mut stream, &mut |frame, reader| {
                cork_for_batch(conn, &mut corked, reader);
                self.on_frame(conn, frame, reader, Some(&mut kept), &found)
            });
            let ended = end_pass(conn, corked, result);
            if let Err(why) = ended {
                break (Err(why), kept);
            }
            if stream.timed_out() || !kept.is_empty() {
                break (Ok(()), kept);
            }
        };
        // Hand reading back before letting go of the reader (as `drive`).
        let handed_back = conn.end_lead(true);
        drop(reader);
        let outcome = outcome.and(handed_back.map_err(|e| Some(RpcError::Io(format!("epoll: {e}")))));
        if let Err(why) = outcome {
            self.drop_conn(conn, why);
        }
        kept
    }

    /// Handles one readiness event; true if it served requests (those that
    /// need the pool are kept in `pass`).
    /// `hot`: where a same-host connection read without asking its peer to
    /// ring goes (the loop looks at it again, and has it ring before sleeping).
    pub(super) fn on_event(&self, conn: &Arc<Conn>, ev: Event, part: Part, pass: &mut ReadPass, hot: &mut Hot) -> bool {
        if conn.peer().is_none() {
            match &conn.stream {
                Stream::Tcp(tcp) => {
                    if let Some(dst) = conn.opened_to
                        && matches!(*conn.greeting.lock(), Greeting::Connecting)
                    {
                        if !ev.writable() {
                            return false;
                        }
                        if let Err(e) = self.on_connect_event(conn, tcp, dst) {
                            self.drop_conn(conn, Some(e));
                            return false;
                        }
                    }
                }
                Stream::Shm(s) if s.pipe().is_none() => {
                    if part == Part::Socket && !self.step_rings(conn, s) {
                        return false;
                    }
                }
                Stream::Shm(_) => {}
            }
        }
        if ev.writable()
            && let Err(e) = conn.flush()
        {
            self.drop_conn(conn, Some(RpcError::Io(format!("sending failed: {e}"))));
            return false;
        }
        if !ev.readable() {
            return false;
        }
        // A caller waiting for its reply may be reading this connection
        // itself; the event (edge-triggered, not repeated) must then be
        // reported again once it lets go.
        let Some(mut reader) = conn.reader.try_lock() else {
            if let Err(e) = conn.rearm() {
                self.drop_conn(conn, Some(RpcError::Io(format!("epoll: {e}"))));
            }
            return false;
        };
        // A pipe is read without asking its peer to ring when the loop will
        // look at it again (spin) before sleeping; an ending one is read to
        // its end.
        let spin_here = conn.stream.is_shm() && !self.spin.is_zero() && !ev.closed();
        // The reader now: the data bell is ours to empty, before the ring is
        // looked at (a ring after this raises a new event). A pipe read
        // while spinning needs none: it is armed, which empties the bell,
        // before anything sleeps on it (`Hot::arm`, or `rearm` when paused),
        // and a system call per pass is most of a large transfer's overhead.
        if part == Part::Main && !spin_here {
            conn.stream.drain_bell(part);
        }
        let mut stream = conn
            .stream
            .incoming(if spin_here { How::Spinning } else { How::NoWait });
        let mut corked = None;
        let mut requests = false;
        let dispatch = self.dispatch();
        let found = PassLookups::new(dispatch.as_deref());
        let mut on_frame = |frame: Frame, reader: &mut FrameReader| {
            requests |= frame.header.kind == Kind::Request;
            cork_for_batch(conn, &mut corked, reader);
            self.on_frame(conn, frame, reader, Some(&mut *pass), &found)
        };
        // Requests stop being read while the pool's backlog is full.
        let serving = dispatch.as_ref().filter(|_| !conn.outbound && conn.peer().is_some());
        // Whether the pass stopped for a full backlog: then the connection
        // is paused (`pause_reading` looks again and resumes it if the
        // backlog has drained since), never left with bytes unread and
        // nothing to wake the loop for them.
        let stopped = std::cell::Cell::new(false);
        let backlog_full = || {
            let full = serving.as_ref().is_some_and(|d| d.backlog_full());
            stopped.set(stopped.get() | full);
            full
        };
        let result = if ev.closed() {
            reader.read_to_end(&mut stream, &mut on_frame)
        } else {
            reader.read_until(&mut stream, &mut on_frame, &backlog_full)
        };
        drop(reader);
        if stopped.get() || backlog_full() {
            self.pause_reading(conn);
        } else if spin_here {
            hot.add(conn);
        }
        match end_pass(conn, corked, result) {
            Ok(()) => requests && !conn.outbound && conn.peer().is_some(),
            Err(why) => {
                self.drop_conn(conn, why);
                false
            }
        }
    }

    /// Handles one frame read from `conn`; `pass` as in
    /// [`crate::transport::Dispatch::on_request`].
    /// `found`: what the read pass looked up once for all its frames.
    pub(super) fn on_frame(
        &self,
        conn: &Arc<Conn>,
        mut frame: Frame,
        reader: &mut FrameReader,
        pass: Option<&mut ReadPass>,
        found: &PassLookups<'_>,
    ) -> Result<()> {
        let Some(peer) = conn.peer() else {
            return match conn.opened_to {
                Some(dst) => self.greet_server(conn, dst, frame, reader),
                None => self.greet(conn, frame, reader),
            };
        };
        let dispatch = found
            .dispatch
            .ok_or_else(|| RpcError::Shutdown("the agent is gone".into()))?;
        let h = frame.header;
        match (h.kind, conn.outbound) {
            (Kind::Request, false) => {
                // Names are UTF-8 on both sides: anything else is a broken
                // peer (ASCII, the usual case, is checked in a few steps).
                if !frame.name.is_ascii() && std::str::from_utf8(&frame.name).is_err() {
                    return Err(RpcError::Protocol("function name is not UTF-8".into()));
                }
                dispatch.on_request(
                    InRequest {
                        src: peer,
                        id: h.request_id,
                        function: std::mem::take(&mut frame.name),
                        internal: h.flags & FLAG_INTERNAL != 0,
                        deadline: (h.timeout_us > 0)
                            .then(|| found.arrived(reader) + Duration::from_micros(h.timeout_us)),
                        args: frame.payload,
                        inline_here: true,
                        reply_to: conn.clone(),
                    },
                    pass,
                );
            }
            (Kind::Response, true) => {
                let status = wire::response_status(&h)?;
                let outcome = if status == crate::Status::Ok {
                    Ok(frame.payload)
                } else {
                    Err((status, String::from_utf8_lossy(&frame.payload).into_owned()))
                };
                dispatch.on_response(peer, h.request_id, outcome);
            }
            (Kind::Cancel, false) => {
                if h.name_len != 0 || h.payload_len != 0 {
                    return Err(RpcError::Protocol("a cancel frame with a body".into()));
                }
                dispatch.on_cancel(peer, h.request_id);
            }
            (Kind::Goodbye, _) => conn.goodbye.store(true, Ordering::Release),
            (kind, _) => {
                return Err(RpcError::Protocol(format!(
                    "unexpected {kind:?} frame on an {} connection",
                    if conn.outbound { "outgoing" } else { "incoming" }
                )));
            }
        }
        Ok(())
    }
}

/// How a spin before sleeping ended.
enum Spun {
    /// Bytes came on a hot connection.
    Data,
    /// A batch was corked.
    Corks,
    /// Neither, by the end of the spin: the loop sleeps.
    Nothing,
}

/// Same-host connections the I/O loop read without asking the peer to ring
/// the data bell (a look at the ring costs no system call, and a peer not
/// asked rings nothing: a busy pipeline makes none per message). Each must
/// be asked ([`Hot::arm`]) before the loop sleeps, or its next bytes would
/// wake nobody; a loop moving to another thread hands them on
/// (`Shared::hot_handed_on`).
pub(super) struct Hot {
    conns: Vec<Arc<Conn>>,
}

impl Hot {
    fn add(&mut self, conn: &Arc<Conn>) {
        if !self.conns.iter().any(|c| Arc::ptr_eq(c, conn)) {
            self.conns.push(conn.clone());
        }
    }

    /// Asks each peer to ring from now on (bytes already there ring at once).
    fn arm(&mut self, shared: &Shared) {
        for conn in self.conns.drain(..) {
            if let Err(e) = conn.arm_reads() {
                shared.drop_conn(&conn, Some(RpcError::Io(format!("shared memory: {e}"))));
            }
        }
    }
}

/// Runs work this thread took on after handing the I/O loop to another
/// thread; a panic in it is logged and goes no further.
fn run_contained(work: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(work)).is_err() {
        let _ = catch_unwind(|| log_at!(Error, None, "work an I/O thread did beside its reading panicked"));
    }
}

/// What a read pass looks up once for all the frames it reads.
pub(super) struct PassLookups<'a> {
    /// The agent, found once per pass: found per frame, its reference
    /// count's cache line would move between the reading thread and the
    /// calling ones on every frame.
    dispatch: Option<&'a dyn crate::transport::Dispatch>,
    /// When the requests of the reader's latest read arrived (its count of
    /// reads, and the time), read at the first of them: the requests of
    /// one read count their deadlines from one clock read (a read per
    /// request was ~6% of serving one).
    arrived: std::cell::Cell<Option<(u64, Instant)>>,
}

impl<'a> PassLookups<'a> {
    pub(super) fn new(dispatch: Option<&'a dyn crate::transport::Dispatch>) -> PassLookups<'a> {
        PassLookups {
            dispatch,
            arrived: std::cell::Cell::new(None),
        }
    }

    /// When the frame `reader` just parsed arrived.
    fn arrived(&self, reader: &FrameReader) -> Instant {
        match self.arrived.get() {
            Some((reads, at)) if reads == reader.reads() => at,
            _ => {
                let at = Instant::now();
                self.arrived.set(Some((reader.reads(), at)));
                at
            }
        }
    }
}

/// Requests read in one pass are answered in one write: once a frame on an
/// accepted connection has more bytes behind it, the pass takes the writer
/// role (`corked`: whether it got it), and replies made meanwhile (inline
/// handlers' during the pass, workers' too) queue until the pass ends. A
/// lone request's reply goes straight out, with no queue to pass through.
fn cork_for_batch(conn: &Conn, corked: &mut Option<bool>, reader: &FrameReader) {
    if corked.is_none() && !conn.outbound && reader.has_buffered() {
        *corked = Some(conn.cork());
    }
}

/// Ends a read pass: sends what it corked, and says whether the connection
/// lives on (`Err` as `drop_conn` takes it: `None` when the peer closed it).
pub(super) fn end_pass(
    conn: &Conn,
    corked: Option<bool>,
    read: Result<ReadEnd>,
) -> std::result::Result<(), Option<RpcError>> {
    let flushed = if corked == Some(true) { conn.uncork() } else { Ok(()) };
    match (read, flushed) {
        (Ok(ReadEnd::WouldBlock), Ok(())) => Ok(()),
        (Ok(ReadEnd::Eof), _) => Err(None),
        (Err(e), _) => Err(Some(e)),
        (_, Err(e)) => Err(Some(RpcError::Io(format!("sending failed: {e}")))),
    }
}

/// A responder's claims, given up however it ends (a panic in the code
/// around the handlers included, or the connection would never be read
/// again).
struct Responding<'a> {
    shared: &'a Shared,
    conn: &'a Conn,
    _role: crate::threads::Restore,
}

impl<'a> Responding<'a> {
    fn new(shared: &'a Shared, conn: &'a Conn) -> Responding<'a> {
        Responding {
            shared,
            conn,
            _role: crate::threads::enter(Role::Responder),
        }
    }
}

impl Drop for Responding<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.conn.end_lead(true);
        }
        self.shared.responder.store(false, Ordering::Release);
    }
}
