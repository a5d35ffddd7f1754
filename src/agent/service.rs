//! The requests this rank serves on its pool (and deferred replies), found
//! by caller and call id, so that a caller's cancel reaches them: one still
//! queued is dropped before it runs; a running handler (or its deferred
//! reply) sees it and its answer is dropped. Over shared memory a cancel
//! is also marked where the request came in, ahead of its frame: a queued
//! job about to start, or a polling handler, finds the mark and cancels
//! its own entry (the frame then finds nothing to do).
//!
//! An inline handler's request is listed only if the handler defers: until
//! it returns, the thread that read its request reads nothing else (the
//! cancel behind it included).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

use crate::transport::ReplySink;

/// The listed requests: a slab of entries, each owned by one request's
/// [`Cancellation`] through its slot and generation, so that listing and
/// unlisting cost a lock and no hashing (a hash map here cost ~7% of a
/// small request's instructions), and a slot reused by a later request is
/// never mistaken for the earlier one's. A cancel finds its call by a scan.
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
    /// Bumped each time the slot is taken.
    generation: u32,
    state: State,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    Listed,
    Cancelled,
}

/// A listed request's place: its slot and that slot's generation.
#[derive(Clone, Copy)]
struct Place {
    slot: u32,
    generation: u32,
}

impl InService {
    /// The cancellation of call `id` from `src` (deadline: when the caller
    /// gives up), not listed yet.
    pub(crate) fn cancellation(self: &Arc<Self>, src: usize, id: u64, deadline: Option<Instant>) -> Cancellation {
        Cancellation {
            service: self.clone(),
            src,
            id,
            deadline,
            place: None,
        }
    }

    fn admit(&self, src: usize, id: u64) -> Place {
        let mut t = self.table.lock();
        let slot = match t.free.pop() {
            Some(slot) => slot,
            None => {
                t.entries.push(Entry {
                    src,
                    id,
                    generation: 0,
                    state: State::Free,
                });
                (t.entries.len() - 1) as u32
            }
        };
        let e = &mut t.entries[slot as usize];
        e.generation = e.generation.wrapping_add(1);
        (e.src, e.id, e.state) = (src, id, State::Listed);
        Place {
            slot,
            generation: e.generation,
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

    fn is_cancelled(&self, at: Place) -> bool {
        if self.cancelled.load(Ordering::Acquire) == 0 {
            return false;
        }
        let e = self.table.lock().entries[at.slot as usize];
        e.generation == at.generation && e.state == State::Cancelled
    }

    /// Whether the call listed at `at` is cancelled: by its frame, or by a
    /// mark `marks` shows (then it is cancelled on the list from now on).
    fn cancelled_at(&self, at: Place, marks: Option<(&dyn ReplySink, u64)>) -> bool {
        self.is_cancelled(at) || marks.is_some_and(|(sink, id)| sink.cancel_marked(id) && self.cancel_at(at))
    }

    /// The caller's cancel was seen ahead of its frame (a mark in shared
    /// memory): the listed call at `at` is cancelled from now on, as the
    /// frame would have made it (the frame then finds nothing listed).
    /// False if `at` no longer holds that call.
    fn cancel_at(&self, at: Place) -> bool {
        let mut t = self.table.lock();
        let e = &mut t.entries[at.slot as usize];
        if e.generation != at.generation || e.state == State::Free {
            return false;
        }
        if e.state == State::Listed {
            e.state = State::Cancelled;
            self.cancelled.fetch_add(1, Ordering::Release);
        }
        true
    }

    /// Frees the slot; true if the call was cancelled.
    fn finish(&self, at: Place) -> bool {
        let mut t = self.table.lock();
        let e = &mut t.entries[at.slot as usize];
        if e.generation != at.generation || e.state == State::Free {
            return false;
        }
        let cancelled = std::mem::replace(&mut e.state, State::Free) == State::Cancelled;
        t.free.push(at.slot);
        drop(t);
        if cancelled {
            self.cancelled.fetch_sub(1, Ordering::Release);
        }
        cancelled
    }
}

/// Whether one request's call is over: its caller cancelled it (once it is
/// listed), or its deadline passed here. Made when the request is
/// dispatched; it travels with the request into its reply route (and a
/// deferred reply), and takes the request off the list when the answer is
/// sent or when it is dropped, on every path.
pub(crate) struct Cancellation {
    service: Arc<InService>,
    src: usize,
    id: u64,
    deadline: Option<Instant>,
    place: Option<Place>,
}

impl Cancellation {
    /// Puts the request on the list, so that a cancel reaches it (a pool
    /// request at dispatch; an inline one when its handler defers).
    pub(crate) fn list(&mut self) {
        if self.place.is_none() {
            self.place = Some(self.service.admit(self.src, self.id));
        }
    }

    /// True once the caller cancelled the call (deadlines aside): by its
    /// frame, or by a mark on `came_on`, the connection the request came on.
    pub(crate) fn caller_cancelled(&self, came_on: &dyn ReplySink) -> bool {
        self.place
            .is_some_and(|at| self.service.cancelled_at(at, Some((came_on, self.id))))
    }

    /// A borrowed look: at the list, the deadline, and (`came_on`: the
    /// connection the request came on) the caller's cancel marks.
    pub(crate) fn view<'a>(&'a self, came_on: Option<&'a dyn ReplySink>) -> CancelView<'a> {
        self.view_in(&self.service, came_on)
    }

    /// Like [`Cancellation::view`] through `service` (this one's list,
    /// borrowed from elsewhere: the handler's `Request` looks while the
    /// reply holds this).
    pub(crate) fn view_in<'a>(&self, service: &'a InService, came_on: Option<&'a dyn ReplySink>) -> CancelView<'a> {
        debug_assert!(std::ptr::eq(service, &*self.service));
        CancelView {
            service,
            place: self.place,
            deadline: self.deadline,
            marks: came_on.map(|sink| (sink, self.id)),
        }
    }

    /// The request is answered or dropped: off the list. True if the
    /// caller cancelled it (its answer is not sent).
    pub(crate) fn finish(&mut self) -> bool {
        self.place.take().is_some_and(|at| self.service.finish(at))
    }
}

impl Drop for Cancellation {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A borrowed look at a [`Cancellation`] (a slot reused by a later request
/// is told apart by its generation).
#[derive(Clone, Copy)]
pub(crate) struct CancelView<'a> {
    service: &'a InService,
    place: Option<Place>,
    deadline: Option<Instant>,
    /// Where the caller may mark its cancel ahead of the frame (the
    /// connection the request came on), and the call's id.
    marks: Option<(&'a dyn ReplySink, u64)>,
}

impl CancelView<'_> {
    pub(crate) fn is_cancelled(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
            || self.place.is_some_and(|at| self.service.cancelled_at(at, self.marks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(service: &Arc<InService>, id: u64) -> Cancellation {
        let mut c = service.cancellation(3, id, None);
        c.list();
        c
    }

    #[test]
    fn a_cancel_reaches_only_its_own_call_and_slots_are_reused() {
        let service = Arc::new(InService::default());
        let (mut a, mut b) = (listed(&service, 1), listed(&service, 2));
        service.cancel(3, 1);
        service.cancel(4, 2); // another caller's id 2: not this one
        service.cancel(3, 99); // unknown: ignored
        assert!(a.view(None).is_cancelled() && a.caller_cancelled(&Marked(0)) && !b.view(None).is_cancelled());
        assert!(a.finish());
        assert!(!a.finish(), "finished once");
        assert!(!b.finish());
        assert_eq!(service.cancelled.load(Ordering::Relaxed), 0);
        let c = listed(&service, 5);
        assert_eq!(service.table.lock().entries.len(), 2, "a free slot is reused");
        service.cancel(3, 1); // finished: no longer found
        assert!(!c.view(None).is_cancelled());
    }

    #[test]
    fn a_view_of_a_finished_request_never_sees_the_next_one_in_its_slot() {
        let service = Arc::new(InService::default());
        let mut first = listed(&service, 1);
        let old = first.view(None).place;
        first.finish();
        let _second = listed(&service, 2);
        service.cancel(3, 2);
        let stale = CancelView {
            service: &service,
            place: old,
            deadline: None,
            marks: None,
        };
        assert!(!stale.is_cancelled());
    }

    #[test]
    fn dropping_an_unanswered_request_frees_its_slot() {
        let service = Arc::new(InService::default());
        let c = listed(&service, 1);
        service.cancel(3, 1);
        drop(c);
        assert_eq!(service.cancelled.load(Ordering::Relaxed), 0);
        assert_eq!(service.table.lock().free.len(), 1);
    }

    /// A connection on which the caller marked one call cancelled.
    struct Marked(u64);

    impl ReplySink for Marked {
        fn send_reply(&self, _: u64, _: crate::transport::Outcome, _: bool) {}

        fn cancel_marked(&self, id: u64) -> bool {
            id == self.0
        }
    }

    #[test]
    fn a_cancel_marked_ahead_of_its_frame_cancels_the_listed_call_once() {
        let service = Arc::new(InService::default());
        let (mut a, mut b) = (listed(&service, 1), listed(&service, 2));
        let sink = Marked(1);
        assert!(!b.view(Some(&sink)).is_cancelled());
        assert!(a.view(Some(&sink)).is_cancelled());
        assert!(a.caller_cancelled(&Marked(0)), "marked on the list, as the frame would");
        service.cancel(3, 1); // the frame, later: nothing more to do
        assert_eq!(service.cancelled.load(Ordering::Relaxed), 1);
        assert!(a.finish(), "its answer is not sent");
        assert!(!b.finish());
        // A mark for an unlisted call (answered, or inline) changes nothing.
        let unlisted = service.cancellation(3, 1, None);
        assert!(!unlisted.view(Some(&sink)).is_cancelled());
    }

    #[test]
    fn a_passed_deadline_cancels_an_unlisted_call() {
        let service = Arc::new(InService::default());
        let c = service.cancellation(0, 1, Some(Instant::now()));
        assert!(c.view(None).is_cancelled() && !c.caller_cancelled(&Marked(0)));
    }
}
