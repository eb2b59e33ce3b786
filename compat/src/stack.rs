//! A device's interceptor chain over its backend, and the two hook points.
//!
//! Each request takes a snapshot of which instances are in its path (enabled ones, plus
//! disabled ones that must stay, see `F_KEEP_WHEN_DISABLED`), so a toggle never splits one
//! request's pre and post hooks. Pre hooks run top to bottom until one completes or fails
//! the request; the backend runs only if all continued; then post hooks run bottom to top for
//! exactly the instances whose pre hook ran.

use crate::bounce::BouncePool;
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
    /// Requests an interceptor satisfied without the backend.
    pub completed_without_driver: AtomicU64,
    /// Requests whose pre hooks ran on the disk's hook pool (every instance of the chain
    /// declares `F_CONCURRENT`).
    pub started_on_pool: AtomicU64,
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

/// Interceptor instances (top to bottom) over a backend.
pub struct BlockStack {
    device_id: String,
    layers: Vec<Arc<Instance>>,
    backend: Arc<dyn BlockBackend>,
    capacity: u64,
    /// Shared by every rebuild of the device's top stack (see `LiveStack`).
    counters: Arc<StackCounters>,
    /// The device's bounce buffers, shared by every stack of the device.
    pool: Arc<BouncePool>,
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
        backend: Arc<dyn BlockBackend>,
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
        let pool = Arc::default();
        let mut stack = Self::with_layers(device_id, &backend, Vec::new(), Arc::default(), &pool);
        for spec in chain.iter().rev() {
            let instance = Arc::new(
                Instance::create(spec, DeviceKind::Block, device_id, stack.clone(), false)
                    .map_err(|error| BuildError {
                        instance: Some(spec.id.clone()),
                        error,
                    })?,
            );
            let layers = std::iter::once(instance)
                .chain(stack.layers.iter().cloned())
                .collect();
            stack = Self::with_layers(device_id, &backend, layers, Arc::default(), &pool);
        }
        Ok(stack)
    }

    /// The stacks under each of `layers` (top to bottom) over `backend`: entry `k` holds
    /// `layers[k..]`, the last one the backend alone. Entry 0 shares `counters`.
    pub(crate) fn assemble(
        device_id: &str,
        backend: &Arc<dyn BlockBackend>,
        layers: &[Arc<Instance>],
        counters: &Arc<StackCounters>,
        pool: &Arc<BouncePool>,
    ) -> Vec<Arc<BlockStack>> {
        let mut stacks = Vec::with_capacity(layers.len() + 1);
        for k in (0..=layers.len()).rev() {
            let shared = if k == 0 {
                counters.clone()
            } else {
                Arc::default()
            };
            stacks.push(Self::with_layers(
                device_id,
                backend,
                layers[k..].to_vec(),
                shared,
                pool,
            ));
        }
        stacks.reverse();
        stacks
    }

    /// `layers` (top to bottom) over `backend`; its capacity is the top layer's.
    fn with_layers(
        device_id: &str,
        backend: &Arc<dyn BlockBackend>,
        layers: Vec<Arc<Instance>>,
        counters: Arc<StackCounters>,
        pool: &Arc<BouncePool>,
    ) -> Arc<BlockStack> {
        Arc::new(BlockStack {
            device_id: device_id.into(),
            capacity: layers.first().map_or(backend.capacity(), |l| l.capacity()),
            layers,
            backend: backend.clone(),
            counters,
            pool: pool.clone(),
        })
    }

    pub(crate) fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }

    pub(crate) fn shared_counters(&self) -> &Arc<StackCounters> {
        &self.counters
    }

    pub(crate) fn pool(&self) -> &Arc<BouncePool> {
        &self.pool
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
    /// then the backend syncs), as the VMM does at shutdown.
    pub fn flush(&self) -> RequestStatus {
        // SAFETY: a flush carries no segments.
        unsafe { self.submit(BlockRequestKind::Flush, 0, &[]) }
    }

    /// Runs one request through the chain and the backend, synchronously; returns the
    /// guest's status. (A device queue uses [`begin`](Self::begin) and an engine instead.)
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
        let len = segments.iter().map(|s| s.len as u64).sum();
        self.run_sync(self.pre(kind, offset, len, segments.to_vec(), false))
    }

    /// The synchronous end of a walk that cannot wait: the backend, then the post hooks.
    unsafe fn run_sync(&self, walk: Walk) -> RequestStatus {
        match walk {
            Walk::Done(status) => status,
            Walk::Backend(mut parts) => {
                let status = self.run_backend(&parts);
                self.post(&mut parts, status)
            }
            // Not reached: a walk that cannot wait fails a PENDING (see `decide`).
            Walk::Parked(mut parts, _) => self.post(&mut parts, RequestStatus::IoError),
        }
    }

    /// Runs a discard or write-zeroes of `len` bytes at `offset` (no segments) through the
    /// chain and the backend, synchronously.
    ///
    /// # Safety
    /// The range must lie within [`capacity`](Self::capacity).
    pub unsafe fn submit_ranged(
        &self,
        kind: BlockRequestKind,
        offset: u64,
        len: u64,
    ) -> RequestStatus {
        self.run_sync(self.pre(kind, offset, len, Vec::new(), false))
    }

    /// Starts one request of `len` bytes at `offset`: its pre hooks run now. For a read or a
    /// write `len` is the segments' total; a discard or write-zeroes has no segments and
    /// `len` is its range. If one of them completed or failed it,
    /// its post hooks have run too and the status is final (`Started::Done`); otherwise it
    /// waits for the backend (`Started::Backend`): run [`InFlight::io`] on an engine, then
    /// [`InFlight::finish`] with the engine's status runs the post hooks; or an instance's
    /// pre hook left it pending (`Started::Parked`, ABI version 2) until the plugin resumes
    /// it: [`Parked::resume`] with its decision goes on from there.
    ///
    /// # Safety
    /// The segments must stay valid host memory for their lengths (readable for writes,
    /// writable for reads) until the returned request is finished or dropped, and the
    /// request must lie within [`capacity`](Self::capacity).
    pub unsafe fn begin(
        self: &Arc<Self>,
        kind: BlockRequestKind,
        offset: u64,
        len: u64,
        segments: Vec<Segment>,
    ) -> Started {
        self.started(self.pre(kind, offset, len, segments, true))
    }

    fn started(self: &Arc<Self>, walk: Walk) -> Started {
        match walk {
            Walk::Done(status) => Started::Done(status),
            Walk::Backend(parts) => Started::Backend(InFlight {
                stack: self.clone(),
                parts: Some(parts),
            }),
            Walk::Parked(parts, layer) => Started::Parked(Parked {
                stack: self.clone(),
                parts: Some(parts),
                layer,
            }),
        }
    }

    /// Can the chain take discard and write-zeroes: does every instance a discard would
    /// reach handle them? A discard reaches each instance down to the first that owns its
    /// format (that one completes it: below it is its own layout).
    pub fn handles_discard(&self) -> bool {
        self.discard_reaches(u32::MAX)
    }

    /// `handles_discard` over the instances of `active` only.
    fn discard_reaches(&self, active: u32) -> bool {
        for (i, l) in self.layers.iter().enumerate() {
            if active & (1 << i) == 0 {
                continue;
            }
            if !l.handles_discard() {
                return false;
            }
            if l.owns_format() {
                return true;
            }
        }
        true
    }

    /// May requests start on several threads at once: does the chain have instances, and
    /// does every one (enabled or not: enabling one is not a chain edit and waits for
    /// nothing) declare `F_CONCURRENT`?
    pub fn concurrent(&self) -> bool {
        !self.layers.is_empty() && self.layers.iter().all(|l| l.concurrent())
    }

    /// Does a request that starts now pass any interceptor?
    pub fn intercepts(&self) -> bool {
        self.layers
            .iter()
            .any(|l| l.enabled() || l.keeps_when_disabled())
    }

    /// The snapshot and the pre hooks. `Err` is the final status of a request the chain
    /// answered itself (its post hooks have run).
    unsafe fn pre(
        &self,
        kind: BlockRequestKind,
        offset: u64,
        len: u64,
        guest: Vec<Segment>,
        can_wait: bool,
    ) -> Walk {
        self.counters.requests.fetch_add(1, Relaxed);
        let carried: u64 = guest.iter().map(|s| s.len as u64).sum();
        let consistent = if kind.has_data() {
            carried == len
        } else {
            carried == 0
        };
        if !consistent {
            // A read or write whose length is not its buffers', or a flush or range request
            // with data: a caller's bug, never sent down.
            return Walk::Done(self.count(RequestStatus::IoError));
        }
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
        // A flush or range request carries no buffers (empty ones a caller passed are
        // dropped here).
        let guest = if kind.has_data() { guest } else { Vec::new() };
        let mut parts = Parts {
            id: if can_wait {
                REQUEST_IDS.fetch_add(1, Relaxed)
            } else {
                0
            },
            kind,
            offset,
            len,
            active,
            disabled,
            private,
            ran: 0,
            slots: [std::ptr::null_mut(); MAX_CHAIN],
            started: [None; MAX_CHAIN],
            guest,
            bounce: None,
            data: Vec::new(),
        };
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.capacity)
        {
            return Walk::Done(self.count(RequestStatus::IoError));
        }
        // A discard or write-zeroes never reaches an instance that did not say it handles
        // one (it could leave the instance's view of the range wrong): answered UNSUPP.
        let ranged = matches!(
            kind,
            BlockRequestKind::Discard | BlockRequestKind::WriteZeroes
        );
        if ranged && !self.discard_reaches(active) {
            return Walk::Done(self.count(RequestStatus::Unsupported));
        }
        if active == 0 {
            return self.backend_in_range(parts);
        }
        // Transforming plugins never see guest memory: they get a private copy, and a read's
        // result is copied to the guest only once every post hook is done with it.
        if private && kind.has_data() {
            let mut bounce = self.pool.take(len as usize, kind.fills_buffers());
            if !kind.fills_buffers() {
                copy_segments_to(&parts.guest, &mut bounce);
            }
            parts.data = vec![Segment {
                base: bounce.as_mut_ptr(),
                len: bounce.len(),
            }];
            parts.bounce = Some(bounce);
        }
        self.walk(parts, 0)
    }

    /// The pre hooks from instance `from` down, until one completes, fails or parks the
    /// request, or all continued.
    unsafe fn walk(&self, mut parts: Parts, from: usize) -> Walk {
        for (i, layer) in self.layers.iter().enumerate().skip(from) {
            if parts.active & (1 << i) == 0 {
                continue;
            }
            let c = &layer.counters;
            c.requests.fetch_add(1, Relaxed);
            c.bytes.fetch_add(parts.len, Relaxed);
            if parts.kind == BlockRequestKind::Write {
                c.writes.fetch_add(1, Relaxed);
            }
            parts.started[i] = Some(Instant::now());
            let request = parts.abi_request(i, layer);
            let decision = layer.call_pre(&request, &mut parts.slots[i]);
            parts.ran = i + 1;
            if decision == abi::PENDING && parts.id != 0 {
                return Walk::Parked(parts, i);
            }
            if let Some(status) = self.decide(&parts, i, decision) {
                return Walk::Done(self.post(&mut parts, status));
            }
        }
        self.backend_in_range(parts)
    }

    /// What instance `i`'s decision on `parts` means: `None` to go on down, else the
    /// status the request ends with.
    fn decide(&self, parts: &Parts, i: usize, decision: u32) -> Option<RequestStatus> {
        let layer = &self.layers[i];
        let c = &layer.counters;
        let ranged = matches!(
            parts.kind,
            BlockRequestKind::Discard | BlockRequestKind::WriteZeroes
        );
        match decision {
            // One that owns its format ends discards (the layers below hold its format,
            // not the guest's blocks, and were not asked whether they handle them).
            abi::CONTINUE if ranged && layer.owns_format() => {
                tracing::warn!(
                    "interceptor {}: passed a {:?} down from its own format; failing",
                    layer.id(),
                    parts.kind
                );
                c.errors.fetch_add(1, Relaxed);
                Some(RequestStatus::IoError)
            }
            abi::CONTINUE => None,
            abi::COMPLETE => {
                c.completed.fetch_add(1, Relaxed);
                self.counters.completed_without_driver.fetch_add(1, Relaxed);
                Some(RequestStatus::Ok)
            }
            abi::FAIL => {
                c.errors.fetch_add(1, Relaxed);
                Some(RequestStatus::IoError)
            }
            abi::PENDING => {
                // Only a request with a handle may wait (not one through the synchronous
                // walk, nor a resume that says PENDING again).
                tracing::warn!(
                    "interceptor {}: left a request pending that cannot wait; failing",
                    layer.id()
                );
                c.errors.fetch_add(1, Relaxed);
                Some(RequestStatus::IoError)
            }
            other => {
                tracing::warn!("interceptor {}: pre returned {other}; failing", layer.id());
                c.errors.fetch_add(1, Relaxed);
                Some(RequestStatus::IoError)
            }
        }
    }

    /// A request every instance let through reaches the backend only inside the backend's
    /// capacity (an instance may expose more than the layers below it hold).
    unsafe fn backend_in_range(&self, mut parts: Parts) -> Walk {
        if parts
            .offset
            .checked_add(parts.len)
            .is_none_or(|end| end > self.backend.capacity())
        {
            return Walk::Done(self.post(&mut parts, RequestStatus::IoError));
        }
        Walk::Backend(parts)
    }

    /// The synchronous backend on the request's data.
    unsafe fn run_backend(&self, parts: &Parts) -> RequestStatus {
        self.backend.execute(&parts.io())
    }

    /// The post hooks, bottom to top, of every instance whose pre hook ran; then a private
    /// read's data goes to the guest.
    unsafe fn post(&self, parts: &mut Parts, backend: RequestStatus) -> RequestStatus {
        let mut status = backend;
        for i in (0..parts.ran)
            .rev()
            .filter(|i| parts.active & (1 << i) != 0)
        {
            let layer = &self.layers[i];
            let request = parts.abi_request(i, layer);
            let raw = layer.call_post(&request, parts.slots[i], status.to_abi());
            let next = RequestStatus::from_abi(raw).unwrap_or_else(|| {
                tracing::warn!("interceptor {}: post returned {raw}; failing", layer.id());
                RequestStatus::IoError
            });
            if next != RequestStatus::Ok && status == RequestStatus::Ok {
                layer.counters.errors.fetch_add(1, Relaxed);
            }
            if let Some(t) = parts.started[i] {
                let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                layer.counters.latency.record(ns);
            }
            status = next;
        }
        if let Some(bounce) = parts.bounce.take() {
            if parts.kind.fills_buffers() && status == RequestStatus::Ok {
                copy_to_segments(&bounce, &parts.guest);
            }
            self.pool.give(bounce);
        }
        self.count(status)
    }

    fn count(&self, status: RequestStatus) -> RequestStatus {
        if status != RequestStatus::Ok {
            self.counters.errors.fetch_add(1, Relaxed);
        }
        status
    }
}

/// Where a request's pre hooks left it.
enum Walk {
    /// Every instance in its path continued: the backend runs it.
    Backend(Parts),
    /// Answered by the chain (the post hooks due have run): its final status.
    Done(RequestStatus),
    /// Instance `.1` left it pending (ABI version 2).
    Parked(Parts, usize),
}

/// Ids of requests that may wait (their `handle`); 0 is none.
static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

/// What a request carries from its pre hooks to its post hooks.
struct Parts {
    /// Its handle for a plugin (`vmm_request.handle`); 0 where it cannot wait.
    id: u64,
    kind: BlockRequestKind,
    offset: u64,
    len: u64,
    /// The snapshot: instances in the request's path, and which of them are disabled.
    active: u32,
    disabled: u32,
    /// An instance in the path modifies data: every request it sees is marked private
    /// (those with data carry the bounce buffer).
    private: bool,
    /// Instances (from the top) whose pre hook ran.
    ran: usize,
    /// Each instance's per-request context, from its pre hook to its post hook.
    slots: [*mut c_void; MAX_CHAIN],
    started: [Option<Instant>; MAX_CHAIN],
    /// The device's buffers (guest memory).
    guest: Vec<Segment>,
    /// The private copy, when an instance in the path modifies data.
    bounce: Option<Vec<u8>>,
    /// The bounce buffer as one segment; empty when the backend works on `guest`.
    data: Vec<Segment>,
}

impl Parts {
    fn segments(&self) -> &[Segment] {
        if self.bounce.is_some() {
            &self.data
        } else {
            &self.guest
        }
    }

    fn io(&self) -> IoRequest<'_> {
        IoRequest {
            kind: self.kind,
            offset: self.offset,
            len: self.len,
            segments: self.segments(),
        }
    }

    fn abi_request(&self, i: usize, layer: &Instance) -> abi::Request {
        let segments = self.segments();
        let mut flags = if self.private {
            abi::REQ_F_DATA_PRIVATE
        } else {
            0
        };
        if self.disabled & (1 << i) != 0 {
            flags |= abi::REQ_F_DISABLED;
        }
        abi::Request {
            kind: self.kind.to_abi(),
            flags,
            offset: self.offset,
            len: self.len,
            segments: segments.as_ptr(),
            nsegments: segments.len() as u32,
            device_kind: DeviceKind::Block as u32,
            device_id: layer.device_id_ptr(),
            net: std::ptr::null_mut(),
            handle: self.id as usize as *mut c_void,
        }
    }
}

/// What [`BlockStack::begin`] made of a request.
// A request in flight is moved once, into its queue's slot: no box per request.
#[allow(clippy::large_enum_variant)]
pub enum Started {
    /// The chain answered it: the final status (every post hook due has run).
    Done(RequestStatus),
    /// It waits for the backend.
    Backend(InFlight),
    /// An instance's pre hook left it pending: it waits for the plugin's resume.
    Parked(Parked),
}

/// A request an instance's pre hook left pending (ABI version 2), until the plugin resumes
/// it. Dropped unresumed, its post hooks run with an I/O error.
pub struct Parked {
    stack: Arc<BlockStack>,
    parts: Option<Parts>,
    /// The instance (from the top) that left it pending.
    layer: usize,
}

// SAFETY: as for `InFlight`.
unsafe impl Send for Parked {}

impl Parked {
    /// The request's handle, as its plugin knows it (`vmm_request.handle`).
    pub fn handle(&self) -> u64 {
        self.parts.as_ref().map_or(0, |p| p.id)
    }

    /// The instance that left it pending, by id.
    pub fn instance_id(&self) -> &str {
        self.stack.layers[self.layer].id()
    }

    /// The instance that left it pending, as the shim's `vmm_lower` functions know it:
    /// only that instance may resume it.
    pub(crate) fn holder(&self) -> usize {
        self.stack.layers[self.layer].lower_ctx()
    }

    /// The plugin decided (`CONTINUE`, `COMPLETE` or `FAIL`): the request goes on from
    /// there, down the chain (where it may be left pending again) or back up.
    pub fn resume(mut self, decision: u32) -> Started {
        let Some(parts) = self.parts.take() else {
            return Started::Done(RequestStatus::IoError);
        };
        let stack = self.stack.clone();
        // SAFETY: the buffers are still valid (the `begin` contract).
        let walk = unsafe {
            match stack.decide(&parts, self.layer, decision) {
                None => stack.walk(parts, self.layer + 1),
                Some(status) => {
                    let mut parts = parts;
                    Walk::Done(stack.post(&mut parts, status))
                }
            }
        };
        stack.started(walk)
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        if let Some(mut parts) = self.parts.take() {
            // SAFETY: as in `InFlight::finish`.
            unsafe { self.stack.post(&mut parts, RequestStatus::IoError) };
        }
    }
}

/// A request past its pre hooks, waiting for the backend. Dropped unfinished, its post
/// hooks run with an I/O error (so every instance's per-request state is released).
pub struct InFlight {
    stack: Arc<BlockStack>,
    parts: Option<Parts>,
}

// SAFETY: the raw pointers are the request's buffers (valid until it finishes, the `begin`
// contract) and the instances' per-request contexts, which only their hooks use; an
// in-flight request moves with its queue's handler to the disk's I/O thread and is
// finished there.
unsafe impl Send for InFlight {}

impl InFlight {
    /// What the backend runs: the request's kind, offset and the buffers to transfer
    /// (guest memory, or the private copy).
    pub fn io(&self) -> IoRequest<'_> {
        match &self.parts {
            Some(p) => p.io(),
            None => IoRequest {
                kind: BlockRequestKind::Flush,
                offset: 0,
                len: 0,
                segments: &[],
            },
        }
    }

    /// The backend is done with the request (`backend`): the post hooks run, bottom to
    /// top; returns the guest's status.
    pub fn finish(mut self, backend: RequestStatus) -> RequestStatus {
        match self.parts.take() {
            // SAFETY: the buffers are still valid (the `begin` contract).
            Some(mut parts) => unsafe { self.stack.post(&mut parts, backend) },
            None => backend,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(mut parts) = self.parts.take() {
            // SAFETY: as in `finish`.
            unsafe { self.stack.post(&mut parts, RequestStatus::IoError) };
        }
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
