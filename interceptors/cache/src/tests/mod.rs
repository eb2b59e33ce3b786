//! The cache's tests, by concern (sizes, write-back, partial writes, a random workload),
//! over a disk in memory that logs every write reaching it; the helpers they share.

use super::*;
use compat::{
    BlockBackend, BlockRequestKind, BlockStack, InFlight, InstanceSpec, IoRequest, Plugin,
    RequestStatus, Segment, Started,
};
use interceptor_sdk::static_table;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

mod partial;
mod sizes;
mod workload;
mod write_back;

/// A disk in memory that logs the writes reaching it (offset, length) and counts flushes;
/// `fail_writes` makes every write fail, `fail_at` those starting at that offset.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    writes: Mutex<Vec<(u64, u64)>>,
    flushes: AtomicU64,
    fail_writes: AtomicBool,
    fail_at: Mutex<Option<u64>>,
    capacity: u64,
}

impl MemDisk {
    fn new(bytes: usize) -> Arc<MemDisk> {
        Arc::new(MemDisk {
            data: Mutex::new(vec![0; bytes]),
            writes: Mutex::new(Vec::new()),
            flushes: AtomicU64::new(0),
            fail_writes: AtomicBool::new(false),
            fail_at: Mutex::new(None),
            capacity: bytes as u64,
        })
    }

    /// The writes logged since the last call.
    fn take_writes(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.writes.lock().unwrap())
    }

    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let at = offset as usize;
        self.data.lock().unwrap()[at..at + len].to_vec()
    }

    fn all(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
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
                if self.fail_writes.load(SeqCst)
                    || *self.fail_at.lock().unwrap() == Some(req.offset)
                {
                    return RequestStatus::IoError;
                }
                self.writes.lock().unwrap().push((req.offset, req.len));
                for s in req.segments {
                    // SAFETY: as above.
                    let src = unsafe { std::slice::from_raw_parts(s.base, s.len) };
                    data[at..at + s.len].copy_from_slice(src);
                    at += s.len;
                }
            }
            BlockRequestKind::Flush => {
                self.flushes.fetch_add(1, SeqCst);
            }
            BlockRequestKind::GetId | BlockRequestKind::Discard | BlockRequestKind::WriteZeroes => {
                return RequestStatus::Unsupported
            }
        }
        RequestStatus::Ok
    }
}

fn cache_over(disk: &Arc<MemDisk>, config: Value) -> Arc<BlockStack> {
    let spec = InstanceSpec {
        id: "cache".into(),
        plugin: Plugin::from_static("cache", static_table!(Cache)).unwrap(),
        config_json: config.to_string(),
        enabled: true,
    };
    BlockStack::build("d", disk.clone(), &[spec]).unwrap()
}

fn write_back_cache(disk: &Arc<MemDisk>, size_mib: u64) -> Arc<BlockStack> {
    cache_over(disk, json!({ "size_mib": size_mib, "write_back": true }))
}

fn submit(
    stack: &BlockStack,
    kind: BlockRequestKind,
    offset: u64,
    buf: &mut [u8],
) -> RequestStatus {
    let seg = [Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    let segs: &[Segment] = if buf.is_empty() { &[] } else { &seg };
    // SAFETY: the segment is a live buffer; tests keep requests inside the disk.
    unsafe { stack.submit(kind, offset, segs) }
}

fn write(stack: &BlockStack, offset: u64, data: &[u8]) {
    let mut buf = data.to_vec();
    let st = submit(stack, BlockRequestKind::Write, offset, &mut buf);
    assert_eq!(st, RequestStatus::Ok, "write at {offset}+{}", data.len());
}

fn read(stack: &BlockStack, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xee; len];
    let st = submit(stack, BlockRequestKind::Read, offset, &mut buf);
    assert_eq!(st, RequestStatus::Ok, "read at {offset}+{len}");
    buf
}

fn flush(stack: &BlockStack) -> RequestStatus {
    stack.flush()
}

fn stats(stack: &BlockStack) -> Value {
    stack.instance("cache").unwrap().plugin_stats().unwrap()
}

fn stat(stack: &BlockStack, name: &str) -> u64 {
    stats(stack)[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// A block's worth of bytes that tell blocks and versions apart.
fn pattern(block: u64, version: u8) -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (i as u8) ^ (block as u8).rotate_left(3) ^ version.wrapping_mul(31))
        .collect()
}

const B: u64 = BLOCK;

/// Compares byte strings without printing megabytes: the first difference.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "{what}: {} bytes, {} wanted; first difference at {at:?} (block {:?})",
            got.len(),
            want.len(),
            at.map(|i| i as u64 / B)
        );
    }
}

fn disk_pattern(blocks: std::ops::Range<u64>, version: u8) -> Vec<u8> {
    blocks.flat_map(|b| pattern(b, version)).collect()
}

/// A byte-array copy of what the guest wrote, to compare reads and the disk with.
struct Model(Vec<u8>);

impl Model {
    fn write(&mut self, stack: &BlockStack, offset: u64, data: &[u8]) {
        write(stack, offset, data);
        self.0[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    fn at(&self, offset: u64, len: usize) -> &[u8] {
        &self.0[offset as usize..offset as usize + len]
    }
}

fn bytes(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed.rotate_left(i as u32 % 8))
        .collect()
}

/// Starts a request as a device queue does: its pre hooks run now; it must go down (the
/// returned request waits for the backend, run with [`InFlight::io`], then `finish`).
fn begin(stack: &Arc<BlockStack>, kind: BlockRequestKind, offset: u64, buf: &mut [u8]) -> InFlight {
    let seg = vec![Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    // SAFETY: the buffer outlives the request (the callers finish it before dropping it).
    let len = buf.len() as u64;
    match unsafe { stack.begin(kind, offset, len, seg) } {
        Started::Backend(r) => r,
        Started::Parked(_) => panic!("no plugin here leaves a request pending"),
        Started::Done(st) => panic!("{kind:?} at {offset} was answered above the disk: {st:?}"),
    }
}
