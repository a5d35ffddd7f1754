//! What a failed connection does: it is closed, and its rank is lost for
//! the rest of the world's life (worlds have a fixed membership), failing
//! every call to it, except that a peer leaving in order lets the replies
//! already on their way arrive.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::error::RpcError;
use crate::log::log_at;

use super::conn::Conn;
use super::{PeerState, Shared};

impl Shared {
    /// A send on `conn` failed: the peer is lost.
    pub(super) fn conn_failed(&self, conn: &Arc<Conn>, why: String) -> RpcError {
        let rank = conn.peer().unwrap_or(usize::MAX);
        self.drop_conn(conn, Some(RpcError::Io(why.clone())));
        RpcError::PeerLost { rank, reason: why }
    }

    /// Closes `conn` (`why`: the error, `None` for the peer closing it) and,
    /// if it belonged to a rank, fails that rank for good.
    pub(super) fn drop_conn(&self, conn: &Arc<Conn>, why: Option<RpcError>) {
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
                let addr = conn.stream.describe_peer();
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
                match peer.set(&mut st, PeerState::Lost(error.clone())) {
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

    /// A connection this rank was opening to `dst` failed before its
    /// handshake finished (`conn` is closed already): the rank is lost, and
    /// every call to it fails. A wrong secret fails them with `AUTH`.
    pub(super) fn open_failed(&self, conn: &Arc<Conn>, dst: usize, why: Option<RpcError>) {
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
                    self.peers[dst].set(&mut st, PeerState::Lost(error.clone()));
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
