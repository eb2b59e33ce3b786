//! The counter/trace interceptor: counts requests and bytes by kind, and with
//! `trace = true` logs every request through the VMM's log. It never touches data, so it
//! costs no copy; disabled, it is out of the path.
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
}

#[derive(Default)]
struct Counts {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    other: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
}

pub struct Counter {
    trace: bool,
    device: String,
    lower: Lower,
    counts: Counts,
}

impl Interceptor for Counter {
    const NAME: &'static std::ffi::CStr = c"counter";

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let cfg: Config = ctx.config_as()?;
        Ok(Counter {
            trace: cfg.trace,
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
            "other": c.other.load(Relaxed),
            "bytes_read": c.bytes_read.load(Relaxed),
            "bytes_written": c.bytes_written.load(Relaxed),
            "errors": c.errors.load(Relaxed),
        })
    }
}

export_interceptor!(Counter);
