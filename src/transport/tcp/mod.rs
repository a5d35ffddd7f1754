//! The TCP transport: one listening socket per rank, one connection per
//! direction per pair of ranks (a rank's calls go out on the connection it
//! opened and the replies come back on it), opened lazily on first use. One
//! I/O thread runs an epoll loop over the listener and every connection, so
//! the number of threads does not depend on the number of peers or calls.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::auth::{self, ClientHandshake, ClientStep, Step};
use crate::config::Config;
use crate::error::{Result, RpcError};
use crate::log::log_at;
use crate::rendezvous;
use crate::wire::{self, FLAG_INTERNAL, Header, Hello, Kind, MAX_HANDSHAKE_PAYLOAD, NONCE_LEN, Table};
use rustc_hash::FxHashMap;

use super::{Dispatch, Executor, InRequest, OutRequest, Transport};

mod conn;

use crate::net::framing::{Frame, FrameReader, ReadEnd};
use crate::net::sys::{self, Epoll, Event, READABLE};

use crate::threads::Kept;
use conn::{Conn, Greeting, Mode};

impl super::ReplySink for Conn {
    /// A worker with more jobs waiting corks its reply: the next replies
    /// join it in one write (flushed when the worker runs out of work).
    fn send_reply(&self, id: u64, outcome: super::Outcome) {
        let (header, payload) = Conn::response(id, &outcome);
        // A failed send means the connection is broken; its reader sees that
        // and reports the peer, so there is nothing more to do here.
        if crate::threads::more_work() && !crate::threads::is_io_thread() {
            // Only the reply that starts a batch needs the batch recorded.
            if let Ok(true) = self.send_corked(header, &[], payload)
                && let Some(owner) = self.owner.upgrade()
                && let Some(me) = owner.conns.lock().get(&self.token).cloned()
            {
                owner.corked(&me, true);
            }
        } else {
            let _ = self.send(header, &[], payload, conn::mode_here());
        }
        // The reply has left (or been copied): its buffer can take the next
        // large message.
        if let Ok(data) = outcome {
            crate::net::buffers::give_back(data);
        }
    }
}

/// A connection that has not finished its handshake by then is closed.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often connections in their handshake are checked for that timeout.
const HANDSHAKE_SWEEP: Duration = Duration::from_millis(250);
/// How long a caller waiting for its reply looks for it (yielding between
/// looks) before it sleeps on the socket.
const SPIN_FOR: Duration = Duration::from_micros(50);
/// A caller whose reply another thread reads spins for it only while at
/// most this many calls to that rank are in flight (measured: 16 in flight
/// gains 20-100%, 128 in flight loses ~10% when it spins).
const SPIN_MAX_IN_FLIGHT: usize = 32;
/// How long a caller reading its own reply waits before it looks again at
/// whether its call completed some other way.
const LEAD_SLICE: Duration = Duration::from_millis(100);
/// A responder that has waited this long for a request gives its connection
/// back to the I/O loop (and its thread back to the pool). The kernel rounds
/// it up to its timer tick (4 ms at 250 Hz): that long, plus one pass, is
/// how long a job may wait for a thread while the responder waits, when
/// every other pool thread is busy.
const RESPONDER_IDLE: Duration = Duration::from_millis(2);
const LISTENER: u64 = 0;
const WAKER: u64 = 1;

/// What a rank knows after the rendezvous: its listener and the world.
pub(crate) struct JoinedWorld {
    listener: TcpListener,
    listen_addr: SocketAddr,
    table: Table,
}

impl JoinedWorld {
    pub(crate) fn names(&self) -> Vec<String> {
        self.table.ranks.iter().map(|(name, _)| name.clone()).collect()
    }
}

/// Resolves `host:port`, preferring IPv4.
pub(crate) fn resolve(host: &str, port: u16) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| RpcError::Init(format!("cannot resolve '{host}': {e}")))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| RpcError::Init(format!("'{host}' has no address")))
}

/// The local address this host uses to reach `master` (no packet is sent).
fn local_ip_towards(master: SocketAddr) -> Result<IpAddr> {
    if master.ip().is_loopback() {
        return Ok(master.ip());
    }
    let unspecified: SocketAddr = if master.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        "[::]:0".parse().expect("valid address")
    };
    let probe = UdpSocket::bind(unspecified).and_then(|s| {
        s.connect(master)?;
        s.local_addr()
    });
    probe
        .map(|a| a.ip())
        .map_err(|e| RpcError::Init(format!("no route to the master {master}: {e}")))
}

/// Opens this rank's listener and meets the others at the rendezvous.
pub(crate) fn join_world(config: &Config) -> Result<JoinedWorld> {
    let master = resolve(&config.master_host, config.master_port)?;
    let ip = match &config.bind {
        Some(host) => resolve(host, 0)?.ip(),
        None => local_ip_towards(master)?,
    };
    let listener = sys::listen((ip, 0).into()).map_err(|e| RpcError::Init(format!("cannot listen on {ip}: {e}")))?;
    let listen_addr = listener.local_addr()?;
    let join = wire::Join {
        rank: config.rank as u32,
        world_size: config.world_size as u32,
        name: config.worker_name(),
        addr: listen_addr.to_string(),
    };
    let table = rendezvous::rendezvous(config, master, join)?;
    Ok(JoinedWorld {
        listener,
        listen_addr,
        table,
    })
}

/// How this rank's calls reach one peer. Lock order: a peer's `state`
/// (never two at once), then `Shared::opening`, then `Shared::conns`, then
/// a connection's own locks. The I/O loop takes the first three while it
/// holds a connection's `reader` (stepping a handshake); that is safe
/// because every other taker of a `reader` only tries it (`try_lock`).
enum PeerState {
    Idle,
    /// The I/O loop opens `conn` (connect, handshake), or will once fewer
    /// than [`MAX_OPENING`] connections are opening (`None`); calls made
    /// meanwhile wait in `queued`, in order, and leave when it is ready.
    Connecting {
        conn: Option<Arc<Conn>>,
        queued: Vec<Queued>,
    },
    Ready(Arc<Conn>),
    /// Worlds have a fixed membership: a rank whose connection failed stays lost.
    Lost(RpcError),
}

/// A request waiting for its connection to open.
struct Queued {
    id: u64,
    internal: bool,
    function: Box<str>,
    args: Vec<u8>,
    deadline: Option<Instant>,
}

impl Queued {
    fn of(request: &OutRequest<'_>) -> Queued {
        Queued {
            id: request.id,
            internal: request.internal,
            function: request.function.into(),
            args: request.args.to_vec(),
            deadline: request.deadline,
        }
    }
}

/// At most this many connections of one rank are in their handshake at
/// once; the next rank's waits its turn. When every rank of a large world
/// calls every other at once, handshakes without a bound pile up on each
/// server faster than it can answer them, until they pass their 5 s limit
/// (seen with 256 ranks on 2 cores); taken in turns they finish in a few
/// round trips each.
const MAX_OPENING: usize = 32;

/// Queued requests whose calls expired are dropped once the queue holds
/// this many (then at each doubling): a peer that never answers its
/// handshake holds no more than its live calls.
const PRUNE_QUEUED_AT: usize = 64;

struct Peer {
    addr: SocketAddr,
    state: Mutex<PeerState>,
}

/// The header of request `id`; `timeout` is the time left to its deadline
/// (`None`: no deadline).
fn request_header(id: u64, internal: bool, timeout: Option<Duration>) -> Header {
    let mut header = Header::new(Kind::Request);
    header.request_id = id;
    header.flags = if internal { FLAG_INTERNAL } else { 0 };
    // 0 means "no deadline" on the wire, so a deadline due now is 1 µs.
    header.timeout_us = timeout.map_or(0, |t| (t.as_micros() as u64).max(1));
    header
}

pub(crate) struct Shared {
    /// Itself, for the connections it makes.
    this: Weak<Shared>,
    me: usize,
    world_size: usize,
    token: [u8; 16],
    /// The job's secret (empty: none).
    key: Vec<u8>,
    peer_timeout: Duration,
    max_payload: u64,
    dispatch: Weak<dyn Dispatch>,
    epoll: Arc<Epoll>,
    listener: TcpListener,
    listen_addr: SocketAddr,
    waker: UnixStream,
    waker_tx: UnixStream,
    conns: Mutex<FxHashMap<u64, Arc<Conn>>>,
    /// Connections opening now, and the ranks waiting for their turn to
    /// open one (see [`MAX_OPENING`]). Taken after a peer's `state`, never
    /// while holding `conns`.
    opening: Mutex<Opening>,
    /// Connections still in their handshake, accepted or opened: while
    /// there are some, the I/O loop wakes periodically to time them out
    /// (otherwise it sleeps with no timer, which costs less on every
    /// wake-up). Counted up when one joins `conns`, down exactly once: when
    /// its handshake ends, or when `drop_conn` takes it out of `conns` first.
    handshaking: AtomicUsize,
    next_token: AtomicU64,
    peers: Vec<Peer>,
    /// `close` has begun (it runs once).
    closing: AtomicBool,
    stopping: AtomicBool,
    executor: Weak<dyn Executor>,
    /// Connections with corked batches, flushed by the I/O loop.
    corked: Mutex<Vec<Arc<Conn>>>,
    /// `corked` may hold some (the I/O loop looks here on every pass
    /// instead of taking the lock).
    has_corks: AtomicBool,
    /// The I/O loop sleeps with its long timeout (a new cork must tell it).
    io_loop_idle: AtomicBool,
    /// A thread serves one connection as its responder (one at a time: each
    /// borrows a pool thread).
    responder: AtomicBool,
    /// The I/O loop is running (or queued to run) somewhere.
    io_loop: Mutex<bool>,
    io_loop_done: Condvar,
}

#[derive(Default)]
struct Opening {
    now: usize,
    waiting: std::collections::VecDeque<usize>,
}

pub(crate) struct TcpTransport {
    shared: Arc<Shared>,
}

impl TcpTransport {
    /// Starts the I/O thread over the joined world.
    pub(crate) fn start<D: Dispatch + Executor + 'static>(
        dispatch: &Arc<D>,
        world: JoinedWorld,
        config: &Config,
    ) -> Result<Arc<dyn Transport>> {
        let peers = world
            .table
            .ranks
            .iter()
            .map(|(_, addr)| {
                let addr = addr
                    .parse()
                    .map_err(|_| RpcError::Init(format!("the rendezvous sent a bad address '{addr}'")))?;
                Ok(Peer {
                    addr,
                    state: Mutex::new(PeerState::Idle),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let epoll = Arc::new(Epoll::new()?);
        let (waker_tx, waker) = UnixStream::pair()?;
        waker.set_nonblocking(true)?;
        waker_tx.set_nonblocking(true)?;
        world.listener.set_nonblocking(true)?;
        epoll.add(&world.listener, LISTENER, READABLE)?;
        epoll.add(&waker, WAKER, READABLE)?;
        let weak: Weak<dyn Dispatch> = Arc::downgrade(dispatch) as Weak<dyn Dispatch>;
        let shared = Arc::new_cyclic(|this| Shared {
            this: this.clone(),
            me: dispatch.rank(),
            world_size: peers.len(),
            token: world.table.token,
            key: config.secret.clone().unwrap_or_default(),
            peer_timeout: config.peer_timeout,
            max_payload: dispatch.max_message_bytes(),
            dispatch: weak,
            epoll,
            listener: world.listener,
            listen_addr: world.listen_addr,
            waker,
            waker_tx,
            conns: Mutex::new(FxHashMap::default()),
            opening: Mutex::new(Opening::default()),
            handshaking: AtomicUsize::new(0),
            next_token: AtomicU64::new(2),
            peers,
            closing: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            executor: Arc::downgrade(dispatch) as Weak<dyn Executor>,
            corked: Mutex::new(Vec::new()),
            has_corks: AtomicBool::new(false),
            io_loop_idle: AtomicBool::new(false),
            responder: AtomicBool::new(false),
            io_loop: Mutex::new(true),
            io_loop_done: Condvar::new(),
        });
        if !dispatch.run_io(shared.clone().io_loop_job()) {
            return Err(RpcError::Internal(
                "the worker pool stopped before the I/O loop started".into(),
            ));
        }
        Ok(Arc::new(TcpTransport { shared }))
    }
}

impl Transport for TcpTransport {
    fn send_request(&self, dst: usize, request: &OutRequest<'_>) -> Result<()> {
        self.shared.send_request(dst, request)
    }

    fn close(&self, graceful: bool, deadline: Instant) {
        let shared = &self.shared;
        if shared.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        let conns: Vec<Arc<Conn>> = shared.conns.lock().values().cloned().collect();
        if graceful {
            // The I/O loop keeps running meanwhile: it finishes sending what
            // a full socket made it take over.
            for c in conns.iter().filter(|c| c.peer().is_some()) {
                let _ = c.send(Header::new(Kind::Goodbye), &[], &[], conn::mode_here());
            }
            while Instant::now() < deadline && !conns.iter().all(|c| c.flushed()) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        shared.stopping.store(true, Ordering::Release);
        let _ = io::Write::write(&mut &shared.waker_tx, &[1]);
        // Wait (bounded) for the I/O loop to notice; it may be queued behind
        // busy workers, and then it stops as soon as it starts.
        if !crate::threads::is_io_loop() {
            let mut running = shared.io_loop.lock();
            while *running && !shared.io_loop_done.wait_until(&mut running, deadline).timed_out() {}
        }
        for c in shared.conns.lock().drain().map(|(_, c)| c) {
            c.close();
        }
        for p in &shared.peers {
            let mut st = p.state.lock();
            if !matches!(*st, PeerState::Lost(_)) {
                *st = PeerState::Lost(RpcError::Shutdown(format!("rank {} is shut down", shared.me)));
            }
        }
    }

    fn listen_addr(&self) -> String {
        self.shared.listen_addr.to_string()
    }

    fn drive(&self, dst: usize, done: &dyn Fn() -> bool, deadline: Option<Instant>) {
        self.shared.drive(dst, done, deadline);
    }
}

impl Shared {
    fn dispatch(&self) -> Option<Arc<dyn Dispatch>> {
        self.dispatch.upgrade()
    }

    /// Sends `request` on the connection to `dst`, or queues it while that
    /// connection opens (starting it if this is the first call). Never
    /// waits for a connection.
    fn send_request(&self, dst: usize, request: &OutRequest<'_>) -> Result<()> {
        // A request that must wait is copied before the peer's lock is taken
        // (it may be large): found not ready, the lock is let go, the copy
        // made, and the state looked at again.
        let mut waiting: Option<Queued> = None;
        let conn = loop {
            let mut st = self.peers[dst].state.lock();
            if !matches!(*st, PeerState::Ready(_) | PeerState::Lost(_)) && waiting.is_none() {
                drop(st);
                waiting = Some(Queued::of(request));
                continue;
            }
            match &mut *st {
                PeerState::Ready(conn) => break conn.clone(),
                PeerState::Lost(e) => return Err(e.clone()),
                PeerState::Connecting { queued, .. } => {
                    if queued.len() >= PRUNE_QUEUED_AT && queued.len().is_power_of_two() {
                        let now = Instant::now();
                        queued.retain(|q| q.deadline.is_none_or(|d| d > now));
                    }
                    queued.extend(waiting);
                    return Ok(());
                }
                PeerState::Idle => {
                    let conn = {
                        let mut opening = self.opening.lock();
                        if opening.now < MAX_OPENING {
                            opening.now += 1;
                            None
                        } else {
                            opening.waiting.push_back(dst);
                            Some(None)
                        }
                    };
                    let conn = match conn {
                        Some(waits) => waits,
                        None => match self.open(dst) {
                            Ok(conn) => Some(conn),
                            Err(e) => {
                                // A shut-down transport refuses for good too.
                                *st = PeerState::Lost(e.clone());
                                drop(st);
                                self.done_opening();
                                return Err(e);
                            }
                        },
                    };
                    *st = PeerState::Connecting {
                        conn,
                        queued: waiting.into_iter().collect(),
                    };
                    return Ok(());
                }
            }
        };
        let header = request_header(request.id, request.internal, request.timeout);
        // A thread issuing calls while others to this rank are in flight
        // corks them: they leave together when it waits (or within about a
        // millisecond), in one write instead of one each.
        let cork = !request.will_wait
            && !crate::threads::is_io_thread()
            && self.dispatch().is_some_and(|d| d.calls_in_flight_to(dst) >= 2);
        let sent = if cork {
            conn.send_corked(header, request.function.as_bytes(), request.args)
                .map(|starts| self.corked(&conn, starts))
        } else {
            conn.send(header, request.function.as_bytes(), request.args, conn::mode_here())
        };
        sent.map_err(|e| self.conn_failed(&conn, format!("sending failed: {e}")))?;
        // A caller about to wait reads the reply itself (see `drive`);
        // otherwise the I/O thread must be watching for it.
        if !request.will_wait {
            conn.ensure_read()
                .map_err(|e| self.conn_failed(&conn, format!("epoll: {e}")))?;
        }
        Ok(())
    }

    fn me_weak(&self) -> Weak<Shared> {
        self.this.clone()
    }

    /// Records a corked batch on `conn` (`starts`: the first frame of one):
    /// this thread flushes it before it waits or idles, and the I/O loop
    /// within about a millisecond otherwise.
    fn corked(&self, conn: &Arc<Conn>, starts: bool) {
        if !starts {
            return;
        }
        crate::threads::note_corked(conn.clone());
        {
            let mut corked = self.corked.lock();
            corked.push(conn.clone());
            self.has_corks.store(true, Ordering::SeqCst);
        }
        if self.io_loop_idle.load(Ordering::SeqCst) {
            let _ = io::Write::write(&mut &self.waker_tx, &[1]);
        }
    }

    /// Starts opening a connection to `dst`: a non-blocking `connect`,
    /// which the I/O loop carries on from (see `on_connect_event`).
    fn open(&self, dst: usize) -> Result<Arc<Conn>> {
        let addr = self.peers[dst].addr;
        let lost = |why: String| RpcError::PeerLost { rank: dst, reason: why };
        // Socket options wait for the I/O loop (`on_connect_event`): the
        // caller pays only for starting the connect.
        let stream = sys::connect_started(addr).map_err(|e| lost(format!("cannot connect to {addr}: {e}")))?;
        let conn = Arc::new(Conn::new(
            stream,
            self.next_token.fetch_add(1, Ordering::Relaxed),
            Some(dst),
            MAX_HANDSHAKE_PAYLOAD,
            self.epoll.clone(),
            self.me_weak(),
        ));
        {
            // Checked under the map's lock: `close` empties the map for the
            // last time after it set `closing`, so nothing joins it later.
            let mut conns = self.conns.lock();
            if self.closing.load(Ordering::Acquire) {
                return Err(RpcError::Shutdown(format!("rank {} is shut down", self.me)));
            }
            conns.insert(conn.token, conn.clone());
            self.handshaking.fetch_add(1, Ordering::AcqRel);
        }
        if let Err(e) = conn.watch_handshake() {
            if self.conns.lock().remove(&conn.token).is_some() {
                self.handshaking.fetch_sub(1, Ordering::AcqRel);
            }
            conn.close();
            return Err(lost(format!("epoll refused the connection to {addr}: {e}")));
        }
        Ok(conn)
    }

    /// An event on a connection this rank is opening whose `connect` has
    /// not finished: once it has, send `Hello`. Errors fail the connection.
    fn on_connect_event(&self, conn: &Arc<Conn>, dst: usize) -> Result<()> {
        let addr = self.peers[dst].addr;
        if let Some(e) = conn.stream.take_error()? {
            return Err(RpcError::PeerLost {
                rank: dst,
                reason: format!("cannot connect to {addr}: {e}"),
            });
        }
        conn.connected()?;
        conn.stream.set_nodelay(true)?;
        sys::detect_silent_peer(&conn.stream, self.peer_timeout)?;
        let hello = Hello {
            rank: self.me as u32,
            world_size: self.world_size as u32,
            token: self.token,
            nonce: auth::random_bytes()?,
        };
        let (machine, payload) = ClientHandshake::start(hello);
        *conn.greeting.lock() = Greeting::Greet(machine);
        conn.send(Header::new(Kind::Hello), &[], &payload, Mode::NoWait)?;
        Ok(())
    }

    /// The connection to `dst` finished its handshake: it carries this
    /// rank's calls from now on, the queued ones first, in order.
    fn on_connected(&self, dst: usize, conn: &Arc<Conn>) -> Result<()> {
        let corked = {
            let mut st = self.peers[dst].state.lock();
            match &mut *st {
                PeerState::Connecting {
                    conn: Some(opening),
                    queued,
                } if Arc::ptr_eq(opening, conn) => {
                    let queued = std::mem::take(queued);
                    *st = PeerState::Ready(conn.clone());
                    // Corked under the peer's lock: a call that finds the
                    // connection ready sends behind them (a frame sent on a
                    // connection with a corked batch goes after it).
                    let now = Instant::now();
                    queued
                        .iter()
                        .filter(|q| q.deadline.is_none_or(|d| d > now))
                        .try_for_each(|q| {
                            let header = request_header(q.id, q.internal, q.deadline.map(|d| d - now));
                            conn.send_corked(header, q.function.as_bytes(), &q.args).map(drop)
                        })
                }
                // The rank was lost meanwhile, or the transport is closing:
                // whoever changed the state closes the connection (and
                // passed the opening turn on).
                _ => return Ok(()),
            }
        };
        // The queued calls leave before the next rank's connect starts.
        let sent = corked.and_then(|()| conn.flush_cork());
        self.done_opening();
        Ok(sent?)
    }

    /// A connection left its handshake (ready, failed, or its rank lost):
    /// the next rank waiting for its turn starts opening one.
    fn done_opening(&self) {
        loop {
            let next = {
                let mut opening = self.opening.lock();
                debug_assert!(opening.now > 0, "a connection left its handshake twice");
                opening.now = opening.now.saturating_sub(1);
                match opening.waiting.pop_front() {
                    Some(dst) => {
                        opening.now += 1;
                        dst
                    }
                    None => return,
                }
            };
            let mut st = self.peers[next].state.lock();
            // Lost or shut down while it waited: its turn passes on.
            let PeerState::Connecting { conn: conn @ None, .. } = &mut *st else {
                continue;
            };
            match self.open(next) {
                Ok(opened) => {
                    *conn = Some(opened);
                    return;
                }
                Err(e) => {
                    *st = PeerState::Lost(e.clone());
                    drop(st);
                    if let Some(d) = self.dispatch() {
                        d.on_peer_lost(next, e);
                    }
                }
            }
        }
    }

    /// A caller waiting for a reply from `dst` reads that connection itself
    /// (if nobody else is): the reply completes its call on its own thread,
    /// with no wake-up from the I/O thread. Other frames it meets are
    /// dispatched as the I/O thread would.
    fn drive(&self, dst: usize, done: &dyn Fn() -> bool, deadline: Option<Instant>) {
        crate::threads::flush_corked();
        let conn = match &*self.peers[dst].state.lock() {
            PeerState::Ready(c) => c.clone(),
            _ => return,
        };
        let dispatch = self.dispatch();
        let in_flight = || dispatch.as_ref().map_or(0, |d| d.calls_in_flight_to(dst));
        // Spinning never outlasts the caller's own bound. Read the clock
        // only once a first look found nothing (it usually finds the reply).
        let spin_bound = || {
            let full = Instant::now() + SPIN_FOR;
            deadline.map_or(full, |d| d.min(full))
        };
        // With several calls in flight the I/O thread reads their replies in
        // batches; reading them here would only move that work.
        let lead = if in_flight() <= 1 { conn.reader.try_lock() } else { None };
        let Some(mut reader) = lead else {
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
        let mut stream = sys::Recv::no_wait(&conn.stream);
        // A reply often comes back within tens of microseconds: looking for
        // it a few times, yielding the CPU in between (so a peer on this CPU
        // runs), is cheaper than sleeping and being woken, above all when the
        // wake-up would cross CPUs.
        let mut spin_until = None;
        let outcome = loop {
            if done() || self.stopping.load(Ordering::Acquire) {
                break Ok(());
            }
            match reader.read_until(
                &mut stream,
                &mut |frame, reader| self.on_frame(&conn, frame, reader),
                done,
            ) {
                Ok(ReadEnd::WouldBlock) => {}
                Ok(ReadEnd::Eof) => break Err(None),
                Err(e) => break Err(Some(e)),
            }
            if done() {
                break Ok(());
            }
            let now = Instant::now();
            if now < *spin_until.get_or_insert_with(spin_bound) {
                std::thread::yield_now();
                continue;
            }
            // Then sleep on the socket, a slice at a time.
            let slice = match deadline {
                Some(d) if d <= now => break Ok(()),
                Some(d) => (d - now).min(LEAD_SLICE),
                None => LEAD_SLICE,
            };
            if sys::wait_readable(&conn.stream, slice).is_err() {
                break Ok(());
            }
        };
        // Hand reading back before letting go of the reader, so a caller
        // that leads next cannot have its flag cleared by this one.
        let handed_back = conn.end_lead(in_flight() > 0);
        drop(reader);
        // A connection epoll will not watch cannot serve the calls left on it.
        let outcome = outcome.and(handed_back.map_err(|e| Some(RpcError::Io(format!("epoll: {e}")))));
        if let Err(why) = outcome {
            self.drop_conn(&conn, why);
        }
    }

    fn io_loop_job(self: Arc<Self>) -> crate::pool::Work {
        Box::new(move || self.io_loop())
    }

    /// The I/O loop: runs on one library thread at a time. When a read pass
    /// leaves a request for the pool and another thread is idle, the loop
    /// moves to that thread and this one serves the request itself.
    fn io_loop(self: Arc<Self>) {
        crate::threads::set_io_loop(true);
        let mut events = Vec::with_capacity(128);
        let mut last_sweep = Instant::now();
        while !self.stopping.load(Ordering::Acquire) {
            // Corked batches are written within about a millisecond.
            // Idle first, then look: a cork added after the look sees the
            // flag and nudges the loop.
            self.io_loop_idle.store(true, Ordering::SeqCst);
            let corks = self.has_corks.load(Ordering::SeqCst);
            if corks {
                self.io_loop_idle.store(false, Ordering::SeqCst);
            }
            let handshakes = self.handshaking.load(Ordering::Acquire) > 0;
            let timeout_ms = match (corks, handshakes) {
                (true, _) => 1,
                (false, true) => HANDSHAKE_SWEEP.as_millis() as i32,
                (false, false) => -1,
            };
            let waited = self.epoll.wait(&mut events, timeout_ms);
            self.io_loop_idle.store(false, Ordering::SeqCst);
            if let Err(e) = waited {
                log_at!(Error, Some(self.me), "epoll_wait failed: {e}; the I/O loop stops");
                break;
            }
            // Woken only to learn of a new cork: give the batch its
            // millisecond to fill.
            let nudged_only = !events.is_empty() && events.iter().all(|e| e.token == WAKER);
            // A connection whose requests this round served.
            let mut served = None;
            for ev in &events {
                match ev.token {
                    LISTENER => self.accept_all(),
                    WAKER => {
                        let mut drain = [0u8; 64];
                        let _ = io::Read::read(&mut &self.waker, &mut drain);
                    }
                    token => {
                        let conn = self.conns.lock().get(&token).cloned();
                        if let Some(conn) = conn
                            && self.on_event(&conn, *ev)
                        {
                            served = Some(conn);
                        }
                    }
                }
            }
            if handshakes && last_sweep.elapsed() >= HANDSHAKE_SWEEP {
                last_sweep = Instant::now();
                self.close_stale_handshakes();
            }
            if !nudged_only && self.has_corks.swap(false, Ordering::SeqCst) {
                let corked = std::mem::take(&mut *self.corked.lock());
                for c in corked {
                    if let Err(e) = c.flush_cork() {
                        self.drop_conn(&c, Some(RpcError::Io(format!("sending failed: {e}"))));
                    }
                }
            }
            match crate::threads::take_kept() {
                Kept::One(label, job) => match self.executor.upgrade() {
                    Some(ex) => match ex.move_io(self.clone().io_loop_job()) {
                        Ok(()) => {
                            crate::threads::set_io_loop(false);
                            crate::threads::run_kept(job);
                            return;
                        }
                        // Nobody idle: the loop stays here, the pool queues the job
                        // (a stopped pool means the agent is closing).
                        Err(_) => drop(ex.submit(label, job)),
                    },
                    None => drop(job),
                },
                // Requests served inline (nothing for the pool): the next
                // ones on that connection likely are too.
                Kept::Nothing => {
                    if let Some(conn) = served
                        && self.become_responder()
                    {
                        crate::threads::set_io_loop(false);
                        self.respond(&conn);
                        return;
                    }
                }
                Kept::Busy => {}
            }
        }
        crate::threads::set_io_loop(false);
        *self.io_loop.lock() = false;
        self.io_loop_done.notify_all();
    }

    /// Claims the responder's place and moves the I/O loop to an idle pool
    /// thread; false (and nothing changed) if either is taken.
    fn become_responder(self: &Arc<Self>) -> bool {
        if self.stopping.load(Ordering::Acquire) || self.responder.swap(true, Ordering::AcqRel) {
            return false;
        }
        let moved = self
            .executor
            .upgrade()
            .is_some_and(|ex| ex.move_io(self.clone().io_loop_job()).is_ok());
        if !moved {
            self.responder.store(false, Ordering::Release);
        }
        moved
    }

    /// Serves `conn` on this thread, which the I/O loop has just left. It
    /// waits for the next requests in `recv` itself: per request, one system
    /// call and one epoll wake-up fewer than the loop (measured: ~0.4 us of a
    /// 15 us round trip on one CPU). It gives the connection back to the loop
    /// when idle for [`RESPONDER_IDLE`], when a request needs the pool (the
    /// one request of a pass it then serves itself, as the loop would), when
    /// the pool has work and no idle thread, or at shutdown.
    fn respond(&self, conn: &Arc<Conn>) {
        let responding = Responding::new(self, conn);
        let kept = self.serve_requests(conn);
        drop(responding);
        if let Kept::One(label, job) = kept {
            // Older jobs waiting for a thread go first.
            match self.executor.upgrade() {
                Some(ex) if ex.starved() => drop(ex.submit(label, job)),
                _ => crate::threads::run_kept(job),
            }
        }
    }

    fn serve_requests(&self, conn: &Arc<Conn>) -> Kept {
        let Some(mut reader) = conn.reader.try_lock() else {
            return Kept::Nothing;
        };
        if conn.begin_lead().is_err() {
            return Kept::Nothing;
        }
        let starved = || self.executor.upgrade().is_none_or(|ex| ex.starved());
        let (outcome, kept) = loop {
            if self.stopping.load(Ordering::Acquire) || starved() {
                break (Ok(()), Kept::Nothing);
            }
            // Corked only once requests came, not for the wait: other
            // threads' frames must not queue behind it meanwhile.
            let mut corked = None;
            let mut stream = sys::Recv::waiting(&conn.stream);
            let result = reader.read_from(&mut stream, &mut |frame, reader| {
                cork_for_batch(conn, &mut corked, reader);
                self.on_frame(conn, frame, reader)
            });
            let ended = end_pass(conn, corked, result);
            let kept = crate::threads::take_kept();
            if let Err(why) = ended {
                break (Err(why), kept);
            }
            if stream.timed_out() || !matches!(kept, Kept::Nothing) {
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

    fn accept_all(&self) {
        loop {
            match self.listener.accept() {
                // Closing: the connection map is (being) emptied for the
                // last time, so nothing new may join it.
                Ok(_) if self.stopping.load(Ordering::Acquire) => {}
                Ok((stream, from)) => {
                    if let Err(e) = self.adopt(stream) {
                        log_at!(Warn, Some(self.me), "could not take a connection from {from}: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log_at!(Warn, Some(self.me), "accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn adopt(&self, stream: TcpStream) -> io::Result<()> {
        // Left in blocking mode, so that a responder can wait in `recv`
        // (every other read and write on it says MSG_DONTWAIT).
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(RESPONDER_IDLE))?;
        stream.set_nodelay(true)?;
        sys::detect_silent_peer(&stream, self.peer_timeout)?;
        let conn = Arc::new(Conn::new(
            stream,
            self.next_token.fetch_add(1, Ordering::Relaxed),
            None,
            MAX_HANDSHAKE_PAYLOAD,
            self.epoll.clone(),
            self.me_weak(),
        ));
        self.conns.lock().insert(conn.token, conn.clone());
        self.handshaking.fetch_add(1, Ordering::AcqRel);
        conn.watch_handshake()
    }

    /// Handles one readiness event; true if it served requests.
    fn on_event(&self, conn: &Arc<Conn>, ev: Event) -> bool {
        if let Some(dst) = conn.opened_to
            && conn.peer().is_none()
            && matches!(*conn.greeting.lock(), Greeting::Connecting)
        {
            if !ev.writable() {
                return false;
            }
            if let Err(e) = self.on_connect_event(conn, dst) {
                self.drop_conn(conn, Some(e));
                return false;
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
        let mut stream = sys::Recv::no_wait(&conn.stream);
        let mut corked = None;
        let mut requests = false;
        let mut on_frame = |frame: Frame, reader: &mut FrameReader| {
            requests |= frame.header.kind == Kind::Request;
            cork_for_batch(conn, &mut corked, reader);
            self.on_frame(conn, frame, reader)
        };
        let result = if ev.closed() {
            reader.read_to_end(&mut stream, &mut on_frame)
        } else {
            reader.read_from(&mut stream, &mut on_frame)
        };
        drop(reader);
        match end_pass(conn, corked, result) {
            Ok(()) => requests && !conn.outbound && conn.peer().is_some(),
            Err(why) => {
                self.drop_conn(conn, why);
                false
            }
        }
    }

    fn on_frame(&self, conn: &Arc<Conn>, mut frame: Frame, reader: &mut FrameReader) -> Result<()> {
        let Some(peer) = conn.peer() else {
            return match conn.opened_to {
                Some(dst) => self.greet_server(conn, dst, frame, reader),
                None => self.greet(conn, frame, reader),
            };
        };
        let dispatch = self
            .dispatch()
            .ok_or_else(|| RpcError::Shutdown("the agent is gone".into()))?;
        let h = frame.header;
        match (h.kind, conn.outbound) {
            (Kind::Request, false) => {
                // Names are UTF-8 on both sides: anything else is a broken
                // peer (ASCII, the usual case, is checked in a few steps).
                if !frame.name.is_ascii() && std::str::from_utf8(&frame.name).is_err() {
                    return Err(RpcError::Protocol("function name is not UTF-8".into()));
                }
                dispatch.on_request(InRequest {
                    src: peer,
                    id: h.request_id,
                    function: std::mem::take(&mut frame.name),
                    internal: h.flags & FLAG_INTERNAL != 0,
                    deadline: (h.timeout_us > 0).then(|| Instant::now() + Duration::from_micros(h.timeout_us)),
                    args: frame.payload,
                    reply_to: conn.clone(),
                });
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

    /// Frames on a connection this rank is opening to `dst`, before it is
    /// authenticated: the client side of the handshake.
    fn greet_server(&self, conn: &Arc<Conn>, dst: usize, frame: Frame, reader: &mut FrameReader) -> Result<()> {
        let addr = self.peers[dst].addr;
        let who = format!("rank {dst} at {addr}");
        let step = match &mut *conn.greeting.lock() {
            Greeting::Greet(machine) => machine.step(&self.key, dst as u32, &frame, &who),
            _ => Err(RpcError::Protocol(format!(
                "{who} sent a frame before the connection was open"
            ))),
        };
        match step? {
            ClientStep::Proof(proof) => conn.send(Header::new(Kind::Proof), &[], &proof, Mode::NoWait)?,
            ClientStep::Welcomed(welcome) => {
                if welcome.rank as usize != dst || welcome.token != self.token {
                    return Err(RpcError::Protocol(format!(
                        "{addr} is not rank {dst} of this world (it answered as rank {})",
                        welcome.rank
                    )));
                }
                reader.set_max_payload(self.max_payload);
                *conn.greeting.lock() = Greeting::Done;
                conn.set_peer(dst);
                self.handshaking.fetch_sub(1, Ordering::AcqRel);
                self.on_connected(dst, conn)?;
            }
        }
        Ok(())
    }

    /// Frames on an accepted connection before it is authenticated: the
    /// server side of the handshake. A failure is told to the peer, then
    /// the connection closes.
    fn greet(&self, conn: &Arc<Conn>, frame: Frame, reader: &mut FrameReader) -> Result<()> {
        let admit = |hello: &Hello| {
            if hello.token != self.token {
                return Err(RpcError::Auth(
                    "the greeting carries another world's token (a process of another job?)".into(),
                ));
            }
            if hello.world_size as usize != self.world_size || hello.rank as usize >= self.world_size {
                return Err(RpcError::Protocol(format!(
                    "greeting from rank {} of a world of {}; this world has {} ranks",
                    hello.rank, hello.world_size, self.world_size
                )));
            }
            Ok(())
        };
        let step = match &mut *conn.greeting.lock() {
            Greeting::Serve(handshake) => handshake.step(&self.key, self.me as u32, &frame, admit),
            _ => Err(RpcError::Protocol("a handshake frame after the handshake".into())),
        };
        match step {
            Ok(Step::Challenge(payload)) => conn.send(Header::new(Kind::Challenge), &[], &payload, Mode::NoWait)?,
            Ok(Step::Authenticated(hello)) => {
                let welcome = Hello {
                    rank: self.me as u32,
                    world_size: self.world_size as u32,
                    token: self.token,
                    nonce: [0; NONCE_LEN],
                };
                conn.send(Header::new(Kind::Welcome), &[], &welcome.encode(), Mode::NoWait)?;
                reader.set_max_payload(self.max_payload);
                *conn.greeting.lock() = Greeting::Done;
                conn.set_peer(hello.rank as usize);
                self.handshaking.fetch_sub(1, Ordering::AcqRel);
            }
            Err(e) => {
                let (header, text) = auth::refused_frame(&e);
                let _ = conn.send(header, &[], &text, Mode::NoWait);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Closes connections whose handshake outlived its limit: 5 s for one
    /// accepted (the failure promises'), and the peer timeout for one this
    /// rank opened, whose peer is then lost like a peer silent on an open
    /// connection (a stopped process, a host gone before it answered).
    fn close_stale_handshakes(&self) {
        let limit = |c: &Conn| match c.opened_to {
            Some(_) => self.peer_timeout,
            None => HANDSHAKE_TIMEOUT,
        };
        let stale: Vec<Arc<Conn>> = self
            .conns
            .lock()
            .values()
            .filter(|c| c.peer().is_none() && c.opened.elapsed() >= limit(c))
            .cloned()
            .collect();
        for c in stale {
            let why = match c.opened_to {
                Some(dst) => RpcError::PeerLost {
                    rank: dst,
                    reason: format!(
                        "rank {dst} at {} did not answer the handshake within {} s",
                        self.peers[dst].addr,
                        limit(&c).as_secs()
                    ),
                },
                None => RpcError::Protocol(format!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs())),
            };
            self.drop_conn(&c, Some(why));
        }
    }

    /// A send on `conn` failed: the peer is lost.
    fn conn_failed(&self, conn: &Arc<Conn>, why: String) -> RpcError {
        let rank = conn.peer().unwrap_or(usize::MAX);
        self.drop_conn(conn, Some(RpcError::Io(why.clone())));
        RpcError::PeerLost { rank, reason: why }
    }

    /// Closes `conn` (`why`: the error, `None` for the peer closing it) and,
    /// if it belonged to a rank, fails that rank for good.
    fn drop_conn(&self, conn: &Arc<Conn>, why: Option<RpcError>) {
        if self.conns.lock().remove(&conn.token).is_none() {
            return;
        }
        conn.close();
        let stopping = self.stopping.load(Ordering::Acquire);
        let Some(rank) = conn.peer() else {
            self.handshaking.fetch_sub(1, Ordering::AcqRel);
            if let Some(dst) = conn.opened_to {
                return self.open_failed(conn, dst, why);
            }
            if !stopping {
                let addr = conn.stream.peer_addr().map_or("?".into(), |a| a.to_string());
                let why = why.map_or("closed before its handshake".into(), |e| e.to_string());
                log_at!(Warn, Some(self.me), "closed a connection from {addr}: {why}");
            }
            return;
        };
        // A peer that said goodbye is shutting down in order: replies it
        // sent on our outgoing connection are still on their way there, so
        // that connection is left to end by itself.
        let graceful = conn.goodbye.load(Ordering::Acquire) && why.is_none();
        let error = if graceful {
            RpcError::Shutdown(format!("rank {rank} has shut down"))
        } else {
            let reason = why.map_or("the connection was closed".into(), |e| e.to_string());
            if !stopping {
                log_at!(Warn, Some(self.me), "lost rank {rank}: {reason}");
            }
            RpcError::PeerLost { rank, reason }
        };
        let mut ending = None;
        let mut opened_one = false;
        let mut calls_queued = false;
        {
            let peer = &self.peers[rank];
            let mut st = peer.state.lock();
            if !matches!(*st, PeerState::Lost(_)) {
                // New calls fail from now on; a crash takes the outgoing
                // connection (and every call on it) down at once.
                match std::mem::replace(&mut *st, PeerState::Lost(error.clone())) {
                    PeerState::Ready(out) if !Arc::ptr_eq(&out, conn) => {
                        if graceful {
                            ending = Some(out);
                        } else {
                            self.conns.lock().remove(&out.token);
                            out.close();
                        }
                    }
                    // Its queued calls fail with the rest below, even when
                    // the peer left in order: nothing will answer them.
                    PeerState::Connecting { conn, .. } => {
                        calls_queued = true;
                        if let Some(out) = conn {
                            if self.conns.lock().remove(&out.token).is_some() {
                                self.handshaking.fetch_sub(1, Ordering::AcqRel);
                            }
                            out.close();
                            opened_one = true;
                        }
                    }
                    _ => {}
                }
            }
        }
        if opened_one {
            self.done_opening();
        }
        // The outgoing connection ends by itself, but only if somebody reads
        // it: a caller waiting for a reply no longer finds it through the
        // peer (see `drive`), so the I/O thread must.
        if let Some(out) = ending
            && let Err(e) = out.ensure_read()
        {
            self.drop_conn(&out, Some(RpcError::Io(format!("epoll: {e}"))));
        }
        if graceful && !conn.outbound && !calls_queued {
            return;
        }
        if let Some(d) = self.dispatch() {
            d.on_peer_lost(rank, error);
        }
    }
}

impl Shared {
    /// A connection this rank was opening to `dst` failed before its
    /// handshake finished (`conn` is closed already): the rank is lost, and
    /// every call to it fails. A wrong secret fails them with `AUTH`.
    fn open_failed(&self, conn: &Arc<Conn>, dst: usize, why: Option<RpcError>) {
        let addr = self.peers[dst].addr;
        let error = match why {
            Some(RpcError::Auth(m)) => RpcError::Auth(m),
            Some(e @ RpcError::PeerLost { .. }) => e,
            Some(e) => RpcError::PeerLost {
                rank: dst,
                reason: format!("opening a connection to {addr} failed: {e}"),
            },
            None => RpcError::PeerLost {
                rank: dst,
                reason: format!("{addr} closed the connection during the handshake"),
            },
        };
        {
            let mut st = self.peers[dst].state.lock();
            match &*st {
                PeerState::Connecting {
                    conn: Some(opening), ..
                } if Arc::ptr_eq(opening, conn) => {
                    *st = PeerState::Lost(error.clone());
                }
                // Lost or closed meanwhile: that already failed the calls.
                _ => return,
            }
        }
        self.done_opening();
        if !self.stopping.load(Ordering::Acquire) {
            log_at!(Warn, Some(self.me), "{error}");
        }
        if let Some(d) = self.dispatch() {
            d.on_peer_lost(dst, error);
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
fn end_pass(conn: &Conn, corked: Option<bool>, read: Result<ReadEnd>) -> std::result::Result<(), Option<RpcError>> {
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
}

impl<'a> Responding<'a> {
    fn new(shared: &'a Shared, conn: &'a Conn) -> Responding<'a> {
        crate::threads::set_responder(true);
        Responding { shared, conn }
    }
}

impl Drop for Responding<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self.conn.end_lead(true);
        }
        crate::threads::set_responder(false);
        self.shared.responder.store(false, Ordering::Release);
    }
}
