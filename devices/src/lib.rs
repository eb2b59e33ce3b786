//! Device models of the VMM.
//!
//! virtio-mmio transport and virtio-blk, the 16550 serial console and the i8042 reset line,
//! plus the raw-file block backend. Block requests reach the backend only through the
//! `compat` shim's two hook points.

pub mod bus;
pub mod legacy;
pub mod logger;
pub mod virtio;
