//! The extent store (under compression and dedup) opening images it did not write, and
//! images it wrote that were then tampered with.
//!
//! The input first builds a history: a small store formatted on a blank device and written
//! (whole blocks, raw or zstd extents, shared blocks, punched runs) over a few commits; then
//! tampers with the image (bits flipped, ranges overwritten or zeroed, anywhere: the
//! superblocks, the checkpoint slots and their directories, the map pages, the journal, the
//! data); then opens it (read-only or
//! not) and, if it opens, reads every block and runs the check.
//!
//! What must hold: nothing panics; a refusal is a `StoreError`; a block that reads back OK
//! after tampering holds what was written there last (or zeroes, or what an earlier commit
//! wrote), never other bytes; untampered, every block reads back its last committed
//! contents and the check is clean.

use crate::input::Input;
use extent_store::{block_check, Codec, MemDevice, NewExtent, OpenOptions, Store, Volume, BLOCK};
use std::collections::{HashMap, HashSet};

/// Two map pages (format 3), so that a checkpoint writes one or both and tampering can hit
/// either, the directory naming them, or a page's other slot.
const LOGICAL_BLOCKS: u64 = 300;
const DEVICE_BYTES: usize = 512 << 10;
const MAX_COMMITS: usize = 4;
const MAX_WRITES: usize = 6;
const MAX_TAMPERS: usize = 4;

fn options(read_only: bool) -> OpenOptions {
    OpenOptions {
        owner: "fuzz".into(),
        logical_blocks: LOGICAL_BLOCKS,
        journal_blocks: 4,
        owner_config: [0; 16],
        format: false,
        read_only,
    }
}

/// One block's contents from a seed byte (compressible or not).
fn contents(seed: u8) -> Vec<u8> {
    if seed & 1 == 0 {
        vec![seed; BLOCK as usize]
    } else {
        let mut x = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..BLOCK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }
}

pub fn store_open(data: &[u8]) {
    let mut inp = Input::new(data);
    let dev = MemDevice::new(DEVICE_BYTES);
    // Every version each block ever had (zeroes first), and its last committed one.
    let mut versions: HashMap<u64, HashSet<Vec<u8>>> = HashMap::new();
    let mut committed: HashMap<u64, Vec<u8>> = HashMap::new();
    let zero = vec![0u8; BLOCK as usize];
    {
        let Ok(mut store) = Store::open(dev.clone(), &options(false)) else {
            panic!("a blank device must format");
        };
        let mut current: HashMap<u64, Vec<u8>> = HashMap::new();
        for _ in 0..1 + inp.below(MAX_COMMITS) {
            for _ in 0..inp.below(MAX_WRITES + 1) {
                let first = inp.below(LOGICAL_BLOCKS as usize) as u64;
                let n = (1 + inp.below(4) as u64).min(LOGICAL_BLOCKS - first);
                match inp.u8() % 4 {
                    0 | 1 => {
                        let blocks: Vec<Vec<u8>> = (0..n).map(|_| contents(inp.u8())).collect();
                        let raw = blocks.concat();
                        let checks = blocks.iter().map(|b| block_check(store.key(), b)).collect();
                        let (codec, bytes) = match zstd::bulk::compress(&raw, 1) {
                            Ok(z) if inp.bool() && z.len() < raw.len() => (Codec::Zstd, z),
                            _ => (Codec::Raw, raw),
                        };
                        let x = NewExtent {
                            first_block: first,
                            codec,
                            bytes,
                            checks,
                        };
                        if store.write(vec![x]).is_ok() {
                            for (i, b) in blocks.into_iter().enumerate() {
                                current.insert(first + i as u64, b);
                            }
                        }
                    }
                    2 => {
                        let to = inp.below(LOGICAL_BLOCKS as usize) as u64;
                        if let Ok(e) = store.entry(first) {
                            if store.share_all(&[(to, e)]).is_ok() {
                                let c = current.get(&first).cloned().unwrap_or(zero.clone());
                                current.insert(to, c);
                            }
                        }
                    }
                    _ => {
                        if store.punch(first, n).is_ok() {
                            for b in first..first + n {
                                current.insert(b, zero.clone());
                            }
                        }
                    }
                }
                for (b, c) in &current {
                    versions.entry(*b).or_default().insert(c.clone());
                }
            }
            // A commit, or a checkpoint (which writes the map pages and their directory).
            let durable = if inp.bool() {
                store.checkpoint()
            } else {
                store.commit()
            };
            if durable.is_ok() {
                committed.extend(current.iter().map(|(b, c)| (*b, c.clone())));
            }
        }
        let clean = store.check_space();
        assert!(
            clean.is_empty(),
            "the store's own space disagrees: {clean:?}"
        );
    }
    let mut image = dev.snapshot();
    let tampers = inp.below(MAX_TAMPERS + 1);
    for _ in 0..tampers {
        let at = inp.below(image.len());
        let len = (1 + inp.below(64)).min(image.len() - at);
        match inp.u8() % 3 {
            0 => image[at] ^= 1 << (inp.u8() % 8),
            1 => image[at..at + len].fill(0),
            _ => {
                let b = inp.u8();
                image[at..at + len].fill(b);
            }
        }
    }
    let read_only = inp.bool();
    let store = match Store::open(MemDevice::from_bytes(image), &options(read_only)) {
        Ok(s) => s,
        Err(e) => {
            assert!(tampers > 0, "an untampered store was refused: {e}");
            trace!("refused: {e}");
            return;
        }
    };
    let Ok(mut vol) = Volume::new(store) else {
        return;
    };
    for block in 0..LOGICAL_BLOCKS {
        match vol.read_block(block) {
            Ok(got) => {
                let known = got == zero || versions.get(&block).is_some_and(|v| v.contains(&got));
                assert!(known, "block {block} reads back bytes never written there");
                if tampers == 0 {
                    let want = committed.get(&block).unwrap_or(&zero);
                    assert!(
                        &got == want,
                        "untampered block {block} is not its committed contents"
                    );
                }
            }
            Err(e) => assert!(tampers > 0, "untampered block {block} failed: {e}"),
        }
    }
    let (problems, _) = vol.check();
    if tampers == 0 {
        assert!(problems.is_empty(), "untampered store: {problems:?}");
    }
}
