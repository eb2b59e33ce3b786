//! The queue's side of the disk's hook pool (`compat/src/hook_pool.rs`): an ordered request
//! through a chain whose every instance declares `F_CONCURRENT` is handed over, its pre
//! hooks run there, and it comes back through the queue's channel and eventfd, answered by
//! the chain or for the engine.

use super::*;

/// Where requests started on the hook pool come back to the queue: a request's token and
/// what its pre hooks made of it.
pub(super) struct PoolReturn {
    pub(super) tx: Sender<(usize, Started)>,
    pub(super) rx: Receiver<(usize, Started)>,
    pub(super) ready: Arc<EventFd>,
    /// Requests handed to the pool and not back yet.
    pub(super) out: usize,
}

impl PoolReturn {
    pub(super) fn new(ready: Arc<EventFd>) -> PoolReturn {
        let (tx, rx) = channel();
        PoolReturn {
            tx,
            rx,
            ready,
            out: 0,
        }
    }
}

/// The eventfd a queue's requests come back from the hook pool on: made when the device is
/// (a vCPU, which activates it, may not create descriptors under its seccomp filter).
pub(in crate::virtio::block) fn pool_eventfd() -> Option<Arc<EventFd>> {
    EventFd::new(libc::EFD_NONBLOCK).ok().map(Arc::new)
}

impl Worker {
    /// Starts requests on the disk's hook pool when its chain may run concurrently, taking
    /// them back on `ready`.
    pub(in crate::virtio::block) fn with_hook_pool(
        mut self,
        ready: Option<Arc<EventFd>>,
    ) -> Worker {
        self.pool = ready.map(PoolReturn::new);
        self
    }

    /// Do `p`'s pre hooks run on the disk's hook pool? When its chain may run concurrently
    /// and it is ordered against the others (a request with no footprint started while
    /// nothing intercepted: it must not meet an instance enabled since, on another thread).
    pub(super) fn goes_to_pool(&self, p: &Pending) -> bool {
        p.footprint.is_some()
            && self.pool.is_some()
            && !self.free.is_empty()
            && self.stack.concurrent()
    }

    /// Hands `p` to the hook pool; it comes back through `pool_returned`.
    pub(super) fn hand_to_pool(&mut self, mut p: Pending) {
        let Some(segments) = self.segments(&p.req) else {
            return self.used(p.head, &p.req, RequestStatus::IoError);
        };
        let (Some(fp), Some(token)) = (p.footprint, self.free.pop()) else {
            return self.used(p.head, &p.req, RequestStatus::IoError);
        };
        let Some(pool) = self.pool.as_mut() else {
            self.free.push(token);
            return self.used(p.head, &p.req, RequestStatus::IoError);
        };
        let (tx, ready) = (pool.tx.clone(), pool.ready.clone());
        let done = move |started: Started| {
            // The queue waits for every request it handed over (`step`, `drop`), so the
            // receiver is there; the eventfd wakes its handler.
            let _ = tx.send((token, started));
            let _ = ready.write(1);
        };
        let (kind, offset, len) = (p.req.kind, p.req.offset, p.req.io_len);
        // SAFETY: as in `start`; the request finishes before the handler goes (`step` and
        // `drop` wait for what the pool holds).
        if !unsafe { self.stack.begin_on_pool(kind, offset, len, segments, done) } {
            // The pool stopped (the disk is closing): nothing more starts through it.
            self.free.push(token);
            return self.used(p.head, &p.req, RequestStatus::IoError);
        }
        pool.out += 1;
        self.order.lock().push((self.queue_index, token, fp));
        p.at_engine = None;
        self.slots[token] = Some(p);
    }

    /// Takes back what the hook pool has finished starting, without waiting.
    pub(super) fn pool_returned(&mut self) {
        loop {
            let next = match self.pool.as_ref() {
                Some(pool) if pool.out > 0 => pool.rx.try_recv().ok(),
                _ => None,
            };
            let Some((token, started)) = next else { return };
            self.back_from_pool(token, started);
        }
    }

    /// Waits for one request to come back from the hook pool (if any is out).
    pub(super) fn wait_for_pool(&mut self) {
        let next = match self.pool.as_ref() {
            Some(pool) if pool.out > 0 => pool.rx.recv().ok(),
            _ => None,
        };
        if let Some((token, started)) = next {
            self.back_from_pool(token, started);
        }
    }

    /// A request whose pre hooks ran on the pool: answered by the chain, or to the engine.
    pub(super) fn back_from_pool(&mut self, token: usize, started: Started) {
        if let Some(pool) = self.pool.as_mut() {
            pool.out = pool.out.saturating_sub(1);
        }
        if self.slots.get(token).is_none_or(Option::is_none) {
            tracing::error!(
                "blk-{}: the hook pool returned unknown token {token}",
                self.id
            );
            return;
        }
        self.moved(token, started);
    }
}
