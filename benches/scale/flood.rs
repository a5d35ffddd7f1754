//! A fast caller and a slow server: 4,000 async calls of 1 MiB to a
//! handler that takes 10 ms, issued as fast as the caller can. Both sides
//! run in processes of their own and report their peak RSS (`VmHWM`); the
//! send window (64 MiB by default) bounds the caller, the server's full
//! pool backlog stops it reading.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use rpcagent::{Config, DEFAULT_SEND_WINDOW_BYTES, RpcAgent};

use super::{Table, free_port, spawn};

const CALLS: usize = 4000;
const SIZE: usize = 1 << 20;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

/// Rank 0 (the caller) or rank 1 (the server) of the flood's world.
pub fn flood_rank() {
    let agent = RpcAgent::init(Config::from_env().unwrap()).unwrap();
    agent
        .register("slow", |_: &[u8]| {
            std::thread::sleep(Duration::from_millis(10));
            Ok(vec![1])
        })
        .unwrap();
    agent.start().unwrap();
    if agent.rank() == 0 {
        let args = vec![7u8; SIZE];
        let started = Instant::now();
        let futures: Vec<_> = (0..CALLS)
            .map(|_| agent.rpc_async_timeout(1, "slow", &args, Some(Duration::from_secs(600))))
            .collect();
        for f in futures {
            f.wait().unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        println!("{} {secs}", peak_rss_mib());
    }
    agent.barrier(Duration::from_secs(600)).unwrap();
    if agent.rank() == 1 {
        println!("{}", peak_rss_mib());
    }
    agent.shutdown(true, Duration::from_secs(60)).unwrap();
}

pub fn flood(table: &mut Table) {
    let port = free_port();
    let mut children: Vec<_> = (0..2)
        .map(|r| {
            spawn(
                "flood-rank",
                &[
                    ("RANK", r.to_string()),
                    ("WORLD_SIZE", "2".to_string()),
                    ("MASTER_PORT", port.to_string()),
                ],
            )
        })
        .collect();
    let mut lines = Vec::new();
    for c in &mut children {
        let mut line = String::new();
        BufReader::new(c.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        lines.push(
            line.split_whitespace()
                .map(|v| v.parse::<f64>().unwrap())
                .collect::<Vec<_>>(),
        );
    }
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let window_mib = (DEFAULT_SEND_WINDOW_BYTES >> 20) as f64;
    table.single(
        &format!("flood 4000 x 1 MiB, 10 ms handler: caller peak RSS (window {window_mib} MiB)"),
        lines[0][0],
        "MiB",
    );
    table.single("flood: server peak RSS", lines[1][0], "MiB");
    table.single("flood: calls/s", CALLS as f64 / lines[0][1], "calls/s");
}
