//! The `extern "C"` surface: null checks, the panic boundary, ownership of
//! handles and buffers, and the thread-local last error. No logic of its
//! own: each function is a few lines over the Rust API.
//!
//! Every exported function runs its body through [`guard`] (or one of its
//! siblings), which turns an `Err` into a status code plus
//! `rpcagent_last_error()` text, and a panic into `RPCAGENT_ERR_INTERNAL`,
//! so nothing unwinds into C.
#![allow(non_camel_case_types)]

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};

use crate::error::{RpcError, Status};

mod agent;
mod buffer;
mod config;
mod future;
mod handler;
mod lend;
mod log;
mod queue;

pub use agent::*;
pub use buffer::*;
pub use config::*;
pub use future::*;
pub use handler::*;
pub use lend::*;
pub use log::*;
pub use queue::*;

/// Status of every fallible call: `RPCAGENT_OK` (0), `RPCAGENT_PENDING` (1),
/// or a negative error code. A fixed-width integer, so the ABI never depends
/// on the compiler's choice of enum size.
pub type rpcagent_status_t = i32;

/// Success.
pub const RPCAGENT_OK: rpcagent_status_t = 0;
/// A future is not complete yet (not an error).
pub const RPCAGENT_PENDING: rpcagent_status_t = 1;
/// NULL pointer, rank out of range, empty/too long/non-UTF-8 name, bad config.
pub const RPCAGENT_ERR_INVALID_ARGUMENT: rpcagent_status_t = -1;
/// The destination has no function of that name.
pub const RPCAGENT_ERR_NOT_FOUND: rpcagent_status_t = -2;
/// The remote handler reported an error or crashed (panic).
pub const RPCAGENT_ERR_HANDLER: rpcagent_status_t = -3;
/// The call's deadline passed.
pub const RPCAGENT_ERR_TIMEOUT: rpcagent_status_t = -4;
/// The connection to the destination failed or broke (peer died).
pub const RPCAGENT_ERR_PEER_LOST: rpcagent_status_t = -5;
/// This agent (or the destination) is shut down / shutting down.
pub const RPCAGENT_ERR_SHUTDOWN: rpcagent_status_t = -6;
/// A message exceeds the configured maximum.
pub const RPCAGENT_ERR_TOO_LARGE: rpcagent_status_t = -7;
/// Malformed frame or incompatible protocol version.
pub const RPCAGENT_ERR_PROTOCOL: rpcagent_status_t = -8;
/// The peer failed authentication (wrong or missing secret).
pub const RPCAGENT_ERR_AUTH: rpcagent_status_t = -9;
/// Joining the world failed (timeout, duplicate rank, world size mismatch, master unreachable).
pub const RPCAGENT_ERR_INIT: rpcagent_status_t = -10;
/// An operating-system I/O error not covered above.
pub const RPCAGENT_ERR_IO: rpcagent_status_t = -11;
/// A function of that name is already registered.
pub const RPCAGENT_ERR_EXISTS: rpcagent_status_t = -12;
/// The destination's send window is full and this call may not wait for
/// room: it was made on a library thread that must not block (an inline
/// handler, a completion callback). See `rpcagent_config_set_send_window_bytes`.
pub const RPCAGENT_ERR_BUSY: rpcagent_status_t = -13;
/// The call was cancelled by `rpcagent_future_cancel`.
pub const RPCAGENT_ERR_CANCELLED: rpcagent_status_t = -14;
/// A bug: an internal panic was caught.
pub const RPCAGENT_ERR_INTERNAL: rpcagent_status_t = -99;

/// Wait without bound (barrier, shutdown, future waits).
pub const RPCAGENT_WAIT_FOREVER: i64 = -1;
/// Call timeout: use the agent's configured call timeout.
pub const RPCAGENT_TIMEOUT_DEFAULT: i64 = -1;
/// Call timeout: no deadline.
pub const RPCAGENT_TIMEOUT_NONE: i64 = 0;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let text = CString::new(message.replace('\0', "\\0")).expect("NULs were replaced");
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// Records `e` as this thread's last error and returns its status.
fn fail(e: &RpcError) -> rpcagent_status_t {
    set_last_error(&e.to_string());
    e.status() as i32
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("internal error (a bug in rpcagent, please report it): {what}")
}

/// The panic boundary for functions returning a status.
fn guard(body: impl FnOnce() -> Result<rpcagent_status_t, RpcError>) -> rpcagent_status_t {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => fail(&e),
        Err(panic) => {
            set_last_error(&panic_message(panic));
            RPCAGENT_ERR_INTERNAL
        }
    }
}

/// The panic boundary for functions returning a value (pointer, count):
/// an error or panic gives `fallback` and sets the last error.
fn guard_value<T>(fallback: T, body: impl FnOnce() -> Result<T, RpcError>) -> T {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            fail(&e);
            fallback
        }
        Err(panic) => {
            set_last_error(&panic_message(panic));
            fallback
        }
    }
}

fn invalid(what: impl Into<String>) -> RpcError {
    RpcError::InvalidArgument(what.into())
}

/// Borrows a handle, or fails with INVALID_ARGUMENT naming it.
///
/// # Safety
/// `ptr` is NULL or a live handle of type `T` handed out by this library.
unsafe fn handle<'a, T>(ptr: *const T, what: &str) -> Result<&'a T, RpcError> {
    // SAFETY: by the caller's contract, non-NULL means a live handle.
    unsafe { ptr.as_ref() }.ok_or_else(|| invalid(format!("{what} is NULL")))
}

/// Reads a C string argument as UTF-8.
///
/// # Safety
/// `ptr` is NULL or points at a NUL-terminated string valid for the call.
unsafe fn c_str<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, RpcError> {
    if ptr.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and NUL-terminated by the caller's contract.
    let bytes = unsafe { CStr::from_ptr(ptr) }.to_bytes();
    std::str::from_utf8(bytes).map_err(|_| invalid(format!("{what} is not valid UTF-8")))
}

/// Borrows `len` bytes at `ptr` (NULL is allowed when `len` is 0).
///
/// # Safety
/// `ptr` is NULL or valid for reads of `len` bytes for the call.
unsafe fn bytes<'a>(ptr: *const u8, len: usize, what: &str) -> Result<&'a [u8], RpcError> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(invalid(format!("{what} is NULL but its length is {len}")));
    }
    // SAFETY: non-NULL and valid for `len` bytes by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Writes through an out-pointer, or fails if it is NULL.
///
/// # Safety
/// `out` is NULL or valid for a write of `T`.
unsafe fn put<T>(out: *mut T, value: T, what: &str) -> Result<(), RpcError> {
    if out.is_null() {
        return Err(invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL and writable by the caller's contract.
    unsafe { out.write(value) };
    Ok(())
}

/// A millisecond timeout of the wait kind: `< 0` forever, `0` no wait.
fn wait_timeout(ms: i64) -> Option<std::time::Duration> {
    (ms >= 0).then(|| std::time::Duration::from_millis(ms as u64))
}

/// The static name of a status, e.g. `"RPCAGENT_ERR_TIMEOUT"`
/// (`"RPCAGENT_UNKNOWN_STATUS"` for a code that is not one).
#[unsafe(no_mangle)]
pub extern "C" fn rpcagent_status_str(status: rpcagent_status_t) -> *const c_char {
    let name: &'static CStr = match Status::from_code(status) {
        Some(Status::Ok) => c"RPCAGENT_OK",
        Some(Status::Pending) => c"RPCAGENT_PENDING",
        Some(Status::InvalidArgument) => c"RPCAGENT_ERR_INVALID_ARGUMENT",
        Some(Status::NotFound) => c"RPCAGENT_ERR_NOT_FOUND",
        Some(Status::Handler) => c"RPCAGENT_ERR_HANDLER",
        Some(Status::Timeout) => c"RPCAGENT_ERR_TIMEOUT",
        Some(Status::PeerLost) => c"RPCAGENT_ERR_PEER_LOST",
        Some(Status::Shutdown) => c"RPCAGENT_ERR_SHUTDOWN",
        Some(Status::TooLarge) => c"RPCAGENT_ERR_TOO_LARGE",
        Some(Status::Protocol) => c"RPCAGENT_ERR_PROTOCOL",
        Some(Status::Auth) => c"RPCAGENT_ERR_AUTH",
        Some(Status::Init) => c"RPCAGENT_ERR_INIT",
        Some(Status::Io) => c"RPCAGENT_ERR_IO",
        Some(Status::Exists) => c"RPCAGENT_ERR_EXISTS",
        Some(Status::Busy) => c"RPCAGENT_ERR_BUSY",
        Some(Status::Cancelled) => c"RPCAGENT_ERR_CANCELLED",
        Some(Status::Internal) => c"RPCAGENT_ERR_INTERNAL",
        None => c"RPCAGENT_UNKNOWN_STATUS",
    };
    name.as_ptr()
}

/// The message of the last error on the calling thread ("" if none yet).
/// Valid until the next rpcagent call on this thread. For remote failures it
/// names the remote rank, the function and the remote message.
#[unsafe(no_mangle)]
pub extern "C" fn rpcagent_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The library's version, e.g. "0.1.0" (the header's `RPCAGENT_VERSION_*`
/// macros give the version compiled against).
#[unsafe(no_mangle)]
pub extern "C" fn rpcagent_version() -> *const c_char {
    const VERSION: &CStr = match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(v) => v,
        Err(_) => panic!("the crate version has no NUL"),
    };
    VERSION.as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_constants_match_the_rust_codes() {
        let constants = [
            RPCAGENT_OK,
            RPCAGENT_PENDING,
            RPCAGENT_ERR_INVALID_ARGUMENT,
            RPCAGENT_ERR_NOT_FOUND,
            RPCAGENT_ERR_HANDLER,
            RPCAGENT_ERR_TIMEOUT,
            RPCAGENT_ERR_PEER_LOST,
            RPCAGENT_ERR_SHUTDOWN,
            RPCAGENT_ERR_TOO_LARGE,
            RPCAGENT_ERR_PROTOCOL,
            RPCAGENT_ERR_AUTH,
            RPCAGENT_ERR_INIT,
            RPCAGENT_ERR_IO,
            RPCAGENT_ERR_EXISTS,
            RPCAGENT_ERR_BUSY,
            RPCAGENT_ERR_CANCELLED,
            RPCAGENT_ERR_INTERNAL,
        ];
        let codes: Vec<i32> = Status::ALL.iter().map(|s| *s as i32).collect();
        assert_eq!(constants.to_vec(), codes);
    }

    #[test]
    fn every_status_has_its_c_name() {
        for s in Status::ALL {
            // SAFETY: rpcagent_status_str returns a static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(rpcagent_status_str(s as i32)) };
            assert_eq!(name.to_str().unwrap(), s.name());
        }
    }

    #[test]
    fn panics_become_internal_errors() {
        let status = guard(|| panic!("kaboom"));
        assert_eq!(status, RPCAGENT_ERR_INTERNAL);
        // SAFETY: rpcagent_last_error returns a live NUL-terminated string.
        let msg = unsafe { CStr::from_ptr(rpcagent_last_error()) };
        assert!(msg.to_str().unwrap().contains("kaboom"));
    }
}
