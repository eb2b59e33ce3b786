//! Interrupt coalescing for a queue, as a network card's interrupt throttling does it: a
//! queue interrupts the guest at most once per set delay. Completions that come sooner
//! after the last interrupt wait for the delay to pass (a timer), and are then told with
//! one interrupt, together with whatever completed meanwhile. A queue that completes
//! requests more than the delay apart (queue depth 1 on a device slower than the delay)
//! signals each one at once.
//!
//! Why: under virtio-mmio each interrupt costs the guest two exits to the VMM (its handler
//! reads the interrupt status and writes the acknowledgement) on top of the injection, and
//! it stops whatever the vCPU was doing, often submitting its next requests. Where exits are
//! dear (a nested or emulated host) those costs dominate the guest's time per request at
//! high queue depth (docs/benchmarks.md).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm_sys_util::timerfd::TimerFd;

/// The longest delay a disk may set (`coalesce_us`), in microseconds.
pub const MAX_COALESCE_US: u32 = 10_000;

/// A queue's coalescing timer. It is created with the device, on the main thread before
/// any seccomp filter, and outlives each handler (a reset, the next activation).
pub(super) type QueueTimer = Arc<Mutex<TimerFd>>;

/// One timer per queue, non-blocking: the loop may see an expiry that a disarm then takes
/// back, and reading it must not wait.
pub(super) fn timers(queues: usize) -> std::io::Result<Vec<QueueTimer>> {
    (0..queues)
        .map(|_| {
            let t = TimerFd::new()?;
            // SAFETY: F_SETFL on a descriptor this function owns; no memory is passed.
            if unsafe { libc::fcntl(t.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Arc::new(Mutex::new(t)))
        })
        .collect()
}

/// A handler's side of its queue's timer.
pub(super) struct Coalescer {
    timer: QueueTimer,
    delay: Duration,
    armed: bool,
    /// When the queue last signalled (or, before any, when the handler started).
    last: Option<Instant>,
}

/// What to do with the used entries a handler has not yet signalled.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Signal {
    /// Interrupt the guest now.
    Now,
    /// Wait: the timer fires when the delay since the last interrupt is over.
    Later,
}

impl Coalescer {
    /// Created on the thread that activates the device (a vCPU), so it makes no call on
    /// the timer: one the previous handler left armed at a reset fires once into this
    /// handler, which takes it for its own (one early interrupt, at most).
    pub(super) fn new(timer: QueueTimer, delay: Duration) -> Coalescer {
        Coalescer {
            timer,
            delay,
            armed: false,
            last: None,
        }
    }

    pub(super) fn raw_fd(&self) -> RawFd {
        self.lock().as_raw_fd()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TimerFd> {
        self.timer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Used entries are waiting to be signalled, at `now`: signal now if the last
    /// interrupt is at least the delay ago, else wait for the timer.
    pub(super) fn decide(&mut self, now: Instant) -> Signal {
        if self.armed {
            return Signal::Later;
        }
        let due = self.last.map(|t| t + self.delay);
        match due {
            Some(due) if due > now => {
                let armed = self.lock().reset(due - now, None);
                match armed {
                    Ok(()) => {
                        self.armed = true;
                        Signal::Later
                    }
                    // Without a timer nothing would signal these entries: signal now.
                    Err(e) => {
                        tracing::warn!("virtio-blk: cannot arm the coalescing timer: {e}");
                        self.last = Some(now);
                        Signal::Now
                    }
                }
            }
            _ => {
                self.last = Some(now);
                Signal::Now
            }
        }
    }

    /// The timer's descriptor was readable at `now`: is the wait over? (Reading takes the
    /// expiry; a readiness the loop saw may already have been taken.) When it is, the
    /// caller signals.
    pub(super) fn fired(&mut self, now: Instant) -> bool {
        let expired = self.lock().wait().is_ok();
        if expired {
            self.armed = false;
            self.last = Some(now);
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coalescer(delay: Duration) -> Coalescer {
        let t = timers(1).unwrap().remove(0);
        Coalescer::new(t, delay)
    }

    #[test]
    fn the_first_completion_signals_at_once() {
        let mut c = coalescer(Duration::from_secs(60));
        assert_eq!(c.decide(Instant::now()), Signal::Now);
        assert!(!c.lock().is_armed().unwrap());
    }

    #[test]
    fn a_zero_delay_never_waits() {
        let mut c = coalescer(Duration::ZERO);
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(c.decide(now), Signal::Now);
        }
    }

    #[test]
    fn completions_within_the_delay_wait_for_the_timer_and_it_fires_once() {
        let mut c = coalescer(Duration::from_millis(20));
        let t0 = Instant::now();
        assert_eq!(c.decide(t0), Signal::Now);
        assert_eq!(c.decide(t0 + Duration::from_millis(1)), Signal::Later);
        assert!(c.lock().is_armed().unwrap());
        // More within the delay: still one timer, the deadline unchanged.
        assert_eq!(c.decide(t0 + Duration::from_millis(2)), Signal::Later);
        assert!(!c.fired(Instant::now()), "not yet expired");
        std::thread::sleep(Duration::from_millis(40));
        let t1 = Instant::now();
        assert!(c.fired(t1));
        assert!(!c.lock().is_armed().unwrap());
        // The fire counts as an interrupt: the next completion soon after waits again.
        assert_eq!(c.decide(t1 + Duration::from_millis(1)), Signal::Later);
    }

    #[test]
    fn completions_further_apart_than_the_delay_signal_at_once() {
        let mut c = coalescer(Duration::from_millis(5));
        let t0 = Instant::now();
        assert_eq!(c.decide(t0), Signal::Now);
        assert_eq!(c.decide(t0 + Duration::from_millis(6)), Signal::Now);
        assert_eq!(c.decide(t0 + Duration::from_millis(12)), Signal::Now);
        assert!(!c.lock().is_armed().unwrap());
    }

    #[test]
    fn a_readiness_already_taken_reads_as_none_without_blocking() {
        let mut c = coalescer(Duration::from_millis(1));
        assert!(!c.fired(Instant::now()), "never armed");
        assert_eq!(c.decide(Instant::now()), Signal::Now);
    }
}
