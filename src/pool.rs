//! A fixed pool of worker threads that run handlers. It never grows: work
//! beyond the pool's size waits in a queue. Wake-ups are chained: at most one
//! sleeping worker is being woken at a time, and a worker that takes a job
//! wakes the next only if more work is waiting, so a burst of tiny jobs is
//! run by as few threads as keep up with it (each wake-up costs a futex
//! call and a context switch). Each worker records what it is running, so a
//! stalled pool can be reported by name. The pool knows nothing of what
//! its jobs do: its owner chooses the job type (the agent queues a request
//! as it is, with no box of its own), and may give it one hook to run when
//! a worker runs out of work (the agent writes the replies its workers held
//! back).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

pub(crate) type Work = Box<dyn FnOnce() + Send>;

/// What a worker runs. The pool's owner may queue its own job type, so that
/// its commonest job needs no box of its own.
pub(crate) trait Job: Send + 'static {
    fn run(self);
}

impl Job for Work {
    fn run(self) {
        self()
    }
}

struct Queued<J> {
    label: Arc<str>,
    run: J,
    /// Counts as a busy worker for the stall report (the I/O loop does not).
    counted: bool,
}

/// What one worker runs, as the stall report sees it: the number of jobs it
/// has started (the same number in two reports means the same job), and
/// the running one's function and whether it counts (`None` between jobs).
/// Each worker has its own, on its own cache lines: starting a job takes no
/// lock another worker takes, reads no clock and clones nothing (the
/// report, every half second, finds out how long a job has run).
#[derive(Default)]
#[repr(align(128))]
struct WorkerSlot(Mutex<(u64, Option<RunningJob>)>);

/// A running job's function, and whether it counts as a busy worker.
type RunningJob = (Arc<str>, bool);

struct Queue<J> {
    jobs: VecDeque<Queued<J>>,
    /// Workers waiting for work.
    sleeping: usize,
    /// A wake-up was sent and not yet taken by a worker.
    waking: bool,
    stopped: bool,
    alive: usize,
    /// Queued jobs that count (not the I/O loop on its way to a thread).
    counted: usize,
}

impl<J> Default for Queue<J> {
    fn default() -> Queue<J> {
        Queue {
            jobs: VecDeque::new(),
            sleeping: 0,
            waking: false,
            stopped: false,
            alive: 0,
            counted: 0,
        }
    }
}

/// How many times an idle worker yields and looks for work before sleeping.
const SPINS: usize = 20;

struct Shared<J> {
    queue: Mutex<Queue<J>>,
    /// Whether the queue has jobs, readable without the lock.
    has_work: AtomicBool,
    /// Whether counted jobs wait in the queue (`Queue::counted > 0`),
    /// readable without the lock.
    has_jobs: AtomicBool,
    /// Workers looking for work before they sleep: they need no wake-up.
    spinning: AtomicUsize,
    work: Condvar,
    exited: Condvar,
    workers: Box<[WorkerSlot]>,
    /// For each worker, the job the last report saw running and when it
    /// first saw it.
    seen: Mutex<Vec<Option<(u64, Instant)>>>,
    /// Run by a worker that found the queue empty, before it waits.
    on_idle: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>>,
}

pub(crate) struct Pool<J: Job = Work> {
    shared: Arc<Shared<J>>,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

/// A snapshot of the pool for the stall report.
pub(crate) struct Busy {
    pub workers: usize,
    pub busy: usize,
    /// When the most recently started of the running jobs was first seen
    /// running (by this report or an earlier one: within one report's
    /// period of its start).
    pub all_busy_since: Option<Instant>,
    pub labels: Vec<Arc<str>>,
}

impl<J: Job> Shared<J> {
    /// Wakes one sleeper if there is work for it and none is on its way.
    fn wake_one(&self, q: &mut Queue<J>) {
        if !q.jobs.is_empty() && q.sleeping > 0 && !q.waking && self.spinning.load(Ordering::Acquire) == 0 {
            q.waking = true;
            self.work.notify_one();
        }
    }

    fn worker(&self, index: usize) {
        let _role = crate::threads::enter(crate::threads::Role::Worker);
        let mut q = self.queue.lock();
        loop {
            if let Some(job) = q.jobs.pop_front() {
                self.has_work.store(!q.jobs.is_empty(), Ordering::Relaxed);
                if job.counted {
                    q.counted -= 1;
                    self.has_jobs.store(q.counted > 0, Ordering::Relaxed);
                }
                self.wake_one(&mut q);
                drop(q);
                let Queued { label, run, counted } = job;
                {
                    let mut slot = self.workers[index].0.lock();
                    slot.0 += 1;
                    slot.1 = Some((label, counted));
                }
                // A panicking job (a Rust completion callback, say) must not
                // take the worker with it: the pool would shrink, and stop()
                // would wait for it forever.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.run()));
                let finished = self.workers[index].0.lock().1.take();
                if ran.is_err()
                    && let Some((label, _)) = finished
                {
                    crate::log::log_at!(Error, None, "a job of '{label}' panicked; the worker goes on");
                }
                q = self.queue.lock();
                continue;
            }
            if q.stopped {
                break;
            }
            // Replies held back for company leave now.
            drop(q);
            if let Some(on_idle) = self.on_idle.get() {
                // A panicking hook must not take the worker with it.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(on_idle)).is_err() {
                    crate::log::log_at!(Error, None, "the pool's idle hook panicked; the worker goes on");
                }
            }
            q = self.queue.lock();
            if !q.jobs.is_empty() {
                continue;
            }
            // Under a stream of tiny jobs the next one is usually a few
            // microseconds away: look again a few times, yielding the CPU,
            // before paying for a sleep and a wake-up.
            drop(q);
            self.spinning.fetch_add(1, Ordering::AcqRel);
            for _ in 0..SPINS {
                std::thread::yield_now();
                if self.has_work.load(Ordering::Relaxed) {
                    break;
                }
            }
            self.spinning.fetch_sub(1, Ordering::AcqRel);
            q = self.queue.lock();
            if !q.jobs.is_empty() || q.stopped {
                continue;
            }
            q.sleeping += 1;
            self.work.wait(&mut q);
            q.sleeping -= 1;
            q.waking = false;
        }
        q.alive -= 1;
        drop(q);
        self.exited.notify_all();
    }
}

impl<J: Job> Pool<J> {
    pub(crate) fn new(threads: usize, name: &str) -> std::io::Result<Pool<J>> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            has_work: AtomicBool::new(false),
            has_jobs: AtomicBool::new(false),
            spinning: AtomicUsize::new(0),
            work: Condvar::new(),
            exited: Condvar::new(),
            workers: (0..threads).map(|_| WorkerSlot::default()).collect(),
            seen: Mutex::new(vec![None; threads]),
            on_idle: std::sync::OnceLock::new(),
        });
        let pool = Pool {
            shared,
            handles: Mutex::new(Vec::with_capacity(threads)),
        };
        for i in 0..threads {
            let shared = pool.shared.clone();
            pool.shared.queue.lock().alive += 1;
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || shared.worker(i));
            match spawned {
                Ok(h) => pool.handles.lock().push(h),
                Err(e) => {
                    pool.shared.queue.lock().alive -= 1;
                    pool.stop(None);
                    return Err(e);
                }
            }
        }
        Ok(pool)
    }

    /// Sets what a worker runs when it finds no work, before it waits
    /// (once; later calls are ignored).
    pub(crate) fn on_idle(&self, hook: Box<dyn Fn() + Send + Sync>) {
        let _ = self.shared.on_idle.set(hook);
    }

    /// Whether jobs wait in the queue now, the I/O loop's moves aside (no
    /// lock: a hint).
    pub(crate) fn has_queued(&self) -> bool {
        self.shared.has_jobs.load(Ordering::Relaxed)
    }

    /// Queues `run`; gives it back if the pool has stopped.
    pub(crate) fn submit(&self, label: Arc<str>, run: J) -> Result<(), J> {
        self.push(
            Queued {
                label,
                run,
                counted: true,
            },
            false,
        )
    }

    /// Queues `jobs`, in their order, before anything queued (work that
    /// came before it), under one lock: no worker starts one of them
    /// before the others are queued. Dropped if the pool has stopped.
    pub(crate) fn submit_all_ahead(&self, jobs: impl DoubleEndedIterator<Item = (Arc<str>, J)>) -> Result<(), ()> {
        let mut q = self.shared.queue.lock();
        if q.stopped {
            return Err(());
        }
        for (label, run) in jobs.rev() {
            q.counted += 1;
            q.jobs.push_front(Queued {
                label,
                run,
                counted: true,
            });
        }
        self.shared.has_jobs.store(q.counted > 0, Ordering::Relaxed);
        self.shared.has_work.store(!q.jobs.is_empty(), Ordering::Relaxed);
        self.shared.wake_one(&mut q);
        Ok(())
    }

    /// Runs `run` before anything queued, without counting it as a busy
    /// worker (the I/O loop moving to another thread).
    pub(crate) fn submit_first(&self, label: Arc<str>, run: J) -> Result<(), J> {
        self.push(
            Queued {
                label,
                run,
                counted: false,
            },
            true,
        )
    }

    fn push(&self, job: Queued<J>, first: bool) -> Result<(), J> {
        let mut q = self.shared.queue.lock();
        if q.stopped {
            return Err(job.run);
        }
        if job.counted {
            q.counted += 1;
            self.shared.has_jobs.store(true, Ordering::Relaxed);
        }
        if first {
            q.jobs.push_front(job);
        } else {
            q.jobs.push_back(job);
        }
        self.shared.has_work.store(true, Ordering::Relaxed);
        self.shared.wake_one(&mut q);
        Ok(())
    }

    /// Like [`Pool::submit_first`], but only if a worker is idle to take it
    /// at once (sleeping and not being woken, or looking for work) and no
    /// job is queued (an idle worker is about to take it); otherwise `run`
    /// comes back. `over_queued`: queued jobs do not matter, and a worker
    /// being woken for them counts as idle (it takes `run` first). One
    /// decision under the lock, so no other job can take that worker in
    /// between.
    pub(crate) fn submit_first_if_idle(&self, label: Arc<str>, run: J, over_queued: bool) -> Result<(), J> {
        let mut q = self.shared.queue.lock();
        let waking = if over_queued { 0 } else { q.waking as usize };
        let idle = q.sleeping > waking || self.shared.spinning.load(Ordering::Acquire) > 0;
        if q.stopped || !idle || (!over_queued && !q.jobs.is_empty()) {
            return Err(run);
        }
        q.jobs.push_front(Queued {
            label,
            run,
            counted: false,
        });
        self.shared.has_work.store(true, Ordering::Relaxed);
        self.shared.wake_one(&mut q);
        Ok(())
    }

    /// Jobs are queued and no worker is idle to take them (cheap when the
    /// queue is empty: no lock).
    pub(crate) fn starved(&self) -> bool {
        if !self.shared.has_work.load(Ordering::Relaxed) {
            return false;
        }
        let q = self.shared.queue.lock();
        !q.jobs.is_empty() && q.sleeping <= q.waking as usize && self.shared.spinning.load(Ordering::Acquire) == 0
    }

    pub(crate) fn busy(&self) -> Busy {
        let now = Instant::now();
        let mut seen = self.shared.seen.lock();
        let (mut workers, mut labels, mut since) = (0, Vec::new(), None);
        for (slot, seen) in self.shared.workers.iter().zip(seen.iter_mut()) {
            let (started, running) = {
                let slot = slot.0.lock();
                (slot.0, slot.1.clone())
            };
            match running {
                // Not a worker for the report (the I/O loop).
                Some((_, false)) => *seen = None,
                Some((label, true)) => {
                    workers += 1;
                    let first = match *seen {
                        Some((job, at)) if job == started => at,
                        _ => seen.insert((started, now)).1,
                    };
                    since = since.max(Some(first));
                    labels.push(label);
                }
                None => {
                    workers += 1;
                    *seen = None;
                }
            }
        }
        Busy {
            workers,
            busy: labels.len(),
            all_busy_since: since,
            labels,
        }
    }

    /// Stops taking work; workers finish the queue (jobs check for shutdown
    /// themselves) and exit. Joins them if they are done by `deadline`
    /// (`None`: waits for them); otherwise leaves them to exit on their own.
    pub(crate) fn stop(&self, deadline: Option<Instant>) -> bool {
        // A handler that shuts its own agent down runs on a worker: that one
        // cannot exit while it waits here.
        let me = std::thread::current().id();
        let on_worker = self.handles.lock().iter().any(|h| h.thread().id() == me);
        let mut q = self.shared.queue.lock();
        q.stopped = true;
        self.shared.work.notify_all();
        while q.alive > on_worker as usize {
            match deadline {
                None => self.shared.exited.wait(&mut q),
                Some(d) => {
                    if self.shared.exited.wait_until(&mut q, d).timed_out() {
                        return false;
                    }
                }
            }
        }
        drop(q);
        for h in self.handles.lock().drain(..) {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_job_and_stops() {
        let pool: Pool = Pool::new(3, "test").unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..1000 {
            let d = done.clone();
            pool.submit(
                "job".into(),
                Box::new(move || {
                    d.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .ok()
            .unwrap();
        }
        assert!(pool.stop(None));
        assert_eq!(done.load(Ordering::SeqCst), 1000);
        assert!(pool.submit("late".into(), Box::new(|| {})).is_err());
    }

    #[test]
    fn blocked_workers_do_not_stop_the_others() {
        let pool: Pool = Pool::new(2, "test").unwrap();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let g = gate.clone();
        pool.submit(
            "blocker".into(),
            Box::new(move || {
                let mut open = g.0.lock();
                while !*open {
                    g.1.wait(&mut open);
                }
            }),
        )
        .ok()
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        pool.submit("quick".into(), Box::new(move || tx.send(()).unwrap()))
            .ok()
            .unwrap();
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        // The quick job's worker clears its entry just after the job returns.
        let started = Instant::now();
        while pool.busy().busy != 1 && started.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::yield_now();
        }
        let busy = pool.busy();
        assert_eq!(busy.busy, 1);
        assert_eq!(&*busy.labels[0], "blocker");
        // The stall report sees how long the blocker has run: since the
        // first report that saw it, the same in later reports.
        let seen = busy.all_busy_since.expect("a job runs");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let again = pool.busy();
        assert_eq!(again.all_busy_since, Some(seen));
        assert!(seen.elapsed() >= std::time::Duration::from_millis(20));
        *gate.0.lock() = true;
        gate.1.notify_all();
        assert!(pool.stop(None));
    }
}
