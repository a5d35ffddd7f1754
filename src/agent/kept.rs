//! Pool requests a reading thread keeps to serve itself. A read pass that
//! meets requests for the pool keeps the first; if its handler has been
//! quick of late, the next ones join it while theirs have been too, up to
//! a budget; from the first that does not join, the rest are queued.
//! The pass's thread then serves what it kept, in order: no queue, no
//! wake-up and no second thread between reading a request and running it
//! (measured with 128 calls of 32 B in flight over shared memory: a third
//! of the serving side's time went to the pool's wake-ups and context
//! switches). An I/O loop serves quick ones in place, staying the loop
//! (handing the loop to another thread each pass cost the serving side
//! ~0.2 us per call in that run); other requests once it has moved on.
//!
//! A handler may still block for long. The requests behind it (and an I/O
//! loop serving in place) are a *lease*, watched by the deadline thread:
//! when it is still out [`LEASE_STALL`] after it was lent (2.5 times the
//! budget), the rest are queued on the pool, ahead of later jobs, as if
//! they had never been kept, and the loop moves on.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::transport::{Escape, Kept};

use super::core::{Core, Serve};

/// A request whose function's handler took less than this of late (its
/// moving average) may join what a pass keeps: serving it costs less than
/// the wake-up that hands it to another thread.
const QUICK_NS: u64 = 10_000;

/// The most handler time (by those averages) one pass keeps for its
/// thread; the requests after it go to the pool, where idle threads take
/// them at once. With 50 us, a pass of 128 small requests was cut short,
/// and the pool's wake-ups for the rest showed: 40k context switches per
/// 400k calls against 24k with 100 us (one A/B, 128 calls of 32 B in
/// flight over shared memory).
const PASS_BUDGET_NS: u64 = 100_000;

/// How long after a lease was lent its rest may still wait for its thread
/// before they go to the pool.
pub(super) const LEASE_STALL: Duration = Duration::from_micros(250);

/// What each kept request is charged at least: what serving one costs
/// beside its handler (its reply, its listing for cancels), so that a
/// pass keeps at most 200.
const SERVE_NS: u64 = 500;

/// What one read pass keeps (made on its first request for the pool): the
/// requests its thread serves, then, once one was not admitted, every
/// later one, for the pool. Served and queued in the order they came.
pub(super) struct PassBatch {
    core: Weak<Core>,
    serves: Serves,
    /// Requests after the first one not admitted: queued on the pool.
    queue: Vec<(Arc<str>, Serve)>,
    /// The handler time they are expected to take, by their averages.
    expected_ns: u64,
    /// Whether the first was quick: only then may others join it.
    quick: bool,
}

/// The requests a thread keeps, in order.
type Serves = VecDeque<(Arc<str>, Serve)>;

impl PassBatch {
    /// `serves`: empty, with room (see `Leases::take_spare`).
    pub(super) fn new(core: Weak<Core>, serves: Serves) -> PassBatch {
        PassBatch {
            core,
            serves,
            queue: Vec::new(),
            expected_ns: 0,
            quick: false,
        }
    }

    /// Keeps `serve`, whose function's handler took `recent_ns` of late
    /// (`None`: never measured). The first request is always kept for this
    /// thread: on a quiet agent it would otherwise wake another to serve
    /// it. Later ones join only quick ones, within the budget; the first
    /// that does not closes the batch.
    pub(super) fn keep(&mut self, label: Arc<str>, serve: Serve, recent_ns: Option<u64>) {
        let cost = recent_ns.map_or(u64::MAX, |ns| ns.max(SERVE_NS));
        let joins = self.queue.is_empty()
            && (self.serves.is_empty() || (self.quick && cost < QUICK_NS && self.expected_ns + cost <= PASS_BUDGET_NS));
        if self.serves.is_empty() {
            self.quick = cost < QUICK_NS;
        }
        if joins {
            self.expected_ns = self.expected_ns.saturating_add(cost);
            self.serves.push_back((label, serve));
        } else {
            self.queue.push((label, serve));
        }
    }
}

impl Kept for PassBatch {
    fn quick(&self) -> bool {
        self.quick
    }

    fn serve_here(self: Box<Self>, escape: Option<Escape>) {
        let PassBatch {
            core,
            mut serves,
            queue,
            ..
        } = *self;
        let Some(core) = core.upgrade() else { return };
        for (label, serve) in queue {
            core.queue_serve(label, serve);
        }
        if serves.len() == 1 && escape.is_none() {
            // Nothing waits behind it: no lease to watch.
            let (_, serve) = serves.pop_front().expect("one request");
            serve.run(&|| false);
            return core.leases().give_spare(serves);
        }
        let lease = Arc::new(Lease {
            serves: Mutex::new(serves),
        });
        let out = core.leases().lend(&core, lease.clone(), escape);
        loop {
            let next = lease.serves.lock().pop_front();
            let Some((_, serve)) = next else { break };
            serve.run(&|| !lease.serves.lock().is_empty());
        }
        drop(out);
        // Unwatched now: usually the last handle.
        if let Ok(lease) = Arc::try_unwrap(lease) {
            core.leases().give_spare(lease.serves.into_inner());
        }
    }

    fn queue_all(self: Box<Self>) {
        let Some(core) = self.core.upgrade() else { return };
        for (label, serve) in self.serves.into_iter().chain(self.queue) {
            core.queue_serve(label, serve);
        }
    }

    fn as_any(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

/// Requests one thread serves in order; whoever takes one out of `serves`
/// (that thread, or the deadline thread reclaiming them) runs or queues
/// it, so each is served once.
struct Lease {
    serves: Mutex<Serves>,
}

/// A lease the deadline thread watches, with when it stalls, and how to
/// move the I/O loop on if the loop's thread serves it in place.
struct Watched {
    lease: Arc<Lease>,
    stalls_at: Instant,
    escape: Option<Escape>,
}

/// An agent's leases out.
///
/// Lock order: `watched` → a lease's `serves`; neither is held while a
/// request is queued on the pool or run, nor while an escape runs.
#[derive(Default)]
pub(super) struct Leases {
    watched: Mutex<Vec<Watched>>,
    /// `watched.len()`, readable without the lock.
    count: AtomicUsize,
    /// Leases lent so far, and that count at the deadline thread's last
    /// look: while leases keep being lent it keeps watching, even between
    /// them (arming it again for each woke it each time: measured, an 8 B
    /// round trip to a pool handler went from 20 to 33 us over TCP).
    lent: AtomicU64,
    lent_at_look: AtomicU64,
    /// An empty list with room, for the next pass that keeps requests:
    /// grown request by request afresh each pass, a pass of 128 cost ~150
    /// instructions per request in reallocations (callgrind, 128 calls of
    /// 32 B in flight over shared memory).
    spare: Mutex<Serves>,
}

impl Leases {
    /// The spare list (empty, with room if one was given back).
    pub(super) fn take_spare(&self) -> Serves {
        std::mem::take(&mut *self.spare.lock())
    }

    /// Keeps `serves`, served, as the spare list if it has more room.
    fn give_spare(&self, mut serves: Serves) {
        serves.clear();
        let mut spare = self.spare.lock();
        if serves.capacity() > spare.capacity() {
            *spare = serves;
        }
    }

    /// Watches `lease` until the returned guard drops (its thread is done
    /// with it, or unwound: what it left is queued then).
    fn lend<'a>(&'a self, core: &'a Arc<Core>, lease: Arc<Lease>, escape: Option<Escape>) -> LeaseOut<'a> {
        // One clock read per lease (not per request): the deadline thread
        // looks when it stalls, not a look later.
        let stalls_at = Instant::now() + LEASE_STALL;
        {
            let mut watched = self.watched.lock();
            watched.push(Watched {
                lease: lease.clone(),
                stalls_at,
                escape,
            });
            self.count.store(watched.len(), Ordering::Relaxed);
        }
        // Before `watch_leases` looks whether the deadline thread watches
        // (see `Pending::watch`: its last look reads this).
        self.lent.fetch_add(1, Ordering::SeqCst);
        core.watch_leases();
        LeaseOut { core, lease }
    }

    /// Stops watching `lease`, if still watched.
    fn unwatch(&self, lease: &Arc<Lease>) {
        let ended = {
            let mut watched = self.watched.lock();
            let at = watched.iter().position(|w| Arc::ptr_eq(&w.lease, lease));
            let ended = at.map(|i| watched.swap_remove(i));
            self.count.store(watched.len(), Ordering::Relaxed);
            ended
        };
        // Its escape (which holds the transport) is dropped unlocked.
        drop(ended);
    }

    /// Queues on the pool what is left of every lease (the agent is
    /// closing: its deadline thread, which watched them, has stopped).
    pub(super) fn reclaim_all(&self, core: &Core) {
        let mut reclaimed = Vec::new();
        let ended = {
            let mut watched = self.watched.lock();
            for w in watched.iter() {
                reclaimed.extend(w.lease.serves.lock().drain(..));
            }
            self.count.store(0, Ordering::Relaxed);
            std::mem::take(&mut *watched)
        };
        core.queue_ahead(reclaimed);
        // The I/O loops are stopping (told by the transports' close): their
        // escapes have nothing to move.
        drop(ended);
    }

    /// The deadline thread's look. Queues on the pool, ahead of other
    /// jobs, what is left of every lease out for [`LEASE_STALL`] (its
    /// handlers took far longer than their averages said: one may block),
    /// then moves on the I/O loop of any served in place. Such a lease is
    /// no longer watched. Returns when to look again: when the next lease
    /// out stalls, or (none out) at the thread's own pace while leases were
    /// lent since its last look; `None` when there is nothing to watch.
    pub(super) fn reclaim_stalled(&self, core: &Core) -> Option<Instant> {
        let lent = self.lent.load(Ordering::SeqCst);
        let lent_since = self.lent_at_look.swap(lent, Ordering::Relaxed) != lent;
        if self.count.load(Ordering::Relaxed) == 0 {
            return lent_since.then(|| Instant::now() + LEASE_STALL);
        }
        let now = Instant::now();
        let mut reclaimed = Vec::new();
        let mut stalled = Vec::new();
        let again = {
            let mut watched = self.watched.lock();
            let mut i = 0;
            while i < watched.len() {
                if watched[i].stalls_at <= now {
                    let w = watched.swap_remove(i);
                    reclaimed.extend(w.lease.serves.lock().drain(..));
                    stalled.push(w);
                } else {
                    i += 1;
                }
            }
            self.count.store(watched.len(), Ordering::Relaxed);
            match watched.iter().map(|w| w.stalls_at).min() {
                Some(next) => Some(next),
                None if lent_since => Some(now + LEASE_STALL),
                None => None,
            }
        };
        core.queue_ahead(reclaimed);
        // After the requests: a loop moved on goes ahead of them, as it
        // reads what all the others wait for. Each on its own, so that one
        // panicking (in a log sink) leaves no other loop stuck.
        for escape in stalled.into_iter().filter_map(|w| w.escape) {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(escape)).is_err() {
                let _ = std::panic::catch_unwind(|| {
                    crate::log::log_at!(Error, None, "moving an I/O loop on from a stalled thread panicked")
                });
            }
        }
        again
    }
}

/// A lease being served; see [`Leases::lend`].
struct LeaseOut<'a> {
    core: &'a Arc<Core>,
    lease: Arc<Lease>,
}

impl Drop for LeaseOut<'_> {
    fn drop(&mut self) {
        self.core.leases().unwatch(&self.lease);
        // Left only if its thread unwound (a panic outside the handlers,
        // which are run under `catch_unwind`).
        let left: Vec<_> = self.lease.serves.lock().drain(..).collect();
        self.core.queue_ahead(left);
    }
}
