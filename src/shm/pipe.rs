//! One same-host pair's byte pipe: two rings in one sealed memfd, a
//! doorbell (eventfd) per side, and the Unix socket the pair met on, kept
//! open for the pair's life so that a dead peer is seen at once (EOF).
//!
//! Setup, after the two sides connected (and authenticated) over the
//! socket: the opener sends `SETUP_MAGIC`, the ring size, and its memfd and
//! doorbell (`SCM_RIGHTS`); the acceptor checks the size, maps the memfd
//! only if it is sealed and long enough, and answers with the magic and
//! its own doorbell. The opener writes ring 0 and reads ring 1; the
//! acceptor the other way round.
//!
//! Reading and writing never block: an empty ring reads as `WouldBlock`
//! (after announcing sleep, so the writer rings the doorbell), a full one
//! writes 0 bytes (after announcing the wait for room). `wait` sleeps on
//! the doorbell and the socket after spinning a while.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::memfd::{SharedMemory, recv_with_fds, send_with_fds};
use super::ring::{Consumer, Corrupt, Producer, Region};

const SETUP_MAGIC: &[u8; 8] = b"RPCSHM01";
/// The ring sizes a peer may ask for.
pub(crate) const MIN_RING: usize = 4096;
pub(crate) const MAX_RING: usize = 1 << 30;

pub(crate) struct ShmPipe {
    sock: UnixStream,
    _memory: SharedMemory,
    tx: Mutex<Producer>,
    rx: Mutex<Consumer>,
    /// Rung by the peer: bytes for us, or room for us.
    my_bell: OwnedFd,
    peer_bell: OwnedFd,
}

fn corrupt(c: Corrupt) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, c.0)
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain call; the descriptor is owned by the result.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ring_bell(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd. A full counter
    // (EAGAIN) means it is rung already.
    unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

fn drain_bell(fd: RawFd) {
    let mut count: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64; EAGAIN when not rung.
    unsafe { libc::read(fd, &mut count as *mut u64 as *mut libc::c_void, 8) };
}

impl ShmPipe {
    /// The opener's side: makes the rings (`ring_bytes` each, a power of
    /// two) and hands them to the peer over `sock` (blocking).
    pub(crate) fn open(sock: UnixStream, ring_bytes: usize) -> io::Result<ShmPipe> {
        if !(MIN_RING..=MAX_RING).contains(&ring_bytes) || !ring_bytes.is_power_of_two() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad ring size"));
        }
        let region = Region::bytes_for(ring_bytes);
        let memory = SharedMemory::create("rpcagent-rings", 2 * region)?;
        let my_bell = eventfd()?;
        let mut setup = SETUP_MAGIC.to_vec();
        setup.extend_from_slice(&(ring_bytes as u64).to_le_bytes());
        send_with_fds(&sock, &setup, &[memory.fd(), my_bell.as_raw_fd()])?;
        let mut reply = [0u8; 8];
        let (n, mut fds) = recv_with_fds(&sock, &mut reply, 1)?;
        if n != 8 || &reply != SETUP_MAGIC || fds.len() != 1 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the peer refused the rings"));
        }
        let peer_bell = fds.pop().expect("one descriptor");
        ShmPipe::over(sock, memory, region, 0, my_bell, peer_bell)
    }

    /// The acceptor's side: takes the rings the opener sent (blocking).
    pub(crate) fn accept(sock: UnixStream) -> io::Result<ShmPipe> {
        let mut setup = [0u8; 16];
        let (n, mut fds) = recv_with_fds(&sock, &mut setup, 2)?;
        let bad = |why: &str| {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad ring setup: {why}"),
            ))
        };
        if n != 16 || &setup[..8] != SETUP_MAGIC || fds.len() != 2 {
            return bad("not a setup message");
        }
        let ring_bytes = u64::from_le_bytes(setup[8..].try_into().expect("8 bytes"));
        if !(MIN_RING as u64..=MAX_RING as u64).contains(&ring_bytes) || !ring_bytes.is_power_of_two() {
            return bad("ring size");
        }
        let region = Region::bytes_for(ring_bytes as usize);
        let peer_bell = fds.pop().expect("two descriptors");
        let memory = SharedMemory::from_peer(fds.pop().expect("two descriptors"), 2 * region)?;
        let my_bell = eventfd()?;
        send_with_fds(&sock, SETUP_MAGIC, &[my_bell.as_raw_fd()])?;
        ShmPipe::over(sock, memory, region, 1, my_bell, peer_bell)
    }

    /// `side` 0 writes the first ring and reads the second; 1 the reverse.
    fn over(
        sock: UnixStream,
        memory: SharedMemory,
        region: usize,
        side: usize,
        my_bell: OwnedFd,
        peer_bell: OwnedFd,
    ) -> io::Result<ShmPipe> {
        let ring = |i: usize| {
            // SAFETY: ring `i` is the `i`th of two `region`-byte halves of
            // the mapping (page-aligned, so 8-aligned), which the pipe owns
            // for as long as the rings live.
            unsafe { Region::new(memory.as_ptr().add(i * region), region) }.map_err(corrupt)
        };
        let (tx, rx) = (ring(side)?, ring(1 - side)?);
        sock.set_nonblocking(true)?;
        Ok(ShmPipe {
            sock,
            tx: Mutex::new(Producer::new(tx)),
            rx: Mutex::new(Consumer::new(rx)),
            _memory: memory,
            my_bell,
            peer_bell,
        })
    }

    /// Writes what fits of `parts` from byte `skip` on; 0 when the ring is
    /// full (the peer is then asked to ring when it makes room).
    pub(crate) fn write(&self, parts: &[&[u8]], skip: usize) -> io::Result<usize> {
        let mut tx = self.tx.lock();
        let (n, wake) = tx.write(parts, skip).map_err(corrupt)?;
        if wake {
            ring_bell(self.peer_bell.as_raw_fd());
        }
        let left: usize = parts.iter().map(|p| p.len()).sum::<usize>() - skip - n;
        if left > 0 && tx.prepare_wait_for_room(left as u64).map_err(corrupt)? {
            drop(tx);
            return Ok(n + self.write(parts, skip + n)?);
        }
        Ok(n)
    }

    /// Reads what the ring holds; `WouldBlock` when empty (the peer is then
    /// asked to ring), `Ok(0)` once it is empty and the peer is gone.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rx = self.rx.lock();
        loop {
            let (n, wake) = rx.read(buf).map_err(corrupt)?;
            if wake {
                ring_bell(self.peer_bell.as_raw_fd());
            }
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            drain_bell(self.my_bell.as_raw_fd());
            if rx.prepare_sleep().map_err(corrupt)? {
                continue;
            }
            return match self.peer_gone() {
                Ok(true) => Ok(0),
                Ok(false) => Err(io::ErrorKind::WouldBlock.into()),
                Err(e) => Err(e),
            };
        }
    }

    /// True once the peer's end of the socket is closed (it exited).
    fn peer_gone(&self) -> io::Result<bool> {
        let mut byte = 0u8;
        // SAFETY: peeks at most one byte into a live local.
        let n = unsafe {
            libc::recv(
                self.sock.as_raw_fd(),
                &mut byte as *mut u8 as *mut libc::c_void,
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => Ok(true),
            n if n > 0 => Err(io::Error::new(io::ErrorKind::InvalidData, "bytes on a pair's socket")),
            _ => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                e if e.kind() == io::ErrorKind::ConnectionReset => Ok(true),
                e => Err(e),
            },
        }
    }

    /// Waits until the doorbell rings or the peer goes, at most `timeout`,
    /// first spinning up to `spin` on the ring itself (no system call).
    pub(crate) fn wait(&self, spin: Duration, timeout: Duration) -> io::Result<()> {
        let start = Instant::now();
        while start.elapsed() < spin.min(timeout) {
            if self.rx.lock().ready().map_err(corrupt)? > 0 {
                return Ok(());
            }
            // Lets the peer run if it shares this CPU (measured: spinning
            // without yielding on one CPU holds the peer off for the whole
            // spin, 110 us per round trip with a 50 us spin).
            std::thread::yield_now();
        }
        let left = timeout.saturating_sub(start.elapsed());
        let mut fds = [
            libc::pollfd {
                fd: self.my_bell.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
        ];
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: polls two live descriptors described by a local array.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) } < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }

    /// The descriptors an event loop watches: the doorbell (data or room)
    /// and the socket (the peer going).
    pub(crate) fn doorbell_fd(&self) -> RawFd {
        self.my_bell.as_raw_fd()
    }

    pub(crate) fn socket_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(ring: usize) -> (ShmPipe, ShmPipe) {
        let (a, b) = UnixStream::pair().unwrap();
        let acceptor = std::thread::spawn(move || ShmPipe::accept(b).unwrap());
        let opener = ShmPipe::open(a, ring).unwrap();
        (opener, acceptor.join().unwrap())
    }

    /// Reads exactly `len` bytes, waiting on the doorbell between tries.
    fn read_exactly(p: &ShmPipe, len: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        while got.len() < len {
            match p.read(&mut buf[..(len - got.len()).min(4096)]) {
                Ok(0) => panic!("the peer went"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    p.wait(Duration::from_micros(50), Duration::from_secs(5)).unwrap()
                }
                Err(e) => panic!("{e}"),
            }
        }
        got
    }

    #[test]
    fn bytes_flow_both_ways_through_rings_larger_than_each_write() {
        let (a, b) = pair(4096);
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        let copy = sent.clone();
        let writer = std::thread::spawn(move || {
            let mut at = 0;
            while at < copy.len() {
                let n = a.write(&[&copy[at..]], 0).unwrap();
                at += n;
                if n == 0 {
                    a.wait(Duration::from_micros(50), Duration::from_secs(5)).unwrap();
                }
            }
            a
        });
        assert_eq!(read_exactly(&b, sent.len()), sent);
        let a = writer.join().unwrap();
        assert_eq!(b.write(&[b"and back"], 0).unwrap(), 8);
        assert_eq!(read_exactly(&a, 8), b"and back");
    }

    #[test]
    fn an_idle_reader_sleeps_until_the_doorbell_rings() {
        let (a, b) = pair(4096);
        let mut buf = [0u8; 16];
        assert_eq!(b.read(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let t = Instant::now();
        b.wait(Duration::ZERO, Duration::from_millis(100)).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(90), "nothing rang");
        let sleeper = std::thread::spawn(move || {
            let t = Instant::now();
            b.wait(Duration::ZERO, Duration::from_secs(10)).unwrap();
            (t.elapsed(), b)
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(a.write(&[b"ding"], 0).unwrap(), 4);
        let (slept, b) = sleeper.join().unwrap();
        assert!(slept < Duration::from_secs(5), "the doorbell did not wake it");
        assert_eq!(read_exactly(&b, 4), b"ding");
    }

    #[test]
    fn a_gone_peer_reads_as_the_end_after_its_last_bytes() {
        let (a, b) = pair(4096);
        assert_eq!(a.write(&[b"last words"], 0).unwrap(), 10);
        drop(a);
        b.wait(Duration::ZERO, Duration::from_secs(5)).unwrap();
        assert_eq!(read_exactly(&b, 10), b"last words");
        assert_eq!(b.read(&mut [0u8; 8]).unwrap(), 0);
    }

    #[test]
    fn a_bad_setup_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        send_with_fds(
            &a,
            b"RPCSHM01\x00\x00\x00\x00\x00\x00\x00\x00",
            &[a.as_raw_fd(), a.as_raw_fd()],
        )
        .unwrap();
        assert!(ShmPipe::accept(b).is_err(), "ring size 0");
        let (a, b) = UnixStream::pair().unwrap();
        let mut setup = SETUP_MAGIC.to_vec();
        setup.extend_from_slice(&(1u64 << 20).to_le_bytes());
        let small = SharedMemory::create("small", 4096).unwrap();
        send_with_fds(&a, &setup, &[small.fd(), a.as_raw_fd()]).unwrap();
        assert!(ShmPipe::accept(b).is_err(), "memory shorter than the rings");
        assert!(
            ShmPipe::open(UnixStream::pair().unwrap().0, 1000).is_err(),
            "not a power of two"
        );
    }
}
