//! What each queue of a device is doing, for the API (`GET /devices`): its ring positions,
//! what it holds, and how often the guest kicked it and it interrupted the guest. The
//! queue's handler publishes them after each batch it serves (relaxed stores); any thread
//! reads them. A disk queue whose guest waits while `in_flight` and `held` are 0 and
//! `next_used` equals `next_avail` has answered everything it was given. A network card's
//! queues (receive first, then transmit) count the same, with `in_flight` the receive
//! buffers taken for a frame that needs more and `held` the frames waiting for buffers.

use super::block::MAX_QUEUES;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// The queues of one disk; created with the disk, before its device exists.
#[derive(Default)]
pub struct QueueStats {
    queues: [QueueState; MAX_QUEUES as usize],
    /// Queues the guest's driver set up at its last activation.
    active: AtomicUsize,
}

#[derive(Default)]
pub(crate) struct QueueState {
    /// Wake-ups by the queue's kick (the guest's notification, or the handler's own when
    /// it leaves work for the next turn).
    pub kicks: AtomicU64,
    /// Interrupts raised for the queue's used ring.
    pub interrupts: AtomicU64,
    /// The next avail-ring entry the device will take, and the next used-ring entry it
    /// will fill (both free-running, mod 2^16).
    pub next_avail: AtomicU64,
    pub next_used: AtomicU64,
    /// Requests at the engine, and held back behind an overlapping one.
    pub in_flight: AtomicU64,
    pub held: AtomicU64,
    /// Where the queue's rings lie, so a reader sees the guest's side as it is now.
    rings: Mutex<Option<Rings>>,
}

/// A queue's rings in guest memory (virtio 1.x split ring layout).
struct Rings {
    mem: GuestMemoryMmap,
    avail: GuestAddress,
    used: GuestAddress,
    size: u16,
    event_idx: bool,
}

impl QueueState {
    /// The handler took a queue whose rings are at `avail` and `used`.
    fn set_rings(&self, mem: GuestMemoryMmap, avail: u64, used: u64, size: u16, event_idx: bool) {
        let rings = Rings {
            mem,
            avail: GuestAddress(avail),
            used: GuestAddress(used),
            size,
            event_idx,
        };
        *self.rings.lock().unwrap_or_else(|p| p.into_inner()) = Some(rings);
    }

    /// The handler took `q`, whose rings lie in `mem`.
    pub(crate) fn set_queue(&self, mem: &GuestMemoryMmap, q: &Queue) {
        self.set_rings(
            mem.clone(),
            q.avail_ring(),
            q.used_ring(),
            q.size(),
            q.event_idx_enabled(),
        );
    }

    /// The rings' indices as guest memory holds them: the guest's avail index (and, with
    /// EVENT_IDX, its used_event), the device's used index (and its avail_event).
    fn ring_fields(&self) -> Vec<(&'static str, u64)> {
        let guard = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = guard.as_ref() else {
            return Vec::new();
        };
        let read = |base: GuestAddress, offset: u64| -> Option<u64> {
            let addr = base.checked_add(offset)?;
            r.mem.read_obj::<u16>(addr).ok().map(u64::from)
        };
        let mut out = Vec::new();
        let mut push = |name, v: Option<u64>| {
            if let Some(v) = v {
                out.push((name, v));
            }
        };
        // avail: flags, idx, ring[size], used_event; used: flags, idx, ring[size] of 8
        // bytes, avail_event.
        push("guest_avail_idx", read(r.avail, 2));
        push("used_idx", read(r.used, 2));
        if r.event_idx {
            push("guest_used_event", read(r.avail, 4 + 2 * u64::from(r.size)));
            push("avail_event", read(r.used, 4 + 8 * u64::from(r.size)));
        }
        out
    }
}

impl QueueStats {
    pub(crate) fn queue(&self, index: usize) -> Option<&QueueState> {
        self.queues.get(index)
    }

    pub(crate) fn set_active(&self, queues: usize) {
        self.active.store(queues.min(self.queues.len()), Relaxed);
    }

    /// Each active queue's figures by name, queue 0 first.
    pub fn fields(&self) -> Vec<Vec<(&'static str, u64)>> {
        let active = self.active.load(Relaxed).min(self.queues.len());
        self.queues[..active]
            .iter()
            .map(|q| {
                let mut f = vec![
                    ("kicks", q.kicks.load(Relaxed)),
                    ("interrupts", q.interrupts.load(Relaxed)),
                    ("next_avail", q.next_avail.load(Relaxed)),
                    ("next_used", q.next_used.load(Relaxed)),
                    ("in_flight", q.in_flight.load(Relaxed)),
                    ("held", q.held.load(Relaxed)),
                ];
                f.extend(q.ring_fields());
                f
            })
            .collect()
    }
}
