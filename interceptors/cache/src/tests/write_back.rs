//! Write-back goes down in runs of adjacent blocks (capped, split at gaps), on flush, on
//! eviction and on discard, and a failed write-back keeps its run dirty.

use super::*;

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
        Started::Parked(_) => panic!("no plugin here leaves a request pending"),
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
