//! The transport between processes: a TCP listener per rank (and, under
//! `auto`, a Unix socket ranks on its host reach it at), one connection per
//! direction per pair of ranks (a rank's calls go out on the connection it
//! opened and the replies come back on it), opened lazily on first use, over
//! TCP or through shared memory (`stream.rs`). One I/O thread runs an epoll
//! loop over the listeners and every connection, so the number of threads
//! does not depend on the number of peers or calls.
//!
//! This file holds what the parts share (peers, connections, the epoll
//! set), joining the world, and closing. The parts, by job:
//! - `conn.rs`: one connection (its outbox, who reads it, its epoll interest);
//! - `stream.rs`: what a connection's bytes travel over: a TCP socket, or
//!   shared-memory rings to a rank on this host;
//! - `open.rs`: opening connections and both sides of the handshake;
//! - `send.rs`: a caller's path (sending, reading its own reply);
//! - `event_loop.rs`: the I/O loop and the responder;
//! - `accept.rs`: accepting connections;
//! - `failure.rs`: what a failed connection does to its rank and calls.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rustc_hash::FxHashMap;

use crate::config::Config;
use crate::error::{Result, RpcError};
use crate::net::resolve::{local_ip_towards, resolve};
use crate::net::sys::{self, Epoll, READABLE};
use crate::rendezvous;
use crate::wire::{self, Header, Kind, Table};

use super::{Dispatch, Executor, OutRequest, Transport, Waiting};

mod accept;
mod conn;
mod event_loop;
mod failure;
mod open;
mod send;
mod stream;

use conn::Conn;
use event_loop::{FIRST_CONN_TOKEN, LISTENER, SAME_HOST_LISTENER, WAKER};
use open::WaitingCalls;

/// Between a rank's TCP address and the random part of its same-host
/// socket's name, in the address it publishes at the rendezvous.
const SAME_HOST_MARK: char = '#';

/// An address as a rank publishes it at the rendezvous: its TCP address,
/// and the random part of its same-host socket's name if it has one.
pub(crate) fn split_published(published: &str) -> (&str, Option<&str>) {
    match published.split_once(SAME_HOST_MARK) {
        Some((addr, nonce)) => (addr, Some(nonce)),
        None => (published, None),
    }
}

/// What a rank knows after the rendezvous: its listener and the world.
pub(crate) struct JoinedWorld {
    listener: TcpListener,
    listen_addr: SocketAddr,
    /// Where ranks on this host reach this one (`None`: TCP only).
    same_host: Option<UnixListener>,
    table: Table,
}

impl JoinedWorld {
    pub(crate) fn names(&self) -> Vec<String> {
        self.table.ranks.iter().map(|(name, _)| name.clone()).collect()
    }
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
    // Bound before the rendezvous, so that it is there by the time any rank
    // learns this one's address; its name (with a random part no other
    // process can guess) travels with the address: "ip:port#nonce".
    let same_host = match config.transport.as_str() {
        "tcp" => None,
        _ => {
            let nonce: String = crate::auth::random_bytes::<8>()?
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            match sys::listen_unix(&sys::same_host_name(listen_addr, &nonce)) {
                Ok(l) => Some((l, nonce)),
                Err(e) => {
                    crate::log::log_at!(
                        Info,
                        Some(config.rank),
                        "no shared memory with ranks on this host (cannot listen on a Unix socket: {e}); they use TCP"
                    );
                    None
                }
            }
        }
    };
    let published = match &same_host {
        Some((_, nonce)) => format!("{listen_addr}{SAME_HOST_MARK}{nonce}"),
        None => listen_addr.to_string(),
    };
    let join = wire::Join {
        rank: config.rank as u32,
        world_size: config.world_size as u32,
        name: config.worker_name(),
        addr: published,
    };
    let table = rendezvous::rendezvous(config, master, join)?;
    Ok(JoinedWorld {
        listener,
        listen_addr,
        same_host: same_host.map(|(l, _)| l),
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
    /// than `open::MAX_OPENING` connections are opening (`None`); calls made
    /// meanwhile wait in `queued`, in order, and leave when it is ready.
    Connecting {
        conn: Option<Arc<Conn>>,
        queued: WaitingCalls,
    },
    Ready(Arc<Conn>),
    /// Worlds have a fixed membership: a rank whose connection failed stays lost.
    Lost(RpcError),
}

/// How calls to a peer travel (`Peer::via`), as `peer_transport` names it.
const VIA_NONE: u8 = 0;
const VIA_TCP: u8 = 1;
const VIA_SHM: u8 = 2;

struct Peer {
    addr: SocketAddr,
    /// Its same-host socket's name, if it listens on one.
    same_host_name: Option<String>,
    /// How this rank's calls to the peer travel: `VIA_NONE` before the
    /// first, then the kind of the connection opened for them.
    via: AtomicU8,
    state: Mutex<PeerState>,
    /// Signalled (with `state` held) when calls waiting for room in the
    /// send window while the connection opens should look again: it is
    /// ready, or the rank is lost.
    room: Condvar,
}

impl Peer {
    /// Moves the peer (its `state` locked as `st`) to `next`, and wakes the
    /// callers waiting for room while its connection opened: every change
    /// out of `Connecting` goes through here. Returns the state it left.
    fn set(&self, st: &mut PeerState, next: PeerState) -> PeerState {
        self.room.notify_all();
        std::mem::replace(st, next)
    }
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
    /// Request bytes held in memory per destination (see `send.rs`).
    send_window: u64,
    /// How long a waiting thread looks before it sleeps (`Config::spin`).
    spin: Duration,
    /// The size of each ring of a same-host pair.
    ring_bytes: usize,
    dispatch: Weak<dyn Dispatch>,
    epoll: Arc<Epoll>,
    listener: TcpListener,
    listen_addr: SocketAddr,
    /// Where ranks on this host connect (`None`: every peer over TCP).
    same_host: Option<UnixListener>,
    /// How many same-host connections this rank may keep at once.
    shm_budget: Arc<stream::ShmBudget>,
    waker: UnixStream,
    waker_tx: UnixStream,
    conns: Mutex<FxHashMap<u64, Arc<Conn>>>,
    /// Connections opening now, and the ranks waiting for their turn to
    /// open one (see `open::MAX_OPENING`). Taken after a peer's `state`, never
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
    /// Connections not read while the pool's backlog is full, and whether
    /// there are any (looked at without the lock).
    paused: Mutex<Vec<Arc<Conn>>>,
    has_paused: AtomicBool,
    /// Connections with corked batches, flushed by the I/O loop.
    corked: Mutex<Vec<Arc<Conn>>>,
    /// `corked` may hold some (the I/O loop looks here on every pass
    /// instead of taking the lock).
    has_corks: AtomicBool,
    /// The I/O loop sleeps with its long timeout (a new cork, or a newly
    /// parked connection, must tell it).
    io_loop_idle: AtomicBool,
    /// Connections their callers parked (see `Conn::end_lead_parked`),
    /// which the I/O loop looks at about every `conn::PARK_FOR` (it reads
    /// those parked that long); and whether there are any (looked at
    /// without the lock, set under it).
    parked: Mutex<Vec<Arc<Conn>>>,
    has_parked: AtomicBool,
    /// A thread serves one connection as its responder (one at a time: each
    /// borrows a pool thread).
    responder: AtomicBool,
    /// Same-host connections a moving I/O loop hands to the thread taking
    /// it over (see `event_loop::Hot`).
    hot_handed_on: Mutex<Vec<Arc<Conn>>>,
    /// The I/O loop's thread serving requests in place: `generation << 1 |
    /// serving` (see `event_loop::serve_in_place`).
    in_place: AtomicU64,
    /// The I/O loop is running (or queued to run) somewhere.
    io_loop: Mutex<bool>,
    io_loop_done: Condvar,
}

#[derive(Default)]
struct Opening {
    now: usize,
    waiting: std::collections::VecDeque<usize>,
}

/// How many ranks (this one included) are likely on this host: those that
/// published the same address as this rank and a same-host endpoint. Only
/// sizes the rings: reaching a peer over shared memory is decided by
/// reaching its endpoint, never by its address.
fn ranks_on_my_host(peers: &[Peer], me: usize) -> usize {
    let mine = peers[me].addr.ip();
    peers
        .iter()
        .filter(|p| p.same_host_name.is_some() && p.addr.ip() == mine)
        .count()
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
            .map(|(_, published)| {
                let (addr, nonce) = split_published(published);
                let addr: SocketAddr = addr
                    .parse()
                    .map_err(|_| RpcError::Init(format!("the rendezvous sent a bad address '{published}'")))?;
                Ok(Peer {
                    addr,
                    same_host_name: nonce.map(|n| sys::same_host_name(addr, n)),
                    via: AtomicU8::new(VIA_NONE),
                    state: Mutex::new(PeerState::Idle),
                    room: Condvar::new(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ring_bytes = config
            .shm_ring_bytes
            .unwrap_or_else(|| crate::config::default_ring_bytes(ranks_on_my_host(&peers, dispatch.rank())));
        let epoll = Arc::new(Epoll::new()?);
        let (waker_tx, waker) = UnixStream::pair()?;
        waker.set_nonblocking(true)?;
        waker_tx.set_nonblocking(true)?;
        world.listener.set_nonblocking(true)?;
        epoll.add(&world.listener, LISTENER, READABLE)?;
        if let Some(l) = &world.same_host {
            epoll.add(l, SAME_HOST_LISTENER, READABLE)?;
        }
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
            send_window: config.send_window_bytes,
            spin: config.spin,
            ring_bytes,
            dispatch: weak,
            epoll,
            listener: world.listener,
            listen_addr: world.listen_addr,
            same_host: world.same_host,
            shm_budget: stream::ShmBudget::for_this_process(),
            waker,
            waker_tx,
            conns: Mutex::new(FxHashMap::default()),
            opening: Mutex::new(Opening::default()),
            handshaking: AtomicUsize::new(0),
            next_token: AtomicU64::new(FIRST_CONN_TOKEN),
            peers,
            closing: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            executor: Arc::downgrade(dispatch) as Weak<dyn Executor>,
            paused: Mutex::new(Vec::new()),
            has_paused: AtomicBool::new(false),
            corked: Mutex::new(Vec::new()),
            has_corks: AtomicBool::new(false),
            io_loop_idle: AtomicBool::new(false),
            parked: Mutex::new(Vec::new()),
            has_parked: AtomicBool::new(false),
            responder: AtomicBool::new(false),
            hot_handed_on: Mutex::new(Vec::new()),
            in_place: AtomicU64::new(0),
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

    fn send_cancel(&self, dst: usize, id: u64) {
        self.shared.send_cancel(dst, id)
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
                let _ = c.send(Header::new(Kind::Goodbye), &[], &[], conn::mode_here(), None);
            }
            while Instant::now() < deadline && !conns.iter().all(|c| c.flushed()) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        shared.stopping.store(true, Ordering::Release);
        let _ = io::Write::write(&mut &shared.waker_tx, &[1]);
        // Wait (bounded) for the I/O loop to notice; it may be queued behind
        // busy workers, and then it stops as soon as it starts.
        if !shared.on_io_loop() {
            let mut running = shared.io_loop.lock();
            while *running && !shared.io_loop_done.wait_until(&mut running, deadline).timed_out() {}
        }
        for c in shared.conns.lock().drain().map(|(_, c)| c) {
            c.close();
        }
        shared.parked.lock().clear();
        for p in &shared.peers {
            let mut st = p.state.lock();
            if !matches!(*st, PeerState::Lost(_)) {
                p.set(
                    &mut st,
                    PeerState::Lost(RpcError::Shutdown(format!("rank {} is shut down", shared.me))),
                );
            }
        }
    }

    fn listen_addr(&self) -> String {
        self.shared.listen_addr.to_string()
    }

    fn peer_transport(&self, dst: usize) -> Option<&'static str> {
        match self.shared.peers.get(dst)?.via.load(Ordering::Relaxed) {
            VIA_SHM => Some("shm"),
            VIA_TCP => Some("tcp"),
            _ => None,
        }
    }

    fn flush_batches(&self) {
        self.shared.flush_batches();
    }

    fn drive(&self, dst: usize, waiting: Waiting<'_>, done: &dyn Fn() -> bool, deadline: Option<Instant>) {
        self.shared.drive(dst, waiting, done, deadline);
        // The caller sleeps next, maybe until the loop reads or connects
        // for it: a handler served in place on the loop's thread moves the
        // loop on first (`drive` itself does before it waits).
        if !done() {
            self.shared.leave_in_place();
        }
    }

    fn unpark_mine(&self) {
        self.shared.unpark_mine();
    }

    fn resume_reading(&self) {
        self.shared.resume_reading();
    }

    fn leave_in_place(&self) {
        self.shared.leave_in_place();
    }
}

impl Shared {
    fn dispatch(&self) -> Option<Arc<dyn Dispatch>> {
        self.dispatch.upgrade()
    }

    fn me_weak(&self) -> Weak<Shared> {
        self.this.clone()
    }
}
