//! The cache's size is bounded before anything is allocated, and the refusal names the
//! field: through the pure check, and through the shim as the vmm and the API create it.
//! Write-back goes down in runs of adjacent blocks, partial writes to cached blocks update
//! them, and a seeded random workload reads back what a plain byte array holds: through a
//! disk in memory that logs every write reaching it.

use super::*;
use compat::{
    BlockBackend, BlockRequestKind, BlockStack, InFlight, InstanceSpec, IoRequest, Plugin,
    RequestStatus, Segment, Started,
};
use interceptor_sdk::static_table;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

#[test]
fn sizes_are_bounded_by_the_hard_maximum_and_the_hosts_memory() {
    assert_eq!(size_blocks(1, Some(64)).unwrap().get(), 256);
    assert_eq!(size_blocks(64, None).unwrap().get(), 64 * 256);
    assert_eq!(
        size_blocks(0, Some(1024)).unwrap_err(),
        "size_mib = 0: must be at least 1"
    );
    let e = size_blocks(MAX_SIZE_MIB + 1, None).unwrap_err();
    assert!(
        e.starts_with("size_mib = 1048577: more than the largest cache allowed"),
        "{e}"
    );
    let e = size_blocks(u64::MAX, Some(1 << 40)).unwrap_err();
    assert!(e.contains("host's available memory"), "{e}");
    let e = size_blocks(u64::MAX, None).unwrap_err();
    assert!(e.contains("largest cache allowed"), "{e}");
    // With its index a cache takes a little more than its data: 1024 MiB of data does not
    // fit in 1024 MiB.
    let e = size_blocks(1024, Some(1024)).unwrap_err();
    assert!(
        e.starts_with("size_mib = 1024: more than the host's available memory (1024 MiB"),
        "{e}"
    );
    assert!(size_blocks(1024, Some(1100)).is_ok());
    assert!(size_blocks(MAX_SIZE_MIB, None).is_ok());
}

struct Zeros;

impl BlockBackend for Zeros {
    fn capacity(&self) -> u64 {
        1 << 20
    }

    unsafe fn execute(&self, _: &IoRequest<'_>) -> RequestStatus {
        RequestStatus::Ok
    }
}

fn create(config: serde_json::Value) -> Result<Arc<BlockStack>, String> {
    let spec = InstanceSpec {
        id: "cache".into(),
        plugin: Plugin::from_static("cache", static_table!(Cache)).map_err(|e| e.to_string())?,
        config_json: config.to_string(),
        enabled: true,
    };
    BlockStack::build("d", Arc::new(Zeros), &[spec]).map_err(|e| e.to_string())
}

/// A huge size used to abort the whole process with an allocation failure (the map for
/// every block was taken up front); it is refused naming the field, and so is one just
/// over the host's available memory.
#[test]
fn a_size_over_the_hosts_memory_is_refused_not_allocated() {
    let e = create(serde_json::json!({ "size_mib": 99_999_999_u64 })).unwrap_err();
    assert!(e.contains("size_mib = 99999999: more than"), "{e}");
    let available = host_available_mib().expect("MemAvailable in /proc/meminfo");
    if available < MAX_SIZE_MIB {
        let over = available + 1;
        let e = create(serde_json::json!({ "size_mib": over })).unwrap_err();
        assert!(
            e.contains(&format!(
                "size_mib = {over}: more than the host's available memory"
            )),
            "{e}"
        );
    }
    let e = create(serde_json::json!({ "size_mib": 0 })).unwrap_err();
    assert!(e.contains("size_mib = 0: must be at least 1"), "{e}");
    create(serde_json::json!({ "size_mib": 1 })).unwrap();
}

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

/// Issue 15: a guest `sync` wrote back 23,842 dirty blocks one 4 KiB request each.
#[test]
fn flushing_64_adjacent_dirty_blocks_takes_one_lower_write() {
    let disk = MemDisk::new(4 << 20);
    let stack = write_back_cache(&disk, 4);
    for b in 100..164 {
        write(&stack, b * B, &pattern(b, 1));
    }
    assert!(disk.take_writes().is_empty(), "absorbed, nothing went down");
    assert_eq!(stat(&stack, "dirty_bytes"), 64 * B);
    assert_eq!(flush(&stack), RequestStatus::Ok);
    assert_eq!(disk.take_writes(), [(100 * B, 64 * B)]);
    assert_eq!(disk.flushes.load(SeqCst), 1);
    for b in 100..164 {
        assert_same(
            &disk.bytes(b * B, B as usize),
            &pattern(b, 1),
            &format!("block {b} on disk"),
        );
    }
    let s = stats(&stack);
    assert_eq!(s["write_backs"], 64);
    assert_eq!(s["write_back_requests"], 1);
    assert_eq!(s["dirty_bytes"], 0);
    assert_eq!(s["bytes_cached"], 64 * B, "written back, still cached");
}

#[test]
fn write_back_runs_are_capped_at_1_mib_and_split_at_gaps() {
    let disk = MemDisk::new(8 << 20);
    let stack = write_back_cache(&disk, 8);
    // 600 adjacent blocks in one request, then two runs with a clean block between them,
    // and a lone block; written in no particular order.
    write(&stack, 1000 * B, &vec![7; 600 * B as usize]);
    for b in [1700, 1702, 1703, 1701, 1705, 1706, 1900] {
        write(&stack, b * B, &pattern(b, 2));
    }
    assert_eq!(flush(&stack), RequestStatus::Ok);
    let cap = MAX_RUN_BLOCKS as u64 * B;
    assert_eq!(
        disk.take_writes(),
        [
            (1000 * B, cap),
            (1256 * B, cap),
            (1512 * B, 88 * B),
            (1700 * B, 4 * B),
            (1705 * B, 2 * B),
            (1900 * B, B),
        ],
        "in disk order, at most 1 MiB each"
    );
    assert_eq!(stat(&stack, "write_backs"), 607);
    assert_eq!(stat(&stack, "write_back_requests"), 6);
    assert_same(
        &disk.bytes(1000 * B, 600 * B as usize),
        &vec![7; 600 * B as usize],
        "disk.bytes(1000 * B, 600 * B as usize)",
    );
    assert_eq!(flush(&stack), RequestStatus::Ok);
    assert!(disk.take_writes().is_empty(), "nothing is dirty any more");
}

/// Evicting the least recently used block, dirty, writes back the dirty run around it in one
/// request; the rest of the run stays cached, clean, in its place in the LRU order.
#[test]
fn evicting_a_dirty_block_writes_back_its_run_and_keeps_the_lru_order() {
    let disk = MemDisk::new(4 << 20);
    let stack = write_back_cache(&disk, 1); // 256 blocks
    let blocks = MAX_RUN_BLOCKS as u64;
    for b in 0..blocks {
        write(&stack, b * B, &pattern(b, 3));
    }
    assert!(disk.take_writes().is_empty());
    // Full: the next block evicts block 0, and its run (all 256) goes down at once.
    write(&stack, 600 * B, &pattern(600, 3));
    assert_eq!(disk.take_writes(), [(0, blocks * B)]);
    assert_eq!(stat(&stack, "evictions"), 1);
    assert_eq!(stat(&stack, "bytes_cached"), blocks * B);
    assert_eq!(stat(&stack, "dirty_bytes"), B, "only block 600 is dirty");
    // The next evictions take blocks 1, 2, ... in their order, now clean: nothing goes down.
    for b in 601..611 {
        write(&stack, b * B, &pattern(b, 3));
    }
    assert!(disk.take_writes().is_empty());
    assert_eq!(stat(&stack, "evictions"), 11);
    // Blocks 0..=10 are gone (a miss), 11 and 255 still cached (hits).
    let misses = stat(&stack, "misses");
    assert_same(
        &read(&stack, 11 * B, B as usize),
        &pattern(11, 3),
        "read(&stack, 11 * B, B as usize)",
    );
    assert_same(
        &read(&stack, 255 * B, B as usize),
        &pattern(255, 3),
        "read(&stack, 255 * B, B as usize)",
    );
    assert_eq!(stat(&stack, "misses"), misses);
    assert_same(
        &read(&stack, 10 * B, B as usize),
        &pattern(10, 3),
        "read(&stack, 10 * B, B as usize)",
    );
    assert_eq!(stat(&stack, "misses"), misses + 1);
    assert_eq!(stat(&stack, "write_backs"), blocks);
    assert_eq!(stat(&stack, "write_back_requests"), 1);
}

/// The run written back with an evicted block reaches below it too (blocks written later,
/// so more recently used), and stops at a clean block.
#[test]
fn an_evicted_blocks_run_reaches_down_and_stops_at_clean_blocks() {
    let disk = MemDisk::new(4 << 20);
    let stack = write_back_cache(&disk, 1);
    // Block 20 first (least recently used), then 10..20 and 21..30 (dirty), 30 clean
    // (read), then filler up to the size.
    write(&stack, 20 * B, &pattern(20, 4));
    for b in (10..20).chain(21..30) {
        write(&stack, b * B, &pattern(b, 4));
    }
    read(&stack, 30 * B, B as usize);
    let mut filler = 100;
    while stat(&stack, "bytes_cached") < 256 * B {
        read(&stack, filler * B, B as usize);
        filler += 1;
    }
    read(&stack, filler * B, B as usize); // evicts block 20
    assert_eq!(disk.take_writes(), [(10 * B, 20 * B)]);
    for b in 10..30 {
        assert_same(
            &disk.bytes(b * B, B as usize),
            &pattern(b, 4),
            &format!("block {b}"),
        );
    }
    assert_eq!(stat(&stack, "dirty_bytes"), 0);
}

#[test]
fn write_back_data_is_exact_after_flush_eviction_and_reopen() {
    let disk = MemDisk::new(4 << 20);
    let mut model = vec![0u8; 4 << 20];
    let put = |model: &mut Vec<u8>, stack: &BlockStack, b: u64, v: u8| {
        let data = pattern(b, v);
        write(stack, b * B, &data);
        model[(b * B) as usize..((b + 1) * B) as usize].copy_from_slice(&data);
    };
    let stack = write_back_cache(&disk, 1);
    for b in 0..100 {
        put(&mut model, &stack, b, 5);
    }
    assert_eq!(flush(&stack), RequestStatus::Ok);
    assert_same(&disk.all(), &model, "after a flush");
    // Rewrite some, then push everything out by filling the cache with other blocks.
    for b in (0..100).step_by(3) {
        put(&mut model, &stack, b, 6);
    }
    for b in 300..600 {
        put(&mut model, &stack, b, 6);
    }
    assert_same(
        &disk.bytes(0, 100 * B as usize),
        &model[..100 * B as usize],
        "after eviction",
    );
    for b in (0..600).step_by(7) {
        let at = (b * B) as usize;
        assert_same(
            &read(&stack, b * B, B as usize),
            &model[at..at + B as usize],
            &format!("block {b}"),
        );
    }
    // Destroyed: the rest is written back and flushed; reopened, it reads the same.
    let flushes = disk.flushes.load(SeqCst);
    drop(stack);
    assert_eq!(disk.flushes.load(SeqCst), flushes + 1);
    assert_same(&disk.all(), &model, "after destroy");
    let stack = write_back_cache(&disk, 1);
    assert_same(
        &read(&stack, 0, 1 << 20),
        &model[..1 << 20],
        "read(&stack, 0, 1 << 20)",
    );
    assert_same(
        &read(&stack, 2 << 20, 2 << 20),
        &model[2 << 20..],
        "read(&stack, 2 << 20, 2 << 20)",
    );
}

/// A write-back that fails leaves its run dirty and cached: the flush fails, and once the
/// disk is back the next flush writes the same run.
#[test]
fn a_failed_write_back_keeps_its_run_dirty() {
    let disk = MemDisk::new(4 << 20);
    let stack = write_back_cache(&disk, 4);
    for b in 8..16 {
        write(&stack, b * B, &pattern(b, 7));
    }
    disk.fail_writes.store(true, SeqCst);
    assert_eq!(flush(&stack), RequestStatus::IoError);
    assert_eq!(stat(&stack, "dirty_bytes"), 8 * B);
    assert_same(
        &read(&stack, 8 * B, 8 * B as usize),
        &disk_pattern(8..16, 7),
        "read(&stack, 8 * B, 8 * B as usize)",
    );
    disk.fail_writes.store(false, SeqCst);
    assert_eq!(flush(&stack), RequestStatus::Ok);
    assert_eq!(disk.take_writes(), [(8 * B, 8 * B)]);
    assert_same(
        &disk.bytes(8 * B, 8 * B as usize),
        &disk_pattern(8..16, 7),
        "disk.bytes(8 * B, 8 * B as usize)",
    );
    assert_eq!(stat(&stack, "dirty_bytes"), 0);
}

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

/// Issue 15: over a filesystem of 1 KiB blocks the write-back cache absorbed 46 of about 365
/// writes, since every write smaller than its 4 KiB block went down. Now a write that covers
/// cached blocks in part updates them and completes here, and a flush writes them back.
#[test]
fn partial_writes_to_cached_blocks_are_absorbed_in_write_back() {
    let disk = MemDisk::new(4 << 20);
    let stack = write_back_cache(&disk, 4);
    let mut model = Model(disk.all());
    // Four blocks cached by a read (clean), one more by a whole write (dirty).
    read(&stack, 10 * B, 4 * B as usize);
    model.write(&stack, 14 * B, &pattern(14, 8));
    let writes = [
        (10 * B + 512, 1024),      // inside one block
        (10 * B + 3072, 1024),     // the same block's last KiB
        (11 * B + 3072, 2048),     // across the end of one block into the next
        (12 * B + 2048, 6144),     // the tail of one block, then a whole one
        (14 * B + 1024, 1024),     // a dirty block
        (10 * B + 1024, 4 * 1024), // 1 KiB blocks of a filesystem, four in a row
    ];
    for (i, &(offset, len)) in writes.iter().enumerate() {
        model.write(&stack, offset, &bytes(i as u8, len));
    }
    for (k, &(offset, len)) in writes.iter().take(5).enumerate() {
        model.write(&stack, offset, &bytes(40 + k as u8, len / 2));
    }
    assert!(disk.take_writes().is_empty(), "all absorbed");
    let s = stats(&stack);
    assert_eq!(s["absorbed_writes"], 12);
    assert_eq!(s["partial_writes_absorbed"], 11);
    assert_eq!(s["dirty_bytes"], 5 * B);
    // Through the cache (hits), then from the disk after a flush: the same bytes.
    let hits = stat(&stack, "hits");
    assert_same(
        &read(&stack, 10 * B, 5 * B as usize),
        model.at(10 * B, 5 * B as usize),
        "read(&stack, 10 * B, 5 * B as usize)",
    );
    assert_same(
        &read(&stack, 11 * B + 512, 1024),
        model.at(11 * B + 512, 1024),
        "read(&stack, 11 * B + 512, 1024)",
    );
    assert_eq!(stat(&stack, "hits"), hits + 2);
    assert_eq!(flush(&stack), RequestStatus::Ok);
    assert_eq!(disk.take_writes(), [(10 * B, 5 * B)], "one run");
    assert_same(&disk.all(), &model.0, "the disk");
}

/// A write larger than the whole cache, over blocks whose first and last it covers in part
/// and the cache holds: absorbed, though caching its whole blocks evicts those two (they go
/// down with its data).
#[test]
fn a_write_larger_than_the_cache_with_cached_partial_ends_is_absorbed() {
    let disk = MemDisk::new(4 << 20);
    let stack = write_back_cache(&disk, 1); // 256 blocks
    let mut model = Model(disk.all());
    read(&stack, 0, B as usize);
    read(&stack, 300 * B, B as usize);
    // The tail of block 0, blocks 1..300 whole (299 of them), the head of block 300.
    model.write(&stack, 512, &bytes(5, 300 * B as usize));
    assert_eq!(stat(&stack, "partial_writes_absorbed"), 1);
    assert_same(
        &read(&stack, 0, 301 * B as usize),
        model.at(0, 301 * B as usize),
        "read(&stack, 0, 301 * B as usize)",
    );
    assert_eq!(flush(&stack), RequestStatus::Ok);
    assert_same(&disk.all(), &model.0, "the disk");
}

/// A read that misses, over a full cache whose least recently used block is dirty and in
/// the read: caching the read's first block used to evict that dirty block (written back),
/// and the read then returned, and cached as clean, what the disk held when it went down.
/// It returns the dirty block's data.
#[test]
fn a_read_that_evicts_a_dirty_block_it_covers_returns_its_data() {
    let disk = MemDisk::new(4 << 20);
    let stack = write_back_cache(&disk, 1); // 256 blocks
    write(&stack, B, &pattern(1, 6)); // dirty, least recently used
    read(&stack, 100 * B, 255 * B as usize); // full
    assert_eq!(stat(&stack, "bytes_cached"), 256 * B);
    let mut want = vec![0; B as usize];
    want.extend(pattern(1, 6));
    assert_same(&read(&stack, 0, 2 * B as usize), &want, "blocks 0 and 1");
    assert_same(
        &read(&stack, B, B as usize),
        &pattern(1, 6),
        "block 1 again",
    );
    assert_eq!(flush(&stack), RequestStatus::Ok);
    assert_same(
        &disk.bytes(B, B as usize),
        &pattern(1, 6),
        "block 1 on disk",
    );
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
        Started::Done(st) => panic!("{kind:?} at {offset} was answered above the disk: {st:?}"),
    }
}

/// The queue runs requests on other blocks while one is in flight (between its pre and post
/// hooks). A write that goes down over a dirty block: the synchronous engine has written it
/// when another request evicts the block before it, whose dirty run reached that block.
/// That write-back must not put the block's older data over the write in flight.
#[test]
fn a_write_in_flight_over_a_dirty_block_survives_a_write_back_meanwhile() {
    let disk = MemDisk::new(4 << 20);
    let stack = write_back_cache(&disk, 1); // 256 blocks
    let mut model = Model(disk.all());
    model.write(&stack, 9 * B, &pattern(9, 1)); // dirty, least recently used
    model.write(&stack, 10 * B, &pattern(10, 1)); // dirty
    read(&stack, 100 * B, 254 * B as usize); // full
                                             // The tail of 10 and the head of 11 (not cached): it goes down.
    let mut w = bytes(7, B as usize);
    let inflight = begin(&stack, BlockRequestKind::Write, 10 * B + 2048, &mut w);
    // SAFETY: the request's buffer is alive.
    let status = unsafe { disk.execute(&inflight.io()) };
    read(&stack, 500 * B, B as usize); // evicts 9
    assert_eq!(inflight.finish(status), RequestStatus::Ok);
    model.0[(10 * B + 2048) as usize..(11 * B + 2048) as usize].copy_from_slice(&w);
    assert_same(
        &read(&stack, 9 * B, 3 * B as usize),
        model.at(9 * B, 3 * B as usize),
        "read back",
    );
    assert_eq!(flush(&stack), RequestStatus::Ok);
    assert_same(&disk.all(), &model.0, "the disk");
}

/// A read that misses, over a dirty block and one not cached: while it is in flight another
/// request evicts that dirty block (written back, dropped). The read must return the dirty
/// block's data, not what the disk held when it read.
#[test]
fn a_read_in_flight_over_a_dirty_block_evicted_meanwhile_returns_its_data() {
    let disk = MemDisk::new(4 << 20);
    let stack = write_back_cache(&disk, 1);
    write(&stack, 10 * B, &pattern(10, 2)); // dirty, least recently used
    read(&stack, 100 * B, 255 * B as usize); // full
    let mut r = vec![0u8; 2 * B as usize];
    let inflight = begin(&stack, BlockRequestKind::Read, 10 * B, &mut r);
    // SAFETY: as above.
    let status = unsafe { disk.execute(&inflight.io()) };
    read(&stack, 500 * B, B as usize); // evicts 10
    assert_eq!(inflight.finish(status), RequestStatus::Ok);
    let mut want = pattern(10, 2);
    want.extend(vec![0; B as usize]);
    assert_same(&r, &want, "the read in flight");
    assert_same(
        &read(&stack, 10 * B, B as usize),
        &pattern(10, 2),
        "block 10 again",
    );
}

/// Write-through: a partial write still goes down, and the cached blocks it touches take its
/// data instead of being dropped, so the next read is still a hit.
#[test]
fn partial_writes_to_cached_blocks_update_the_cache_in_write_through() {
    let disk = MemDisk::new(4 << 20);
    let stack = cache_over(&disk, json!({ "size_mib": 4 }));
    let mut model = Model(disk.all());
    read(&stack, 20 * B, 2 * B as usize);
    model.write(&stack, 20 * B + 3584, &bytes(1, 1024));
    model.write(&stack, 21 * B + 512, &bytes(2, 512));
    assert_eq!(
        disk.take_writes(),
        [(20 * B + 3584, 1024), (21 * B + 512, 512)]
    );
    let s = stats(&stack);
    assert_eq!(s["partial_updates"], 3);
    assert_eq!(s["absorbed_writes"], 0);
    assert_eq!(s["bytes_cached"], 2 * B);
    let hits = stat(&stack, "hits");
    assert_same(
        &read(&stack, 20 * B, 2 * B as usize),
        model.at(20 * B, 2 * B as usize),
        "read(&stack, 20 * B, 2 * B as usize)",
    );
    assert_eq!(stat(&stack, "hits"), hits + 1);
    assert_same(&disk.all(), &model.0, "the disk");
}

/// A write that covers in part a block the cache does not hold goes down as it is, even in
/// write-back; the dirty blocks it touches are written back first (one run), and the cached
/// blocks it touches take its data. A read that misses over a dirty block writes it back
/// first too. (While either is in flight, the blocks it touches are clean: see
/// `a_write_in_flight_over_a_dirty_block_survives_a_write_back_meanwhile`.)
#[test]
fn a_partial_write_to_a_block_not_cached_goes_down() {
    let disk = MemDisk::new(4 << 20);
    let stack = write_back_cache(&disk, 4);
    let mut model = Model(disk.all());
    model.write(&stack, 30 * B + 1024, &bytes(1, 1024));
    assert_eq!(disk.take_writes(), [(30 * B + 1024, 1024)]);
    assert_eq!(
        stat(&stack, "bytes_cached"),
        0,
        "writes that go down do not fill"
    );
    // 40 and 41 dirty; a write over the tail of 40, all of 41 and the head of 42 (not
    // cached) goes down, after 40 and 41 are written back.
    model.write(&stack, 40 * B, &pattern(40, 9));
    model.write(&stack, 41 * B, &pattern(41, 9));
    model.write(&stack, 40 * B + 2048, &bytes(2, 2048 + 4096 + 512));
    assert_eq!(disk.take_writes(), [(40 * B, 2 * B), (40 * B + 2048, 6656)]);
    assert_eq!(stat(&stack, "dirty_bytes"), 0);
    assert_eq!(stat(&stack, "partial_updates"), 1, "40");
    assert_same(
        &read(&stack, 40 * B, 3 * B as usize),
        model.at(40 * B, 3 * B as usize),
        "40..43",
    );
    // A read over 60 (dirty) and 61 (not cached) misses: 60 goes down first.
    model.write(&stack, 60 * B, &pattern(60, 9));
    assert_same(
        &read(&stack, 60 * B, 2 * B as usize),
        model.at(60 * B, 2 * B as usize),
        "60..62",
    );
    assert_eq!(disk.take_writes(), [(60 * B, B)]);
    assert_eq!(flush(&stack), RequestStatus::Ok);
    assert!(disk.take_writes().is_empty());
    assert_same(&disk.all(), &model.0, "the disk");
}

/// A write that goes down and fails leaves what it covered undefined below: the cached
/// blocks it touched (clean: the dirty one was written back before it went down) are
/// dropped, and what the guest wrote before it is on the disk. A write-back that fails
/// before a write goes down fails the write and keeps its block dirty.
#[test]
fn a_failed_write_drops_the_blocks_it_touched_and_keeps_earlier_data() {
    let disk = MemDisk::new(4 << 20);
    let stack = write_back_cache(&disk, 4);
    write(&stack, 50 * B, &pattern(50, 1)); // dirty
    read(&stack, 51 * B, B as usize); // clean
                                      // Over the tail of 50, all of 51, the head of 52 (not cached): it goes down, and fails.
    *disk.fail_at.lock().unwrap() = Some(50 * B + 2048);
    let mut data = bytes(3, 2 * B as usize);
    let st = submit(&stack, BlockRequestKind::Write, 50 * B + 2048, &mut data);
    assert_eq!(st, RequestStatus::IoError);
    assert_eq!(disk.take_writes(), [(50 * B, B)], "50 written back first");
    assert_eq!(stat(&stack, "bytes_cached"), 0, "50 and 51 dropped");
    assert_same(
        &disk.bytes(50 * B, B as usize),
        &pattern(50, 1),
        "50 on disk",
    );
    // 60 dirty; a write over part of it and past what is cached: 60's write-back fails.
    *disk.fail_at.lock().unwrap() = Some(60 * B);
    write(&stack, 60 * B, &pattern(60, 1));
    let st = submit(&stack, BlockRequestKind::Write, 60 * B + 512, &mut data);
    assert_eq!(st, RequestStatus::IoError);
    assert!(disk.take_writes().is_empty());
    assert_eq!(stat(&stack, "dirty_bytes"), B, "60 still dirty");
    assert_same(
        &read(&stack, 60 * B, B as usize),
        &pattern(60, 1),
        "60 cached",
    );
    *disk.fail_at.lock().unwrap() = None;
    assert_eq!(flush(&stack), RequestStatus::Ok);
    assert_eq!(disk.take_writes(), [(60 * B, B)]);
    assert_same(
        &disk.bytes(60 * B, B as usize),
        &pattern(60, 1),
        "60 on disk",
    );
}

/// `len` bytes, each 512-byte sector stamped with `seed` and its index (fast to make in an
/// unoptimized build: the random workload writes megabytes).
fn stamped(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![seed as u8; len];
    for (i, sector) in data.chunks_mut(512).enumerate() {
        let stamp = (seed ^ (i as u64).rotate_left(40)).to_le_bytes();
        let n = stamp.len().min(sector.len());
        sector[..n].copy_from_slice(&stamp[..n]);
    }
    data
}

/// xorshift64*: a seeded generator, so that a failing seed replays the same run.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n` for a test.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A block to touch: mostly in a hot range a little larger than the cache (so partial
    /// writes find their blocks cached and evictions happen), sometimes anywhere.
    fn block(&mut self, hot: u64, all: u64) -> u64 {
        if self.below(10) < 8 {
            self.below(hot)
        } else {
            self.below(all)
        }
    }
}

/// What a seeded run of the random workload did, summed for the checks that it exercised
/// each path.
#[derive(Default)]
struct Exercised {
    partial_writes_absorbed: u64,
    partial_updates: u64,
    write_backs: u64,
    write_back_requests: u64,
    evictions: u64,
    /// Requests completed with another one in flight.
    overlapped: u64,
}

/// One step of the random workload.
enum Op {
    Write(u64, Vec<u8>),
    Read(u64, u64),
    Flush,
    Disable,
    Reopen,
}

impl Op {
    /// The 4 KiB blocks it touches, and whether it writes: the device queue holds a request
    /// back while one in flight touches the same blocks, unless both read; a flush or a
    /// removal waits for everything.
    fn conflicts(&self, kind: BlockRequestKind, at: u64, len: u64) -> bool {
        let blocks = |at: u64, len: u64| (at / B, (at + len.max(1) - 1) / B + 1);
        let (a, b) = blocks(at, len);
        let (c, d, write) = match self {
            Op::Write(o, data) => {
                let (c, d) = blocks(*o, data.len() as u64);
                (c, d, true)
            }
            Op::Read(o, l) => {
                let (c, d) = blocks(*o, *l);
                (c, d, false)
            }
            Op::Flush | Op::Reopen => return true,
            Op::Disable => return false,
        };
        (write || kind == BlockRequestKind::Write) && a < d && c < b
    }
}

/// A request started with [`begin`] and not finished: its buffer, and whether the disk has
/// run it yet (the synchronous engine runs it at submission, io_uring any time before the
/// completion).
struct Pending {
    req: InFlight,
    kind: BlockRequestKind,
    at: u64,
    buf: Vec<u8>,
    ran: Option<RequestStatus>,
}

/// Aligned and partial writes, reads of any sector range, flushes, disables and re-enables,
/// and reopens (destroy, then a new instance over the same disk), against a plain byte
/// array: every read returns what the array holds, after every flush and destroy the disk
/// holds exactly the array, and the stats stay consistent. Now and then a request stays in
/// flight (between its pre and post hooks, as on a device queue) while the next ones that
/// the queue would let through run.
fn random_workload(seed: u64, write_back: bool, ops: usize) -> Exercised {
    const SECTOR: u64 = 512;
    let all_blocks: u64 = 768; // 3 MiB
    let hot = 300; // the cache holds 256
    let disk = MemDisk::new((all_blocks * B) as usize);
    let mut model = Model(disk.all());
    let config = json!({ "size_mib": 1, "write_back": write_back });
    let mut stack = cache_over(&disk, config.clone());
    let mut rng = XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut seen = Exercised::default();
    let mut enable_after = None;
    let mut pending: Option<Pending> = None;
    let add_stats = |stack: &BlockStack, seen: &mut Exercised| {
        let s = stats(stack);
        let n = |k: &str| s[k].as_u64().unwrap();
        seen.partial_writes_absorbed += n("partial_writes_absorbed");
        seen.partial_updates += n("partial_updates");
        seen.write_backs += n("write_backs");
        seen.write_back_requests += n("write_back_requests");
        seen.evictions += n("evictions");
    };
    let ctx =
        |op: usize, what: &str| format!("seed {seed}, write_back {write_back}, op {op}: {what}");
    // Completes the request in flight; a read returns what the array holds (no write to its
    // blocks ran meanwhile).
    let finish = |p: Pending, disk: &MemDisk, model: &Model, op: usize| {
        // SAFETY: the request's buffer is alive (it is in `p`).
        let ran = p
            .ran
            .unwrap_or_else(|| unsafe { disk.execute(&p.req.io()) });
        let st = p.req.finish(ran);
        assert_eq!(st, RequestStatus::Ok, "{}", ctx(op, "a request in flight"));
        if p.kind == BlockRequestKind::Read {
            let want = model.at(p.at, p.buf.len());
            assert!(
                p.buf == want,
                "{}",
                ctx(op, &format!("read {}+{} in flight", p.at, p.buf.len()))
            );
        }
    };
    for op in 0..ops {
        let step = match rng.below(100) {
            // Whole blocks: mostly a few, now and then more than the cache holds.
            0..=29 => {
                // Large ones mostly while a request is in flight: their evictions and
                // write-backs then run around it.
                let n = if rng.below(if pending.is_some() { 4 } else { 50 }) == 0 {
                    200 + rng.below(200)
                } else {
                    1 + rng.below(16)
                };
                let first = rng.block(hot, all_blocks).min(all_blocks - n);
                Op::Write(first * B, stamped(rng.next(), (n * B) as usize))
            }
            // Partial: any sectors, 1 to 24 of them, inside a block or across blocks.
            30..=59 => {
                let sectors = 1 + rng.below(24);
                let at = rng.block(hot, all_blocks) * B + rng.below(8) * SECTOR;
                let at = at.min(all_blocks * B - sectors * SECTOR);
                Op::Write(at, stamped(rng.next(), (sectors * SECTOR) as usize))
            }
            60..=84 => {
                let (at, len) = if rng.below(if pending.is_some() { 4 } else { 40 }) == 0 {
                    // More than the cache holds: caching its blocks evicts others of it.
                    let n = 200 + rng.below(200);
                    (rng.block(hot, all_blocks).min(all_blocks - n) * B, n * B)
                } else if rng.below(2) == 0 {
                    let n = 1 + rng.below(8);
                    (rng.block(hot, all_blocks).min(all_blocks - n) * B, n * B)
                } else {
                    let sectors = 1 + rng.below(40);
                    let at = rng.block(hot, all_blocks) * B + rng.below(8) * SECTOR;
                    (at.min(all_blocks * B - sectors * SECTOR), sectors * SECTOR)
                };
                Op::Read(at, len)
            }
            85..=96 => Op::Flush,
            97..=98 => Op::Disable,
            _ => Op::Reopen,
        };
        if let Some(p) = pending.take() {
            if step.conflicts(p.kind, p.at, p.buf.len() as u64) {
                finish(p, &disk, &model, op);
            } else {
                seen.overlapped += 1;
                pending = Some(p);
            }
        }
        match step {
            Op::Write(at, data) => {
                if pending.is_none() && rng.below(4) == 0 {
                    let mut buf = data.clone();
                    model.0[at as usize..at as usize + data.len()].copy_from_slice(&data);
                    let seg = vec![Segment {
                        base: buf.as_mut_ptr(),
                        len: buf.len(),
                    }];
                    // SAFETY: `buf` lives in `pending` until the request is finished.
                    let len = buf.len() as u64;
                    match unsafe { stack.begin(BlockRequestKind::Write, at, len, seg) } {
                        Started::Done(st) => {
                            assert_eq!(st, RequestStatus::Ok, "{}", ctx(op, "write"))
                        }
                        Started::Backend(req) => {
                            // SAFETY: as above.
                            let ran =
                                (rng.below(2) == 0).then(|| unsafe { disk.execute(&req.io()) });
                            pending = Some(Pending {
                                req,
                                kind: BlockRequestKind::Write,
                                at,
                                buf,
                                ran,
                            });
                        }
                    }
                } else {
                    model.write(&stack, at, &data);
                }
            }
            Op::Read(at, len) => {
                if pending.is_none() && rng.below(4) == 0 {
                    let mut buf = vec![0xee; len as usize];
                    let seg = vec![Segment {
                        base: buf.as_mut_ptr(),
                        len: buf.len(),
                    }];
                    // SAFETY: as for writes.
                    let len = buf.len() as u64;
                    match unsafe { stack.begin(BlockRequestKind::Read, at, len, seg) } {
                        Started::Done(st) => {
                            assert_eq!(st, RequestStatus::Ok, "{}", ctx(op, "read"));
                            assert!(buf == model.at(at, len as usize), "{}", ctx(op, "read hit"));
                        }
                        Started::Backend(req) => {
                            // SAFETY: as above.
                            let ran =
                                (rng.below(2) == 0).then(|| unsafe { disk.execute(&req.io()) });
                            pending = Some(Pending {
                                req,
                                kind: BlockRequestKind::Read,
                                at,
                                buf,
                                ran,
                            });
                        }
                    }
                } else {
                    let got = read(&stack, at, len as usize);
                    assert!(
                        got == model.at(at, len as usize),
                        "{}",
                        ctx(op, &format!("read {at}+{len}"))
                    );
                }
            }
            Op::Flush => {
                assert_eq!(flush(&stack), RequestStatus::Ok, "{}", ctx(op, "flush"));
                assert!(
                    disk.all() == model.0,
                    "{}",
                    ctx(op, "the disk after a flush")
                );
            }
            // Disabled for a few requests (it writes back and drops everything), then on again.
            Op::Disable => {
                stack.instance("cache").unwrap().set_enabled(false);
                enable_after = Some(op as u64 + 1 + rng.below(20));
            }
            Op::Reopen => {
                add_stats(&stack, &mut seen);
                drop(stack);
                assert!(
                    disk.all() == model.0,
                    "{}",
                    ctx(op, "the disk after destroy")
                );
                stack = cache_over(&disk, config.clone());
                enable_after = None;
            }
        }
        if enable_after == Some(op as u64) {
            stack.instance("cache").unwrap().set_enabled(true);
            enable_after = None;
        }
        if op % 64 == 0 {
            let s = stats(&stack);
            let n = |k: &str| s[k].as_u64().unwrap();
            assert!(
                n("dirty_bytes") <= n("bytes_cached"),
                "{}",
                ctx(op, "dirty <= cached")
            );
            assert!(
                n("bytes_cached") <= n("capacity_bytes"),
                "{}",
                ctx(op, "cached <= capacity")
            );
            assert!(
                write_back || n("dirty_bytes") == 0,
                "{}",
                ctx(op, "write-through is clean")
            );
            assert_eq!(n("errors"), 0, "{}", ctx(op, "no errors"));
        }
    }
    if let Some(p) = pending.take() {
        finish(p, &disk, &model, ops);
    }
    assert_eq!(flush(&stack), RequestStatus::Ok);
    assert!(disk.all() == model.0, "{}", ctx(ops, "the disk at the end"));
    add_stats(&stack, &mut seen);
    seen
}

#[test]
fn random_workloads_read_back_what_a_byte_array_holds() {
    for seed in 1..=8 {
        let wb = random_workload(seed, true, 3000);
        assert!(
            wb.partial_writes_absorbed > 50,
            "seed {seed}: partial writes absorbed"
        );
        assert!(wb.evictions > 500, "seed {seed}: evictions");
        assert!(
            wb.write_back_requests * 2 < wb.write_backs,
            "seed {seed}: runs of more than two blocks on average ({} blocks in {} writes)",
            wb.write_backs,
            wb.write_back_requests
        );
        assert!(
            wb.overlapped > 50,
            "seed {seed}: requests in flight together"
        );
        let wt = random_workload(seed, false, 3000);
        assert!(wt.partial_updates > 20, "seed {seed}: partial updates");
        assert_eq!(wt.write_backs, 0);
    }
}

/// A discard (or write-zeroes) passes down after the dirty blocks it touches are written
/// back, and leaves none of them cached: a later read goes to the disk, which holds what
/// the layers below made of the discard.
#[test]
fn a_discard_writes_back_what_it_touches_and_forgets_it() {
    let disk = MemDisk::new(1 << 20);
    let stack = write_back_cache(&disk, 1);
    write(&stack, 0, &pattern(0, 1));
    write(&stack, 4096, &pattern(1, 1));
    assert_eq!(stat(&stack, "dirty_bytes"), 8192);
    assert!(
        disk.bytes(0, 8192).iter().all(|&b| b == 0),
        "held in the cache"
    );
    // SAFETY: a discard has no segments.
    let status = match unsafe { stack.begin(BlockRequestKind::Discard, 0, 4096, Vec::new()) } {
        Started::Done(st) => st,
        Started::Backend(io) => {
            // The disk "punches" the block, as a backend that handles discard would.
            disk.data.lock().unwrap()[..4096].fill(0);
            io.finish(RequestStatus::Ok)
        }
    };
    assert_eq!(status, RequestStatus::Ok);
    assert_eq!(
        stat(&stack, "dirty_bytes"),
        0,
        "both written back (one run)"
    );
    assert_eq!(stat(&stack, "bytes_cached"), 4096, "block 1 stays cached");
    assert_eq!(disk.bytes(0, 4096), vec![0u8; 4096]);
    // Block 0 is not answered from the cache any more.
    assert_eq!(read(&stack, 0, 4096), vec![0u8; 4096]);
    assert_eq!(read(&stack, 4096, 4096), pattern(1, 1));
}
