//! Connections open in the background, and what ends an opening: peers
//! that never answer the handshake, and a peer that leaves while this
//! rank's connection to it is still opening. The silent peers are members
//! with no agent (`RawMember`) whose listeners never accept: the kernel
//! completes each TCP connect into the backlog, and nobody answers `Hello`.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use rpcagent::fuzzing::RawMember;
use rpcagent::wire::{self, Header, Kind};
use rpcagent::{Config, RpcAgent, Status};

fn config(rank: usize, world: usize, port: u16) -> Config {
    Config::new(rank, world)
        .master("127.0.0.1", port)
        .init_timeout(Duration::from_secs(30))
}

/// A silent member of a world of `world`: its listener (kept open, never
/// accepting) and the member.
fn silent_member(rank: usize, world: usize, port: u16) -> std::thread::JoinHandle<(TcpListener, RawMember)> {
    std::thread::spawn(move || {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let member = RawMember::join(config(rank, world, port), &addr).unwrap();
        (listener, member)
    })
}

/// More silent peers than a rank opens connections to at once (32): their
/// handshakes end at the peer timeout, the ranks are lost, and a call to a
/// live rank made after them still goes through.
#[test]
fn peers_that_never_answer_are_lost_and_do_not_block_the_others() {
    let world = 36;
    let port = common::free_port();
    let silent: Vec<_> = (2..world).map(|r| silent_member(r, world, port)).collect();
    let live = std::thread::spawn(move || RpcAgent::init(config(1, world, port)).unwrap());
    let peer_timeout = Duration::from_secs(2);
    let me = RpcAgent::init(config(0, world, port).peer_timeout(peer_timeout)).unwrap();
    let live = live.join().unwrap();
    let _silent: Vec<_> = silent.into_iter().map(|h| h.join().unwrap()).collect();
    for agent in [&me, &live] {
        agent.register("echo", |x: &[u8]| Ok(x.to_vec())).unwrap();
        agent.start().unwrap();
    }

    let started = Instant::now();
    let stuck: Vec<_> = (2..world)
        .map(|r| me.rpc_async_timeout(r, "echo", b"", Some(Duration::from_secs(30))))
        .collect();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "rpc_async waited for connections"
    );
    // Its connection waits for a turn behind the silent ones.
    let reply = me
        .rpc_sync_timeout(1, "echo", b"hi", Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(reply, b"hi");
    assert!(
        started.elapsed() >= peer_timeout,
        "rank 1 did not have to wait its turn"
    );
    for call in stuck {
        let err = call.wait().unwrap_err();
        assert_eq!(err.status(), Status::PeerLost, "{err}");
        assert!(err.to_string().contains("did not answer the handshake"), "{err}");
    }
    // Lost for good: no new connection is tried.
    let err = me.rpc_sync(2, "echo", b"").unwrap_err();
    assert_eq!(err.status(), Status::PeerLost, "{err}");
    for agent in [me, live] {
        agent.shutdown(false, Duration::from_secs(5)).unwrap();
    }
}

/// Rank 1 leaves in order (goodbye, then close) while rank 0's connection
/// to it is still opening: the calls queued for that connection fail at
/// once, with or without a deadline.
#[test]
fn calls_queued_for_an_opening_connection_fail_when_the_peer_leaves() {
    let world = 2;
    let port = common::free_port();
    let silent = silent_member(1, world, port);
    let me = RpcAgent::init(config(0, world, port)).unwrap();
    let (_listener, member) = silent.join().unwrap();
    me.start().unwrap();
    let no_deadline = me.rpc_async_timeout(1, "echo", b"x", None);
    let with_deadline = me.rpc_async_timeout(1, "echo", b"x", Some(Duration::from_secs(30)));
    std::thread::sleep(Duration::from_millis(200));

    let mut goodbye = member.connect(0).unwrap();
    goodbye
        .write_all(&wire::encode_frame(Header::new(Kind::Goodbye), b"", b""))
        .unwrap();
    goodbye.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = goodbye.read_to_end(&mut Vec::new());

    for call in [no_deadline, with_deadline] {
        let outcome = call
            .wait_timeout(Duration::from_secs(5))
            .expect("the queued call was never failed");
        assert_eq!(outcome.unwrap_err().status(), Status::Shutdown);
    }
    me.shutdown(false, Duration::from_secs(5)).unwrap();
}
