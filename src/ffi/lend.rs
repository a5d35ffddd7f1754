//! Sending without copies: the application lends the library memory with a
//! release function, which runs exactly once, whatever happens (the call
//! or reply was sent, failed, or was refused at once).

use std::ffi::{c_char, c_void};

use crate::transport::Lent;

use super::agent::{agent_ref, rpcagent_t};
use super::future::rpcagent_future_t;
use super::handler::{UserData as Release, rpcagent_deferred_t, rpcagent_free_fn, rpcagent_reply_t};
use super::{RPCAGENT_OK, guard, invalid, put, rpcagent_status_t};

/// One part of a call's arguments: `len` bytes at `data` (NULL only when
/// `len` is 0).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct rpcagent_iovec_t {
    /// The part's bytes (NULL only when `len` is 0).
    pub data: *const u8,
    /// How many.
    pub len: usize,
}

/// Reply bytes the application lends: read in place until dropped, when
/// its release runs.
struct LentBytes {
    data: *const u8,
    len: usize,
    _release: Release,
}

// SAFETY: the C contract keeps the bytes valid and unchanged, readable from
// any thread, until the release function runs (when this drops).
unsafe impl Send for LentBytes {}

impl Lent for LentBytes {
    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: checked non-NULL with its length when made (`lend`); valid
        // until the release runs, which is when this value drops.
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }
}

/// Wraps lent bytes; `release` runs on every path, this one's error
/// included.
///
/// # Safety
/// `data` is NULL or valid for `len` bytes until `release` runs.
unsafe fn lend(data: *const u8, len: usize, release: Release) -> Result<Box<dyn Lent>, crate::RpcError> {
    if data.is_null() && len > 0 {
        return Err(invalid(format!("data is NULL but its length is {len}")));
    }
    Ok(Box::new(LentBytes {
        data,
        len,
        _release: release,
    }))
}

/// Starts a call whose arguments are `parts` concatenated (the handler sees
/// one contiguous `args`). With `release` non-NULL the parts are read in
/// place, with vectored writes (no copy in this process unless the
/// connection is not ready, another thread is writing to it, or the socket
/// stalls, when what is left is copied), and `release(release_user_data)`
/// runs exactly once, on the calling thread before this returns, once they
/// are no longer needed: sent or copied, or the call failed or could not
/// start (any error returned here included). With `release` NULL the parts
/// are copied or sent before this returns. A release function must not
/// block or throw. Any number of parts; `n_parts` 0 sends empty arguments;
/// a part of length 0 may have NULL data, a longer one may not
/// (`RPCAGENT_ERR_INVALID_ARGUMENT`); a total above the maximum message size
/// is `RPCAGENT_ERR_TOO_LARGE`. Otherwise as `rpcagent_call_async`.
///
/// # Safety
/// As `rpcagent_call_async`; `parts` is NULL (only with `n_parts` 0) or valid
/// for `n_parts` entries, each valid as it says.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_call_async_iov(
    agent: *mut rpcagent_t,
    dst_rank: u32,
    function: *const c_char,
    parts: *const rpcagent_iovec_t,
    n_parts: usize,
    timeout_ms: i64,
    release: rpcagent_free_fn,
    release_user_data: *mut c_void,
    out_future: *mut *mut rpcagent_future_t,
) -> rpcagent_status_t {
    // Dropped (the release run) when the body ends, whatever it returns,
    // and before the status is recorded (a release that calls the library
    // cannot overwrite `rpcagent_last_error`).
    let release = Release::new(release_user_data, release);
    guard(move || {
        let _release = release;
        // SAFETY: forwarded caller contract.
        unsafe { put(out_future, std::ptr::null_mut(), "out_future") }?;
        let iov: &[rpcagent_iovec_t] = match (parts.is_null(), n_parts) {
            (_, 0) => &[],
            (true, n) => return Err(invalid(format!("parts is NULL but n_parts is {n}"))),
            // SAFETY: non-NULL and valid for `n_parts` entries by the contract.
            (false, n) => unsafe { std::slice::from_raw_parts(parts, n) },
        };
        let mut slices = Vec::with_capacity(iov.len());
        for (i, part) in iov.iter().enumerate() {
            // SAFETY: each part is valid as it says, by the contract. (The
            // message is made only for a refused part.)
            let bytes = unsafe { super::bytes(part.data, part.len, "") }
                .map_err(|_| invalid(format!("part {i} is NULL but its length is {}", part.len)))?;
            slices.push(bytes);
        }
        // SAFETY: forwarded caller contract.
        let agent = unsafe { agent_ref(agent) }?;
        // SAFETY: forwarded caller contract.
        let function = unsafe { super::c_str(function, "function") }?;
        let timeout = super::agent::call_timeout(agent, timeout_ms)?;
        let future = agent.start_call_parts(dst_rank as usize, function, &slices, timeout, false)?;
        // SAFETY: checked writable above.
        unsafe { out_future.write(rpcagent_future_t::boxed(future)) };
        Ok(RPCAGENT_OK)
    })
}

/// Sets the reply to `len` bytes at `data`, sent from where they are (no
/// copy in this process, unless another thread is writing to the same
/// connection or the socket stalls, when what is left is copied);
/// `release(release_user_data)` runs exactly once when they are no longer
/// needed: sent, replaced by another reply, the handler failed, the call
/// was cancelled, or this returned an error (NULL data with a length, a
/// deferred reply: `RPCAGENT_ERR_INVALID_ARGUMENT`). The bytes must stay
/// valid and unchanged until then. It may run on any library thread (the
/// I/O thread included, for an inline handler): it must not block, call
/// blocking library functions, or throw. Replaces any reply set before,
/// a buffer from `rpcagent_reply_alloc` included (no longer valid).
///
/// # Safety
/// `reply` is NULL or the live handle of a running handler; `data` is NULL
/// or valid for `len` bytes until `release` runs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_reply_set_owned(
    reply: *mut rpcagent_reply_t,
    data: *const u8,
    len: usize,
    release: rpcagent_free_fn,
    release_user_data: *mut c_void,
) -> rpcagent_status_t {
    let release = Release::new(release_user_data, release);
    guard(move || {
        // SAFETY: forwarded caller contract.
        let lent = unsafe { lend(data, len, release) }?;
        // SAFETY: forwarded caller contract.
        let reply = unsafe { super::handler::reply_mut(reply) }?;
        reply.set_lent(lent);
        Ok(RPCAGENT_OK)
    })
}

/// Answers a deferred call with `len` bytes at `data`, sent from where they
/// are, and frees the handle; `release(release_user_data)` runs exactly
/// once when they are no longer needed (sent, the call cancelled or its
/// caller gone), or at once on an error. On `RPCAGENT_ERR_INVALID_ARGUMENT`
/// (NULL `d`, or NULL data with a length) the handle is not consumed.
///
/// # Safety
/// `d` is NULL or a handle from `rpcagent_reply_defer` not yet consumed;
/// `data` is NULL or valid for `len` bytes until `release` runs.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_deferred_complete_owned(
    d: *mut rpcagent_deferred_t,
    data: *const u8,
    len: usize,
    release: rpcagent_free_fn,
    release_user_data: *mut c_void,
) -> rpcagent_status_t {
    let release = Release::new(release_user_data, release);
    guard(move || {
        // SAFETY: forwarded caller contract.
        let lent = unsafe { lend(data, len, release) }?;
        // SAFETY: forwarded caller contract.
        unsafe { super::handle(d, "d") }?;
        // SAFETY: `d` came from Box::into_raw in rpcagent_reply_defer and is
        // consumed exactly once by the caller's contract.
        let d = unsafe { Box::from_raw(d) };
        d.into_deferred().complete_lent(lent);
        Ok(RPCAGENT_OK)
    })
}
