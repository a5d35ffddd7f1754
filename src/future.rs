//! The completion slot shared by a caller and whoever completes its call (the
//! thread that reads the response, the timer, or a failure), and the
//! [`RpcFuture`] handle over it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Result, RpcError};
use crate::queue::QueueInner;
use crate::transport::Waiting;

/// A completion callback. A C callback is a plain function and its
/// pointer, kept as they are: registering it allocates nothing, and the
/// library thread that runs it (usually not the one that registered it)
/// frees nothing.
pub(crate) enum Callback {
    Boxed(Box<dyn FnOnce() + Send>),
    /// `run(words)`: a function of two words (a C callback and its
    /// `user_data`, say), called once.
    Plain {
        run: fn([usize; 2]),
        words: [usize; 2],
    },
}

impl Callback {
    fn run(self) {
        match self {
            Callback::Boxed(cb) => cb(),
            Callback::Plain { run, words } => run(words),
        }
    }
}

/// Items of which a call almost always has one (its callbacks, the
/// `wait_any` sets watching it): the first is kept inline, so that adding
/// it allocates nothing.
struct Few<T> {
    first: Option<T>,
    more: Vec<T>,
}

impl<T> Default for Few<T> {
    fn default() -> Few<T> {
        Few {
            first: None,
            more: Vec::new(),
        }
    }
}

impl<T> Few<T> {
    fn push(&mut self, item: T) {
        match self.first {
            None => self.first = Some(item),
            Some(_) => self.more.push(item),
        }
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.first.iter_mut().chain(self.more.iter_mut())
    }

    fn into_iter(self) -> impl Iterator<Item = T> {
        self.first.into_iter().chain(self.more)
    }
}

/// Runs a completion callback on a library thread.
pub(crate) type Spawner = Arc<dyn Fn(Callback) + Send + Sync>;

/// Something that can make progress on calls to a rank while a caller waits
/// (the TCP transport lets the caller read the connection itself).
pub(crate) trait Progress: Send + Sync {
    /// Reads replies from `dst` on this thread until `done()` or
    /// `deadline`, where the transport allows. Answered, it may leave the
    /// connection parked for this thread's next wait.
    fn drive(&self, dst: usize, waiting: Waiting<'_>, done: &dyn Fn() -> bool, deadline: Option<Instant>);
    /// Ends the parkings this thread left (see `drive`): it is about to
    /// sleep, and the I/O loop must read what comes on them.
    fn unpark_mine(&self);
    /// Writes the requests held back to share a write (a caller is about
    /// to wait for replies).
    fn flush_batches(&self);
    /// Ends call `id` to `dst` with a cancelled error if it is still in
    /// flight, and tells `dst`.
    fn cancel(&self, dst: usize, id: u64);
}

/// Where a future can make progress while waiting.
struct Driver {
    progress: Weak<dyn Progress>,
    dst: usize,
    /// The call's id (for a cancel).
    id: u64,
    deadline: Option<Instant>,
}

enum State {
    Pending {
        callbacks: Few<Callback>,
        /// The completion queue this call posts its tag to.
        queue: Option<(Arc<QueueInner>, u64)>,
        /// The `wait_any` sets waiting on this call, with its index in each.
        watchers: Watchers,
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
    let ran = crate::threads::must_not_block(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cb.run())));
    if ran.is_err() {
        crate::log::log_at!(Error, None, "a completion callback panicked");
    }
}

/// The `wait_any` sets waiting on one call, with its index in each.
#[derive(Default)]
struct Watchers(Few<(Arc<WaitSet>, usize)>);

impl Watchers {
    /// `set` is told `index` on completion (a set already watching gets
    /// the new index: the call moved in its array).
    fn set(&mut self, set: &Arc<WaitSet>, index: usize) {
        if let Some(entry) = self.0.iter_mut().find(|(w, _)| Arc::ptr_eq(w, set)) {
            entry.1 = index;
            return;
        }
        self.0.push((set.clone(), index));
    }

    fn into_iter(self) -> impl Iterator<Item = (Arc<WaitSet>, usize)> {
        self.0.into_iter()
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
    /// Unique in this process, never 0: how a `wait_any` set tells a new
    /// call from the one an entry held before without keeping that one's
    /// memory (see `WaitSetState::known`).
    serial: u64,
}

/// The next [`Slot::serial`].
static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);

impl Slot {
    pub(crate) fn new() -> Arc<Slot> {
        Arc::new(Slot {
            state: Mutex::new(State::Pending {
                callbacks: Few::default(),
                queue: None,
                watchers: Watchers::default(),
            }),
            ready: AtomicBool::new(false),
            done: Condvar::new(),
            notifies: AtomicBool::new(false),
            first_set: std::sync::OnceLock::new(),
            serial: NEXT_SERIAL.fetch_add(1, Ordering::Relaxed),
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
            serial: NEXT_SERIAL.fetch_add(1, Ordering::Relaxed),
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
            q.post_attached(tag);
        }
        for (set, index) in watchers.into_iter() {
            set.post(index);
        }
        for cb in callbacks.into_iter() {
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
                q.attach();
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
                watchers.set(set, index);
                true
            }
            State::Done(_) => false,
        }
    }

    /// The first `wait_any` set that watched this call, if any.
    fn watcher(&self) -> Option<&Arc<WaitSet>> {
        self.first_set.get()
    }

    /// The outcome if the call has completed (`None` if still pending).
    /// Reply bytes are handed out once; later looks see an empty reply.
    fn take_outcome(&self) -> Option<Result<Vec<u8>>> {
        Self::take_from(&mut self.state.lock())
    }

    fn take_from(state: &mut State) -> Option<Result<Vec<u8>>> {
        match state {
            State::Done(result) => Some(match result {
                Ok(bytes) => Ok(bytes.take().unwrap_or_default()),
                Err(e) => Err(e.clone()),
            }),
            State::Pending { .. } => None,
        }
    }

    /// Waits up to `deadline` (`None`: forever). `None` if still pending.
    /// Reply bytes are handed out once; later waits see an empty reply.
    fn wait_until(&self, deadline: Option<Instant>) -> Option<Result<Vec<u8>>> {
        let mut state = self.state.lock();
        loop {
            if let Some(outcome) = Self::take_from(&mut state) {
                return Some(outcome);
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
        id: u64,
        deadline: Option<Instant>,
    ) -> RpcFuture {
        RpcFuture {
            slot,
            driver: Some(Driver {
                progress,
                dst,
                id,
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
        if !self.slot.is_ready()
            && let Some(progress) = self.driver.as_ref().and_then(|d| d.progress.upgrade())
        {
            // About to sleep: what this thread parked is the loop's to read.
            progress.unpark_mine();
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
        if timeout.is_zero() {
            // A look, not a wait: no clock, no reading of the connection.
            return self.slot.take_outcome();
        }
        self.wait_until(Some(Instant::now() + timeout))
    }

    /// Like [`RpcFuture::wait_timeout`] without a bound.
    pub fn wait_ref(&self) -> Result<Vec<u8>> {
        self.wait_until(None)
            .expect("a wait without deadline returns an outcome")
    }

    /// Ends the call at once if it is still pending: waits, `wait_any`,
    /// queues and callbacks see [`RpcError::Cancelled`]. The destination is
    /// told: a request not yet started there is dropped unrun, and a
    /// running handler sees [`crate::Request::is_cancelled`]. A call that
    /// has completed keeps its outcome.
    pub fn cancel(&self) {
        if let Some(d) = &self.driver
            && !self.slot.is_ready()
            && let Some(progress) = d.progress.upgrade()
        {
            progress.cancel(d.dst, d.id);
        }
    }

    /// The error of a completed, failed call.
    pub fn error(&self) -> Option<RpcError> {
        self.slot.error()
    }

    /// Runs `cb` exactly once when the call completes, on the library thread
    /// that completes it, even if this future is dropped first; at once on
    /// this thread if it already has. `cb` must not block.
    pub fn on_complete(&self, cb: impl FnOnce() + Send + 'static) {
        self.slot.on_complete(Callback::Boxed(Box::new(cb)));
    }

    /// Like [`RpcFuture::on_complete`] for a plain function of two words
    /// (a C callback and its data): nothing is allocated.
    pub(crate) fn on_complete_plain(&self, run: fn([usize; 2]), words: [usize; 2]) {
        self.slot.on_complete(Callback::Plain { run, words });
    }

    /// Waits until one of `futures` is complete and returns its index, or
    /// `None` when `timeout` (`None`: no bound) passes first. Called again
    /// over (mostly) the same futures, it costs O(1) per completion, plus one
    /// look at every entry before it waits: see [`WaitSet`].
    pub fn wait_any(futures: &[&RpcFuture], timeout: Option<Duration>) -> Option<usize> {
        wait_any_slots(futures.len(), |i| Some(futures[i]), timeout).expect("no entry of a slice is missing")
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
}

/// The waiting side of `wait_any`, kept between calls so that waiting again
/// over the same futures does not subscribe to each of them again. Each call
/// it watches is told to post its index here when it completes. A call of
/// `wait_any` first answers posted indexes, checking each against the array
/// (an entry may have been replaced since): O(1) per completion. Only when
/// none is left does it look at every entry (`full_pass`): it watches the
/// entries that changed since the last look (`known`: the serial of each
/// entry's slot, which no later call shares, as an address could once the
/// slot is freed), answers one already complete (so it
/// is right whatever the bookkeeping missed: an array shared with another
/// set, say), and otherwise reads replies itself or sleeps.
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
    /// The serial of the slot each entry of the array held at the last
    /// look (0: none). A serial, not a weak handle: a weak handle keeps the
    /// slot's memory, and a look that replaced many let go of them all at
    /// once, a burst of frees the allocator's per-thread cache cannot hold
    /// (measured: 8% of a `wait_any` caller's instructions).
    known: Vec<u64>,
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

/// What one look at every entry found (see `wait_any_slots`).
struct FullPass<'a> {
    /// A complete entry, if any.
    ready: Option<usize>,
    /// An entry whose agent holds requests back for company, and whether
    /// the entries span more than one agent (then each is asked).
    some_agent: Option<&'a RpcFuture>,
    many_agents: bool,
    /// The one destination every pending entry goes to, with the time to
    /// stop reading it (`deadline` or the earliest call's deadline); `None`
    /// when they go to several, or one cannot be driven (only reading that
    /// connection sees every completion: others arrive through the I/O thread).
    one_destination: Option<(&'a Driver, Option<Instant>)>,
    /// Entries still pending (with `one_destination`, all to it).
    pending: usize,
}

/// Looks at every entry once: watches those that changed since the set's
/// last pass (an entry already complete is posted at once), and notes what
/// the waiter may do before it sleeps. Runs with the set's lock held.
fn full_pass<'a>(
    set: &Arc<WaitSet>,
    st: &mut WaitSetState,
    n: usize,
    future: &impl Fn(usize) -> Option<&'a RpcFuture>,
    deadline: Option<Instant>,
) -> std::result::Result<FullPass<'a>, MissingEntry> {
    if st.known.len() != n {
        st.known.resize(n, 0);
    }
    let mut pass = FullPass {
        ready: None,
        some_agent: None,
        many_agents: false,
        one_destination: None,
        pending: 0,
    };
    let mut drivable = true;
    let mut until = deadline;
    for i in 0..n {
        let f = future(i).ok_or(MissingEntry(i))?;
        if st.known[i] != f.slot.serial {
            st.known[i] = f.slot.serial;
            if !f.slot.watch(set, i) {
                st.posted.push_back(i);
            }
        }
        if let Some(d) = &f.driver {
            match pass.some_agent.and_then(|first| first.driver.as_ref()) {
                None => pass.some_agent = Some(f),
                Some(first) => pass.many_agents |= !Weak::ptr_eq(&first.progress, &d.progress),
            }
        }
        if f.slot.is_ready() {
            pass.ready.get_or_insert(i);
            continue;
        }
        pass.pending += 1;
        match (&f.driver, pass.one_destination) {
            (None, _) => drivable = false,
            (Some(d), None) => pass.one_destination = Some((d, None)),
            (Some(d), Some((first, _))) => {
                drivable &= first.dst == d.dst && Weak::ptr_eq(&first.progress, &d.progress);
            }
        }
        if let Some(t) = f.driver.as_ref().and_then(|d| d.deadline) {
            until = Some(until.map_or(t, |u| u.min(t)));
        }
    }
    if !drivable {
        pass.one_destination = None;
    }
    if let Some((d, _)) = pass.one_destination {
        pass.one_destination = Some((d, until));
    }
    Ok(pass)
}

/// The agents behind a `wait_any`'s entries (see `to_unpark`).
enum Agents {
    One(Weak<dyn Progress>),
    /// Each is found by a walk over the entries.
    Many,
}

/// `wait_any` was given no future at this index (a NULL entry from C).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct MissingEntry(pub(crate) usize);

/// `wait_any` over `n` futures, the `i`th given by `future(i)` (`None`: the
/// entry is missing, an error found when the entry is looked at: at the
/// latest in the call's first look at every entry).
///
/// Taking a completion costs O(1): posted indexes are answered first, each
/// checked against the array (the entry may have been replaced since). Only
/// when none is left does the call look at every entry (`full_pass`), once,
/// before it reads replies itself or sleeps; that look is paid for by the
/// wait it precedes. Entries replaced since the last pass are not watched
/// until then, which only delays them behind completions already posted.
pub(crate) fn wait_any_slots<'a>(
    n: usize,
    future: impl Fn(usize) -> Option<&'a RpcFuture>,
    timeout: Option<Duration>,
) -> std::result::Result<Option<usize>, MissingEntry> {
    if n == 0 {
        return Ok(None);
    }
    // The set that watched these futures last time (found on the first
    // entry that has one, without a lock: usually among the first few).
    let mut set = None;
    for i in 0..n {
        if let Some(s) = future(i).ok_or(MissingEntry(i))?.slot.watcher() {
            set = Some(s.clone());
            break;
        }
    }
    let set = set.unwrap_or_else(WaitSet::new);
    let mut st = set.state.lock();
    // The clock is read only once a first look found nothing posted (a
    // busy pipeline's waits usually find a completion).
    if let Some(i) = take_posted(&mut st, n, &future)? {
        return Ok(Some(i));
    }
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    // The post count when this call last looked at every entry: a post
    // since then that answers nothing here (another array's that shares
    // the set, or for an entry this array holds twice: a slot posts one
    // index per set) means the look must be made again, or the call could
    // sleep past a completion. `None`: no look yet.
    let mut looked_at: Option<u64> = None;
    // The agents whose connections this thread may have parked, to hand
    // to their I/O loops before it sleeps (taken once per look).
    let mut to_unpark: Option<Agents> = None;
    loop {
        // A posted entry stays at the front while its future is the one
        // that completed (it is answered again until replaced).
        if let Some(i) = take_posted(&mut st, n, &future)? {
            return Ok(Some(i));
        }
        if looked_at.is_some() && deadline.is_some_and(|d| Instant::now() >= d) {
            // Looked once at least: posts that keep answering nothing here
            // do not hold the call past its deadline.
            return Ok(first_ready(n, &future));
        }
        if looked_at.is_some_and(|seen| seen != set.posts.load(Ordering::Acquire)) {
            looked_at = None;
        }
        if looked_at.is_some() {
            // About to sleep: connections this thread parked (in this
            // call, or an earlier one) are the I/O loop's to read from now
            // on.
            if let Some(agents) = to_unpark.take() {
                drop(st);
                match agents {
                    Agents::One(agent) => {
                        if let Some(progress) = agent.upgrade() {
                            progress.unpark_mine();
                        }
                    }
                    Agents::Many => each_agent(n, &future, |p| p.unpark_mine()),
                }
                st = set.state.lock();
                continue;
            }
            // Every entry is watched and nothing posted since: sleep until
            // one posts.
            st.sleeping += 1;
            let timed_out = match deadline {
                None => {
                    set.posted_cv.wait(&mut st);
                    false
                }
                Some(d) => set.posted_cv.wait_until(&mut st, d).timed_out(),
            };
            st.sleeping -= 1;
            if timed_out {
                // Once, and never past the deadline again: a post that came
                // with it, else any entry complete by now.
                if let Some(i) = take_posted(&mut st, n, &future)? {
                    return Ok(Some(i));
                }
                return Ok(first_ready(n, &future));
            }
            continue;
        }
        looked_at = Some(set.posts.load(Ordering::Acquire));
        let pass = full_pass(&set, &mut st, n, &future, deadline)?;
        if let Some(i) = pass.ready {
            return Ok(Some(i));
        }
        if !st.posted.is_empty() {
            continue;
        }
        // Before sleeping, once: requests held back for company leave
        // (once per agent), and this thread may read a reply itself, as a
        // single wait does (no wake-up from the I/O thread per reply).
        let seen = set.posts.load(Ordering::Acquire);
        drop(st);
        to_unpark = match pass.some_agent.and_then(|f| f.driver.as_ref()) {
            Some(d) if !pass.many_agents => {
                if let Some(progress) = d.progress.upgrade() {
                    progress.flush_batches();
                }
                Some(Agents::One(d.progress.clone()))
            }
            Some(_) => {
                each_agent(n, &future, |p| p.flush_batches());
                Some(Agents::Many)
            }
            None => None,
        };
        if let Some((d, until)) = pass.one_destination
            && let Some(progress) = d.progress.upgrade()
        {
            // The entries still pending: those pending at the look, less
            // those posted since (a post may be another array's: fewer);
            // none while another thread sleeps on the set (it may wait for
            // a call this thread would not come back for).
            let covers = || {
                if set.state.lock().sleeping > 0 {
                    return 0;
                }
                let posted = set.posts.load(Ordering::Acquire).wrapping_sub(seen);
                pass.pending
                    .saturating_sub(usize::try_from(posted).unwrap_or(usize::MAX))
            };
            progress.drive(
                d.dst,
                Waiting::AnyReply { covers: &covers },
                &|| set.posts.load(Ordering::Acquire) != seen,
                until,
            );
        }
        st = set.state.lock();
    }
}

/// The first complete entry, looking at every one (a missing one is
/// skipped: the look that found it missing already reported it).
fn first_ready<'a>(n: usize, future: &impl Fn(usize) -> Option<&'a RpcFuture>) -> Option<usize> {
    (0..n).find(|&i| future(i).is_some_and(RpcFuture::is_ready))
}

/// The first posted index that answers this array (its entry is complete),
/// dropping those that do not.
fn take_posted<'a>(
    st: &mut WaitSetState,
    n: usize,
    future: &impl Fn(usize) -> Option<&'a RpcFuture>,
) -> std::result::Result<Option<usize>, MissingEntry> {
    while let Some(&i) = st.posted.front() {
        if i < n && future(i).ok_or(MissingEntry(i))?.is_ready() {
            return Ok(Some(i));
        }
        st.posted.pop_front();
    }
    Ok(None)
}

/// Runs `act` once for each agent behind `n` futures (once per run of
/// neighbours on one agent): writing the requests each holds back, or
/// ending the parkings this thread left on each.
fn each_agent<'a>(n: usize, future: &impl Fn(usize) -> Option<&'a RpcFuture>, act: impl Fn(&dyn Progress)) {
    let mut last: Option<*const ()> = None;
    for f in (0..n).filter_map(future) {
        if let Some(d) = &f.driver {
            let agent = d.progress.as_ptr() as *const ();
            if last != Some(agent) {
                if let Some(progress) = d.progress.upgrade() {
                    act(&*progress);
                }
                last = Some(agent);
            }
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

    #[test]
    fn wait_any_sees_replaced_entries_posted_or_not() {
        let mut slots: Vec<_> = (0..3).map(|_| Slot::new()).collect();
        let mut futs: Vec<_> = slots.iter().map(|s| RpcFuture::new(s.clone())).collect();
        let wait = |futs: &[RpcFuture], timeout_ms| {
            let refs: Vec<&RpcFuture> = futs.iter().collect();
            RpcFuture::wait_any(&refs, Some(Duration::from_millis(timeout_ms)))
        };
        assert_eq!(wait(&futs, 0), None); // the first look watches all three
        slots[0].complete(Ok(vec![]), None);
        slots[1].complete(Ok(vec![]), None);
        assert_eq!(wait(&futs, 0), Some(0));
        // Entry 0 replaced by a call not watched yet; the posted 1 comes first.
        slots[0] = Slot::new();
        futs[0] = RpcFuture::new(slots[0].clone());
        assert_eq!(wait(&futs, 0), Some(1));
        slots[1] = Slot::new();
        futs[1] = RpcFuture::new(slots[1].clone());
        // Nothing posted: the look at every entry watches the new ones, so
        // a completion while the caller sleeps wakes it.
        let s0 = slots[0].clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            s0.complete(Ok(vec![]), None);
        });
        assert_eq!(wait(&futs, 5000), Some(0));
        t.join().unwrap();
        // Replaced by a call that completed before any look: found too.
        futs[0] = RpcFuture::new(Slot::completed(Ok(vec![])));
        assert_eq!(wait(&futs, 0), Some(0));
    }

    /// A slot at two indexes posts only the later one; replacing that
    /// entry must not lose the earlier one's completion.
    #[test]
    fn wait_any_sees_an_entry_held_twice_after_one_is_replaced() {
        let x = Slot::new();
        let (fx, fz) = (RpcFuture::new(x.clone()), RpcFuture::new(Slot::new()));
        assert_eq!(RpcFuture::wait_any(&[&fx, &fx], Some(Duration::ZERO)), None);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            x.complete(Ok(vec![]), None);
        });
        let start = Instant::now();
        assert_eq!(RpcFuture::wait_any(&[&fx, &fz], Some(Duration::from_secs(10))), Some(0));
        t.join().unwrap();
        assert!(start.elapsed() < Duration::from_secs(5), "the completion was missed");
    }

    /// Two threads over two arrays that share a set (a future moved from
    /// one to the other): each sees its own completion.
    #[test]
    fn wait_any_over_arrays_sharing_a_set_misses_nothing() {
        let (a0, a1) = (Slot::new(), Slot::new());
        let f0 = Arc::new(RpcFuture::new(a0.clone()));
        let f1 = Arc::new(RpcFuture::new(a1.clone()));
        assert_eq!(RpcFuture::wait_any(&[&f0, &f1], Some(Duration::ZERO)), None);
        let waiter = |f: Arc<RpcFuture>| {
            std::thread::spawn(move || {
                let start = Instant::now();
                let got = RpcFuture::wait_any(&[&f], Some(Duration::from_secs(10)));
                (got, start.elapsed())
            })
        };
        let t0 = waiter(f0.clone());
        std::thread::sleep(Duration::from_millis(50));
        let t1 = waiter(f1.clone());
        std::thread::sleep(Duration::from_millis(100));
        a1.complete(Ok(vec![]), None);
        let (got1, took1) = t1.join().unwrap();
        a0.complete(Ok(vec![]), None);
        let (got0, took0) = t0.join().unwrap();
        assert_eq!((got0, got1), (Some(0), Some(0)));
        assert!(
            took1 < Duration::from_secs(5) && took0 < Duration::from_secs(5),
            "{took0:?} {took1:?}"
        );
    }

    #[test]
    fn wait_any_reports_a_missing_entry() {
        let futs: Vec<_> = (0..2).map(|_| RpcFuture::new(Slot::new())).collect();
        let got = wait_any_slots(3, |i| if i == 1 { None } else { futs.get(i / 2) }, None);
        assert_eq!(got, Err(MissingEntry(1)));
    }
}
