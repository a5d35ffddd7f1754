//! Opening connections. The first call to a rank offers it rings over its
//! same-host socket if it has one here, or else starts a non-blocking
//! connect, and waits in the peer's queue; the I/O loop sees the rings
//! answered or the connect finish (a failed setup falls back to TCP), steps the client side of the handshake (`auth::ClientHandshake`)
//! on the server's frames, and on `Welcome` sends what queued. Accepted
//! connections step the server side (`auth::Handshake`). At most
//! [`MAX_OPENING`] connections of a rank are in their handshake at once, and
//! every handshake has a time limit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use std::net::TcpStream;

use crate::auth::{self, ClientHandshake, ClientStep, Handshake, Step};
use crate::error::{Result, RpcError};
use crate::log::log_at;
use crate::net::framing::{Frame, FrameReader};
use crate::net::sys;
use crate::transport::OutRequest;
use crate::wire::{Header, Hello, Kind, MAX_HANDSHAKE_PAYLOAD, NONCE_LEN};

use super::conn::{Conn, Greeting, Mode};
use super::send::request_header;
use super::stream::{Setup, ShmStream, ShmTicket, Stream};
use super::{PeerState, Shared, VIA_SHM, VIA_TCP};

/// A connection that has not finished its handshake by then is closed.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often connections in their handshake are checked for that timeout.
pub(super) const HANDSHAKE_SWEEP: Duration = Duration::from_millis(250);

/// A request waiting for its connection to open.
pub(super) struct Queued {
    id: u64,
    internal: bool,
    function: Box<str>,
    args: Vec<u8>,
    deadline: Option<Instant>,
}

impl Queued {
    pub(super) fn of(request: &OutRequest<'_>) -> Queued {
        Queued {
            id: request.id,
            internal: request.internal,
            function: request.function.into(),
            args: request.args.concat(),
            deadline: request.deadline,
        }
    }

    /// The bytes its frame will take in the outbox.
    fn len(&self) -> u64 {
        frame_len(self.function.len(), self.args.len())
    }

    /// The bytes `request`'s frame will take, before any copy is made.
    pub(super) fn len_of(request: &OutRequest<'_>) -> u64 {
        frame_len(request.function.len(), crate::transport::total_len(request.args))
    }
}

/// The bytes of a request frame with a name and arguments of these lengths.
fn frame_len(name_len: usize, args_len: usize) -> u64 {
    (crate::wire::HEADER_LEN + name_len + args_len) as u64
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

/// The requests waiting for a peer's connection to open, in order, and
/// the bytes their frames will take (held to the send window).
#[derive(Default)]
pub(super) struct WaitingCalls {
    calls: Vec<Queued>,
    pub(super) bytes: u64,
}

impl WaitingCalls {
    pub(super) fn of(request: Option<Queued>) -> WaitingCalls {
        let mut waiting = WaitingCalls::default();
        waiting.push(request);
        waiting
    }

    /// Adds `request`, first dropping the requests whose calls expired
    /// once the queue is long (see [`PRUNE_QUEUED_AT`]).
    pub(super) fn push(&mut self, request: Option<Queued>) {
        if self.calls.len() >= PRUNE_QUEUED_AT && self.calls.len().is_power_of_two() {
            let now = Instant::now();
            self.calls.retain(|q| q.deadline.is_none_or(|d| d > now));
            self.bytes = self.calls.iter().map(Queued::len).sum();
        }
        self.bytes += request.as_ref().map_or(0, Queued::len);
        self.calls.extend(request);
    }

    /// Takes call `id` out (it was cancelled before it could leave).
    pub(super) fn remove(&mut self, id: u64) {
        if let Some(i) = self.calls.iter().position(|q| q.id == id) {
            self.bytes -= self.calls.remove(i).len();
        }
    }
}

impl Shared {
    /// Starts opening a connection to `dst`, which the I/O loop carries on
    /// from: to a rank on this host, rings offered over its Unix socket
    /// (see `step_rings`); otherwise, or if that cannot start, a
    /// non-blocking TCP `connect` (see `on_connect_event`).
    pub(super) fn open(&self, dst: usize) -> Result<Arc<Conn>> {
        if self.same_host.is_some()
            && let Some(name) = &self.peers[dst].same_host_name
        {
            match self.shm_budget.take() {
                None => log_at!(
                    Debug,
                    Some(self.me),
                    "rank {dst} is on this host, but this rank keeps as many same-host connections as its \
                     descriptor limit allows; its calls use TCP"
                ),
                Some(ticket) => match self.offer_rings(name, ticket) {
                    Ok(stream) => {
                        self.peers[dst].via.store(VIA_SHM, Ordering::Relaxed);
                        return self.start_opening(Stream::Shm(Box::new(stream)), dst);
                    }
                    // Nobody listens under that name here: another host, or
                    // another network namespace.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT)) => {
                        log_at!(
                            Debug,
                            Some(self.me),
                            "rank {dst} is not on this host; its calls use TCP"
                        );
                    }
                    Err(e) => log_at!(
                        Info,
                        Some(self.me),
                        "no shared memory with rank {dst} ({e}); its calls use TCP"
                    ),
                },
            }
        }
        self.open_tcp(dst)
    }

    /// Starts a non-blocking TCP connect to `dst`. Socket options wait for
    /// the I/O loop (`on_connect_event`): the caller pays only for starting
    /// the connect.
    fn open_tcp(&self, dst: usize) -> Result<Arc<Conn>> {
        let addr = self.peers[dst].addr;
        self.peers[dst].via.store(VIA_TCP, Ordering::Relaxed);
        let stream = sys::connect_started(addr).map_err(|e| RpcError::PeerLost {
            rank: dst,
            reason: format!("cannot connect to {addr}: {e}"),
        })?;
        self.start_opening(Stream::Tcp(stream), dst)
    }

    /// Connects to a rank's same-host socket `name` and offers it a pair
    /// of rings.
    fn offer_rings(&self, name: &str, ticket: ShmTicket) -> std::io::Result<ShmStream> {
        let sock = sys::connect_unix(name)?;
        ShmStream::offer(sock, self.ring_bytes, self.spin, ticket)
    }

    /// A connection to `dst` whose opening has started joins the
    /// connections and the epoll set.
    fn start_opening(&self, stream: Stream, dst: usize) -> Result<Arc<Conn>> {
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
            self.forget_opening(&conn);
            return Err(RpcError::PeerLost {
                rank: dst,
                reason: format!("epoll refused the connection to {}: {e}", self.peers[dst].addr),
            });
        }
        Ok(conn)
    }

    /// Closes a connection in its handshake without failing anything; false
    /// if it was closed already.
    fn forget_opening(&self, conn: &Arc<Conn>) -> bool {
        let was_there = self.conns.lock().remove(&conn.token).is_some();
        if was_there {
            self.handshaking.fetch_sub(1, Ordering::AcqRel);
        }
        conn.close();
        was_there
    }

    /// The peer's setup message may have come on a same-host connection
    /// whose rings are not up yet: take it. True if the rings are up and
    /// the connection reads on; a failure closes it, and the rank this one
    /// was opening to is reached over TCP instead.
    pub(super) fn step_rings(&self, conn: &Arc<Conn>, stream: &ShmStream) -> bool {
        let failed = match stream.step_setup() {
            Ok(Setup::NotYet) => return false,
            Ok(Setup::Done) => match self.rings_up(conn) {
                Ok(()) => return true,
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if !self.forget_opening(conn) {
            return false;
        }
        match conn.opened_to {
            Some(dst) => {
                log_at!(
                    Info,
                    Some(self.me),
                    "setting up shared memory with rank {dst} failed ({failed}); its calls use TCP"
                );
                self.reopen_over_tcp(conn, dst);
            }
            None => log_at!(
                Info,
                Some(self.me),
                "setting up shared memory with a rank on this host failed ({failed}); it will use TCP"
            ),
        }
        false
    }

    /// The rings of a same-host connection are up: its bells join the
    /// epoll set, and the handshake starts over them.
    fn rings_up(&self, conn: &Arc<Conn>) -> Result<()> {
        conn.watch_rings()?;
        if conn.outbound {
            self.send_hello(conn)
        } else {
            *conn.greeting.lock() = Greeting::Serve(Handshake::AwaitHello);
            Ok(())
        }
    }

    /// The same-host connection `failed` opening to `dst` is replaced by a
    /// TCP one, which keeps its place (the calls queued, the opening turn).
    fn reopen_over_tcp(&self, failed: &Arc<Conn>, dst: usize) {
        let mut st = self.peers[dst].state.lock();
        let PeerState::Connecting {
            conn: Some(opening), ..
        } = &mut *st
        else {
            return;
        };
        if !Arc::ptr_eq(opening, failed) {
            return;
        }
        match self.open_tcp(dst) {
            Ok(conn) => *opening = conn,
            Err(e) => {
                self.peers[dst].set(&mut st, PeerState::Lost(e.clone()));
                drop(st);
                self.done_opening();
                if let Some(d) = self.dispatch() {
                    d.on_peer_lost(dst, e);
                }
            }
        }
    }

    /// An event on a TCP connection this rank is opening whose `connect`
    /// has not finished: once it has, send `Hello`. Errors fail the
    /// connection.
    pub(super) fn on_connect_event(&self, conn: &Arc<Conn>, stream: &TcpStream, dst: usize) -> Result<()> {
        let addr = self.peers[dst].addr;
        if let Some(e) = stream.take_error()? {
            return Err(RpcError::PeerLost {
                rank: dst,
                reason: format!("cannot connect to {addr}: {e}"),
            });
        }
        conn.connected()?;
        stream.set_nodelay(true)?;
        sys::detect_silent_peer(stream, self.peer_timeout)?;
        self.send_hello(conn)
    }

    /// Starts the client side of the handshake on a connection this rank
    /// opened.
    fn send_hello(&self, conn: &Arc<Conn>) -> Result<()> {
        let hello = Hello {
            rank: self.me as u32,
            world_size: self.world_size as u32,
            token: self.token,
            nonce: auth::random_bytes()?,
        };
        let (machine, payload) = ClientHandshake::start(hello);
        *conn.greeting.lock() = Greeting::Greet(machine);
        conn.send(Header::new(Kind::Hello), &[], &payload, Mode::NoWait, None)?;
        Ok(())
    }

    /// The connection to `dst` finished its handshake: it carries this
    /// rank's calls from now on, the queued ones first, in order.
    pub(super) fn on_connected(&self, dst: usize, conn: &Arc<Conn>) -> Result<()> {
        let corked = {
            let mut st = self.peers[dst].state.lock();
            match &mut *st {
                PeerState::Connecting {
                    conn: Some(opening),
                    queued,
                } if Arc::ptr_eq(opening, conn) => {
                    let queued = std::mem::take(queued).calls;
                    self.peers[dst].set(&mut st, PeerState::Ready(conn.clone()));
                    // Corked under the peer's lock: a call that finds the
                    // connection ready sends behind them (a frame sent on a
                    // connection with a corked batch goes after it).
                    let now = Instant::now();
                    queued
                        .iter()
                        .filter(|q| q.deadline.is_none_or(|d| d > now))
                        .try_for_each(|q| {
                            let header = request_header(q.id, q.internal, q.deadline.map(|d| d - now));
                            conn.send_corked(header, q.function.as_bytes(), &q.args, None).map(drop)
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

    /// Whether `dst` may start opening its connection now (fewer than
    /// [`MAX_OPENING`] are); if not, it waits in line for `done_opening`.
    pub(super) fn take_opening_turn(&self, dst: usize) -> bool {
        let mut opening = self.opening.lock();
        if opening.now < MAX_OPENING {
            opening.now += 1;
            true
        } else {
            opening.waiting.push_back(dst);
            false
        }
    }

    /// A connection left its handshake (ready, failed, or its rank lost):
    /// the next rank waiting for its turn starts opening one.
    pub(super) fn done_opening(&self) {
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
                    self.peers[next].set(&mut st, PeerState::Lost(e.clone()));
                    drop(st);
                    if let Some(d) = self.dispatch() {
                        d.on_peer_lost(next, e);
                    }
                }
            }
        }
    }

    /// Frames on a connection this rank is opening to `dst`, before it is
    /// authenticated: the client side of the handshake.
    pub(super) fn greet_server(
        &self,
        conn: &Arc<Conn>,
        dst: usize,
        frame: Frame,
        reader: &mut FrameReader,
    ) -> Result<()> {
        let addr = self.peers[dst].addr;
        let who = format!("rank {dst} at {addr}");
        let step = match &mut *conn.greeting.lock() {
            Greeting::Greet(machine) => machine.step(&self.key, dst as u32, &frame, &who),
            _ => Err(RpcError::Protocol(format!(
                "{who} sent a frame before the connection was open"
            ))),
        };
        match step? {
            ClientStep::Proof(proof) => conn.send(Header::new(Kind::Proof), &[], &proof, Mode::NoWait, None)?,
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
    pub(super) fn greet(&self, conn: &Arc<Conn>, frame: Frame, reader: &mut FrameReader) -> Result<()> {
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
            Ok(Step::Challenge(payload)) => {
                conn.send(Header::new(Kind::Challenge), &[], &payload, Mode::NoWait, None)?
            }
            Ok(Step::Authenticated(hello)) => {
                let welcome = Hello {
                    rank: self.me as u32,
                    world_size: self.world_size as u32,
                    token: self.token,
                    nonce: [0; NONCE_LEN],
                };
                conn.send(Header::new(Kind::Welcome), &[], &welcome.encode(), Mode::NoWait, None)?;
                reader.set_max_payload(self.max_payload);
                *conn.greeting.lock() = Greeting::Done;
                conn.set_peer(hello.rank as usize);
                self.handshaking.fetch_sub(1, Ordering::AcqRel);
            }
            Err(e) => {
                let (header, text) = auth::refused_frame(&e);
                let _ = conn.send(header, &[], &text, Mode::NoWait, None);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Closes connections whose handshake outlived its limit: 5 s for one
    /// accepted (the failure promises'), and the peer timeout for one this
    /// rank opened, whose peer is then lost like a peer silent on an open
    /// connection (a stopped process, a host gone before it answered).
    pub(super) fn close_stale_handshakes(&self) {
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
}
