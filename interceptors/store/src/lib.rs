//! A crash-consistent remapping store: guest blocks of 4 KiB mapped to extents stored
//! anywhere on the device below, the map made durable by a journal and checkpoints, free
//! space derived from the map and reused only once the commit that freed it is durable.
//! The compression and deduplication interceptors are built on it; docs/store.md gives the
//! on-disk format and the argument for crash consistency.
//!
//! ```
//! use extent_store::{block_check, Codec, MemDevice, NewExtent, OpenOptions, Store};
//!
//! let dev = MemDevice::new(4 << 20);
//! let opts = OpenOptions {
//!     owner: "example".into(),
//!     logical_blocks: 256,
//!     journal_blocks: 16,
//!     owner_config: [0; 16],
//!     format: false,
//!     read_only: false,
//! };
//! let mut store = Store::open(dev.clone(), &opts).unwrap();
//! let data = vec![7u8; 4096];
//! let check = block_check(store.key(), &data);
//! store
//!     .write(vec![NewExtent { first_block: 3, codec: Codec::Raw, bytes: data, checks: vec![check] }])
//!     .unwrap();
//! store.commit().unwrap();
//! drop(store);
//! let store = Store::open(dev, &opts).unwrap();
//! assert_ne!(store.entry(3).unwrap(), extent_store::Entry::Hole);
//! ```

mod format;
mod layer;
mod sizing;
mod space;
mod store;
mod volume;

#[cfg(feature = "testing")]
pub mod testing;

pub use format::{Codec, Entry, Geometry, MAX_EXTENT_BLOCKS, MAX_STORED_LEN, MAX_THIN, VERSION};
pub use layer::{serve, RequestCounters, StoreLayer};
pub use sizing::{
    overwrite_reserve, sizing, Sizing, DEFAULT_JOURNAL_BLOCKS, MAX_JOURNAL_KIB,
    OVERWRITE_RESERVE_BLOCKS,
};
pub use space::{Extent, Space};
pub use store::{NewExtent, OpenOptions, SectorChanges, Store, StoreStats};
pub use volume::{holes_for, is_zero, ratio, Volume};

use std::sync::{Arc, Mutex};

/// Guest block and allocation unit.
pub const BLOCK: u64 = 4096;
/// Extents are placed at this granularity inside the units of one write.
pub const SECTOR: u64 = 512;

/// The device below failed an I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoError;

/// What the store sits on. Offsets and lengths are multiples of [`SECTOR`].
pub trait Device {
    fn capacity(&self) -> u64;
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError>;
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), IoError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), IoError>;
    /// Tells the device that these bytes hold nothing the store needs (a thin layer below
    /// can reuse them). Advisory: a device that cannot does nothing.
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), IoError> {
        Ok(())
    }
}

impl Device for interceptor_sdk::Lower {
    fn capacity(&self) -> u64 {
        interceptor_sdk::Lower::capacity(self)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        interceptor_sdk::Lower::read(self, offset, buf).map_err(|_| IoError)
    }
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        interceptor_sdk::Lower::write(self, offset, buf).map_err(|_| IoError)
    }
    fn flush(&self) -> Result<(), IoError> {
        interceptor_sdk::Lower::flush(self).map_err(|_| IoError)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        interceptor_sdk::Lower::discard(self, offset, len)
            .map(|_| ())
            .map_err(|_| IoError)
    }
}

impl<T: Device + ?Sized> Device for Arc<T> {
    fn capacity(&self) -> u64 {
        (**self).capacity()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        (**self).read(offset, buf)
    }
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        (**self).write(offset, buf)
    }
    fn flush(&self) -> Result<(), IoError> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        (**self).discard(offset, len)
    }
}

impl<T: Device + ?Sized> Device for &T {
    fn capacity(&self) -> u64 {
        (**self).capacity()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        (**self).read(offset, buf)
    }
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        (**self).write(offset, buf)
    }
    fn flush(&self) -> Result<(), IoError> {
        (**self).flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        (**self).discard(offset, len)
    }
}

/// Why the store cannot do what was asked.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the store is damaged: {0}")]
    Damaged(String),
    #[error("the device below is not blank and holds no store (byte {0} is not zero): it is formatted only with `format = true` in this layer's config")]
    NotBlank(u64),
    #[error("{0}")]
    Config(String),
    #[error("I/O error {0}")]
    Io(String),
    #[error("no free space left")]
    NoSpace,
    #[error("the store is open read-only")]
    ReadOnly,
    #[error("block {0} is out of range")]
    Range(u64),
}

/// The check kept for a guest block: the first 4 bytes of its BLAKE3 under the store's key.
pub fn block_check(key: &[u8; 32], data: &[u8]) -> u32 {
    let h = blake3::keyed_hash(key, data);
    let b = h.as_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// A device in memory (tests, examples); clones share the bytes.
#[derive(Clone)]
pub struct MemDevice {
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl MemDevice {
    pub fn new(len: usize) -> MemDevice {
        MemDevice::from_bytes(vec![0; len])
    }

    pub fn from_bytes(bytes: Vec<u8>) -> MemDevice {
        MemDevice {
            bytes: Arc::new(Mutex::new(bytes)),
        }
    }

    /// A copy of the bytes.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

fn range(len: usize, offset: u64, n: usize) -> Result<std::ops::Range<usize>, IoError> {
    let start = usize::try_from(offset).map_err(|_| IoError)?;
    let end = start.checked_add(n).ok_or(IoError)?;
    if end > len || !start.is_multiple_of(SECTOR as usize) || !n.is_multiple_of(SECTOR as usize) {
        return Err(IoError);
    }
    Ok(start..end)
}

impl Device for MemDevice {
    fn capacity(&self) -> u64 {
        self.bytes.lock().map(|b| b.len() as u64).unwrap_or(0)
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let b = self.bytes.lock().map_err(|_| IoError)?;
        let r = range(b.len(), offset, buf.len())?;
        buf.copy_from_slice(&b[r]);
        Ok(())
    }
    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), IoError> {
        let mut b = self.bytes.lock().map_err(|_| IoError)?;
        let r = range(b.len(), offset, buf.len())?;
        b[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let mut b = self.bytes.lock().map_err(|_| IoError)?;
        let r = range(b.len(), offset, usize::try_from(len).map_err(|_| IoError)?)?;
        b[r].fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
