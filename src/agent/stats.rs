//! Counters of one agent.

use std::sync::atomic::{AtomicU64, Ordering};

/// The agent's counters, grouped by the thread that writes them, each
/// group on its own cache lines: the thread completing a call and one
/// answering a request must not take each other's line on every call.
/// Starting a call writes none: calls started and their argument bytes are
/// counted by the table of calls in flight, under the lock the call takes
/// anyway (`Pending::counts`). Measured with 128 calls in flight: `perf
/// annotate` put an eighth of `Core::call`'s own time right after the
/// locked add on the line all counters shared.
#[derive(Default)]
pub(crate) struct Stats {
    pub completing: Padded<Completing>,
    pub serving: Padded<Serving>,
}

/// Written by the thread completing a call.
#[derive(Default)]
pub(crate) struct Completing {
    pub calls_ok: AtomicU64,
    pub calls_failed: AtomicU64,
    pub calls_timed_out: AtomicU64,
    /// Replies received.
    pub bytes_received: AtomicU64,
}

/// Written by a thread reading or answering a request.
#[derive(Default)]
pub(crate) struct Serving {
    pub requests_served: AtomicU64,
    /// Arguments received.
    pub bytes_received: AtomicU64,
    /// Replies sent.
    pub bytes_sent: AtomicU64,
}

/// `T` alone on its cache lines (two: the adjacent-line prefetcher pairs them).
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct Padded<T>(pub T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
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
    /// `calls`: the table's counts (in flight, started, argument bytes).
    pub(crate) fn snapshot(&self, calls: (u64, u64, u64)) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let (completing, serving) = (&self.completing, &self.serving);
        let (calls_in_flight, calls_started, args_sent) = calls;
        StatsSnapshot {
            calls_started,
            calls_ok: get(&completing.calls_ok),
            calls_failed: get(&completing.calls_failed),
            calls_timed_out: get(&completing.calls_timed_out),
            requests_served: get(&serving.requests_served),
            bytes_sent: args_sent + get(&serving.bytes_sent),
            bytes_received: get(&completing.bytes_received) + get(&serving.bytes_received),
            calls_in_flight,
        }
    }
}

/// How many handler times the sliding window keeps (the last this many
/// requests of the function).
pub(crate) const TIME_WINDOW: usize = 1024;

/// Counters of one registered function, as its handler serves it.
pub(crate) struct FunctionStats {
    served: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    running: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    /// The handler times of the last [`TIME_WINDOW`] requests, in ns: a
    /// ring written with no lock (a snapshot taken while a slot is being
    /// written may read its previous value: 0 before the window first
    /// fills).
    times: Box<[AtomicU64]>,
    recorded: AtomicU64,
    /// A moving average of its handler times, in ns (each new time weighs
    /// 1/8; `NEVER_RAN` before the first): whether a reading thread may
    /// serve a request itself. Written with no lock by whichever thread a
    /// handler ran on: a hint.
    recent_ns: AtomicU64,
}

impl Default for FunctionStats {
    fn default() -> FunctionStats {
        FunctionStats {
            served: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            running: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            times: (0..TIME_WINDOW).map(|_| AtomicU64::new(0)).collect(),
            recorded: AtomicU64::new(0),
            recent_ns: AtomicU64::new(NEVER_RAN),
        }
    }
}

/// `FunctionStats::recent_ns` before a handler first ran.
const NEVER_RAN: u64 = u64::MAX;

/// How a request of the function ended.
pub(crate) enum Ended {
    /// Answered successfully with this many bytes.
    Served(usize),
    /// Answered with an error.
    Failed,
    /// Cancelled by its caller, or its deadline passed before it ran: not
    /// answered.
    Cancelled,
}

impl FunctionStats {
    pub(crate) fn arrived(&self, bytes: usize) {
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A handler starts; the returned guard, dropped when it returns,
    /// records how long it ran.
    pub(crate) fn running(&self) -> Running<'_> {
        self.running.fetch_add(1, Ordering::Relaxed);
        Running {
            stats: self,
            started_ns: crate::net::sys::monotonic_ns(),
        }
    }

    /// How long its handler has taken of late (see `recent_ns`); `None`
    /// before it first ran.
    pub(crate) fn recent_ns(&self) -> Option<u64> {
        Some(self.recent_ns.load(Ordering::Relaxed)).filter(|&ns| ns != NEVER_RAN)
    }

    pub(crate) fn ended(&self, how: Ended) {
        match how {
            Ended::Served(bytes) => {
                self.served.fetch_add(1, Ordering::Relaxed);
                self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
            }
            Ended::Failed => drop(self.failed.fetch_add(1, Ordering::Relaxed)),
            Ended::Cancelled => drop(self.cancelled.fetch_add(1, Ordering::Relaxed)),
        }
    }

    pub(crate) fn snapshot(&self) -> FunctionStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let n = (get(&self.recorded) as usize).min(TIME_WINDOW);
        let mut times: Vec<u64> = self.times[..n].iter().map(get).collect();
        times.sort_unstable();
        let at = |q: usize| times.get((n * q / 100).min(n.saturating_sub(1))).copied().unwrap_or(0);
        FunctionStatsSnapshot {
            served: get(&self.served),
            failed: get(&self.failed),
            cancelled: get(&self.cancelled),
            running: get(&self.running),
            bytes_in: get(&self.bytes_in),
            bytes_out: get(&self.bytes_out),
            handler_ns_p50: at(50),
            handler_ns_p99: at(99),
            handler_ns_max: times.last().copied().unwrap_or(0),
            window: n as u64,
        }
    }
}

/// A running handler (see [`FunctionStats::running`]).
pub(crate) struct Running<'a> {
    stats: &'a FunctionStats,
    started_ns: u64,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let ns = crate::net::sys::monotonic_ns().saturating_sub(self.started_ns);
        let i = self.stats.recorded.fetch_add(1, Ordering::Relaxed) as usize % TIME_WINDOW;
        self.stats.times[i].store(ns, Ordering::Relaxed);
        let recent = match self.stats.recent_ns.load(Ordering::Relaxed) {
            NEVER_RAN => ns,
            recent => recent - recent / 8 + ns / 8,
        };
        self.stats.recent_ns.store(recent.min(NEVER_RAN - 1), Ordering::Relaxed);
        self.stats.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A snapshot of one function's counters on the rank that serves it.
///
/// Each request that reached the function ends as exactly one of `served`
/// (answered successfully), `failed` (answered with an error: the handler
/// failed or panicked, or its reply was too large) or `cancelled` (its
/// caller cancelled it, or its deadline passed before it ran: not
/// answered), or is still queued, `running`, or waiting for its deferred
/// answer (requests dropped by a closing agent are not counted). A handler
/// that saw its deadline pass and answered anyway counts as served or
/// failed. Bytes are payload bytes.
/// Handler times (how long the handler ran, not counting a deferred
/// reply's wait) are over the last `window` requests, at most 1024.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FunctionStatsSnapshot {
    pub served: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub running: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub handler_ns_p50: u64,
    pub handler_ns_p99: u64,
    pub handler_ns_max: u64,
    pub window: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_the_window_of_handler_times() {
        let f = FunctionStats::default();
        f.arrived(10);
        for _ in 0..3 {
            drop(f.running());
        }
        f.ended(Ended::Served(4));
        f.ended(Ended::Failed);
        f.ended(Ended::Cancelled);
        let s = f.snapshot();
        assert_eq!((s.served, s.failed, s.cancelled, s.running), (1, 1, 1, 0));
        assert_eq!((s.bytes_in, s.bytes_out, s.window), (10, 4, 3));
        assert!(s.handler_ns_p50 <= s.handler_ns_p99 && s.handler_ns_p99 <= s.handler_ns_max);
        for _ in 0..2 * TIME_WINDOW {
            drop(f.running());
        }
        assert_eq!(f.snapshot().window, TIME_WINDOW as u64);
    }
}
