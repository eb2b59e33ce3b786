//! Port I/O and MMIO buses: address ranges mapped to devices.

use std::sync::{Arc, Mutex};

/// A device on a bus. Offsets are relative to the device's base address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Range {
    base: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} overlaps another device")]
pub struct OverlapError {
    pub base: u64,
    pub len: u64,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), OverlapError> {
        let end = base.checked_add(len).ok_or(OverlapError { base, len })?;
        if len == 0
            || self
                .ranges
                .iter()
                .any(|r| base < r.base + r.len && r.base < end)
        {
            return Err(OverlapError { base, len });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(&Range, u64)> {
        self.ranges
            .iter()
            .find(|r| addr >= r.base && addr - r.base < r.len)
            .map(|r| (r, addr - r.base))
    }

    /// Reads from the device at `addr`; false when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((r, offset)) = self.find(addr) else {
            return false;
        };
        if let Ok(mut d) = r.device.lock() {
            d.read(offset, data);
        }
        true
    }

    /// Writes to the device at `addr`; false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((r, offset)) = self.find(addr) else {
            return false;
        };
        if let Ok(mut d) = r.device.lock() {
            d.write(offset, data);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn ranges_route_and_refuse_overlap() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(1))), 0x10, 8).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Echo(2))), 0x17, 2).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Echo(2))), 0, 0).is_err());
        bus.insert(Arc::new(Mutex::new(Echo(5))), 0x18, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x12, &mut b));
        assert_eq!(b[0], 3);
        assert!(bus.write(0x18, &[9]));
        assert!(bus.read(0x18, &mut b));
        assert_eq!(b[0], 9);
        assert!(!bus.read(0x20, &mut b));
    }
}
