//! Rate-limited logging for lines a guest can trigger.
//!
//! A guest can make the device refuse requests, or break its queue, as fast as it likes; a
//! log line per event would let it fill the host's disk and burn the host's CPU on
//! formatting. Every such line goes through a [`LogLimiter`]: at most a budget of lines per
//! window (10 per 5 s by default), and the first line logged after some were held back says
//! how many, "(N similar lines suppressed)".
//!
//! A limiter is per call site (or per device and call site, as its owner chooses): a flood
//! of one kind of line does not silence the others. It is lock-free (two atomics), so any
//! thread may share one, and `new` is `const`, so it can be a `static`:
//!
//! ```
//! use devices::limited_warn;
//! use devices::logger::LogLimiter;
//!
//! static REFUSED: LogLimiter = LogLimiter::with_defaults();
//! let error = "bad header";
//! limited_warn!(REFUSED, "blk-{}: refused request: {error}", "vda");
//! ```
//!
//! The window is fixed: it opens at the first line let through after the previous window
//! ended and lasts `window`; within it, `budget` lines pass. The time is a monotonic clock
//! ([`Instant`]), counted from a process-wide epoch; [`LogLimiter::check_at`] takes the
//! time explicitly, for tests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[doc(hidden)]
pub use tracing as __tracing;

/// Lines per window by default.
pub const DEFAULT_BUDGET: u32 = 10;
/// The default window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(5);

/// Bits of the state word that count the lines let through in the current window.
const USED_BITS: u32 = 24;
const USED_MASK: u64 = (1 << USED_BITS) - 1;
/// The other 40 bits hold the window's start in ms since the epoch, modulo 2^40 (34 years:
/// the arithmetic on it is modular, so a wrap only ends a window early).
const START_MASK: u64 = u64::MAX >> USED_BITS;
/// The largest budget a limiter keeps (larger ones are clamped).
pub const MAX_BUDGET: u32 = USED_MASK as u32;

/// Every line held back by any limiter since the process started.
static SUPPRESSED_TOTAL: AtomicU64 = AtomicU64::new(0);
/// What [`monotonic_ms`] counts from.
static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Milliseconds of the monotonic clock since this process first asked for them.
pub fn monotonic_ms() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(Instant::now().saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
}

/// Every line any limiter held back since the process started (for metrics).
pub fn suppressed_total() -> u64 {
    SUPPRESSED_TOTAL.load(Ordering::Relaxed)
}

/// Adds one to `counter`, stopping at `u64::MAX`.
fn saturating_inc(counter: &AtomicU64) {
    // The closure always returns Some, so this cannot fail.
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
        Some(n.saturating_add(1))
    });
}

/// Lets through at most `budget` lines per `window`, and counts the others.
#[derive(Debug)]
pub struct LogLimiter {
    budget: u64,
    window_ms: u64,
    /// 0 before the first line; then the window's start (ms since the epoch, modulo 2^40)
    /// above USED_BITS and the lines let through in it (at least 1) below.
    state: AtomicU64,
    /// Lines held back since the last one let through.
    suppressed: AtomicU64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::with_defaults()
    }
}

impl LogLimiter {
    /// A limiter letting through `budget` lines (clamped to `1..=MAX_BUDGET`) per `window`
    /// (clamped to at least 1 ms and at most 2^40 ms).
    pub const fn new(budget: u32, window: Duration) -> LogLimiter {
        let budget = if budget == 0 {
            1
        } else if budget > MAX_BUDGET {
            MAX_BUDGET
        } else {
            budget
        };
        let ms = window.as_millis();
        let window_ms = if ms == 0 {
            1
        } else if ms > START_MASK as u128 {
            START_MASK
        } else {
            ms as u64
        };
        LogLimiter {
            budget: budget as u64,
            window_ms,
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// [`DEFAULT_BUDGET`] lines per [`DEFAULT_WINDOW`].
    pub const fn with_defaults() -> LogLimiter {
        LogLimiter::new(DEFAULT_BUDGET, DEFAULT_WINDOW)
    }

    /// The lines let through per window.
    pub fn budget(&self) -> u32 {
        u32::try_from(self.budget).unwrap_or(MAX_BUDGET)
    }

    /// The window.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// Whether to log a line now: `Some(n)` to log it, `n` lines having been held back since
    /// the last one logged (say so in the line when `n > 0`); `None` to drop it (it is
    /// counted).
    pub fn check(&self) -> Option<u64> {
        self.check_at(monotonic_ms())
    }

    /// [`check`](Self::check) at `now_ms` on a monotonic clock in milliseconds. A clock that
    /// goes back ends the current window, as one that wraps at 2^40 ms does.
    pub fn check_at(&self, now_ms: u64) -> Option<u64> {
        let now = now_ms & START_MASK;
        let pack = |start: u64, used: u64| (start << USED_BITS) | (used & USED_MASK);
        let admitted = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                if state == 0 {
                    return Some(pack(now, 1));
                }
                let start = state >> USED_BITS;
                let used = state & USED_MASK;
                // Modular on purpose: the start is kept modulo 2^40.
                let elapsed = now.wrapping_sub(start) & START_MASK;
                if elapsed >= self.window_ms {
                    Some(pack(now, 1))
                } else if used < self.budget {
                    Some(pack(start, used.saturating_add(1)))
                } else {
                    None
                }
            })
            .is_ok();
        if admitted {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            saturating_inc(&self.suppressed);
            saturating_inc(&SUPPRESSED_TOTAL);
            None
        }
    }
}

/// Emits a tracing event at `$level` through `$limiter` (a [`LogLimiter`], or a reference
/// to one); the value is whether the line was logged. The message is a format string and
/// its arguments; held-back lines are counted in the next one let through.
#[doc(hidden)]
#[macro_export]
macro_rules! __limited_event {
    ($level:expr, $limiter:expr, $fmt:literal $($arg:tt)*) => {{
        let limiter: &$crate::logger::LogLimiter = &$limiter;
        if $crate::logger::__tracing::enabled!($level) {
            match limiter.check() {
                Some(0) => {
                    $crate::logger::__tracing::event!($level, $fmt $($arg)*);
                    true
                }
                Some(suppressed) => {
                    $crate::logger::__tracing::event!(
                        $level,
                        "{} ({} similar lines suppressed)",
                        ::std::format_args!($fmt $($arg)*),
                        suppressed
                    );
                    true
                }
                None => false,
            }
        } else {
            false
        }
    }};
}

/// `tracing::error!` through a [`LogLimiter`](crate::logger::LogLimiter):
/// `limited_error!(limiter, "format {}", args)`. Evaluates to whether the line was logged.
#[macro_export]
macro_rules! limited_error {
    ($limiter:expr, $($msg:tt)+) => {
        $crate::__limited_event!($crate::logger::__tracing::Level::ERROR, $limiter, $($msg)+)
    };
}

/// `tracing::warn!` through a [`LogLimiter`](crate::logger::LogLimiter):
/// `limited_warn!(limiter, "format {}", args)`. Evaluates to whether the line was logged.
#[macro_export]
macro_rules! limited_warn {
    ($limiter:expr, $($msg:tt)+) => {
        $crate::__limited_event!($crate::logger::__tracing::Level::WARN, $limiter, $($msg)+)
    };
}

/// `tracing::info!` through a [`LogLimiter`](crate::logger::LogLimiter):
/// `limited_info!(limiter, "format {}", args)`. Evaluates to whether the line was logged.
#[macro_export]
macro_rules! limited_info {
    ($limiter:expr, $($msg:tt)+) => {
        $crate::__limited_event!($crate::logger::__tracing::Level::INFO, $limiter, $($msg)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::sync::{Arc, Mutex};

    /// `calls` checks at `now_ms`: how many were let through.
    fn burst(l: &LogLimiter, calls: u32, now_ms: u64) -> u32 {
        (0..calls).filter(|_| l.check_at(now_ms).is_some()).count() as u32
    }

    #[test]
    fn a_burst_logs_the_budget_then_the_next_window_reports_the_rest_exactly() {
        let l = LogLimiter::with_defaults();
        assert_eq!(l.check_at(1_000), Some(0));
        assert_eq!(burst(&l, 999, 1_000), DEFAULT_BUDGET - 1);
        // Later in the same window: still nothing.
        assert_eq!(l.check_at(5_999), None);
        // The window ended: the next line says how many were held back, exactly.
        let held = 1_000 - u64::from(DEFAULT_BUDGET) + 1;
        assert_eq!(l.check_at(6_000), Some(held));
        assert_eq!(l.check_at(6_001), Some(0));
        assert_eq!(burst(&l, 1_000, 6_002), DEFAULT_BUDGET - 2);
        assert_eq!(
            l.check_at(11_000),
            Some(1_000 - u64::from(DEFAULT_BUDGET) + 2)
        );
    }

    #[test]
    fn a_quiet_limiter_reports_nothing_and_windows_open_at_the_first_line() {
        let l = LogLimiter::new(2, Duration::from_millis(100));
        // Late first use: the window opens then, not at the epoch.
        assert_eq!(burst(&l, 5, 1_000_000), 2);
        assert_eq!(l.check_at(1_000_099), None);
        assert_eq!(l.check_at(1_000_100), Some(4));
        // Long quiet, then lines again: no phantom count.
        assert_eq!(l.check_at(9_000_000), Some(0));
        assert_eq!(l.check_at(9_000_000), Some(0));
        assert_eq!(l.check_at(9_000_000), None);
    }

    #[test]
    fn limits_are_clamped_and_the_clock_may_wrap_or_go_back() {
        let l = LogLimiter::new(0, Duration::ZERO);
        assert_eq!((l.budget(), l.window()), (1, Duration::from_millis(1)));
        assert_eq!(burst(&l, 3, 7), 1);
        assert_eq!(l.check_at(8), Some(2));
        let l = LogLimiter::new(u32::MAX, Duration::MAX);
        assert_eq!(l.budget(), MAX_BUDGET);
        assert_eq!(l.window(), Duration::from_millis(START_MASK));

        // Near the 2^40 ms wrap: the window still ends.
        let l = LogLimiter::new(1, Duration::from_secs(5));
        let t = START_MASK - 1_000;
        assert_eq!(l.check_at(t), Some(0));
        assert_eq!(l.check_at(t + 4_999), None);
        assert_eq!(l.check_at(t + 5_000), Some(1));
        assert_eq!(l.check_at(t + 5_001), None);
        // A clock that goes back ends the window rather than stalling it.
        assert_eq!(l.check_at(0), Some(1));
    }

    #[test]
    fn threads_sharing_a_limiter_let_through_the_budget_and_lose_no_count() {
        let l = Arc::new(LogLimiter::new(7, Duration::from_secs(5)));
        let before = suppressed_total();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let l = Arc::clone(&l);
                std::thread::spawn(move || burst(&l, 1_000, 42))
            })
            .collect();
        let let_through: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(let_through, 7);
        assert_eq!(l.check_at(5_042), Some(8_000 - 7));
        // Other tests run at the same time and add to the total too.
        assert!(suppressed_total() - before >= 8_000 - 7);
    }

    /// A tracing subscriber writing into a shared buffer, for the test that calls `f`.
    fn captured(f: impl FnOnce()) -> String {
        #[derive(Clone)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf(Arc::new(Mutex::new(Vec::new())));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let out = buf.0.lock().unwrap().clone();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_macros_log_the_budget_then_say_how_many_were_suppressed() {
        let window = Duration::from_millis(300);
        let l = LogLimiter::new(3, window);
        let mut logged = 0;
        let mut one_window = false;
        let out = captured(|| {
            let start = Instant::now();
            for i in 0..1_000 {
                if crate::limited_warn!(l, "refused request {i}: {}", "bad header") {
                    logged += 1;
                }
            }
            // The burst takes microseconds; the exact count holds if it stayed in one window
            // (on a badly overloaded host it may not, and then more lines pass).
            one_window = start.elapsed() < window;
            if one_window {
                assert_eq!(logged, 3);
                std::thread::sleep(window + Duration::from_millis(50));
                assert!(crate::limited_error!(&l, "queue broken"));
            }
        });
        let lines: Vec<&str> = out.lines().collect();
        if one_window {
            assert_eq!(lines.len(), 4, "{out}");
            assert!(lines[0].contains("WARN"), "{out}");
            assert!(lines[0].ends_with("refused request 0: bad header"), "{out}");
            assert!(lines[2].ends_with("refused request 2: bad header"), "{out}");
            assert!(lines[3].contains("ERROR"), "{out}");
            assert!(
                lines[3].ends_with("queue broken (997 similar lines suppressed)"),
                "{out}"
            );
        } else {
            assert_eq!(lines.len(), logged, "{out}");
        }

        // A level that is off consumes nothing and counts nothing.
        let l = LogLimiter::new(1, Duration::from_secs(60));
        let out = captured(|| {
            for _ in 0..10 {
                assert!(!tracing::enabled!(tracing::Level::DEBUG));
                let _ = crate::__limited_event!(tracing::Level::DEBUG, l, "debug");
            }
            assert!(crate::limited_info!(l, "info {}", 1));
            assert!(!crate::limited_info!(l, "info {}", 2));
        });
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.trim_end().ends_with("info 1"), "{out}");
    }
}
