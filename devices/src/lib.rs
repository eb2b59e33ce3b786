//! Device models and backend drivers of the VMM.
//!
//! virtio-mmio transport, virtio-blk and virtio-net, the 16550 serial console and the
//! i8042 reset line, plus the backends they drive (raw file / io_uring block, tap net).
//! Requests reach the backends only through the `compat` shim.
