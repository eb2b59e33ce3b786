//! Requests through a chain that declares `F_CONCURRENT` start on the disk's hook pool:
//! side by side, still ordered, and a reset waits for them.

use super::*;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

/// Per test (tests may share a process): requests inside `pre` now, the most at once,
/// those of block 0 at once at most, pre calls made off the pool, and the gate.
struct Counts {
    inside: AtomicU64,
    most: AtomicU64,
    block0: AtomicU64,
    block0_most: AtomicU64,
    off_pool: AtomicU64,
    gate_open: AtomicBool,
}

static COUNTS: [Counts; 2] = [const {
    Counts {
        inside: AtomicU64::new(0),
        most: AtomicU64::new(0),
        block0: AtomicU64::new(0),
        block0_most: AtomicU64::new(0),
        off_pool: AtomicU64::new(0),
        gate_open: AtomicBool::new(false),
    }
}; 2];

/// A concurrent plugin whose `pre` waits (up to 2 s) until two requests are inside it at
/// once, or, with `"gate": true`, until the test opens its gate.
struct Rendezvous {
    c: &'static Counts,
    gate: bool,
}

impl interceptor_sdk::Interceptor for Rendezvous {
    const NAME: &'static std::ffi::CStr = c"rendezvous";
    const FLAGS: u32 = compat::abi::F_CONCURRENT;
    fn create(ctx: interceptor_sdk::CreateContext<'_>) -> Result<Self, String> {
        let pair = ctx.config["pair"].as_u64().ok_or("rendezvous: no pair")?;
        Ok(Rendezvous {
            c: &COUNTS[usize::from(pair == 1)],
            gate: ctx.config["gate"].as_bool().unwrap_or(false),
        })
    }
    fn pre(
        &self,
        req: &mut interceptor_sdk::Request<'_>,
        _: &mut interceptor_sdk::Slot,
    ) -> interceptor_sdk::Decision {
        let c = self.c;
        let on_pool = std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("hooks-vdt-"));
        if !on_pool {
            c.off_pool.fetch_add(1, Ordering::SeqCst);
        }
        let in0 = req.offset() < 4096;
        if in0 {
            let n = c.block0.fetch_add(1, Ordering::SeqCst) + 1;
            c.block0_most.fetch_max(n, Ordering::SeqCst);
        }
        let n = c.inside.fetch_add(1, Ordering::SeqCst) + 1;
        c.most.fetch_max(n, Ordering::SeqCst);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) {
            let met = if self.gate {
                c.gate_open.load(Ordering::SeqCst)
            } else {
                c.most.load(Ordering::SeqCst) >= 2
            };
            if met {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        c.inside.fetch_sub(1, Ordering::SeqCst);
        if in0 {
            c.block0.fetch_sub(1, Ordering::SeqCst);
        }
        interceptor_sdk::Decision::Continue
    }
}

fn pool_rig(tag: &str, pair: usize, gate: bool) -> Rig {
    let table = interceptor_sdk::static_table!(Rendezvous);
    let config = format!("{{\"pair\": {pair}, \"gate\": {gate}}}");
    rig_with(tag, "rendezvous", table, config)
}

/// Two writes to different blocks are inside the plugin's `pre` at once, on the pool's
/// threads; a third to the first one's block waits for it (never inside with it); all
/// three land and are answered.
#[test]
fn requests_through_a_concurrent_chain_start_side_by_side_on_the_hook_pool() {
    let r = pool_rig("pool", 0, false);
    assert!(r.stack.concurrent());
    let c = &COUNTS[0];
    let mq = MockSplitQueue::new(&r.mem, 16);
    post_write(&r, &mq, 0, 0, 0x11); // block 0
    post_write(&r, &mq, 1, 64, 0x22); // block 8
    post_write(&r, &mq, 2, 1, 0x33); // block 0 again: waits for the first
    let mut w = r.worker(mq.create_queue().unwrap());
    w.process_queue();
    let t0 = Instant::now();
    while !w.step() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the pool never answered"
        );
    }
    assert_eq!(mq.used().idx().load(), 3);
    for slot in 0..3u64 {
        let status = r.mem.read_obj::<u8>(GuestAddress(0x2_0400 + slot * 0x1000));
        assert_eq!(status.unwrap(), 0, "slot {slot}");
    }
    let disk = std::fs::read(&r.file).unwrap();
    assert!(disk[..512].iter().all(|&b| b == 0x11));
    assert!(disk[512..1024].iter().all(|&b| b == 0x33));
    assert!(disk[64 * 512..65 * 512].iter().all(|&b| b == 0x22));
    let counters = r.stack.counters();
    assert_eq!(counters.started_on_pool.load(Ordering::SeqCst), 3);
    assert_eq!(
        c.off_pool.load(Ordering::SeqCst),
        0,
        "every pre ran on the pool"
    );
    assert_eq!(
        c.block0_most.load(Ordering::SeqCst),
        1,
        "block 0's writes in order"
    );
    if compat::HookPool::default_threads() >= 2 {
        assert_eq!(c.most.load(Ordering::SeqCst), 2, "two inside pre at once");
    }
}

/// A reset (the handler leaving the I/O thread) while requests are inside a plugin's
/// `pre` on the pool waits for them: `remove` returns only after the gate opens, and both
/// are answered by then.
#[test]
fn a_reset_waits_for_requests_on_the_hook_pool() {
    let r = pool_rig("pool-reset", 1, true);
    let c = &COUNTS[1];
    let mq = MockSplitQueue::new(&r.mem, 16);
    post_write(&r, &mq, 0, 0, 0x44);
    post_write(&r, &mq, 1, 64, 0x55);
    let kick = EventFd::new(0).unwrap();
    let w = Worker::new(
        "vdt",
        r.mem.clone(),
        mq.create_queue().unwrap(),
        kick.try_clone().unwrap(),
        r.stack.clone(),
        2048,
        r.interrupt.clone(),
        r.broken.clone(),
        Box::new(block::SyncEngine::new(r.stack.backend()).unwrap()),
        Arc::default(),
    )
    .with_hook_pool(pool_eventfd());
    let io = r.stack.io_thread();
    let id = io.add(Box::new(w)).unwrap();
    kick.write(1).unwrap();
    let t0 = Instant::now();
    while c.inside.load(Ordering::SeqCst) < compat::HookPool::default_threads().min(2) as u64 {
        assert!(t0.elapsed() < Duration::from_secs(10), "never reached pre");
        std::thread::sleep(Duration::from_millis(1));
    }
    let removed = Arc::new(AtomicBool::new(false));
    let stack = r.stack.clone();
    let done = removed.clone();
    let reset = std::thread::spawn(move || {
        stack.io_thread().remove(id).unwrap();
        done.store(true, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !removed.load(Ordering::SeqCst),
        "the reset waits for the pool"
    );
    assert_eq!(mq.used().idx().load(), 0);
    c.gate_open.store(true, Ordering::SeqCst);
    reset.join().unwrap();
    assert_eq!(
        mq.used().idx().load(),
        2,
        "both answered before the reset ended"
    );
    let disk = std::fs::read(&r.file).unwrap();
    assert!(disk[..512].iter().all(|&b| b == 0x44));
    assert!(disk[64 * 512..65 * 512].iter().all(|&b| b == 0x55));
}
