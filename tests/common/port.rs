//! Picking a port for a test world's rendezvous (shared by the tests and
//! the benchmark).

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// A port that was free a moment ago. It is taken below the kernel's
/// ephemeral range (32768 and up by default), where every rank's own
/// listener and every outgoing connection get their ports: a port the
/// kernel handed out as free (port 0) could be taken that way before rank 0
/// bound it. Each call tries the next port, so one process never gets the
/// same port twice.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id() % 97 * 120;
    loop {
        let port = 20_000 + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
}
