//! The part of the i8042 keyboard controller Linux uses to reset the machine: command 0xFE
//! on port 0x64 pulses the CPU reset line. The VMM treats that as the guest's exit.

use crate::bus::BusDevice;
use vmm_sys_util::eventfd::EventFd;

/// Base port (0x60 data, 0x64 command/status).
pub const I8042_PORT: u64 = 0x60;
const CMD_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;

/// Answers the controller commands Linux's probe sends, so it finds a controller quickly
/// (no keyboard behind it), and resets the machine on command 0xFE.
pub struct I8042 {
    reset: EventFd,
    ctr: u8,
    output: Option<u8>,
    expect_ctr: bool,
}

impl I8042 {
    /// `reset` is written when the guest asks for a reset.
    pub fn new(reset: EventFd) -> I8042 {
        I8042 {
            reset,
            ctr: 0,
            output: None,
            expect_ctr: false,
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.output.take().unwrap_or(0),
            CMD_OFFSET => {
                STATUS_SYSTEM
                    | if self.output.is_some() {
                        STATUS_OUTPUT_FULL
                    } else {
                        0
                    }
            }
            _ => 0,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match (offset, v) {
            (CMD_OFFSET, CMD_RESET_CPU) => {
                if let Err(e) = self.reset.write(1) {
                    tracing::error!("i8042: cannot signal the reset: {e}");
                }
            }
            (CMD_OFFSET, CMD_READ_CTR) => self.output = Some(self.ctr),
            (CMD_OFFSET, CMD_WRITE_CTR) => self.expect_ctr = true,
            (CMD_OFFSET, CMD_SELF_TEST) => self.output = Some(0x55),
            (CMD_OFFSET, CMD_KBD_TEST) => self.output = Some(0x00),
            (0, v) if self.expect_ctr => {
                self.ctr = v;
                self.expect_ctr = false;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_and_probe_commands_answer() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        let mut b = [0u8];
        dev.write(CMD_OFFSET, &[CMD_SELF_TEST]);
        dev.read(CMD_OFFSET, &mut b);
        assert_eq!(b[0] & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        dev.read(0, &mut b);
        assert_eq!(b[0], 0x55);
        dev.write(CMD_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(0, &[0x47]);
        dev.write(CMD_OFFSET, &[CMD_READ_CTR]);
        dev.read(0, &mut b);
        assert_eq!(b[0], 0x47);
        assert!(evt.read().is_err(), "no reset yet");
        dev.write(CMD_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
