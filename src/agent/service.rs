//! The requests this rank serves on its pool, found by caller and call id,
//! so that a caller's cancel reaches them: one still queued is dropped
//! before it runs; a running handler (or its deferred reply) sees it and
//! its answer is dropped.
//!
//! Inline handlers are not listed: they run on the thread that read their
//! request and finish before that thread reads the cancel behind it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

/// The listed requests: a slab of entries, each owned by one request from
/// dispatch to its answer (or its drop) through its slot number, so that
/// listing and unlisting cost a lock and no hashing (a hash map here cost
/// ~7% of a small request's instructions). A cancel finds its call by a
/// scan, which is rare.
#[derive(Default)]
pub(crate) struct InService {
    table: Mutex<Table>,
    /// How many listed calls are cancelled: while 0 (nearly always), a
    /// look needs no lock.
    cancelled: AtomicUsize,
}

#[derive(Default)]
struct Table {
    entries: Vec<Entry>,
    /// Slots of `entries` not in use.
    free: Vec<u32>,
}

#[derive(Clone, Copy)]
struct Entry {
    src: usize,
    id: u64,
    state: State,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Listed,
    Cancelled,
}

/// A listed request's place in the table.
pub(crate) type ServiceSlot = u32;

impl InService {
    /// Lists call `id` of `src`, about to be queued for the pool.
    pub(crate) fn admit(&self, src: usize, id: u64) -> ServiceSlot {
        let entry = Entry {
            src,
            id,
            state: State::Listed,
        };
        let mut t = self.table.lock();
        match t.free.pop() {
            Some(slot) => {
                t.entries[slot as usize] = entry;
                slot
            }
            None => {
                t.entries.push(entry);
                (t.entries.len() - 1) as ServiceSlot
            }
        }
    }

    /// The caller cancelled call `id`; a call not listed (answered, inline,
    /// or never seen) is ignored.
    pub(crate) fn cancel(&self, src: usize, id: u64) {
        let mut t = self.table.lock();
        if let Some(e) = t
            .entries
            .iter_mut()
            .find(|e| e.state == State::Listed && e.src == src && e.id == id)
        {
            e.state = State::Cancelled;
            self.cancelled.fetch_add(1, Ordering::Release);
        }
    }

    /// Whether the request in `slot` is cancelled.
    pub(crate) fn is_cancelled(&self, slot: ServiceSlot) -> bool {
        self.cancelled.load(Ordering::Acquire) > 0 && self.table.lock().entries[slot as usize].state == State::Cancelled
    }

    /// Takes the request in `slot` off the list: true if it was cancelled.
    pub(crate) fn finish(&self, slot: ServiceSlot) -> bool {
        let mut t = self.table.lock();
        let was = std::mem::replace(&mut t.entries[slot as usize].state, State::Free);
        debug_assert!(was != State::Free, "a slot is finished once");
        t.free.push(slot);
        drop(t);
        let cancelled = was == State::Cancelled;
        if cancelled {
            self.cancelled.fetch_sub(1, Ordering::Release);
        }
        cancelled
    }
}

/// What tells one request's handler that its call is over: the caller
/// cancelled it (listed requests only), or its deadline passed here. The
/// reply route holds it and takes the request off the list (`finish`).
pub(crate) struct Cancellation {
    /// The list it is on and its slot there, if it is (pool requests).
    pub(crate) listed: Option<(Arc<InService>, ServiceSlot)>,
    pub(crate) deadline: Option<Instant>,
}

impl Cancellation {
    /// True once the caller cancelled the call or its deadline passed.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.view().is_cancelled()
    }

    /// The same question, borrowed (for the handler's `Request`).
    pub(crate) fn view(&self) -> CancelView<'_> {
        CancelView::new(self.listed.as_ref().map(|(s, slot)| (&**s, *slot)), self.deadline)
    }

    /// The request is answered or dropped: off the list. True if the
    /// caller cancelled it (its answer is not sent).
    pub(crate) fn finish(&mut self) -> bool {
        self.listed.take().is_some_and(|(s, slot)| s.finish(slot))
    }
}

/// A borrowed [`Cancellation`]: only looks.
#[derive(Clone, Copy)]
pub(crate) struct CancelView<'a> {
    listed: Option<(&'a InService, ServiceSlot)>,
    deadline: Option<Instant>,
}

impl<'a> CancelView<'a> {
    pub(crate) fn new(listed: Option<(&'a InService, ServiceSlot)>, deadline: Option<Instant>) -> CancelView<'a> {
        CancelView { listed, deadline }
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d) || self.listed.is_some_and(|(s, slot)| s.is_cancelled(slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(service: &Arc<InService>, id: u64) -> Cancellation {
        Cancellation {
            listed: Some((service.clone(), service.admit(3, id))),
            deadline: None,
        }
    }

    #[test]
    fn a_cancel_reaches_only_its_own_call_and_slots_are_reused() {
        let service = Arc::new(InService::default());
        let (mut a, mut b) = (listed(&service, 1), listed(&service, 2));
        service.cancel(3, 1);
        service.cancel(4, 2); // another caller's id 2: not this one
        service.cancel(3, 99); // unknown: ignored
        assert!(a.is_cancelled() && !b.is_cancelled());
        assert!(a.finish());
        assert!(!a.finish(), "finished once");
        assert!(!b.finish());
        assert_eq!(service.cancelled.load(Ordering::Relaxed), 0);
        let c = listed(&service, 5);
        assert_eq!(service.table.lock().entries.len(), 2, "a free slot is reused");
        service.cancel(3, 1); // finished: no longer found
        assert!(!c.is_cancelled());
    }

    #[test]
    fn a_passed_deadline_cancels_an_unlisted_call() {
        let c = Cancellation {
            listed: None,
            deadline: Some(Instant::now()),
        };
        assert!(c.is_cancelled());
    }
}
