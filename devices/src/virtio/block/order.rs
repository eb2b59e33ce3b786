//! Which requests may be in flight together on a disk with interceptors.
//!
//! A plain disk runs whatever the guest submits, in any order, as a real disk does. Through
//! interceptors it does not: an instance keeps state per block between a request's pre and
//! post hooks (a cache fills a block from a read, encryption records a block's nonce and tag
//! when it seals a write, and reads, modifies and writes a whole 4 KiB block for a partial
//! write), so two requests in flight on the same block could leave that state describing
//! neither. The queue therefore holds a request back while an earlier one that touches the
//! same 4 KiB blocks is in flight or held, unless both only read; and a flush waits for
//! everything before it, and everything after it waits for the flush (a plugin commits its
//! metadata at a flush: the writes it covers must have landed). docs/plugins.md states this
//! contract.

/// The granule of that ordering: the largest block a shipped plugin works in.
pub(super) const ORDER_BYTES: u64 = 4096;

/// The blocks a request touches, for ordering.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Footprint {
    /// Reads `[first, end)` (in `ORDER_BYTES` blocks).
    Read(u64, u64),
    /// Writes `[first, end)`.
    Write(u64, u64),
    /// Everything (a flush).
    All,
}

impl Footprint {
    /// The blocks of `[offset, offset + len)`; `len` 0 still touches `offset`'s block.
    pub(super) fn of(write: bool, offset: u64, len: u64) -> Footprint {
        let first = offset / ORDER_BYTES;
        let last = offset.saturating_add(len.max(1) - 1) / ORDER_BYTES;
        let end = last.saturating_add(1);
        if write {
            Footprint::Write(first, end)
        } else {
            Footprint::Read(first, end)
        }
    }

    /// Must one of the two wait for the other?
    pub(super) fn conflicts(self, other: Footprint) -> bool {
        use Footprint::*;
        match (self, other) {
            (All, _) | (_, All) => true,
            (Read(..), Read(..)) => false,
            (Read(a, b) | Write(a, b), Read(c, d) | Write(c, d)) => a < d && c < b,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_blocks_conflict_unless_both_read() {
        let w = |o, l| Footprint::of(true, o, l);
        let r = |o, l| Footprint::of(false, o, l);
        // Different sectors of the same 4 KiB block: a read-modify-write hazard.
        assert!(w(0, 512).conflicts(w(512, 512)));
        assert!(w(0, 512).conflicts(r(3584, 512)));
        assert!(!r(0, 4096).conflicts(r(0, 4096)));
        // Adjacent blocks do not.
        assert!(!w(0, 4096).conflicts(w(4096, 4096)));
        assert!(!w(4096, 4096).conflicts(r(0, 4096)));
        // A flush orders against everything.
        assert!(Footprint::All.conflicts(r(1 << 30, 512)));
        assert!(w(0, 512).conflicts(Footprint::All));
        // The last block of the address space does not wrap.
        let top = u64::MAX - 511;
        assert!(w(top, 512).conflicts(w(top, 512)));
        assert!(!w(top, 512).conflicts(w(0, 512)));
    }
}
