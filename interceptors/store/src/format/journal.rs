//! Journal blocks: version 2's two keyed copies of a half block, version 1's single
//! unkeyed block (docs/store.md, "Journal block").

use super::*;

/// The key of the journal's checks, derived from the store's key: a journal block that
/// another store left on the device (one formatted over it) never passes for this one's,
/// whatever its sequence number.
pub fn journal_key(store_key: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key("vmm extent-store journal 2", store_key)
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
    use crate::format::Codec;

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
