//! The on-disk format (docs/store.md has every byte): two superblock copies, two checkpoint
//! slots of the map's directory, a journal ring, the map's pages (two slots each), then
//! data. Every metadata block carries a BLAKE3 check of its own bytes, so a torn or damaged
//! block is recognized, never trusted. Versions 1 and 2 kept the whole map in each
//! checkpoint slot and had no pages; they are still read and written as they are.

use crate::{StoreError, BLOCK, SECTOR};

pub const MAGIC: &[u8; 8] = b"VMMSTORE";
/// The format this build formats. Version 2 stores (the whole map in each checkpoint) are
/// read and written as version 2; version 1 stores (one copy of each journal block,
/// unkeyed) are read, and become version 2 at their first writable open.
pub const VERSION: u32 = 3;
/// The last format without map pages.
pub const VERSION_WHOLE_MAP: u32 = 2;
const PAGE_MAGIC: &[u8; 8] = b"VMMSTPG3";
const PAGE_HEADER: usize = 64;
/// Map entries in one page (a block less its header).
pub const PAGE_ENTRIES: u64 = ((BLOCK as usize - PAGE_HEADER) / ENTRY_BYTES) as u64;
/// Bytes of a directory entry: where a page's durable copy is.
pub const DIR_ENTRY_BYTES: u64 = 8;
const CKPT_MAGIC: &[u8; 8] = b"VMMSTCKP";
const JOURNAL_MAGIC_V1: &[u8; 8] = b"VMMSTJNL";
const JOURNAL_MAGIC: &[u8; 8] = b"VMMSTJN2";
/// The logical size is at most this multiple of the device's (thin provisioning).
pub const MAX_THIN: u64 = 16;
/// Bytes of a map entry, on disk and in a journal record (after the block number).
pub const ENTRY_BYTES: usize = 16;
pub const ENTRIES_PER_BLOCK: u64 = BLOCK / ENTRY_BYTES as u64;
const JOURNAL_HEADER: usize = 64;
const RECORD_BYTES: usize = 8 + ENTRY_BYTES;
/// A version 2 journal block is two copies of the same half block, each with its own
/// check, so that no single damaged bit or sector loses a commit.
const JOURNAL_COPY: usize = BLOCK as usize / 2;
/// Records in one journal block.
pub const RECORDS_PER_BLOCK: usize = (JOURNAL_COPY - JOURNAL_HEADER) / RECORD_BYTES;
const RECORDS_PER_BLOCK_V1: usize = (BLOCK as usize - JOURNAL_HEADER) / RECORD_BYTES;
/// Bytes of the check at the end of a superblock or a header.
const CHECK: usize = 32;

/// How a stored extent's bytes decode to guest blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// The blocks as they are, one after another.
    Raw = 0,
    /// One zstd frame holding the blocks.
    Zstd = 1,
}

impl Codec {
    fn from_u8(v: u8) -> Option<Codec> {
        match v {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

/// Where one guest block lives: `Hole` (reads as zeroes, nothing stored) or block `index`
/// of the extent of `stored_len` bytes at physical sector `sector`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Hole,
    Stored {
        sector: u64,
        stored_len: u32,
        index: u8,
        codec: Codec,
        /// First 4 bytes of the BLAKE3 of the block's contents (keyed where the store has a
        /// key), checked on every read.
        check: u32,
    },
}

/// Largest stored extent: 64 KiB of guest data stored raw.
pub const MAX_STORED_LEN: u32 = 16 * BLOCK as u32;
/// Most guest blocks one extent holds.
pub const MAX_EXTENT_BLOCKS: u64 = 16;

impl Entry {
    pub fn encode(&self) -> [u8; ENTRY_BYTES] {
        let mut b = [0u8; ENTRY_BYTES];
        if let Entry::Stored {
            sector,
            stored_len,
            index,
            codec,
            check,
        } = *self
        {
            b[0..6].copy_from_slice(&sector.to_le_bytes()[0..6]);
            b[6..9].copy_from_slice(&stored_len.to_le_bytes()[0..3]);
            b[9] = index;
            b[10] = codec as u8;
            b[12..16].copy_from_slice(&check.to_le_bytes());
        }
        b
    }

    /// Decodes an entry; `None` for bytes no encoder writes (damage).
    pub fn decode(b: &[u8]) -> Option<Entry> {
        if b.len() != ENTRY_BYTES {
            return None;
        }
        let mut s = [0u8; 8];
        s[0..6].copy_from_slice(&b[0..6]);
        let sector = u64::from_le_bytes(s);
        if sector == 0 {
            return b.iter().all(|&x| x == 0).then_some(Entry::Hole);
        }
        let mut l = [0u8; 4];
        l[0..3].copy_from_slice(&b[6..9]);
        let stored_len = u32::from_le_bytes(l);
        let codec = Codec::from_u8(b[10])?;
        if b[11] != 0 || stored_len == 0 || stored_len > MAX_STORED_LEN {
            return None;
        }
        if u64::from(b[9]) >= MAX_EXTENT_BLOCKS {
            return None;
        }
        if codec == Codec::Raw && u64::from(b[9]) * BLOCK + BLOCK > u64::from(stored_len) {
            return None;
        }
        Some(Entry::Stored {
            sector,
            stored_len,
            index: b[9],
            codec,
            check: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        })
    }

    /// The physical byte range of the extent, if any.
    pub fn extent(&self) -> Option<(u64, u64)> {
        match *self {
            Entry::Hole => None,
            Entry::Stored {
                sector, stored_len, ..
            } => {
                let start = sector * SECTOR;
                Some((start, start + u64::from(stored_len)))
            }
        }
    }
}

/// A BLAKE3 check over `bytes`.
fn check(bytes: &[u8]) -> [u8; CHECK] {
    *blake3::hash(bytes).as_bytes()
}

/// The layout of a store over a device of `physical` bytes exposing `logical_blocks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub logical_blocks: u64,
    pub physical_blocks: u64,
    /// Blocks of one checkpoint slot: its header and the directory (format 3) or the whole
    /// map (before).
    pub slot_blocks: u64,
    pub journal_blocks: u64,
    /// Format 3: the map in pages after the journal, two slots each, found through the
    /// directory. Before: the whole map in each checkpoint slot, no pages.
    pub paged: bool,
}

impl Geometry {
    /// Superblock copies A and B are blocks 0 and 1.
    pub const SLOTS_START: u64 = 2;

    /// Blocks of the whole map (format 2's checkpoint).
    pub fn map_blocks(&self) -> u64 {
        self.logical_blocks.div_ceil(ENTRIES_PER_BLOCK)
    }

    /// Map pages (format 3; none before).
    pub fn pages(&self) -> u64 {
        if self.paged {
            self.logical_blocks.div_ceil(PAGE_ENTRIES)
        } else {
            0
        }
    }

    pub fn slot_start(&self, slot: u8) -> u64 {
        Self::SLOTS_START + u64::from(slot) * self.slot_blocks
    }

    pub fn journal_start(&self) -> u64 {
        Self::SLOTS_START + 2 * self.slot_blocks
    }

    /// The block of slot `slot` (0 or 1) of map page `page`: a page's two slots are
    /// neighbours, so a run of pages is one read whichever slots they use.
    pub fn page_block(&self, page: u64, slot: u8) -> u64 {
        self.journal_start() + self.journal_blocks + 2 * page + u64::from(slot)
    }

    /// First block of the data area.
    pub fn data_start(&self) -> u64 {
        self.journal_start() + self.journal_blocks + 2 * self.pages()
    }

    /// The layout of format 3 for `logical_blocks` on `physical_blocks`, or why it does not
    /// fit.
    pub fn new(
        logical_blocks: u64,
        physical_blocks: u64,
        journal_blocks: u64,
    ) -> Result<Geometry, StoreError> {
        Self::for_version(VERSION, logical_blocks, physical_blocks, journal_blocks)
    }

    /// The layout a store of format `version` has.
    pub fn for_version(
        version: u32,
        logical_blocks: u64,
        physical_blocks: u64,
        journal_blocks: u64,
    ) -> Result<Geometry, StoreError> {
        if logical_blocks == 0 {
            return Err(StoreError::Config("the logical size is zero".into()));
        }
        if logical_blocks > MAX_THIN.saturating_mul(physical_blocks) {
            return Err(StoreError::Config(format!(
                "{logical_blocks} guest blocks on {physical_blocks} blocks below: more than \
                 {MAX_THIN} times as many"
            )));
        }
        if journal_blocks == 0 {
            return Err(StoreError::Config("the journal has no blocks".into()));
        }
        let paged = version > VERSION_WHOLE_MAP;
        let pages = logical_blocks.div_ceil(PAGE_ENTRIES);
        let slot_blocks = if paged {
            1 + (pages * DIR_ENTRY_BYTES).div_ceil(BLOCK)
        } else {
            1 + logical_blocks.div_ceil(ENTRIES_PER_BLOCK)
        };
        let g = Geometry {
            logical_blocks,
            physical_blocks,
            slot_blocks,
            journal_blocks,
            paged,
        };
        // At least as many data blocks as the metadata takes, so that a store is never
        // mostly metadata. Checked: the sizes may come from an image someone edited, and
        // every offset the store computes later is below the data's start.
        let meta = g
            .slot_blocks
            .checked_mul(2)
            .and_then(|m| m.checked_add(Self::SLOTS_START))
            .and_then(|m| m.checked_add(journal_blocks))
            .and_then(|m| m.checked_add(2 * g.pages()));
        let Some(meta) = meta.filter(|m| m.checked_mul(2).is_some_and(|m2| m2 <= physical_blocks))
        else {
            return Err(StoreError::Config(format!(
                "{physical_blocks} blocks of 4 KiB below cannot hold the metadata of {logical_blocks} \
                 guest blocks with {journal_blocks} journal blocks, and as much data"
            )));
        };
        debug_assert_eq!(meta, g.data_start());
        Ok(g)
    }

    /// The format version a superblock of this layout is written as.
    pub fn version(&self) -> u32 {
        if self.paged {
            VERSION
        } else {
            VERSION_WHOLE_MAP
        }
    }
}

/// What a superblock holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// The format version it was read as (1 to 3), and is written as.
    pub version: u32,
    /// The layer that formatted the store ("compress", "dedup"); another layer refuses it.
    pub owner: String,
    pub geometry: Geometry,
    /// Counts superblock writes; the valid copy with the highest wins.
    pub generation: u64,
    /// The checkpoint slot (0 or 1) holding the map as of `checkpoint_seq`.
    pub checkpoint_slot: u8,
    pub checkpoint_seq: u64,
    /// Replay starts at this journal block with this sequence number.
    pub journal_pos: u64,
    pub journal_seq: u64,
    /// The key of the blocks' checks (and dedup's content addresses), random per store.
    pub key: [u8; 32],
    /// The owner's own settings (e.g. its extent size), opaque here.
    pub owner_config: [u8; 16],
}

const OWNER_BYTES: usize = 16;
pub const SUPERBLOCK_BYTES: usize = 8 + 4 + OWNER_BYTES + 8 * 4 + 8 + 1 + 8 + 8 + 8 + 32 + 16;

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(BLOCK as usize);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.version.to_le_bytes());
        let mut owner = [0u8; OWNER_BYTES];
        let n = self.owner.len().min(OWNER_BYTES);
        owner[..n].copy_from_slice(&self.owner.as_bytes()[..n]);
        b.extend_from_slice(&owner);
        let g = &self.geometry;
        for v in [
            g.logical_blocks,
            g.physical_blocks,
            g.slot_blocks,
            g.journal_blocks,
            self.generation,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.push(self.checkpoint_slot);
        for v in [self.checkpoint_seq, self.journal_pos, self.journal_seq] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.key);
        b.extend_from_slice(&self.owner_config);
        debug_assert_eq!(b.len(), SUPERBLOCK_BYTES);
        let c = check(&b);
        b.extend_from_slice(&c);
        b.resize(BLOCK as usize, 0);
        b
    }

    /// Decodes one copy: `Ok(None)` for an all-zero block (never written).
    pub fn decode(b: &[u8]) -> Result<Option<Superblock>, String> {
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        if b.len() < SUPERBLOCK_BYTES + CHECK || &b[0..8] != MAGIC {
            return Err("no store superblock (wrong magic)".into());
        }
        let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if !(1..=VERSION).contains(&version) {
            return Err(format!(
                "store format version {version}, this build reads versions 1 to {VERSION}"
            ));
        }
        if check(&b[..SUPERBLOCK_BYTES]) != b[SUPERBLOCK_BYTES..SUPERBLOCK_BYTES + CHECK] {
            return Err("the superblock's check does not match (damaged or torn)".into());
        }
        let owner_raw = &b[12..12 + OWNER_BYTES];
        let end = owner_raw
            .iter()
            .position(|&x| x == 0)
            .unwrap_or(OWNER_BYTES);
        let owner = String::from_utf8_lossy(&owner_raw[..end]).into_owned();
        let at = 12 + OWNER_BYTES;
        let geometry = Geometry {
            logical_blocks: u64_at(b, at),
            physical_blocks: u64_at(b, at + 8),
            slot_blocks: u64_at(b, at + 16),
            journal_blocks: u64_at(b, at + 24),
            paged: version > VERSION_WHOLE_MAP,
        };
        let generation = u64_at(b, at + 32);
        let checkpoint_slot = b[at + 40];
        let at = at + 41;
        let mut key = [0u8; 32];
        key.copy_from_slice(&b[at + 24..at + 56]);
        let mut owner_config = [0u8; 16];
        owner_config.copy_from_slice(&b[at + 56..at + 72]);
        let sb = Superblock {
            version,
            owner,
            geometry,
            generation,
            checkpoint_slot,
            checkpoint_seq: u64_at(b, at),
            journal_pos: u64_at(b, at + 8),
            journal_seq: u64_at(b, at + 16),
            key,
            owner_config,
        };
        // Fields the check covers can still be nonsense written by a careless tool.
        let g = &sb.geometry;
        let expect = Geometry::for_version(
            version,
            g.logical_blocks,
            g.physical_blocks,
            g.journal_blocks,
        )
        .map_err(|e| format!("the superblock's geometry is impossible: {e}"))?;
        if expect != *g || sb.checkpoint_slot > 1 || sb.journal_pos >= g.journal_blocks {
            return Err("the superblock's geometry is impossible".into());
        }
        Ok(Some(sb))
    }
}

/// The header block of a checkpoint slot: its sequence number and the check of the map.
pub fn encode_checkpoint_header(seq: u64, map: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK as usize);
    b.extend_from_slice(CKPT_MAGIC);
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&(map.len() as u64).to_le_bytes());
    b.extend_from_slice(&check(map));
    let c = check(&b);
    b.extend_from_slice(&c);
    b.resize(BLOCK as usize, 0);
    b
}

/// Checks a checkpoint slot's header against `seq` and the map bytes that follow it.
pub fn verify_checkpoint(header: &[u8], seq: u64, map: &[u8]) -> Result<(), String> {
    let body = 8 + 8 + 8 + CHECK;
    if header.len() < body + CHECK || &header[0..8] != CKPT_MAGIC {
        return Err("the checkpoint's header is missing".into());
    }
    if check(&header[..body]) != header[body..body + CHECK] {
        return Err("the checkpoint's header is damaged".into());
    }
    if u64_at(header, 8) != seq {
        return Err(format!(
            "the checkpoint is number {}, the superblock names {seq}",
            u64_at(header, 8)
        ));
    }
    if u64_at(header, 16) != map.len() as u64 || check(map) != header[24..24 + CHECK] {
        return Err("the checkpoint (directory or map) does not match its check (damaged)".into());
    }
    Ok(())
}

/// The key of the journal's checks, derived from the store's key: a journal block that
/// another store left on the device (one formatted over it) never passes for this one's,
/// whatever its sequence number.
pub fn journal_key(store_key: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key("vmm extent-store journal 2", store_key)
}

/// The key of the map pages' checks (format 3), derived from the store's key: a page is
/// never taken from another store, nor made by anyone without the key.
pub fn page_key(store_key: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key("vmm extent-store page 3", store_key)
}

fn check_page(key: &[u8; 32], b: &[u8]) -> [u8; CHECK] {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(&b[0..24]);
    hasher.update(&b[PAGE_HEADER..]);
    *hasher.finalize().as_bytes()
}

/// Encodes map page `page` (its [`PAGE_ENTRIES`] entries, fewer in the last page), written
/// by checkpoint `seq`.
pub fn encode_page(key: &[u8; 32], page: u64, seq: u64, entries: &[Entry]) -> Vec<u8> {
    debug_assert!(entries.len() as u64 <= PAGE_ENTRIES);
    let mut b = vec![0u8; BLOCK as usize];
    b[0..8].copy_from_slice(PAGE_MAGIC);
    b[8..16].copy_from_slice(&page.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let at = PAGE_HEADER + i * ENTRY_BYTES;
        b[at..at + ENTRY_BYTES].copy_from_slice(&e.encode());
    }
    let c = check_page(key, &b);
    b[24..24 + CHECK].copy_from_slice(&c);
    b
}

/// Decodes map page `page`, which the directory says checkpoint `seq` wrote: anything else
/// (torn, damaged, another page's or an older copy put back) is refused with the reason.
pub fn decode_page(key: &[u8; 32], b: &[u8], page: u64, seq: u64) -> Result<Vec<Entry>, String> {
    let what = format!("map page {page} (written by checkpoint {seq})");
    if b.len() != BLOCK as usize || &b[0..8] != PAGE_MAGIC || check_page(key, b) != b[24..56] {
        return Err(format!("{what} does not match its check (damaged)"));
    }
    if u64_at(b, 8) != page || u64_at(b, 16) != seq {
        return Err(format!(
            "{what} holds page {} of checkpoint {} (an older or misplaced copy)",
            u64_at(b, 8),
            u64_at(b, 16)
        ));
    }
    b[PAGE_HEADER..]
        .chunks(ENTRY_BYTES)
        .enumerate()
        .map(|(i, c)| Entry::decode(c).ok_or_else(|| format!("{what}: entry {i} is not an entry")))
        .collect()
}

/// A directory entry: where page's durable copy is, `None` for a page never written (every
/// block a hole).
pub fn encode_dir_entry(at: Option<(u64, u8)>) -> u64 {
    at.map_or(0, |(seq, slot)| seq << 1 | u64::from(slot))
}

/// Decodes a directory entry of a directory written by checkpoint `checkpoint_seq`:
/// `(seq, slot)` of the checkpoint that wrote the page and the slot it is in.
pub fn decode_dir_entry(v: u64, checkpoint_seq: u64) -> Result<Option<(u64, u8)>, String> {
    if v == 0 {
        return Ok(None);
    }
    let seq = v >> 1;
    if seq == 0 || seq > checkpoint_seq {
        return Err(format!(
            "a directory entry names checkpoint {seq}, the directory is checkpoint {checkpoint_seq}'s"
        ));
    }
    Ok(Some((seq, (v & 1) as u8)))
}

/// Encodes one journal block of `records` (at most RECORDS_PER_BLOCK), part of the commit
/// whose first journal block has sequence number `commit_seq`: the same half block twice.
pub fn encode_journal_block(
    key: &[u8; 32],
    seq: u64,
    commit_seq: u64,
    records: &[(u64, Entry)],
) -> Vec<u8> {
    debug_assert!(records.len() <= RECORDS_PER_BLOCK);
    let mut h = vec![0u8; JOURNAL_COPY];
    h[0..8].copy_from_slice(JOURNAL_MAGIC);
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&commit_seq.to_le_bytes());
    h[24..28].copy_from_slice(&(records.len() as u32).to_le_bytes());
    let mut at = JOURNAL_HEADER;
    for (block, e) in records {
        h[at..at + 8].copy_from_slice(&block.to_le_bytes());
        h[at + 8..at + RECORD_BYTES].copy_from_slice(&e.encode());
        at += RECORD_BYTES;
    }
    let c = check_journal_copy(key, &h);
    h[28..28 + CHECK].copy_from_slice(&c);
    h.repeat(2)
}

fn check_journal_copy(key: &[u8; 32], h: &[u8]) -> [u8; CHECK] {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(&h[0..28]);
    hasher.update(&h[JOURNAL_HEADER..]);
    *hasher.finalize().as_bytes()
}

fn check_journal_v1(b: &[u8]) -> [u8; CHECK] {
    let mut h = blake3::Hasher::new();
    h.update(&b[0..20]);
    h.update(&b[JOURNAL_HEADER..]);
    *h.finalize().as_bytes()
}

/// What a journal block says.
#[derive(Debug, PartialEq, Eq)]
pub enum JournalBlock {
    /// A valid block with this sequence number and records, and the sequence number of its
    /// commit's first block (`None`: a version 1 block, which does not say).
    Records {
        seq: u64,
        commit_seq: Option<u64>,
        records: Vec<(u64, Entry)>,
    },
    /// Not a valid block (never written, torn, damaged, or of an earlier pass or another
    /// store): whether replay may stop here is the replay's question.
    End,
    /// A block whose check matches but whose records are impossible: damage.
    Damaged(String),
}

/// Whether one copy (half block) of a version 2 journal block passes its check.
pub fn journal_copy_valid(h: &[u8], key: &[u8; 32]) -> bool {
    h.len() == JOURNAL_COPY && &h[0..8] == JOURNAL_MAGIC && check_journal_copy(key, h) == h[28..60]
}

/// Decodes a journal block of a store of format `version`. Of a version 2 block's two
/// copies, the one with sequence number `expected` wins (a torn write can leave one copy
/// new and the other from an earlier pass), else the later one. The flag is set when one
/// copy failed its check and the other was used.
pub fn decode_journal_block(
    b: &[u8],
    version: u32,
    key: &[u8; 32],
    expected: u64,
) -> (JournalBlock, bool) {
    if b.len() != BLOCK as usize {
        return (JournalBlock::End, false);
    }
    if version == 1 {
        if &b[0..8] != JOURNAL_MAGIC_V1 || check_journal_v1(b) != b[20..52] {
            return (JournalBlock::End, false);
        }
        let n = u32::from_le_bytes([b[16], b[17], b[18], b[19]]) as usize;
        return (
            decode_records(u64_at(b, 8), None, n, RECORDS_PER_BLOCK_V1, b),
            false,
        );
    }
    let valid = |h: &[u8]| journal_copy_valid(h, key);
    let (a, c) = b.split_at(JOURNAL_COPY);
    let h = match (valid(a), valid(c)) {
        (true, true) if a == c => a,
        (true, true) if u64_at(a, 8) == u64_at(c, 8) => {
            return (
                JournalBlock::Damaged(format!(
                    "journal block {}: its two copies differ",
                    u64_at(a, 8)
                )),
                false,
            )
        }
        (true, true) if u64_at(c, 8) == expected || u64_at(c, 8) > u64_at(a, 8) => c,
        (true, _) => a,
        (false, true) => c,
        (false, false) => return (JournalBlock::End, false),
    };
    let n = u32::from_le_bytes([h[24], h[25], h[26], h[27]]) as usize;
    let decoded = decode_records(u64_at(h, 8), Some(u64_at(h, 16)), n, RECORDS_PER_BLOCK, h);
    (decoded, valid(a) != valid(c))
}

fn decode_records(
    seq: u64,
    commit_seq: Option<u64>,
    n: usize,
    most: usize,
    b: &[u8],
) -> JournalBlock {
    if n > most || commit_seq.is_some_and(|c| c > seq) {
        return JournalBlock::Damaged(format!("journal block {seq} claims {n} records"));
    }
    let mut records = Vec::with_capacity(n);
    for i in 0..n {
        let at = JOURNAL_HEADER + i * RECORD_BYTES;
        let block = u64_at(b, at);
        let Some(e) = Entry::decode(&b[at + 8..at + RECORD_BYTES]) else {
            return JournalBlock::Damaged(format!(
                "journal block {seq}, record {i}: not a map entry"
            ));
        };
        records.push((block, e));
    }
    JournalBlock::Records {
        seq,
        commit_seq,
        records,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_garbage_is_refused() {
        let e = Entry::Stored {
            sector: 0x0012_3456_789a,
            stored_len: 20_000,
            index: 7,
            codec: Codec::Zstd,
            check: 0xdead_beef,
        };
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        assert_eq!(Entry::decode(&Entry::Hole.encode()), Some(Entry::Hole));
        let mut bad = e.encode();
        bad[10] = 9; // codec
        assert_eq!(Entry::decode(&bad), None);
        let mut bad = e.encode();
        bad[9] = 16; // index past any extent
        assert_eq!(Entry::decode(&bad), None);
        // A raw extent must hold its block.
        let raw = Entry::Stored {
            sector: 9,
            stored_len: 4096,
            index: 1,
            codec: Codec::Raw,
            check: 0,
        };
        assert_eq!(Entry::decode(&raw.encode()), None);
    }

    #[test]
    fn a_superblock_round_trips_and_a_flipped_bit_is_refused() {
        let sb = Superblock {
            version: VERSION,
            owner: "compress".into(),
            geometry: Geometry::new(1000, 4096, 16).unwrap(),
            generation: 5,
            checkpoint_slot: 1,
            checkpoint_seq: 9,
            journal_pos: 3,
            journal_seq: 77,
            key: [7; 32],
            owner_config: [1; 16],
        };
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), Some(sb));
        let mut bad = b.clone();
        bad[40] ^= 1;
        assert!(Superblock::decode(&bad).unwrap_err().contains("check"));
        assert_eq!(Superblock::decode(&vec![0; 4096]).unwrap(), None);
    }

    #[test]
    fn pages_round_trip_and_a_flipped_bit_or_a_stale_copy_is_refused() {
        let key = page_key(&[3; 32]);
        let mut entries = vec![Entry::Hole; PAGE_ENTRIES as usize];
        entries[7] = Entry::Stored {
            sector: 800,
            stored_len: 4096,
            index: 0,
            codec: Codec::Raw,
            check: 9,
        };
        let b = encode_page(&key, 5, 12, &entries);
        assert_eq!(decode_page(&key, &b, 5, 12).unwrap(), entries);
        for at in [3, 10, 20, 30, 64, 4095] {
            let mut bad = b.clone();
            bad[at] ^= 1;
            assert!(decode_page(&key, &bad, 5, 12)
                .unwrap_err()
                .contains("damaged"));
        }
        // A valid page of another checkpoint, or another page, in the slot named.
        assert!(decode_page(&key, &b, 5, 13).unwrap_err().contains("older"));
        assert!(decode_page(&key, &b, 6, 12).unwrap_err().contains("older"));
        assert!(decode_page(&page_key(&[4; 32]), &b, 5, 12).is_err());
        assert_eq!(
            decode_dir_entry(encode_dir_entry(Some((12, 1))), 12),
            Ok(Some((12, 1)))
        );
        assert_eq!(decode_dir_entry(0, 12), Ok(None));
        assert!(decode_dir_entry(encode_dir_entry(Some((13, 0))), 12).is_err());
    }

    #[test]
    fn journal_blocks_round_trip_and_torn_ones_end_the_replay() {
        let recs = vec![
            (3u64, Entry::Hole),
            (
                5,
                Entry::Stored {
                    sector: 100,
                    stored_len: 4096,
                    index: 0,
                    codec: Codec::Raw,
                    check: 1,
                },
            ),
        ];
        let key = journal_key(&[9; 32]);
        let b = encode_journal_block(&key, 42, 41, &recs);
        let want = JournalBlock::Records {
            seq: 42,
            commit_seq: Some(41),
            records: recs.clone(),
        };
        assert_eq!(decode_journal_block(&b, VERSION, &key, 42), (want, false));
        // One copy damaged anywhere: the other is used, and the damage is told.
        for at in [3, 20, 40, 100, 2047, 2048, 2050, 3000, 4095] {
            let mut one = b.clone();
            one[at] ^= 1;
            match decode_journal_block(&one, VERSION, &key, 42) {
                (JournalBlock::Records { seq: 42, .. }, true) => {}
                other => panic!("a flip at byte {at}: {other:?}"),
            }
        }
        // Both copies: not a block (the replay decides whether that is an end or damage).
        let mut both = b.clone();
        both[100] ^= 1;
        both[2048 + 100] ^= 1;
        assert_eq!(
            decode_journal_block(&both, VERSION, &key, 42).0,
            JournalBlock::End
        );
        // Another store's block (another key) is nobody's.
        let other = journal_key(&[8; 32]);
        assert_eq!(
            decode_journal_block(&b, VERSION, &other, 42).0,
            JournalBlock::End
        );
    }
}
