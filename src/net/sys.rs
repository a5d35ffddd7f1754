//! The few system calls std does not offer: epoll, sends that cannot raise
//! SIGPIPE (a C host program may not ignore it), and reads and writes that
//! never wait whatever the socket's mode (a connection served by a
//! responder stays in blocking mode so that one thread may wait in `recv`).

use std::io::{self, IoSlice};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub(crate) const READABLE: u32 = libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32;
pub(crate) const WRITABLE: u32 = libc::EPOLLOUT as u32;
/// The peer closed its side (reported even when reading is left to others).
pub(crate) const HANGUP: u32 = libc::EPOLLRDHUP as u32;
/// Report a connection once per change, not on every wait while it stays
/// ready: each wait would otherwise poll the socket again (~0.2 us per round
/// trip here). Sound because whoever reads a connection reads until a short
/// read or "would block" (new bytes then raise a new event), and whoever
/// stops earlier (a caller done with its reply) re-arms it with a modify,
/// which reports it again if it is still ready.
pub(crate) const EDGE: u32 = libc::EPOLLET as u32;

/// At most this many buffers go to one vectored send.
pub(crate) const MAX_IOV: usize = 64;

/// An epoll instance.
pub(crate) struct Epoll {
    fd: OwnedFd,
}

/// One readiness event: the registration token and the event bits.
#[derive(Clone, Copy)]
pub(crate) struct Event {
    pub token: u64,
    pub events: u32,
}

impl Event {
    /// Bytes to read on `token`, as if epoll had said so.
    pub(crate) fn readable_now(token: u64) -> Event {
        Event {
            token,
            events: libc::EPOLLIN as u32,
        }
    }

    pub(crate) fn readable(&self) -> bool {
        self.events & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
    }
    /// The peer closed its side, or the connection failed: the end of the
    /// stream follows the bytes still to read.
    pub(crate) fn closed(&self) -> bool {
        self.events & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
    }
    pub(crate) fn writable(&self) -> bool {
        self.events & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
    }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Epoll {
    pub(crate) fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative return is a
        // new descriptor that nothing else owns.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just created and is owned by nobody else.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event that outlives the call; the
        // kernel copies it. Both descriptors are open (callers own `fd`).
        check(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) }).map(drop)
    }

    pub(crate) fn add(&self, fd: &impl AsRawFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd.as_raw_fd(), token, events)
    }

    pub(crate) fn modify(&self, fd: &impl AsRawFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd.as_raw_fd(), token, events)
    }

    pub(crate) fn delete(&self, fd: &impl AsRawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd.as_raw_fd(), 0, 0)
    }

    /// Waits up to `timeout_ms` (-1: forever) and fills `out` with events.
    pub(crate) fn wait(&self, out: &mut Vec<Event>, timeout_ms: i32) -> io::Result<()> {
        const MAX: usize = 128;
        // Left uninitialised: the kernel writes the entries it reports.
        let mut raw = [std::mem::MaybeUninit::<libc::epoll_event>::uninit(); MAX];
        // SAFETY: `raw` has room for MAX events and lives across the call;
        // the kernel writes at most MAX entries.
        let n = match check(unsafe {
            libc::epoll_wait(self.fd.as_raw_fd(), raw.as_mut_ptr().cast(), MAX as i32, timeout_ms)
        }) {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        out.clear();
        out.extend(raw[..n].iter().map(|e| {
            // SAFETY: epoll_wait wrote the first `n` entries.
            let e = unsafe { e.assume_init() };
            Event {
                token: e.u64,
                events: e.events,
            }
        }));
        Ok(())
    }
}

/// Sends several buffers with one `sendmsg`, without waiting (MSG_DONTWAIT)
/// and with MSG_NOSIGNAL (a peer that went away gives EPIPE instead of
/// killing the process).
pub(crate) fn send_vectored(fd: &impl AsRawFd, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let bufs = &bufs[..bufs.len().min(MAX_IOV)];
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is guaranteed ABI-compatible with iovec on Unix.
    msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = bufs.len() as _;
    // SAFETY: `msg` points at `bufs`, which are valid for reads for the
    // duration of the call; the kernel only reads them.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `send` of one buffer, without waiting and with MSG_NOSIGNAL.
pub(crate) fn send_one(fd: &impl AsRawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length for the duration of
    // the call; the kernel only reads it.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Reads a socket with `recv`. Every read is without waiting
/// (MSG_DONTWAIT), except, for [`Recv::waiting`], the first one: it blocks
/// until bytes come or the socket's receive timeout passes.
pub(crate) struct Recv<'a> {
    fd: &'a TcpStream,
    wait_first: bool,
    timed_out: bool,
}

impl<'a> Recv<'a> {
    pub(crate) fn no_wait(fd: &'a TcpStream) -> Recv<'a> {
        Recv {
            fd,
            wait_first: false,
            timed_out: false,
        }
    }

    /// For a socket in blocking mode with a receive timeout.
    pub(crate) fn waiting(fd: &'a TcpStream) -> Recv<'a> {
        Recv {
            fd,
            wait_first: true,
            timed_out: false,
        }
    }

    /// The first read waited its whole timeout and got nothing.
    pub(crate) fn timed_out(&self) -> bool {
        self.timed_out
    }
}

impl io::Read for Recv<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let wait = std::mem::take(&mut self.wait_first);
        let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
        // SAFETY: `buf` is valid for writes of its length for the duration
        // of the call; the descriptor is open (borrowed from the stream).
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        self.timed_out = wait && e.kind() == io::ErrorKind::WouldBlock;
        Err(e)
    }
}

fn set_option(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int that outlives the call, and its size
    // is what is passed; the descriptor is open (the caller owns it).
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(ret).map(drop)
}

/// A listening socket on `addr` whose queue of connections not yet
/// accepted holds 4096 (the kernel may cap it at `somaxconn`): when every
/// rank of a large world opens a connection here at once, a short queue
/// drops the excess, and each dropped connect waits a second or more to
/// try again. Like std's, it sets `SO_REUSEADDR`.
pub(crate) fn listen(addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Starts a TCP connection to `addr` without waiting for it: the socket is
/// non-blocking, and epoll reports it writable once the connection is made
/// (or failed: `take_error` then says why).
pub(crate) fn connect_started(addr: std::net::SocketAddr) -> io::Result<std::net::TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(socket.into())
}

/// The abstract Unix socket name (no file; reachable only from this
/// network namespace) of the rank listening on TCP at `tcp_addr`, with
/// `nonce` (published through the rendezvous) so that no other process can
/// take the name first.
pub(crate) fn same_host_name(tcp_addr: std::net::SocketAddr, nonce: &str) -> String {
    format!("\0rpcagent/{tcp_addr}/{nonce}")
}

/// The process's soft limit on open descriptors (`RLIMIT_NOFILE`), or
/// 1024 if it cannot be read.
pub(crate) fn descriptor_limit() -> usize {
    // SAFETY: `rlimit` is plain data, filled by getrlimit.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: writes one rlimit into a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}

/// A non-blocking listener on the abstract Unix socket `name`.
pub(crate) fn listen_unix(name: &str) -> io::Result<std::os::unix::net::UnixListener> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(name)?)?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(std::os::unix::net::UnixListener::from(std::os::fd::OwnedFd::from(
        socket,
    )))
}

/// Connects to the abstract Unix socket `name` without waiting: a listener
/// there takes the connection at once, or the call fails (nobody listens:
/// another host or network namespace; its queue is full).
pub(crate) fn connect_unix(name: &str) -> io::Result<std::os::unix::net::UnixStream> {
    use socket2::{Domain, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&SockAddr::unix(name)?)?;
    Ok(std::os::unix::net::UnixStream::from(std::os::fd::OwnedFd::from(socket)))
}

/// Makes the kernel declare the connection dead when the peer stays silent
/// for about `timeout`: keepalive probes while idle, and a user timeout for
/// data that is never acknowledged (a host gone, a cable cut).
pub(crate) fn detect_silent_peer(fd: &impl AsRawFd, timeout: std::time::Duration) -> io::Result<()> {
    let total = timeout.as_secs().clamp(3, i32::MAX as u64 / 1000) as libc::c_int;
    let idle = (total / 2).max(1);
    let interval = ((total - idle) / 3).max(1);
    set_option(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle)?;
    set_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, interval)?;
    set_option(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3)?;
    set_option(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, total * 1000)
}

/// Waits up to `timeout` for `fd` to become readable (or hung up);
/// false on timeout.
pub(crate) fn wait_readable(fd: &impl AsRawFd, timeout: std::time::Duration) -> io::Result<bool> {
    poll_one(fd, libc::POLLIN, timeout)
}

/// Waits up to `timeout` for `fd` to accept more bytes; false on timeout.
pub(crate) fn wait_writable(fd: &impl AsRawFd, timeout: std::time::Duration) -> io::Result<bool> {
    poll_one(fd, libc::POLLOUT, timeout)
}

fn poll_one(fd: &impl AsRawFd, events: libc::c_short, timeout: std::time::Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // Rounded up: a wait shorter than a millisecond must still sleep, not
    // turn into a poll that returns at once (and a loop around it, a spin).
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfd` is one valid pollfd that outlives the call.
    match check(unsafe { libc::poll(&mut pfd, 1, ms) }) {
        Ok(n) => Ok(n > 0),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(e),
    }
}

/// Asks for transparent huge pages behind a large buffer about to be filled,
/// so filling it takes a few faults instead of one per 4 KiB page. Advice
/// only: errors (no THP support) are ignored.
pub(crate) fn prefer_huge_pages(buf: &mut [u8]) {
    const HUGE: usize = 2 << 20;
    let start = buf.as_mut_ptr() as usize;
    let aligned = start.next_multiple_of(HUGE);
    let end = start + buf.len();
    if end > aligned + HUGE {
        let len = (end - aligned) / HUGE * HUGE;
        // SAFETY: [aligned, aligned + len) lies inside `buf`, which this
        // thread borrows mutably; madvise only changes how the kernel backs
        // those pages, not their contents or validity.
        unsafe { libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    }
}

/// An eventfd used as a level-triggered flag: readable while set.
pub(crate) struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new
        // descriptor that only this value owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        Ok(EventFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Makes it readable (it stays so until `clear`).
    pub(crate) fn set(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to a non-blocking eventfd:
        // a full counter (2^64 - 2 sets without a clear) is EAGAIN, and it
        // stays set.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Makes it not readable.
    pub(crate) fn clear(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN (already clear) is
        // harmless.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Nanoseconds on the monotonic clock (any fixed origin): one vDSO call,
/// for timing every request (`Instant::now` plus `elapsed` cost about three
/// times the instructions, in the checked arithmetic around the call).
pub(crate) fn monotonic_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes one timespec into a live local; CLOCK_MONOTONIC
    // cannot fail on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(t.tv_nsec as u64)
}
