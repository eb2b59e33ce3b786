//! The project's harness for running real guests under real KVM.
//!
//! On a host with hardware KVM the guest runs directly. On a host whose `/dev/kvm` cannot
//! boot Linux (see `detect`), the harness starts the lab VM (QEMU in software emulation with
//! an emulated SVM CPU and the real `kvm_amd` inside) and runs itself in there, where KVM is
//! real. Guests are started by a named backend (`qemu` now, our `vmm` next) and report
//! through markers on their serial console (`console`), including fio's JSON (`fio`).

pub mod console;
pub mod control;
pub mod detect;
pub mod fio;
pub mod guest;
pub mod ktrace;
pub mod labvm;
pub mod layers;
pub mod lines;
pub mod paths;
pub mod plugins;
pub mod threads;
pub mod timers;

/// QEMU's arguments common to the lab VM and the guest: machine, size, serial on stdio,
/// nothing else, and a reset ends QEMU.
pub fn qemu_base_args(cpus: u32, mem_mib: u32) -> Vec<String> {
    let mut a: Vec<String> = [
        "-M",
        "pc",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend([
        "-smp".into(),
        cpus.to_string(),
        "-m".into(),
        mem_mib.to_string(),
    ]);
    a.extend(["-serial".into(), "stdio".into(), "-no-reboot".into()]);
    a
}
