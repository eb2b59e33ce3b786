//! Guest memory: anonymous mmap'd RAM registered with KVM, with the 3-4 GiB hole left for MMIO.

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};
use anyhow::{Context, Result};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The RAM ranges for `bytes` of memory.
pub fn ram_ranges(bytes: u64) -> Vec<(GuestAddress, usize)> {
    if bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), bytes as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (
                GuestAddress(MMIO_GAP_END),
                (bytes - MMIO_GAP_START) as usize,
            ),
        ]
    }
}

pub fn create(vm: &VmFd, bytes: u64) -> Result<GuestMemoryMmap> {
    let mem =
        GuestMemoryMmap::from_ranges(&ram_ranges(bytes)).context("allocating guest memory")?;
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the VM outlives only
        // through process exit; KVM gets exactly its address and length.
        unsafe { vm.set_user_memory_region(r) }.context("registering guest memory with KVM")?;
    }
    Ok(mem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_skips_the_mmio_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let big = ram_ranges(4 << 30);
        assert_eq!(big[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(big[1], (GuestAddress(MMIO_GAP_END), (1 << 30) as usize));
    }
}
