//! virtio-blk: the request parser on every chain a guest can make, and the device's queue
//! handler (`Block` activated on a queue, served on its disk's I/O thread) over rings the
//! guest keeps writing.

use crate::guest::{self, Rings};
use crate::input::Input;
use compat::{BlockRequestKind, LiveStack, RequestStatus};
use devices::virtio::block::request::{MAX_REQUEST_BYTES, SECTOR_SIZE};
use devices::virtio::block::{Block, BlockRequest, QUEUE_SIZE};
use devices::virtio::{Interrupt, VirtioDevice};
use std::sync::{Arc, OnceLock};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Most chains popped per input.
const MAX_CHAINS: usize = 64;
/// Most guest writes per round.
const MAX_WRITES: usize = 48;

/// `BlockRequest::parse` on chains popped from a queue whose descriptor table, ring
/// entries and indices are fuzz bytes. Never panics; what it accepts holds to its promises.
pub fn blk_request(data: &[u8]) {
    let mut inp = Input::new(data);
    let mem = guest::memory();
    let capacity = inp.interesting_u64(2048);
    let rings = Rings::from_input(&mut inp);
    let mut q = guest::queue(&mut inp, QUEUE_SIZE, &rings);
    let writes = inp.below(MAX_WRITES + 1);
    for _ in 0..writes {
        guest::guest_write(&mut inp, &mem, &rings);
    }
    let use_iter = inp.bool();
    for _ in 0..MAX_CHAINS {
        let chain = if use_iter {
            match q.iter(&mem) {
                Ok(mut chains) => chains.next(),
                Err(_) => break,
            }
        } else {
            q.pop_descriptor_chain(&mem)
        };
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        let used = match BlockRequest::parse(chain, &mem, capacity) {
            Ok(req) => {
                check_accepted(&req, &mem, capacity);
                let status = inp.pick(&[RequestStatus::Ok, RequestStatus::IoError]);
                let len = req.used_len(status);
                assert!(
                    u64::from(len) <= req.data_len + 1,
                    "used_len {len} for {req:?}"
                );
                len
            }
            Err(refused) => {
                if let Some(at) = refused.status_addr {
                    assert!(
                        mem.check_range(at, 1),
                        "a refused chain's status byte {at:?} is outside guest memory"
                    );
                }
                1
            }
        };
        if q.add_used(&mem, head, used).is_err() {
            break;
        }
    }
}

/// What `parse` promises about a request it accepted.
fn check_accepted(req: &BlockRequest, mem: &GuestMemoryMmap, capacity: u64) {
    let sum: u64 = req.segments.iter().map(|s| u64::from(s.1)).sum();
    assert_eq!(sum, req.data_len, "{req:?}");
    assert!(req.data_len <= MAX_REQUEST_BYTES, "{req:?}");
    for &(at, len) in &req.segments {
        assert!(
            mem.check_range(at, len as usize),
            "segment outside memory: {req:?}"
        );
    }
    assert!(mem.check_range(req.status_addr, 1), "{req:?}");
    match req.kind {
        BlockRequestKind::Read | BlockRequestKind::Write => {
            assert!(req.data_len.is_multiple_of(SECTOR_SIZE), "{req:?}");
            assert!(
                req.sector < capacity,
                "{req:?} on a disk of {capacity} sectors"
            );
            assert_eq!(
                u128::from(req.offset),
                u128::from(req.sector) * u128::from(SECTOR_SIZE),
                "{req:?}"
            );
            let end = u128::from(req.offset) + u128::from(req.data_len);
            assert!(
                end <= u128::from(capacity) * u128::from(SECTOR_SIZE),
                "{req:?} runs past a disk of {capacity} sectors"
            );
        }
        BlockRequestKind::GetId => {
            assert!(req.segments.first().is_some_and(|s| s.1 >= 20), "{req:?}");
            assert_eq!((req.sector, req.offset), (0, 0), "{req:?}");
        }
        BlockRequestKind::Flush => assert_eq!((req.sector, req.offset), (0, 0), "{req:?}"),
        BlockRequestKind::Discard | BlockRequestKind::WriteZeroes => {
            assert_eq!(req.data_len, 16, "one range: {req:?}");
            assert!(
                req.io_len > 0 && req.io_len.is_multiple_of(SECTOR_SIZE),
                "{req:?}"
            );
            assert_eq!(
                u128::from(req.offset),
                u128::from(req.sector) * u128::from(SECTOR_SIZE),
                "{req:?}"
            );
            let end = u128::from(req.offset) + u128::from(req.io_len);
            assert!(
                end <= u128::from(capacity) * u128::from(SECTOR_SIZE),
                "{req:?} runs past a disk of {capacity} sectors"
            );
        }
    }
    if !matches!(
        req.kind,
        BlockRequestKind::Discard | BlockRequestKind::WriteZeroes
    ) {
        let covered = if matches!(req.kind, BlockRequestKind::Read | BlockRequestKind::Write) {
            req.data_len
        } else {
            0
        };
        assert_eq!(req.io_len, covered, "{req:?}");
    }
}

/// The disks the block harnesses serve: each a live stack on its own I/O thread, made once
/// per process (a thread per input would cost more than the input).
pub struct Disks {
    pub stacks: Vec<(Arc<LiveStack>, bool)>,
}

/// A plugin that transforms data (bounce buffers) and stays when disabled.
struct Flip;

impl interceptor_sdk::Interceptor for Flip {
    const NAME: &'static std::ffi::CStr = c"flip";
    const FLAGS: u32 = interceptor_abi::F_MODIFIES_DATA;

    fn create(_ctx: interceptor_sdk::CreateContext<'_>) -> Result<Self, String> {
        Ok(Flip)
    }

    fn pre(
        &self,
        req: &mut interceptor_sdk::Request<'_>,
        _slot: &mut interceptor_sdk::Slot,
    ) -> interceptor_sdk::Decision {
        if req.kind() == interceptor_sdk::RequestKind::Write {
            let _ = req.transform(|_, b| b.iter_mut().for_each(|x| *x ^= 0x5a));
        }
        interceptor_sdk::Decision::Continue
    }

    fn post(
        &self,
        req: &mut interceptor_sdk::Request<'_>,
        _slot: interceptor_sdk::Slot,
        status: interceptor_sdk::Status,
    ) -> interceptor_sdk::Status {
        if req.kind() == interceptor_sdk::RequestKind::Read {
            let _ = req.transform(|_, b| b.iter_mut().for_each(|x| *x ^= 0x5a));
        }
        status
    }
}

/// `pool`'s disks, made on first use; `tag` names their I/O threads. Each harness has a
/// pool of its own, so harnesses run side by side (the replay test) never share a disk.
pub fn disks(pool: &'static OnceLock<Disks>, tag: &str) -> &'static Disks {
    pool.get_or_init(|| {
        let flip = compat::InstanceSpec {
            id: "flip".into(),
            plugin: compat::Plugin::from_static("flip", interceptor_sdk::static_table!(Flip))
                .expect("flip table"),
            config_json: "{}".into(),
            enabled: true,
        };
        // (bytes, read-only, chain): the real raw-file backend over a scratch file; a disk
        // of one sector and a partial one; an empty disk; one behind a bounce-buffer plugin.
        let specs: [(u64, bool, &[compat::InstanceSpec]); 4] = [
            (64 << 10, false, &[]),
            (1536 + 100, true, &[]),
            (0, false, &[]),
            (64 << 10, false, std::slice::from_ref(&flip)),
        ];
        let stacks = specs
            .iter()
            .enumerate()
            .map(|(i, &(bytes, ro, chain))| {
                let path = crate::disk::scratch_dir().join(format!("{tag}{i}.img"));
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .expect("disk image");
                file.set_len(bytes).expect("disk size");
                let _ = std::fs::remove_file(&path);
                let id = format!("{tag}{i}");
                let raw = devices::virtio::block::RawFile::new(file, ro, &id).expect("raw file");
                let stack = LiveStack::start(&id, Arc::new(raw), chain, None).expect("stack");
                (Arc::new(stack), ro)
            })
            .collect();
        Disks { stacks }
    })
}

/// An interrupt line whose eventfd never blocks; what the device raised is read back and
/// cleared after each input.
pub fn interrupt() -> (Arc<Interrupt>, EventFd) {
    let irq = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let line = Arc::new(Interrupt::new(irq.try_clone().expect("eventfd")));
    (line, irq)
}

/// The queue handler: a `Block` activated on a fuzz-made queue, then rounds of guest
/// writes each followed by the handler serving everything available (the I/O thread's
/// drain, which is what a kick runs, but synchronous and so deterministic), then a reset,
/// which must succeed and leave nothing served.
pub fn blk_queue(data: &[u8]) {
    static POOL: OnceLock<Disks> = OnceLock::new();
    let mut inp = Input::new(data);
    let disks = disks(&POOL, "q");
    let (stack, ro) = disks.stacks[inp.below(disks.stacks.len())].clone();
    let mem = guest::memory();
    let rings = Rings::from_input(&mut inp);
    let q = guest::queue(&mut inp, QUEUE_SIZE, &rings);
    trace!(
        "blk_queue: disk {}, rings {rings:x?}, ready {}, next avail {}, valid {}",
        stack.device_id(),
        q.ready(),
        q.next_avail(),
        q.is_valid(&mem)
    );
    let mut block = Block::new(
        stack.device_id(),
        stack.clone(),
        ro,
        vec![Box::new(
            block::SyncEngine::new(stack.backend()).expect("an eventfd"),
        )],
    );
    let features = block.features() & inp.u64();
    let (line, irq) = interrupt();
    let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    // The guest's first requests are in memory before it says DRIVER_OK.
    let first = inp.below(MAX_WRITES + 1);
    for _ in 0..first {
        guest::guest_write(&mut inp, &mem, &rings);
    }
    // What the transport promises the device: a queue valid at DRIVER_OK (rings inside
    // guest memory, ready, a valid size). A device handed anything else is not a guest's
    // doing.
    if !q.is_valid(&mem) {
        return;
    }
    block
        .activate(mem.clone(), features, vec![q], vec![kick], line.clone())
        .expect("activate");
    for _ in 0..8 {
        trace!("blk_queue: drain");
        stack
            .io_thread()
            .drain()
            .expect("the disk's I/O thread is serving");
        if inp.is_empty() {
            break;
        }
        if inp.one_in(4) {
            line.ack(inp.u32());
        }
        let writes = inp.below(MAX_WRITES + 1);
        for _ in 0..writes {
            guest::guest_write(&mut inp, &mem, &rings);
        }
    }
    trace!("blk_queue: needs reset: {}", block.needs_reset());
    assert!(block.reset(), "a reset must succeed");
    assert!(!block.needs_reset(), "a reset clears DEVICE_NEEDS_RESET");
    // Nothing serves the old queue any more: a drain touches nothing.
    let before: Vec<u8> = snapshot(&mem);
    stack
        .io_thread()
        .drain()
        .expect("the disk's I/O thread is serving");
    assert!(
        before == snapshot(&mem),
        "a reset device still served its queue"
    );
    let _ = irq.read();
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    use vm_memory::Bytes;
    let mut v = vec![0u8; guest::LOW_END as usize];
    mem.read_slice(&mut v, GuestAddress(0))
        .expect("read memory");
    v
}
