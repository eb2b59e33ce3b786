//! The store: the map of guest blocks to stored extents (paged, `map.rs`), made durable by
//! a journal of map changes and by checkpoints of the pages that changed (docs/store.md).
//!
//! Ordering, which is the whole of crash consistency here:
//! - data is written to free units only, never over anything the durable map references;
//! - a commit flushes the data first, then writes the journal blocks that point at it, then
//!   flushes again; only then are units freed by that commit reused (`Space::release_held`);
//! - a checkpoint writes the changed pages and the directory to slots nothing durable
//!   names, flushes, then writes the superblock copies naming them, each flushed.

use crate::format::{
    journal_key, page_key, Codec, Entry, Geometry, Superblock, RECORDS_PER_BLOCK, VERSION,
};
use crate::space::Space;
use crate::{Device, StoreError, BLOCK, SECTOR};
use map::Map;
use std::collections::HashMap;

mod commit;
mod map;
mod replay;

/// Journal records kept in memory before a commit is forced without a flush from above.
const MAX_DIRTY: usize = 64 * RECORDS_PER_BLOCK;

/// How to open a store.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// The layer's name, written at format and required at open.
    pub owner: String,
    /// Guest blocks of a store formatted now (ignored for an existing store).
    pub logical_blocks: u64,
    /// Journal blocks of a store formatted now.
    pub journal_blocks: u64,
    /// The owner's settings, written at format and returned at open.
    pub owner_config: [u8; 16],
    /// Format a device that holds something other than a store (never needed for a blank
    /// device).
    pub format: bool,
    /// Serve it without writing anything (no replay checkpoint, writes refused).
    pub read_only: bool,
}

/// One extent to store: `blocks` guest blocks from `first_block`, as `bytes` in `codec`,
/// with the check of each block.
pub struct NewExtent {
    pub first_block: u64,
    pub codec: Codec,
    pub bytes: Vec<u8>,
    pub checks: Vec<u32>,
}

/// Counters of what the store did since it was opened, and what it holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub commits: u64,
    pub journal_blocks_written: u64,
    pub checkpoints: u64,
    pub extents_written: u64,
    pub bytes_written: u64,
    /// Units freed (all their extents gone) and reusable since open.
    pub units_reclaimed: u64,
    /// Units the device below was told it may reuse (discarded).
    pub units_discarded: u64,
    pub no_space: u64,
}

pub struct Store<D: Device> {
    dev: D,
    sb: Superblock,
    g: Geometry,
    map: Map,
    space: Space,
    /// Blocks changed since the last commit (their entries are in the map's memory of what
    /// changed since the checkpoint); a block may be listed more than once.
    dirty: Vec<u64>,
    /// Where the next journal block goes, its sequence number, and journal blocks used
    /// since the last checkpoint.
    journal_pos: u64,
    journal_seq: u64,
    journal_used: u64,
    read_only: bool,
    stats: StoreStats,
    /// Extents whose last reference went, and extents stored, since the caller last asked
    /// (`take_sector_changes`).
    freed: Vec<u64>,
    placed: Vec<u64>,
    /// The key of the journal blocks' checks (format version 2).
    journal_key: [u8; 32],
    /// Damage the open found and worked around (a superblock copy, one copy of a journal
    /// block), for the check hook to report.
    recovered: Vec<String>,
    opened_version: u32,
}

/// Sectors whose extents went, and sectors where extents were stored.
#[derive(Debug, Default)]
pub struct SectorChanges {
    pub freed: Vec<u64>,
    pub placed: Vec<u64>,
}

impl SectorChanges {
    /// Every sector whose contents changed meaning.
    pub fn all(&self) -> impl Iterator<Item = u64> + '_ {
        self.freed.iter().chain(&self.placed).copied()
    }
}

fn io<T>(r: Result<T, crate::IoError>, what: &str) -> Result<T, StoreError> {
    r.map_err(|_| StoreError::Io(what.to_string()))
}

impl<D: Device> Store<D> {
    /// Opens the store on `dev`, formatting a blank device. An existing store is replayed
    /// and, unless read-only, checkpointed at once (so the journal starts clean).
    pub fn open(dev: D, opts: &OpenOptions) -> Result<Store<D>, StoreError> {
        let blocks = dev.capacity() / BLOCK;
        let mut first = vec![0u8; 2 * BLOCK as usize];
        io(dev.read(0, &mut first), "reading the superblocks")?;
        let copies = [
            Superblock::decode(&first[..BLOCK as usize]),
            Superblock::decode(&first[BLOCK as usize..]),
        ];
        let newest = copies
            .iter()
            .filter_map(|c| c.as_ref().ok().and_then(|s| s.as_ref()))
            .max_by_key(|s| s.generation)
            .cloned();
        let Some(sb) = newest else {
            let blank = copies.iter().all(|c| matches!(c, Ok(None)));
            // Neither copy is a store's (no magic): what is there is someone else's data.
            let foreign = copies
                .iter()
                .zip([&first[..BLOCK as usize], &first[BLOCK as usize..]])
                .all(|(c, b)| matches!(c, Ok(None)) || &b[..8] != crate::format::MAGIC);
            // A format writes copy B first: copy A blank, copy B torn and every other byte
            // zero is a format that did not finish.
            let unfinished = matches!(&copies, [Ok(None), Err(_)])
                && first_nonzero(&dev, 2 * BLOCK, blocks * BLOCK)?.is_none();
            if (blank || (foreign && !unfinished)) && !opts.format {
                if let Some(at) = first_nonzero(&dev, 0, blocks * BLOCK)? {
                    return Err(StoreError::NotBlank(at));
                }
            } else if !blank && !unfinished && !opts.format {
                let why = copies
                    .iter()
                    .filter_map(|c| c.as_ref().err())
                    .next()
                    .cloned()
                    .unwrap_or_default();
                return Err(StoreError::Damaged(format!("no valid superblock: {why}")));
            }
            if opts.read_only {
                return Err(StoreError::Config(
                    "a blank device cannot be formatted read-only".into(),
                ));
            }
            return Self::format(dev, opts, blocks, VERSION);
        };
        if sb.owner != opts.owner {
            return Err(StoreError::Damaged(format!(
                "the store was formatted by `{}`, not `{}`",
                sb.owner, opts.owner
            )));
        }
        if sb.geometry.physical_blocks > blocks {
            return Err(StoreError::Damaged(format!(
                "the store spans {} blocks, the device below has {blocks}",
                sb.geometry.physical_blocks
            )));
        }
        let mut recovered = Vec::new();
        for (copy, c) in ["A", "B"].iter().zip(&copies) {
            if let Err(why) = c {
                recovered.push(format!(
                    "superblock copy {copy} is unreadable ({why}): torn by a crash or damaged; \
                     the other copy (generation {}) was used",
                    sb.generation
                ));
            }
        }
        let g = sb.geometry;
        let map = Map::load(&dev, &sb, page_key(&sb.key))?;
        let mut s = Store {
            dev,
            space: Space::new(g.data_start(), g.physical_blocks - g.data_start()),
            g,
            map,
            dirty: Vec::new(),
            journal_pos: sb.journal_pos,
            journal_seq: sb.journal_seq,
            journal_used: 0,
            read_only: opts.read_only,
            stats: StoreStats::default(),
            freed: Vec::new(),
            placed: Vec::new(),
            journal_key: journal_key(&sb.key),
            recovered,
            opened_version: sb.version,
            sb,
        };
        let repairs = s.replay()?;
        // The space from the map: every page that holds an entry is read once, and not
        // kept.
        let mut mapped = 0;
        let space = &mut s.space;
        s.map.for_each(&s.dev, |_, e| {
            mapped += 1;
            space
                .add_ref(&e, true)
                .map_err(|d| StoreError::Damaged(d.0))
        })?;
        s.map.count_mapped(mapped);
        s.space
            .check_disjoint()
            .map_err(|d| StoreError::Damaged(d.0))?;
        if !s.read_only {
            if s.sb.version < s.g.version() {
                // Version 1: a checkpoint writes version 2's superblocks and journal.
                s.checkpoint()?;
            } else {
                // No checkpoint: an open writes what the journal needs, never the whole map
                // (a store of any size opens in the time and the writes its journal takes).
                s.repair_after_replay(&first, &copies, repairs)?;
            }
        }
        Ok(s)
    }

    /// Writes a superblock naming no checkpoint (an empty map) and nothing else, so that a
    /// crash leaves either no store or a valid one.
    fn format(
        dev: D,
        opts: &OpenOptions,
        blocks: u64,
        version: u32,
    ) -> Result<Store<D>, StoreError> {
        let g = Geometry::for_version(
            version,
            opts.logical_blocks,
            blocks,
            opts.journal_blocks.max(1),
        )?;
        let mut key = [0u8; 32];
        getrandom::fill(&mut key)
            .map_err(|e| StoreError::Io(format!("no random key for the store: {e}")))?;
        // A random first sequence number: journal blocks a store formatted over an old one
        // finds are not its own (`format = true` does not wipe the device).
        let mut seq = [0u8; 8];
        getrandom::fill(&mut seq)
            .map_err(|e| StoreError::Io(format!("no random sequence number: {e}")))?;
        let journal_seq = (u64::from_le_bytes(seq) >> 2) | 1;
        let sb = Superblock {
            version: g.version(),
            owner: opts.owner.clone(),
            geometry: g,
            generation: 1,
            checkpoint_slot: 1,
            checkpoint_seq: 0,
            journal_pos: 0,
            journal_seq,
            key,
            owner_config: opts.owner_config,
        };
        // Copy B, then copy A: a crash during B leaves A blank (an unfinished format), one
        // during A leaves B.
        for copy in [1, 0] {
            io(
                dev.write(copy * BLOCK, &sb.encode()),
                "writing the superblock",
            )?;
            io(dev.flush(), "flushing the superblock")?;
        }
        usize::try_from(g.pages())
            .map_err(|_| StoreError::Config("logical size too large".into()))?;
        Ok(Store {
            dev,
            space: Space::new(g.data_start(), g.physical_blocks - g.data_start()),
            g,
            map: Map::empty(g, page_key(&key)),
            dirty: Vec::new(),
            journal_pos: 0,
            journal_seq,
            journal_used: 0,
            read_only: false,
            stats: StoreStats::default(),
            freed: Vec::new(),
            placed: Vec::new(),
            journal_key: journal_key(&sb.key),
            recovered: Vec::new(),
            opened_version: g.version(),
            sb,
        })
    }

    /// Formats a store of an older `version` (2: the whole map in each checkpoint), as
    /// builds before version 3 did, for the tests of reading one.
    #[cfg(test)]
    pub(crate) fn format_as(dev: D, opts: &OpenOptions, version: u32) -> Result<Self, StoreError> {
        let blocks = dev.capacity() / BLOCK;
        Self::format(dev, opts, blocks, version)
    }

    /// Damage the open found and worked around (none on a sound store).
    pub fn recovered(&self) -> &[String] {
        &self.recovered
    }

    pub fn geometry(&self) -> Geometry {
        self.g
    }

    pub fn key(&self) -> &[u8; 32] {
        &self.sb.key
    }

    pub fn owner_config(&self) -> [u8; 16] {
        self.sb.owner_config
    }

    pub fn logical_blocks(&self) -> u64 {
        self.g.logical_blocks
    }

    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    pub fn space(&self) -> &Space {
        &self.space
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Bytes of data area that is neither used nor held.
    pub fn free_bytes(&self) -> u64 {
        self.space.free_units() * BLOCK
    }

    /// Block `block`'s entry (an error past the end, or where its map page cannot be read).
    pub fn entry(&self, block: u64) -> Result<Entry, StoreError> {
        self.map.get(&self.dev, block)
    }

    /// Calls `f` with each block that is not a hole, in order, and its entry.
    pub fn for_each_mapped(
        &self,
        f: impl FnMut(u64, Entry) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.map.for_each(&self.dev, f)
    }

    /// Map entries held in memory: those changed since the last checkpoint (the whole map
    /// of a store formatted before version 3).
    pub fn map_entries_in_memory(&self) -> usize {
        self.map.changed_len()
    }

    /// What is wrong with the space kept in memory, found by deriving it again from the
    /// map: each extent's refcount is the number of map entries that point at it, no two
    /// extents overlap, and the units counted free (with those held until the next commit)
    /// are exactly those no extent uses.
    pub fn check_space(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let g = &self.g;
        let mut fresh = Space::new(g.data_start(), g.physical_blocks - g.data_start());
        let walked = self.map.for_each(&self.dev, |block, e| {
            if let Err(d) = fresh.add_ref(&e, true) {
                problems.push(format!("block {block}: {}", d.0));
            }
            Ok(())
        });
        if let Err(e) = walked {
            problems.push(format!("the map cannot be read: {e}"));
            return problems;
        }
        if let Err(d) = fresh.check_disjoint() {
            problems.push(d.0);
        }
        for (sector, x) in fresh.iter_extents() {
            match self.space.extent(*sector) {
                Some(k) if k.refs == x.refs => {}
                Some(k) => problems.push(format!(
                    "the extent at sector {sector} has refcount {}, but {} map entries point at it",
                    k.refs, x.refs
                )),
                None => problems.push(format!(
                    "the extent at sector {sector} is not counted live, but {} map entries point at it",
                    x.refs
                )),
            }
        }
        for (sector, k) in self.space.iter_extents() {
            if fresh.extent(*sector).is_none() {
                problems.push(format!(
                    "the extent at sector {sector} is counted live (refcount {}), but no map entry points at it",
                    k.refs
                ));
            }
        }
        let counted = self.space.free_units() + self.space.held_units();
        if fresh.free_units() != counted {
            problems.push(format!(
                "{counted} units are counted free or held, but {} are unused",
                fresh.free_units()
            ));
        }
        problems
    }

    /// Guest blocks that are not holes.
    pub fn mapped_blocks(&self) -> u64 {
        self.map.mapped()
    }

    /// The stored bytes of `e`'s extent.
    pub fn read_extent(&self, e: &Entry) -> Result<Vec<u8>, StoreError> {
        let Entry::Stored {
            sector, stored_len, ..
        } = *e
        else {
            return Ok(Vec::new());
        };
        let len = u64::from(stored_len).next_multiple_of(SECTOR);
        let mut buf = vec![0u8; len as usize];
        io(
            self.dev.read(sector * SECTOR, &mut buf),
            "reading an extent",
        )?;
        buf.truncate(stored_len as usize);
        Ok(buf)
    }

    /// Reads stored bytes `from..from + buf.len()` of the extent at `sector` (a raw block
    /// without reading its whole extent); the range must be sector-aligned.
    pub fn read_extent_part(
        &self,
        sector: u64,
        from: u64,
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        io(
            self.dev.read(sector * SECTOR + from, buf),
            "reading an extent",
        )
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::ReadOnly);
        }
        Ok(())
    }

    /// Points `block` at `e`. `old` is its entry if the caller read it before (a block the
    /// store changed already is in memory: reading it cannot fail).
    fn set(&mut self, block: u64, e: Entry, old: Option<Entry>) -> Result<(), StoreError> {
        let old = match old {
            Some(old) => old,
            None => self.map.get(&self.dev, block)?,
        };
        self.space
            .add_ref(&e, false)
            .map_err(|d| StoreError::Damaged(d.0))?;
        self.map.put(block, old, e);
        if let Some(sector) = self.space.drop_ref(&old) {
            self.freed.push(sector);
        }
        self.dirty.push(block);
        Ok(())
    }

    /// Stores `extents` (together where one run of free units holds them all) and points
    /// their blocks at them. `NoSpace` leaves everything as it was.
    pub fn write(&mut self, extents: Vec<NewExtent>) -> Result<(), StoreError> {
        self.update(extents, &[], &[])
    }

    /// One request's changes to the map, applied together or not at all: `extents` stored
    /// and their blocks pointed at them, each `(block, entry)` of `shares` pointed at an
    /// extent that is already stored (or made a hole), then each `(block, of)` of `copies`
    /// pointed wherever block `of` now points (a duplicate of a block stored in this same
    /// call). Every new reference is taken before any old one is dropped, so an extent that
    /// one block leaves and another joins survives. Space runs short (`NoSpace`) or the data
    /// cannot be written: the map is as it was. Space is found before anything changes, so
    /// a commit that finding space needs makes only earlier requests durable.
    pub fn update(
        &mut self,
        extents: Vec<NewExtent>,
        shares: &[(u64, Entry)],
        copies: &[(u64, u64)],
    ) -> Result<(), StoreError> {
        self.check_writable()?;
        for x in &extents {
            let blocks = x.checks.len() as u64;
            if blocks == 0
                || blocks > crate::format::MAX_EXTENT_BLOCKS
                || x.bytes.is_empty()
                || x.bytes.len() as u64 > u64::from(crate::format::MAX_STORED_LEN)
                || (x.codec == Codec::Raw && x.bytes.len() as u64 != blocks * BLOCK)
                || x.first_block
                    .checked_add(blocks)
                    .is_none_or(|e| e > self.g.logical_blocks)
            {
                return Err(StoreError::Range(x.first_block));
            }
        }
        for (block, e) in shares {
            if *block >= self.g.logical_blocks {
                return Err(StoreError::Range(*block));
            }
            if matches!(*e, Entry::Stored { sector, .. } if self.space.extent(sector).is_none()) {
                return Err(StoreError::Damaged("sharing an extent that is gone".into()));
            }
        }
        for &(block, of) in copies {
            if block.max(of) >= self.g.logical_blocks {
                return Err(StoreError::Range(block.max(of)));
            }
        }
        let sectors: Vec<u64> = extents
            .iter()
            .map(|x| (x.bytes.len() as u64).div_ceil(SECTOR))
            .collect();
        // Every entry the request changes, read before anything changes (a map page that
        // cannot be read fails the request here, not half-way).
        let mut olds: HashMap<u64, Entry, map::NumberHash> = HashMap::default();
        let touched = extents
            .iter()
            .flat_map(|x| x.first_block..x.first_block + x.checks.len() as u64)
            .chain(shares.iter().map(|(b, _)| *b))
            .chain(copies.iter().flat_map(|&(b, of)| [b, of]));
        for block in touched {
            if let std::collections::hash_map::Entry::Vacant(v) = olds.entry(block) {
                v.insert(self.map.get(&self.dev, block)?);
            }
        }
        // A request that maps a hole grows what the store holds: it may not take the units
        // kept for overwrites.
        let grows = extents.iter().any(|x| {
            (x.first_block..x.first_block + x.checks.len() as u64)
                .any(|b| olds.get(&b) == Some(&Entry::Hole))
        });
        let places = self.find_places(&sectors, grows)?;
        self.write_data(&extents, &sectors, &places)?;
        // From here on nothing can fail short of damage: the map changes as one.
        let shares: Vec<(u64, Entry)> = shares
            .iter()
            .copied()
            .filter(|(block, e)| olds.get(block) != Some(e))
            .collect();
        for (_, e) in &shares {
            self.space
                .add_ref(e, false)
                .map_err(|d| StoreError::Damaged(d.0))?;
        }
        for (x, &sector) in extents.iter().zip(&places) {
            let stored_len = x.bytes.len() as u32;
            self.space
                .place(sector, stored_len, x.codec as u8)
                .map_err(|d| StoreError::Damaged(d.0))?;
            self.placed.push(sector);
            for (k, &check) in x.checks.iter().enumerate() {
                let e = Entry::Stored {
                    sector,
                    stored_len,
                    index: k as u8,
                    codec: x.codec,
                    check,
                };
                let block = x.first_block + k as u64;
                let old = olds.remove(&block);
                self.set(block, e, old)?;
            }
            self.stats.extents_written += 1;
        }
        for &(block, e) in &shares {
            let old = match olds.remove(&block) {
                Some(old) => old,
                None => self.map.get(&self.dev, block)?,
            };
            self.map.put(block, old, e);
            if let Some(sector) = self.space.drop_ref(&old) {
                self.freed.push(sector);
            }
            self.dirty.push(block);
        }
        for &(block, of) in copies {
            // `of` was stored by this request (in memory now) or read above.
            let e = match self.map.in_memory(of) {
                Some(e) => e,
                None => olds.get(&of).copied().ok_or(StoreError::Range(of))?,
            };
            let old = olds.remove(&block);
            self.set(block, e, old)?;
        }
        self.maybe_commit()
    }

    /// Where each extent of `sectors` sectors goes: together in one run of free units if
    /// one holds them all, else each on its own; a request that `grows` the store must leave
    /// the overwrite reserve free ([`crate::overwrite_reserve`]). Changes nothing
    /// (`NoSpace`: no room).
    fn find_places(&mut self, sectors: &[u64], grows: bool) -> Result<Vec<u64>, StoreError> {
        if sectors.is_empty() {
            return Ok(Vec::new());
        }
        let total: u64 = sectors.iter().sum();
        let units = (total * SECTOR).div_ceil(BLOCK);
        if grows {
            let most: u64 = sectors.iter().map(|s| (s * SECTOR).div_ceil(BLOCK)).sum();
            let keep = crate::overwrite_reserve(self.g.physical_blocks);
            let short = |s: &Self| s.space.free_units() < most + keep;
            if short(self) && self.space.held_units() > 0 {
                // Units held since the last commit come free with the next one.
                let _ = self.commit();
            }
            if short(self) {
                self.stats.no_space += 1;
                return Err(StoreError::NoSpace);
            }
        }
        if let Some(first) = self.alloc(units) {
            let mut at = first * BLOCK / SECTOR;
            return Ok(sectors
                .iter()
                .map(|s| {
                    let p = at;
                    at += s;
                    p
                })
                .collect());
        }
        let mut places = Vec::with_capacity(sectors.len());
        let mut result = Ok(());
        for s in sectors {
            match self.alloc((s * SECTOR).div_ceil(BLOCK)) {
                Some(b) => {
                    let sector = b * BLOCK / SECTOR;
                    // Reserved so the next extent's search skips it.
                    if let Err(d) = self.space.place(sector, (s * SECTOR) as u32, 255) {
                        result = Err(StoreError::Damaged(d.0));
                        break;
                    }
                    places.push(sector);
                }
                None => {
                    self.stats.no_space += 1;
                    result = Err(StoreError::NoSpace);
                    break;
                }
            }
        }
        for p in &places {
            self.space.unplace(*p);
        }
        result.map(|()| places)
    }

    /// The extents' bytes at their places, one device write per contiguous stretch.
    fn write_data(
        &mut self,
        extents: &[NewExtent],
        sectors: &[u64],
        places: &[u64],
    ) -> Result<(), StoreError> {
        let mut i = 0;
        while i < extents.len() {
            let mut j = i + 1;
            while j < extents.len() && places[j] == places[j - 1] + sectors[j - 1] {
                j += 1;
            }
            let mut buf = Vec::with_capacity(
                ((places[j - 1] + sectors[j - 1] - places[i]) * SECTOR) as usize,
            );
            for x in &extents[i..j] {
                buf.extend_from_slice(&x.bytes);
                buf.resize(buf.len().next_multiple_of(SECTOR as usize), 0);
            }
            buf.resize(buf.len().next_multiple_of(BLOCK as usize), 0);
            io(self.dev.write(places[i] * SECTOR, &buf), "writing data")?;
            self.stats.bytes_written += buf.len() as u64;
            i = j;
        }
        Ok(())
    }

    /// `units` contiguous free units, committing first to free held ones if need be.
    fn alloc(&mut self, units: u64) -> Option<u64> {
        if let Some(b) = self.space.find_free(units) {
            return Some(b);
        }
        if self.space.held_units() > 0 && self.commit().is_ok() {
            return self.space.find_free(units);
        }
        None
    }

    /// Points each block at the extent its entry already names (dedup hits): an
    /// [`Store::update`] with shares only.
    pub fn share_all(&mut self, pairs: &[(u64, Entry)]) -> Result<(), StoreError> {
        self.update(Vec::new(), pairs, &[])
    }

    /// Makes `blocks` blocks from `first` holes (discard, zeroes).
    pub fn punch(&mut self, first: u64, blocks: u64) -> Result<(), StoreError> {
        self.check_writable()?;
        let end = first
            .checked_add(blocks)
            .filter(|&e| e <= self.g.logical_blocks)
            .ok_or(StoreError::Range(first))?;
        // A piece at a time: what changed is committed (or checkpointed) as it grows, so a
        // discard of the whole disk holds no more in memory than any other change.
        const PIECE: u64 = 64 * crate::format::PAGE_ENTRIES;
        let mut from = first;
        while from < end {
            let to = end.min(from.saturating_add(PIECE));
            for (b, old) in self.map.mapped_in(&self.dev, from, to)? {
                self.set(b, Entry::Hole, Some(old))?;
            }
            self.maybe_commit()?;
            from = to;
        }
        Ok(())
    }

    /// Extents whose last reference went, and extents stored, since the last call. A
    /// layer that keeps anything by sector (an index of contents, a cache of decoded
    /// extents) drops it for both after every change, before it adds what is new: space
    /// freed in one request can be written over in the next, or in the same one after a
    /// commit.
    pub fn take_sector_changes(&mut self) -> SectorChanges {
        SectorChanges {
            freed: std::mem::take(&mut self.freed),
            placed: std::mem::take(&mut self.placed),
        }
    }
}

/// The first non-zero byte of the device in `from..to`, read 1 MiB at a time.
fn first_nonzero<D: Device>(dev: &D, from: u64, to: u64) -> Result<Option<u64>, StoreError> {
    const PIECE: u64 = 1 << 20;
    let mut buf = vec![0u8; PIECE as usize];
    let mut at = from;
    while at < to {
        let n = (to - at).min(PIECE) as usize;
        io(dev.read(at, &mut buf[..n]), "reading the device")?;
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Ok(Some(at + i as u64));
        }
        at += n as u64;
    }
    Ok(None)
}

#[cfg(test)]
mod check_tests {
    use super::*;
    use crate::{block_check, Codec, MemDevice};

    /// The checker derives the refcounts from the map again: a count the store keeps that
    /// is one off is found and named.
    #[test]
    fn a_refcount_that_disagrees_with_the_map_is_found() {
        let opts = OpenOptions {
            owner: "t".into(),
            logical_blocks: 64,
            journal_blocks: 8,
            owner_config: [0; 16],
            format: false,
            read_only: false,
        };
        let mut s = Store::open(MemDevice::new(2 << 20), &opts).unwrap();
        let data = vec![5u8; BLOCK as usize];
        let check = block_check(s.key(), &data);
        s.write(vec![NewExtent {
            first_block: 1,
            codec: Codec::Raw,
            bytes: data,
            checks: vec![check],
        }])
        .unwrap();
        let e = s.entry(1).unwrap();
        s.share_all(&[(2, e), (3, e)]).unwrap();
        s.commit().unwrap();
        assert_eq!(s.check_space(), Vec::<String>::new());
        // One reference lost (what a refcount bug would do).
        s.space.drop_ref(&e);
        let problems = s.check_space();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].ends_with("has refcount 2, but 3 map entries point at it"),
            "{problems:?}"
        );
    }
}
