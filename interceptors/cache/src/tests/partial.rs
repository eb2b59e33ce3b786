//! Partial writes to cached blocks update them (absorbed in write-back), requests in flight
//! over dirty blocks see their data, and a failed write forgets only what it touched.

use super::*;

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
