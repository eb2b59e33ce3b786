//! The stable C ABI between the compatibility shim and interceptor plugins.
//!
//! A plugin is a shared object that exports one C symbol returning a versioned table of
//! function pointers (see `docs/architecture.md`). This crate will hold the `#[repr(C)]`
//! types of that table, the matching C header and the safe Rust SDK. For now it fixes the
//! ABI version number that the loader and plugins will agree on.

/// Version of the plugin ABI. A loader refuses a plugin whose table carries another version.
pub const ABI_VERSION: u32 = 1;

/// The device kinds a request can come from; plugins declare which ones they support.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// A virtio-blk disk.
    Block = 1,
    /// A virtio-net interface.
    Net = 2,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_kinds_have_stable_values() {
        // These values cross the C boundary: changing them breaks every plugin.
        assert_eq!(DeviceKind::Block as u32, 1);
        assert_eq!(DeviceKind::Net as u32, 2);
        assert_eq!(ABI_VERSION, 1);
    }
}
