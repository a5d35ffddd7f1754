//! One connection (TCP, or a same-host pipe: `stream.rs`). Any thread may send on it: the first to arrive takes
//! the writer role and writes straight from its own buffers, then sends
//! whatever other threads queued meanwhile in one vectored write (so frames
//! batch under load without a writer thread). A thread that may wait for the
//! socket (a caller, a worker) does; the I/O thread never does: what the
//! socket will not take yet is copied once and finished by the I/O thread.
//!
//! Reading is done by whoever holds `reader`: the I/O thread; a caller
//! waiting for its own reply, which then reads the socket itself instead of
//! being woken by the I/O thread; or, on an accepted connection, a responder
//! waiting for the next requests. The last two "lead": epoll stops watching
//! the connection for data meanwhile. A caller whose wait was answered
//! while more of its calls are in flight may "park" the connection when it
//! lets go (see [`Conn::end_lead_parked`]): nobody reads it until that
//! caller waits again, or the I/O thread after [`PARK_FOR`].

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::auth::{ClientHandshake, Handshake};
use crate::error::Status;
use crate::transport::{Outcome, total_len};
use crate::wire::{self, Header, Kind};

use crate::net::framing::FrameReader;
use crate::net::sys::Epoll;

use super::stream::{Changed, Stream, Watch};

const NO_PEER: usize = usize::MAX;
/// How long a thread that may wait blocks on a full socket before it hands
/// the rest to the I/O thread.
const WAIT_FOR_SOCKET: Duration = Duration::from_millis(200);
/// A corked batch is written once it holds this many frames.
const MAX_CORKED: usize = 64;
/// How long a parked connection waits for its caller before the I/O
/// thread reads it (it looks about this often while any is parked): the
/// most a reply may wait when its caller stopped waiting with calls in
/// flight (on completion callbacks, say), about two of these.
pub(crate) const PARK_FOR: Duration = Duration::from_millis(1);
/// Frames larger than this are never corked: corking copies a frame into
/// the outbox, and one this large fills a write by itself.
pub(crate) const MAX_CORKED_FRAME: u64 = 64 << 10;
/// Small frames are queued together in buffers of this size (a batch of
/// 128 replies of 32 B, 72 bytes each with the header, fills three), and
/// buffers up to this size are kept for the next ones, up to
/// `MAX_SPARE_BYTES` of them: small frames then cost no allocation, and an
/// idle connection holds at most 128 KiB.
const KEEP_FRAME_BUFFER: usize = 4096;
const MAX_SPARE_BYTES: usize = 128 << 10;

/// The send window a request must fit in before it is copied into the
/// outbox (replies are not held to it).
#[derive(Clone, Copy)]
pub(crate) struct Window {
    pub bytes: u64,
    /// Until when the caller may wait for room.
    pub deadline: Option<Instant>,
    /// A thread that must not block gets `WindowFull::Busy` at once.
    pub may_block: bool,
}

impl Window {
    /// Whether a frame of `len` bytes may join `held` bytes already held:
    /// within the window, or alone (one frame larger than it goes by itself).
    pub(crate) fn fits(&self, held: u64, len: u64) -> bool {
        held == 0 || held + len <= self.bytes
    }

    /// Waits on `room` (the guard's lock released meanwhile) until it is
    /// signalled or the deadline passes; false once the deadline has passed.
    pub(crate) fn wait<T>(&self, room: &Condvar, guard: &mut MutexGuard<'_, T>) -> bool {
        match self.deadline {
            None => {
                room.wait(guard);
                true
            }
            Some(d) => !room.wait_until(guard, d).timed_out(),
        }
    }
}

/// Why a request did not fit in the send window (carried in an `io::Error`
/// of kind `Other`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WindowFull {
    Busy,
    TimedOut,
}

impl std::fmt::Display for WindowFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WindowFull::Busy => "the send window is full",
            WindowFull::TimedOut => "the call's deadline passed waiting for room in the send window",
        })
    }
}

impl std::error::Error for WindowFull {}

impl WindowFull {
    /// The window error an `io::Error` carries, if it carries one.
    pub(crate) fn of(e: &io::Error) -> Option<WindowFull> {
        e.get_ref()?.downcast_ref::<WindowFull>().copied()
    }
}

/// Whether the sending thread may block until the socket takes its bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A caller or worker: waits (briefly) rather than copy.
    Wait,
    /// The I/O thread: never blocks.
    NoWait,
}

#[derive(Default)]
struct Outbox {
    /// Frames waiting behind the current writer, oldest first; small ones
    /// share buffers.
    queue: VecDeque<Vec<u8>>,
    /// Frames in `queue` (what a corked batch is bounded by); counted
    /// while a batch corks, zeroed as the queue is taken to be written.
    frames: usize,
    /// Emptied buffers (and an emptied queue) kept for the next frames, so
    /// queueing a small frame costs no allocation.
    spare_frames: Vec<Vec<u8>>,
    /// Their capacities, together.
    spare_bytes: usize,
    spare_queue: VecDeque<Vec<u8>>,
    /// How much of the front entry was already sent.
    front_sent: usize,
    /// Bytes queued and not yet taken by the kernel (the queue's length
    /// less `front_sent`, a batch being written included): what the send
    /// window bounds.
    bytes: u64,
    /// A thread holds the writer role.
    writing: bool,
    /// The socket was full: the I/O thread finishes the queue when it drains.
    handed_off: bool,
    /// The queue holds a corked batch that nobody is writing yet (never
    /// true while a thread writes or the queue is handed off: those send
    /// the whole queue).
    corked: bool,
    closed: bool,
}

/// What epoll watches this connection for, and who reads it.
#[derive(Clone, Copy)]
struct Interest {
    /// It is in the epoll set. A TCP connection this rank opened joins it
    /// only once the I/O thread has something to read or write on it: while
    /// only callers that read their own replies use it, epoll need not be
    /// told of every packet (measured: ~0.2 us per round trip). A pipe stays
    /// from its handshake to its close (its bells ring only when asked).
    registered: bool,
    /// The I/O thread reads it (otherwise only hang-ups are reported).
    read: bool,
    write: bool,
    /// A caller (for its reply) or a responder is reading it.
    leader: bool,
    /// Someone needed the I/O thread reading while another thread led: it takes
    /// over when the leader is done.
    wanted: bool,
    /// Parked by this thread at this time (see [`Conn::end_lead_parked`]):
    /// epoll does not report its bytes meanwhile (its end, or a pipe's own
    /// wake bell, still reach the I/O thread, which then reads it, unless
    /// it is a TCP connection out of the epoll set: then nothing is
    /// reported before the I/O thread takes it over).
    parked: Option<(Instant, std::thread::ThreadId)>,
    /// On the list of parked connections the I/O loop looks at
    /// (`Shared::parked`).
    listed: bool,
    /// A pipe's bells are in the epoll set (see `Stream::watch`).
    bells: bool,
}

impl Interest {
    /// Parked by thread `by`.
    fn parked_by(&self, by: std::thread::ThreadId) -> bool {
        self.parked.is_some_and(|(_, parker)| parker == by)
    }
}

/// What the I/O thread's look at a parked connection found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Looked {
    /// Still parked, recently: it stays on the list.
    Parked,
    /// No longer parked (led again, or read by the I/O thread): off the list.
    Left,
    /// Parked for [`PARK_FOR`]: the I/O thread reads it from now on.
    TakenOver,
}

/// Where a connection is in its handshake (stepped by the I/O loop only).
pub(crate) enum Greeting {
    /// Accepted over a same-host socket: the opener's rings are awaited.
    AwaitRings,
    /// Accepted: the server side, fed the client's frames.
    Serve(Handshake),
    /// Opened by this rank: the non-blocking `connect` has not finished, or
    /// (same host) the rings offered are not answered yet.
    Connecting,
    /// Opened by this rank: `Hello` sent; the client side, fed the server's frames.
    Greet(ClientHandshake),
    /// Authenticated: `peer` is set.
    Done,
}

pub(crate) struct Conn {
    pub stream: Stream,
    pub token: u64,
    /// We opened it (our calls go out on it) or accepted it (we serve on it).
    pub outbound: bool,
    /// The rank we opened it to (outbound connections only): known before
    /// the handshake names the peer.
    pub opened_to: Option<usize>,
    pub opened: Instant,
    /// The authenticated rank on the other end (`NO_PEER` until then).
    peer: AtomicUsize,
    /// The peer said it is closing on purpose.
    pub goodbye: AtomicBool,
    out: Mutex<Outbox>,
    /// Signalled when the outbox's bytes go down or it closes: callers
    /// waiting for room in the send window wait here.
    room: Condvar,
    pub reader: Mutex<FrameReader>,
    pub greeting: Mutex<Greeting>,
    interest: Mutex<Interest>,
    epoll: Arc<Epoll>,
    /// The transport, told about corked replies.
    pub owner: std::sync::Weak<super::Shared>,
}

impl Outbox {
    /// Appends a frame made of `parts`, copied into a kept buffer if one is free.
    fn push(&mut self, parts: &[&[u8]]) {
        let len = total_len(parts);
        self.bytes += len as u64;
        self.frames += 1;
        // A small frame joins the newest buffer while it has room (one copy
        // and one write for a batch, not a buffer each). The newest buffer
        // may be one partly sent: it is sent on to its end, which grows.
        if len <= KEEP_FRAME_BUFFER
            && let Some(last) = self.queue.back_mut()
            && last.capacity() - last.len() >= len
        {
            parts.iter().for_each(|p| last.extend_from_slice(p));
            return;
        }
        let spare = if len <= KEEP_FRAME_BUFFER {
            self.spare_frames.pop().inspect(|b| self.spare_bytes -= b.capacity())
        } else {
            None
        };
        // A large frame goes into a reused buffer (no page faults).
        let spare = spare.or_else(|| crate::net::buffers::take_spare_empty(len));
        let mut frame = spare.unwrap_or_else(|| Vec::with_capacity(len.max(KEEP_FRAME_BUFFER)));
        parts.iter().for_each(|p| frame.extend_from_slice(p));
        self.queue.push_back(frame);
    }

    /// Takes the queue to write it, leaving the spare one in its place.
    fn take_queue(&mut self) -> VecDeque<Vec<u8>> {
        self.frames = 0;
        std::mem::replace(&mut self.queue, std::mem::take(&mut self.spare_queue))
    }

    /// Keeps the buffers of a batch that was written.
    fn recycle(&mut self, mut batch: VecDeque<Vec<u8>>) {
        for mut buf in batch.drain(..) {
            if buf.capacity() <= KEEP_FRAME_BUFFER && self.spare_bytes + buf.capacity() <= MAX_SPARE_BYTES {
                buf.clear();
                self.spare_bytes += buf.capacity();
                self.spare_frames.push(buf);
            } else {
                crate::net::buffers::give_back(buf);
            }
        }
        if self.spare_queue.capacity() < batch.capacity() && batch.capacity() <= 4 * MAX_CORKED {
            self.spare_queue = batch;
        }
    }
}

/// Outcome of writing out some bytes.
enum Wrote {
    All,
    /// The socket stopped taking bytes; this many were sent.
    Partly(usize),
}

impl Conn {
    /// A connection in its handshake: accepted (`opened_to` is `None`), or
    /// opened by this rank to `opened_to` with its `connect` under way.
    /// Until the handshake is done, frames are read up to `max_payload`.
    pub(crate) fn new(
        stream: Stream,
        token: u64,
        opened_to: Option<usize>,
        max_payload: u64,
        epoll: Arc<Epoll>,
        owner: std::sync::Weak<super::Shared>,
    ) -> Conn {
        let outbound = opened_to.is_some();
        let is_shm = stream.is_shm();
        Conn {
            stream,
            token,
            outbound,
            opened_to,
            opened: Instant::now(),
            peer: AtomicUsize::new(NO_PEER),
            goodbye: AtomicBool::new(false),
            out: Mutex::new(Outbox::default()),
            room: Condvar::new(),
            reader: Mutex::new(FrameReader::new(max_payload)),
            greeting: Mutex::new(if outbound {
                Greeting::Connecting
            } else if is_shm {
                Greeting::AwaitRings
            } else {
                Greeting::Serve(Handshake::AwaitHello)
            }),
            interest: Mutex::new(Interest {
                // Both kinds join the epoll set at once (`watch_handshake`),
                // watched for reading: the handshake's frames come that way.
                registered: false,
                read: true,
                write: false,
                leader: false,
                wanted: false,
                parked: None,
                listed: false,
                bells: false,
            }),
            epoll,
            owner,
        }
    }

    /// Adds the connection to the epoll set for its handshake: readable,
    /// and for a TCP connection this rank opened also writable (its
    /// `connect` finishing).
    pub(crate) fn watch_handshake(&self) -> io::Result<()> {
        let mut i = self.interest.lock();
        i.write = self.outbound && !self.stream.is_shm();
        self.apply(&mut i, Changed::All)
    }

    /// A pipe's rings are up: its bells join the epoll set.
    pub(crate) fn watch_rings(&self) -> io::Result<()> {
        let mut i = self.interest.lock();
        self.apply(&mut i, Changed::All)
    }

    /// The `connect` of an opened connection finished: stop watching for
    /// writable until something is queued.
    pub(crate) fn connected(&self) -> io::Result<()> {
        self.watch_writable(false)
    }

    /// The rank on the other end, once the handshake has named it.
    pub(crate) fn peer(&self) -> Option<usize> {
        Some(self.peer.load(Ordering::Acquire)).filter(|p| *p != NO_PEER)
    }

    pub(crate) fn set_peer(&self, rank: usize) {
        self.peer.store(rank, Ordering::Release);
    }

    /// Has epoll watch the connection as `i` says (`changed`: what changed).
    fn apply(&self, i: &mut Interest, changed: Changed) -> io::Result<()> {
        let watch = Watch {
            read: i.read,
            write: i.write,
        };
        self.stream
            .watch(&self.epoll, self.token, watch, changed, i.registered, &mut i.bells)?;
        i.registered = true;
        Ok(())
    }

    /// Whether epoll watches for the socket draining (queued bytes to send).
    fn watch_writable(&self, write: bool) -> io::Result<()> {
        let mut i = self.interest.lock();
        if i.write == write {
            return Ok(());
        }
        i.write = write;
        let applied = self.apply(&mut i, Changed::Writes);
        if applied.is_err() {
            i.write = !write;
        }
        applied
    }

    /// Makes sure the I/O thread reads this connection (unless a caller is
    /// reading it now, who hands it back when done).
    pub(crate) fn ensure_read(&self) -> io::Result<()> {
        self.want_reads(false)
    }

    /// Like [`Conn::ensure_read`] for a caller that just sent a request
    /// and goes on: a connection this thread parked stays parked (it comes
    /// back for the replies; should it not, the I/O thread reads it after
    /// [`PARK_FOR`]).
    pub(crate) fn ensure_read_unless_parked(&self) -> io::Result<()> {
        let mut i = self.interest.lock();
        if i.parked_by(std::thread::current().id()) {
            return Ok(());
        }
        self.want_reads_in(&mut i, false)
    }

    /// The I/O thread had an event for this connection but another thread
    /// holds the reader. Events are edge-triggered (not repeated), so it
    /// must be reported again once that thread lets go: a leader re-arms it
    /// when done; a thread merely holding the reader (just before leading,
    /// or just after) is covered by a modify now, which reports it again
    /// while it stays ready.
    pub(crate) fn rearm(&self) -> io::Result<()> {
        self.want_reads(true)
    }

    /// A leader is asked to hand reading back when done; otherwise
    /// the I/O thread reads from now on (`again`: re-polled even if it
    /// already did).
    fn want_reads(&self, again: bool) -> io::Result<()> {
        self.want_reads_in(&mut self.interest.lock(), again)
    }

    /// [`Conn::want_reads`] with the interest held.
    fn want_reads_in(&self, i: &mut Interest, again: bool) -> io::Result<()> {
        if i.leader {
            i.wanted = true;
            return Ok(());
        }
        self.watch_reads(i, again)
    }

    /// Has the I/O thread read the connection; `again` re-polls it even if
    /// it already does. The flags stay as they were if epoll refuses.
    fn watch_reads(&self, i: &mut Interest, again: bool) -> io::Result<()> {
        // Whoever parked it is no longer waited for.
        i.parked = None;
        if i.read && !again {
            return Ok(());
        }
        let was = i.read;
        i.read = true;
        let applied = self.apply(i, if again { Changed::All } else { Changed::Reads });
        if applied.is_err() {
            i.read = was;
        }
        applied
    }

    /// A caller or a responder is reading it, or a caller parked it: the
    /// I/O loop does not spin on it.
    pub(crate) fn is_led(&self) -> bool {
        let i = self.interest.lock();
        i.leader || i.parked.is_some()
    }

    /// It was closed (no more traffic).
    pub(crate) fn is_closed(&self) -> bool {
        self.out.lock().closed
    }

    /// The I/O loop read a pipe without asking the peer to ring, and is
    /// about to sleep: ask now, unless the loop no longer reads it (a
    /// caller or responder leads: it asks for itself before it sleeps).
    pub(crate) fn arm_reads(&self) -> io::Result<()> {
        let i = self.interest.lock();
        if !i.read || i.leader {
            return Ok(());
        }
        self.stream.arm_reads()
    }

    /// A caller or a responder starts reading this connection itself (it
    /// holds `reader`): the I/O thread stops watching it for data.
    pub(crate) fn begin_lead(&self) -> io::Result<()> {
        let mut i = self.interest.lock();
        // A parked connection is taken as it is: no system call.
        i.parked = None;
        if !i.read {
            i.leader = true;
            return Ok(());
        }
        i.read = false;
        let applied = self.apply(&mut i, Changed::Reads);
        if applied.is_err() {
            i.read = true;
        } else {
            i.leader = true;
        }
        applied
    }

    /// The leader is done reading; the I/O thread takes over again if calls
    /// are still in flight on it (an idle connection stays quiet: a hang-up
    /// is reported if it is registered, and the next call finds it anyway).
    pub(crate) fn end_lead(&self, calls_in_flight: bool) -> io::Result<()> {
        let mut i = self.interest.lock();
        i.leader = false;
        let wanted = std::mem::take(&mut i.wanted);
        if !(calls_in_flight || wanted) {
            // A connection this rank opened, that only callers reading their
            // own replies use, leaves the epoll set: epoll then hears of none
            // of its packets (measured: ~0.2 us per round trip). It joins
            // again when the I/O thread has to read or write it. A pipe
            // stays (its data bell unwatched since the lead began, and rung
            // only when asked): leaving and joining cost eight system calls
            // each time a caller's batch of calls all came back.
            if self.outbound && i.registered && !i.write && !self.stream.is_shm() {
                self.stream.unwatch(&self.epoll, &mut i.bells)?;
                i.registered = false;
            }
            return Ok(());
        }
        // Someone needed the loop reading meanwhile (`wanted`: the loop
        // heard an event it could not take, or a sender wants it reading):
        // every descriptor is set anew, so that an event met is reported
        // again.
        self.watch_reads(&mut i, wanted)
    }

    /// Ends the lead of a caller whose wait was answered and who will wait
    /// again for the calls it still has in flight here (`wait_any`, a
    /// completion queue): the connection is parked. The I/O thread does not
    /// read it (epoll does not report its bytes; a pipe's peer is not asked
    /// again to ring), so the replies that come meanwhile wake nobody, and the
    /// caller's next wait leads it as it is, with no system call (measured,
    /// 128 calls of 32 B in flight: handing back woke the I/O thread, which
    /// then read replies beside the caller, and cost a third of the
    /// throughput over shared memory, half over TCP). The parking ends
    /// when a thread leads it again (`begin_lead`), when the parking
    /// thread is about to sleep instead (`unpark_if_parked_by`), when
    /// another thread asks for the I/O thread's reading (`ensure_read`,
    /// `rearm`, a send from another thread), or when the I/O thread finds
    /// it parked for [`PARK_FOR`] (the caller went away). Whether to park
    /// is the caller's guess that nobody else waits on the connection
    /// (`Waiting::AnyReply`'s `covers`); a wrong one costs a reply at most
    /// about two [`PARK_FOR`]. One the I/O thread wanted meanwhile is
    /// handed back as by `end_lead(true)`. True if newly parked: the I/O
    /// thread must be told (`Shared::note_parked`).
    pub(crate) fn end_lead_parked(&self) -> io::Result<bool> {
        let mut i = self.interest.lock();
        if i.wanted {
            drop(i);
            return self.end_lead(true).map(|()| false);
        }
        i.leader = false;
        i.parked = Some((Instant::now(), std::thread::current().id()));
        Ok(!std::mem::replace(&mut i.listed, true))
    }

    /// Ends a parking by thread `by` (it sleeps instead of coming back):
    /// the I/O thread reads the connection from now on.
    pub(crate) fn unpark_if_parked_by(&self, by: std::thread::ThreadId) -> io::Result<()> {
        let mut i = self.interest.lock();
        if !i.parked_by(by) {
            return Ok(());
        }
        self.watch_reads(&mut i, false)
    }

    /// The I/O thread's look at a connection on its list of parked ones:
    /// parked for [`PARK_FOR`], it is read by the I/O thread from now on.
    pub(crate) fn look_parked(&self, now: Instant) -> io::Result<Looked> {
        let mut i = self.interest.lock();
        match i.parked {
            Some((at, _)) if now.saturating_duration_since(at) < PARK_FOR => Ok(Looked::Parked),
            Some(_) => {
                i.listed = false;
                self.watch_reads(&mut i, false).map(|()| Looked::TakenOver)
            }
            // Led again, or read by the I/O thread: a new parking lists it
            // anew (a long lead does not keep the loop looking).
            None => {
                i.listed = false;
                Ok(Looked::Left)
            }
        }
    }

    /// Sends one frame (see the module docs for who writes when). A frame
    /// that would be copied into the outbox first waits for room in
    /// `window`, if one is given.
    pub(crate) fn send(
        &self,
        header: Header,
        name: &[u8],
        payload: &[u8],
        mode: Mode,
        window: Option<Window>,
    ) -> io::Result<()> {
        self.send_parts(header, name, &[payload], mode, window)
    }

    /// Like [`Conn::send`], the payload given in parts (written from where
    /// they are, with vectored writes).
    pub(crate) fn send_parts(
        &self,
        mut header: Header,
        name: &[u8],
        payload: &[&[u8]],
        mode: Mode,
        window: Option<Window>,
    ) -> io::Result<()> {
        header.name_len = name.len() as u16;
        header.payload_len = total_len(payload) as u64;
        let head = wire::encode_header(&header);
        let pieces = Pieces::of(&head, name, payload);
        let parts = pieces.as_slice();
        let len = head.len() as u64 + name.len() as u64 + header.payload_len;
        // A request written straight from the caller's buffers still counts
        // against the window while it is written: if the socket stalls, its
        // rest is copied into the outbox.
        let mut in_flight = 0;
        {
            let mut out = self.out.lock();
            if out.closed {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            if let Some(w) = window {
                out = self.wait_for_room(out, len, w)?;
            }
            if out.writing || out.handed_off {
                out.push(parts);
                return Ok(());
            }
            out.writing = true;
            if out.corked {
                // A corked batch goes first, and this frame with it.
                out.corked = false;
                out.push(parts);
                drop(out);
                return self.write_queued(mode, 0);
            }
            if window.is_some() {
                out.bytes += len;
                in_flight = len;
            }
        }
        match self.write_all(parts, 0, mode) {
            Ok(Wrote::All) => self.write_queued(mode, in_flight),
            Ok(Wrote::Partly(sent)) => self.hand_off(VecDeque::from([parts.concat()]), sent),
            Err(e) => Err(self.broken(e)),
        }
    }

    /// Queues a frame without writing it, for a thread issuing a burst of
    /// calls: the batch leaves in one write when the thread waits, with the
    /// next frame written on this connection, when it reaches
    /// [`MAX_CORKED`] frames, or from the I/O loop within about a
    /// millisecond. True if this frame starts a corked batch.
    pub(crate) fn send_corked(
        &self,
        header: Header,
        name: &[u8],
        payload: &[u8],
        window: Option<Window>,
    ) -> io::Result<bool> {
        self.send_corked_parts(header, name, &[payload], window)
    }

    /// Like [`Conn::send_corked`], the payload given in parts.
    pub(crate) fn send_corked_parts(
        &self,
        mut header: Header,
        name: &[u8],
        payload: &[&[u8]],
        window: Option<Window>,
    ) -> io::Result<bool> {
        header.name_len = name.len() as u16;
        header.payload_len = total_len(payload) as u64;
        let head = wire::encode_header(&header);
        let mut out = self.out.lock();
        if out.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        if let Some(w) = window {
            out = self.wait_for_room(out, head.len() as u64 + name.len() as u64 + header.payload_len, w)?;
        }
        out.push(Pieces::of(&head, name, payload).as_slice());
        if out.writing || out.handed_off {
            return Ok(false); // the writer takes it
        }
        if out.frames >= MAX_CORKED {
            out.corked = false;
            out.writing = true;
            drop(out);
            self.write_queued(mode_here(), 0)?;
            return Ok(false);
        }
        let starts = !out.corked;
        out.corked = true;
        Ok(starts)
    }

    /// Waits (holding the outbox's lock between looks) until a frame of
    /// `len` bytes fits in `window`: the outbox is empty (one frame larger
    /// than the window goes alone) or has room, or it closed (the send then
    /// fails as usual). A corked batch nobody is writing is written by this
    /// thread first: it may be this thread's own.
    fn wait_for_room<'a>(
        &'a self,
        mut out: MutexGuard<'a, Outbox>,
        len: u64,
        window: Window,
    ) -> io::Result<MutexGuard<'a, Outbox>> {
        let mut flushed_own = false;
        while !out.closed && !window.fits(out.bytes, len) {
            if out.corked && !out.writing && !out.handed_off && !flushed_own {
                // Written in the mode this thread may use: a thread that
                // must not block hands what the socket will not take to
                // the I/O loop.
                flushed_own = true;
                out.corked = false;
                out.writing = true;
                drop(out);
                self.write_queued(if window.may_block { Mode::Wait } else { Mode::NoWait }, 0)?;
                out = self.out.lock();
                continue;
            }
            if !window.may_block {
                return Err(io::Error::other(WindowFull::Busy));
            }
            if !window.wait(&self.room, &mut out) && !out.closed && !window.fits(out.bytes, len) {
                return Err(io::Error::other(WindowFull::TimedOut));
            }
        }
        if out.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        Ok(out)
    }

    /// Writes a corked batch, if there is one.
    pub(crate) fn flush_cork(&self) -> io::Result<()> {
        {
            let mut out = self.out.lock();
            if !out.corked || out.writing || out.handed_off {
                return Ok(());
            }
            out.corked = false;
            out.writing = true;
        }
        self.write_queued(mode_here(), 0)
    }

    /// Writes `parts` from byte `skip` on; in `Wait` mode waits (bounded)
    /// for the socket when it is full. `Partly` counts from `skip`.
    fn write_all<P: AsRef<[u8]>>(&self, parts: &[P], skip: usize, mode: Mode) -> io::Result<Wrote> {
        let total: usize = parts.iter().map(|p| p.as_ref().len()).sum::<usize>() - skip;
        let mut sent = 0;
        let mut waited_since: Option<Instant> = None;
        while sent < total {
            let result = self.stream.write_some(parts, skip + sent);
            match result {
                Ok(n) => {
                    sent += n;
                    waited_since = None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let since = *waited_since.get_or_insert_with(Instant::now);
                    let left = WAIT_FOR_SOCKET.saturating_sub(since.elapsed());
                    if mode == Mode::NoWait || left.is_zero() {
                        return Ok(Wrote::Partly(sent));
                    }
                    self.stream.wait_writable(total - sent, left)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Wrote::All)
    }

    /// Takes the writer role while the I/O thread reads a batch of requests,
    /// so the replies produced meanwhile leave in one write at the end
    /// ([`Conn::uncork`]). False if another thread is writing.
    pub(crate) fn cork(&self) -> bool {
        let mut out = self.out.lock();
        if out.writing || out.handed_off || out.closed {
            return false;
        }
        // The writer sends the whole queue, corked frames included.
        out.corked = false;
        out.writing = true;
        true
    }

    /// Ends a [`Conn::cork`]: sends what queued.
    pub(crate) fn uncork(&self) -> io::Result<()> {
        self.write_queued(Mode::NoWait, 0)
    }

    /// Holding the writer role: sends what queued behind us, then lets go.
    /// `sent` bytes counted in the outbox already left (a frame written
    /// straight from the caller's buffers).
    fn write_queued(&self, mode: Mode, sent: u64) -> io::Result<()> {
        let mut written: Option<(VecDeque<Vec<u8>>, u64)> = None;
        let mut sent = sent;
        loop {
            let (mut batch, front_sent) = {
                let mut out = self.out.lock();
                if let Some((done, bytes)) = written.take() {
                    sent += bytes;
                    out.recycle(done);
                }
                if sent > 0 {
                    out.bytes -= std::mem::take(&mut sent);
                    self.room.notify_all();
                }
                if out.queue.is_empty() {
                    out.writing = false;
                    return Ok(());
                }
                let front_sent = std::mem::take(&mut out.front_sent);
                (out.take_queue(), front_sent)
            };
            match self.write_all(batch.make_contiguous(), front_sent, mode) {
                Ok(Wrote::All) => {
                    let bytes = batch.iter().map(|f| f.len() as u64).sum::<u64>() - front_sent as u64;
                    written = Some((batch, bytes));
                }
                Ok(Wrote::Partly(sent)) => return self.hand_off(batch, front_sent + sent),
                Err(e) => return Err(self.broken(e)),
            }
        }
    }

    /// Gives up the writer role with `unsent` (of which the first `skip`
    /// bytes are sent) still to go: it goes before whatever queued since, and
    /// the I/O thread finishes it when the socket drains.
    fn hand_off(&self, mut unsent: VecDeque<Vec<u8>>, mut skip: usize) -> io::Result<()> {
        // Only the leading frames that went out whole are done; the first
        // one that did not keeps its offset, and every frame after it stays.
        while let Some(front) = unsent.front()
            && skip >= front.len()
        {
            skip -= front.len();
            unsent.pop_front();
        }
        let mut out = self.out.lock();
        unsent.extend(out.queue.drain(..));
        out.queue = unsent;
        out.front_sent = skip;
        out.bytes = out.queue.iter().map(|f| f.len() as u64).sum::<u64>() - skip as u64;
        self.room.notify_all();
        out.writing = false;
        out.handed_off = true;
        // The I/O thread now owns the whole queue, corked frames included.
        out.corked = false;
        // Under the outbox lock, so the interest always matches the state.
        let armed = self.watch_writable(true);
        if armed.is_err() {
            // Nobody would ever finish the queue: the connection fails now
            // (its reader sees the end, and the rank's calls fail with
            // PEER_LOST) rather than leave callers to their deadlines.
            out.closed = true;
            self.stream.shutdown();
        }
        armed
    }

    fn broken(&self, e: io::Error) -> io::Error {
        let mut out = self.out.lock();
        out.closed = true;
        out.writing = false;
        self.room.notify_all();
        e
    }

    /// The socket drained (I/O thread): finish what was handed off.
    pub(crate) fn flush(&self) -> io::Result<()> {
        {
            let mut out = self.out.lock();
            if out.writing || !out.handed_off {
                return Ok(());
            }
            out.handed_off = false;
            out.writing = true;
            // This thread finishes the queue: a pipe's room bell is its to
            // empty (the next ring then raises a new event).
            self.stream.drain_bell(super::stream::Part::Room);
            self.watch_writable(false)?;
        }
        self.write_queued(Mode::NoWait, 0)
    }

    /// True when everything sent has left this process.
    pub(crate) fn flushed(&self) -> bool {
        let out = self.out.lock();
        (out.queue.is_empty() && !out.writing) || out.closed
    }

    /// Stops all traffic; the descriptor closes when the last user drops it.
    pub(crate) fn close(&self) {
        self.out.lock().closed = true;
        self.room.notify_all();
        let _ = self.stream.unwatch(&self.epoll, &mut self.interest.lock().bells);
        self.stream.shutdown();
    }

    /// A response frame for `outcome`, and its payload.
    pub(crate) fn response(id: u64, outcome: &Outcome) -> (Header, &[u8]) {
        let mut header = Header::new(Kind::Response);
        header.request_id = id;
        match outcome {
            Ok(data) => (header, data.bytes()),
            Err((status, message)) => {
                header.status = *status as i32;
                debug_assert_ne!(*status, Status::Ok);
                (header, message.as_bytes())
            }
        }
    }
}

/// A frame's pieces as one list (header, name, then the payload's parts):
/// on the stack for the usual payload of one part.
enum Pieces<'a> {
    Three([&'a [u8]; 3]),
    Many(Vec<&'a [u8]>),
}

impl<'a> Pieces<'a> {
    fn of(head: &'a [u8], name: &'a [u8], payload: &[&'a [u8]]) -> Pieces<'a> {
        match payload {
            [] => Pieces::Three([head, name, &[]]),
            [one] => Pieces::Three([head, name, one]),
            many => Pieces::Many([head, name].into_iter().chain(many.iter().copied()).collect()),
        }
    }

    fn as_slice(&self) -> &[&'a [u8]] {
        match self {
            Pieces::Three(three) => three,
            Pieces::Many(many) => many,
        }
    }
}

/// The send mode for the calling thread: the I/O loop and the deadline
/// thread never wait.
pub(crate) fn mode_here() -> Mode {
    if crate::threads::may_block() {
        Mode::Wait
    } else {
        Mode::NoWait
    }
}

#[cfg(test)]
mod tests {
    use super::super::stream::{Part, Setup, ShmBudget, ShmStream};
    use super::*;
    use crate::net::framing::slices_from;
    use crate::net::sys::MAX_IOV;
    use std::io::{IoSlice, Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// A connection this rank opened (token 7, its handshake done, not yet
    /// in its epoll set), the peer's end of it, and the epoll set.
    fn opened_connection() -> (Conn, TcpStream, Arc<Epoll>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.set_nonblocking(true).unwrap();
        let epoll = Arc::new(Epoll::new().unwrap());
        let conn = Conn::new(
            Stream::Tcp(client),
            7,
            Some(1),
            1 << 30,
            epoll.clone(),
            std::sync::Weak::new(),
        );
        // As if the handshake had been done, and before it joins epoll.
        conn.set_peer(1);
        *conn.greeting.lock() = Greeting::Done;
        conn.interest.lock().read = false;
        (conn, server, epoll)
    }

    /// A large frame the socket takes only part of, with a small frame
    /// queued behind it: the rest of the large one and all of the small one
    /// must follow, in order (the hand-off once dropped the small frame and
    /// resent part of the large one).
    #[test]
    fn a_partly_sent_batch_is_finished_whole_and_in_order() {
        let (conn, server, _epoll) = opened_connection();
        let big = vec![0xABu8; 16 << 20];
        let small = b"tiny-payload".to_vec();
        let mut expected = wire::encode_frame(Header::new(Kind::Request), b"big", &big);
        expected.extend(wire::encode_frame(Header::new(Kind::Request), b"s", &small));
        conn.send_corked(Header::new(Kind::Request), b"big", &big, None)
            .unwrap();
        conn.send_corked(Header::new(Kind::Request), b"s", &small, None)
            .unwrap();
        // Nobody reads yet: the writer gives up on the full socket after
        // WAIT_FOR_SOCKET and hands the rest off.
        conn.flush_cork().unwrap();
        assert!(conn.out.lock().handed_off, "the socket took 16 MiB at once");
        finish_handed_off(&conn, server, &expected);
    }

    /// Finishes a handed-off queue as the I/O thread does each time the
    /// socket drains, while `server` reads: it must get `expected`.
    fn finish_handed_off(conn: &Conn, mut server: TcpStream, expected: &[u8]) {
        let total = expected.len();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; total];
            server.read_exact(&mut got).unwrap();
            got
        });
        while !conn.flushed() {
            conn.flush().unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        let got = reader.join().unwrap();
        let first_difference = got.iter().zip(expected).position(|(a, b)| a != b);
        assert_eq!(first_difference, None, "of {total} bytes");
    }

    /// A same-host connection this rank opened (token 7, its rings up and
    /// its handshake done, in its epoll set as after the handshake), the
    /// peer's side of it, and the epoll set.
    fn opened_pipe() -> (Conn, ShmStream, Arc<Epoll>) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let budget = ShmBudget::for_this_process();
        let spin = Duration::ZERO;
        let opener = ShmStream::offer(a, 4096, spin, budget.take().unwrap()).unwrap();
        let acceptor = ShmStream::accepted(b, spin, budget.take().unwrap()).unwrap();
        let started = Instant::now();
        while acceptor.step_setup().unwrap() != Setup::Done || opener.step_setup().unwrap() != Setup::Done {
            assert!(started.elapsed() < Duration::from_secs(5), "the rings never came up");
        }
        let epoll = Arc::new(Epoll::new().unwrap());
        let conn = Conn::new(
            Stream::Shm(Box::new(opener)),
            7,
            Some(1),
            1 << 30,
            epoll.clone(),
            std::sync::Weak::new(),
        );
        conn.set_peer(1);
        *conn.greeting.lock() = Greeting::Done;
        conn.watch_handshake().unwrap();
        let _ = parts_reported(&epoll, 0);
        (conn, acceptor, epoll)
    }

    /// `opened_pipe`, its reading taken over by a caller.
    fn led_pipe() -> (Conn, ShmStream, Arc<Epoll>) {
        let (conn, peer, epoll) = opened_pipe();
        conn.begin_lead().unwrap();
        (conn, peer, epoll)
    }

    /// The connection's parts that epoll reports within `ms`.
    fn parts_reported(epoll: &Epoll, ms: i32) -> Vec<Part> {
        let mut events = Vec::new();
        epoll.wait(&mut events, ms).unwrap();
        events.iter().map(|e| Part::split(*e).1).collect()
    }

    /// A caller that read its replies and left no call in flight hands the
    /// pipe back without taking it out of the epoll set: the peer's end is
    /// still reported at once.
    #[test]
    fn an_idle_pipe_still_reports_its_peer_going() {
        let (conn, peer, epoll) = led_pipe();
        conn.end_lead(false).unwrap();
        assert!(parts_reported(&epoll, 50).is_empty(), "nothing happened yet");
        drop(peer);
        assert!(
            parts_reported(&epoll, 5000).contains(&Part::Socket),
            "the peer's end was not reported"
        );
    }

    /// The peer's end, reported while a caller led (the loop could not
    /// take it: `rearm`), is reported again once the caller hands back.
    #[test]
    fn a_pipe_end_met_while_a_caller_led_is_reported_again() {
        let (conn, peer, epoll) = led_pipe();
        drop(peer);
        assert!(parts_reported(&epoll, 5000).contains(&Part::Socket));
        // What the loop does with an event on a connection another thread reads.
        conn.rearm().unwrap();
        assert!(
            !parts_reported(&epoll, 50).contains(&Part::Socket),
            "reported twice while led"
        );
        conn.end_lead(true).unwrap();
        assert!(
            parts_reported(&epoll, 5000).contains(&Part::Socket),
            "the end was not reported again"
        );
    }

    /// Bytes that came while nobody read an idle pipe (nobody asked the
    /// peer to ring) are reported once the loop is asked to read it.
    #[test]
    fn bytes_left_in_an_idle_pipe_are_found_when_reading_resumes() {
        let (conn, peer, epoll) = led_pipe();
        conn.end_lead(false).unwrap();
        assert_eq!(peer.pipe().unwrap().write(&[b"late reply"], 0).unwrap(), 10);
        assert!(parts_reported(&epoll, 50).is_empty(), "the peer rang unasked");
        conn.ensure_read().unwrap();
        assert!(
            parts_reported(&epoll, 5000).contains(&Part::Wake),
            "the bytes waiting were not reported"
        );
    }

    /// When `conn` was parked.
    fn parked_at(conn: &Conn) -> Instant {
        conn.interest.lock().parked.expect("parked").0
    }

    /// A caller parks a pipe: bytes that come meanwhile are not reported
    /// (its data bell is unwatched), a request this thread sends meanwhile
    /// leaves it parked, the caller's next lead takes it as it is; parked
    /// for `PARK_FOR`, the loop's look has the loop read it.
    #[test]
    fn a_parked_pipe_waits_for_its_caller_then_for_the_loop() {
        let (conn, peer, epoll) = led_pipe();
        assert!(conn.end_lead_parked().unwrap(), "not newly parked");
        assert!(conn.is_led(), "the loop may spin on a parked pipe");
        assert_eq!(peer.pipe().unwrap().write(&[b"a reply"], 0).unwrap(), 7);
        conn.ensure_read_unless_parked().unwrap();
        assert!(parts_reported(&epoll, 50).is_empty(), "a parked pipe was reported");
        conn.begin_lead().unwrap();
        assert!(!conn.end_lead_parked().unwrap(), "listed twice");
        let at = parked_at(&conn);
        assert_eq!(conn.look_parked(at).unwrap(), Looked::Parked);
        assert!(parts_reported(&epoll, 50).is_empty(), "reported while fresh");
        assert_eq!(conn.look_parked(at + PARK_FOR).unwrap(), Looked::TakenOver);
        assert!(!conn.is_led());
        assert!(
            parts_reported(&epoll, 5000).contains(&Part::Wake),
            "the bytes waiting were not reported"
        );
        // Led and parked again: listed anew. Led again: off the list.
        conn.begin_lead().unwrap();
        assert!(conn.end_lead_parked().unwrap(), "not listed anew");
        conn.begin_lead().unwrap();
        assert_eq!(conn.look_parked(Instant::now()).unwrap(), Looked::Left);
    }

    /// A TCP connection out of the epoll set (only callers read it) parks
    /// too: the loop's look adds it, and the bytes and the end that came
    /// meanwhile are reported.
    #[test]
    fn a_parked_tcp_connection_out_of_epoll_is_added_with_what_came() {
        let (conn, mut server, epoll) = opened_connection();
        conn.begin_lead().unwrap();
        assert!(conn.end_lead_parked().unwrap());
        server.write_all(b"a reply").unwrap();
        drop(server);
        let mut events = Vec::new();
        epoll.wait(&mut events, 50).unwrap();
        assert!(events.is_empty(), "a connection out of the set was reported");
        assert_eq!(
            conn.look_parked(parked_at(&conn) + PARK_FOR).unwrap(),
            Looked::TakenOver
        );
        epoll.wait(&mut events, 5000).unwrap();
        assert_eq!(events.len(), 1, "the bytes and the end were not reported");
        assert!(events[0].readable() && events[0].closed(), "{:?}", events[0].events);
    }

    /// A TCP connection parks too: bytes that come meanwhile are not
    /// reported; once the loop's look hands it back they are.
    #[test]
    fn a_parked_tcp_connection_is_reported_once_handed_back() {
        let (conn, mut server, epoll) = opened_connection();
        conn.ensure_read().unwrap();
        conn.begin_lead().unwrap();
        assert!(conn.end_lead_parked().unwrap());
        server.write_all(b"a reply").unwrap();
        let mut events = Vec::new();
        epoll.wait(&mut events, 50).unwrap();
        assert!(events.is_empty(), "a parked connection was reported");
        assert_eq!(
            conn.look_parked(parked_at(&conn) + PARK_FOR).unwrap(),
            Looked::TakenOver
        );
        epoll.wait(&mut events, 5000).unwrap();
        assert_eq!(
            events.iter().map(|e| e.token).collect::<Vec<_>>(),
            [7],
            "the bytes waiting were not reported"
        );
    }

    /// Asking for the loop's reading ends a parking at once (`ensure_read`;
    /// `unpark` from the thread that parked it; a send from another
    /// thread); a lead during which the loop wanted the connection does
    /// not end in one.
    #[test]
    fn asking_for_the_loop_ends_or_prevents_a_parking() {
        let (conn, peer, epoll) = led_pipe();
        assert!(conn.end_lead_parked().unwrap());
        assert_eq!(peer.pipe().unwrap().write(&[b"a reply"], 0).unwrap(), 7);
        conn.ensure_read().unwrap();
        assert!(!conn.is_led());
        assert!(parts_reported(&epoll, 5000).contains(&Part::Wake), "not reported");
        assert_eq!(conn.look_parked(Instant::now()).unwrap(), Looked::Left);
        let by_unpark = |c: &Conn| {
            let another = std::thread::scope(|s| s.spawn(|| std::thread::current().id()).join().unwrap());
            c.unpark_if_parked_by(another).unwrap();
            assert!(c.is_led(), "another thread ended the parking");
            c.unpark_if_parked_by(std::thread::current().id()).unwrap();
        };
        let by_another_sender =
            |c: &Conn| std::thread::scope(|s| s.spawn(|| c.ensure_read_unless_parked().unwrap()).join().unwrap());
        for end_parking in [&by_unpark as &dyn Fn(&Conn), &by_another_sender] {
            conn.begin_lead().unwrap();
            conn.end_lead_parked().unwrap();
            assert!(conn.is_led());
            end_parking(&conn);
            assert!(!conn.is_led(), "still parked");
        }
        conn.begin_lead().unwrap();
        conn.rearm().unwrap();
        assert!(!conn.end_lead_parked().unwrap());
        assert!(!conn.is_led(), "parked though the loop wanted it");
    }

    /// Small frames share queued buffers, a partly sent one included (it
    /// grows at its end while its start is out): every byte still leaves
    /// once and in order.
    #[test]
    fn small_frames_sharing_buffers_leave_in_order() {
        let (conn, server, _epoll) = opened_connection();
        let mut expected = Vec::new();
        let mut send = |i: u32| {
            let payload = [(i % 251) as u8; 97];
            let mut header = Header::new(Kind::Request);
            header.request_id = u64::from(i);
            expected.extend(wire::encode_frame(header, b"f", &payload));
            conn.send_corked(header, b"f", &payload, None).unwrap();
        };
        // Until the socket is full (nobody reads yet) and the queue handed
        // off, a buffer partly sent; then more frames join the queue.
        let mut i = 0;
        while !conn.out.lock().handed_off {
            assert!(i < 10_000_000, "the socket never filled");
            send(i);
            i += 1;
        }
        for _ in 0..5000 {
            send(i);
            i += 1;
        }
        let buffers = conn.out.lock().queue.len();
        assert!(buffers < 5000 / 10, "5000 frames queued in {buffers} buffers");
        finish_handed_off(&conn, server, &expected);
    }

    /// The I/O thread takes an event but another thread holds the reader
    /// (not leading: about to, or just done). Edge-triggered, the event is
    /// not repeated by itself; `rearm` must have it reported again.
    #[test]
    fn an_event_met_while_the_reader_is_held_is_reported_again() {
        let (conn, mut server, epoll) = opened_connection();
        conn.ensure_read().unwrap();
        server.write_all(b"a reply").unwrap();
        let mut events = Vec::new();
        epoll.wait(&mut events, 5000).unwrap();
        assert_eq!(events.iter().map(|e| e.token).collect::<Vec<_>>(), [7]);
        let held = conn.reader.lock();
        conn.rearm().unwrap();
        drop(held);
        epoll.wait(&mut events, 1000).unwrap();
        assert_eq!(
            events.iter().map(|e| e.token).collect::<Vec<_>>(),
            [7],
            "the event was lost"
        );
    }

    /// Fills the socket's send buffer (the peer reads nothing).
    fn fill_socket(conn: &Conn) {
        let junk = vec![0u8; 1 << 16];
        loop {
            match crate::net::sys::send_one(conn.stream.tcp().unwrap(), &junk) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
    }

    const WINDOW: u64 = 1 << 20;

    fn window(may_block: bool) -> Window {
        Window {
            bytes: WINDOW,
            deadline: Some(Instant::now() + Duration::from_millis(600)),
            may_block,
        }
    }

    /// A frame written straight from the caller's buffer counts while it is
    /// written: a second frame that would pass the window waits (here to
    /// its deadline), instead of both ending up copied in the outbox.
    #[test]
    fn a_direct_write_counts_against_the_send_window() {
        let (conn, _server, _epoll) = opened_connection();
        let conn = Arc::new(conn);
        fill_socket(&conn);
        let frame = vec![1u8; (WINDOW as usize) - 100];
        let (writer, payload) = (conn.clone(), frame.clone());
        let first = std::thread::spawn(move || {
            writer.send(
                Header::new(Kind::Request),
                b"a",
                &payload,
                Mode::Wait,
                Some(window(true)),
            )
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(conn.out.lock().writing, "the first frame is not being written");
        let second = conn.send(Header::new(Kind::Request), b"b", &frame, Mode::Wait, Some(window(true)));
        assert_eq!(WindowFull::of(&second.unwrap_err()), Some(WindowFull::TimedOut));
        first.join().unwrap().unwrap();
        assert!(conn.out.lock().bytes <= WINDOW);
    }

    /// A thread that must not block first writes its own corked batch:
    /// BUSY only when the socket itself is full.
    #[test]
    fn busy_only_when_the_socket_is_full_too() {
        let (conn, _server, _epoll) = opened_connection();
        let frame = vec![1u8; 300 << 10];
        for _ in 0..4 {
            conn.send_corked(Header::new(Kind::Request), b"x", &frame, Some(window(false)))
                .unwrap();
        }
        fill_socket(&conn);
        while !conn.out.lock().handed_off {
            let _ = conn.send_corked(Header::new(Kind::Request), b"x", &frame, Some(window(false)));
        }
        let err = conn
            .send_corked(Header::new(Kind::Request), b"x", &frame, Some(window(false)))
            .unwrap_err();
        assert_eq!(WindowFull::of(&err), Some(WindowFull::Busy));
    }

    /// A caller waiting for room when the connection closes gets the
    /// connection's error, and queues nothing.
    #[test]
    fn a_waiter_for_room_fails_when_the_connection_closes() {
        let (conn, _server, _epoll) = opened_connection();
        let conn = Arc::new(conn);
        fill_socket(&conn);
        let big = vec![1u8; 2 << 20];
        conn.send(Header::new(Kind::Request), b"a", &big, Mode::NoWait, None)
            .unwrap();
        assert!(conn.out.lock().handed_off);
        let waiter = conn.clone();
        let waiting = std::thread::spawn(move || {
            let no_deadline = Window {
                deadline: None,
                ..window(true)
            };
            waiter.send(
                Header::new(Kind::Request),
                b"b",
                &[0u8; 100],
                Mode::Wait,
                Some(no_deadline),
            )
        });
        std::thread::sleep(Duration::from_millis(100));
        let queued = conn.out.lock().bytes;
        conn.close();
        let err = waiting.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(conn.out.lock().bytes, queued);
    }

    #[test]
    fn iovecs_cover_many_parts_from_any_offset() {
        let parts: Vec<Vec<u8>> = (0..200u8).map(|i| vec![i; (i as usize % 7) + 1]).collect();
        let flat = parts.concat();
        for skip in [0, 1, 5, 100, 300, flat.len() - 1] {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let n = slices_from(&parts, skip, &mut slices);
            let joined: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
            assert!(n > 0 && n <= MAX_IOV);
            assert_eq!(&flat[skip..skip + joined.len()], &joined[..]);
        }
    }
}
