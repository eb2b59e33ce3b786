//! The project's harness for running real guests under real KVM.
//!
//! On a host with hardware KVM the guest runs directly. On a host whose `/dev/kvm` cannot
//! boot Linux (see `detect`), the harness starts the lab VM (QEMU in software emulation with
//! an emulated SVM CPU and the real `kvm_amd` inside) and runs itself in there, where KVM is
//! real. Guests are started by a named backend (`qemu` now, our `vmm` next) and report
//! through markers on their serial console (`console`), including fio's JSON (`fio`).

pub mod console;
pub mod detect;
pub mod fio;
pub mod guest;
pub mod labvm;
pub mod lines;
pub mod paths;
