//! A device's chain as it changes while the guest runs: the REST API loads an instance into
//! it or removes one. Guest requests and edits both run on the device's I/O thread, one at a
//! time, so an edit happens between two requests: it re-points the plugins' own I/O ("the
//! layers below") and publishes the new stack before the next request starts. No request
//! sees half an edit, and every hook of an instance (create and destroy included) runs on
//! that one thread. (A chain whose every instance declares `F_CONCURRENT` may have its
//! requests started on the disk's hook pool, `hook_pool.rs`; edits wait for those too.)

use crate::hook_pool::HookPool;
use crate::instance::{Instance, InstanceSpec};
use crate::io_thread::{IoThread, ThreadStart};
use crate::loader::LoadError;
use crate::stack::{BlockStack, BuildError, InFlight, StackCounters, Started, MAX_CHAIN};
use crate::{BlockRequestKind, DeviceKind, RequestStatus, Segment};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

/// Why a chain edit was refused. `Conflict` is a state that forbids the edit (HTTP 409);
/// `Invalid` and `Load` are the caller's mistakes (400).
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("device `{device}` has no interceptor `{id}`")]
    NotFound { device: String, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Load(#[from] LoadError),
}

/// A device's live chain and the I/O thread that runs it (see `io_thread.rs`).
pub struct LiveStack {
    chain: Arc<Chain>,
    io: IoThread,
    /// Starts requests beside the I/O thread when every instance is `F_CONCURRENT`.
    pool: HookPool,
}

/// What jobs on the I/O thread share with the handles other threads hold.
struct Chain {
    device_id: String,
    /// What the guest sees; fixed for the device's life (an edit that would change it is
    /// refused).
    capacity: u64,
    current: RwLock<Arc<BlockStack>>,
    /// Instances out of the chain, destroyed on the I/O thread once nothing else (an API
    /// view rendering an older snapshot) holds them: a plugin's destroy is one of its hooks.
    retired: Mutex<Vec<Arc<Instance>>>,
    /// `retired` is not empty: the one load a guest request pays for it.
    any_retired: AtomicBool,
    /// Set at shutdown: the chain is empty and edits are refused.
    closed: AtomicBool,
    /// Every instance of the chain at start handled discard and write-zeroes, so the device
    /// offers them (while one that does not is in the path, they are answered UNSUPP).
    discard: bool,
}

impl std::fmt::Debug for LiveStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveStack")
            .field("device_id", &self.chain.device_id)
            .field("stack", &self.snapshot())
            .finish()
    }
}

impl LiveStack {
    /// Starts `device_id`'s I/O thread (running `on_start` first there) and builds the
    /// chain on it: every instance is created on the thread that will call its hooks. Its
    /// hook pool has [`HookPool::default_threads`].
    pub fn start(
        device_id: &str,
        backend: Arc<dyn crate::BlockBackend>,
        chain: &[InstanceSpec],
        on_start: Option<ThreadStart>,
    ) -> Result<LiveStack, BuildError> {
        let threads = HookPool::default_threads();
        Self::start_with_pool(device_id, backend, chain, on_start, threads)
    }

    /// As [`start`](Self::start), with `hook_threads` in the disk's hook pool (0: none).
    pub fn start_with_pool(
        device_id: &str,
        backend: Arc<dyn crate::BlockBackend>,
        chain: &[InstanceSpec],
        on_start: Option<ThreadStart>,
        hook_threads: usize,
    ) -> Result<LiveStack, BuildError> {
        let io = IoThread::spawn(device_id, on_start.clone()).map_err(|e| BuildError {
            instance: None,
            error: LoadError::BadInstance {
                plugin: String::new(),
                message: format!("cannot start device `{device_id}`'s I/O thread: {e}"),
            },
        })?;
        let pool = HookPool::spawn(device_id, hook_threads, on_start).map_err(|e| BuildError {
            instance: None,
            error: LoadError::BadInstance {
                plugin: String::new(),
                message: format!("cannot start device `{device_id}`'s hook pool: {e}"),
            },
        })?;
        let (id, specs) = (device_id.to_string(), chain.to_vec());
        let built = io.run(move || BlockStack::build(&id, backend, &specs));
        let stack = match built {
            Ok(result) => result?,
            Err(gone) => {
                return Err(BuildError {
                    instance: None,
                    error: LoadError::BadInstance {
                        plugin: String::new(),
                        message: gone.to_string(),
                    },
                })
            }
        };
        let discard = stack.handles_discard();
        Ok(LiveStack {
            chain: Arc::new(Chain {
                device_id: stack.device_id().to_string(),
                capacity: stack.capacity(),
                current: RwLock::new(stack),
                retired: Mutex::new(Vec::new()),
                any_retired: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                discard,
            }),
            io,
            pool,
        })
    }

    pub fn device_id(&self) -> &str {
        &self.chain.device_id
    }

    pub fn capacity(&self) -> u64 {
        self.chain.capacity
    }

    /// The thread that calls this chain's hooks (the device serves its queue there).
    pub fn io_thread(&self) -> &IoThread {
        &self.io
    }

    /// The chain as it is now (top to bottom in `layers()`).
    pub fn snapshot(&self) -> Arc<BlockStack> {
        self.chain.snapshot()
    }

    pub fn counters(&self) -> Arc<StackCounters> {
        self.snapshot().shared_counters().clone()
    }

    /// Runs one guest request on the current chain, on the I/O thread (the device's queue
    /// handler; a test may call it from its own single thread). Safety as for
    /// [`BlockStack::submit`].
    ///
    /// # Safety
    /// See [`BlockStack::submit`].
    pub unsafe fn submit(
        &self,
        kind: BlockRequestKind,
        offset: u64,
        segments: &[Segment],
    ) -> RequestStatus {
        let status = self.chain.snapshot().submit(kind, offset, segments);
        self.chain.reap();
        status
    }

    /// Starts one guest request on the current chain (on the I/O thread, like every hook):
    /// its pre hooks run now. See [`BlockStack::begin`]; finish it with
    /// [`complete`](Self::complete).
    ///
    /// # Safety
    /// See [`BlockStack::begin`].
    pub unsafe fn begin(
        &self,
        kind: BlockRequestKind,
        offset: u64,
        len: u64,
        segments: Vec<Segment>,
    ) -> Started {
        let started = self.chain.snapshot().begin(kind, offset, len, segments);
        if matches!(started, Started::Done(_)) {
            self.chain.reap();
        }
        started
    }

    /// May a request start on the hook pool ([`begin_on_pool`](Self::begin_on_pool)): has
    /// the disk one, and does every instance of the chain declare `F_CONCURRENT`?
    pub fn concurrent(&self) -> bool {
        self.pool.running() && self.chain.snapshot().concurrent()
    }

    /// Starts one guest request on the disk's hook pool instead of the calling (I/O)
    /// thread: its pre hooks run there, and `done` gets what they made of it (then, on the
    /// pool thread; it hands the result back to the I/O thread, which completes it with
    /// [`complete`](Self::complete) or takes its status). Returns `false`, and runs
    /// nothing, if the pool has stopped. The I/O thread must not edit the chain, reset or drain the device
    /// while a request it handed over has not come back (its quiesce waits for it).
    ///
    /// # Safety
    /// As for [`BlockStack::begin`]: the buffers stay valid until the request finishes.
    pub unsafe fn begin_on_pool(
        &self,
        kind: BlockRequestKind,
        offset: u64,
        len: u64,
        segments: Vec<Segment>,
        done: impl FnOnce(Started) + Send + 'static,
    ) -> bool {
        let snapshot = self.chain.snapshot();
        snapshot.counters().started_on_pool.fetch_add(1, Relaxed);
        let segments = SendSegments(segments);
        let job = move || {
            let segments = segments;
            // SAFETY: the caller's contract, passed on.
            let started = unsafe { snapshot.begin(kind, offset, len, segments.0) };
            // The pool never holds the last handle to a snapshot: instances are destroyed
            // on the I/O thread only (`reap`).
            drop(snapshot);
            done(started);
        };
        // A job the pool refuses is dropped unrun: it holds only the guest's buffers.
        self.pool.run(Box::new(job)).is_ok()
    }

    /// The backend is done with `request`: its post hooks run (on the I/O thread).
    pub fn complete(&self, request: InFlight, backend: RequestStatus) -> RequestStatus {
        let status = request.finish(backend);
        self.chain.reap();
        status
    }

    /// Does a request that starts now pass any interceptor? (The device then orders
    /// requests that overlap, so no instance sees two at once on the same blocks.)
    pub fn intercepts(&self) -> bool {
        self.chain.snapshot().intercepts()
    }

    /// Does the device offer discard and write-zeroes? Fixed at start, when every instance
    /// of the chain handled them; one loaded later that does not makes them UNSUPP while it
    /// is in the path.
    pub fn handles_discard(&self) -> bool {
        self.chain.discard
    }

    /// The backend under the chain (the device opens its queues' engines over it).
    pub fn backend(&self) -> Arc<dyn crate::BlockBackend> {
        self.chain.snapshot().backend().clone()
    }

    /// Flushes the whole chain (every layer, then the backend) on the I/O thread.
    pub fn flush(&self) -> RequestStatus {
        let chain = self.chain.clone();
        self.io
            .run(move || chain.snapshot().flush())
            .unwrap_or(RequestStatus::IoError)
    }

    /// Shutdown: flushes the chain, then empties it and destroys every instance on the I/O
    /// thread (a plugin settles its metadata in destroy), and stops the thread. Later
    /// requests reach the backend alone; edits are refused.
    pub fn close(&self) -> RequestStatus {
        let chain = self.chain.clone();
        let status = self
            .io
            .run(move || {
                let status = chain.snapshot().flush();
                chain.closed.store(true, Relaxed);
                let top = chain.snapshot();
                chain.retire(top.layers());
                chain.publish(top.backend(), &[], top.shared_counters());
                drop(top);
                chain.reap();
                status
            })
            .unwrap_or(RequestStatus::IoError);
        self.io.stop();
        self.pool.stop();
        status
    }

    /// Loads `spec` into the chain at `position` (0 = top, next to the guest; the chain's
    /// length = bottom, next to the backend) for requests that start after this returns.
    /// `fresh` declares that the layers below hold nothing the guest needs: required for a
    /// plugin that owns its format, whose data would otherwise read back transformed.
    /// Runs on the I/O thread, between two guest requests; every check is made before the
    /// plugin's writes reach the disk, so a refused load changes no byte of it.
    pub fn insert(
        &self,
        spec: &InstanceSpec,
        position: usize,
        fresh: bool,
    ) -> Result<Arc<Instance>, ChainError> {
        let (chain, spec) = (self.chain.clone(), spec.clone());
        self.on_io_thread(move || chain.insert(&spec, position, fresh))
    }

    /// Removes instance `id` for requests that start after this returns. A plugin that
    /// owns its format and has written data stays (its data would become unreadable); one
    /// that holds data (a write-back cache) is disabled and flushed first, so it hands
    /// everything down before it goes. Runs on the I/O thread, so no guest request is in
    /// flight while it decides.
    pub fn remove(&self, id: &str) -> Result<(), ChainError> {
        let (chain, id) = (self.chain.clone(), id.to_string());
        self.on_io_thread(move || chain.remove(&id))
    }

    /// Gives instance `id` a new config (ABI version 2, the plugin's `reconfigure`), on the
    /// I/O thread with no guest request in flight. The instance keeps its old config if its
    /// plugin refuses (the error says why) or cannot be reconfigured.
    pub fn reconfigure(&self, id: &str, config_json: &str) -> Result<(), ChainError> {
        let (chain, id, config) = (self.chain.clone(), id.to_string(), config_json.to_string());
        self.on_io_thread(move || {
            let snapshot = chain.snapshot();
            let Some(instance) = snapshot.instance(&id) else {
                return Err(ChainError::NotFound {
                    device: chain.device_id.clone(),
                    id,
                });
            };
            instance.reconfigure(&config).map_err(ChainError::Invalid)
        })
    }

    /// Would [`remove`](Self::remove) refuse `id` now?
    pub fn check_removable(&self, id: &str) -> Result<(), ChainError> {
        let (chain, id) = (self.chain.clone(), id.to_string());
        self.on_io_thread(move || chain.removable(chain.snapshot().layers(), &id).map(|_| ()))
    }

    fn on_io_thread<R: Send + 'static>(
        &self,
        job: impl FnOnce() -> Result<R, ChainError> + Send + 'static,
    ) -> Result<R, ChainError> {
        self.io
            .run(job)
            .map_err(|e| ChainError::Conflict(e.to_string()))?
    }
}

impl Drop for LiveStack {
    fn drop(&mut self) {
        if !self.chain.closed.load(Relaxed) {
            self.close();
        }
    }
}

impl Chain {
    fn snapshot(&self) -> Arc<BlockStack> {
        match self.current.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn refuse_closed(&self) -> Result<(), ChainError> {
        if self.closed.load(Relaxed) {
            return Err(ChainError::Conflict(format!(
                "device `{}` is shutting down",
                self.device_id
            )));
        }
        Ok(())
    }

    fn insert(
        &self,
        spec: &InstanceSpec,
        position: usize,
        fresh: bool,
    ) -> Result<Arc<Instance>, ChainError> {
        self.refuse_closed()?;
        let top = self.snapshot();
        let layers = top.layers();
        if position > layers.len() {
            return Err(ChainError::Invalid(format!(
                "position {position} is outside device `{}`'s chain of {} (0 = top, {} = bottom)",
                self.device_id,
                layers.len(),
                layers.len()
            )));
        }
        if layers.len() >= MAX_CHAIN {
            return Err(ChainError::Conflict(format!(
                "device `{}` already has {MAX_CHAIN} interceptors",
                self.device_id
            )));
        }
        if layers.iter().any(|l| l.id() == spec.id) {
            return Err(ChainError::Conflict(format!(
                "device `{}` already has an interceptor `{}`",
                self.device_id, spec.id
            )));
        }
        let flags = spec.plugin.table().flags;
        if flags & interceptor_abi::F_OWNS_FORMAT != 0 && !fresh {
            return Err(ChainError::Conflict(format!(
                "plugin `{}` owns the format of what it writes: loaded under a running guest it \
                 would read the data already on device `{}` as its own and corrupt it; load it \
                 from the config at boot, or pass \"fresh\": true if the layers below hold \
                 nothing the guest needs",
                spec.plugin.name(),
                self.device_id
            )));
        }
        let counters = top.shared_counters().clone();
        let backend = top.backend().clone();
        // The plugin's own I/O is not the device's: the stack below gets its own counters.
        let below = BlockStack::assemble(
            &self.device_id,
            &backend,
            &layers[position..],
            &Arc::default(),
            top.pool(),
        )
        .swap_remove(0);
        let instance = Instance::create(spec, DeviceKind::Block, &self.device_id, below, true)
            .map_err(|e| match e {
                LoadError::CapacityChange { .. } => ChainError::Conflict(e.to_string()),
                e => ChainError::Load(e),
            })?;
        let instance = Arc::new(instance);
        instance.fresh.store(fresh, Relaxed);
        let mut next = layers.to_vec();
        next.insert(position, instance.clone());
        self.publish(&backend, &next, &counters);
        Ok(instance)
    }

    fn remove(&self, id: &str) -> Result<(), ChainError> {
        self.refuse_closed()?;
        let top = self.snapshot();
        let layers = top.layers();
        let k = self.removable(layers, id)?;
        let instance = &layers[k];
        if instance.keeps_when_disabled() {
            let was = instance.enabled();
            instance.set_enabled(false);
            if top.flush() != RequestStatus::Ok {
                instance.set_enabled(was);
                return Err(ChainError::Conflict(format!(
                    "interceptor `{id}` could not hand its data down (the flush failed); it stays"
                )));
            }
        }
        let mut next = layers.to_vec();
        self.retire(&[next.remove(k)]);
        self.publish(top.backend(), &next, top.shared_counters());
        drop(top);
        self.reap();
        Ok(())
    }

    /// `id`'s position, if removing it loses nothing. Called on the I/O thread, so the
    /// counters it reads include every request the guest has been answered.
    fn removable(&self, layers: &[Arc<Instance>], id: &str) -> Result<usize, ChainError> {
        let Some(k) = layers.iter().position(|l| l.id() == id) else {
            return Err(ChainError::NotFound {
                device: self.device_id.clone(),
                id: id.into(),
            });
        };
        let instance = &layers[k];
        let writes = instance.counters().writes.load(Relaxed);
        if instance.owns_format() && !(instance.loaded_fresh() && writes == 0) {
            return Err(ChainError::Conflict(format!(
                "interceptor `{id}` (plugin `{}`) owns the format of what it wrote to device \
                 `{}`: without it that data would read back as garbage. Disable it instead",
                instance.plugin().name(),
                self.device_id
            )));
        }
        Ok(k)
    }

    /// Re-points every plugin's own I/O, publishes (on the I/O thread: no request is in
    /// flight).
    fn publish(
        &self,
        backend: &Arc<dyn crate::BlockBackend>,
        layers: &[Arc<Instance>],
        counters: &Arc<StackCounters>,
    ) {
        let pool = self.snapshot().pool().clone();
        let stacks = BlockStack::assemble(&self.device_id, backend, layers, counters, &pool);
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        for (k, layer) in layers.iter().enumerate() {
            layer.repoint(stacks[k + 1].clone());
        }
        *current = stacks[0].clone();
    }

    /// Takes instances out of the chain: destroyed by [`reap`](Self::reap) on the I/O thread.
    fn retire(&self, instances: &[Arc<Instance>]) {
        lock(&self.retired).extend(instances.iter().cloned());
        self.any_retired.store(true, Relaxed);
    }

    /// Destroys the retired instances nothing else holds any more (on the I/O thread). An
    /// instance above another holds it through its own lower stack, so this repeats until
    /// nothing more goes.
    fn reap(&self) {
        if !self.any_retired.load(Relaxed) {
            return;
        }
        let mut retired = lock(&self.retired);
        loop {
            let before = retired.len();
            retired.retain(|i| Arc::strong_count(i) > 1);
            self.any_retired.store(!retired.is_empty(), Relaxed);
            if retired.len() == before {
                return;
            }
        }
    }
}

/// A request's buffers on their way to a pool thread.
struct SendSegments(Vec<Segment>);

// SAFETY: the pointers are guest memory or a private copy, valid until the request finishes
// (the `begin_on_pool` contract); only the one pool thread that starts the request uses
// them before handing the request back.
unsafe impl Send for SendSegments {}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
