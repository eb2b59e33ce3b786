//! Helpers for the plugins' tests through the shim (feature `testing`): a disk in memory,
//! a one-plugin stack over it, requests, and data that does or does not compress.

use compat::{
    BlockBackend, BlockRequestKind, BlockStack, InstanceSpec, IoRequest, Plugin, RequestStatus,
    Segment,
};
use interceptor_sdk::abi::InterceptorTable;
use serde_json::Value;
use std::sync::{Arc, Mutex};

pub const DISK: usize = 16 << 20;

pub struct MemDisk {
    pub data: Mutex<Vec<u8>>,
    /// Bytes written to it so far (for write amplification).
    pub written: std::sync::atomic::AtomicU64,
    capacity: u64,
}

impl MemDisk {
    /// A disk of DISK bytes.
    pub fn new() -> Arc<MemDisk> {
        MemDisk::with_size(DISK)
    }

    pub fn with_size(bytes: usize) -> Arc<MemDisk> {
        Arc::new(MemDisk {
            data: Mutex::new(vec![0; bytes]),
            written: Default::default(),
            capacity: bytes as u64,
        })
    }
}

impl BlockBackend for MemDisk {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    unsafe fn execute(&self, req: &IoRequest<'_>) -> RequestStatus {
        let mut data = self.data.lock().unwrap();
        let mut at = req.offset as usize;
        match req.kind {
            BlockRequestKind::Read => {
                for s in req.segments {
                    // SAFETY: the caller's segments are valid for their lengths.
                    unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), s.base, s.len) };
                    at += s.len;
                }
            }
            BlockRequestKind::Write => {
                for s in req.segments {
                    // SAFETY: as above.
                    let src = unsafe { std::slice::from_raw_parts(s.base, s.len) };
                    data[at..at + s.len].copy_from_slice(src);
                    at += s.len;
                }
                self.written
                    .fetch_add(req.len, std::sync::atomic::Ordering::Relaxed);
            }
            BlockRequestKind::Flush => {}
            _ => return RequestStatus::Unsupported,
        }
        RequestStatus::Ok
    }
}

pub fn submit(
    s: &BlockStack,
    kind: BlockRequestKind,
    offset: u64,
    buf: &mut [u8],
) -> RequestStatus {
    let seg = [Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    let segs: &[Segment] = if buf.is_empty() { &[] } else { &seg };
    // SAFETY: the segment is a live buffer.
    unsafe { s.submit(kind, offset, segs) }
}

pub fn write(s: &BlockStack, offset: u64, data: &[u8]) {
    let mut buf = data.to_vec();
    assert_eq!(
        submit(s, BlockRequestKind::Write, offset, &mut buf),
        RequestStatus::Ok
    );
}

pub fn read(s: &BlockStack, offset: u64, len: usize) -> Result<Vec<u8>, RequestStatus> {
    let mut buf = vec![0xeeu8; len];
    match submit(s, BlockRequestKind::Read, offset, &mut buf) {
        RequestStatus::Ok => Ok(buf),
        e => Err(e),
    }
}

pub fn flush(s: &BlockStack) {
    assert_eq!(s.flush(), RequestStatus::Ok);
}

/// Text-like bytes: compress well.
pub fn text(len: usize, seed: u64) -> Vec<u8> {
    let words = ["block ", "extent ", "guest ", "store ", "journal ", "zstd "];
    let mut out = Vec::with_capacity(len);
    let mut x = seed | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(words[(x % 6) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

/// Bytes that do not compress.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

/// A stack of one instance `id` of the plugin `table` over `disk`.
pub fn stack(
    disk: &Arc<MemDisk>,
    name: &str,
    table: &'static InterceptorTable,
    id: &str,
    config: Value,
) -> Result<Arc<BlockStack>, String> {
    let spec = InstanceSpec {
        id: id.into(),
        plugin: Plugin::from_static(name, table).map_err(|e| e.to_string())?,
        config_json: config.to_string(),
        enabled: true,
    };
    BlockStack::build("d", disk.clone(), &[spec]).map_err(|e| e.to_string())
}

/// The stats of instance `id`.
pub fn stats(s: &BlockStack, id: &str) -> Value {
    s.instance(id)
        .and_then(|i| i.plugin_stats().ok())
        .unwrap_or(Value::Null)
}

/// A discard or write-zeroes of `len` bytes (no segments), as the device submits it.
pub fn discard(s: &Arc<BlockStack>, kind: BlockRequestKind, offset: u64, len: u64) {
    // SAFETY: no segments.
    let st = match unsafe { s.begin(kind, offset, len, Vec::new()) } {
        compat::Started::Done(st) => st,
        compat::Started::Backend(f) => f.finish(RequestStatus::Ok),
        compat::Started::Parked(_) => panic!("no store leaves a request pending"),
    };
    assert_eq!(st, RequestStatus::Ok);
}
