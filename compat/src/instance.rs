//! One configured interceptor instance: a plugin's state for one device, its enable flag,
//! its place over "the layers below", and the shim's counters for it.

use crate::latency::LatencyHistogram;
use crate::loader::{LoadError, Plugin};
use crate::lower::LowerCtx;
use crate::stack::BlockStack;
use crate::DeviceKind;
use interceptor_abi as abi;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// What an instance's check found: each broken invariant (none: clean) and what was
/// checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckOutcome {
    pub problems: Vec<String>,
    pub details: serde_json::Map<String, serde_json::Value>,
}

/// What the config says about one instance.
#[derive(Clone, Debug)]
pub struct InstanceSpec {
    pub id: String,
    pub plugin: Arc<Plugin>,
    /// The instance's config as a JSON object.
    pub config_json: String,
    pub enabled: bool,
}

/// The shim's own counters for an instance (only counted while it is in the path).
#[derive(Debug, Default)]
pub struct InstanceCounters {
    /// Requests whose pre hook ran.
    pub requests: AtomicU64,
    /// Data bytes of those requests.
    pub bytes: AtomicU64,
    /// Writes among them (an instance that owns its format has data on disk once non-zero).
    pub writes: AtomicU64,
    /// Requests this instance failed (pre returned fail, post returned an error, or a bad
    /// return value).
    pub errors: AtomicU64,
    /// Requests this instance satisfied without the layers below.
    pub completed: AtomicU64,
    /// Time from its pre hook to its post hook, the layers below included.
    pub latency: LatencyHistogram,
}

pub struct Instance {
    id: String,
    device_id: CString,
    handle: *mut c_void,
    pre: abi::PreFn,
    post: abi::PostFn,
    flags: u32,
    enabled: AtomicBool,
    capacity: u64,
    /// Loaded at run time onto layers the operator declared fresh (see `F_OWNS_FORMAT`).
    pub(crate) fresh: AtomicBool,
    pub(crate) counters: InstanceCounters,
    // Dropped after `handle` is destroyed (see Drop): the plugin may call the lower handle
    // until destroy returns, and its code must stay loaded until then.
    lower: Box<LowerCtx>,
    plugin: Arc<Plugin>,
}

// SAFETY: the ABI requires a plugin's hooks to be callable from the device thread and its
// stats from any thread; `handle` is only passed back to the plugin that made it.
unsafe impl Send for Instance {}
unsafe impl Sync for Instance {}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("id", &self.id)
            .field("plugin", &self.plugin.name())
            .field("enabled", &self.enabled())
            .finish()
    }
}

fn c_string(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

/// How many times the bytes below a plugin that owns its format may expose (thin
/// provisioning: the extent store allows as much, `extent_store::MAX_THIN`).
pub const MAX_THIN_FACTOR: u64 = 16;

impl Instance {
    /// Creates the instance over `below` (the device's stack under it). `keep_capacity`:
    /// refuse a plugin that would expose another size (a running guest's disk cannot change
    /// size). What the plugin writes while it is created reaches `below` only once every
    /// check passed: a refused instance changes no byte of the disk.
    pub(crate) fn create(
        spec: &InstanceSpec,
        device_kind: DeviceKind,
        device_id: &str,
        below: Arc<BlockStack>,
        keep_capacity: bool,
    ) -> Result<Instance, LoadError> {
        let plugin = spec.plugin.clone();
        let table = plugin.table();
        let name = plugin.name().to_string();
        if table.supported_devices & device_kind.mask() == 0 {
            return Err(LoadError::UnsupportedDevice {
                plugin: name,
                kind: device_kind.name(),
            });
        }
        let (Some(create), Some(pre), Some(post)) = (table.create, table.pre, table.post) else {
            return Err(LoadError::BadInstance {
                plugin: name,
                message: "table lacks create, pre or post".into(),
            });
        };
        let below_capacity = below.capacity();
        let lower = LowerCtx::new(&spec.id, below);
        lower.stage();
        let instance_id = c_string(&spec.id);
        let config = c_string(&spec.config_json);
        let device = c_string(device_id);
        let args = abi::CreateArgs {
            instance_id: instance_id.as_ptr(),
            config_json: config.as_ptr(),
            device_kind: device_kind as u32,
            lower_features: abi::LOWER_F_DISCARD | abi::LOWER_F_ASYNC,
            device_id: device.as_ptr(),
            lower: lower.raw(),
            max_lower_in_flight: crate::exec::MAX_LOWER_IN_FLIGHT,
        };
        let mut err = vec![0u8; 1024];
        // SAFETY: args and the strings it points to live across the call; err is writable
        // for its length.
        let handle = unsafe { create(&args, err.as_mut_ptr().cast(), err.len()) };
        if handle.is_null() {
            let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
            let message = String::from_utf8_lossy(&err[..end]).replace('\n', " ");
            return Err(LoadError::CreateFailed {
                plugin: name,
                message: if message.is_empty() {
                    "create() returned NULL without a reason".into()
                } else {
                    message
                },
            });
        }
        let mut instance = Instance {
            id: spec.id.clone(),
            device_id: device,
            handle,
            pre,
            post,
            flags: table.flags,
            enabled: AtomicBool::new(spec.enabled),
            capacity: below_capacity,
            fresh: AtomicBool::new(false),
            counters: InstanceCounters::default(),
            lower,
            plugin,
        };
        // From here on, dropping `instance` destroys the plugin's state; while the lower
        // handle still stages, whatever destroy writes is dropped with it.
        instance.capacity = instance.exposed_capacity(below_capacity)?;
        if keep_capacity && instance.capacity != below_capacity {
            return Err(LoadError::CapacityChange {
                plugin: instance.plugin.name().to_string(),
                exposed: instance.capacity,
                below: below_capacity,
            });
        }
        if let Err(message) = instance.lower.commit() {
            instance.lower.stage();
            return Err(LoadError::BadInstance {
                plugin: instance.plugin.name().to_string(),
                message,
            });
        }
        Ok(instance)
    }

    fn exposed_capacity(&self, below: u64) -> Result<u64, LoadError> {
        let Some(capacity) = self.plugin.table().capacity else {
            return Ok(below);
        };
        // SAFETY: handle came from this plugin's create.
        let exposed = unsafe { capacity(self.handle) };
        if exposed == u64::MAX {
            return Ok(below);
        }
        let bad = |message: String| {
            Err(LoadError::BadInstance {
                plugin: self.plugin.name().to_string(),
                message,
            })
        };
        // More than below (thin provisioning) only from a plugin that answers every request
        // itself (F_OWNS_FORMAT): nothing past the end below is ever passed down.
        let owns_format = self.flags & abi::F_OWNS_FORMAT != 0;
        let most = if owns_format {
            below.saturating_mul(MAX_THIN_FACTOR)
        } else {
            below
        };
        if exposed == below {
            Ok(below)
        } else if exposed == 0 || exposed > most || !exposed.is_multiple_of(crate::SECTOR_SIZE) {
            bad(format!(
                "capacity {exposed} must be a non-zero multiple of 512 up to the {below} bytes \
                 below ({MAX_THIN_FACTOR} times that for a plugin that owns its format)"
            ))
        } else if self.flags & abi::F_KEEP_WHEN_DISABLED == 0 {
            bad("only a plugin that stays in the path when disabled may change the capacity".into())
        } else {
            Ok(exposed)
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn plugin(&self) -> &Arc<Plugin> {
        &self.plugin
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Enables or disables the instance for requests that start after this call.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
    }

    /// The plugin transforms data (its requests get bounce buffers).
    pub fn modifies_data(&self) -> bool {
        self.flags & abi::F_MODIFIES_DATA != 0
    }

    /// The plugin stays in the path while disabled.
    pub fn keeps_when_disabled(&self) -> bool {
        self.flags & abi::F_KEEP_WHEN_DISABLED != 0
    }

    /// The plugin handles discard and write-zeroes requests.
    pub fn handles_discard(&self) -> bool {
        self.flags & abi::F_HANDLES_DISCARD != 0
    }

    /// The plugin's hooks may run concurrently for different requests.
    pub fn concurrent(&self) -> bool {
        self.flags & abi::F_CONCURRENT != 0
    }

    /// What the plugin writes reads back only through it.
    pub fn owns_format(&self) -> bool {
        self.flags & abi::F_OWNS_FORMAT != 0
    }

    /// Was it loaded at run time onto layers declared fresh?
    pub fn loaded_fresh(&self) -> bool {
        self.fresh.load(Ordering::Relaxed)
    }

    /// Points its own I/O at a rebuilt stack below it.
    pub(crate) fn repoint(&self, below: Arc<BlockStack>) {
        self.lower.repoint(below);
    }

    /// Bytes this instance exposes to the layers above.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn counters(&self) -> &InstanceCounters {
        &self.counters
    }

    pub(crate) fn device_id_ptr(&self) -> *const std::ffi::c_char {
        self.device_id.as_ptr()
    }

    /// Calls the pre hook.
    ///
    /// # Safety
    /// `req`'s segments must be valid for the call, as the ABI describes.
    /// Who this instance is to the shim's `vmm_lower` functions (the `ctx` they get).
    pub(crate) fn lower_ctx(&self) -> usize {
        &*self.lower as *const LowerCtx as usize
    }

    pub(crate) unsafe fn call_pre(&self, req: &abi::Request, slot: &mut *mut c_void) -> u32 {
        (self.pre)(self.handle, req, slot)
    }

    /// Calls the post hook. Safety as for `call_pre`.
    pub(crate) unsafe fn call_post(
        &self,
        req: &abi::Request,
        slot: *mut c_void,
        status: u32,
    ) -> u32 {
        (self.post)(self.handle, req, slot, status)
    }

    /// The plugin's statistics (a JSON object), or why they are unavailable.
    pub fn plugin_stats(&self) -> Result<serde_json::Value, String> {
        let Some(stats) = self.plugin.table().stats else {
            return Ok(serde_json::json!({}));
        };
        self.call_json("stats", stats, 4096)
    }

    /// Can the plugin take a new config while it runs (a `reconfigure` in its table)?
    pub fn can_reconfigure(&self) -> bool {
        self.plugin.table().reconfigure.is_some()
    }

    /// Gives the running instance a new config (`config_json`, a JSON object as `create`
    /// got): the plugin takes it or refuses it, keeping its old one, and says why. Call it
    /// on the thread that calls the hooks, with no request in flight.
    pub fn reconfigure(&self, config_json: &str) -> Result<(), String> {
        let Some(f) = self.plugin.table().reconfigure else {
            return Err(format!(
                "interceptor {}: its plugin cannot change its config while it runs (version 1, \
                 or no reconfigure in its table): remove and load it again",
                self.id()
            ));
        };
        let config = std::ffi::CString::new(config_json)
            .map_err(|_| format!("interceptor {}: the config holds a NUL byte", self.id()))?;
        let mut err = vec![0u8; 1024];
        // SAFETY: the handle is this plugin's, live until destroy; the config is a
        // NUL-terminated string and `err` is writable for its length, for the call.
        let status = unsafe {
            f(
                self.handle,
                config.as_ptr(),
                err.as_mut_ptr().cast(),
                err.len(),
            )
        };
        if status == abi::STATUS_OK {
            return Ok(());
        }
        let n = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        let why = String::from_utf8_lossy(&err[..n]);
        Err(format!("interceptor {}: {why}", self.id()))
    }

    /// Runs the plugin's check of what it keeps on the disk (`None`: it keeps nothing
    /// there, or has no check). Call it with no request in flight, on the thread that
    /// calls the hooks; it may read the whole disk.
    pub fn check(&self) -> Result<Option<CheckOutcome>, String> {
        let Some(check) = self.plugin.table().check else {
            return Ok(None);
        };
        // Big enough that the check (which may read the whole disk) runs once.
        let v = self.call_json("check", check, 1 << 20)?;
        if v["checked"] != serde_json::Value::Bool(true) {
            return Ok(None);
        }
        let problems = match v.get("problems") {
            None => Vec::new(),
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|p| {
                    p.as_str()
                        .map(String::from)
                        .unwrap_or_else(|| p.to_string())
                })
                .collect(),
            Some(_) => return Err("check: problems is not an array".into()),
        };
        let details = match v.get("details") {
            Some(serde_json::Value::Object(m)) => m.clone(),
            _ => serde_json::Map::new(),
        };
        Ok(Some(CheckOutcome { problems, details }))
    }

    /// Calls a hook that writes a JSON object like snprintf (`stats`, `check`), growing the
    /// buffer once if it did not fit.
    fn call_json(
        &self,
        what: &str,
        hook: abi::StatsFn,
        first_len: usize,
    ) -> Result<serde_json::Value, String> {
        let mut buf = vec![0u8; first_len];
        for _ in 0..2 {
            // SAFETY: buf is writable for its length; handle is this plugin's.
            let n = unsafe { hook(self.handle, buf.as_mut_ptr().cast(), buf.len()) };
            if n < buf.len() {
                let value: serde_json::Value = serde_json::from_slice(&buf[..n])
                    .map_err(|e| format!("{what} are not JSON: {e}"))?;
                return if value.is_object() {
                    Ok(value)
                } else {
                    Err(format!("{what}: not a JSON object"))
                };
            }
            if n >= 16 << 20 {
                break;
            }
            buf = vec![0u8; n + 1];
        }
        Err(format!("{what}: larger than 16 MiB"))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(destroy) = self.plugin.table().destroy {
            // SAFETY: handle came from create and is destroyed exactly once, here.
            unsafe { destroy(self.handle) };
        }
    }
}
