//! Physical space: which stored extents are live, how many map entries reference each, and
//! which 4 KiB units of the data area are free. None of it is on disk: it is derived from
//! the map at open, so it can never disagree with the map after a crash.
//!
//! A unit whose last extent goes is *held*, not free, until the commit that stops the map
//! pointing at it is durable (`release_held`): until then a crash would bring back the map
//! that still points there, so its bytes must not be overwritten.

use crate::format::Entry;
use crate::{BLOCK, SECTOR};
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub stored_len: u32,
    pub codec: u8,
    /// Map entries that point at the extent.
    pub refs: u32,
}

pub struct Space {
    /// First block of the data area and its number of units (4 KiB blocks).
    data_start: u64,
    /// Per unit: live extents overlapping it (at most 9: extents start on 512-byte
    /// sectors, 8 to a unit, and one more can run into it). One byte and one bit per unit:
    /// 288 MiB for a TiB of disk below.
    overlaps: Vec<u8>,
    /// Per unit, one bit: freed since the last durable commit.
    held: Vec<u64>,
    held_list: Vec<usize>,
    extents: HashMap<u64, Extent>,
    free_units: u64,
    /// Where the next search for free units starts.
    cursor: usize,
}

/// Why the map cannot be what it says (found when building the space from it).
#[derive(Debug)]
pub struct Damage(pub String);

impl Space {
    pub fn new(data_start: u64, units: u64) -> Space {
        let n = usize::try_from(units).unwrap_or(0);
        Space {
            data_start,
            overlaps: vec![0; n],
            held: vec![0; n.div_ceil(64)],
            held_list: Vec::new(),
            extents: HashMap::new(),
            free_units: units,
            cursor: 0,
        }
    }

    fn is_held(&self, u: usize) -> bool {
        self.held[u / 64] & (1 << (u % 64)) != 0
    }

    fn set_held(&mut self, u: usize, held: bool) {
        if held {
            self.held[u / 64] |= 1 << (u % 64);
        } else {
            self.held[u / 64] &= !(1 << (u % 64));
        }
    }

    pub fn units(&self) -> u64 {
        self.overlaps.len() as u64
    }

    pub fn free_units(&self) -> u64 {
        self.free_units
    }

    pub fn held_units(&self) -> u64 {
        self.held_list.len() as u64
    }

    pub fn extents(&self) -> usize {
        self.extents.len()
    }

    pub fn extent(&self, sector: u64) -> Option<&Extent> {
        self.extents.get(&sector)
    }

    pub fn iter_extents(&self) -> impl Iterator<Item = (&u64, &Extent)> {
        self.extents.iter()
    }

    /// Units (indices into the data area) that the bytes `start..end` overlap.
    fn unit_range(&self, start: u64, end: u64) -> Option<std::ops::Range<usize>> {
        let base = self.data_start.checked_mul(BLOCK)?;
        let first = start.checked_sub(base)? / BLOCK;
        let last = end.checked_sub(base)?.div_ceil(BLOCK);
        let (first, last) = (usize::try_from(first).ok()?, usize::try_from(last).ok()?);
        (first < last && last <= self.overlaps.len()).then_some(first..last)
    }

    /// Counts one more map entry pointing at `e`'s extent. At open (`building`) the
    /// extent's first reference is where it comes into being; otherwise an extent is added
    /// only by `place` (a first reference to an unknown extent is damage).
    pub fn add_ref(&mut self, e: &Entry, building: bool) -> Result<(), Damage> {
        let Entry::Stored {
            sector,
            stored_len,
            codec,
            ..
        } = *e
        else {
            return Ok(());
        };
        if let Some(x) = self.extents.get_mut(&sector) {
            if x.stored_len != stored_len || x.codec != codec as u8 {
                return Err(Damage(format!(
                    "two map entries disagree on the extent at sector {sector}"
                )));
            }
            x.refs = x
                .refs
                .checked_add(1)
                .ok_or(Damage("refcount overflow".into()))?;
            return Ok(());
        }
        if !building {
            return Err(Damage(format!("no extent at sector {sector}")));
        }
        self.insert_extent(sector, stored_len, codec as u8, 1)
    }

    fn insert_extent(
        &mut self,
        sector: u64,
        stored_len: u32,
        codec: u8,
        refs: u32,
    ) -> Result<(), Damage> {
        let start = sector
            .checked_mul(SECTOR)
            .ok_or(Damage("sector overflow".into()))?;
        let end = start + u64::from(stored_len);
        let range = self.unit_range(start, end).ok_or_else(|| {
            Damage(format!(
                "the extent at sector {sector} ({stored_len} bytes) is outside the data area"
            ))
        })?;
        // Check every unit before changing any.
        for u in range.clone() {
            if self.overlaps[u] == 0 && self.is_held(u) {
                // A crash could still bring back the map that points into it.
                return Err(Damage(format!(
                    "unit {u} is held until the next commit and cannot be written"
                )));
            }
            if self.overlaps[u] == u8::MAX {
                return Err(Damage("too many extents share a unit".into()));
            }
        }
        for u in range {
            if self.overlaps[u] == 0 {
                self.free_units -= 1;
            }
            self.overlaps[u] += 1;
        }
        self.extents.insert(
            sector,
            Extent {
                stored_len,
                codec,
                refs,
            },
        );
        Ok(())
    }

    /// Drops one reference to `e`'s extent; returns its sector if that was the last (the
    /// extent is gone and its units are held until the next durable commit).
    pub fn drop_ref(&mut self, e: &Entry) -> Option<u64> {
        let Entry::Stored { sector, .. } = *e else {
            return None;
        };
        let x = self.extents.get_mut(&sector)?;
        x.refs = x.refs.saturating_sub(1);
        if x.refs > 0 {
            return None;
        }
        let len = x.stored_len;
        self.extents.remove(&sector);
        let start = sector * SECTOR;
        if let Some(range) = self.unit_range(start, start + u64::from(len)) {
            for u in range {
                self.overlaps[u] = self.overlaps[u].saturating_sub(1);
                if self.overlaps[u] == 0 {
                    self.set_held(u, true);
                    self.held_list.push(u);
                }
            }
        }
        Some(sector)
    }

    /// After a durable commit: held units become free. Returns them as runs of physical
    /// blocks (first, count), for the device below to be told.
    pub fn release_held(&mut self) -> Vec<(u64, u64)> {
        let mut units: Vec<usize> = self.held_list.drain(..).collect();
        units.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for u in units {
            self.set_held(u, false);
            self.free_units += 1;
            let block = self.data_start + u as u64;
            match runs.last_mut() {
                Some((first, n)) if *first + *n == block => *n += 1,
                _ => runs.push((block, 1)),
            }
        }
        runs
    }

    /// Finds `n` contiguous free units; returns the first one's physical block.
    pub fn find_free(&mut self, n: u64) -> Option<u64> {
        let total = self.overlaps.len();
        let n = usize::try_from(n).ok()?;
        if n == 0 || n > total || (self.free_units as usize) < n {
            return None;
        }
        let free = |s: &Space, u: usize| s.overlaps[u] == 0 && !s.is_held(u);
        // Next fit: from the cursor to the end, then the whole area from the start (a run
        // may span the cursor).
        for (from, to) in [(self.cursor.min(total), total), (0, total)] {
            let mut run = 0;
            let mut u = from;
            while u < to {
                if free(self, u) {
                    run += 1;
                    if run == n {
                        let first = u + 1 - n;
                        self.cursor = u + 1;
                        return Some(self.data_start + first as u64);
                    }
                } else {
                    run = 0;
                }
                u += 1;
            }
        }
        None
    }

    /// Makes a new extent of `stored_len` bytes at `sector` (inside units `find_free`
    /// returned), with no references yet; `add_ref` follows for each entry.
    pub fn place(&mut self, sector: u64, stored_len: u32, codec: u8) -> Result<(), Damage> {
        if self.extents.contains_key(&sector) {
            return Err(Damage(format!("an extent is already at sector {sector}")));
        }
        self.insert_extent(sector, stored_len, codec, 0)
    }

    /// Removes an extent that `place` made and no entry references (a failed write).
    pub fn unplace(&mut self, sector: u64) {
        if self.extents.get(&sector).is_some_and(|x| x.refs == 0) {
            let x = self
                .extents
                .remove(&sector)
                .map(|x| x.stored_len)
                .unwrap_or(0);
            let start = sector * SECTOR;
            if let Some(range) = self.unit_range(start, start + u64::from(x)) {
                for u in range {
                    self.overlaps[u] = self.overlaps[u].saturating_sub(1);
                    if self.overlaps[u] == 0 {
                        self.free_units += 1;
                    }
                }
            }
        }
    }

    /// Checks that no two extents overlap (run after building from the map).
    pub fn check_disjoint(&self) -> Result<(), Damage> {
        let mut v: Vec<(u64, u64)> = self
            .extents
            .iter()
            .map(|(&s, x)| (s * SECTOR, s * SECTOR + u64::from(x.stored_len)))
            .collect();
        v.sort_unstable();
        for w in v.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(Damage(format!(
                    "the extents at bytes {} and {} overlap",
                    w[0].0, w[1].0
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Codec;

    fn entry(sector: u64, len: u32, index: u8) -> Entry {
        Entry::Stored {
            sector,
            stored_len: len,
            index,
            codec: Codec::Raw,
            check: 0,
        }
    }

    #[test]
    fn freed_units_are_held_until_the_commit_then_reused() {
        // Data area: blocks 10..14 (4 units).
        let mut s = Space::new(10, 4);
        let at = s.find_free(2).unwrap();
        assert_eq!(at, 10);
        let sector = at * 8;
        s.place(sector, 8192, 0).unwrap();
        s.add_ref(&entry(sector, 8192, 0), false).unwrap();
        s.add_ref(&entry(sector, 8192, 1), false).unwrap();
        assert_eq!(s.free_units(), 2);
        assert_eq!(s.drop_ref(&entry(sector, 8192, 0)), None);
        assert_eq!(s.drop_ref(&entry(sector, 8192, 1)), Some(sector));
        // Held: not free, not found.
        assert_eq!(s.free_units(), 2);
        assert_eq!(s.held_units(), 2);
        assert_eq!(s.find_free(3), None);
        s.release_held();
        assert_eq!(s.free_units(), 4);
        assert_eq!(s.find_free(4), Some(10));
    }

    #[test]
    fn overlapping_or_outside_extents_are_damage() {
        let mut s = Space::new(10, 4);
        assert!(s.add_ref(&entry(10 * 8, 4096, 0), true).is_ok());
        assert!(s.add_ref(&entry(10 * 8 + 1, 4096, 0), true).is_ok());
        assert!(s.check_disjoint().is_err());
        let mut s = Space::new(10, 4);
        assert!(s.add_ref(&entry(14 * 8, 4096, 0), true).is_err());
        assert!(s.add_ref(&entry(9 * 8, 4096, 0), true).is_err());
        // Two entries naming one extent with different lengths.
        let mut s = Space::new(10, 4);
        s.add_ref(&entry(80, 8192, 0), true).unwrap();
        assert!(s.add_ref(&entry(80, 4096, 0), true).is_err());
    }
}
