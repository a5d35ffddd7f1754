//! Ranks on different hosts, without hosts: each rank runs in its own
//! network namespace with its own address, joined to the others by a veth
//! pair into a bridge that lives in a "switch" namespace of its own. The
//! ranks find their interface by themselves (the address that reaches the
//! master). Then one rank's cable is pulled: calls to it fail by their
//! deadline or by silent-peer detection, never hang. Ranks in separate
//! namespaces find they share no host and talk over TCP.
//!
//! Needs root and `ip` (iproute2), as CI has; otherwise it says it skipped.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::World;
use rpcagent::{Config, RpcAgent, Status};

const RANKS: usize = 3;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespaces and links of one test run; removed on drop.
struct Hosts {
    tag: String,
    subnet: u32,
}

impl Hosts {
    fn ns(&self, rank: usize) -> String {
        format!("{}-h{rank}", self.tag)
    }
    fn switch(&self) -> String {
        format!("{}-sw", self.tag)
    }
    /// The switch-side end of a rank's cable.
    fn port(&self, rank: usize) -> String {
        format!("{}p{rank}", self.tag)
    }
    fn addr(&self, rank: usize) -> String {
        format!("10.213.{}.{}", self.subnet, rank + 1)
    }

    fn create() -> Result<Hosts, String> {
        let pid = std::process::id();
        let hosts = Hosts {
            tag: format!("ra{}", pid % 100_000),
            subnet: pid % 250,
        };
        let sw = hosts.switch();
        ip(&["netns", "add", &sw])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for rank in 0..RANKS {
            let (ns, port) = (hosts.ns(rank), hosts.port(rank));
            let nic = format!("{}n{rank}", hosts.tag);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &nic, "netns", &ns, "type", "veth", "peer", "name", &port, "netns", &sw,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &port, "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", hosts.addr(rank)),
                "dev",
                &nic,
            ])?;
            ip(&["-n", &ns, "link", "set", &nic, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    /// Pulls the cable of `rank`.
    fn cut(&self, rank: usize) {
        ip(&["-n", &self.switch(), "link", "set", &self.port(rank), "down"]).unwrap();
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for rank in 0..RANKS {
            let _ = ip(&["netns", "del", &self.ns(rank)]);
        }
        let _ = ip(&["netns", "del", &self.switch()]);
    }
}

fn wait_for(path: &Path, limit: Duration) -> bool {
    let started = Instant::now();
    while !path.exists() {
        if started.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

#[test]
#[ignore = "one rank of a multi-process test; started by the other tests"]
fn rank_main() {
    let Ok(dir) = std::env::var("RPCAGENT_TEST_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let my_ip = std::env::var("RPCAGENT_TEST_IP").unwrap();
    let agent = RpcAgent::init(Config::from_env().unwrap()).unwrap();
    // Nobody said which interface: the rank found the one that reaches the master.
    assert!(
        agent.listen_addr().starts_with(&format!("{my_ip}:")),
        "listening on {} instead of {my_ip}",
        agent.listen_addr()
    );
    agent.register("echo", |a: &[u8]| Ok(a.to_vec())).unwrap();
    agent.start().unwrap();
    agent.barrier(Duration::from_secs(30)).unwrap();
    for dst in 0..agent.world_size() {
        let args = common::pattern(100_000, dst as u64);
        assert_eq!(agent.rpc_sync(dst, "echo", &args).unwrap(), args);
        // Another network namespace is another host: no shared memory
        // (unless the run asks for TCP everywhere, it is what `auto` found).
        let expected = if dst == agent.rank() { "self" } else { "tcp" };
        assert_eq!(agent.peer_transport(dst), Some(expected), "rank {dst}");
    }
    agent.barrier(Duration::from_secs(30)).unwrap();
    match agent.rank() {
        0 => {
            std::fs::write(dir.join("ready"), b"").unwrap();
            assert!(wait_for(&dir.join("cut"), Duration::from_secs(30)));
            let cut_at = Instant::now();
            // A call with a deadline fails by it.
            let err = agent
                .rpc_sync_timeout(2, "echo", b"x", Some(Duration::from_secs(2)))
                .unwrap_err();
            let took = cut_at.elapsed();
            assert!(matches!(err.status(), Status::Timeout | Status::PeerLost), "{err}");
            assert!(took < Duration::from_millis(2100), "the deadline fired after {took:?}");
            // A call without one fails when the silence is noticed.
            let err = agent.rpc_sync_timeout(2, "echo", b"x", None).unwrap_err();
            let detected = cut_at.elapsed();
            assert_eq!(err.status(), Status::PeerLost, "{err}");
            assert!(
                detected < Duration::from_secs(15),
                "the cut was noticed after {detected:?}"
            );
            eprintln!(
                "figure: cut link: a 2 s deadline fired after {} ms; the silent peer was declared lost {} ms \
                 after the cut (peer timeout 3 s)",
                took.as_millis(),
                detected.as_millis()
            );
            // The rest of the world is unaffected.
            assert_eq!(agent.rpc_sync(1, "echo", b"still here").unwrap(), b"still here");
            std::fs::write(dir.join("done"), b"").unwrap();
        }
        1 => assert!(wait_for(&dir.join("done"), Duration::from_secs(60))),
        _ => assert!(wait_for(&dir.join("done"), Duration::from_secs(60))),
    }
    agent.shutdown(false, Duration::from_secs(5)).unwrap();
}

#[test]
fn ranks_on_three_hosts_and_a_pulled_cable() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let hosts = match (root, Command::new("ip").arg("-V").output()) {
        (true, Ok(_)) => Hosts::create(),
        _ => Err("needs root and iproute2".into()),
    };
    let hosts = match hosts {
        Ok(h) => h,
        Err(why) => {
            eprintln!("SKIPPED ranks_on_three_hosts_and_a_pulled_cable: cannot make network namespaces ({why})");
            return;
        }
    };
    let dir = std::env::temp_dir().join(format!("rpcagent-netns-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    let namespaces: Vec<(String, String)> = (0..RANKS).map(|r| (hosts.ns(r), hosts.addr(r))).collect();
    let watcher_dir = dir.clone();
    let cutter = std::thread::spawn(move || {
        if wait_for(&watcher_dir.join("ready"), Duration::from_secs(60)) {
            Some(Instant::now())
        } else {
            None
        }
    });
    let world = World::new("hosts", RANKS, Duration::from_secs(120))
        .env(&[
            ("MASTER_ADDR", &hosts.addr(0)),
            ("RPCAGENT_TEST_DIR", dir.to_str().unwrap()),
            ("RPCAGENT_PEER_TIMEOUT_MS", "3000"),
        ])
        .wrap(move |rank| {
            let (ns, addr) = &namespaces[rank];
            ["ip", "netns", "exec", ns, "env", &format!("RPCAGENT_TEST_IP={addr}")]
                .map(String::from)
                .to_vec()
        });
    let running = std::thread::spawn(move || world.run());
    if cutter.join().unwrap().is_some() {
        hosts.cut(2);
        std::fs::write(dir.join("cut"), b"").unwrap();
    }
    running.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
