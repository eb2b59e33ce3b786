//! A seeded random workload reads back what a plain byte array holds, through flushes,
//! disables, reopens and requests left in flight.

use super::*;

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
                        Started::Parked(_) => panic!("no plugin here leaves a request pending"),
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
                        Started::Parked(_) => panic!("no plugin here leaves a request pending"),
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
