//! The agent's machinery: registry, pending calls, dispatch of requests to
//! handlers, the rank-0 gatherings behind barrier and graceful shutdown, and
//! the shutdown sequence. It knows nothing of sockets: frames go out through
//! a [`Transport`] and come in through [`Dispatch`].

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};

use crate::config::{Config, check_name};
use crate::error::{Result, RpcError, Status};
use crate::future::{Progress, RpcFuture, Slot, Spawner};
use crate::log::log_at;
use crate::pool::{Job, Pool, Work};

use super::shutdown::{self, Gather, Release};
use crate::transport::{
    Dispatch, Executor, InRequest, OutRequest, Payload, ReadPass, Response, Transport, Transports, Waiting,
};
use rustc_hash::FxHashMap;

use super::handler::{Body, Handler, Reply, ReplyRoute, Request};
use super::kept::{Leases, PassBatch};
use super::pending::{Pending, PendingCall};
use super::service::{Cancellation, InService};
use super::stats::{Ended, FunctionStats, FunctionStatsSnapshot, Padded, Stats, StatsSnapshot};

const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const CLOSED: u8 = 2;

/// The agent's own functions, served by rank 0 (flagged internal on the wire).
pub(crate) const BARRIER: &str = "barrier";
pub(crate) const SHUTDOWN: &str = "shutdown";
/// Answered by every running rank: a shutdown coordinator's probe.
pub(crate) const ALIVE: &str = "alive";

/// How long a coordinator's probe of a rank may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a pool may be fully busy before the log says so.
const POOL_STALL_WARNING: Duration = Duration::from_secs(5);

/// A registered handler and its name, as the label the pool reports a busy
/// worker by (made once at registration).
struct Registered {
    handler: Handler,
    name: Arc<str>,
    /// What it has served (`rpcagent_get_function_stats`).
    stats: Arc<FunctionStats>,
}

/// Who has arrived at each barrier (rank 0) and at shutdown (whichever
/// rank coordinates it).
struct Gatherings {
    /// Per generation, each rank's arrival and its caller's deadline.
    barriers: HashMap<u64, HashMap<usize, (ReplyRoute, Option<Instant>)>>,
    /// The latest generation every rank has met at: a rank that arrives at
    /// it again (its reply came too late for its deadline) passes at once.
    barrier_done: Option<u64>,
    shutdown: Gather<ReplyRoute>,
}

pub(crate) struct Core {
    pub(crate) rank: usize,
    pub(crate) world_size: usize,
    pub(crate) names: Vec<String>,
    pub(crate) config: Config,
    me: Weak<Core>,
    /// Each handler with its name as a shared label (what the pool reports
    /// a busy worker as running), made once at registration.
    registry: RwLock<FxHashMap<Box<[u8]>, Arc<Registered>>>,
    pending: Arc<Pending>,
    /// Taken by every call: alone on its lines, away from the fields the
    /// threads reading replies look at.
    next_id: Padded<AtomicU64>,
    state: AtomicU8,
    /// Requests that arrived before `start`; `None` once started.
    early: Mutex<Option<Vec<InRequest>>>,
    pool: Pool<AgentJob>,
    /// Request bytes waiting in the pool's queue for a worker. At
    /// `config.send_window_bytes` the backlog is full and the transport
    /// stops reading requests (TCP then pushes back on the senders); below
    /// half of it, reading resumes.
    backlog_bytes: Arc<AtomicU64>,
    deadline_thread: Mutex<Option<JoinHandle<()>>>,
    /// Threads started to run an I/O loop when no worker was idle
    /// (`Executor::rescue_io`); finished ones are dropped as others start.
    /// `None` once `close_and_join` took them: none starts after.
    rescuers: Mutex<Option<Vec<JoinHandle<()>>>>,
    transports: OnceLock<Transports>,
    pub(crate) stats: Arc<Stats>,
    /// Pool requests by caller and call id, for cancels.
    in_service: Arc<InService>,
    /// Requests reading threads kept to serve themselves.
    leases: Leases,
    gatherings: Mutex<Gatherings>,
    barrier_generation: AtomicU64,
    stall_reported: Mutex<bool>,
    /// Runs completion callbacks that a call completed off the library's
    /// threads on the worker pool instead.
    spawner: Spawner,
    io_label: Arc<str>,
}

fn remaining(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

impl Core {
    /// A core for one rank; the transport is attached with [`Core::attach`].
    /// `io_threads` more threads join the pool for the transport's I/O loop.
    pub(crate) fn new(config: Config, names: Vec<String>, io_threads: usize) -> Result<Arc<Core>> {
        let pool = Pool::new(
            config.worker_threads + io_threads,
            &format!("rpcagent-w{}", config.rank),
        )
        .map_err(|e| RpcError::Io(format!("cannot start worker threads: {e}")))?;
        let core = Arc::new_cyclic(|me| Core {
            rank: config.rank,
            world_size: config.world_size,
            names,
            me: me.clone(),
            registry: RwLock::new(FxHashMap::default()),
            pending: Arc::new(Pending::new(config.world_size)),
            next_id: Padded(AtomicU64::new(1)),
            state: AtomicU8::new(RUNNING),
            early: Mutex::new(Some(Vec::new())),
            pool,
            deadline_thread: Mutex::new(None),
            rescuers: Mutex::new(Some(Vec::new())),
            transports: OnceLock::new(),
            stats: Arc::new(Stats::default()),
            in_service: Arc::default(),
            leases: Leases::default(),
            backlog_bytes: Arc::new(AtomicU64::new(0)),
            gatherings: Mutex::new(Gatherings {
                barriers: HashMap::new(),
                barrier_done: None,
                shutdown: Gather::new(config.world_size),
            }),
            barrier_generation: AtomicU64::new(0),
            stall_reported: Mutex::new(false),
            spawner: {
                let me = me.clone();
                let label: Arc<str> = "(completion callback)".into();
                // Run as callbacks are anywhere: panics caught, no blocking.
                Arc::new(move |cb| {
                    let job: Work = Box::new(move || crate::future::run_callback(cb));
                    match me.upgrade() {
                        Some(core) => {
                            if let Err(job) = core.pool.submit(label.clone(), AgentJob::Work(job)) {
                                job.run();
                            }
                        }
                        None => job(),
                    }
                })
            },
            io_label: "(I/O loop)".into(),
            config,
        });
        let expired = Arc::downgrade(&core);
        let ticked = Arc::downgrade(&core);
        let watcher = Arc::downgrade(&core);
        let thread = core
            .pending
            .spawn_deadline_thread(
                format!("rpcagent-t{}", core.rank),
                Duration::from_millis(500),
                move |call| {
                    if let Some(core) = expired.upgrade() {
                        core.expire(call);
                    }
                },
                move || {
                    if let Some(core) = ticked.upgrade() {
                        core.check_pool_stall();
                        core.probe_for_shutdown();
                    }
                },
                move || watcher.upgrade().and_then(|core| core.leases.reclaim_stalled(&core)),
            )
            .map_err(|e| {
                core.pool.stop(None);
                RpcError::Io(format!("cannot start the deadline thread: {e}"))
            })?;
        *core.deadline_thread.lock() = Some(thread);
        // A worker out of work writes the replies it held back for company.
        let idle = Arc::downgrade(&core);
        core.pool.on_idle(Box::new(move || {
            if let Some(core) = idle.upgrade() {
                core.flush_batches();
            }
        }));
        Ok(core)
    }

    pub(crate) fn attach(&self, transports: Transports) {
        let _ = self.transports.set(transports);
    }

    /// The transport that carries calls to `dst`.
    fn transport_to(&self, dst: usize) -> &Arc<dyn Transport> {
        self.transports
            .get()
            .expect("the transports are attached before the agent is handed out")
            .to(dst)
    }

    /// Every transport (none before they are attached).
    fn transports(&self) -> &[Arc<dyn Transport>] {
        self.transports.get().map_or(&[], |t| t.all())
    }

    /// Where other ranks reach this one: its first transport's address
    /// (the others carry calls to itself, or ride on the first's).
    pub(crate) fn listen_addr(&self) -> String {
        self.transports().first().map(|t| t.listen_addr()).unwrap_or_default()
    }

    /// How calls to `rank` travel (see `Transport::peer_transport`); `None`
    /// for a rank out of range or not called yet.
    pub(crate) fn peer_transport(&self, rank: usize) -> Option<&'static str> {
        if rank >= self.world_size {
            return None;
        }
        self.transports.get()?.to(rank).peer_transport(rank)
    }

    // ---- registry ----

    pub(crate) fn register(&self, name: &str, handler: Handler) -> Result<()> {
        check_name(name).map_err(|why| RpcError::InvalidArgument(format!("function name {why}")))?;
        let mut registry = self.registry.write();
        if registry.contains_key(name.as_bytes()) {
            return Err(RpcError::Exists(name.to_string()));
        }
        registry.insert(
            name.as_bytes().into(),
            Arc::new(Registered {
                handler,
                name: name.into(),
                stats: Arc::default(),
            }),
        );
        Ok(())
    }

    pub(crate) fn unregister(&self, name: &str) -> Result<()> {
        match self.registry.write().remove(name.as_bytes()) {
            Some(_) => Ok(()),
            None => Err(RpcError::NotFound {
                rank: self.rank,
                function: name.to_string(),
            }),
        }
    }

    /// Opens for business: requests that arrived early are served now.
    pub(crate) fn start(&self) -> Result<()> {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Err(RpcError::Shutdown("the agent is shut down".into()));
        }
        // Listed before the lock is let go (lock order: `early`, then the
        // cancellation list, as in `on_cancel`), so that a cancel arriving
        // while they are dispatched one by one still finds each.
        let early: Vec<(InRequest, Cancellation)> = {
            let mut early = self.early.lock();
            let requests = early.take().into_iter().flatten();
            requests
                .map(|request| {
                    let mut cancel = self.cancellation(&request);
                    cancel.list();
                    (request, cancel)
                })
                .collect()
        };
        for (request, cancel) in early {
            if !cancel.caller_cancelled(&*request.reply_to) && !self.gave_up(&request, &request.name()) {
                self.dispatch(request, None, Some(cancel));
            }
        }
        Ok(())
    }

    /// True (and logged) when the caller's deadline passed before `request`
    /// ran: it waited before `start`, or in the pool's queue. A request
    /// dispatched as it arrives is not checked (no clock read per call).
    fn gave_up(&self, request: &InRequest, function: &str) -> bool {
        if request.deadline.is_none_or(|d| Instant::now() < d) {
            return false;
        }
        log_at!(
            Debug,
            Some(self.rank),
            "dropped a call to '{function}' from rank {}: its deadline passed before it ran",
            request.src
        );
        true
    }

    // ---- calling ----

    /// Starts a call. `timeout`: `None` means no deadline. `Err` when the
    /// call cannot start (bad arguments, shutting down, too large); failures
    /// after it left come through the future.
    pub(crate) fn call(
        &self,
        dst: usize,
        function: &str,
        args: &[&[u8]],
        timeout: Option<Duration>,
        internal: bool,
        will_wait: bool,
    ) -> Result<RpcFuture> {
        let args_len = crate::transport::total_len(args);
        if let Err(e) = self.check_call(dst, function, args_len, internal) {
            if !internal {
                self.pending.refused();
                self.stats.completing.calls_failed.fetch_add(1, Ordering::Relaxed);
            }
            return Err(e);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Slot::new();
        let started = Instant::now();
        let deadline = timeout.map(|t| started + t);
        let call = PendingCall {
            dst,
            function: crate::wire::Name::new(function.as_bytes()),
            internal,
            started,
            deadline,
            slot: slot.clone(),
        };
        // Counts the call as started (and its bytes, if added).
        let Ok(in_flight) = self.pending.insert(id, call, args_len) else {
            // The agent closed between the check above and now.
            if !internal {
                self.stats.completing.calls_failed.fetch_add(1, Ordering::Relaxed);
            }
            return Err(RpcError::Shutdown(format!("rank {} is shut down", self.rank)));
        };
        let request = OutRequest {
            id,
            function,
            internal,
            timeout,
            deadline,
            args,
            will_wait,
            in_flight,
        };
        if let Err(e) = self.transport_to(dst).send_request(dst, &request) {
            self.finish(id, Err(e));
        }
        let progress = self.me.clone() as std::sync::Weak<dyn Progress>;
        Ok(RpcFuture::with_driver(slot, progress, dst, id, deadline))
    }

    fn check_call(&self, dst: usize, function: &str, args_len: usize, internal: bool) -> Result<()> {
        let state = self.state.load(Ordering::Acquire);
        if state == CLOSED || (state == DRAINING && !internal && !crate::threads::in_any_handler()) {
            return Err(RpcError::Shutdown(format!("rank {} is shutting down", self.rank)));
        }
        if dst >= self.world_size {
            return Err(RpcError::InvalidArgument(format!(
                "rank {dst} is out of range for a world of {}",
                self.world_size
            )));
        }
        check_name(function).map_err(|why| RpcError::InvalidArgument(format!("function name {why}")))?;
        let max = self.config.max_message_bytes;
        if args_len as u64 > max {
            return Err(RpcError::TooLarge(format!(
                "arguments of {args_len} bytes exceed the maximum message size of {max} bytes"
            )));
        }
        Ok(())
    }

    /// Completes call `id` if it is still in flight.
    fn finish(&self, id: u64, outcome: Result<Vec<u8>>) {
        if let Some(call) = self.pending.remove(id) {
            self.complete(call, outcome);
        }
    }

    fn complete(&self, call: PendingCall, outcome: Result<Vec<u8>>) {
        if !call.internal {
            let counter = match &outcome {
                Ok(data) => {
                    self.stats
                        .completing
                        .bytes_received
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    &self.stats.completing.calls_ok
                }
                Err(RpcError::Timeout(_)) => &self.stats.completing.calls_timed_out,
                Err(_) => &self.stats.completing.calls_failed,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        call.slot.complete(outcome, Some(&self.spawner));
    }

    fn expire(&self, call: PendingCall) {
        let waited = call.deadline.map_or(Duration::ZERO, |d| d - call.started);
        let error = RpcError::Timeout(format!(
            "call to '{}' on rank {} timed out after {} ms",
            call.function,
            call.dst,
            waited.as_millis()
        ));
        self.complete(call, Err(error));
    }

    pub(crate) fn calls_in_flight(&self) -> usize {
        self.pending.user_calls()
    }

    /// The counters of function `name`, if it is registered.
    pub(crate) fn function_stats(&self, name: &str) -> Option<FunctionStatsSnapshot> {
        self.registry.read().get(name.as_bytes()).map(|r| r.stats.snapshot())
    }

    pub(crate) fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot(self.pending.counts())
    }

    // ---- serving ----

    fn route(&self, request: &InRequest) -> ReplyRoute {
        self.route_as(request, self.cancellation(request), None)
    }

    fn cancellation(&self, request: &InRequest) -> Cancellation {
        self.in_service.cancellation(request.src, request.id, request.deadline)
    }

    /// `function`: the counters of the function that answers.
    fn route_as(&self, request: &InRequest, cancel: Cancellation, function: Option<Arc<FunctionStats>>) -> ReplyRoute {
        ReplyRoute {
            function,
            sink: request.reply_to.clone(),
            id: request.id,
            max_message_bytes: self.config.max_message_bytes,
            // The agent's own traffic is not counted as served requests.
            stats: (!request.internal).then(|| self.stats.clone()),
            cancel,
        }
    }

    /// Runs `request`'s handler: inline handlers here and now, others on
    /// the pool (or kept by the I/O thread's read `pass` to run itself: see
    /// `kept.rs`).
    /// `listed`: its cancellation, already listed (requests that waited for
    /// `start`); otherwise one is made (and listed for the pool).
    fn dispatch(&self, mut request: InRequest, pass: Option<&mut ReadPass>, listed: Option<Cancellation>) {
        let found = self.registry.read().get(&request.function[..]).cloned();
        let Some(handler) = found else {
            let message = format!("rank {} has no function named '{}'", self.rank, request.name());
            return self.route(&request).send(Err((Status::NotFound, message)));
        };
        // The handler has the name: a long one's copy is freed here, on the
        // thread that allocated it (freed on a worker, it costs the
        // allocator's slow path on both threads).
        drop(std::mem::take(&mut request.function));
        handler.stats.arrived(request.args.len());
        let inline = handler.handler.options.inline;
        if inline && request.inline_here {
            return crate::threads::must_not_block(|| self.run_handler(handler, request, listed, &|| false));
        }
        let label = handler.name.clone();
        let recent_ns = handler.stats.recent_ns();
        // Listed until answered (or dropped, on any path), so that the
        // caller's cancel finds it.
        let mut cancel = listed.unwrap_or_else(|| self.cancellation(&request));
        cancel.list();
        // Counted from now until the job starts (a job dropped unrun by a
        // stopped pool belongs to a closing agent: its count no longer matters).
        let bytes = request.args.len() as u64;
        self.backlog_bytes.fetch_add(bytes, Ordering::AcqRel);
        let serve = Serve {
            core: self.me.clone(),
            handler,
            request,
            cancel,
            bytes,
        };
        // A pool that has stopped belongs to a closing agent, whose
        // connections are closing too: the request is dropped with them.
        if let Some(pass) = pass {
            return pass
                .kept(|| PassBatch::new(self.me.clone(), self.leases.take_spare()))
                .keep(label, serve, recent_ns);
        }
        self.queue_serve(label, serve);
    }

    /// Queues a request on the pool (dropped if the pool has stopped: its
    /// agent is closing, and its connections with it).
    pub(super) fn queue_serve(&self, label: Arc<str>, serve: Serve) {
        let _ = self.pool.submit(label, AgentJob::Serve(serve));
    }

    /// Queues requests ahead of every queued job, in their order (they
    /// were read before those).
    pub(super) fn queue_ahead(&self, serves: Vec<(Arc<str>, Serve)>) {
        // Most callers have nothing to queue (a lease ended, or none was
        // stalled): no lock then.
        if serves.is_empty() {
            return;
        }
        let jobs = serves.into_iter().map(|(label, serve)| (label, AgentJob::Serve(serve)));
        let _ = self.pool.submit_all_ahead(jobs);
    }

    pub(super) fn leases(&self) -> &Leases {
        &self.leases
    }

    /// The calling thread is about to wait: if it serves requests in place
    /// for an I/O loop, that loop moves on first (see
    /// `Transport::leave_in_place`; a wait for a reply does the same in the
    /// transport's `drive`). Other waits inside such a handler rely on the
    /// deadline thread, which moves the loop on within about
    /// [`LEASE_STALL`](super::kept::LEASE_STALL) and its timer's slack.
    fn leave_in_place(&self) {
        self.transports().iter().for_each(|t| t.leave_in_place());
    }

    /// Has the deadline thread watch the leases out (a lease was just
    /// lent: see `Leases::lend`).
    pub(super) fn watch_leases(&self) {
        self.pending.watch();
    }

    /// A queued request's job started: its bytes leave the backlog, and
    /// reading resumes when that brings the backlog below half full.
    fn left_backlog(&self, bytes: u64) {
        let before = self.backlog_bytes.fetch_sub(bytes, Ordering::AcqRel);
        let resume_below = self.config.send_window_bytes / 2;
        if before >= resume_below && before - bytes < resume_below {
            self.transports().iter().for_each(|t| t.resume_reading());
        }
    }

    /// `listed`: its cancellation, if made already (see `dispatch`);
    /// `more_follow`: asked once the handler returned, whether requests wait
    /// to be served behind it (its reply may then wait for theirs).
    fn run_handler(
        &self,
        handler: Arc<Registered>,
        request: InRequest,
        listed: Option<Cancellation>,
        more_follow: &dyn Fn() -> bool,
    ) {
        let cancel = listed.unwrap_or_else(|| self.cancellation(&request));
        // What the handler's `Request` looks at (the route moves into the reply).
        let view = cancel.view_in(&self.in_service, Some(&*request.reply_to));
        let route = self.route_as(&request, cancel, Some(handler.stats.clone()));
        if self.state.load(Ordering::Acquire) == CLOSED {
            return route.send(Err((Status::Shutdown, format!("rank {} is shut down", self.rank))));
        }
        let mut reply = Reply::new(route);
        let src = request.src;
        // Kept for the next large message once a borrowing handler is done.
        let mut args = Some(request.args);
        let running = handler.stats.running();
        let result = crate::threads::in_handler(|| {
            catch_unwind(AssertUnwindSafe(|| match &handler.handler.body {
                Body::Borrowed(func) => {
                    let view = Request {
                        src_rank: src,
                        function: &handler.name,
                        args: args.as_deref().unwrap_or_default(),
                        cancel: view,
                    };
                    func(&view, &mut reply)
                }
                Body::Owned(func) => func(src, args.take().unwrap_or_default()).map(|out| reply.set(out)),
            }))
        });
        drop(running);
        if let Some(args) = args {
            crate::net::buffers::give_back(args);
        }
        // Let go of the handler before answering: once the caller has its
        // reply, an unregister releases the handler's data at once.
        drop(handler);
        let result = result.unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(format!("the handler panicked: {what}"))
        });
        reply.finish(result, more_follow());
    }

    /// Writes every frame the transports hold back for company.
    fn flush_batches(&self) {
        self.transports().iter().for_each(|t| t.flush_batches());
    }

    /// The agent's own functions: rank 0 serves barriers; any rank may
    /// coordinate a shutdown, and answers probes.
    fn serve_internal(&self, request: InRequest) {
        let route = self.route(&request);
        let mut g = self.gatherings.lock();
        let complete = match (self.rank, &request.function[..]) {
            (0, f) if f == BARRIER.as_bytes() && request.args.len() == 8 => {
                let generation = u64::from_le_bytes(request.args[..8].try_into().expect("8 bytes"));
                if g.barrier_done.is_some_and(|done| generation <= done) {
                    drop(g);
                    return route.send(Ok(Payload::Owned(Vec::new())));
                }
                let arrived = g.barriers.entry(generation).or_default();
                // A rank whose barrier call has timed out is not here any more
                // (it will come again with the same generation).
                let now = Instant::now();
                arrived.retain(|_, (_, deadline)| deadline.is_none_or(|d| d > now));
                arrived.insert(request.src, (route, request.deadline));
                if arrived.len() == self.world_size {
                    g.barrier_done = Some(generation);
                    g.barriers
                        .remove(&generation)
                        .map(|a| a.into_iter().map(|(rank, (route, _))| (rank, route)).collect())
                } else {
                    None
                }
            }
            (_, f) if f == SHUTDOWN.as_bytes() => {
                let Some(lost) = shutdown::decode_ranks(&request.args) else {
                    drop(g);
                    let message = "a shutdown arrival must list ranks as u32s".to_string();
                    return route.send(Err((Status::InvalidArgument, message)));
                };
                let release = g.shutdown.arrive(request.src, &lost, route, Instant::now());
                drop(g);
                return self.release_shutdown(release);
            }
            (_, f) if f == ALIVE.as_bytes() => {
                drop(g);
                return route.send(Ok(Payload::Owned(Vec::new())));
            }
            _ => {
                drop(g);
                let message = format!("rank {} has no internal function '{}'", self.rank, request.name());
                return route.send(Err((Status::NotFound, message)));
            }
        };
        drop(g);
        let complete: Option<HashMap<usize, ReplyRoute>> = complete;
        // This rank's own arrival is answered last: once answered, its
        // caller may go on to exit, and the others' answers must have been
        // sent (or queued) by then.
        let mut routes: Vec<(usize, ReplyRoute)> = complete.into_iter().flatten().collect();
        routes.sort_by_key(|(rank, _)| *rank == self.rank);
        for (_, route) in routes {
            route.send(Ok(Payload::Owned(Vec::new())));
        }
    }

    /// Answers the ranks a shutdown gather let go, telling each who was lost.
    fn release_shutdown(&self, release: Option<Release<ReplyRoute>>) {
        let Some(release) = release else {
            return;
        };
        let lost = shutdown::encode_ranks(&release.lost);
        // This rank's own arrival is answered last: once answered, its
        // shutdown goes on to close every connection, and the others'
        // answers must have been sent (or queued) by then.
        let mut routes = release.routes;
        routes.sort_by_key(|(rank, _)| *rank == self.rank);
        for (_, route) in routes {
            route.send(Ok(Payload::Owned(lost.clone())));
        }
    }

    /// A shutdown gather waiting here with no new arrival probes the ranks
    /// it waits for: a dead one fails its probe, and the transport reports
    /// it lost (`on_peer_lost`). Runs on the deadline thread's tick.
    fn probe_for_shutdown(&self) {
        let ranks = self.gatherings.lock().shutdown.to_probe(self.rank, Instant::now());
        for rank in ranks {
            // The answer does not matter, only a failure to reach the rank.
            drop(self.call(rank, ALIVE, &[], Some(PROBE_TIMEOUT), true, false));
        }
    }

    /// Logs once when every worker has been busy for longer than
    /// [`POOL_STALL_WARNING`] (as this tick sees it: within a tick of it),
    /// naming what they run.
    fn check_pool_stall(&self) {
        let busy = self.pool.busy();
        let stalled =
            busy.busy == busy.workers && busy.all_busy_since.is_some_and(|t| t.elapsed() >= POOL_STALL_WARNING);
        let mut reported = self.stall_reported.lock();
        if stalled && !*reported {
            let mut counts: Vec<(Arc<str>, usize)> = Vec::new();
            for label in busy.labels {
                match counts.iter_mut().find(|(l, _)| *l == label) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((label, 1)),
                }
            }
            let held: Vec<String> = counts.iter().map(|(l, n)| format!("'{l}' x{n}")).collect();
            log_at!(
                Warn,
                Some(self.rank),
                "all {} worker threads have been busy for over {} s, held by {}; requests are queueing \
                 (nested calls can deadlock a pool this way: raise worker_threads or defer replies)",
                busy.workers,
                POOL_STALL_WARNING.as_secs(),
                held.join(", ")
            );
        }
        *reported = stalled;
    }

    // ---- lifecycle ----

    /// Meets every rank at rank 0. A barrier that fails (times out) keeps
    /// its generation, so trying again joins the same barrier the others
    /// are in; rank 0 keeps only a rank's latest arrival.
    pub(crate) fn barrier(&self, timeout: Option<Duration>) -> Result<()> {
        let generation = self.barrier_generation.load(Ordering::Relaxed);
        self.call(0, BARRIER, &[&generation.to_le_bytes()], timeout, true, true)?
            .wait()
            .map(|_| {
                self.barrier_generation.fetch_add(1, Ordering::Relaxed);
            })
            .map_err(|e| match e {
                RpcError::Timeout(_) => RpcError::Timeout(format!(
                    "barrier {generation} timed out after {} ms waiting for the other ranks",
                    timeout.unwrap_or_default().as_millis()
                )),
                other => other,
            })
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) == CLOSED
    }

    /// Graceful: stop new calls, finish ours, meet every rank at rank 0, then
    /// close. Otherwise: fail everything in flight and close at once. The
    /// agent is closed locally when this returns, whatever it returns.
    pub(crate) fn shutdown(&self, graceful: bool, timeout: Option<Duration>) -> Result<()> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Ok(());
        }
        // A handler shutting its agent down waits below, for calls and
        // ranks the loop must read, then for the loop itself.
        self.leave_in_place();
        let mut result = Ok(());
        if graceful {
            self.state.store(DRAINING, Ordering::Release);
            if !self.pending.wait_drained(deadline) {
                result = Err(RpcError::Timeout(format!(
                    "graceful shutdown timed out with {} calls of rank {} still in flight",
                    self.calls_in_flight(),
                    self.rank
                )));
            } else {
                result = self.meet_at_shutdown(deadline).map_err(|e| match e {
                    RpcError::Timeout(_) => RpcError::Timeout(format!(
                        "graceful shutdown timed out waiting for every live rank to reach shutdown ({} ms)",
                        timeout.unwrap_or_default().as_millis()
                    )),
                    other => other,
                });
            }
        }
        // Ranks were lost, but the live ones met: the last replies still go.
        let met = matches!(result, Ok(()) | Err(RpcError::PeerLost { .. }));
        self.close(graceful && met, deadline);
        log_at!(
            Info,
            Some(self.rank),
            "shut down ({})",
            if graceful { "graceful" } else { "immediate" }
        );
        result
    }

    /// Waits for every live rank to reach its graceful shutdown, at the
    /// lowest rank believed alive (see `shutdown.rs`). `PeerLost` when
    /// ranks were lost on the way.
    fn meet_at_shutdown(&self, deadline: Option<Instant>) -> Result<()> {
        let mut lost: Vec<usize> = Vec::new();
        for coordinator in 0..self.world_size {
            if lost.contains(&coordinator) {
                continue;
            }
            let arrival = shutdown::encode_ranks(&lost);
            match self
                .call(coordinator, SHUTDOWN, &[&arrival], remaining(deadline), true, true)
                .and_then(RpcFuture::wait)
            {
                Ok(reply) => {
                    for rank in shutdown::decode_ranks(&reply).unwrap_or_default() {
                        if !lost.contains(&rank) {
                            lost.push(rank);
                        }
                    }
                    break;
                }
                // Dead (or already gone, having met elsewhere): the next
                // rank coordinates (this one is never lost to itself, so
                // the loop ends here at the latest).
                Err(RpcError::PeerLost { .. } | RpcError::Shutdown(_)) if coordinator != self.rank => {
                    lost.push(coordinator)
                }
                Err(e) => return Err(e),
            }
        }
        if lost.is_empty() {
            return Ok(());
        }
        lost.sort_unstable();
        log_at!(
            Warn,
            Some(self.rank),
            "graceful shutdown: the live ranks met; ranks {lost:?} were lost"
        );
        Err(RpcError::PeerLost {
            rank: lost[0],
            reason: format!("graceful shutdown went on without ranks {lost:?}, which were lost"),
        })
    }

    fn close(&self, graceful: bool, deadline: Option<Instant>) {
        if self.state.swap(CLOSED, Ordering::AcqRel) == CLOSED {
            return;
        }
        // Closing from a handler served in place: the transports wait for
        // their loops below, which must not be this thread.
        self.leave_in_place();
        for call in self.pending.close() {
            let error = RpcError::Shutdown(format!("rank {} shut down before the call completed", self.rank));
            self.complete(call, Err(error));
        }
        for request in self.early.lock().take().into_iter().flatten() {
            self.route(&request)
                .send(Err((Status::Shutdown, format!("rank {} shut down", self.rank))));
        }
        // Flushing the last replies is bounded even when the caller's is not.
        let flush_until = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(10));
        for t in self.transports() {
            t.close(graceful, flush_until);
        }
        self.pending.stop();
        if let Some(t) = self.deadline_thread.lock().take()
            && t.thread().id() != std::thread::current().id()
        {
            let _ = t.join();
        }
        // The deadline thread, which took back stalled leases, has stopped
        // (and the I/O loops): what threads kept goes to the pool, which
        // finishes its queue.
        self.leases.reclaim_all(self);
        self.pool.stop(deadline);
        // Handlers may hold agent handles; dropping them breaks those cycles.
        let handlers = std::mem::take(&mut *self.registry.write());
        drop(handlers);
        self.gatherings.lock().barriers.clear();
    }

    /// Final teardown when the last handle goes: waits for running handlers.
    pub(crate) fn close_and_join(&self) {
        self.close(false, Some(Instant::now()));
        self.pool.stop(None);
        // A loop's own thread ends as soon as its loop sees the close.
        let me = std::thread::current().id();
        let rescuers = self.rescuers.lock().take().unwrap_or_default();
        for thread in rescuers {
            if thread.thread().id() != me {
                let _ = thread.join();
            }
        }
    }
}

impl Executor for Core {
    fn run_io(&self, job: Work) -> bool {
        self.pool
            .submit_first(self.io_label.clone(), AgentJob::Work(job))
            .is_ok()
    }

    fn rescue_io(&self, job: Work, on_thread: Work) -> bool {
        // Ahead of the requests just taken back from the held thread: the
        // loop reads what they, and everyone else, wait for.
        let job = match self
            .pool
            .submit_first_if_idle(self.io_label.clone(), AgentJob::Work(job), true)
        {
            Ok(()) => return true,
            Err(job) => job.into_work(),
        };
        // No worker idle: a thread of its own, which runs the loop only
        // and hands it to a worker once one is idle with nothing queued
        // (see `event_loop::io_loop`); joined by `close_and_join`, after
        // which none starts. Started under the list's lock for that; if it
        // cannot start, the loop waits for a worker.
        let mut guard = self.rescuers.lock();
        let Some(rescuers) = guard.as_mut() else {
            return false;
        };
        let spawned = std::thread::Builder::new()
            .name(format!("rpcagent-io{}", self.rank))
            .spawn(move || {
                let _role = crate::threads::enter(crate::threads::Role::Worker);
                on_thread();
            });
        match spawned {
            Ok(thread) => {
                rescuers.retain(|t| !t.is_finished());
                rescuers.push(thread);
                true
            }
            Err(e) => {
                drop(guard);
                let queued = self.run_io(job);
                let (rank, e) = (self.rank, e.to_string());
                let _ = catch_unwind(|| {
                    log_at!(
                        Warn,
                        Some(rank),
                        "cannot start a thread for the I/O loop ({e}); it waits for a worker"
                    )
                });
                queued
            }
        }
    }

    fn move_io(&self, job: Work, over_queued: bool) -> std::result::Result<(), Work> {
        self.pool
            .submit_first_if_idle(self.io_label.clone(), AgentJob::Work(job), over_queued)
            .map_err(AgentJob::into_work)
    }

    fn starved(&self) -> bool {
        self.pool.starved()
    }
}

/// What the agent's pool runs: a request to serve, queued as it is (no box
/// per request), or any other work (the I/O loop, callbacks).
enum AgentJob {
    Serve(Serve),
    Work(Work),
}

impl AgentJob {
    /// The job as boxed work (a job the pool gave back).
    fn into_work(self) -> Work {
        match self {
            AgentJob::Work(work) => work,
            AgentJob::Serve(serve) => Box::new(move || serve.run(&|| false)),
        }
    }
}

impl Job for AgentJob {
    fn run(self) {
        match self {
            AgentJob::Serve(serve) => serve.run(&|| false),
            AgentJob::Work(work) => work(),
        }
    }
}

/// A request waiting for a pool thread, listed for cancels.
pub(super) struct Serve {
    core: std::sync::Weak<Core>,
    handler: Arc<Registered>,
    request: InRequest,
    cancel: Cancellation,
    /// Its share of the pool's backlog, given back as it starts.
    bytes: u64,
}

impl Serve {
    /// `more_kept`: asked once its handler returned, whether its thread
    /// kept more requests to serve after it. Its reply may then wait for
    /// theirs, as it may while jobs wait in the pool's queue.
    pub(super) fn run(self, more_kept: &dyn Fn() -> bool) {
        let Serve {
            core,
            handler,
            request,
            cancel,
            bytes,
        } = self;
        let Some(core) = core.upgrade() else { return };
        let more_follow = || more_kept() || core.pool.has_queued();
        core.left_backlog(bytes);
        // Dropped unrun if the caller is not waiting any more.
        if cancel.caller_cancelled(&*request.reply_to) || core.gave_up(&request, &handler.name) {
            handler.stats.ended(Ended::Cancelled);
        } else if handler.handler.options.inline {
            // An inline handler on a worker (a rank's call to itself)
            // still must not block, as on the I/O thread.
            crate::threads::must_not_block(|| core.run_handler(handler, request, Some(cancel), &more_follow));
        } else {
            core.run_handler(handler, request, Some(cancel), &more_follow);
        }
    }
}

impl Progress for Core {
    fn drive(&self, dst: usize, waiting: Waiting<'_>, done: &dyn Fn() -> bool, deadline: Option<Instant>) {
        if self.transports.get().is_some() {
            self.transport_to(dst).drive(dst, waiting, done, deadline);
        }
    }

    fn unpark_mine(&self) {
        self.transports().iter().for_each(|t| t.unpark_mine());
    }

    fn flush_batches(&self) {
        Core::flush_batches(self);
    }

    fn cancel(&self, dst: usize, id: u64) {
        let Some(call) = self.pending.remove_if(id, |c| c.dst == dst) else {
            // Completed (or timed out) meanwhile: it keeps its outcome.
            return;
        };
        let error = RpcError::Cancelled(format!("the call to '{}' on rank {dst} was cancelled", call.function));
        self.complete(call, Err(error));
        if self.transports.get().is_some() {
            self.transport_to(dst).send_cancel(dst, id);
        }
    }
}

impl Dispatch for Core {
    fn on_request(&self, request: InRequest, pass: Option<&mut ReadPass>) {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return self
                .route(&request)
                .send(Err((Status::Shutdown, format!("rank {} is shut down", self.rank))));
        }
        // The agent's own functions (barrier, shutdown) do not wait for start.
        if request.internal {
            return self.serve_internal(request);
        }
        self.stats
            .serving
            .bytes_received
            .fetch_add(request.args.len() as u64, Ordering::Relaxed);
        {
            let mut early = self.early.lock();
            if let Some(queue) = early.as_mut() {
                queue.push(request);
                return;
            }
        }
        self.dispatch(request, pass, None);
    }

    fn on_cancel(&self, src: usize, id: u64) {
        // A request that came before `start` waits unlisted: it goes now.
        if let Some(early) = self.early.lock().as_mut() {
            early.retain(|r| r.src != src || r.id != id);
        }
        self.in_service.cancel(src, id);
    }

    fn on_response(&self, from: usize, id: u64, outcome: Response) {
        let Some(call) = self.pending.remove_if(id, |c| c.dst == from) else {
            // Abandoned, timed out, or not this peer's to answer.
            return;
        };
        let outcome = outcome
            .map_err(|(status, message)| RpcError::from_remote(status, from, call.function.to_string(), message));
        self.complete(call, outcome);
    }

    fn on_peer_lost(&self, rank: usize, error: RpcError) {
        for call in self.pending.remove_where(|c| c.dst == rank) {
            self.complete(call, Err(error.clone()));
        }
        // A shutdown gathered here no longer waits for it.
        let release = self.gatherings.lock().shutdown.peer_lost(rank);
        self.release_shutdown(release);
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn max_message_bytes(&self) -> u64 {
        self.config.max_message_bytes
    }

    fn calls_in_flight_to(&self, rank: usize) -> usize {
        self.pending.in_flight_to(rank)
    }

    fn backlog_full(&self) -> bool {
        self.backlog_bytes.load(Ordering::Acquire) >= self.config.send_window_bytes
    }

    fn is_inline(&self, function: &str) -> bool {
        self.registry
            .read()
            .get(function.as_bytes())
            .is_some_and(|r| r.handler.options.inline)
    }
}
