//! What each rank does in the world tests. The same bodies run as separate
//! processes over TCP (`tcp_world.rs`) and as threads of an in-process world
//! (`local_world.rs`), so both transports are held to the same behaviour.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rpcagent::{HandlerOptions, RpcAgent, RpcFuture, Status};

use super::{SIZES, pattern, rss_kib, thread_count};

/// Deferred replies a handler holds back, with what they will answer.
type Held<T> = Arc<Mutex<Vec<(T, rpcagent::Deferred)>>>;

const LONG: Duration = Duration::from_secs(60);

/// Every scenario ends the same way: a graceful shutdown on every rank,
/// after which calls fail with the shutdown error.
fn leave(agent: &RpcAgent) {
    agent.shutdown(true, LONG).expect("graceful shutdown");
    assert!(agent.is_shut_down());
    let err = agent.rpc_sync(0, "echo", b"late").unwrap_err();
    assert_eq!(err.status(), Status::Shutdown, "{err}");
}

fn echo(agent: &RpcAgent) {
    agent.register("echo", |args: &[u8]| Ok(args.to_vec())).unwrap();
}

/// Every rank calls every rank once, waiting for each reply at once, then
/// the world shuts down gracefully: rank 0's goodbye races the other ranks'
/// shutdown replies, which must still be read (the callers waiting for them
/// read only their own connections).
pub fn quick_goodbye(agent: &RpcAgent) {
    echo(agent);
    agent.start().unwrap();
    for dst in 0..agent.world_size() {
        assert_eq!(agent.rpc_sync(dst, "echo", b"hi").unwrap(), b"hi");
    }
    agent
        .shutdown(true, Duration::from_secs(10))
        .expect("graceful shutdown right after the last calls");
}

/// Every rank calls every rank, itself included, with every payload size.
pub fn mesh(agent: &RpcAgent) {
    echo(agent);
    agent.start().unwrap();
    agent.barrier(LONG).unwrap();
    let (me, n) = (agent.rank(), agent.world_size());
    for dst in 0..n {
        assert_eq!(agent.rank_of(agent.worker_name(dst).unwrap()), Some(dst));
        for (i, size) in SIZES.iter().enumerate() {
            let args = pattern(*size, (me * 100 + dst * 10 + i) as u64);
            let reply = agent.rpc_sync(dst, "echo", &args).unwrap();
            assert!(reply == args, "rank {me} -> {dst}: {size} bytes came back different");
        }
        // The same through futures, several in flight at once.
        let futures: Vec<(Vec<u8>, RpcFuture)> = (0..8)
            .map(|i| {
                let args = pattern(1024 + i, (me * 1000 + dst * 10 + i) as u64);
                let f = agent.rpc_async(dst, "echo", &args);
                (args, f)
            })
            .collect();
        for (args, f) in futures {
            assert_eq!(f.wait().unwrap(), args);
        }
    }
    let stats = agent.stats();
    assert_eq!(stats.calls_ok, (n * (SIZES.len() + 8)) as u64, "{stats:?}");
    assert_eq!(stats.calls_in_flight, 0);
    agent.barrier(LONG).unwrap();
    let stats = agent.stats();
    assert_eq!(stats.requests_served, (n * (SIZES.len() + 8)) as u64, "{stats:?}");
    leave(agent);
}

/// Rank 1 fails in every way a handler can; rank 0 checks what it is told.
pub fn errors(agent: &RpcAgent) {
    echo(agent);
    agent
        .register("fails", |_: &[u8]| Err("bad input: 42".to_string()))
        .unwrap();
    agent
        .register("panics", |_: &[u8]| -> Result<Vec<u8>, String> { panic!("boom") })
        .unwrap();
    agent
        .register("slow", |_: &[u8]| {
            std::thread::sleep(Duration::from_secs(3));
            Ok(vec![])
        })
        .unwrap();
    assert_eq!(
        agent.register("echo", |_: &[u8]| Ok(vec![])).unwrap_err().status(),
        Status::Exists
    );
    assert_eq!(
        agent.register("", |_: &[u8]| Ok(vec![])).unwrap_err().status(),
        Status::InvalidArgument
    );
    let long_name = "x".repeat(300);
    assert_eq!(
        agent.register(&long_name, |_: &[u8]| Ok(vec![])).unwrap_err().status(),
        Status::InvalidArgument
    );
    agent.start().unwrap();
    agent.barrier(LONG).unwrap();
    if agent.rank() == 0 {
        let err = agent.rpc_sync(1, "nope", b"").unwrap_err();
        assert_eq!(err.status(), Status::NotFound);
        assert!(
            err.to_string().contains("nope") && err.to_string().contains("rank 1"),
            "{err}"
        );

        let err = agent.rpc_sync(1, "fails", b"").unwrap_err();
        assert_eq!(err.status(), Status::Handler);
        let text = err.to_string();
        assert!(
            text.contains("bad input: 42") && text.contains("fails") && text.contains("rank 1"),
            "{text}"
        );

        let err = agent.rpc_sync(1, "panics", b"").unwrap_err();
        assert_eq!(err.status(), Status::Handler);
        assert!(err.to_string().contains("boom"), "{err}");

        let started = Instant::now();
        let err = agent
            .rpc_sync_timeout(1, "slow", b"", Some(Duration::from_millis(300)))
            .unwrap_err();
        let took = started.elapsed();
        assert_eq!(err.status(), Status::Timeout, "{err}");
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_millis(400),
            "a 300 ms deadline fired after {took:?}"
        );

        let err = agent.rpc_sync(5, "echo", b"").unwrap_err();
        assert_eq!(err.status(), Status::InvalidArgument);
        let err = agent.rpc_sync(1, "", b"").unwrap_err();
        assert_eq!(err.status(), Status::InvalidArgument);

        let stats = agent.stats();
        assert_eq!(stats.calls_timed_out, 1, "{stats:?}");
        assert_eq!(stats.calls_failed, 5, "{stats:?}");
        assert_eq!(agent.rpc_sync(1, "echo", b"still fine").unwrap(), b"still fine");
    }
    agent.barrier(LONG).unwrap();
    leave(agent);
}

/// Rank 0 has one worker thread and answers two concurrent callers together
/// through deferred replies: impossible if deferring held the worker.
pub fn deferred_pair(agent: &RpcAgent) {
    let waiting: Held<u8> = Arc::default();
    let w = waiting.clone();
    agent
        .register_with("pair", HandlerOptions::default(), move |req, reply| {
            let d = reply.defer().expect("first defer");
            let mut waiting = w.lock();
            waiting.push((req.args[0], d));
            if waiting.len() == 2 {
                let sum: u8 = waiting.iter().map(|(v, _)| v).sum();
                for (_, d) in waiting.drain(..) {
                    d.complete(vec![sum]);
                }
            }
            Ok(())
        })
        .unwrap();
    agent.start().unwrap();
    agent.barrier(LONG).unwrap();
    if agent.rank() != 0 {
        let reply = agent
            .rpc_sync_timeout(0, "pair", &[agent.rank() as u8 * 10], Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(reply, vec![30]);
    }
    agent.barrier(LONG).unwrap();
    leave(agent);
}

/// Rank 0 calls rank 1, whose handler calls rank 2.
pub fn nested(agent: &RpcAgent) {
    let a = agent.clone();
    agent
        .register("relay", move |args: &[u8]| {
            let mut next = args.to_vec();
            next.extend_from_slice(b"-relay");
            a.rpc_sync(2, "leaf", &next).map_err(|e| e.to_string())
        })
        .unwrap();
    agent
        .register("leaf", |args: &[u8]| {
            let mut out = args.to_vec();
            out.extend_from_slice(b"-leaf");
            Ok(out)
        })
        .unwrap();
    agent.start().unwrap();
    if agent.rank() == 0 {
        assert_eq!(agent.rpc_sync(1, "relay", b"root").unwrap(), b"root-relay-leaf");
    }
    agent.barrier(LONG).unwrap();
    leave(agent);
}

/// Rank 1 starts late; rank 0's call made before that waits and is served.
pub fn early_call(agent: &RpcAgent) {
    echo(agent);
    // An early call whose caller gave up before the start is not run then,
    // even by an inline handler.
    let ran = Arc::new(AtomicUsize::new(0));
    let r = ran.clone();
    agent
        .register_with("count_inline", HandlerOptions { inline: true }, move |_, _| {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
    if agent.rank() == 1 {
        std::thread::sleep(Duration::from_millis(500));
        agent.start().unwrap();
    } else {
        agent.start().unwrap();
        let err = agent
            .rpc_sync_timeout(1, "count_inline", b"", Some(Duration::from_millis(50)))
            .unwrap_err();
        assert_eq!(err.status(), Status::Timeout, "{err}");
        let started = Instant::now();
        assert_eq!(agent.rpc_sync(1, "echo", b"early").unwrap(), b"early");
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "the call was answered before rank 1 started ({:?})",
            started.elapsed()
        );
    }
    agent.barrier(LONG).unwrap();
    if agent.rank() == 1 {
        assert_eq!(
            ran.load(Ordering::SeqCst),
            0,
            "an early call whose caller gave up was run"
        );
    }
    leave(agent);
}

pub const IN_FLIGHT: usize = 10_000;

/// Rank 1 holds every reply until rank 0 says so, after all 10,000 calls
/// have arrived, so rank 0 has them all in flight at once; its thread count
/// must not move.
pub fn many_in_flight(agent: &RpcAgent) {
    let held: Held<Vec<u8>> = Arc::default();
    let h = held.clone();
    agent
        .register_with("gate", HandlerOptions::default(), move |req, reply| {
            let d = reply.defer().unwrap();
            h.lock().push((req.args.to_vec(), d));
            Ok(())
        })
        .unwrap();
    let h = held.clone();
    agent
        .register("release", move |_: &[u8]| {
            let mut held = h.lock();
            let count = held.len();
            for (args, d) in held.drain(..) {
                d.complete(args);
            }
            Ok((count as u64).to_le_bytes().to_vec())
        })
        .unwrap();
    agent.start().unwrap();
    agent.barrier(LONG).unwrap();
    if agent.rank() == 0 {
        let before = thread_count();
        let futures: Vec<RpcFuture> = (0..IN_FLIGHT)
            .map(|i| agent.rpc_async(1, "gate", &(i as u64).to_le_bytes()))
            .collect();
        let during = thread_count();
        let in_flight = agent.stats().calls_in_flight;
        assert!(in_flight > 0, "no call was in flight");
        // Threads are counted per process; only a rank process has nothing
        // else running in it (the test harness runs other tests in threads).
        let own_process = std::env::var_os("RPCAGENT_TEST_SCENARIO").is_some();
        if own_process {
            assert_eq!(during, before, "threads grew with {in_flight} calls in flight");
        }
        assert_eq!(in_flight, IN_FLIGHT as u64);
        // Rank 1 answers once it holds them all.
        let mut released = 0;
        while released < IN_FLIGHT as u64 {
            let n = agent.rpc_sync(1, "release", b"").unwrap();
            released += u64::from_le_bytes(n.try_into().unwrap());
            std::thread::sleep(Duration::from_millis(5));
        }
        for (i, f) in futures.into_iter().enumerate() {
            assert_eq!(f.wait().unwrap(), (i as u64).to_le_bytes());
        }
        if own_process {
            assert_eq!(thread_count(), before);
        }
    }
    agent.barrier(LONG).unwrap();
    leave(agent);
}

/// With one worker on rank 1, a call whose deadline passes while it waits in
/// the queue is dropped there, never run.
pub fn expired_work_dropped(agent: &RpcAgent) {
    let marks = Arc::new(AtomicUsize::new(0));
    agent
        .register("block", |_: &[u8]| {
            std::thread::sleep(Duration::from_millis(800));
            Ok(vec![])
        })
        .unwrap();
    let m = marks.clone();
    agent
        .register("mark", move |_: &[u8]| {
            m.fetch_add(1, Ordering::SeqCst);
            Ok(vec![])
        })
        .unwrap();
    let m = marks.clone();
    agent
        .register_with("marks", HandlerOptions { inline: true }, move |_, reply| {
            reply.set((m.load(Ordering::SeqCst) as u64).to_le_bytes().to_vec());
            Ok(())
        })
        .unwrap();
    agent.start().unwrap();
    agent.barrier(LONG).unwrap();
    if agent.rank() == 0 {
        let marks_on_1 = || u64::from_le_bytes(agent.rpc_sync(1, "marks", b"").unwrap().try_into().unwrap());
        let blocker = agent.rpc_async(1, "block", b"");
        std::thread::sleep(Duration::from_millis(100));
        let err = agent
            .rpc_sync_timeout(1, "mark", b"", Some(Duration::from_millis(200)))
            .unwrap_err();
        assert_eq!(err.status(), Status::Timeout);
        blocker.wait().unwrap();
        // "mark" was queued behind "block"; give the worker time to reach it.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(marks_on_1(), 0, "a call whose caller gave up still ran");
        agent.rpc_sync(1, "mark", b"").unwrap();
        assert_eq!(marks_on_1(), 1);
    }
    agent.barrier(LONG).unwrap();
    leave(agent);
}

/// Rank 1 has one worker. Rank 0 calls an inline handler on it back to back
/// (rank 1 may then give that connection a thread of its own), and while
/// that stream runs, rank 2 calls a pooled handler there: it must be served,
/// not wait for the stream to pause.
pub fn pool_work_beside_an_inline_stream(agent: &RpcAgent) {
    let worked = Arc::new(AtomicUsize::new(0));
    let w = worked.clone();
    agent
        .register_with("ping", HandlerOptions { inline: true }, move |_, reply| {
            reply.set(vec![w.load(Ordering::SeqCst) as u8]);
            Ok(())
        })
        .unwrap();
    let w = worked.clone();
    agent
        .register("work", move |_: &[u8]| {
            w.store(1, Ordering::SeqCst);
            Ok(b"worked".to_vec())
        })
        .unwrap();
    let pings = Arc::new(AtomicUsize::new(0));
    let p = pings.clone();
    agent
        .register_with("progress", HandlerOptions { inline: true }, move |_, reply| {
            reply.set((p.load(Ordering::SeqCst) as u64).to_le_bytes().to_vec());
            Ok(())
        })
        .unwrap();
    agent.start().unwrap();
    agent.barrier(LONG).unwrap();
    match agent.rank() {
        0 => {
            let until = Instant::now() + Duration::from_secs(30);
            let mut seen = false;
            while !seen && Instant::now() < until {
                seen = agent.rpc_sync(1, "ping", b"").unwrap() == [1];
                pings.fetch_add(1, Ordering::SeqCst);
            }
            assert!(seen, "rank 2's pooled call was not served while the stream ran");
        }
        2 => {
            // Call once the stream is well under way.
            let progress = || u64::from_le_bytes(agent.rpc_sync(0, "progress", b"").unwrap().try_into().unwrap());
            while progress() < 1000 {
                std::thread::sleep(Duration::from_millis(5));
            }
            let reply = agent
                .rpc_sync_timeout(1, "work", b"", Some(Duration::from_secs(10)))
                .expect("a pooled call beside an inline stream");
            assert_eq!(reply, b"worked");
        }
        _ => {}
    }
    agent.barrier(LONG).unwrap();
    leave(agent);
}

/// Rank 0 calls rank 1 inline back to back, then a pooled handler that
/// waits for later inline calls on the same connection: reading that
/// connection must go on while the pooled handler runs.
pub fn pool_call_waits_for_a_later_inline_call(agent: &RpcAgent) {
    // (handler running, door open)
    let state = Arc::new((Mutex::new((false, false)), parking_lot::Condvar::new()));
    agent
        .register_with("ping", HandlerOptions { inline: true }, |_, _| Ok(()))
        .unwrap();
    let s = state.clone();
    agent
        .register_with("running", HandlerOptions { inline: true }, move |_, reply| {
            reply.set(vec![s.0.lock().0 as u8]);
            Ok(())
        })
        .unwrap();
    let s = state.clone();
    agent
        .register_with("open", HandlerOptions { inline: true }, move |_, _| {
            s.0.lock().1 = true;
            s.1.notify_all();
            Ok(())
        })
        .unwrap();
    let s = state.clone();
    agent
        .register("wait_open", move |_: &[u8]| {
            let mut st = s.0.lock();
            *st = (true, false);
            let until = Instant::now() + Duration::from_secs(10);
            while !st.1 && !s.1.wait_until(&mut st, until).timed_out() {}
            let opened = st.1;
            *st = (false, false);
            Ok(vec![opened as u8])
        })
        .unwrap();
    agent.start().unwrap();
    agent.barrier(LONG).unwrap();
    if agent.rank() == 0 {
        let short = Some(Duration::from_secs(5));
        for round in 0..3 {
            for _ in 0..200 {
                agent.rpc_sync(1, "ping", b"").unwrap();
            }
            let waiting = agent.rpc_async(1, "wait_open", b"");
            while agent
                .rpc_sync_timeout(1, "running", b"", short)
                .unwrap_or_else(|e| panic!("round {round}: an inline call behind a running pooled one: {e}"))
                != [1]
            {}
            agent.rpc_sync_timeout(1, "open", b"", short).unwrap();
            assert_eq!(waiting.wait().unwrap(), [1], "round {round}");
        }
    }
    agent.barrier(LONG).unwrap();
    leave(agent);
}

/// Pool requests read in one pass behind a handler that blocks: the
/// reading thread may keep quick ones to serve itself after the first, so
/// they must not wait for it. Rank 1's `hold` is quick (200 calls teach the
/// agent so) until asked to wait for `open`; 62 quick calls sent right
/// behind that one must all be answered while it waits. Another call
/// goes first, so that the rest are written as one batch (a lone call goes
/// out at once) and read in one pass: a pool call, after which the I/O
/// loop reads the batch; or, every other round, an inline call after a
/// stream of them, after which a responder reads it.
pub fn kept_requests_behind_a_blocked_handler(agent: &RpcAgent) {
    // Whether `open` was called, and its condition variable.
    let state = Arc::new((Mutex::new(false), parking_lot::Condvar::new()));
    let s = state.clone();
    agent
        .register("hold", move |args: &[u8]| {
            if args != b"wait" {
                return Ok(vec![]);
            }
            let mut open = s.0.lock();
            let until = Instant::now() + Duration::from_secs(20);
            while !*open && !s.1.wait_until(&mut open, until).timed_out() {}
            let opened = *open;
            *open = false;
            Ok(vec![opened as u8])
        })
        .unwrap();
    let s = state.clone();
    agent
        .register_with("open", HandlerOptions { inline: true }, move |_, _| {
            *s.0.lock() = true;
            s.1.notify_all();
            Ok(())
        })
        .unwrap();
    agent.register("quick", |args: &[u8]| Ok(args.to_vec())).unwrap();
    agent
        .register_with("ping", HandlerOptions { inline: true }, |_, _| Ok(()))
        .unwrap();
    agent.start().unwrap();
    agent.barrier(LONG).unwrap();
    if agent.rank() == 0 {
        let short = Some(Duration::from_secs(5));
        // How long the quick calls took, each round.
        let mut waits = Vec::new();
        for round in 0..20 {
            for _ in 0..200 {
                agent.rpc_sync(1, "hold", b"").unwrap();
            }
            if round % 2 == 1 {
                // A stream of inline calls: a thread becomes the
                // connection's responder and reads the batch below, while
                // the I/O loop sleeps (only the deadline thread watches the lease).
                for _ in 0..200 {
                    agent.rpc_sync(1, "ping", b"").unwrap();
                }
            }
            let first = if round % 2 == 1 {
                agent.rpc_async(1, "ping", b"")
            } else {
                agent.rpc_async(1, "quick", b"")
            };
            let waiting = agent.rpc_async(1, "hold", b"wait");
            let sent = Instant::now();
            let quick: Vec<RpcFuture> = (0..62u32)
                .map(|i| agent.rpc_async_timeout(1, "quick", &i.to_le_bytes(), short))
                .collect();
            for (i, f) in quick.into_iter().enumerate() {
                let got = f
                    .wait()
                    .unwrap_or_else(|e| panic!("round {round}: a quick call behind a blocked one: {e}"));
                assert_eq!(got, (i as u32).to_le_bytes(), "round {round}");
            }
            waits.push(sent.elapsed());
            first.wait().unwrap();
            agent.rpc_sync_timeout(1, "open", b"", short).unwrap();
            assert_eq!(waiting.wait().unwrap(), [1], "round {round}");
        }
        waits.sort();
        eprintln!(
            "figure: 62 quick calls behind a blocked one, all answered after {:?} (median of 20 rounds), {:?} at most",
            waits[waits.len() / 2],
            waits[waits.len() - 1]
        );
    }
    agent.barrier(LONG).unwrap();
    leave(agent);
}

/// Rank 1 has two pool threads (`RPCAGENT_WORKER_THREADS=1`). A call to
/// `occupy` holds one until `release`; a call to `hold`, quick so far,
/// holds the other, the I/O loop's, while it serves `hold` in place. The
/// loop must go on on a thread started for it: only then is `holding`
/// (which says `hold` blocks) read, and `open`, which ends `hold`; both
/// say which thread read them. Once both calls are answered, and pool
/// calls follow, the loop must be back on a pool thread. (A round where a slow spell made `hold` look
/// slow, so that it waits in the pool's queue instead, is not counted;
/// most rounds must be served in place.)
pub fn loop_rescued_from_a_blocked_handler(agent: &RpcAgent) {
    // Per gate: whether it was opened, and its condition variable.
    type Gate = Arc<(Mutex<bool>, parking_lot::Condvar)>;
    let wait_for = |gate: &Gate, running: &AtomicBool| {
        running.store(true, Ordering::SeqCst);
        let mut open = gate.0.lock();
        let until = Instant::now() + Duration::from_secs(20);
        while !*open && !gate.1.wait_until(&mut open, until).timed_out() {}
        running.store(false, Ordering::SeqCst);
        std::mem::replace(&mut *open, false)
    };
    let open_gate = |gate: &Gate| {
        *gate.0.lock() = true;
        gate.1.notify_all();
    };
    let (held, occupied): (Gate, Gate) = Default::default();
    let (holding, occupying) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (g, running) = (held.clone(), holding.clone());
    agent
        .register("hold", move |args: &[u8]| {
            Ok(if args == b"wait" {
                vec![wait_for(&g, &running) as u8]
            } else {
                vec![]
            })
        })
        .unwrap();
    let (g, running) = (occupied.clone(), occupying.clone());
    agent
        .register("occupy", move |_: &[u8]| Ok(vec![wait_for(&g, &running) as u8]))
        .unwrap();
    // Inline probes: whether a call runs, and the thread that read it.
    let reader = || std::thread::current().name().unwrap_or_default().as_bytes().to_vec();
    for (name, flag) in [("holding", holding), ("occupied", occupying)] {
        agent
            .register_with(name, HandlerOptions { inline: true }, move |_, reply| {
                let mut answer = vec![flag.load(Ordering::SeqCst) as u8];
                answer.extend(reader());
                reply.set(answer);
                Ok(())
            })
            .unwrap();
    }
    // Gate openers, answering with the thread that read them.
    for (name, gate) in [("open", held), ("release", occupied)] {
        agent
            .register_with(name, HandlerOptions { inline: true }, move |_, reply| {
                open_gate(&gate);
                reply.set(reader());
                Ok(())
            })
            .unwrap();
    }
    agent.start().unwrap();
    agent.barrier(LONG).unwrap();
    if agent.rank() == 0 {
        let short = Some(Duration::from_secs(5));
        // Polls probe `name` until its flag is set; the reading thread's
        // name then, `None` if it stayed clear for `bound`.
        let poll = |name: &str, bound: Duration| {
            let start = Instant::now();
            loop {
                let answer = agent
                    .rpc_sync_timeout(1, name, b"", short)
                    .unwrap_or_else(|e| panic!("nobody read `{name}`: {e}"));
                if answer[0] == 1 {
                    return Some(String::from_utf8_lossy(&answer[1..]).into_owned());
                }
                if start.elapsed() > bound {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let mut in_place = 0;
        for round in 0..5 {
            for _ in 0..200 {
                agent.rpc_sync(1, "hold", b"").unwrap();
            }
            let occupy = agent.rpc_async(1, "occupy", b"");
            assert!(poll("occupied", LONG).is_some(), "round {round}: `occupy` never ran");
            let hold = agent.rpc_async(1, "hold", b"wait");
            let blocked = poll("holding", Duration::from_secs(2));
            let opener = agent
                .rpc_sync_timeout(1, "open", b"", short)
                .unwrap_or_else(|e| panic!("round {round}: nobody read `open`: {e}"));
            agent.rpc_sync_timeout(1, "release", b"", short).unwrap();
            let got = hold.wait_timeout(Duration::from_secs(30)).expect("`hold` answered");
            assert_eq!(got.unwrap(), [1], "round {round}: `hold`");
            let got = occupy.wait_timeout(Duration::from_secs(30)).expect("`occupy` answered");
            assert_eq!(got.unwrap(), [1], "round {round}: `occupy`");
            if let Some(prober) = blocked {
                // Served in place, and blocked: read by the loop's own thread.
                in_place += 1;
                let opener = String::from_utf8_lossy(&opener).into_owned();
                for (what, by) in [("holding", &prober), ("open", &opener)] {
                    assert!(by.starts_with("rpcagent-io1"), "round {round}: `{what}` read by {by}");
                }
            }
            // Handed back, even while only pool requests come (each pass
            // of the rescued loop queues one): a pool thread reads again
            // (probes are inline).
            for _ in 0..50 {
                agent.rpc_sync(1, "hold", b"").unwrap();
            }
            let answer = agent.rpc_sync_timeout(1, "occupied", b"", short).unwrap();
            let by = String::from_utf8_lossy(&answer[1..]).into_owned();
            assert!(by.starts_with("rpcagent-w1"), "round {round}: the loop stayed on {by}");
        }
        assert!(in_place >= 3, "`hold` was served in place in {in_place} of 5 rounds");
        eprintln!("figure: `hold` served in place and the loop rescued in {in_place} of 5 rounds");
    }
    agent.barrier(LONG).unwrap();
    leave(agent);
}

/// A fast caller and a slow server (2 workers, 5 ms per call): rank 0 issues
/// 400 calls of 1 MiB as fast as it can, with a 4 MiB send window (set by
/// the test). Both sides' memory must stay near the window: the caller's
/// because its calls wait for room, the server's because it stops reading
/// while its pool's backlog is full. Every call completes.
pub fn flood(agent: &RpcAgent) {
    const CALLS: usize = 400;
    const MAX_GROWTH_KIB: u64 = 96 << 10;
    agent
        .register("slow", |args: &[u8]| {
            std::thread::sleep(Duration::from_millis(5));
            Ok(args[..8].to_vec())
        })
        .unwrap();
    let start = rss_kib(std::process::id());
    let peak = Arc::new(AtomicUsize::new(start as usize));
    let sampled = peak.clone();
    agent
        .register("growth", move |_: &[u8]| {
            let grown = sampled.load(Ordering::SeqCst) as u64 - start;
            Ok(grown.to_le_bytes().to_vec())
        })
        .unwrap();
    agent.start().unwrap();
    // Samples this process's memory while the flood runs.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (on, max) = (sampling.clone(), peak.clone());
    let sampler = std::thread::spawn(move || {
        while on.load(Ordering::SeqCst) {
            max.fetch_max(rss_kib(std::process::id()) as usize, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    agent.barrier(LONG).unwrap();
    if agent.rank() == 0 {
        let args = pattern(1 << 20, 7);
        let futures: Vec<RpcFuture> = (0..CALLS).map(|_| agent.rpc_async(1, "slow", &args)).collect();
        for f in futures {
            assert_eq!(f.wait().unwrap(), args[..8]);
        }
        let mine = peak.load(Ordering::SeqCst) as u64 - start;
        let server = u64::from_le_bytes(agent.rpc_sync(1, "growth", b"").unwrap().try_into().unwrap());
        eprintln!("figure: 400 calls of 1 MiB, window 4 MiB: caller grew {mine} KiB, server {server} KiB");
        assert!(mine < MAX_GROWTH_KIB, "the caller grew by {mine} KiB");
        assert!(server < MAX_GROWTH_KIB, "the server grew by {server} KiB");
    }
    agent.barrier(LONG).unwrap();
    sampling.store(false, Ordering::SeqCst);
    sampler.join().unwrap();
    leave(agent);
}
