//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `n` bytes of a pattern that differs with `seed`, so a misrouted or
/// shifted payload never compares equal.
pub fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub const SIZES: [usize; 5] = [0, 1, 1024, 1 << 20, 64 << 20];

/// Resident memory of process `pid`, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap()
}

/// The number of threads of this process.
pub fn thread_count() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// In a rank process started by [`World::run`]: its scenario's name and the
/// agent it joined the world with. `None` in the test harness itself.
pub fn rank_process() -> Option<(String, rpcagent::RpcAgent)> {
    let scenario = rank_scenario()?;
    let config = rpcagent::Config::from_env().unwrap();
    Some((scenario, rpcagent::RpcAgent::init(config).unwrap()))
}

/// In a rank process: its scenario's name (before it joins the world).
pub fn rank_scenario() -> Option<String> {
    std::env::var("RPCAGENT_TEST_SCENARIO").ok()
}

/// Runs `scenario` as a world of `n` separate processes: this test binary
/// re-executed once per rank (running its ignored `rank_main` test), with
/// the launcher variables torchrun would set. Fails unless every rank exits
/// successfully within `limit`.
pub fn run_world(scenario: &str, n: usize, limit: Duration, extra_env: &[(&str, &str)]) {
    World::new(scenario, n, limit).env(extra_env).run();
}

/// A world of rank processes with more say over how they run.
pub struct World {
    scenario: String,
    n: usize,
    limit: Duration,
    env: Vec<(String, String)>,
    /// A command prefix per rank (e.g. `ip netns exec ns1`).
    wrap: Option<Box<dyn Fn(usize) -> Vec<String> + Send>>,
    /// Ranks expected to die by SIGKILL.
    killed: Vec<usize>,
}

impl World {
    pub fn new(scenario: &str, n: usize, limit: Duration) -> World {
        World {
            scenario: scenario.into(),
            n,
            limit,
            env: Vec::new(),
            wrap: None,
            killed: Vec::new(),
        }
    }

    pub fn env(mut self, vars: &[(&str, &str)]) -> World {
        self.env
            .extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    pub fn wrap(mut self, wrap: impl Fn(usize) -> Vec<String> + Send + 'static) -> World {
        self.wrap = Some(Box::new(wrap));
        self
    }

    pub fn killed(mut self, ranks: &[usize]) -> World {
        self.killed = ranks.to_vec();
        self
    }

    pub fn run(self) {
        let World {
            scenario,
            n,
            limit,
            env,
            wrap,
            killed,
        } = self;
        let port = free_port().to_string();
        let exe = std::env::current_exe().unwrap();
        let children: Vec<Child> = (0..n)
            .map(|rank| {
                let mut argv: Vec<String> = wrap.as_ref().map(|w| w(rank)).unwrap_or_default();
                argv.push(exe.to_string_lossy().into_owned());
                argv.extend(["--exact", "rank_main", "--ignored", "--nocapture", "--test-threads=1"].map(String::from));
                let mut cmd = Command::new(&argv[0]);
                cmd.args(&argv[1..])
                    .env("RPCAGENT_TEST_SCENARIO", &scenario)
                    .env("RANK", rank.to_string())
                    .env("WORLD_SIZE", n.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", &port)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                for (k, v) in &env {
                    cmd.env(k, v);
                }
                cmd.spawn().unwrap()
            })
            .collect();
        finish(&scenario, children, limit, &killed);
    }
}

fn finish(scenario: &str, children: Vec<Child>, limit: Duration, killed: &[usize]) {
    let started = Instant::now();
    let mut running: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    let mut outcomes = Vec::new();
    // Once a rank fails, the others get a short grace period, not the whole limit.
    let mut give_up_at = started + limit;
    while running.iter().any(Option::is_some) {
        for (rank, slot) in running.iter_mut().enumerate() {
            let Some(child) = slot.as_mut() else { continue };
            let done = child.try_wait().unwrap();
            if done.is_none() && Instant::now() < give_up_at {
                continue;
            }
            let mut child = slot.take().unwrap();
            if done.is_none() {
                let _ = child.kill();
            }
            let out = child.wait_with_output().unwrap();
            let ok = done.is_some_and(|s| {
                use std::os::unix::process::ExitStatusExt;
                if killed.contains(&rank) {
                    s.signal() == Some(libc::SIGKILL)
                } else {
                    s.success()
                }
            });
            if !ok {
                give_up_at = give_up_at.min(Instant::now() + Duration::from_secs(3));
            }
            outcomes.push((rank, ok, out));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    outcomes.sort_by_key(|o| o.0);
    // Measurements the scenarios report, for the issue notes.
    for (rank, _, out) in &outcomes {
        for line in String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.starts_with("figure:"))
        {
            println!("[{scenario} rank {rank}] {line}");
        }
    }
    let mut failed = false;
    for (rank, ok, out) in &outcomes {
        if !ok {
            failed = true;
            eprintln!(
                "---- rank {rank} of '{scenario}' failed ----\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert!(!failed, "scenario '{scenario}' failed (after {:?})", started.elapsed());
}

mod port;
pub mod scenarios;
pub use port::free_port;
