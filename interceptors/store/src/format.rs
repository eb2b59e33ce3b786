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

mod journal;
mod page;

pub use journal::{
    decode_journal_block, encode_journal_block, journal_copy_valid, journal_key, JournalBlock,
};
pub use page::{decode_dir_entry, decode_page, encode_dir_entry, encode_page, page_key};

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
}
