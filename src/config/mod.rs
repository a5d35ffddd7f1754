//! How an agent is configured: a builder, and the launcher environment
//! variables (torchrun, Open MPI, MPICH/Hydra, Slurm) that fill it.

use std::time::Duration;

use crate::error::{Result, RpcError};

mod slurm;
use slurm::{Hostlist, step_port};

/// Default master port, as torch uses.
pub const DEFAULT_MASTER_PORT: u16 = 29500;
/// Default call deadline.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time allowed for the whole world to join.
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default size of the handler worker pool.
pub const DEFAULT_WORKER_THREADS: usize = 16;
/// Default largest message (arguments or reply), 1 GiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: u64 = 1 << 30;
/// Default time after which a silent peer (host gone, link cut) is lost.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(20);
/// Default send window: request bytes held in memory per destination.
pub const DEFAULT_SEND_WINDOW_BYTES: u64 = 64 << 20;
/// The smallest send window accepted.
pub const MIN_SEND_WINDOW_BYTES: u64 = 1 << 20;
/// Default time a waiting caller looks for its reply before it sleeps.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);
/// The longest spin accepted.
pub const MAX_SPIN: Duration = Duration::from_secs(1);
/// The smallest size the shared-memory rings get by default (with 34 or
/// more ranks on a host); see [`default_ring_bytes`].
pub const DEFAULT_SHM_RING_BYTES: usize = 128 << 10;
/// The largest size the rings get by default (with up to 9 ranks on a host).
pub const DEFAULT_SHM_RING_BYTES_MAX: usize = 1 << 20;
/// What the default rings of one rank's connections to each other rank on
/// its host come to, per ring: 8 MiB over the other ranks.
const RING_BUDGET_BYTES: usize = 8 << 20;
/// The smallest ring size accepted (powers of two only).
pub const MIN_SHM_RING_BYTES: usize = 4096;
/// The largest ring size accepted.
pub const MAX_SHM_RING_BYTES: usize = 1 << 30;
/// The transport names `Config::transport` and `RPCAGENT_TRANSPORT` accept.
pub const TRANSPORT_NAMES: [&str; 2] = ["auto", "tcp"];
/// Longest function or worker name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// Settings of one rank. Built with [`Config::new`] and the builder methods,
/// or read from the launcher's environment with [`Config::from_env`].
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    pub(crate) rank: usize,
    pub(crate) world_size: usize,
    pub(crate) name: Option<String>,
    pub(crate) master_host: String,
    pub(crate) master_port: u16,
    pub(crate) bind: Option<String>,
    /// `Duration::ZERO` means calls have no deadline by default.
    pub(crate) call_timeout: Duration,
    pub(crate) init_timeout: Duration,
    pub(crate) worker_threads: usize,
    pub(crate) max_message_bytes: u64,
    pub(crate) secret: Option<Vec<u8>>,
    pub(crate) peer_timeout: Duration,
    pub(crate) send_window_bytes: u64,
    /// One of [`TRANSPORT_NAMES`] (checked by `validate`).
    pub(crate) transport: String,
    /// How long a waiting thread looks before it sleeps (see `Config::spin`).
    pub(crate) spin: Duration,
    /// The size of each ring of a same-host pair (checked by `validate`);
    /// `None`: chosen by the number of ranks on the host
    /// ([`default_ring_bytes`]).
    pub(crate) shm_ring_bytes: Option<usize>,
}

impl std::fmt::Debug for Config {
    // Hand-written so the secret never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("name", &self.worker_name())
            .field("master", &format_args!("{}:{}", self.master_host, self.master_port))
            .field("bind", &self.bind)
            .field("call_timeout", &self.call_timeout)
            .field("init_timeout", &self.init_timeout)
            .field("worker_threads", &self.worker_threads)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("peer_timeout", &self.peer_timeout)
            .field("send_window_bytes", &self.send_window_bytes)
            .field("transport", &self.transport)
            .field("spin", &self.spin)
            .field("shm_ring_bytes", &self.shm_ring_bytes)
            .finish()
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::new(0, 1)
    }
}

impl Config {
    /// A configuration for `rank` of a world of `world_size` ranks, with every
    /// other setting at its default.
    pub fn new(rank: usize, world_size: usize) -> Config {
        Config {
            rank,
            world_size,
            name: None,
            master_host: "127.0.0.1".to_string(),
            master_port: DEFAULT_MASTER_PORT,
            bind: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            init_timeout: DEFAULT_INIT_TIMEOUT,
            worker_threads: DEFAULT_WORKER_THREADS,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            secret: None,
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            send_window_bytes: DEFAULT_SEND_WINDOW_BYTES,
            transport: "auto".to_string(),
            spin: DEFAULT_SPIN,
            shm_ring_bytes: None,
        }
    }

    /// Reads the launcher's environment (see the C API page for the list of
    /// variables, first found wins). A malformed value is an
    /// [`RpcError::InvalidArgument`] naming the variable.
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|key| std::env::var_os(key).map(|v| v.to_string_lossy().into_owned()))
    }

    /// Like [`Config::from_env`], over any source of variables.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let mut cfg = Config::new(0, 1);
        cfg.apply_lookup(lookup)?;
        Ok(cfg)
    }

    /// Overwrites the settings whose variables are present; keeps the others.
    pub(crate) fn apply_lookup(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<()> {
        let first = |keys: &[&'static str]| -> Option<(&'static str, String)> {
            keys.iter().find_map(|k| lookup(k).map(|v| (*k, v.trim().to_string())))
        };
        if let Some((key, v)) = first(&[
            "RPCAGENT_RANK",
            "RANK",
            "OMPI_COMM_WORLD_RANK",
            "PMI_RANK",
            "SLURM_PROCID",
        ]) {
            self.rank = parse_number(key, &v)?;
        }
        if let Some((key, v)) = first(&[
            "RPCAGENT_WORLD_SIZE",
            "WORLD_SIZE",
            "OMPI_COMM_WORLD_SIZE",
            "PMI_SIZE",
            "SLURM_NTASKS",
        ]) {
            self.world_size = parse_number(key, &v)?;
            if self.world_size == 0 {
                return Err(bad_var(key, &v, "must be at least 1"));
            }
        }
        if let Some((key, v)) = first(&["RPCAGENT_MASTER_ADDR", "MASTER_ADDR"]) {
            if v.is_empty() {
                return Err(bad_var(key, &v, "is empty"));
            }
            self.master_host = v;
        } else if let Some((key, v)) = first(&["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"]) {
            // Under srun, rank 0 runs on the step's first host.
            self.master_host = Hostlist::parse(&v).map_err(|why| bad_var(key, &v, &why))?.first();
        }
        if let Some((key, v)) = first(&["RPCAGENT_MASTER_PORT", "MASTER_PORT"]) {
            self.master_port = parse_number(key, &v)?;
        } else if let Some((key, v)) = first(&["SLURM_JOB_ID", "SLURM_JOBID"]) {
            let job: u64 = parse_number(key, &v)?;
            let step: u64 = match first(&["SLURM_STEP_ID", "SLURM_STEPID"]) {
                Some((key, v)) => parse_number(key, &v)?,
                None => 0,
            };
            self.master_port = step_port(job, step);
        }
        if let Some((key, v)) = first(&["RPCAGENT_NAME"]) {
            check_name(&v).map_err(|why| bad_var(key, &v, &why))?;
            self.name = Some(v);
        }
        if let Some((_, v)) = first(&["RPCAGENT_SECRET"]) {
            self.secret = (!v.is_empty()).then(|| v.into_bytes());
        }
        if let Some((key, v)) = first(&["RPCAGENT_CALL_TIMEOUT_MS"]) {
            self.call_timeout = Duration::from_millis(parse_number(key, &v)?);
        }
        if let Some((key, v)) = first(&["RPCAGENT_INIT_TIMEOUT_MS"]) {
            self.init_timeout = Duration::from_millis(parse_number(key, &v)?);
        }
        if let Some((key, v)) = first(&["RPCAGENT_WORKER_THREADS"]) {
            self.worker_threads = parse_number(key, &v)?;
            if self.worker_threads == 0 {
                return Err(bad_var(key, &v, "must be at least 1"));
            }
        }
        if let Some((key, v)) = first(&["RPCAGENT_MAX_MESSAGE_BYTES"]) {
            self.max_message_bytes = parse_number(key, &v)?;
            if self.max_message_bytes == 0 {
                return Err(bad_var(key, &v, "must be at least 1"));
            }
        }
        if let Some((key, v)) = first(&["RPCAGENT_PEER_TIMEOUT_MS"]) {
            self.peer_timeout = Duration::from_millis(parse_number(key, &v)?);
            if self.peer_timeout < Duration::from_secs(1) {
                return Err(bad_var(key, &v, "must be at least 1000"));
            }
        }
        if let Some((key, v)) = first(&["RPCAGENT_SEND_WINDOW_BYTES"]) {
            self.send_window_bytes = parse_number(key, &v)?;
            if self.send_window_bytes < MIN_SEND_WINDOW_BYTES {
                return Err(bad_var(key, &v, &format!("must be at least {MIN_SEND_WINDOW_BYTES}")));
            }
        }
        if let Some((key, v)) = first(&["RPCAGENT_TRANSPORT"]) {
            if !TRANSPORT_NAMES.contains(&v.as_str()) {
                return Err(bad_var(key, &v, "must be 'auto' or 'tcp'"));
            }
            self.transport = v;
        }
        if let Some((key, v)) = first(&["RPCAGENT_SPIN_US"]) {
            self.spin = Duration::from_micros(parse_number(key, &v)?);
            if self.spin > MAX_SPIN {
                return Err(bad_var(key, &v, "must be at most 1000000"));
            }
        }
        if let Some((key, v)) = first(&["RPCAGENT_SHM_RING_BYTES"]) {
            let bytes = parse_number(key, &v)?;
            if let Err(why) = check_ring_bytes(bytes) {
                return Err(bad_var(key, &v, &why));
            }
            self.shm_ring_bytes = Some(bytes);
        }
        if let Some((key, v)) = first(&["RPCAGENT_BIND"]) {
            if v.is_empty() {
                return Err(bad_var(key, &v, "is empty"));
            }
            self.bind = Some(v);
        }
        Ok(())
    }

    /// This rank's worker name: the one set, or `worker<rank>`.
    pub fn worker_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| format!("worker{}", self.rank))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn set_rank(&mut self, rank: usize) {
        self.rank = rank;
    }

    pub fn set_world_size(&mut self, world_size: usize) {
        self.world_size = world_size;
    }

    /// The worker name other ranks can look up with `rank_of`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Where rank 0 hosts the rendezvous.
    pub fn master(mut self, host: impl Into<String>, port: u16) -> Self {
        self.master_host = host.into();
        self.master_port = port;
        self
    }

    /// The local address to listen on (default: the one that reaches the master).
    pub fn bind(mut self, host: impl Into<String>) -> Self {
        self.bind = Some(host.into());
        self
    }

    /// The default deadline of a call; `Duration::ZERO` means none.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// How long `init` waits for the whole world to join.
    pub fn init_timeout(mut self, timeout: Duration) -> Self {
        self.init_timeout = timeout;
        self
    }

    /// Size of the bounded pool that runs handlers.
    pub fn worker_threads(mut self, n: usize) -> Self {
        self.worker_threads = n;
        self
    }

    /// Largest arguments or reply, in bytes; a world-wide setting.
    pub fn max_message_bytes(mut self, n: u64) -> Self {
        self.max_message_bytes = n;
        self
    }

    /// How long a peer may stay silent (no TCP acknowledgement: host gone,
    /// link cut) before it is lost and its calls fail; at least 1 s, applied
    /// in whole seconds, at least 3.
    pub fn peer_timeout(mut self, timeout: Duration) -> Self {
        self.peer_timeout = timeout;
        self
    }

    /// The request bytes this rank may hold in its own memory for one
    /// destination (copied from callers, not yet taken by the kernel); at
    /// least 1 MiB. A call that finds no room waits for it, up to its
    /// deadline; one made on a library thread that must not block fails
    /// with [`RpcError::Busy`]. One call larger than the window is let
    /// through alone.
    pub fn send_window_bytes(mut self, bytes: u64) -> Self {
        self.send_window_bytes = bytes;
        self
    }

    /// How calls to other ranks travel: `"auto"` (the default) or `"tcp"`.
    /// Under `"auto"` ranks on this host (same kernel and network
    /// namespace) talk through shared memory, falling back to TCP by
    /// themselves where they cannot; under either, calls to this rank
    /// itself never touch a socket. Another name
    /// makes `init` fail with [`RpcError::InvalidArgument`].
    pub fn transport(mut self, name: &str) -> Self {
        self.transport = name.to_string();
        self
    }

    /// How long a caller waiting for its reply looks for it (yielding the
    /// CPU between looks) before it sleeps in the kernel; between ranks on
    /// one host, also how long the I/O loop, a responder, or a writer
    /// facing a full ring looks before sleeping. At most 1 s, default 50 us.
    /// Longer spins trade CPU for latency when replies come within
    /// microseconds; 0 sleeps at once.
    pub fn spin(mut self, spin: Duration) -> Self {
        self.spin = spin;
        self
    }

    /// The size of each of the two rings a pair of ranks on one host talks
    /// through: a power of two from 4 KiB to 1 GiB. By default it depends
    /// on how many ranks share the host: 1 MiB with up to 9, halving as
    /// they grow, 128 KiB from 34 on (see [`default_ring_bytes`]). A pair
    /// maps two rings per direction it calls in (four when both call the
    /// other).
    pub fn shm_ring_bytes(mut self, bytes: usize) -> Self {
        self.shm_ring_bytes = Some(bytes);
        self
    }

    /// The job's shared secret; every connection must prove it knows it.
    pub fn secret(mut self, key: &[u8]) -> Self {
        self.secret = (!key.is_empty()).then(|| key.to_vec());
        self
    }

    /// Checks the settings that do not depend on the network.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(RpcError::InvalidArgument(m));
        if self.world_size == 0 {
            return bad("world size must be at least 1".into());
        }
        if self.rank >= self.world_size {
            return bad(format!(
                "rank {} is out of range for a world of {}",
                self.rank, self.world_size
            ));
        }
        if self.worker_threads == 0 {
            return bad("worker threads must be at least 1".into());
        }
        if self.max_message_bytes == 0 {
            return bad("max message bytes must be at least 1".into());
        }
        if self.peer_timeout < Duration::from_secs(1) {
            return bad("peer timeout must be at least 1 s".into());
        }
        if self.send_window_bytes < MIN_SEND_WINDOW_BYTES {
            return bad(format!("send window must be at least {MIN_SEND_WINDOW_BYTES} bytes"));
        }
        if self.spin > MAX_SPIN {
            return bad("spin must be at most 1 s".into());
        }
        if !TRANSPORT_NAMES.contains(&self.transport.as_str()) {
            return bad(format!("unknown transport '{}' (auto, tcp)", self.transport));
        }
        if let Some(Err(why)) = self.shm_ring_bytes.map(check_ring_bytes) {
            return bad(format!("shared-memory ring size {}", why));
        }
        if self.master_host.is_empty() {
            return bad("master host is empty".into());
        }
        check_name(&self.worker_name()).map_err(|why| RpcError::InvalidArgument(format!("worker name {why}")))?;
        Ok(())
    }
}

/// The ring size a rank offers when none is set, given how many ranks
/// (itself included) share its host. Large rings let a large transfer's
/// two copies overlap (a 64 MiB round trip with the zero-copy forms, in
/// one run here: 0.96x of a memcpy through 1 MiB rings, 0.56x through 128
/// KiB rings); the total stays bounded: 8 MiB over the other ranks per
/// ring, a power of two from 128 KiB (from 34 ranks on) to 1 MiB (up to
/// 9), so all-to-all among 64 ranks maps about 1 GiB in all, and among 8
/// about 112 MiB.
pub(crate) fn default_ring_bytes(ranks_on_host: usize) -> usize {
    let share = (RING_BUDGET_BYTES / ranks_on_host.saturating_sub(1).max(1)).max(1);
    // The largest power of two not above the share, within the bounds.
    let pow2 = 1usize << (usize::BITS - 1 - share.leading_zeros());
    pow2.clamp(DEFAULT_SHM_RING_BYTES, DEFAULT_SHM_RING_BYTES_MAX)
}

/// A ring size is a power of two within the bounds.
pub(crate) fn check_ring_bytes(bytes: usize) -> std::result::Result<(), String> {
    if (MIN_SHM_RING_BYTES..=MAX_SHM_RING_BYTES).contains(&bytes) && bytes.is_power_of_two() {
        Ok(())
    } else {
        Err(format!(
            "must be a power of two from {MIN_SHM_RING_BYTES} to {MAX_SHM_RING_BYTES}"
        ))
    }
}

/// Names (of functions and workers) are 1 to 255 bytes; Rust strings are UTF-8 already.
pub(crate) fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        Err("is empty".into())
    } else if name.len() > MAX_NAME_BYTES {
        Err(format!("is {} bytes long, more than {MAX_NAME_BYTES}", name.len()))
    } else {
        Ok(())
    }
}

fn parse_number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T> {
    value.parse().map_err(|_| bad_var(key, value, "is not a valid number"))
}

fn bad_var(key: &str, value: &str, why: &str) -> RpcError {
    RpcError::InvalidArgument(format!("environment variable {key}={value:?} {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn default_rings_shrink_as_ranks_share_a_host() {
        for (ranks, kib) in [
            (1, 1024),
            (2, 1024),
            (9, 1024),
            (10, 512),
            (17, 512),
            (18, 256),
            (33, 256),
            (34, 128),
            (64, 128),
            (1000, 128),
            (0, 1024),
            (usize::MAX, 128),
        ] {
            assert_eq!(default_ring_bytes(ranks), kib << 10, "{ranks} ranks");
        }
        // All-to-all among 64 ranks: 64 x 63 connections of two rings.
        assert!(64 * 63 * 2 * default_ring_bytes(64) <= 1 << 30);
    }

    fn from(vars: &[(&str, &str)]) -> Result<Config> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_without_variables() {
        let cfg = from(&[]).unwrap();
        assert_eq!(cfg, Config::new(0, 1));
        assert_eq!(cfg.master_port, 29500);
        assert_eq!(cfg.call_timeout, Duration::from_secs(60));
        assert_eq!(cfg.init_timeout, Duration::from_secs(300));
        assert_eq!(cfg.worker_threads, 16);
        assert_eq!(cfg.max_message_bytes, 1 << 30);
        assert_eq!(cfg.send_window_bytes, 64 << 20);
        assert_eq!(cfg.worker_name(), "worker0");
    }

    #[test]
    fn launcher_variables_in_priority_order() {
        let cfg = from(&[("OMPI_COMM_WORLD_RANK", "3"), ("OMPI_COMM_WORLD_SIZE", "8")]).unwrap();
        assert_eq!((cfg.rank, cfg.world_size), (3, 8));
        let cfg = from(&[
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "4"),
            ("PMI_RANK", "1"),
            ("PMI_SIZE", "5"),
        ])
        .unwrap();
        assert_eq!((cfg.rank, cfg.world_size), (1, 5));
        let cfg = from(&[("RANK", "1"), ("RPCAGENT_RANK", "0"), ("WORLD_SIZE", "2")]).unwrap();
        assert_eq!((cfg.rank, cfg.world_size), (0, 2));
        let cfg = from(&[("MASTER_ADDR", "10.1.2.3"), ("MASTER_PORT", "1234")]).unwrap();
        assert_eq!((cfg.master_host.as_str(), cfg.master_port), ("10.1.2.3", 1234));
        let cfg = from(&[("MASTER_ADDR", "a"), ("RPCAGENT_MASTER_ADDR", "b")]).unwrap();
        assert_eq!(cfg.master_host, "b");
    }

    #[test]
    fn rpcagent_variables() {
        let cfg = from(&[
            ("RPCAGENT_NAME", "ps"),
            ("RPCAGENT_SECRET", "s3cret"),
            ("RPCAGENT_CALL_TIMEOUT_MS", "1500"),
            ("RPCAGENT_INIT_TIMEOUT_MS", "2500"),
            ("RPCAGENT_WORKER_THREADS", "3"),
            ("RPCAGENT_MAX_MESSAGE_BYTES", "4096"),
            ("RPCAGENT_BIND", "127.0.0.2"),
            ("RPCAGENT_PEER_TIMEOUT_MS", "4000"),
            ("RPCAGENT_SEND_WINDOW_BYTES", "2097152"),
            ("RPCAGENT_TRANSPORT", "tcp"),
            ("RPCAGENT_SPIN_US", "7"),
        ])
        .unwrap();
        assert_eq!(cfg.worker_name(), "ps");
        assert_eq!(cfg.secret.as_deref(), Some(&b"s3cret"[..]));
        assert_eq!(cfg.call_timeout, Duration::from_millis(1500));
        assert_eq!(cfg.init_timeout, Duration::from_millis(2500));
        assert_eq!(cfg.worker_threads, 3);
        assert_eq!(cfg.max_message_bytes, 4096);
        assert_eq!(cfg.bind.as_deref(), Some("127.0.0.2"));
        assert_eq!(cfg.peer_timeout, Duration::from_secs(4));
        assert_eq!(cfg.send_window_bytes, 2 << 20);
        assert_eq!(cfg.transport, "tcp");
        assert_eq!(cfg.spin, Duration::from_micros(7));
        assert!(!format!("{cfg:?}").contains("s3cret"));
    }

    #[test]
    fn malformed_values_name_the_variable() {
        for (key, value) in [
            ("RANK", "x"),
            ("RPCAGENT_TRANSPORT", "shm"),
            ("RPCAGENT_SPIN_US", "2000000"),
            ("WORLD_SIZE", "0"),
            ("MASTER_PORT", "70000"),
            ("RPCAGENT_CALL_TIMEOUT_MS", "-5"),
            ("RPCAGENT_WORKER_THREADS", "0"),
            ("RPCAGENT_MAX_MESSAGE_BYTES", "lots"),
            ("RPCAGENT_NAME", ""),
            ("RPCAGENT_PEER_TIMEOUT_MS", "10"),
            ("RPCAGENT_SEND_WINDOW_BYTES", "1000"),
        ] {
            let err = from(&[(key, value)]).unwrap_err();
            assert_eq!(err.status(), crate::Status::InvalidArgument);
            assert!(err.to_string().contains(key), "{err} should name {key}");
        }
    }

    #[test]
    fn slurm_steps_need_no_master_variables() {
        let step = [
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_STEP_NODELIST", "gpu[07-08],cpu3"),
            ("SLURM_JOB_NODELIST", "gpu[01-08],cpu3"),
            ("SLURM_JOB_ID", "4321"),
            ("SLURM_STEP_ID", "1"),
        ];
        let cfg = from(&step).unwrap();
        assert_eq!((cfg.rank, cfg.world_size), (3, 4));
        assert_eq!((cfg.master_host.as_str(), cfg.master_port), ("gpu07", 15000 + 3210 + 1));

        // The job's list serves when the step's is missing (inside sbatch).
        let cfg = from(&[("SLURM_JOB_NODELIST", "n[001-004]"), ("SLURM_JOBID", "17")]).unwrap();
        assert_eq!((cfg.master_host.as_str(), cfg.master_port), ("n001", 15170));

        // What the user sets wins, and without Slurm nothing changes.
        let mut set = step.to_vec();
        set.extend([("MASTER_ADDR", "head"), ("MASTER_PORT", "29501")]);
        let cfg = from(&set).unwrap();
        assert_eq!((cfg.master_host.as_str(), cfg.master_port), ("head", 29501));
        let cfg = from(&[("RANK", "1"), ("WORLD_SIZE", "2")]).unwrap();
        assert_eq!(
            (cfg.master_host.as_str(), cfg.master_port),
            ("127.0.0.1", DEFAULT_MASTER_PORT)
        );
    }

    #[test]
    fn malformed_slurm_variables_name_the_variable() {
        for (key, value) in [
            ("SLURM_STEP_NODELIST", "gpu[01-04"),
            ("SLURM_STEP_NODELIST", "gpu[04-01]"),
            ("SLURM_STEP_NODELIST", ""),
            ("SLURM_JOB_NODELIST", "a,,b"),
            ("SLURM_JOB_ID", "12x"),
        ] {
            let err = from(&[(key, value), ("SLURM_STEP_ID", "0")]).unwrap_err();
            assert_eq!(err.status(), crate::Status::InvalidArgument);
            assert!(err.to_string().contains(key), "{err} should name {key}");
        }
        let err = from(&[("SLURM_JOB_ID", "12"), ("SLURM_STEP_ID", "batch")]).unwrap_err();
        assert!(err.to_string().contains("SLURM_STEP_ID"), "{err}");
    }

    #[test]
    fn validate_rejects_bad_settings() {
        assert!(Config::new(2, 2).validate().is_err());
        assert!(Config::new(0, 0).validate().is_err());
        assert!(Config::new(0, 1).worker_threads(0).validate().is_err());
        assert!(Config::new(0, 1).send_window_bytes(1000).validate().is_err());
        assert!(Config::new(0, 1).transport("shm").validate().is_err());
        assert!(Config::new(0, 1).spin(Duration::from_secs(2)).validate().is_err());
        assert!(Config::new(0, 1).spin(Duration::ZERO).validate().is_ok());
        assert!(Config::new(0, 1).transport("tcp").validate().is_ok());
        assert!(Config::new(0, 1).name("x".repeat(256)).validate().is_err());
        assert!(Config::new(1, 2).validate().is_ok());
    }
}
