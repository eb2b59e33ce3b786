//! Two queues of one disk hammer overlapping blocks through real plugin libraries, with up
//! to 12 requests in flight on each (the device's io_uring engines, completions in any
//! order): writes whole and partial, reads, flushes, all on 32 blocks. Every read is
//! checked against what the guest may see (linearizable: the value of a write that was not
//! superseded before the read was posted, and posted before it completed), every request
//! must succeed, and after the chain is closed and reopened every sector reads back as the
//! last read through the queues saw it. (cache over encrypt, and encrypt alone, whose
//! hooks run on the disk's hook pool, run on both engines.) A disk
//! without interceptors promises no such thing, like a real disk: overlapping writes in
//! flight together may land mixed within a sector, so it is not checked here.

use block::EngineChoice;
use compat::{BlockRequestKind, InstanceSpec, LiveStack, PluginRegistry, RequestStatus, Segment};
use devices::virtio::block::{Block, RawFile};
use devices::virtio::{Interrupt, VirtioDevice};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_lab::plugins::{plugin_dir, plugins};
use vmm_sys_util::eventfd::EventFd;

const SECTOR: u64 = 512;
const BLOCK: u64 = 4096;
/// The guest's blocks the workload hammers.
const BLOCKS: u64 = 32;
const QUEUES: usize = 2;
const QUEUE_SIZE: u16 = 64;
/// Requests each queue keeps in flight (3 descriptors each).
const DEPTH: usize = 12;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The sector's contents for write `id` (0: never written, all zeros).
fn pattern(id: u32, sector: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(SECTOR as usize);
    while p.len() < SECTOR as usize {
        p.extend_from_slice(&id.to_le_bytes());
        p.extend_from_slice(&(sector as u32).to_le_bytes());
    }
    p
}

/// Which write a sector's contents came from; `None` if they are no write's.
fn decode(data: &[u8], sector: u64) -> Option<u32> {
    if data.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let id = u32::from_le_bytes(data[..4].try_into().ok()?);
    (id != 0 && data == pattern(id, sector).as_slice()).then_some(id)
}

#[derive(Clone, Copy)]
struct Op {
    kind: BlockRequestKind,
    sector: u64,
    sectors: u64,
    id: u32,
    posted: u64,
    done: Option<u64>,
}

/// One queue as the guest's driver sees it: a split virtqueue laid out by hand at `at`
/// (descriptor table, avail ring, used ring).
struct GuestQueue {
    desc: u64,
    avail_ring: u64,
    used_ring: u64,
    kick: EventFd,
    /// Free request slots (each: 3 descriptors and a data area).
    free: Vec<u16>,
    /// The op in each slot.
    ops: HashMap<u16, usize>,
    avail: u16,
    used_seen: u16,
    area: u64,
}

struct Run<'a> {
    mem: &'a GuestMemoryMmap,
    ops: Vec<Op>,
    seq: u64,
}

impl Run<'_> {
    fn data_at(q: &GuestQueue, slot: u16) -> u64 {
        q.area + u64::from(slot) * 0x8000
    }

    /// Posts `op` on `q`.
    fn post(&mut self, q: &mut GuestQueue, mut op: Op) {
        let slot = q.free.pop().expect("a free slot");
        let base = Self::data_at(q, slot);
        let (hdr_addr, data_addr, status_addr) = (base, base + 0x100, base + 0x7f00);
        let req_type: u32 = match op.kind {
            BlockRequestKind::Read => 0,
            BlockRequestKind::Write => 1,
            _ => 4,
        };
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&req_type.to_le_bytes());
        hdr[8..].copy_from_slice(&op.sector.to_le_bytes());
        self.mem.write_slice(&hdr, GuestAddress(hdr_addr)).unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(status_addr))
            .unwrap();
        let len = (op.sectors * SECTOR) as u32;
        if op.kind == BlockRequestKind::Write {
            for s in 0..op.sectors {
                let p = pattern(op.id, op.sector + s);
                self.mem
                    .write_slice(&p, GuestAddress(data_addr + s * SECTOR))
                    .unwrap();
            }
        }
        let first = slot * 3;
        let mut descs = vec![(hdr_addr, 16u32, NEXT)];
        match op.kind {
            BlockRequestKind::Read => descs.push((data_addr, len, NEXT | WRITE)),
            BlockRequestKind::Write => descs.push((data_addr, len, NEXT)),
            _ => {}
        }
        descs.push((status_addr, 1, WRITE));
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let at = first + i as u16;
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, at + 1));
            self.mem
                .write_obj(d, GuestAddress(q.desc + u64::from(at) * 16))
                .unwrap();
        }
        let pos = u64::from(q.avail % QUEUE_SIZE);
        self.mem
            .write_obj(first, GuestAddress(q.avail_ring + 4 + pos * 2))
            .unwrap();
        q.avail = q.avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(q.avail, GuestAddress(q.avail_ring + 2))
            .unwrap();
        self.seq += 1;
        op.posted = self.seq;
        q.ops.insert(slot, self.ops.len());
        self.ops.push(op);
        q.kick.write(1).unwrap();
    }

    /// Takes `q`'s completions; checks each status and each read's data.
    fn reap(&mut self, q: &mut GuestQueue, reads: &mut Vec<(usize, Vec<u8>)>) -> usize {
        let mut n = 0;
        let used_idx =
            |mem: &GuestMemoryMmap| -> u16 { mem.read_obj(GuestAddress(q.used_ring + 2)).unwrap() };
        while q.used_seen != used_idx(self.mem) {
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            let now = used_idx(self.mem);
            assert!(
                now.wrapping_sub(q.used_seen) <= QUEUE_SIZE,
                "the used index went from {} (seen) to {now}; last ops: {:?}",
                q.used_seen,
                self.ops
                    .iter()
                    .rev()
                    .take(4)
                    .map(|o| (o.kind, o.sector, o.sectors))
                    .collect::<Vec<_>>()
            );
            let pos = u64::from(q.used_seen % QUEUE_SIZE);
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(q.used_ring + 4 + pos * 8))
                .unwrap();
            let head = id as u16;
            q.used_seen = q.used_seen.wrapping_add(1);
            let slot = head / 3;
            let Some(i) = q.ops.remove(&slot) else {
                panic!(
                    "used head {head} (slot {slot}) was not posted; posted: {:?}",
                    q.ops
                )
            };
            let base = Self::data_at(q, slot);
            let status: u8 = self.mem.read_obj(GuestAddress(base + 0x7f00)).unwrap();
            let op = self.ops[i];
            assert_eq!(
                status, 0,
                "{:?} of {} sectors at {} failed",
                op.kind, op.sectors, op.sector
            );
            self.seq += 1;
            self.ops[i].done = Some(self.seq);
            if op.kind == BlockRequestKind::Read {
                let mut data = vec![0u8; (op.sectors * SECTOR) as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(base + 0x100))
                    .unwrap();
                reads.push((i, data));
            }
            q.free.push(slot);
            n += 1;
        }
        n
    }

    /// Is `id` a value a read of `sector` (`read`) may return?
    fn acceptable(&self, read: &Op, sector: u64, id: u32) -> Result<(), String> {
        let done = read.done.unwrap_or(u64::MAX);
        let writes: Vec<&Op> = self
            .ops
            .iter()
            .filter(|w| {
                w.kind == BlockRequestKind::Write
                    && w.sector <= sector
                    && sector < w.sector + w.sectors
            })
            .collect();
        let (posted, finished) = if id == 0 {
            (0, 0)
        } else {
            let w = writes
                .iter()
                .find(|w| w.id == id)
                .ok_or(format!("sector {sector}: write {id} never wrote it"))?;
            if w.posted > done {
                return Err(format!(
                    "sector {sector}: write {id} was posted after the read ended"
                ));
            }
            (w.posted, w.done.unwrap_or(u64::MAX))
        };
        let _ = posted;
        // Superseded: another write began after this one finished and finished before the
        // read was posted.
        if let Some(w) = writes
            .iter()
            .find(|w| w.posted > finished && w.done.is_some_and(|d| d < read.posted))
        {
            return Err(format!(
                "sector {sector}: read saw write {id}, superseded by write {} before the read",
                w.id
            ));
        }
        Ok(())
    }
}

fn key_file() -> PathBuf {
    let dir = plugin_dir().join("concurrent");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("test.key");
    std::fs::write(&path, "5e".repeat(32)).unwrap();
    path
}

fn open_stack(
    reg: &PluginRegistry,
    path: &PathBuf,
    layers: &[(&str, PathBuf, serde_json::Value)],
) -> (Arc<LiveStack>, Arc<RawFile>) {
    let specs: Vec<InstanceSpec> = layers
        .iter()
        .map(|(id, lib, config)| InstanceSpec {
            id: id.to_string(),
            plugin: reg.load(lib, None).unwrap(),
            config_json: config.to_string(),
            enabled: true,
        })
        .collect();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let raw = Arc::new(RawFile::new(file, false, "stress").unwrap());
    let stack = LiveStack::start("stress", raw.clone(), &specs, None).unwrap();
    (Arc::new(stack), raw)
}

/// Runs the workload on a fresh disk of `disk_bytes`, each byte `fill` (what reads back as
/// zeros through the chain).
fn hammer(
    name: &str,
    layers: Vec<(&str, PathBuf, serde_json::Value)>,
    disk_bytes: u64,
    fill: u8,
    seed: u64,
    engine: block::EngineChoice,
) {
    let path = plugin_dir().join(format!("concurrent-{name}.img"));
    std::fs::write(&path, vec![fill; disk_bytes as usize]).unwrap();
    let reg = PluginRegistry::new();
    let (stack, raw) = open_stack(&reg, &path, &layers);
    assert!(stack.capacity() >= BLOCKS * BLOCK, "{name}: capacity");
    let backend: Arc<dyn compat::BlockBackend> = raw.clone();
    let engines: Vec<Box<dyn block::AsyncIo>> = (0..QUEUES)
        .map(|_| {
            engine
                .open(raw.file(), false, QUEUE_SIZE, &backend)
                .unwrap()
        })
        .collect();
    let mut dev = Block::new("stress", stack.clone(), false, engines);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
    let mut queues: Vec<GuestQueue> = (0..QUEUES)
        .map(|q| {
            let desc = 0x10_0000 * (q as u64 + 1);
            let avail_ring = desc + 16 * u64::from(QUEUE_SIZE);
            // flags, idx, ring, used_event; the used ring 4-byte aligned after it.
            let used_ring = (avail_ring + 6 + 2 * u64::from(QUEUE_SIZE) + 3) & !3;
            (desc, avail_ring, used_ring)
        })
        .map(|(desc, avail_ring, used_ring)| GuestQueue {
            desc,
            avail_ring,
            used_ring,
            kick: EventFd::new(0).unwrap(),
            free: (0..DEPTH as u16).rev().collect(),
            ops: HashMap::new(),
            avail: 0,
            used_seen: 0,
            area: 0x100_0000 + ((desc >> 20) - 1) * 0x80_0000,
        })
        .collect();
    let vqs = queues
        .iter()
        .map(|q| {
            let mut vq = Queue::new(QUEUE_SIZE).unwrap();
            vq.set_size(QUEUE_SIZE);
            vq.set_desc_table_address(Some(q.desc as u32), Some(0));
            vq.set_avail_ring_address(Some(q.avail_ring as u32), Some(0));
            vq.set_used_ring_address(Some(q.used_ring as u32), Some(0));
            vq.set_ready(true);
            vq
        })
        .collect();
    let kicks = queues.iter().map(|q| q.kick.try_clone().unwrap()).collect();
    dev.activate(
        mem.clone(),
        0,
        vqs,
        kicks,
        Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
    )
    .unwrap();

    let mut run = Run {
        mem: &mem,
        ops: Vec::new(),
        seq: 0,
    };
    let mut rng = Rng(seed);
    let mut reads = Vec::new();
    let mut next_id = 1u32;
    let total = 2400;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut posted = 0;
    while posted < total || queues.iter().any(|q| !q.ops.is_empty()) {
        assert!(Instant::now() < deadline, "{name}: the queues stalled");
        let q = rng.below(QUEUES as u64) as usize;
        if posted < total && !queues[q].free.is_empty() {
            let (sector, sectors) = if rng.below(4) == 0 {
                let n = 1 + rng.below(8);
                (rng.below(BLOCKS * 8 - n + 1), n)
            } else {
                let n = 1 + rng.below(4);
                (rng.below(BLOCKS - n + 1) * 8, n * 8)
            };
            let kind = match rng.below(100) {
                0..=54 => BlockRequestKind::Write,
                55..=94 => BlockRequestKind::Read,
                _ => BlockRequestKind::Flush,
            };
            let (sector, sectors) = if kind == BlockRequestKind::Flush {
                (0, 0)
            } else {
                (sector, sectors)
            };
            let id = if kind == BlockRequestKind::Write {
                next_id += 1;
                next_id
            } else {
                0
            };
            run.post(
                &mut queues[q],
                Op {
                    kind,
                    sector,
                    sectors,
                    id,
                    posted: 0,
                    done: None,
                },
            );
            posted += 1;
        }
        let mut got = 0;
        for q in queues.iter_mut() {
            got += run.reap(q, &mut reads);
        }
        if got == 0 && (posted >= total || queues.iter().all(|q| q.free.is_empty())) {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    // A chain whose every instance declares F_CONCURRENT started its requests on the
    // disk's hook pool; any other chain on the I/O thread.
    let pooled = stack
        .counters()
        .started_on_pool
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        pooled > 0,
        stack.concurrent(),
        "{name}: {pooled} requests started on the hook pool"
    );
    // Every read saw a value it may see.
    let mut violations = Vec::new();
    for (i, data) in &reads {
        let op = run.ops[*i];
        for s in 0..op.sectors {
            let sector = op.sector + s;
            let at = (s * SECTOR) as usize;
            match decode(&data[at..at + SECTOR as usize], sector) {
                None => violations.push(format!("sector {sector}: garbage")),
                Some(id) => {
                    if let Err(e) = run.acceptable(&op, sector, id) {
                        violations.push(e);
                    }
                }
            }
        }
    }
    // The end state, read through the queue (nothing else in flight).
    let mut last = Vec::new();
    for b in 0..BLOCKS {
        run.post(
            &mut queues[0],
            Op {
                kind: BlockRequestKind::Read,
                sector: b * 8,
                sectors: 8,
                id: 0,
                posted: 0,
                done: None,
            },
        );
        let t0 = Instant::now();
        let mut one = Vec::new();
        while run.reap(&mut queues[0], &mut one) == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{name}: final read stalled"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        let (i, data) = one.pop().unwrap();
        for s in 0..8 {
            let sector = b * 8 + s;
            let at = (s * SECTOR) as usize;
            let id = decode(&data[at..at + SECTOR as usize], sector);
            match id {
                Some(id) => {
                    if let Err(e) = run.acceptable(&run.ops[i], sector, id) {
                        violations.push(format!("end: {e}"));
                    }
                }
                None => violations.push(format!("end: sector {sector}: garbage")),
            }
            last.push(data[at..at + SECTOR as usize].to_vec());
        }
    }
    assert!(
        violations.is_empty(),
        "{name} (seed {seed}): {} violations in {} reads:\n{}",
        violations.len(),
        reads.len(),
        violations[..violations.len().min(20)].join("\n")
    );
    // Closed and reopened, the disk holds what the last reads saw.
    assert!(dev.reset());
    drop(dev);
    assert_eq!(stack.close(), RequestStatus::Ok, "{name}: close");
    drop(stack);
    let (again, _) = open_stack(&reg, &path, &layers);
    for b in 0..BLOCKS {
        let mut buf = vec![0u8; BLOCK as usize];
        let seg = [Segment {
            base: buf.as_mut_ptr(),
            len: buf.len(),
        }];
        let on = again.clone();
        let ptr = seg[0].base as usize;
        let status = again
            .io_thread()
            .run(move || {
                let seg = [Segment {
                    base: ptr as *mut u8,
                    len: BLOCK as usize,
                }];
                // SAFETY: `buf` outlives the call, which blocks until it returns.
                unsafe { on.submit(BlockRequestKind::Read, b * BLOCK, &seg) }
            })
            .unwrap();
        let _ = seg;
        assert_eq!(status, RequestStatus::Ok, "{name}: reread block {b}");
        for s in 0..8usize {
            assert_eq!(
                &buf[s * 512..(s + 1) * 512],
                last[b as usize * 8 + s].as_slice(),
                "{name}: block {b} sector {s} after reopening"
            );
        }
    }
    assert_eq!(again.close(), RequestStatus::Ok);
}

#[test]
fn two_queues_hammering_overlapping_blocks_through_cache_over_encrypt() {
    let p = plugins().expect("building the plugins");
    let layers = vec![
        (
            "cache",
            p.cache.clone(),
            serde_json::json!({ "size_mib": 1, "write_back": true }),
        ),
        (
            "enc",
            p.encrypt.clone(),
            serde_json::json!({ "key_file": key_file() }),
        ),
    ];
    hammer(
        "cache-enc",
        layers.clone(),
        4 << 20,
        0,
        7,
        EngineChoice::IoUring,
    );
    hammer("cache-enc-sync", layers, 4 << 20, 0, 17, EngineChoice::Sync);
}

/// Encrypt declares F_CONCURRENT: its hooks run on the disk's hook pool, side by side.
#[test]
fn two_queues_hammering_overlapping_blocks_through_encrypt_on_the_hook_pool() {
    let p = plugins().expect("building the plugins");
    let layers = vec![(
        "enc",
        p.encrypt.clone(),
        serde_json::json!({ "key_file": key_file() }),
    )];
    hammer("enc", layers.clone(), 4 << 20, 0, 11, EngineChoice::IoUring);
    hammer("enc-sync", layers, 4 << 20, 0, 21, EngineChoice::Sync);
}

#[test]
fn two_queues_hammering_overlapping_blocks_through_remap() {
    let p = plugins().expect("building the plugins");
    hammer(
        "remap",
        vec![("remap", p.remap.clone(), serde_json::json!({}))],
        2 << 20,
        0,
        8,
        EngineChoice::IoUring,
    );
}

#[test]
fn two_queues_hammering_overlapping_blocks_through_counter_and_xor() {
    let p = plugins().expect("building the plugins");
    let layers = vec![
        ("count", p.counter.clone(), serde_json::json!({})),
        ("xor", p.xor.clone(), serde_json::json!({ "key": 90 })),
    ];
    hammer("count-xor", layers, 1 << 20, 90, 9, EngineChoice::IoUring);
}

#[test]
fn two_queues_hammering_overlapping_blocks_through_a_write_through_cache() {
    let p = plugins().expect("building the plugins");
    let layers = vec![(
        "cache",
        p.cache.clone(),
        serde_json::json!({ "size_mib": 1 }),
    )];
    hammer("cache-wt", layers, 1 << 20, 0, 10, EngineChoice::IoUring);
}
