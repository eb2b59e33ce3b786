//! virtio-net over a tap: a receive queue and a transmit queue served on the device's own
//! thread (`worker.rs`), every frame through the device's interceptor chain
//! (`compat::NetChain`): transmitted frames at the pre-processing point on their way to the
//! tap, received frames at the post-processing point on their way to the guest.
//!
//! Offloads: unless an instance of the chain needs plain frames (`F_NET_PLAIN_FRAMES`), the
//! device offers the guest checksum offload both ways and TCP segmentation offload both
//! ways, and tells the tap (TUNSETOFFLOAD) what the guest agreed to finish, so large
//! segments and partial checksums pass between the guest and the host kernel unchanged
//! with their virtio header. Receive buffers may be merged (VIRTIO_NET_F_MRG_RXBUF).

pub mod chain;
pub mod tap;
mod worker;

pub use tap::{Tap, TapError};

use super::queue_stats::QueueStats;
use super::{ActivateError, Interrupt, VirtioDevice};
use compat::event_manager::SubscriberId;
use compat::{FrameBuf, IoThread, NetChain, MAX_FRAME};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    virtio_net_config, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub const VIRTIO_ID_NET: u32 = 1;
pub const QUEUE_SIZE: u16 = 256;
/// The smallest MTU the guest may be told (IPv4's minimum).
pub const MIN_MTU: u16 = 68;
/// The default link MTU.
pub const DEFAULT_MTU: u16 = 1500;

/// `struct virtio_net_hdr_v1` as it lies in guest memory and on the tap.
#[derive(Clone, Copy, Debug, Default)]
#[repr(transparent)]
pub struct VnetHeader(pub compat::abi::NetHeader);

// SAFETY: a plain-data struct of integers, no padding (a test checks its size): any bytes
// are a valid value.
unsafe impl ByteValued for VnetHeader {}

impl From<compat::abi::NetHeader> for VnetHeader {
    fn from(h: compat::abi::NetHeader) -> VnetHeader {
        VnetHeader(h)
    }
}

impl From<VnetHeader> for compat::abi::NetHeader {
    fn from(h: VnetHeader) -> compat::abi::NetHeader {
        h.0
    }
}

/// The device's counters (all since start).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames and bytes (without the virtio header) delivered to the guest.
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames for the guest dropped: its buffers were broken or too small, the chain
    /// dropped them, or too many answers waited.
    pub rx_dropped: AtomicU64,
    /// Frames for the guest an interceptor took (answered or filtered).
    pub rx_taken: AtomicU64,
    /// RX buffers refused (outside guest memory, read-only, too small).
    pub rx_bad_buffers: AtomicU64,
    /// Frames and bytes written to the tap.
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames from the guest dropped: the tap was full or refused them, or the chain
    /// dropped them.
    pub tx_dropped: AtomicU64,
    /// Frames from the guest an interceptor took.
    pub tx_taken: AtomicU64,
    /// TX chains refused (outside guest memory, writable, too long or too short, an offload
    /// header asking for what was not negotiated, a frame longer than the MTU the guest was
    /// told).
    pub tx_bad_chains: AtomicU64,
}

impl NetCounters {
    /// Each counter by name, for the API and the exit report.
    pub fn fields(&self) -> [(&'static str, u64); 10] {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("rx_frames", g(&self.rx_frames)),
            ("rx_bytes", g(&self.rx_bytes)),
            ("rx_dropped", g(&self.rx_dropped)),
            ("rx_taken", g(&self.rx_taken)),
            ("rx_bad_buffers", g(&self.rx_bad_buffers)),
            ("tx_frames", g(&self.tx_frames)),
            ("tx_bytes", g(&self.tx_bytes)),
            ("tx_dropped", g(&self.tx_dropped)),
            ("tx_taken", g(&self.tx_taken)),
            ("tx_bad_chains", g(&self.tx_bad_chains)),
        ]
    }
}

/// The config space, as the virtio spec lays it out.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ConfigSpace(virtio_net_config);

// SAFETY: a packed plain-data struct of integers: any bytes are a valid value.
unsafe impl ByteValued for ConfigSpace {}

pub struct Net {
    id: String,
    mac: [u8; 6],
    /// The MTU the guest is told: the link's less the chain's headroom.
    guest_mtu: u16,
    tap: Arc<Tap>,
    chain: Arc<NetChain>,
    io: Arc<IoThread>,
    counters: Arc<NetCounters>,
    stats: Arc<QueueStats>,
    broken: Arc<AtomicBool>,
    serving: Option<SubscriberId>,
    queue_sizes: [u16; 2],
}

impl Net {
    /// A network card over `tap` with the guest MAC `mac` on a link of `mtu` bytes, its
    /// frames through `chain`, served on `io` (the thread that calls the chain's hooks),
    /// counting into `counters`.
    pub fn new(
        id: &str,
        tap: Tap,
        mac: [u8; 6],
        mtu: u16,
        chain: Arc<NetChain>,
        io: Arc<IoThread>,
        counters: Arc<NetCounters>,
    ) -> Result<Net, String> {
        let headroom = u16::try_from(chain.headroom()).unwrap_or(u16::MAX);
        let guest_mtu = mtu.saturating_sub(headroom);
        if guest_mtu < MIN_MTU {
            return Err(format!(
                "net {id}: an MTU of {mtu} less the interceptors' {headroom} bytes of headroom \
                 is under {MIN_MTU}"
            ));
        }
        Ok(Net {
            id: id.into(),
            mac,
            guest_mtu,
            tap: Arc::new(tap),
            chain,
            io,
            counters,
            stats: Arc::default(),
            broken: Arc::default(),
            serving: None,
            queue_sizes: [QUEUE_SIZE; 2],
        })
    }

    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// Publishes both queues' figures into `stats` (made before the device, for the API).
    pub fn with_queue_stats(mut self, stats: Arc<QueueStats>) -> Net {
        self.stats = stats;
        self
    }

    /// Both queues' figures (receive, then transmit): ring positions, buffers held, kicks
    /// and interrupts, as a disk's queues show them.
    pub fn queue_stats(&self) -> Arc<QueueStats> {
        self.stats.clone()
    }

    /// The MTU the guest is told.
    pub fn guest_mtu(&self) -> u16 {
        self.guest_mtu
    }

    fn offloads(&self) -> bool {
        !self.chain.plain_frames()
    }
}

/// The tap offloads (`TUN_F_*`) matching what the guest agreed to finish.
fn tap_offloads(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let mut f = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        f |= tap::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            f |= tap::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            f |= tap::TUN_F_TSO6;
        }
    }
    f
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_NET_F_MTU)
            | (1 << VIRTIO_NET_F_MRG_RXBUF);
        if self.offloads() {
            for bit in [
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
            ] {
                f |= 1 << bit;
            }
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = ConfigSpace(virtio_net_config {
            mac: self.mac,
            status: (VIRTIO_NET_S_LINK_UP as u16).to_le(),
            max_virtqueue_pairs: 1u16.to_le(),
            mtu: self.guest_mtu.to_le(),
            ..Default::default()
        });
        super::read_config_space(config.as_slice(), offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        acked_features: u64,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if self.serving.is_some() {
            return Err(ActivateError("already activated".into()));
        }
        let (Ok([mut rx, mut tx]), Ok([rx_kick, tx_kick])) = (
            <[Queue; 2]>::try_from(queues),
            <[EventFd; 2]>::try_from(kicks),
        ) else {
            return Err(ActivateError(
                "virtio-net needs its RX and TX queues".into(),
            ));
        };
        let event_idx = acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        let offloads = if self.offloads() {
            tap_offloads(acked_features)
        } else {
            0
        };
        let capacity = MAX_FRAME + self.chain.headroom() as usize;
        self.broken.store(false, Ordering::SeqCst);
        let worker = worker::Worker {
            id: self.id.clone(),
            mem,
            rx,
            tx,
            rx_kick,
            tx_kick,
            tap: self.tap.clone(),
            chain: self.chain.clone(),
            interrupt,
            broken: self.broken.clone(),
            counters: self.counters.clone(),
            mergeable: acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx_frame: FrameBuf::with_capacity(capacity),
            rx_pending: false,
            rx_held: Vec::new(),
            answers_for_guest: VecDeque::new(),
            tx_frame: FrameBuf::with_capacity(capacity),
            tap_watched: false,
            tap_failed: false,
            tap_offloads: offloads,
            acked: acked_features & self.features(),
            mtu: self.guest_mtu,
            rx_used: false,
            tx_used: false,
            stats: self.stats.clone(),
        };
        self.stats.set_active(2);
        worker.publish_rings();
        let id = self
            .io
            .add(Box::new(worker))
            .map_err(|e| ActivateError(e.to_string()))?;
        self.serving = Some(id);
        Ok(())
    }

    fn reset(&mut self) -> bool {
        let Some(id) = self.serving.take() else {
            return true;
        };
        match self.io.remove(id) {
            Ok(()) => {
                self.broken.store(false, Ordering::SeqCst);
                true
            }
            Err(e) => {
                tracing::error!("net-{}: cannot reset: {e}", self.id);
                false
            }
        }
    }

    fn needs_reset(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests;
