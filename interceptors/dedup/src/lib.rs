//! Deduplication interceptor (BLAKE3) on the extent store (docs/dedup.md).
//!
//! Each 4 KiB guest block is addressed by the BLAKE3 of its contents keyed with the
//! store's own random key (so the image is no oracle for content on other disks). A block
//! whose address is in the index is stored as one more reference to the extent already
//! holding it; others are stored raw, one extent each; all-zero blocks are holes. The
//! index is a hint kept in memory, bounded by `index_mib` (least recently used addresses
//! go first, which costs matches, never correctness): it only ever names live extents (an
//! extent's address leaves it when the extent goes) and is rebuilt from the stored blocks
//! at open. Reference counts are not stored: the store derives them from its map.
//!
//! Disabled, it keeps reading everything; new writes are stored without looking for
//! duplicates.

use extent_store::{
    is_zero, Codec, Entry, NewExtent, OpenOptions, RequestCounters, Store, StoreError, StoreLayer,
    Volume, BLOCK,
};
use interceptor_sdk::{
    abi, export_interceptor, CreateContext, Decision, Interceptor, LogLevel, Lower, Request, Slot,
};
use lru::LruCache;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

const OWNER: &str = "dedup";
/// Memory one indexed block takes at most: its address and entry in the LRU (with the list
/// and table around them) and its reverse mapping; measured by
/// `the_index_takes_at_most_its_documented_memory_per_block`.
pub const INDEX_BYTES_PER_BLOCK: u64 = 224;
/// The most `index_mib` may be.
const MAX_INDEX_MIB: u64 = 64 << 10;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Memory for the index of block addresses, in MiB (at most 224 bytes per unique block).
    #[serde(default = "default_index_mib")]
    index_mib: u64,
    /// Size the guest sees, in MiB (default: the size below; at most 16 times it).
    #[serde(default)]
    logical_mib: Option<u64>,
    /// Journal size in KiB (default 4096, less on small disks).
    #[serde(default)]
    journal_kib: Option<u64>,
    /// Rebuild the index at open by reading the stored blocks (up to the index's size).
    #[serde(default = "default_true")]
    rebuild_index: bool,
    /// Format a disk that holds something other than this store.
    #[serde(default)]
    format: bool,
}

fn default_index_mib() -> u64 {
    64
}

fn default_true() -> bool {
    true
}

pub type Address = [u8; 32];

mod hash;
pub use hash::{address_of, addresses_of};

/// Addresses of live extents, least recently used first out.
struct Index {
    by_address: LruCache<Address, Entry>,
    by_sector: HashMap<u64, Address>,
    evictions: u64,
}

impl Index {
    fn new(capacity: usize) -> Index {
        Index {
            // Both tables at their full size now: the memory is taken, and bounded, up front.
            by_address: LruCache::new(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)),
            by_sector: HashMap::with_capacity(capacity),
            evictions: 0,
        }
    }

    /// Names the extent `e` by `address`. The two tables stay one-to-one: another address
    /// that named the same sector goes (its contents are not there any more).
    fn insert(&mut self, address: Address, e: Entry) {
        let Entry::Stored { sector, .. } = e else {
            return;
        };
        if let Some(other) = self.by_sector.get(&sector).copied() {
            if other != address {
                self.by_address.pop(&other);
            }
        }
        if let Some((old_addr, old)) = self.by_address.push(address, e) {
            if old_addr != address {
                self.evictions += 1;
            }
            if let Entry::Stored { sector: s, .. } = old {
                if self.by_sector.get(&s) == Some(&old_addr) {
                    self.by_sector.remove(&s);
                }
            }
        }
        self.by_sector.insert(sector, address);
    }

    fn forget(&mut self, sector: u64) {
        if let Some(a) = self.by_sector.remove(&sector) {
            self.by_address.pop(&a);
        }
    }
}

#[derive(Default)]
struct Stats {
    blocks_written: AtomicU64,
    dedup_hits: AtomicU64,
    zero_blocks: AtomicU64,
    partial_blocks: AtomicU64,
    index_rebuilt: AtomicU64,
}

struct State {
    vol: Volume<Arc<Lower>>,
    index: Index,
}

impl State {
    /// Drops every address naming space that was freed or written over since the last
    /// call (`Store::take_sector_changes`): run after every change to the map, on every
    /// path, so the index never names a sector whose contents it has not seen.
    fn forget_changed(&mut self) {
        for sector in self.vol.forget_changed().all() {
            self.index.forget(sector);
        }
    }
}

pub struct Dedup {
    lower: Arc<Lower>,
    logical_bytes: u64,
    index_capacity: usize,
    state: Mutex<State>,
    stats: Stats,
    requests: RequestCounters,
}

type Res<T> = Result<T, String>;

fn store_err(e: StoreError) -> String {
    e.to_string()
}

/// Blocks the index holds in `index_mib`, or why that size is refused: at least 1 MiB, at
/// most [`MAX_INDEX_MIB`] and the host's available memory where it is known.
fn index_capacity(index_mib: u64, available_mib: Option<u64>) -> Res<usize> {
    if index_mib == 0 || index_mib > MAX_INDEX_MIB {
        return Err(format!(
            "config: index_mib = {index_mib}: 1 to {MAX_INDEX_MIB}"
        ));
    }
    if let Some(available) = available_mib.filter(|&a| index_mib > a) {
        return Err(format!(
            "config: index_mib = {index_mib}: more than the host's available memory ({available} MiB)"
        ));
    }
    usize::try_from((index_mib << 20) / INDEX_BYTES_PER_BLOCK)
        .map_err(|_| format!("config: index_mib = {index_mib}: too large"))
}

impl Dedup {
    fn open(lower: Lower, cfg: &Config) -> Res<Dedup> {
        let capacity = index_capacity(cfg.index_mib, interceptor_sdk::host_available_mib())?;
        let extent_store::Sizing {
            logical_blocks,
            journal_blocks,
        } = extent_store::sizing(cfg.logical_mib, cfg.journal_kib, lower.capacity())
            .map_err(|e| format!("config: {e}"))?;
        let lower = Arc::new(lower);
        let opts = OpenOptions {
            owner: OWNER.into(),
            logical_blocks,
            journal_blocks,
            owner_config: [0; 16],
            format: cfg.format,
            read_only: false,
        };
        let store = Store::open(lower.clone(), &opts).map_err(store_err)?;
        let d = Dedup {
            lower,
            logical_bytes: store.logical_blocks() * BLOCK,
            index_capacity: capacity,
            state: Mutex::new(State {
                vol: Volume::new(store).map_err(store_err)?,
                index: Index::new(capacity),
            }),
            stats: Stats::default(),
            requests: RequestCounters::default(),
        };
        if cfg.rebuild_index {
            d.rebuild_index()?;
        }
        Ok(d)
    }

    /// Reads each stored extent's block and indexes its address, up to the index's size.
    fn rebuild_index(&self) -> Res<()> {
        let mut st = self.state.lock().map_err(|_| "state lock poisoned")?;
        let st = &mut *st;
        let key = *st.vol.store.key();
        let mut sectors: Vec<(u64, u32)> = st
            .vol
            .store
            .space()
            .iter_extents()
            .map(|(&s, x)| (s, x.stored_len))
            .collect();
        sectors.sort_unstable();
        sectors.truncate(self.index_capacity);
        let mut buf = vec![0u8; BLOCK as usize];
        for (sector, len) in sectors {
            if len as u64 != BLOCK {
                continue;
            }
            st.vol
                .store
                .read_extent_part(sector, 0, &mut buf)
                .map_err(store_err)?;
            let address = address_of(&key, &buf);
            let e = Entry::Stored {
                sector,
                stored_len: len,
                index: 0,
                codec: Codec::Raw,
                check: check_of(&address),
            };
            st.index.insert(address, e);
            self.stats.index_rebuilt.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    fn read(&self, req: &mut Request<'_>) -> Res<()> {
        let mut st = self.state.lock().map_err(|_| "state lock poisoned")?;
        for p in interceptor_sdk::block_pieces(req.offset(), req.len(), BLOCK) {
            let data = st.vol.read_block(p.block).map_err(store_err)?;
            req.write_data(p.at, &data[p.range()])
                .map_err(|e| format!("{e:?}"))?;
        }
        Ok(())
    }

    /// Stores `blocks` from `first`: each zero block a hole, each block whose address is
    /// known (in the index, or earlier in this request) a reference, the rest new extents.
    fn store_blocks(&self, st: &mut State, first: u64, blocks: &[Vec<u8>], look: bool) -> Res<()> {
        let key = *st.vol.store.key();
        let zero: Vec<bool> = blocks.iter().map(|b| is_zero(b)).collect();
        let mut new = Vec::new();
        // (block, address) of the blocks stored as new extents now.
        let mut placed: Vec<(u64, Address)> = Vec::new();
        let mut in_request: HashMap<Address, u64> = HashMap::new();
        // Blocks to point at another block of this request once it is stored.
        let mut later: Vec<(u64, u64)> = Vec::new();
        let mut hits = Vec::new();
        let data_blocks: Vec<&[u8]> = blocks
            .iter()
            .zip(&zero)
            .filter(|(_, &z)| !z)
            .map(|(b, _)| b.as_slice())
            .collect();
        let mut addresses = addresses_of(&key, &data_blocks).into_iter();
        for (i, data) in blocks.iter().enumerate() {
            if zero[i] {
                continue;
            }
            let block = first + i as u64;
            let address = addresses.next().ok_or("an address per data block")?;
            if look {
                if let Some(e) = st.index.by_address.get(&address) {
                    hits.push((block, *e));
                    continue;
                }
                if let Some(&b) = in_request.get(&address) {
                    later.push((block, b));
                    continue;
                }
                in_request.insert(address, block);
            }
            new.push(NewExtent {
                first_block: block,
                codec: Codec::Raw,
                bytes: data.clone(),
                checks: vec![check_of(&address)],
            });
            placed.push((block, address));
        }
        let n_new = new.len() as u64;
        hits.extend(extent_store::holes_for(first, &zero));
        // One change to the map for the whole request: it fails (no space) as if it never
        // ran. Whatever happened, the index then drops every address that names space freed
        // or written over, before it learns the new ones.
        let result = st.vol.store.update(new, &hits, &later);
        st.forget_changed();
        result.map_err(store_err)?;
        if look {
            for (block, address) in &placed {
                if let Ok(e) = st.vol.store.entry(*block) {
                    st.index.insert(*address, e);
                }
            }
        }
        let s = &self.stats;
        s.blocks_written.fetch_add(n_new, Relaxed);
        let n_hits = hits.iter().filter(|(_, e)| *e != Entry::Hole).count();
        s.dedup_hits
            .fetch_add((n_hits + later.len()) as u64, Relaxed);
        s.zero_blocks
            .fetch_add(zero.iter().filter(|&&z| z).count() as u64, Relaxed);
        Ok(())
    }

    fn write(&self, req: &mut Request<'_>) -> Res<()> {
        let look = !req.disabled();
        let mut guard = self.state.lock().map_err(|_| "state lock poisoned")?;
        let st = &mut *guard;
        let mut partial = 0;
        let (first, blocks) = st
            .vol
            .merged_blocks(
                req.offset(),
                req.len(),
                |at, buf| {
                    req.read_data(at, buf)
                        .map_err(|e| StoreError::Io(format!("{e:?}")))
                },
                &mut partial,
            )
            .map_err(store_err)?;
        self.stats.partial_blocks.fetch_add(partial, Relaxed);
        self.store_blocks(st, first, &blocks, look)
    }

    /// Discard and write-zeroes: whole blocks become holes; the parts of blocks at either
    /// end are written as zeroes for write-zeroes (a discard is advisory).
    fn zero(&self, req: &Request<'_>, discard: bool) -> Res<()> {
        let mut guard = self.state.lock().map_err(|_| "state lock poisoned")?;
        let st = &mut *guard;
        let mut result = Ok(());
        for p in interceptor_sdk::block_pieces(req.offset(), req.len(), BLOCK) {
            result = if p.is_whole(BLOCK) {
                st.vol.store.punch(p.block, 1).map_err(store_err)
            } else if !discard {
                st.vol
                    .read_block(p.block)
                    .map_err(store_err)
                    .and_then(|mut data| {
                        data[p.range()].fill(0);
                        self.store_blocks(st, p.block, &[data], true)
                    })
            } else {
                Ok(())
            };
            if result.is_err() {
                break;
            }
        }
        st.forget_changed();
        result
    }

    fn flush(&self) -> Res<()> {
        let mut st = self.state.lock().map_err(|_| "state lock poisoned")?;
        st.vol.store.commit().map_err(store_err)
    }
}

/// A block's check: the first 4 bytes of its address (the same keyed BLAKE3 the store's
/// `block_check` computes).
fn check_of(address: &Address) -> u32 {
    u32::from_le_bytes([address[0], address[1], address[2], address[3]])
}

impl StoreLayer for Dedup {
    fn logical_bytes(&self) -> u64 {
        self.logical_bytes
    }
    fn counters(&self) -> &RequestCounters {
        &self.requests
    }
    fn lower(&self) -> &Lower {
        &self.lower
    }
    fn read(&self, req: &mut Request<'_>) -> Res<()> {
        Dedup::read(self, req)
    }
    fn write(&self, req: &mut Request<'_>) -> Res<()> {
        Dedup::write(self, req)
    }
    fn zero(&self, req: &Request<'_>, discard: bool) -> Res<()> {
        Dedup::zero(self, req, discard)
    }
    fn flush(&self) -> Res<()> {
        Dedup::flush(self)
    }
}

impl Interceptor for Dedup {
    const NAME: &'static std::ffi::CStr = c"dedup";
    const FLAGS: u32 = abi::F_KEEP_WHEN_DISABLED | abi::F_OWNS_FORMAT | abi::F_HANDLES_DISCARD;

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let cfg: Config = ctx.config_as()?;
        Dedup::open(ctx.lower, &cfg)
    }

    fn pre(&self, req: &mut Request<'_>, _: &mut Slot) -> Decision {
        extent_store::serve(self, req)
    }

    fn stats(&self) -> serde_json::Value {
        let s = &self.stats;
        let mut v = serde_json::json!({
            "blocks_stored": s.blocks_written.load(Relaxed),
            "dedup_hits": s.dedup_hits.load(Relaxed),
            "zero_blocks_written": s.zero_blocks.load(Relaxed),
            "partial_blocks": s.partial_blocks.load(Relaxed),
            "index_capacity": self.index_capacity,
            "index_rebuilt": s.index_rebuilt.load(Relaxed),
        });
        if let Some(o) = v.as_object_mut() {
            o.extend(self.requests.json());
        }
        if let (Ok(st), Some(o)) = (self.state.lock(), v.as_object_mut()) {
            o.insert("index_entries".into(), st.index.by_address.len().into());
            o.insert("index_evictions".into(), st.index.evictions.into());
            if let serde_json::Value::Object(held) = st.vol.stats_json() {
                o.extend(held);
            }
        }
        v
    }

    /// The store's invariants, and the index's: every address it holds names a live
    /// extent whose contents hash to that address (a stale entry would point a new block at
    /// someone else's data).
    fn check(&self) -> Option<interceptor_sdk::CheckReport> {
        let mut report = interceptor_sdk::CheckReport::default();
        let Ok(mut st) = self.state.lock() else {
            report.problems.push("the state lock is poisoned".into());
            return Some(report);
        };
        let (mut problems, mut details) = st.vol.check();
        let key = *st.vol.store.key();
        let entries: Vec<(Address, Entry)> =
            st.index.by_address.iter().map(|(a, e)| (*a, *e)).collect();
        let mut buf = vec![0u8; BLOCK as usize];
        for (address, e) in &entries {
            let Entry::Stored { sector, .. } = *e else {
                problems.push("the index holds a hole".into());
                continue;
            };
            if st.vol.store.space().extent(sector).is_none() {
                problems.push(format!(
                    "the index names the extent at sector {sector}, which is not live"
                ));
                continue;
            }
            if st.index.by_sector.get(&sector) != Some(address) {
                problems.push(format!(
                    "the index's two tables disagree on the extent at sector {sector}"
                ));
            }
            match st.vol.store.read_extent_part(sector, 0, &mut buf) {
                Ok(()) if address_of(&key, &buf) == *address => {}
                Ok(()) => problems.push(format!(
                    "the index's address for the extent at sector {sector} is not its contents'"
                )),
                Err(err) => problems.push(format!("the extent at sector {sector}: {err}")),
            }
        }
        details.insert("index_entries_checked".into(), entries.len().into());
        report.problems = problems;
        report.details = details;
        Some(report)
    }

    fn capacity(&self) -> Option<u64> {
        Some(self.logical_bytes)
    }
}

impl Drop for Dedup {
    /// Commits what is left at shutdown.
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            self.lower
                .log(LogLevel::Warn, &format!("final commit: {e}"));
        }
    }
}

export_interceptor!(Dedup);

#[cfg(test)]
mod tests;
