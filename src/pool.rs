//! A fixed pool of worker threads that run handlers. It never grows: work
//! beyond the pool's size waits in a queue. Each worker records what it is
//! running so a stalled pool can be reported by name.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};

struct Job {
    label: Arc<str>,
    run: Box<dyn FnOnce() + Send>,
}

/// A running job: since when, and for which function.
type Running = Option<(Instant, Arc<str>)>;

/// What each worker is doing.
struct Board {
    busy: Mutex<Vec<Running>>,
    alive: Mutex<usize>,
    exited: Condvar,
}

pub(crate) struct Pool {
    tx: Mutex<Option<Sender<Job>>>,
    board: Arc<Board>,
    handles: Mutex<Vec<JoinHandle<()>>>,
}

/// A snapshot of the pool for the stall report.
pub(crate) struct Busy {
    pub workers: usize,
    pub busy: usize,
    /// When the most recently started of the running jobs started.
    pub all_busy_since: Option<Instant>,
    pub labels: Vec<Arc<str>>,
}

impl Pool {
    pub(crate) fn new(threads: usize, name: &str) -> std::io::Result<Pool> {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let board = Arc::new(Board {
            busy: Mutex::new(vec![None; threads]),
            alive: Mutex::new(threads),
            exited: Condvar::new(),
        });
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx: Receiver<Job> = rx.clone();
            let worker_board = board.clone();
            let spawned = std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || {
                let board = worker_board;
                for job in rx.iter() {
                    board.busy.lock()[i] = Some((Instant::now(), job.label));
                    (job.run)();
                    board.busy.lock()[i] = None;
                }
                *board.alive.lock() -= 1;
                board.exited.notify_all();
            });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // Workers already started exit when the sender drops.
                    *board.alive.lock() = handles.len();
                    return Err(e);
                }
            }
        }
        Ok(Pool {
            tx: Mutex::new(Some(tx)),
            board,
            handles: Mutex::new(handles),
        })
    }

    /// Queues `run`; gives it back if the pool has stopped.
    pub(crate) fn submit(
        &self,
        label: Arc<str>,
        run: Box<dyn FnOnce() + Send>,
    ) -> Result<(), Box<dyn FnOnce() + Send>> {
        let tx = self.tx.lock().clone();
        match tx {
            Some(tx) => tx.send(Job { label, run }).map_err(|e| e.into_inner().run),
            None => Err(run),
        }
    }

    pub(crate) fn busy(&self) -> Busy {
        let busy = self.board.busy.lock();
        let running: Vec<_> = busy.iter().flatten().collect();
        Busy {
            workers: busy.len(),
            busy: running.len(),
            all_busy_since: running.iter().map(|(t, _)| *t).max(),
            labels: running.iter().map(|(_, l)| l.clone()).collect(),
        }
    }

    /// Stops taking work; workers finish the queue (jobs check for shutdown
    /// themselves) and exit. Joins them if they are done by `deadline`
    /// (`None`: waits for them); otherwise leaves them to exit on their own.
    pub(crate) fn stop(&self, deadline: Option<Instant>) -> bool {
        self.tx.lock().take();
        // A handler that shuts its own agent down runs on a worker: that one
        // cannot exit while it waits here.
        let me = std::thread::current().id();
        let on_worker = self.handles.lock().iter().any(|h| h.thread().id() == me);
        let mut alive = self.board.alive.lock();
        while *alive > on_worker as usize {
            match deadline {
                None => self.board.exited.wait(&mut alive),
                Some(d) => {
                    if self.board.exited.wait_until(&mut alive, d).timed_out() {
                        return false;
                    }
                }
            }
        }
        drop(alive);
        for h in self.handles.lock().drain(..) {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
        true
    }
}
