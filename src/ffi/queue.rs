//! `rpcagent_queue_t`: completion queues for event loops.

use std::ffi::c_int;
use std::time::Duration;

use crate::Queue;

use super::future::rpcagent_future_t;
use super::{RPCAGENT_OK, RPCAGENT_PENDING, guard, handle, put, rpcagent_status_t};

/// A completion queue (opaque).
pub struct rpcagent_queue_t {
    queue: Queue,
}

/// Creates a completion queue in `*out_queue`; free it with
/// `rpcagent_queue_free`. One queue serves calls to any number of ranks and
/// agents.
///
/// # Safety
/// `out_queue` is NULL or writable (NULL is `RPCAGENT_ERR_INVALID_ARGUMENT`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_queue_new(out_queue: *mut *mut rpcagent_queue_t) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        unsafe { put(out_queue, std::ptr::null_mut(), "out_queue") }?;
        let q = Box::into_raw(Box::new(rpcagent_queue_t { queue: Queue::new() }));
        // SAFETY: checked writable above.
        unsafe { out_queue.write(q) };
        Ok(RPCAGENT_OK)
    })
}

/// Frees a queue; NULL is a no-op. Futures may still be attached: their
/// tags are dropped. Its descriptor closes now.
///
/// # Safety
/// `q` is NULL or a live queue, not used afterwards (no thread may still
/// wait on it).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_queue_free(q: *mut rpcagent_queue_t) {
    if !q.is_null() {
        // SAFETY: `q` came from Box::into_raw in `rpcagent_queue_new` and is
        // freed once by the caller's contract.
        let q = unsafe { Box::from_raw(q) };
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(q)));
    }
}

/// Posts `tag` to `q` exactly once when the call completes (success or
/// failure), or at once if it has, even if the future is freed meanwhile.
/// A future posts to one queue at most: a second attach is
/// `RPCAGENT_ERR_INVALID_ARGUMENT`. It may also have `on_complete`
/// callbacks. Read the result with `rpcagent_future_wait(f, 0, &buf)`.
///
/// # Safety
/// `f` is NULL or a live future; `q` is NULL or a live queue.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_future_notify(
    f: *mut rpcagent_future_t,
    q: *mut rpcagent_queue_t,
    tag: u64,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let f = unsafe { handle(f, "f") }?;
        // SAFETY: forwarded caller contract.
        let q = unsafe { handle(q, "q") }?;
        f.future().notify(&q.queue, tag)?;
        Ok(RPCAGENT_OK)
    })
}

/// Takes one posted tag, in completion order: `RPCAGENT_OK` with
/// `*out_tag` set, or `RPCAGENT_PENDING` when none came within `timeout_ms`
/// (0: do not block; < 0: wait forever). Any number of threads may wait on
/// one queue; each tag goes to exactly one of them. A waiter reads replies
/// itself while its calls all go to one rank; answered with more of them in
/// flight, it may leave that connection for its next wait to read (the
/// replies coming meanwhile wake nobody): should it not wait again, the
/// I/O thread reads them within about 2 ms (a wait that times out, or any
/// sleeping wait of this thread, hands them to it at once).
///
/// # Safety
/// `q` is NULL or a live queue; `out_tag` is NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_queue_wait(
    q: *mut rpcagent_queue_t,
    timeout_ms: i64,
    out_tag: *mut u64,
) -> rpcagent_status_t {
    guard(|| {
        // SAFETY: forwarded caller contract.
        let q = unsafe { handle(q, "q") }?;
        // SAFETY: forwarded caller contract.
        unsafe { put(out_tag, 0, "out_tag") }?;
        let timeout = (timeout_ms >= 0).then(|| Duration::from_millis(timeout_ms as u64));
        match q.queue.wait(timeout) {
            Some(tag) => {
                // SAFETY: checked writable above.
                unsafe { out_tag.write(tag) };
                Ok(RPCAGENT_OK)
            }
            None => Ok(RPCAGENT_PENDING),
        }
    })
}

/// A descriptor, owned by the queue, that polls readable (`poll`/`epoll`,
/// level-triggered) while the queue holds at least one tag, so an event
/// loop can wait on calls and its own sockets together. Never read, write
/// or close it. -1 for NULL (or if the system refuses an eventfd; see
/// `rpcagent_last_error`).
///
/// # Safety
/// `q` is NULL or a live queue.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_queue_fd(q: *const rpcagent_queue_t) -> c_int {
    super::guard_value(-1, || {
        // SAFETY: forwarded caller contract.
        let q = unsafe { handle(q, "q") }?;
        q.queue.fd()
    })
}
