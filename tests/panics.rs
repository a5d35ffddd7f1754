//! A panic on a library thread is contained: here the log sink panics on
//! the I/O loop (when it reports a connection closed for bad bytes) and
//! again when the loop reports its own restart; the agent goes on serving.
//! Its own test binary: the log sink is process-wide.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rpcagent::log::{self, Level};
use rpcagent::{Config, RpcAgent};

#[test]
fn a_panic_on_the_io_loop_is_caught_and_serving_goes_on() {
    let port = common::free_port();
    let config = move |rank| {
        Config::new(rank, 2)
            .master("127.0.0.1", port)
            .call_timeout(Duration::from_secs(10))
    };
    let other = std::thread::spawn(move || RpcAgent::init(config(1)).unwrap());
    let me = RpcAgent::init(config(0)).unwrap();
    let other = other.join().unwrap();
    for agent in [&me, &other] {
        agent.register("echo", |x: &[u8]| Ok(x.to_vec())).unwrap();
        agent.start().unwrap();
    }
    assert_eq!(other.rpc_sync(0, "echo", b"before").unwrap(), b"before");

    let armed = Arc::new(AtomicBool::new(true));
    let panics = Arc::new(AtomicUsize::new(0));
    let (a, p) = (armed.clone(), panics.clone());
    log::set_sink(Some(Arc::new(move |level: Level, line: &str| {
        let trigger = line.contains("closed a connection from") || line.contains("I/O loop panicked");
        if a.load(Ordering::SeqCst) && level <= Level::Warn && trigger {
            p.fetch_add(1, Ordering::SeqCst);
            panic!("a log sink that panics: {line}");
        }
    })));

    // Bytes that cannot be a greeting: rank 0's I/O loop closes the
    // connection and logs it, and the sink panics there.
    let mut garbage = TcpStream::connect(me.listen_addr()).unwrap();
    garbage.write_all(&[0xEE; 64]).unwrap();
    let give_up = Instant::now() + Duration::from_secs(10);
    while panics.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < give_up, "the sink never panicked");
        std::thread::sleep(Duration::from_millis(10));
    }
    armed.store(false, Ordering::SeqCst);

    // Rank 0 still reads its connections: calls both ways complete.
    for i in 0..20u32 {
        let args = i.to_le_bytes();
        assert_eq!(other.rpc_sync(0, "echo", &args).unwrap(), args);
        assert_eq!(me.rpc_sync(1, "echo", &args).unwrap(), args);
    }
    let futures: Vec<_> = (0..100u32)
        .map(|i| other.rpc_async(0, "echo", &i.to_le_bytes()))
        .collect();
    for (i, f) in futures.into_iter().enumerate() {
        assert_eq!(f.wait().unwrap(), (i as u32).to_le_bytes());
    }
    log::set_sink(None);
    for agent in [me, other] {
        agent.shutdown(false, Duration::from_secs(5)).unwrap();
    }
}
