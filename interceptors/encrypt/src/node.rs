//! The metadata tree's nodes as bytes (all little-endian; docs/encryption.md has the table).
//!
//! Every node starts with a 64-byte head: magic, level, index, the generation it was
//! written in and a keyed BLAKE3 MAC over the whole node with the MAC's 16 bytes zero. The key is
//! derived from the disk's key and its disk id, so a node is bound to its disk, its level,
//! its index and its generation. A leaf (512 bytes) holds the entries of 4 guest blocks; an
//! inner node (4 KiB) holds 128 child records, each naming the slot of the child's
//! committed version and its MAC, so the header's root record authenticates everything.

pub const HEAD_BYTES: usize = 64;
pub const LEAF_BYTES: usize = 512;
pub const LEAF_ENTRIES: usize = 4;
pub const ENTRY_BYTES: usize = 96;
pub const NODE_BYTES: usize = 4096;
pub const NODE_RECORDS: usize = 128;
pub const RECORD_BYTES: usize = 24;
const MAGIC: &[u8; 8] = b"VMMCNODE";
const MAC_AT: usize = 48;

/// A parent's record of one child: where its committed version is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Child {
    /// Never written: every block below reads as zeros.
    Empty,
    /// Found damaged when it was last needed: every block below fails to read until written.
    Unreadable,
    At {
        slot: u8,
        mac: [u8; 16],
    },
}

const CHILD_EMPTY: u8 = 0xff;
const CHILD_UNREADABLE: u8 = 0xee;

impl Child {
    pub fn encode(&self, out: &mut [u8]) {
        out[..RECORD_BYTES].fill(0);
        match self {
            Child::Empty => out[0] = CHILD_EMPTY,
            Child::Unreadable => out[0] = CHILD_UNREADABLE,
            Child::At { slot, mac } => {
                out[0] = *slot;
                out[8..24].copy_from_slice(mac);
            }
        }
    }

    pub fn decode(b: &[u8]) -> Option<Child> {
        if b[1..8].iter().any(|&x| x != 0) {
            return None;
        }
        let mac_zero = b[8..24].iter().all(|&x| x == 0);
        match b[0] {
            CHILD_EMPTY if mac_zero => Some(Child::Empty),
            CHILD_UNREADABLE if mac_zero => Some(Child::Unreadable),
            slot @ (0 | 1) => {
                let mut mac = [0u8; 16];
                mac.copy_from_slice(&b[8..24]);
                Some(Child::At { slot, mac })
            }
            _ => None,
        }
    }

    /// The slot the next version of this child goes to: never the committed one.
    pub fn next_slot(&self) -> u8 {
        match self {
            Child::At { slot, .. } => 1 - slot,
            _ => 0,
        }
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

/// One stored version of a block: where it is and how to open it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub mode: Mode,
    pub slot: u8,
    /// The open that wrote it: its data key is derived from it.
    pub open_id: [u8; 16],
    /// The write's number in that open: the GCM nonce.
    pub counter: u64,
    pub tag: [u8; 16],
}

/// What a block held at the last commit, kept until the next one in case the newest
/// version never reached the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    Zeros,
    Version(Version),
}

/// A block's newest version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Current {
    /// Never written: zeros.
    #[default]
    Never,
    /// Its metadata was found damaged: reads fail until it is written again.
    Unreadable,
    Stored(Version),
}

/// A block's entry: its newest version and, while that is not yet committed, the fallback.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub cur: Current,
    pub prev: Option<Fallback>,
}

const STATE_NONE: u8 = 0;
const STATE_ZEROS: u8 = 3;
const STATE_UNREADABLE: u8 = 0xee;

fn put_version(v: &Version, out: &mut [u8]) {
    out[0] = v.mode as u8;
    out[1] = v.slot;
    out[8..24].copy_from_slice(&v.open_id);
    out[24..32].copy_from_slice(&v.counter.to_le_bytes());
    out[32..48].copy_from_slice(&v.tag);
}

fn get_version(b: &[u8]) -> Option<Version> {
    let mode = match b[0] {
        1 => Mode::Encrypted,
        2 => Mode::Clear,
        _ => return None,
    };
    if b[1] > 1 || b[2..8].iter().any(|&x| x != 0) {
        return None;
    }
    let mut open_id = [0u8; 16];
    open_id.copy_from_slice(&b[8..24]);
    let mut counter = [0u8; 8];
    counter.copy_from_slice(&b[24..32]);
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&b[32..48]);
    Some(Version {
        mode,
        slot: b[1],
        open_id,
        counter: u64::from_le_bytes(counter),
        tag,
    })
}

/// A state byte with nothing after it.
fn bare(b: &[u8], state: u8) -> bool {
    b[0] == state && b[1..48].iter().all(|&x| x == 0)
}

impl Entry {
    fn encode(&self, out: &mut [u8]) {
        out[..ENTRY_BYTES].fill(0);
        match &self.cur {
            Current::Never => {}
            Current::Unreadable => out[0] = STATE_UNREADABLE,
            Current::Stored(v) => put_version(v, &mut out[..48]),
        }
        match &self.prev {
            None => {}
            Some(Fallback::Zeros) => out[48] = STATE_ZEROS,
            Some(Fallback::Version(v)) => put_version(v, &mut out[48..96]),
        }
    }

    fn decode(b: &[u8]) -> Option<Entry> {
        let (c, p) = (&b[..48], &b[48..96]);
        let cur = if bare(c, STATE_NONE) {
            Current::Never
        } else if bare(c, STATE_UNREADABLE) {
            Current::Unreadable
        } else {
            Current::Stored(get_version(c)?)
        };
        let prev = if bare(p, STATE_NONE) {
            None
        } else if bare(p, STATE_ZEROS) {
            Some(Fallback::Zeros)
        } else {
            Some(Fallback::Version(get_version(p)?))
        };
        // A fallback only stands behind a stored version.
        if prev.is_some() && !matches!(cur, Current::Stored(_)) {
            return None;
        }
        Some(Entry { cur, prev })
    }
}

/// What a node holds.
// Leaves are most of the cache: inline, not one more allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Leaf([Entry; LEAF_ENTRIES]),
    Inner(Vec<Child>),
}

impl Body {
    /// A never-written node of `level`.
    pub fn empty(level: u32) -> Body {
        if level == 0 {
            Body::Leaf([Entry::default(); LEAF_ENTRIES])
        } else {
            Body::Inner(vec![Child::Empty; NODE_RECORDS])
        }
    }

    /// A node found damaged: everything below it fails to read until written.
    pub fn unreadable(level: u32) -> Body {
        if level == 0 {
            Body::Leaf(
                [Entry {
                    cur: Current::Unreadable,
                    prev: None,
                }; LEAF_ENTRIES],
            )
        } else {
            Body::Inner(vec![Child::Unreadable; NODE_RECORDS])
        }
    }
}

/// The MAC of a node whose MAC field is zero: one keyed BLAKE3 call over the whole node, so
/// that a 4 KiB node is hashed four chunks at a time (SIMD), not block by block.
fn mac(key: &[u8; 32], node: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::keyed_hash(key, node).as_bytes()[..16]);
    out
}

pub fn node_bytes(level: u32) -> usize {
    if level == 0 {
        LEAF_BYTES
    } else {
        NODE_BYTES
    }
}

/// A node as stored, and its MAC (what its parent records).
pub fn encode(
    body: &Body,
    level: u32,
    index: u64,
    generation: u64,
    key: &[u8; 32],
) -> (Vec<u8>, [u8; 16]) {
    let mut b = vec![0u8; node_bytes(level)];
    b[..8].copy_from_slice(MAGIC);
    b[8..12].copy_from_slice(&level.to_le_bytes());
    b[16..24].copy_from_slice(&index.to_le_bytes());
    b[24..32].copy_from_slice(&generation.to_le_bytes());
    match body {
        Body::Leaf(entries) => {
            for (k, e) in entries.iter().enumerate() {
                let at = HEAD_BYTES + k * ENTRY_BYTES;
                e.encode(&mut b[at..at + ENTRY_BYTES]);
            }
        }
        Body::Inner(children) => {
            for (k, c) in children.iter().enumerate() {
                let at = HEAD_BYTES + k * RECORD_BYTES;
                c.encode(&mut b[at..at + RECORD_BYTES]);
            }
        }
    }
    let m = mac(key, &b);
    b[MAC_AT..HEAD_BYTES].copy_from_slice(&m);
    (b, m)
}

/// A stored node that passed its own MAC and is the node it should be.
pub struct Decoded {
    pub body: Body,
    pub generation: u64,
    pub mac: [u8; 16],
}

/// Checks and parses a stored node of `level` and `index`; `None` if it is not one (never
/// written, damaged, altered, of another disk, or of another place in the tree).
pub fn decode(b: &[u8], level: u32, index: u64, key: &[u8; 32]) -> Option<Decoded> {
    if b.len() != node_bytes(level) || &b[..8] != MAGIC {
        return None;
    }
    let mut zeroed = b.to_vec();
    zeroed[MAC_AT..HEAD_BYTES].fill(0);
    let m = mac(key, &zeroed);
    if b[MAC_AT..HEAD_BYTES] != m {
        return None;
    }
    let u64_at = |o: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(x)
    };
    let mut lv = [0u8; 4];
    lv.copy_from_slice(&b[8..12]);
    if u32::from_le_bytes(lv) != level
        || u64_at(16) != index
        || b[12..16].iter().chain(&b[32..MAC_AT]).any(|&x| x != 0)
    {
        return None;
    }
    let body = if level == 0 {
        let mut entries = [Entry::default(); LEAF_ENTRIES];
        for (k, e) in entries.iter_mut().enumerate() {
            let at = HEAD_BYTES + k * ENTRY_BYTES;
            *e = Entry::decode(&b[at..at + ENTRY_BYTES])?;
        }
        if b[HEAD_BYTES + LEAF_ENTRIES * ENTRY_BYTES..]
            .iter()
            .any(|&x| x != 0)
        {
            return None;
        }
        Body::Leaf(entries)
    } else {
        let mut children = Vec::with_capacity(NODE_RECORDS);
        for k in 0..NODE_RECORDS {
            let at = HEAD_BYTES + k * RECORD_BYTES;
            children.push(Child::decode(&b[at..at + RECORD_BYTES])?);
        }
        if b[HEAD_BYTES + NODE_RECORDS * RECORD_BYTES..]
            .iter()
            .any(|&x| x != 0)
        {
            return None;
        }
        Body::Inner(children)
    };
    Some(Decoded {
        body,
        generation: u64_at(24),
        mac: m,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(slot: u8, counter: u64) -> Version {
        Version {
            mode: Mode::Encrypted,
            slot,
            open_id: [slot + 7; 16],
            counter,
            tag: [slot + 5; 16],
        }
    }

    #[test]
    fn nodes_round_trip_and_any_flipped_bit_or_other_place_is_refused() {
        let key = [9u8; 32];
        let leaf = Body::Leaf([
            Entry {
                cur: Current::Stored(v(1, 3)),
                prev: Some(Fallback::Version(v(0, 1))),
            },
            Entry {
                cur: Current::Stored(v(0, 2)),
                prev: Some(Fallback::Zeros),
            },
            Entry::default(),
            Entry {
                cur: Current::Unreadable,
                prev: None,
            },
        ]);
        let mut children = vec![Child::Empty; NODE_RECORDS];
        children[3] = Child::At {
            slot: 1,
            mac: [4; 16],
        };
        children[9] = Child::Unreadable;
        for (level, body) in [(0, leaf), (2, Body::Inner(children))] {
            let (raw, m) = encode(&body, level, 42, 7, &key);
            let d = decode(&raw, level, 42, &key).unwrap();
            assert_eq!((d.body, d.generation, d.mac), (body.clone(), 7, m));
            assert!(decode(&raw, level, 43, &key).is_none(), "another index");
            assert!(decode(&raw, level + 1, 42, &key).is_none(), "another level");
            assert!(
                decode(&raw, level, 42, &[8u8; 32]).is_none(),
                "another disk"
            );
            for bit in (0..raw.len() * 8).step_by(if level == 0 { 1 } else { 7 }) {
                let mut bad = raw.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(decode(&bad, level, 42, &key).is_none(), "bit {bit}");
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_never_pass() {
        // What an attacker may put in a node slot: random bytes, and random bytes behind a
        // valid magic and head. None verifies without the key (and none panics).
        let key = [9u8; 32];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        };
        for round in 0..2000 {
            let level = round % 3;
            let mut b: Vec<u8> = (0..node_bytes(level)).map(|_| next()).collect();
            if round % 2 == 0 {
                b[..8].copy_from_slice(MAGIC);
                b[8..12].copy_from_slice(&level.to_le_bytes());
                b[12..48].fill(0);
            }
            assert!(decode(&b, level, 0, &key).is_none());
            let _ = Child::decode(&b[..RECORD_BYTES]);
            let _ = Entry::decode(&b[..ENTRY_BYTES]);
        }
    }

    #[test]
    fn records_pick_the_slot_that_is_not_committed() {
        assert_eq!(Child::Empty.next_slot(), 0);
        assert_eq!(
            Child::At {
                slot: 0,
                mac: [0; 16]
            }
            .next_slot(),
            1
        );
        let mut b = [0u8; RECORD_BYTES];
        Child::At {
            slot: 1,
            mac: [3; 16],
        }
        .encode(&mut b);
        b[0] = 2;
        assert_eq!(Child::decode(&b), None);
    }
}
