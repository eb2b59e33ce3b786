//! What a store gives the guest and how big its journal is, from a plugin's `logical_mib`
//! and `journal_kib`, checked against the disk below before anything is written; each
//! refusal names the field and the bounds.

use crate::format::{Geometry, MAX_THIN};
use crate::BLOCK;

/// The journal without `journal_kib`: 4 MiB, less on small disks (at most 1/64 of them).
pub const DEFAULT_JOURNAL_BLOCKS: u64 = 1024;
/// The largest journal `journal_kib` may ask for: 64 MiB.
pub const MAX_JOURNAL_KIB: u64 = 64 << 10;
/// Units the default size keeps free beyond the guest's blocks, on disks of 128 MiB or
/// more (1/64 of smaller ones): 2 MiB, more than the largest request a guest sends (1280
/// KiB), so that a full disk still takes an overwrite, which needs its new units before
/// its old ones come free (copy on write).
pub const OVERWRITE_RESERVE_BLOCKS: u64 = 512;

/// A store's size: guest blocks and journal blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizing {
    pub logical_blocks: u64,
    pub journal_blocks: u64,
}

/// The size for a store over `below_bytes`: `logical_mib` (thin up to [`MAX_THIN`] times
/// the disk below) or by default what the store can always hold, every block stored and
/// overwritten uncompressed; `journal_kib` or [`DEFAULT_JOURNAL_BLOCKS`].
///
/// ```
/// let s = extent_store::sizing(None, None, 1 << 30).unwrap();
/// assert!(s.logical_blocks < (1 << 30) / 4096);
/// assert!(extent_store::sizing(Some(0), None, 1 << 30).unwrap_err().contains("logical_mib = 0"));
/// ```
pub fn sizing(
    logical_mib: Option<u64>,
    journal_kib: Option<u64>,
    below_bytes: u64,
) -> Result<Sizing, String> {
    let below = below_bytes / BLOCK;
    let most_journal = (below / 64).clamp(1, MAX_JOURNAL_KIB / 4);
    let journal_blocks = match journal_kib {
        None => DEFAULT_JOURNAL_BLOCKS.min(most_journal),
        Some(k) if k >= 4 && k / 4 <= most_journal => k / 4,
        Some(k) => {
            return Err(format!(
                "journal_kib = {k}: 4 to {} here (at most 1/64 of the {} KiB below, and {MAX_JOURNAL_KIB})",
                most_journal * 4,
                below * 4
            ))
        }
    };
    let logical_blocks = match logical_mib {
        Some(m) => {
            let most = MAX_THIN.saturating_mul(below_bytes) >> 20;
            let blocks = m
                .checked_mul((1 << 20) / BLOCK)
                .filter(|_| m >= 1 && m <= most);
            let Some(blocks) = blocks else {
                return Err(format!(
                    "logical_mib = {m}: 1 to {most} ({MAX_THIN} times the {} KiB below)",
                    below_bytes >> 10
                ));
            };
            Geometry::new(blocks, below, journal_blocks)
                .map_err(|e| format!("logical_mib = {m}: {e}"))?;
            blocks
        }
        None => default_logical_blocks(below, journal_blocks).ok_or_else(|| {
            format!(
                "the disk below ({} KiB) is too small for a store with {} KiB of journal",
                below * 4,
                journal_blocks * 4
            )
        })?,
    };
    Ok(Sizing {
        logical_blocks,
        journal_blocks,
    })
}

/// Units of a store over `below` blocks that only overwrites may use: 2 MiB, or 1/64 of a
/// disk under 128 MiB. A write that maps a block that was a hole fails rather than take
/// them, so a full disk (thin or not) still takes the overwrites a file system's metadata
/// needs (copy on write needs an overwrite's new units before its old ones come free).
pub fn overwrite_reserve(below: u64) -> u64 {
    (below / 64).clamp(1, OVERWRITE_RESERVE_BLOCKS)
}

/// The most guest blocks that fit with their metadata, one unit each, and the reserve.
fn default_logical_blocks(below: u64, journal_blocks: u64) -> Option<u64> {
    let reserve = overwrite_reserve(below);
    // The metadata of `below` guest blocks is at least that of fewer: two slots of a
    // directory entry per page, and two blocks per page.
    let pages = below.div_ceil(crate::format::PAGE_ENTRIES);
    let dir = (pages * crate::format::DIR_ENTRY_BYTES).div_ceil(BLOCK);
    let meta = Geometry::SLOTS_START + 2 * (1 + dir) + 2 * pages;
    let mut l = below
        .checked_sub(meta)?
        .checked_sub(journal_blocks)?
        .checked_sub(reserve)?;
    let fits = |l: u64| {
        Geometry::new(l, below, journal_blocks).is_ok_and(|g| g.data_start() + l + reserve <= below)
    };
    // Fewer guest blocks need fewer map blocks: take what that leaves.
    while fits(l + 1) {
        l += 1;
    }
    (l > 0 && fits(l)).then_some(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_fields_are_refused_by_name_and_the_default_fits_with_its_reserve() {
        let gib = 1u64 << 30;
        for (l, j, want) in [
            (None, Some(0), "journal_kib = 0: 4 to 16384"),
            (
                None,
                Some(1 << 40),
                "journal_kib = 1099511627776: 4 to 16384",
            ),
            (None, Some(4 << 30), "journal_kib = 4294967296"),
            (Some(0), None, "logical_mib = 0: 1 to 16384"),
            (Some(16385), None, "logical_mib = 16385: 1 to 16384"),
            (Some(u64::MAX), None, "logical_mib = 18446744073709551615"),
        ] {
            let e = sizing(l, j, gib).unwrap_err();
            assert!(e.starts_with(want), "{e}");
        }
        // Thin: 16 times.
        assert_eq!(
            sizing(Some(16384), None, gib).unwrap().logical_blocks,
            16384 * 256
        );
        let s = sizing(None, None, gib).unwrap();
        assert_eq!(s.journal_blocks, 1024);
        let g = Geometry::new(s.logical_blocks, gib / BLOCK, 1024).unwrap();
        let data = g.physical_blocks - g.data_start();
        assert!(
            (OVERWRITE_RESERVE_BLOCKS..OVERWRITE_RESERVE_BLOCKS + 2)
                .contains(&(data - s.logical_blocks)),
            "{g:?}"
        );
        // A disk too small for any store says so.
        assert!(sizing(None, None, 16 << 10)
            .unwrap_err()
            .contains("too small"));
    }
}
