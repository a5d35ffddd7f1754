//! Worlds of separate OS processes over TCP: this test binary re-executes
//! itself once per rank (see `common::run_world`), and each rank joins with
//! nothing but the launcher variables torchrun sets.

mod common;

use std::time::Duration;

use common::{run_world, scenarios};
use rpcagent::{Config, RpcAgent, Status};

const LIMIT: Duration = Duration::from_secs(120);

/// The body of every rank process; does nothing unless started by `run_world`.
#[test]
#[ignore = "one rank of a multi-process test; started by the other tests"]
fn rank_main() {
    let Some((scenario, agent)) = common::rank_process() else {
        return;
    };
    let body = match scenario.as_str() {
        "mesh" => scenarios::mesh,
        "quick_goodbye" => scenarios::quick_goodbye,
        "errors" => scenarios::errors,
        "deferred_pair" => scenarios::deferred_pair,
        "nested" => scenarios::nested,
        "early_call" => scenarios::early_call,
        "many_in_flight" => scenarios::many_in_flight,
        "expired_work_dropped" => scenarios::expired_work_dropped,
        "pool_work_beside_an_inline_stream" => scenarios::pool_work_beside_an_inline_stream,
        "pool_call_waits_for_a_later_inline_call" => scenarios::pool_call_waits_for_a_later_inline_call,
        "flood" => scenarios::flood,
        "kept_behind_a_blocked_handler" => scenarios::kept_requests_behind_a_blocked_handler,
        "loop_rescued" => scenarios::loop_rescued_from_a_blocked_handler,
        other => panic!("unknown scenario {other}"),
    };
    body(&agent);
}

#[test]
fn mesh_of_three_processes_with_every_payload_size() {
    run_world("mesh", 3, LIMIT, &[]);
}

/// The race is narrow (it was lost in about one world in sixteen), so
/// several worlds run.
#[test]
fn shutdown_replies_are_read_when_rank_0_says_goodbye_first() {
    for _ in 0..24 {
        run_world("quick_goodbye", 3, LIMIT, &[]);
    }
}

#[test]
fn errors_carry_their_messages_and_deadlines_hold() {
    run_world("errors", 2, LIMIT, &[]);
}

#[test]
fn deferred_replies_release_the_only_worker() {
    run_world("deferred_pair", 3, LIMIT, &[("RPCAGENT_WORKER_THREADS", "1")]);
}

#[test]
fn nested_calls_across_three_processes() {
    run_world("nested", 3, LIMIT, &[]);
}

#[test]
fn requests_before_start_are_served_after_it() {
    run_world("early_call", 2, LIMIT, &[]);
}

#[test]
fn ten_thousand_calls_in_flight_without_new_threads() {
    run_world("many_in_flight", 2, LIMIT, &[]);
}

#[test]
fn expired_requests_are_dropped_not_run() {
    run_world("expired_work_dropped", 2, LIMIT, &[("RPCAGENT_WORKER_THREADS", "1")]);
}

#[test]
fn pool_work_is_served_beside_a_stream_of_inline_calls() {
    run_world(
        "pool_work_beside_an_inline_stream",
        3,
        LIMIT,
        &[("RPCAGENT_WORKER_THREADS", "1")],
    );
}

#[test]
fn a_pooled_handler_can_wait_for_a_later_inline_call_on_its_connection() {
    run_world("pool_call_waits_for_a_later_inline_call", 2, LIMIT, &[]);
}

#[test]
fn quick_requests_read_behind_a_blocked_handler_are_served() {
    run_world("kept_behind_a_blocked_handler", 2, LIMIT, &[]);
}

/// The I/O loop's thread, serving a quick handler in place, blocks while
/// the one other worker is busy too: the loop goes on on a new thread.
#[test]
fn the_io_loop_goes_on_when_its_thread_blocks_in_a_handler_and_no_worker_is_idle() {
    run_world("loop_rescued", 2, LIMIT, &[("RPCAGENT_WORKER_THREADS", "1")]);
}

fn cfg(rank: usize, world: usize, port: u16) -> Config {
    Config::new(rank, world)
        .master("127.0.0.1", port)
        .init_timeout(Duration::from_millis(1500))
}

/// Starts `configs` as ranks in threads of this process; returns each init outcome.
fn join_all(configs: Vec<Config>) -> Vec<rpcagent::Result<RpcAgent>> {
    let handles: Vec<_> = configs
        .into_iter()
        .map(|c| std::thread::spawn(move || RpcAgent::init(c)))
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn missing_ranks_are_named_when_init_times_out() {
    let port = common::free_port();
    // Rank 1 waits longer than rank 0: had it given up first (its clock
    // started a little earlier on a busy machine), rank 0 would rightly
    // name it missing too.
    let patient = cfg(1, 3, port).init_timeout(Duration::from_millis(6000));
    let results = join_all(vec![cfg(0, 3, port), patient]);
    for r in &results {
        let err = r.as_ref().unwrap_err();
        assert_eq!(err.status(), Status::Init, "{err}");
        assert!(err.to_string().contains("[2]"), "the message should name rank 2: {err}");
    }
}

#[test]
fn world_size_mismatch_is_refused() {
    let port = common::free_port();
    let results = join_all(vec![cfg(0, 2, port), cfg(1, 3, port)]);
    let err = results[1].as_ref().unwrap_err();
    assert_eq!(err.status(), Status::Init);
    assert!(err.to_string().contains("world size mismatch"), "{err}");
    assert_eq!(results[0].as_ref().unwrap_err().status(), Status::Init);
}

#[test]
fn duplicate_ranks_are_refused() {
    let port = common::free_port();
    let first = std::thread::spawn(move || RpcAgent::init(cfg(0, 3, port)));
    let second = std::thread::spawn(move || RpcAgent::init(cfg(1, 3, port)));
    std::thread::sleep(Duration::from_millis(300));
    let err = RpcAgent::init(cfg(1, 3, port)).unwrap_err();
    assert_eq!(err.status(), Status::Init);
    assert!(err.to_string().contains("duplicate rank"), "{err}");
    assert_eq!(first.join().unwrap().unwrap_err().status(), Status::Init);
    assert_eq!(second.join().unwrap().unwrap_err().status(), Status::Init);
}

#[test]
fn unreachable_master_fails_init_at_its_timeout() {
    let port = common::free_port();
    let started = std::time::Instant::now();
    let err = RpcAgent::init(cfg(1, 2, port)).unwrap_err();
    assert_eq!(err.status(), Status::Init);
    assert!(err.to_string().contains("unreachable"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_world_of_one_calls_itself_over_tcp() {
    let port = common::free_port();
    let agent = RpcAgent::init(cfg(0, 1, port).name("solo")).unwrap();
    agent.register("echo", |a: &[u8]| Ok(a.to_vec())).unwrap();
    agent.start().unwrap();
    assert_eq!(agent.rank_of("solo"), Some(0));
    assert_eq!(agent.rpc_sync(0, "echo", b"me").unwrap(), b"me");
    assert!(agent.listen_addr().starts_with("127.0.0.1:"));
    agent.shutdown(true, Duration::from_secs(10)).unwrap();
}

/// Two ranks over TCP in this process, both serving "echo" and
/// "slow_echo" (which answers after 300 ms: slow enough for a test to put a
/// completion callback in place before the reply comes).
fn echo_pair() -> (RpcAgent, RpcAgent) {
    let port = common::free_port();
    let results = join_all(vec![cfg(0, 2, port), cfg(1, 2, port)]);
    let mut agents: Vec<RpcAgent> = results.into_iter().map(|r| r.unwrap()).collect();
    for a in &agents {
        a.register("echo", |x: &[u8]| Ok(x.to_vec())).unwrap();
        a.register("slow_echo", |x: &[u8]| {
            std::thread::sleep(Duration::from_millis(300));
            Ok(x.to_vec())
        })
        .unwrap();
        a.start().unwrap();
    }
    let a1 = agents.pop().unwrap();
    (agents.pop().unwrap(), a1)
}

#[test]
fn a_completion_callback_can_start_calls_on_new_connections() {
    // The callback runs on a library thread that must not block; its call
    // opens a connection (to this very rank) all the same.
    let (a0, a1) = echo_pair();
    // A reply slow enough that the callback is in place before it comes.
    let first = a0.rpc_async(1, "slow_echo", b"first");
    let (tx, rx) = std::sync::mpsc::channel();
    let chained = a0.clone();
    first.on_complete(move || {
        // Neither connection to rank 0 itself exists yet.
        let second = chained.rpc_async(0, "echo", b"second");
        second.on_complete(move || {
            tx.send(()).unwrap();
        });
        std::mem::forget(second);
    });
    // Nobody waits on `first`: the I/O loop reads its reply and runs the
    // callback there.
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the chained call on a new connection completed");
    assert_eq!(first.wait().unwrap(), b"first");
    for a in [a0, a1] {
        a.shutdown(false, Duration::from_secs(5)).unwrap();
    }
}

#[test]
fn a_panicking_completion_callback_does_not_take_the_agent_down() {
    let (a0, a1) = echo_pair();
    // The replies take long enough for the callbacks to be in place first
    // (a callback on a completed call would run here, on the test thread).
    // Completed on the I/O loop (nobody waits on it), and on the deadline
    // thread (a call that times out).
    let f = a0.rpc_async(1, "slow_echo", b"x");
    f.on_complete(|| panic!("a careless callback"));
    let slow = a0.rpc_async_timeout(1, "slow_echo", b"", Some(Duration::from_millis(100)));
    slow.on_complete(|| panic!("another careless callback"));
    std::thread::sleep(Duration::from_millis(600));
    assert!(f.is_ready() && slow.is_ready());
    assert_eq!(slow.wait().unwrap_err().status(), Status::Timeout);
    assert_eq!(f.wait().unwrap(), b"x");
    // Both library threads are still there: calls and deadlines work.
    for _ in 0..3 {
        assert_eq!(a0.rpc_async(1, "echo", b"y").wait().unwrap(), b"y");
    }
    let started = std::time::Instant::now();
    let err = a0
        .rpc_sync_timeout(1, "echo", b"z", Some(Duration::from_nanos(1)))
        .unwrap_err();
    assert_eq!(err.status(), Status::Timeout);
    assert!(started.elapsed() < Duration::from_secs(1));
    for a in [a0, a1] {
        a.shutdown(false, Duration::from_secs(5)).unwrap();
    }
}

/// Memory stays bounded on both sides of a fast caller and a slow server.
#[test]
fn a_flood_of_large_calls_stays_within_the_send_window() {
    run_world(
        "flood",
        2,
        LIMIT,
        &[
            ("RPCAGENT_SEND_WINDOW_BYTES", "4194304"),
            ("RPCAGENT_WORKER_THREADS", "2"),
        ],
    );
}
