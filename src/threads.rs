//! What the calling thread is to the library: the one thread-local state.
//!
//! Why a thread-local at all: user code calls back into the library with no
//! handle to pass along (a handler or a completion callback calling
//! `rpcagent_call_async`), and what the library may do then depends on the
//! thread it runs on, not on the agent called: the thread that runs an I/O
//! loop, or a completion callback, must never wait for room in a send
//! window, whichever agent it calls. Everything else a thread does for the
//! library (the request a read pass keeps, whether more replies follow,
//! which batches wait to be written) is passed as explicit values.

use std::cell::Cell;

/// The job a thread does for the library.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Role {
    /// A user's thread (or a library thread between jobs).
    User,
    /// A pool worker running a job.
    Worker,
    /// Runs the I/O loop of the TCP transport identified by `transport`.
    IoLoop { transport: usize },
    /// Serves, in place, requests that I/O loop's pass kept: a worker
    /// meanwhile. `generation` tells its turns of serving apart (see
    /// `event_loop::serve_in_place`).
    LoopServing { transport: usize, generation: u64 },
    /// Serves one connection for an I/O loop, waiting only to read it.
    Responder,
    /// The deadline thread: completes calls that timed out.
    Timer,
}

#[derive(Clone, Copy)]
struct ThreadState {
    role: Role,
    /// Inside a completion callback or an inline handler, which must not
    /// block whichever thread runs them (an inline handler runs on the
    /// caller's own thread when a rank calls itself).
    must_not_block: bool,
    /// Handlers running on this thread (nested through inline calls).
    handlers: u32,
}

thread_local! {
    static STATE: Cell<ThreadState> = const {
        Cell::new(ThreadState {
            role: Role::User,
            must_not_block: false,
            handlers: 0,
        })
    };
}

/// Restores the thread's previous state when dropped (on unwinding too).
pub(crate) struct Restore(ThreadState);

impl Drop for Restore {
    fn drop(&mut self) {
        STATE.set(self.0);
    }
}

fn change(f: impl FnOnce(&mut ThreadState)) -> Restore {
    let before = STATE.get();
    let mut now = before;
    f(&mut now);
    STATE.set(now);
    Restore(before)
}

/// The calling thread takes `role` until the returned guard drops.
#[must_use]
pub(crate) fn enter(role: Role) -> Restore {
    change(|s| s.role = role)
}

pub(crate) fn role() -> Role {
    STATE.get().role
}

/// Whether the calling thread is one of the library's own.
pub(crate) fn is_library() -> bool {
    role() != Role::User
}

/// Whether the calling thread runs an I/O loop or serves a connection.
pub(crate) fn is_io_thread() -> bool {
    matches!(role(), Role::IoLoop { .. } | Role::Responder)
}

/// Whether the calling thread may block (on a full socket, a full send
/// window): not an I/O thread, not the deadline thread, not in a callback
/// or an inline handler.
pub(crate) fn may_block() -> bool {
    let s = STATE.get();
    matches!(s.role, Role::User | Role::Worker | Role::LoopServing { .. }) && !s.must_not_block
}

/// Runs `f` as a completion callback or an inline handler: a call it makes
/// into a full send window fails with `Busy` at once.
pub(crate) fn must_not_block<R>(f: impl FnOnce() -> R) -> R {
    let _restore = change(|s| s.must_not_block = true);
    f()
}

/// Runs `f` as a handler (calls it makes are let through a draining agent).
pub(crate) fn in_handler<R>(f: impl FnOnce() -> R) -> R {
    let _restore = change(|s| s.handlers += 1);
    f()
}

/// Whether a handler runs on the calling thread.
pub(crate) fn in_any_handler() -> bool {
    STATE.get().handlers > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_nest_and_restore() {
        assert!(may_block() && !is_library());
        {
            let _worker = enter(Role::Worker);
            assert!(may_block() && is_library() && !is_io_thread());
            must_not_block(|| assert!(!may_block()));
            assert!(may_block());
            {
                let _io = enter(Role::IoLoop { transport: 1 });
                assert!(is_io_thread() && !may_block());
            }
            assert_eq!(role(), Role::Worker);
            {
                let _serving = enter(Role::LoopServing {
                    transport: 1,
                    generation: 0,
                });
                assert!(may_block() && is_library() && !is_io_thread());
            }
            in_handler(|| in_handler(|| assert!(in_any_handler())));
            assert!(!in_any_handler());
        }
        assert_eq!(role(), Role::User);
    }

    #[test]
    fn a_panic_restores_the_role() {
        let _ = std::panic::catch_unwind(|| {
            let _io = enter(Role::Responder);
            panic!("inside");
        });
        assert_eq!(role(), Role::User);
    }
}
