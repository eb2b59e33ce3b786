//! Guest blocks over a store: reading a block whatever its codec (a hole, raw, or one block
//! of a zstd extent, decoded once and kept in a small cache), checking it, and the request
//! helpers both plugins share (whole new blocks for a write, read-modify-write of partial
//! ones).

use crate::format::{Codec, Entry};
use crate::{block_check, Device, SectorChanges, Store, StoreError, BLOCK};
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::Arc;

/// Decoded extents kept (64 KiB each at most).
const DECODED_EXTENTS: usize = 64;

pub struct Volume<D: Device> {
    pub store: Store<D>,
    decoded: LruCache<u64, Arc<Vec<u8>>>,
    decompressor: zstd::bulk::Decompressor<'static>,
    /// Blocks whose stored bytes did not match their check (each read failed).
    pub check_failures: u64,
    /// Extents decoded from zstd (cache misses).
    pub extents_decoded: u64,
}

/// True when every byte is zero.
pub fn is_zero(b: &[u8]) -> bool {
    // OR-folding vectorizes; most blocks are not zero and fail on the first chunk anyway.
    b.chunks(64).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

impl<D: Device> Volume<D> {
    pub fn new(store: Store<D>) -> Result<Volume<D>, StoreError> {
        Ok(Volume {
            store,
            decoded: LruCache::new(NonZeroUsize::new(DECODED_EXTENTS).unwrap_or(NonZeroUsize::MIN)),
            decompressor: zstd::bulk::Decompressor::new()
                .map_err(|e| StoreError::Io(format!("zstd: {e}")))?,
            check_failures: 0,
            extents_decoded: 0,
        })
    }

    /// The contents of guest block `block` (zeroes for a hole). A block whose bytes do not
    /// match its check, or an extent that does not decode, is an error, never data.
    pub fn read_block(&mut self, block: u64) -> Result<Vec<u8>, StoreError> {
        let e = self.store.entry(block)?;
        let Entry::Stored {
            sector,
            index,
            codec,
            check,
            ..
        } = e
        else {
            return Ok(vec![0u8; BLOCK as usize]);
        };
        let data = match codec {
            Codec::Raw => {
                let mut buf = vec![0u8; BLOCK as usize];
                self.store
                    .read_extent_part(sector, u64::from(index) * BLOCK, &mut buf)?;
                buf
            }
            Codec::Zstd => {
                let extent = self.decoded_extent(&e)?;
                let at = usize::from(index) * BLOCK as usize;
                match extent.get(at..at + BLOCK as usize) {
                    Some(b) => b.to_vec(),
                    None => {
                        self.check_failures += 1;
                        return Err(StoreError::Damaged(format!(
                            "block {block}: its extent at sector {sector} holds no block {index}"
                        )));
                    }
                }
            }
        };
        if block_check(self.store.key(), &data) != check {
            self.check_failures += 1;
            self.decoded.pop(&sector);
            return Err(StoreError::Damaged(format!(
                "block {block}: the stored bytes do not match its check"
            )));
        }
        Ok(data)
    }

    fn decoded_extent(&mut self, e: &Entry) -> Result<Arc<Vec<u8>>, StoreError> {
        let Entry::Stored { sector, .. } = *e else {
            return Ok(Arc::new(Vec::new()));
        };
        if let Some(d) = self.decoded.get(&sector) {
            return Ok(d.clone());
        }
        let stored = self.store.read_extent(e)?;
        let capacity = (crate::MAX_EXTENT_BLOCKS * BLOCK) as usize;
        let d = self
            .decompressor
            .decompress(&stored, capacity)
            .map_err(|err| {
                self.check_failures += 1;
                StoreError::Damaged(format!(
                    "the extent at sector {sector} does not decode: {err}"
                ))
            })?;
        self.extents_decoded += 1;
        let d = Arc::new(d);
        self.decoded.put(sector, d.clone());
        Ok(d)
    }

    /// After changes to the map: forgets decoded extents whose sectors were freed or
    /// written over, and returns those sectors ([`Store::take_sector_changes`]).
    pub fn forget_changed(&mut self) -> SectorChanges {
        let changes = self.store.take_sector_changes();
        for s in changes.all() {
            self.decoded.pop(&s);
        }
        changes
    }

    /// The whole blocks a write of `len` bytes at `offset` leaves: the first block's number
    /// and each block's new contents, the parts the write does not cover read from the
    /// store (`fill(at, buf)` copies the write's bytes from `at` into `buf`).
    pub fn merged_blocks(
        &mut self,
        offset: u64,
        len: u64,
        mut fill: impl FnMut(u64, &mut [u8]) -> Result<(), StoreError>,
        partial_blocks: &mut u64,
    ) -> Result<(u64, Vec<Vec<u8>>), StoreError> {
        let mut first = None;
        let mut blocks = Vec::new();
        for p in interceptor_sdk::block_pieces(offset, len, BLOCK) {
            first.get_or_insert(p.block);
            let mut data = if p.is_whole(BLOCK) {
                vec![0u8; BLOCK as usize]
            } else {
                *partial_blocks += 1;
                self.read_block(p.block)?
            };
            fill(p.at, &mut data[p.range()])?;
            blocks.push(data);
        }
        Ok((first.unwrap_or(0), blocks))
    }
}

/// `(block, hole)` for each block from `first` whose `zero` flag is set: the shares that
/// make them holes in the same [`Store::update`] as the rest of the request.
pub fn holes_for(first: u64, zero: &[bool]) -> Vec<(u64, Entry)> {
    zero.iter()
        .enumerate()
        .filter(|(_, &z)| z)
        .map(|(i, _)| (first + i as u64, Entry::Hole))
        .collect()
}

impl<D: Device> Volume<D> {
    /// Every invariant of the store: its space against its map ([`Store::check_space`]),
    /// and every stored extent read from the device (not the cache), decoded, and each block
    /// that points into it matched against its check. Returns the problems (none: clean) and
    /// what was checked.
    pub fn check(&mut self) -> (Vec<String>, serde_json::Map<String, serde_json::Value>) {
        let mut problems = self.store.check_space();
        // Per extent (by sector): its entry, and (block, index, check) of each block in it.
        type Users = Vec<(u64, u8, u32)>;
        let mut refs: std::collections::BTreeMap<u64, (Entry, Users)> = Default::default();
        let walked = self.store.for_each_mapped(|block, e| {
            if let Entry::Stored {
                sector,
                index,
                check,
                ..
            } = e
            {
                refs.entry(sector)
                    .or_insert_with(|| (e, Vec::new()))
                    .1
                    .push((block, index, check));
            }
            Ok(())
        });
        if let Err(e) = walked {
            problems.push(format!("the map cannot be read: {e}"));
        }
        let mut blocks = 0u64;
        for (sector, (e, users)) in &refs {
            let decoded = self.store.read_extent(e).and_then(|stored| match e {
                Entry::Stored {
                    codec: Codec::Zstd, ..
                } => self
                    .decompressor
                    .decompress(&stored, (crate::MAX_EXTENT_BLOCKS * BLOCK) as usize)
                    .map_err(|err| StoreError::Damaged(format!("it does not decode: {err}"))),
                _ => Ok(stored),
            });
            let data = match decoded {
                Ok(d) => d,
                Err(err) => {
                    problems.push(format!(
                        "the extent at sector {sector} (blocks from {}): {err}",
                        users[0].0
                    ));
                    continue;
                }
            };
            for &(block, index, check) in users {
                blocks += 1;
                let at = usize::from(index) * BLOCK as usize;
                match data.get(at..at + BLOCK as usize) {
                    Some(b) if block_check(self.store.key(), b) == check => {}
                    Some(_) => problems.push(format!(
                        "block {block}: the stored bytes do not match its check"
                    )),
                    None => problems.push(format!(
                        "block {block}: its extent at sector {sector} holds no block {index}"
                    )),
                }
            }
        }
        let mut details = serde_json::Map::new();
        details.insert("format".into(), "extent-store".into());
        let (now, found) = self.store.format_version();
        details.insert("format_version".into(), now.into());
        if found != now {
            details.insert("upgraded_from_version".into(), found.into());
        }
        details.insert("blocks_checked".into(), blocks.into());
        details.insert("extents_checked".into(), (refs.len() as u64).into());
        if !self.store.recovered().is_empty() {
            // Damage the open worked around: nothing lost, but the image is not as written.
            details.insert("recovered".into(), self.store.recovered().into());
        }
        (problems, details)
    }
}

/// `a / b` to two decimals; 0 when `b` is 0.
pub fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        ((a as f64 / b as f64) * 100.0).round() / 100.0
    }
}

impl<D: Device> Volume<D> {
    /// What the store holds now (logical and physical bytes, by extent class, free and
    /// reclaimed space) and its counters, as the plugins' stats report them.
    pub fn stats_json(&self) -> serde_json::Value {
        let store = &self.store;
        let (mut zstd, mut raw) = ((0u64, 0u64), (0u64, 0u64));
        for (_, x) in store.space().iter_extents() {
            let class = if x.codec == Codec::Zstd as u8 {
                &mut zstd
            } else {
                &mut raw
            };
            class.0 += u64::from(x.refs);
            class.1 += u64::from(x.stored_len);
        }
        let st = store.stats();
        let logical = store.mapped_blocks() * BLOCK;
        let physical = (store.space().units() - store.space().free_units()) * BLOCK;
        serde_json::json!({
            "format": "extent-store",
            "format_version": store.format_version().0,
            "found_as_version": store.format_version().1,
            "logical_bytes": logical,
            "physical_bytes": physical,
            "ratio": ratio(logical, physical),
            "capacity_bytes": store.logical_blocks() * BLOCK,
            "free_bytes": store.free_bytes(),
            "held_bytes": store.space().held_units() * BLOCK,
            "unique_extents": store.space().extents(),
            "zstd_blocks": zstd.0,
            "zstd_stored_bytes": zstd.1,
            "zstd_ratio": ratio(zstd.0 * BLOCK, zstd.1),
            "raw_blocks": raw.0,
            "raw_stored_bytes": raw.1,
            "reclaimed_bytes": st.units_reclaimed * BLOCK,
            "discarded_below_bytes": st.units_discarded * BLOCK,
            "commits": st.commits,
            "journal_blocks_written": st.journal_blocks_written,
            "checkpoints": st.checkpoints,
            "no_space_errors": st.no_space,
            "check_failures": self.check_failures,
            "extents_decoded": self.extents_decoded,
        })
    }
}
