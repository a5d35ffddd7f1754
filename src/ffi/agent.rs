//! `rpcagent_t`: joining a world, registering, calling, leaving.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use crate::RpcAgent;

use super::buffer::{put_buffer, rpcagent_buffer_t};
use super::config::{config_or_default, config_required, rpcagent_config_t};
use super::future::rpcagent_future_t;
use super::handler::{UserData, rpcagent_free_fn, rpcagent_handler_fn};
use super::{RPCAGENT_OK, c_str, guard, guard_value, handle, invalid, put, rpcagent_status_t, wait_timeout};

/// One rank of a world (opaque). All functions taking it are thread-safe.
pub struct rpcagent_t {
    agent: RpcAgent,
    /// The user data of registered C handlers, released when a function is
    /// unregistered or the agent is freed (not at shutdown).
    user_data: Mutex<HashMap<String, Arc<UserData>>>,
}

impl rpcagent_t {
    fn boxed(agent: RpcAgent) -> *mut rpcagent_t {
        Box::into_raw(Box::new(rpcagent_t {
            agent,
            user_data: Mutex::new(HashMap::new()),
        }))
    }
}

/// Borrows the agent behind a handle.
///
/// # Safety
/// `agent` is NULL or a live handle from `rpcagent_init`/`rpcagent_init_local`.
pub(crate) unsafe fn agent_ref<'a>(agent: *const rpcagent_t) -> Result<&'a RpcAgent, crate::RpcError> {
    // SAFETY: forwarded caller contract.
    Ok(&unsafe { handle(agent, "agent") }?.agent)
}

/// Counters of one agent; fields are only ever appended.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct rpcagent_stats_t {
    /// Calls this rank made.
    pub calls_started: u64,
    /// Of those, completed successfully.
    pub calls_ok: u64,
    /// Of those, failed (other than by timeout).
    pub calls_failed: u64,
    /// Of those, failed by their deadline.
    pub calls_timed_out: u64,
    /// Requests this rank answered, successfully or with an error.
    pub requests_served: u64,
    /// Payload bytes sent (arguments and replies).
    pub bytes_sent: u64,
    /// Payload bytes received (arguments and replies).
    pub bytes_received: u64,
    /// Calls this rank made that have not completed.
    pub calls_in_flight: u64,
}

/// Counters of one registered function on the rank that serves it; fields
/// are only ever appended. Each request that reached it ends as exactly one
/// of `served` (answered successfully), `failed` (answered with an error:
/// the handler failed or panicked, or its reply was too large) or
/// `cancelled` (its caller cancelled it, or its deadline passed before it
/// ran: not answered), or is still queued, running, or waiting for its
/// deferred answer (requests dropped by a closing agent are not counted).
/// A handler that saw its deadline pass and answered anyway counts as
/// served or failed.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct rpcagent_function_stats_t {
    /// Requests answered successfully.
    pub served: u64,
    /// Requests answered with an error.
    pub failed: u64,
    /// Requests cancelled by their caller (or whose deadline passed before
    /// they ran), not answered.
    pub cancelled: u64,
    /// Handlers of it running now.
    pub running: u64,
    /// Argument bytes received.
    pub bytes_in: u64,
    /// Reply bytes sent.
    pub bytes_out: u64,
    /// Handler time (how long the handler ran; a deferred reply's wait not
    /// counted) over the last `window` requests, in nanoseconds: median.
    pub handler_ns_p50: u64,
    /// 99th percentile of the same.
    pub handler_ns_p99: u64,
    /// Largest of the same.
    pub handler_ns_max: u64,
    /// How many requests the handler times cover (the last ones, at most 1024).
    pub window: u64,
}

/// Joins a world over TCP as configured: rank 0 hosts the rendezvous at the
/// master address; blocks until every rank has joined or the init timeout
/// passes (`RPCAGENT_ERR_INIT`, naming the missing ranks). Any rank may then
/// call any rank, itself included. Free the agent with `rpcagent_free`.
///
/// # Safety
/// `cfg` is NULL or a live config; `out_agent` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_init(
    cfg: *const rpcagent_config_t,
    out_agent: *mut *mut rpcagent_t,
) -> rpcagent_status_t {
    guard(|| {
        if out_agent.is_null() {
            return Err(invalid("out_agent is NULL"));
        }
        // SAFETY: forwarded caller contract.
        let config = unsafe { config_required(cfg) }?;
        let agent = RpcAgent::init(config)?;
        // SAFETY: checked non-NULL above; writable by the caller's contract.
        unsafe { put(out_agent, rpcagent_t::boxed(agent), "out_agent") }?;
        Ok(RPCAGENT_OK)
    })
}

/// Makes a whole world of `world_size` ranks inside this process (no
/// sockets), with the same semantics as a TCP world. `cfg_or_null` applies to
/// every rank (its rank, world size and network settings are ignored).
/// Writes `world_size` handles to `out_agents`; free each with `rpcagent_free`.
///
/// # Safety
/// `cfg_or_null` is NULL or a live config; `out_agents` is NULL or writable
/// for `world_size` pointers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_init_local(
    world_size: u32,
    cfg_or_null: *const rpcagent_config_t,
    out_agents: *mut *mut rpcagent_t,
) -> rpcagent_status_t {
    guard(|| {
        if out_agents.is_null() {
            return Err(invalid("out_agents is NULL"));
        }
        // SAFETY: forwarded caller contract.
        let config = unsafe { config_or_default(cfg_or_null) };
        let agents = RpcAgent::local_world_with(world_size as usize, config)?;
        for (i, agent) in agents.into_iter().enumerate() {
            // SAFETY: `out_agents` has room for `world_size` pointers by the
            // caller's contract, and `i < world_size`.
            unsafe { out_agents.add(i).write(rpcagent_t::boxed(agent)) };
        }
        Ok(RPCAGENT_OK)
    })
}

/// Starts serving. Requests that arrived earlier waited (bounded by their
/// callers' deadlines) and are served now. Calls may be made before start.
///
/// # Safety
/// `agent` is NULL or a live agent handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_start(agent: *mut rpcagent_t) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        unsafe { agent_ref(agent) }?.start()?;
        Ok(RPCAGENT_OK)
    })
}

/// Returns when every rank has entered the barrier. `timeout_ms > 0` bounds
/// the wait, `RPCAGENT_WAIT_FOREVER` (-1) waits without bound, 0 does not wait.
///
/// # Safety
/// `agent` is NULL or a live agent handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_barrier(agent: *mut rpcagent_t, timeout_ms: i64) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        unsafe { agent_ref(agent) }?.barrier_timeout(wait_timeout(timeout_ms))?;
        Ok(RPCAGENT_OK)
    })
}

/// This agent's rank (`UINT32_MAX` if `agent` is NULL).
///
/// # Safety
/// `agent` is NULL or a live agent handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_rank(agent: *const rpcagent_t) -> u32 {
    // SAFETY: forwarded caller contract.
    guard_value(u32::MAX, || Ok(unsafe { agent_ref(agent) }?.rank() as u32))
}

/// The number of ranks in the world (0 if `agent` is NULL).
///
/// # Safety
/// `agent` is NULL or a live agent handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_world_size(agent: *const rpcagent_t) -> u32 {
    // SAFETY: forwarded caller contract.
    guard_value(0, || Ok(unsafe { agent_ref(agent) }?.world_size() as u32))
}

/// How calls to `rank` travel now: `"shm"` (shared memory, a rank on this
/// host under `auto`), `"tcp"`, `"self"` for this rank (under
/// any transport setting), `"local"` between the ranks of an in-process
/// world (`rpcagent_init_local`); NULL before this rank's first call to
/// `rank` (connections open lazily: joining the world opens none), for a
/// rank out of range, or a NULL `agent`. The string is static.
///
/// # Safety
/// `agent` is NULL or a live agent handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_peer_transport(agent: *const rpcagent_t, rank: u32) -> *const c_char {
    // SAFETY: forwarded caller contract.
    guard_value(std::ptr::null(), || {
        let name = unsafe { agent_ref(agent) }?.peer_transport(rank as usize);
        Ok(match name {
            Some("tcp") => c"tcp".as_ptr(),
            Some("self") => c"self".as_ptr(),
            Some("local") => c"local".as_ptr(),
            Some("shm") => c"shm".as_ptr(),
            _ => std::ptr::null(),
        })
    })
}

/// The rank whose worker name is `worker_name` (`RPCAGENT_ERR_NOT_FOUND` if none).
///
/// # Safety
/// `agent` is NULL or a live agent handle; `worker_name` is NULL or a
/// NUL-terminated string; `out_rank` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_rank_of(
    agent: *const rpcagent_t,
    worker_name: *const c_char,
    out_rank: *mut u32,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let agent = unsafe { agent_ref(agent) }?;
        // SAFETY: forwarded caller contract.
        let name = unsafe { c_str(worker_name, "worker_name") }?;
        let rank = agent.rank_of(name).ok_or_else(|| crate::RpcError::NotFound {
            rank: agent.rank(),
            function: format!("(no worker named '{name}')"),
        })?;
        // SAFETY: forwarded caller contract.
        unsafe { put(out_rank, rank as u32, "out_rank") }?;
        Ok(RPCAGENT_OK)
    })
}

/// Shuts down (immediately) if still running, waits for the library's
/// threads (running handlers included), runs the `free_user_data` callbacks
/// and frees the agent. NULL is a no-op. Must not be called from a handler.
///
/// # Safety
/// `agent` is NULL or a live agent handle, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_free(agent: *mut rpcagent_t) {
    if agent.is_null() {
        return;
    }
    // SAFETY: `agent` came from Box::into_raw in init and is freed once by
    // the caller's contract.
    let agent = unsafe { Box::from_raw(agent) };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        agent.agent.close_and_join();
        // Handlers are gone and joined: release their user data now.
        drop(agent);
    }));
}

/// Registers the C handler `fn` under `name` (1 to 255 bytes of UTF-8).
/// `flags`: 0 runs it on the worker pool (it may block and make nested
/// calls; the thread that read its request (the I/O loop's, or a busy
/// connection's responder) may run it, in turn with other quick ones
/// (under 10 us of late) that came with it; the I/O loop reads other
/// connections again after them; should one of those block, the rest are
/// queued for other pool threads and the loop moves to another thread,
/// typically within half a millisecond, at once if it waits for replies
/// from another rank), `RPCAGENT_HANDLER_INLINE` on the
/// I/O thread (tiny, non-blocking; a call it makes into a full send window
/// fails with `RPCAGENT_ERR_BUSY`).
/// A rank's call to its own inline function runs it on the calling thread,
/// as a nested call (do not hold a lock it takes), or on a worker when made
/// from inside an inline handler or a completion callback. `free_user_data` (nullable) runs once when the function is unregistered or
/// the agent is freed; if registering fails, `user_data` stays the caller's.
///
/// # Safety
/// `agent` is NULL or a live agent handle; `name` is NULL or NUL-terminated;
/// `fn` and `free_user_data` may be called from any library thread with
/// `user_data`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_register(
    agent: *mut rpcagent_t,
    name: *const c_char,
    r#fn: rpcagent_handler_fn,
    user_data: *mut c_void,
    free_user_data: rpcagent_free_fn,
    flags: u32,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let handle = unsafe { handle(agent, "agent") }?;
        // SAFETY: forwarded caller contract.
        let name = unsafe { c_str(name, "name") }?;
        let data = super::handler::register(&handle.agent, name, r#fn, user_data, free_user_data, flags)?;
        handle.user_data.lock().insert(name.to_string(), data);
        Ok(RPCAGENT_OK)
    })
}

/// Removes a function (`RPCAGENT_ERR_NOT_FOUND` if it is not registered);
/// its `free_user_data` runs once no call of it is running.
///
/// # Safety
/// `agent` is NULL or a live agent handle; `name` is NULL or NUL-terminated.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_unregister(agent: *mut rpcagent_t, name: *const c_char) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let handle = unsafe { handle(agent, "agent") }?;
        // SAFETY: forwarded caller contract.
        let name = unsafe { c_str(name, "name") }?;
        handle.agent.unregister(name)?;
        let released = handle.user_data.lock().remove(name);
        drop(released);
        Ok(RPCAGENT_OK)
    })
}

/// A call timeout: -1 the agent's default, 0 none, > 0 milliseconds.
pub(crate) fn call_timeout(agent: &RpcAgent, ms: i64) -> Result<Option<Duration>, crate::RpcError> {
    match ms {
        -1 => Ok(agent.default_timeout()),
        0 => Ok(None),
        ms if ms > 0 => Ok(Some(Duration::from_millis(ms as u64))),
        ms => Err(invalid(format!(
            "timeout_ms {ms} is neither RPCAGENT_TIMEOUT_DEFAULT, RPCAGENT_TIMEOUT_NONE nor positive"
        ))),
    }
}

/// Starts a call for `rpcagent_call_sync` / `rpcagent_call_async`.
///
/// # Safety
/// The caller contracts of those functions.
unsafe fn start_call(
    agent: *mut rpcagent_t,
    dst_rank: u32,
    function: *const c_char,
    args: *const u8,
    args_len: usize,
    timeout_ms: i64,
    will_wait: bool,
) -> Result<crate::RpcFuture, crate::RpcError> {
    // SAFETY: forwarded caller contract.
    let agent = unsafe { agent_ref(agent) }?;
    // SAFETY: forwarded caller contract.
    let function = unsafe { c_str(function, "function") }?;
    // SAFETY: forwarded caller contract.
    let args = unsafe { super::bytes(args, args_len, "args") }?;
    agent.start_call(
        dst_rank as usize,
        function,
        args,
        call_timeout(agent, timeout_ms)?,
        will_wait,
    )
}

/// Calls `function` on `dst_rank` and waits for the reply. `timeout_ms`:
/// `RPCAGENT_TIMEOUT_DEFAULT` (-1), `RPCAGENT_TIMEOUT_NONE` (0) or a deadline
/// in milliseconds. `args` may be reused as soon as this returns. On success
/// `out_result` owns the reply (free it with `rpcagent_buffer_free`); on
/// failure it is zeroed.
///
/// # Safety
/// `agent` is NULL or a live agent handle; `function` is NULL or
/// NUL-terminated; `args` is NULL or valid for `args_len` bytes; `out_result`
/// is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_call_sync(
    agent: *mut rpcagent_t,
    dst_rank: u32,
    function: *const c_char,
    args: *const u8,
    args_len: usize,
    timeout_ms: i64,
    out_result: *mut rpcagent_buffer_t,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        unsafe { put(out_result, rpcagent_buffer_t::EMPTY, "out_result") }?;
        // SAFETY: forwarded caller contract.
        let reply = unsafe { start_call(agent, dst_rank, function, args, args_len, timeout_ms, true) }?.wait()?;
        // SAFETY: checked writable above.
        unsafe { put_buffer(out_result, reply) };
        Ok(RPCAGENT_OK)
    })
}

/// Starts a call and returns at once with its future (free it with
/// `rpcagent_future_free`). A call that cannot start (bad rank or name, too
/// large, shut down) fails here and writes NULL; later failures come through
/// the future. `args` may be reused as soon as this returns.
///
/// # Safety
/// As `rpcagent_call_sync`; `out_future` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_call_async(
    agent: *mut rpcagent_t,
    dst_rank: u32,
    function: *const c_char,
    args: *const u8,
    args_len: usize,
    timeout_ms: i64,
    out_future: *mut *mut rpcagent_future_t,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        unsafe { put(out_future, std::ptr::null_mut(), "out_future") }?;
        // SAFETY: forwarded caller contract.
        let future = unsafe { start_call(agent, dst_rank, function, args, args_len, timeout_ms, false) }?;
        // SAFETY: checked writable above.
        unsafe { out_future.write(rpcagent_future_t::boxed(future)) };
        Ok(RPCAGENT_OK)
    })
}

/// Leaves the world. Graceful (non-zero; every rank calls it): new calls
/// fail with `RPCAGENT_ERR_SHUTDOWN`, this rank's calls in flight finish, and
/// it serves until every rank still alive has reached shutdown. When ranks
/// were lost it returns `RPCAGENT_ERR_PEER_LOST` once the live ones have
/// met (a dead rank is found within about two seconds, and never cuts the
/// survivors short), or `RPCAGENT_ERR_TIMEOUT` if live ranks did not arrive
/// in time. Immediate (0): calls in
/// flight fail at once, connections close, peers see `RPCAGENT_ERR_PEER_LOST`.
/// `timeout_ms`: > 0 bounds the wait, -1 waits without bound, 0 does not
/// wait. The agent is shut down locally whatever this returns.
///
/// # Safety
/// `agent` is NULL or a live agent handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_shutdown(
    agent: *mut rpcagent_t,
    graceful: c_int,
    timeout_ms: i64,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        unsafe { agent_ref(agent) }?.shutdown_timeout(graceful != 0, wait_timeout(timeout_ms))?;
        Ok(RPCAGENT_OK)
    })
}

/// Copies the counters of this rank's registered function `name` into
/// `out` (`out_size` as in `rpcagent_get_stats`): `RPCAGENT_ERR_NOT_FOUND`
/// if no function of that name is registered (its counters go with it when
/// it is unregistered).
///
/// # Safety
/// `agent` is NULL or a live agent handle; `name` is NULL or NUL-terminated;
/// `out` is NULL or writable for `out_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_get_function_stats(
    agent: *const rpcagent_t,
    name: *const c_char,
    out: *mut rpcagent_function_stats_t,
    out_size: usize,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let agent = unsafe { agent_ref(agent) }?;
        // SAFETY: forwarded caller contract.
        let name = unsafe { c_str(name, "name") }?;
        if out.is_null() || out_size == 0 {
            return Err(invalid("out is NULL or out_size is 0"));
        }
        let s = agent.function_stats(name).ok_or_else(|| crate::RpcError::NotFound {
            rank: agent.rank(),
            function: name.to_string(),
        })?;
        let stats = rpcagent_function_stats_t {
            served: s.served,
            failed: s.failed,
            cancelled: s.cancelled,
            running: s.running,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            handler_ns_p50: s.handler_ns_p50,
            handler_ns_p99: s.handler_ns_p99,
            handler_ns_max: s.handler_ns_max,
            window: s.window,
        };
        let n = out_size.min(std::mem::size_of::<rpcagent_function_stats_t>());
        // SAFETY: `stats` is plain data of at least `n` bytes; `out` is
        // writable for `out_size >= n` bytes by the caller's contract.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (&stats as *const rpcagent_function_stats_t).cast::<u8>(),
                out.cast::<u8>(),
                n,
            )
        };
        Ok(RPCAGENT_OK)
    })
}

/// Copies the agent's counters into `out`. `out_size` is
/// `sizeof(rpcagent_stats_t)` as the caller compiled it: fields are only
/// ever appended, so older callers get the fields they know.
///
/// # Safety
/// `agent` is NULL or a live agent handle; `out` is NULL or writable for
/// `out_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_get_stats(
    agent: *const rpcagent_t,
    out: *mut rpcagent_stats_t,
    out_size: usize,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let s = unsafe { agent_ref(agent) }?.stats();
        if out.is_null() || out_size == 0 {
            return Err(invalid("out is NULL or out_size is 0"));
        }
        let stats = rpcagent_stats_t {
            calls_started: s.calls_started,
            calls_ok: s.calls_ok,
            calls_failed: s.calls_failed,
            calls_timed_out: s.calls_timed_out,
            requests_served: s.requests_served,
            bytes_sent: s.bytes_sent,
            bytes_received: s.bytes_received,
            calls_in_flight: s.calls_in_flight,
        };
        let n = out_size.min(std::mem::size_of::<rpcagent_stats_t>());
        // SAFETY: `stats` is plain data of at least `n` bytes; `out` is
        // writable for `out_size >= n` bytes by the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping((&stats as *const rpcagent_stats_t).cast::<u8>(), out.cast::<u8>(), n) };
        Ok(RPCAGENT_OK)
    })
}
