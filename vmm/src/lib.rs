//! The VMM as a library: the binary (`main.rs`) is a thin front over these modules, and the
//! fuzz targets and tests reach the parsers (config, boot) through here.

pub mod boot;
pub mod config;
pub mod confine;
pub mod control;
pub mod cpu;
pub mod image;
pub mod landlock;
pub mod layout;
pub mod logging;
pub mod memory;
pub mod mptable;
pub mod network;
pub mod probe;
pub mod qemu_lock;
pub mod seccomp;
pub mod storage;
pub mod vcpu;
pub mod vm;
