//! What every interceptor built on a store does with a request: the kinds it answers
//! itself (all but GET_ID, which goes on to the device), the range check against the size
//! it exposes, the request counters, and one log line per failure.

use interceptor_sdk::{Decision, LogLevel, Lower, Request, RequestKind};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters of the requests a store layer answered.
#[derive(Default)]
pub struct RequestCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub errors: AtomicU64,
}

impl RequestCounters {
    /// As the stats report them.
    pub fn json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        for (k, c) in [
            ("reads", &self.reads),
            ("writes", &self.writes),
            ("flushes", &self.flushes),
            ("discards", &self.discards),
            ("errors", &self.errors),
        ] {
            m.insert(k.into(), c.load(Relaxed).into());
        }
        m
    }
}

/// An interceptor that keeps the guest's data in a store and answers its requests there.
pub trait StoreLayer {
    /// Bytes the layer exposes to the guest.
    fn logical_bytes(&self) -> u64;
    fn counters(&self) -> &RequestCounters;
    fn lower(&self) -> &Lower;
    fn read(&self, req: &mut Request<'_>) -> Result<(), String>;
    fn write(&self, req: &mut Request<'_>) -> Result<(), String>;
    /// Discard (`discard`) or write-zeroes of the request's range.
    fn zero(&self, req: &Request<'_>, discard: bool) -> Result<(), String>;
    fn flush(&self) -> Result<(), String>;
}

/// The pre hook of a store layer: every request is completed or failed here.
pub fn serve<T: StoreLayer>(layer: &T, req: &mut Request<'_>) -> Decision {
    let in_range = req
        .offset()
        .checked_add(req.len())
        .is_some_and(|end| end <= layer.logical_bytes());
    let c = layer.counters();
    let done = match req.kind() {
        RequestKind::Read if in_range => {
            c.reads.fetch_add(1, Relaxed);
            layer.read(req)
        }
        RequestKind::Write if in_range => {
            c.writes.fetch_add(1, Relaxed);
            layer.write(req)
        }
        RequestKind::Discard | RequestKind::WriteZeroes if in_range => {
            c.discards.fetch_add(1, Relaxed);
            layer.zero(req, req.kind() == RequestKind::Discard)
        }
        RequestKind::Flush => {
            c.flushes.fetch_add(1, Relaxed);
            layer.flush()
        }
        RequestKind::GetId => return Decision::Continue,
        _ => return Decision::Fail,
    };
    match done {
        Ok(()) => Decision::Complete,
        Err(e) => {
            c.errors.fetch_add(1, Relaxed);
            layer.lower().log(LogLevel::Warn, &e);
            Decision::Fail
        }
    }
}
