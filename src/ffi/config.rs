//! `rpcagent_config_t`: the opaque configuration builder.

use std::ffi::c_char;
use std::time::Duration;

use crate::config::{Config, check_name};

use super::{RPCAGENT_OK, guard, handle, invalid, rpcagent_status_t};

/// Settings of one rank (opaque, so it can grow without breaking the ABI).
pub struct rpcagent_config_t {
    pub(crate) config: Config,
}

/// Borrows a config mutably.
///
/// # Safety
/// `cfg` is NULL or a live config handle not used by another thread meanwhile.
unsafe fn config_mut<'a>(cfg: *mut rpcagent_config_t) -> Result<&'a mut Config, crate::RpcError> {
    // SAFETY: by the caller's contract, non-NULL means a live, unshared handle.
    unsafe { cfg.as_mut() }
        .map(|c| &mut c.config)
        .ok_or_else(|| invalid("cfg is NULL"))
}

/// A configuration with every setting at its default (rank 0 of a world of
/// 1, master 127.0.0.1:29500). Free it with `rpcagent_config_free`.
#[unsafe(no_mangle)]
pub extern "C" fn rpcagent_config_new() -> *mut rpcagent_config_t {
    super::guard_value(std::ptr::null_mut(), || {
        Ok(Box::into_raw(Box::new(rpcagent_config_t {
            config: Config::default(),
        })))
    })
}

/// Frees a configuration; NULL is a no-op.
///
/// # Safety
/// `cfg` is NULL or a handle from `rpcagent_config_new`, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_free(cfg: *mut rpcagent_config_t) {
    if !cfg.is_null() {
        // SAFETY: `cfg` came from Box::into_raw in rpcagent_config_new and is
        // given back exactly once by the caller's contract.
        drop(unsafe { Box::from_raw(cfg) });
    }
}

/// Fills the configuration from the launcher's environment (torchrun, Open
/// MPI, MPICH/Hydra, Slurm and `RPCAGENT_*` variables; first found wins).
/// Settings whose variables are absent keep their values. A malformed value
/// is `RPCAGENT_ERR_INVALID_ARGUMENT` naming the variable.
///
/// # Safety
/// `cfg` is NULL or a live config handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_from_env(cfg: *mut rpcagent_config_t) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let config = unsafe { config_mut(cfg) }?;
        let mut updated = config.clone();
        updated.apply_lookup(|k| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned()))?;
        *config = updated;
        Ok(RPCAGENT_OK)
    })
}

/// Applies `change` to the config behind `cfg`.
///
/// # Safety
/// `cfg` is NULL or a live config handle.
unsafe fn update(
    cfg: *mut rpcagent_config_t,
    change: impl FnOnce(&mut Config) -> Result<(), crate::RpcError>,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        change(unsafe { config_mut(cfg) }?)?;
        Ok(RPCAGENT_OK)
    })
}

/// This process's rank (checked against the world size at init).
///
/// # Safety
/// `cfg` is NULL or a live config handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_set_rank(cfg: *mut rpcagent_config_t, rank: u32) -> rpcagent_status_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(cfg, |c| {
            c.set_rank(rank as usize);
            Ok(())
        })
    }
}

/// The number of ranks in the world (at least 1).
///
/// # Safety
/// `cfg` is NULL or a live config handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_set_world_size(
    cfg: *mut rpcagent_config_t,
    world_size: u32,
) -> rpcagent_status_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(cfg, |c| {
            if world_size == 0 {
                return Err(invalid("world size must be at least 1"));
            }
            c.set_world_size(world_size as usize);
            Ok(())
        })
    }
}

/// This rank's worker name (1 to 255 bytes of UTF-8), for `rpcagent_rank_of`.
///
/// # Safety
/// `cfg` is NULL or a live config handle; `worker_name` is NULL or a
/// NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_set_name(
    cfg: *mut rpcagent_config_t,
    worker_name: *const c_char,
) -> rpcagent_status_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(cfg, |c| {
            let name = super::c_str(worker_name, "worker_name")?;
            check_name(name).map_err(|why| invalid(format!("worker name {why}")))?;
            c.name = Some(name.to_string());
            Ok(())
        })
    }
}

/// Where rank 0 hosts the rendezvous (host name or address, and port).
///
/// # Safety
/// `cfg` is NULL or a live config handle; `host` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_set_master(
    cfg: *mut rpcagent_config_t,
    host: *const c_char,
    port: u16,
) -> rpcagent_status_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(cfg, |c| {
            let host = super::c_str(host, "host")?;
            if host.is_empty() || port == 0 {
                return Err(invalid("the master needs a host and a non-zero port"));
            }
            c.master_host = host.to_string();
            c.master_port = port;
            Ok(())
        })
    }
}

/// The local address to listen on (default: the one that reaches the master).
///
/// # Safety
/// `cfg` is NULL or a live config handle; `host` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_set_bind(
    cfg: *mut rpcagent_config_t,
    host: *const c_char,
) -> rpcagent_status_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(cfg, |c| {
            let host = super::c_str(host, "host")?;
            if host.is_empty() {
                return Err(invalid("the bind host is empty"));
            }
            c.bind = Some(host.to_string());
            Ok(())
        })
    }
}

/// How calls to other ranks travel: `"auto"` (the default) or `"tcp"`; also
/// `RPCAGENT_TRANSPORT`. Under `"auto"` ranks on this host (same kernel and
/// network namespace) talk through shared memory, falling back to TCP by
/// themselves where they cannot (another host, container or namespace; the
/// memory refused). Under either, calls to this rank itself never touch a
/// socket.
/// Another name (or NULL) is `RPCAGENT_ERR_INVALID_ARGUMENT`.
///
/// # Safety
/// `cfg` is NULL or a live config handle; `transport` is NULL or a
/// NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_set_transport(
    cfg: *mut rpcagent_config_t,
    transport: *const c_char,
) -> rpcagent_status_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(cfg, |c| {
            let name = super::c_str(transport, "transport")?;
            if !crate::config::TRANSPORT_NAMES.contains(&name) {
                return Err(invalid(format!("unknown transport '{name}' (auto, tcp)")));
            }
            c.transport = name.to_string();
            Ok(())
        })
    }
}

/// How long a caller waiting for its reply looks for it, yielding the CPU
/// between looks, before it sleeps in the kernel (between ranks on one
/// host, also how long the I/O loop, a responder, or a writer facing a full
/// ring looks before sleeping): in microseconds, at most
/// 1000000 (else `RPCAGENT_ERR_INVALID_ARGUMENT`), default 50; also
/// `RPCAGENT_SPIN_US`. 0 sleeps at once. An idle agent never spins.
///
/// # Safety
/// `cfg` is NULL or a live config handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_set_spin_us(cfg: *mut rpcagent_config_t, us: u32) -> rpcagent_status_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(cfg, |c| {
            let spin = Duration::from_micros(us as u64);
            if spin > crate::config::MAX_SPIN {
                return Err(invalid("the spin must be at most 1000000 us"));
            }
            c.spin = spin;
            Ok(())
        })
    }
}

/// The size of each shared-memory ring between two ranks on one host: a
/// power of two from 4096 to 2^30 bytes (else
/// `RPCAGENT_ERR_INVALID_ARGUMENT`); also `RPCAGENT_SHM_RING_BYTES`. By
/// default it depends on how many ranks share the host: 1 MiB with up to
/// 9, halving as they grow, 131072 from 34 on. Each direction a pair calls
/// in maps two rings (requests and replies).
///
/// # Safety
/// `cfg` is NULL or a live config handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_set_shm_ring_bytes(
    cfg: *mut rpcagent_config_t,
    bytes: u64,
) -> rpcagent_status_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(cfg, |c| {
            let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
            crate::config::check_ring_bytes(bytes).map_err(|why| invalid(format!("the ring size {why}")))?;
            c.shm_ring_bytes = Some(bytes);
            Ok(())
        })
    }
}

/// The default call deadline in milliseconds; 0 means calls have none.
///
/// # Safety
/// `cfg` is NULL or a live config handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_set_call_timeout_ms(
    cfg: *mut rpcagent_config_t,
    ms: u32,
) -> rpcagent_status_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(cfg, |c| {
            c.call_timeout = Duration::from_millis(ms as u64);
            Ok(())
        })
    }
}

/// How long `rpcagent_init` waits for the whole world, in milliseconds.
///
/// # Safety
/// `cfg` is NULL or a live config handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_set_init_timeout_ms(
    cfg: *mut rpcagent_config_t,
    ms: u32,
) -> rpcagent_status_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(cfg, |c| {
            c.init_timeout = Duration::from_millis(ms as u64);
            Ok(())
        })
    }
}

/// Size of the worker pool that runs handlers (at least 1).
///
/// # Safety
/// `cfg` is NULL or a live config handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_set_worker_threads(cfg: *mut rpcagent_config_t, n: u32) -> rpcagent_status_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(cfg, |c| {
            if n == 0 {
                return Err(invalid("worker threads must be at least 1"));
            }
            c.worker_threads = n as usize;
            Ok(())
        })
    }
}

/// The largest arguments or reply, in bytes (at least 1); a world-wide setting.
///
/// # Safety
/// `cfg` is NULL or a live config handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_set_max_message_bytes(
    cfg: *mut rpcagent_config_t,
    n: u64,
) -> rpcagent_status_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(cfg, |c| {
            if n == 0 {
                return Err(invalid("max message bytes must be at least 1"));
            }
            c.max_message_bytes = n;
            Ok(())
        })
    }
}

/// The request bytes this rank may hold in its own memory for one
/// destination: copied from callers, not yet accepted by the kernel
/// (default 64 MiB, env `RPCAGENT_SEND_WINDOW_BYTES`; at least 1 MiB, else
/// `RPCAGENT_ERR_INVALID_ARGUMENT`). A call that finds no room waits for
/// it, up to its own deadline (then `RPCAGENT_ERR_TIMEOUT`); a call made on
/// a library thread that must not block (an inline handler, a completion
/// callback) fails at once with `RPCAGENT_ERR_BUSY`. One call larger than
/// the window is let through alone. Calls to other destinations are not
/// held up.
///
/// # Safety
/// `cfg` is NULL or a live config handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_set_send_window_bytes(
    cfg: *mut rpcagent_config_t,
    bytes: u64,
) -> rpcagent_status_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(cfg, |c| {
            if bytes < crate::config::MIN_SEND_WINDOW_BYTES {
                return Err(invalid("the send window must be at least 1 MiB (1048576 bytes)"));
            }
            c.send_window_bytes = bytes;
            Ok(())
        })
    }
}

/// How long a peer may stay silent (no TCP acknowledgement: host gone, link
/// cut) before it counts as lost and its calls fail with
/// `RPCAGENT_ERR_PEER_LOST` (at least 1000; applied in whole seconds, at
/// least 3; default 20000). Also `RPCAGENT_PEER_TIMEOUT_MS`.
///
/// # Safety
/// `cfg` is NULL or a live config handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_set_peer_timeout_ms(
    cfg: *mut rpcagent_config_t,
    ms: u32,
) -> rpcagent_status_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(cfg, |c| {
            if ms < 1000 {
                return Err(invalid("the peer timeout must be at least 1000 ms"));
            }
            c.peer_timeout = Duration::from_millis(ms as u64);
            Ok(())
        })
    }
}

/// The job's shared secret (`len` bytes at `key`; `len` 0 clears it). Every
/// connection must prove it knows the secret; it never crosses the wire.
///
/// # Safety
/// `cfg` is NULL or a live config handle; `key` is NULL or valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_config_set_secret(
    cfg: *mut rpcagent_config_t,
    key: *const u8,
    len: usize,
) -> rpcagent_status_t {
    // SAFETY: forwarded caller contract.
    unsafe {
        update(cfg, |c| {
            let key = super::bytes(key, len, "key")?;
            c.secret = (!key.is_empty()).then(|| key.to_vec());
            Ok(())
        })
    }
}

/// Reads a config handle (NULL allowed where a default config is meant).
///
/// # Safety
/// `cfg` is NULL or a live config handle.
pub(crate) unsafe fn config_or_default(cfg: *const rpcagent_config_t) -> Config {
    // SAFETY: forwarded caller contract.
    match unsafe { cfg.as_ref() } {
        Some(c) => c.config.clone(),
        None => Config::default(),
    }
}

/// Reads a required config handle.
///
/// # Safety
/// `cfg` is NULL or a live config handle.
pub(crate) unsafe fn config_required(cfg: *const rpcagent_config_t) -> Result<Config, crate::RpcError> {
    // SAFETY: forwarded caller contract.
    Ok(unsafe { handle(cfg, "cfg") }?.config.clone())
}
