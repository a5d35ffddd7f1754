//! Accepting connections: each joins the epoll set in its handshake.

use std::io;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::log::log_at;
use crate::net::sys;
use crate::wire::MAX_HANDSHAKE_PAYLOAD;

use super::Shared;
use super::conn::Conn;
use super::event_loop::RESPONDER_IDLE;
use super::stream::{ShmStream, Stream};

impl Shared {
    pub(super) fn accept_all(&self) {
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

    /// Accepts the connections of ranks on this host (each then offers its
    /// rings: see `step_rings`).
    pub(super) fn accept_same_host(&self) {
        let Some(listener) = &self.same_host else {
            return;
        };
        loop {
            match listener.accept() {
                Ok(_) if self.stopping.load(Ordering::Acquire) => {}
                Ok((sock, _)) => {
                    // Over the budget: closed at once, and the rank that
                    // connected uses TCP instead.
                    let Some(ticket) = self.shm_budget.take() else {
                        continue;
                    };
                    if let Err(e) = ShmStream::accepted(sock, self.spin, ticket)
                        .and_then(|s| self.adopt_conn(Stream::Shm(Box::new(s))))
                    {
                        log_at!(Warn, Some(self.me), "could not take a connection from this host: {e}");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log_at!(Warn, Some(self.me), "accept on the same-host socket failed: {e}");
                    return;
                }
            }
        }
    }

    pub(super) fn adopt(&self, stream: TcpStream) -> io::Result<()> {
        // Left in blocking mode, so that a responder can wait in `recv`
        // (every other read and write on it says MSG_DONTWAIT).
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(RESPONDER_IDLE))?;
        stream.set_nodelay(true)?;
        sys::detect_silent_peer(&stream, self.peer_timeout)?;
        self.adopt_conn(Stream::Tcp(stream))
    }

    /// An accepted connection joins the others, in its handshake.
    fn adopt_conn(&self, stream: Stream) -> io::Result<()> {
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
}
