//! `--delay-us`: a slow layer below, standing in for remote storage. Every request that
//! reaches the file, from the engine (the guest's requests passing the chain) or from a
//! plugin's own synchronous I/O below it, completes `delay` after it was issued. The
//! engine's requests overlap (their completions are held back, nothing sleeps); a plugin's
//! own I/O is synchronous today, so its thread sleeps: which is what the figure shows.

use block::{AsyncIo, BlockBackend, IoRequest, RequestStatus};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;

/// The layers below a plugin, `delay` slower per request.
pub struct SlowBackend {
    pub inner: Arc<dyn BlockBackend>,
    pub delay: Duration,
}

impl BlockBackend for SlowBackend {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }

    unsafe fn execute(&self, req: &IoRequest<'_>) -> RequestStatus {
        let until = Instant::now() + self.delay;
        // SAFETY: the caller's promise, passed on.
        let status = unsafe { self.inner.execute(req) };
        sleep_until(until);
        status
    }
}

/// Makes this process's sleeps end when asked (the default timer slack adds 50 µs to each,
/// a quarter of a 200 µs delay).
pub fn precise_sleeps() {
    // SAFETY: PR_SET_TIMERSLACK takes a number and changes only this thread's slack, which
    // the threads it starts inherit (called first thing in main).
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// An engine whose completions come back no sooner than `delay` after their submission.
pub struct SlowIo {
    inner: Box<dyn AsyncIo>,
    delay: Duration,
    /// Submitted, by token: when each may complete.
    due: std::collections::HashMap<u64, Instant>,
    /// Completed by the inner engine, held until due: (due, token, status).
    held: BinaryHeap<Reverse<(Instant, u64, Held)>>,
}

/// A status, ordered only so that the heap can hold it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Held(u8);

impl Held {
    fn from(s: RequestStatus) -> Held {
        Held(match s {
            RequestStatus::Ok => 0,
            RequestStatus::Unsupported => 1,
            _ => 2,
        })
    }

    fn status(self) -> RequestStatus {
        match self.0 {
            0 => RequestStatus::Ok,
            1 => RequestStatus::Unsupported,
            _ => RequestStatus::IoError,
        }
    }
}

impl SlowIo {
    pub fn new(inner: Box<dyn AsyncIo>, delay: Duration) -> SlowIo {
        SlowIo {
            inner,
            delay,
            due: std::collections::HashMap::new(),
            held: BinaryHeap::new(),
        }
    }

    /// Moves what the inner engine finished into `held`.
    fn collect(&mut self) {
        while let Some((token, status)) = self.inner.next_completion() {
            let due = self.due.remove(&token).unwrap_or_else(Instant::now);
            self.held.push(Reverse((due, token, Held::from(status))));
        }
    }
}

impl AsyncIo for SlowIo {
    fn notifier(&self) -> &EventFd {
        self.inner.notifier()
    }

    unsafe fn submit(&mut self, req: &IoRequest<'_>, token: u64) {
        self.due.insert(token, Instant::now() + self.delay);
        // SAFETY: the caller's promise, passed on.
        unsafe { self.inner.submit(req, token) }
    }

    fn commit(&mut self) {
        self.inner.commit()
    }

    fn next_completion(&mut self) -> Option<(u64, RequestStatus)> {
        self.collect();
        match self.held.peek() {
            Some(Reverse((due, _, _))) if *due <= Instant::now() => {
                let Reverse((_, token, held)) = self.held.pop()?;
                Some((token, held.status()))
            }
            _ => None,
        }
    }

    fn wait(&mut self) {
        self.collect();
        if let Some(Reverse((due, _, _))) = self.held.peek() {
            sleep_until(*due);
        } else {
            self.inner.wait();
        }
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len()
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::{BlockRequestKind, EngineChoice, RawFile, Segment};

    fn read(seg: &[Segment]) -> IoRequest<'_> {
        IoRequest {
            kind: BlockRequestKind::Read,
            offset: 0,
            len: 4096,
            segments: seg,
        }
    }

    #[test]
    fn requests_overlap_but_none_completes_before_its_delay() {
        let path = std::env::temp_dir().join(format!("slow-io-{}.img", std::process::id()));
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let raw: Arc<dyn BlockBackend> = Arc::new(RawFile::new(file, false, "t").unwrap());
        let delay = Duration::from_millis(20);
        let slow = SlowBackend {
            inner: raw.clone(),
            delay,
        };
        let mut buf = vec![0u8; 4096];
        let seg = [Segment {
            base: buf.as_mut_ptr(),
            len: 4096,
        }];
        let req = read(&seg);
        let t = Instant::now();
        // SAFETY: `buf` outlives the call.
        assert_eq!(unsafe { slow.execute(&req) }, RequestStatus::Ok);
        assert!(t.elapsed() >= delay, "the plugin's own I/O waits");
        assert_eq!(buf[0], 7);

        let file = std::fs::File::open(&path).unwrap();
        let engine = EngineChoice::Sync.open(&file, false, 8, &raw).unwrap();
        let mut io = SlowIo::new(engine, delay);
        let mut bufs = vec![vec![0u8; 4096]; 8];
        let t = Instant::now();
        for (i, b) in bufs.iter_mut().enumerate() {
            let seg = [Segment {
                base: b.as_mut_ptr(),
                len: 4096,
            }];
            // SAFETY: each buffer outlives its request (all complete below).
            unsafe { io.submit(&read(&seg), i as u64) };
        }
        io.commit();
        let mut done = 0;
        while done < 8 {
            match io.next_completion() {
                Some((_, s)) => {
                    assert_eq!(s, RequestStatus::Ok);
                    assert!(t.elapsed() >= delay, "completed early");
                    done += 1;
                }
                None => io.wait(),
            }
        }
        assert!(
            t.elapsed() < delay * 4,
            "eight requests overlapped: {:?}",
            t.elapsed()
        );
        assert_eq!(io.in_flight(), 0);
        let _ = std::fs::remove_file(&path);
    }
}
