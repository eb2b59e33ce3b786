//! The compatibility shim between device models and backend drivers.
//!
//! Every block request passes two hook points here: [`Shim::pre_process`], after the device
//! has built a driver-ready request and before the backend sees it, and
//! [`Shim::post_process`], where the backend's completion is forwarded back toward the guest.
//! Interceptor chains attach at these points (the plugin loader lands with the shim issue);
//! with no interceptor the points pass the request through untouched and copy nothing.

pub use interceptor_abi::{DeviceKind, ABI_VERSION};

/// What a block request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockRequestKind {
    Read,
    Write,
    Flush,
    GetId,
}

/// Final status of a request, as the guest will see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestStatus {
    Ok,
    IoError,
    Unsupported,
}

/// What a pre-processing hook decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreDecision {
    /// Pass the request on to the layers below.
    Continue,
    /// Satisfied here (e.g. a cache hit): skip the layers below.
    Complete(RequestStatus),
}

/// The driver-ready form of a block request that the hook points see. Borrowed from the
/// device: building it costs no allocation on the I/O path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRequestInfo<'a> {
    pub device_id: &'a str,
    pub kind: BlockRequestKind,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Bytes to move.
    pub len: u64,
}

/// One device's shim: its hook points and counters.
#[derive(Debug, Default)]
pub struct Shim {
    requests: u64,
    completed_by_backend: u64,
}

impl Shim {
    pub fn new() -> Shim {
        Shim::default()
    }

    /// Pre-processing point: the request is ready for the driver.
    pub fn pre_process(&mut self, _req: &BlockRequestInfo<'_>) -> PreDecision {
        self.requests += 1;
        PreDecision::Continue
    }

    /// Post-processing point: the driver completed the request with `status`; the returned
    /// status goes to the guest.
    pub fn post_process(
        &mut self,
        _req: &BlockRequestInfo<'_>,
        status: RequestStatus,
    ) -> RequestStatus {
        self.completed_by_backend += 1;
        status
    }

    /// Requests that reached the pre-processing point.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Requests whose completion passed the post-processing point.
    pub fn completions(&self) -> u64 {
        self.completed_by_backend
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_interceptors_requests_pass_through_and_are_counted() {
        let mut shim = Shim::new();
        let req = BlockRequestInfo {
            device_id: "data",
            kind: BlockRequestKind::Write,
            offset: 4096,
            len: 512,
        };
        assert_eq!(shim.pre_process(&req), PreDecision::Continue);
        assert_eq!(
            shim.post_process(&req, RequestStatus::IoError),
            RequestStatus::IoError
        );
        assert_eq!(
            shim.post_process(&req, RequestStatus::Ok),
            RequestStatus::Ok
        );
        assert_eq!((shim.requests(), shim.completions()), (1, 2));
    }
}
