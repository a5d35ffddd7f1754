//! rpcagent against a hand-written length-prefixed TCP echo, both between
//! two processes on this host, measured in one run and printed side by side.
//!
//! `cargo bench --bench rpcbench` (add `-- --quick` for a short run).
//! The binary re-executes itself for the server side (`--role ...`).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rpcagent::{Config, HandlerOptions, RpcAgent, RpcFuture};

#[path = "../tests/common/port.rs"]
mod port;
use port::free_port;

#[path = "scale/mesh.rs"]
mod mesh;

#[path = "scale/flood.rs"]
mod flood;

#[path = "shm/probe.rs"]
mod shm_probe;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--role") {
        match args[i + 1].as_str() {
            "raw-server" => raw_server(),
            "rpc-server" => rpc_server(),
            "world-rank" => world_rank(),
            "mesh-rank" => mesh::raw_rank(),
            "sweep-rank" => mesh::rpc_rank(),
            "flood-rank" => flood::flood_rank(),
            "shm-echo" => shm_probe::echo_rank(),
            other => panic!("unknown role {other}"),
        }
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    // `--only latency,world` runs some parts.
    let only: Option<&String> = args.iter().position(|a| a == "--only").map(|i| &args[i + 1]);
    let wanted = |part: &str| only.is_none_or(|o| o.split(',').any(|p| p == part));
    let mut table = Table;
    table.header();
    if wanted("latency") {
        // Where threads run dominates round trips on a VM: a wake-up on
        // another CPU costs far more than one on the same CPU. So latency is
        // measured twice: with every thread of both processes on one CPU
        // (software cost alone), and wherever the scheduler puts them.
        let all = cpus();
        pin(&[0]);
        latency(&mut table, quick, "one CPU");
        pin(&all);
        latency(&mut table, quick, "any CPU");
    }
    if wanted("pipelined") {
        pipelined(&mut table, quick);
    }
    if wanted("bandwidth") {
        bandwidth(&mut table, quick);
    }
    if wanted("world") {
        world(&mut table, quick);
    }
    if wanted("scale") {
        mesh::scale(&mut table, quick);
    }
    if wanted("flood") {
        flood::flood(&mut table);
    }
    if wanted("shm-ring") {
        shm_probe::shm_ring(&mut table, quick);
    }
}

// ---------- the table ----------

struct Table;

impl Table {
    fn header(&self) {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!(
            "rpcagent benchmark: {cores} cores, loopback, rpcagent {}",
            env!("CARGO_PKG_VERSION")
        );
        println!(
            "{:<44} {:>14} {:>14} {:>8}",
            "metric", "raw TCP echo", "rpcagent", "ratio"
        );
    }

    /// `lower_is_better` decides which way the ratio reads: it is always
    /// rpcagent / raw, and the target says which side of 1 is good.
    fn row(&self, metric: &str, raw: f64, ours: f64, unit: &str) {
        println!(
            "{:<48} {:>14} {:>14} {:>7.2}x",
            format!("{metric} ({unit})"),
            fmt(raw),
            fmt(ours),
            ours / raw
        );
    }

    fn single(&self, metric: &str, ours: f64, unit: &str) {
        println!("{:<48} {:>14} {:>14}", format!("{metric} ({unit})"), "-", fmt(ours));
    }
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

// ---------- processes ----------

fn spawn(role: &str, env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--role", role])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

// ---------- raw TCP echo ----------

/// Echoes length-prefixed messages (u64 length, then bytes), one write per
/// message, reading through a buffer.
fn raw_server() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    for conn in listener.incoming() {
        let conn = conn.unwrap();
        conn.set_nodelay(true).unwrap();
        let mut reader = BufReader::with_capacity(64 * 1024, conn.try_clone().unwrap());
        let mut writer = conn;
        let mut buf = Vec::new();
        loop {
            let mut len = [0u8; 8];
            if reader.read_exact(&mut len).is_err() {
                break;
            }
            let n = u64::from_le_bytes(len) as usize;
            buf.resize(8 + n, 0);
            buf[..8].copy_from_slice(&len);
            reader.read_exact(&mut buf[8..]).unwrap();
            writer.write_all(&buf).unwrap();
        }
    }
}

struct RawClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    fn connect(port: u16) -> RawClient {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        RawClient {
            reader: BufReader::with_capacity(64 * 1024, s.try_clone().unwrap()),
            writer: s,
            buf: Vec::new(),
        }
    }
    fn send(&mut self, payload: &[u8]) {
        self.buf.clear();
        self.buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(payload);
        self.writer.write_all(&self.buf).unwrap();
    }
    fn recv(&mut self, into: &mut Vec<u8>) {
        let mut len = [0u8; 8];
        self.reader.read_exact(&mut len).unwrap();
        into.resize(u64::from_le_bytes(len) as usize, 0);
        self.reader.read_exact(into).unwrap();
    }
}

fn start_raw() -> (Child, u16) {
    let mut child = spawn("raw-server", &[]);
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().parse().unwrap())
}

// ---------- rpcagent ----------

fn rpc_server() {
    let agent = RpcAgent::init(Config::from_env().unwrap()).unwrap();
    // The raw echo sends back the buffer it read; so do these.
    agent
        .register_owned("echo", HandlerOptions::default(), |_, args| Ok(args))
        .unwrap();
    agent
        .register_owned("echo_inline", HandlerOptions { inline: true }, |_, args| Ok(args))
        .unwrap();
    agent.start().unwrap();
    agent.shutdown(true, Duration::from_secs(600)).unwrap();
}

/// This process as rank 0 of a world of two, the server child as rank 1,
/// over TCP (these rows compare with the raw TCP echo; the same-host
/// transport is measured by `rpcbench_c`'s samehost section).
fn start_rpc() -> (Child, RpcAgent) {
    let port = free_port();
    let env = [
        ("RANK", "1".to_string()),
        ("WORLD_SIZE", "2".to_string()),
        ("MASTER_PORT", port.to_string()),
        ("RPCAGENT_TRANSPORT", "tcp".to_string()),
    ];
    let child = spawn("rpc-server", &env);
    let agent = RpcAgent::init(Config::new(0, 2).master("127.0.0.1", port).transport("tcp")).unwrap();
    agent.start().unwrap();
    (child, agent)
}

fn stop_rpc(mut child: Child, agent: RpcAgent) {
    agent.shutdown(true, Duration::from_secs(60)).unwrap();
    child.wait().unwrap();
}

// ---------- measurements ----------

fn samples(quick: bool, size: usize) -> usize {
    let n = if size <= 1024 { 20_000 } else { 4_000 };
    if quick { n / 10 } else { n }
}

/// The CPUs this process may run on.
fn cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity
    // fills it and reads nothing else.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    // SAFETY: CPU_ISSET reads the set.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|c| unsafe { libc::CPU_ISSET(*c, &set) })
        .collect()
}

/// Restricts this process (and the children it starts later) to `cpus`.
fn pin(cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in cpus {
        // SAFETY: CPU_SET writes inside `set`; `c` < CPU_SETSIZE.
        unsafe { libc::CPU_SET(*c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is this thread,
    // whose affinity new threads and processes inherit.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

fn latency(table: &mut Table, quick: bool, placement: &str) {
    let (mut raw_child, port) = start_raw();
    let mut raw = RawClient::connect(port);
    let (rpc_child, agent) = start_rpc();
    let mut out = Vec::new();
    for size in [8usize, 1024, 64 * 1024] {
        let payload = vec![7u8; size];
        let n = samples(quick, size);
        // The three are measured in interleaved rounds, so drift in the
        // machine (frequency, placement of threads on cores) hits all alike.
        let rounds = 10;
        let mut times: [Vec<Duration>; 3] = Default::default();
        for round in 0..=rounds {
            for (which, t) in times.iter_mut().enumerate() {
                for _ in 0..n / rounds {
                    let started = Instant::now();
                    match which {
                        0 => {
                            raw.send(&payload);
                            raw.recv(&mut out);
                        }
                        1 => assert_eq!(agent.rpc_sync(1, "echo", &payload).unwrap().len(), size),
                        _ => assert_eq!(agent.rpc_sync(1, "echo_inline", &payload).unwrap().len(), size),
                    }
                    // Round 0 warms up.
                    if round > 0 {
                        t.push(started.elapsed());
                    }
                }
            }
        }
        for t in times.iter_mut() {
            t.sort();
        }
        let [raw_times, ours, inline] = &times;
        let label = if size >= 1024 {
            format!("{} KiB", size / 1024)
        } else {
            format!("{size} B")
        };
        for (p, name) in [(0.5, "p50"), (0.99, "p99")] {
            table.row(
                &format!("round trip {label} {name}, {placement}"),
                percentile(raw_times, p),
                percentile(ours, p),
                "us",
            );
            table.row(
                &format!("round trip {label} {name}, {placement}, inline"),
                percentile(raw_times, p),
                percentile(inline, p),
                "us",
            );
        }
    }
    drop(raw);
    raw_child.kill().unwrap();
    raw_child.wait().unwrap();
    stop_rpc(rpc_child, agent);
}

fn pipelined(table: &mut Table, quick: bool) {
    let (mut raw_child, port) = start_raw();
    let (rpc_child, agent) = start_rpc();
    let payload = [3u8; 32];
    let total = if quick { 20_000 } else { 200_000 };
    for window in [1usize, 16, 128] {
        let mut raw = RawClient::connect(port);
        let mut out = Vec::new();
        let t = Instant::now();
        for _ in 0..window {
            raw.send(&payload);
        }
        for i in 0..total {
            raw.recv(&mut out);
            if i + window < total {
                raw.send(&payload);
            }
        }
        let raw_rate = total as f64 / t.elapsed().as_secs_f64();
        drop(raw);

        let rate = |function: &str| {
            let t = Instant::now();
            let mut in_flight: VecDeque<RpcFuture> =
                (0..window).map(|_| agent.rpc_async(1, function, &payload)).collect();
            for i in 0..total {
                in_flight.pop_front().unwrap().wait().unwrap();
                if i + window < total {
                    in_flight.push_back(agent.rpc_async(1, function, &payload));
                }
            }
            total as f64 / t.elapsed().as_secs_f64()
        };
        let ours = rate("echo");
        let inline = rate("echo_inline");
        table.row(&format!("32 B calls, {window} in flight"), raw_rate, ours, "calls/s");
        table.row(
            &format!("32 B calls, {window} in flight, inline"),
            raw_rate,
            inline,
            "calls/s",
        );
    }
    raw_child.kill().unwrap();
    raw_child.wait().unwrap();
    stop_rpc(rpc_child, agent);
}

fn bandwidth(table: &mut Table, quick: bool) {
    let (mut raw_child, port) = start_raw();
    let mut raw = RawClient::connect(port);
    let (rpc_child, agent) = start_rpc();
    let mut out = Vec::new();
    let sizes: &[usize] = if quick { &[1, 16, 64] } else { &[1, 16, 64, 256] };
    for &mib in sizes {
        let payload = vec![1u8; mib << 20];
        let reps = (256 / mib).clamp(2, 16);
        let best = |f: &mut dyn FnMut()| {
            f(); // warm up: page faults, socket buffers
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            (mib << 20) as f64 * reps as f64 / t.elapsed().as_secs_f64() / 1e9
        };
        let raw_gbs = best(&mut || {
            raw.send(&payload);
            raw.recv(&mut out);
        });
        let ours = best(&mut || {
            let reply = agent.rpc_sync(1, "echo", &payload).unwrap();
            assert_eq!(reply.len(), payload.len());
            // As the raw client reuses its buffer.
            rpcagent::recycle_buffer(reply);
        });
        table.row(&format!("{mib} MiB round trip"), raw_gbs, ours, "GB/s");
    }
    drop(raw);
    raw_child.kill().unwrap();
    raw_child.wait().unwrap();
    stop_rpc(rpc_child, agent);
}

// ---------- a world of 16 ----------

const WORLD: usize = 16;

fn world_rank() {
    let cfg = Config::from_env().unwrap();
    let started = Instant::now();
    let agent = RpcAgent::init(cfg).unwrap();
    let init_ms = started.elapsed().as_secs_f64() * 1e3;
    agent.register("echo", |a: &[u8]| Ok(a.to_vec())).unwrap();
    agent.start().unwrap();
    agent.barrier(Duration::from_secs(60)).unwrap();
    let per_peer: usize = std::env::var("CALLS_PER_PEER").unwrap().parse().unwrap();
    let me = agent.rank();
    let t = Instant::now();
    let mut in_flight = VecDeque::new();
    let mut calls = 0;
    for round in 0..per_peer {
        for dst in (0..WORLD).filter(|d| *d != me) {
            in_flight.push_back(agent.rpc_async(dst, "echo", &[round as u8; 32]));
            calls += 1;
            if in_flight.len() >= 64 {
                in_flight.pop_front().unwrap().wait().unwrap();
            }
        }
    }
    for f in in_flight {
        f.wait().unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    let threads = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().to_string()))
        .unwrap();
    agent.barrier(Duration::from_secs(120)).unwrap();
    println!("{init_ms} {calls} {secs} {threads}");
    agent.shutdown(true, Duration::from_secs(60)).unwrap();
}

fn world(table: &mut Table, quick: bool) {
    let port = free_port();
    let per_peer = if quick { 200 } else { 2000 };
    let children: Vec<Child> = (0..WORLD)
        .map(|r| {
            spawn(
                "world-rank",
                &[
                    ("RANK", r.to_string()),
                    ("WORLD_SIZE", WORLD.to_string()),
                    ("MASTER_PORT", port.to_string()),
                    ("CALLS_PER_PEER", per_peer.to_string()),
                ],
            )
        })
        .collect();
    let mut init_max: f64 = 0.0;
    let mut calls = 0usize;
    let mut slowest: f64 = 0.0;
    let mut threads_max = 0usize;
    for child in children {
        let out = child.wait_with_output().unwrap();
        let line = String::from_utf8(out.stdout).unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        init_max = init_max.max(f[0].parse().unwrap());
        calls += f[1].parse::<usize>().unwrap();
        slowest = slowest.max(f[2].parse().unwrap());
        threads_max = threads_max.max(f[3].parse().unwrap());
    }
    table.single("world of 16 processes: slowest init", init_max, "ms");
    table.single("world of 16: all-to-all 32 B calls", calls as f64 / slowest, "calls/s");
    table.single(
        &format!(
            "world of 16: threads per process (workers {})",
            rpcagent::DEFAULT_WORKER_THREADS
        ),
        threads_max as f64,
        "max",
    );
}
