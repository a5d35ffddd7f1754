//! What a connection carries its bytes over: a TCP socket, or, to a rank on
//! this host, a pipe of two shared-memory rings (`crate::shm::pipe`) set up
//! over the Unix socket the pair met on. Everything above this file (the
//! outbox, the send window, corking, who reads, the handshake, failures) is
//! the same for both; this file is where they differ: reading, writing,
//! waiting, and what the epoll set watches.
//!
//! A pipe's descriptors join the epoll set under the connection's token,
//! told apart by [`Part`] in its top bits: the data bell (bytes to read),
//! the room bell (room to write, reported as writable), the socket (setup
//! messages, then only the peer going), and the wake bell the pipe rings
//! itself (reported as both).

use std::io::{self, IoSlice, Read};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::Mutex;

use crate::net::framing::{gather_from, slices_from};
use crate::net::sys::{self, EDGE, Epoll, Event, HANGUP, MAX_IOV, READABLE, WRITABLE};
use crate::shm::memfd::{recv_with_fds, send_with_fds};
use crate::shm::pipe::{Offer, ShmPipe, take_offer};

/// Which of a connection's descriptors an epoll token names (its top two bits).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Part {
    /// The TCP socket, or a pipe's data bell.
    Main,
    /// A pipe's room bell.
    Room,
    /// A pipe's Unix socket.
    Socket,
    /// A pipe's own wake bell (bytes or room found there already).
    Wake,
}

const PART_SHIFT: u32 = 62;
/// Up to this many bytes left to write are copied into one buffer and sent
/// to a TCP socket with one plain `send`.
const GATHER: usize = 512;

impl Part {
    fn tag(self, token: u64) -> u64 {
        token
            | match self {
                Part::Main => 0,
                Part::Room => 1 << PART_SHIFT,
                Part::Socket => 2 << PART_SHIFT,
                Part::Wake => 3 << PART_SHIFT,
            }
    }

    /// The connection's token in an event, and the event as the connection
    /// sees it: a room bell is "writable"; a pipe's socket says only that
    /// the peer went (or, during setup, that its message is there).
    pub(crate) fn split(ev: Event) -> (u64, Part, Event) {
        let token = ev.token & ((1 << PART_SHIFT) - 1);
        let in_bits = (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32;
        match ev.token >> PART_SHIFT {
            0 => (token, Part::Main, ev),
            1 => (
                token,
                Part::Room,
                Event {
                    token,
                    events: if ev.events & in_bits != 0 { WRITABLE } else { 0 },
                },
            ),
            2 => (token, Part::Socket, Event { token, ..ev }),
            _ => (
                token,
                Part::Wake,
                Event {
                    token,
                    events: (libc::EPOLLIN | libc::EPOLLOUT) as u32,
                },
            ),
        }
    }
}

pub(crate) enum Stream {
    Tcp(TcpStream),
    Shm(Box<ShmStream>),
}

/// A same-host pair's connection: the socket it met on, and the pipe once
/// the rings are set up.
pub(crate) struct ShmStream {
    sock: UnixStream,
    pipe: OnceLock<ShmPipe>,
    /// Its place in the rank's budget of same-host connections.
    _ticket: ShmTicket,
    /// How long a writer finding the ring full spins before it sleeps.
    spin: Duration,
    /// The opener's rings until the acceptor answers.
    offer: Mutex<Option<Offer>>,
}

/// How a setup step on a pipe's socket ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Setup {
    /// The rings are up.
    Done,
    /// The peer's message has not come yet.
    NotYet,
}

impl ShmStream {
    /// The opener's side: offers rings of `ring_bytes` over `sock`, just
    /// connected (never blocks: the message fits in an empty socket).
    pub(crate) fn offer(
        sock: UnixStream,
        ring_bytes: usize,
        spin: Duration,
        ticket: ShmTicket,
    ) -> io::Result<ShmStream> {
        sock.set_nonblocking(true)?;
        let offer = Offer::new(ring_bytes)?;
        let (bytes, fds) = offer.message();
        send_with_fds(&sock, bytes, &fds)?;
        Ok(ShmStream {
            sock,
            pipe: OnceLock::new(),
            _ticket: ticket,
            spin,
            offer: Mutex::new(Some(offer)),
        })
    }

    /// The acceptor's side: waits (in the event loop) for the offer.
    pub(crate) fn accepted(sock: UnixStream, spin: Duration, ticket: ShmTicket) -> io::Result<ShmStream> {
        sock.set_nonblocking(true)?;
        Ok(ShmStream {
            sock,
            pipe: OnceLock::new(),
            _ticket: ticket,
            spin,
            offer: Mutex::new(None),
        })
    }

    /// Takes the peer's setup message if it is there: the acceptor answers
    /// the offer, the opener takes the answer. An error (bad message, the
    /// peer gone, memory refused) ends the connection.
    pub(crate) fn step_setup(&self) -> io::Result<Setup> {
        if self.pipe.get().is_some() {
            return Ok(Setup::Done);
        }
        let mut offer = self.offer.lock();
        let mut message = [0u8; 32];
        let (n, fds) = match recv_with_fds(&self.sock, &mut message, 3) {
            Ok((0, _)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Setup::NotYet),
            Err(e) => return Err(e),
        };
        let pipe = match offer.take() {
            Some(offer) => offer.accepted(self.sock.try_clone()?, &message[..n], fds)?,
            None => {
                let (pipe, answer) = take_offer(self.sock.try_clone()?, &message[..n], fds)?;
                send_with_fds(&self.sock, answer, &[])?;
                pipe
            }
        };
        let _ = self.pipe.set(pipe);
        Ok(Setup::Done)
    }

    pub(crate) fn pipe(&self) -> Option<&ShmPipe> {
        self.pipe.get()
    }
}

/// How many same-host connections a rank keeps at once: each holds five
/// descriptors on each side (its socket, two doorbells, the memfd, a wake
/// bell) where a TCP connection holds one, so a rank that talks to many
/// ranks of its host would run out of descriptors long before memory. At
/// most an eighth of the descriptor limit goes to them (128 connections
/// under the common limit of 1024: 64 ranks all-to-all); the peers beyond
/// use TCP.
pub(crate) struct ShmBudget {
    in_use: AtomicUsize,
    max: usize,
}

impl ShmBudget {
    pub(crate) fn for_this_process() -> Arc<ShmBudget> {
        Arc::new(ShmBudget {
            in_use: AtomicUsize::new(0),
            max: (sys::descriptor_limit() / 8).max(4),
        })
    }

    /// A place for one more connection, if there is one.
    pub(crate) fn take(self: &Arc<Self>) -> Option<ShmTicket> {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1))
            .ok()
            .map(|_| ShmTicket(self.clone()))
    }
}

/// One connection's place in the budget, given back when it drops.
pub(crate) struct ShmTicket(Arc<ShmBudget>);

impl Drop for ShmTicket {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What epoll watches a connection for, as its `Interest` says.
pub(crate) struct Watch {
    pub read: bool,
    pub write: bool,
}

/// Which of a connection's interests changed (a pipe sets only the
/// descriptors that carry it; a TCP socket carries all).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Changed {
    /// Every descriptor, set anew (an event met meanwhile is reported again).
    All,
    /// Whether the I/O thread reads.
    Reads,
    /// Whether it waits to write.
    Writes,
}

impl Stream {
    pub(crate) fn is_shm(&self) -> bool {
        matches!(self, Stream::Shm(_))
    }

    /// Over shared memory, marks call `id` (sent here) cancelled where the
    /// peer's handlers see it before the cancel's frame is read.
    pub(crate) fn mark_cancelled(&self, id: u64) {
        if let Stream::Shm(s) = self
            && let Some(pipe) = s.pipe.get()
        {
            pipe.mark_cancelled(id);
        }
    }

    /// Whether the peer marked call `id` (received here) cancelled; always
    /// false over TCP.
    pub(crate) fn cancel_marked(&self, id: u64) -> bool {
        match self {
            Stream::Shm(s) => s.pipe.get().is_some_and(|p| p.cancel_marked(id)),
            Stream::Tcp(_) => false,
        }
    }

    #[cfg(test)]
    pub(crate) fn tcp(&self) -> Option<&TcpStream> {
        match self {
            Stream::Tcp(s) => Some(s),
            Stream::Shm(_) => None,
        }
    }

    /// Adds the connection to the epoll set (`added`: it is in it already,
    /// then its interest is changed) so that it is watched as `watch` says.
    /// `changed`: what differs from the last call (a pipe sets only the
    /// descriptors that carry it: the others already match `watch`).
    /// `bells_added` tracks whether a pipe's bells are in the set (they
    /// join once the rings are up).
    pub(crate) fn watch(
        &self,
        epoll: &Epoll,
        token: u64,
        watch: Watch,
        changed: Changed,
        added: bool,
        bells_added: &mut bool,
    ) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                let events =
                    EDGE | HANGUP | if watch.read { READABLE } else { 0 } | if watch.write { WRITABLE } else { 0 };
                if added {
                    epoll.modify(s, token, events)
                } else {
                    epoll.add(s, token, events)
                }
            }
            Stream::Shm(s) => {
                // The socket reads only the setup messages and the end. Set
                // again on `Changed::All`, so that an end reported while
                // another thread read is reported again (edge-triggered);
                // a change of reading or writing alone sets only its bell
                // (a caller that leads and hands back costs two epoll_ctl,
                // not six).
                if !added {
                    epoll.add(&s.sock, Part::Socket.tag(token), EDGE | READABLE)?;
                } else if changed == Changed::All {
                    epoll.modify(&s.sock, Part::Socket.tag(token), EDGE | READABLE)?;
                }
                let Some(pipe) = s.pipe.get() else {
                    return Ok(());
                };
                let bell = |on: bool| EDGE | if on { libc::EPOLLIN as u32 } else { 0 };
                let (data, room) = (pipe.data_bell_fd(), pipe.room_bell_fd());
                if *bells_added {
                    if changed != Changed::Writes {
                        epoll.modify(&data, Part::Main.tag(token), bell(watch.read))?;
                    }
                    if changed != Changed::Reads {
                        epoll.modify(&room, Part::Room.tag(token), bell(watch.write))?;
                    }
                } else {
                    epoll.add(&data, Part::Main.tag(token), bell(watch.read))?;
                    epoll.add(&room, Part::Room.tag(token), bell(watch.write))?;
                    epoll.add(&pipe.wake_fd(), Part::Wake.tag(token), bell(true))?;
                    *bells_added = true;
                }
                if watch.read && changed != Changed::Writes {
                    pipe.arm_reads()?;
                }
                if watch.write && changed != Changed::Reads {
                    pipe.arm_writes()?;
                }
                Ok(())
            }
        }
    }

    /// Bytes wait to be read (a pipe only: a look at its ring, no system
    /// call). A ring found corrupt says yes, so that a read finds out.
    pub(crate) fn has_data(&self) -> bool {
        match self {
            Stream::Tcp(_) => false,
            Stream::Shm(s) => s.pipe.get().is_some_and(|p| p.has_data().unwrap_or(true)),
        }
    }

    /// An event loop heard a pipe's bell (`part`) and owns what it rings
    /// for (see `ShmPipe::drain`): empty it, so that the next ring raises a
    /// new event.
    pub(crate) fn drain_bell(&self, part: Part) {
        if let Stream::Shm(s) = self
            && let Some(pipe) = s.pipe.get()
        {
            match part {
                Part::Main => pipe.drain(true),
                Part::Room => pipe.drain(false),
                Part::Wake => pipe.drain_wake(),
                Part::Socket => {}
            }
        }
    }

    /// A pipe read without asking the peer to ring: ask it now (the event
    /// loop is about to sleep).
    pub(crate) fn arm_reads(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(_) => Ok(()),
            Stream::Shm(s) => s.pipe.get().map_or(Ok(()), ShmPipe::arm_reads),
        }
    }

    /// Takes the connection out of the epoll set.
    pub(crate) fn unwatch(&self, epoll: &Epoll, bells_added: &mut bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => epoll.delete(s),
            Stream::Shm(s) => {
                if let Some(pipe) = s.pipe.get()
                    && std::mem::take(bells_added)
                {
                    let _ = epoll.delete(&pipe.data_bell_fd());
                    let _ = epoll.delete(&pipe.room_bell_fd());
                    let _ = epoll.delete(&pipe.wake_fd());
                }
                epoll.delete(&s.sock)
            }
        }
    }

    /// Writes some of `parts` from byte `skip` on without waiting;
    /// `WouldBlock` when nothing fits now.
    pub(crate) fn write_some<P: AsRef<[u8]>>(&self, parts: &[P], skip: usize) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => {
                let left = parts.iter().map(|p| p.as_ref().len()).sum::<usize>() - skip;
                if left <= GATHER {
                    // Plain `send` of one buffer skips importing an iovec
                    // array: measurably cheaper per small frame (~0.2-0.4 us
                    // per round trip).
                    let mut gathered = [0u8; GATHER];
                    let n = gather_from(parts, skip, &mut gathered);
                    sys::send_one(s, &gathered[..n])
                } else {
                    let mut slices = [IoSlice::new(&[]); MAX_IOV];
                    let n = slices_from(parts, skip, &mut slices);
                    sys::send_vectored(s, &slices[..n])
                }
            }
            Stream::Shm(s) => match s.pipe.get() {
                Some(pipe) => match pipe.write(parts, skip)? {
                    0 => Err(io::ErrorKind::WouldBlock.into()),
                    n => Ok(n),
                },
                // Nothing is sent before the rings are up (the handshake
                // starts after).
                None => Err(io::ErrorKind::NotConnected.into()),
            },
        }
    }

    /// Waits up to `timeout` for room to write (after a write that did not
    /// fit), with `left` bytes to go.
    pub(crate) fn wait_writable(&self, left: usize, timeout: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => sys::wait_writable(s, timeout).map(drop),
            Stream::Shm(s) => match s.pipe.get() {
                Some(pipe) => pipe.wait_for_room(left, s.spin, timeout),
                None => Err(io::ErrorKind::NotConnected.into()),
            },
        }
    }

    /// Waits up to `timeout` for bytes to read (or the end), after a read
    /// that announced it sleeps found none.
    pub(crate) fn wait_readable(&self, timeout: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => sys::wait_readable(s, timeout).map(drop),
            Stream::Shm(s) => match s.pipe.get() {
                Some(pipe) => pipe.wait(Duration::ZERO, timeout),
                None => sys::wait_readable(&s.sock, timeout).map(drop),
            },
        }
    }

    /// Ends traffic both ways: the peer sees the end, and so does our reader.
    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Shm(s) => s.sock.shutdown(Shutdown::Both),
        };
    }

    /// The peer, for log lines.
    pub(crate) fn describe_peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s.peer_addr().map_or("?".into(), |a| a.to_string()),
            Stream::Shm(s) => format!("a process on this host (socket {})", s.sock.as_raw_fd()),
        }
    }

    /// A reader over the stream: `how` says whether and how it waits.
    pub(crate) fn incoming(&self, how: How) -> Incoming<'_> {
        Incoming {
            stream: self,
            how,
            timed_out: false,
            bytes: 0,
        }
    }
}

/// How an [`Incoming`] reads.
#[derive(Clone, Copy)]
pub(crate) enum How {
    /// Never waits; an empty pipe asks the peer to ring (an event loop or a
    /// caller about to sleep reads this way).
    NoWait,
    /// Never waits, and an empty pipe asks for nothing: a caller spinning.
    Spinning,
    /// The first read waits for bytes: a TCP socket's receive timeout; a
    /// pipe spins for `spin`, then sleeps on its bell up to `idle`.
    Waiting { spin: Duration, idle: Duration },
}

/// A stream as `Read`, for the frame reader.
pub(crate) struct Incoming<'a> {
    stream: &'a Stream,
    how: How,
    timed_out: bool,
    /// Bytes read so far (a reader spinning on a pipe goes on spinning
    /// while they grow: the peer is writing).
    bytes: u64,
}

impl Incoming<'_> {
    /// The first read waited its whole time and got nothing.
    pub(crate) fn timed_out(&self) -> bool {
        self.timed_out
    }

    /// Bytes read so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reads the next bytes `how` (it applies until the next call).
    pub(crate) fn set_how(&mut self, how: How) {
        self.how = how;
    }
}

impl Read for Incoming<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.stream {
            Stream::Tcp(s) => {
                let mut recv = match self.how {
                    How::Waiting { .. } => sys::Recv::waiting(s),
                    How::NoWait | How::Spinning => sys::Recv::no_wait(s),
                };
                // Only the first read waits.
                self.how = How::NoWait;
                let got = recv.read(buf);
                self.timed_out |= recv.timed_out();
                if let Ok(n) = got {
                    self.bytes += n as u64;
                }
                got
            }
            Stream::Shm(s) => {
                let Some(pipe) = s.pipe.get() else {
                    return Err(io::ErrorKind::WouldBlock.into());
                };
                // A waiting reader sleeps only after asking the peer to ring
                // (`wait`), and reads on without asking: it looks again.
                if let How::Waiting { spin, idle } = self.how {
                    self.how = How::Spinning;
                    if !pipe.has_data()? {
                        pipe.wait(spin, idle)?;
                        if !pipe.has_data()? {
                            self.timed_out = true;
                        }
                    }
                }
                let announce = matches!(self.how, How::NoWait);
                // A short read must mean the pipe is empty and (unless
                // spinning) the peer asked to ring: the frame reader ends
                // its pass on one, and waits for the next event.
                let mut got = 0;
                while got < buf.len() {
                    match pipe.read(&mut buf[got..], announce) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if got > 0 && e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                self.bytes += got as u64;
                Ok(got)
            }
        }
    }
}
