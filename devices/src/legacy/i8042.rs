//! The part of the i8042 keyboard controller Linux uses to reset the machine: command 0xFE
//! on port 0x64 pulses the CPU reset line. The VMM treats that as the guest's exit.

use crate::bus::BusDevice;
use vmm_sys_util::eventfd::EventFd;

/// Base port (0x60 data, 0x64 command/status).
pub const I8042_PORT: u64 = 0x60;
const CMD_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    reset: EventFd,
}

impl I8042 {
    /// `reset` is written when the guest asks for a reset.
    pub fn new(reset: EventFd) -> I8042 {
        I8042 { reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No keyboard: status says empty buffers, data reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == CMD_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            if let Err(e) = self.reset.write(1) {
                tracing::error!("i8042: cannot signal the reset: {e}");
            }
        }
    }
}
