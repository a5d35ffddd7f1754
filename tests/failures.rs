//! Failures provoked for real: a rank SIGKILLed while serving, garbage sent
//! to every listening port, bad frames from a rank past its handshake, wrong
//! and missing secrets.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::World;
use rpcagent::wire::{self, Header, Hello, Kind};
use rpcagent::{Config, RpcAgent, Status};

const LONG: Duration = Duration::from_secs(60);

#[test]
#[ignore = "one rank of a multi-process test; started by the other tests"]
fn rank_main() {
    if common::rank_scenario().as_deref() == Some("bad_member") && std::env::var("RANK").as_deref() == Ok("2") {
        return bad_member();
    }
    let Some((scenario, agent)) = common::rank_process() else {
        return;
    };
    match scenario.as_str() {
        "killed_peer" => killed_peer(&agent),
        "garbage" => garbage(&agent),
        "bad_member" => serve_beside_a_bad_member(&agent),
        "with_secret" => common::scenarios::nested(&agent),
        other => panic!("unknown scenario {other}"),
    }
}

// ---- a rank killed while serving ----

fn killed_peer(agent: &RpcAgent) {
    agent.register("echo", |a: &[u8]| Ok(a.to_vec())).unwrap();
    agent
        .register("hang", |_: &[u8]| {
            std::thread::sleep(Duration::from_secs(60));
            Ok(vec![])
        })
        .unwrap();
    agent
        .register("die", |_: &[u8]| {
            std::thread::spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                // SAFETY: kill(2) on our own pid; SIGKILL ends the process
                // at once, which is the point.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            });
            std::thread::sleep(Duration::from_secs(60));
            Ok(vec![])
        })
        .unwrap();
    agent.start().unwrap();
    agent.barrier(LONG).unwrap();
    let deadline = Some(Duration::from_secs(30));
    match agent.rank() {
        0 => {
            let started = Instant::now();
            let in_flight = agent.rpc_async_timeout(2, "hang", b"", deadline);
            let err = agent.rpc_sync_timeout(2, "die", b"", deadline).unwrap_err();
            let sync_took = started.elapsed();
            assert_eq!(err.status(), Status::PeerLost, "{err}");
            let err = in_flight.wait().unwrap_err();
            let async_took = started.elapsed();
            assert_eq!(err.status(), Status::PeerLost, "{err}");
            // The kill comes 300 ms after the call started.
            assert!(
                sync_took < Duration::from_secs(2),
                "sync call failed after {sync_took:?}"
            );
            assert!(
                async_took < Duration::from_secs(2),
                "async call failed after {async_took:?}"
            );
            eprintln!(
                "figure: killed peer detected {} ms after the SIGKILL (sync call), {} ms (async call)",
                sync_took.as_millis().saturating_sub(300),
                async_took.as_millis().saturating_sub(300)
            );
            // Later calls to the dead rank fail at once; the others still work.
            let again = Instant::now();
            let err = agent.rpc_sync_timeout(2, "echo", b"", deadline).unwrap_err();
            assert_eq!(err.status(), Status::PeerLost);
            assert!(again.elapsed() < Duration::from_millis(500));
            assert_eq!(agent.rpc_sync(1, "echo", b"alive").unwrap(), b"alive");
        }
        1 => {
            // A rank with nothing in flight to rank 2 also finds out at once.
            std::thread::sleep(Duration::from_millis(1500));
            let started = Instant::now();
            let err = agent.rpc_sync_timeout(2, "echo", b"", deadline).unwrap_err();
            assert_eq!(err.status(), Status::PeerLost, "{err}");
            assert!(started.elapsed() < Duration::from_secs(1));
            assert_eq!(agent.rpc_sync(0, "echo", b"alive").unwrap(), b"alive");
        }
        _ => {
            // Rank 2 waits to be told to die.
            std::thread::sleep(LONG);
            unreachable!("rank 2 should have been killed");
        }
    }
    // Graceful shutdown with a dead rank returns by its timeout, with an error.
    let started = Instant::now();
    let err = agent.shutdown(true, Duration::from_secs(3)).unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err.status(), Status::Timeout | Status::PeerLost), "{err}");
    assert!(took < Duration::from_millis(3500), "shutdown took {took:?}");
    assert!(agent.is_shut_down());
    eprintln!(
        "figure: graceful shutdown with a dead rank returned in {} ms ({err})",
        took.as_millis()
    );
}

#[test]
fn a_killed_rank_fails_calls_at_once_and_the_rest_go_on() {
    World::new("killed_peer", 3, Duration::from_secs(60)).killed(&[2]).run();
}

// ---- bad frames from a member of the world ----

/// Frames a rank that passed the handshake may still get wrong; each must
/// close its connection (and only that).
fn bad_member_frames() -> Vec<(&'static str, Vec<u8>)> {
    let request = |name: &[u8], payload: &[u8]| {
        let mut h = Header::new(Kind::Request);
        h.request_id = 7;
        wire::encode_frame(h, name, payload)
    };
    vec![
        ("a function name that is not UTF-8", request(&[0x66, 0xff, 0xfe], b"x")),
        (
            "a response on a connection that carries requests",
            wire::encode_frame(Header::new(Kind::Response), b"", b"x"),
        ),
        (
            "a greeting after the handshake",
            wire::encode_frame(Header::new(Kind::Hello), b"", &[0; 40]),
        ),
        (
            "a request above the message size limit",
            header(Kind::Request, rpcagent::DEFAULT_MAX_MESSAGE_BYTES + 1),
        ),
        ("random bytes", common::pattern(4096, 7)),
    ]
}

/// Rank 2 of `bad_member`: a process that joins the world with no agent,
/// proves it is served like any rank, then sends rank 0 each bad frame on a
/// connection of its own and waits for rank 0 to close it. Then it tells
/// rank 1 it is done.
fn bad_member() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = Config::from_env().unwrap();
    let member = rpcagent::fuzzing::RawMember::join(config, &listener.local_addr().unwrap().to_string()).unwrap();
    let call = |to: usize, function: &str, payload: &[u8]| {
        let mut s = member.connect(to).unwrap();
        let mut h = Header::new(Kind::Request);
        h.request_id = 1;
        s.write_all(&wire::encode_frame(h, function.as_bytes(), payload))
            .unwrap();
        let mut head = [0u8; wire::HEADER_LEN];
        s.read_exact(&mut head).unwrap();
        let h = wire::decode_header(&head, 1 << 20).unwrap();
        assert_eq!((h.kind, h.request_id, h.status), (Kind::Response, 1, 0), "{function}");
        let mut body = vec![0u8; h.body_len() as usize];
        s.read_exact(&mut body).unwrap();
        body
    };
    assert_eq!(call(0, "echo", b"probe"), b"probe", "a member's call");
    for (what, bytes) in bad_member_frames() {
        let mut s = member.connect(0).unwrap();
        s.write_all(&bytes).unwrap();
        let mut sink = [0u8; 4096];
        loop {
            match s.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("rank 0 kept the connection open after {what}: {e}"),
            }
        }
    }
    call(1, "bad_member_done", b"");
}

/// Ranks 0 and 1 of `bad_member`: rank 0 serves while rank 2 misbehaves;
/// once rank 2 is done, rank 1 checks rank 0 still serves it.
fn serve_beside_a_bad_member(agent: &RpcAgent) {
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    agent.register("echo", |a: &[u8]| Ok(a.to_vec())).unwrap();
    for name in ["bad_member_done", "finish"] {
        let d = done.clone();
        agent
            .register(name, move |_: &[u8]| {
                d.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(vec![])
            })
            .unwrap();
    }
    agent.start().unwrap();
    let until = Instant::now() + LONG;
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(Instant::now() < until, "rank 2 never finished");
        std::thread::sleep(Duration::from_millis(10));
    }
    if agent.rank() == 1 {
        assert_eq!(agent.rpc_sync(0, "echo", b"still serving").unwrap(), b"still serving");
        agent.rpc_sync(0, "finish", b"").unwrap();
    }
    agent.shutdown(false, Duration::from_secs(5)).unwrap();
}

#[test]
fn a_member_sending_bad_frames_loses_only_that_connection() {
    World::new("bad_member", 3, Duration::from_secs(90)).run();
}

// ---- garbage against every listening port ----

/// The TCP ports process `pid` listens on, from its own sockets.
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is "ADDR:PORT" in hex; state 0A is LISTEN.
            if f.len() > 9 && f[3] == "0A" && inodes.iter().any(|i| i == f[9]) {
                let port = f[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

fn header(kind: Kind, payload_len: u64) -> Vec<u8> {
    let mut h = Header::new(kind);
    h.payload_len = payload_len;
    wire::encode_header(&h).to_vec()
}

/// Bad inputs, each sent on a fresh connection; every one must get the
/// connection closed by the server.
fn bad_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let mut wrong_version = header(Kind::Hello, 0);
    wrong_version[4] = 9;
    let mut wrong_kind = header(Kind::Hello, 0);
    wrong_kind[5] = 200;
    let mut reserved = header(Kind::Hello, 0);
    reserved[7] = 1;
    let mut long_name = header(Kind::Request, 0);
    long_name[12..14].copy_from_slice(&1000u16.to_le_bytes());
    let stranger = Hello {
        rank: 1,
        world_size: 2,
        token: [7; 16],
        nonce: [1; 16],
    };
    let random: Vec<u8> = common::pattern(64 * 1024, 99);
    vec![
        ("random bytes", random),
        ("an HTTP request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        (
            "a TLS client hello",
            vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc],
        ),
        ("a header claiming 16 EiB", header(Kind::Request, u64::MAX)),
        (
            "a header claiming 1 GiB before authentication",
            header(Kind::Hello, 1 << 30),
        ),
        ("a 5 KiB greeting", [header(Kind::Hello, 5000), vec![0; 5000]].concat()),
        ("a wrong protocol version", wrong_version),
        ("an unknown frame kind", wrong_kind),
        ("non-zero reserved bytes", reserved),
        ("a 1000-byte name", long_name),
        (
            "a request before the handshake",
            wire::encode_frame(Header::new(Kind::Request), b"echo", b"hi"),
        ),
        (
            "a proof before the greeting",
            wire::encode_frame(Header::new(Kind::Proof), b"", &[0; 32]),
        ),
        (
            "a malformed greeting",
            wire::encode_frame(Header::new(Kind::Hello), b"", &[1, 2, 3]),
        ),
        (
            "another world's greeting",
            wire::encode_frame(Header::new(Kind::Hello), b"", &stranger.encode()),
        ),
        ("a truncated header", header(Kind::Hello, 0)[..20].to_vec()),
    ]
}

/// Sends `bytes` to `port` and waits for the server to close the
/// connection; returns how long that took.
fn send_and_expect_close(port: u16, bytes: &[u8], close_after_send: bool) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let _ = s.write_all(bytes);
    if close_after_send {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return started.elapsed(),
            Ok(_) => continue, // a refusal frame may come first
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return started.elapsed(),
            Err(e) => panic!("the server kept the connection open after {:?}: {e}", started.elapsed()),
        }
    }
}

fn battery(port: u16) -> usize {
    let mut tried = 0;
    for (what, bytes) in bad_inputs() {
        // The truncated header comes with the end of the stream: that end
        // must be seen at once too, not at the handshake timeout.
        let took = send_and_expect_close(port, &bytes, what == "a truncated header");
        assert!(took < Duration::from_secs(2), "{what}: closed only after {took:?}");
        tried += 1;
    }
    // Silence, and a slow valid prefix, are closed by the handshake timeout.
    for (what, bytes) in [
        ("an idle connection", vec![]),
        ("a stalled valid prefix", b"RPCA\x01".to_vec()),
    ] {
        let took = send_and_expect_close(port, &bytes, false);
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_secs(8),
            "{what}: {took:?}"
        );
        tried += 1;
    }
    // A burst of connections opened and dropped at once.
    for _ in 0..200 {
        drop(TcpStream::connect(("127.0.0.1", port)).unwrap());
    }
    tried + 1
}

fn garbage(agent: &RpcAgent) {
    agent.register("echo", |a: &[u8]| Ok(a.to_vec())).unwrap();
    agent
        .register("pid", |_: &[u8]| Ok(std::process::id().to_le_bytes().to_vec()))
        .unwrap();
    agent.start().unwrap();
    agent.barrier(LONG).unwrap();
    if agent.rank() == 0 {
        let pid = u32::from_le_bytes(agent.rpc_sync(1, "pid", b"").unwrap().try_into().unwrap());
        let ports = listening_ports(pid);
        assert!(!ports.is_empty(), "rank 1 (pid {pid}) listens on no port");
        for _ in 0..50 {
            agent.rpc_sync(1, "echo", &[0; 1024]).unwrap();
        }
        let before = common::rss_kib(pid);
        let mut tried = 0;
        for port in &ports {
            tried += battery(*port);
        }
        for i in 0..100u32 {
            let args = i.to_le_bytes();
            assert_eq!(agent.rpc_sync(1, "echo", &args).unwrap(), args);
        }
        let after = common::rss_kib(pid);
        assert!(
            after <= before + 4 * 1024,
            "rank 1 grew from {before} KiB to {after} KiB"
        );
        eprintln!(
            "figure: {tried} kinds of bad input against ports {ports:?} of rank 1; it then served 100 calls; \
             RSS {before} KiB before, {after} KiB after"
        );
    }
    agent.barrier(LONG).unwrap();
    agent.shutdown(true, LONG).unwrap();
}

#[test]
fn garbage_on_every_listening_port_closes_only_that_connection() {
    World::new("garbage", 2, Duration::from_secs(120)).run();
}

#[test]
fn the_rendezvous_survives_garbage_while_the_world_forms() {
    let port = common::free_port();
    let cfg = move |rank| {
        Config::new(rank, 2)
            .master("127.0.0.1", port)
            .init_timeout(Duration::from_secs(30))
    };
    let host = std::thread::spawn(move || RpcAgent::init(cfg(0)));
    // Wait for the rendezvous to listen, then throw everything at it.
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    for (what, bytes) in bad_inputs() {
        let took = send_and_expect_close(port, &bytes, what == "a truncated header");
        assert!(took < Duration::from_secs(6), "{what}: {took:?}");
    }
    let joiner = std::thread::spawn(move || RpcAgent::init(cfg(1)));
    let a0 = host.join().unwrap().unwrap();
    let a1 = joiner.join().unwrap().unwrap();
    a1.register("echo", |a: &[u8]| Ok(a.to_vec())).unwrap();
    a1.start().unwrap();
    assert_eq!(a0.rpc_sync(1, "echo", b"fine").unwrap(), b"fine");
}

// ---- secrets ----

fn secret_world(secrets: [Option<&'static [u8]>; 2]) -> Vec<(rpcagent::Result<RpcAgent>, Duration)> {
    let port = common::free_port();
    let handles: Vec<_> = secrets
        .into_iter()
        .enumerate()
        .map(|(rank, secret)| {
            std::thread::spawn(move || {
                let mut cfg = Config::new(rank, 2)
                    .master("127.0.0.1", port)
                    .init_timeout(Duration::from_secs(3));
                if let Some(s) = secret {
                    cfg = cfg.secret(s);
                }
                let started = Instant::now();
                let agent = RpcAgent::init(cfg);
                (agent, started.elapsed())
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn the_right_secret_lets_calls_through() {
    let mut results = secret_world([Some(b"open sesame"), Some(b"open sesame")]);
    let (a1, _) = results.pop().unwrap();
    let (a0, _) = results.pop().unwrap();
    let (a0, a1) = (a0.unwrap(), a1.unwrap());
    a1.register("echo", |a: &[u8]| Ok(a.to_vec())).unwrap();
    a1.start().unwrap();
    a0.start().unwrap();
    assert_eq!(a0.rpc_sync(1, "echo", b"in").unwrap(), b"in");
    assert_eq!(a1.rpc_sync(1, "echo", b"self").unwrap(), b"self");
}

#[test]
fn a_wrong_or_missing_secret_is_refused_promptly() {
    for secrets in [
        [Some(&b"open sesame"[..]), Some(&b"guess"[..])],
        [Some(b"open sesame"), None],
        [None, Some(b"open sesame")],
    ] {
        let results = secret_world(secrets);
        let (joiner, took) = &results[1];
        let err = joiner.as_ref().unwrap_err();
        assert_eq!(err.status(), Status::Auth, "{secrets:?}: {err}");
        assert!(*took < Duration::from_secs(1), "AUTH came after {took:?}");
        let (host, _) = &results[0];
        let err = host.as_ref().unwrap_err();
        assert_eq!(err.status(), Status::Init);
        assert!(err.to_string().contains("[1]"), "the host should name rank 1: {err}");
        eprintln!("figure: {secrets:?} refused in {} ms", took.as_millis());
    }
}

#[test]
fn processes_sharing_the_secret_from_the_environment_work() {
    World::new("with_secret", 3, Duration::from_secs(60))
        .env(&[("RPCAGENT_SECRET", "from the launcher")])
        .run();
}
