//! How ranks find each other. Rank 0 hosts a small store at the master
//! address; every other rank connects, announces its rank, worker name and
//! listening address, and waits for the complete table of the world (with a
//! fresh per-world token that data connections must present).

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::auth::{self, Handshake, Step};
use crate::config::Config;
use crate::error::{Result, RpcError};
use crate::log::log_at;
use crate::net::framing::{Frame, FrameReader, ReadEnd, read_frame_blocking, write_frame_blocking};
use crate::net::sys::{self, Epoll, READABLE};
use crate::wire::{self, Header, Hello, Join, Kind, MAX_HANDSHAKE_PAYLOAD, Table};

/// A connection that has not announced itself by then is closed.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the host tells waiting ranks who is still missing.
const MISSING_EVERY: Duration = Duration::from_secs(1);

/// Meets the other ranks; returns the world once all `world_size` joined.
pub(crate) fn rendezvous(config: &Config, master: SocketAddr, me: Join) -> Result<Table> {
    let deadline = Instant::now() + config.init_timeout;
    if config.rank == 0 {
        host(config, master, me, deadline)
    } else {
        join(config, master, me, deadline)
    }
}

fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Largest table a world of `world_size` ranks can need: per rank a name
/// and an address (an IPv6 one with its scope, and a same-host socket's
/// random part: `transport::tcp`).
fn max_table_bytes(world_size: usize) -> u64 {
    20 + world_size as u64 * (2 + 255 + 2 + 128)
}

fn missing(members: &[Option<(String, String)>]) -> Vec<usize> {
    (0..members.len()).filter(|r| members[*r].is_none()).collect()
}

/// A process that connected to the rendezvous.
struct Guest {
    stream: TcpStream,
    reader: FrameReader,
    opened: Instant,
    handshake: Handshake,
    /// The rank it proved to be (after the handshake).
    greeted: Option<usize>,
    /// The rank it joined as (after its `Join` was admitted).
    rank: Option<usize>,
}

impl Guest {
    /// Sends a small frame; the stream goes blocking for it, briefly.
    fn send_frame(&mut self, header: Header, payload: &[u8]) -> Result<()> {
        self.stream.set_nonblocking(false)?;
        self.stream.set_write_timeout(Some(Duration::from_secs(2)))?;
        let r = write_frame_blocking(&mut self.stream, header, &[], payload);
        self.stream.set_nonblocking(true)?;
        r
    }

    fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<()> {
        self.send_frame(Header::new(kind), payload)
    }

    /// Tells the guest why it is turned away.
    fn refuse(&mut self, why: &RpcError) {
        let (header, text) = auth::refused_frame(why);
        let _ = self.send_frame(header, &text);
    }
}

fn bind_master(master: SocketAddr) -> Result<TcpListener> {
    let bound = match sys::listen(master) {
        // The master name may resolve to an address of another interface
        // than the one it arrives on: listen on all of them then.
        Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {
            sys::listen((Ipv4Addr::UNSPECIFIED, master.port()).into())
        }
        other => other,
    };
    bound.map_err(|e| RpcError::Init(format!("rank 0 cannot host the rendezvous at {master}: {e}")))
}

fn host(config: &Config, master: SocketAddr, me: Join, deadline: Instant) -> Result<Table> {
    let world_size = config.world_size;
    let listener = bind_master(master)?;
    listener.set_nonblocking(true)?;
    let epoll = Epoll::new()?;
    epoll.add(&listener, 0, READABLE)?;
    let mut guests: HashMap<u64, Guest> = HashMap::new();
    let mut next_token = 1u64;
    let mut members: Vec<Option<(String, String)>> = vec![None; world_size];
    members[0] = Some((me.name, me.addr));
    let mut events = Vec::new();
    let mut missing_sent: Option<(Instant, Vec<usize>)> = None;

    while members.iter().any(Option::is_none) {
        if Instant::now() >= deadline {
            let why = format!(
                "timed out after {} ms: ranks {:?} of a world of {world_size} never joined the rendezvous at {master}",
                config.init_timeout.as_millis(),
                missing(&members)
            );
            let error = RpcError::Init(why);
            for g in guests.values_mut().filter(|g| g.rank.is_some()) {
                g.refuse(&error);
            }
            return Err(error);
        }
        let wait = left(deadline).min(Duration::from_millis(200));
        epoll.wait(&mut events, wait.as_millis().max(1) as i32)?;
        for ev in &events {
            if ev.token == 0 {
                loop {
                    match listener.accept() {
                        Ok((stream, from)) => {
                            // One guest's socket failing is that guest's
                            // problem: the others still meet here.
                            let _ = stream.set_nodelay(true);
                            let watched = stream
                                .set_nonblocking(true)
                                .and_then(|()| epoll.add(&stream, next_token, READABLE));
                            if let Err(e) = watched {
                                log_at!(Warn, Some(0), "rendezvous could not take a connection from {from}: {e}");
                                continue;
                            }
                            let guest = Guest {
                                stream,
                                reader: FrameReader::new(MAX_HANDSHAKE_PAYLOAD),
                                opened: Instant::now(),
                                handshake: Handshake::AwaitHello,
                                greeted: None,
                                rank: None,
                            };
                            guests.insert(next_token, guest);
                            next_token += 1;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            log_at!(Warn, Some(0), "rendezvous accept failed: {e}");
                            break;
                        }
                    }
                }
                continue;
            }
            let Some(guest) = guests.get_mut(&ev.token) else {
                continue;
            };
            let mut frames = Vec::new();
            let mut stream = &guest.stream;
            let read = guest.reader.read_from(&mut stream, &mut |f, _| {
                frames.push(f);
                Ok(())
            });
            let mut farewell: Option<String> = match read {
                Ok(ReadEnd::WouldBlock) => None,
                Ok(ReadEnd::Eof) => Some("closed the connection".into()),
                Err(e) => Some(e.to_string()),
            };
            for frame in frames {
                if farewell.is_some() {
                    break;
                }
                farewell = receive(guest, frame, &mut members, config).err();
            }
            if let Some(why) = farewell {
                let guest = guests.remove(&ev.token).expect("present");
                let _ = epoll.delete(&guest.stream);
                let from = guest.stream.peer_addr().map_or("?".into(), |a| a.to_string());
                match guest.rank {
                    Some(r) if members[r].is_some() => {
                        members[r] = None;
                        log_at!(
                            Warn,
                            Some(0),
                            "rank {r} ({from}) left the rendezvous before the world formed: {why}"
                        );
                    }
                    _ => log_at!(Warn, Some(0), "rendezvous closed a connection from {from}: {why}"),
                }
            }
        }
        let stale: Vec<u64> = guests
            .iter()
            .filter(|(_, g)| g.rank.is_none() && g.opened.elapsed() >= ANNOUNCE_TIMEOUT)
            .map(|(t, _)| *t)
            .collect();
        for t in stale {
            let g = guests.remove(&t).expect("present");
            let _ = epoll.delete(&g.stream);
            log_at!(
                Warn,
                Some(0),
                "rendezvous closed a connection from {} that did not announce itself within {} s",
                g.stream.peer_addr().map_or("?".into(), |a| a.to_string()),
                ANNOUNCE_TIMEOUT.as_secs()
            );
        }
        let now_missing = missing(&members);
        let due = missing_sent
            .as_ref()
            .is_none_or(|(at, list)| *list != now_missing && at.elapsed() >= MISSING_EVERY);
        if due && !now_missing.is_empty() {
            let payload = wire::encode_ranks(&now_missing);
            for g in guests.values_mut().filter(|g| g.rank.is_some()) {
                let _ = g.send(Kind::Missing, &payload);
            }
            missing_sent = Some((Instant::now(), now_missing));
        }
    }

    let table = Table {
        token: auth::random_bytes()?,
        ranks: members.into_iter().map(|m| m.expect("all joined")).collect(),
    };
    let payload = table.encode();
    for g in guests.values_mut().filter(|g| g.rank.is_some()) {
        if let Err(e) = g.send(Kind::Table, &payload) {
            log_at!(Warn, Some(0), "could not send the world to rank {:?}: {e}", g.rank);
        }
    }
    Ok(table)
}

/// Takes one frame from a guest: its handshake first, then its `Join`.
/// `Err` says why it is turned away (it has been told).
fn receive(
    guest: &mut Guest,
    frame: Frame,
    members: &mut [Option<(String, String)>],
    config: &Config,
) -> std::result::Result<(), String> {
    let outcome = match guest.greeted {
        None => greet(guest, &frame, config),
        Some(rank) => admit(guest, &frame, members, config.world_size, rank),
    };
    outcome.map_err(|e| {
        guest.refuse(&e);
        e.to_string()
    })
}

fn greet(guest: &mut Guest, frame: &Frame, config: &Config) -> Result<()> {
    let key = config.secret.as_deref().unwrap_or_default();
    let admit_hello = |hello: &Hello| {
        if hello.world_size as usize != config.world_size {
            return Err(RpcError::Init(format!(
                "world size mismatch: rank {} was started for a world of {}, rank 0 for a world of {}",
                hello.rank, hello.world_size, config.world_size
            )));
        }
        if hello.rank as usize >= config.world_size {
            return Err(RpcError::Init(format!(
                "rank {} is out of range for a world of {}",
                hello.rank, config.world_size
            )));
        }
        if hello.token != [0; 16] {
            return Err(RpcError::Protocol("a greeting meant for a data connection".into()));
        }
        Ok(())
    };
    match guest.handshake.step(key, 0, frame, admit_hello)? {
        Step::Challenge(payload) => guest.send(Kind::Challenge, &payload),
        Step::Authenticated(hello) => {
            guest.greeted = Some(hello.rank as usize);
            // The rendezvous has no world token yet.
            let welcome = Hello {
                rank: 0,
                world_size: config.world_size as u32,
                token: [0; 16],
                nonce: [0; wire::NONCE_LEN],
            };
            guest.send(Kind::Welcome, &welcome.encode())
        }
    }
}

/// Checks an authenticated guest's announcement.
fn admit(
    guest: &mut Guest,
    frame: &Frame,
    members: &mut [Option<(String, String)>],
    world_size: usize,
    greeted_as: usize,
) -> Result<()> {
    if guest.rank.is_some() || frame.header.kind != Kind::Join {
        return Err(RpcError::Protocol(format!("unexpected {:?} frame", frame.header.kind)));
    }
    let join = Join::decode(&frame.payload)?;
    let rank = join.rank as usize;
    let refusal = if join.world_size as usize != world_size {
        Some(format!(
            "world size mismatch: rank {rank} was started for a world of {}, rank 0 for a world of {world_size}",
            join.world_size
        ))
    } else if rank != greeted_as {
        Some(format!("rank {greeted_as} announced itself as rank {rank}"))
    } else if let Some((_, addr)) = &members[rank] {
        Some(format!(
            "duplicate rank: rank {rank} has already joined (listening on {addr})"
        ))
    } else if let Some(other) = members
        .iter()
        .position(|m| m.as_ref().is_some_and(|(n, _)| *n == join.name))
    {
        Some(format!(
            "duplicate worker name '{}': rank {other} has it already",
            join.name
        ))
    } else {
        None
    };
    if let Some(why) = refusal {
        return Err(RpcError::Init(why));
    }
    members[rank] = Some((join.name, join.addr));
    guest.rank = Some(rank);
    Ok(())
}

fn join(config: &Config, master: SocketAddr, me: Join, deadline: Instant) -> Result<Table> {
    let mut stream = loop {
        let attempt = left(deadline).min(Duration::from_secs(1)).max(Duration::from_millis(1));
        match TcpStream::connect_timeout(&master, attempt) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(RpcError::Init(format!(
                    "the master {master} was unreachable for {} ms: {e}",
                    config.init_timeout.as_millis()
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20).min(left(deadline))),
        }
    };
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(left(deadline).max(Duration::from_millis(1))))?;
    stream.set_read_timeout(Some(left(deadline).max(Duration::from_millis(1))))?;
    let hello = Hello {
        rank: me.rank,
        world_size: me.world_size,
        token: [0; 16],
        nonce: auth::random_bytes()?,
    };
    let key = config.secret.as_deref().unwrap_or_default();
    auth::client(&mut stream, key, &hello, 0, &format!("the master at {master}")).map_err(|e| match e {
        RpcError::Auth(_) | RpcError::Init(_) => e,
        other => RpcError::Init(format!("the handshake with the master at {master} failed: {other}")),
    })?;
    write_frame_blocking(&mut stream, Header::new(Kind::Join), &[], &me.encode())
        .map_err(|e| RpcError::Init(format!("cannot announce rank {} to the master {master}: {e}", me.rank)))?;
    let mut last_missing: Option<Vec<usize>> = None;
    loop {
        stream.set_read_timeout(Some(left(deadline).max(Duration::from_millis(1))))?;
        let frame = match read_frame_blocking(&mut stream, max_table_bytes(config.world_size)) {
            Ok(f) => f,
            Err(RpcError::Timeout(_)) => {
                let who = last_missing.map_or("no report from rank 0 yet".into(), |m| {
                    format!("rank 0 reported ranks {m:?} missing")
                });
                return Err(RpcError::Init(format!(
                    "timed out after {} ms waiting for the world of {} at {master}; {who}",
                    config.init_timeout.as_millis(),
                    config.world_size
                )));
            }
            Err(e) => return Err(RpcError::Init(format!("the rendezvous at {master} failed: {e}"))),
        };
        match frame.header.kind {
            Kind::Table => {
                let table = Table::decode(&frame.payload)?;
                if table.ranks.len() != config.world_size {
                    return Err(RpcError::Init(format!(
                        "the master sent a world of {} ranks, expected {}",
                        table.ranks.len(),
                        config.world_size
                    )));
                }
                return Ok(table);
            }
            Kind::Refused => return Err(auth::refusal(&frame)),
            Kind::Missing => last_missing = Some(wire::decode_ranks(&frame.payload)?),
            other => {
                return Err(RpcError::Init(format!("the master sent an unexpected {other:?} frame")));
            }
        }
    }
}
