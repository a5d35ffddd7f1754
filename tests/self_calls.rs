//! A rank's calls to itself (no socket) keep what calls to other ranks
//! promise: the caller's memory stays bounded by its window, inline
//! handlers calling their own rank do not recurse on one stack, and an
//! inline function is served even when every worker is busy.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rpcagent::{Config, HandlerOptions, RpcAgent};

fn world_of_one(config: impl FnOnce(Config) -> Config) -> RpcAgent {
    let port = common::free_port();
    let base = Config::new(0, 1)
        .master("127.0.0.1", port)
        .init_timeout(Duration::from_secs(10));
    RpcAgent::init(config(base)).unwrap()
}

fn rss_mib() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    (statm.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096) >> 20
}

#[test]
fn self_calls_wait_for_room_in_the_backlog() {
    let agent = world_of_one(|c| {
        c.worker_threads(1)
            .send_window_bytes(1 << 20)
            .call_timeout(Duration::from_secs(60))
    });
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    agent
        .register("slow", move |_args| {
            std::thread::sleep(Duration::from_millis(5));
            count.fetch_add(1, Ordering::Relaxed);
            Ok(vec![])
        })
        .unwrap();
    agent.start().unwrap();
    let before = rss_mib();
    let args = vec![7u8; 1 << 20];
    let started = Instant::now();
    let futures: Vec<_> = (0..200).map(|_| agent.rpc_async(0, "slow", &args)).collect();
    let issued_in = started.elapsed();
    let grew = rss_mib().saturating_sub(before);
    // 200 MiB of arguments went through a 1 MiB backlog: issuing waited for
    // the worker, and memory held a few calls' worth, not all of them.
    assert!(grew < 64, "memory grew {grew} MiB while issuing");
    assert!(
        issued_in > Duration::from_millis(200),
        "issuing did not wait: {issued_in:?}"
    );
    for f in futures {
        f.wait().unwrap();
    }
    assert_eq!(served.load(Ordering::Relaxed), 200);
    agent.shutdown(true, Duration::from_secs(10)).unwrap();
}

#[test]
fn an_inline_handler_calling_its_own_rank_does_not_recurse() {
    let agent = world_of_one(|c| c);
    let deepest = Arc::new(AtomicUsize::new(0));
    let (me, seen) = (agent.clone(), deepest.clone());
    agent
        .register_with("hop", HandlerOptions { inline: true }, move |request, _reply| {
            let n = u32::from_le_bytes(request.args.try_into().unwrap());
            seen.fetch_max(n as usize, Ordering::Relaxed);
            if n < 20_000 {
                drop(me.rpc_async(0, "hop", &(n + 1).to_le_bytes()));
            }
            Ok(())
        })
        .unwrap();
    agent.start().unwrap();
    // On a small stack: each hop must run on a worker, not nested here.
    let caller = agent.clone();
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || caller.rpc_async(0, "hop", &1u32.to_le_bytes()).wait().unwrap())
        .unwrap()
        .join()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while deepest.load(Ordering::Relaxed) < 20_000 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(deepest.load(Ordering::Relaxed), 20_000);
    agent.shutdown(true, Duration::from_secs(10)).unwrap();
}

/// Registers the inline "tiny" (answers "tiny") and the pool function
/// "outer", which calls its own rank's "tiny" and answers with its reply;
/// then starts the agent.
fn register_outer_calling_own_inline(agent: &RpcAgent) {
    agent
        .register_with("tiny", HandlerOptions { inline: true }, |_request, reply| {
            reply.set(b"tiny".to_vec());
            Ok(())
        })
        .unwrap();
    let me = agent.clone();
    agent
        .register("outer", move |_args| {
            me.rpc_sync_timeout(0, "tiny", b"", Some(Duration::from_secs(5)))
                .map_err(|e| format!("inner call: {e}"))
        })
        .unwrap();
    agent.start().unwrap();
}

#[test]
fn a_pool_handler_calling_its_own_inline_function_needs_no_free_worker() {
    let agent = world_of_one(|c| c.worker_threads(1));
    register_outer_calling_own_inline(&agent);
    let started = Instant::now();
    let reply = agent
        .rpc_sync_timeout(0, "outer", b"", Some(Duration::from_secs(20)))
        .unwrap();
    assert_eq!(reply, b"tiny");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    agent.shutdown(true, Duration::from_secs(10)).unwrap();
}

#[test]
fn an_inline_self_call_never_waits_for_room_in_the_pools_backlog() {
    let agent = world_of_one(|c| c.worker_threads(1).send_window_bytes(1 << 20));
    register_outer_calling_own_inline(&agent);
    // The backlog fills with "outer" calls that only the one worker drains;
    // each one's call to the inline "tiny" must not wait for that room.
    let args = vec![1u8; 1 << 20];
    let started = Instant::now();
    let futures: Vec<_> = (0..8)
        .map(|_| agent.rpc_async_timeout(0, "outer", &args, Some(Duration::from_secs(30))))
        .collect();
    for f in futures {
        assert_eq!(f.wait().unwrap(), b"tiny");
    }
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    agent.shutdown(true, Duration::from_secs(10)).unwrap();
}

/// Issues the next call of a chain from the previous one's completion
/// callback; the last link reports on `done`.
fn next_link(agent: RpcAgent, left: u32, done: std::sync::mpsc::Sender<()>) {
    if left == 0 {
        done.send(()).unwrap();
        return;
    }
    let future = agent.rpc_async(0, "tiny", b"");
    let me = agent.clone();
    future.on_complete(move || next_link(me, left - 1, done));
}

#[test]
fn a_chain_of_self_calls_from_callbacks_does_not_recurse() {
    let agent = world_of_one(|c| c);
    agent
        .register_with("tiny", HandlerOptions { inline: true }, |_request, _reply| Ok(()))
        .unwrap();
    agent.start().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let me = agent.clone();
    // A small stack: the links must not nest on it.
    std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(move || next_link(me, 20_000, tx))
        .unwrap()
        .join()
        .unwrap();
    rx.recv_timeout(Duration::from_secs(60)).unwrap();
    agent.shutdown(true, Duration::from_secs(10)).unwrap();
}
