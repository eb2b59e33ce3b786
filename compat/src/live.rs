//! A device's chain as it changes while the guest runs: the REST API loads an instance into
//! it or removes one. Each guest request runs on one consistent [`BlockStack`], taken under a
//! read lock it holds until the request completes; an edit takes the write lock, so it waits
//! for the requests in flight to drain, then re-points the plugins' own I/O ("the layers
//! below") and publishes the new stack before any further request starts. No request sees
//! half an edit.

use crate::instance::{Instance, InstanceSpec};
use crate::loader::LoadError;
use crate::stack::{BlockStack, StackCounters, MAX_CHAIN};
use crate::{BlockRequestKind, DeviceKind, RequestStatus, Segment};
use std::sync::atomic::Ordering::Relaxed;
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

pub struct LiveStack {
    device_id: String,
    /// What the guest sees; fixed for the device's life (an edit that would change it is
    /// refused).
    capacity: u64,
    current: RwLock<Arc<BlockStack>>,
    /// Serializes edits (plugin creation runs outside the write lock).
    edit: Mutex<()>,
}

impl std::fmt::Debug for LiveStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveStack")
            .field("device_id", &self.device_id)
            .field("stack", &self.snapshot())
            .finish()
    }
}

impl LiveStack {
    pub fn new(stack: Arc<BlockStack>) -> LiveStack {
        LiveStack {
            device_id: stack.device_id().to_string(),
            capacity: stack.capacity(),
            current: RwLock::new(stack),
            edit: Mutex::new(()),
        }
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The chain as it is now (top to bottom in `layers()`).
    pub fn snapshot(&self) -> Arc<BlockStack> {
        match self.current.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn counters(&self) -> Arc<StackCounters> {
        self.snapshot().shared_counters().clone()
    }

    /// Runs one guest request on the current chain. Safety as for [`BlockStack::submit`].
    ///
    /// # Safety
    /// See [`BlockStack::submit`].
    pub unsafe fn submit(
        &self,
        kind: BlockRequestKind,
        offset: u64,
        segments: &[Segment],
    ) -> RequestStatus {
        let stack = match self.current.read() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        stack.submit(kind, offset, segments)
    }

    /// Flushes the whole chain (every layer, then the driver).
    pub fn flush(&self) -> RequestStatus {
        // SAFETY: a flush carries no segments.
        unsafe { self.submit(BlockRequestKind::Flush, 0, &[]) }
    }

    /// Loads `spec` into the chain at `position` (0 = top, next to the guest; the chain's
    /// length = bottom, next to the driver) for requests that start after this returns.
    /// `fresh` declares that the layers below hold nothing the guest needs: required for a
    /// plugin that owns its format, whose data would otherwise read back transformed.
    pub fn insert(
        &self,
        spec: &InstanceSpec,
        position: usize,
        fresh: bool,
    ) -> Result<Arc<Instance>, ChainError> {
        let _edit = self.edit.lock().unwrap_or_else(|p| p.into_inner());
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
        let driver = top.driver().clone();
        // The plugin's own I/O is not the device's: the stack below gets its own counters.
        let below = BlockStack::assemble(
            &self.device_id,
            &driver,
            &layers[position..],
            &Arc::default(),
        )
        .swap_remove(0);
        let below_capacity = below.capacity();
        let instance = Arc::new(Instance::create(
            spec,
            DeviceKind::Block,
            &self.device_id,
            below,
        )?);
        if instance.capacity() != below_capacity {
            return Err(ChainError::Conflict(format!(
                "plugin `{}` would expose {} bytes where the layers below hold {below_capacity}: \
                 a running guest's disk cannot change size; load it from the config at boot",
                spec.plugin.name(),
                instance.capacity()
            )));
        }
        instance.fresh.store(fresh, Relaxed);
        let mut next = layers.to_vec();
        next.insert(position, instance.clone());
        self.publish(&driver, &next, &counters);
        Ok(instance)
    }

    /// Removes instance `id` for requests that start after this returns, once the requests
    /// in flight have drained. A plugin that owns its format and has written data stays
    /// (its data would become unreadable); one that holds data (a write-back cache) is
    /// disabled and flushed first, so it hands everything down before it goes.
    pub fn remove(&self, id: &str) -> Result<(), ChainError> {
        let _edit = self.edit.lock().unwrap_or_else(|p| p.into_inner());
        let top = self.snapshot();
        let layers = top.layers();
        let k = self.removable(layers, id)?;
        let instance = &layers[k];
        if instance.keeps_when_disabled() {
            let was = instance.enabled();
            instance.set_enabled(false);
            if self.flush() != RequestStatus::Ok {
                instance.set_enabled(was);
                return Err(ChainError::Conflict(format!(
                    "interceptor `{id}` could not hand its data down (the flush failed); it stays"
                )));
            }
        }
        let mut next = layers.to_vec();
        next.remove(k);
        let (driver, counters) = (top.driver().clone(), top.shared_counters().clone());
        self.publish(&driver, &next, &counters);
        // The removed instance is destroyed when its last holder lets go: here, or when a
        // reader of an older snapshot (an API request) finishes.
        Ok(())
    }

    /// Would [`remove`](Self::remove) refuse `id` now?
    pub fn check_removable(&self, id: &str) -> Result<(), ChainError> {
        self.removable(self.snapshot().layers(), id).map(|_| ())
    }

    /// `id`'s position, if removing it loses nothing.
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

    /// Waits for the requests in flight, re-points every plugin's own I/O, publishes.
    fn publish(
        &self,
        driver: &Arc<dyn crate::BlockDriver>,
        layers: &[Arc<Instance>],
        counters: &Arc<StackCounters>,
    ) {
        let stacks = BlockStack::assemble(&self.device_id, driver, layers, counters);
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        for (k, layer) in layers.iter().enumerate() {
            layer.repoint(stacks[k + 1].clone());
        }
        *current = stacks[0].clone();
    }
}
