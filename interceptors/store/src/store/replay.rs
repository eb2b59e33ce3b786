//! Opening a store's journal: the replay, told apart from damage, and what a writable open
//! puts right before the journal goes on (docs/store.md, "Damage" and "Commits").

use super::{io, Store};
use crate::format::{decode_journal_block, JournalBlock, Superblock};
use crate::{Device, StoreError, BLOCK};

/// What a replay found to put right before the journal can go on: journal positions past
/// the end holding blocks of a commit a crash cut short, and applied blocks with one
/// unreadable copy (position and the block as read).
#[derive(Default)]
pub(super) struct Repairs {
    remnants: Vec<u64>,
    half_blocks: Vec<(u64, Vec<u8>)>,
}

impl<D: Device> Store<D> {
    /// Applies the journal from the superblock's position, each block that is valid and the
    /// next in sequence. Where that stops must be where the last commit ended: a commit
    /// that had not completed may be torn anywhere in its blocks, but a valid block of a
    /// later commit past the stop (or of a later pass of the ring than the superblock's)
    /// proves that a durable block (or the newest superblock) is damaged, and the store is
    /// refused rather than served without flushed writes. Version 1 journals carry no
    /// commit marks and are replayed as before: up to the first block out of line.
    pub(super) fn replay(&mut self) -> Result<Repairs, StoreError> {
        let mut repairs = Repairs::default();
        let j = self.g.journal_blocks;
        let v2 = self.sb.version >= 2;
        // The first sequence number no block of this pass can carry.
        let pass_end = self.journal_seq.checked_add(j);
        // (position, sequence number expected there) where the replay stopped.
        let mut stop: Option<(u64, u64)> = None;
        let mut buf = vec![0u8; BLOCK as usize];
        for k in 0..j {
            let pos = (self.sb.journal_pos + k) % j;
            let at = (self.g.journal_start() + pos) * BLOCK;
            io(self.dev.read(at, &mut buf), "reading the journal")?;
            let (block, one_copy_bad) =
                decode_journal_block(&buf, self.sb.version, &self.journal_key, self.journal_seq);
            let (seq, commit_seq, records) = match block {
                JournalBlock::Damaged(why) => return Err(StoreError::Damaged(why)),
                JournalBlock::End => {
                    if stop.is_none() {
                        stop = Some((pos, self.journal_seq));
                    }
                    if v2 {
                        continue;
                    }
                    break;
                }
                JournalBlock::Records {
                    seq,
                    commit_seq,
                    records,
                } => (seq, commit_seq, records),
            };
            if stop.is_none() && seq == self.journal_seq {
                if one_copy_bad {
                    repairs.half_blocks.push((pos, buf.clone()));
                    self.recovered.push(format!(
                        "journal block {seq} (position {pos}): one of its two copies is unreadable \
                         (torn by a crash or damaged); the other was used"
                    ));
                }
                for (block, e) in records {
                    self.map.replay(block, e).map_err(|()| {
                        StoreError::Damaged(format!(
                            "journal block {seq} maps block {block}, past the end"
                        ))
                    })?;
                }
                self.journal_seq = self.journal_seq.checked_add(1).ok_or_else(|| {
                    StoreError::Damaged("the store's journal sequence number is at its end".into())
                })?;
                self.journal_pos = (self.journal_pos + 1) % j;
                self.journal_used += 1;
                continue;
            }
            let (stop_pos, expected) = *stop.get_or_insert((pos, self.journal_seq));
            if !v2 {
                break;
            }
            if pass_end.is_some_and(|end| seq >= end) {
                return Err(StoreError::Damaged(format!(
                    "journal block {seq} (position {pos}) was written after the newest readable \
                     superblock (generation {}), so a newer one is damaged",
                    self.sb.generation
                )));
            }
            if seq > expected && commit_seq.is_some_and(|c| c > expected) {
                return Err(StoreError::Damaged(format!(
                    "journal block {expected} (position {stop_pos}) is damaged: a later commit \
                     (journal block {seq}, position {pos}) follows it, so it was durable"
                )));
            }
            if seq > expected {
                // A block of the commit a crash cut short: new commits go where the replay
                // stopped, so it must not be taken for one of theirs later.
                repairs.remnants.push(pos);
            }
        }
        Ok(repairs)
    }

    /// After a writable open's replay: the journal goes on where the replay stopped, as if
    /// the store had never closed. What must be true first: no block of the commit a crash
    /// cut short is left past that point (zeroed), and what the open recovered from is
    /// written right again (the unreadable copy of a journal block or of the superblock,
    /// from the good one, never touching the good one).
    pub(super) fn repair_after_replay(
        &mut self,
        first: &[u8],
        copies: &[Result<Option<Superblock>, String>; 2],
        repairs: Repairs,
    ) -> Result<(), StoreError> {
        let mut wrote = false;
        for (pos, block) in &repairs.half_blocks {
            let at = (self.g.journal_start() + pos) * BLOCK;
            let half = BLOCK as usize / 2;
            let good = if crate::format::journal_copy_valid(&block[..half], &self.journal_key) {
                0
            } else {
                1
            };
            let bad = 1 - good;
            let fixed = block[good * half..(good + 1) * half].to_vec();
            io(
                self.dev.write(at + (bad * half) as u64, &fixed),
                "rewriting a journal block's damaged copy",
            )?;
            wrote = true;
        }
        for pos in &repairs.remnants {
            let at = (self.g.journal_start() + pos) * BLOCK;
            io(
                self.dev.write(at, &vec![0u8; BLOCK as usize]),
                "clearing the journal past its end",
            )?;
            wrote = true;
        }
        for (copy, c) in copies.iter().enumerate() {
            let bad = match c {
                Err(_) => true,
                Ok(Some(sb)) => sb.generation < self.sb.generation,
                Ok(None) => true,
            };
            if bad {
                let good = &first[(1 - copy) * BLOCK as usize..(2 - copy) * BLOCK as usize];
                io(
                    self.dev.write(copy as u64 * BLOCK, good),
                    "rewriting a superblock copy",
                )?;
                wrote = true;
            }
        }
        if wrote {
            io(self.dev.flush(), "flushing the journal's repairs")?;
        }
        Ok(())
    }

    /// The format version of the store now, and the one it was found in at open (a
    /// writable open rewrites an older store as [`VERSION`]).
    pub fn format_version(&self) -> (u32, u32) {
        (self.sb.version, self.opened_version)
    }
}
