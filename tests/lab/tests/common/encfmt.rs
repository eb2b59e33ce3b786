//! An independent reader of the encryption plugin's on-disk format, written from the tables
//! in docs/encryption.md (not from the plugin's code): the tamper tests use it to find,
//! move, roll back and forge what an attacker who can write the image would.

pub const BLOCK: usize = 4096;
pub const HEADER_BYTES: usize = 512;
pub const LEAF_BYTES: usize = 512;
const CTX_HEADER: &str = "vmm encrypt interceptor v2 2026-12 header MAC";

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// The fields of one header copy (0: A at byte 0, 1: B at byte 512).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub disk_id: Vec<u8>,
    pub n: usize,
    pub data_start: usize,
    pub generation: u64,
}

pub fn header(image: &[u8], copy: usize) -> Header {
    let h = &image[copy * HEADER_BYTES..(copy + 1) * HEADER_BYTES];
    assert_eq!(&h[..8], b"VMMCRYPT");
    assert_eq!(u32::from_le_bytes(h[8..12].try_into().unwrap()), 2);
    Header {
        disk_id: h[16..32].to_vec(),
        n: u64_at(h, 40) as usize,
        data_start: u64_at(h, 56) as usize,
        generation: u64_at(h, 72),
    }
}

/// The newest valid-looking header copy (the higher generation).
pub fn newest(image: &[u8]) -> Header {
    let (a, b) = (header(image, 0), header(image, 1));
    if b.generation > a.generation {
        b
    } else {
        a
    }
}

/// Byte offset of slot `slot` of the leaf holding guest block `block` (4 entries a leaf).
pub fn leaf_offset(block: usize, slot: usize) -> usize {
    BLOCK + (2 * (block / 4) + slot) * LEAF_BYTES
}

/// The generation a stored leaf was written in.
pub fn leaf_generation(image: &[u8], block: usize, slot: usize) -> u64 {
    let at = leaf_offset(block, slot);
    assert_eq!(&image[at..at + 8], b"VMMCNODE");
    u64_at(image, at + 24)
}

/// Byte offset of data slot `slot` of guest block `block`.
pub fn data_offset(h: &Header, block: usize, slot: usize) -> usize {
    (h.data_start + slot * h.n + block) * BLOCK
}

/// The data slot the newest version of `block` is in, per its entry in the leaf slot.
pub fn entry_slot(image: &[u8], block: usize, leaf_slot: usize) -> usize {
    let at = leaf_offset(block, leaf_slot) + 64 + (block % 4) * 96;
    assert!(
        matches!(image[at], 1 | 2),
        "block {block} has a stored version"
    );
    image[at + 1] as usize
}

/// Edits header copy `copy` with `edit`, then seals it with a valid MAC under `key`: what
/// someone holding the key (or a bug) could write, to check that what the plugin trusts in
/// the header cannot make it misbehave.
pub fn forge_header(image: &mut [u8], copy: usize, key: &[u8; 32], edit: impl FnOnce(&mut [u8])) {
    let h = &mut image[copy * HEADER_BYTES..(copy + 1) * HEADER_BYTES];
    edit(h);
    let k = blake3::derive_key(CTX_HEADER, key);
    let mac = blake3::keyed_hash(&k, &h[..HEADER_BYTES - 16]);
    h[HEADER_BYTES - 16..].copy_from_slice(&mac.as_bytes()[..16]);
}

/// The leaf slot holding the committed version of `block`'s leaf on an image closed in
/// order (nothing written since the last commit): the one of the higher generation.
pub fn committed_leaf_slot(image: &[u8], block: usize) -> usize {
    let gen = |slot: usize| {
        let at = leaf_offset(block, slot);
        (&image[at..at + 8] == b"VMMCNODE").then(|| u64_at(image, at + 24))
    };
    match (gen(0), gen(1)) {
        (Some(a), Some(b)) if b > a => 1,
        (Some(_), _) => 0,
        (None, Some(_)) => 1,
        (None, None) => panic!("block {block}'s leaf was never written"),
    }
}
