//! The synchronous engine: each request runs on the backend when it is submitted (a
//! blocking preadv/pwritev/fdatasync for the raw file) and is reported done at once.

use super::AsyncIo;
use crate::{BlockBackend, IoRequest, RequestStatus};
use std::collections::VecDeque;
use std::sync::Arc;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub struct SyncEngine {
    backend: Arc<dyn BlockBackend>,
    done: VecDeque<(u64, RequestStatus)>,
    notifier: EventFd,
}

impl SyncEngine {
    pub fn new(backend: Arc<dyn BlockBackend>) -> std::io::Result<SyncEngine> {
        Ok(SyncEngine {
            backend,
            done: VecDeque::new(),
            notifier: EventFd::new(EFD_NONBLOCK)?,
        })
    }
}

impl AsyncIo for SyncEngine {
    fn notifier(&self) -> &EventFd {
        &self.notifier
    }

    unsafe fn submit(&mut self, req: &IoRequest<'_>, token: u64) {
        // SAFETY: the caller's guarantee is the backend's.
        let status = unsafe { self.backend.execute(req) };
        self.done.push_back((token, status));
    }

    fn commit(&mut self) {
        if !self.done.is_empty() {
            // The queue collects them on its next turn of the loop.
            let _ = self.notifier.write(1);
        }
    }

    fn next_completion(&mut self) -> Option<(u64, RequestStatus)> {
        self.done.pop_front()
    }

    fn wait(&mut self) {}

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn name(&self) -> &'static str {
        "sync"
    }
}
