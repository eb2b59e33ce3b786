//! "The layers below": a plugin's own I/O to the interceptors under it and the backend.

use crate::abi;
use std::ffi::CString;

/// The layers below failed a plugin's own I/O (or its arguments were out of range).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoError;

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("I/O error in the layers below")
    }
}

impl std::error::Error for IoError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

/// The layers below one instance. Offsets and lengths must be multiples of
/// [`abi::SECTOR_SIZE`] within [`Lower::capacity`].
pub struct Lower {
    raw: *const abi::Lower,
    /// `abi::LOWER_F_*` the VMM offers.
    features: u32,
}

// SAFETY: the shim keeps the `vmm_lower` table alive until the instance is destroyed, and
// its functions may be called from any thread (they take only shared references inside).
unsafe impl Send for Lower {}
unsafe impl Sync for Lower {}

fn status(v: u32) -> Result<(), IoError> {
    if v == abi::STATUS_OK {
        Ok(())
    } else {
        Err(IoError)
    }
}

impl Lower {
    pub(crate) unsafe fn from_raw(raw: *const abi::Lower, features: u32) -> Result<Lower, String> {
        if raw.is_null() {
            return Err("no handle to the layers below".into());
        }
        Ok(Lower { raw, features })
    }

    pub(crate) fn features(&self) -> u32 {
        self.features
    }

    pub(crate) fn table(&self) -> &abi::Lower {
        // SAFETY: checked non-null at creation; valid until destroy (see the type's docs).
        unsafe { &*self.raw }
    }

    /// Bytes the layers below hold.
    pub fn capacity(&self) -> u64 {
        self.table().capacity
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let t = self.table();
        // SAFETY: the buffer is valid for its length; the shim checks the range.
        status(unsafe { (t.read)(t.ctx, offset, buf.as_mut_ptr(), buf.len() as u64) })
    }

    /// Writes `buf` at `offset`.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        let t = self.table();
        // SAFETY: as for read; the shim never writes into `buf`.
        status(unsafe { (t.write)(t.ctx, offset, buf.as_ptr(), buf.len() as u64) })
    }

    /// Discards `len` bytes at `offset` in the layers below (space a plugin no longer uses,
    /// so that a thin layer below can reuse it): `Ok(true)` when done, `Ok(false)` where
    /// the layers below do not handle discard (or the VMM predates it), which costs nothing.
    ///
    /// ```no_run
    /// # fn f(lower: &interceptor_sdk::Lower) -> Result<(), interceptor_sdk::IoError> {
    /// let _given_back = lower.discard(1 << 20, 64 << 10)?;
    /// # Ok(()) }
    /// ```
    pub fn discard(&self, offset: u64, len: u64) -> Result<bool, IoError> {
        if self.features & abi::LOWER_F_DISCARD == 0 {
            return Ok(false);
        }
        let t = self.table();
        // SAFETY: the VMM said the field is there; ctx belongs to this table.
        match unsafe { (t.discard)(t.ctx, offset, len) } {
            abi::STATUS_OK => Ok(true),
            abi::STATUS_UNSUPP => Ok(false),
            _ => Err(IoError),
        }
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), IoError> {
        let t = self.table();
        // SAFETY: ctx belongs to this table.
        status(unsafe { (t.flush)(t.ctx) })
    }

    /// The byte offset of the first non-zero byte in `from..to`, or `None` if all of it is
    /// zero. Plugins that format the disk below them call it over everything their format
    /// will use before writing a byte, so that they never format over data. `from` and `to`
    /// must be multiples of [`abi::SECTOR_SIZE`]; it reads in 1 MiB pieces.
    ///
    /// ```no_run
    /// # fn f(lower: &interceptor_sdk::Lower) -> Result<(), String> {
    /// if let Some(at) = lower.first_nonzero(0, lower.capacity()).map_err(|e| e.to_string())? {
    ///     return Err(format!("the disk is not blank (byte {at} is not zero)"));
    /// }
    /// # Ok(()) }
    /// ```
    pub fn first_nonzero(&self, from: u64, to: u64) -> Result<Option<u64>, IoError> {
        const PIECE: u64 = 1 << 20;
        let mut buf = vec![0u8; PIECE as usize];
        let mut at = from;
        while at < to {
            let n = (to - at).min(PIECE) as usize;
            self.read(at, &mut buf[..n])?;
            // OR-folding a page at a time vectorizes; only a page that is not zero is searched.
            for (k, page) in buf[..n].chunks(4096).enumerate() {
                if page.iter().fold(0u8, |acc, &b| acc | b) != 0 {
                    let i = page.iter().position(|&b| b != 0).unwrap_or(0);
                    return Ok(Some(at + (k * 4096 + i) as u64));
                }
            }
            at += n as u64;
        }
        Ok(None)
    }

    /// Logs through the VMM's log, tagged with this instance.
    pub fn log(&self, level: LogLevel, message: &str) {
        let t = self.table();
        let level = match level {
            LogLevel::Error => abi::LOG_ERROR,
            LogLevel::Warn => abi::LOG_WARN,
            LogLevel::Info => abi::LOG_INFO,
            LogLevel::Debug => abi::LOG_DEBUG,
        };
        let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
        // SAFETY: a valid NUL-terminated string for the call's duration.
        unsafe { (t.log)(t.ctx, level, text.as_ptr()) }
    }
}
