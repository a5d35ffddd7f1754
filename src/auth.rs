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

/// The client side of one connection, fed frame by frame: no I/O, so the
/// event loop steps it for any number of connections at once (and the
/// tests step it against [`Handshake`] in memory).
pub(crate) enum ClientHandshake {
    /// `Hello` sent; waiting for the server's challenge.
    AwaitChallenge {
        hello: Hello,
    },
    /// `Proof` sent; waiting for the welcome.
    AwaitWelcome,
    Done,
}

/// What the client does after a handshake frame.
pub(crate) enum ClientStep {
    /// Send this `Proof` payload and wait for the welcome.
    Proof(Vec<u8>),
    /// The server proved itself and let this rank in; its `Welcome`.
    Welcomed(Hello),
}

impl ClientHandshake {
    /// Begins the exchange: the machine, and the `Hello` payload to send first.
    pub(crate) fn start(hello: Hello) -> (ClientHandshake, Vec<u8>) {
        let payload = hello.encode();
        (ClientHandshake::AwaitChallenge { hello }, payload)
    }

    /// Takes the server's next frame. `server_rank` is the rank the client
    /// meant to reach (the proofs are bound to it); `server` names the peer
    /// in errors.
    pub(crate) fn step(&mut self, key: &[u8], server_rank: u32, frame: &Frame, server: &str) -> Result<ClientStep> {
        if frame.header.kind == Kind::Refused {
            *self = ClientHandshake::Done;
            return Err(refusal(frame));
        }
        match (std::mem::replace(self, ClientHandshake::Done), frame.header.kind) {
            (ClientHandshake::AwaitChallenge { hello }, Kind::Challenge) => {
                let challenge = Challenge::decode(&frame.payload)?;
                mac(key, SERVER_LABEL, &hello, &challenge.nonce, server_rank)
                    .verify_slice(&challenge.mac)
                    .map_err(|_| mismatch(server))?;
                let proof = mac(key, CLIENT_LABEL, &hello, &challenge.nonce, server_rank)
                    .finalize()
                    .into_bytes();
                *self = ClientHandshake::AwaitWelcome;
                Ok(ClientStep::Proof(proof.to_vec()))
            }
            (ClientHandshake::AwaitWelcome, Kind::Welcome) => Ok(ClientStep::Welcomed(Hello::decode(&frame.payload)?)),
            (ClientHandshake::AwaitChallenge { .. }, kind) => Err(RpcError::Protocol(format!(
                "{server} answered the greeting with {kind:?}"
            ))),
            (_, kind) => Err(RpcError::Protocol(format!("{server} answered the proof with {kind:?}"))),
        }
    }
}

/// The client side on a blocking stream whose timeouts bound each step
/// (for tools and tests that hold one connection). Returns the server's
/// `Welcome`. `server` names the peer in errors.
pub(crate) fn client(
    stream: &mut (impl Read + Write),
    key: &[u8],
    hello: &Hello,
    server_rank: u32,
    server: &str,
) -> Result<Hello> {
    let (mut machine, payload) = ClientHandshake::start(hello.clone());
    write_frame_blocking(stream, Header::new(Kind::Hello), &[], &payload)?;
    loop {
        let frame = read_frame_blocking(stream, MAX_HANDSHAKE_PAYLOAD)?;
        match machine.step(key, server_rank, &frame, server)? {
            ClientStep::Proof(proof) => write_frame_blocking(stream, Header::new(Kind::Proof), &[], &proof)?,
            ClientStep::Welcomed(welcome) => return Ok(welcome),
        }
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
            name: Default::default(),
            payload,
        }
    }

    /// Runs the whole exchange in memory, both machines stepping each
    /// other's frames; returns the client's and the server's outcome.
    fn exchange(client_key: &[u8], server_key: &[u8]) -> (Result<()>, Result<()>) {
        let hello = Hello {
            rank: 3,
            world_size: 4,
            token: [9; 16],
            nonce: random_bytes().unwrap(),
        };
        let (mut client, hello_payload) = ClientHandshake::start(hello);
        let mut server = Handshake::AwaitHello;
        let Step::Challenge(payload) = server
            .step(server_key, 0, &frame(Kind::Hello, hello_payload), |_| Ok(()))
            .unwrap()
        else {
            panic!("expected a challenge")
        };
        let proof = match client.step(client_key, 0, &frame(Kind::Challenge, payload), "server") {
            Ok(ClientStep::Proof(proof)) => proof,
            Ok(ClientStep::Welcomed(_)) => panic!("welcomed before proving"),
            Err(e) => return (Err(e), Err(mismatch("not asked"))),
        };
        let server_outcome = server.step(server_key, 0, &frame(Kind::Proof, proof), |_| Ok(()));
        let client_outcome = match &server_outcome {
            Ok(_) => {
                let welcome = Hello {
                    rank: 0,
                    world_size: 4,
                    token: [9; 16],
                    nonce: [0; NONCE_LEN],
                };
                match client.step(client_key, 0, &frame(Kind::Welcome, welcome.encode()), "server") {
                    Ok(ClientStep::Welcomed(w)) => {
                        assert_eq!(w.rank, 0);
                        Ok(())
                    }
                    other => panic!("expected the welcome, got {:?}", other.map(|_| ())),
                }
            }
            Err(e) => {
                let (header, text) = refused_frame(e);
                let refused = Frame {
                    header,
                    name: Default::default(),
                    payload: text,
                };
                client.step(client_key, 0, &refused, "server").map(drop)
            }
        };
        (client_outcome, server_outcome.map(drop))
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
            // The client stops at the server's challenge, before proving.
            assert_eq!(s.unwrap_err().status(), Status::Auth);
        }
    }

    #[test]
    fn a_client_refuses_frames_out_of_order() {
        let hello = Hello {
            rank: 1,
            world_size: 2,
            token: [0; 16],
            nonce: [1; NONCE_LEN],
        };
        for kind in [Kind::Welcome, Kind::Request, Kind::Hello] {
            let (mut client, _) = ClientHandshake::start(hello.clone());
            let err = client.step(b"k", 0, &frame(kind, vec![]), "rank 0").err().unwrap();
            assert_eq!(err.status(), Status::Protocol, "{kind:?}");
            assert!(err.to_string().contains("rank 0"), "{err}");
        }
        // A refusal carries the server's reason and status.
        let (mut client, _) = ClientHandshake::start(hello);
        let (header, text) = refused_frame(&RpcError::Init("world is full".into()));
        let refused = Frame {
            header,
            name: Default::default(),
            payload: text,
        };
        let err = client.step(b"k", 0, &refused, "rank 0").err().unwrap();
        assert_eq!(err, RpcError::Init("world is full".into()));
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
            name: Default::default(),
            payload: text,
        };
        assert_eq!(refusal(&f), RpcError::Auth("no".into()));
    }
}
