//! rpcagent: the ranks of a distributed training job register named
//! functions and call each other with byte payloads, synchronously or
//! asynchronously, over TCP between processes or inside one process.
//!
//! ```no_run
//! use rpcagent::{Config, RpcAgent};
//! let agent = RpcAgent::init(Config::from_env()?)?;
//! agent.register("echo", |args: &[u8]| Ok(args.to_vec()))?;
//! agent.start()?;
//! let peer = (agent.rank() + 1) % agent.world_size();
//! let reply = agent.rpc_sync(peer, "echo", b"hi")?;
//! assert_eq!(reply, b"hi");
//! agent.shutdown(true, std::time::Duration::from_secs(30))?;
//! # Ok::<(), rpcagent::RpcError>(())
//! ```

// `unsafe` lives only where the library meets C (`ffi`) and the kernel
// (`net::sys`); each block there says why it is sound.
#![deny(unsafe_code)]

mod agent;
mod auth;
mod config;
mod error;
#[allow(unsafe_code)]
pub mod ffi;
mod future;
#[doc(hidden)]
pub mod fuzzing;
pub mod log;
mod net;
mod pool;
mod queue;
mod rendezvous;
#[allow(unsafe_code)]
mod shm;
mod threads;
mod transport;
pub mod wire;

pub use agent::{
    Deferred, FunctionStatsSnapshot, HandlerFn, HandlerOptions, OwnedHandlerFn, Reply, Request, RpcAgent, StatsSnapshot,
};
pub use config::{
    Config, DEFAULT_CALL_TIMEOUT, DEFAULT_INIT_TIMEOUT, DEFAULT_MASTER_PORT, DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_PEER_TIMEOUT, DEFAULT_SEND_WINDOW_BYTES, DEFAULT_WORKER_THREADS, MAX_NAME_BYTES, MIN_SEND_WINDOW_BYTES,
};
pub use error::{Result, RpcError, Status};
pub use future::RpcFuture;
pub use queue::Queue;

/// Hands a reply buffer back to the library once you are done with it: the
/// next large message is received into it, which saves a page fault and the
/// kernel's zeroing for every 4 KiB (most of a large round trip's CPU time).
/// Optional; small buffers are simply dropped.
pub fn recycle_buffer(buf: Vec<u8>) {
    net::buffers::give_back(buf);
}
