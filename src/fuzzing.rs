//! Entry points for the fuzz target and the property tests: everything that
//! reads bytes from the network, run over arbitrary input. Not a stable API.

use std::io::{self, Read};

use crate::net::framing::{FrameReader, ReadEnd};
use crate::wire::{self, Challenge, Hello, Join, Kind, Table};

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

/// Runs the payload decoder of `kind` over `payload` (results are dropped:
/// only a panic would be a bug).
pub fn decode_payload(kind: Kind, payload: &[u8]) {
    match kind {
        Kind::Hello | Kind::Welcome => drop(Hello::decode(payload)),
        Kind::Challenge => drop(Challenge::decode(payload)),
        Kind::Join => drop(Join::decode(payload)),
        Kind::Table => drop(Table::decode(payload)),
        Kind::Missing => drop(wire::decode_ranks(payload)),
        Kind::Request | Kind::Response | Kind::Goodbye | Kind::Proof | Kind::Refused => {}
    }
}
