//! What each queue of a disk is doing, for the API (`GET /devices`): its ring positions,
//! the requests it holds, and how often the guest kicked it and it interrupted the guest.
//! The queue's handler publishes them after each batch it serves and each pass over its
//! engine's completions (relaxed stores, on its own cache line's worth of counters); any
//! thread reads them. A queue whose guest waits while `in_flight` and `held` are 0 and
//! `next_used` equals `next_avail` has answered everything it was given.

use super::MAX_QUEUES;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

/// The queues of one disk; created with the disk, before its device exists.
#[derive(Default)]
pub struct QueueStats {
    queues: [QueueState; MAX_QUEUES as usize],
    /// Queues the guest's driver set up at its last activation.
    active: AtomicUsize,
}

#[derive(Default)]
pub(super) struct QueueState {
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
}

impl QueueStats {
    pub(super) fn queue(&self, index: usize) -> Option<&QueueState> {
        self.queues.get(index)
    }

    pub(super) fn set_active(&self, queues: usize) {
        self.active.store(queues.min(self.queues.len()), Relaxed);
    }

    /// Each active queue's figures by name, queue 0 first.
    pub fn fields(&self) -> Vec<Vec<(&'static str, u64)>> {
        let active = self.active.load(Relaxed).min(self.queues.len());
        self.queues[..active]
            .iter()
            .map(|q| {
                vec![
                    ("kicks", q.kicks.load(Relaxed)),
                    ("interrupts", q.interrupts.load(Relaxed)),
                    ("next_avail", q.next_avail.load(Relaxed)),
                    ("next_used", q.next_used.load(Relaxed)),
                    ("in_flight", q.in_flight.load(Relaxed)),
                    ("held", q.held.load(Relaxed)),
                ]
            })
            .collect()
    }
}
