//! The remapping interceptor: the proof that a plugin can own the layout below it, as
//! compression and deduplication will. Each 512-byte sector the guest writes is stored in
//! the next free slot of a data region, in the order sectors are first written; a map in a
//! metadata region the plugin owns says where each one went. It does all its I/O itself
//! through "the layers below" and completes every read and write at the pre point.
//!
//! On-disk format (all little-endian), on a disk of `S` sectors:
//!
//! | sector | contents |
//! | --- | --- |
//! | 0 | header: `b"VMMREMAP"`, version `u32` = 1, `u32` 0, logical sectors `n: u64`, first data sector `d: u64` |
//! | 1 .. d | the map: `n` `u32`s; entry `i` is 0 (never written: reads as zeros) or slot+1 |
//! | d .. d+n | the data slots |
//!
//! The guest sees `n` sectors, `n` being the largest with `1 + ceil(n/128) + n <= S`. A blank
//! (all-zero) first sector is formatted; anything else that is not this header is refused.
//! Disabled, the plugin stays in the path and keeps remapping: the layout is its own.
//! Data goes to its slot before the map entry that points at it, so a crash leaves a sector
//! old or new.

use interceptor_sdk::{
    abi, export_interceptor, CreateContext, Decision, Interceptor, Lower, Request, RequestKind,
    Slot,
};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

const SECTOR: u64 = 512;
const MAGIC: &[u8; 8] = b"VMMREMAP";
const VERSION: u32 = 1;
const ENTRIES_PER_SECTOR: u64 = SECTOR / 4;

struct Map {
    /// slot + 1 per logical sector; 0 = unmapped.
    entries: Vec<u32>,
    next_free: u32,
}

pub struct Remap {
    lower: Lower,
    logical: u64,
    data_start: u64,
    map: Mutex<Map>,
    reads: AtomicU64,
    writes: AtomicU64,
    runs: AtomicU64,
}

/// The largest `n` with `1 + ceil(n/128) + n <= total`.
fn logical_sectors(total: u64) -> u64 {
    let mut n = total.saturating_sub(1) * ENTRIES_PER_SECTOR / (ENTRIES_PER_SECTOR + 1);
    while n > 0 && 1 + n.div_ceil(ENTRIES_PER_SECTOR) + n > total {
        n -= 1;
    }
    n
}

fn io(e: interceptor_sdk::IoError) -> String {
    e.to_string()
}

impl Remap {
    fn header(n: u64, d: u64) -> Vec<u8> {
        let mut h = vec![0u8; SECTOR as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&n.to_le_bytes());
        h[24..32].copy_from_slice(&d.to_le_bytes());
        h
    }

    /// Consecutive runs of the request's sectors: (first logical index in the request,
    /// count, first slot or None when unmapped).
    fn runs(entries: &[u32], first: u64, count: u64) -> Vec<(u64, u64, Option<u32>)> {
        let mut out: Vec<(u64, u64, Option<u32>)> = Vec::new();
        for i in 0..count {
            let slot = entries[(first + i) as usize].checked_sub(1);
            match out.last_mut() {
                Some((start, n, Some(s))) if slot == Some(*s + *n as u32) && *start + *n == i => {
                    *n += 1
                }
                Some((start, n, None)) if slot.is_none() && *start + *n == i => *n += 1,
                _ => out.push((i, 1, slot)),
            }
        }
        out
    }

    fn read(&self, req: &mut Request<'_>, first: u64, count: u64) -> Result<(), String> {
        let map = self.map.lock().map_err(|_| "map lock poisoned")?;
        for (at, n, slot) in Self::runs(&map.entries, first, count) {
            let mut buf = vec![0u8; (n * SECTOR) as usize];
            if let Some(s) = slot {
                self.lower
                    .read((self.data_start + u64::from(s)) * SECTOR, &mut buf)
                    .map_err(io)?;
            }
            req.write_data(at * SECTOR, &buf)
                .map_err(|e| format!("{e:?}"))?;
            self.runs.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    fn write(&self, req: &mut Request<'_>, first: u64, count: u64) -> Result<(), String> {
        let mut data = vec![0u8; (count * SECTOR) as usize];
        req.read_data(0, &mut data).map_err(|e| format!("{e:?}"))?;
        let mut map = self.map.lock().map_err(|_| "map lock poisoned")?;
        let mut dirty = Vec::new();
        for i in first..first + count {
            if map.entries[i as usize] == 0 {
                map.next_free += 1;
                map.entries[i as usize] = map.next_free;
                let sector = i / ENTRIES_PER_SECTOR;
                if dirty.last() != Some(&sector) {
                    dirty.push(sector);
                }
            }
        }
        // Data first, then the map entries that point at it.
        for (at, n, slot) in Self::runs(&map.entries, first, count) {
            let slot = slot.ok_or("unmapped sector after allocation")?;
            let bytes = &data[(at * SECTOR) as usize..((at + n) * SECTOR) as usize];
            self.lower
                .write((self.data_start + u64::from(slot)) * SECTOR, bytes)
                .map_err(io)?;
            self.runs.fetch_add(1, Relaxed);
        }
        for sector in dirty {
            let from = (sector * ENTRIES_PER_SECTOR) as usize;
            let to = (from + ENTRIES_PER_SECTOR as usize).min(map.entries.len());
            let mut buf = vec![0u8; SECTOR as usize];
            for (k, e) in map.entries[from..to].iter().enumerate() {
                buf[k * 4..k * 4 + 4].copy_from_slice(&e.to_le_bytes());
            }
            self.lower.write((1 + sector) * SECTOR, &buf).map_err(io)?;
        }
        Ok(())
    }
}

impl Interceptor for Remap {
    const NAME: &'static std::ffi::CStr = c"remap";
    const FLAGS: u32 = abi::F_KEEP_WHEN_DISABLED | abi::F_OWNS_FORMAT;

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let lower = ctx.lower;
        let total = lower.capacity() / SECTOR;
        let n = logical_sectors(total);
        if n == 0 {
            return Err(format!("disk of {total} sectors is too small to remap"));
        }
        let d = 1 + n.div_ceil(ENTRIES_PER_SECTOR);
        let mut head = vec![0u8; SECTOR as usize];
        lower.read(0, &mut head).map_err(io)?;
        let mut entries = vec![0u32; n as usize];
        if head.iter().all(|&b| b == 0) {
            // A blank disk: format it. The map region of a blank disk is zeros already.
            lower.write(0, &Remap::header(n, d)).map_err(io)?;
            lower.flush().map_err(io)?;
        } else if head != Remap::header(n, d) {
            return Err(
                "the disk holds data that is not a remap layout of this size; use a blank disk"
                    .into(),
            );
        } else {
            let mut raw = vec![0u8; ((d - 1) * SECTOR) as usize];
            for (k, chunk) in raw.chunks_mut(1 << 20).enumerate() {
                lower
                    .read(SECTOR + k as u64 * (1 << 20), chunk)
                    .map_err(io)?;
            }
            for (e, b) in entries.iter_mut().zip(raw.chunks_exact(4)) {
                *e = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        if entries.iter().any(|&e| u64::from(e) > n) {
            return Err("the map points past the data region: corrupt metadata".into());
        }
        let next_free = entries.iter().copied().max().unwrap_or(0);
        Ok(Remap {
            lower,
            logical: n,
            data_start: d,
            map: Mutex::new(Map { entries, next_free }),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            runs: AtomicU64::new(0),
        })
    }

    fn pre(&self, req: &mut Request<'_>, _: &mut Slot) -> Decision {
        let (first, count) = (req.offset() / SECTOR, req.len() / SECTOR);
        if first + count > self.logical {
            return Decision::Fail;
        }
        let done = match req.kind() {
            RequestKind::Read => {
                self.reads.fetch_add(1, Relaxed);
                self.read(req, first, count)
            }
            RequestKind::Write => {
                self.writes.fetch_add(1, Relaxed);
                self.write(req, first, count)
            }
            RequestKind::Flush => self.lower.flush().map_err(io),
            _ => return Decision::Continue,
        };
        match done {
            Ok(()) => Decision::Complete,
            Err(e) => {
                self.lower.log(interceptor_sdk::LogLevel::Warn, &e);
                Decision::Fail
            }
        }
    }

    fn stats(&self) -> serde_json::Value {
        let mapped = self.map.lock().map_or(0, |m| m.next_free);
        serde_json::json!({
            "logical_sectors": self.logical,
            "data_start_sector": self.data_start,
            "mapped_sectors": mapped,
            "reads": self.reads.load(Relaxed),
            "writes": self.writes.load(Relaxed),
            "runs": self.runs.load(Relaxed),
        })
    }

    fn capacity(&self) -> Option<u64> {
        Some(self.logical * SECTOR)
    }
}

export_interceptor!(Remap);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits_the_disk() {
        for total in [2u64, 3, 129, 130, 131, 1000, 524_288] {
            let n = logical_sectors(total);
            assert!(1 + n.div_ceil(128) + n <= total, "{total}");
            assert!(
                1 + (n + 1).div_ceil(128) + n + 1 > total,
                "{total}: n is the largest"
            );
        }
    }

    #[test]
    fn runs_join_contiguous_slots_and_holes() {
        let entries = [3, 4, 5, 0, 0, 9, 2];
        assert_eq!(
            Remap::runs(&entries, 0, 7),
            vec![
                (0, 3, Some(2)),
                (3, 2, None),
                (5, 1, Some(8)),
                (6, 1, Some(1))
            ]
        );
    }
}
