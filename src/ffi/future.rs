//! `rpcagent_future_t`: the pollable handle of an async call.

use std::ffi::{CString, c_char, c_int, c_void};
use std::sync::OnceLock;
use std::time::Duration;

use crate::RpcFuture;

use super::buffer::{put_buffer, rpcagent_buffer_t};
use super::{RPCAGENT_OK, RPCAGENT_PENDING, guard, handle, invalid, put, rpcagent_status_t};

/// The pollable handle of an async call (opaque).
pub struct rpcagent_future_t {
    future: RpcFuture,
    /// The failure text, kept here so it outlives thread-local state.
    error: OnceLock<CString>,
}

impl rpcagent_future_t {
    pub(crate) fn future(&self) -> &RpcFuture {
        &self.future
    }

    pub(crate) fn boxed(future: RpcFuture) -> *mut rpcagent_future_t {
        Box::into_raw(Box::new(rpcagent_future_t {
            future,
            error: OnceLock::new(),
        }))
    }
}

/// Runs a C completion callback kept as two words by
/// `rpcagent_future_on_complete`: the function, and its `user_data`.
fn run_c_callback(words: [usize; 2]) {
    // SAFETY: `words[0]` was made from an `unsafe extern "C" fn(*mut c_void)`
    // (checked not NULL before it was kept); a function pointer and a data
    // pointer have the same size on every platform this library builds for.
    let cb = unsafe { std::mem::transmute::<*const (), unsafe extern "C" fn(*mut c_void)>(words[0] as *const ()) };
    // SAFETY: the caller registered `cb` with `user_data` for exactly this
    // one call, to run on a library thread (the C contract); the library
    // only passes the pointer back, never dereferences it.
    unsafe { cb(words[1] as *mut c_void) };
}

/// 1 if the call has completed (successfully or not), 0 if it is pending
/// (or `f` is NULL).
///
/// # Safety
/// `f` is NULL or a live future handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_future_is_ready(f: *const rpcagent_future_t) -> c_int {
    // SAFETY: forwarded caller contract.
    super::guard_value(0, || Ok(unsafe { handle(f, "f") }?.future.is_ready() as c_int))
}

/// Waits for the call: `timeout_ms` 0 never blocks, < 0 waits forever, > 0
/// waits that long. `RPCAGENT_PENDING` if it is still running (the future
/// stays valid); otherwise the call's final status, with the reply in
/// `out_result` the first time: a later wait returns the same status with an
/// empty buffer. On failure `out_result` is zeroed.
///
/// # Safety
/// `f` is NULL or a live future handle; `out_result` is NULL or writable
/// (NULL is `RPCAGENT_ERR_INVALID_ARGUMENT`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_future_wait(
    f: *mut rpcagent_future_t,
    timeout_ms: i64,
    out_result: *mut rpcagent_buffer_t,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let f = unsafe { handle(f, "f") }?;
        // SAFETY: forwarded caller contract.
        unsafe { put(out_result, rpcagent_buffer_t::EMPTY, "out_result") }?;
        let outcome = if timeout_ms < 0 {
            Some(f.future.wait_ref())
        } else {
            f.future.wait_timeout(Duration::from_millis(timeout_ms as u64))
        };
        match outcome {
            None => Ok(RPCAGENT_PENDING),
            Some(Ok(reply)) => {
                // SAFETY: NULL or writable, as checked above.
                unsafe { put_buffer(out_result, reply) };
                Ok(RPCAGENT_OK)
            }
            Some(Err(e)) => Err(e),
        }
    })
}

/// The failure message of a completed, failed call, owned by the future
/// (valid until it is freed); NULL if the call succeeded or is pending.
///
/// # Safety
/// `f` is NULL or a live future handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_future_error(f: *const rpcagent_future_t) -> *const c_char {
    super::guard_value(std::ptr::null(), || {
        // SAFETY: forwarded caller contract.
        let f = unsafe { handle(f, "f") }?;
        Ok(match f.future.error() {
            Some(e) => f
                .error
                .get_or_init(|| CString::new(e.to_string().replace('\0', "\\0")).expect("NULs replaced"))
                .as_ptr(),
            None => std::ptr::null(),
        })
    })
}

/// Waits until one of `n` futures is complete: `RPCAGENT_OK` with its index
/// in `out_index`, or `RPCAGENT_PENDING` when `timeout_ms` passes first
/// (0 never blocks, < 0 waits forever). Called again over the same array
/// (entries replaced as they complete), it costs O(1) per completion: it
/// answers completions it was told of, and reads every entry only before it
/// waits. A NULL entry is `RPCAGENT_ERR_INVALID_ARGUMENT`, reported when the
/// call reads that entry (on the first call over an array, and at the latest
/// before any call waits). While the pending entries all go to one rank it
/// reads their replies itself; answered with more of them in flight, it may
/// leave that connection for its next call to read (the replies coming
/// meanwhile wake nobody): should it not be called again, the I/O thread
/// reads them within about 2 ms (any sleeping wait of this thread hands
/// them to it at once).
///
/// # Safety
/// `futures` is NULL or valid for `n` pointers, each a live future handle;
/// `out_index` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_future_wait_any(
    futures: *const *mut rpcagent_future_t,
    n: usize,
    timeout_ms: i64,
    out_index: *mut usize,
) -> rpcagent_status_t {
    guard(|| {
        if futures.is_null() || n == 0 || out_index.is_null() {
            return Err(invalid("futures or out_index is NULL, or n is 0"));
        }
        // SAFETY: `futures` is valid for `n` pointers by the caller's contract.
        let pointers = unsafe { std::slice::from_raw_parts(futures, n) };
        // Entries are checked for NULL as they are looked at (not all on
        // every call: taking a posted completion must not cost O(n)).
        // SAFETY: each non-NULL entry is a live future by the caller's
        // contract; they outlive this call.
        let future = |i: usize| unsafe { pointers[i].as_ref() }.map(|f| &f.future);
        let timeout = (timeout_ms >= 0).then(|| Duration::from_millis(timeout_ms as u64));
        match crate::future::wait_any_slots(n, future, timeout) {
            Ok(Some(i)) => {
                // SAFETY: checked non-NULL above.
                unsafe { put(out_index, i, "out_index") }?;
                Ok(RPCAGENT_OK)
            }
            Ok(None) => Ok(RPCAGENT_PENDING),
            Err(crate::future::MissingEntry(i)) => Err(invalid(format!("futures[{i}] is NULL"))),
        }
    })
}

/// Runs `cb(user_data)` exactly once when the call completes (success or
/// failure), on a library thread, even if the future was freed by then; at
/// once on the calling thread if it has completed already. `cb` must not block.
///
/// # Safety
/// `f` is NULL or a live future handle; `cb` may be called from any thread
/// with `user_data`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_future_on_complete(
    f: *mut rpcagent_future_t,
    cb: Option<unsafe extern "C" fn(user_data: *mut c_void)>,
    user_data: *mut c_void,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let f = unsafe { handle(f, "f") }?;
        let cb = cb.ok_or_else(|| invalid("cb is NULL"))?;
        // Kept as two words, not boxed: registering allocates nothing.
        f.future
            .on_complete_plain(run_c_callback, [cb as *const () as usize, user_data as usize]);
        Ok(RPCAGENT_OK)
    })
}

/// Cancels a pending call: it ends at once with `RPCAGENT_ERR_CANCELLED`
/// for waits, `wait_any`, queues and callbacks, and the destination is
/// told (a request not started there is dropped unrun; a running handler
/// sees `rpcagent_reply_cancelled`). On a call that has completed it
/// changes nothing (it keeps its status). `RPCAGENT_OK`, or
/// `RPCAGENT_ERR_INVALID_ARGUMENT` for NULL. Never blocks.
///
/// # Safety
/// `f` is NULL or a live future handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_future_cancel(f: *mut rpcagent_future_t) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        unsafe { handle(f, "f") }?.future.cancel();
        Ok(RPCAGENT_OK)
    })
}

/// Frees a future; NULL is a no-op. Freeing a pending future abandons the
/// call: its reply is dropped on arrival (callbacks still run).
///
/// # Safety
/// `f` is NULL or a live future handle, not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_future_free(f: *mut rpcagent_future_t) {
    if !f.is_null() {
        // SAFETY: `f` came from Box::into_raw in `boxed` and is freed once by
        // the caller's contract.
        let f = unsafe { Box::from_raw(f) };
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(f)));
    }
}
