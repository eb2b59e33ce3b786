//! The on-disk layout the plugin owns below the guest's view (all little-endian), on a disk
//! of `T` blocks of 4 KiB:
//!
//! | blocks | contents |
//! | --- | --- |
//! | 0 | header (first 512 bytes): magic `VMMCRYPT`, version 1, block size, `n`, meta start, data start, epoch, key-check tag |
//! | 1 .. 1+m | metadata: one 128-byte entry per guest block (32 per 4 KiB block), `m = ceil(n/32)` |
//! | d .. d+n | data slot 0 of each guest block |
//! | d+n .. d+2n | data slot 1 of each guest block |
//!
//! The guest sees `n` blocks, the largest `n` with `1 + ceil(n/32) + 2n <= T`: a little under
//! half the disk. Two slots per block let a write never overwrite the version the last
//! completed flush made durable (docs/encryption.md).

pub const BLOCK: u64 = 4096;
pub const SECTOR: u64 = 512;
pub const MAGIC: &[u8; 8] = b"VMMCRYPT";
pub const VERSION: u32 = 1;
pub const ENTRY_BYTES: usize = 128;
pub const ENTRIES_PER_BLOCK: u64 = BLOCK / ENTRY_BYTES as u64;
pub const ENTRIES_PER_SECTOR: u64 = SECTOR / ENTRY_BYTES as u64;

/// Where everything is, for a disk of `total_blocks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Guest-visible blocks.
    pub n: u64,
    pub meta_start: u64,
    pub data_start: u64,
}

impl Geometry {
    pub fn for_disk(total_blocks: u64) -> Option<Geometry> {
        let fits = |n: u64| 1 + n.div_ceil(ENTRIES_PER_BLOCK) + 2 * n <= total_blocks;
        let mut n = total_blocks.saturating_sub(1) / 2;
        while n > 0 && !fits(n) {
            n -= 1;
        }
        (n > 0).then(|| Geometry {
            n,
            meta_start: 1,
            data_start: 1 + n.div_ceil(ENTRIES_PER_BLOCK),
        })
    }

    /// Byte offset of data slot `slot` of guest block `i`.
    pub fn slot_offset(&self, i: u64, slot: u8) -> u64 {
        (self.data_start + u64::from(slot) * self.n + i) * BLOCK
    }

    /// Byte offset of the metadata sector holding entry `i`.
    pub fn meta_sector_offset(&self, i: u64) -> u64 {
        self.meta_start * BLOCK + (i / ENTRIES_PER_SECTOR) * SECTOR
    }
}

/// The header sector. `epoch` counts opens; `key_check` is the tag proving the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub geometry: Geometry,
    pub epoch: u64,
    pub key_check: [u8; 16],
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut h = vec![0u8; SECTOR as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.geometry.n.to_le_bytes());
        h[24..32].copy_from_slice(&self.geometry.meta_start.to_le_bytes());
        h[32..40].copy_from_slice(&self.geometry.data_start.to_le_bytes());
        h[40..48].copy_from_slice(&self.epoch.to_le_bytes());
        h[48..64].copy_from_slice(&self.key_check);
        h
    }

    /// Parses a header sector; `Ok(None)` for a blank (all-zero) one.
    pub fn decode(s: &[u8]) -> Result<Option<Header>, String> {
        if s.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        if s.len() < 64 || &s[..8] != MAGIC {
            return Err(
                "the disk holds data that is not an encrypted layout; use a blank disk".into(),
            );
        }
        let u32_at = |o: usize| u32::from_le_bytes(s[o..o + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |o: usize| u64::from_le_bytes(s[o..o + 8].try_into().unwrap_or([0; 8]));
        if u32_at(8) != VERSION || u64::from(u32_at(12)) != BLOCK {
            return Err(format!(
                "encrypted layout version {} with {}-byte blocks is not supported (want {VERSION}, {BLOCK})",
                u32_at(8),
                u32_at(12)
            ));
        }
        let mut key_check = [0u8; 16];
        key_check.copy_from_slice(&s[48..64]);
        Ok(Some(Header {
            geometry: Geometry {
                n: u64_at(16),
                meta_start: u64_at(24),
                data_start: u64_at(32),
            },
            epoch: u64_at(40),
            key_check,
        }))
    }
}

/// How a version of a block is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// AES-256-GCM ciphertext.
    Encrypted = 1,
    /// Plain data authenticated by a GMAC tag (written while the instance was disabled).
    Clear = 2,
}

/// One stored version of a block: where it is and how to check it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub mode: Mode,
    pub slot: u8,
    pub nonce: [u8; 12],
    pub tag: [u8; 16],
}

/// What a block held at the last completed flush, kept as the fallback until the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Never written: zeros.
    Zeros,
    Version(Version),
}

/// A block's metadata: the newest version and, until the next completed flush settles it,
/// what the last one made durable (the fallback if the newest never reached the disk).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub cur: Option<Version>,
    pub prev: Option<Fallback>,
}

/// `state` byte of a zeros fallback.
const ZEROS: u8 = 3;

fn put(v: &Option<Version>, out: &mut [u8], state: usize, body: usize) {
    if let Some(v) = v {
        out[state] = v.mode as u8;
        out[state + 1] = v.slot;
        out[body..body + 12].copy_from_slice(&v.nonce);
        out[body + 12..body + 28].copy_from_slice(&v.tag);
    }
}

fn get(b: &[u8], state: usize, body: usize) -> Result<Option<Version>, ()> {
    let mode = match b[state] {
        0 => return Ok(None),
        1 => Mode::Encrypted,
        2 => Mode::Clear,
        _ => return Err(()),
    };
    let slot = b[state + 1];
    if slot > 1 {
        return Err(());
    }
    let mut nonce = [0u8; 12];
    let mut tag = [0u8; 16];
    nonce.copy_from_slice(&b[body..body + 12]);
    tag.copy_from_slice(&b[body + 12..body + 28]);
    Ok(Some(Version {
        mode,
        slot,
        nonce,
        tag,
    }))
}

/// Entries are sealed with a keyed BLAKE3 MAC over the block number and the entry, so a
/// flipped bit anywhere in the metadata is caught. An all-zero entry is a never-written block.
impl Entry {
    pub fn encode(&self, block: u64, mac_key: &[u8; 32]) -> [u8; ENTRY_BYTES] {
        let mut e = [0u8; ENTRY_BYTES];
        if self.cur.is_none() && self.prev.is_none() {
            return e;
        }
        put(&self.cur, &mut e, 0, 4);
        match &self.prev {
            Some(Fallback::Version(v)) => put(&Some(*v), &mut e, 2, 32),
            Some(Fallback::Zeros) => e[2] = ZEROS,
            None => {}
        }
        let mac = Self::mac(block, &e[..64], mac_key);
        e[64..80].copy_from_slice(&mac);
        e
    }

    /// The entry, or `Err` when it fails its MAC or is malformed.
    pub fn decode(block: u64, e: &[u8], mac_key: &[u8; 32]) -> Result<Entry, ()> {
        if e.iter().all(|&b| b == 0) {
            return Ok(Entry::default());
        }
        if e[60..64].iter().chain(&e[80..]).any(|&b| b != 0)
            || Self::mac(block, &e[..64], mac_key) != e[64..80]
        {
            return Err(());
        }
        let prev = if e[2] == ZEROS {
            if e[3..4].iter().chain(&e[32..60]).any(|&b| b != 0) {
                return Err(());
            }
            Some(Fallback::Zeros)
        } else {
            get(e, 2, 32)?.map(Fallback::Version)
        };
        let entry = Entry {
            cur: get(e, 0, 4)?,
            prev,
        };
        if entry.cur.is_none() {
            return Err(());
        }
        Ok(entry)
    }

    fn mac(block: u64, body: &[u8], mac_key: &[u8; 32]) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(mac_key);
        h.update(&block.to_le_bytes());
        h.update(body);
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_fits_the_disk_and_slots_do_not_overlap() {
        for total in [4u64, 100, 262_144, 1_000_003] {
            let g = Geometry::for_disk(total).unwrap();
            assert!(1 + g.n.div_ceil(ENTRIES_PER_BLOCK) + 2 * g.n <= total);
            assert!(1 + (g.n + 1).div_ceil(ENTRIES_PER_BLOCK) + 2 * (g.n + 1) > total);
            assert_eq!(
                g.slot_offset(g.n - 1, 1) + BLOCK,
                (g.data_start + 2 * g.n) * BLOCK
            );
            assert!(g.meta_sector_offset(g.n - 1) < g.data_start * BLOCK);
        }
        assert!(Geometry::for_disk(2).is_none());
    }

    #[test]
    fn a_flipped_bit_anywhere_in_an_entry_is_refused() {
        let key = [9u8; 32];
        let v = |slot| Version {
            mode: Mode::Encrypted,
            slot,
            nonce: [slot + 1; 12],
            tag: [slot + 5; 16],
        };
        let entry = Entry {
            cur: Some(v(1)),
            prev: Some(Fallback::Version(v(0))),
        };
        let raw = entry.encode(7, &key);
        assert_eq!(Entry::decode(7, &raw, &key), Ok(entry));
        let zeros = Entry {
            cur: Some(v(1)),
            prev: Some(Fallback::Zeros),
        };
        assert_eq!(Entry::decode(7, &zeros.encode(7, &key), &key), Ok(zeros));
        assert!(Entry::decode(8, &raw, &key).is_err(), "bound to its block");
        for bit in 0..ENTRY_BYTES * 8 {
            let mut bad = raw;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(Entry::decode(7, &bad, &key).is_err(), "bit {bit}");
        }
        let blank = [0u8; ENTRY_BYTES];
        assert_eq!(Entry::decode(7, &blank, &key), Ok(Entry::default()));
        let mut bad = blank;
        bad[100] = 1;
        assert!(Entry::decode(7, &bad, &key).is_err());
    }
}
