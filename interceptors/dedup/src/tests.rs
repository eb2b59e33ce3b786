//! The dedup plugin through the shim over a disk in memory: copies stored once, duplicates
//! inside one request, blocks that swap contents in one request, space given back when the
//! last copy goes, the index rebuilt at open and bounded in memory, disabled writes, and a
//! seeded random workload with few distinct contents checked against a byte array.

use super::*;
use compat::{BlockRequestKind, BlockStack};
use extent_store::testing::{self, discard, flush, n, noise, read, write, MemDisk};
use interceptor_sdk::static_table;
use serde_json::{json, Value};

fn stack(disk: &Arc<MemDisk>, config: Value) -> Result<Arc<BlockStack>, String> {
    testing::stack(disk, "dedup", static_table!(Dedup), "dd", config)
}

fn stats(s: &BlockStack) -> Value {
    testing::stats(s, "dd")
}

#[test]
fn a_second_copy_is_stored_as_references_and_both_read_back() {
    let disk = MemDisk::new();
    let s = stack(&disk, json!({})).unwrap();
    let data = noise(1 << 20, 1);
    write(&s, 0, &data);
    flush(&s);
    let after_one = n(&stats(&s), "physical_bytes");
    write(&s, 5 << 20, &data);
    flush(&s);
    let v = stats(&s);
    assert_eq!(n(&v, "dedup_hits"), 256, "{v}");
    assert_eq!(n(&v, "physical_bytes"), after_one, "{v}");
    assert_eq!(n(&v, "logical_bytes"), 2 << 20, "{v}");
    assert_eq!(n(&v, "unique_extents"), 256, "{v}");
    assert_eq!(read(&s, 0, 1 << 20).unwrap(), data);
    assert_eq!(read(&s, 5 << 20, 1 << 20).unwrap(), data);
    // 16 equal blocks in one request: one stored.
    let same: Vec<u8> = noise(4096, 2).repeat(16);
    write(&s, 8 << 20, &same);
    let v = stats(&s);
    assert_eq!(n(&v, "blocks_stored"), 257, "{v}");
    assert_eq!(read(&s, 8 << 20, same.len()).unwrap(), same);
}

#[test]
fn blocks_that_swap_contents_in_one_request_keep_both() {
    let disk = MemDisk::new();
    let s = stack(&disk, json!({})).unwrap();
    let (p, q) = (noise(4096, 3), noise(4096, 4));
    write(&s, 0, &[p.clone(), q.clone()].concat());
    flush(&s);
    // Block 0 takes q (block 1's extent), block 1 takes p (block 0's): each extent loses
    // one reference and gains one.
    write(&s, 0, &[q.clone(), p.clone()].concat());
    flush(&s);
    assert_eq!(read(&s, 0, 8192).unwrap(), [q, p].concat());
    let v = stats(&s);
    assert_eq!(n(&v, "dedup_hits"), 2, "{v}");
    assert_eq!(n(&v, "errors"), 0, "{v}");
}

#[test]
fn the_last_copy_going_frees_its_space_and_its_address() {
    let disk = MemDisk::new();
    let s = stack(&disk, json!({})).unwrap();
    let data = noise(256 << 10, 5);
    write(&s, 0, &data);
    write(&s, 1 << 20, &data);
    flush(&s);
    let used = n(&stats(&s), "physical_bytes");
    // One copy discarded: nothing comes back; the other still reads.
    discard(&s, BlockRequestKind::Discard, 0, 256 << 10);
    flush(&s);
    assert_eq!(n(&stats(&s), "physical_bytes"), used);
    assert_eq!(read(&s, 1 << 20, 256 << 10).unwrap(), data);
    // The other overwritten: the space comes back after the flush.
    write(&s, 1 << 20, &noise(256 << 10, 6));
    flush(&s);
    let v = stats(&s);
    assert!(n(&v, "reclaimed_bytes") >= 256 << 10, "{v}");
    // The old contents again: no extent holds them now, so they are stored anew (a hit on
    // freed space would read back whatever reuses it).
    let hits = n(&v, "dedup_hits");
    write(&s, 2 << 20, &data);
    flush(&s);
    assert_eq!(n(&stats(&s), "dedup_hits"), hits);
    assert_eq!(read(&s, 2 << 20, 256 << 10).unwrap(), data);
}

#[test]
fn the_index_is_rebuilt_at_open_and_bounded_in_memory() {
    let disk = MemDisk::new();
    let data = noise(512 << 10, 7);
    {
        let s = stack(&disk, json!({})).unwrap();
        write(&s, 0, &data);
        flush(&s);
    }
    let s = stack(&disk, json!({})).unwrap();
    assert_eq!(n(&stats(&s), "index_rebuilt"), 128);
    write(&s, 4 << 20, &data);
    assert_eq!(n(&stats(&s), "dedup_hits"), 128);
    drop(s);
    // Not rebuilt: fewer matches, the same data.
    let s = stack(&disk, json!({ "rebuild_index": false })).unwrap();
    write(&s, 8 << 20, &data);
    assert_eq!(n(&stats(&s), "dedup_hits"), 0);
    assert_eq!(read(&s, 8 << 20, data.len()).unwrap(), data);
    drop(s);
    // An index of 1 MiB holds 4681 blocks: 20 MiB of distinct blocks overflow it.
    let disk = MemDisk::with_size(32 << 20);
    let s = stack(&disk, json!({ "index_mib": 1 })).unwrap();
    let big = noise(20 << 20, 8);
    write(&s, 0, &big);
    let v = stats(&s);
    assert_eq!(
        n(&v, "index_capacity"),
        (1 << 20) / INDEX_BYTES_PER_BLOCK,
        "{v}"
    );
    assert!(n(&v, "index_entries") <= n(&v, "index_capacity"), "{v}");
    assert!(n(&v, "index_evictions") > 0, "{v}");
    assert_eq!(read(&s, 0, big.len()).unwrap(), big);
    let e = stack(&MemDisk::new(), json!({ "index_mib": 0 }))
        .err()
        .unwrap();
    assert!(e.contains("index_mib = 0"), "{e}");
}

#[test]
fn disabled_it_stores_every_block_and_still_reads_the_shared_ones() {
    let disk = MemDisk::new();
    let s = stack(&disk, json!({})).unwrap();
    let data = noise(64 << 10, 9);
    write(&s, 0, &data);
    write(&s, 1 << 20, &data);
    s.instance("dd").unwrap().set_enabled(false);
    write(&s, 2 << 20, &data);
    flush(&s);
    let v = stats(&s);
    assert_eq!(n(&v, "dedup_hits"), 16, "{v}");
    assert_eq!(n(&v, "blocks_stored"), 32, "{v}");
    for at in [0, 1 << 20, 2 << 20] {
        assert_eq!(read(&s, at, data.len()).unwrap(), data);
    }
}

#[test]
fn a_random_workload_with_few_contents_reads_back_what_a_byte_array_holds() {
    let disk = MemDisk::new();
    let size = 2usize << 20;
    let mut model = vec![0u8; size];
    let contents: Vec<Vec<u8>> = (0..12).map(|i| noise(4096, 100 + i)).collect();
    let mut x = 0x0ddc_0ffe_e15b_a5e5u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let cfg = json!({ "logical_mib": 2, "index_mib": 1 });
    let mut s = stack(&disk, cfg.clone()).unwrap();
    for step in 0..800u64 {
        let blocks = size / 4096;
        let first = (next() % (blocks as u64 - 8)) as usize;
        let count = 1 + (next() % 8) as usize;
        match next() % 8 {
            0..=3 => {
                let data: Vec<u8> = (0..count)
                    .flat_map(|_| contents[(next() % 12) as usize].clone())
                    .collect();
                // Sometimes only part of the first block.
                let skip = if step % 5 == 0 {
                    512 * (next() % 8) as usize
                } else {
                    0
                };
                write(&s, (first * 4096 + skip) as u64, &data[skip..]);
                model[first * 4096 + skip..(first + count) * 4096].copy_from_slice(&data[skip..]);
            }
            4 => {
                discard(
                    &s,
                    BlockRequestKind::Discard,
                    (first * 4096) as u64,
                    (count * 4096) as u64,
                );
                model[first * 4096..(first + count) * 4096].fill(0);
            }
            5 => flush(&s),
            6 if step % 100 == 6 => {
                flush(&s);
                drop(s);
                s = stack(&disk, cfg.clone()).unwrap();
                // Refcounts, space and index agree with the map after every reopen.
                let c = s.layers()[0].check().unwrap().unwrap();
                assert!(c.problems.is_empty(), "step {step}: {:?}", c.problems);
            }
            6 if step % 50 == 6 => {
                // And while it runs, uncommitted changes and all.
                let c = s.layers()[0].check().unwrap().unwrap();
                assert!(c.problems.is_empty(), "step {step}: {:?}", c.problems);
            }
            _ => {
                let (a, b) = (first * 4096, (first + count) * 4096);
                assert_eq!(
                    read(&s, a as u64, b - a).unwrap(),
                    model[a..b],
                    "step {step}"
                );
            }
        }
    }
    flush(&s);
    assert_eq!(read(&s, 0, size).unwrap(), model);
    let v = stats(&s);
    assert_eq!(n(&v, "errors"), 0, "{v}");
    assert_eq!(n(&v, "check_failures"), 0, "{v}");
    assert!(n(&v, "dedup_hits") > 150, "{v}");
}

/// Counts the bytes this thread allocated and did not free, for the index's memory figure
/// (per thread, so tests running beside it do not count).
struct Counting;

thread_local! {
    static LIVE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn live() -> u64 {
    LIVE.with(|l| l.get())
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        let _ = LIVE.try_with(|c| c.set(c.get().wrapping_add(l.size() as u64)));
        // SAFETY: the caller's layout, passed on.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        let _ = LIVE.try_with(|c| c.set(c.get().wrapping_sub(l.size() as u64)));
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The index takes at most INDEX_BYTES_PER_BLOCK per block it can hold, full, at sizes on
/// either side of its tables' power-of-two steps.
#[test]
fn the_index_takes_at_most_its_documented_memory_per_block() {
    for capacity in [1000usize, 6553, 57_344, 60_000, 100_000] {
        {
            let before = live();
            let mut index = Index::new(capacity);
            for i in 0..capacity as u64 {
                let mut a = [0u8; 32];
                a[..8].copy_from_slice(&i.to_le_bytes());
                let e = Entry::Stored {
                    sector: 100 + i * 8,
                    stored_len: 4096,
                    index: 0,
                    codec: Codec::Raw,
                    check: 0,
                };
                index.insert(a, e);
            }
            let per = live().wrapping_sub(before) / capacity as u64;
            drop(index);
            assert!(
                per <= INDEX_BYTES_PER_BLOCK,
                "{per} bytes per block at capacity {capacity}"
            );
            eprintln!("index: {per} bytes per block at capacity {capacity}");
        }
    }
}

/// Writes a distinct block at each block from 0 until the store is full; returns how many
/// were stored.
fn fill_with_distinct_blocks(s: &BlockStack, seed: u64) -> u64 {
    let mut block = 0u64;
    loop {
        let mut data = noise(4096, seed + block);
        match testing::submit(s, BlockRequestKind::Write, block * 4096, &mut data) {
            compat::RequestStatus::Ok => block += 1,
            _ => return block,
        }
    }
}

fn assert_clean(s: &BlockStack, when: &str) {
    let c = s.layers()[0].check().unwrap().unwrap();
    assert!(c.problems.is_empty(), "{when}: {:?}", c.problems);
}

/// Issue 29, item 1: one request with a dedup hit and two new blocks on a disk fragmented
/// every other unit. The hit frees the block's old extent; the new blocks need two units in
/// a row, so the store commits in the middle of the request and one of them lands where the
/// old extent was. The index then named that sector under the old contents' address, so a
/// later write of the old contents was taken as a duplicate of other data: acknowledged,
/// flushed, and read back as an I/O error.
#[test]
fn a_commit_inside_a_request_never_leaves_the_index_naming_reused_space() {
    // As large as the disk: more than the store can hold (the default keeps a reserve).
    let cfg = json!({ "logical_mib": 2 });
    let disk = MemDisk::with_size(2 << 20);
    let s = stack(&disk, cfg.clone()).unwrap();
    let stored = fill_with_distinct_blocks(&s, 500);
    assert!(stored > 400, "{stored}");
    flush(&s);
    // Every other block a hole: free space is one unit here, one there.
    for b in (1..stored).step_by(2) {
        discard(&s, BlockRequestKind::Discard, b * 4096, 4096);
    }
    flush(&s);
    let old = noise(4096, 500); // block 0's contents
    let request = [noise(4096, 504), noise(4096, 1), noise(4096, 2)].concat();
    write(&s, 0, &request);
    assert_clean(&s, "after the request");
    // The old contents again, in a hole: stored anew or shared, it must read back.
    write(&s, 11 * 4096, &old);
    flush(&s);
    assert_eq!(read(&s, 11 * 4096, 4096).unwrap(), old);
    assert_eq!(read(&s, 0, request.len()).unwrap(), request);
    assert_clean(&s, "at the end");
    drop(s);
    let s = stack(&disk, cfg).unwrap();
    assert_eq!(read(&s, 11 * 4096, 4096).unwrap(), old);
    assert_clean(&s, "after a reopen");
}

/// Issue 29, item 1: on a full disk a request whose hits were applied and whose new block
/// then found no space failed, but left its hits in the map and the freed extent's address
/// in the index (the early return skipped the clean-up); the next write reused that space
/// and the stale address made a later duplicate read as an error. A failed request must
/// leave the map and the index as if it never ran.
#[test]
fn a_request_that_finds_no_space_leaves_map_and_index_as_they_were() {
    let disk = MemDisk::with_size(2 << 20);
    let s = stack(&disk, json!({ "logical_mib": 2 })).unwrap();
    let stored = fill_with_distinct_blocks(&s, 900);
    assert!(stored < 500, "{stored}: the store was not full");
    flush(&s);
    let before = read(&s, 0, (stored * 4096) as usize).unwrap();
    // Block 0 takes block 4's contents (a hit that frees block 0's extent); blocks 1 to 15
    // take new contents: one unit comes free, fifteen are needed, more than the 8 units
    // kept for overwrites (the only ones left: new blocks may not take them).
    let mut request: Vec<u8> = std::iter::once(noise(4096, 904))
        .chain((1..16).map(|k| noise(4096, k)))
        .flatten()
        .collect();
    let st = testing::submit(&s, BlockRequestKind::Write, 0, &mut request);
    assert_ne!(st, compat::RequestStatus::Ok);
    assert!(
        read(&s, 0, before.len()).unwrap() == before,
        "the map changed"
    );
    assert_clean(&s, "after the failed request");
    // One new block fits now that nothing was freed: no, the disk is full; a duplicate
    // of block 0's old contents still fits anywhere (a reference).
    let old = noise(4096, 900);
    write(&s, stored * 4096, &old);
    flush(&s);
    assert_eq!(read(&s, stored * 4096, 4096).unwrap(), old);
    // Space freed by a discard, then new data, then the old contents once more.
    discard(&s, BlockRequestKind::Discard, 8 * 4096, 4096);
    flush(&s);
    write(&s, 9 * 4096, &noise(4096, 3));
    write(&s, (stored + 1) * 4096, &noise(4096, 908));
    flush(&s);
    assert_eq!(
        read(&s, (stored + 1) * 4096, 4096).unwrap(),
        noise(4096, 908)
    );
    assert_eq!(read(&s, 9 * 4096, 4096).unwrap(), noise(4096, 3));
    assert_clean(&s, "at the end");
}

/// Issue 29, item 7: sizes out of range are refused before anything is written, naming the
/// field (a journal of 4 TiB was clamped silently, one of 0 accepted, an index larger than
/// the host's memory accepted).
#[test]
fn sizes_out_of_range_are_refused_by_name_and_the_disk_is_not_touched() {
    for (cfg, want) in [
        (
            json!({ "journal_kib": 4294967296u64 }),
            "journal_kib = 4294967296: 4 to",
        ),
        (json!({ "journal_kib": 0 }), "journal_kib = 0: 4 to"),
        (
            json!({ "logical_mib": 1000 }),
            "logical_mib = 1000: 1 to 256",
        ),
        (json!({ "index_mib": 0 }), "index_mib = 0"),
        (
            json!({ "index_mib": 5 }),
            "index_mib = 5: more than the host's available memory (4 MiB)",
        ),
        (
            json!({ "index_mib": "x" }),
            "config: index_mib: invalid type",
        ),
    ] {
        let disk = MemDisk::new();
        let e = match cfg["index_mib"].as_u64() {
            // The memory check against a host with 4 MiB available.
            Some(5) => index_capacity(5, Some(4)).unwrap_err(),
            _ => stack(&disk, cfg.clone()).err().unwrap(),
        };
        assert!(e.contains(want), "{cfg}: {e}");
        assert!(disk.data.lock().unwrap().iter().all(|&b| b == 0), "{cfg}");
    }
}

/// Issue 29, item 4: by default the guest sees what the store can always hold: every block
/// written with distinct data, then every block overwritten, all succeed (the metadata once
/// came out of the guest's space: on a 1 MiB disk the 247th block of 256 failed).
#[test]
fn the_default_size_holds_every_block_and_takes_overwrites_when_full() {
    for size in [1usize << 20, 2 << 20, 16 << 20] {
        let disk = MemDisk::with_size(size);
        let s = stack(&disk, json!({})).unwrap();
        let blocks = n(&stats(&s), "capacity_bytes") / 4096;
        for round in 0..2u64 {
            for b in 0..blocks {
                write(&s, b * 4096, &noise(4096, round * 100_000 + b));
            }
            flush(&s);
        }
        for b in (0..blocks).step_by(7) {
            assert_eq!(read(&s, b * 4096, 4096).unwrap(), noise(4096, 100_000 + b));
        }
        assert_eq!(n(&stats(&s), "no_space_errors"), 0);
    }
}

/// Issue 29, item 3: thin provisioning through the real loading path (the shim refused any
/// capacity over the bytes below). A guest size 8 times the disk: writes past what fits fail
/// (counted), everything written before reads back, and after discards and a flush, writes
/// succeed again.
#[test]
fn a_thin_disk_fails_writes_past_its_space_keeps_the_rest_and_takes_writes_after_a_discard() {
    let disk = MemDisk::with_size(2 << 20);
    let s = stack(&disk, json!({ "logical_mib": 16 })).unwrap();
    assert_eq!(s.capacity(), 16 << 20);
    let mut written = Vec::new();
    let mut failed = 0;
    for b in 0..1024u64 {
        let mut data = noise(4096, 7000 + b);
        match testing::submit(&s, BlockRequestKind::Write, b * 4096 * 4, &mut data) {
            compat::RequestStatus::Ok => written.push(b),
            _ => failed += 1,
        }
    }
    flush(&s);
    assert!(
        written.len() > 400 && failed > 400,
        "{} written, {failed} failed",
        written.len()
    );
    assert_eq!(n(&stats(&s), "no_space_errors"), failed);
    for &b in &written {
        assert_eq!(
            read(&s, b * 4096 * 4, 4096).unwrap(),
            noise(4096, 7000 + b),
            "block {b}"
        );
    }
    // Blocks never written read as zeroes (holes), never as an error.
    assert_eq!(read(&s, (15 << 20) + 4096, 4096).unwrap(), vec![0u8; 4096]);
    // The guest frees half (fstrim): the space comes back after the flush.
    for &b in written.iter().step_by(2) {
        discard(&s, BlockRequestKind::Discard, b * 4096 * 4, 4096);
    }
    flush(&s);
    for b in 0..100u64 {
        write(&s, (b * 4 + 1) * 4096, &noise(4096, 9000 + b));
    }
    flush(&s);
    for &b in written.iter().skip(1).step_by(2) {
        assert_eq!(
            read(&s, b * 4096 * 4, 4096).unwrap(),
            noise(4096, 7000 + b),
            "block {b}"
        );
    }
    drop(s);
    let s = stack(&disk, json!({ "logical_mib": 16 })).unwrap();
    assert_eq!(read(&s, 5 * 4096, 4096).unwrap(), noise(4096, 9001));
    assert_clean(&s, "after a reopen");
}

/// What the guest test of a thin disk does, on the host: the whole disk discarded (mkfs),
/// small metadata writes overwritten again and again at the start, files of 1 MiB written in
/// 128 KiB requests with a flush after each, until the disk is full; then every block reads
/// back what was last written to it.
#[test]
fn a_thin_disk_filled_like_a_file_system_reads_back_everything_written_before_it_filled() {
    let disk = MemDisk::with_size(48 << 20);
    let s = stack(&disk, json!({ "logical_mib": 192, "index_mib": 16 })).unwrap();
    discard(&s, BlockRequestKind::Discard, 0, 192 << 20);
    flush(&s);
    let mut model: std::collections::HashMap<u64, Vec<u8>> = Default::default();
    let mut seed = 1u64;
    let mut full = false;
    for file in 0..200u64 {
        // Metadata: a few blocks near the start, rewritten.
        for m in 0..4u64 {
            seed += 1;
            let data = noise(4096, seed);
            let at = (m * 37 + file % 5) * 4096;
            if testing::submit(&s, BlockRequestKind::Write, at, &mut data.clone())
                == compat::RequestStatus::Ok
            {
                model.insert(at / 4096, data);
            }
        }
        for piece in 0..8u64 {
            seed += 1;
            let data = noise(128 << 10, seed);
            let at = (8 << 20) + file * (1 << 20) + piece * (128 << 10);
            if testing::submit(&s, BlockRequestKind::Write, at, &mut data.clone())
                != compat::RequestStatus::Ok
            {
                full = true;
                break;
            }
            for (k, b) in data.chunks(4096).enumerate() {
                model.insert(at / 4096 + k as u64, b.to_vec());
            }
        }
        flush(&s);
        if full {
            break;
        }
    }
    assert!(full, "the disk never filled");
    for (&b, want) in &model {
        assert!(read(&s, b * 4096, 4096).unwrap() == *want, "block {b}");
    }
    assert_clean(&s, "full");
}
