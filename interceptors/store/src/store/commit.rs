//! Commits and checkpoints: what makes the changes in memory durable, in the order crash
//! consistency needs (docs/store.md, "Commits and crash consistency").

use super::{io, Store, MAX_DIRTY};
use crate::format::{encode_journal_block, Entry, RECORDS_PER_BLOCK};
use crate::{Device, StoreError, BLOCK};

impl<D: Device> Store<D> {
    pub(super) fn maybe_commit(&mut self) -> Result<(), StoreError> {
        if self.dirty.len() >= MAX_DIRTY {
            self.commit()?;
        }
        Ok(())
    }

    /// Makes every change so far durable: data, then the journal (or a checkpoint when the
    /// journal is full), each followed by a flush. Then held units become free.
    pub fn commit(&mut self) -> Result<(), StoreError> {
        if self.read_only {
            return io(self.dev.flush(), "flushing");
        }
        io(self.dev.flush(), "flushing data")?;
        if self.dirty.is_empty() {
            self.release();
            return Ok(());
        }
        // Each block changed since the last commit once, as it is now (in memory: changed
        // since the checkpoint).
        self.dirty.sort_unstable();
        self.dirty.dedup();
        let records: Vec<(u64, Entry)> = self
            .dirty
            .iter()
            .map(|&b| {
                let e = self.map.in_memory(b).ok_or_else(|| {
                    StoreError::Damaged(format!("block {b} changed, but its entry is not held"))
                })?;
                Ok((b, e))
            })
            .collect::<Result<_, StoreError>>()?;
        let need = records.len().div_ceil(RECORDS_PER_BLOCK) as u64;
        if self.journal_used + need > self.g.journal_blocks {
            return self.checkpoint();
        }
        let commit_seq = self.journal_seq;
        // Checked before anything is written: a counter at its end refuses the commit.
        self.journal_seq
            .checked_add(need + self.g.journal_blocks + 1)
            .ok_or_else(|| {
                StoreError::Damaged("the store's journal sequence number is at its end".into())
            })?;
        for chunk in records.chunks(RECORDS_PER_BLOCK) {
            let b = encode_journal_block(&self.journal_key, self.journal_seq, commit_seq, chunk);
            let at = (self.g.journal_start() + self.journal_pos) * BLOCK;
            io(self.dev.write(at, &b), "writing the journal")?;
            self.journal_seq += 1;
            self.journal_pos = (self.journal_pos + 1) % self.g.journal_blocks;
            self.journal_used += 1;
            self.stats.journal_blocks_written += 1;
        }
        io(self.dev.flush(), "flushing the journal")?;
        self.dirty.clear();
        self.stats.commits += 1;
        self.release();
        Ok(())
    }

    /// After a durable commit: the units it freed become free, and the device below is told
    /// (a thin layer there, such as another store, can then reuse them).
    pub(super) fn release(&mut self) {
        self.stats.units_reclaimed += self.space.held_units();
        for (first, n) in self.space.release_held() {
            if self.dev.discard(first * BLOCK, n * BLOCK).is_ok() {
                self.stats.units_discarded += n;
            }
        }
    }

    /// Writes the whole map to the other slot and a superblock naming it; the journal then
    /// starts over, with sequence numbers no earlier block can have.
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::ReadOnly);
        }
        io(self.dev.flush(), "flushing data")?;
        let slot = 1 - self.sb.checkpoint_slot;
        // Counters at their end (only an edited image gets there) refuse, never wrap: a
        // wrapped one would make an older state win at the next open.
        let exhausted =
            |what: &str| StoreError::Damaged(format!("the store's {what} is at its end"));
        let seq = self
            .sb
            .checkpoint_seq
            .checked_add(1)
            .ok_or_else(|| exhausted("checkpoint number"))?;
        let generation = self
            .sb
            .generation
            .checked_add(1)
            .ok_or_else(|| exhausted("superblock generation"))?;
        let written = self.map.write_checkpoint(&self.dev, seq, slot)?;
        io(self.dev.flush(), "flushing the checkpoint")?;
        let mut sb = self.sb.clone();
        sb.version = self.g.version();
        sb.generation = generation;
        sb.checkpoint_slot = slot;
        sb.checkpoint_seq = seq;
        sb.journal_pos = 0;
        // Past every sequence number a journal block of the last pass can hold.
        sb.journal_seq = self
            .journal_seq
            .checked_add(self.g.journal_blocks + 1)
            .filter(|s| s.checked_add(self.g.journal_blocks + 1).is_some())
            .ok_or_else(|| exhausted("journal sequence number"))?;
        // Both copies, one after the other: a crash tears at most one, and afterwards no
        // single damaged copy can take the store back to an older checkpoint.
        let bytes = sb.encode();
        for copy in [0, 1] {
            io(
                self.dev.write(copy * BLOCK, &bytes),
                "writing the superblock",
            )?;
            io(self.dev.flush(), "flushing the superblock")?;
        }
        self.journal_pos = 0;
        self.journal_seq = sb.journal_seq;
        self.journal_used = 0;
        self.sb = sb;
        self.map.finish(written);
        self.dirty.clear();
        self.stats.checkpoints += 1;
        self.stats.commits += 1;
        self.release();
        Ok(())
    }
}
