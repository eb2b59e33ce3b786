//! A disk's I/O thread: the one thread that calls the hooks of that disk's interceptor
//! instances. It runs an event-manager loop: the device registers its queue as a subscriber
//! (woken by the queue's ioeventfd), and every other thread that needs a hook called (the
//! API loading or removing an instance, the VMM building the chain at start or settling it
//! at shutdown) sends the work here as a closure and waits for its result. So an instance's
//! create, pre, post, its own I/O through the layers below, and destroy all run on one
//! thread, one at a time, which is the contract docs/plugins.md states; only `stats` is
//! called from other threads.

use event_manager::{EventManager, MutEventSubscriber, RemoteEndpoint, SubscriberId};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, ThreadId};

/// Something the I/O thread serves: a device queue.
pub trait IoSubscriber: MutEventSubscriber + Send {
    /// Serves everything the guest made available so far, without waiting for a kick (at
    /// shutdown, once the vCPUs have stopped, so nothing the guest queued is left behind).
    /// The I/O thread then quiesces, so all of it completes.
    fn drain(&mut self);

    /// One step towards having nothing in flight, taking no new requests: completes what
    /// finished, starts what no longer waits, and blocks for a completion if its own engine
    /// has requests in flight. Returns `true` once it has nothing in flight or waiting. The
    /// I/O thread steps every subscriber until all are idle (a request of one queue may wait
    /// for one of another queue of the same disk): before a job from another thread runs
    /// (a chain edit, a flush) and before a subscriber leaves the loop (a reset), so neither
    /// ever overlaps a guest request.
    fn quiesce_step(&mut self) -> bool;
}

type Subscriber = Box<dyn IoSubscriber>;

/// The I/O thread is gone (it stopped, or a job it ran panicked and took it down).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the I/O thread of device `{0}` is not running")]
pub struct IoThreadGone(pub String);

/// A running I/O thread. Dropping the last handle does not stop it: [`stop`](Self::stop)
/// does.
pub struct IoThread {
    device_id: String,
    endpoint: RemoteEndpoint<Subscriber>,
    thread: ThreadId,
    stop: Arc<AtomicBool>,
    join: Mutex<Option<JoinHandle<()>>>,
    subscribers: Mutex<Vec<SubscriberId>>,
}

impl std::fmt::Debug for IoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThread")
            .field("device_id", &self.device_id)
            .finish()
    }
}

/// What a new I/O thread runs first (the VMM installs its seccomp filter there).
pub type ThreadStart = Arc<dyn Fn() + Send + Sync>;

impl IoThread {
    /// Starts `device_id`'s I/O thread, named `io-<device_id>`; `on_start` runs on it first.
    pub fn spawn(device_id: &str, on_start: Option<ThreadStart>) -> std::io::Result<IoThread> {
        let mut manager = EventManager::<Subscriber>::new()
            .map_err(|e| std::io::Error::other(format!("event manager: {e}")))?;
        let endpoint = manager.remote_endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let id = device_id.to_string();
        let join = std::thread::Builder::new()
            .name(format!("io-{device_id}"))
            .spawn(move || {
                if let Some(start) = on_start {
                    start();
                }
                while !stopping.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        tracing::error!("io-{id}: event loop failed: {e}; the disk stops");
                        return;
                    }
                }
            })?;
        Ok(IoThread {
            device_id: device_id.to_string(),
            endpoint,
            thread: join.thread().id(),
            stop,
            join: Mutex::new(Some(join)),
            subscribers: Mutex::new(Vec::new()),
        })
    }

    /// Is the caller the I/O thread?
    pub fn is_current(&self) -> bool {
        std::thread::current().id() == self.thread
    }

    fn gone(&self) -> IoThreadGone {
        IoThreadGone(self.device_id.clone())
    }

    /// Runs `f` on the I/O thread once no guest request is in flight (every subscriber
    /// quiesces first), and returns its result (called on the I/O thread itself, it just
    /// runs `f`). A panic in `f` is caught: it becomes [`IoThreadGone`] for this call only
    /// and the thread keeps serving.
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, IoThreadGone> {
        if self.is_current() {
            return catch_unwind(AssertUnwindSafe(f)).map_err(|_| self.gone());
        }
        let gone = self.gone();
        let ids = lock(&self.subscribers).clone();
        self.endpoint
            .call_blocking(move |ops| {
                quiesce(ops, &ids)?;
                catch_unwind(AssertUnwindSafe(f)).map_err(|_| Failed)
            })
            .map_err(|_: Failed| gone)
    }

    /// Adds a subscriber (a device queue) to the loop; its `init` runs on the I/O thread.
    pub fn add(&self, subscriber: Box<dyn IoSubscriber>) -> Result<SubscriberId, IoThreadGone> {
        let id = self
            .endpoint
            .call_blocking(move |ops| Ok::<_, Failed>(ops.add_subscriber(subscriber)))
            .map_err(|_| self.gone())?;
        lock(&self.subscribers).push(id);
        Ok(id)
    }

    /// Takes a subscriber out of the loop (a device reset): when this returns, it serves
    /// nothing more, every request it (or any other subscriber) had in flight has
    /// completed, and it is dropped. It is dropped on the I/O thread, under that thread's
    /// seccomp filter, whatever thread asked (a reset comes from a vCPU).
    pub fn remove(&self, id: SubscriberId) -> Result<(), IoThreadGone> {
        let ids = {
            let mut subs = lock(&self.subscribers);
            let all = subs.clone();
            subs.retain(|s| *s != id);
            all
        };
        self.endpoint
            .call_blocking(move |ops| {
                quiesce(ops, &ids)?;
                ops.remove_subscriber(id).map(drop).map_err(|_| Failed)
            })
            .map_err(|_| self.gone())
    }

    /// Every subscriber serves what is pending now (see [`IoSubscriber::drain`]) and all
    /// of it completes.
    pub fn drain(&self) -> Result<(), IoThreadGone> {
        let ids = lock(&self.subscribers).clone();
        self.endpoint
            .call_blocking(move |ops| {
                for &id in &ids {
                    if let Ok(s) = ops.subscriber_mut(id) {
                        if catch_unwind(AssertUnwindSafe(|| s.drain())).is_err() {
                            return Err(Failed);
                        }
                    }
                }
                quiesce(ops, &ids)
            })
            .map_err(|_| self.gone())
    }

    /// Stops the loop and waits for the thread to end. Later calls fail with
    /// [`IoThreadGone`].
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.endpoint.kick();
        if let Some(join) = lock(&self.join).take() {
            if join.thread().id() != std::thread::current().id() {
                let _ = join.join();
            }
        }
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Steps every subscriber of `ids` still in the loop until none has anything in flight.
fn quiesce(
    ops: &mut dyn event_manager::SubscriberOps<Subscriber = Subscriber>,
    ids: &[SubscriberId],
) -> Result<(), Failed> {
    loop {
        let mut idle = true;
        for &id in ids {
            if let Ok(s) = ops.subscriber_mut(id) {
                idle &= catch_unwind(AssertUnwindSafe(|| s.quiesce_step())).map_err(|_| Failed)?;
            }
        }
        if idle {
            return Ok(());
        }
    }
}

/// A job failed (it panicked, or the subscriber was not there).
struct Failed;

impl From<event_manager::Error> for Failed {
    fn from(_: event_manager::Error) -> Failed {
        Failed
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
