//! A device's interceptor chain over its driver, and the two hook points.
//!
//! Each request takes a snapshot of which instances are in its path (enabled ones, plus
//! disabled ones that must stay, see `F_KEEP_WHEN_DISABLED`), so a toggle never splits one
//! request's pre and post hooks. Pre hooks run top to bottom until one completes or fails
//! the request; the driver runs only if all continued; then post hooks run bottom to top for
//! exactly the instances whose pre hook ran.

use crate::instance::{Instance, InstanceSpec};
use crate::loader::LoadError;
use crate::{BlockBackend, BlockRequestKind, DeviceKind, IoRequest, RequestStatus, Segment};
use interceptor_abi as abi;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

/// Most interceptors in one device's chain.
pub const MAX_CHAIN: usize = 16;

/// The shim's counters for one device.
#[derive(Debug, Default)]
pub struct StackCounters {
    /// Requests that reached the pre-processing point.
    pub requests: AtomicU64,
    /// Requests answered with an error status.
    pub errors: AtomicU64,
    /// Requests an interceptor satisfied without the driver.
    pub completed_without_driver: AtomicU64,
    /// Requests the device refused before the stack (malformed by the guest), and queues
    /// the guest broke.
    pub refused: AtomicU64,
}

/// Why a stack could not be built, and which instance (by id) refused.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct BuildError {
    pub instance: Option<String>,
    pub error: LoadError,
}

/// Interceptor instances (top to bottom) over a driver.
pub struct BlockStack {
    device_id: String,
    layers: Vec<Arc<Instance>>,
    driver: Arc<dyn BlockBackend>,
    capacity: u64,
    /// Shared by every rebuild of the device's top stack (see `LiveStack`).
    counters: Arc<StackCounters>,
}

impl std::fmt::Debug for BlockStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockStack")
            .field("device_id", &self.device_id)
            .field("layers", &self.layers)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl BlockStack {
    /// Builds `device_id`'s stack; `chain` lists instances top to bottom. Instances are
    /// created bottom up, each over the stack below it, so a plugin may do its own I/O to the
    /// layers below already in `create`.
    pub fn build(
        device_id: &str,
        driver: Arc<dyn BlockBackend>,
        chain: &[InstanceSpec],
    ) -> Result<Arc<BlockStack>, BuildError> {
        if chain.len() > MAX_CHAIN {
            return Err(BuildError {
                instance: None,
                error: LoadError::ChainTooLong {
                    device: device_id.into(),
                    max: MAX_CHAIN,
                },
            });
        }
        let mut stack = Arc::new(BlockStack {
            device_id: device_id.into(),
            layers: Vec::new(),
            capacity: driver.capacity(),
            driver,
            counters: Arc::default(),
        });
        for spec in chain.iter().rev() {
            let instance = Arc::new(
                Instance::create(spec, DeviceKind::Block, device_id, stack.clone(), false)
                    .map_err(|error| BuildError {
                        instance: Some(spec.id.clone()),
                        error,
                    })?,
            );
            let mut layers = vec![instance.clone()];
            layers.extend(stack.layers.iter().cloned());
            stack = Arc::new(BlockStack {
                device_id: device_id.into(),
                layers,
                capacity: instance.capacity(),
                driver: stack.driver.clone(),
                counters: Arc::default(),
            });
        }
        Ok(stack)
    }

    /// The stacks under each of `layers` (top to bottom) over `driver`: entry `k` holds
    /// `layers[k..]`, the last one the driver alone. Entry 0 shares `counters`.
    pub(crate) fn assemble(
        device_id: &str,
        driver: &Arc<dyn BlockBackend>,
        layers: &[Arc<Instance>],
        counters: &Arc<StackCounters>,
    ) -> Vec<Arc<BlockStack>> {
        let mut stacks = Vec::with_capacity(layers.len() + 1);
        for k in (0..=layers.len()).rev() {
            stacks.push(Arc::new(BlockStack {
                device_id: device_id.into(),
                layers: layers[k..].to_vec(),
                capacity: layers.get(k).map_or(driver.capacity(), |l| l.capacity()),
                driver: driver.clone(),
                counters: if k == 0 {
                    counters.clone()
                } else {
                    Arc::default()
                },
            }));
        }
        stacks.reverse();
        stacks
    }

    pub(crate) fn driver(&self) -> &Arc<dyn BlockBackend> {
        &self.driver
    }

    pub(crate) fn shared_counters(&self) -> &Arc<StackCounters> {
        &self.counters
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    /// Bytes the device exposes to the guest (the top instance's capacity).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The chain, top to bottom.
    pub fn layers(&self) -> &[Arc<Instance>] {
        &self.layers
    }

    pub fn instance(&self, id: &str) -> Option<&Arc<Instance>> {
        self.layers.iter().find(|l| l.id() == id)
    }

    pub fn counters(&self) -> &StackCounters {
        &self.counters
    }

    /// Flushes the whole stack: every layer sees a flush (a write-back cache writes back,
    /// then the driver syncs), as the VMM does at shutdown.
    pub fn flush(&self) -> RequestStatus {
        // SAFETY: a flush carries no segments.
        unsafe { self.submit(BlockRequestKind::Flush, 0, &[]) }
    }

    /// Runs one request through the chain and the driver; returns the guest's status.
    ///
    /// # Safety
    /// The segments must be valid host memory for their lengths for the duration of the
    /// call (readable for writes, writable for reads and get-id), and the request must lie
    /// within [`capacity`](Self::capacity).
    pub unsafe fn submit(
        &self,
        kind: BlockRequestKind,
        offset: u64,
        segments: &[Segment],
    ) -> RequestStatus {
        self.counters.requests.fetch_add(1, Relaxed);
        let len: u64 = segments.iter().map(|s| s.len as u64).sum();
        // The snapshot: one atomic load per instance, the only cost of a disabled one.
        let (mut active, mut disabled, mut private) = (0u32, 0u32, false);
        for (i, layer) in self.layers.iter().enumerate() {
            let on = layer.enabled();
            if on || layer.keeps_when_disabled() {
                active |= 1 << i;
                disabled |= u32::from(!on) << i;
                private |= layer.modifies_data();
            }
        }
        let status = if active == 0 {
            self.run_driver(kind, offset, len, segments)
        } else {
            self.run_chain(kind, offset, len, segments, active, disabled, private)
        };
        if status != RequestStatus::Ok {
            self.counters.errors.fetch_add(1, Relaxed);
        }
        status
    }

    unsafe fn run_driver(
        &self,
        kind: BlockRequestKind,
        offset: u64,
        len: u64,
        segments: &[Segment],
    ) -> RequestStatus {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.driver.capacity())
        {
            return RequestStatus::IoError;
        }
        self.driver.execute(&IoRequest {
            kind,
            offset,
            len,
            segments,
        })
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn run_chain(
        &self,
        kind: BlockRequestKind,
        offset: u64,
        len: u64,
        segments: &[Segment],
        active: u32,
        disabled: u32,
        private: bool,
    ) -> RequestStatus {
        // Transforming plugins never see guest memory: they get a private copy, and a read's
        // result is copied to the guest only once every post hook is done with it.
        let mut bounce = Vec::new();
        let bounce_segment;
        let data: &[Segment] = if private {
            bounce = vec![0u8; len as usize];
            if !kind.fills_buffers() {
                copy_segments_to(segments, &mut bounce);
            }
            bounce_segment = [Segment {
                base: bounce.as_mut_ptr(),
                len: bounce.len(),
            }];
            &bounce_segment
        } else {
            segments
        };
        let base = abi::Request {
            kind: kind.to_abi(),
            flags: if private { abi::REQ_F_DATA_PRIVATE } else { 0 },
            offset,
            len,
            segments: data.as_ptr(),
            nsegments: data.len() as u32,
            device_kind: DeviceKind::Block as u32,
            device_id: std::ptr::null(),
        };
        let request_for = |i: usize, layer: &Instance| {
            let mut r = base;
            r.device_id = layer.device_id_ptr();
            if disabled & (1 << i) != 0 {
                r.flags |= abi::REQ_F_DISABLED;
            }
            r
        };

        let mut slots = [std::ptr::null_mut::<c_void>(); MAX_CHAIN];
        let mut started = [None::<Instant>; MAX_CHAIN];
        let mut last_pre = None;
        let mut early = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if active & (1 << i) == 0 {
                continue;
            }
            let c = &layer.counters;
            c.requests.fetch_add(1, Relaxed);
            c.bytes.fetch_add(len, Relaxed);
            if kind == BlockRequestKind::Write {
                c.writes.fetch_add(1, Relaxed);
            }
            started[i] = Some(Instant::now());
            let decision = layer.call_pre(&request_for(i, layer), &mut slots[i]);
            last_pre = Some(i);
            match decision {
                abi::CONTINUE => continue,
                abi::COMPLETE => {
                    c.completed.fetch_add(1, Relaxed);
                    self.counters.completed_without_driver.fetch_add(1, Relaxed);
                    early = Some(RequestStatus::Ok);
                }
                abi::FAIL => {
                    c.errors.fetch_add(1, Relaxed);
                    early = Some(RequestStatus::IoError);
                }
                other => {
                    tracing::warn!("interceptor {}: pre returned {other}; failing", layer.id());
                    c.errors.fetch_add(1, Relaxed);
                    early = Some(RequestStatus::IoError);
                }
            }
            break;
        }
        let mut status = match early {
            Some(s) => s,
            None => self.run_driver(kind, offset, len, data),
        };
        let ran = last_pre.map_or(0, |last| last + 1);
        for i in (0..ran).rev().filter(|i| active & (1 << i) != 0) {
            let layer = &self.layers[i];
            let raw = layer.call_post(&request_for(i, layer), slots[i], status.to_abi());
            let next = RequestStatus::from_abi(raw).unwrap_or_else(|| {
                tracing::warn!("interceptor {}: post returned {raw}; failing", layer.id());
                RequestStatus::IoError
            });
            if next != RequestStatus::Ok && status == RequestStatus::Ok {
                layer.counters.errors.fetch_add(1, Relaxed);
            }
            if let Some(t) = started[i] {
                let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                layer.counters.latency.record(ns);
            }
            status = next;
        }
        if private && kind.fills_buffers() && status == RequestStatus::Ok {
            copy_to_segments(&bounce, segments);
        }
        status
    }
}

/// Gathers the segments' bytes into `out` (as long as the segments).
unsafe fn copy_segments_to(segments: &[Segment], out: &mut [u8]) {
    let mut at = 0;
    for s in segments {
        std::ptr::copy_nonoverlapping(s.base, out[at..at + s.len].as_mut_ptr(), s.len);
        at += s.len;
    }
}

/// Scatters `data` into the segments.
unsafe fn copy_to_segments(data: &[u8], segments: &[Segment]) {
    let mut at = 0;
    for s in segments {
        std::ptr::copy_nonoverlapping(data[at..at + s.len].as_ptr(), s.base, s.len);
        at += s.len;
    }
}
