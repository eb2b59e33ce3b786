//! Compression interceptor (zstd) on the extent store (docs/compression.md).
//!
//! A write is cut into extents of up to `extent_kib` of guest data, aligned to that size
//! in the guest's address space; each is compressed at `level` and stored compressed unless
//! that saves less than 1/8 of it (then it is stored raw, as ZFS does); all-zero blocks are
//! holes. A read decodes only the extents it touches (a small cache keeps the last ones
//! decoded). A write over part of an extent stores the new blocks as an extent of their own
//! and leaves the rest of the old one in place: nothing is rewritten, and the old extent's
//! space comes back when its last block has been overwritten or discarded.
//!
//! Disabled, it keeps reading everything it stored; new writes are stored raw.

use extent_store::{
    block_check, is_zero, Codec, NewExtent, OpenOptions, RequestCounters, Store, StoreError,
    StoreLayer, Volume, BLOCK, MAX_EXTENT_BLOCKS, SECTOR,
};
use interceptor_sdk::{
    abi, export_interceptor, CreateContext, Decision, Interceptor, LogLevel, Lower, Request, Slot,
};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

const OWNER: &str = "compress";

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Guest data per extent, in KiB: 4 to 64, a multiple of 4.
    #[serde(default = "default_extent_kib")]
    extent_kib: u64,
    /// zstd level, 1 to 19.
    #[serde(default = "default_level")]
    level: i32,
    /// Size the guest sees, in MiB (default: the size below, less nothing; at most 16
    /// times it: thin provisioning).
    #[serde(default)]
    logical_mib: Option<u64>,
    /// Journal size in KiB (default 4096, less on small disks).
    #[serde(default)]
    journal_kib: Option<u64>,
    /// Format a disk that holds something other than this store.
    #[serde(default)]
    format: bool,
}

fn default_extent_kib() -> u64 {
    64
}

fn default_level() -> i32 {
    3
}

#[derive(Default)]
struct Stats {
    extents_zstd: AtomicU64,
    extents_raw: AtomicU64,
    /// Guest bytes given to zstd, and what came out, for the extents kept compressed.
    zstd_in: AtomicU64,
    zstd_out: AtomicU64,
    zero_blocks: AtomicU64,
    partial_blocks: AtomicU64,
}

struct State {
    vol: Volume<Arc<Lower>>,
    compressor: zstd::bulk::Compressor<'static>,
}

pub struct Compress {
    lower: Arc<Lower>,
    extent_blocks: u64,
    logical_bytes: u64,
    state: Mutex<State>,
    stats: Stats,
    requests: RequestCounters,
}

type Res<T> = Result<T, String>;

fn store_err(e: StoreError) -> String {
    e.to_string()
}

impl Compress {
    fn open(lower: Lower, cfg: &Config) -> Res<Compress> {
        if !(4..=64).contains(&cfg.extent_kib) || !cfg.extent_kib.is_multiple_of(4) {
            return Err(format!(
                "config: extent_kib = {}: 4 to 64, a multiple of 4",
                cfg.extent_kib
            ));
        }
        if !(1..=19).contains(&cfg.level) {
            return Err(format!("config: level = {}: 1 to 19", cfg.level));
        }
        let extent_store::Sizing {
            logical_blocks,
            journal_blocks,
        } = extent_store::sizing(cfg.logical_mib, cfg.journal_kib, lower.capacity())
            .map_err(|e| format!("config: {e}"))?;
        let mut owner_config = [0u8; 16];
        owner_config[0] = (cfg.extent_kib / 4) as u8;
        owner_config[1] = cfg.level as u8;
        let lower = Arc::new(lower);
        let opts = OpenOptions {
            owner: OWNER.into(),
            logical_blocks,
            journal_blocks,
            owner_config,
            format: cfg.format,
            read_only: false,
        };
        let store = Store::open(lower.clone(), &opts).map_err(store_err)?;
        let logical_bytes = store.logical_blocks() * BLOCK;
        let compressor =
            zstd::bulk::Compressor::new(cfg.level).map_err(|e| format!("zstd: {e}"))?;
        Ok(Compress {
            lower,
            extent_blocks: (cfg.extent_kib / 4).min(MAX_EXTENT_BLOCKS),
            logical_bytes,
            state: Mutex::new(State {
                vol: Volume::new(store).map_err(store_err)?,
                compressor,
            }),
            stats: Stats::default(),
            requests: RequestCounters::default(),
        })
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

    /// One extent of `blocks` (consecutive, none all-zero) from `first`.
    fn encode(&self, st: &mut State, first: u64, blocks: &[Vec<u8>], raw_only: bool) -> NewExtent {
        let key = *st.vol.store.key();
        let checks = blocks.iter().map(|b| block_check(&key, b)).collect();
        let raw: Vec<u8> = blocks.concat();
        if !raw_only {
            if let Some(c) = compress_extent(&mut st.compressor, &raw) {
                self.stats.extents_zstd.fetch_add(1, Relaxed);
                self.stats.zstd_in.fetch_add(raw.len() as u64, Relaxed);
                self.stats.zstd_out.fetch_add(c.len() as u64, Relaxed);
                return NewExtent {
                    first_block: first,
                    codec: Codec::Zstd,
                    bytes: c,
                    checks,
                };
            }
        }
        self.stats.extents_raw.fetch_add(1, Relaxed);
        NewExtent {
            first_block: first,
            codec: Codec::Raw,
            bytes: raw,
            checks,
        }
    }

    fn write(&self, req: &mut Request<'_>) -> Res<()> {
        let raw_only = req.disabled();
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
        let zero: Vec<bool> = blocks.iter().map(|b| is_zero(b)).collect();
        let mut extents = Vec::new();
        let mut i = 0;
        while i < blocks.len() {
            if zero[i] {
                i += 1;
                continue;
            }
            let b = first + i as u64;
            let boundary = (b / self.extent_blocks + 1) * self.extent_blocks;
            let mut j = i + 1;
            while j < blocks.len() && first + (j as u64) < boundary && !zero[j] {
                j += 1;
            }
            extents.push(self.encode(st, b, &blocks[i..j], raw_only));
            i = j;
        }
        let zeros = zero.iter().filter(|&&z| z).count() as u64;
        self.stats.zero_blocks.fetch_add(zeros, Relaxed);
        // The data and the holes as one change: no space, and the map is as it was.
        let holes = extent_store::holes_for(first, &zero);
        let result = st.vol.store.update(extents, &holes, &[]);
        st.vol.forget_changed();
        result.map_err(store_err)
    }

    /// Discard and write-zeroes: whole blocks become holes, the parts of blocks at either
    /// end are written as zeroes (a discard's parts are left as they are: it is advisory).
    fn zero(&self, req: &Request<'_>, discard: bool) -> Res<()> {
        let mut guard = self.state.lock().map_err(|_| "state lock poisoned")?;
        let st = &mut *guard;
        let mut result = Ok(());
        for p in interceptor_sdk::block_pieces(req.offset(), req.len(), BLOCK) {
            result = if p.is_whole(BLOCK) {
                st.vol.store.punch(p.block, 1)
            } else if !discard {
                st.vol.read_block(p.block).and_then(|mut data| {
                    data[p.range()].fill(0);
                    if is_zero(&data) {
                        st.vol.store.punch(p.block, 1)
                    } else {
                        let x = self.encode(st, p.block, &[data], false);
                        st.vol.store.write(vec![x])
                    }
                })
            } else {
                Ok(())
            };
            // The decoded cache forgets changed space after each piece: the next piece's
            // write may reuse what this one freed.
            st.vol.forget_changed();
            if result.is_err() {
                break;
            }
        }
        result.map_err(store_err)
    }

    fn flush(&self) -> Res<()> {
        let mut st = self.state.lock().map_err(|_| "state lock poisoned")?;
        st.vol.store.commit().map_err(store_err)
    }
}

impl StoreLayer for Compress {
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
        Compress::read(self, req)
    }
    fn write(&self, req: &mut Request<'_>) -> Res<()> {
        Compress::write(self, req)
    }
    fn zero(&self, req: &Request<'_>, discard: bool) -> Res<()> {
        Compress::zero(self, req, discard)
    }
    fn flush(&self) -> Res<()> {
        Compress::flush(self)
    }
}

/// `raw` (one extent of guest blocks) as one zstd frame, or `None` where that does not save
/// at least 1/8 of it, counted in the sectors it takes (ZFS's rule): the extent is stored
/// raw then.
pub fn compress_extent(c: &mut zstd::bulk::Compressor<'_>, raw: &[u8]) -> Option<Vec<u8>> {
    let z = c.compress(raw).ok()?;
    let stored = (z.len() as u64).next_multiple_of(SECTOR);
    (stored <= raw.len() as u64 - raw.len() as u64 / 8).then_some(z)
}

impl Interceptor for Compress {
    const NAME: &'static std::ffi::CStr = c"compress";
    // Its layout is its own (a store): it stays in the path while disabled and does all its
    // I/O itself.
    const FLAGS: u32 = abi::F_KEEP_WHEN_DISABLED | abi::F_OWNS_FORMAT | abi::F_HANDLES_DISCARD;

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let cfg: Config = ctx.config_as()?;
        Compress::open(ctx.lower, &cfg)
    }

    fn pre(&self, req: &mut Request<'_>, _: &mut Slot) -> Decision {
        extent_store::serve(self, req)
    }

    fn stats(&self) -> serde_json::Value {
        let s = &self.stats;
        let mut v = serde_json::json!({
            "extents_zstd_written": s.extents_zstd.load(Relaxed),
            "extents_raw_written": s.extents_raw.load(Relaxed),
            "zstd_ratio_written": extent_store::ratio(s.zstd_in.load(Relaxed), s.zstd_out.load(Relaxed)),
            "zero_blocks_written": s.zero_blocks.load(Relaxed),
            "partial_blocks": s.partial_blocks.load(Relaxed),
        });
        if let Some(o) = v.as_object_mut() {
            o.extend(self.requests.json());
        }
        if let (Ok(st), Some(o)) = (self.state.lock(), v.as_object_mut()) {
            if let serde_json::Value::Object(held) = st.vol.stats_json() {
                o.extend(held);
            }
        }
        v
    }

    fn check(&self) -> Option<interceptor_sdk::CheckReport> {
        let mut report = interceptor_sdk::CheckReport::default();
        match self.state.lock() {
            Ok(mut st) => (report.problems, report.details) = st.vol.check(),
            Err(_) => report.problems.push("the state lock is poisoned".into()),
        }
        Some(report)
    }

    fn capacity(&self) -> Option<u64> {
        Some(self.logical_bytes)
    }
}

impl Drop for Compress {
    /// Commits what is left at shutdown.
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            self.lower
                .log(LogLevel::Warn, &format!("final commit: {e}"));
        }
    }
}

export_interceptor!(Compress);

#[cfg(test)]
mod tests;
