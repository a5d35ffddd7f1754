//! `wait_any` over calls to another rank, where the waiting thread reads
//! the replies itself: a completion it reads that answers no posted index
//! (the entry was held twice, and the later copy replaced) is not missed.

mod common;

use std::time::{Duration, Instant};

use rpcagent::{Config, RpcAgent, RpcFuture};

fn config(rank: usize, port: u16) -> Config {
    Config::new(rank, 2)
        .master("127.0.0.1", port)
        .init_timeout(Duration::from_secs(20))
}

#[test]
fn an_entry_held_twice_then_replaced_is_seen_when_read_by_the_waiter() {
    let port = common::free_port();
    let other = std::thread::spawn(move || RpcAgent::init(config(1, port)).unwrap());
    let me = RpcAgent::init(config(0, port)).unwrap();
    let other = other.join().unwrap();
    other
        .register("fast", |_args| {
            std::thread::sleep(Duration::from_millis(300));
            Ok(vec![])
        })
        .unwrap();
    other
        .register("slow", |_args| {
            std::thread::sleep(Duration::from_secs(3));
            Ok(vec![])
        })
        .unwrap();
    other.start().unwrap();
    me.start().unwrap();
    me.rpc_sync_timeout(1, "fast", b"", Some(Duration::from_secs(10)))
        .unwrap();
    let fast = me.rpc_async_timeout(1, "fast", b"", Some(Duration::from_secs(20)));
    // Watched at both indexes: the call posts only the later one.
    assert_eq!(RpcFuture::wait_any(&[&fast, &fast], Some(Duration::ZERO)), None);
    let slow = me.rpc_async_timeout(1, "slow", b"", Some(Duration::from_secs(20)));
    let started = Instant::now();
    let got = RpcFuture::wait_any(&[&fast, &slow], Some(Duration::from_secs(15)));
    assert_eq!(got, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "seen after {:?}",
        started.elapsed()
    );
    slow.wait().unwrap();
    // Graceful shutdown meets every rank: both shut down at once.
    let other = std::thread::spawn(move || other.shutdown(true, Duration::from_secs(10)));
    me.shutdown(true, Duration::from_secs(10)).unwrap();
    other.join().unwrap().unwrap();
}
