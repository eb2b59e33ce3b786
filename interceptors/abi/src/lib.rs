//! The stable C ABI between the compatibility shim and interceptor plugins.
//!
//! These `#[repr(C)]` types mirror `interceptors/include/vmm_interceptor.h` field for field;
//! a test compiles the header with the system C compiler and compares sizes, offsets and
//! constants. Rust plugins normally use the safe `interceptor-sdk` crate on top of this one.

use std::ffi::{c_char, c_void};

/// Version of the plugin ABI this crate describes. Version 2 adds pending pre hooks, lower
/// I/O without waiting and timers (docs/abi-v2.md); a table of version 1 still loads and
/// runs synchronously.
pub const ABI_VERSION: u32 = 2;
/// The oldest table version a loader accepts.
pub const ABI_VERSION_MIN: u32 = 1;
/// The symbol every plugin exports (a `fn() -> *const InterceptorTable`).
pub const ENTRY_SYMBOL: &str = "vmm_interceptor_entry";
/// Offsets and lengths are multiples of this.
pub const SECTOR_SIZE: u64 = 512;

/// The device kinds a request can come from; plugins declare which ones they support.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// A virtio-blk disk.
    Block = 1,
    /// A virtio-net interface.
    Net = 2,
}

impl DeviceKind {
    /// This kind's bit in [`InterceptorTable::supported_devices`].
    pub const fn mask(self) -> u32 {
        1 << self as u32
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Block => "block",
            DeviceKind::Net => "net",
        }
    }
}

pub const REQ_READ: u32 = 1;
pub const REQ_WRITE: u32 = 2;
pub const REQ_FLUSH: u32 = 3;
pub const REQ_DISCARD: u32 = 4;
pub const REQ_GET_ID: u32 = 5;
/// Zero a range (no segments; `offset` and `len` are the range).
pub const REQ_WRITE_ZEROES: u32 = 6;
/// A frame the guest sends, on its way to the tap: seen by pre hooks, top to bottom
/// (`Request::net` is the frame).
pub const REQ_NET_TX: u32 = 7;
/// A frame for the guest, on its way from the tap: seen by post hooks, bottom to top.
pub const REQ_NET_RX: u32 = 8;

/// The segments are a private bounce buffer the hook may modify.
pub const REQ_F_DATA_PRIVATE: u32 = 1;
/// The instance is disabled (only seen by `F_KEEP_WHEN_DISABLED` plugins).
pub const REQ_F_DISABLED: u32 = 2;

pub const STATUS_OK: u32 = 0;
pub const STATUS_IOERR: u32 = 1;
pub const STATUS_UNSUPP: u32 = 2;
/// `Lower::submit`: not queued, the instance has `CreateArgs::max_lower_in_flight` lower
/// requests out (version 2).
pub const STATUS_BUSY: u32 = 3;

pub const CONTINUE: u32 = 0;
pub const COMPLETE: u32 = 1;
pub const FAIL: u32 = 2;
/// A pre hook's decision (version 2): the request waits, buffers and slot included, until
/// the plugin calls `Lower::resume` with one of the three above, exactly once.
pub const PENDING: u32 = 3;

/// The plugin transforms data: its requests carry private bounce buffers.
pub const F_MODIFIES_DATA: u32 = 1;
/// Data on disk depends on the plugin: it stays in the path while disabled.
pub const F_KEEP_WHEN_DISABLED: u32 = 2;
/// What the plugin writes reads back only through it: never removed from a running chain,
/// loaded at run time only onto layers declared fresh.
pub const F_OWNS_FORMAT: u32 = 4;
/// The plugin handles `REQ_DISCARD` and `REQ_WRITE_ZEROES`: a disk offers them to the guest
/// only when every instance a discard would reach declares this (each down to the first
/// that also declares `F_OWNS_FORMAT`: that one answers them itself, a `CONTINUE` is failed).
pub const F_HANDLES_DISCARD: u32 = 8;
/// A net plugin that needs each frame whole and plain: a device with one in its chain
/// negotiates no checksum or segmentation offload with the guest or the tap, so frames
/// are at most the MTU and carry their checksums.
pub const F_NET_PLAIN_FRAMES: u32 = 16;
/// A block plugin whose hooks may run at the same time on different threads, for different
/// requests (never two that overlap: the device orders those), its own I/O through the
/// layers below included. A disk whose every instance declares it runs the pre hooks on a
/// small pool of threads beside its I/O thread, so one request's sealing and own writes do
/// not hold up the others of its queue. Without it, a plugin's hooks never overlap.
pub const F_CONCURRENT: u32 = 32;

pub const LOG_ERROR: u32 = 1;
pub const LOG_WARN: u32 = 2;
pub const LOG_INFO: u32 = 3;
pub const LOG_DEBUG: u32 = 4;

/// One data buffer; laid out like `struct iovec`, so it can go straight to `preadv`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub base: *mut u8,
    pub len: usize,
}

/// `struct vmm_request`: a request as interceptors see it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Request {
    pub kind: u32,
    pub flags: u32,
    pub offset: u64,
    pub len: u64,
    pub segments: *const Segment,
    pub nsegments: u32,
    pub device_kind: u32,
    pub device_id: *const c_char,
    /// The frame of a `REQ_NET_TX` or `REQ_NET_RX`; NULL for block requests. Added after
    /// the first ABI: block plugins built before it never read it.
    pub net: *mut NetFrame,
    /// This request, for `Lower::submit` and `Lower::resume` (version 2): valid from the
    /// pre hook until the request is resumed or its post hook returns. NULL where the
    /// request cannot wait (a net frame, a request through the synchronous walk).
    pub handle: *mut c_void,
}

/// `struct virtio_net_hdr_v1`: the offload header that travels with a frame between the
/// guest and the tap (checksum still to compute, segmentation still to do).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

/// Answers a frame: sends `frame` (`len` bytes, from its Ethernet header) back the way the
/// frame came (to the guest for a TX frame, to the tap for an RX one), past the other
/// instances. Returns a `STATUS_*`.
pub type InjectFn = unsafe extern "C" fn(ctx: *mut c_void, frame: *const u8, len: u32) -> u32;

/// `struct vmm_net_frame`: one Ethernet frame in a private buffer the hook may change.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NetFrame {
    /// The frame, from its Ethernet header (no virtio header).
    pub data: *mut u8,
    /// Its length; a hook may set it to anything from 14 to `capacity`.
    pub len: u32,
    /// Bytes `data` holds.
    pub capacity: u32,
    /// The frame's offload header; a hook that changes the frame must keep it true
    /// (`F_NET_PLAIN_FRAMES` plugins see it all zero).
    pub header: NetHeader,
    pub inject_ctx: *mut c_void,
    pub inject: Option<InjectFn>,
}

/// The smallest frame (an Ethernet header).
pub const NET_FRAME_MIN: u32 = 14;

/// `struct vmm_lower`: the layers below an instance.
#[repr(C)]
pub struct Lower {
    pub ctx: *mut c_void,
    pub read: unsafe extern "C" fn(ctx: *mut c_void, offset: u64, buf: *mut u8, len: u64) -> u32,
    pub write: unsafe extern "C" fn(ctx: *mut c_void, offset: u64, buf: *const u8, len: u64) -> u32,
    pub flush: unsafe extern "C" fn(ctx: *mut c_void) -> u32,
    pub log: unsafe extern "C" fn(ctx: *mut c_void, level: u32, message: *const c_char),
    pub capacity: u64,
    /// Present only when `CreateArgs::lower_features` has `LOWER_F_DISCARD`.
    pub discard: unsafe extern "C" fn(ctx: *mut c_void, offset: u64, len: u64) -> u32,
    /// The three below: present only when `CreateArgs::lower_features` has
    /// `LOWER_F_ASYNC`. Queues a lower request on behalf of request `handle`.
    pub submit: SubmitFn,
    /// Ends the wait of request `handle`, which a pre hook left `PENDING`.
    pub resume: ResumeFn,
    /// Calls `fire(arg, 0)` after `ns` nanoseconds.
    pub timer: TimerFn,
}

/// `CreateArgs::lower_features`: `Lower::discard` is there.
pub const LOWER_F_DISCARD: u32 = 1;
/// `CreateArgs::lower_features`: `Lower::submit`, `resume` and `timer` are there (version 2).
pub const LOWER_F_ASYNC: u32 = 2;

/// Called once when a lower request completes, with its `STATUS_*`, on the thread that
/// runs its parent request's hooks; never inside `submit`.
pub type DoneFn = unsafe extern "C" fn(arg: *mut c_void, status: u32);
/// Called once when a timer is due (`cancelled` 0) or the disk drains (`cancelled` 1), on
/// the instance's thread.
pub type FireFn = unsafe extern "C" fn(arg: *mut c_void, cancelled: u32);

/// `struct vmm_lower_io`: a request to the layers below, queued by `Lower::submit`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LowerIo {
    /// `REQ_READ`, `REQ_WRITE`, `REQ_FLUSH`, `REQ_DISCARD` or `REQ_WRITE_ZEROES`.
    pub kind: u32,
    /// 0 (reserved).
    pub flags: u32,
    pub offset: u64,
    /// The segments' total for a read or write; the range for a discard or write-zeroes.
    pub len: u64,
    /// Valid until `done` runs (the plugin's memory, or its parent request's).
    pub segments: *const Segment,
    pub nsegments: u32,
    pub done: Option<DoneFn>,
    pub arg: *mut c_void,
}

pub type SubmitFn =
    unsafe extern "C" fn(ctx: *mut c_void, handle: *mut c_void, io: *const LowerIo) -> u32;
pub type ResumeFn =
    unsafe extern "C" fn(ctx: *mut c_void, handle: *mut c_void, decision: u32) -> u32;
pub type TimerFn =
    unsafe extern "C" fn(ctx: *mut c_void, ns: u64, fire: Option<FireFn>, arg: *mut c_void) -> u32;

/// `struct vmm_create_args`.
#[repr(C)]
pub struct CreateArgs {
    pub instance_id: *const c_char,
    pub config_json: *const c_char,
    pub device_kind: u32,
    pub lower_features: u32,
    pub device_id: *const c_char,
    pub lower: *const Lower,
    /// Lower requests an instance may have out at once (`LOWER_F_ASYNC`).
    pub max_lower_in_flight: u32,
}

pub type CreateFn =
    unsafe extern "C" fn(args: *const CreateArgs, err: *mut c_char, err_len: usize) -> *mut c_void;
pub type PreFn =
    unsafe extern "C" fn(instance: *mut c_void, req: *const Request, slot: *mut *mut c_void) -> u32;
pub type PostFn = unsafe extern "C" fn(
    instance: *mut c_void,
    req: *const Request,
    slot: *mut c_void,
    status: u32,
) -> u32;
pub type StatsFn =
    unsafe extern "C" fn(instance: *mut c_void, buf: *mut c_char, len: usize) -> usize;
pub type DestroyFn = unsafe extern "C" fn(instance: *mut c_void);
pub type CapacityFn = unsafe extern "C" fn(instance: *mut c_void) -> u64;
/// Same calling convention as [`StatsFn`]; the JSON is a check report (see the header).
pub type CheckFn =
    unsafe extern "C" fn(instance: *mut c_void, buf: *mut c_char, len: usize) -> usize;
/// Gives a running instance a new config (version 2): `STATUS_OK`, or an error with a
/// NUL-terminated reason in `err` (the instance keeps its old config then).
pub type ReconfigureFn = unsafe extern "C" fn(
    instance: *mut c_void,
    config_json: *const c_char,
    err: *mut c_char,
    err_len: usize,
) -> u32;
/// The type of the exported entry symbol.
pub type EntryFn = unsafe extern "C" fn() -> *const InterceptorTable;

/// `struct vmm_interceptor_table`: what the entry symbol returns.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct InterceptorTable {
    pub abi_version: u32,
    pub flags: u32,
    pub supported_devices: u32,
    /// `size_of` the table the plugin was built with; 0 (the first tables) means
    /// [`TABLE_V1_SIZE`]. The host reads only the fields that size covers, so the table
    /// grows at its end without a new ABI version.
    pub table_size: u32,
    pub name: *const c_char,
    pub create: Option<CreateFn>,
    pub pre: Option<PreFn>,
    pub post: Option<PostFn>,
    pub stats: Option<StatsFn>,
    pub destroy: Option<DestroyFn>,
    pub capacity: Option<CapacityFn>,
    /// Verifies what the instance keeps on its disk (`vmm-img check`). Added after the
    /// first tables: present when `table_size` covers it.
    pub check: Option<CheckFn>,
    /// Bytes a net plugin may add to a frame (a seal's nonce and tag): the device lowers
    /// the MTU it tells the guest by the chain's sum. Present when `table_size` covers it.
    pub net_headroom: u32,
    /// Takes a new config while the instance runs (`PATCH /interceptors/{id}`), on the
    /// instance's thread with nothing of its disk in flight. Version 2; present when
    /// `table_size` covers it.
    pub reconfigure: Option<ReconfigureFn>,
}

/// Bytes of the first table (up to `capacity`), which a `table_size` of 0 stands for.
pub const TABLE_V1_SIZE: usize = std::mem::offset_of!(InterceptorTable, check);

// SAFETY: a table is immutable static data (function pointers and a pointer to a static
// name); sharing it between threads is what the ABI promises.
unsafe impl Sync for InterceptorTable {}
unsafe impl Send for InterceptorTable {}

#[cfg(test)]
mod tests;
