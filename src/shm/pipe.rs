//! One same-host pair's byte pipe: two rings in one sealed memfd, two
//! doorbells (socket pairs, one end on each side), and the Unix socket the
//! pair met on, kept open for the pair's life so that a dead peer is seen
//! at once (EOF).
//!
//! Setup, once the two sides are connected over the socket, never blocks:
//! the opener makes the rings and the bells (`Offer`) and sends
//! `SETUP_MAGIC`, the ring size, the memfd and the acceptor's ends of the
//! bells (`SCM_RIGHTS`); the acceptor (`take_offer`) checks the size, maps
//! the memfd only if it is sealed, on tmpfs and long enough, and answers
//! with the magic. The opener writes ring 0 and reads ring 1; the acceptor
//! the other way round. `ShmPipe::open` and `accept` do the same, blocking
//! (tests, the probe).
//!
//! Reading and writing never block: an empty ring reads as `WouldBlock`, a
//! full one writes 0 bytes. A side asks the other to ring its bell only
//! when it is about to sleep (so a busy pair makes no system call per
//! message): `wait` and `wait_for_room` spin a while on the ring's
//! counters, then ask and sleep on the bell and the socket; an event loop
//! asks with `arm_reads` / `arm_writes` before it sleeps.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::net::sys::EventFd;

use super::memfd::{SharedMemory, recv_with_fds, send_with_fds};
use super::ring::{CancelMarks, Consumer, Corrupt, Producer, Region};

const SETUP_MAGIC: &[u8; 8] = b"RPCSHM03";

pub(crate) struct ShmPipe {
    sock: UnixStream,
    tx: Mutex<Producer>,
    rx: Mutex<Consumer>,
    /// This side's ends of the two doorbells: `data` rings when bytes
    /// arrive for us (and we said we sleep), `room` when room frees in the
    /// ring we write (and we said we wait for it); sending a byte on an end
    /// rings the peer's. Two bells, so a thread waiting for room and one
    /// reading never take each other's wake-up.
    bells: Bells,
    /// Rung by this side itself (an event loop taking over finds bytes or
    /// room there already); never leaves this process.
    wake: EventFd,
    /// Where this side marks the calls it cancelled (the ring it writes),
    /// and where the peer marks its own (the ring this side reads).
    cancels_out: CancelMarks,
    cancels_in: CancelMarks,
    /// Last, so it is unmapped after the rings that point into it.
    _memory: SharedMemory,
}

/// One side's ends of the two doorbells: Unix socket pairs, one byte per
/// ring. Every send and receive says `MSG_DONTWAIT`, a per-call flag, so a
/// peer holding the other end (or a copy of ours, as the opener does of
/// the acceptor's until it hands them over) can never make this side
/// block: an eventfd's non-blocking flag, by contrast, belongs to the
/// shared file and a peer could clear it.
struct Bells {
    data: UnixStream,
    room: UnixStream,
}

impl Bells {
    /// Two doorbells: this side's ends, and the peer's.
    fn pair() -> io::Result<(Bells, Bells)> {
        let (data, their_data) = UnixStream::pair()?;
        let (room, their_room) = UnixStream::pair()?;
        Ok((
            Bells { data, room },
            Bells {
                data: their_data,
                room: their_room,
            },
        ))
    }

    /// The two ends a peer sent (data, then room). Each must be a Unix
    /// stream socket (anything else fails at the first ring anyway, but
    /// the error is clearer here).
    fn from_peer(mut fds: Vec<OwnedFd>) -> io::Result<Bells> {
        let room = fds.pop();
        match (fds.pop(), room, fds.is_empty()) {
            (Some(data), Some(room), true) if is_unix_stream(&data) && is_unix_stream(&room) => Ok(Bells {
                data: UnixStream::from(data),
                room: UnixStream::from(room),
            }),
            (Some(_), Some(_), true) => Err(bad_setup("the peer's doorbells are not Unix stream sockets")),
            _ => Err(bad_setup("the peer sent the wrong number of descriptors")),
        }
    }
}

fn corrupt(c: Corrupt) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, c.0)
}

fn bad_setup(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("bad ring setup: {why}"))
}

fn is_unix_stream(fd: &OwnedFd) -> bool {
    let option = |name: libc::c_int| {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: writes at most `len` bytes into a live c_int.
        let ret = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                name,
                &mut value as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        (ret == 0).then_some(value)
    };
    option(libc::SO_DOMAIN) == Some(libc::AF_UNIX) && option(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

/// Rings the peer's bell at the other end of `end`. A full socket means it
/// is rung already; a peer gone is seen elsewhere.
fn ring_bell(end: &UnixStream) {
    // SAFETY: sends one byte from a live local; the flags make it neither
    // block nor raise SIGPIPE.
    unsafe {
        libc::send(
            end.as_raw_fd(),
            b"!".as_ptr() as *const libc::c_void,
            1,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

/// Forgets the rings waiting at `end`: one bounded read (an honest peer
/// rings once per announced sleep, so a few bytes at most wait; one that
/// floods the bell gets no more than this read per event).
fn drain_bell(end: &UnixStream) {
    let mut buf = [0u8; 256];
    // SAFETY: receives into a live local buffer of its length; never blocks.
    unsafe {
        libc::recv(
            end.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
}

/// The opener's rings, made and offered to the acceptor, whose answer is
/// awaited. Setup never blocks: the caller sends `message()` and hands the
/// answer to `accepted` when the socket has it (an event loop can drive
/// it; `ShmPipe::open` does it blocking).
pub(crate) struct Offer {
    memory: SharedMemory,
    region: usize,
    bells: Bells,
    /// The acceptor's ends of the bells, until they are handed over.
    theirs: Bells,
    message: [u8; 16],
}

impl Offer {
    /// Makes two rings of `ring_bytes` each (a power of two) in a sealed memfd.
    pub(crate) fn new(ring_bytes: usize) -> io::Result<Offer> {
        if let Err(why) = crate::config::check_ring_bytes(ring_bytes) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("ring size {why}")));
        }
        let region = Region::bytes_for(ring_bytes);
        let mut message = [0u8; 16];
        message[..8].copy_from_slice(SETUP_MAGIC);
        message[8..].copy_from_slice(&(ring_bytes as u64).to_le_bytes());
        let (bells, theirs) = Bells::pair()?;
        Ok(Offer {
            memory: SharedMemory::create("rpcagent-rings", 2 * region)?,
            region,
            bells,
            theirs,
            message,
        })
    }

    /// What to send the acceptor: the bytes, and the memfd and its ends
    /// of the bells.
    pub(crate) fn message(&self) -> (&[u8], [RawFd; 3]) {
        (
            &self.message,
            [
                self.memory.fd(),
                self.theirs.data.as_raw_fd(),
                self.theirs.room.as_raw_fd(),
            ],
        )
    }

    /// The acceptor's answer arrived: the pipe over `sock`.
    pub(crate) fn accepted(self, sock: UnixStream, answer: &[u8], fds: Vec<OwnedFd>) -> io::Result<ShmPipe> {
        if answer != SETUP_MAGIC || !fds.is_empty() {
            return Err(bad_setup("the peer refused the rings"));
        }
        // Our copies of the acceptor's ends close here (`theirs` drops).
        ShmPipe::over(sock, self.memory, self.region, 0, self.bells)
    }
}

/// The acceptor's side: takes the rings a setup message offers (its bytes
/// and descriptors, as received); returns the pipe, and the answer to send
/// (bytes only).
pub(crate) fn take_offer(
    sock: UnixStream,
    message: &[u8],
    mut fds: Vec<OwnedFd>,
) -> io::Result<(ShmPipe, &'static [u8])> {
    if message.len() != 16 || &message[..8] != SETUP_MAGIC || fds.len() != 3 {
        return Err(bad_setup("not a setup message"));
    }
    let ring_bytes = u64::from_le_bytes(message[8..].try_into().expect("8 bytes"));
    let ring_bytes = usize::try_from(ring_bytes).map_err(|_| bad_setup("ring size"))?;
    if crate::config::check_ring_bytes(ring_bytes).is_err() {
        return Err(bad_setup("ring size"));
    }
    let region = Region::bytes_for(ring_bytes);
    let bells = Bells::from_peer(fds.split_off(1))?;
    let memory = SharedMemory::from_peer(fds.pop().expect("three descriptors"), 2 * region)?;
    if super::memfd::test_hook_is("corrupt") {
        // The ring this side writes: the peer reads it.
        super::memfd::corrupt_later_for_test(&memory, region)?;
    }
    let pipe = ShmPipe::over(sock, memory, region, 1, bells)?;
    Ok((pipe, SETUP_MAGIC))
}

impl ShmPipe {
    /// The opener's side, blocking: offers rings of `ring_bytes` over
    /// `sock` and waits for the answer.
    pub(crate) fn open(sock: UnixStream, ring_bytes: usize) -> io::Result<ShmPipe> {
        let offer = Offer::new(ring_bytes)?;
        let (bytes, fds) = offer.message();
        send_with_fds(&sock, bytes, &fds)?;
        let mut answer = [0u8; 16];
        let (n, fds) = recv_with_fds(&sock, &mut answer, 0)?;
        offer.accepted(sock, &answer[..n], fds)
    }

    /// The acceptor's side, blocking: waits for the offer and answers it.
    pub(crate) fn accept(sock: UnixStream) -> io::Result<ShmPipe> {
        let mut message = [0u8; 32];
        let (n, fds) = recv_with_fds(&sock, &mut message, 3)?;
        let (pipe, answer) = take_offer(sock, &message[..n], fds)?;
        send_with_fds(&pipe.sock, answer, &[])?;
        Ok(pipe)
    }

    /// `side` 0 writes the first ring and reads the second; 1 the reverse.
    fn over(sock: UnixStream, memory: SharedMemory, region: usize, side: usize, bells: Bells) -> io::Result<ShmPipe> {
        let ring = |i: usize| {
            // SAFETY: ring `i` is the `i`th of two `region`-byte halves of
            // the mapping (the mapping is page-aligned and `region` a
            // multiple of 8, so both are 8-aligned), which the pipe owns for
            // as long as the rings and their marks live.
            unsafe { Region::new(memory.as_ptr().add(i * region), region) }.map_err(corrupt)
        };
        let (tx, rx) = (ring(side)?, ring(1 - side)?);
        sock.set_nonblocking(true)?;
        Ok(ShmPipe {
            sock,
            cancels_out: tx.cancel_marks(),
            tx: Mutex::new(Producer::new(tx)),
            cancels_in: rx.cancel_marks(),
            rx: Mutex::new(Consumer::new(rx)),
            _memory: memory,
            bells,
            wake: EventFd::new()?,
        })
    }

    /// Writes what fits of `parts` from byte `skip` on; 0 when the ring is
    /// full. Asks nothing of the peer: a writer that will sleep until room
    /// frees calls `wait_for_room` (or, an event loop, `arm_writes`).
    pub(crate) fn write<P: AsRef<[u8]>>(&self, parts: &[P], skip: usize) -> io::Result<usize> {
        let (n, wake) = self.tx.lock().write(parts, skip).map_err(corrupt)?;
        if wake {
            ring_bell(&self.bells.data);
        }
        Ok(n)
    }

    /// Marks call `id` (one this side sent) cancelled where the peer's
    /// handlers look without reading the ring; the cancel's frame follows.
    /// Takes no lock (a writer may hold the ring for a long copy).
    pub(crate) fn mark_cancelled(&self, id: u64) {
        self.cancels_out.mark(id);
    }

    /// Whether the peer marked call `id` (one it sent here) cancelled.
    pub(crate) fn cancel_marked(&self, id: u64) -> bool {
        self.cancels_in.contains(id)
    }

    /// An event loop waits for room to write: the peer is asked to ring the
    /// room bell, and if there is room already the wake bell rings at once.
    /// Only the thread that will act on the ring may call it (it empties
    /// the room bell first, so that the next ring raises a new event).
    pub(crate) fn arm_writes(&self) -> io::Result<()> {
        drain_bell(&self.bells.room);
        if self.tx.lock().prepare_wait_for_room(1).map_err(corrupt)? {
            self.wake.set();
        }
        Ok(())
    }

    /// Reads what the ring holds; `WouldBlock` when empty. With `announce`
    /// (the caller will sleep until told, as an event loop does), an empty
    /// ring first asks the peer to ring the data bell, and reads as
    /// `Ok(0)` once the peer is gone too. Without it (a caller spinning),
    /// an empty ring costs no system call and the peer rings nothing.
    pub(crate) fn read(&self, buf: &mut [u8], announce: bool) -> io::Result<usize> {
        let mut rx = self.rx.lock();
        loop {
            let (n, wake) = rx.read(buf).map_err(corrupt)?;
            if wake {
                ring_bell(&self.bells.room);
            }
            if n > 0 || buf.is_empty() || !announce {
                return if n > 0 || buf.is_empty() {
                    Ok(n)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            if rx.prepare_sleep().map_err(corrupt)? {
                continue;
            }
            return match self.peer_gone() {
                // Its last bytes may have landed after the look above.
                Ok(true) if rx.ready().map_err(corrupt)? > 0 => continue,
                Ok(true) => Ok(0),
                Ok(false) => Err(io::ErrorKind::WouldBlock.into()),
                Err(e) => Err(e),
            };
        }
    }

    /// An event loop takes over reading: the peer is asked to ring the data
    /// bell, and if bytes are waiting already (they raise no event by
    /// themselves) the wake bell rings at once.
    /// Only the connection's reader may call it (it empties the data bell
    /// first, so that the next ring raises a new event).
    pub(crate) fn arm_reads(&self) -> io::Result<()> {
        drain_bell(&self.bells.data);
        if self.rx.lock().prepare_sleep().map_err(corrupt)? {
            self.wake.set();
        }
        Ok(())
    }

    /// Bytes wait in the ring this side reads.
    pub(crate) fn has_data(&self) -> io::Result<bool> {
        Ok(self.rx.lock().ready().map_err(corrupt)? > 0)
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

    /// Waits until bytes arrive (the data bell rings) or the peer goes, at
    /// most `timeout`, first spinning up to `spin` on the ring itself (no
    /// system call). Call after `read` found the ring empty.
    pub(crate) fn wait(&self, spin: Duration, timeout: Duration) -> io::Result<()> {
        let start = Instant::now();
        while start.elapsed() < spin.min(timeout) {
            if self.has_data()? {
                return Ok(());
            }
            // Lets the peer run if it shares this CPU (measured: spinning
            // without yielding on one CPU holds the peer off for the whole
            // spin, 110 us per round trip with a 50 us spin).
            std::thread::yield_now();
        }
        // Old rings are forgotten, then the sleep announced, and the ring
        // looked at once more before sleeping (see `Consumer::prepare_sleep`).
        drain_bell(&self.bells.data);
        if self.rx.lock().prepare_sleep().map_err(corrupt)? {
            return Ok(());
        }
        self.sleep_on(&self.bells.data, timeout.saturating_sub(start.elapsed()))
    }

    /// Waits until `need` bytes (at most the ring) are free in the ring we
    /// write, or the peer goes, at most `timeout`: first spinning up to
    /// `spin` on the ring's counter (no system call, and the peer rings
    /// nothing), then asking the peer to ring and sleeping on the room bell.
    /// A peer that is gone is `BrokenPipe`.
    pub(crate) fn wait_for_room(&self, need: usize, spin: Duration, timeout: Duration) -> io::Result<()> {
        let start = Instant::now();
        // A chunk at most: the consumer gives room back a chunk at a time,
        // and the two sides' copies then overlap.
        let need = (need.max(1) as u64).min(self.tx.lock().chunk() as u64);
        while start.elapsed() < spin.min(timeout) {
            let mut tx = self.tx.lock();
            if tx.room().map_err(corrupt)? >= need {
                return Ok(());
            }
            drop(tx);
            std::thread::yield_now();
        }
        drain_bell(&self.bells.room);
        if self.tx.lock().prepare_wait_for_room(need).map_err(corrupt)? {
            return Ok(());
        }
        if self.peer_gone()? {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.sleep_on(&self.bells.room, timeout.saturating_sub(start.elapsed()))?;
        if self.peer_gone()? {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        Ok(())
    }

    fn sleep_on(&self, bell: &UnixStream, left: Duration) -> io::Result<()> {
        let mut fds = [
            libc::pollfd {
                fd: bell.as_raw_fd(),
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

    /// The descriptors an event loop watches: the data bell (bytes to
    /// read), the room bell (room to write), and the wake bell (below); the
    /// stream watches the socket it met the peer on for the peer going.
    pub(crate) fn data_bell_fd(&self) -> RawFd {
        self.bells.data.as_raw_fd()
    }

    pub(crate) fn room_bell_fd(&self) -> RawFd {
        self.bells.room.as_raw_fd()
    }

    /// Forgets the rings of the data bell (`data`) or the room bell that
    /// an event loop was told of: a bell whose socket still holds bytes may
    /// raise no new edge-triggered event (gVisor's sockets report only the
    /// empty-to-ready change). Only its owner may call it: the data bell's
    /// by the thread holding the connection's reader, the room bell's by
    /// the one finishing a handed-off queue (a ring meant for a thread
    /// waiting on it would be lost).
    pub(crate) fn drain(&self, data: bool) {
        drain_bell(if data { &self.bells.data } else { &self.bells.room });
    }

    /// Empties the wake bell (its event was taken).
    pub(crate) fn drain_wake(&self) {
        self.wake.clear();
    }

    /// The bell this side rings itself (`arm_reads`, `arm_writes`).
    pub(crate) fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
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
            match p.read(&mut buf[..(len - got.len()).min(4096)], true) {
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
                    a.wait_for_room(1, Duration::ZERO, Duration::from_secs(5)).unwrap();
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
        assert_eq!(b.read(&mut buf, true).unwrap_err().kind(), io::ErrorKind::WouldBlock);
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
        assert_eq!(b.read(&mut [0u8; 8], true).unwrap(), 0);
    }

    #[test]
    fn a_bad_setup_is_refused() {
        let offer = |bytes: &[u8], memory: &SharedMemory| {
            let (a, b) = UnixStream::pair().unwrap();
            let (_mine, theirs) = Bells::pair().unwrap();
            send_with_fds(
                &a,
                bytes,
                &[memory.fd(), theirs.data.as_raw_fd(), theirs.room.as_raw_fd()],
            )
            .unwrap();
            ShmPipe::accept(b)
        };
        let memory = SharedMemory::create("test", 2 * Region::bytes_for(4096)).unwrap();
        let mut setup = SETUP_MAGIC.to_vec();
        setup.extend_from_slice(&0u64.to_le_bytes());
        assert!(offer(&setup, &memory).is_err(), "ring size 0");
        setup[8..].copy_from_slice(&(1u64 << 20).to_le_bytes());
        assert!(offer(&setup, &memory).is_err(), "memory shorter than the rings");
        setup[8..].copy_from_slice(&4096u64.to_le_bytes());
        assert!(offer(&setup, &memory).is_ok(), "the same offer with the right size");
        setup[0] = b'X';
        assert!(offer(&setup, &memory).is_err(), "not the magic");
        assert!(
            ShmPipe::open(UnixStream::pair().unwrap().0, 1000).is_err(),
            "not a power of two"
        );
    }

    #[test]
    fn a_writer_to_a_gone_peer_gets_broken_pipe() {
        let (a, b) = pair(4096);
        assert_eq!(a.write(&[&[1u8; 5000]], 0).unwrap(), 4096);
        drop(b);
        let start = Instant::now();
        let err = loop {
            match a.write(&[&[1u8; 904]], 0) {
                Ok(0) => match a.wait_for_room(904, Duration::ZERO, Duration::from_secs(5)) {
                    Ok(()) => continue,
                    Err(e) => break e,
                },
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn doorbells_that_are_not_unix_sockets_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let memory = SharedMemory::create("test", 2 * Region::bytes_for(4096)).unwrap();
        let mut setup = SETUP_MAGIC.to_vec();
        setup.extend_from_slice(&4096u64.to_le_bytes());
        // Eventfds: a peer could make them block (their flags are shared).
        let (e1, e2) = (EventFd::new().unwrap(), EventFd::new().unwrap());
        send_with_fds(&a, &setup, &[memory.fd(), e1.as_raw_fd(), e2.as_raw_fd()]).unwrap();
        assert!(ShmPipe::accept(b).is_err());
    }

    /// The bells are blocking sockets (a peer holding the other end, or a
    /// copy of ours, decides nothing about that): only the per-call
    /// `MSG_DONTWAIT` keeps ringing a full one from blocking.
    #[test]
    fn a_peer_cannot_make_ringing_block() {
        let (a, _b) = pair(4096);
        let t = Instant::now();
        // Far more rings than a socket buffer holds, nobody draining.
        for _ in 0..200_000 {
            ring_bell(&a.bells.data);
        }
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_writer_waiting_for_room_is_woken_by_the_reader() {
        let (a, b) = pair(4096);
        let big = vec![9u8; 10_000];
        let n = a.write(&[&big], 0).unwrap();
        assert_eq!(n, 4096, "the ring is full");
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            read_exactly(&b, 10_000)
        });
        let t = Instant::now();
        let mut at = n;
        while at < big.len() {
            let n = a.write(&[&big[at..]], 0).unwrap();
            at += n;
            if n == 0 {
                a.wait_for_room(1, Duration::from_micros(20), Duration::from_secs(10))
                    .unwrap();
            }
        }
        assert!(t.elapsed() < Duration::from_secs(5), "the room bell did not ring");
        assert_eq!(reader.join().unwrap(), big);
    }
}
