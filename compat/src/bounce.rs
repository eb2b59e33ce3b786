//! Private copies of request data (bounce buffers) for chains with a transforming plugin,
//! kept for reuse: a request takes one and gives it back when it finishes, so a busy disk
//! allocates (and the kernel zero-fills) nothing per request.

use std::sync::Mutex;

/// Buffers kept for reuse; more than this are freed (a queue's depth at most is in use
/// at once on one disk).
const MAX_POOLED: usize = 256;
/// Larger buffers are freed, not kept: a rare large request does not pin its memory.
const MAX_POOLED_BYTES: usize = 1 << 20;

#[derive(Debug, Default)]
pub(crate) struct BouncePool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BouncePool {
    /// A buffer of `len` bytes. `zeroed`: for a read, whose buffer goes to the guest; a
    /// plugin that completes a read without filling all of it must not hand over an
    /// earlier request's bytes. Otherwise (a write, about to be filled from the guest) the
    /// bytes are whatever an earlier request left.
    pub(crate) fn take(&self, len: usize, zeroed: bool) -> Vec<u8> {
        let mut buf = lock(&self.free).pop().unwrap_or_default();
        if zeroed {
            buf.clear();
        } else {
            buf.truncate(len);
        }
        // Only the part never used before is zero-filled on a write.
        buf.resize(len, 0);
        buf
    }

    pub(crate) fn give(&self, buf: Vec<u8>) {
        if buf.capacity() > MAX_POOLED_BYTES {
            return;
        }
        let mut free = lock(&self.free);
        if free.len() < MAX_POOLED {
            free.push(buf);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_reads_get_zeroes() {
        let pool = BouncePool::default();
        let mut a = pool.take(4096, false);
        a.fill(0xaa);
        let at = a.as_ptr();
        pool.give(a);
        // A write reuses the same memory without clearing it (it is about to be filled).
        let b = pool.take(4096, false);
        assert_eq!(b.as_ptr(), at);
        assert!(b.iter().all(|&x| x == 0xaa));
        pool.give(b);
        // A read gets the same memory, zeroed.
        let c = pool.take(4096, true);
        assert_eq!(c.as_ptr(), at);
        assert!(c.iter().all(|&x| x == 0));
        // Longer than before: the new part is zero.
        let mut c = c;
        c.fill(0xbb);
        pool.give(c);
        let d = pool.take(8192, false);
        assert_eq!(d.len(), 8192);
        assert!(d[4096..].iter().all(|&x| x == 0));
    }

    #[test]
    fn large_buffers_are_not_kept() {
        let pool = BouncePool::default();
        pool.give(vec![0; MAX_POOLED_BYTES + 1]);
        assert!(lock(&pool.free).is_empty());
    }
}
