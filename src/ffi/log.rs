//! Logging hooks: the process-wide level and an optional callback.

use std::ffi::{CString, c_char, c_void};
use std::sync::Arc;

use crate::log::{self, Level};

use super::{RPCAGENT_OK, guard, invalid, rpcagent_status_t};

/// Errors only.
pub const RPCAGENT_LOG_ERROR: i32 = 1;
/// Errors and warnings (the default).
pub const RPCAGENT_LOG_WARN: i32 = 2;
/// Also joining, leaving and other milestones.
pub const RPCAGENT_LOG_INFO: i32 = 3;
/// Everything.
pub const RPCAGENT_LOG_DEBUG: i32 = 4;

/// A log sink: receives the level and one whole line (rank prefix included).
pub type rpcagent_log_fn = Option<unsafe extern "C" fn(user_data: *mut c_void, level: i32, message: *const c_char)>;

struct Sink {
    f: unsafe extern "C" fn(*mut c_void, i32, *const c_char),
    user_data: *mut c_void,
}
// SAFETY: the C contract says the callback may be called from any library
// thread; the library only passes `user_data` back.
unsafe impl Send for Sink {}
// SAFETY: as above.
unsafe impl Sync for Sink {}

impl Sink {
    fn emit(&self, level: Level, line: &str) {
        let text = CString::new(line.replace('\0', "\\0")).expect("NULs replaced");
        // SAFETY: `f` was installed with `user_data` for such calls; `text`
        // lives across the call.
        unsafe { (self.f)(self.user_data, level as i32, text.as_ptr()) };
    }
}

/// Sends every emitted message to `fn(user_data, level, message)` instead of
/// stderr, from any library thread (process-wide; NULL restores stderr). The
/// callback must not call back into rpcagent.
///
/// # Safety
/// `fn` may be called from any thread with `user_data` until replaced.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn rpcagent_set_log_callback(r#fn: rpcagent_log_fn, user_data: *mut c_void) -> rpcagent_status_t {
    guard(|| {
        let sink = r#fn.map(|f| {
            let sink = Sink { f, user_data };
            Arc::new(move |level: Level, line: &str| sink.emit(level, line)) as log::LogSink
        });
        log::set_sink(sink);
        Ok(RPCAGENT_OK)
    })
}

/// Emits messages whose level is at most `max_level` (`RPCAGENT_LOG_ERROR` ..
/// `RPCAGENT_LOG_DEBUG`; 0 silences everything). The level starts from the
/// `RPCAGENT_LOG` variable (default `warn`).
#[unsafe(no_mangle)]
pub extern "C" fn rpcagent_set_log_level(max_level: i32) -> rpcagent_status_t {
    guard(|| {
        if !(0..=RPCAGENT_LOG_DEBUG).contains(&max_level) {
            return Err(invalid(format!("log level {max_level} is not 0..4")));
        }
        log::set_level(max_level);
        Ok(RPCAGENT_OK)
    })
}
