//! Writes and commits, for hooks that run side by side (the plugin declares
//! `F_CONCURRENT`: the VMM may start several requests at once on a disk's hook pool, never
//! two on the same 4 KiB block).
//!
//! A write of whole blocks takes the state lock twice: first to choose each block's slot
//! (the one its durable version is not in) and reserve its nonce, then, once the blocks are
//! sealed and written without the lock, to record their entries and store their leaves. A
//! write of part of a block (read-modify-write) does all of it under the lock, as a
//! commit does. A commit waits for the writes between their two steps: one that made
//! durable a block's newest version while a write is replacing the data of the slot that
//! version is in would leave, after a crash, a durable entry whose data is gone.

use super::*;
use std::sync::MutexGuard;

/// One block of a write of whole blocks, chosen under the lock.
struct Planned {
    piece: BlockPiece,
    slot: u8,
    durable: Option<Fallback>,
    counter: u64,
}

impl Encrypt {
    pub(crate) fn write(&self, req: &mut Request<'_>) -> Res<()> {
        let clear = req.disabled();
        let whole = req.offset().is_multiple_of(BLOCK) && req.len().is_multiple_of(BLOCK);
        if !whole {
            return self.write_locked(req, clear);
        }
        // 1. Under the lock: each block's slot and nonce; then the write counts as one
        // that a commit must wait for.
        let plan = {
            let mut st = self.lock_for_writing()?;
            let mut plan = Vec::new();
            for piece in block_pieces(req.offset(), req.len(), BLOCK) {
                let (durable, slot) = self.next_slot(&mut st, piece.block)?;
                let counter = self.sealer.reserve()?;
                plan.push(Planned {
                    piece,
                    slot,
                    durable,
                    counter,
                });
            }
            st.writing += 1;
            plan
        };
        // 2. Without it: seal and store each block.
        let mode = if clear { Mode::Clear } else { Mode::Encrypted };
        let mut written = Vec::with_capacity(plan.len());
        let mut result = Ok(());
        for p in &plan {
            let mut data = vec![0u8; BLOCK as usize];
            let stored = req
                .read_data(p.piece.at, &mut data)
                .map_err(|e| format!("{e:?}"))
                .and_then(|()| {
                    self.sealer
                        .seal_at(p.counter, p.piece.block, mode, p.slot, &mut data)
                })
                .and_then(|version| {
                    let at = self.geo.slot_offset(p.piece.block, p.slot);
                    self.lower.write(at, &data).map_err(io).map(|()| version)
                });
            match stored {
                Ok(version) => written.push((p, version)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // 3. Under the lock again: the entries of what reached the disk, each leaf once.
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let recorded = self.record(&mut st, &written, clear);
        st.writing -= 1;
        self.idle.notify_all();
        result = result.and(recorded);
        if result.is_ok() && st.tree.dirty_leaves() >= MAX_DIRTY_LEAVES {
            return self.commit(st);
        }
        result
    }

    /// Records the entries of blocks written (their data is on the disk) and stores each
    /// leaf they are in once, after its blocks (any order of the two is crash-safe:
    /// docs/encryption.md), also when one fails.
    fn record(&self, st: &mut State, written: &[(&Planned, Version)], clear: bool) -> Res<()> {
        let mut pending: Option<u64> = None;
        let mut result = Ok(());
        for (p, version) in written {
            let leaf = p.piece.block / LEAF_ENTRIES as u64;
            if let Some(done) = pending.filter(|&l| l != leaf) {
                result = result.and(st.tree.store_leaf(&self.lower, done * LEAF_ENTRIES as u64));
            }
            let entry = Entry {
                cur: Current::Stored(*version),
                prev: p.durable,
            };
            match st.tree.set_entry(&self.lower, p.piece.block, entry) {
                Ok(()) => self.count_block(clear),
                Err(e) => result = result.and(Err(e)),
            }
            pending = Some(leaf);
        }
        if let Some(last) = pending {
            result = result.and(st.tree.store_leaf(&self.lower, last * LEAF_ENTRIES as u64));
        }
        result
    }

    /// A write with a part of a block: all under the lock.
    fn write_locked(&self, req: &mut Request<'_>, clear: bool) -> Res<()> {
        let mut st = self.lock_for_writing()?;
        // Each leaf is written once per request, after the data of its blocks, also when a
        // block fails.
        let mut pending: Option<u64> = None;
        let mut result = Ok(());
        for p in block_pieces(req.offset(), req.len(), BLOCK) {
            let leaf = p.block / LEAF_ENTRIES as u64;
            if let Some(done) = pending.filter(|&l| l != leaf) {
                pending = None;
                result = st.tree.store_leaf(&self.lower, done * LEAF_ENTRIES as u64);
                if result.is_err() {
                    break;
                }
            }
            result = self.write_piece(req, &mut st, p, clear);
            if result.is_err() {
                break;
            }
            pending = Some(leaf);
        }
        if let Some(last) = pending {
            let stored = st.tree.store_leaf(&self.lower, last * LEAF_ENTRIES as u64);
            result = result.and(stored);
        }
        if result.is_ok() && st.tree.dirty_leaves() >= MAX_DIRTY_LEAVES {
            return self.commit(st);
        }
        result
    }

    /// One block of a write: the block's new plaintext (read-modify-write for a part of
    /// it), sealed and stored.
    fn write_piece(
        &self,
        req: &Request<'_>,
        st: &mut State,
        p: BlockPiece,
        clear: bool,
    ) -> Res<()> {
        let mut data = if p.is_whole(BLOCK) {
            vec![0u8; BLOCK as usize]
        } else {
            self.stats.read_modify_writes.fetch_add(1, Relaxed);
            self.read_block(st, p.block)?
        };
        req.read_data(p.at, &mut data[p.range()])
            .map_err(|e| format!("{e:?}"))?;
        self.write_block(st, p.block, data, clear)
    }

    /// Stores a whole block's data in the slot its committed version is not in and updates
    /// its entry in memory; the caller writes the leaf.
    fn write_block(&self, st: &mut State, block: u64, mut data: Vec<u8>, clear: bool) -> Res<()> {
        let (durable, slot) = self.next_slot(st, block)?;
        let mode = if clear { Mode::Clear } else { Mode::Encrypted };
        let version = self.sealer.seal(block, mode, slot, &mut data)?;
        self.lower
            .write(self.geo.slot_offset(block, slot), &data)
            .map_err(io)?;
        st.tree.set_entry(
            &self.lower,
            block,
            Entry {
                cur: Current::Stored(version),
                prev: durable,
            },
        )?;
        self.count_block(clear);
        Ok(())
    }

    /// What the last commit made durable of `block` (kept as its fallback until the next
    /// one), and the slot its next version goes to: the other one.
    fn next_slot(&self, st: &mut State, block: u64) -> Res<(Option<Fallback>, u8)> {
        let entry = self.entry(st, block)?;
        let durable = match (entry.prev, entry.cur) {
            (Some(f), _) => Some(f),
            (None, Current::Never) => Some(Fallback::Zeros),
            (None, Current::Stored(v)) => Some(Fallback::Version(v)),
            (None, Current::Unreadable) => None,
        };
        let slot = match durable {
            Some(Fallback::Version(v)) => 1 - v.slot,
            _ => 0,
        };
        Ok((durable, slot))
    }

    fn count_block(&self, clear: bool) {
        let counter = if clear {
            &self.stats.blocks_clear
        } else {
            &self.stats.blocks_encrypted
        };
        counter.fetch_add(1, Relaxed);
    }

    /// The state, once no commit is under way (a write chooses no slot during one), and
    /// only if the tree takes writes.
    fn lock_for_writing(&self) -> Res<MutexGuard<'_, State>> {
        let mut st = self.state.lock().map_err(|_| "state lock poisoned")?;
        while st.committing {
            st = self.idle.wait(st).map_err(|_| "state lock poisoned")?;
        }
        st.tree.writable()?;
        Ok(st)
    }

    /// Commits, once the writes between choosing their slots and recording their entries
    /// are done (and no other commit is under way).
    pub(crate) fn commit(&self, mut st: MutexGuard<'_, State>) -> Res<()> {
        while st.committing {
            st = self.idle.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.committing = true;
        while st.writing > 0 {
            st = self.idle.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        let result = st.tree.commit(&self.lower, &self.header_key);
        st.committing = false;
        self.idle.notify_all();
        result
    }

    pub(crate) fn flush(&self) -> Res<()> {
        let st = self.state.lock().map_err(|_| "state lock poisoned")?;
        self.commit(st)
    }
}
