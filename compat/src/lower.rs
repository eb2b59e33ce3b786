//! "The layers below" an instance, as the C `vmm_lower` table: a plugin's own reads,
//! writes and flushes go through the interceptors under it and then the backend.

use crate::stack::BlockStack;
use crate::{BlockRequestKind, Segment, SECTOR_SIZE};
use interceptor_abi as abi;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, RwLock};

/// Most bytes of non-zero data a plugin may write while it is being created (they are held
/// in memory until the instance is accepted, see [`Staged`]).
pub const MAX_STAGED_BYTES: usize = 256 << 20;

pub(crate) struct LowerCtx {
    instance_id: String,
    /// Re-pointed when the chain below changes at run time (on the device's I/O thread,
    /// between guest requests).
    below: RwLock<Arc<BlockStack>>,
    /// While the instance is being created (and when a refused one is destroyed), its
    /// writes and flushes are kept here instead of reaching the layers below, so a refused
    /// instance changes no byte of the disk. Written down in order once it is accepted.
    staged: Mutex<Option<Staged>>,
    /// Lower requests the instance has out through `submit` (ABI version 2), and the most.
    out: Arc<AtomicU32>,
    max_out: u32,
    raw: abi::Lower,
}

/// A plugin's own writes and flushes held back while it is created: replayed in order
/// (each flush where the plugin made it, so its crash ordering holds) once accepted.
#[derive(Default)]
pub(crate) struct Staged {
    ops: Vec<StagedOp>,
    bytes: usize,
}

enum StagedOp {
    /// `None`: zeros (a format clearing a region costs no memory).
    Write {
        offset: u64,
        len: usize,
        data: Option<Vec<u8>>,
    },
    Flush,
}

impl Staged {
    fn write(&mut self, offset: u64, data: &[u8]) -> bool {
        let zero = data.iter().all(|&b| b == 0);
        if !zero {
            match self.bytes.checked_add(data.len()) {
                Some(n) if n <= MAX_STAGED_BYTES => self.bytes = n,
                _ => return false,
            }
        }
        self.ops.push(StagedOp::Write {
            offset,
            len: data.len(),
            data: (!zero).then(|| data.to_vec()),
        });
        true
    }

    /// Lays the staged writes over `buf`, just read from the layers below at `offset`.
    fn overlay(&self, offset: u64, buf: &mut [u8]) {
        let end = offset.saturating_add(buf.len() as u64);
        for op in &self.ops {
            let StagedOp::Write {
                offset: at,
                len,
                data,
            } = op
            else {
                continue;
            };
            let op_end = at.saturating_add(*len as u64);
            let (from, to) = ((*at).max(offset), op_end.min(end));
            if from >= to {
                continue;
            }
            // In range of both by construction; usize because both lengths are.
            let (dst, src, n) = (
                (from - offset) as usize,
                (from - at) as usize,
                (to - from) as usize,
            );
            match data {
                Some(d) => buf[dst..dst + n].copy_from_slice(&d[src..src + n]),
                None => buf[dst..dst + n].fill(0),
            }
        }
    }
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
                discard: lower_discard,
                submit: lower_submit,
                resume: lower_resume,
                timer: lower_timer,
            },
            below: RwLock::new(below),
            staged: Mutex::new(None),
            out: Arc::default(),
            max_out: crate::exec::MAX_LOWER_IN_FLIGHT,
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

    /// From now on the plugin's writes are held back (see [`Staged`]).
    pub(crate) fn stage(&self) {
        *lock(&self.staged) = Some(Staged::default());
    }

    /// Writes the held-back writes down, in order, and lets later ones through. On failure
    /// the layers below may hold part of them; the rest are dropped.
    pub(crate) fn commit(&self) -> Result<(), String> {
        let Some(staged) = lock(&self.staged).take() else {
            return Ok(());
        };
        let below = self.below();
        let mut zeros = Vec::new();
        for op in staged.ops {
            let (kind, offset, status) = match op {
                StagedOp::Flush => (BlockRequestKind::Flush, 0, below.flush()),
                StagedOp::Write { offset, len, data } => {
                    let from_zeros = data.is_none();
                    let mut data = data.unwrap_or_else(|| {
                        // Only ever zeroes: a buffer that held data is never reused here.
                        let mut z = std::mem::take(&mut zeros);
                        z.clear();
                        z.resize(len, 0);
                        z
                    });
                    let seg = [Segment {
                        base: data.as_mut_ptr(),
                        len: data.len(),
                    }];
                    // SAFETY: `data` is valid for its length; the range was checked when
                    // the write was staged.
                    let status = unsafe { below.submit(BlockRequestKind::Write, offset, &seg) };
                    if from_zeros {
                        zeros = data;
                    }
                    (BlockRequestKind::Write, offset, status)
                }
            };
            if status != crate::RequestStatus::Ok {
                return Err(format!(
                    "writing down what it wrote while starting failed ({kind:?} at {offset}: {status:?})"
                ));
            }
        }
        Ok(())
    }

    fn below(&self) -> Arc<BlockStack> {
        match self.below.read() {
            Ok(b) => b.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A plugin's own discard of `len` bytes at `offset`, through the stack below. While the
    /// instance is being created it is refused (UNSUPP): it would have to be staged in
    /// order with the writes, and a store has nothing to give back then.
    fn discard(&self, offset: u64, len: u64) -> u32 {
        let below = self.below();
        let aligned = offset.is_multiple_of(SECTOR_SIZE) && len.is_multiple_of(SECTOR_SIZE);
        let in_range = offset
            .checked_add(len)
            .is_some_and(|end| end <= below.capacity());
        if !aligned || !in_range {
            return abi::STATUS_IOERR;
        }
        if lock(&self.staged).is_some() || !below.handles_discard() {
            return abi::STATUS_UNSUPP;
        }
        // SAFETY: a discard has no segments; the range is checked above.
        unsafe { below.submit_ranged(BlockRequestKind::Discard, offset, len) }.to_abi()
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
        if let Some(staged) = lock(&self.staged).as_mut() {
            return match kind {
                BlockRequestKind::Write => {
                    // SAFETY: as below: the plugin's buffer is valid for len bytes (and may
                    // be NULL when len is 0, which no slice may be built from).
                    let data: &[u8] = if len_usize == 0 {
                        &[]
                    } else {
                        unsafe { std::slice::from_raw_parts(buf, len_usize) }
                    };
                    if staged.write(offset, data) {
                        abi::STATUS_OK
                    } else {
                        tracing::warn!(
                            "interceptor {}: wrote more than {MAX_STAGED_BYTES} bytes while \
                             starting; refused",
                            self.instance_id
                        );
                        abi::STATUS_IOERR
                    }
                }
                BlockRequestKind::Flush => {
                    staged.ops.push(StagedOp::Flush);
                    abi::STATUS_OK
                }
                _ => {
                    // SAFETY: as below.
                    let status = unsafe { below.submit(kind, offset, segs) };
                    if status == crate::RequestStatus::Ok && len > 0 {
                        // SAFETY: as below; the read filled it.
                        let out = unsafe { std::slice::from_raw_parts_mut(buf, len_usize) };
                        staged.overlay(offset, out);
                    }
                    status.to_abi()
                }
            };
        }
        // SAFETY: the plugin passed a buffer valid for len bytes (the ABI's rule); range and
        // alignment are checked above. Write data is never modified (layers that transform
        // get a bounce copy).
        let status = unsafe { below.submit(kind, offset, segs) };
        status.to_abi()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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

unsafe extern "C" fn lower_discard(p: *mut c_void, offset: u64, len: u64) -> u32 {
    guarded(|| ctx(p).map_or(abi::STATUS_IOERR, |c| c.discard(offset, len)))
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

unsafe extern "C" fn lower_submit(
    p: *mut c_void,
    _handle: *mut c_void,
    io: *const abi::LowerIo,
) -> u32 {
    guarded(|| {
        ctx(p).map_or(abi::STATUS_IOERR, |c| {
            if lock(&c.staged).is_some() {
                // While it is created: the synchronous functions (they are staged in order).
                return abi::STATUS_UNSUPP;
            }
            crate::exec::ffi::submit(&c.below(), &c.out, c.max_out, io)
        })
    })
}

unsafe extern "C" fn lower_resume(p: *mut c_void, handle: *mut c_void, decision: u32) -> u32 {
    guarded(|| {
        ctx(p).map_or(abi::STATUS_IOERR, |c| {
            crate::exec::ffi::resume(c as *const LowerCtx as usize, handle, decision)
        })
    })
}

unsafe extern "C" fn lower_timer(
    p: *mut c_void,
    ns: u64,
    fire: Option<abi::FireFn>,
    arg: *mut c_void,
) -> u32 {
    guarded(|| {
        ctx(p).map_or(abi::STATUS_IOERR, |_| {
            crate::exec::ffi::timer(ns, fire, arg)
        })
    })
}
