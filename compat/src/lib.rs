//! The compatibility shim between device models and backend drivers.
//!
//! Every block and net request passes two hook points here: pre-processing, after the
//! device has built a driver-ready request and before the backend sees it; and
//! post-processing, where the backend's completion is forwarded back toward the guest.
//! The interceptor chains, the plugin loader and the statistics land with the shim issue;
//! this crate already fixes the dependency direction `devices -> compat -> interceptor-abi`.

pub use interceptor_abi::{DeviceKind, ABI_VERSION};
