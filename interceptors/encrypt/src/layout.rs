//! Where everything lives on a disk of `T` blocks of 4 KiB (docs/encryption.md has every
//! byte): block 0 holds two copies of the header; then the metadata tree, level by level
//! (leaves first), each node in two slots side by side; then data slot 0 of every guest
//! block, then data slot 1. The guest sees `n` blocks, the largest `n` that fits.

use crate::node::{Child, LEAF_BYTES, LEAF_ENTRIES, NODE_BYTES, NODE_RECORDS};

pub const BLOCK: u64 = 4096;
pub const MAGIC: &[u8; 8] = b"VMMCRYPT";
pub const VERSION: u32 = 2;
/// Bytes of one header copy; copy A is at byte 0, copy B at byte 512.
pub const HEADER_BYTES: usize = 512;
/// Where the header's MAC starts (it covers every byte before it).
const HEADER_MAC_AT: usize = HEADER_BYTES - 16;
/// First byte of the tree: block 1.
const TREE_START: u64 = BLOCK;

/// One level of the metadata tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level {
    pub nodes: u64,
    /// Byte offset of node 0, slot 0.
    pub start: u64,
    pub node_bytes: u64,
}

impl Level {
    /// Byte offset of `slot` of node `index`; the node's two slots are adjacent.
    pub fn slot_offset(&self, index: u64, slot: u8) -> u64 {
        self.start + (2 * index + u64::from(slot)) * self.node_bytes
    }
}

/// The layout of a disk of `total` blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub total: u64,
    /// Guest-visible blocks.
    pub n: u64,
    /// Level 0 holds the leaves (entries); the last level has one node, the root.
    pub levels: Vec<Level>,
    /// First block of data slot 0.
    pub data_start: u64,
}

/// The tree's levels for `n` guest blocks and the first block after them, or `None` on
/// overflow.
fn tree(n: u64) -> Option<(Vec<Level>, u64)> {
    let mut levels = Vec::new();
    let mut count = n.div_ceil(LEAF_ENTRIES as u64).max(1);
    let mut at = TREE_START;
    let mut node_bytes = LEAF_BYTES as u64;
    loop {
        levels.push(Level {
            nodes: count,
            start: at,
            node_bytes,
        });
        let bytes = count.checked_mul(2)?.checked_mul(node_bytes)?;
        at = at.checked_add(bytes)?.checked_next_multiple_of(BLOCK)?;
        if count == 1 {
            break;
        }
        count = count.div_ceil(NODE_RECORDS as u64);
        node_bytes = NODE_BYTES as u64;
    }
    Some((levels, at / BLOCK))
}

impl Geometry {
    /// The largest layout that fits `total` blocks, or `None` if not even one block does.
    pub fn for_disk(total: u64) -> Option<Geometry> {
        let fits = |n: u64| {
            tree(n)
                .and_then(|(_, data)| data.checked_add(n.checked_mul(2)?))
                .is_some_and(|end| end <= total)
        };
        // `fits` is monotone in n: binary search for the largest n that fits.
        let (mut lo, mut hi) = (0u64, total / 2 + 1);
        while lo + 1 < hi {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        if lo == 0 {
            return None;
        }
        let (levels, data_start) = tree(lo)?;
        Some(Geometry {
            total,
            n: lo,
            levels,
            data_start,
        })
    }

    /// Byte offset of data slot `slot` of guest block `block` (`block < n`).
    pub fn slot_offset(&self, block: u64, slot: u8) -> u64 {
        (self.data_start + u64::from(slot) * self.n + block) * BLOCK
    }

    pub fn top(&self) -> u32 {
        self.levels.len() as u32 - 1
    }
}

/// A header copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub disk_id: [u8; 16],
    pub total: u64,
    pub n: u64,
    pub tree_start: u64,
    pub data_start: u64,
    pub levels: u32,
    /// Completed commits; every completed flush with writes since the last one is one.
    pub generation: u64,
    /// Where the committed root node is.
    pub root: Child,
    pub key_check: [u8; 16],
}

/// The keys a header is checked with.
pub struct HeaderKeys<'a> {
    pub mac: &'a [u8; 32],
    /// The key check for a given disk id.
    pub check: &'a dyn Fn(&[u8; 16]) -> [u8; 16],
}

fn u32_at(s: &[u8], o: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&s[o..o + 4]);
    u32::from_le_bytes(b)
}

fn u64_at(s: &[u8], o: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&s[o..o + 8]);
    u64::from_le_bytes(b)
}

fn mac16(key: &[u8; 32], parts: &[&[u8]]) -> [u8; 16] {
    let mut h = blake3::Hasher::new_keyed(key);
    for p in parts {
        h.update(p);
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// Whether a header copy looks like this plugin's (its magic), of any version.
pub fn has_magic(copy: &[u8]) -> bool {
    copy.len() >= 8 && &copy[..8] == MAGIC
}

impl Header {
    pub fn for_geometry(geo: &Geometry, disk_id: [u8; 16], key_check: [u8; 16]) -> Header {
        Header {
            disk_id,
            total: geo.total,
            n: geo.n,
            tree_start: TREE_START / BLOCK,
            data_start: geo.data_start,
            levels: geo.levels.len() as u32,
            generation: 0,
            root: Child::Empty,
            key_check,
        }
    }

    pub fn encode(&self, mac_key: &[u8; 32]) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        h[16..32].copy_from_slice(&self.disk_id);
        h[32..40].copy_from_slice(&self.total.to_le_bytes());
        h[40..48].copy_from_slice(&self.n.to_le_bytes());
        h[48..56].copy_from_slice(&self.tree_start.to_le_bytes());
        h[56..64].copy_from_slice(&self.data_start.to_le_bytes());
        h[64..68].copy_from_slice(&self.levels.to_le_bytes());
        h[72..80].copy_from_slice(&self.generation.to_le_bytes());
        self.root.encode(&mut h[80..104]);
        h[104..120].copy_from_slice(&self.key_check);
        let mac = mac16(mac_key, &[&h[..HEADER_MAC_AT]]);
        h[HEADER_MAC_AT..].copy_from_slice(&mac);
        h
    }

    /// Parses and checks one header copy against the disk it is on (`geo`, computed from
    /// the disk's size) and the key. The error names what is wrong.
    pub fn decode(s: &[u8], geo: &Geometry, keys: &HeaderKeys<'_>) -> Result<Header, String> {
        if s.len() != HEADER_BYTES || !has_magic(s) {
            return Err("no encrypted layout header (magic missing)".into());
        }
        let version = u32_at(s, 8);
        if version == 1 {
            return Err(
                "this disk has encrypted layout version 1, which this plugin no longer \
                 opens (its nonces could repeat and its header was not authenticated): read its \
                 data with the vmm release that made it and copy it to a new disk"
                    .into(),
            );
        }
        if version != VERSION {
            return Err(format!(
                "encrypted layout version {version} is not supported (this plugin reads version {VERSION})"
            ));
        }
        let named = |field: &str, found: u64, want: u64| -> Result<(), String> {
            if found == want {
                return Ok(());
            }
            Err(format!(
                "header field {field} is {found}, but a layout for this disk has {want}: the header is damaged"
            ))
        };
        named("block_size", u64::from(u32_at(s, 12)), BLOCK)?;
        let total = u64_at(s, 32);
        if total != geo.total {
            return Err(format!(
                "the layout was made for a disk of {total} blocks of 4 KiB, this disk has {} \
                 (it was resized, or the header is damaged)",
                geo.total
            ));
        }
        named("guest_blocks", u64_at(s, 40), geo.n)?;
        named("tree_start", u64_at(s, 48), TREE_START / BLOCK)?;
        named("data_start", u64_at(s, 56), geo.data_start)?;
        named("levels", u64::from(u32_at(s, 64)), geo.levels.len() as u64)?;
        if s[68..72]
            .iter()
            .chain(&s[120..HEADER_MAC_AT])
            .any(|&b| b != 0)
        {
            return Err("header reserved bytes are not zero: the header is damaged".into());
        }
        let root = Child::decode(&s[80..104])
            .ok_or("header field root is malformed: the header is damaged")?;
        let mut disk_id = [0u8; 16];
        disk_id.copy_from_slice(&s[16..32]);
        let mut key_check = [0u8; 16];
        key_check.copy_from_slice(&s[104..120]);
        if (keys.check)(&disk_id) != key_check {
            return Err(
                "wrong key: it does not match this disk's key check (or the header's disk id \
                 or key check was altered)"
                    .into(),
            );
        }
        if mac16(keys.mac, &[&s[..HEADER_MAC_AT]]) != s[HEADER_MAC_AT..] {
            return Err("the header fails its MAC: it was altered or damaged".into());
        }
        Ok(Header {
            disk_id,
            total,
            n: geo.n,
            tree_start: TREE_START / BLOCK,
            data_start: geo.data_start,
            levels: geo.levels.len() as u32,
            generation: u64_at(s, 72),
            root,
            key_check,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_fits_the_disk_and_regions_do_not_overlap() {
        for total in [4u64, 5, 100, 4096, 262_144, 1_000_003, 1 << 29, 1 << 40] {
            let g = Geometry::for_disk(total).unwrap();
            assert!(g.data_start + 2 * g.n <= total, "{total}");
            let bigger = tree(g.n + 1).unwrap();
            assert!(
                bigger.1 + 2 * (g.n + 1) > total,
                "{total}: n is the largest"
            );
            let mut end = TREE_START;
            for (k, l) in g.levels.iter().enumerate() {
                assert!(l.start >= end, "{total}: level {k} overlaps");
                end = l.slot_offset(l.nodes - 1, 1) + l.node_bytes;
                let children = if k == 0 {
                    g.n.div_ceil(LEAF_ENTRIES as u64)
                } else {
                    g.levels[k - 1].nodes.div_ceil(NODE_RECORDS as u64)
                };
                assert_eq!(l.nodes, children.max(1));
            }
            assert_eq!(g.levels.last().unwrap().nodes, 1);
            assert!(end <= g.data_start * BLOCK);
            assert_eq!(
                g.slot_offset(g.n - 1, 1) + BLOCK,
                (g.data_start + 2 * g.n) * BLOCK
            );
        }
        assert!(Geometry::for_disk(3).is_none());
        assert!(
            Geometry::for_disk(u64::MAX / BLOCK).is_some(),
            "no overflow"
        );
    }

    fn keys_for(mac: &[u8; 32]) -> HeaderKeys<'_> {
        HeaderKeys {
            mac,
            check: &|id: &[u8; 16]| {
                let mut c = *id;
                c[0] ^= 0x55;
                c
            },
        }
    }

    #[test]
    fn a_header_round_trips_and_every_flipped_bit_is_refused() {
        let geo = Geometry::for_disk(1000).unwrap();
        let mac = [4u8; 32];
        let keys = keys_for(&mac);
        let mut id = [9u8; 16];
        let check = (keys.check)(&id);
        let mut h = Header::for_geometry(&geo, id, check);
        h.generation = 77;
        let raw = h.encode(&mac);
        assert_eq!(Header::decode(&raw, &geo, &keys), Ok(h.clone()));
        for bit in 0..HEADER_BYTES * 8 {
            let mut bad = raw;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(Header::decode(&bad, &geo, &keys).is_err(), "bit {bit}");
        }
        id[3] = 0;
        let other = Header::for_geometry(&geo, id, check).encode(&mac);
        let e = Header::decode(&other, &geo, &keys).unwrap_err();
        assert!(e.contains("wrong key"), "{e}");
    }

    #[test]
    fn arbitrary_header_bytes_never_panic_and_never_pass() {
        let geo = Geometry::for_disk(40_000).unwrap();
        let mac = [4u8; 32];
        let keys = keys_for(&mac);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for round in 0..2000 {
            let mut h: Vec<u8> = (0..HEADER_BYTES)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if round % 2 == 0 {
                h[..8].copy_from_slice(MAGIC);
                h[8..12].copy_from_slice(&VERSION.to_le_bytes());
            }
            assert!(Header::decode(&h, &geo, &keys).is_err());
        }
        assert!(Header::decode(&[0u8; 10], &geo, &keys).is_err(), "short");
    }

    #[test]
    fn a_damaged_field_is_named() {
        let geo = Geometry::for_disk(40_000).unwrap();
        let mac = [4u8; 32];
        let keys = keys_for(&mac);
        let id = [1u8; 16];
        let raw = Header::for_geometry(&geo, id, (keys.check)(&id)).encode(&mac);
        let field = |at: usize, name: &str| {
            let mut bad = raw;
            bad[at] ^= 1;
            let e = Header::decode(&bad, &geo, &keys).unwrap_err();
            assert!(e.contains(name), "{name}: {e}");
        };
        field(56, "data_start");
        field(48, "tree_start");
        field(40, "guest_blocks");
        field(64, "levels");
        field(32, "resized");
        field(8, "version");
        field(200, "reserved");
        field(72, "MAC");
        let mut v1 = raw;
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        let e = Header::decode(&v1, &geo, &keys).unwrap_err();
        assert!(e.contains("version 1") && e.contains("new disk"), "{e}");
    }
}
