//! `--only shm-ring`: what the same-host transport's rings cost between two
//! processes, the pipe alone without the RPC layer: 8-byte round trips
//! with a reader that spins for a while and then sleeps on its doorbell
//! (one CPU and any CPU), and 64 MiB round trips through rings of several
//! sizes against a single-threaded memcpy of the same bytes. The raw TCP
//! echo's figures for the same sizes are in the latency and bandwidth rows.

use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use rpcagent::fuzzing::ShmProbe;

use super::{Table, cpus, percentile, pin, spawn};

const WAIT: Duration = Duration::from_secs(10);

/// Writes all of `bytes`, waiting for room as needed.
fn write_all(p: &ShmProbe, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let n = p.write(bytes).unwrap();
        bytes = &bytes[n..];
        if n == 0 {
            p.wait_for_room(WAIT).unwrap();
        }
    }
}

/// Reads some bytes into `buf`, waiting (spin, then sleep) as needed; 0
/// once the peer left.
fn read_some(p: &ShmProbe, buf: &mut [u8], spin: Duration) -> usize {
    loop {
        match p.read(buf) {
            Ok(n) => return n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => p.wait(spin, WAIT).unwrap(),
            Err(e) => panic!("ring read: {e}"),
        }
    }
}

/// The echo side: takes the rings, sends back every byte, spinning
/// `RPCBENCH_SPIN_US` before it sleeps.
pub fn echo_rank() {
    let path = std::env::var("RPCBENCH_SHM_SOCKET").unwrap();
    let spin = Duration::from_micros(std::env::var("RPCBENCH_SPIN_US").unwrap().parse().unwrap());
    let pipe = ShmProbe::accept(UnixStream::connect(path).unwrap()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = read_some(&pipe, &mut buf, spin);
        if n == 0 {
            return;
        }
        write_all(&pipe, &buf[..n]);
    }
}

fn start_echo(ring: usize, spin: Duration) -> (std::process::Child, ShmProbe) {
    let path = std::env::temp_dir().join(format!("rpcbench-shm-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let child = spawn(
        "shm-echo",
        &[
            ("RPCBENCH_SHM_SOCKET", path.display().to_string()),
            ("RPCBENCH_SPIN_US", spin.as_micros().to_string()),
        ],
    );
    let (sock, _) = listener.accept().unwrap();
    let _ = std::fs::remove_file(&path);
    (child, ShmProbe::open(sock, ring).unwrap())
}

fn round_trips(table: &mut Table, quick: bool, placement: &str) {
    for spin_us in [0u64, 5, 50] {
        let spin = Duration::from_micros(spin_us);
        let (mut child, pipe) = start_echo(64 << 10, spin);
        let n = if quick { 2_000 } else { 50_000 };
        let mut times = Vec::with_capacity(n);
        let mut buf = [0u8; 8];
        for i in 0..n + n / 10 {
            let t = Instant::now();
            write_all(&pipe, &(i as u64).to_le_bytes());
            let mut got = 0;
            while got < 8 {
                got += read_some(&pipe, &mut buf[got..], spin);
            }
            assert_eq!(u64::from_le_bytes(buf), i as u64);
            if i >= n / 10 {
                times.push(t.elapsed());
            }
        }
        times.sort();
        drop(pipe);
        child.wait().unwrap();
        table.single(
            &format!("shm ring 8 B round trip p50, spin {spin_us} us, {placement}"),
            percentile(&times, 0.5),
            "us",
        );
        table.single(
            &format!("shm ring 8 B round trip p99, spin {spin_us} us, {placement}"),
            percentile(&times, 0.99),
            "us",
        );
    }
}

fn bandwidth(table: &mut Table, quick: bool) {
    let len = if quick { 4 << 20 } else { 64 << 20 };
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; len];
    // The memory system's own pace: one memcpy of the same bytes.
    let mut memcpy = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        back.copy_from_slice(&payload);
        memcpy.push(len as f64 / t.elapsed().as_secs_f64() / 1e9);
        std::hint::black_box(&back);
    }
    memcpy.sort_by(f64::total_cmp);
    table.single("memcpy, one thread", memcpy[2], "GB/s");
    for ring in [256usize << 10, 1 << 20, 4 << 20] {
        let spin = Duration::from_micros(50);
        let (mut child, pipe) = start_echo(ring, spin);
        let mut rates = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            // Write and read in turns: the echo sends back as it receives.
            let (mut sent, mut got) = (0, 0);
            while got < len {
                if sent < len {
                    let n = pipe.write(&payload[sent..]).unwrap();
                    sent += n;
                }
                match pipe.read(&mut back[got..]) {
                    Ok(0) => panic!("the echo left"),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if sent == len {
                            pipe.wait(spin, WAIT).unwrap();
                        }
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            rates.push(2.0 * len as f64 / t.elapsed().as_secs_f64() / 1e9);
            assert!(back == payload, "the echo changed the bytes");
        }
        rates.sort_by(f64::total_cmp);
        drop(pipe);
        child.wait().unwrap();
        table.single(
            &format!("shm ring {} MiB round trip, ring {} KiB", len >> 20, ring >> 10),
            rates[1],
            "GB/s",
        );
    }
}

pub fn shm_ring(table: &mut Table, quick: bool) {
    let all = cpus();
    pin(&[0]);
    round_trips(table, quick, "one CPU");
    pin(&all);
    round_trips(table, quick, "any CPU");
    bandwidth(table, quick);
    let _ = std::io::stdout().flush();
}
