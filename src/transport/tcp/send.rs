//! A caller's path: sending a request (corked into batches while others to
//! the same rank are in flight), answering one (`ReplySink`), and reading
//! its own reply off the connection instead of being woken for it (`drive`).

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::error::{Result, RpcError};
use crate::log::log_at;
use crate::net::framing::ReadEnd;
use crate::transport::{OutRequest, Waiting};
use crate::wire::{FLAG_INTERNAL, Header, Kind};

use super::conn::{self, Conn, Looked};
use super::conn::{Window, WindowFull};
use super::event_loop::PassLookups;
use super::open::{Queued, WaitingCalls};
use super::stream::How;
use super::{PeerState, Shared, VIA_NONE, VIA_TCP};

impl crate::transport::ReplySink for Conn {
    fn cancel_marked(&self, id: u64) -> bool {
        self.stream.cancel_marked(id)
    }

    /// A reply with more to follow is corked: the next replies join it in
    /// one write (flushed when the worker runs out of work).
    fn send_reply(&self, id: u64, outcome: crate::transport::Outcome, more_follow: bool) {
        let (header, payload) = Conn::response(id, &outcome);
        // A failed send means the connection is broken; its reader sees that
        // and reports the peer, so there is nothing more to do here. A large
        // reply is not corked (that would copy it; it fills a write alone).
        if more_follow && payload.len() as u64 <= conn::MAX_CORKED_FRAME {
            // Only the reply that starts a batch needs the batch recorded.
            if let Ok(true) = self.send_corked(header, &[], payload, None)
                && let Some(owner) = self.owner.upgrade()
                && let Some(me) = owner.conns.lock().get(&self.token).cloned()
            {
                owner.corked(&me, true);
            }
        } else {
            let _ = self.send(header, &[], payload, conn::mode_here(), None);
        }
        // The reply has left (or been copied): its buffer can take the next
        // large message.
        // (A lent one is given back to the application as it drops.)
        if let Ok(crate::transport::Payload::Owned(data)) = outcome {
            crate::net::buffers::give_back(data);
        }
    }
}

/// A caller whose reply another thread reads spins for it only while at
/// most this many calls to that rank are in flight (measured: 16 in flight
/// gains 20-100%, 128 in flight loses ~10% when it spins).
const SPIN_MAX_IN_FLIGHT: usize = 32;
/// How long a caller reading its own reply waits before it looks again at
/// whether its call completed some other way (cancelled from another
/// thread, say: that is how late such a wait returns at worst).
const LEAD_SLICE: Duration = Duration::from_millis(10);

/// The header of request `id`; `timeout` is the time left to its deadline
/// (`None`: no deadline).
pub(super) fn request_header(id: u64, internal: bool, timeout: Option<Duration>) -> Header {
    let mut header = Header::new(Kind::Request);
    header.request_id = id;
    header.flags = if internal { FLAG_INTERNAL } else { 0 };
    // 0 means "no deadline" on the wire, so a deadline due now is 1 µs.
    header.timeout_us = timeout.map_or(0, |t| (t.as_micros() as u64).max(1));
    header
}

impl Shared {
    /// Sends `request` on the connection to `dst`, or queues it while that
    /// connection opens (starting it if this is the first call). Never
    /// waits for a connection; waits for room in the send window (the
    /// request bytes held in this process for `dst`), up to the call's
    /// deadline, unless this thread must not block (then `Busy`).
    pub(super) fn send_request(&self, dst: usize, request: &OutRequest<'_>) -> Result<()> {
        let window = Window {
            bytes: self.send_window,
            deadline: request.deadline,
            may_block: crate::threads::may_block(),
        };
        // A request that must wait is copied before the peer's lock is taken
        // (it may be large): found not ready, the lock is let go, the copy
        // made, and the state looked at again.
        // Until a connection is chosen (`open`), calls count as TCP's.
        if self.peers[dst].via.load(Ordering::Relaxed) == VIA_NONE {
            let _ = self.peers[dst]
                .via
                .compare_exchange(VIA_NONE, VIA_TCP, Ordering::Relaxed, Ordering::Relaxed);
        }
        let len = Queued::len_of(request);
        let mut waiting: Option<Queued> = None;
        // Whether this call waited for room (its calls in flight may have
        // finished meanwhile).
        let mut waited = false;
        let conn = loop {
            let mut st = self.peers[dst].state.lock();
            // No room while the connection opens: wait (before any copy is
            // made, so waiters hold nothing), then look at the state again.
            let full =
                |st: &PeerState| matches!(st, PeerState::Connecting { queued, .. } if !window.fits(queued.bytes, len));
            if full(&st) {
                if !window.may_block {
                    return Err(self.window_full(dst, request, WindowFull::Busy));
                }
                waited = true;
                if !window.wait(&self.peers[dst].room, &mut st) && full(&st) {
                    return Err(self.window_full(dst, request, WindowFull::TimedOut));
                }
                continue;
            }
            if !matches!(*st, PeerState::Ready(_) | PeerState::Lost(_)) && waiting.is_none() {
                drop(st);
                waiting = Some(Queued::of(request));
                continue;
            }
            match &mut *st {
                PeerState::Ready(conn) => break conn.clone(),
                PeerState::Lost(e) => return Err(e.clone()),
                PeerState::Connecting { queued, .. } => {
                    queued.push(waiting);
                    return Ok(());
                }
                PeerState::Idle => {
                    let conn = if self.take_opening_turn(dst) {
                        match self.open(dst) {
                            Ok(conn) => Some(conn),
                            Err(e) => {
                                // A shut-down transport refuses for good too.
                                *st = PeerState::Lost(e.clone());
                                drop(st);
                                self.done_opening();
                                // As for any lost rank: its calls fail (this
                                // one included) and a shutdown stops
                                // waiting for it.
                                if let Some(d) = self.dispatch() {
                                    d.on_peer_lost(dst, e.clone());
                                }
                                return Err(e);
                            }
                        }
                    } else {
                        None
                    };
                    *st = PeerState::Connecting {
                        conn,
                        queued: WaitingCalls::of(waiting),
                    };
                    return Ok(());
                }
            }
        };
        let header = request_header(request.id, request.internal, request.timeout);
        // A thread issuing calls while others to this rank are in flight
        // corks them: they leave together when it waits (or within about a
        // millisecond), in one write instead of one each. Not a large one:
        // corking copies it, and it fills a write by itself.
        let cork = !request.will_wait
            && len <= conn::MAX_CORKED_FRAME
            && !crate::threads::is_io_thread()
            && if waited {
                self.dispatch().is_some_and(|d| d.calls_in_flight_to(dst) >= 2)
            } else {
                request.in_flight >= 2
            };
        let sent = if cork {
            conn.send_corked_parts(header, request.function.as_bytes(), request.args, Some(window))
                .map(|starts| self.corked(&conn, starts))
        } else {
            conn.send_parts(
                header,
                request.function.as_bytes(),
                request.args,
                conn::mode_here(),
                Some(window),
            )
        };
        sent.map_err(|e| match WindowFull::of(&e) {
            Some(full) => self.window_full(dst, request, full),
            None => self.conn_failed(&conn, format!("sending failed: {e}")),
        })?;
        // A caller about to wait reads the reply itself (see `drive`);
        // otherwise the I/O thread must be watching for it.
        // A connection its caller parked stays so: that caller comes back.
        if !request.will_wait {
            conn.ensure_read_unless_parked()
                .map_err(|e| self.conn_failed(&conn, format!("epoll: {e}")))?;
        }
        Ok(())
    }

    /// Tells `dst` that call `id` was cancelled: a cancel frame behind its
    /// request, written without waiting (a full socket hands it to the I/O
    /// thread). A request still waiting for its connection never leaves.
    pub(super) fn send_cancel(&self, dst: usize, id: u64) {
        let conn = match &mut *self.peers[dst].state.lock() {
            PeerState::Ready(conn) => conn.clone(),
            PeerState::Connecting { queued, .. } => {
                queued.remove(id);
                self.peers[dst].room.notify_all();
                return;
            }
            PeerState::Idle | PeerState::Lost(_) => return,
        };
        // Seen at once by a handler polling over shared memory (the frame
        // needs the destination's reader, which may be asleep).
        conn.stream.mark_cancelled(id);
        let mut header = Header::new(Kind::Cancel);
        header.request_id = id;
        if let Err(e) = conn.send(header, &[], &[], conn::Mode::NoWait, None) {
            self.conn_failed(&conn, format!("sending failed: {e}"));
        }
    }

    /// The error of a request that found no room in the send window to `dst`.
    fn window_full(&self, dst: usize, request: &OutRequest<'_>, full: WindowFull) -> RpcError {
        match full {
            WindowFull::Busy => RpcError::Busy(format!(
                "the send window to rank {dst} ({} bytes) is full, and this thread (an inline handler, \
                 a completion callback) may not wait for room",
                self.send_window
            )),
            WindowFull::TimedOut => RpcError::Timeout(format!(
                "call to '{}' on rank {dst} timed out waiting for room in the send window ({} bytes)",
                request.function, self.send_window
            )),
        }
    }

    /// Records a corked batch on `conn` (`starts`: the first frame of one):
    /// it is written when a thread waits for a reply or a worker runs out
    /// of work (`flush_batches`), and by the I/O loop within about a
    /// millisecond otherwise.
    pub(super) fn corked(&self, conn: &Arc<Conn>, starts: bool) {
        if !starts {
            return;
        }
        {
            let mut corked = self.corked.lock();
            corked.push(conn.clone());
            self.has_corks.store(true, Ordering::SeqCst);
        }
        self.nudge_idle_loop();
    }

    /// Wakes the I/O loop if it sleeps with its long timeout, to learn of
    /// a cork or a parked connection published just before (sequentially
    /// consistent: the loop sets `io_loop_idle`, then looks at them, so one
    /// of the two sees the other).
    fn nudge_idle_loop(&self) {
        if self.io_loop_idle.load(Ordering::SeqCst) {
            let _ = io::Write::write(&mut &self.waker_tx, &[1]);
        }
    }

    /// Lists a newly parked connection for the I/O loop (see
    /// `Conn::end_lead_parked`), waking it if it sleeps without a timeout.
    fn note_parked(&self, conn: &Arc<Conn>) {
        {
            let mut parked = self.parked.lock();
            parked.push(conn.clone());
            self.has_parked.store(true, Ordering::SeqCst);
        }
        self.nudge_idle_loop();
    }

    /// The I/O loop's look at the parked connections (see `Conn::look_parked`).
    pub(super) fn look_at_parked(&self) {
        if !self.has_parked.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        let (mut failed, mut taken_over) = (Vec::new(), Vec::new());
        {
            let mut parked = self.parked.lock();
            parked.retain(|c| {
                if c.is_closed() {
                    return false;
                }
                match c.look_parked(now) {
                    Ok(Looked::Parked) => true,
                    Ok(Looked::Left) => false,
                    Ok(Looked::TakenOver) => {
                        taken_over.push(c.peer());
                        false
                    }
                    Err(e) => {
                        failed.push((c.clone(), e));
                        false
                    }
                }
            });
            self.has_parked.store(!parked.is_empty(), Ordering::SeqCst);
        }
        for rank in taken_over.into_iter().flatten() {
            log_at!(
                Debug,
                Some(self.me),
                "the caller that parked the connection to rank {rank} did not wait on it again within {} ms; \
                 the I/O thread reads it",
                conn::PARK_FOR.as_millis()
            );
        }
        for (c, e) in failed {
            self.drop_conn(&c, Some(RpcError::Io(format!("epoll: {e}"))));
        }
    }

    /// Writes every corked batch now.
    pub(super) fn flush_batches(&self) {
        if !self.has_corks.load(Ordering::SeqCst) || !self.has_corks.swap(false, Ordering::SeqCst) {
            return;
        }
        let corked = std::mem::take(&mut *self.corked.lock());
        for c in corked {
            if let Err(e) = c.flush_cork() {
                self.drop_conn(&c, Some(RpcError::Io(format!("sending failed: {e}"))));
            }
        }
    }

    /// A caller waiting for a reply from `dst` reads that connection itself
    /// (if nobody else is): the reply completes its call on its own thread,
    /// with no wake-up from the I/O thread. Other frames it meets are
    /// dispatched as the I/O thread would. Answered, it may leave the
    /// connection parked for this thread (see `Conn::end_lead_parked`).
    pub(super) fn drive(&self, dst: usize, waiting: Waiting<'_>, done: &dyn Fn() -> bool, deadline: Option<Instant>) {
        self.flush_batches();
        let conn = match &*self.peers[dst].state.lock() {
            PeerState::Ready(c) => c.clone(),
            _ => return,
        };
        let dispatch = self.dispatch();
        let in_flight = || dispatch.as_ref().map_or(0, |d| d.calls_in_flight_to(dst));
        // Spinning never outlasts the caller's own bound. Read the clock
        // only once a first look found nothing (it usually finds the reply).
        let spin_bound = || {
            let full = Instant::now() + self.spin;
            deadline.map_or(full, |d| d.min(full))
        };
        // With several calls in flight the I/O thread reads their replies in
        // batches; reading them here would only move that work.
        let lead = if in_flight() <= 1 || matches!(waiting, Waiting::AnyReply { .. }) {
            conn.reader.try_lock()
        } else {
            None
        };
        let Some(mut reader) = lead else {
            // The I/O loop reads the reply: a handler served in place on
            // its thread moves it on first.
            self.leave_in_place();
            if let Err(e) = conn.ensure_read() {
                self.drop_conn(&conn, Some(RpcError::Io(format!("epoll: {e}"))));
                return;
            }
            // Another thread reads the reply. With a shallow pipeline it is
            // often there within microseconds, and seeing it costs less than
            // being woken; a deep one has replies queued anyway, and spinning
            // would only take CPU from the threads producing them.
            if in_flight() <= SPIN_MAX_IN_FLIGHT {
                let spin_until = spin_bound();
                while !done() && Instant::now() < spin_until {
                    std::thread::yield_now();
                }
            }
            return;
        };
        if conn.begin_lead().is_err() {
            return;
        }
        // Should reading below panic (a log sink, say), the loop reads the
        // connection again: a lead left set would have nobody read it.
        let mut on_panic = HandBackOnPanic {
            shared: self,
            conn: &conn,
            armed: true,
        };
        // Spinning, a look at an empty pipe costs no system call and asks
        // the peer for no wake-up; the last look before sleeping asks.
        let mut incoming = conn.stream.incoming(How::Spinning);
        let mut announced = false;
        // A reply often comes back within tens of microseconds: looking for
        // it a few times, yielding the CPU in between (so a peer on this CPU
        // runs), is cheaper than sleeping and being woken, above all when the
        // wake-up would cross CPUs.
        let mut spin_until = None;
        let found = PassLookups::new(dispatch.as_deref());
        let outcome = loop {
            if done() || self.stopping.load(Ordering::Acquire) {
                break Ok(());
            }
            let before = incoming.bytes();
            match reader.read_until(
                &mut incoming,
                &mut |frame, reader| self.on_frame(&conn, frame, reader, None, &found),
                done,
            ) {
                Ok(ReadEnd::WouldBlock) => {}
                Ok(ReadEnd::Eof) => break Err(None),
                Err(e) => break Err(Some(e)),
            }
            if done() {
                break Ok(());
            }
            // A pipe that gave bytes has a writer at work (a large reply
            // comes a ring at a time): spin afresh, without asking it to
            // ring, rather than sleep once per ring (measured: a 64 MiB
            // reply through 128 KiB rings slept ~140 times).
            if conn.stream.is_shm() && incoming.bytes() > before {
                // The caller's deadline still ends the wait (the bytes may
                // be another call's, or keep coming past it).
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break Ok(());
                }
                spin_until = None;
                if announced {
                    announced = false;
                    incoming.set_how(How::Spinning);
                }
            }
            let now = Instant::now();
            if now < *spin_until.get_or_insert_with(spin_bound) {
                std::thread::yield_now();
                continue;
            }
            if !announced && conn.stream.is_shm() {
                announced = true;
                incoming.set_how(How::NoWait);
                continue;
            }
            // Then sleep on the stream, a slice at a time (a handler served
            // in place on the loop's thread moves the loop on first).
            self.leave_in_place();
            let slice = match deadline {
                Some(d) if d <= now => break Ok(()),
                Some(d) => (d - now).min(LEAD_SLICE),
                None => LEAD_SLICE,
            };
            if conn.stream.wait_readable(slice).is_err() {
                break Ok(());
            }
        };
        // Hand reading back before letting go of the reader, so a caller
        // that leads next cannot have its flag cleared by this one. A
        // caller whose wait was answered, and whose own calls are all that
        // is in flight here (counted now: some completed while it read),
        // parks the connection: it comes back for the rest. Not in the
        // middle of a large reply: its writer would wait for room meanwhile.
        let left = in_flight();
        let park = match waiting {
            Waiting::AnyReply { covers } => {
                outcome.is_ok() && left > 0 && !reader.in_large_frame() && done() && left <= covers()
            }
            Waiting::OwnReply => false,
        };
        on_panic.armed = false;
        let handed_back = if park {
            conn.end_lead_parked().map(|newly| {
                if newly {
                    self.note_parked(&conn);
                }
            })
        } else {
            conn.end_lead(left > 0)
        };
        drop(reader);
        // A connection epoll will not watch cannot serve the calls left on it.
        let outcome = outcome.and(handed_back.map_err(|e| Some(RpcError::Io(format!("epoll: {e}")))));
        if let Err(why) = outcome {
            self.drop_conn(&conn, why);
        }
    }

    /// The connections this thread parked are the I/O loop's to read from
    /// now on (it is about to sleep instead of reading them).
    pub(super) fn unpark_mine(&self) {
        if !self.has_parked.load(Ordering::Acquire) {
            return;
        }
        let me = std::thread::current().id();
        let mut failed = Vec::new();
        for c in self.parked.lock().iter() {
            if let Err(e) = c.unpark_if_parked_by(me) {
                failed.push((c.clone(), e));
            }
        }
        for (c, e) in failed {
            self.drop_conn(&c, Some(RpcError::Io(format!("epoll: {e}"))));
        }
    }
}

/// Hands a led connection back to the I/O loop if the leader unwinds
/// before it hands back itself (dropped before the reader is let go:
/// declared after it).
struct HandBackOnPanic<'a> {
    shared: &'a Shared,
    conn: &'a Arc<Conn>,
    armed: bool,
}

impl Drop for HandBackOnPanic<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = self.conn.end_lead(true)
        {
            // Unwinding already: a second panic (the log sink) would abort.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.shared
                    .drop_conn(self.conn, Some(RpcError::Io(format!("epoll: {e}"))))
            }));
        }
    }
}
