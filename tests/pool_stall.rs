//! The classic nested-call deadlock (a handler waiting on a call that needs
//! a worker of its own, full pool) is reported in the log, naming the
//! function that holds the workers. Its own binary: the log sink is global.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rpcagent::log::{self, Level};
use rpcagent::{Config, RpcAgent, Status};

#[test]
fn a_stalled_pool_is_reported_with_the_functions_holding_it() {
    let lines: Arc<Mutex<Vec<(Level, String)>>> = Arc::default();
    let sink = lines.clone();
    log::set_sink(Some(Arc::new(move |level, line: &str| {
        sink.lock().push((level, line.to_string()))
    })));

    let agents = RpcAgent::local_world_with(2, Config::default().worker_threads(1)).unwrap();
    let me = agents[1].clone();
    agents[1]
        .register("outer", move |_: &[u8]| {
            // Needs rank 1's only worker, which this handler holds.
            me.rpc_sync_timeout(1, "inner", b"", Some(Duration::from_secs(7)))
                .map_err(|e| e.to_string())
        })
        .unwrap();
    agents[1].register("inner", |_: &[u8]| Ok(vec![])).unwrap();
    agents[1].start().unwrap();

    let started = Instant::now();
    let err = agents[0]
        .rpc_sync_timeout(1, "outer", b"", Some(Duration::from_secs(10)))
        .unwrap_err();
    assert_eq!(err.status(), Status::Handler, "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    let lines = lines.lock();
    let report = lines
        .iter()
        .find(|(_, l)| l.contains("worker threads have been busy"))
        .unwrap_or_else(|| panic!("no stall report after {:?}; log: {lines:?}", started.elapsed()));
    assert_eq!(report.0, Level::Warn);
    assert!(report.1.contains("'outer'"), "{}", report.1);
    assert!(report.1.contains("rank 1"), "{}", report.1);
    log::set_sink(None);
}
