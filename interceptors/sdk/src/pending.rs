//! ABI version 2 in safe Rust (docs/abi-v2.md): a pre hook leaves its request pending
//! ([`Decision::Pending`](crate::Decision::Pending)) and later resumes it
//! ([`Lower::resume`]), from a timer ([`Lower::after`]) or from the completion of its own
//! request to the layers below ([`Lower::submit_read`], [`Lower::submit_write`],
//! [`Lower::submit_flush`]), none of which waits. Every callback runs later, on the thread
//! that runs the request's hooks, never inside the call that queued it.
//!
//! ```no_run
//! use interceptor_sdk::{Decision, Lower, Request};
//! use std::time::Duration;
//!
//! // Holds every request back 1 ms, then lets it go on down.
//! fn pre(lower: &'static Lower, req: &mut Request<'_>) -> Decision {
//!     let Some(h) = req.handle() else {
//!         return Decision::Continue; // this request cannot wait
//!     };
//!     match lower.after(Duration::from_millis(1), move |_cancelled| {
//!         let _ = lower.resume(h, Decision::Continue);
//!     }) {
//!         Ok(()) => Decision::Pending,
//!         Err(_) => Decision::Continue,
//!     }
//! }
//! ```

use crate::lower::{IoError, Lower};
use crate::{abi, Decision, Request};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

/// A request that may wait: what [`Lower::resume`] and the `submit_*` calls name. Valid
/// from its pre hook until it is resumed; used on the thread of its hooks only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handle(*mut c_void);

// SAFETY: a handle is an opaque number, never dereferenced by the plugin; the VMM checks it
// when it is resumed, which works only on the thread of the request's hooks (elsewhere
// `resume` answers Unsupported). Keeping one in state shared across threads is harmless.
unsafe impl Send for Handle {}
unsafe impl Sync for Handle {}

/// Why a lower request or a timer was not queued (and its callback will not run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    /// Not here: the VMM has no version 2 (`LOWER_F_ASYNC`), or this is not a queue's
    /// thread (in `create`, a check, the synchronous walk): use the synchronous calls.
    Unsupported,
    /// The instance has its most lower requests (or timers) out: wait for a completion.
    Busy,
    /// A range out of the layers below, or unaligned.
    Invalid,
}

impl std::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SubmitError::Unsupported => "lower I/O without waiting is not available here",
            SubmitError::Busy => "too many lower requests or timers out",
            SubmitError::Invalid => "a lower request out of range or unaligned",
        })
    }
}

impl std::error::Error for SubmitError {}

fn submit_status(v: u32) -> Result<(), SubmitError> {
    match v {
        abi::STATUS_OK => Ok(()),
        abi::STATUS_BUSY => Err(SubmitError::Busy),
        abi::STATUS_UNSUPP => Err(SubmitError::Unsupported),
        _ => Err(SubmitError::Invalid),
    }
}

impl Request<'_> {
    /// This request's handle, if it may wait (`None` through the synchronous walk, for a
    /// net frame, or under a VMM without version 2).
    pub fn handle(&self) -> Option<Handle> {
        let h = self.raw().handle;
        (!h.is_null()).then_some(Handle(h))
    }
}

type Callback = Box<dyn FnOnce(u32)>;

unsafe extern "C" fn call_back(arg: *mut c_void, value: u32) {
    // SAFETY: `arg` is the boxed callback queued with this function, called once.
    let f = unsafe { Box::from_raw(arg.cast::<Callback>()) };
    // A panic must not cross into the VMM; the plugin's state is its own affair.
    let _ = catch_unwind(AssertUnwindSafe(move || f(value)));
}

/// What a lower request's caller gets back: the result and its buffer.
type IoDone = Box<dyn FnOnce(Result<(), IoError>, Vec<u8>)>;

/// A lower request's buffer and callback, together until `done`.
struct Io {
    buf: Vec<u8>,
    seg: abi::Segment,
    done: Option<IoDone>,
}

unsafe extern "C" fn io_done(arg: *mut c_void, status: u32) {
    // SAFETY: `arg` is the boxed `Io` queued with this function, called once.
    let mut io = unsafe { Box::from_raw(arg.cast::<Io>()) };
    let result = if status == abi::STATUS_OK {
        Ok(())
    } else {
        Err(IoError)
    };
    if let Some(f) = io.done.take() {
        let buf = std::mem::take(&mut io.buf);
        let _ = catch_unwind(AssertUnwindSafe(move || f(result, buf)));
    }
}

impl Lower {
    /// Does the VMM offer version 2 (pending requests, lower I/O without waiting, timers)?
    pub fn is_async(&self) -> bool {
        self.features() & abi::LOWER_F_ASYNC != 0
    }

    /// Ends the wait of a request this instance left pending: `Continue`, `Complete` or
    /// `Fail`, once.
    pub fn resume(&self, h: Handle, decision: Decision) -> Result<(), SubmitError> {
        if !self.is_async() {
            return Err(SubmitError::Unsupported);
        }
        let t = self.table();
        // SAFETY: the VMM said the field is there; ctx belongs to this table.
        submit_status(unsafe { (t.resume)(t.ctx, h.0, crate::ffi::decision(decision)) })
    }

    /// Calls `f(cancelled)` after `delay` (`cancelled` is true when the disk drains
    /// first: a reset, a chain edit, the shutdown; then resume what you held back).
    pub fn after(
        &self,
        delay: Duration,
        f: impl FnOnce(bool) + 'static,
    ) -> Result<(), SubmitError> {
        if !self.is_async() {
            return Err(SubmitError::Unsupported);
        }
        let ns = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        let cb: Callback = Box::new(move |cancelled| f(cancelled != 0));
        let arg = Box::into_raw(Box::new(cb)).cast::<c_void>();
        let t = self.table();
        // SAFETY: the VMM said the field is there; `arg` is ours until the call back.
        let r = submit_status(unsafe { (t.timer)(t.ctx, ns, Some(call_back), arg) });
        if r.is_err() {
            // Not queued: never called back; take it back.
            // SAFETY: made above and not handed over.
            drop(unsafe { Box::from_raw(arg.cast::<Callback>()) });
        }
        r
    }

    /// Reads `buf.len()` bytes at `offset` from the layers below without waiting; `done`
    /// gets the result and the buffer back.
    pub fn submit_read(
        &self,
        h: Handle,
        offset: u64,
        buf: Vec<u8>,
        done: impl FnOnce(Result<(), IoError>, Vec<u8>) + 'static,
    ) -> Result<(), (SubmitError, Vec<u8>)> {
        self.submit_io(h, abi::REQ_READ, offset, buf, Box::new(done))
    }

    /// Writes `data` at `offset` in the layers below without waiting; `done` gets the
    /// result and the buffer back.
    pub fn submit_write(
        &self,
        h: Handle,
        offset: u64,
        data: Vec<u8>,
        done: impl FnOnce(Result<(), IoError>, Vec<u8>) + 'static,
    ) -> Result<(), (SubmitError, Vec<u8>)> {
        self.submit_io(h, abi::REQ_WRITE, offset, data, Box::new(done))
    }

    /// Flushes the layers below without waiting.
    pub fn submit_flush(
        &self,
        h: Handle,
        done: impl FnOnce(Result<(), IoError>) + 'static,
    ) -> Result<(), SubmitError> {
        self.submit_io(
            h,
            abi::REQ_FLUSH,
            0,
            Vec::new(),
            Box::new(move |r, _| done(r)),
        )
        .map_err(|(e, _)| e)
    }

    fn submit_io(
        &self,
        h: Handle,
        kind: u32,
        offset: u64,
        buf: Vec<u8>,
        done: IoDone,
    ) -> Result<(), (SubmitError, Vec<u8>)> {
        if !self.is_async() {
            return Err((SubmitError::Unsupported, buf));
        }
        let mut io = Box::new(Io {
            buf,
            seg: abi::Segment {
                base: std::ptr::null_mut(),
                len: 0,
            },
            done: Some(done),
        });
        io.seg = abi::Segment {
            base: io.buf.as_mut_ptr(),
            len: io.buf.len(),
        };
        let raw = abi::LowerIo {
            kind,
            flags: 0,
            offset,
            len: io.buf.len() as u64,
            segments: &io.seg,
            nsegments: u32::from(!io.buf.is_empty()),
            done: Some(io_done),
            arg: std::ptr::null_mut(),
        };
        let arg = Box::into_raw(io);
        let raw = abi::LowerIo {
            arg: arg.cast(),
            // SAFETY: `arg` is live (just made); the segment inside it does not move.
            segments: unsafe { &(*arg).seg },
            ..raw
        };
        let t = self.table();
        // SAFETY: the VMM said the field is there; the buffer lives in `arg` until done.
        let r = submit_status(unsafe { (t.submit)(t.ctx, h.0, &raw) });
        match r {
            Ok(()) => Ok(()),
            Err(e) => {
                // Not queued: `done` never runs; the buffer goes back.
                // SAFETY: made above and not handed over.
                let io = unsafe { Box::from_raw(arg) };
                Err((e, io.buf))
            }
        }
    }
}
