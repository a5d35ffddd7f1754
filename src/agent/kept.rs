//! Pool requests a reading thread keeps to serve itself. A read pass that
//! meets requests for the pool keeps the first; if its handler has been
//! quick of late, the next ones join it while theirs have been too, up to
//! a budget; from the first that does not join, the rest are queued.
//! Once the pass has handed its reading on to an idle thread, its own
//! thread serves what it kept, in order: no queue, no wake-up and no
//! second thread between reading a request and running it (measured with
//! 128 calls of 32 B in flight over shared memory: a third of the serving
//! side's time went to the pool's wake-ups and context switches).
//!
//! A handler may still block for long. The requests behind it are a
//! *lease*, watched by the I/O loop: when it is still out [`LEASE_STALL`]
//! after the loop first saw it (2.5 times the budget), the loop queues the
//! rest on the pool, ahead of later jobs, as if they had never been kept.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use parking_lot::Mutex;

use crate::transport::{Kept, LEASE_STALL};

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

/// What each kept request is charged at least: what serving one costs
/// beside its handler (its reply, its listing for cancels), so that a
/// pass keeps at most 200.
const SERVE_NS: u64 = 500;

/// What one read pass keeps (made on its first request for the pool): the
/// requests its thread serves, then, once one was not admitted, every
/// later one, for the pool. Served and queued in the order they came.
pub(super) struct PassBatch {
    core: Weak<Core>,
    serves: VecDeque<(Arc<str>, Serve)>,
    /// Requests after the first one not admitted: queued on the pool.
    queue: Vec<(Arc<str>, Serve)>,
    /// The handler time they are expected to take, by their averages.
    expected_ns: u64,
    /// Whether the first was quick: only then may others join it.
    quick: bool,
}

impl PassBatch {
    pub(super) fn new(core: Weak<Core>) -> PassBatch {
        PassBatch {
            core,
            serves: VecDeque::new(),
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
    fn serve_here(self: Box<Self>, lent: &dyn Fn()) {
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
        if serves.len() == 1 {
            // Nothing waits behind it: no lease to watch.
            let (_, serve) = serves.pop_front().expect("one request");
            return serve.run(&|| false);
        }
        let lease = Arc::new(Lease {
            serves: Mutex::new(serves),
        });
        let out = core.leases().lend(&core, lease.clone());
        lent();
        loop {
            let next = lease.serves.lock().pop_front();
            let Some((_, serve)) = next else { break };
            serve.run(&|| !lease.serves.lock().is_empty());
        }
        drop(out);
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
/// (that thread, or the I/O loop reclaiming them) runs or queues it, so
/// each is served once.
struct Lease {
    serves: Mutex<VecDeque<(Arc<str>, Serve)>>,
}

/// A lease the I/O loop watches, with when it first saw it.
struct Watched {
    lease: Arc<Lease>,
    seen: Option<Instant>,
}

/// An agent's leases out.
///
/// Lock order: `watched` → a lease's `serves`; neither is held while a
/// request is queued on the pool or run.
#[derive(Default)]
pub(super) struct Leases {
    watched: Mutex<Vec<Watched>>,
    /// `watched.len()`, readable without the lock.
    out: AtomicUsize,
}

impl Leases {
    /// Watches `lease` until the returned guard drops (its thread is done
    /// with it, or unwound: what it left is queued then).
    fn lend<'a>(&'a self, core: &'a Arc<Core>, lease: Arc<Lease>) -> LeaseOut<'a> {
        let mut watched = self.watched.lock();
        watched.push(Watched {
            lease: lease.clone(),
            seen: None,
        });
        // Before `lent` looks whether the I/O loop sleeps: a loop going to
        // sleep sets its flag, then looks here (both sequentially
        // consistent), so one of the two sees the other.
        self.out.store(watched.len(), Ordering::SeqCst);
        LeaseOut { core, lease }
    }

    /// Stops watching `lease`, if still watched.
    fn unwatch(&self, lease: &Arc<Lease>) {
        let mut watched = self.watched.lock();
        watched.retain(|w| !Arc::ptr_eq(&w.lease, lease));
        self.out.store(watched.len(), Ordering::SeqCst);
    }

    /// Queues on the pool what is left of every lease (the agent is
    /// closing: its I/O loop, which watched them, has stopped).
    pub(super) fn reclaim_all(&self, core: &Core) {
        let mut reclaimed = Vec::new();
        {
            let mut watched = self.watched.lock();
            for w in watched.drain(..) {
                reclaimed.extend(w.lease.serves.lock().drain(..));
            }
            self.out.store(0, Ordering::SeqCst);
        }
        core.queue_ahead(reclaimed);
    }

    /// Queues on the pool, ahead of other jobs, what is left of every
    /// lease out for [`LEASE_STALL`] since the loop first saw it (its
    /// handlers took far longer than their averages said: one may block).
    /// Such a lease is no longer watched. True while leases are out.
    pub(super) fn reclaim_stalled(&self, core: &Core) -> bool {
        if self.out.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let now = Instant::now();
        let mut reclaimed = Vec::new();
        let out = {
            let mut watched = self.watched.lock();
            watched.retain_mut(|w| match w.seen {
                Some(since) if now.duration_since(since) >= LEASE_STALL => {
                    reclaimed.extend(w.lease.serves.lock().drain(..));
                    false
                }
                Some(_) => true,
                None => {
                    w.seen = Some(now);
                    true
                }
            });
            self.out.store(watched.len(), Ordering::SeqCst);
            watched.len()
        };
        core.queue_ahead(reclaimed);
        out > 0
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
