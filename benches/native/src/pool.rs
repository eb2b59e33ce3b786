//! Our side through a chain whose every instance declares `F_CONCURRENT`: as the device
//! does (`devices/src/virtio/block/worker.rs`), each request's pre hooks run on the disk's
//! hook pool (`LiveStack::begin_on_pool`) and come back to this thread, which hands what
//! still needs the backend to the engine and starts the next request on the slot.

use crate::ours::Buffers;
use crate::rng::XorShift;
use crate::BS;
use block::{AsyncIo, RequestStatus};
use compat::{BlockRequestKind, InFlight, LiveStack, Started};
use std::collections::HashSet;
use std::sync::mpsc::{channel, Sender};
use std::time::Instant;

/// Requests done, and those of them that failed.
pub struct Counts {
    pub done: u64,
    pub errors: u64,
}

struct PoolQueue<'a> {
    stack: &'a LiveStack,
    engine: &'a mut dyn AsyncIo,
    bufs: &'a Buffers,
    kind: BlockRequestKind,
    blocks: u64,
    rng: XorShift,
    /// Each slot's block while its request is out (the device orders overlapping ones).
    block_of: Vec<Option<u64>>,
    busy: HashSet<u64>,
    at_engine: Vec<Option<InFlight>>,
    tx: Sender<(usize, Started)>,
    /// Requests on the pool.
    out: usize,
    counts: Counts,
}

impl PoolQueue<'_> {
    fn start(&mut self, i: usize) -> Result<(), String> {
        let block = loop {
            let b = self.rng.below(self.blocks);
            if !self.busy.contains(&b) {
                break b;
            }
        };
        let tx = self.tx.clone();
        // SAFETY: the slot's buffer lives (in `bufs`) until every request is back (the
        // loop drains before returning), and the request is one block inside the disk.
        let handed = unsafe {
            self.stack.begin_on_pool(
                self.kind,
                block * BS,
                BS,
                vec![self.bufs.slot(i, BS as usize)],
                move |s| {
                    let _ = tx.send((i, s));
                },
            )
        };
        if !handed {
            return Err("the disk's hook pool has stopped".into());
        }
        self.busy.insert(block);
        self.block_of[i] = Some(block);
        self.out += 1;
        Ok(())
    }

    /// Slot `i`'s request is done with `status`.
    fn done(&mut self, i: usize, status: RequestStatus) {
        if let Some(b) = self.block_of.get_mut(i).and_then(Option::take) {
            self.busy.remove(&b);
        }
        self.counts.done += 1;
        if status != RequestStatus::Ok {
            self.counts.errors += 1;
        }
    }

    fn back(&mut self, i: usize, started: Started) -> bool {
        self.out -= 1;
        match started {
            Started::Done(status) => {
                self.done(i, status);
                true
            }
            Started::Backend(f) => {
                // SAFETY: as in `start`.
                unsafe { self.engine.submit(&f.io(), i as u64) };
                self.at_engine[i] = Some(f);
                false
            }
            // The pool's threads have no executor: a version-2 plugin there cannot wait.
            Started::Parked(p) => {
                drop(p);
                self.done(i, RequestStatus::IoError);
                true
            }
        }
    }
}

/// Keeps `depth` requests out until `deadline`, then drains.
#[allow(clippy::too_many_arguments)]
pub fn run(
    stack: &LiveStack,
    engine: &mut dyn AsyncIo,
    bufs: &Buffers,
    kind: BlockRequestKind,
    blocks: u64,
    depth: usize,
    deadline: Instant,
    seed: u64,
) -> Result<Counts, String> {
    let (tx, rx) = channel::<(usize, Started)>();
    let mut q = PoolQueue {
        stack,
        engine,
        bufs,
        kind,
        blocks,
        rng: XorShift::new(seed),
        block_of: vec![None; depth],
        busy: HashSet::new(),
        at_engine: (0..depth).map(|_| None).collect(),
        tx,
        out: 0,
        counts: Counts { done: 0, errors: 0 },
    };
    let mut failure = None;
    for i in 0..depth {
        if let Err(e) = q.start(i) {
            failure = Some(e);
            break;
        }
    }
    let mut open = failure.is_none();
    loop {
        let mut freed = Vec::new();
        while let Ok((i, started)) = rx.try_recv() {
            if q.back(i, started) {
                freed.push(i);
            }
        }
        q.engine.commit();
        while let Some((token, status)) = q.engine.next_completion() {
            let i = token as usize;
            let Some(f) = q.at_engine.get_mut(i).and_then(Option::take) else {
                failure = Some(format!("the engine completed unknown token {token}"));
                continue;
            };
            let status = q.stack.complete(f, status);
            q.done(i, status);
            freed.push(i);
        }
        if open && Instant::now() >= deadline {
            open = false;
        }
        let progressed = !freed.is_empty();
        for i in freed {
            if open {
                if let Err(e) = q.start(i) {
                    failure = Some(e);
                    open = false;
                }
            }
        }
        if q.out == 0 && q.engine.in_flight() == 0 {
            break;
        }
        if !progressed {
            if q.engine.in_flight() > 0 {
                q.engine.wait();
            } else if let Ok((i, started)) = rx.recv() {
                if q.back(i, started) && open {
                    if let Err(e) = q.start(i) {
                        failure = Some(e);
                        open = false;
                    }
                }
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(q.counts),
    }
}
