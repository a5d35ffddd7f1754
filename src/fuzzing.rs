//! Entry points for the fuzz target and the tests: everything that reads
//! bytes from the network, run over arbitrary input; and a member of a world
//! that has no agent, to send a world's ranks any bytes after a handshake
//! they accept. Not a stable API.

use std::io::{self, Read};
use std::net::TcpStream;

use crate::config::Config;
use crate::error::{Result, RpcError};
use crate::net::framing::{FrameReader, ReadEnd};
use crate::wire::{self, Challenge, Hello, Join, Kind, Table};

/// A rank that joined its world with no agent behind it.
pub struct RawMember {
    config: Config,
    table: Table,
}

impl RawMember {
    /// Joins the world `config` describes (its rank must not be 0, which
    /// hosts the rendezvous), publishing `listen_addr` as its own.
    pub fn join(config: Config, listen_addr: &str) -> Result<RawMember> {
        if config.rank == 0 {
            return Err(RpcError::InvalidArgument("rank 0 hosts the rendezvous".into()));
        }
        let master = crate::net::resolve::resolve(&config.master_host, config.master_port)?;
        let join = Join {
            rank: config.rank as u32,
            world_size: config.world_size as u32,
            name: config.worker_name(),
            addr: listen_addr.into(),
        };
        let table = crate::rendezvous::rendezvous(&config, master, join)?;
        Ok(RawMember { config, table })
    }

    /// Opens a connection to rank `to` and completes the handshake; the
    /// stream is left blocking.
    pub fn connect(&self, to: usize) -> Result<TcpStream> {
        let (_, addr) = self
            .table
            .ranks
            .get(to)
            .ok_or_else(|| RpcError::InvalidArgument(format!("no rank {to}")))?;
        // The TCP address, without a same-host socket's name after it.
        let (addr, _) = crate::transport::tcp::split_published(addr);
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
        let hello = Hello {
            rank: self.config.rank as u32,
            world_size: self.config.world_size as u32,
            token: self.table.token,
            nonce: crate::auth::random_bytes()?,
        };
        let key = self.config.secret.clone().unwrap_or_default();
        crate::auth::client(&mut stream, &key, &hello, to as u32, addr)?;
        Ok(stream)
    }
}

/// Hands out `data` in pieces of `step` bytes, then "would block".
struct Pieces<'a> {
    data: &'a [u8],
    step: usize,
}

impl Read for Pieces<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.data.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = out.len().min(self.step).min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// What a run over some bytes found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Complete frames read before the bytes ran out or were refused.
    pub frames: usize,
    /// The largest payload the reader handed out (never above the limit).
    pub largest_payload: usize,
    /// Whether the reader refused the bytes (as a connection would close).
    pub refused: bool,
}

/// Reads `data` as a connection would, arriving `step` bytes at a time, with
/// payloads limited to `max_payload`; every complete frame's payload also
/// goes through the decoder of its kind. Must never panic.
pub fn read_stream(data: &[u8], step: usize, max_payload: u64) -> Outcome {
    let mut reader = FrameReader::new(max_payload);
    let mut src = Pieces {
        data,
        step: step.max(1),
    };
    let mut outcome = Outcome::default();
    let result = loop {
        let pass = reader.read_from(&mut src, &mut |frame, _| {
            outcome.frames += 1;
            outcome.largest_payload = outcome.largest_payload.max(frame.payload.len());
            decode_payload(frame.header.kind, &frame.payload);
            Ok(())
        });
        match pass {
            Ok(ReadEnd::WouldBlock) if !src.data.is_empty() => continue,
            other => break other,
        }
    };
    outcome.refused = result.is_err();
    outcome
}

pub use crate::shm::hostile::{RingOutcome, read_ring};

/// The same-host transport's pipe (two shared-memory rings, doorbells, and
/// the socket the pair met on), for the benchmark's probe of what the rings
/// cost between two processes. Not a stable API.
pub struct ShmProbe(crate::shm::pipe::ShmPipe);

impl ShmProbe {
    /// The side that makes the rings (`ring_bytes` each, a power of two).
    pub fn open(sock: std::os::unix::net::UnixStream, ring_bytes: usize) -> io::Result<ShmProbe> {
        crate::shm::pipe::ShmPipe::open(sock, ring_bytes).map(ShmProbe)
    }

    /// The side that takes them.
    pub fn accept(sock: std::os::unix::net::UnixStream) -> io::Result<ShmProbe> {
        crate::shm::pipe::ShmPipe::accept(sock).map(ShmProbe)
    }

    /// Writes what fits (0 when full).
    pub fn write(&self, bytes: &[u8]) -> io::Result<usize> {
        self.0.write(&[bytes], 0)
    }

    /// Reads what is there (`WouldBlock` when empty, 0 once the peer left).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf, true)
    }

    /// Spins up to `spin`, then sleeps until bytes come, up to `timeout`.
    pub fn wait(&self, spin: std::time::Duration, timeout: std::time::Duration) -> io::Result<()> {
        self.0.wait(spin, timeout)
    }

    /// Sleeps until room frees in the ring this side writes, up to `timeout`.
    pub fn wait_for_room(&self, timeout: std::time::Duration) -> io::Result<()> {
        self.0.wait_for_room(1, std::time::Duration::ZERO, timeout)
    }
}

/// Runs the payload decoder of `kind` over `payload` (results are dropped:
/// only a panic would be a bug).
pub fn decode_payload(kind: Kind, payload: &[u8]) {
    match kind {
        Kind::Hello | Kind::Welcome => drop(Hello::decode(payload)),
        Kind::Challenge => drop(Challenge::decode(payload)),
        Kind::Join => drop(Join::decode(payload)),
        Kind::Table => drop(Table::decode(payload)),
        Kind::Missing => drop(wire::decode_ranks(payload)),
        Kind::Request | Kind::Response | Kind::Goodbye | Kind::Proof | Kind::Refused | Kind::Cancel => {}
    }
}
