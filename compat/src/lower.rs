//! "The layers below" an instance, as the C `vmm_lower` table: a plugin's own reads,
//! writes and flushes go through the interceptors under it and then the driver.

use crate::stack::BlockStack;
use crate::{BlockRequestKind, Segment, SECTOR_SIZE};
use interceptor_abi as abi;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, RwLock};

pub(crate) struct LowerCtx {
    instance_id: String,
    /// Re-pointed when the chain below changes at run time (under the device's edit lock,
    /// while no guest request is in flight).
    below: RwLock<Arc<BlockStack>>,
    raw: abi::Lower,
}

impl LowerCtx {
    pub(crate) fn new(instance_id: &str, below: Arc<BlockStack>) -> Box<LowerCtx> {
        let mut ctx = Box::new(LowerCtx {
            instance_id: instance_id.to_string(),
            raw: abi::Lower {
                ctx: std::ptr::null_mut(),
                read: lower_read,
                write: lower_write,
                flush: lower_flush,
                log: lower_log,
                capacity: below.capacity(),
            },
            below: RwLock::new(below),
        });
        // The box never moves, so the table can point at its owner.
        ctx.raw.ctx = (&*ctx as *const LowerCtx).cast_mut().cast();
        ctx
    }

    pub(crate) fn raw(&self) -> *const abi::Lower {
        &self.raw
    }

    /// Points the plugin's own I/O at a rebuilt stack of the same layers' successors.
    pub(crate) fn repoint(&self, below: Arc<BlockStack>) {
        match self.below.write() {
            Ok(mut b) => *b = below,
            Err(poisoned) => *poisoned.into_inner() = below,
        }
    }

    fn below(&self) -> Arc<BlockStack> {
        match self.below.read() {
            Ok(b) => b.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// One of the plugin's own requests: checked, then run through the stack below.
    fn submit(&self, kind: BlockRequestKind, offset: u64, buf: *mut u8, len: u64) -> u32 {
        let aligned = offset.is_multiple_of(SECTOR_SIZE) && len.is_multiple_of(SECTOR_SIZE);
        let below = self.below();
        let in_range = offset
            .checked_add(len)
            .is_some_and(|end| end <= below.capacity());
        let Ok(len_usize) = usize::try_from(len) else {
            return abi::STATUS_IOERR;
        };
        if !aligned || !in_range || (len > 0 && buf.is_null()) {
            tracing::warn!(
                "interceptor {}: own {kind:?} at {offset}+{len} refused (unaligned or out of range)",
                self.instance_id
            );
            return abi::STATUS_IOERR;
        }
        let segments = [Segment {
            base: buf,
            len: len_usize,
        }];
        let segs: &[Segment] = if len == 0 { &[] } else { &segments };
        // SAFETY: the plugin passed a buffer valid for len bytes (the ABI's rule); range and
        // alignment are checked above. Write data is never modified (layers that transform
        // get a bounce copy).
        let status = unsafe { below.submit(kind, offset, segs) };
        status.to_abi()
    }
}

fn ctx<'a>(p: *mut c_void) -> Option<&'a LowerCtx> {
    // SAFETY: the shim made `p` point at a live LowerCtx (it outlives the plugin instance).
    unsafe { p.cast::<LowerCtx>().as_ref() }
}

fn guarded(f: impl FnOnce() -> u32) -> u32 {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(abi::STATUS_IOERR)
}

unsafe extern "C" fn lower_read(p: *mut c_void, offset: u64, buf: *mut u8, len: u64) -> u32 {
    guarded(|| {
        ctx(p).map_or(abi::STATUS_IOERR, |c| {
            c.submit(BlockRequestKind::Read, offset, buf, len)
        })
    })
}

unsafe extern "C" fn lower_write(p: *mut c_void, offset: u64, buf: *const u8, len: u64) -> u32 {
    guarded(|| {
        ctx(p).map_or(abi::STATUS_IOERR, |c| {
            c.submit(BlockRequestKind::Write, offset, buf.cast_mut(), len)
        })
    })
}

unsafe extern "C" fn lower_flush(p: *mut c_void) -> u32 {
    guarded(|| {
        ctx(p).map_or(abi::STATUS_IOERR, |c| {
            c.submit(BlockRequestKind::Flush, 0, std::ptr::null_mut(), 0)
        })
    })
}

unsafe extern "C" fn lower_log(p: *mut c_void, level: u32, message: *const c_char) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        let (Some(c), false) = (ctx(p), message.is_null()) else {
            return;
        };
        // SAFETY: the plugin passes a NUL-terminated string.
        let text = unsafe { CStr::from_ptr(message) }.to_string_lossy();
        let id = &c.instance_id;
        match level {
            abi::LOG_ERROR => tracing::error!("interceptor {id}: {text}"),
            abi::LOG_WARN => tracing::warn!("interceptor {id}: {text}"),
            abi::LOG_INFO => tracing::info!("interceptor {id}: {text}"),
            _ => tracing::debug!("interceptor {id}: {text}"),
        }
    }));
}
