//! One TCP connection: any thread may send on it (writing straight from the
//! caller's buffers while the socket takes them, queueing the rest for the
//! I/O thread); only the I/O thread reads it.

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use crate::auth::Handshake;
use crate::error::Status;
use crate::transport::{Outcome, ReplySink};
use crate::wire::{self, Header, Kind};

use crate::net::framing::{FrameReader, slices_from};
use crate::net::sys::{self, Epoll, READABLE, WRITABLE};

const NO_PEER: usize = usize::MAX;

#[derive(Default)]
struct Outbox {
    /// Bytes the socket did not take yet, oldest first.
    queue: VecDeque<Vec<u8>>,
    /// How much of the front entry was already sent.
    front_sent: usize,
    closed: bool,
}

pub(crate) struct Conn {
    pub stream: TcpStream,
    pub token: u64,
    /// We opened it (our calls go out on it) or accepted it (we serve on it).
    pub outbound: bool,
    pub opened: Instant,
    peer: AtomicUsize,
    /// The peer said it is closing on purpose.
    pub goodbye: AtomicBool,
    out: Mutex<Outbox>,
    pub reader: Mutex<FrameReader>,
    /// The server side of the handshake (accepted connections).
    pub handshake: Mutex<Handshake>,
    epoll: Arc<Epoll>,
}

impl Conn {
    pub(crate) fn new(
        stream: TcpStream,
        token: u64,
        outbound: bool,
        peer: Option<usize>,
        max_payload: u64,
        epoll: Arc<Epoll>,
    ) -> Conn {
        Conn {
            stream,
            token,
            outbound,
            opened: Instant::now(),
            peer: AtomicUsize::new(peer.unwrap_or(NO_PEER)),
            goodbye: AtomicBool::new(false),
            out: Mutex::new(Outbox::default()),
            reader: Mutex::new(FrameReader::new(max_payload)),
            handshake: Mutex::new(if outbound {
                Handshake::Done
            } else {
                Handshake::AwaitHello
            }),
            epoll,
        }
    }

    /// The rank on the other end, once the handshake has named it.
    pub(crate) fn peer(&self) -> Option<usize> {
        Some(self.peer.load(Ordering::Acquire)).filter(|p| *p != NO_PEER)
    }

    pub(crate) fn set_peer(&self, rank: usize) {
        self.peer.store(rank, Ordering::Release);
    }

    /// Sends one frame. Writes directly while the socket accepts bytes and
    /// copies only what it did not take, for the I/O thread to flush; never
    /// blocks on the network.
    pub(crate) fn send(&self, mut header: Header, name: &[u8], payload: &[u8]) -> io::Result<()> {
        header.name_len = name.len() as u16;
        header.payload_len = payload.len() as u64;
        let head = wire::encode_header(&header);
        let parts: [&[u8]; 3] = [&head, name, payload];
        let total = head.len() + name.len() + payload.len();
        let mut out = self.out.lock();
        if out.closed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut sent = 0;
        if out.queue.is_empty() {
            while sent < total {
                match sys::send_vectored(&self.stream, &slices_from(&parts, sent)) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        out.closed = true;
                        return Err(e);
                    }
                }
            }
            if sent == total {
                return Ok(());
            }
            self.epoll.modify(&self.stream, self.token, READABLE | WRITABLE)?;
        }
        let mut rest = Vec::with_capacity(total - sent);
        for s in slices_from(&parts, sent) {
            rest.extend_from_slice(&s);
        }
        out.queue.push_back(rest);
        Ok(())
    }

    /// Sends queued bytes (I/O thread, when the socket is writable).
    pub(crate) fn flush(&self) -> io::Result<()> {
        let mut out = self.out.lock();
        while !out.queue.is_empty() {
            let sent = out.front_sent;
            let slices: Vec<io::IoSlice<'_>> = out
                .queue
                .iter()
                .enumerate()
                .map(|(i, b)| io::IoSlice::new(if i == 0 { &b[sent..] } else { b }))
                .take(64)
                .collect();
            let mut n = match sys::send_vectored(&self.stream, &slices) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => {
                    out.closed = true;
                    return Err(e);
                }
            };
            while n > 0 {
                let left = out.queue[0].len() - out.front_sent;
                if n >= left {
                    n -= left;
                    out.queue.pop_front();
                    out.front_sent = 0;
                } else {
                    out.front_sent += n;
                    n = 0;
                }
            }
        }
        self.epoll.modify(&self.stream, self.token, READABLE)
    }

    /// True when everything sent has left this process.
    pub(crate) fn flushed(&self) -> bool {
        let out = self.out.lock();
        out.queue.is_empty() || out.closed
    }

    /// Stops all traffic; the descriptor closes when the last user drops it.
    pub(crate) fn close(&self) {
        self.out.lock().closed = true;
        let _ = self.epoll.delete(&self.stream);
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl ReplySink for Conn {
    fn send_reply(&self, id: u64, outcome: Outcome) {
        let mut header = Header::new(Kind::Response);
        header.request_id = id;
        // A failed send means the connection is broken; its reader sees that
        // and reports the peer, so there is nothing more to do here.
        let _ = match &outcome {
            Ok(data) => self.send(header, &[], data),
            Err((status, message)) => {
                header.status = *status as i32;
                debug_assert_ne!(*status, Status::Ok);
                self.send(header, &[], message.as_bytes())
            }
        };
    }
}
