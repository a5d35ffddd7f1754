//! Completion queues: a call attached to a queue posts its tag there when
//! it completes, and any number of threads take tags in completion order.
//! The queue can hand out a file descriptor that polls readable exactly
//! while tags wait, so an event loop can wait on calls beside its sockets.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Result, RpcError};
use crate::future::Progress;
use crate::net::sys::EventFd;
use crate::transport::Waiting;

/// A completion queue. Clones share one queue; when the last clone goes,
/// the queue closes (its descriptor with it) and calls still attached to
/// it complete without posting.
#[derive(Clone)]
pub struct Queue {
    handle: Arc<Handle>,
}

/// The users' side: dropping the last one closes the queue, whatever calls
/// still hold its inside.
struct Handle {
    inner: Arc<QueueInner>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.close();
    }
}

pub(crate) struct QueueInner {
    tags: Mutex<Tags>,
    posted: Condvar,
    /// Whether tags wait, readable without the lock (by a waiter reading
    /// replies itself, see `wait`).
    has_tags: AtomicBool,
    /// Calls attached while pending that have not completed: those a
    /// waiter comes back for (see `Waiting::AnyReply`).
    attached: AtomicUsize,
}

struct Tags {
    waiting: VecDeque<u64>,
    /// Threads sleeping in `wait`.
    sleepers: usize,
    /// Made on first request: until then posting costs no system call.
    /// Once made, it is set exactly while `waiting` is not empty (changed
    /// only on those transitions).
    fd: Option<EventFd>,
    closed: bool,
    /// The agent and destination of the call attached last: a waiter
    /// writes that agent's held-back requests and may read replies from
    /// that destination itself instead of sleeping.
    driver: Option<(Weak<dyn Progress>, usize)>,
    /// Calls to more than one destination were attached: reading one
    /// connection would not see the others' completions, so waiters sleep
    /// instead (for good: which calls are still pending is not tracked).
    mixed: bool,
}

impl QueueInner {
    /// Posts `tag` (from the thread that completed a call).
    pub(crate) fn post(&self, tag: u64) {
        let mut tags = self.tags.lock();
        if tags.closed {
            return;
        }
        tags.waiting.push_back(tag);
        if tags.waiting.len() == 1 {
            self.has_tags.store(true, Ordering::Release);
            if let Some(fd) = &tags.fd {
                fd.set();
            }
        }
        if tags.sleepers > 0 {
            self.posted.notify_one();
        }
    }

    /// A pending call was attached (it will post through `post_attached`).
    pub(crate) fn attach(&self) {
        self.attached.fetch_add(1, Ordering::Relaxed);
    }

    /// Posts the tag of an attached call that completed.
    pub(crate) fn post_attached(&self, tag: u64) {
        self.attached.fetch_sub(1, Ordering::Relaxed);
        self.post(tag);
    }

    fn take(&self, tags: &mut Tags) -> Option<u64> {
        let tag = tags.waiting.pop_front()?;
        if tags.waiting.is_empty() {
            self.has_tags.store(false, Ordering::Release);
            if let Some(fd) = &tags.fd {
                fd.clear();
            }
        }
        Some(tag)
    }

    /// Remembers where the call just attached goes (see `Tags::driver`).
    pub(crate) fn note_driver(&self, progress: &Weak<dyn Progress>, dst: usize) {
        let mut tags = self.tags.lock();
        match &tags.driver {
            Some((p, d)) if Weak::ptr_eq(p, progress) && *d == dst => {}
            // The agent it named is gone: its calls are over.
            Some((p, _)) if p.strong_count() == 0 => {
                tags.driver = Some((progress.clone(), dst));
                tags.mixed = false;
            }
            Some(_) => tags.mixed = true,
            None => tags.driver = Some((progress.clone(), dst)),
        }
    }

    fn close(&self) {
        let mut tags = self.tags.lock();
        tags.closed = true;
        tags.waiting.clear();
        tags.fd = None;
    }
}

/// How long a waiter reads replies itself before it sleeps on the queue
/// (a busy pipeline's next reply is microseconds away).
const DRIVE_AT_MOST: Duration = Duration::from_millis(1);

impl Default for Queue {
    fn default() -> Self {
        Queue::new()
    }
}

impl Queue {
    pub fn new() -> Queue {
        Queue {
            handle: Arc::new(Handle {
                inner: Arc::new(QueueInner {
                    tags: Mutex::new(Tags {
                        waiting: VecDeque::new(),
                        sleepers: 0,
                        fd: None,
                        closed: false,
                        driver: None,
                        mixed: false,
                    }),
                    posted: Condvar::new(),
                    has_tags: AtomicBool::new(false),
                    attached: AtomicUsize::new(0),
                }),
            }),
        }
    }

    pub(crate) fn inner(&self) -> &Arc<QueueInner> {
        &self.handle.inner
    }

    /// Takes one posted tag, in completion order, waiting up to `timeout`
    /// (`None`: without bound; zero: not at all). `None` if none came.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<u64> {
        let inner = self.inner();
        let mut tags = inner.tags.lock();
        // The clock is read only once a first look found no tag (a busy
        // pipeline's waits usually find one).
        if let Some(tag) = inner.take(&mut tags) {
            return Some(tag);
        }
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut drove = false;
        // Connections this thread parked were handed to the I/O loop.
        let mut unparked = false;
        loop {
            if let Some(tag) = inner.take(&mut tags) {
                return Some(tag);
            }
            let timed_out = deadline.is_some_and(|d| d <= Instant::now());
            // Before sleeping, once: requests held back for company leave,
            // and this thread may read the next reply itself (no wake-up
            // from the I/O thread when one call is in flight).
            if !drove && !timed_out {
                drove = true;
                let (driver, mixed) = (tags.driver.clone(), tags.mixed);
                if let Some((progress, dst)) = driver
                    && let Some(progress) = progress.upgrade()
                {
                    drop(tags);
                    progress.flush_batches();
                    if !mixed {
                        // Bounded: a call that times out (completed by the
                        // deadline thread) is seen within this long.
                        let bound = Instant::now() + DRIVE_AT_MOST;
                        // The calls attached and not complete; none while
                        // another thread sleeps here (it may wait for a
                        // call this one would not come back for) or the
                        // queue has a descriptor (its user may sleep in
                        // `poll`).
                        let covers = || {
                            let tags = inner.tags.lock();
                            if tags.sleepers > 0 || tags.fd.is_some() {
                                return 0;
                            }
                            inner.attached.load(Ordering::Relaxed)
                        };
                        progress.drive(
                            dst,
                            Waiting::AnyReply { covers: &covers },
                            &|| inner.has_tags.load(Ordering::Acquire),
                            Some(deadline.map_or(bound, |d| d.min(bound))),
                        );
                    }
                    tags = inner.tags.lock();
                    continue;
                }
            }
            // About to sleep, or to go with no tag (a drain with no
            // timeout, say): connections this thread parked (an earlier
            // call, or its drive when another waiter took the tag it saw)
            // are the I/O loop's to read from now on, and the tags come
            // while it goes on.
            if !std::mem::replace(&mut unparked, true)
                && let Some(progress) = tags.driver.as_ref().and_then(|(p, _)| p.upgrade())
            {
                drop(tags);
                progress.unpark_mine();
                tags = inner.tags.lock();
                continue;
            }
            if timed_out {
                return None;
            }
            tags.sleepers += 1;
            match deadline {
                None => inner.posted.wait(&mut tags),
                Some(d) => {
                    inner.posted.wait_until(&mut tags, d);
                }
            }
            tags.sleepers -= 1;
        }
    }

    /// Tags posted and not yet taken.
    pub fn len(&self) -> usize {
        self.inner().tags.lock().waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A descriptor, owned by the queue, that polls readable (level
    /// triggered) exactly while tags wait. Never read, write or close it.
    /// -1 if the system refused an eventfd (logged; [`Queue::fd`] returns
    /// the error).
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd().unwrap_or_else(|e| {
            crate::log::log_at!(Error, None, "{e}");
            -1
        })
    }

    /// Like [`Queue::as_raw_fd`], with the system's error.
    pub fn fd(&self) -> Result<RawFd> {
        let mut tags = self.inner().tags.lock();
        if let Some(fd) = &tags.fd {
            return Ok(fd.as_raw_fd());
        }
        let fd = EventFd::new().map_err(|e| RpcError::Io(format!("cannot create the queue's eventfd: {e}")))?;
        if !tags.waiting.is_empty() {
            fd.set();
        }
        let raw = fd.as_raw_fd();
        tags.fd = Some(fd);
        Ok(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        crate::net::sys::wait_readable(&fd, Duration::ZERO).unwrap()
    }

    #[test]
    fn tags_come_out_in_order_once() {
        let q = Queue::new();
        q.inner().post(1);
        q.inner().post(2);
        assert_eq!(q.wait(Some(Duration::ZERO)), Some(1));
        assert_eq!(q.wait(None), Some(2));
        assert_eq!(q.wait(Some(Duration::from_millis(5))), None);
    }

    #[test]
    fn the_fd_is_readable_exactly_while_tags_wait() {
        let q = Queue::new();
        q.inner().post(7);
        let fd = q.as_raw_fd();
        assert_eq!(q.fd().unwrap(), fd);
        assert!(readable(fd));
        q.inner().post(8);
        assert_eq!(q.wait(Some(Duration::ZERO)), Some(7));
        assert!(readable(fd));
        assert_eq!(q.wait(Some(Duration::ZERO)), Some(8));
        assert!(!readable(fd));
        q.inner().post(9);
        assert!(readable(fd));
    }

    #[test]
    fn a_dropped_queue_takes_no_more_tags() {
        let q = Queue::new();
        let inner = q.inner().clone();
        q.fd().unwrap();
        drop(q);
        inner.post(1);
        assert!(inner.tags.lock().waiting.is_empty());
        assert!(inner.tags.lock().fd.is_none());
    }

    #[test]
    fn each_tag_goes_to_one_of_several_waiters() {
        let q = Queue::new();
        let got = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (q, got) = (q.clone(), got.clone());
                std::thread::spawn(move || {
                    while let Some(tag) = q.wait(Some(Duration::from_millis(500))) {
                        got.lock().push(tag);
                    }
                })
            })
            .collect();
        for tag in 0..10_000 {
            q.inner().post(tag);
        }
        threads.into_iter().for_each(|t| t.join().unwrap());
        let mut got = std::mem::take(&mut *got.lock());
        got.sort_unstable();
        assert_eq!(got, (0..10_000).collect::<Vec<u64>>());
    }
}
