//! Block addresses, many at a time.
//!
//! A 4 KiB block is a BLAKE3 tree of four 1 KiB chunks under two parents and a root. Hashed
//! one block at a time, the crate's SIMD runs at most four lanes (one per chunk) and the
//! three parents one by one, which leaves two thirds of an AVX-512 unit idle: `b3sum` over
//! one long message is about 1.4x faster. Here the same chunk of up to [`LANES`] blocks
//! goes through one `hash_many` call, then their parents and roots likewise, so every lane
//! carries a block, and the result is bit for bit `blake3::keyed_hash` of each block (a
//! test holds it to that on random blocks, for every count up to past two groups).
//!
//! `hash_many` is the crate's own multi-input compression, public but undocumented
//! ("for benchmarks only"), so the crate is pinned to the exact version this was written
//! and tested against (Cargo.toml); the flag values are BLAKE3's, fixed by its
//! specification.

use crate::Address;
use blake3::platform::{words_from_le_bytes_32, Platform};
use blake3::{IncrementCounter, CHUNK_LEN};

/// The bytes one address covers.
pub const BLOCK_LEN: usize = 4096;
const CHUNKS: usize = BLOCK_LEN / CHUNK_LEN;
/// Blocks hashed side by side: the widest SIMD the crate has (AVX-512, 16 x 32-bit).
pub const LANES: usize = 16;

// Domain flags of the BLAKE3 specification (section 2.1).
const CHUNK_START: u8 = 1 << 0;
const CHUNK_END: u8 = 1 << 1;
const PARENT: u8 = 1 << 2;
const ROOT: u8 = 1 << 3;
const KEYED_HASH: u8 = 1 << 4;

/// A block's address: the BLAKE3-256 of its contents keyed with the store's key.
pub fn address_of(key: &[u8; 32], block: &[u8]) -> Address {
    *blake3::keyed_hash(key, block).as_bytes()
}

/// The address of each block, in order: the same as [`address_of`] on each, computed
/// [`LANES`] 4 KiB blocks at a time (a block of any other length is hashed alone).
pub fn addresses_of(key: &[u8; 32], blocks: &[&[u8]]) -> Vec<Address> {
    let mut out = Vec::with_capacity(blocks.len());
    let mut group: Vec<&[u8; BLOCK_LEN]> = Vec::with_capacity(LANES);
    let flush = |group: &mut Vec<&[u8; BLOCK_LEN]>, out: &mut Vec<Address>| {
        hash_group(key, group, out);
        group.clear();
    };
    for b in blocks {
        match <&[u8; BLOCK_LEN]>::try_from(*b) {
            Ok(full) => {
                group.push(full);
                if group.len() == LANES {
                    flush(&mut group, &mut out);
                }
            }
            Err(_) => {
                flush(&mut group, &mut out);
                out.push(address_of(key, b));
            }
        }
    }
    flush(&mut group, &mut out);
    out
}

/// Appends the addresses of `blocks` (at most [`LANES`]) to `out`, in runs of 16, 8 or 4
/// (the crate's SIMD widths: a run of 5 would be 4 wide and then 1), the last up to 3 one
/// by one (one block alone fills 4 lanes with its own chunks).
fn hash_group(key: &[u8; 32], mut blocks: &[&[u8; BLOCK_LEN]], out: &mut Vec<Address>) {
    debug_assert!(blocks.len() <= LANES);
    while let Some(&width) = [16, 8, 4].iter().find(|&&w| w <= blocks.len()) {
        let (run, rest) = blocks.split_at(width);
        hash_run(key, run, out);
        blocks = rest;
    }
    out.extend(blocks.iter().map(|b| address_of(key, *b)));
}

/// Appends the addresses of `blocks` (at most [`LANES`]), hashed side by side, to `out`.
fn hash_run(key: &[u8; 32], blocks: &[&[u8; BLOCK_LEN]], out: &mut Vec<Address>) {
    let n = blocks.len();
    let platform = Platform::detect();
    let key_words = words_from_le_bytes_32(key);
    // Chunk c of every block at once: all at chunk counter c.
    let mut chunk_cvs = [[0u8; 32 * LANES]; CHUNKS];
    for (c, cvs) in chunk_cvs.iter_mut().enumerate() {
        let mut inputs: [&[u8; CHUNK_LEN]; LANES] = [&[0; CHUNK_LEN]; LANES];
        for (input, block) in inputs.iter_mut().zip(blocks) {
            let chunk = &block[c * CHUNK_LEN..(c + 1) * CHUNK_LEN];
            // Infallible: the range is CHUNK_LEN long.
            if let Ok(chunk) = chunk.try_into() {
                *input = chunk;
            }
        }
        platform.hash_many(
            &inputs[..n],
            &key_words,
            c as u64,
            IncrementCounter::No,
            KEYED_HASH,
            CHUNK_START,
            CHUNK_END,
            &mut cvs[..32 * n],
        );
    }
    // The two parents of each block: (chunk 0, chunk 1) and (chunk 2, chunk 3).
    let mut pairs = [[0u8; 64]; 2 * LANES];
    for i in 0..n {
        for half in 0..2 {
            let p = &mut pairs[2 * i + half];
            p[..32].copy_from_slice(&chunk_cvs[2 * half][32 * i..32 * (i + 1)]);
            p[32..].copy_from_slice(&chunk_cvs[2 * half + 1][32 * i..32 * (i + 1)]);
        }
    }
    let mut parent_cvs = [0u8; 32 * 2 * LANES];
    parent_nodes(
        platform,
        &key_words,
        &pairs[..2 * n],
        KEYED_HASH | PARENT,
        &mut parent_cvs,
    );
    // Each block's root over its two parents.
    let mut roots = [[0u8; 64]; LANES];
    for (i, r) in roots.iter_mut().take(n).enumerate() {
        r.copy_from_slice(&parent_cvs[64 * i..64 * (i + 1)]);
    }
    let mut root_cvs = [0u8; 32 * LANES];
    parent_nodes(
        platform,
        &key_words,
        &roots[..n],
        KEYED_HASH | PARENT | ROOT,
        &mut root_cvs,
    );
    for i in 0..n {
        let mut a = [0u8; 32];
        a.copy_from_slice(&root_cvs[32 * i..32 * (i + 1)]);
        out.push(a);
    }
}

/// Compresses each 64-byte parent block (two child chaining values) under `flags`: at
/// most `2 * LANES` of them.
fn parent_nodes(
    platform: Platform,
    key_words: &[u32; 8],
    blocks: &[[u8; 64]],
    flags: u8,
    out: &mut [u8],
) {
    let mut inputs: [&[u8; 64]; 2 * LANES] = [&[0; 64]; 2 * LANES];
    for (input, block) in inputs.iter_mut().zip(blocks) {
        *input = block;
    }
    platform.hash_many(
        &inputs[..blocks.len()],
        key_words,
        0,
        IncrementCounter::No,
        flags,
        0,
        0,
        &mut out[..32 * blocks.len()],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn many_at_once_equals_keyed_hash_of_each() {
        let key: [u8; 32] = random_bytes(1, 32).try_into().unwrap();
        let data = random_bytes(2, BLOCK_LEN * (2 * LANES + 3));
        for n in 0..=(2 * LANES + 3) {
            let blocks: Vec<&[u8]> = data.chunks(BLOCK_LEN).take(n).collect();
            let got = addresses_of(&key, &blocks);
            let want: Vec<Address> = blocks.iter().map(|b| address_of(&key, b)).collect();
            assert_eq!(got, want, "{n} blocks");
        }
    }

    #[test]
    fn blocks_of_other_lengths_keep_their_place() {
        let key = [7u8; 32];
        let data = random_bytes(3, 5 * BLOCK_LEN);
        let blocks: Vec<&[u8]> = vec![
            &data[..BLOCK_LEN],
            &data[BLOCK_LEN..BLOCK_LEN + 100],
            &data[2 * BLOCK_LEN..3 * BLOCK_LEN],
            &[],
            &data[3 * BLOCK_LEN..5 * BLOCK_LEN],
            &data[BLOCK_LEN..2 * BLOCK_LEN],
        ];
        let want: Vec<Address> = blocks.iter().map(|b| address_of(&key, b)).collect();
        assert_eq!(addresses_of(&key, &blocks), want);
    }

    #[test]
    fn the_key_matters() {
        let data = random_bytes(4, BLOCK_LEN);
        let a = addresses_of(&[1; 32], &[&data]);
        let b = addresses_of(&[2; 32], &[&data]);
        assert_ne!(a, b);
        assert_eq!(a[0], address_of(&[1; 32], &data));
    }
}
