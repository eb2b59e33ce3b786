//! The queue handler's tests: requests through a mock virtqueue, engines that hold
//! completions back, and plugins that count what they see.

use super::*;
use crate::virtio::block::RawFile;
use crate::virtio::INTERRUPT_CONFIG;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

const NEXT: u16 = 1;
const WRITE: u16 = 2;

pub(in crate::virtio::block) struct Rig {
    pub(in crate::virtio::block) mem: GuestMemoryMmap,
    pub(in crate::virtio::block) file: std::path::PathBuf,
    broken: Arc<AtomicBool>,
    interrupt: Arc<Interrupt>,
    pub(in crate::virtio::block) stack: Arc<LiveStack>,
}

pub(in crate::virtio::block) fn rig(tag: &str) -> Rig {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let file = std::env::temp_dir().join(format!("worker-{tag}-{}", std::process::id()));
    std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    let driver = Arc::new(RawFile::new(f, false, "vdt").unwrap());
    let stack = Arc::new(LiveStack::start("vdt", driver, &[], None).unwrap());
    Rig {
        mem,
        file,
        broken: Arc::new(AtomicBool::new(false)),
        interrupt: Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
        stack,
    }
}

impl Rig {
    fn worker(&self, queue: Queue) -> Worker {
        Worker::new(
            "vdt",
            self.mem.clone(),
            queue,
            EventFd::new(0).unwrap(),
            self.stack.clone(),
            2048,
            self.interrupt.clone(),
            self.broken.clone(),
            Box::new(block::SyncEngine::new(self.stack.backend()).unwrap()),
            Arc::default(),
        )
        .with_hook_pool(pool_eventfd())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

/// A guest that moves avail.idx more than a queue ahead used to make the device spin
/// forever (nothing to pop, yet "more work" on every re-enable). Now the queue is
/// broken: DEVICE_NEEDS_RESET, a config interrupt, nothing served, and it returns.
#[test]
fn an_avail_index_a_queue_ahead_breaks_the_queue_instead_of_spinning() {
    let r = rig("ahead");
    let mq = MockSplitQueue::new(&r.mem, 16);
    mq.avail().idx().store(100);
    let mut w = r.worker(mq.create_queue().unwrap());
    w.process_queue();
    assert!(r.broken.load(Ordering::SeqCst));
    assert_ne!(r.interrupt.status() & INTERRUPT_CONFIG, 0);
    assert_eq!(r.stack.counters().refused.load(Ordering::SeqCst), 1);
    // Kicks after that serve nothing until a reset.
    w.process_queue();
    assert_eq!(r.stack.counters().requests.load(Ordering::SeqCst), 0);
}

/// A write through the queue reaches the disk through the stack, status byte and used
/// ring included.
#[test]
fn a_write_through_the_queue_reaches_the_disk() {
    let r = rig("write");
    let mq = MockSplitQueue::new(&r.mem, 16);
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
    hdr[8..].copy_from_slice(&3u64.to_le_bytes()); // sector 3
    r.mem.write_slice(&hdr, GuestAddress(0x2_0000)).unwrap();
    r.mem
        .write_slice(&[0xab; 512], GuestAddress(0x3_0000))
        .unwrap();
    r.mem.write_obj(0xffu8, GuestAddress(0x4_0000)).unwrap();
    for (i, (addr, len, flags, next)) in [
        (0x2_0000u64, 16u32, NEXT, 1u16),
        (0x3_0000, 512, NEXT, 2),
        (0x4_0000, 1, WRITE, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let d = SplitDescriptor::new(addr, len, flags, next);
        mq.desc_table()
            .store(i as u16, RawDescriptor::from(d))
            .unwrap();
    }
    mq.avail().ring().ref_at(0).unwrap().store(0);
    mq.avail().idx().store(1);
    let mut w = r.worker(mq.create_queue().unwrap());
    w.process_queue();
    assert!(!r.broken.load(Ordering::SeqCst));
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(0x4_0000)).unwrap(), 0);
    assert_eq!(mq.used().idx().load(), 1);
    let disk = std::fs::read(&r.file).unwrap();
    assert!(disk[3 * 512..4 * 512].iter().all(|&b| b == 0xab));
    assert!(disk[..3 * 512].iter().all(|&b| b == 0));
}

/// An engine that runs each request on the backend at once but reports it done only
/// when the test says, newest first; `wait` releases everything (the kernel finishing).
#[derive(Clone, Default)]
struct Held(Arc<Mutex<HeldState>>);

#[derive(Default)]
struct HeldState {
    done: Vec<(u64, RequestStatus)>,
    released: Vec<(u64, RequestStatus)>,
}

struct HeldEngine {
    held: Held,
    backend: Arc<dyn compat::BlockBackend>,
    notifier: EventFd,
}

impl Held {
    fn release_oldest(&self) {
        let mut s = self.0.lock().unwrap();
        if !s.done.is_empty() {
            let d = s.done.remove(0);
            s.released.push(d);
        }
    }

    fn release_newest_first(&self) {
        let mut s = self.0.lock().unwrap();
        while let Some(d) = s.done.pop() {
            s.released.push(d);
        }
    }
}

impl AsyncIo for HeldEngine {
    fn notifier(&self) -> &EventFd {
        &self.notifier
    }
    unsafe fn submit(&mut self, req: &compat::IoRequest<'_>, token: u64) {
        let status = self.backend.execute(req);
        self.held.0.lock().unwrap().done.push((token, status));
    }
    fn commit(&mut self) {}
    fn next_completion(&mut self) -> Option<(u64, RequestStatus)> {
        let mut s = self.held.0.lock().unwrap();
        if s.released.is_empty() {
            None
        } else {
            Some(s.released.remove(0))
        }
    }
    fn wait(&mut self) {
        self.held.release_newest_first();
    }
    fn in_flight(&self) -> usize {
        let s = self.held.0.lock().unwrap();
        s.done.len() + s.released.len()
    }
    fn name(&self) -> &'static str {
        "held"
    }
}

/// Puts a one-sector write of `byte` at `sector` in the avail ring at `slot`.
pub(in crate::virtio::block) fn post_write(
    r: &Rig,
    mq: &MockSplitQueue<GuestMemoryMmap>,
    slot: u16,
    sector: u64,
    byte: u8,
) {
    post_write_in(r, mq, slot, slot, sector, byte)
}

/// As `post_write`, with its buffers in guest memory area `area` (so two queues' first
/// requests do not share buffers).
fn post_write_in(
    r: &Rig,
    mq: &MockSplitQueue<GuestMemoryMmap>,
    slot: u16,
    area: u16,
    sector: u64,
    byte: u8,
) {
    post_chain(r, mq, slot, area, 1, sector, &[byte; 512]); // VIRTIO_BLK_T_OUT
}

/// Puts a request of `req_type` (header sector `sector`) whose one device-readable buffer
/// holds `data` in the avail ring at `slot`: descriptors `3 * slot..`, buffers in guest
/// memory area `area`, status byte preset to 0xff.
fn post_chain(
    r: &Rig,
    mq: &MockSplitQueue<GuestMemoryMmap>,
    slot: u16,
    area: u16,
    req_type: u32,
    sector: u64,
    data: &[u8],
) {
    let base = 0x2_0000 + u64::from(area) * 0x1000;
    let mut hdr = [0u8; 16];
    hdr[..4].copy_from_slice(&req_type.to_le_bytes());
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    r.mem.write_slice(&hdr, GuestAddress(base)).unwrap();
    r.mem.write_slice(data, GuestAddress(base + 0x100)).unwrap();
    r.mem.write_obj(0xffu8, GuestAddress(base + 0x400)).unwrap();
    let first = slot * 3;
    for (i, (addr, len, flags)) in [
        (base, 16u32, NEXT),
        (base + 0x100, data.len() as u32, NEXT),
        (base + 0x400, 1, WRITE),
    ]
    .into_iter()
    .enumerate()
    {
        let at = first + i as u16;
        let d = SplitDescriptor::new(addr, len, flags, at + 1);
        mq.desc_table().store(at, RawDescriptor::from(d)).unwrap();
    }
    mq.avail()
        .ring()
        .ref_at(usize::from(slot))
        .unwrap()
        .store(first);
    mq.avail().idx().store(slot + 1);
}

fn held_worker(r: &Rig, queue: Queue, held: &Held, home: EngineHome) -> Worker {
    held_worker_kicked(r, queue, held, home, EventFd::new(0).unwrap())
}

fn held_worker_kicked(
    r: &Rig,
    queue: Queue,
    held: &Held,
    home: EngineHome,
    kick: EventFd,
) -> Worker {
    let engine = HeldEngine {
        held: held.clone(),
        backend: r.stack.backend(),
        notifier: EventFd::new(0).unwrap(),
    };
    Worker::new(
        "vdt",
        r.mem.clone(),
        queue,
        kick,
        r.stack.clone(),
        2048,
        r.interrupt.clone(),
        r.broken.clone(),
        Box::new(engine),
        home,
    )
}

/// Three writes in flight complete newest first: the used ring lists them in that
/// order, each with its status, and the guest is signalled once they are used.
#[test]
fn completions_return_out_of_order() {
    let r = rig("reverse");
    let mq = MockSplitQueue::new(&r.mem, 16);
    for slot in 0..3u16 {
        post_write(&r, &mq, slot, u64::from(slot) * 8, 0xa0 + slot as u8);
    }
    let held = Held::default();
    let mut w = held_worker(&r, mq.create_queue().unwrap(), &held, Arc::default());
    w.process_queue();
    assert_eq!(
        mq.used().idx().load(),
        0,
        "nothing is used before it completes"
    );
    assert_eq!(w.in_flight(), 3);
    held.release_newest_first();
    w.collect();
    assert_eq!(mq.used().idx().load(), 3);
    let heads: Vec<u32> = (0..3)
        .map(|i| mq.used().ring().ref_at(i).unwrap().load().id())
        .collect();
    assert_eq!(heads, vec![6, 3, 0]);
    for slot in 0..3u64 {
        let status = r.mem.read_obj::<u8>(GuestAddress(0x2_0400 + slot * 0x1000));
        assert_eq!(status.unwrap(), 0, "slot {slot}");
    }
    let disk = std::fs::read(&r.file).unwrap();
    for slot in 0..3usize {
        let at = slot * 8 * 512;
        assert!(disk[at..at + 512].iter().all(|&b| b == 0xa0 + slot as u8));
    }
    assert_ne!(r.interrupt.status() & crate::virtio::INTERRUPT_USED_RING, 0);
}

/// A reset (the handler leaving the I/O thread) with requests in flight waits for
/// them: each is completed in the used ring before the handler goes, and the engine
/// waits for the next activation.
#[test]
fn a_reset_with_requests_in_flight_completes_them_first() {
    let r = rig("reset-inflight");
    let mq = MockSplitQueue::new(&r.mem, 16);
    for slot in 0..4u16 {
        post_write(&r, &mq, slot, u64::from(slot), 0x50);
    }
    let held = Held::default();
    let home: EngineHome = Arc::default();
    let kick = EventFd::new(0).unwrap();
    let w = held_worker_kicked(
        &r,
        mq.create_queue().unwrap(),
        &held,
        home.clone(),
        kick.try_clone().unwrap(),
    );
    let io = r.stack.io_thread();
    let id = io.add(Box::new(w)).unwrap();
    // The guest's kick: the handler starts all four, and they stay in flight.
    kick.write(1).unwrap();
    let t0 = std::time::Instant::now();
    while held.0.lock().unwrap().done.len() < 4 {
        assert!(
            t0.elapsed().as_secs() < 10,
            "the handler never started them"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(mq.used().idx().load(), 0);
    io.remove(id).unwrap();
    assert_eq!(
        mq.used().idx().load(),
        4,
        "every request completed before the reset"
    );
    assert!(
        home.lock().unwrap().is_some(),
        "the engine is back for the next activation"
    );
}

/// Counts its requests between pre and post, and the most it ever had open at once, in
/// the counter pair its config names (`{"pair": N}`: tests run in parallel).
struct Overlap(usize);
static OPEN: [std::sync::atomic::AtomicU64; 2] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 2];
static MOST_OPEN: [std::sync::atomic::AtomicU64; 2] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 2];

impl interceptor_sdk::Interceptor for Overlap {
    const NAME: &'static std::ffi::CStr = c"overlap";
    fn create(ctx: interceptor_sdk::CreateContext<'_>) -> Result<Self, String> {
        let pair = ctx.config["pair"].as_u64().ok_or("overlap: no pair")?;
        Ok(Overlap(usize::from(pair == 1)))
    }
    fn pre(
        &self,
        _: &mut interceptor_sdk::Request<'_>,
        _: &mut interceptor_sdk::Slot,
    ) -> interceptor_sdk::Decision {
        let open = OPEN[self.0].fetch_add(1, Ordering::SeqCst) + 1;
        MOST_OPEN[self.0].fetch_max(open, Ordering::SeqCst);
        interceptor_sdk::Decision::Continue
    }
    fn post(
        &self,
        _: &mut interceptor_sdk::Request<'_>,
        _: interceptor_sdk::Slot,
        status: interceptor_sdk::Status,
    ) -> interceptor_sdk::Status {
        OPEN[self.0].fetch_sub(1, Ordering::SeqCst);
        status
    }
}

/// A rig whose disk has one `Overlap` instance counting in `pair`.
fn overlap_rig(tag: &str, pair: usize) -> Rig {
    let table = interceptor_sdk::static_table!(Overlap);
    rig_with(tag, "overlap", table, format!("{{\"pair\": {pair}}}"))
}

/// A rig whose disk has one instance `id` of the plugin `table`, configured by `config`.
fn rig_with(
    tag: &str,
    id: &str,
    table: &'static compat::abi::InterceptorTable,
    config: String,
) -> Rig {
    let mut r = rig(tag);
    let spec = compat::InstanceSpec {
        id: id.into(),
        plugin: compat::Plugin::from_static(id, table).unwrap(),
        config_json: config,
        enabled: true,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&r.file)
        .unwrap();
    let backend = Arc::new(RawFile::new(f, false, "vdt").unwrap());
    r.stack = Arc::new(LiveStack::start("vdt", backend, &[spec], None).unwrap());
    r
}

/// Through an interceptor, a write to another sector of a 4 KiB block that a request
/// in flight writes waits for it; a write elsewhere does not. The plugin never has the
/// two overlapping writes open at once, and all three land.
#[test]
fn overlapping_requests_through_interceptors_wait_for_each_other() {
    let r = overlap_rig("overlap", 0);
    let mq = MockSplitQueue::new(&r.mem, 16);
    post_write(&r, &mq, 0, 0, 0x11); // block 0
    post_write(&r, &mq, 1, 1, 0x22); // block 0 too: waits
    post_write(&r, &mq, 2, 64, 0x33); // block 8: goes
    let held = Held::default();
    let mut w = held_worker(&r, mq.create_queue().unwrap(), &held, Arc::default());
    w.process_queue();
    assert_eq!(
        held.0.lock().unwrap().done.len(),
        2,
        "the overlapping write waits"
    );
    assert_eq!(OPEN[0].load(Ordering::SeqCst), 2);
    held.release_newest_first();
    w.collect();
    assert_eq!(mq.used().idx().load(), 2);
    assert_eq!(held.0.lock().unwrap().done.len(), 1, "then it starts");
    held.release_newest_first();
    w.collect();
    assert_eq!(mq.used().idx().load(), 3);
    assert_eq!(OPEN[0].load(Ordering::SeqCst), 0);
    assert_eq!(MOST_OPEN[0].load(Ordering::SeqCst), 2);
    let disk = std::fs::read(&r.file).unwrap();
    assert!(disk[..512].iter().all(|&b| b == 0x11));
    assert!(disk[512..1024].iter().all(|&b| b == 0x22));
    assert!(disk[64 * 512..65 * 512].iter().all(|&b| b == 0x33));
}

/// Puts a discard (type 11) or write-zeroes (13) of `sectors` from `sector` in the avail
/// ring at `slot`.
fn post_range(
    r: &Rig,
    mq: &MockSplitQueue<GuestMemoryMmap>,
    slot: u16,
    req_type: u32,
    sector: u64,
    sectors: u32,
) {
    let mut range = [0u8; 16];
    range[..8].copy_from_slice(&sector.to_le_bytes());
    range[8..12].copy_from_slice(&sectors.to_le_bytes());
    post_chain(r, mq, slot, slot, req_type, 0, &range);
}

/// A write-zeroes through the queue zeros its range on the disk and nothing else; on a
/// device that does not offer it, it is answered UNSUPP and the disk keeps its data.
#[test]
fn write_zeroes_through_the_queue_zeros_its_range_only_where_offered() {
    let r = rig("zeroes");
    std::fs::write(&r.file, vec![0xeeu8; 1 << 20]).unwrap();
    let mq = MockSplitQueue::new(&r.mem, 16);
    post_range(&r, &mq, 0, 13, 8, 16);
    let mut w = r.worker(mq.create_queue().unwrap()).with_discard(true);
    w.process_queue();
    assert_eq!(mq.used().idx().load(), 1);
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(0x2_0400)).unwrap(), 0);
    let disk = std::fs::read(&r.file).unwrap();
    assert!(disk[..8 * 512].iter().all(|&b| b == 0xee));
    assert!(disk[8 * 512..24 * 512].iter().all(|&b| b == 0), "zeroed");
    assert!(disk[24 * 512..].iter().all(|&b| b == 0xee));

    let r = rig("zeroes-off");
    std::fs::write(&r.file, vec![0xeeu8; 1 << 20]).unwrap();
    let mq = MockSplitQueue::new(&r.mem, 16);
    post_range(&r, &mq, 0, 11, 0, 8);
    let mut w = r.worker(mq.create_queue().unwrap());
    w.process_queue();
    let unsupp = VIRTIO_BLK_S_UNSUPP as u8;
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(0x2_0400)).unwrap(),
        unsupp
    );
    assert!(std::fs::read(&r.file).unwrap().iter().all(|&b| b == 0xee));
}

/// Through an interceptor, a write on one queue to a block a write on another queue of
/// the same disk has in flight waits for it; when that one completes, the other queue is
/// kicked and starts it. The plugin never has both open at once.
#[test]
fn overlapping_requests_on_two_queues_wait_for_each_other() {
    let r = overlap_rig("overlap-queues", 1);
    let q0 = MockSplitQueue::create(&r.mem, GuestAddress(0x8_0000), 16);
    let q1 = MockSplitQueue::create(&r.mem, GuestAddress(0xa_0000), 16);
    post_write_in(&r, &q0, 0, 0, 0, 0x11);
    post_write_in(&r, &q1, 0, 1, 1, 0x22); // the same 4 KiB block
    let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
    let order = Arc::new(DiskOrder::new(
        kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
    ));
    let (h0, h1) = (Held::default(), Held::default());
    let mut w0 =
        held_worker(&r, q0.create_queue().unwrap(), &h0, Arc::default()).in_disk(order.clone(), 0);
    let mut w1 =
        held_worker(&r, q1.create_queue().unwrap(), &h1, Arc::default()).in_disk(order.clone(), 1);
    w0.process_queue();
    w1.process_queue();
    assert_eq!(h0.0.lock().unwrap().done.len(), 1);
    assert_eq!(h1.0.lock().unwrap().done.len(), 0, "queue 1's write waits");
    assert_eq!(OPEN[1].load(Ordering::SeqCst), 1);
    h0.release_newest_first();
    w0.collect();
    assert_eq!(q0.used().idx().load(), 1);
    assert_eq!(kicks[1].read().unwrap(), 1, "queue 1 is woken");
    w1.process_queue();
    assert_eq!(h1.0.lock().unwrap().done.len(), 1, "and starts its write");
    h1.release_newest_first();
    w1.collect();
    assert_eq!(q1.used().idx().load(), 1);
    assert_eq!(MOST_OPEN[1].load(Ordering::SeqCst), 1);
    let disk = std::fs::read(&r.file).unwrap();
    assert!(disk[..512].iter().all(|&b| b == 0x11));
    assert!(disk[512..1024].iter().all(|&b| b == 0x22));
}

fn used_ring_signalled(r: &Rig) -> bool {
    r.interrupt.status() & crate::virtio::INTERRUPT_USED_RING != 0
}

/// Coalescing: the first completion interrupts at once; one that comes within the delay
/// after that interrupt waits for the timer, and the timer's expiry signals it.
#[test]
fn a_completion_soon_after_an_interrupt_waits_for_the_delay() {
    let r = rig("coalesce");
    let mq = MockSplitQueue::new(&r.mem, 16);
    for slot in 0..3u16 {
        post_write(&r, &mq, slot, u64::from(slot), 0x33);
    }
    let held = Held::default();
    let timer = super::super::coalesce::timers(1).unwrap().remove(0);
    let mut w = held_worker(&r, mq.create_queue().unwrap(), &held, Arc::default())
        .with_coalescing(timer, std::time::Duration::from_millis(30));
    w.process_queue();
    held.release_oldest();
    w.collect();
    assert!(
        used_ring_signalled(&r),
        "the first completion is told at once"
    );
    r.interrupt.ack(crate::virtio::INTERRUPT_USED_RING);
    held.release_oldest();
    w.collect();
    held.release_oldest();
    w.collect();
    assert_eq!(mq.used().idx().load(), 3, "used at once");
    w.coalescing_timer_fired();
    assert!(
        !used_ring_signalled(&r),
        "within the delay: no interrupt yet"
    );
    std::thread::sleep(std::time::Duration::from_millis(60));
    w.coalescing_timer_fired();
    assert!(
        used_ring_signalled(&r),
        "the delay is over: one interrupt for both"
    );
}

/// The API's view of a queue follows it: three requests held at the engine show as in
/// flight with the avail ring taken and nothing used; once they complete, the ring
/// positions meet, nothing is in flight and the interrupt is counted.
#[test]
fn a_queues_figures_show_what_it_holds_and_what_it_has_answered() {
    let r = rig("figures");
    let mq = MockSplitQueue::new(&r.mem, 16);
    for slot in 0..3u16 {
        post_write(&r, &mq, slot, u64::from(slot) * 8, 0xb0 + slot as u8);
    }
    let held = Held::default();
    let stats = Arc::new(QueueStats::default());
    stats.set_active(1);
    let mut w = held_worker(&r, mq.create_queue().unwrap(), &held, Arc::default())
        .with_stats(stats.clone());
    let figure = |name: &str| {
        let all = stats.fields();
        assert_eq!(all.len(), 1, "one active queue");
        all[0].iter().find(|(k, _)| *k == name).map(|&(_, v)| v)
    };
    w.process_queue();
    assert_eq!(figure("next_avail"), Some(3));
    assert_eq!(figure("next_used"), Some(0));
    assert_eq!(figure("in_flight"), Some(3));
    assert_eq!(figure("interrupts"), Some(0));
    held.release_newest_first();
    w.collect();
    assert_eq!(figure("next_used"), Some(3));
    assert_eq!(figure("in_flight"), Some(0));
    assert_eq!(figure("held"), Some(0));
    assert_eq!(figure("interrupts"), Some(1));
    // The rings as guest memory holds them: the guest published 3, the device used 3.
    assert_eq!(figure("guest_avail_idx"), Some(3));
    assert_eq!(figure("used_idx"), Some(3));
}

mod pending;
mod pool;
