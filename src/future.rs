//! The completion slot shared by a caller and whoever completes its call (the
//! thread that reads the response, the timer, or a failure), and the
//! [`RpcFuture`] handle over it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Result, RpcError};

pub(crate) type Callback = Box<dyn FnOnce() + Send>;

/// Runs a completion callback on a library thread.
pub(crate) type Spawner = Arc<dyn Fn(Callback) + Send + Sync>;

/// Something that can make progress on calls to a rank while a caller waits
/// (the TCP transport lets the caller read the connection itself).
pub(crate) trait Progress: Send + Sync {
    fn drive(&self, dst: usize, done: &dyn Fn() -> bool, deadline: Option<Instant>);
    /// Writes the requests held back to share a write (a caller is about
    /// to wait for replies).
    fn flush_batches(&self);
}

/// Where a future can make progress while waiting.
struct Driver {
    progress: Weak<dyn Progress>,
    dst: usize,
    deadline: Option<Instant>,
}

enum State {
    Pending {
        callbacks: Vec<(u64, Callback)>,
        next_id: u64,
    },
    /// `Ok(None)`: the reply bytes were already taken by a wait.
    Done(Result<Option<Vec<u8>>>),
}

/// Runs a completion callback; a panic in it is logged and goes no
/// further, so it cannot take down the library thread that completed the
/// call (the I/O loop, the deadline thread) or leave the call half done.
pub(crate) fn run_callback(cb: Callback) {
    // Callbacks must not block: a call one makes into a full send window
    // fails with BUSY instead of waiting for room.
    let ran = crate::threads::in_callback(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(cb)));
    if ran.is_err() {
        crate::log::log_at!(Error, None, "a completion callback panicked");
    }
}

/// One call's outcome, written once.
pub(crate) struct Slot {
    state: Mutex<State>,
    /// Set once `state` is `Done`: a waiter polling for its reply looks
    /// here without taking the lock.
    ready: AtomicBool,
    done: Condvar,
}

impl Slot {
    pub(crate) fn new() -> Arc<Slot> {
        Arc::new(Slot {
            state: Mutex::new(State::Pending {
                callbacks: Vec::new(),
                next_id: 0,
            }),
            ready: AtomicBool::new(false),
            done: Condvar::new(),
        })
    }

    /// A slot that is already complete (a call that failed before it left).
    pub(crate) fn completed(result: Result<Vec<u8>>) -> Arc<Slot> {
        Arc::new(Slot {
            state: Mutex::new(State::Done(result.map(Some))),
            ready: AtomicBool::new(true),
            done: Condvar::new(),
        })
    }

    /// Writes the outcome and runs the completion callbacks on this thread
    /// (off the library's threads, through `spawner` if there is one).
    /// Returns false (and drops `result`) when the slot was already complete.
    pub(crate) fn complete(&self, result: Result<Vec<u8>>, spawner: Option<&Spawner>) -> bool {
        let callbacks = {
            let mut state = self.state.lock();
            let State::Pending { callbacks, .. } = &mut *state else {
                return false;
            };
            let callbacks = std::mem::take(callbacks);
            *state = State::Done(result.map(Some));
            self.ready.store(true, Ordering::Release);
            callbacks
        };
        self.done.notify_all();
        for (_, cb) in callbacks {
            // Off the library's threads (a caller reading its own reply, a
            // user thread shutting down) callbacks go to the spawner, so a
            // callback never runs inside a user's wait, where it could
            // deadlock on the user's own locks.
            match spawner {
                Some(spawn) if !crate::threads::is_library() => spawn(cb),
                _ => run_callback(cb),
            }
        }
        true
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Runs `cb` once the slot completes; at once, on this thread, if it has.
    pub(crate) fn on_complete(&self, cb: Callback) {
        if let Err(cb) = self.subscribe(cb) {
            run_callback(cb);
        }
    }

    /// Registers `cb` unless the slot is complete (then `cb` comes back).
    fn subscribe(&self, cb: Callback) -> std::result::Result<u64, Callback> {
        let mut state = self.state.lock();
        match &mut *state {
            State::Pending { callbacks, next_id } => {
                *next_id += 1;
                callbacks.push((*next_id, cb));
                Ok(*next_id)
            }
            State::Done(_) => Err(cb),
        }
    }

    fn unsubscribe(&self, id: u64) {
        if let State::Pending { callbacks, .. } = &mut *self.state.lock() {
            callbacks.retain(|(i, _)| *i != id);
        }
    }

    /// Waits up to `deadline` (`None`: forever). `None` if still pending.
    /// Reply bytes are handed out once; later waits see an empty reply.
    fn wait_until(&self, deadline: Option<Instant>) -> Option<Result<Vec<u8>>> {
        let mut state = self.state.lock();
        loop {
            if let State::Done(result) = &mut *state {
                return Some(match result {
                    Ok(bytes) => Ok(bytes.take().unwrap_or_default()),
                    Err(e) => Err(e.clone()),
                });
            }
            match deadline {
                None => self.done.wait(&mut state),
                Some(d) => {
                    if self.done.wait_until(&mut state, d).timed_out() && !matches!(*state, State::Done(_)) {
                        return None;
                    }
                }
            }
        }
    }

    fn error(&self) -> Option<RpcError> {
        match &*self.state.lock() {
            State::Done(Err(e)) => Some(e.clone()),
            _ => None,
        }
    }
}

/// The pollable handle of an asynchronous call.
///
/// Dropping a pending future abandons the call: its reply is dropped on
/// arrival (completion callbacks still run).
pub struct RpcFuture {
    slot: Arc<Slot>,
    driver: Option<Driver>,
}

impl std::fmt::Debug for RpcFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcFuture").field("ready", &self.is_ready()).finish()
    }
}

impl RpcFuture {
    pub(crate) fn new(slot: Arc<Slot>) -> RpcFuture {
        RpcFuture { slot, driver: None }
    }

    /// A future whose waits may make progress through `progress` on calls
    /// to `dst` (until the call's `deadline`).
    pub(crate) fn with_driver(
        slot: Arc<Slot>,
        progress: Weak<dyn Progress>,
        dst: usize,
        deadline: Option<Instant>,
    ) -> RpcFuture {
        RpcFuture {
            slot,
            driver: Some(Driver {
                progress,
                dst,
                deadline,
            }),
        }
    }

    /// Waits until `deadline` (`None`: no bound), first making progress on
    /// the call itself where the transport allows.
    fn wait_until(&self, deadline: Option<Instant>) -> Option<Result<Vec<u8>>> {
        if let Some(d) = &self.driver
            && !self.slot.is_ready()
            && deadline.is_none_or(|t| t > Instant::now())
            && let Some(progress) = d.progress.upgrade()
        {
            let until = match (deadline, d.deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            progress.drive(d.dst, &|| self.slot.is_ready(), until);
        }
        self.slot.wait_until(deadline)
    }

    /// A future that has already failed.
    pub(crate) fn failed(error: RpcError) -> RpcFuture {
        RpcFuture::new(Slot::completed(Err(error)))
    }

    /// True once the call has completed, successfully or not.
    pub fn is_ready(&self) -> bool {
        self.slot.is_ready()
    }

    /// Waits for the outcome (the call's deadline bounds this wait).
    pub fn wait(self) -> Result<Vec<u8>> {
        self.wait_until(None)
            .expect("a wait without deadline returns an outcome")
    }

    /// Waits at most `timeout`; `None` if the call is still running. The
    /// reply bytes are handed out once: a later wait returns an empty reply
    /// (or the same error).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<Vec<u8>>> {
        self.wait_until(Some(Instant::now() + timeout))
    }

    /// Like [`RpcFuture::wait_timeout`] without a bound.
    pub fn wait_ref(&self) -> Result<Vec<u8>> {
        self.wait_until(None)
            .expect("a wait without deadline returns an outcome")
    }

    /// The error of a completed, failed call.
    pub fn error(&self) -> Option<RpcError> {
        self.slot.error()
    }

    /// Runs `cb` exactly once when the call completes, on the library thread
    /// that completes it, even if this future is dropped first; at once on
    /// this thread if it already has. `cb` must not block.
    pub fn on_complete(&self, cb: impl FnOnce() + Send + 'static) {
        self.slot.on_complete(Box::new(cb));
    }

    /// Waits until one of `futures` is complete and returns its index, or
    /// `None` when `timeout` (`None`: no bound) passes first.
    pub fn wait_any(futures: &[&RpcFuture], timeout: Option<Duration>) -> Option<usize> {
        if let Some(i) = futures.iter().position(|f| f.is_ready()) {
            return Some(i);
        }
        // Requests held back for company leave before this thread sleeps
        // (once per agent: neighbours usually share one).
        let mut flushed: Option<*const ()> = None;
        for d in futures.iter().filter_map(|f| f.driver.as_ref()) {
            let agent = d.progress.as_ptr() as *const ();
            if flushed != Some(agent)
                && let Some(progress) = d.progress.upgrade()
            {
                progress.flush_batches();
                flushed = Some(agent);
            }
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let signal = Arc::new((Mutex::new(None::<usize>), Condvar::new()));
        let mut subscriptions = Vec::with_capacity(futures.len());
        for (i, f) in futures.iter().enumerate() {
            let s = signal.clone();
            let cb: Callback = Box::new(move || {
                let mut first = s.0.lock();
                first.get_or_insert(i);
                s.1.notify_all();
            });
            match f.slot.subscribe(cb) {
                Ok(id) => subscriptions.push((i, id)),
                Err(_) => {
                    signal.0.lock().get_or_insert(i);
                    break;
                }
            }
        }
        let found = {
            let mut first = signal.0.lock();
            loop {
                if first.is_some() {
                    break *first;
                }
                match deadline {
                    None => signal.1.wait(&mut first),
                    Some(d) => {
                        if signal.1.wait_until(&mut first, d).timed_out() {
                            break *first;
                        }
                    }
                }
            }
        };
        for (i, id) in subscriptions {
            futures[i].slot.unsubscribe(id);
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn completes_once_and_hands_bytes_out_once() {
        let slot = Slot::new();
        let fut = RpcFuture::new(slot.clone());
        assert!(!fut.is_ready());
        assert!(fut.wait_timeout(Duration::ZERO).is_none());
        assert!(slot.complete(Ok(vec![1, 2]), None));
        assert!(!slot.complete(Ok(vec![3]), None));
        assert_eq!(fut.wait_timeout(Duration::ZERO), Some(Ok(vec![1, 2])));
        assert_eq!(fut.wait_timeout(Duration::ZERO), Some(Ok(vec![])));
    }

    #[test]
    fn callbacks_run_once_even_after_the_future_is_dropped() {
        let runs = Arc::new(AtomicUsize::new(0));
        let slot = Slot::new();
        let fut = RpcFuture::new(slot.clone());
        let r = runs.clone();
        fut.on_complete(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        drop(fut);
        slot.complete(Err(RpcError::Timeout("t".into())), None);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Registered after completion: runs at once.
        let r = runs.clone();
        RpcFuture::new(slot).on_complete(move || {
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn wait_any_finds_the_completed_one_or_times_out() {
        let slots: Vec<_> = (0..3).map(|_| Slot::new()).collect();
        let futs: Vec<_> = slots.iter().map(|s| RpcFuture::new(s.clone())).collect();
        let refs: Vec<&RpcFuture> = futs.iter().collect();
        assert_eq!(RpcFuture::wait_any(&refs, Some(Duration::from_millis(20))), None);
        let s2 = slots[2].clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            s2.complete(Ok(vec![]), None);
        });
        assert_eq!(RpcFuture::wait_any(&refs, None), Some(2));
        t.join().unwrap();
        assert_eq!(RpcFuture::wait_any(&refs, Some(Duration::ZERO)), Some(2));
    }
}
