//! Crash points through real plugin libraries: a seeded workload of writes (whole and
//! partial blocks), flushes, reads, enable/disable toggles and (for the store's layers,
//! which handle it) discards, then at least 1,000 crashes (2,000 for compress and dedup),
//! each reopened and checked block by block. Seeds are printed on failure.
//! Odd seeds run one request at a time; even ones keep up to 8 in flight, as a
//! device queue does: each starts (pre hooks), reaches the disk and finishes (post hooks)
//! in its own random order, a request waits for those in flight on the same 4 KiB blocks
//! (the device's ordering, `devices/src/virtio/block/order.rs`), a flush waits for all,
//! and the workload ends with requests still in flight. (Through encrypt and remap, which
//! complete each request in their pre hooks with their own I/O, none is ever at the disk
//! with another; through the write-back cache they are.)

use compat::{
    BlockBackend, BlockRequestKind, BlockStack, InFlight, InstanceSpec, PluginRegistry,
    RequestStatus, Segment, Started,
};
use crash_harness::{
    check, check_layers, crash_image, crash_image_torn, submit, Landed, Model, RecordingDisk, Rng,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vmm_lab::plugins::{plugin_dir, plugins};

const BLOCK: usize = 4096;
/// The unit a crash must never tear: the plugin's block (encrypt) or sector (remap).
const SECTOR: usize = 512;

struct Chain {
    layers: Vec<(&'static str, PathBuf, serde_json::Value)>,
    /// Instances the workload may disable and enable.
    toggles: Vec<&'static str>,
    /// What the writes hold.
    fill: Fill,
    /// The chain handles discard (reads of discarded blocks return zeroes): the workload
    /// discards too.
    discards: bool,
    /// The disk is thin and fills: a write may fail for lack of space, and must then leave
    /// every block as it was (the workload runs one request at a time).
    full: bool,
}

/// The contents of the workload's writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// Random bytes.
    Random,
    /// Bytes that compress (short runs of few values), some blocks all zero.
    Compressible,
    /// Each 4 KiB block one of 8 contents (so whole-block writes repeat), some all zero.
    FewContents,
    /// Each 4 KiB block one of 2,048 contents: mostly new, now and then a repeat (a dedup
    /// hit) on a disk that fills.
    ManyContents,
}

impl Chain {
    fn plain(
        layers: Vec<(&'static str, PathBuf, serde_json::Value)>,
        toggles: Vec<&'static str>,
    ) -> Chain {
        Chain {
            layers,
            toggles,
            fill: Fill::Random,
            discards: false,
            full: false,
        }
    }
}

fn build(
    reg: &PluginRegistry,
    chain: &Chain,
    disk: Arc<RecordingDisk>,
) -> Result<Arc<BlockStack>, String> {
    let specs = chain
        .layers
        .iter()
        .map(|(id, path, config)| {
            Ok(InstanceSpec {
                id: id.to_string(),
                plugin: reg.load(path, None).map_err(|e| e.to_string())?,
                config_json: config.to_string(),
                enabled: true,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    BlockStack::build("crash", disk, &specs).map_err(|e| e.to_string())
}

/// The guest's side of a run: `ops` seeded writes (whole and partial blocks), flushes,
/// reads checked against the model, and toggles, over the first `blocks` blocks.
struct Workload<'a> {
    chain: &'a Chain,
    unit: usize,
    blocks: usize,
    seed: u64,
    /// Requests in flight at most (1: one at a time, through `submit`).
    depth: usize,
    /// The most that were at once (a chain that completes every request in its pre hooks,
    /// as encrypt does with its own I/O, never has any).
    most_in_flight: std::cell::Cell<usize>,
    /// Writes that failed (a full disk).
    failed_writes: std::cell::Cell<usize>,
}

/// A request of the concurrent workload between its start and its finish.
struct Pending {
    io: InFlight,
    /// Its buffer (the segment points into it; a `Vec`'s heap block does not move).
    buf: Vec<u8>,
    kind: BlockRequestKind,
    offset: u64,
    /// Has the disk run it (the engine completed it; its post hooks are still due)?
    at_disk: Option<RequestStatus>,
    op: usize,
}

impl Pending {
    /// The 4 KiB blocks it touches.
    fn blocks(&self) -> std::ops::Range<u64> {
        block_range(self.offset, self.buf.len())
    }
}

fn block_range(offset: u64, len: usize) -> std::ops::Range<u64> {
    let first = offset / BLOCK as u64;
    let end = (offset + len.max(1) as u64).div_ceil(BLOCK as u64);
    first..end
}

/// A discard of `len` bytes at `offset`, run to its end (no segments).
fn discard(stack: &Arc<BlockStack>, offset: u64, len: u64) -> RequestStatus {
    // SAFETY: a discard has no segments.
    match unsafe { stack.begin(BlockRequestKind::Discard, offset, len, Vec::new()) } {
        Started::Done(st) => st,
        Started::Backend(io) => io.finish(RequestStatus::Ok),
        Started::Parked(_) => panic!("no layer of the harness leaves a request pending"),
    }
}

impl Workload<'_> {
    /// A write's range: a partial one (512-byte aligned, 1 to 8 sectors) one time in four,
    /// else 1 to 4 whole blocks, inside the workload's range.
    fn write_range(&self, rng: &mut Rng) -> (usize, usize) {
        let blocks = self.blocks;
        if rng.below(4) == 0 {
            let sectors = blocks * BLOCK / 512;
            let len = 1 + rng.below(8) as usize;
            let first = rng.below((sectors - len) as u64) as usize;
            (first * 512, len * 512)
        } else {
            let n = 1 + rng.below(4) as usize;
            let first = rng.below((blocks - n) as u64 + 1) as usize;
            (first * BLOCK, n * BLOCK)
        }
    }

    /// The bytes of a write of `len` at `offset`, as the chain's `fill` says.
    fn data(&self, rng: &mut Rng, offset: usize, len: usize) -> Vec<u8> {
        match self.chain.fill {
            Fill::Random => (0..len).map(|_| rng.next_u64() as u8).collect(),
            Fill::Compressible => {
                if rng.below(8) == 0 {
                    return vec![0u8; len];
                }
                let mut out = Vec::with_capacity(len);
                while out.len() < len {
                    let v = b"abcdefgh"[rng.below(8) as usize];
                    let run = 1 + rng.below(12) as usize;
                    out.extend(std::iter::repeat_n(v, run.min(len - out.len())));
                }
                out
            }
            Fill::FewContents | Fill::ManyContents => {
                let n = if self.chain.fill == Fill::FewContents {
                    8
                } else {
                    2048
                };
                // Byte o of content c: the same for every block that holds content c.
                let byte = |c: u64, o: usize| {
                    let x = (c + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                    (x >> ((o % 7) * 8)) as u8 ^ o as u8 ^ (o / 256) as u8
                };
                let mut out = Vec::with_capacity(len);
                let mut c = rng.below(n + 1);
                for o in offset..offset + len {
                    if o % BLOCK == 0 {
                        c = rng.below(n + 1);
                    }
                    // Content n is zeroes.
                    out.push(if c == n { 0 } else { byte(c, o % BLOCK) });
                }
                out
            }
        }
    }

    /// What the model says block `block` holds now.
    fn expected(&self, model: &Model, block: usize) -> Vec<u8> {
        let per = BLOCK / self.unit;
        (block * per..(block + 1) * per)
            .flat_map(|u| model.current(u).to_vec())
            .collect()
    }

    fn toggle(&self, stack: &BlockStack, rng: &mut Rng) {
        let toggles = &self.chain.toggles;
        if let Some(&id) = toggles.get(rng.below(toggles.len().max(1) as u64) as usize) {
            if let Some(i) = stack.instance(id) {
                i.set_enabled(!i.enabled());
            }
        }
    }

    fn drive(
        &self,
        stack: &Arc<BlockStack>,
        disk: &RecordingDisk,
        model: &mut Model,
        rng: &mut Rng,
        ops: usize,
    ) {
        if self.depth > 1 {
            return self.drive_concurrent(stack, disk, model, rng, ops);
        }
        let (seed, blocks) = (self.seed, self.blocks);
        for op in 0..ops {
            match rng.below(100) {
                52..=59 if self.chain.discards => {
                    let n = 1 + rng.below(4) as usize;
                    let first = rng.below((blocks - n) as u64 + 1) as usize;
                    model.before_write(
                        disk.position(),
                        (first * BLOCK) as u64,
                        &vec![0u8; n * BLOCK],
                    );
                    let st = discard(stack, (first * BLOCK) as u64, (n * BLOCK) as u64);
                    assert_eq!(st, RequestStatus::Ok, "seed {seed}: discard {op}");
                }
                0..=59 => {
                    let (offset, len) = self.write_range(rng);
                    let mut data = self.data(rng, offset, len);
                    model.before_write(disk.position(), offset as u64, &data);
                    let st = submit(stack, BlockRequestKind::Write, offset as u64, &mut data);
                    if st != RequestStatus::Ok && self.chain.full {
                        model.write_failed();
                        self.failed_writes.set(self.failed_writes.get() + 1);
                    } else {
                        assert_eq!(st, RequestStatus::Ok, "seed {seed}: write {op}");
                    }
                }
                60..=74 => {
                    let st = submit(stack, BlockRequestKind::Flush, 0, &mut []);
                    assert_eq!(st, RequestStatus::Ok, "seed {seed}: flush {op}");
                    model.after_flush(disk.position());
                }
                75..=89 => {
                    let block = rng.below(blocks as u64) as usize;
                    let mut buf = vec![0u8; BLOCK];
                    let st = submit(
                        stack,
                        BlockRequestKind::Read,
                        (block * BLOCK) as u64,
                        &mut buf,
                    );
                    assert_eq!(st, RequestStatus::Ok, "seed {seed}: read {op}");
                    let want = self.expected(model, block);
                    assert!(buf == want, "seed {seed}: read {op} of block {block}");
                }
                _ => self.toggle(stack, rng),
            }
            // On a full disk, every layer's own check while it runs too (dedup's index
            // names only contents it holds, whatever commits happened inside a request).
            if self.chain.full && op % 10 == 9 {
                if let Err(e) = check_layers(stack) {
                    panic!("seed {seed}: after op {op}: {e}");
                }
            }
        }
    }

    /// The workload with up to `depth` requests in flight. Ends with some still in flight
    /// (forgotten, as a crash leaves them).
    fn drive_concurrent(
        &self,
        stack: &Arc<BlockStack>,
        disk: &RecordingDisk,
        model: &mut Model,
        rng: &mut Rng,
        ops: usize,
    ) {
        let seed = self.seed;
        let mut flight: Vec<Pending> = Vec::new();
        for op in 0..ops {
            let roll = rng.below(100);
            if flight.len() >= self.depth || (80..95).contains(&roll) {
                if !flight.is_empty() {
                    let i = rng.below(flight.len() as u64) as usize;
                    self.advance(&mut flight, i, disk, model);
                }
                continue;
            }
            match roll {
                50..=54 if self.chain.discards => {
                    // Ordered like a write: after whatever in flight it overlaps.
                    let n = 1 + rng.below(4) as usize;
                    let first = rng.below((self.blocks - n) as u64 + 1) as usize;
                    let blocks = first as u64..(first + n) as u64;
                    while let Some(i) = flight.iter().position(|p| {
                        p.blocks().start < blocks.end && blocks.start < p.blocks().end
                    }) {
                        if flight[i].at_disk.is_none() {
                            self.advance(&mut flight, i, disk, model);
                        }
                        self.advance(&mut flight, i, disk, model);
                    }
                    model.before_write(
                        disk.position(),
                        (first * BLOCK) as u64,
                        &vec![0u8; n * BLOCK],
                    );
                    let st = discard(stack, (first * BLOCK) as u64, (n * BLOCK) as u64);
                    assert_eq!(st, RequestStatus::Ok, "seed {seed}: discard {op}");
                }
                0..=54 | 65..=79 => {
                    let write = roll <= 54;
                    let (offset, len) = if write {
                        self.write_range(rng)
                    } else {
                        let block = rng.below(self.blocks as u64) as usize;
                        (block * BLOCK, BLOCK)
                    };
                    let (offset, blocks) = (offset as u64, block_range(offset as u64, len));
                    // The device holds it back until whatever it overlaps is done.
                    while let Some(i) = flight.iter().position(|p| {
                        (write || p.kind == BlockRequestKind::Write)
                            && p.blocks().start < blocks.end
                            && blocks.start < p.blocks().end
                    }) {
                        if flight[i].at_disk.is_none() {
                            self.advance(&mut flight, i, disk, model);
                        }
                        self.advance(&mut flight, i, disk, model);
                    }
                    let mut buf: Vec<u8> = if write {
                        self.data(rng, offset as usize, len)
                    } else {
                        vec![0u8; len]
                    };
                    let kind = if write {
                        model.before_write(disk.position(), offset, &buf);
                        BlockRequestKind::Write
                    } else {
                        BlockRequestKind::Read
                    };
                    let seg = vec![Segment {
                        base: buf.as_mut_ptr(),
                        len: buf.len(),
                    }];
                    // SAFETY: `buf` lives in the request until it finishes (or is
                    // forgotten with it), and the range is inside the disk.
                    match unsafe { stack.begin(kind, offset, len as u64, seg) } {
                        Started::Done(st) => {
                            assert_eq!(st, RequestStatus::Ok, "seed {seed}: op {op} ({kind:?})");
                            if !write {
                                let want = self.expected(model, offset as usize / BLOCK);
                                assert!(buf == want, "seed {seed}: read {op} at {offset}");
                            }
                        }
                        Started::Parked(_) => {
                            panic!("seed {seed}: no layer of the harness leaves a request pending")
                        }
                        Started::Backend(io) => {
                            flight.push(Pending {
                                io,
                                buf,
                                kind,
                                offset,
                                at_disk: None,
                                op,
                            });
                            let most = self.most_in_flight.get().max(flight.len());
                            self.most_in_flight.set(most);
                        }
                    }
                }
                55..=64 => {
                    // A flush waits for everything in flight, in whatever order it ends.
                    while !flight.is_empty() {
                        let i = rng.below(flight.len() as u64) as usize;
                        self.advance(&mut flight, i, disk, model);
                    }
                    let st = submit(stack, BlockRequestKind::Flush, 0, &mut []);
                    assert_eq!(st, RequestStatus::Ok, "seed {seed}: flush {op}");
                    model.after_flush(disk.position());
                }
                _ => self.toggle(stack, rng),
            }
        }
        // A crash comes with requests in flight: none of their post hooks runs.
        std::mem::forget(flight);
    }

    /// Moves request `i` one step: to the disk, or (already there) through its post hooks,
    /// after which a read is checked against the model.
    fn advance(&self, flight: &mut Vec<Pending>, i: usize, disk: &RecordingDisk, model: &Model) {
        let seed = self.seed;
        let p = &mut flight[i];
        if p.at_disk.is_none() {
            // SAFETY: the request's buffers are its `buf`, alive while it is.
            p.at_disk = Some(unsafe { disk.execute(&p.io.io()) });
            return;
        }
        let p = flight.swap_remove(i);
        let (op, kind, offset) = (p.op, p.kind, p.offset);
        let st = p.io.finish(p.at_disk.unwrap_or(RequestStatus::IoError));
        assert_eq!(st, RequestStatus::Ok, "seed {seed}: op {op} ({kind:?})");
        if kind == BlockRequestKind::Read {
            let want = self.expected(model, offset as usize / BLOCK);
            assert!(p.buf == want, "seed {seed}: read {op} at {offset}");
        }
    }
}

/// A crash somewhere in `disk`'s log over `base`: the crash image and what it may hold.
/// One crash in three also tears writes: each unflushed write that lands does so whole or,
/// half the time, only in some of its 512-byte sectors (any of them, as a disk that writes
/// a request's sectors in any order and loses power midway).
fn crash(
    base: &[u8],
    disk: &RecordingDisk,
    model: &Model,
    rng: &mut Rng,
) -> (Vec<u8>, crash_harness::Expectation, String) {
    let log = disk.log();
    let at = rng.below(log.len() as u64 + 1) as usize;
    let survive = rng.below(101);
    let torn = rng.below(3) == 0;
    let image = crash_image_torn(base, &log, at, |sectors| {
        if rng.below(100) >= survive {
            return None;
        }
        if torn && sectors > 1 && rng.below(2) == 0 {
            return Some(Landed::Sectors(
                (0..sectors).map(|_| rng.below(2) == 0).collect(),
            ));
        }
        Some(Landed::Whole)
    });
    let what = format!(
        "at log position {at} of {}, {survive}% of unflushed writes kept{}",
        log.len(),
        if torn { ", some torn" } else { "" }
    );
    (image, model.expectation_at(at), what)
}

/// What a run found: its violations, and the most requests that were in flight at once.
struct Outcome {
    violations: Vec<String>,
    most_in_flight: usize,
    failed_writes: usize,
}

/// Runs the workload with `seed`, then `points` crashes; every third crashed image is
/// reopened, worked on and crashed again (recovery itself must be crash-safe).
fn run(
    chain: &Chain,
    unit: usize,
    disk_bytes: usize,
    max_blocks: usize,
    seed: u64,
    ops: usize,
    points: usize,
) -> Outcome {
    // Odd seeds one request at a time, even ones up to 8 in flight (a full disk: one).
    let depth = if seed.is_multiple_of(2) && !chain.full {
        8
    } else {
        1
    };
    let reg = PluginRegistry::new();
    let disk = RecordingDisk::new(vec![0u8; disk_bytes]);
    let stack = build(&reg, chain, disk.clone()).expect("the first open");
    let blocks = (stack.capacity() as usize / BLOCK).min(max_blocks);
    assert!(blocks >= 16, "disk too small for the workload");
    let work = Workload {
        chain,
        unit,
        blocks,
        seed,
        depth,
        most_in_flight: Default::default(),
        failed_writes: Default::default(),
    };
    let mut model = Model::new(blocks * BLOCK / unit, unit);
    let mut rng = Rng(seed);
    work.drive(&stack, &disk, &mut model, &mut rng, ops);
    // No orderly shutdown: the crash images come from the log only.
    std::mem::forget(stack);
    let mut violations = Vec::new();
    let base = vec![0u8; disk_bytes];
    for point in 0..points {
        let (image, expect, what) = crash(&base, &disk, &model, &mut rng);
        let reopened = RecordingDisk::new(image.clone());
        let result = build(&reg, chain, reopened.clone())
            .and_then(|s| check(&s, &expect).map(|seen| (s, seen)));
        let (stack, seen) = match result {
            Ok(v) => v,
            Err(e) => {
                violations.push(format!("seed {seed}, crash point {point}: {what}: {e}"));
                continue;
            }
        };
        if point % 3 != 0 {
            std::mem::forget(stack);
            continue;
        }
        // What the guest read after the crash is now its disk: go on from there.
        let mut again = Model::starting_from(seen);
        work.drive(&stack, &reopened, &mut again, &mut rng, ops / 4);
        std::mem::forget(stack);
        let (image2, expect2, what2) = crash(&image, &reopened, &again, &mut rng);
        let result = build(&reg, chain, RecordingDisk::new(image2)).and_then(|s| {
            let r = check(&s, &expect2);
            std::mem::forget(s);
            r
        });
        if let Err(e) = result {
            violations.push(format!(
                "seed {seed}, crash point {point}: {what}, reopened, then {what2}: {e}"
            ));
        }
    }
    Outcome {
        violations,
        most_in_flight: work.most_in_flight.get(),
        failed_writes: work.failed_writes.get(),
    }
}

fn key_file() -> PathBuf {
    let dir = plugin_dir().join("crash");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("test.key");
    std::fs::write(&path, "3f".repeat(32)).unwrap();
    path
}

fn encrypt_chain(path: &Path) -> Chain {
    Chain::plain(
        vec![(
            "enc",
            path.to_path_buf(),
            serde_json::json!({ "key_file": key_file() }),
        )],
        vec!["enc"],
    )
}

/// Runs each seed, and asserts no crash point of any was violated; returns the most
/// requests in flight at once in any.
fn run_seeds(seeds: &[u64], points_each: usize, one: impl Fn(u64, usize) -> Outcome) -> usize {
    let mut all = Vec::new();
    let mut most = 0;
    for &seed in seeds {
        let o = one(seed, points_each);
        all.extend(o.violations);
        most = most.max(o.most_in_flight);
    }
    report(all, seeds.len() * points_each);
    most
}

fn report(violations: Vec<String>, points: usize) {
    assert!(
        violations.is_empty(),
        "{} of {points} crash points violated old-or-new:\n{}",
        violations.len(),
        violations[..violations.len().min(20)].join("\n")
    );
}

#[test]
fn encrypt_survives_a_thousand_crash_points() {
    let p = plugins().expect("building the plugins");
    let chain = encrypt_chain(&p.encrypt);
    // 131 blocks of 4 KiB: 64 guest blocks in two slots plus header and metadata.
    run_seeds(&[1, 2, 3, 4], 300, |seed, points| {
        run(&chain, BLOCK, 131 * BLOCK, 64, seed, 300, points)
    });
}

#[test]
fn write_back_cache_survives_a_thousand_crash_points() {
    let p = plugins().expect("building the plugins");
    // 1 MiB of cache (256 blocks) over 320 blocks of workload: evictions write back between
    // flushes too. The raw disk below keeps sectors, not blocks, whole (a plain disk may
    // persist a later partial write without an earlier one), so the unit checked is the
    // sector.
    let chain = Chain::plain(
        vec![(
            "cache",
            p.cache.clone(),
            serde_json::json!({ "size_mib": 1, "write_back": true }),
        )],
        vec!["cache"],
    );
    let most = run_seeds(&[21, 22, 23, 24], 300, |seed, points| {
        run(&chain, SECTOR, 320 * BLOCK, 320, seed, 400, points)
    });
    // Its misses and write-backs reach the disk: requests were there together.
    assert!(
        most >= 4,
        "at most {most} requests were ever in flight at once"
    );
}

#[test]
fn write_back_cache_over_encrypt_survives_a_thousand_crash_points() {
    let p = plugins().expect("building the plugins");
    let mut chain = encrypt_chain(&p.encrypt);
    chain.layers.insert(
        0,
        (
            "cache",
            p.cache.clone(),
            serde_json::json!({ "size_mib": 1, "write_back": true }),
        ),
    );
    chain.toggles.push("cache");
    // 320 guest blocks: 1 + 10 + 640 blocks of disk.
    run_seeds(&[31, 32, 33, 34], 300, |seed, points| {
        run(&chain, BLOCK, 651 * BLOCK, 320, seed, 400, points)
    });
}

#[test]
fn remap_survives_a_thousand_crash_points() {
    let p = plugins().expect("building the plugins");
    let chain = Chain::plain(
        vec![("remap", p.remap.clone(), serde_json::json!({}))],
        vec![],
    );
    run_seeds(&[11, 12, 13, 14], 300, |seed, points| {
        run(&chain, SECTOR, 2 << 20, 64, seed, 300, points)
    });
}

/// The store's layers: small journals (8 KiB: the most a store over fewer than 192 blocks
/// may have is 1/64 of them), so that checkpoints come often.
fn store_layer(id: &'static str, path: &Path) -> (&'static str, PathBuf, serde_json::Value) {
    let config = if id == "zstd" {
        serde_json::json!({ "extent_kib": 16, "journal_kib": 8 })
    } else {
        serde_json::json!({ "journal_kib": 8, "index_mib": 1 })
    };
    (id, path.to_path_buf(), config)
}

/// A store layer over-committed: 1 MiB for the guest on a disk of 192 blocks (thin), data
/// that does not compress and seldom repeats, so the data area fills, fragments under
/// overwrites and discards, and writes fail for lack of space (issue 29, item 6).
fn full_store_chain(id: &'static str, path: &Path) -> Chain {
    let (id, path, mut config) = store_layer(id, path);
    config["logical_mib"] = 1.into();
    // Dedup: contents that repeat now and then, so requests mix hits and new blocks.
    let fill = if id == "dedup" {
        Fill::ManyContents
    } else {
        Fill::Random
    };
    let mut chain = store_chain(vec![(id, path, config)], fill);
    chain.full = true;
    chain
}

/// Runs `chain` full: 2,000 crash points (torn writes among them), and writes that failed
/// for lack of space in every seed.
fn run_full(chain: &Chain, seeds: &[u64]) {
    let mut violations = Vec::new();
    for &seed in seeds {
        let o = run(chain, BLOCK, 192 * BLOCK, 256, seed, 300, 500);
        assert!(
            o.failed_writes > 10,
            "seed {seed}: only {} writes failed: the disk never filled",
            o.failed_writes
        );
        violations.extend(o.violations);
    }
    report(violations, seeds.len() * 500);
}

#[test]
fn dedup_on_a_full_thin_disk_survives_two_thousand_crash_points() {
    let p = plugins().expect("building the plugins");
    run_full(&full_store_chain("dedup", &p.dedup), &[71, 73, 75, 77]);
}

#[test]
fn compress_on_a_full_thin_disk_survives_two_thousand_crash_points() {
    let p = plugins().expect("building the plugins");
    run_full(&full_store_chain("zstd", &p.compress), &[81, 83, 85, 87]);
}

fn store_chain(layers: Vec<(&'static str, PathBuf, serde_json::Value)>, fill: Fill) -> Chain {
    let toggles = layers.iter().map(|l| l.0).collect();
    Chain {
        layers,
        toggles,
        fill,
        discards: true,
        full: false,
    }
}

#[test]
fn compress_survives_two_thousand_crash_points() {
    let p = plugins().expect("building the plugins");
    let chain = store_chain(vec![store_layer("zstd", &p.compress)], Fill::Compressible);
    run_seeds(&[41, 42, 43, 44], 500, |seed, points| {
        run(&chain, BLOCK, 192 * BLOCK, 64, seed, 300, points)
    });
}

#[test]
fn dedup_survives_two_thousand_crash_points() {
    let p = plugins().expect("building the plugins");
    let chain = store_chain(vec![store_layer("dedup", &p.dedup)], Fill::FewContents);
    run_seeds(&[51, 52, 53, 54], 500, |seed, points| {
        run(&chain, BLOCK, 192 * BLOCK, 64, seed, 300, points)
    });
}

/// guest -> dedup -> compress -> encrypt -> disk.
fn dedup_compress_encrypt(p: &vmm_lab::plugins::Plugins) -> Chain {
    let enc = encrypt_chain(&p.encrypt).layers.remove(0);
    store_chain(
        vec![
            store_layer("dedup", &p.dedup),
            store_layer("zstd", &p.compress),
            enc,
        ],
        Fill::FewContents,
    )
}

#[test]
fn dedup_over_compress_over_encrypt_survives_two_thousand_crash_points() {
    let p = plugins().expect("building the plugins");
    let chain = dedup_compress_encrypt(&p);
    // 400 blocks: encrypt's guest sees about 195, compress and dedup their share of it.
    run_seeds(&[61, 62, 63, 64], 500, |seed, points| {
        run(&chain, BLOCK, 400 * BLOCK, 64, seed, 300, points)
    });
}

#[test]
fn write_back_cache_over_dedup_compress_encrypt_survives_two_thousand_crash_points() {
    let p = plugins().expect("building the plugins");
    let mut chain = dedup_compress_encrypt(&p);
    chain.layers.insert(
        0,
        (
            "cache",
            p.cache.clone(),
            serde_json::json!({ "size_mib": 1, "write_back": true }),
        ),
    );
    chain.toggles.push("cache");
    // 320 guest blocks over 1 MiB of cache: write-backs between flushes too.
    run_seeds(&[71, 72, 73, 74], 500, |seed, points| {
        run(&chain, BLOCK, 700 * BLOCK, 320, seed, 400, points)
    });
}

#[test]
fn the_checker_sees_a_lost_write_and_accepts_old_contents() {
    // A disk with no plugin; the write is never flushed and the crash drops it.
    let disk = RecordingDisk::new(vec![0u8; 64 * BLOCK]);
    let reg = PluginRegistry::new();
    let chain = Chain::plain(vec![], vec![]);
    let stack = build(&reg, &chain, disk.clone()).unwrap();
    let mut model = Model::new(16, BLOCK);
    let mut data = vec![7u8; BLOCK];
    model.before_write(disk.position(), 0, &data);
    assert_eq!(
        submit(&stack, BlockRequestKind::Write, 0, &mut data),
        RequestStatus::Ok
    );
    let log = disk.log();
    let image = crash_image(&vec![0u8; 64 * BLOCK], &log, log.len(), || false);
    let mut strict = model.expectation_at(log.len());
    strict.allowed[0].retain(|v| v == &data);
    let reopened = build(&reg, &chain, RecordingDisk::new(image)).unwrap();
    assert!(
        check(&reopened, &strict).is_err(),
        "a lost write must be seen"
    );
    assert!(check(&reopened, &model.expectation_at(log.len())).is_ok());
}
