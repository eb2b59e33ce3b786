//! The cache interceptor: an LRU of 4 KiB blocks (the `lru` crate) in front of the layers
//! below. A read whose blocks are all cached is answered at the pre point, without the
//! layers below (a hit); a miss goes down and fills the cache at the post point. A write that
//! goes down updates the cached blocks it touches, whole or in part, and fills nothing.
//!
//! Write-through by default. With `write_back = true`, a write whose every block is either
//! covered whole or already cached stays in the cache (dirty) and is completed at once (a
//! partial write to cached blocks too); any other goes down. Dirty blocks go down when
//! evicted, before every flush passes, when the instance is disabled, and at shutdown.
//! Disabled, the instance writes back what is dirty, drops the cache and passes everything
//! through.
//!
//! Write-back goes down in runs: dirty blocks adjacent on the disk are written with one
//! lower write of up to [`MAX_RUN_BLOCKS`] blocks (1 MiB). A flush writes back every run in
//! disk order; evicting a dirty block writes back the run around it, and the blocks of the
//! run other than the evicted one stay cached, clean, where they were in the LRU order.
//! A request that goes down first writes back the dirty blocks it touches: the device queue
//! runs requests on other blocks while it is in flight, and their evictions and write-backs
//! must find its blocks clean.
//!
//! Config: `size_mib` (default 64, at most [`MAX_SIZE_MIB`] and what the host has available),
//! `write_back` (default false). Memory is taken as blocks are cached, never all up front,
//! and each block's with a fallible allocation: a host out of memory fails that request.

use interceptor_sdk::{
    abi, block_pieces, export_interceptor, CreateContext, Decision, Interceptor, LogLevel, Lower,
    Request, RequestKind, Slot, Status,
};
use lru::LruCache;
use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};

const BLOCK: u64 = 4096;
/// The most blocks one write-back request carries: 1 MiB.
pub const MAX_RUN_BLOCKS: usize = 256;
/// The largest cache an instance may have: 1 TiB.
pub const MAX_SIZE_MIB: u64 = 1 << 20;
/// What a cached block costs beyond its data, at most (its list node, its slot in the map,
/// the allocator's rounding): counted when the size is checked against the host's memory.
const BLOCK_OVERHEAD: u64 = 128;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_size")]
    size_mib: u64,
    #[serde(default)]
    write_back: bool,
}

fn default_size() -> u64 {
    64
}

/// The number of blocks a cache of `size_mib` holds, if the size is allowed: at least 1 MiB,
/// at most [`MAX_SIZE_MIB`], and (with its overhead) within `available_mib`, the host's
/// available memory when it is known. Each refusal names the field and the bound.
fn size_blocks(size_mib: u64, available_mib: Option<u64>) -> Res<NonZeroUsize> {
    let field = format!("size_mib = {size_mib}");
    if size_mib == 0 {
        return Err(format!("{field}: must be at least 1"));
    }
    // The data and, per block, its overhead; saturated, it is over any host's memory.
    let needed_mib = size_mib
        .checked_mul(BLOCK + BLOCK_OVERHEAD)
        .map_or(u64::MAX, |b| b.div_ceil(BLOCK));
    if let Some(available) = available_mib {
        if needed_mib > available {
            return Err(format!(
                "{field}: more than the host's available memory ({available} MiB; the cache \
                 takes {needed_mib} MiB with its index)"
            ));
        }
    }
    if size_mib > MAX_SIZE_MIB {
        return Err(format!(
            "{field}: more than the largest cache allowed ({MAX_SIZE_MIB} MiB)"
        ));
    }
    // No overflow: size_mib <= 2^20.
    usize::try_from((size_mib << 20) / BLOCK)
        .ok()
        .and_then(NonZeroUsize::new)
        .ok_or_else(|| format!("{field}: too large for this host"))
}

/// What the cache holds: each block's data in LRU order, and which of them are dirty (newer
/// than the layers below), in disk order. `dirty` is always a subset of `lru`'s keys.
struct State {
    lru: LruCache<u64, Box<[u8]>>,
    dirty: BTreeSet<u64>,
    /// Where a run is gathered for its one lower write: kept (at most 1 MiB) so that
    /// write-back does not allocate and fault in a new buffer per run.
    gather: Vec<u8>,
}

impl State {
    /// Forgets a block, dirty or not.
    fn remove(&mut self, block: u64) {
        self.lru.pop(&block);
        self.dirty.remove(&block);
    }

    fn clear(&mut self) {
        self.lru.clear();
        self.dirty.clear();
        self.gather = Vec::new();
    }

    /// The dirty run that starts at `first` (dirty): how many adjacent dirty blocks follow
    /// it, itself included, at most `max`.
    fn run_from(&self, first: u64, max: usize) -> usize {
        let mut next = Some(first);
        self.dirty
            .range(first..)
            .take(max)
            .take_while(|&&b| {
                let adjacent = next == Some(b);
                next = b.checked_add(1);
                adjacent
            })
            .count()
    }

    /// The dirty run to write back with `block` (dirty): the adjacent dirty blocks from it
    /// upwards, then downwards, at most [`MAX_RUN_BLOCKS`] in all. Returns (first, count).
    fn run_around(&self, block: u64) -> (u64, usize) {
        let up = self.run_from(block, MAX_RUN_BLOCKS);
        let mut first = block;
        for &b in self
            .dirty
            .range(..block)
            .rev()
            .take(MAX_RUN_BLOCKS.saturating_sub(up))
        {
            if b.checked_add(1) != Some(first) {
                break;
            }
            first = b;
        }
        // first <= block, and block - first < MAX_RUN_BLOCKS.
        (first, up + (block - first) as usize)
    }
}

#[derive(Default)]
struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    /// Blocks written back.
    write_backs: AtomicU64,
    /// Lower writes those took (one per run).
    write_back_requests: AtomicU64,
    /// Writes completed here without going down (write-back).
    absorbed_writes: AtomicU64,
    /// Absorbed writes that covered a block in part (a cached one).
    partial_writes_absorbed: AtomicU64,
    /// Cached blocks that a write going down covered in part, updated rather than dropped.
    partial_updates: AtomicU64,
    errors: AtomicU64,
}

pub struct Cache {
    lower: Lower,
    write_back: bool,
    blocks: usize,
    state: Mutex<State>,
    stats: Stats,
}

/// Marks a request the pre hook answered itself (a hit, or a write absorbed by write-back):
/// its post hook has nothing to do.
struct Answered;

type Res<T> = Result<T, String>;

impl Cache {
    fn lock(&self) -> Res<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| "cache lock poisoned".to_string())
    }

    /// Writes back the `n` dirty blocks from `first` on (all cached and dirty) with one
    /// lower write; they stay cached, clean, where they are in the LRU order. On failure
    /// they stay dirty.
    fn write_back_run(&self, st: &mut State, first: u64, n: usize) -> Res<()> {
        let last = first
            .checked_add(n as u64)
            .ok_or("write-back run past the end")?;
        let offset = first
            .checked_mul(BLOCK)
            .ok_or("write-back offset overflows")?;
        let what = || format!("writing back blocks {first}..{last}");
        let gathered: &[u8] = if n == 1 {
            st.lru.peek(&first).ok_or("dirty block not cached")?
        } else {
            let bytes = n
                .checked_mul(BLOCK as usize)
                .ok_or("write-back run too large")?;
            let buf = &mut st.gather;
            buf.clear();
            buf.try_reserve_exact(bytes)
                .map_err(|_| format!("{}: out of memory", what()))?;
            for b in first..last {
                buf.extend_from_slice(st.lru.peek(&b).ok_or("dirty block not cached")?);
            }
            buf
        };
        self.stats.write_back_requests.fetch_add(1, Relaxed);
        self.stats.write_backs.fetch_add(n as u64, Relaxed);
        self.lower
            .write(offset, gathered)
            .map_err(|e| format!("{}: {e}", what()))?;
        for b in first..last {
            st.dirty.remove(&b);
        }
        Ok(())
    }

    /// Evicts until there is room for one more block. A dirty block goes down first, with
    /// the dirty run around it (see [`State::run_around`]), and stays cached if that fails.
    fn make_room(&self, st: &mut State) -> Res<()> {
        while st.lru.len() >= self.blocks {
            if let Some((&block, _)) = st.lru.peek_lru() {
                if st.dirty.contains(&block) {
                    let (first, n) = st.run_around(block);
                    self.write_back_run(st, first, n)?;
                }
            }
            if let Some((block, _)) = st.lru.pop_lru() {
                st.dirty.remove(&block);
            }
            self.stats.evictions.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    /// Caches `data` as `block`, which is not cached, evicting the least recently used block
    /// first if the cache is full.
    fn insert(&self, st: &mut State, block: u64, data: Box<[u8]>, dirty: bool) -> Res<()> {
        self.make_room(st)?;
        st.lru.put(block, data);
        if dirty {
            st.dirty.insert(block);
        }
        Ok(())
    }

    /// Writes back every dirty block, run by run in disk order; they stay cached, clean.
    fn write_back_all(&self, st: &mut State) -> Res<()> {
        while let Some(&first) = st.dirty.first() {
            let n = st.run_from(first, MAX_RUN_BLOCKS);
            self.write_back_run(st, first, n)?;
        }
        Ok(())
    }

    /// Before a request goes down (a read that misses, a write not absorbed): the dirty
    /// blocks it touches are written back, in runs. The device queue runs other requests, on
    /// other blocks, while this one is in flight, and their hooks may evict blocks and write
    /// back runs; it holds back any that touches this one's blocks. So, clean from here to
    /// the post hook, this request's blocks are never written back over what it writes, and
    /// a read never misses the newest data of a block evicted meanwhile (what it reads below
    /// is that data).
    fn write_back_touched(&self, st: &mut State, req: &Request<'_>) -> Res<()> {
        let end = req
            .offset()
            .checked_add(req.len())
            .ok_or("request past the end")?
            .div_ceil(BLOCK);
        let first = req.offset() / BLOCK;
        while let Some(&block) = st.dirty.range(first..end).next() {
            let n = st.run_from(block, MAX_RUN_BLOCKS);
            self.write_back_run(st, block, n)?;
        }
        Ok(())
    }

    /// Disabled: nothing may stay only here.
    fn drain(&self) -> Res<()> {
        let mut st = self.lock()?;
        if !st.lru.is_empty() {
            self.write_back_all(&mut st)?;
            st.clear();
        }
        Ok(())
    }

    /// A discard or write-zeroes goes down; what it touches is first written back (a part of
    /// a block it leaves stays right below) and then forgotten here (a cached copy would
    /// outlive the zeroes).
    fn pre_discard(&self, req: &Request<'_>) -> Res<Decision> {
        let mut guard = self.lock()?;
        let st = &mut *guard;
        self.write_back_touched(st, req)?;
        for p in block_pieces(req.offset(), req.len(), BLOCK) {
            st.remove(p.block);
        }
        Ok(Decision::Continue)
    }

    fn pre_read(&self, req: &mut Request<'_>, slot: &mut Slot) -> Res<Decision> {
        let mut st = self.lock()?;
        let all_cached =
            block_pieces(req.offset(), req.len(), BLOCK).all(|p| st.lru.contains(&p.block));
        if !all_cached {
            self.stats.misses.fetch_add(1, Relaxed);
            self.write_back_touched(&mut st, req)?;
            return Ok(Decision::Continue);
        }
        for p in block_pieces(req.offset(), req.len(), BLOCK) {
            let c = st.lru.get(&p.block).ok_or("cached block vanished")?;
            req.write_data(p.at, &c[p.range()])
                .map_err(|e| format!("{e:?}"))?;
        }
        self.stats.hits.fetch_add(1, Relaxed);
        *slot = Some(Box::new(Answered));
        Ok(Decision::Complete)
    }

    /// A read that went down. What is cached is newest: it wins over what came up, and is
    /// copied over the data first, before anything is cached, since caching a block may
    /// evict another block of the same read, which would then look uncached. (Its blocks
    /// were written back before it went down, so what came up is their data anyway: this
    /// order keeps it right without relying on that.) Then the whole blocks that were not
    /// cached are: their newest data is what came up.
    fn post_read(&self, req: &mut Request<'_>) -> Res<()> {
        let mut st = self.lock()?;
        let mut fill = Vec::new();
        for p in block_pieces(req.offset(), req.len(), BLOCK) {
            if let Some(c) = st.lru.get(&p.block) {
                req.write_data(p.at, &c[p.range()])
                    .map_err(|e| format!("{e:?}"))?;
            } else if p.is_whole(BLOCK) {
                fill.try_reserve(1)
                    .map_err(|_| "out of memory for a read's blocks".to_string())?;
                fill.push(p);
            }
        }
        for p in fill {
            // The read's blocks are distinct, so none of these is cached yet (checked all
            // the same: `insert` takes a block that is not).
            if !st.lru.contains(&p.block) {
                let data = Self::copy_block(req, p.at)?;
                self.insert(&mut st, p.block, data, false)?;
            }
        }
        Ok(())
    }

    fn pre_write(&self, req: &mut Request<'_>, slot: &mut Slot) -> Res<Decision> {
        if !self.write_back {
            return Ok(Decision::Continue);
        }
        let mut guard = self.lock()?;
        // Through the guard once, so that the LRU and the dirty set borrow apart.
        let st = &mut *guard;
        // Absorbed if every block it covers in part is cached: the cached copy is then the
        // whole block. Otherwise it goes down (see `post_write`).
        let absorbable = block_pieces(req.offset(), req.len(), BLOCK)
            .all(|p| p.is_whole(BLOCK) || st.lru.contains(&p.block));
        if !absorbable {
            self.write_back_touched(st, req)?;
            return Ok(Decision::Continue);
        }
        // The blocks it covers in part first: they are cached now, and caching the whole
        // ones may evict them (they would then go down with this write's data).
        let mut partial = false;
        for p in block_pieces(req.offset(), req.len(), BLOCK).filter(|p| !p.is_whole(BLOCK)) {
            let c = st.lru.get_mut(&p.block).ok_or("cached block vanished")?;
            // Dirty before the copy: if it fails half way, the copy differs from what is
            // below all the same.
            st.dirty.insert(p.block);
            req.read_data(p.at, &mut c[p.range()])
                .map_err(|e| format!("{e:?}"))?;
            partial = true;
        }
        for p in block_pieces(req.offset(), req.len(), BLOCK).filter(|p| p.is_whole(BLOCK)) {
            if let Some(c) = st.lru.get_mut(&p.block) {
                st.dirty.insert(p.block);
                req.read_data(p.at, c).map_err(|e| format!("{e:?}"))?;
            } else {
                let data = Self::copy_block(req, p.at)?;
                self.insert(st, p.block, data, true)?;
            }
        }
        self.stats.absorbed_writes.fetch_add(1, Relaxed);
        if partial {
            self.stats.partial_writes_absorbed.fetch_add(1, Relaxed);
        }
        *slot = Some(Box::new(Answered));
        Ok(Decision::Complete)
    }

    /// A write that went down (write-through, or write-back that could not absorb it): the
    /// cached blocks it touched take its data, whole or in part (writes do not fill the
    /// cache). They are clean (written back before it went down, see
    /// [`Cache::write_back_touched`]); should one be dirty, a block it covered whole is
    /// then what is below, clean, and one it covered in part stays dirty. A failed write
    /// leaves what it covered undefined below: a clean block it touched is dropped, a dirty
    /// one kept as it was, to be written back over whatever the write left.
    fn post_write(&self, req: &mut Request<'_>, ok: bool) -> Res<()> {
        let mut guard = self.lock()?;
        let st = &mut *guard;
        let mut failed = None;
        for p in block_pieces(req.offset(), req.len(), BLOCK) {
            let dirty = st.dirty.contains(&p.block);
            if !ok {
                if !dirty {
                    st.remove(p.block);
                }
                continue;
            }
            let Some(c) = st.lru.get_mut(&p.block) else {
                continue;
            };
            match req.read_data(p.at, &mut c[p.range()]) {
                Ok(()) if p.is_whole(BLOCK) => {
                    st.dirty.remove(&p.block);
                }
                Ok(()) => {
                    self.stats.partial_updates.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    // Half copied: a clean copy cannot be trusted; a dirty one keeps the
                    // rest of its data and is written back later (the guest gets an error
                    // for this write).
                    if !dirty {
                        st.remove(p.block);
                    }
                    failed = Some(format!("{e:?}"));
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// A copy of the block-sized piece of the request's data at `at`. The memory is taken
    /// fallibly: a host out of memory fails the request instead of aborting the VMM.
    fn copy_block(req: &Request<'_>, at: u64) -> Res<Box<[u8]>> {
        static ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];
        let mut data = Vec::new();
        data.try_reserve_exact(ZEROS.len())
            .map_err(|_| "out of memory for a cached block".to_string())?;
        // One copy (a memcpy even unoptimized), not a fill one byte at a time.
        data.extend_from_slice(&ZEROS);
        let mut data = data.into_boxed_slice();
        req.read_data(at, &mut data).map_err(|e| format!("{e:?}"))?;
        Ok(data)
    }

    fn failed(&self, e: String) -> Decision {
        self.stats.errors.fetch_add(1, Relaxed);
        self.lower.log(LogLevel::Warn, &e);
        Decision::Fail
    }
}

impl Interceptor for Cache {
    const NAME: &'static std::ffi::CStr = c"cache";
    // Dirty blocks may live only here: it must see requests while disabled to write them back.
    // Discard and write-zeroes pass down (after the blocks they touch are written back and
    // forgotten), so a chain under it that handles them is offered them.
    const FLAGS: u32 = abi::F_KEEP_WHEN_DISABLED | abi::F_HANDLES_DISCARD;

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let cfg: Config = ctx.config_as()?;
        let blocks = size_blocks(cfg.size_mib, interceptor_sdk::host_available_mib())
            .map_err(|e| format!("config: {e}"))?;
        Ok(Cache {
            lower: ctx.lower,
            write_back: cfg.write_back,
            blocks: blocks.get(),
            // Unbounded: the map grows as blocks are cached (`make_room` keeps it to
            // `blocks`), so no memory for the whole size is taken up front.
            state: Mutex::new(State {
                lru: LruCache::unbounded(),
                dirty: BTreeSet::new(),
                gather: Vec::new(),
            }),
            stats: Stats::default(),
        })
    }

    fn pre(&self, req: &mut Request<'_>, slot: &mut Slot) -> Decision {
        if req.disabled() {
            return match self.drain() {
                Ok(()) => Decision::Continue,
                Err(e) => self.failed(e),
            };
        }
        let decided = match req.kind() {
            RequestKind::Read => self.pre_read(req, slot),
            RequestKind::Write => self.pre_write(req, slot),
            RequestKind::Flush => self
                .lock()
                .and_then(|mut st| self.write_back_all(&mut st))
                .map(|()| Decision::Continue),
            RequestKind::Discard | RequestKind::WriteZeroes => self.pre_discard(req),
            _ => Ok(Decision::Continue),
        };
        decided.unwrap_or_else(|e| self.failed(e))
    }

    fn post(&self, req: &mut Request<'_>, slot: Slot, status: Status) -> Status {
        if req.disabled() || slot.is_some_and(|s| s.is::<Answered>()) {
            return status;
        }
        let ok = status == Status::Ok;
        let done = match req.kind() {
            RequestKind::Read if ok => self.post_read(req),
            RequestKind::Write => self.post_write(req, ok),
            _ => Ok(()),
        };
        match done {
            Ok(()) => status,
            Err(e) => {
                self.failed(e);
                Status::IoError
            }
        }
    }

    fn stats(&self) -> serde_json::Value {
        let s = &self.stats;
        let (cached, dirty) = self
            .state
            .lock()
            .map(|st| (st.lru.len() as u64, st.dirty.len() as u64))
            .unwrap_or((0, 0));
        let (hits, misses) = (s.hits.load(Relaxed), s.misses.load(Relaxed));
        serde_json::json!({
            "write_back": self.write_back,
            "capacity_bytes": self.blocks as u64 * BLOCK,
            "hits": hits,
            "misses": misses,
            "hit_ratio": match hits.saturating_add(misses) { 0 => 0.0, all => hits as f64 / all as f64 },
            "bytes_cached": cached * BLOCK,
            "dirty_bytes": dirty * BLOCK,
            "evictions": s.evictions.load(Relaxed),
            "write_backs": s.write_backs.load(Relaxed),
            "write_back_requests": s.write_back_requests.load(Relaxed),
            "absorbed_writes": s.absorbed_writes.load(Relaxed),
            "partial_writes_absorbed": s.partial_writes_absorbed.load(Relaxed),
            "partial_updates": s.partial_updates.load(Relaxed),
            "errors": s.errors.load(Relaxed),
        })
    }
}

impl Drop for Cache {
    /// Shutdown: dirty blocks go down and are flushed.
    fn drop(&mut self) {
        if let Ok(mut st) = self.state.lock() {
            let had_dirty = !st.dirty.is_empty();
            if let Err(e) = self.write_back_all(&mut st) {
                self.lower.log(LogLevel::Error, &format!("shutdown: {e}"));
            } else if had_dirty && self.lower.flush().is_err() {
                self.lower.log(LogLevel::Error, "shutdown: flush failed");
            }
        }
    }
}

export_interceptor!(Cache);

#[cfg(test)]
mod tests;
