//! The table of calls in flight, keyed by request id, with their deadlines
//! in order; and the one thread that fails calls whose deadline passed, so a
//! call ends at its deadline whether or not anybody waits on it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::future::Slot;
use crate::wire::Name;
use rustc_hash::FxHashMap;

/// A call this rank made that has not completed.
pub(crate) struct PendingCall {
    pub dst: usize,
    /// For error messages.
    pub function: Name,
    pub internal: bool,
    pub started: Instant,
    pub deadline: Option<Instant>,
    pub slot: Arc<Slot>,
}

/// Deadline entries of completed calls the heap may hold before it is swept.
const STALE_DEADLINES: usize = 64;

/// How often the deadline thread runs its `watch` while armed (see
/// [`Pending::watch`]).
const WATCH_EVERY: Duration = Duration::from_micros(250);

/// Looks in a row that found nothing to watch (`watch` said `None`: for
/// the leases, none out and none lent since the last look) before the
/// deadline thread stops watching (about 5 ms): a busy agent, whose
/// watched work comes and goes many times a millisecond, does not arm it
/// again and again (a wake-up each time), and an idle one is not woken.
const QUIET_LOOKS: u32 = 20;

#[derive(Default)]
struct Table {
    calls: FxHashMap<u64, PendingCall>,
    /// Deadlines, earliest first. A completed call leaves its entry behind
    /// (taking it out of a heap costs more than the call's whole table work);
    /// the deadline thread skips such entries, and a sweep drops them once
    /// they outnumber the calls in flight.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    user_calls: usize,
    /// User calls started (refused ones too) and their argument bytes,
    /// counted here, under the lock every call takes anyway, rather than
    /// with locked instructions of their own.
    started: u64,
    args_sent: u64,
    stopped: bool,
    /// No call may be added any more.
    closed: bool,
    /// When the deadline thread will next wake by itself.
    sleeping_until: Option<Instant>,
}

pub(crate) struct Pending {
    table: Mutex<Table>,
    /// Calls in flight to each rank, changed under the table's lock, read
    /// without it (on every call, by the caller deciding how to wait).
    per_dst: Vec<AtomicUsize>,
    /// Wakes the deadline thread (earlier deadline, watching, or stop).
    wake: Condvar,
    /// The deadline thread runs its `watch` every [`WATCH_EVERY`].
    watching: AtomicBool,
    /// Wakes those waiting for the user calls to drain.
    drained: Condvar,
}

impl Pending {
    pub(crate) fn new(world_size: usize) -> Pending {
        Pending {
            table: Mutex::new(Table::default()),
            per_dst: (0..world_size).map(|_| AtomicUsize::new(0)).collect(),
            wake: Condvar::new(),
            watching: AtomicBool::new(false),
            drained: Condvar::new(),
        }
    }

    /// Has the deadline thread run its `watch` every [`WATCH_EVERY`] until
    /// it finds nothing to watch for [`QUIET_LOOKS`] looks. Costs one load
    /// while it watches already.
    ///
    /// Whatever the caller has just made for `watch` to find must be
    /// published sequentially consistent before this call: the thread stops
    /// watching by clearing the flag, then looking once more (both
    /// sequentially consistent), so one of the two sees the other.
    pub(crate) fn watch(&self) {
        if self.watching.load(Ordering::SeqCst) {
            return;
        }
        self.watching.store(true, Ordering::SeqCst);
        // Under the lock the thread reads the flag before it sleeps: it
        // either sees the flag or is asleep when told.
        let _t = self.table.lock();
        self.wake.notify_one();
    }

    /// Calls in flight to `dst`.
    pub(crate) fn in_flight_to(&self, dst: usize) -> usize {
        self.per_dst.get(dst).map_or(0, |n| n.load(Ordering::Acquire))
    }

    /// Adds a call and says how many are in flight to its destination now;
    /// gives it back once the table is closed (the agent shut down), so no
    /// call can slip in after the last ones were failed.
    /// A user call (not the agent's own) counts as started either way, with
    /// its `args_len` bytes if it is added.
    pub(crate) fn insert(&self, id: u64, call: PendingCall, args_len: usize) -> Result<usize, PendingCall> {
        let mut t = self.table.lock();
        t.started += !call.internal as u64;
        if t.closed {
            return Err(call);
        }
        if !call.internal {
            t.args_sent += args_len as u64;
        }
        // Changed only under the table's lock: a plain store (no locked
        // instruction) is enough, and readers without the lock see whole values.
        let in_flight = self.per_dst[call.dst].load(Ordering::Relaxed) + 1;
        self.per_dst[call.dst].store(in_flight, Ordering::Release);
        if let Some(d) = call.deadline {
            t.deadlines.push(Reverse((d, id)));
            // Wake the deadline thread only if it would sleep past this one.
            if t.sleeping_until.is_none_or(|until| d < until) {
                t.sleeping_until = Some(d);
                self.wake.notify_one();
            }
        }
        t.user_calls += !call.internal as usize;
        t.calls.insert(id, call);
        Ok(in_flight)
    }

    /// Closes the table and takes every call still in it.
    pub(crate) fn close(&self) -> Vec<PendingCall> {
        self.table.lock().closed = true;
        self.remove_where(|_| true)
    }

    pub(crate) fn remove(&self, id: u64) -> Option<PendingCall> {
        self.remove_if(id, |_| true)
    }

    /// Removes call `id` if `pred` holds for it.
    pub(crate) fn remove_if(&self, id: u64, pred: impl FnOnce(&PendingCall) -> bool) -> Option<PendingCall> {
        let mut t = self.table.lock();
        if !pred(t.calls.get(&id)?) {
            return None;
        }
        let call = t.calls.remove(&id)?;
        self.forget(&mut t, &call);
        if t.user_calls == 0 {
            self.drained.notify_all();
        }
        Some(call)
    }

    /// Drops the bookkeeping of a call taken out of the table.
    fn forget(&self, t: &mut Table, call: &PendingCall) {
        if t.deadlines.len() > 2 * t.calls.len() + STALE_DEADLINES {
            let Table { calls, deadlines, .. } = t;
            deadlines.retain(|Reverse((_, id))| calls.contains_key(id));
        }
        t.user_calls -= !call.internal as usize;
        // Under the table's lock (see `insert`).
        let left = self.per_dst[call.dst].load(Ordering::Relaxed) - 1;
        self.per_dst[call.dst].store(left, Ordering::Release);
    }

    /// Removes every call matching `pred`.
    pub(crate) fn remove_where(&self, pred: impl Fn(&PendingCall) -> bool) -> Vec<PendingCall> {
        let mut t = self.table.lock();
        let ids: Vec<u64> = t.calls.iter().filter(|(_, c)| pred(c)).map(|(id, _)| *id).collect();
        let removed = ids
            .into_iter()
            .filter_map(|id| {
                let call = t.calls.remove(&id)?;
                self.forget(&mut t, &call);
                Some(call)
            })
            .collect();
        if t.user_calls == 0 {
            self.drained.notify_all();
        }
        removed
    }

    /// Calls in flight that the user made (not the agent's own).
    pub(crate) fn user_calls(&self) -> usize {
        self.table.lock().user_calls
    }

    /// A user call refused before it was added counts as started.
    pub(crate) fn refused(&self) {
        self.table.lock().started += 1;
    }

    /// User calls in flight, user calls started, and their argument bytes.
    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        let t = self.table.lock();
        (t.user_calls as u64, t.started, t.args_sent)
    }

    /// Waits until no user call is in flight; false if `deadline` passed first.
    pub(crate) fn wait_drained(&self, deadline: Option<Instant>) -> bool {
        let mut t = self.table.lock();
        while t.user_calls > 0 {
            match deadline {
                None => self.drained.wait(&mut t),
                Some(d) => {
                    if self.drained.wait_until(&mut t, d).timed_out() {
                        return t.user_calls == 0;
                    }
                }
            }
        }
        true
    }

    /// Runs the deadline thread: `expired` gets each call whose deadline
    /// passed (already removed from the table), `tick` runs at least every
    /// `tick_every`, and `watch` at least every [`WATCH_EVERY`] once
    /// [`Pending::watch`] is called (it says when it would look again, or
    /// `None` when it has nothing to watch). Returns when [`Pending::stop`]
    /// is called.
    pub(crate) fn spawn_deadline_thread(
        self: &Arc<Self>,
        name: String,
        tick_every: Duration,
        expired: impl Fn(PendingCall) + Send + 'static,
        tick: impl Fn() + Send + 'static,
        watch: impl Fn() -> Option<Instant> + Send + 'static,
    ) -> std::io::Result<JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new().name(name).spawn(move || {
            let _role = crate::threads::enter(crate::threads::Role::Timer);
            let mut next_tick = Instant::now() + tick_every;
            let mut next_watch = Instant::now();
            let mut quiet_looks = 0;
            let mut due = Vec::new();
            let mut t = me.table.lock();
            while !t.stopped {
                let now = Instant::now();
                let watch_due = now >= next_watch && me.watching.load(Ordering::SeqCst);
                while let Some(&Reverse((when, id))) = t.deadlines.peek() {
                    if when > now {
                        break;
                    }
                    t.deadlines.pop();
                    if let Some(call) = t.calls.remove(&id) {
                        me.forget(&mut t, &call);
                        due.push(call);
                    }
                }
                if t.user_calls == 0 {
                    me.drained.notify_all();
                }
                if !due.is_empty() || now >= next_tick || watch_due {
                    drop(t);
                    // A panic (in a log sink, say) must not end this thread:
                    // no call would meet its deadline after it.
                    for call in due.drain(..) {
                        caught(|| expired(call));
                    }
                    if now >= next_tick {
                        caught(&tick);
                        next_tick = now + tick_every;
                    }
                    if watch_due {
                        let mut again = caught_watch(&watch);
                        quiet_looks = if again.is_some() { 0 } else { quiet_looks + 1 };
                        if quiet_looks >= QUIET_LOOKS {
                            quiet_looks = 0;
                            // Then a last look (see `Pending::watch`).
                            me.watching.store(false, Ordering::SeqCst);
                            again = caught_watch(&watch);
                            if again.is_some() {
                                me.watching.store(true, Ordering::SeqCst);
                            }
                        }
                        let every = Instant::now() + WATCH_EVERY;
                        next_watch = again.map_or(every, |at| at.min(every));
                    }
                    t = me.table.lock();
                    continue;
                }
                let mut until = t
                    .deadlines
                    .peek()
                    .map_or(next_tick, |Reverse((when, _))| (*when).min(next_tick));
                if me.watching.load(Ordering::SeqCst) {
                    until = until.min(next_watch);
                }
                t.sleeping_until = Some(until);
                me.wake.wait_until(&mut t, until);
                t.sleeping_until = None;
            }
        })
    }

    pub(crate) fn stop(&self) {
        self.table.lock().stopped = true;
        self.wake.notify_one();
    }
}

/// Runs `watch` as [`caught`] does; after a panic it looks again at its
/// usual pace (what it watches may still be out).
fn caught_watch(watch: &impl Fn() -> Option<Instant>) -> Option<Instant> {
    let mut again = Some(Instant::now() + WATCH_EVERY);
    caught(|| again = watch());
    again
}

/// Runs `work` on the deadline thread; a panic is logged (if the log sink
/// is not what panicked) and goes no further.
fn caught(work: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).is_err() {
        let _ = std::panic::catch_unwind(|| {
            crate::log::log_at!(Error, None, "the deadline thread caught a panic; it goes on")
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(deadline: Instant) -> PendingCall {
        PendingCall {
            dst: 0,
            function: crate::wire::Name::new(b"f"),
            internal: false,
            started: Instant::now(),
            deadline: Some(deadline),
            slot: Slot::new(),
        }
    }

    #[test]
    fn completed_calls_leave_no_lasting_deadline_entries() {
        let pending = Pending::new(1);
        let far = Instant::now() + Duration::from_secs(3600);
        for id in 0..10_000 {
            assert!(pending.insert(id, call(far), 0).is_ok());
            assert!(pending.remove(id).is_some());
        }
        assert!(pending.table.lock().deadlines.len() <= STALE_DEADLINES + 1);
    }

    /// `watch` runs only once asked, and until it has found nothing to
    /// watch for a while; asked again, it runs again.
    #[test]
    fn the_deadline_thread_watches_while_asked_and_something_is_watched() {
        use std::sync::atomic::AtomicBool;
        let pending = Arc::new(Pending::new(1));
        let looks = Arc::new(AtomicUsize::new(0));
        let busy = Arc::new(AtomicBool::new(true));
        let (l, b) = (looks.clone(), busy.clone());
        let thread = pending
            .spawn_deadline_thread(
                "test-watch".into(),
                Duration::from_secs(60),
                |_| {},
                || {},
                move || {
                    l.fetch_add(1, Ordering::SeqCst);
                    b.load(Ordering::SeqCst)
                        .then(|| Instant::now() + Duration::from_millis(1))
                },
            )
            .unwrap();
        let until = |what: &str, done: &dyn Fn() -> bool| {
            let start = Instant::now();
            while !done() {
                assert!(start.elapsed() < Duration::from_secs(10), "{what}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(looks.load(Ordering::SeqCst), 0, "watched before being asked");
        pending.watch();
        until("never watched", &|| looks.load(Ordering::SeqCst) >= 5);
        busy.store(false, Ordering::SeqCst);
        until("never stopped watching", &|| !pending.watching.load(Ordering::SeqCst));
        // Its last look comes just after it stops (maybe after this read).
        let stopped_at = looks.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            looks.load(Ordering::SeqCst) <= stopped_at + 1,
            "watched after it stopped"
        );
        busy.store(true, Ordering::SeqCst);
        pending.watch();
        until("never watched again", &|| {
            looks.load(Ordering::SeqCst) >= stopped_at + 5
        });
        pending.stop();
        thread.join().unwrap();
    }

    /// Sweeps of completed calls' entries keep those of calls in flight.
    #[test]
    fn a_call_in_flight_still_expires_after_sweeps() {
        let pending = Arc::new(Pending::new(1));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = pending
            .spawn_deadline_thread(
                "test-deadlines".into(),
                Duration::from_secs(60),
                move |c| {
                    let _ = tx.send(c.started);
                },
                || {},
                || None,
            )
            .unwrap();
        let soon = call(Instant::now() + Duration::from_millis(300));
        let marker = soon.started;
        assert!(pending.insert(u64::MAX, soon, 0).is_ok());
        let far = Instant::now() + Duration::from_secs(3600);
        for id in 0..10_000 {
            assert!(pending.insert(id, call(far), 0).is_ok());
            assert!(pending.remove(id).is_some());
        }
        let expired = rx.recv_timeout(Duration::from_secs(10)).expect("the call expired");
        assert_eq!(expired, marker);
        pending.stop();
        thread.join().unwrap();
    }
}
