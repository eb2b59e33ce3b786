//! The map of guest blocks to entries (docs/store.md, "The map"). Format 3 keeps it on disk
//! in pages of [`PAGE_ENTRIES`] entries, each page with two slots, and a directory (8 bytes
//! per page) naming the slot and checkpoint of each page's durable copy. In memory: the
//! directory, every entry changed since the last checkpoint (at most what the journal
//! holds), and a cache of pages read. A checkpoint writes only the pages that changed, each
//! to the slot the directory does not name, then the directory. Before format 3 the whole
//! map was in each checkpoint; such a store's map is held whole in `changed`.

use super::io;
use crate::format::{
    decode_dir_entry, decode_page, encode_checkpoint_header, encode_dir_entry, encode_page,
    verify_checkpoint, Entry, Geometry, Superblock, DIR_ENTRY_BYTES, ENTRY_BYTES, PAGE_ENTRIES,
};
use crate::{Device, StoreError, BLOCK};
use lru::LruCache;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::num::NonZeroUsize;

/// Hashes a block or page number with one multiplication (Fibonacci hashing): the keys
/// are the store's own numbers, not an attacker's choice of strings, and SipHash cost a
/// measurable part of every read.
#[derive(Clone, Copy, Default)]
pub(crate) struct NumberHasher(u64);

impl std::hash::Hasher for NumberHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub(crate) type NumberHash = std::hash::BuildHasherDefault<NumberHasher>;

/// Pages kept decoded in memory: 2,048 pages (about 12 MiB) map 2 GiB of guest space.
const CACHED_PAGES: usize = 2048;
/// Pages read at once when every page is visited (an open, a check): both slots of each.
const PAGES_PER_READ: u64 = 64;

pub(super) struct Map {
    g: Geometry,
    /// The key of the pages' checks.
    key: [u8; 32],
    /// Per page: `(seq, slot)` of its durable copy as a directory entry encodes it (0: a
    /// page never written).
    dir: Vec<u64>,
    /// Entries changed since the last checkpoint (format 3), or the whole map's stored
    /// entries (before: no pages).
    changed: BTreeMap<u64, Entry>,
    cache: RefCell<LruCache<u64, Box<[Entry]>, NumberHash>>,
    /// Blocks that are not holes.
    mapped: u64,
}

/// What a checkpoint wrote, to take effect once the superblock naming it is durable: each
/// page, its directory entry, and its entries.
pub(super) struct Written {
    pages: Vec<WrittenPage>,
}

type WrittenPage = (u64, u64, Box<[Entry]>);

fn damaged(why: String) -> StoreError {
    StoreError::Damaged(why)
}

impl Map {
    /// The map of a store just formatted: every block a hole.
    pub(super) fn empty(g: Geometry, key: [u8; 32]) -> Map {
        Map {
            g,
            key,
            dir: vec![0; g.pages() as usize],
            changed: BTreeMap::new(),
            cache: RefCell::new(LruCache::with_hasher(
                NonZeroUsize::new(CACHED_PAGES).unwrap_or(NonZeroUsize::MIN),
                NumberHash::default(),
            )),
            mapped: 0,
        }
    }

    /// The map as of the checkpoint the superblock names (the journal is replayed after).
    pub(super) fn load<D: Device>(
        dev: &D,
        sb: &Superblock,
        key: [u8; 32],
    ) -> Result<Map, StoreError> {
        let g = sb.geometry;
        let mut m = Map::empty(g, key);
        if sb.checkpoint_seq == 0 {
            // Formatted, never checkpointed: every block a hole (and the journal).
            return Ok(m);
        }
        let len = if g.paged {
            g.pages() * DIR_ENTRY_BYTES
        } else {
            g.logical_blocks * ENTRY_BYTES as u64
        };
        let len = usize::try_from(len).map_err(|_| damaged("logical size too large".into()))?;
        let start = g.slot_start(sb.checkpoint_slot) * BLOCK;
        let mut header = vec![0u8; BLOCK as usize];
        io(dev.read(start, &mut header), "reading the checkpoint")?;
        let mut raw = vec![0u8; len.next_multiple_of(BLOCK as usize)];
        io(dev.read(start + BLOCK, &mut raw), "reading the checkpoint")?;
        verify_checkpoint(&header, sb.checkpoint_seq, &raw[..len]).map_err(damaged)?;
        if g.paged {
            for (p, c) in raw[..len].chunks(8).enumerate() {
                let v = u64::from_le_bytes(c.try_into().unwrap_or_default());
                decode_dir_entry(v, sb.checkpoint_seq)
                    .map_err(|e| damaged(format!("page {p}: {e}")))?;
                m.dir[p] = v;
            }
            return Ok(m);
        }
        for (i, c) in raw[..len].chunks(ENTRY_BYTES).enumerate() {
            match Entry::decode(c) {
                Some(Entry::Hole) => {}
                Some(e) => {
                    m.changed.insert(i as u64, e);
                }
                None => return Err(damaged(format!("map entry {i} is not a valid entry"))),
            }
        }
        Ok(m)
    }

    /// Guest blocks that are not holes (counted by [`Map::count_mapped`] at open).
    pub(super) fn mapped(&self) -> u64 {
        self.mapped
    }

    pub(super) fn count_mapped(&mut self, n: u64) {
        self.mapped = n;
    }

    /// `(seq, slot)` of page `page`'s durable copy (validated at load).
    fn at(&self, page: u64) -> Option<(u64, u8)> {
        let v = *self.dir.get(page as usize)?;
        (v != 0).then_some((v >> 1, (v & 1) as u8))
    }

    fn check_range(&self, block: u64) -> Result<(), StoreError> {
        if block < self.g.logical_blocks {
            Ok(())
        } else {
            Err(StoreError::Range(block))
        }
    }

    /// Block `block`'s entry, from its page as it is now (the cache holds pages with the
    /// entries changed since the checkpoint applied, so a read is one hash lookup).
    pub(super) fn get<D: Device>(&self, dev: &D, block: u64) -> Result<Entry, StoreError> {
        self.check_range(block)?;
        let page = block / PAGE_ENTRIES;
        let i = (block % PAGE_ENTRIES) as usize;
        if let Some(p) = self.cache.borrow_mut().get(&page) {
            return Ok(p[i]);
        }
        let entries = self.current_page(dev, page)?;
        let e = entries[i];
        self.cache.borrow_mut().put(page, entries);
        Ok(e)
    }

    /// Page `page` as it is now: its durable copy (holes if it has none) with the entries
    /// changed since the checkpoint.
    fn current_page<D: Device>(&self, dev: &D, page: u64) -> Result<Box<[Entry]>, StoreError> {
        let mut entries = match self.at(page) {
            Some(at) => self.read_page(dev, page, at)?,
            None => vec![Entry::Hole; PAGE_ENTRIES as usize].into_boxed_slice(),
        };
        let first = page * PAGE_ENTRIES;
        for (&b, &e) in self.changed.range(first..first + PAGE_ENTRIES) {
            entries[(b - first) as usize] = e;
        }
        Ok(entries)
    }

    /// Whether page `page` may hold an entry: written by a checkpoint, or changed since.
    fn may_hold(&self, page: u64) -> bool {
        let first = page * PAGE_ENTRIES;
        self.at(page).is_some()
            || self
                .changed
                .range(first..first + PAGE_ENTRIES)
                .next()
                .is_some()
    }

    fn read_page<D: Device>(
        &self,
        dev: &D,
        page: u64,
        (seq, slot): (u64, u8),
    ) -> Result<Box<[Entry]>, StoreError> {
        let mut b = vec![0u8; BLOCK as usize];
        io(
            dev.read(self.g.page_block(page, slot) * BLOCK, &mut b),
            "reading a map page",
        )?;
        Ok(decode_page(&self.key, &b, page, seq)
            .map_err(damaged)?
            .into_boxed_slice())
    }

    /// Sets block `block`'s entry (in range: the caller read its old one).
    pub(super) fn put(&mut self, block: u64, old: Entry, e: Entry) {
        if let Some(p) = self.cache.get_mut().peek_mut(&(block / PAGE_ENTRIES)) {
            p[(block % PAGE_ENTRIES) as usize] = e;
        }
        if self.g.paged {
            self.changed.insert(block, e);
        } else if e == Entry::Hole {
            self.changed.remove(&block);
        } else {
            self.changed.insert(block, e);
        }
        match (old == Entry::Hole, e == Entry::Hole) {
            (true, false) => self.mapped += 1,
            (false, true) => self.mapped = self.mapped.saturating_sub(1),
            _ => {}
        }
    }

    /// A journal record applied at open, before anything is counted.
    pub(super) fn replay(&mut self, block: u64, e: Entry) -> Result<(), ()> {
        self.check_range(block).map_err(|_| ())?;
        self.put(block, Entry::Hole, e);
        Ok(())
    }

    /// Calls `f` with every block that is not a hole, in order, and its entry. Pages are
    /// read in runs and not kept (a visit of every page does not empty the cache).
    pub(super) fn for_each<D: Device>(
        &self,
        dev: &D,
        mut f: impl FnMut(u64, Entry) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut pending = self.changed.iter().peekable();
        let mut emit_changed_below = |end: u64,
                                      f: &mut dyn FnMut(u64, Entry) -> Result<(), StoreError>|
         -> Result<(), StoreError> {
            while let Some((&b, &e)) = pending.next_if(|(&b, _)| b < end) {
                if e != Entry::Hole {
                    f(b, e)?;
                }
            }
            Ok(())
        };
        let pages = self.dir.len() as u64;
        let mut p = 0;
        while p < pages {
            if self.dir[p as usize] == 0 {
                p += 1;
                continue;
            }
            // A run of written pages, read as one.
            let mut end = p + 1;
            while end < pages && end - p < PAGES_PER_READ && self.dir[end as usize] != 0 {
                end += 1;
            }
            let mut raw = vec![0u8; ((end - p) * 2 * BLOCK) as usize];
            io(
                dev.read(self.g.page_block(p, 0) * BLOCK, &mut raw),
                "reading the map's pages",
            )?;
            for page in p..end {
                let Some((seq, slot)) = self.at(page) else {
                    continue;
                };
                let at = ((2 * (page - p) + u64::from(slot)) * BLOCK) as usize;
                let entries = decode_page(&self.key, &raw[at..at + BLOCK as usize], page, seq)
                    .map_err(damaged)?;
                for (i, e) in entries.into_iter().enumerate() {
                    let block = page * PAGE_ENTRIES + i as u64;
                    emit_changed_below(block, &mut f)?;
                    if self.changed.contains_key(&block) {
                        continue;
                    }
                    if e != Entry::Hole && block < self.g.logical_blocks {
                        f(block, e)?;
                    }
                }
            }
            p = end;
        }
        emit_changed_below(u64::MAX, &mut f)
    }

    /// Blocks from `first` to `end` that are not holes, with their entries.
    pub(super) fn mapped_in<D: Device>(
        &self,
        dev: &D,
        first: u64,
        end: u64,
    ) -> Result<Vec<(u64, Entry)>, StoreError> {
        let mut blocks = Vec::new();
        if first >= end {
            return Ok(blocks);
        }
        for page in first / PAGE_ENTRIES..=(end - 1) / PAGE_ENTRIES {
            if !self.may_hold(page) {
                continue;
            }
            let from = (page * PAGE_ENTRIES).max(first);
            let to = ((page + 1) * PAGE_ENTRIES).min(end);
            for b in from..to {
                let e = self.get(dev, b)?;
                if e != Entry::Hole {
                    blocks.push((b, e));
                }
            }
        }
        Ok(blocks)
    }

    /// Block `block`'s entry where memory holds it (changed since the checkpoint, or any
    /// block of a store without pages): then reading it cannot fail.
    pub(super) fn in_memory(&self, block: u64) -> Option<Entry> {
        match self.changed.get(&block) {
            Some(e) => Some(*e),
            None => (!self.g.paged && block < self.g.logical_blocks).then_some(Entry::Hole),
        }
    }

    /// Writes checkpoint `seq` of the map to checkpoint slot `slot`: format 3 writes each
    /// page that changed to the slot its durable copy is not in, then the directory naming
    /// them; before, the whole map. Nothing changes in memory until [`Map::finish`], after
    /// the superblock naming the checkpoint is durable.
    pub(super) fn write_checkpoint<D: Device>(
        &self,
        dev: &D,
        seq: u64,
        slot: u8,
    ) -> Result<Written, StoreError> {
        let mut written = Written { pages: Vec::new() };
        let raw = if self.g.paged {
            let mut dir = self.dir.clone();
            let mut changed = self.changed.iter().peekable();
            while let Some((&b, _)) = changed.peek() {
                let page = b / PAGE_ENTRIES;
                let cached = self.cache.borrow().peek(&page).cloned();
                let entries = match cached {
                    Some(p) => p,
                    None => self.current_page(dev, page)?,
                };
                while changed
                    .next_if(|(&b, _)| b / PAGE_ENTRIES == page)
                    .is_some()
                {}
                let to = self.at(page).map_or(0, |(_, s)| 1 - s);
                io(
                    dev.write(
                        self.g.page_block(page, to) * BLOCK,
                        &encode_page(&self.key, page, seq, &entries),
                    ),
                    "writing a map page",
                )?;
                let at = encode_dir_entry(Some((seq, to)));
                dir[page as usize] = at;
                written.pages.push((page, at, entries));
            }
            let mut raw = Vec::with_capacity(dir.len() * 8);
            for v in &dir {
                raw.extend_from_slice(&v.to_le_bytes());
            }
            raw
        } else {
            let mut raw = vec![0u8; self.g.logical_blocks as usize * ENTRY_BYTES];
            for (&b, e) in &self.changed {
                let at = b as usize * ENTRY_BYTES;
                raw[at..at + ENTRY_BYTES].copy_from_slice(&e.encode());
            }
            raw
        };
        let header = encode_checkpoint_header(seq, &raw);
        let start = self.g.slot_start(slot) * BLOCK;
        io(dev.write(start, &header), "writing the checkpoint")?;
        let mut raw = raw;
        raw.resize(raw.len().next_multiple_of(BLOCK as usize), 0);
        for (k, piece) in raw.chunks(1 << 20).enumerate() {
            io(
                dev.write(start + BLOCK + (k as u64) * (1 << 20), piece),
                "writing the checkpoint",
            )?;
        }
        Ok(written)
    }

    /// The checkpoint is durable and named: its pages are the durable ones now, and nothing
    /// has changed since.
    pub(super) fn finish(&mut self, written: Written) {
        if !self.g.paged {
            return;
        }
        let mut cache = self.cache.borrow_mut();
        for (page, at, entries) in written.pages {
            self.dir[page as usize] = at;
            cache.put(page, entries);
        }
        drop(cache);
        self.changed.clear();
    }

    /// Entries held in memory: changed since the checkpoint (format 3) or all (before).
    pub(super) fn changed_len(&self) -> usize {
        self.changed.len()
    }
}
