//! A peer that writes anything into a ring it shares with us, for the fuzz
//! target (`fuzz/fuzz_targets/ring.rs`) and its seed test: what it writes
//! must at worst close the pair, never crash or read outside the ring.

use std::io::{self, Read};

use super::ring::{Consumer, HEADER, Region};
use crate::net::framing::FrameReader;

/// What a hostile peer did to a shared-memory ring (`read_ring`).
#[derive(Debug, Default)]
pub struct RingOutcome {
    /// Complete frames read out of the ring.
    pub frames: usize,
    /// The ring's header was found impossible (the pair would close).
    pub corrupt: bool,
    /// The bytes were refused as frames (the pair would close).
    pub refused: bool,
}

/// A peer that shares a ring with us writes anything into it, header
/// included; we read frames out of it as the same-host transport does.
/// `data[0]` picks the ring's size (64 B to 8 KiB), then operations follow:
/// `0` + 8 bytes sets the write counter, `1` + offset + length + bytes
/// writes the data area, `2` lets the reader run. Must never panic or touch
/// memory outside the ring.
pub fn read_ring(data: &[u8]) -> RingOutcome {
    let Some((&size, mut ops)) = data.split_first() else {
        return RingOutcome::default();
    };
    let capacity = 64usize << (size % 8);
    let mut memory = vec![0u64; Region::bytes_for(capacity) / 8];
    let base = memory.as_mut_ptr() as *mut u8;
    // SAFETY: `memory` outlives the consumer, and every access below goes
    // through raw pointers into it (as the peer's would).
    let region = unsafe { Region::new(base, memory.len() * 8) }.expect("a valid ring size");
    let mut consumer = Consumer::new(region);
    let mut reader = FrameReader::new(1 << 20);
    let mut outcome = RingOutcome::default();
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        match op % 3 {
            0 if ops.len() >= 8 => {
                let head = u64::from_le_bytes(ops[..8].try_into().expect("8 bytes"));
                ops = &ops[8..];
                // SAFETY: the write counter is the region's first 8 bytes.
                unsafe { std::ptr::write_volatile(base as *mut u64, head) };
            }
            1 if ops.len() >= 2 => {
                let (at, len) = (ops[0] as usize * 31 % capacity, (ops[1] as usize).min(ops.len() - 2));
                for (i, b) in ops[2..2 + len].iter().enumerate() {
                    // SAFETY: the index is taken modulo the data area's size.
                    unsafe { std::ptr::write_volatile(base.add(HEADER + (at + i) % capacity), *b) };
                }
                ops = &ops[2 + len..];
            }
            2 => {
                let mut src = RingRead(&mut consumer, false);
                let pass = reader.read_from(&mut src, &mut |frame, _| {
                    outcome.frames += 1;
                    crate::fuzzing::decode_payload(frame.header.kind, &frame.payload);
                    Ok(())
                });
                outcome.corrupt |= src.1;
                if pass.is_err() {
                    outcome.refused = !src.1;
                    return outcome;
                }
            }
            _ => return outcome,
        }
    }
    outcome
}

/// The consumer as a byte stream (the flag: the ring was found corrupt).
struct RingRead<'a>(&'a mut Consumer, bool);

impl Read for RingRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.read(buf) {
            Ok((0, _)) => Err(io::ErrorKind::WouldBlock.into()),
            Ok((n, _)) => Ok(n),
            Err(corrupt) => {
                self.1 = true;
                Err(io::Error::new(io::ErrorKind::InvalidData, corrupt.0))
            }
        }
    }
}
