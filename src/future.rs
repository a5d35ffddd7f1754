//! The completion slot shared by a caller and whoever completes its call (the
//! thread that reads the response, the timer, or a failure), and the
//! [`RpcFuture`] handle over it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Result, RpcError};
use crate::queue::QueueInner;
use crate::transport::Waiting;

pub(crate) type Callback = Box<dyn FnOnce() + Send>;

/// Runs a completion callback on a library thread.
pub(crate) type Spawner = Arc<dyn Fn(Callback) + Send + Sync>;

/// Something that can make progress on calls to a rank while a caller waits
/// (the TCP transport lets the caller read the connection itself).
pub(crate) trait Progress: Send + Sync {
    fn drive(&self, dst: usize, waiting: Waiting, done: &dyn Fn() -> bool, deadline: Option<Instant>);
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
        callbacks: Vec<Callback>,
        /// The completion queue this call posts its tag to.
        queue: Option<(Arc<QueueInner>, u64)>,
        /// The `wait_any` sets waiting on this call, with its index in each.
        watchers: Vec<(Arc<WaitSet>, usize)>,
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
    /// Attached to a completion queue (once, ever).
    notifies: AtomicBool,
    /// The first `wait_any` set that watched this call: where the next
    /// `wait_any` over the same array finds its set, with no lock, whether
    /// the call is still pending or not.
    first_set: std::sync::OnceLock<Arc<WaitSet>>,
}

impl Slot {
    pub(crate) fn new() -> Arc<Slot> {
        Arc::new(Slot {
            state: Mutex::new(State::Pending {
                callbacks: Vec::new(),
                queue: None,
                watchers: Vec::new(),
            }),
            ready: AtomicBool::new(false),
            done: Condvar::new(),
            notifies: AtomicBool::new(false),
            first_set: std::sync::OnceLock::new(),
        })
    }

    /// A slot that is already complete (a call that failed before it left).
    pub(crate) fn completed(result: Result<Vec<u8>>) -> Arc<Slot> {
        Arc::new(Slot {
            state: Mutex::new(State::Done(result.map(Some))),
            ready: AtomicBool::new(true),
            done: Condvar::new(),
            notifies: AtomicBool::new(false),
            first_set: std::sync::OnceLock::new(),
        })
    }

    /// Writes the outcome and runs the completion callbacks on this thread
    /// (off the library's threads, through `spawner` if there is one).
    /// Returns false (and drops `result`) when the slot was already complete.
    pub(crate) fn complete(&self, result: Result<Vec<u8>>, spawner: Option<&Spawner>) -> bool {
        let (callbacks, queue, watchers) = {
            let mut state = self.state.lock();
            let State::Pending {
                callbacks,
                queue,
                watchers,
            } = &mut *state
            else {
                return false;
            };
            let told = (std::mem::take(callbacks), queue.take(), std::mem::take(watchers));
            *state = State::Done(result.map(Some));
            self.ready.store(true, Ordering::Release);
            told
        };
        self.done.notify_all();
        // Posted after the slot's lock is let go (lock order: a wait set,
        // then a slot; never the other way).
        if let Some((q, tag)) = queue {
            q.post(tag);
        }
        for (set, index) in watchers {
            set.post(index);
        }
        for cb in callbacks {
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
    fn subscribe(&self, cb: Callback) -> std::result::Result<(), Callback> {
        match &mut *self.state.lock() {
            State::Pending { callbacks, .. } => {
                callbacks.push(cb);
                Ok(())
            }
            State::Done(_) => Err(cb),
        }
    }

    /// Posts `tag` to `q` when the call completes, or now if it has.
    /// False if the call already posts to a queue.
    pub(crate) fn notify(&self, q: &Arc<QueueInner>, tag: u64) -> bool {
        if self.notifies.swap(true, Ordering::AcqRel) {
            return false;
        }
        match &mut *self.state.lock() {
            State::Pending { queue, .. } => {
                *queue = Some((q.clone(), tag));
                true
            }
            State::Done(_) => {
                q.post(tag);
                true
            }
        }
    }

    /// Has `set` told (as `index`) when the call completes; false if it has
    /// completed already.
    fn watch(&self, set: &Arc<WaitSet>, index: usize) -> bool {
        self.first_set.get_or_init(|| set.clone());
        match &mut *self.state.lock() {
            State::Pending { watchers, .. } => {
                match watchers.iter_mut().find(|(w, _)| Arc::ptr_eq(w, set)) {
                    Some(entry) => entry.1 = index,
                    None => watchers.push((set.clone(), index)),
                }
                true
            }
            State::Done(_) => false,
        }
    }

    /// The first `wait_any` set that watched this call, if any.
    fn watcher(&self) -> Option<&Arc<WaitSet>> {
        self.first_set.get()
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
            progress.drive(d.dst, Waiting::OwnReply, &|| self.slot.is_ready(), until);
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
    /// `None` when `timeout` (`None`: no bound) passes first. Called again
    /// over (mostly) the same futures, it costs O(1) per completion plus a
    /// comparison of the array with the last one: see [`WaitSet`].
    pub fn wait_any(futures: &[&RpcFuture], timeout: Option<Duration>) -> Option<usize> {
        let deadline = timeout.map(|t| Instant::now() + t);
        wait_any_slots(futures.len(), |i| futures[i], deadline)
    }

    /// Posts `tag` to `queue` once the call completes (at once if it has),
    /// even if this future is dropped first. A call posts to one queue at
    /// most: a second `notify` is an `InvalidArgument` error.
    pub fn notify(&self, queue: &crate::Queue, tag: u64) -> Result<()> {
        if self.slot.notify(queue.inner(), tag) {
            if let Some(d) = &self.driver {
                queue.inner().note_driver(&d.progress, d.dst);
            }
            Ok(())
        } else {
            Err(RpcError::InvalidArgument(
                "the future already posts to a completion queue".into(),
            ))
        }
    }

    /// Writes requests held back for company (its caller is about to wait
    /// other than through this future's own wait).
    pub(crate) fn flush_batches(&self) {
        if let Some(progress) = self.driver.as_ref().and_then(|d| d.progress.upgrade()) {
            progress.flush_batches();
        }
    }
}

/// The waiting side of `wait_any`, kept between calls so that waiting again
/// over the same futures does not subscribe to each of them again. Each call
/// it watches is told to post its index here when it completes. A call of
/// `wait_any` compares the array with the one it saw last (`known`: a weak
/// handle per entry, which keeps a freed slot's address from being reused
/// by a new call while the set remembers it) and only watches the entries
/// that changed; it then
/// takes posted indexes, checking each against the array (an entry may
/// have been replaced since), and sleeps when none is left. Before it
/// sleeps it looks at every entry once, so it is right whatever the
/// bookkeeping missed (an array shared with another set, say).
pub(crate) struct WaitSet {
    state: Mutex<WaitSetState>,
    posted_cv: Condvar,
    /// Counts posts: a waiter reading replies itself stops once it moves
    /// (each waiter compares with the count it saw, so waiters sharing a
    /// set never hide a post from each other).
    posts: std::sync::atomic::AtomicU64,
}

struct WaitSetState {
    posted: std::collections::VecDeque<usize>,
    /// The slot each entry of the array held at the last call.
    known: Vec<Weak<Slot>>,
    sleeping: usize,
}

impl WaitSet {
    fn new() -> Arc<WaitSet> {
        Arc::new(WaitSet {
            state: Mutex::new(WaitSetState {
                posted: std::collections::VecDeque::new(),
                known: Vec::new(),
                sleeping: 0,
            }),
            posted_cv: Condvar::new(),
            posts: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn post(&self, index: usize) {
        let mut st = self.state.lock();
        st.posted.push_back(index);
        self.posts.fetch_add(1, Ordering::Release);
        // Every waiter: wait_any takes nothing away, so each one whose
        // array holds the entry must look.
        if st.sleeping > 0 {
            self.posted_cv.notify_all();
        }
    }
}

/// The destination of every pending one of `n` futures, when they all go
/// to one rank of one agent (the only case where reading that connection
/// sees every completion: others arrive through the I/O thread), with the
/// time to stop reading it: `deadline` or the earliest call's deadline.
fn one_destination<'a>(
    n: usize,
    future: &impl Fn(usize) -> &'a RpcFuture,
    deadline: Option<Instant>,
) -> Option<(&'a Driver, Option<Instant>)> {
    let mut found: Option<&Driver> = None;
    let mut until = deadline;
    for f in (0..n).map(future).filter(|f| !f.is_ready()) {
        let d = f.driver.as_ref()?;
        match found {
            Some(first) if first.dst != d.dst || !Weak::ptr_eq(&first.progress, &d.progress) => return None,
            _ => found = Some(d),
        }
        if let Some(t) = d.deadline {
            until = Some(until.map_or(t, |u| u.min(t)));
        }
    }
    found.map(|d| (d, until))
}

/// `wait_any` over `n` futures, the `i`th given by `future(i)`.
pub(crate) fn wait_any_slots<'a>(
    n: usize,
    future: impl Fn(usize) -> &'a RpcFuture,
    deadline: Option<Instant>,
) -> Option<usize> {
    if n == 0 {
        return None;
    }
    // The set that watched these futures last time (found on the first
    // entry that has one, without a lock: usually the first).
    let set = (0..n)
        .find_map(|i| future(i).slot.watcher().cloned())
        .unwrap_or_else(WaitSet::new);
    let mut st = set.state.lock();
    if st.known.len() != n {
        st.known.resize(n, Weak::new());
    }
    for i in 0..n {
        let slot = &future(i).slot;
        if st.known[i].as_ptr() != Arc::as_ptr(slot) {
            st.known[i] = Arc::downgrade(slot);
            if !slot.watch(&set, i) {
                st.posted.push_back(i);
            }
        }
    }
    let mut flushed = false;
    loop {
        // A posted entry stays at the front while its future is the one
        // that completed (it is answered again until replaced).
        while let Some(&i) = st.posted.front() {
            if i < n && future(i).is_ready() {
                return Some(i);
            }
            st.posted.pop_front();
        }
        if let Some(i) = (0..n).find(|&i| future(i).is_ready()) {
            return Some(i);
        }
        if !flushed {
            // Before sleeping, once: requests held back for company leave
            // (once per agent: neighbours usually share one), and this
            // thread may read a reply itself, as a single wait does (no
            // wake-up from the I/O thread when one call is in flight).
            flushed = true;
            let seen = set.posts.load(Ordering::Acquire);
            drop(st);
            let mut last: Option<*const ()> = None;
            for i in 0..n {
                if let Some(d) = &future(i).driver {
                    let agent = d.progress.as_ptr() as *const ();
                    if last != Some(agent) {
                        future(i).flush_batches();
                        last = Some(agent);
                    }
                }
            }
            if let Some((d, until)) = one_destination(n, &future, deadline)
                && let Some(progress) = d.progress.upgrade()
            {
                progress.drive(
                    d.dst,
                    Waiting::AnyReply,
                    &|| set.posts.load(Ordering::Acquire) != seen,
                    until,
                );
            }
            st = set.state.lock();
            continue;
        }
        st.sleeping += 1;
        let timed_out = match deadline {
            None => {
                set.posted_cv.wait(&mut st);
                false
            }
            Some(d) => set.posted_cv.wait_until(&mut st, d).timed_out(),
        };
        st.sleeping -= 1;
        if timed_out && st.posted.is_empty() {
            return (0..n).find(|&i| future(i).is_ready());
        }
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
