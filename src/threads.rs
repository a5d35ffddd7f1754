//! What the calling thread is to the library. Library threads (workers, the
//! I/O loop, the deadline thread) may run completion callbacks directly. An
//! I/O thread (the one running the I/O loop, or a responder serving one
//! connection for it) never waits to connect or to write (a responder waits
//! only to read its connection), and may keep one request to run itself
//! once it has handed its reading on (so a request on a quiet agent is
//! served without a wake-up in between).

use std::cell::{Cell, RefCell};
use std::sync::{Arc, Weak};

use crate::pool::Work;

/// Something holding frames this thread queued without writing.
pub(crate) trait Corked {
    fn flush_cork(&self);
}

thread_local! {
    static LIBRARY: Cell<bool> = const { Cell::new(false) };
    static IO_LOOP: Cell<bool> = const { Cell::new(false) };
    static RESPONDER: Cell<bool> = const { Cell::new(false) };
    /// A library thread that must never block (the deadline thread).
    static NO_BLOCK: Cell<bool> = const { Cell::new(false) };
    /// A worker with more jobs waiting (its replies may wait for company).
    static MORE_WORK: Cell<bool> = const { Cell::new(false) };
    /// Weak: a user thread's list must not keep a connection (its socket)
    /// alive past the agent's end.
    static CORKED: RefCell<Vec<Weak<dyn Corked + Send + Sync>>> = const { RefCell::new(Vec::new()) };
    static KEPT: RefCell<Kept> = const { RefCell::new(Kept::Nothing) };
}

/// What an I/O thread kept during the current read pass.
pub(crate) enum Kept {
    Nothing,
    One(Arc<str>, Work),
    /// Several requests came in one pass: the pool serves them all.
    Busy,
}

/// Marks the calling thread as one of the library's own.
pub(crate) fn mark_library() {
    LIBRARY.set(true);
}

pub(crate) fn is_library() -> bool {
    LIBRARY.get()
}

/// Whether the calling thread runs the I/O loop now.
pub(crate) fn set_io_loop(on: bool) {
    IO_LOOP.set(on);
}

pub(crate) fn is_io_loop() -> bool {
    IO_LOOP.get()
}

/// Whether the calling thread serves one connection for the I/O loop.
pub(crate) fn set_responder(on: bool) {
    RESPONDER.set(on);
}

/// Whether the calling thread runs the I/O loop or is a responder.
pub(crate) fn is_io_thread() -> bool {
    IO_LOOP.get() || RESPONDER.get()
}

/// Marks the calling thread as one that must never block.
pub(crate) fn mark_no_block() {
    NO_BLOCK.set(true);
}

/// Runs `f` as a thread that must not block (a completion callback): a
/// call it makes into a full send window fails with `Busy` at once.
pub(crate) fn without_blocking<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            NO_BLOCK.set(self.0);
        }
    }
    let _restore = Restore(NO_BLOCK.replace(true));
    f()
}

/// Whether the calling thread may block (on a connect, a full socket).
pub(crate) fn may_block() -> bool {
    !is_io_thread() && !NO_BLOCK.get()
}

/// On an I/O thread: keeps `work` to run on this thread after the current
/// read pass if it is the pass's only request; otherwise hands back what is
/// to be queued instead (this one, and the one kept before, if any).
pub(crate) fn keep(label: Arc<str>, work: Work) -> Vec<(Arc<str>, Work)> {
    KEPT.with(|k| {
        let mut k = k.borrow_mut();
        match std::mem::replace(&mut *k, Kept::Busy) {
            Kept::Nothing => {
                *k = Kept::One(label, work);
                Vec::new()
            }
            Kept::One(first_label, first) => vec![(first_label, first), (label, work)],
            Kept::Busy => vec![(label, work)],
        }
    })
}

/// The work kept during the last read pass (and a fresh pass begins).
pub(crate) fn take_kept() -> Kept {
    KEPT.with(|k| std::mem::replace(&mut *k.borrow_mut(), Kept::Nothing))
}

/// Runs a job this thread kept, once it has left its I/O duty: as a worker
/// that knows of no jobs waiting (the flag is stale from when the I/O job
/// began), so its reply is not held back for company.
pub(crate) fn run_kept(job: Work) {
    MORE_WORK.set(false);
    job();
}

/// Set by a worker before each job: whether more jobs wait behind it.
pub(crate) fn set_more_work(more: bool) {
    MORE_WORK.set(more);
}

pub(crate) fn more_work() -> bool {
    MORE_WORK.get()
}

/// Remembers that this thread left a corked batch in `c`.
pub(crate) fn note_corked(c: &Arc<dyn Corked + Send + Sync>) {
    let c = Arc::downgrade(c);
    CORKED.with(|list| {
        let mut list = list.borrow_mut();
        if !list.iter().any(|known| Weak::ptr_eq(known, &c)) {
            list.push(c);
        }
    });
}

/// Writes every batch this thread corked (it is about to wait or idle).
pub(crate) fn flush_corked() {
    let list = CORKED.with(|list| std::mem::take(&mut *list.borrow_mut()));
    for c in list.iter().filter_map(Weak::upgrade) {
        c.flush_cork();
    }
}
