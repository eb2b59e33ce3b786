//! Throttling: token buckets on a disk's requests per second and bytes per second, each
//! with a burst, for one disk or shared by a group of disks (as Firecracker's rate limiters
//! and QEMU's throttle groups). A request over the limit is left pending (ABI version 2)
//! and resumed from a timer once the buckets allow it, in arrival order: no thread waits.
//! Flushes pass without cost. A request that cannot wait (the synchronous walk: another
//! plugin's own I/O through this one) passes at once and is charged, so the ones after it
//! wait for it.
//!
//! ```toml
//! [[interceptor]]
//! id = "limit"
//! path = "target/release/libinterceptor_throttle.so"
//! config = { iops = 500, bytes_per_sec = 20971520, burst_ms = 100, group = "tenant-a" }
//! ```

mod bucket;

use bucket::Bucket;
use interceptor_sdk::{
    export_interceptor, CreateContext, Decision, DeviceKind, Handle, Interceptor, Lower, Request,
    RequestKind, Slot,
};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// The longest burst a config may ask for.
pub const MAX_BURST_MS: u64 = 60_000;

#[derive(serde::Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Requests a second (reads, writes, discards, write-zeroes); none: no such limit.
    iops: Option<u64>,
    /// Data bytes a second (of reads and writes); none: no such limit.
    bytes_per_sec: Option<u64>,
    /// How much above the rate a burst may take, in milliseconds of it.
    #[serde(default = "default_burst_ms")]
    burst_ms: u64,
    /// Disks whose instances name the same group share one pair of buckets.
    group: Option<String>,
}

fn default_burst_ms() -> u64 {
    100
}

/// The buckets of one disk, or of a group.
struct Buckets {
    iops: Option<Bucket>,
    bytes: Option<Bucket>,
}

fn burst_of(c: &Config, rate: u64) -> u64 {
    (rate.saturating_mul(c.burst_ms) / 1000).max(1)
}

impl Buckets {
    fn new(c: &Config, now: Instant) -> Buckets {
        Buckets {
            iops: c.iops.map(|r| Bucket::new(r, burst_of(c, r), now)),
            bytes: c.bytes_per_sec.map(|r| Bucket::new(r, burst_of(c, r), now)),
        }
    }

    /// New limits; a bucket kept keeps what it holds (or owes), a new one starts full.
    fn set(&mut self, c: &Config, now: Instant) {
        let one = |b: &mut Option<Bucket>, rate: Option<u64>| match (b.as_mut(), rate) {
            (Some(b), Some(r)) => b.set(r, burst_of(c, r), now),
            (None, Some(r)) => *b = Some(Bucket::new(r, burst_of(c, r), now)),
            (_, None) => *b = None,
        };
        one(&mut self.iops, c.iops);
        one(&mut self.bytes, c.bytes_per_sec);
    }

    /// How long until a request of `bytes` may start.
    fn wait(&mut self, bytes: u64, now: Instant) -> Duration {
        let a = self
            .iops
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait(1, now));
        let b = self
            .bytes
            .as_mut()
            .map_or(Duration::ZERO, |b| b.wait(bytes, now));
        a.max(b)
    }

    fn take(&mut self, bytes: u64, now: Instant) {
        if let Some(b) = self.iops.as_mut() {
            b.take(1, now);
        }
        if let Some(b) = self.bytes.as_mut() {
            b.take(bytes, now);
        }
    }
}

/// A group's buckets and the config that made them (every member must say the same).
struct Shared {
    config: Mutex<Config>,
    buckets: Mutex<Buckets>,
}

/// Groups by name, while any member lives.
static GROUPS: Mutex<Option<HashMap<String, Weak<Shared>>>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn shared_for(c: &Config) -> Result<Arc<Shared>, String> {
    let make = || {
        Arc::new(Shared {
            config: Mutex::new(c.clone()),
            buckets: Mutex::new(Buckets::new(c, Instant::now())),
        })
    };
    let Some(name) = &c.group else {
        return Ok(make());
    };
    let mut groups = lock(&GROUPS);
    let groups = groups.get_or_insert_with(HashMap::new);
    groups.retain(|_, w| w.strong_count() > 0);
    if let Some(s) = groups.get(name).and_then(Weak::upgrade) {
        let theirs = lock(&s.config).clone();
        if theirs != *c {
            return Err(format!(
                "group {name:?} is throttled at iops {:?}, bytes_per_sec {:?}, burst_ms {} by \
                 another disk; give every member the same limits",
                theirs.iops, theirs.bytes_per_sec, theirs.burst_ms
            ));
        }
        return Ok(s);
    }
    let s = make();
    groups.insert(name.clone(), Arc::downgrade(&s));
    Ok(s)
}

#[derive(Default)]
struct Counters {
    passed: AtomicU64,
    held: AtomicU64,
    /// Requests that could not wait (charged, passed at once).
    unwaitable: AtomicU64,
    held_ns: AtomicU64,
}

/// A request held back: its handle, data bytes and when it came.
struct Held {
    handle: Handle,
    bytes: u64,
    since: Instant,
}

pub struct Throttle {
    lower: Arc<Lower>,
    shared: Arc<Shared>,
    queue: Mutex<VecDeque<Held>>,
    /// A timer is out (one at a time).
    armed: AtomicBool,
    c: Counters,
}

impl Throttle {
    /// Resumes the held requests the buckets allow now, in order; arms the timer for the
    /// next if any is left. `cancelled`: the disk drains, so every one goes at once.
    fn release(self: &Arc<Self>, cancelled: bool) {
        let now = Instant::now();
        let mut go = Vec::new();
        let next = {
            let mut q = lock(&self.queue);
            let mut b = lock(&self.shared.buckets);
            loop {
                let Some(front) = q.front() else { break None };
                let wait = b.wait(front.bytes, now);
                if !cancelled && !wait.is_zero() {
                    break Some(wait);
                }
                b.take(front.bytes, now);
                if let Some(h) = q.pop_front() {
                    go.push(h);
                }
            }
        };
        for h in go {
            let ns = u64::try_from(now.saturating_duration_since(h.since).as_nanos()).unwrap_or(0);
            self.c.held_ns.fetch_add(ns, Relaxed);
            self.c.passed.fetch_add(1, Relaxed);
            // A handle its queue no longer knows (a drain gave up on it) is refused: fine.
            let _ = self.lower.resume(h.handle, Decision::Continue);
        }
        match next {
            Some(wait) => self.arm(wait),
            None => self.armed.store(false, Relaxed),
        }
    }

    fn arm(self: &Arc<Self>, wait: Duration) {
        let me = Arc::downgrade(self);
        self.armed.store(true, Relaxed);
        let armed = self.lower.after(wait, move |cancelled| {
            if let Some(me) = me.upgrade() {
                me.release(cancelled);
            }
        });
        if armed.is_err() {
            // No timer: let everything held go rather than hold it for good.
            self.armed.store(false, Relaxed);
            let me = self.clone();
            me.release(true);
        }
    }
}

/// A config's limits make sense.
fn check(cfg: &Config) -> Result<(), String> {
    if cfg.iops == Some(0) || cfg.bytes_per_sec == Some(0) {
        return Err("iops and bytes_per_sec: at least 1 (leave one out for no limit)".into());
    }
    if cfg.iops.is_none() && cfg.bytes_per_sec.is_none() {
        return Err("give iops, bytes_per_sec or both: nothing to throttle".into());
    }
    if cfg.burst_ms == 0 || cfg.burst_ms > MAX_BURST_MS {
        return Err(format!("burst_ms: 1 to {MAX_BURST_MS}"));
    }
    Ok(())
}

/// The instance the VMM holds: the throttle behind an `Arc`, so that its timers can reach
/// it and find it gone after the instance is destroyed.
pub struct Instance(Arc<Throttle>);

impl Interceptor for Instance {
    const NAME: &'static std::ffi::CStr = c"throttle";
    const DEVICES: u32 = DeviceKind::Block.mask();

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let cfg: Config = ctx.config_as()?;
        check(&cfg)?;
        if !ctx.lower.is_async() {
            return Err("this VMM cannot hold requests back (no plugin ABI version 2)".into());
        }
        Ok(Instance(Arc::new(Throttle {
            lower: Arc::new(ctx.lower),
            shared: shared_for(&cfg)?,
            queue: Mutex::new(VecDeque::new()),
            armed: AtomicBool::new(false),
            c: Counters::default(),
        })))
    }

    fn pre(&self, req: &mut Request<'_>, _slot: &mut Slot) -> Decision {
        let t = &self.0;
        let bytes = match req.kind() {
            RequestKind::Read | RequestKind::Write => req.len(),
            RequestKind::Discard | RequestKind::WriteZeroes => 0,
            _ => return Decision::Continue,
        };
        let now = Instant::now();
        let Some(handle) = req.handle() else {
            lock(&t.shared.buckets).take(bytes, now);
            t.c.unwaitable.fetch_add(1, Relaxed);
            return Decision::Continue;
        };
        let mut q = lock(&t.queue);
        if q.is_empty() {
            let mut b = lock(&t.shared.buckets);
            if b.wait(bytes, now).is_zero() {
                b.take(bytes, now);
                t.c.passed.fetch_add(1, Relaxed);
                return Decision::Continue;
            }
        }
        q.push_back(Held {
            handle,
            bytes,
            since: now,
        });
        drop(q);
        t.c.held.fetch_add(1, Relaxed);
        if !t.armed.load(Relaxed) {
            let wait = lock(&t.shared.buckets).wait(bytes, now);
            t.arm(wait.max(Duration::from_micros(1)));
        }
        Decision::Pending
    }

    /// New limits for the disk (for its whole group, when it has one) from now on; the
    /// group itself cannot change.
    fn reconfigure(&self, config: serde_json::Value) -> Result<(), String> {
        let cfg: Config = serde_json::from_value(config).map_err(|e| format!("config: {e}"))?;
        check(&cfg)?;
        let t = &self.0;
        let mut current = lock(&t.shared.config);
        if cfg.group != current.group {
            return Err(format!(
                "group: {:?} while it runs (was {:?}); remove and load it again to move it",
                cfg.group, current.group
            ));
        }
        lock(&t.shared.buckets).set(&cfg, Instant::now());
        *current = cfg;
        Ok(())
    }

    fn stats(&self) -> serde_json::Value {
        let t = &self.0;
        let c = lock(&t.shared.config).clone();
        serde_json::json!({
            "iops_limit": c.iops,
            "bytes_per_sec_limit": c.bytes_per_sec,
            "burst_ms": c.burst_ms,
            "group": c.group,
            "passed": t.c.passed.load(Relaxed),
            "held": t.c.held.load(Relaxed),
            "held_now": lock(&t.queue).len(),
            "held_seconds": t.c.held_ns.load(Relaxed) as f64 / 1e9,
            "unwaitable": t.c.unwaitable.load(Relaxed),
        })
    }
}

export_interceptor!(Instance);

#[cfg(test)]
mod tests;
