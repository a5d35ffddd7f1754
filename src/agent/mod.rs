//! [`RpcAgent`]: one rank of a world. Registers named functions, serves
//! them, calls other ranks' functions, and leaves the world.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::error::{Result, RpcError};
use crate::future::RpcFuture;
use crate::log::log_at;
use crate::transport::{Transports, local, tcp};

mod core;
mod handler;
mod kept;
mod pending;
mod service;
mod shutdown;
mod stats;

pub use handler::{Deferred, HandlerFn, HandlerOptions, OwnedHandlerFn, Reply, Request};
pub use stats::{FunctionStatsSnapshot, StatsSnapshot};

use self::core::Core;
use handler::{Body, Handler};

/// One rank of a world. Cheap to clone (the clones share the agent), `Send`
/// and `Sync`, so a handler can capture a clone to make nested calls.
///
/// The agent shuts down (immediately) when its last handle is dropped. A
/// handler that captures a clone keeps the agent alive until
/// [`RpcAgent::shutdown`] is called, which releases the handlers.
#[derive(Clone)]
pub struct RpcAgent {
    handle: Arc<Handle>,
}

struct Handle {
    core: Arc<Core>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.core.close_and_join();
    }
}

impl std::fmt::Debug for RpcAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcAgent")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .finish()
    }
}

impl RpcAgent {
    fn wrap(core: Arc<Core>) -> RpcAgent {
        RpcAgent {
            handle: Arc::new(Handle { core }),
        }
    }

    fn core(&self) -> &Core {
        &self.handle.core
    }

    /// Joins a world over TCP: rank 0 hosts the rendezvous at the master
    /// address; blocks until every rank has joined or the init timeout passes.
    pub fn init(config: Config) -> Result<RpcAgent> {
        config.validate()?;
        let joined = tcp::join_world(&config)?;
        let core = Core::new(config, joined.names(), 1)?;
        let transport = match tcp::TcpTransport::start(&core, joined, &core.config) {
            Ok(t) => t,
            Err(e) => {
                core.close_and_join(); // its pool and deadline thread
                return Err(e);
            }
        };
        // Calls to this rank itself are handed to it directly, never
        // through a socket.
        let to_self = local::to_self(
            core.rank,
            Arc::downgrade(&core) as std::sync::Weak<dyn crate::transport::Dispatch>,
        );
        core.attach(Transports::with_self(transport, to_self, core.rank, core.world_size));
        log_at!(
            Info,
            Some(core.rank),
            "joined a world of {} ranks as '{}', listening on {}",
            core.world_size,
            core.names[core.rank],
            core.listen_addr()
        );
        Ok(RpcAgent::wrap(core))
    }

    /// A world of `world_size` ranks inside this process (no sockets), with
    /// default settings.
    pub fn local_world(world_size: usize) -> Result<Vec<RpcAgent>> {
        RpcAgent::local_world_with(world_size, Config::new(0, world_size))
    }

    /// A world inside this process; every rank uses `config` (its rank,
    /// world size and network settings are ignored).
    pub fn local_world_with(world_size: usize, config: Config) -> Result<Vec<RpcAgent>> {
        if world_size == 0 {
            return Err(RpcError::InvalidArgument("world size must be at least 1".into()));
        }
        let configs: Vec<Config> = (0..world_size)
            .map(|rank| {
                let mut c = config.clone();
                c.rank = rank;
                c.world_size = world_size;
                if c.name.is_some() && world_size > 1 {
                    c.name = None; // one name cannot name every rank
                }
                c.validate().map(|_| c)
            })
            .collect::<Result<_>>()?;
        let names: Vec<String> = configs.iter().map(|c| c.worker_name()).collect();
        let mut cores: Vec<Arc<Core>> = Vec::with_capacity(world_size);
        for c in configs {
            match Core::new(c, names.clone(), 0) {
                Ok(core) => cores.push(core),
                Err(e) => {
                    cores.iter().for_each(|c| c.close_and_join());
                    return Err(e);
                }
            }
        }
        let dispatchers = cores
            .iter()
            .map(|c| Arc::downgrade(c) as std::sync::Weak<dyn crate::transport::Dispatch>)
            .collect();
        for (core, transport) in cores.iter().zip(local::world(dispatchers)) {
            core.attach(Transports::single(transport, world_size));
            log_at!(
                Info,
                Some(core.rank),
                "joined an in-process world of {world_size} ranks as '{}'",
                core.names[core.rank]
            );
        }
        Ok(cores.into_iter().map(RpcAgent::wrap).collect())
    }

    /// Registers `function` under `name`: it gets the arguments and returns
    /// the reply, or an error message. Runs on the worker pool.
    pub fn register<F>(&self, name: &str, function: F) -> Result<()>
    where
        F: Fn(&[u8]) -> std::result::Result<Vec<u8>, String> + Send + Sync + 'static,
    {
        self.register_with(name, HandlerOptions::default(), move |request, reply| {
            reply.set(function(request.args)?);
            Ok(())
        })
    }

    /// Registers a full handler: it sees the caller's rank, fills the reply
    /// in place or defers it, and may run inline on the I/O thread.
    pub fn register_with<F>(&self, name: &str, options: HandlerOptions, handler: F) -> Result<()>
    where
        F: Fn(&Request<'_>, &mut Reply) -> std::result::Result<(), String> + Send + Sync + 'static,
    {
        self.core().register(
            name,
            Handler {
                options,
                body: Body::Borrowed(Box::new(handler)),
            },
        )
    }

    /// Registers a handler that owns the arguments buffer: it gets the
    /// caller's rank and the arguments, and returns the reply, which may be
    /// the same buffer transformed in place (no copy either way).
    pub fn register_owned<F>(&self, name: &str, options: HandlerOptions, handler: F) -> Result<()>
    where
        F: Fn(usize, Vec<u8>) -> std::result::Result<Vec<u8>, String> + Send + Sync + 'static,
    {
        self.core().register(
            name,
            Handler {
                options,
                body: Body::Owned(Box::new(handler)),
            },
        )
    }

    /// Removes a function; later calls to it get a not-found error.
    pub fn unregister(&self, name: &str) -> Result<()> {
        self.core().unregister(name)
    }

    /// Starts serving. Requests that arrived earlier waited and run now.
    pub fn start(&self) -> Result<()> {
        self.core().start()
    }

    /// The configured default call deadline (`None`: no deadline).
    pub fn default_timeout(&self) -> Option<Duration> {
        let t = self.core().config.call_timeout;
        (!t.is_zero()).then_some(t)
    }

    /// Calls `function` on rank `dst` and waits for the reply, within the
    /// default call deadline.
    pub fn rpc_sync(&self, dst: usize, function: &str, args: &[u8]) -> Result<Vec<u8>> {
        self.rpc_sync_timeout(dst, function, args, self.default_timeout())
    }

    /// Like [`RpcAgent::rpc_sync`] with this call's own deadline (`None`: none).
    pub fn rpc_sync_timeout(
        &self,
        dst: usize,
        function: &str,
        args: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>> {
        self.start_call(dst, function, args, timeout, true)?.wait()
    }

    /// Starts a call; `will_wait` says the caller waits for it right away.
    pub(crate) fn start_call(
        &self,
        dst: usize,
        function: &str,
        args: &[u8],
        timeout: Option<Duration>,
        will_wait: bool,
    ) -> Result<RpcFuture> {
        self.core().call(dst, function, &[args], timeout, false, will_wait)
    }

    /// Like `start_call`, the arguments given in parts.
    pub(crate) fn start_call_parts(
        &self,
        dst: usize,
        function: &str,
        parts: &[&[u8]],
        timeout: Option<Duration>,
        will_wait: bool,
    ) -> Result<RpcFuture> {
        self.core().call(dst, function, parts, timeout, false, will_wait)
    }

    /// Starts a call whose arguments are `parts` concatenated (the handler
    /// sees one contiguous buffer), written from where they are with
    /// vectored writes: a header and a tensor go without a concatenating
    /// copy. `parts` may be owned buffers (`vec![header, tensor]`, dropped
    /// once sent) or borrowed ones (`&[&header[..], &tensor]`); either way
    /// they are done with (sent, or copied where they must wait) when this
    /// returns. A call that cannot start is a failed future.
    pub fn rpc_async_parts<I, P>(&self, dst: usize, function: &str, parts: I) -> RpcFuture
    where
        I: IntoIterator<Item = P>,
        P: AsRef<[u8]>,
    {
        let parts: Vec<P> = parts.into_iter().collect();
        let slices: Vec<&[u8]> = parts.iter().map(AsRef::as_ref).collect();
        self.start_call_parts(dst, function, &slices, self.default_timeout(), false)
            .unwrap_or_else(RpcFuture::failed)
    }

    /// Starts a call and returns at once; `args` can be reused right away.
    pub fn rpc_async(&self, dst: usize, function: &str, args: &[u8]) -> RpcFuture {
        self.rpc_async_timeout(dst, function, args, self.default_timeout())
    }

    /// Like [`RpcAgent::rpc_async`] with this call's own deadline (`None`: none).
    pub fn rpc_async_timeout(&self, dst: usize, function: &str, args: &[u8], timeout: Option<Duration>) -> RpcFuture {
        self.try_rpc_async(dst, function, args, timeout)
            .unwrap_or_else(RpcFuture::failed)
    }

    /// Like [`RpcAgent::rpc_async_timeout`], but a call that cannot start
    /// (bad rank or name, too large, shutting down) is an `Err` here instead
    /// of a failed future. Failures after the call left still come through
    /// the future.
    pub fn try_rpc_async(
        &self,
        dst: usize,
        function: &str,
        args: &[u8],
        timeout: Option<Duration>,
    ) -> Result<RpcFuture> {
        self.start_call(dst, function, args, timeout, false)
    }

    pub fn rank(&self) -> usize {
        self.core().rank
    }

    pub fn world_size(&self) -> usize {
        self.core().world_size
    }

    /// The worker name of `rank`.
    pub fn worker_name(&self, rank: usize) -> Option<&str> {
        self.core().names.get(rank).map(String::as_str)
    }

    /// The rank whose worker name is `name`.
    pub fn rank_of(&self, name: &str) -> Option<usize> {
        self.core().names.iter().position(|n| n == name)
    }

    /// Returns when every rank has entered the barrier, or fails at `timeout`.
    pub fn barrier(&self, timeout: Duration) -> Result<()> {
        self.core().barrier(Some(timeout))
    }

    /// Like [`RpcAgent::barrier`]; `None` waits without bound.
    pub fn barrier_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.core().barrier(timeout)
    }

    /// Leaves the world. Graceful (every rank calls it): new calls fail with
    /// a shutdown error, this rank's calls in flight finish, and it keeps
    /// serving until every rank has reached shutdown. Immediate: calls in
    /// flight fail at once and connections close. Either way the agent is
    /// shut down locally when this returns.
    pub fn shutdown(&self, graceful: bool, timeout: Duration) -> Result<()> {
        self.core().shutdown(graceful, Some(timeout))
    }

    /// Like [`RpcAgent::shutdown`]; `None` waits without bound.
    pub fn shutdown_timeout(&self, graceful: bool, timeout: Option<Duration>) -> Result<()> {
        self.core().shutdown(graceful, timeout)
    }

    /// True once the agent has shut down.
    pub fn is_shut_down(&self) -> bool {
        self.core().is_closed()
    }

    /// What registered function `name` has served on this rank (see
    /// [`FunctionStatsSnapshot`]); `None` if no such function is registered.
    pub fn function_stats(&self, name: &str) -> Option<FunctionStatsSnapshot> {
        self.core().function_stats(name)
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.core().stats()
    }

    /// Shuts down immediately if still running and waits for every library
    /// thread of this agent, running handlers included, to finish. For the
    /// C API's `rpcagent_free`, which must leave nothing running behind it.
    pub(crate) fn close_and_join(&self) {
        self.core().close_and_join();
    }

    /// Where other ranks reach this one (`ip:port`, or `local` in-process).
    pub fn listen_addr(&self) -> String {
        self.core().listen_addr()
    }

    /// How calls to `rank` travel now: `"shm"` (a rank on this host, under
    /// transport `auto`), `"tcp"`, or `"self"` for this rank
    /// (`"local"` between the ranks of an in-process world); `None` before
    /// this rank's first call to `rank` (connections open lazily) or for a
    /// rank out of range.
    pub fn peer_transport(&self, rank: usize) -> Option<&'static str> {
        self.core().peer_transport(rank)
    }
}
