//! The counter/trace interceptor: counts requests and bytes by kind, and with
//! `trace = true` logs every request through the VMM's log. It never touches data, so it
//! costs no copy; disabled, it is out of the path.
//!
//! With `stamp_on_destroy = OFFSET` (a multiple of 512 inside the disk), its destroy writes
//! one 512-byte record there through the layers below, `counter destroyed: reads=R
//! writes=W flushes=F` padded with zeros, and flushes: the lab's shutdown test reads it from
//! the image to see that destroy ran, after the shutdown's flush, with the disk still there.
//!
//! ```toml
//! [[interceptor]]
//! id = "count"
//! path = "target/release/libinterceptor_counter.so"
//! config = { trace = false }
//! ```

use interceptor_sdk::{
    export_interceptor, CreateContext, Decision, Interceptor, LogLevel, Lower, Request,
    RequestKind, Slot, Status,
};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    trace: bool,
    stamp_on_destroy: Option<u64>,
}

#[derive(Default)]
struct Counts {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    /// Discards and write-zeroes.
    discards: AtomicU64,
    other: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
}

pub struct Counter {
    trace: bool,
    stamp_on_destroy: Option<u64>,
    device: String,
    lower: Lower,
    counts: Counts,
}

impl Interceptor for Counter {
    const NAME: &'static std::ffi::CStr = c"counter";
    // Counted and passed down like everything else: a disk with only counters on it offers
    // the guest discard and write-zeroes.
    const FLAGS: u32 = interceptor_sdk::abi::F_HANDLES_DISCARD;

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let cfg: Config = ctx.config_as()?;
        if let Some(at) = cfg.stamp_on_destroy {
            let fits = at
                .checked_add(512)
                .is_some_and(|end| end <= ctx.lower.capacity());
            if at % 512 != 0 || !fits {
                return Err(format!(
                    "stamp_on_destroy {at}: must be a multiple of 512 inside the disk"
                ));
            }
        }
        Ok(Counter {
            trace: cfg.trace,
            stamp_on_destroy: cfg.stamp_on_destroy,
            device: ctx.device_id.to_string(),
            lower: ctx.lower,
            counts: Counts::default(),
        })
    }

    fn pre(&self, req: &mut Request<'_>, _slot: &mut Slot) -> Decision {
        let c = &self.counts;
        match req.kind() {
            RequestKind::Read => c.reads.fetch_add(1, Relaxed),
            RequestKind::Write => c.writes.fetch_add(1, Relaxed),
            RequestKind::Flush => c.flushes.fetch_add(1, Relaxed),
            RequestKind::Discard | RequestKind::WriteZeroes => c.discards.fetch_add(1, Relaxed),
            _ => c.other.fetch_add(1, Relaxed),
        };
        Decision::Continue
    }

    fn post(&self, req: &mut Request<'_>, _slot: Slot, status: Status) -> Status {
        let c = &self.counts;
        if status != Status::Ok {
            c.errors.fetch_add(1, Relaxed);
        } else if req.kind() == RequestKind::Read {
            c.bytes_read.fetch_add(req.len(), Relaxed);
        } else if req.kind() == RequestKind::Write {
            c.bytes_written.fetch_add(req.len(), Relaxed);
        }
        if self.trace {
            let line = format!(
                "{} {:?} offset={} len={} -> {status:?}",
                self.device,
                req.kind(),
                req.offset(),
                req.len()
            );
            self.lower.log(LogLevel::Info, &line);
        }
        status
    }

    fn stats(&self) -> serde_json::Value {
        let c = &self.counts;
        serde_json::json!({
            "reads": c.reads.load(Relaxed),
            "writes": c.writes.load(Relaxed),
            "flushes": c.flushes.load(Relaxed),
            "discards": c.discards.load(Relaxed),
            "other": c.other.load(Relaxed),
            "bytes_read": c.bytes_read.load(Relaxed),
            "bytes_written": c.bytes_written.load(Relaxed),
            "errors": c.errors.load(Relaxed),
        })
    }
}

impl Drop for Counter {
    /// The plugin's destroy.
    fn drop(&mut self) {
        let Some(at) = self.stamp_on_destroy else {
            return;
        };
        let c = &self.counts;
        let text = format!(
            "counter destroyed: reads={} writes={} flushes={}\n",
            c.reads.load(Relaxed),
            c.writes.load(Relaxed),
            c.flushes.load(Relaxed)
        );
        let mut record = [0u8; 512];
        let n = text.len().min(record.len());
        record[..n].copy_from_slice(&text.as_bytes()[..n]);
        if self.lower.write(at, &record).is_err() || self.lower.flush().is_err() {
            self.lower
                .log(LogLevel::Error, "counter: cannot write the destroy stamp");
        }
    }
}

export_interceptor!(Counter);
