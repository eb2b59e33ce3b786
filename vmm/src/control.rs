//! The VM as the REST API sees it: what `GET /vm` reports, KVM's state for `GET /vm/kvm`
//! and `GET /vm/vcpus`, and the shutdown action.

use crate::probe::{KvmSlot, KvmView};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use vmm_sys_util::eventfd::EventFd;

pub struct VmHandle {
    started: Instant,
    vcpus: u32,
    memory_mib: u64,
    /// Written to stop the guest: the main thread then flushes the disks and exits.
    exit: EventFd,
    stopping: AtomicBool,
    /// KVM's VM and vCPUs, once they exist.
    probe: KvmSlot,
    /// A `GET /vm/vcpus` is reading the vCPUs.
    probing: AtomicBool,
}

impl VmHandle {
    pub fn new(vcpus: u32, memory_mib: u64, exit: EventFd, probe: KvmSlot) -> VmHandle {
        VmHandle {
            probe,
            probing: AtomicBool::new(false),
            started: Instant::now(),
            vcpus,
            memory_mib,
            exit,
            stopping: AtomicBool::new(false),
        }
    }
}

impl VmHandle {
    fn view(&self) -> Result<&KvmView, String> {
        self.probe
            .get()
            .ok_or_else(|| "the VM has not started yet".to_string())
    }
}

impl vmm_api::VmControl for VmHandle {
    fn info(&self) -> vmm_api::VmInfo {
        vmm_api::VmInfo {
            state: if self.stopping.load(Ordering::SeqCst) {
                "ShuttingDown"
            } else {
                "Running"
            },
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            uptime: self.started.elapsed(),
        }
    }

    fn kvm_state(&self) -> Result<serde_json::Value, String> {
        Ok(self.view()?.vm_state())
    }

    fn vcpu_state(&self) -> Result<serde_json::Value, String> {
        let view = self.view()?;
        // One read at a time: each may hold an API blocking thread for up to 2 s per vCPU,
        // and a client asking in a loop must not take them all.
        if self
            .probing
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err("another read of the vCPUs is in progress; ask again".into());
        }
        let state = view.vcpu_states();
        self.probing.store(false, Ordering::SeqCst);
        Ok(state)
    }

    fn shutdown(&self) -> Result<(), String> {
        self.stopping.store(true, Ordering::SeqCst);
        self.exit
            .write(1)
            .map_err(|e| format!("cannot signal the VM to stop: {e}"))
    }
}
