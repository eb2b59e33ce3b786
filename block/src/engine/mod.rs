//! Asynchronous I/O engines, shaped like Cloud Hypervisor's `AsyncIo`: a device queue
//! submits requests with a token, hands the batch to the engine once per pass, and collects
//! completions (in any order) when the engine's eventfd fires.
//!
//! - [`SyncEngine`] (`sync.rs`) runs each request at submission on a [`BlockBackend`] and
//!   reports it done at once: the fallback where io_uring is not available.
//! - [`UringEngine`] (`uring.rs`) submits to an io_uring restricted to reads, writes and
//!   fsync on the one registered disk file.

mod sync;
mod uring;

pub use sync::SyncEngine;
pub use uring::UringEngine;

use crate::{BlockBackend, IoRequest, RequestStatus};
use std::fs::File;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

/// A device queue's I/O engine. It lives on one thread (the queue's); `Send` so it can be
/// handed there.
pub trait AsyncIo: Send {
    /// Readable when completions wait in [`next_completion`](Self::next_completion).
    fn notifier(&self) -> &EventFd;

    /// Queues `req`; its completion comes back with `token`. A request the engine cannot
    /// even queue (a write on a read-only disk, a request kind it does not run) completes
    /// with an error status like any other: the queue sees it from `next_completion`.
    ///
    /// # Safety
    /// Every segment of `req` must stay valid memory for its length (readable for writes,
    /// writable for reads) until `next_completion` has returned `token`, and `req` must lie
    /// within the disk.
    unsafe fn submit(&mut self, req: &IoRequest<'_>, token: u64);

    /// Hands what was queued since the last call to the kernel (one system call a batch).
    fn commit(&mut self);

    /// A finished request: its token and status. `None` once none are waiting.
    fn next_completion(&mut self) -> Option<(u64, RequestStatus)>;

    /// Blocks until at least one request in flight has finished (a reset or a chain edit
    /// waiting for the queue to be idle). Returns at once when none is in flight.
    fn wait(&mut self);

    /// Requests submitted whose completion has not been returned yet.
    fn in_flight(&self) -> usize;

    /// `"io_uring"` or `"sync"`, for the start-up line and the API.
    fn name(&self) -> &'static str;
}

/// Which engine a disk asks for (`engine` in its `[[block]]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring where the host allows it, else the synchronous engine (said once).
    #[default]
    Auto,
    IoUring,
    Sync,
}

impl EngineChoice {
    /// Opens an engine of this kind for one queue of `depth` requests over `file` (the
    /// disk's file, whose descriptor the io_uring engine registers) or `backend`.
    /// `Err` only when io_uring was asked for by name and the host refuses it.
    pub fn open(
        self,
        file: &File,
        read_only: bool,
        depth: u16,
        backend: &Arc<dyn BlockBackend>,
    ) -> Result<Box<dyn AsyncIo>, String> {
        let sync = || -> Result<Box<dyn AsyncIo>, String> {
            SyncEngine::new(backend.clone())
                .map(|e| Box::new(e) as Box<dyn AsyncIo>)
                .map_err(|e| format!("the synchronous engine's eventfd: {e}"))
        };
        match self {
            EngineChoice::Sync => sync(),
            EngineChoice::IoUring => UringEngine::new(file, read_only, depth)
                .map(|e| Box::new(e) as Box<dyn AsyncIo>)
                .map_err(|e| format!("io_uring: {e}")),
            EngineChoice::Auto => match UringEngine::new(file, read_only, depth) {
                Ok(e) => Ok(Box::new(e)),
                Err(e) => {
                    note_fallback(&e);
                    sync()
                }
            },
        }
    }
}

/// The first fallback is printed (once per process): an operator sees why the disks run on
/// the synchronous engine.
fn note_fallback(e: &std::io::Error) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        eprintln!("vmm: io_uring is not available ({e}); disks use the synchronous engine");
    });
}

#[cfg(test)]
mod tests;
