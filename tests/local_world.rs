//! The world behaviours of `common::scenarios`, in one process (no sockets),
//! plus what only an in-process world can check cheaply.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::scenarios;
use rpcagent::{Config, HandlerOptions, RpcAgent, RpcFuture, Status};

/// Runs `body` for every rank of an in-process world, one thread each.
fn run_local(n: usize, config: Config, body: fn(&RpcAgent)) {
    let agents = RpcAgent::local_world_with(n, config).unwrap();
    std::thread::scope(|s| {
        for agent in &agents {
            s.spawn(move || body(agent));
        }
    });
}

#[test]
fn mesh_of_three_with_every_payload_size() {
    run_local(3, Config::default(), scenarios::mesh);
}

#[test]
fn errors_carry_their_messages_and_deadlines_hold() {
    run_local(2, Config::default(), scenarios::errors);
}

#[test]
fn deferred_replies_release_the_only_worker() {
    run_local(3, Config::default().worker_threads(1), scenarios::deferred_pair);
}

#[test]
fn nested_calls_across_three_ranks() {
    run_local(3, Config::default(), scenarios::nested);
}

#[test]
fn requests_before_start_are_served_after_it() {
    run_local(2, Config::default(), scenarios::early_call);
}

#[test]
fn ten_thousand_calls_in_flight_without_new_threads() {
    run_local(2, Config::default(), scenarios::many_in_flight);
}

#[test]
fn expired_requests_are_dropped_not_run() {
    run_local(2, Config::default().worker_threads(1), scenarios::expired_work_dropped);
}

#[test]
fn pool_work_is_served_beside_a_stream_of_inline_calls() {
    run_local(
        3,
        Config::default().worker_threads(1),
        scenarios::pool_work_beside_an_inline_stream,
    );
}

#[test]
fn a_pooled_handler_can_wait_for_a_later_inline_call() {
    run_local(2, Config::default(), scenarios::pool_call_waits_for_a_later_inline_call);
}

#[test]
fn futures_poll_wait_any_and_call_back() {
    let agents = RpcAgent::local_world(2).unwrap();
    let gate = Arc::new(parking_lot::Mutex::new(Vec::<rpcagent::Deferred>::new()));
    let g = gate.clone();
    agents[1]
        .register_with("hold", HandlerOptions::default(), move |_, reply| {
            g.lock().push(reply.defer().unwrap());
            Ok(())
        })
        .unwrap();
    agents[1].register("echo", |a: &[u8]| Ok(a.to_vec())).unwrap();
    agents[1].start().unwrap();
    let held = agents[0].rpc_async(1, "hold", b"");
    let quick = agents[0].rpc_async(1, "echo", b"q");
    assert_eq!(
        RpcFuture::wait_any(&[&held, &quick], Some(Duration::from_secs(5))),
        Some(1)
    );
    assert!(!held.is_ready());
    assert!(held.wait_timeout(Duration::from_millis(10)).is_none());

    let fired = Arc::new(AtomicUsize::new(0));
    let f = fired.clone();
    held.on_complete(move || {
        f.fetch_add(1, Ordering::SeqCst);
    });
    assert_eq!(fired.load(Ordering::SeqCst), 0);
    // Wait until the handler has deferred, then answer from this thread.
    while gate.lock().is_empty() {
        std::thread::sleep(Duration::from_millis(1));
    }
    gate.lock().pop().unwrap().complete(b"late".to_vec());
    assert_eq!(held.wait_ref().unwrap(), b"late");
    // Completed on this (user) thread, the callback runs on a library
    // thread instead: never inside the user's own code.
    let started = std::time::Instant::now();
    while fired.load(Ordering::SeqCst) == 0 && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(fired.load(Ordering::SeqCst), 1);
    // The bytes are handed out once; later waits see the same status, empty.
    assert_eq!(held.wait_timeout(Duration::ZERO), Some(Ok(vec![])));
    let f = fired.clone();
    held.on_complete(move || {
        f.fetch_add(1, Ordering::SeqCst);
    });
    assert_eq!(
        fired.load(Ordering::SeqCst),
        2,
        "on an already complete future the callback runs at once"
    );

    // A dropped deferred reply fails the call instead of leaving it hanging.
    let lost = agents[0].rpc_async(1, "hold", b"");
    while gate.lock().is_empty() {
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(gate.lock().pop());
    let err = lost.wait().unwrap_err();
    assert_eq!(err.status(), Status::Handler);
    assert!(err.to_string().contains("dropped"), "{err}");
}

#[test]
fn inline_handlers_and_reply_buffers() {
    let agents = RpcAgent::local_world(2).unwrap();
    agents[1]
        .register_with("fill", HandlerOptions { inline: true }, |req, reply| {
            let n = req.args[0] as usize;
            reply.alloc(n).iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
            Ok(())
        })
        .unwrap();
    agents[1]
        .register_with("who", HandlerOptions::default(), |req, reply| {
            reply.set(vec![req.src_rank as u8]);
            Ok(())
        })
        .unwrap();
    agents[1]
        .register_with("refuse", HandlerOptions::default(), |_, reply| {
            reply.error("refused politely");
            Ok(())
        })
        .unwrap();
    for a in &agents {
        a.start().unwrap();
    }
    assert_eq!(agents[0].rpc_sync(1, "fill", &[5]).unwrap(), vec![0, 1, 2, 3, 4]);
    assert_eq!(agents[0].rpc_sync(1, "who", b"").unwrap(), vec![0]);
    assert_eq!(agents[1].rpc_sync(1, "who", b"").unwrap(), vec![1]);
    let err = agents[0].rpc_sync(1, "refuse", b"").unwrap_err();
    assert_eq!(err.status(), Status::Handler);
    assert!(err.to_string().contains("refused politely"));
    agents[1].unregister("who").unwrap();
    assert_eq!(
        agents[0].rpc_sync(1, "who", b"").unwrap_err().status(),
        Status::NotFound
    );
    assert_eq!(agents[1].unregister("who").unwrap_err().status(), Status::NotFound);
}

#[test]
fn message_size_limits_apply_to_arguments_and_replies() {
    let agents = RpcAgent::local_world_with(2, Config::default().max_message_bytes(1000)).unwrap();
    agents[1].register("echo", |a: &[u8]| Ok(a.to_vec())).unwrap();
    agents[1].register("grow", |_: &[u8]| Ok(vec![0; 1001])).unwrap();
    agents[1].start().unwrap();
    assert_eq!(agents[0].rpc_sync(1, "echo", &[7; 1000]).unwrap().len(), 1000);
    assert_eq!(
        agents[0].rpc_sync(1, "echo", &[7; 1001]).unwrap_err().status(),
        Status::TooLarge
    );
    let err = agents[0].rpc_sync(1, "grow", b"").unwrap_err();
    assert_eq!(err.status(), Status::TooLarge);
    assert!(err.to_string().contains("reply"), "{err}");
}

#[test]
fn immediate_shutdown_fails_calls_in_flight() {
    let agents = RpcAgent::local_world(2).unwrap();
    agents[1]
        .register_with("never", HandlerOptions::default(), |_, reply| {
            std::mem::forget(reply.defer());
            Ok(())
        })
        .unwrap();
    agents[1].start().unwrap();
    let f = agents[0].rpc_async(1, "never", b"");
    std::thread::sleep(Duration::from_millis(20));
    agents[0].shutdown(false, Duration::from_secs(5)).unwrap();
    assert_eq!(f.wait().unwrap_err().status(), Status::Shutdown);
    // The other rank is shut down now too, from its callers' point of view.
    agents[1].shutdown(false, Duration::from_secs(5)).unwrap();
    assert_eq!(agents[1].rpc_sync(0, "x", b"").unwrap_err().status(), Status::Shutdown);
}

#[test]
fn graceful_shutdown_with_a_missing_rank_returns_by_its_timeout() {
    let agents = RpcAgent::local_world(2).unwrap();
    let started = std::time::Instant::now();
    let err = agents[0].shutdown(true, Duration::from_millis(300)).unwrap_err();
    assert!(matches!(err.status(), Status::Timeout | Status::PeerLost), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(agents[0].is_shut_down());
}

#[test]
fn barrier_waits_for_every_rank_and_times_out_alone() {
    let agents = RpcAgent::local_world(3).unwrap();
    let err = agents[0].barrier(Duration::from_millis(100)).unwrap_err();
    assert_eq!(err.status(), Status::Timeout);
    let agents = RpcAgent::local_world(3).unwrap();
    let passed = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for (i, a) in agents.iter().enumerate() {
            let passed = &passed;
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(50 * i as u64));
                a.barrier(Duration::from_secs(10)).unwrap();
                passed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    assert_eq!(passed.load(Ordering::SeqCst), 3);
}

#[test]
fn bad_world_arguments_are_refused() {
    assert_eq!(RpcAgent::local_world(0).unwrap_err().status(), Status::InvalidArgument);
    assert_eq!(
        RpcAgent::local_world_with(2, Config::default().worker_threads(0))
            .unwrap_err()
            .status(),
        Status::InvalidArgument
    );
}

#[test]
fn every_deadline_fires_on_time_not_only_the_first() {
    let agents = RpcAgent::local_world(2).unwrap();
    agents[1]
        .register("slow", |_: &[u8]| {
            std::thread::sleep(Duration::from_millis(400));
            Ok(vec![])
        })
        .unwrap();
    agents[1].start().unwrap();
    for round in 0..4 {
        let started = std::time::Instant::now();
        let err = agents[0]
            .rpc_sync_timeout(1, "slow", b"", Some(Duration::from_millis(50)))
            .unwrap_err();
        let took = started.elapsed();
        assert_eq!(err.status(), Status::Timeout);
        assert!(
            took < Duration::from_millis(150),
            "round {round}: a 50 ms deadline fired after {took:?}"
        );
    }
}

#[test]
fn a_timed_out_barrier_can_be_retried_and_the_world_meets_there() {
    let agents = RpcAgent::local_world(2).unwrap();
    // Rank 1 gives up once before rank 0 arrives, then tries again.
    assert_eq!(
        agents[1].barrier(Duration::from_millis(50)).unwrap_err().status(),
        Status::Timeout
    );
    std::thread::scope(|s| {
        s.spawn(|| agents[1].barrier(Duration::from_secs(10)).unwrap());
        s.spawn(|| agents[0].barrier(Duration::from_secs(10)).unwrap());
    });
    // And the next barrier still lines up.
    std::thread::scope(|s| {
        s.spawn(|| agents[1].barrier(Duration::from_secs(10)).unwrap());
        s.spawn(|| agents[0].barrier(Duration::from_secs(10)).unwrap());
    });
}

#[test]
fn a_cancel_ends_the_wait_at_once_and_reaches_the_running_handler() {
    let agents = RpcAgent::local_world_with(2, Config::default().worker_threads(1)).unwrap();
    let noticed = Arc::new(AtomicUsize::new(0));
    let seen = noticed.clone();
    agents[1]
        .register_with("loop", HandlerOptions::default(), move |req, reply| {
            let give_up = std::time::Instant::now() + Duration::from_secs(20);
            while !req.is_cancelled() && std::time::Instant::now() < give_up {
                std::thread::sleep(Duration::from_micros(200));
            }
            assert!(reply.is_cancelled(), "the reply says so too");
            seen.fetch_add(1, Ordering::SeqCst);
            reply.set(b"late".to_vec());
            Ok(())
        })
        .unwrap();
    for a in &agents {
        a.start().unwrap();
    }
    let fut = agents[0].rpc_async(1, "loop", b"");
    std::thread::sleep(Duration::from_millis(50));
    fut.cancel();
    assert_eq!(
        fut.wait_timeout(Duration::ZERO).unwrap().unwrap_err().status(),
        Status::Cancelled
    );
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while noticed.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(noticed.load(Ordering::SeqCst), 1);
    // The worker is free again, and a completed call keeps its outcome.
    agents[1].register("echo", |args| Ok(args.to_vec())).unwrap();
    let done = agents[0].rpc_async(1, "echo", b"abc");
    assert_eq!(done.wait_ref().unwrap(), b"abc");
    done.cancel();
    assert!(done.error().is_none());
}

#[test]
fn parts_arrive_concatenated() {
    let agents = RpcAgent::local_world(2).unwrap();
    agents[1].register("echo", |args| Ok(args.to_vec())).unwrap();
    for a in &agents {
        a.start().unwrap();
    }
    let tensor = vec![7u8; 1 << 20];
    let parts: [&[u8]; 4] = [b"head", b"", &tensor, b"tail"];
    let got = agents[0].rpc_async_parts(1, "echo", parts).wait().unwrap();
    assert_eq!(got, [&b"head"[..], &tensor, b"tail"].concat());
    let owned = vec![b"a".to_vec(), b"bc".to_vec()];
    assert_eq!(agents[0].rpc_async_parts(1, "echo", &owned).wait().unwrap(), b"abc");
    // Owned buffers, given to the call.
    assert_eq!(agents[0].rpc_async_parts(1, "echo", owned).wait().unwrap(), b"abc");
    let none: [&[u8]; 0] = [];
    assert!(agents[0].rpc_async_parts(1, "echo", none).wait().unwrap().is_empty());
}
