//! Handlers written in C: the request they see, the reply they fill, the
//! deferred reply they can finish from any thread, and the user data whose
//! release function runs exactly once.

use std::ffi::{CString, c_char, c_int, c_void};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::agent::{Deferred, Reply, Request};

use super::{RPCAGENT_OK, guard, guard_value, handle, invalid, rpcagent_status_t};

/// One incoming call, as a C handler sees it. Allocated by the library and
/// valid only during the handler call; fields may be appended.
#[repr(C)]
pub struct rpcagent_request_t {
    /// The rank that made the call.
    pub src_rank: u32,
    /// The function called (NUL-terminated).
    pub function: *const c_char,
    /// The call's arguments (`args_len` bytes).
    pub args: *const u8,
    /// Length of `args`.
    pub args_len: usize,
}

/// The reply a handler fills (opaque; valid only during the handler call).
pub struct rpcagent_reply_t {
    reply: *mut Reply,
}

/// A reply the handler deferred (opaque). Finish it exactly once, from any
/// thread, with `rpcagent_deferred_complete` or `rpcagent_deferred_fail`.
pub struct rpcagent_deferred_t {
    deferred: Deferred,
}

impl rpcagent_deferred_t {
    pub(crate) fn into_deferred(self) -> Deferred {
        self.deferred
    }
}

/// A handler: returns 0 for success (the reply is what it set; empty if
/// nothing) or non-zero for failure (the caller gets `RPCAGENT_ERR_HANDLER`
/// with the message given to `rpcagent_reply_error`, or one naming the code).
pub type rpcagent_handler_fn = Option<
    unsafe extern "C" fn(user_data: *mut c_void, req: *const rpcagent_request_t, reply: *mut rpcagent_reply_t) -> i32,
>;

/// A release function for `user_data`.
pub type rpcagent_free_fn = Option<unsafe extern "C" fn(user_data: *mut c_void)>;

/// Handler flag: run on the I/O thread that read the request instead of the
/// worker pool (for tiny handlers that never block and make no calls).
pub const RPCAGENT_HANDLER_INLINE: u32 = 1;

/// A pointer and its release function, run once when the last holder drops
/// it: a handler's `user_data` (unregistered, or the agent freed, and not
/// running), or bytes lent to send (`lend.rs`).
pub(crate) struct UserData {
    ptr: *mut c_void,
    free: rpcagent_free_fn,
    armed: AtomicBool,
}

// SAFETY: the C contract makes handlers and their user data callable from
// any library thread; the library only passes the pointer back to C.
unsafe impl Send for UserData {}
// SAFETY: as above; the library never dereferences `ptr`.
unsafe impl Sync for UserData {}

impl UserData {
    /// `free(ptr)` runs when this drops (NULL `free`: nothing runs).
    pub(crate) fn new(ptr: *mut c_void, free: rpcagent_free_fn) -> UserData {
        UserData {
            ptr,
            free,
            armed: AtomicBool::new(true),
        }
    }

    /// The caller keeps ownership (registration failed): never release.
    fn disarm(&self) {
        self.armed.store(false, Ordering::Release);
    }
}

impl Drop for UserData {
    fn drop(&mut self) {
        if let Some(free) = self.free
            && self.armed.load(Ordering::Acquire)
        {
            // SAFETY: `free` was given with `ptr` for exactly this call, which
            // happens once (this is the last reference).
            unsafe { free(self.ptr) };
        }
    }
}

/// Registers a C handler on `agent`; returns the user data to keep alive.
pub(crate) fn register(
    agent: &crate::RpcAgent,
    name: &str,
    function: rpcagent_handler_fn,
    user_data: *mut c_void,
    free_user_data: rpcagent_free_fn,
    flags: u32,
) -> Result<Arc<UserData>, crate::RpcError> {
    let function = function.ok_or_else(|| invalid("fn is NULL"))?;
    if flags & !RPCAGENT_HANDLER_INLINE != 0 {
        return Err(invalid(format!("unknown handler flags {flags:#x}")));
    }
    let c_name = CString::new(name).map_err(|_| invalid("name contains NUL"))?;
    let data = Arc::new(UserData::new(user_data, free_user_data));
    let held = data.clone();
    let options = crate::HandlerOptions {
        inline: flags & RPCAGENT_HANDLER_INLINE != 0,
    };
    let registered = agent.register_with(name, options, move |req: &Request<'_>, reply: &mut Reply| {
        let request = rpcagent_request_t {
            src_rank: req.src_rank as u32,
            function: c_name.as_ptr(),
            args: req.args.as_ptr(),
            args_len: req.args.len(),
        };
        let mut c_reply = rpcagent_reply_t { reply };
        // SAFETY: `function` is the C handler registered with `user_data`;
        // `request` and `c_reply` live on this stack frame for the call, which
        // is what the contract promises the handler.
        let code = unsafe { function(held.ptr, &request, &mut c_reply) };
        if code == 0 {
            Ok(())
        } else {
            Err(reply
                .take_error()
                .unwrap_or_else(|| format!("the handler returned {code}")))
        }
    });
    match registered {
        Ok(()) => Ok(data),
        Err(e) => {
            data.disarm();
            Err(e)
        }
    }
}

/// Borrows the Rust reply behind a C reply handle.
///
/// # Safety
/// `reply` is NULL or the handle passed to a handler that is still running.
pub(crate) unsafe fn reply_mut<'a>(reply: *mut rpcagent_reply_t) -> Result<&'a mut Reply, crate::RpcError> {
    // SAFETY: a live handle points at the trampoline's `Reply`, borrowed
    // mutably for the handler call (the only user on this thread).
    let handle = unsafe { reply.as_mut() }.ok_or_else(|| invalid("reply is NULL"))?;
    // SAFETY: as above.
    let reply = unsafe { &mut *handle.reply };
    if reply.is_deferred() {
        return Err(invalid(
            "the reply was deferred: answer through its rpcagent_deferred_t",
        ));
    }
    Ok(reply)
}

/// Sets the reply to a copy of `len` bytes at `data`.
///
/// # Safety
/// `reply` is NULL or the live handle of a running handler; `data` is NULL or
/// valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_reply_set(
    reply: *mut rpcagent_reply_t,
    data: *const u8,
    len: usize,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let reply = unsafe { reply_mut(reply) }?;
        // SAFETY: forwarded caller contract.
        reply.set(crate::net::buffers::copy_of(unsafe {
            super::bytes(data, len, "data")
        }?));
        Ok(RPCAGENT_OK)
    })
}

/// A reply buffer of `len` bytes (zeroed) for the handler to fill in place,
/// with no further copy. Valid until the handler returns. NULL on error
/// (`len` above the maximum message size, or no memory), with
/// `rpcagent_last_error()` saying which.
///
/// # Safety
/// `reply` is NULL or the live handle of a running handler.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_reply_alloc(reply: *mut rpcagent_reply_t, len: usize) -> *mut u8 {
    guard_value(std::ptr::null_mut(), || {
        // SAFETY: forwarded caller contract.
        let reply = unsafe { reply_mut(reply) }?;
        Ok(reply.try_alloc(len)?.as_mut_ptr())
    })
}

/// Fails the call with `message` (the caller gets `RPCAGENT_ERR_HANDLER`).
///
/// # Safety
/// `reply` is NULL or the live handle of a running handler; `message` is
/// NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_reply_error(
    reply: *mut rpcagent_reply_t,
    message: *const c_char,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let reply = unsafe { reply_mut(reply) }?;
        // SAFETY: forwarded caller contract.
        reply.error(unsafe { lossy(message) });
        Ok(RPCAGENT_OK)
    })
}

/// 1 once the caller cancelled the call (`rpcagent_future_cancel`) or its
/// deadline passed here, else 0 (also for NULL, and once the reply was
/// deferred: ask `rpcagent_deferred_cancelled`). A handler that loops polls
/// it, from the handler's own thread, and returns early. After a cancel its
/// answer is dropped; after a passed deadline it is still sent (the caller
/// has given up by then). Cheap: an atomic load while no call is
/// cancelled, else a lock; over shared memory also a look at the 16 cancel
/// marks the caller writes (no lock). An inline handler sees its deadline but not a
/// cancel (it runs to the end before the cancel is read), unless it defers.
///
/// # Safety
/// `reply` is NULL or the live handle of a running handler.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_reply_cancelled(reply: *const rpcagent_reply_t) -> c_int {
    guard_value(0, || {
        // SAFETY: a live handle points at the trampoline's `Reply` for the
        // handler call; only read here.
        let Some(handle) = (unsafe { reply.as_ref() }) else {
            return Ok(0);
        };
        // SAFETY: as above.
        Ok(unsafe { &*handle.reply }.is_cancelled() as c_int)
    })
}

/// 1 once the caller cancelled the deferred call or its deadline passed,
/// else 0 (also for NULL). Completing it anyway is allowed and returns
/// `RPCAGENT_OK` (the answer is dropped).
///
/// # Safety
/// `d` is NULL or a handle from `rpcagent_reply_defer` not yet consumed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_deferred_cancelled(d: *const rpcagent_deferred_t) -> c_int {
    // SAFETY: forwarded caller contract.
    guard_value(0, || {
        Ok(unsafe { d.as_ref() }.is_some_and(|d| d.deferred.is_cancelled()) as c_int)
    })
}

/// Takes the reply out of the handler, which may then return at once; the
/// returned handle answers later from any thread (completing it before the
/// handler returns is fine too). No worker thread is held meanwhile. NULL if
/// the reply was already deferred.
///
/// # Safety
/// `reply` is NULL or the live handle of a running handler.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_reply_defer(reply: *mut rpcagent_reply_t) -> *mut rpcagent_deferred_t {
    guard_value(std::ptr::null_mut(), || {
        // SAFETY: forwarded caller contract.
        let reply = unsafe { reply_mut(reply) }?;
        let deferred = reply.defer().ok_or_else(|| invalid("the reply was already deferred"))?;
        Ok(Box::into_raw(Box::new(rpcagent_deferred_t { deferred })))
    })
}

/// Answers a deferred call with a copy of `len` bytes at `data`, and frees
/// the handle. On `RPCAGENT_ERR_INVALID_ARGUMENT` (NULL data with a length)
/// the handle is not consumed.
///
/// # Safety
/// `d` is NULL or a handle from `rpcagent_reply_defer` not yet consumed;
/// `data` is NULL or valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_deferred_complete(
    d: *mut rpcagent_deferred_t,
    data: *const u8,
    len: usize,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        unsafe { handle(d, "d") }?;
        // SAFETY: forwarded caller contract.
        let bytes = unsafe { super::bytes(data, len, "data") }?.to_vec();
        // SAFETY: `d` came from Box::into_raw in rpcagent_reply_defer and is
        // consumed exactly once by the caller's contract.
        let d = unsafe { Box::from_raw(d) };
        d.deferred.complete(bytes);
        Ok(RPCAGENT_OK)
    })
}

/// Fails a deferred call with `message` (the caller gets
/// `RPCAGENT_ERR_HANDLER`), and frees the handle.
///
/// # Safety
/// `d` is NULL or a handle from `rpcagent_reply_defer` not yet consumed;
/// `message` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_deferred_fail(
    d: *mut rpcagent_deferred_t,
    message: *const c_char,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        unsafe { handle(d, "d") }?;
        // SAFETY: forwarded caller contract.
        let message = unsafe { lossy(message) };
        // SAFETY: `d` came from Box::into_raw in rpcagent_reply_defer and is
        // consumed exactly once by the caller's contract.
        let d = unsafe { Box::from_raw(d) };
        d.deferred.fail(message);
        Ok(RPCAGENT_OK)
    })
}

/// A C message as text; invalid UTF-8 is replaced, NULL gives a generic text.
///
/// # Safety
/// `message` is NULL or a NUL-terminated string.
unsafe fn lossy(message: *const c_char) -> String {
    if message.is_null() {
        return "the handler failed (no message given)".into();
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    unsafe { std::ffi::CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned()
}
