//! Process-wide logging: a level (from `RPCAGENT_LOG`, changeable at run
//! time) and a sink (stderr, or a callback the application installs).

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};

use parking_lot::RwLock;

#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        match s.trim().to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            _ => None,
        }
    }
}

/// A log sink: receives the level and the whole line (rank prefix included).
pub type LogSink = Arc<dyn Fn(Level, &str) + Send + Sync>;

/// 0 = not read from the environment yet.
static MAX_LEVEL: AtomicI32 = AtomicI32::new(0);
static SINK: RwLock<Option<LogSink>> = RwLock::new(None);

fn max_level() -> i32 {
    let v = MAX_LEVEL.load(Ordering::Relaxed);
    if v != 0 {
        return v;
    }
    let from_env = std::env::var("RPCAGENT_LOG")
        .ok()
        .and_then(|s| Level::parse(&s))
        .unwrap_or(Level::Warn) as i32;
    // Another thread may have set a level meanwhile; theirs wins.
    let _ = MAX_LEVEL.compare_exchange(0, from_env, Ordering::Relaxed, Ordering::Relaxed);
    MAX_LEVEL.load(Ordering::Relaxed)
}

/// Emits messages whose level number is at most `level` (clamped to 0..=4;
/// 0 silences everything).
pub fn set_level(level: i32) {
    // -1 keeps "silenced" distinct from 0, "not read from the environment yet".
    let v = if level <= 0 { -1 } else { level.min(Level::Debug as i32) };
    MAX_LEVEL.store(v, Ordering::Relaxed);
}

/// Installs a sink for every message; `None` restores stderr.
pub fn set_sink(sink: Option<LogSink>) {
    *SINK.write() = sink;
}

pub fn enabled(level: Level) -> bool {
    (level as i32) <= max_level()
}

/// Logs one message of `rank` (None before a rank is known).
pub fn log(level: Level, rank: Option<usize>, message: std::fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let line = match rank {
        Some(r) => format!("[rpcagent rank {r}] {}: {message}", level.name()),
        None => format!("[rpcagent] {}: {message}", level.name()),
    };
    // The read lock is held across the call, so once set_sink returns no
    // thread is still inside the sink it replaced (a C callback's user data
    // may be freed right after). Sinks must not log (they cannot call back
    // into rpcagent).
    let sink = SINK.read();
    match sink.as_ref() {
        Some(sink) => sink(level, &line),
        None => eprintln!("{line}"),
    }
}

macro_rules! log_at {
    ($level:ident, $rank:expr, $($arg:tt)*) => {
        $crate::log::log($crate::log::Level::$level, $rank, format_args!($($arg)*))
    };
}
pub(crate) use log_at;
