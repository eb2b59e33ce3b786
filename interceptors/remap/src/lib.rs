//! The remapping interceptor: the proof that a plugin can own the layout below it, as
//! compression and deduplication will. Each 512-byte sector the guest writes is stored in
//! a free slot of a data region (on a fresh layout, the next one, in the order sectors are
//! first written); a map in a metadata region the plugin owns says where each one went. It
//! does all its I/O itself through "the layers below" and completes every read and write at
//! the pre point.
//!
//! On-disk format, version 2 (all little-endian), on a disk of `S` sectors:
//!
//! | sector | contents |
//! | --- | --- |
//! | 0 | header: `b"VMMREMAP"`, version `u32` = 2, `u32` 0, logical sectors `n: u64`, first data sector `d: u64`, zeros to the end of the sector |
//! | 1 .. d | the map: `n` `u64`s, 64 per sector; entry `i` is 0 (never written: reads as zeros) or slot+1; the rest of the last map sector is zeros |
//! | d .. d+n | the data slots: slot `s` is sector `d + s` |
//!
//! The guest sees `n` sectors, `n` being the largest with `1 + ceil(n/64) + n <= S`, and
//! `d = 1 + ceil(n/64)`. Version 1 had `u32` map entries (128 per sector), which overflow
//! past 2 TiB; this plugin refuses a version-1 disk (re-create it).
//!
//! Opening: a disk whose first 8 bytes are the magic must hold a valid header for its size
//! (every field is checked, and named when wrong) and a valid map (no entry past the data
//! region, no slot used by two sectors); anything else is refused, never reformatted. A
//! disk without the magic is formatted only if it is blank, every byte zero (the data slots
//! are part of the format too: an unpartitioned ext4 filesystem has zeros in its first 1024
//! bytes), or if the instance's config says `format = true`: then the map region is zeroed
//! before the header is written, destroying what the disk held.
//!
//! Disabled, the plugin stays in the path and keeps remapping: the layout is its own.
//! A first write of a sector puts its data in the slot and flushes before it writes the map
//! entry that points there, so a crash leaves a sector old or new, never a slot's earlier
//! contents. Slots no durable map entry points at (a crash lost the entry) are reused.

use interceptor_sdk::{
    abi, export_interceptor, CreateContext, Decision, Interceptor, LogLevel, Lower, Request,
    RequestKind, Slot,
};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

const SECTOR: u64 = abi::SECTOR_SIZE;
const MAGIC: &[u8; 8] = b"VMMREMAP";
const VERSION: u32 = 2;
const ENTRY_BYTES: u64 = 8;
const ENTRIES_PER_SECTOR: u64 = SECTOR / ENTRY_BYTES;
/// Metadata is read and zeroed in pieces of this many bytes.
const PIECE: u64 = 1 << 20;

/// The instance's config.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Format a disk that is neither blank nor a remap layout, destroying what it holds.
    #[serde(default)]
    format: bool,
}

/// Where the layout's parts are on a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    /// Sectors of the disk.
    total: u64,
    /// Logical sectors the guest sees, and data slots.
    logical: u64,
    /// First data sector (the map is sectors 1 .. data_start).
    data_start: u64,
}

impl Geometry {
    /// The layout of a disk of `total` sectors: the largest `n` with
    /// `1 + ceil(n/64) + n <= total`. None when not even one sector fits.
    fn for_disk(total: u64) -> Option<Geometry> {
        let after_header = total.checked_sub(1)?;
        let fits = |n: u64| {
            n.div_ceil(ENTRIES_PER_SECTOR)
                .checked_add(n)
                .is_some_and(|used| used <= after_header)
        };
        // n <= 64/65 of the sectors after the header, computed without overflow; the loop
        // takes off the rounding.
        let per = ENTRIES_PER_SECTOR + 1;
        let mut n =
            after_header / per * ENTRIES_PER_SECTOR + after_header % per * ENTRIES_PER_SECTOR / per;
        while n > 0 && !fits(n) {
            n -= 1;
        }
        if n == 0 {
            return None;
        }
        Some(Geometry {
            total,
            logical: n,
            data_start: 1 + n.div_ceil(ENTRIES_PER_SECTOR),
        })
    }

    /// Byte offset of data slot `slot`.
    fn slot_offset(&self, slot: u64) -> Option<u64> {
        self.data_start.checked_add(slot)?.checked_mul(SECTOR)
    }

    /// Byte offset of map sector `k` (the one holding entries `64k .. 64k+64`).
    fn map_sector_offset(k: u64) -> Option<u64> {
        k.checked_add(1)?.checked_mul(SECTOR)
    }

    /// Bytes of the map region.
    fn map_bytes(&self) -> u64 {
        // data_start <= total and total * SECTOR is the disk's capacity.
        (self.data_start - 1) * SECTOR
    }

    /// The header sector of this layout.
    fn header(&self) -> Vec<u8> {
        let mut h = vec![0u8; SECTOR as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&self.logical.to_le_bytes());
        h[24..32].copy_from_slice(&self.data_start.to_le_bytes());
        h
    }

    /// Checks a header sector that starts with the magic against this layout; what is
    /// wrong, in words, naming the field and both values.
    fn check_header(&self, h: &[u8]) -> Result<(), String> {
        let u32_at = |at: usize| {
            h.get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_le_bytes)
        };
        let u64_at = |at: usize| {
            h.get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        let version = u32_at(8);
        if version == 1 {
            return Err(
                "the disk holds a remap layout of version 1 (32-bit map entries, which \
                 overflow past 2 TiB), which this plugin no longer opens: re-create the disk \
                 (remap is an example plugin; copy its data out with the release that wrote it \
                 first if you need it)"
                    .into(),
            );
        }
        if version != VERSION {
            return Err(format!(
                "header field version is {version}, this plugin reads version {VERSION}: the \
                 header is damaged or was written by another release"
            ));
        }
        let logical = u64_at(16);
        if logical != self.logical {
            return Err(format!(
                "header says {logical} logical sectors, a disk of {} sectors has {}: the header \
                 is damaged or the disk was resized",
                self.total, self.logical
            ));
        }
        let data_start = u64_at(24);
        if data_start != self.data_start {
            return Err(format!(
                "header field data start is sector {data_start}, a layout of {} logical sectors \
                 has it at sector {}: the header is damaged",
                self.logical, self.data_start
            ));
        }
        let reserved = (12..16).chain(32..h.len()).find(|&i| h[i] != 0);
        if let Some(i) = reserved {
            return Err(format!(
                "header byte {i} is not zero (it is reserved): the header is damaged"
            ));
        }
        Ok(())
    }
}

/// The map in memory: one entry per logical sector, and which slots are taken.
#[derive(Debug)]
struct Map {
    /// slot + 1 per logical sector; 0 = never written.
    entries: Vec<u64>,
    /// One bit per slot: some entry points at it.
    used: Vec<u64>,
    /// Sectors with a slot.
    mapped: u64,
    /// Where the search for a free slot starts.
    cursor: u64,
}

/// A vector of `n` zeros, or an error if memory for it cannot be had.
fn zeros(n: u64, what: &str) -> Result<Vec<u64>, String> {
    let len =
        usize::try_from(n).map_err(|_| format!("{what}: {n} entries do not fit in memory"))?;
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        format!(
            "{what}: cannot allocate {len} entries ({} bytes)",
            len.saturating_mul(8)
        )
    })?;
    v.resize(len, 0);
    Ok(v)
}

impl Map {
    /// A map of `logical` sectors, none written.
    fn empty(logical: u64) -> Result<Map, String> {
        Ok(Map {
            entries: zeros(logical, "the map")?,
            used: zeros(logical.div_ceil(64), "the slot bitmap")?,
            mapped: 0,
            cursor: 0,
        })
    }

    fn is_used(&self, slot: u64) -> bool {
        self.used
            .get((slot / 64) as usize)
            .is_some_and(|w| w & (1 << (slot % 64)) != 0)
    }

    fn set_used(&mut self, slot: u64, on: bool) {
        if let Some(w) = self.used.get_mut((slot / 64) as usize) {
            if on {
                *w |= 1 << (slot % 64);
            } else {
                *w &= !(1 << (slot % 64));
            }
        }
    }

    /// Records entry `value` (as read from the disk) for logical sector `sector`; refuses
    /// one past the data region or one naming a slot another sector has.
    fn load(&mut self, sector: u64, value: u64) -> Result<(), String> {
        let Some(slot) = value.checked_sub(1) else {
            return Ok(());
        };
        let n = self.entries.len() as u64;
        if slot >= n {
            return Err(format!(
                "the map entry of logical sector {sector} points at slot {slot}, past the data \
                 region of {n} slots: corrupt metadata"
            ));
        }
        if self.is_used(slot) {
            let other = self.entries.iter().position(|&e| e == value).unwrap_or(0);
            return Err(format!(
                "logical sectors {other} and {sector} both point at slot {slot}: corrupt metadata"
            ));
        }
        let Some(e) = self.entries.get_mut(sector as usize) else {
            return Err(format!("logical sector {sector} is past the map"));
        };
        *e = value;
        self.set_used(slot, true);
        self.mapped += 1;
        Ok(())
    }

    /// A free slot, taken: the first one from the cursor on, wrapping around.
    fn alloc(&mut self) -> Option<u64> {
        let n = self.entries.len() as u64;
        let start = self.cursor.min(n);
        let find = |from: u64, to: u64| {
            let mut s = from;
            while s < to {
                let word = self.used[(s / 64) as usize] | ((1u64 << (s % 64)) - 1);
                if word == u64::MAX {
                    s = (s / 64 + 1) * 64;
                    continue;
                }
                let free = (s / 64) * 64 + u64::from(word.trailing_ones());
                return (free < to).then_some(free);
            }
            None
        };
        let slot = find(start, n).or_else(|| find(0, start))?;
        self.set_used(slot, true);
        self.cursor = slot + 1;
        Some(slot)
    }

    /// Gives back slot `slot` of sector `sector` (an allocation whose write failed).
    fn free(&mut self, sector: u64, slot: u64) {
        if let Some(e) = self.entries.get_mut(sector as usize) {
            *e = 0;
        }
        self.set_used(slot, false);
        self.mapped -= 1;
    }

    /// Map sector `k` as it goes on the disk.
    fn sector_bytes(&self, k: u64) -> Vec<u8> {
        let mut buf = vec![0u8; SECTOR as usize];
        let from = (k * ENTRIES_PER_SECTOR) as usize;
        let to = (from + ENTRIES_PER_SECTOR as usize).min(self.entries.len());
        if let Some(entries) = self.entries.get(from..to) {
            for (chunk, e) in buf.chunks_exact_mut(ENTRY_BYTES as usize).zip(entries) {
                chunk.copy_from_slice(&e.to_le_bytes());
            }
        }
        buf
    }
}

pub struct Remap {
    lower: Lower,
    geo: Geometry,
    map: Mutex<Map>,
    reads: AtomicU64,
    writes: AtomicU64,
    runs: AtomicU64,
}

fn io(e: interceptor_sdk::IoError) -> String {
    e.to_string()
}

/// Consecutive runs of the request's sectors: (first logical index in the request, count,
/// first slot or None when unmapped).
fn runs(entries: &[u64], first: u64, count: u64) -> Result<Vec<(u64, u64, Option<u64>)>, String> {
    let mut out: Vec<(u64, u64, Option<u64>)> = Vec::new();
    for i in 0..count {
        let e = first
            .checked_add(i)
            .and_then(|s| entries.get(usize::try_from(s).ok()?))
            .ok_or("sector past the map")?;
        let slot = e.checked_sub(1);
        match out.last_mut() {
            Some((start, n, Some(s)))
                if slot.is_some() && s.checked_add(*n) == slot && *start + *n == i =>
            {
                *n += 1
            }
            Some((start, n, None)) if slot.is_none() && *start + *n == i => *n += 1,
            _ => out.push((i, 1, slot)),
        }
    }
    Ok(out)
}

/// A byte count as a buffer length.
fn len(bytes: u64) -> Result<usize, String> {
    usize::try_from(bytes).map_err(|_| format!("{bytes} bytes do not fit in memory"))
}

impl Remap {
    /// Formats the disk: with `clear`, zeroes the map region first (it may hold anything);
    /// then writes the header. Each step is flushed before the next, so a crash leaves
    /// either no layout (no magic) or this one with an empty map.
    fn format(lower: &Lower, geo: &Geometry, clear: bool) -> Result<(), String> {
        if clear {
            let zero = vec![0u8; PIECE as usize];
            let mut at = SECTOR;
            let end = SECTOR + geo.map_bytes();
            while at < end {
                let n = (end - at).min(PIECE);
                lower.write(at, &zero[..n as usize]).map_err(io)?;
                at += n;
            }
            lower.flush().map_err(io)?;
        }
        lower.write(0, &geo.header()).map_err(io)?;
        lower.flush().map_err(io)
    }

    /// Reads and checks the map of an existing layout.
    fn load_map(lower: &Lower, geo: &Geometry) -> Result<Map, String> {
        let mut map = Map::empty(geo.logical)?;
        let mut buf = vec![0u8; PIECE as usize];
        let (mut at, end) = (SECTOR, SECTOR + geo.map_bytes());
        let mut sector = 0u64;
        while at < end && sector < geo.logical {
            let n = (end - at).min(PIECE);
            let piece = &mut buf[..n as usize];
            lower.read(at, piece).map_err(io)?;
            for raw in piece.chunks_exact(ENTRY_BYTES as usize) {
                if sector >= geo.logical {
                    break;
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(raw);
                map.load(sector, u64::from_le_bytes(b))?;
                sector += 1;
            }
            at += n;
        }
        Ok(map)
    }

    fn read(&self, req: &mut Request<'_>, first: u64, count: u64) -> Result<(), String> {
        let map = self.map.lock().map_err(|_| "map lock poisoned")?;
        for (at, n, slot) in runs(&map.entries, first, count)? {
            let mut buf = vec![0u8; len(n * SECTOR)?];
            if let Some(s) = slot {
                let offset = self.geo.slot_offset(s).ok_or("slot offset overflows")?;
                self.lower.read(offset, &mut buf).map_err(io)?;
            }
            req.write_data(at * SECTOR, &buf)
                .map_err(|e| format!("{e:?}"))?;
            self.runs.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    fn write(&self, req: &mut Request<'_>, first: u64, count: u64) -> Result<(), String> {
        let mut data = vec![0u8; len(count * SECTOR)?];
        req.read_data(0, &mut data).map_err(|e| format!("{e:?}"))?;
        let mut map = self.map.lock().map_err(|_| "map lock poisoned")?;
        // Slots for the sectors written for the first time.
        let mut fresh: Vec<(u64, u64)> = Vec::new();
        for i in first..first + count {
            if map.entries[i as usize] != 0 {
                continue;
            }
            let Some(slot) = map.alloc() else {
                for &(s, slot) in &fresh {
                    map.free(s, slot);
                }
                return Err("no free slot: the map is inconsistent".into());
            };
            map.entries[i as usize] = slot + 1;
            map.mapped += 1;
            fresh.push((i, slot));
        }
        // Data first, made durable when it lands in new slots, then the map entries that
        // point at it: a crash never leaves an entry pointing at a slot's old contents.
        let data_written = (|| {
            for (at, n, slot) in runs(&map.entries, first, count)? {
                let slot = slot.ok_or("unmapped sector after allocation")?;
                let bytes = &data[len(at * SECTOR)?..len((at + n) * SECTOR)?];
                let offset = self.geo.slot_offset(slot).ok_or("slot offset overflows")?;
                self.lower.write(offset, bytes).map_err(io)?;
                self.runs.fetch_add(1, Relaxed);
            }
            if !fresh.is_empty() {
                self.lower.flush().map_err(io)?;
            }
            Ok::<(), String>(())
        })();
        if let Err(e) = data_written {
            // Nothing on the disk points at the new slots yet: give them back.
            for &(s, slot) in &fresh {
                map.free(s, slot);
            }
            return Err(e);
        }
        let mut dirty: Vec<u64> = fresh.iter().map(|&(s, _)| s / ENTRIES_PER_SECTOR).collect();
        dirty.dedup();
        for k in dirty {
            let offset = Geometry::map_sector_offset(k).ok_or("map offset overflows")?;
            self.lower.write(offset, &map.sector_bytes(k)).map_err(io)?;
        }
        Ok(())
    }
}

impl Interceptor for Remap {
    const NAME: &'static std::ffi::CStr = c"remap";
    const FLAGS: u32 = abi::F_KEEP_WHEN_DISABLED | abi::F_OWNS_FORMAT;

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let cfg: Config = ctx.config_as()?;
        let lower = ctx.lower;
        let total = lower.capacity() / SECTOR;
        let geo = Geometry::for_disk(total)
            .ok_or_else(|| format!("a disk of {total} sectors is too small to remap"))?;
        let mut head = vec![0u8; SECTOR as usize];
        lower.read(0, &mut head).map_err(io)?;
        let map = if head.starts_with(MAGIC) {
            // A remap layout, valid or damaged: never formatted over.
            geo.check_header(&head)?;
            Remap::load_map(&lower, &geo)?
        } else {
            match lower.first_nonzero(0, total * SECTOR).map_err(io)? {
                None => Remap::format(&lower, &geo, false)?,
                Some(at) if cfg.format => {
                    lower.log(
                        LogLevel::Warn,
                        &format!(
                            "format = true: formatting a disk that is not blank (byte {at} is \
                             not zero); what it held is lost"
                        ),
                    );
                    Remap::format(&lower, &geo, true)?;
                }
                Some(at) => {
                    return Err(format!(
                        "the disk is not blank (byte {at} is not zero) and holds no remap \
                         layout; set format = true in the instance's config to format it, \
                         destroying what it holds"
                    ))
                }
            }
            Map::empty(geo.logical)?
        };
        Ok(Remap {
            lower,
            geo,
            map: Mutex::new(map),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            runs: AtomicU64::new(0),
        })
    }

    fn pre(&self, req: &mut Request<'_>, _: &mut Slot) -> Decision {
        let (first, count) = (req.offset() / SECTOR, req.len() / SECTOR);
        if first
            .checked_add(count)
            .is_none_or(|end| end > self.geo.logical)
        {
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
                self.lower.log(LogLevel::Warn, &e);
                Decision::Fail
            }
        }
    }

    fn stats(&self) -> serde_json::Value {
        let mapped = self.map.lock().map_or(0, |m| m.mapped);
        serde_json::json!({
            "logical_sectors": self.geo.logical,
            "data_start_sector": self.geo.data_start,
            "mapped_sectors": mapped,
            "reads": self.reads.load(Relaxed),
            "writes": self.writes.load(Relaxed),
            "runs": self.runs.load(Relaxed),
        })
    }

    fn capacity(&self) -> Option<u64> {
        Some(self.geo.logical * SECTOR)
    }
}

export_interceptor!(Remap);

#[cfg(test)]
mod tests;
