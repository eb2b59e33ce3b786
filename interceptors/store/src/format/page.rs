//! Format 3's map pages and the checkpoint's directory of them (docs/store.md, "Map page"
//! and "Checkpoint slot").

use super::*;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Codec;

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
}
