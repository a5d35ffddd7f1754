//! The handshake that opens every connection, rendezvous and data alike: a
//! mutual HMAC-SHA256 challenge-response over the job's secret.
//!
//! ```text
//! client → server  Hello     {rank, world size, world token, nonce_c}
//! server → client  Challenge {nonce_s, MAC(key, "server", nonce_c, nonce_s, token, ranks)}
//! client → server  Proof     {MAC(key, "client", nonce_c, nonce_s, token, ranks)}
//! server → client  Welcome   {rank, world size, token}
//! ```
//!
//! Each side proves it knows the key without sending it; fresh nonces on
//! both sides keep a recorded handshake from being replayed, and the labels
//! keep one side's proof from being reflected as the other's. Without a
//! configured secret the key is empty: the exchange proves nothing, and the
//! per-world token from the rendezvous is what keeps other jobs out.

use std::io::{Read, Write};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Result, RpcError, Status};
use crate::net::framing::{Frame, read_frame_blocking, write_frame_blocking};
use crate::wire::{Challenge, Header, Hello, Kind, MAC_LEN, MAX_HANDSHAKE_PAYLOAD, NONCE_LEN};

type HmacSha256 = Hmac<Sha256>;

const SERVER_LABEL: &[u8] = b"rpcagent/1 server proof";
const CLIENT_LABEL: &[u8] = b"rpcagent/1 client proof";

/// `N` bytes from the kernel's random source (`getrandom(2)`: no file to
/// open per handshake, and none to be missing inside a container).
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    getrandom::fill(&mut out).map_err(|e| RpcError::Io(format!("no random bytes from the kernel: {e}")))?;
    Ok(out)
}

fn mac(key: &[u8], label: &[u8], hello: &Hello, nonce_s: &[u8; NONCE_LEN], server_rank: u32) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(label);
    m.update(&hello.nonce);
    m.update(nonce_s);
    m.update(&hello.token);
    m.update(&hello.rank.to_le_bytes());
    m.update(&hello.world_size.to_le_bytes());
    m.update(&server_rank.to_le_bytes());
    m
}

fn mismatch(who: &str) -> RpcError {
    RpcError::Auth(format!(
        "{who} could not prove it knows this job's secret (the secrets differ, or only one side has one)"
    ))
}

/// The error a `Refused` frame carries.
pub(crate) fn refusal(frame: &Frame) -> RpcError {
    let message = String::from_utf8_lossy(&frame.payload).into_owned();
    match Status::from_code(frame.header.status) {
        Some(Status::Auth) => RpcError::Auth(message),
        Some(Status::Init) => RpcError::Init(message),
        _ => RpcError::Protocol(message),
    }
}

/// A `Refused` frame telling the other side why, with the status of `e`.
pub(crate) fn refused_frame(e: &RpcError) -> (Header, Vec<u8>) {
    let mut header = Header::new(Kind::Refused);
    header.status = e.status() as i32;
    let text = match e {
        RpcError::Auth(m) | RpcError::Init(m) | RpcError::Protocol(m) => m.clone(),
        other => other.to_string(),
    };
    (header, text.into_bytes())
}

/// The client side, on a blocking stream whose timeouts bound each step.
/// Returns the server's `Welcome`. `server` names the peer in errors.
pub(crate) fn client(
    stream: &mut (impl Read + Write),
    key: &[u8],
    hello: &Hello,
    server_rank: u32,
    server: &str,
) -> Result<Hello> {
    write_frame_blocking(stream, Header::new(Kind::Hello), &[], &hello.encode())?;
    let frame = read_frame_blocking(stream, MAX_HANDSHAKE_PAYLOAD)?;
    let challenge = match frame.header.kind {
        Kind::Challenge => Challenge::decode(&frame.payload)?,
        Kind::Refused => return Err(refusal(&frame)),
        other => {
            return Err(RpcError::Protocol(format!(
                "{server} answered the greeting with {other:?}"
            )));
        }
    };
    mac(key, SERVER_LABEL, hello, &challenge.nonce, server_rank)
        .verify_slice(&challenge.mac)
        .map_err(|_| mismatch(server))?;
    let proof = mac(key, CLIENT_LABEL, hello, &challenge.nonce, server_rank)
        .finalize()
        .into_bytes();
    write_frame_blocking(stream, Header::new(Kind::Proof), &[], &proof)?;
    let frame = read_frame_blocking(stream, MAX_HANDSHAKE_PAYLOAD)?;
    match frame.header.kind {
        Kind::Welcome => Ok(Hello::decode(&frame.payload)?),
        Kind::Refused => Err(refusal(&frame)),
        other => Err(RpcError::Protocol(format!(
            "{server} answered the proof with {other:?}"
        ))),
    }
}

/// The server side of one connection, fed frame by frame.
pub(crate) enum Handshake {
    AwaitHello,
    AwaitProof { hello: Hello, nonce_s: [u8; NONCE_LEN] },
    Done,
}

/// What the server sends after a handshake frame.
pub(crate) enum Step {
    /// Send this `Challenge` payload and wait for the proof.
    Challenge(Vec<u8>),
    /// The client proved itself: it is the rank its `Hello` names.
    Authenticated(Hello),
}

impl Handshake {
    /// Takes the next frame. `admit` checks the greeting's claims (world
    /// token, size, rank) before anything is computed for it. An `Err` is to
    /// be sent back as `Refused` before the connection closes.
    pub(crate) fn step(
        &mut self,
        key: &[u8],
        server_rank: u32,
        frame: &Frame,
        admit: impl FnOnce(&Hello) -> Result<()>,
    ) -> Result<Step> {
        match (std::mem::replace(self, Handshake::Done), frame.header.kind) {
            (Handshake::AwaitHello, Kind::Hello) => {
                let hello = Hello::decode(&frame.payload)?;
                admit(&hello)?;
                let nonce_s = random_bytes::<NONCE_LEN>()?;
                let mac = mac(key, SERVER_LABEL, &hello, &nonce_s, server_rank)
                    .finalize()
                    .into_bytes()
                    .into();
                let payload = Challenge { nonce: nonce_s, mac }.encode();
                *self = Handshake::AwaitProof { hello, nonce_s };
                Ok(Step::Challenge(payload))
            }
            (Handshake::AwaitProof { hello, nonce_s }, Kind::Proof) if frame.payload.len() == MAC_LEN => {
                mac(key, CLIENT_LABEL, &hello, &nonce_s, server_rank)
                    .verify_slice(&frame.payload)
                    .map_err(|_| mismatch(&format!("the process claiming rank {}", hello.rank)))?;
                Ok(Step::Authenticated(hello))
            }
            (_, kind) => Err(RpcError::Protocol(format!(
                "a {kind:?} frame arrived before the handshake was complete"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: Kind, payload: Vec<u8>) -> Frame {
        let mut header = Header::new(kind);
        header.payload_len = payload.len() as u64;
        Frame {
            header,
            name: vec![],
            payload,
        }
    }

    /// Runs the whole exchange in memory; returns the client's and the
    /// server's outcome.
    fn exchange(client_key: &[u8], server_key: &[u8]) -> (Result<()>, Result<()>) {
        let hello = Hello {
            rank: 3,
            world_size: 4,
            token: [9; 16],
            nonce: random_bytes().unwrap(),
        };
        let mut server = Handshake::AwaitHello;
        let Step::Challenge(payload) = server
            .step(server_key, 0, &frame(Kind::Hello, hello.encode()), |_| Ok(()))
            .unwrap()
        else {
            panic!("expected a challenge")
        };
        let challenge = Challenge::decode(&payload).unwrap();
        let client_ok = mac(client_key, SERVER_LABEL, &hello, &challenge.nonce, 0).verify_slice(&challenge.mac);
        let proof = mac(client_key, CLIENT_LABEL, &hello, &challenge.nonce, 0)
            .finalize()
            .into_bytes()
            .to_vec();
        let server_outcome = server
            .step(server_key, 0, &frame(Kind::Proof, proof), |_| Ok(()))
            .map(drop);
        (client_ok.map_err(|_| mismatch("server")), server_outcome)
    }

    #[test]
    fn same_secret_passes_both_ways() {
        let (c, s) = exchange(b"s3cret", b"s3cret");
        assert!(c.is_ok() && s.is_ok());
        let (c, s) = exchange(b"", b"");
        assert!(c.is_ok() && s.is_ok());
    }

    #[test]
    fn different_or_missing_secrets_fail_on_both_sides() {
        for (a, b) in [(&b"one"[..], &b"two"[..]), (b"", b"two"), (b"one", b"")] {
            let (c, s) = exchange(a, b);
            assert_eq!(c.unwrap_err().status(), Status::Auth);
            assert_eq!(s.unwrap_err().status(), Status::Auth);
        }
    }

    #[test]
    fn frames_out_of_order_are_refused() {
        let mut server = Handshake::AwaitHello;
        let err = server
            .step(b"k", 0, &frame(Kind::Request, vec![]), |_| Ok(()))
            .err()
            .unwrap();
        assert_eq!(err.status(), Status::Protocol);
        let mut server = Handshake::AwaitHello;
        let err = server
            .step(b"k", 0, &frame(Kind::Proof, vec![0; MAC_LEN]), |_| Ok(()))
            .err()
            .unwrap();
        assert_eq!(err.status(), Status::Protocol);
        let (header, text) = refused_frame(&RpcError::Auth("no".into()));
        let f = Frame {
            header,
            name: vec![],
            payload: text,
        };
        assert_eq!(refusal(&f), RpcError::Auth("no".into()));
    }
}
