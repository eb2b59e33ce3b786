//! Walking a request block by block, for plugins that store fixed-size blocks (encryption,
//! caching, compression).

/// The part of one block a byte range covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockPiece {
    /// Block number (byte offset / block size).
    pub block: u64,
    /// Where the piece starts inside the block.
    pub within: usize,
    /// Where the piece starts inside the request's data.
    pub at: u64,
    /// Bytes in the piece.
    pub len: usize,
}

impl BlockPiece {
    /// Whether the piece is the whole block.
    pub fn is_whole(&self, block_size: u64) -> bool {
        self.len as u64 == block_size
    }

    /// The piece's bytes within a block-sized buffer.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.within..self.within + self.len
    }
}

/// The blocks of `block_size` bytes that `len` bytes at `offset` touch, in order, with the
/// part of each that the range covers. `block_size` must not be 0.
///
/// ```
/// use interceptor_sdk::{block_pieces, BlockPiece};
/// // 5 KiB starting 512 bytes before a 4 KiB boundary: a tail, a whole block, a head.
/// let p: Vec<BlockPiece> = block_pieces(4096 - 512, 5120, 4096).collect();
/// assert_eq!(p.len(), 3);
/// assert_eq!((p[0].block, p[0].within, p[0].at, p[0].len), (0, 3584, 0, 512));
/// assert!(p[1].is_whole(4096) && p[1].at == 512);
/// assert_eq!((p[2].block, p[2].len), (2, 512));
/// ```
pub fn block_pieces(offset: u64, len: u64, block_size: u64) -> impl Iterator<Item = BlockPiece> {
    let end = offset.saturating_add(len);
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end || block_size == 0 {
            return None;
        }
        let within = pos % block_size;
        let n = (block_size - within).min(end - pos);
        let piece = BlockPiece {
            block: pos / block_size,
            within: within as usize,
            at: pos - offset,
            len: n as usize,
        };
        pos += n;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuples(offset: u64, len: u64) -> Vec<(u64, usize, u64, usize)> {
        block_pieces(offset, len, 4096)
            .map(|p| (p.block, p.within, p.at, p.len))
            .collect()
    }

    #[test]
    fn pieces_cover_the_range_block_by_block() {
        assert_eq!(
            tuples(4096 - 512, 5120),
            [(0, 3584, 0, 512), (1, 0, 512, 4096), (2, 0, 4608, 512)]
        );
        assert_eq!(tuples(8192, 4096), [(2, 0, 0, 4096)]);
        assert!(tuples(0, 0).is_empty());
        assert_eq!(
            block_pieces(0, 100, 0).count(),
            0,
            "a zero block size yields nothing"
        );
    }
}
