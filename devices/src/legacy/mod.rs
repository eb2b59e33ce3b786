//! Legacy PC devices: the 16550 serial console and the i8042 reset line.

mod i8042;
mod serial;

pub use i8042::{I8042, I8042_PORT};
pub use serial::{SerialConsole, SERIAL_IRQ, SERIAL_PORT};
