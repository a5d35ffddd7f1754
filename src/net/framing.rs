//! Turning a byte stream into frames: an incremental reader for
//! non-blocking sockets (small frames are parsed out of one buffer, large
//! payloads are read straight into the buffer handed to the user), and
//! blocking helpers for handshakes.

use std::io::{self, IoSlice, Read, Write};

use crate::error::{Result, RpcError};
use crate::wire::{self, HEADER_LEN, Header, Name};

/// A whole frame.
pub(crate) struct Frame {
    pub header: Header,
    pub name: Name,
    pub payload: Vec<u8>,
}

/// Frames whose payload is at most this go through the scratch buffer.
const SCRATCH: usize = 64 * 1024;
/// The scratch buffer of a connection still in its handshake: enough for
/// any frame allowed then, so strangers cost little memory.
const HANDSHAKE_SCRATCH: usize = 4096;

/// A payload being read straight into its own buffer.
struct Large {
    header: Header,
    name: Name,
    payload: Vec<u8>,
    filled: usize,
}

/// How a read pass ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReadEnd {
    /// Nothing more to read for now.
    WouldBlock,
    /// The peer closed the connection cleanly between frames.
    Eof,
}

pub(crate) struct FrameReader {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    large: Option<Large>,
    /// Largest payload accepted.
    max_payload: u64,
    /// Reads that brought bytes: frames parsed between two changes arrived
    /// together.
    reads: u64,
}

fn truncated() -> RpcError {
    RpcError::Protocol("the connection closed in the middle of a frame".into())
}

impl FrameReader {
    pub(crate) fn new(max_payload: u64) -> FrameReader {
        let scratch = if max_payload <= wire::MAX_HANDSHAKE_PAYLOAD {
            HANDSHAKE_SCRATCH
        } else {
            SCRATCH
        };
        FrameReader {
            buf: vec![0; scratch].into_boxed_slice(),
            start: 0,
            end: 0,
            large: None,
            max_payload,
            reads: 0,
        }
    }

    /// Raises the payload limit (after a handshake), growing the buffer.
    pub(crate) fn set_max_payload(&mut self, max_payload: u64) {
        self.max_payload = max_payload;
        if max_payload > wire::MAX_HANDSHAKE_PAYLOAD && self.buf.len() < SCRATCH {
            let mut buf = vec![0; SCRATCH].into_boxed_slice();
            buf[..self.end - self.start].copy_from_slice(&self.buf[self.start..self.end]);
            self.end -= self.start;
            self.start = 0;
            self.buf = buf;
        }
    }

    /// Bytes of further frames are already read (behind the one just handed out).
    pub(crate) fn has_buffered(&self) -> bool {
        self.end > self.start
    }

    /// A frame too large for the scratch buffer is being read into its own.
    pub(crate) fn in_large_frame(&self) -> bool {
        self.large.is_some()
    }

    /// Reads what `src` has, handing every complete frame to `on_frame`
    /// (an error from it stops the pass), until the socket has nothing more
    /// or closes. Errors: bad bytes, a truncated frame, or an I/O error.
    pub(crate) fn read_from(
        &mut self,
        src: &mut impl Read,
        on_frame: &mut dyn FnMut(Frame, &mut FrameReader) -> Result<()>,
    ) -> Result<ReadEnd> {
        self.pass(src, on_frame, &|| false, true)
    }

    /// Like [`FrameReader::read_from`], but reads on past a short read until
    /// the socket says "would block" or ends: for a socket whose peer has
    /// closed its side, where the end follows the last bytes without any
    /// further readiness event.
    pub(crate) fn read_to_end(
        &mut self,
        src: &mut impl Read,
        on_frame: &mut dyn FnMut(Frame, &mut FrameReader) -> Result<()>,
    ) -> Result<ReadEnd> {
        self.pass(src, on_frame, &|| false, false)
    }

    /// Like [`FrameReader::read_from`], but makes no further read once
    /// `stop()` holds (frames already buffered are still handed out, so
    /// nothing is left behind that the socket's readiness would not show).
    pub(crate) fn read_until(
        &mut self,
        src: &mut impl Read,
        on_frame: &mut dyn FnMut(Frame, &mut FrameReader) -> Result<()>,
        stop: &dyn Fn() -> bool,
    ) -> Result<ReadEnd> {
        self.pass(src, on_frame, stop, true)
    }

    /// How many reads brought bytes so far (frames parsed while it stays
    /// the same came in one read).
    pub(crate) fn reads(&self) -> u64 {
        self.reads
    }

    /// One read pass. With `short_read_ends`, a read that returns less than
    /// it asked for means the socket is drained: the pass ends there instead
    /// of spending a system call to hear "would block" (bytes that arrive
    /// later raise a new readiness event).
    fn pass(
        &mut self,
        src: &mut impl Read,
        on_frame: &mut dyn FnMut(Frame, &mut FrameReader) -> Result<()>,
        stop: &dyn Fn() -> bool,
        short_read_ends: bool,
    ) -> Result<ReadEnd> {
        loop {
            if let Some(large) = &mut self.large {
                let want = large.payload.len() - large.filled;
                match src.read(&mut large.payload[large.filled..]) {
                    Ok(0) => return Err(truncated()),
                    Ok(n) => {
                        self.reads += 1;
                        large.filled += n;
                        if large.filled == large.payload.len() {
                            let large = self.large.take().expect("checked above");
                            on_frame(
                                Frame {
                                    header: large.header,
                                    name: large.name,
                                    payload: large.payload,
                                },
                                self,
                            )?;
                        } else if n < want && short_read_ends {
                            return Ok(ReadEnd::WouldBlock);
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadEnd::WouldBlock),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            while let Some(frame) = self.parse_one()? {
                on_frame(frame, self)?;
            }
            if self.large.is_some() {
                continue;
            }
            if stop() {
                return Ok(ReadEnd::WouldBlock);
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let want = self.buf.len() - self.end;
            match src.read(&mut self.buf[self.end..]) {
                Ok(0) if self.start == self.end => return Ok(ReadEnd::Eof),
                Ok(0) => return Err(truncated()),
                Ok(n) => {
                    self.reads += 1;
                    self.end += n;
                    if n < want && short_read_ends {
                        while let Some(frame) = self.parse_one()? {
                            on_frame(frame, self)?;
                        }
                        if self.large.is_none() {
                            return Ok(ReadEnd::WouldBlock);
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(ReadEnd::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Takes one complete frame out of the buffer, or starts a large one.
    fn parse_one(&mut self) -> Result<Option<Frame>> {
        let have = &self.buf[self.start..self.end];
        if have.len() < HEADER_LEN {
            if !have.is_empty() {
                wire::check_prefix(&have[..have.len().min(5)])?;
            }
            return Ok(None);
        }
        let header = wire::decode_header(have[..HEADER_LEN].try_into().expect("header length"), self.max_payload)?;
        let name_len = header.name_len as usize;
        let total = HEADER_LEN as u64 + header.body_len();
        if total <= have.len() as u64 {
            let body = &have[HEADER_LEN..total as usize];
            let frame = Frame {
                header,
                name: Name::new(&body[..name_len]),
                payload: body[name_len..].to_vec(),
            };
            self.start += total as usize;
            return Ok(Some(frame));
        }
        if total > self.buf.len() as u64 && have.len() >= HEADER_LEN + name_len {
            // Too big for the scratch buffer: give the payload its own
            // buffer now and read the rest straight into it.
            let name = Name::new(&have[HEADER_LEN..HEADER_LEN + name_len]);
            let got = &have[HEADER_LEN + name_len..];
            let mut payload = super::buffers::take(header.payload_len as usize);
            payload[..got.len()].copy_from_slice(got);
            self.large = Some(Large {
                header,
                name,
                payload,
                filled: got.len(),
            });
            self.start = self.end;
            return Ok(None);
        }
        if self.buf.len() - self.start < total.min(self.buf.len() as u64) as usize {
            // Make room for the rest of this frame.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        Ok(None)
    }
}

/// Reads one frame from a blocking stream (its read timeout bounds it).
pub(crate) fn read_frame_blocking(src: &mut impl Read, max_payload: u64) -> Result<Frame> {
    let mut h = [0u8; HEADER_LEN];
    src.read_exact(&mut h).map_err(blocking_error)?;
    let header = wire::decode_header(&h, max_payload)?;
    let mut name = vec![0u8; header.name_len as usize];
    src.read_exact(&mut name).map_err(blocking_error)?;
    let name = Name::new(&name);
    let mut payload = vec![0u8; header.payload_len as usize];
    src.read_exact(&mut payload).map_err(blocking_error)?;
    Ok(Frame { header, name, payload })
}

/// Writes one frame to a blocking stream.
pub(crate) fn write_frame_blocking(dst: &mut impl Write, header: Header, name: &[u8], payload: &[u8]) -> Result<()> {
    dst.write_all(&wire::encode_frame(header, name, payload))
        .map_err(blocking_error)
}

fn blocking_error(e: io::Error) -> RpcError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => RpcError::Timeout("timed out on a handshake".into()),
        io::ErrorKind::UnexpectedEof => RpcError::Protocol("the peer closed the connection during a handshake".into()),
        _ => RpcError::Io(e.to_string()),
    }
}

/// The bytes of `parts` from byte `skip` on, part by part (no empty ones).
fn pieces_from<P: AsRef<[u8]>>(parts: &[P], mut skip: usize) -> impl Iterator<Item = &[u8]> {
    parts.iter().filter_map(move |p| {
        let p = p.as_ref();
        if skip >= p.len() {
            skip -= p.len();
            return None;
        }
        let piece = &p[skip..];
        skip = 0;
        Some(piece)
    })
}

/// Copies the bytes of `parts` from byte `skip` on into `out` (as many as
/// fit); returns how many it copied.
pub(crate) fn gather_from<P: AsRef<[u8]>>(parts: &[P], skip: usize, out: &mut [u8]) -> usize {
    let mut at = 0;
    for piece in pieces_from(parts, skip) {
        let n = piece.len().min(out.len() - at);
        out[at..at + n].copy_from_slice(&piece[..n]);
        at += n;
        if at == out.len() {
            break;
        }
    }
    at
}

/// Fills `out` with the slices of `parts` from byte `skip` on (as many as
/// fit); returns how many it filled.
pub(crate) fn slices_from<'a, P: AsRef<[u8]>>(parts: &'a [P], skip: usize, out: &mut [IoSlice<'a>]) -> usize {
    let mut n = 0;
    for (slot, piece) in out.iter_mut().zip(pieces_from(parts, skip)) {
        *slot = IoSlice::new(piece);
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Header, Kind};

    /// A reader that hands out its bytes in fixed-size pieces, then blocks.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.pos == self.data.len() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = out.len().min(self.step).min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn frame(id: u64, name: &str, payload_len: usize) -> Vec<u8> {
        let mut h = Header::new(Kind::Request);
        h.request_id = id;
        let payload: Vec<u8> = (0..payload_len).map(|i| (i * 7 + id as usize) as u8).collect();
        wire::encode_frame(h, name.as_bytes(), &payload)
    }

    #[test]
    fn frames_of_every_size_survive_any_split() {
        let sizes = [0usize, 1, 40, 1000, SCRATCH - 300, SCRATCH, 3 * SCRATCH + 17];
        let mut data = Vec::new();
        for (i, n) in sizes.iter().enumerate() {
            data.extend(frame(i as u64, "fn", *n));
        }
        for step in [1usize, 7, 4096, 1 << 20] {
            let mut src = Trickle {
                data: data.clone(),
                pos: 0,
                step,
            };
            let mut reader = FrameReader::new(u64::MAX);
            let mut got = Vec::new();
            while src.pos < src.data.len() {
                let end = reader
                    .read_from(&mut src, &mut |f, _| {
                        got.push(f);
                        Ok(())
                    })
                    .unwrap();
                assert_eq!(end, ReadEnd::WouldBlock);
            }
            assert_eq!(got.len(), sizes.len(), "step {step}");
            for (i, f) in got.iter().enumerate() {
                assert_eq!(f.header.request_id, i as u64);
                assert_eq!(&f.name[..], b"fn");
                let want: Vec<u8> = (0..sizes[i]).map(|j| (j * 7 + i) as u8).collect();
                assert_eq!(f.payload, want, "frame {i} step {step}");
            }
        }
    }

    #[test]
    fn garbage_is_refused_before_a_whole_header_arrives() {
        let mut src = Trickle {
            data: b"GET / HTTP/1.1\r\n".to_vec(),
            pos: 0,
            step: 3,
        };
        let mut reader = FrameReader::new(1024);
        let err = reader.read_from(&mut src, &mut |_, _| Ok(())).err().unwrap();
        assert_eq!(err.status(), crate::Status::Protocol);
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let mut reader = FrameReader::new(100);
        let mut src = Trickle {
            data: frame(1, "f", 101),
            pos: 0,
            step: 1000,
        };
        let err = reader.read_from(&mut src, &mut |_, _| Ok(())).err().unwrap();
        assert_eq!(err.status(), crate::Status::TooLarge);

        // A closed stream is seen on the pass after the bytes ran out, as
        // the event loop would call again on the next readiness.
        let drain = |data: Vec<u8>| {
            let mut reader = FrameReader::new(100);
            let mut src = io::Cursor::new(data);
            loop {
                match reader.read_from(&mut src, &mut |_, _| Ok(())) {
                    Ok(ReadEnd::WouldBlock) => continue,
                    other => return other,
                }
            }
        };
        let mut data = frame(1, "f", 10);
        data.truncate(45);
        assert_eq!(drain(data).err().unwrap().status(), crate::Status::Protocol);
        let end = drain(frame(1, "f", 10)).unwrap();
        assert_eq!(end, ReadEnd::Eof);
    }

    #[test]
    fn gathering_copies_parts_from_any_offset() {
        let parts: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; (i as usize % 5) + 1]).collect();
        let flat = parts.concat();
        for skip in [0, 1, 4, 50, flat.len() - 1, flat.len()] {
            for room in [0, 1, 7, 512] {
                let mut out = vec![0u8; room];
                let n = gather_from(&parts, skip, &mut out);
                assert_eq!(n, room.min(flat.len() - skip));
                assert_eq!(&out[..n], &flat[skip..skip + n]);
            }
        }
    }
}
