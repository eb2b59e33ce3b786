//! The device's handler: an event-manager subscriber on the device's thread, woken by the
//! RX queue's kick (the guest posted buffers), the TX queue's kick (the guest sent frames)
//! and the tap (frames for the guest). Every frame passes the device's chain: TX frames on
//! their way to the tap, RX frames on their way to the guest. Guest buffers are checked
//! before they are touched (inside guest memory, the right direction, a TX chain at most a
//! header and a 64 KiB frame); a broken one is counted and returned empty, never trusted.
//!
//! A guest that stops taking frames never blocks the VMM: the frame that found no buffer
//! waits, the tap is no longer watched (the kernel queues, then drops, what arrives), and
//! the next RX kick starts again.

use super::chain::{self, Buffers};
use super::tap::{Tap, VNET_HDR_LEN};
use super::{NetCounters, VnetHeader};
use crate::logger::LogLimiter;
use crate::virtio::queue_stats::QueueStats;
use crate::virtio::Interrupt;
use compat::event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use compat::{Direction, FrameBuf, IoSubscriber, NetChain, Verdict};
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, ByteValued, Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

static GUEST_LOG: LogLimiter = LogLimiter::with_defaults();
static TAP_LOG: LogLimiter = LogLimiter::with_defaults();

const RX_KICK: u32 = 0;
const TX_KICK: u32 = 1;
const TAP: u32 = 2;

/// Frames one wake-up moves at most each way, so the thread's other work (a reset, an API
/// job) runs between bursts.
const BUDGET: usize = 256;
/// Answers (frames for the guest made by the chain) waiting at most; more are dropped.
const MAX_WAITING_ANSWERS: usize = 64;

/// What became of a frame offered to the guest.
enum Delivery {
    Delivered,
    /// The guest has posted too few buffers: try again after its next RX kick.
    NoBuffers,
    /// The guest's buffer was unusable (or too small without mergeable buffers): dropped.
    Refused,
}

pub(super) struct Worker {
    pub(super) id: String,
    pub(super) mem: GuestMemoryMmap,
    pub(super) rx: Queue,
    pub(super) tx: Queue,
    pub(super) rx_kick: EventFd,
    pub(super) tx_kick: EventFd,
    pub(super) tap: Arc<Tap>,
    pub(super) chain: Arc<NetChain>,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) broken: Arc<AtomicBool>,
    pub(super) counters: Arc<NetCounters>,
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may span several RX chains.
    pub(super) mergeable: bool,
    /// The frame read from the tap (or answered by the chain) waiting for guest buffers.
    pub(super) rx_frame: FrameBuf,
    pub(super) rx_pending: bool,
    /// RX buffers taken for `rx_frame` that were too few for it: used by the next try.
    pub(super) rx_held: Vec<Buffers>,
    /// Frames the chain answered toward the guest.
    pub(super) answers_for_guest: VecDeque<Vec<u8>>,
    pub(super) tx_frame: FrameBuf,
    /// The tap is in the epoll set (it leaves it while the guest has no RX buffers).
    pub(super) tap_watched: bool,
    /// The tap failed (a read error, or the end of the file): nothing more is read from it
    /// until the guest resets the card, and it leaves the epoll set, where it would be
    /// ready forever.
    pub(super) tap_failed: bool,
    /// What the tap may hand us unfinished (`TUN_F_*`), set when the handler starts: on
    /// the device's thread, whose filter allows that one ioctl.
    pub(super) tap_offloads: u32,
    /// The features the guest accepted (what its TX headers may ask for).
    pub(super) acked: u64,
    /// The MTU the guest was told: no frame it transmits may be longer.
    pub(super) mtu: u16,
    /// Used buffers added since the guest was last notified, per queue.
    pub(super) rx_used: bool,
    pub(super) tx_used: bool,
    /// Each queue's figures for the API (receive is queue 0, transmit queue 1).
    pub(super) stats: Arc<QueueStats>,
}

impl Worker {
    /// Tells `stats` where both queues' rings are (at activation).
    pub(super) fn publish_rings(&self) {
        for (i, q) in [&self.rx, &self.tx].into_iter().enumerate() {
            if let Some(s) = self.stats.queue(i) {
                s.set_queue(&self.mem, q);
            }
        }
    }

    /// Stores both queues' positions and what the card holds, for the API.
    fn publish(&self) {
        for (i, q) in [&self.rx, &self.tx].into_iter().enumerate() {
            if let Some(s) = self.stats.queue(i) {
                s.next_avail.store(u64::from(q.next_avail()), Relaxed);
                s.next_used.store(u64::from(q.next_used()), Relaxed);
            }
        }
        if let Some(s) = self.stats.queue(0) {
            s.in_flight.store(self.rx_held.len() as u64, Relaxed);
            let waiting = usize::from(self.rx_pending) + self.answers_for_guest.len();
            s.held.store(waiting as u64, Relaxed);
        }
    }

    fn fail(&mut self, why: &str) {
        crate::limited_error!(
            GUEST_LOG,
            "net-{}: {why}; the device needs a reset",
            self.id
        );
        self.broken.store(true, SeqCst);
        self.interrupt.signal_config_change();
    }

    fn add_used(&mut self, rx: bool, head: u16, len: u32) -> bool {
        let q = if rx { &mut self.rx } else { &mut self.tx };
        if q.add_used(&self.mem, head, len).is_err() {
            self.fail("cannot write the used ring");
            return false;
        }
        true
    }

    /// Notes that a queue has new used buffers; the guest hears of them at the end of the
    /// wake-up (`notify_guest`), once for both queues.
    fn signal(&mut self, rx: bool) {
        if rx {
            self.rx_used = true;
        } else {
            self.tx_used = true;
        }
    }

    /// One interrupt for whatever both queues used since the last one, if the guest asked
    /// for it (VIRTIO_RING_F_EVENT_IDX). The card has one interrupt for both queues: a
    /// wake-up that sent and received costs the guest one interrupt, not two (each costs it
    /// a read and a write of the MMIO transport's status registers, exits to the VMM).
    pub(super) fn notify_guest(&mut self) {
        let mut needed = false;
        for rx in [true, false] {
            let (used, q) = if rx {
                (&mut self.rx_used, &mut self.rx)
            } else {
                (&mut self.tx_used, &mut self.tx)
            };
            if std::mem::take(used) {
                // Asked of each queue with news: it counts what was added since.
                needed |= q.needs_notification(&self.mem).unwrap_or(true);
            }
        }
        if needed {
            self.interrupt.signal_used_queue();
            if let Some(s) = self.stats.queue(0) {
                s.interrupts.fetch_add(1, Relaxed);
            }
        }
    }

    // ---- transmit: guest -> chain -> tap ----

    /// Sends what the guest queued on TX, up to the budget.
    pub(super) fn process_tx(&mut self) {
        if self.broken.load(SeqCst) {
            return;
        }
        let mem = self.mem.clone();
        let (mut sent, mut empty_passes) = (0usize, 0u32);
        loop {
            let _ = self.tx.disable_notification(&mem);
            let before = sent;
            while sent < BUDGET {
                let chain = match self.tx.iter(&mem) {
                    Ok(mut chains) => chains.next(),
                    Err(e) => return self.fail(&format!("the TX avail ring is invalid ({e})")),
                };
                let Some(chain) = chain else { break };
                let limit = chain::MAX_TX_CHAIN;
                match chain::buffers(&mem, chain, false, limit) {
                    Ok(b) => {
                        // Read, then publish: once used, the guest may reuse the buffers
                        // (Linux reclaims used TX buffers without waiting for an interrupt).
                        self.transmit(&mem, &b);
                        if !self.add_used(false, b.head, 0) {
                            return;
                        }
                    }
                    Err((head, why)) => {
                        self.counters.tx_bad_chains.fetch_add(1, Relaxed);
                        crate::limited_warn!(GUEST_LOG, "net-{}: TX {why}; dropped", self.id);
                        if !self.add_used(false, head, 0) {
                            return;
                        }
                    }
                }
                sent += 1;
            }
            if sent >= BUDGET {
                let _ = self.tx_kick.write(1);
                break;
            }
            empty_passes = if sent > before { 0 } else { empty_passes + 1 };
            match self.tx.enable_notification(&mem) {
                Ok(true) if empty_passes < 2 => continue,
                // Nothing found twice in a row while the ring says there is more: the guest
                // laid its rings over each other (our own writes move its avail index).
                Ok(true) => return self.fail("the TX avail index moves under the used ring"),
                Ok(false) => break,
                Err(_) => return self.fail("cannot access the TX avail ring"),
            }
        }
        if sent > 0 {
            self.signal(false);
        }
    }

    /// One TX chain: header and frame copied out of guest memory, the chain run, the frame
    /// written to the tap.
    fn transmit(&mut self, mem: &GuestMemoryMmap, b: &Buffers) {
        let checked = chain::read_tx(mem, b, &mut self.tx_frame).and_then(|header| {
            chain::check_tx_header(&header, self.tx_frame.len(), self.acked, self.mtu)
                .map(|()| header)
        });
        let header = match checked {
            Ok(h) => h,
            Err(why) => {
                self.counters.tx_bad_chains.fetch_add(1, Relaxed);
                crate::limited_warn!(GUEST_LOG, "net-{}: TX {why}; dropped", self.id);
                return;
            }
        };
        self.tx_frame.header = header.into();
        if !self.chain.is_empty() {
            let mut answers = Vec::new();
            let verdict = self
                .chain
                .run(Direction::Transmit, &mut self.tx_frame, &mut answers);
            self.queue_answers_for_guest(answers);
            match verdict {
                Verdict::Pass => {}
                Verdict::Taken => {
                    self.counters.tx_taken.fetch_add(1, Relaxed);
                    return;
                }
                Verdict::Dropped => {
                    self.counters.tx_dropped.fetch_add(1, Relaxed);
                    return;
                }
            }
        }
        let mut hdr = VnetHeader::from(self.tx_frame.header);
        hdr.0.num_buffers = 0;
        match self.tap.write_frame(hdr.as_slice(), self.tx_frame.bytes()) {
            Ok(_) => {
                self.counters.tx_frames.fetch_add(1, Relaxed);
                self.counters
                    .tx_bytes
                    .fetch_add(self.tx_frame.len() as u64, Relaxed);
            }
            Err(e) => {
                // A full tap (EAGAIN) or a frame it refuses: dropped, as a NIC would.
                self.counters.tx_dropped.fetch_add(1, Relaxed);
                if e.kind() != io::ErrorKind::WouldBlock {
                    crate::limited_warn!(TAP_LOG, "net-{}: tap write: {e}", self.id);
                }
            }
        }
    }

    fn queue_answers_for_guest(&mut self, answers: Vec<Vec<u8>>) {
        for a in answers {
            if self.answers_for_guest.len() >= MAX_WAITING_ANSWERS {
                self.counters.rx_dropped.fetch_add(1, Relaxed);
                continue;
            }
            self.answers_for_guest.push_back(a);
        }
    }

    // ---- receive: tap -> chain -> guest ----

    /// Delivers frames to the guest until the tap is empty, the guest has no buffers, or
    /// the budget is spent.
    pub(super) fn process_rx(&mut self, ops: Option<&mut EventOps>) {
        if self.broken.load(SeqCst) {
            return;
        }
        let mut used = false;
        let mut starved = false;
        for _ in 0..BUDGET {
            if !self.rx_pending && !self.next_frame() {
                break;
            }
            match self.deliver() {
                Some(Delivery::Delivered) => {
                    self.rx_pending = false;
                    used = true;
                }
                Some(Delivery::Refused) => {
                    self.rx_pending = false;
                    used = true;
                    self.counters.rx_dropped.fetch_add(1, Relaxed);
                }
                Some(Delivery::NoBuffers) => {
                    starved = true;
                    break;
                }
                None => return, // broken
            }
        }
        if used {
            self.signal(true);
        }
        if let Some(ops) = ops {
            self.watch_tap(ops, !starved && !self.tap_failed);
        }
    }

    fn watch_tap(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.tap_watched {
            return;
        }
        let ev = Events::with_data(self.tap.as_ref(), TAP, EventSet::IN);
        let r = if on { ops.add(ev) } else { ops.remove(ev) };
        match r {
            Ok(()) => self.tap_watched = on,
            Err(e) => tracing::error!("net-{}: cannot (un)watch the tap: {e}", self.id),
        }
    }

    /// Loads the next frame for the guest into `rx_frame`: an answer first, then one from
    /// the tap run through the chain. False when there is none.
    fn next_frame(&mut self) -> bool {
        if let Some(a) = self.answers_for_guest.pop_front() {
            let n = a.len().min(self.rx_frame.capacity());
            self.rx_frame.buffer_mut()[..n].copy_from_slice(&a[..n]);
            self.rx_frame.set_len(n);
            self.rx_frame.header = Default::default();
            self.rx_pending = true;
            return true;
        }
        // Frames read and not kept (too short, dropped or taken by the chain) count against
        // the wake-up's budget too: a flood of them must not hold the thread. What is left
        // waits on the tap, which stays ready and wakes the thread again.
        for _ in 0..BUDGET {
            if self.tap_failed {
                return false;
            }
            let mut hdr = VnetHeader::default();
            let n = match self
                .tap
                .read_frame(hdr.as_mut_slice(), self.rx_frame.buffer_mut())
            {
                Ok(0) => {
                    self.tap_failure("it hung up (end of file)");
                    return false;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.tap_failure(&e.to_string());
                    return false;
                }
            };
            if n < VNET_HDR_LEN + abi_min_frame() {
                self.counters.rx_dropped.fetch_add(1, Relaxed);
                continue;
            }
            self.rx_frame.set_len(n - VNET_HDR_LEN);
            self.rx_frame.header = hdr.into();
            if !self.chain.is_empty() {
                let mut answers = Vec::new();
                let verdict = self
                    .chain
                    .run(Direction::Receive, &mut self.rx_frame, &mut answers);
                for a in answers {
                    // Answers to a received frame go out on the tap, as they are.
                    let zero = VnetHeader::default();
                    if self.tap.write_frame(zero.as_slice(), &a).is_err() {
                        self.counters.tx_dropped.fetch_add(1, Relaxed);
                    }
                }
                match verdict {
                    Verdict::Pass => {}
                    Verdict::Taken => {
                        self.counters.rx_taken.fetch_add(1, Relaxed);
                        continue;
                    }
                    Verdict::Dropped => {
                        self.counters.rx_dropped.fetch_add(1, Relaxed);
                        continue;
                    }
                }
            }
            self.rx_pending = true;
            return true;
        }
        false
    }

    /// The tap cannot be read any more: said once, and the card stops receiving until the
    /// guest resets it (it still transmits).
    fn tap_failure(&mut self, why: &str) {
        self.tap_failed = true;
        crate::limited_error!(
            TAP_LOG,
            "net-{}: tap read: {why}; the card stops receiving until it is reset",
            self.id
        );
    }

    /// Writes `rx_frame` (behind its header) into the guest's RX buffers. `None` if the
    /// guest broke the queue.
    fn deliver(&mut self) -> Option<Delivery> {
        let mem = self.mem.clone();
        let total = VNET_HDR_LEN + self.rx_frame.len();
        // Buffers taken for this frame by an earlier try that found too few.
        let mut taken = std::mem::take(&mut self.rx_held);
        let mut room: usize = taken.iter().map(|b| b.total).sum();
        let mut empty_passes = 0u32;
        loop {
            let before = taken.len();
            while room < total && (taken.is_empty() || self.mergeable) {
                let chain = match self.rx.iter(&mem) {
                    Ok(mut chains) => chains.next(),
                    Err(e) => {
                        self.fail(&format!("the RX avail ring is invalid ({e})"));
                        return None;
                    }
                };
                let Some(chain) = chain else { break };
                match chain::buffers(&mem, chain, true, usize::MAX) {
                    Ok(b) => {
                        room = room.saturating_add(b.total);
                        taken.push(b);
                    }
                    Err((head, why)) => {
                        // The broken buffer and those taken before it go back empty, with
                        // the frame dropped: nothing the guest wrote there is trusted.
                        self.counters.rx_bad_buffers.fetch_add(1, Relaxed);
                        crate::limited_warn!(GUEST_LOG, "net-{}: RX {why}; refused", self.id);
                        let heads: Vec<u16> = taken.iter().map(|b| b.head).chain([head]).collect();
                        return self.return_empty(&heads);
                    }
                }
            }
            if room >= total {
                break;
            }
            // One buffer per frame and this one is too small, or every buffer of the ring
            // together is: the frame can never fit, so it is dropped.
            if !taken.is_empty() && (!self.mergeable || taken.len() >= usize::from(self.rx.size()))
            {
                self.counters.rx_bad_buffers.fetch_add(1, Relaxed);
                let heads: Vec<u16> = taken.iter().map(|b| b.head).collect();
                return self.return_empty(&heads);
            }
            // Too few buffers yet: keep those taken (the ring is read to its end, so with
            // VIRTIO_RING_F_EVENT_IDX the guest's next buffer passes `avail_event` and
            // kicks; putting them back would leave the event behind and the kick would
            // never come) and ask for a kick, unless buffers arrived meanwhile.
            empty_passes = if taken.len() > before {
                0
            } else {
                empty_passes + 1
            };
            match self.rx.enable_notification(&mem) {
                Ok(true) if empty_passes < 2 => continue,
                // As on TX: rings laid over each other.
                Ok(true) => {
                    self.rx_held = taken;
                    self.fail("the RX avail index moves under the used ring");
                    return None;
                }
                Ok(false) => {
                    self.rx_held = taken;
                    return Some(Delivery::NoBuffers);
                }
                Err(_) => {
                    self.fail("cannot access the RX avail ring");
                    return None;
                }
            }
        }
        let mut header = VnetHeader::from(self.rx_frame.header);
        header.0.num_buffers = (taken.len() as u16).to_le();
        let frame = self.rx_frame.bytes();
        let (hdr_bytes, mut pos) = (header.as_slice(), 0usize);
        let mut lens = Vec::with_capacity(taken.len());
        for b in &taken {
            let mut written = 0usize;
            for &(addr, len) in &b.ranges {
                let mut done = 0usize;
                while done < len && pos < total {
                    let (src, n) = if pos < VNET_HDR_LEN {
                        let n = (VNET_HDR_LEN - pos).min(len - done);
                        (&hdr_bytes[pos..pos + n], n)
                    } else {
                        let off = pos - VNET_HDR_LEN;
                        let n = (frame.len() - off).min(len - done);
                        (&frame[off..off + n], n)
                    };
                    let Some(dst) = addr.checked_add(done as u64) else {
                        break;
                    };
                    // Checked in `buffers`: inside guest memory.
                    let _ = mem.write_slice(src, dst);
                    done += n;
                    pos += n;
                }
                written += done;
            }
            lens.push((b.head, written as u32));
        }
        for (head, len) in lens {
            if !self.add_used(true, head, len) {
                return None;
            }
        }
        self.counters.rx_frames.fetch_add(1, Relaxed);
        self.counters
            .rx_bytes
            .fetch_add(self.rx_frame.len() as u64, Relaxed);
        Some(Delivery::Delivered)
    }
}

impl Worker {
    /// Returns these RX buffers to the guest unwritten (the frame is dropped).
    fn return_empty(&mut self, heads: &[u16]) -> Option<Delivery> {
        for &h in heads {
            if !self.add_used(true, h, 0) {
                return None;
            }
        }
        Some(Delivery::Refused)
    }
}

fn abi_min_frame() -> usize {
    compat::abi::NET_FRAME_MIN as usize
}

impl MutEventSubscriber for Worker {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if !events.event_set().contains(EventSet::IN) {
            if events.data() == TAP {
                self.tap_failure("the tap reports an error or a hang-up");
                self.watch_tap(ops, false);
            } else {
                tracing::error!("net-{}: a queue eventfd failed", self.id);
            }
            return;
        }
        match events.data() {
            RX_KICK => {
                let _ = self.rx_kick.read();
                if let Some(s) = self.stats.queue(0) {
                    s.kicks.fetch_add(1, Relaxed);
                }
                self.process_rx(Some(ops));
            }
            TX_KICK => {
                let _ = self.tx_kick.read();
                if let Some(s) = self.stats.queue(1) {
                    s.kicks.fetch_add(1, Relaxed);
                }
                self.process_tx();
                if !self.answers_for_guest.is_empty() {
                    self.process_rx(Some(ops));
                }
            }
            _ => {
                self.process_rx(Some(ops));
                // What the guest queued meanwhile (TCP's acks for what it just received)
                // goes now, and its completions share this wake-up's interrupt.
                self.process_tx();
            }
        }
        if self.broken.load(SeqCst) {
            // Nothing is served until the guest resets the card: a tap left in the epoll
            // set with frames unread would wake this thread at once, forever.
            self.watch_tap(ops, false);
        }
        self.notify_guest();
        self.publish();
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Failing leaves the tap handing over finished frames only, which the guest takes
        // whatever it negotiated.
        if let Err(e) = self.tap.set_offload(self.tap_offloads) {
            tracing::warn!("net-{}: {e}", self.id);
        }
        for (fd, data) in [(&self.rx_kick, RX_KICK), (&self.tx_kick, TX_KICK)] {
            if let Err(e) = ops.add(Events::with_data(fd, data, EventSet::IN)) {
                tracing::error!("net-{}: cannot watch a queue eventfd: {e}", self.id);
            }
        }
        self.tap_watched = false;
        self.watch_tap(ops, !self.tap_failed);
    }
}

impl IoSubscriber for Worker {
    /// Serves what is pending now, both ways, as a wake-up would: frames waiting on the tap
    /// (and answers) for the guest, what the guest queued to send, and the answers that
    /// made.
    fn drain(&mut self) {
        self.process_rx(None);
        self.process_tx();
        if !self.answers_for_guest.is_empty() {
            self.process_rx(None);
        }
        self.notify_guest();
        self.publish();
    }

    fn quiesce_step(&mut self) -> bool {
        // Nothing is ever in flight: each frame is done when its handler returns.
        true
    }
}
