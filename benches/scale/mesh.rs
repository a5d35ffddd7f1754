//! First contact at scale: N processes on this host, each reaching every
//! other once, with every connection new. The baseline is a raw full mesh
//! (each process opens non-blocking connections to all others at once and
//! exchanges an 8-byte hello on each); rpcagent's is a sweep (each rank
//! calls every other rank once with `rpc_async`, then waits for them all).
//!
//! Both sides are started the same way: the parent waits for every process
//! to say "ready", then writes "go" to each; each process times its own
//! sweep from its "go".

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Child;
use std::time::{Duration, Instant};

use rpcagent::{Config, RpcAgent};

use super::{Table, free_port, spawn};

/// Worker threads per rank in the rpcagent worlds (256 ranks × 16 would be
/// 4,000 idle threads on 2 cores).
const WORKERS: usize = 4;

/// Ports `base..base + n` that are all free now.
fn free_port_run(n: usize) -> u16 {
    loop {
        let base = free_port();
        if base as usize + n < 32768 && (0..n as u16).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
}

/// Waits for one line on stdin ("go").
fn wait_for_go() {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

// ---------- the raw mesh ----------

enum Outgoing {
    Connecting(TcpStream),
    Sent(TcpStream, usize),
    Done,
}

/// One process of the raw mesh: listens on `base + rank`, connects to every
/// other rank at once, says hello (8 bytes) on each, and counts the replies;
/// answers the hellos it receives until its stdin closes.
pub fn raw_rank() {
    let env = |k: &str| std::env::var(k).unwrap().parse::<usize>().unwrap();
    let (me, n, base) = (env("RANK"), env("WORLD_SIZE"), env("MESH_BASE"));
    let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener.set_reuse_address(true).unwrap();
    let addr: SocketAddr = ([127, 0, 0, 1], (base + me) as u16).into();
    listener.bind(&addr.into()).unwrap();
    listener.listen(4096).unwrap();
    listener.set_nonblocking(true).unwrap();
    let listener: TcpListener = listener.into();
    say("ready");
    wait_for_go();
    let started = Instant::now();
    let mut outgoing: Vec<Outgoing> = (0..n)
        .filter(|r| *r != me)
        .map(|r| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_nonblocking(true).unwrap();
            let to: SocketAddr = ([127, 0, 0, 1], (base + r) as u16).into();
            if let Err(e) = s.connect(&to.into()) {
                assert_eq!(e.raw_os_error(), Some(libc::EINPROGRESS), "{e}");
            }
            Outgoing::Connecting(s.into())
        })
        .collect();
    let mut incoming: Vec<(TcpStream, usize)> = Vec::new();
    let mut done = 0;
    let mut reported = false;
    let mut fds: Vec<libc::pollfd> = Vec::new();
    loop {
        fds.clear();
        let fd = |fd: i32, events: i16| libc::pollfd { fd, events, revents: 0 };
        fds.push(fd(0, libc::POLLIN));
        fds.push(fd(listener.as_raw_fd(), libc::POLLIN));
        for o in &outgoing {
            match o {
                Outgoing::Connecting(s) => fds.push(fd(s.as_raw_fd(), libc::POLLOUT)),
                Outgoing::Sent(s, _) => fds.push(fd(s.as_raw_fd(), libc::POLLIN)),
                Outgoing::Done => fds.push(fd(-1, 0)),
            }
        }
        for (s, _) in &incoming {
            fds.push(fd(s.as_raw_fd(), libc::POLLIN));
        }
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        assert!(ready >= 0, "poll: {}", std::io::Error::last_os_error());
        if fds[0].revents != 0 {
            return; // stdin closed: the parent is done with us
        }
        if fds[1].revents != 0 {
            while let Ok((s, _)) = listener.accept() {
                s.set_nonblocking(true).unwrap();
                incoming.push((s, 0));
            }
        }
        for (i, o) in outgoing.iter_mut().enumerate() {
            if fds[2 + i].revents == 0 {
                continue;
            }
            *o = match std::mem::replace(o, Outgoing::Done) {
                Outgoing::Connecting(mut s) => {
                    assert!(s.take_error().unwrap().is_none(), "connect failed");
                    s.set_nodelay(true).unwrap();
                    s.write_all(&[me as u8; 8]).unwrap();
                    Outgoing::Sent(s, 0)
                }
                Outgoing::Sent(mut s, mut got) => {
                    let mut buf = [0u8; 8];
                    if let Ok(k) = s.read(&mut buf[got..]) {
                        got += k;
                    }
                    if got == 8 {
                        done += 1;
                        Outgoing::Done
                    } else {
                        Outgoing::Sent(s, got)
                    }
                }
                Outgoing::Done => Outgoing::Done,
            };
        }
        let first_incoming = 2 + outgoing.len();
        for (i, (s, got)) in incoming.iter_mut().enumerate() {
            if fds.get(first_incoming + i).is_none_or(|f| f.revents == 0) || *got == 8 {
                continue;
            }
            let mut buf = [0u8; 8];
            if let Ok(k) = s.read(&mut buf[*got..]) {
                *got += k;
            }
            if *got == 8 {
                s.write_all(&[me as u8; 8]).unwrap();
            }
        }
        if done == n - 1 && !reported {
            reported = true;
            say(&format!("{}", started.elapsed().as_secs_f64() * 1e3));
        }
    }
}

// ---------- rpcagent's sweep ----------

/// One rank of the rpcagent world: joins, then on "go" calls every other
/// rank once (all connections new), and reports its sweep time and the
/// time spent inside `rpc_async`.
pub fn rpc_rank() {
    let started = Instant::now();
    let agent = RpcAgent::init(Config::from_env().unwrap()).unwrap();
    let init_ms = started.elapsed().as_secs_f64() * 1e3;
    agent.register("echo", |a: &[u8]| Ok(a.to_vec())).unwrap();
    agent.start().unwrap();
    say(&format!("ready {init_ms}"));
    wait_for_go();
    let me = agent.rank();
    let started = Instant::now();
    let mut inside = Duration::ZERO;
    let futures: Vec<_> = (0..agent.world_size())
        .filter(|r| *r != me)
        .map(|r| {
            let t = Instant::now();
            let f = agent.rpc_async(r, "echo", &[me as u8; 8]);
            inside += t.elapsed();
            f
        })
        .collect();
    for f in futures {
        f.wait().unwrap();
    }
    let sweep_ms = started.elapsed().as_secs_f64() * 1e3;
    say(&format!("{sweep_ms} {}", inside.as_secs_f64() * 1e3));
    agent.shutdown(true, Duration::from_secs(300)).unwrap();
}

/// Starts `n` processes in `role`, waits for each to say "ready" (returning
/// what follows it), then tells them all "go".
fn start_all(role: &str, n: usize, env: impl Fn(usize) -> Vec<(&'static str, String)>) -> (Vec<Child>, Vec<String>) {
    let mut children: Vec<Child> = (0..n).map(|r| spawn(role, &env(r))).collect();
    let mut readies = Vec::new();
    let mut outputs = Vec::new();
    for child in &mut children {
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        readies.push(line.trim().strip_prefix("ready").unwrap().trim().to_string());
        outputs.push(out);
    }
    for child in &mut children {
        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    }
    for (child, out) in children.iter_mut().zip(outputs) {
        child.stdout = Some(out.into_inner());
    }
    (children, readies)
}

/// The line each child prints after its sweep.
fn results(children: &mut [Child]) -> Vec<Vec<f64>> {
    children
        .iter_mut()
        .map(|c| {
            let mut line = String::new();
            BufReader::new(c.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
            line.split_whitespace().map(|v| v.parse().unwrap()).collect()
        })
        .collect()
}

pub fn scale(table: &mut Table, quick: bool) {
    let sizes: &[usize] = if quick { &[64] } else { &[64, 128, 256] };
    for &n in sizes {
        let base = free_port_run(n);
        let (mut raw, _) = start_all("mesh-rank", n, |r| {
            vec![
                ("RANK", r.to_string()),
                ("WORLD_SIZE", n.to_string()),
                ("MESH_BASE", base.to_string()),
            ]
        });
        let raw_sweep = results(&mut raw).iter().map(|v| v[0]).fold(0.0, f64::max);
        for mut c in raw {
            drop(c.stdin.take());
            c.wait().unwrap();
        }

        let port = free_port();
        let (mut ours, readies) = start_all("sweep-rank", n, |r| {
            vec![
                ("RANK", r.to_string()),
                ("WORLD_SIZE", n.to_string()),
                ("MASTER_PORT", port.to_string()),
                ("RPCAGENT_WORKER_THREADS", WORKERS.to_string()),
            ]
        });
        let init_max = readies.iter().map(|v| v.parse::<f64>().unwrap()).fold(0.0, f64::max);
        let done = results(&mut ours);
        for mut c in ours {
            drop(c.stdin.take());
            assert!(c.wait().unwrap().success());
        }
        let sweep = done.iter().map(|v| v[0]).fold(0.0, f64::max);
        let inside_share = done.iter().map(|v| v[1] / v[0] * 100.0).fold(0.0, f64::max);
        table.single(&format!("world of {n}: slowest init"), init_max, "ms");
        table.row(
            &format!("world of {n}: first contact, slowest rank"),
            raw_sweep,
            sweep,
            "ms",
        );
        table.single(
            &format!("world of {n}: inside rpc_async, most of a sweep"),
            inside_share,
            "%",
        );
    }
}
