//! Counters of one agent.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub(crate) struct Stats {
    pub calls_started: AtomicU64,
    pub calls_ok: AtomicU64,
    pub calls_failed: AtomicU64,
    pub calls_timed_out: AtomicU64,
    pub requests_served: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

/// A snapshot of an agent's counters.
///
/// `calls_*` count the calls this rank made (the agent's own barrier and
/// shutdown traffic excluded); each started call ends as exactly one of ok,
/// failed or timed out, so `calls_started = calls_ok + calls_failed +
/// calls_timed_out + calls_in_flight`. `requests_served` counts requests this
/// rank answered, successfully or with an error. Bytes are payload bytes
/// (arguments and replies), not frame headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub calls_started: u64,
    pub calls_ok: u64,
    pub calls_failed: u64,
    pub calls_timed_out: u64,
    pub requests_served: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub calls_in_flight: u64,
}

impl Stats {
    pub(crate) fn snapshot(&self, calls_in_flight: u64) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            calls_started: get(&self.calls_started),
            calls_ok: get(&self.calls_ok),
            calls_failed: get(&self.calls_failed),
            calls_timed_out: get(&self.calls_timed_out),
            requests_served: get(&self.requests_served),
            bytes_sent: get(&self.bytes_sent),
            bytes_received: get(&self.bytes_received),
            calls_in_flight,
        }
    }
}
