//! A disk's hook pool: a few threads beside its I/O thread that start requests (run their
//! pre hooks, and with them the plugins' own I/O through the layers below) when every
//! instance of the chain declares `F_CONCURRENT`. A plugin that seals and writes in its pre
//! hook (encryption) then serves a queue's requests side by side instead of one after the
//! other on the I/O thread. The queue's handler stays where the ordering of overlapping
//! requests, the engine and the rings are: it hands a request to the pool and takes back
//! what its pre hooks made of it (`devices`' block worker). A job that panics is caught
//! and the thread goes on.

use crate::io_thread::ThreadStart;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Work for a pool thread.
pub type HookJob = Box<dyn FnOnce() + Send>;

/// Threads a disk's pool has by default: as many as the host has CPUs, at most this many.
pub const MAX_HOOK_THREADS: usize = 4;
/// The most a disk may ask for (`hook_threads`).
pub const MAX_HOOK_THREADS_SET: usize = 64;

/// A running pool; [`stop`](Self::stop) (or dropping it) ends its threads once the jobs
/// already queued have run.
pub struct HookPool {
    jobs: Mutex<Option<Sender<HookJob>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for HookPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookPool")
            .field("threads", &lock(&self.threads).len())
            .finish()
    }
}

impl HookPool {
    /// Starts `threads` threads named `hooks-<device_id>-<n>`; each runs `on_start` first
    /// (the VMM installs there the filter its I/O threads run under). With 0 threads the
    /// pool refuses every job (the disk runs every hook on its I/O thread).
    pub fn spawn(
        device_id: &str,
        threads: usize,
        on_start: Option<ThreadStart>,
    ) -> std::io::Result<HookPool> {
        let (tx, rx) = channel::<HookJob>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::with_capacity(threads);
        for n in 0..threads {
            let (rx, start) = (rx.clone(), on_start.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("hooks-{device_id}-{n}"))
                .spawn(move || {
                    if let Some(start) = start {
                        start();
                    }
                    serve(&rx);
                });
            match spawned {
                Ok(h) => handles.push(h),
                // Fewer threads still serve; none at all is an error.
                Err(e) if handles.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(HookPool {
            jobs: Mutex::new((!handles.is_empty()).then_some(tx)),
            threads: Mutex::new(handles),
        })
    }

    /// The number of threads a disk's pool starts with on this host.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_HOOK_THREADS)
    }

    /// Does the pool take jobs (it has threads and has not stopped)?
    pub fn running(&self) -> bool {
        lock(&self.jobs).is_some()
    }

    /// Queues `job`; gives it back if the pool has stopped (or has no threads).
    pub fn run(&self, job: HookJob) -> Result<(), HookJob> {
        match lock(&self.jobs).as_ref() {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }

    /// Runs what is queued, then ends the threads and waits for them.
    pub fn stop(&self) {
        drop(lock(&self.jobs).take());
        let me = std::thread::current().id();
        for h in lock(&self.threads).drain(..) {
            if h.thread().id() != me {
                let _ = h.join();
            }
        }
    }
}

impl Drop for HookPool {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(rx: &Mutex<Receiver<HookJob>>) {
    loop {
        // The lock is held only while waiting for the next job, not while it runs.
        let job = lock(rx).recv();
        match job {
            Ok(job) => {
                if catch_unwind(AssertUnwindSafe(job)).is_err() {
                    tracing::error!("a hook pool job panicked; the pool goes on");
                }
            }
            Err(_) => return,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    #[test]
    fn jobs_run_side_by_side_and_a_panic_does_not_stop_the_pool() {
        let pool = HookPool::spawn("t", 2, None).unwrap();
        // Two jobs that each wait for the other: they finish only if they run at once.
        let barrier = Arc::new(Barrier::new(2));
        let (done_tx, done_rx) = channel();
        for _ in 0..2 {
            let (b, d) = (barrier.clone(), done_tx.clone());
            pool.run(Box::new(move || {
                b.wait();
                d.send(()).unwrap();
            }))
            .map_err(|_| ())
            .unwrap();
        }
        for _ in 0..2 {
            done_rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("both jobs ran together");
        }
        pool.run(Box::new(|| panic!("a job's bug")))
            .map_err(|_| ())
            .unwrap();
        let d = done_tx.clone();
        pool.run(Box::new(move || d.send(()).unwrap()))
            .map_err(|_| ())
            .unwrap();
        done_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the pool serves after a panic");
        pool.stop();
        assert!(
            pool.run(Box::new(|| {})).is_err(),
            "a stopped pool refuses jobs"
        );
    }

    #[test]
    fn the_default_is_bounded() {
        let n = HookPool::default_threads();
        assert!((1..=MAX_HOOK_THREADS).contains(&n));
    }
}
