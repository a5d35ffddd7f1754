//! The frame format. Pure functions only: no I/O, no clocks.
//!
//! Every message on every connection (rendezvous and data) is one frame: a
//! fixed 40-byte header, then `name_len` bytes of name, then `payload_len`
//! bytes of payload. Integers are little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `RPCA` |
//! | 4 | 1 | version, [`VERSION`] |
//! | 5 | 1 | kind, [`Kind`] |
//! | 6 | 1 | flags ([`FLAG_INTERNAL`]: the name is one of the agent's own functions) |
//! | 7 | 1 | reserved, 0 |
//! | 8 | 4 | status (`i32`, responses: the C status code; 0 otherwise) |
//! | 12 | 2 | name length (at most 255) |
//! | 14 | 2 | reserved, 0 |
//! | 16 | 8 | request id (requests and responses) |
//! | 24 | 8 | time left to the caller's deadline in microseconds (requests; 0 = none) |
//! | 32 | 8 | payload length (at most the receiver's maximum message size) |
//!
//! A request's name is the function's; a response's payload is the reply, or
//! the error message when the status is not 0. A cancel names its call by
//! the request id alone. Deadlines travel as time left,
//! not as a clock reading, so ranks need no synchronised clocks.
//!
//! Every length is checked against its limit by [`decode_header`] before the
//! reader allocates anything; a header that fails any check ends that one
//! connection.

use crate::error::{RpcError, Status};

/// A function name as it travels: bytes (a received one is checked for
/// UTF-8 where it is used), a short one held inline, so that carrying a
/// name from the frame to the handler, or with a call in flight,
/// allocates nothing for most names.
#[derive(Clone, Default)]
pub(crate) struct Name(NameBytes);

#[derive(Clone)]
enum NameBytes {
    Inline { len: u8, bytes: [u8; Name::INLINE] },
    Heap(Box<[u8]>),
}

impl Default for NameBytes {
    fn default() -> NameBytes {
        NameBytes::Inline {
            len: 0,
            bytes: [0; Name::INLINE],
        }
    }
}

impl Name {
    const INLINE: usize = 30;

    pub(crate) fn new(name: &[u8]) -> Name {
        if name.len() > Self::INLINE {
            return Name(NameBytes::Heap(name.into()));
        }
        let mut bytes = [0u8; Self::INLINE];
        bytes[..name.len()].copy_from_slice(name);
        Name(NameBytes::Inline {
            len: name.len() as u8,
            bytes,
        })
    }
}

impl std::ops::Deref for Name {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            NameBytes::Inline { len, bytes } => &bytes[..*len as usize],
            NameBytes::Heap(bytes) => bytes,
        }
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(self))
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self))
    }
}

pub const MAGIC: [u8; 4] = *b"RPCA";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 40;
pub const MAX_NAME_LEN: usize = 255;
/// Request flag: the function is one of the agent's own (barrier, shutdown),
/// looked up apart from the user's functions so no user name is reserved.
pub const FLAG_INTERNAL: u8 = 1;
/// The largest payload accepted on a connection that has not finished its
/// handshake.
pub const MAX_HANDSHAKE_PAYLOAD: u64 = 4096 - HEADER_LEN as u64 - MAX_NAME_LEN as u64;

/// What a frame is.
///
/// Every connection (rendezvous and data) opens with the same handshake, a
/// mutual challenge-response over the job's secret (see `auth`):
/// `Hello` (client) → `Challenge` (server) → `Proof` (client) → `Welcome`
/// (server), or `Refused` at any step. Nothing else is accepted before it
/// completes, and nothing larger than [`MAX_HANDSHAKE_PAYLOAD`].
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Greeting, payload [`Hello`].
    Hello = 1,
    /// The handshake is complete: payload [`Hello`] of the accepting side.
    Welcome = 2,
    Request = 3,
    Response = 4,
    /// The sender is closing this connection on purpose (shutdown).
    Goodbye = 5,
    /// The server's challenge and its own proof, payload [`Challenge`].
    Challenge = 6,
    /// The client's proof: a MAC of [`MAC_LEN`] bytes.
    Proof = 7,
    /// The caller gave up on call `request_id` (sent after its request,
    /// on the same connection; no name, no payload): the destination drops
    /// it if it has not started, and tells its handler if it runs. One for
    /// a call the destination no longer knows (answered, or never seen) is
    /// ignored.
    Cancel = 8,
    /// Rendezvous: a rank announces itself, payload [`Join`].
    Join = 16,
    /// Rendezvous: the complete world, payload [`Table`].
    Table = 17,
    /// The other side turns this one away: the header's status says why
    /// (`Init`, `Auth`, `Protocol`), the payload says it in words (UTF-8).
    Refused = 18,
    /// Rendezvous: which ranks are still missing, payload: u32 count + u32 ranks.
    Missing = 19,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Request,
            4 => Kind::Response,
            5 => Kind::Goodbye,
            6 => Kind::Challenge,
            7 => Kind::Proof,
            8 => Kind::Cancel,
            16 => Kind::Join,
            17 => Kind::Table,
            18 => Kind::Refused,
            19 => Kind::Missing,
            _ => return None,
        })
    }
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flags: u8,
    pub status: i32,
    pub name_len: u16,
    pub request_id: u64,
    pub timeout_us: u64,
    pub payload_len: u64,
}

impl Header {
    pub fn new(kind: Kind) -> Header {
        Header {
            kind,
            flags: 0,
            status: 0,
            name_len: 0,
            request_id: 0,
            timeout_us: 0,
            payload_len: 0,
        }
    }

    /// Length of what follows the header.
    pub fn body_len(&self) -> u64 {
        self.name_len as u64 + self.payload_len
    }
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    BadMagic([u8; 4]),
    BadVersion(u8),
    BadKind(u8),
    BadReserved,
    NameTooLong(u16),
    TooLarge { len: u64, max: u64 },
    Malformed(&'static str),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::BadMagic(m) => write!(f, "bad magic {m:02x?} (not an rpcagent peer)"),
            WireError::BadVersion(v) => write!(f, "unsupported protocol version {v} (this build speaks {VERSION})"),
            WireError::BadKind(k) => write!(f, "unknown frame kind {k}"),
            WireError::BadReserved => write!(f, "reserved header bytes are not zero"),
            WireError::NameTooLong(n) => write!(f, "name of {n} bytes exceeds {MAX_NAME_LEN}"),
            WireError::TooLarge { len, max } => write!(f, "payload of {len} bytes exceeds the maximum of {max}"),
            WireError::Malformed(what) => write!(f, "malformed {what}"),
        }
    }
}

impl From<WireError> for RpcError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::TooLarge { .. } => RpcError::TooLarge(e.to_string()),
            other => RpcError::Protocol(other.to_string()),
        }
    }
}

/// Encodes a header.
pub fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..4].copy_from_slice(&MAGIC);
    b[4] = VERSION;
    b[5] = h.kind as u8;
    b[6] = h.flags;
    b[8..12].copy_from_slice(&h.status.to_le_bytes());
    b[12..14].copy_from_slice(&h.name_len.to_le_bytes());
    b[16..24].copy_from_slice(&h.request_id.to_le_bytes());
    b[24..32].copy_from_slice(&h.timeout_us.to_le_bytes());
    b[32..40].copy_from_slice(&h.payload_len.to_le_bytes());
    b
}

/// Checks the first bytes of a connection as soon as they arrive, so a peer
/// that is not speaking this protocol is dropped without waiting for a whole
/// header.
pub fn check_prefix(prefix: &[u8]) -> Result<(), WireError> {
    let n = prefix.len().min(4);
    if prefix[..n] != MAGIC[..n] {
        let mut m = [0u8; 4];
        m[..n].copy_from_slice(&prefix[..n]);
        return Err(WireError::BadMagic(m));
    }
    if prefix.len() > 4 && prefix[4] != VERSION {
        return Err(WireError::BadVersion(prefix[4]));
    }
    Ok(())
}

/// Decodes and checks a header; `max_payload` is the largest payload this
/// receiver accepts on this connection.
pub fn decode_header(b: &[u8; HEADER_LEN], max_payload: u64) -> Result<Header, WireError> {
    check_prefix(&b[..5])?;
    let kind = Kind::from_u8(b[5]).ok_or(WireError::BadKind(b[5]))?;
    if b[7] != 0 || b[14] != 0 || b[15] != 0 {
        return Err(WireError::BadReserved);
    }
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let name_len = u16::from_le_bytes([b[12], b[13]]);
    if name_len as usize > MAX_NAME_LEN {
        return Err(WireError::NameTooLong(name_len));
    }
    let payload_len = u64_at(32);
    if payload_len > max_payload {
        return Err(WireError::TooLarge {
            len: payload_len,
            max: max_payload,
        });
    }
    Ok(Header {
        kind,
        flags: b[6],
        status: i32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
        name_len,
        request_id: u64_at(16),
        timeout_us: u64_at(24),
        payload_len,
    })
}

/// The status of a response frame.
pub fn response_status(h: &Header) -> Result<Status, WireError> {
    Status::from_code(h.status)
        .filter(|s| *s != Status::Pending)
        .ok_or(WireError::Malformed("response status"))
}

/// Encodes a whole frame into one buffer (for small control frames).
pub fn encode_frame(mut h: Header, name: &[u8], payload: &[u8]) -> Vec<u8> {
    h.name_len = name.len() as u16;
    h.payload_len = payload.len() as u64;
    let mut out = Vec::with_capacity(HEADER_LEN + name.len() + payload.len());
    out.extend_from_slice(&encode_header(&h));
    out.extend_from_slice(name);
    out.extend_from_slice(payload);
    out
}

/// Length of handshake nonces.
pub const NONCE_LEN: usize = 16;
/// Length of handshake MACs (HMAC-SHA256).
pub const MAC_LEN: usize = 32;

/// Greeting (client → server), and the server's `Welcome`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub rank: u32,
    pub world_size: u32,
    /// The world's token from the rendezvous (zeros at the rendezvous
    /// itself): keeps other jobs' processes out of a world.
    pub token: [u8; 16],
    /// Fresh for every connection; the server's MAC must cover it.
    pub nonce: [u8; NONCE_LEN],
}

/// The server's challenge: its own nonce, and its proof over both nonces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub nonce: [u8; NONCE_LEN],
    pub mac: [u8; MAC_LEN],
}

/// A rank's announcement to the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    pub rank: u32,
    pub world_size: u32,
    pub name: String,
    /// Where the rank's data listener is, `ip:port`.
    pub addr: String,
}

/// The complete world, sent by the rendezvous to every rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub token: [u8; 16],
    /// `(name, addr)` of each rank, in rank order.
    pub ranks: Vec<(String, String)>,
}

/// Appends fields to a payload.
#[derive(Default)]
pub struct PayloadWriter(pub Vec<u8>);

impl PayloadWriter {
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// A string of at most 65535 bytes, prefixed by its u16 length.
    pub fn str(&mut self, v: &str) -> &mut Self {
        let b = &v.as_bytes()[..v.len().min(u16::MAX as usize)];
        self.0.extend_from_slice(&(b.len() as u16).to_le_bytes());
        self.0.extend_from_slice(b);
        self
    }
}

/// Reads fields from a payload, checking every length against what is left.
pub struct PayloadReader<'a>(pub &'a [u8]);

impl<'a> PayloadReader<'a> {
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Malformed("payload (truncated)"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().expect("4 bytes")))
    }
    pub fn str(&mut self) -> Result<String, WireError> {
        let len = u16::from_le_bytes(self.bytes(2)?.try_into().expect("2 bytes")) as usize;
        String::from_utf8(self.bytes(len)?.to_vec()).map_err(|_| WireError::Malformed("string (not UTF-8)"))
    }
    pub fn finish(&self) -> Result<(), WireError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed("payload (trailing bytes)"))
        }
    }
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = PayloadWriter::default();
        w.u32(self.rank)
            .u32(self.world_size)
            .bytes(&self.token)
            .bytes(&self.nonce);
        w.0
    }
    pub fn decode(p: &[u8]) -> Result<Hello, WireError> {
        let mut r = PayloadReader(p);
        let hello = Hello {
            rank: r.u32()?,
            world_size: r.u32()?,
            token: r.bytes(16)?.try_into().expect("16 bytes"),
            nonce: r.bytes(NONCE_LEN)?.try_into().expect("nonce length"),
        };
        r.finish()?;
        Ok(hello)
    }
}

impl Challenge {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = PayloadWriter::default();
        w.bytes(&self.nonce).bytes(&self.mac);
        w.0
    }
    pub fn decode(p: &[u8]) -> Result<Challenge, WireError> {
        let mut r = PayloadReader(p);
        let challenge = Challenge {
            nonce: r.bytes(NONCE_LEN)?.try_into().expect("nonce length"),
            mac: r.bytes(MAC_LEN)?.try_into().expect("MAC length"),
        };
        r.finish()?;
        Ok(challenge)
    }
}

impl Join {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = PayloadWriter::default();
        w.u32(self.rank).u32(self.world_size).str(&self.name).str(&self.addr);
        w.0
    }
    pub fn decode(p: &[u8]) -> Result<Join, WireError> {
        let mut r = PayloadReader(p);
        let challenge = Challenge {
            nonce: [1; NONCE_LEN],
            mac: [2; MAC_LEN],
        };
        assert_eq!(Challenge::decode(&challenge.encode()), Ok(challenge));
        assert!(Challenge::decode(&[0; 47]).is_err());

        let join = Join {
            rank: r.u32()?,
            world_size: r.u32()?,
            name: r.str()?,
            addr: r.str()?,
        };
        r.finish()?;
        Ok(join)
    }
}

impl Table {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = PayloadWriter::default();
        w.bytes(&self.token).u32(self.ranks.len() as u32);
        for (name, addr) in &self.ranks {
            w.str(name).str(addr);
        }
        w.0
    }
    pub fn decode(p: &[u8]) -> Result<Table, WireError> {
        let mut r = PayloadReader(p);
        let token = r.bytes(16)?.try_into().expect("16 bytes");
        let n = r.u32()? as usize;
        // Each entry takes at least 4 bytes, so a count the payload cannot
        // hold is refused before anything is reserved for it.
        if n > r.0.len() / 4 {
            return Err(WireError::Malformed("table (count)"));
        }
        let mut ranks = Vec::with_capacity(n);
        for _ in 0..n {
            ranks.push((r.str()?, r.str()?));
        }
        r.finish()?;
        Ok(Table { token, ranks })
    }
}

/// Encodes a list of ranks (the `Missing` payload).
pub fn encode_ranks(ranks: &[usize]) -> Vec<u8> {
    let mut w = PayloadWriter::default();
    w.u32(ranks.len() as u32);
    for r in ranks {
        w.u32(*r as u32);
    }
    w.0
}

pub fn decode_ranks(p: &[u8]) -> Result<Vec<usize>, WireError> {
    let mut r = PayloadReader(p);
    let n = r.u32()? as usize;
    if n > r.0.len() / 4 {
        return Err(WireError::Malformed("rank list (count)"));
    }
    let ranks = (0..n).map(|_| r.u32().map(|v| v as usize)).collect::<Result<_, _>>()?;
    r.finish()?;
    Ok(ranks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            kind: Kind::Request,
            flags: FLAG_INTERNAL,
            status: -3,
            name_len: 4,
            request_id: 0x0102030405060708,
            timeout_us: 300_000,
            payload_len: 1 << 20,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        assert_eq!(decode_header(&encode_header(&h), 1 << 20), Ok(h));
    }

    #[test]
    fn lengths_are_checked_before_anything_else_is_trusted() {
        let h = sample();
        assert_eq!(
            decode_header(&encode_header(&h), 1000),
            Err(WireError::TooLarge {
                len: 1 << 20,
                max: 1000
            })
        );
        let mut b = encode_header(&h);
        b[12..14].copy_from_slice(&256u16.to_le_bytes());
        assert_eq!(decode_header(&b, u64::MAX), Err(WireError::NameTooLong(256)));
    }

    #[test]
    fn wrong_magic_version_kind_or_reserved_is_refused() {
        let good = encode_header(&sample());
        let mut b = good;
        b[0] = b'X';
        assert!(matches!(decode_header(&b, u64::MAX), Err(WireError::BadMagic(_))));
        let mut b = good;
        b[4] = 2;
        assert_eq!(decode_header(&b, u64::MAX), Err(WireError::BadVersion(2)));
        let mut b = good;
        b[5] = 99;
        assert_eq!(decode_header(&b, u64::MAX), Err(WireError::BadKind(99)));
        let mut b = good;
        b[7] = 1;
        assert_eq!(decode_header(&b, u64::MAX), Err(WireError::BadReserved));
        assert!(check_prefix(b"GET ").is_err());
        assert!(check_prefix(b"RP").is_ok());
        assert!(check_prefix(b"RPCA\x07").is_err());
    }

    #[test]
    fn control_payloads_round_trip_and_reject_truncation() {
        let hello = Hello {
            rank: 7,
            world_size: 9,
            token: [5; 16],
            nonce: [6; NONCE_LEN],
        };
        assert_eq!(Hello::decode(&hello.encode()), Ok(hello.clone()));
        let enc = hello.encode();
        assert!(Hello::decode(&enc[..enc.len() - 1]).is_err());

        let challenge = Challenge {
            nonce: [1; NONCE_LEN],
            mac: [2; MAC_LEN],
        };
        assert_eq!(Challenge::decode(&challenge.encode()), Ok(challenge));
        assert!(Challenge::decode(&[0; 47]).is_err());

        let join = Join {
            rank: 1,
            world_size: 3,
            name: "trainer-1".into(),
            addr: "10.0.0.2:4000".into(),
        };
        assert_eq!(Join::decode(&join.encode()), Ok(join));

        let table = Table {
            token: [1; 16],
            ranks: vec![("a".into(), "1.2.3.4:5".into()), ("b".into(), "6.7.8.9:10".into())],
        };
        assert_eq!(Table::decode(&table.encode()), Ok(table.clone()));
        let mut enc = table.encode();
        enc[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Table::decode(&enc).is_err());

        assert_eq!(decode_ranks(&encode_ranks(&[1, 4])), Ok(vec![1, 4]));
        assert!(decode_ranks(&[255, 255, 255, 255]).is_err());
    }

    #[test]
    fn response_status_must_be_a_final_status() {
        let mut h = Header::new(Kind::Response);
        h.status = -4;
        assert_eq!(response_status(&h), Ok(Status::Timeout));
        h.status = 1;
        assert!(response_status(&h).is_err());
        h.status = 12345;
        assert!(response_status(&h).is_err());
    }
}
