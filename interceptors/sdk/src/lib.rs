//! Write an interceptor plugin in safe Rust.
//!
//! Implement [`Interceptor`] for your type and export it with [`export_interceptor!`]; build
//! the crate as a `cdylib` and name the `.so` in the VMM's `guest.toml`. The SDK turns the
//! C ABI of `vmm_interceptor.h` into safe calls and stops every panic at the boundary: a
//! panicking `pre` or `post` fails that request with an I/O error and the VMM goes on.
//!
//! A complete plugin that counts writes and refuses any write to the first sector:
//!
//! ```
//! use interceptor_sdk::{export_interceptor, CreateContext, Decision, Interceptor, Request,
//!     RequestKind, Slot};
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! struct GuardMbr {
//!     writes: AtomicU64,
//! }
//!
//! impl Interceptor for GuardMbr {
//!     const NAME: &'static std::ffi::CStr = c"guard-mbr";
//!
//!     fn create(_ctx: CreateContext<'_>) -> Result<Self, String> {
//!         Ok(GuardMbr { writes: AtomicU64::new(0) })
//!     }
//!
//!     fn pre(&self, req: &mut Request<'_>, _slot: &mut Slot) -> Decision {
//!         if req.kind() != RequestKind::Write {
//!             return Decision::Continue;
//!         }
//!         self.writes.fetch_add(1, Ordering::Relaxed);
//!         if req.offset() == 0 { Decision::Fail } else { Decision::Continue }
//!     }
//!
//!     fn stats(&self) -> serde_json::Value {
//!         serde_json::json!({ "writes": self.writes.load(Ordering::Relaxed) })
//!     }
//! }
//!
//! export_interceptor!(GuardMbr);
//! # fn main() {
//! #     let table = unsafe { &*vmm_interceptor_entry() };
//! #     assert_eq!(table.abi_version, interceptor_sdk::abi::ABI_VERSION);
//! # }
//! ```
//!
//! `Cargo.toml` of such a plugin:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! interceptor-sdk = { path = ".../interceptors/sdk" }
//! serde_json = "1"
//! ```

mod blocks;
mod ffi;
mod frame;
pub mod key;
mod lower;
mod pending;
mod request;

pub use blocks::{block_pieces, BlockPiece};
pub use frame::{Frame, FrameError, NetHeader};
pub use interceptor_abi as abi;
pub use interceptor_abi::DeviceKind;
pub use lower::{IoError, LogLevel, Lower};
pub use pending::{Handle, SubmitError};
pub use request::{DataError, Request, RequestKind};

#[doc(hidden)]
pub use ffi::table;

use std::any::Any;
use std::ffi::CStr;

/// State a `pre` hook keeps for its own `post` hook of the same request.
pub type Slot = Option<Box<dyn Any + Send>>;

/// What a `pre` hook decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Pass the request on to the layers below.
    Continue,
    /// Satisfied here with status OK (for a read: the data is in place); skip the layers
    /// below. This interceptor's `post` hook still runs.
    Complete,
    /// Fail the request: the guest sees an I/O error.
    Fail,
    /// The request waits (ABI version 2): this instance resumes it later with
    /// [`Lower::resume`], exactly once (see the `pending` module). Only a request with a
    /// [`Request::handle`] may wait; any other is failed.
    Pending,
}

/// A request's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    IoError,
    Unsupported,
}

impl Status {
    /// The ABI value.
    pub fn to_raw(self) -> u32 {
        match self {
            Status::Ok => abi::STATUS_OK,
            Status::IoError => abi::STATUS_IOERR,
            Status::Unsupported => abi::STATUS_UNSUPP,
        }
    }

    /// From an ABI value; unknown values are errors.
    pub fn from_raw(v: u32) -> Status {
        match v {
            abi::STATUS_OK => Status::Ok,
            abi::STATUS_UNSUPP => Status::Unsupported,
            _ => Status::IoError,
        }
    }
}

/// What `create` gets: the instance's identity and config and the layers below it.
pub struct CreateContext<'a> {
    pub instance_id: &'a str,
    /// The `config` table of the instance's `[[interceptor]]` entry (an empty object if none).
    pub config: serde_json::Value,
    pub device_kind: Option<DeviceKind>,
    pub device_id: &'a str,
    /// The layers below this instance; keep it for the plugin's own I/O.
    pub lower: Lower,
}

/// The host's available memory (`MemAvailable`), in MiB; `None` where it cannot be read. A
/// plugin that takes memory by its config (a cache, an index) refuses a size over it, so
/// that a typo does not become an out-of-memory kill later.
///
/// ```
/// let mib = interceptor_sdk::host_available_mib();
/// assert!(mib.is_none_or(|m| m > 0));
/// ```
pub fn host_available_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib / 1024)
}

impl CreateContext<'_> {
    /// The config deserialized into `T`, or a message naming what is wrong.
    ///
    /// ```
    /// # use interceptor_sdk::CreateContext;
    /// #[derive(serde::Deserialize)]
    /// #[serde(deny_unknown_fields)]
    /// struct Config { key: u8 }
    /// fn key(ctx: &CreateContext<'_>) -> Result<u8, String> {
    ///     Ok(ctx.config_as::<Config>()?.key)
    /// }
    /// ```
    pub fn config_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        // The error names the field it is about (`key_file: invalid type ...`): the shim
        // adds the config file and the instance.
        serde_path_to_error::deserialize(self.config.clone()).map_err(|e| {
            let path = e.path().to_string();
            if path == "." {
                format!("config: {}", e.inner())
            } else {
                format!("config: {path}: {}", e.inner())
            }
        })
    }
}

/// An interceptor. One value per configured instance; hooks may run on the device's I/O
/// thread while `stats` runs on another, hence `Sync`.
pub trait Interceptor: Sized + Send + Sync + 'static {
    /// The plugin's name.
    const NAME: &'static CStr;
    /// `abi::F_MODIFIES_DATA`, `abi::F_KEEP_WHEN_DISABLED`, `abi::F_OWNS_FORMAT`,
    /// `abi::F_HANDLES_DISCARD`, `abi::F_NET_PLAIN_FRAMES`, `abi::F_CONCURRENT` (hooks may
    /// run side by side for different requests: see docs/plugins.md, "Threads").
    const FLAGS: u32 = 0;
    /// Mask of the device kinds the plugin serves: `DeviceKind::Block.mask()`,
    /// `DeviceKind::Net.mask()`, or both or'ed. A plugin is refused at load on a device of
    /// a kind it does not declare.
    const DEVICES: u32 = DeviceKind::Block.mask();
    /// Bytes a net plugin may add to a frame (the device lowers the guest's MTU by it).
    const NET_HEADROOM: u32 = 0;

    /// Makes an instance; an `Err` refuses the configuration with that message.
    fn create(ctx: CreateContext<'_>) -> Result<Self, String>;

    /// The pre-processing hook (top to bottom).
    fn pre(&self, _req: &mut Request<'_>, _slot: &mut Slot) -> Decision {
        Decision::Continue
    }

    /// The post-processing hook (bottom to top), with the status from below; returns the
    /// status to pass up.
    fn post(&self, _req: &mut Request<'_>, _slot: Slot, status: Status) -> Status {
        status
    }

    /// Statistics, as a JSON object.
    fn stats(&self) -> serde_json::Value {
        serde_json::json!({})
    }

    /// Bytes exposed to the layers above; `None` for the capacity below. Only plugins with
    /// `F_KEEP_WHEN_DISABLED` may expose another size.
    fn capacity(&self) -> Option<u64> {
        None
    }

    /// Verifies every invariant of what the instance keeps on its disk, reading all of it
    /// if need be (`vmm-img check` calls it with no requests in flight); `None` for a
    /// plugin that keeps nothing there. It may do I/O through its [`Lower`].
    fn check(&self) -> Option<CheckReport> {
        None
    }

    /// Takes a new config while the instance runs (`PATCH /interceptors/{id}` with a
    /// `config`), on its disk's thread with nothing of the disk in flight. `Err` keeps the
    /// old one and tells the operator why. The default refuses: most plugins are
    /// reconfigured by a reload.
    fn reconfigure(&self, _config: serde_json::Value) -> Result<(), String> {
        Err(format!(
            "{} cannot change its config while it runs: remove and load it again",
            Self::NAME.to_string_lossy()
        ))
    }
}

/// What [`Interceptor::check`] found.
///
/// ```
/// use interceptor_sdk::CheckReport;
///
/// let mut r = CheckReport::default();
/// r.details.insert("blocks_checked".into(), 128.into());
/// r.problems.push("block 7: its tag does not match".into());
/// assert!(!r.is_clean());
/// assert_eq!(r.to_json()["problems"][0], "block 7: its tag does not match");
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckReport {
    /// Each broken invariant, one line each; empty when the disk is clean.
    pub problems: Vec<String>,
    /// What was checked (counts, the format's version), printed beside the verdict.
    pub details: serde_json::Map<String, serde_json::Value>,
}

impl CheckReport {
    /// Problems a report carries at most; the rest are counted in one more line.
    pub const MAX_PROBLEMS: usize = 100;

    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// The report as the ABI's check hook writes it:
    /// `{"checked": true, "problems": [...], "details": {...}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut problems: Vec<serde_json::Value> = self
            .problems
            .iter()
            .take(Self::MAX_PROBLEMS)
            .map(|p| p.as_str().into())
            .collect();
        if self.problems.len() > Self::MAX_PROBLEMS {
            let more = self.problems.len() - Self::MAX_PROBLEMS;
            problems.push(format!("... and {more} more").into());
        }
        serde_json::json!({
            "checked": true,
            "problems": problems,
            "details": self.details,
        })
    }
}

/// Exports `$t` as the plugin of this `cdylib`: defines the `vmm_interceptor_entry` symbol.
#[macro_export]
macro_rules! export_interceptor {
    ($t:ty) => {
        /// The plugin's entry point (see `vmm_interceptor.h`).
        #[no_mangle]
        pub extern "C" fn vmm_interceptor_entry() -> *const $crate::abi::InterceptorTable {
            static TABLE: $crate::abi::InterceptorTable = $crate::table::<$t>();
            &TABLE
        }
    };
}

/// A `'static` table for `$t` without exporting a symbol: for linking an interceptor into
/// a program directly (tests, benchmarks).
#[macro_export]
macro_rules! static_table {
    ($t:ty) => {{
        static TABLE: $crate::abi::InterceptorTable = $crate::table::<$t>();
        &TABLE
    }};
}
