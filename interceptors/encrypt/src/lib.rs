//! The encryption interceptor: AES-256-GCM per 4 KiB block, authenticated, crash-safe,
//! with rollback detection.
//!
//! Every guest block has an entry (its newest version: data slot, open id, nonce, tag; and,
//! until the next commit, the version it falls back to) in a leaf of a MAC tree whose root
//! is in the authenticated header; a block's data has two slots, and a write never
//! overwrites the version the last commit made durable. So after a crash at any instant a
//! block reads its old or its new contents, and a block, an entry or a whole node put back
//! from an older image reads as an I/O error, never as its old contents. Each open draws a
//! random open id and seals under a key derived from it, so nonces never repeat under a
//! key. The layout, the threat model and what "disabled" means are in docs/encryption.md.

mod layout;
mod node;
pub mod seal;
mod tree;
mod write;

pub use node::Mode;

use interceptor_sdk::key;
use interceptor_sdk::{
    abi, block_pieces, export_interceptor, BlockPiece, CreateContext, Decision, Interceptor,
    LogLevel, Lower, Request, RequestKind, Slot,
};
use layout::{has_magic, Geometry, Header, HeaderKeys, BLOCK, HEADER_BYTES};
use node::{Current, Entry, Fallback, Version, LEAF_ENTRIES};
use seal::Sealer;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Condvar, Mutex};
use tree::Tree;

/// Leaves changed since the last commit that make the plugin commit on its own: bounds the
/// memory a guest that never flushes can pin (about 600 bytes a leaf).
const MAX_DIRTY_LEAVES: usize = 16_384;
/// Bytes a cached tree node takes in memory, at most (an inner node; a leaf takes less).
const NODE_MEMORY: u64 = 2560;
/// The largest metadata cache: 64 GiB.
pub const MAX_CACHE_MIB: u64 = 1 << 16;

/// The number of tree nodes a metadata cache of `cache_mib` holds: 0 is taken as the
/// smallest cache (1 MiB); more than [`MAX_CACHE_MIB`], or more than `available_mib` (the
/// host's available memory, when known) with the cache's index, is refused naming the field.
fn cache_nodes(cache_mib: u64, available_mib: Option<u64>) -> Res<usize> {
    let mib = cache_mib.max(1);
    let field = format!("config: cache_mib = {cache_mib}");
    // The index is taken up front: about 32 bytes a node, 1/80 of the nodes' memory.
    let needed_mib = mib.saturating_add(mib.div_ceil(64));
    if let Some(available) = available_mib {
        if needed_mib > available {
            return Err(format!(
                "{field}: more than the host's available memory ({available} MiB; the cache \
                 takes {needed_mib} MiB with its index)"
            ));
        }
    }
    if mib > MAX_CACHE_MIB {
        return Err(format!(
            "{field}: more than the largest metadata cache allowed ({MAX_CACHE_MIB} MiB)"
        ));
    }
    // No overflow: mib <= 2^16.
    usize::try_from((mib << 20) / NODE_MEMORY).map_err(|_| format!("{field}: too large"))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// A file holding the key: 32 raw bytes or 64 hex digits.
    key_file: std::path::PathBuf,
    /// Format a disk that is not blank (destroying what it holds). Never formats over an
    /// encrypted layout, valid or damaged.
    #[serde(default)]
    format: bool,
    /// Refuse to open a disk whose generation is older: detects a rolled-back image.
    #[serde(default)]
    min_generation: u64,
    /// Memory for cached metadata, in MiB.
    #[serde(default = "default_cache_mib")]
    cache_mib: u64,
}

fn default_cache_mib() -> u64 {
    16
}

struct State {
    tree: Tree,
    /// Writes between choosing their blocks' slots and recording their entries
    /// (`write.rs`): a commit waits for them.
    writing: usize,
    /// A commit waits for `writing` to reach 0: no write chooses a slot meanwhile.
    committing: bool,
}

#[derive(Default)]
struct Stats {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    blocks_encrypted: AtomicU64,
    blocks_clear: AtomicU64,
    auth_failures: AtomicU64,
    fallbacks: AtomicU64,
    read_modify_writes: AtomicU64,
}

pub struct Encrypt {
    lower: Lower,
    geo: Geometry,
    header_key: [u8; 32],
    state: Mutex<State>,
    /// Signalled when `writing` falls or a commit ends.
    idle: Condvar,
    /// This open's cipher and nonces, and earlier opens' ciphers: used outside the lock.
    sealer: Sealer,
    stats: Stats,
    /// A header copy the open found unreadable (the other was used), for the check hook.
    recovered: Option<String>,
}

type Res<T> = Result<T, String>;

fn io(e: interceptor_sdk::IoError) -> String {
    e.to_string()
}

/// The header to open the disk with: the valid copy of the highest generation, which copy
/// it is, and what was wrong with the other one if anything; or why neither is valid.
fn pick_header(
    block0: &[u8],
    geo: &Geometry,
    keys: &HeaderKeys<'_>,
    lower: &Lower,
) -> Res<(Header, usize, Option<String>)> {
    let copies = [
        &block0[..HEADER_BYTES],
        &block0[HEADER_BYTES..2 * HEADER_BYTES],
    ];
    let parsed: Vec<Res<Header>> = copies
        .iter()
        .map(|c| Header::decode(c, geo, keys))
        .collect();
    let best = parsed
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.as_ref().ok().map(|h| (i, h)))
        .max_by_key(|(i, h)| (h.generation, std::cmp::Reverse(*i)));
    if let Some((i, h)) = best {
        let other = parsed[1 - i].as_ref().err().map(|e| {
            format!(
                "header copy {}: {e}; opened with copy {} (generation {})",
                ["A", "B"][1 - i],
                ["A", "B"][i],
                h.generation
            )
        });
        if let Some(note) = &other {
            lower.log(LogLevel::Warn, note);
        }
        return Ok((h.clone(), i, other));
    }
    let why = |i: usize| parsed[i].as_ref().err().cloned().unwrap_or_default();
    Err(match (has_magic(copies[0]), has_magic(copies[1])) {
        (true, true) if why(0) != why(1) => {
            format!("header copy A: {}; header copy B: {}", why(0), why(1))
        }
        (true, _) => why(0),
        _ => why(1),
    })
}

impl Encrypt {
    fn open_disk(lower: Lower, key: &key::Key, cfg: &Config) -> Res<Encrypt> {
        let capacity = lower.capacity();
        let total = capacity / BLOCK;
        let geo = Geometry::for_disk(total)
            .ok_or_else(|| format!("a disk of {total} blocks is too small to encrypt"))?;
        let header_key = seal::header_key(&key.0);
        let check = |id: &[u8; 16]| seal::key_check(&key.0, id);
        let keys = HeaderKeys {
            mac: &header_key,
            check: &check,
        };
        let mut block0 = vec![0u8; BLOCK as usize];
        lower.read(0, &mut block0).map_err(io)?;
        let (header, copy, recovered) = if has_magic(&block0[..HEADER_BYTES])
            || has_magic(&block0[HEADER_BYTES..2 * HEADER_BYTES])
        {
            pick_header(&block0, &geo, &keys, &lower)?
        } else {
            let (h, copy) = Self::format(&lower, &geo, &key.0, cfg.format)?;
            (h, copy, None)
        };
        if header.generation < cfg.min_generation {
            return Err(format!(
                "the disk is at generation {}, older than min_generation = {}: the image was \
                 rolled back (restored from an older copy), or min_generation is wrong",
                header.generation, cfg.min_generation
            ));
        }
        let meta_key = seal::meta_key(&key.0, &header.disk_id);
        let sealer = Sealer::new(&key.0, header.disk_id, seal::random16()?);
        let nodes = cache_nodes(cfg.cache_mib, None)?;
        let tree = Tree::new(geo.clone(), meta_key, header, copy, nodes);
        Ok(Encrypt {
            lower,
            geo,
            header_key,
            sealer,
            state: Mutex::new(State {
                tree,
                writing: 0,
                committing: false,
            }),
            idle: Condvar::new(),
            stats: Stats::default(),
            recovered,
        })
    }

    /// Formats a disk without a layout: only if all of it is zeros, or the config says
    /// `format = true`. Writes both header copies (generation 0, an empty tree).
    fn format(lower: &Lower, geo: &Geometry, key: &[u8; 32], force: bool) -> Res<(Header, usize)> {
        if !force {
            if let Some(at) = lower.first_nonzero(0, lower.capacity()).map_err(io)? {
                return Err(format!(
                    "the disk is not blank (byte {at} is not zero) and holds no encrypted \
                     layout; to format it, destroying what it holds, set format = true in the \
                     instance's config"
                ));
            }
        }
        let disk_id = seal::random16()?;
        let header = Header::for_geometry(geo, disk_id, seal::key_check(key, &disk_id));
        let raw = header.encode(&seal::header_key(key));
        let mut block0 = vec![0u8; BLOCK as usize];
        block0[..HEADER_BYTES].copy_from_slice(&raw);
        block0[HEADER_BYTES..2 * HEADER_BYTES].copy_from_slice(&raw);
        lower.write(0, &block0).map_err(io)?;
        lower.flush().map_err(io)?;
        lower.log(LogLevel::Info, "formatted a new encrypted layout");
        Ok((header, 0))
    }

    /// Reads and opens one stored version; `None` if it does not authenticate.
    fn try_version(&self, block: u64, v: &Version) -> Res<Option<Vec<u8>>> {
        let mut data = vec![0u8; BLOCK as usize];
        self.lower
            .read(self.geo.slot_offset(block, v.slot), &mut data)
            .map_err(io)?;
        Ok(self.sealer.open(block, v, &mut data).then_some(data))
    }

    /// `block`'s entry. A leaf adopted from a crash's leftovers is resolved first: an entry
    /// whose newest data never reached the disk goes back to its fallback, one whose data
    /// did keeps it, and either way that is now the block's baseline (no fallback): what
    /// the guest reads after a crash never goes back to something older, even if it
    /// crashes again before the next commit, and the commit that takes the leaf in never
    /// commits a version that is not there.
    fn entry(&self, st: &mut State, block: u64) -> Res<Entry> {
        let (node, k) = st.tree.leaf(&self.lower, block)?;
        if node.adopted {
            node.adopted = false;
            let first = block - k as u64;
            if let Some(entries) = node.entries_mut() {
                for (j, e) in entries.iter_mut().enumerate() {
                    let (Current::Stored(cur), Some(prev)) = (e.cur, e.prev) else {
                        continue;
                    };
                    let b = first + j as u64;
                    if b < self.geo.n && self.try_version(b, &cur)?.is_none() {
                        self.stats.fallbacks.fetch_add(1, Relaxed);
                        e.cur = match prev {
                            Fallback::Zeros => Current::Never,
                            Fallback::Version(v) => Current::Stored(v),
                        };
                    }
                    e.prev = None;
                }
            }
        }
        Ok(node.entries()[k])
    }

    /// The plaintext of `block`: its entry looked up under the state lock, its newest
    /// version read and opened without it (hooks may run side by side, and no write to
    /// the block runs with this read: the device orders them). Anything else (a block
    /// never written, a version that fails its tag, damaged metadata) under the lock.
    fn read_block_unlocked(&self, block: u64) -> Res<Vec<u8>> {
        let entry = {
            let mut st = self.state.lock().map_err(|_| "state lock poisoned")?;
            self.entry(&mut st, block)?
        };
        if let Current::Stored(v) = entry.cur {
            if let Some(data) = self.try_version(block, &v)? {
                return Ok(data);
            }
        }
        let mut st = self.state.lock().map_err(|_| "state lock poisoned")?;
        self.read_block(&mut st, block)
    }

    /// The plaintext of `block`, or `Err` (an I/O error for the guest).
    fn read_block(&self, st: &mut State, block: u64) -> Res<Vec<u8>> {
        let entry = self.entry(st, block)?;
        let cur = match entry.cur {
            Current::Never => return Ok(vec![0u8; BLOCK as usize]),
            Current::Unreadable => {
                self.stats.auth_failures.fetch_add(1, Relaxed);
                return Err(format!("block {block}: its metadata fails its check"));
            }
            Current::Stored(v) => v,
        };
        if let Some(data) = self.try_version(block, &cur)? {
            return Ok(data);
        }
        // The newest version did not fully reach the disk (a crash): the committed one.
        match entry.prev {
            Some(Fallback::Zeros) => {
                self.stats.fallbacks.fetch_add(1, Relaxed);
                return Ok(vec![0u8; BLOCK as usize]);
            }
            Some(Fallback::Version(prev)) => {
                if let Some(data) = self.try_version(block, &prev)? {
                    self.stats.fallbacks.fetch_add(1, Relaxed);
                    return Ok(data);
                }
            }
            None => {}
        }
        self.stats.auth_failures.fetch_add(1, Relaxed);
        Err(format!("block {block}: data fails authentication"))
    }

    fn read(&self, req: &mut Request<'_>) -> Res<()> {
        for p in block_pieces(req.offset(), req.len(), BLOCK) {
            let data = self.read_block_unlocked(p.block)?;
            req.write_data(p.at, &data[p.range()])
                .map_err(|e| format!("{e:?}"))?;
        }
        Ok(())
    }
}

impl Interceptor for Encrypt {
    const NAME: &'static std::ffi::CStr = c"encrypt";
    // Its layout is its own: it stays in the path while disabled (writing new blocks in the
    // clear) and does all its I/O itself, so it never needs the shim's bounce buffers. Its
    // hooks may run side by side: `write.rs` says how its state stays consistent.
    const FLAGS: u32 = abi::F_KEEP_WHEN_DISABLED | abi::F_OWNS_FORMAT | abi::F_CONCURRENT;

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let cfg: Config = ctx.config_as()?;
        cache_nodes(cfg.cache_mib, interceptor_sdk::host_available_mib())?;
        let key = key::read_key_file(&cfg.key_file)?;
        Encrypt::open_disk(ctx.lower, &key, &cfg)
    }

    fn pre(&self, req: &mut Request<'_>, _: &mut Slot) -> Decision {
        let in_range = req
            .offset()
            .checked_add(req.len())
            .is_some_and(|end| end <= self.geo.n * BLOCK);
        let done = match req.kind() {
            RequestKind::Read if in_range => {
                self.stats.reads.fetch_add(1, Relaxed);
                self.read(req)
            }
            RequestKind::Write if in_range => {
                self.stats.writes.fetch_add(1, Relaxed);
                self.write(req)
            }
            RequestKind::Flush => {
                self.stats.flushes.fetch_add(1, Relaxed);
                self.flush()
            }
            RequestKind::GetId => return Decision::Continue,
            _ => return Decision::Fail,
        };
        match done {
            Ok(()) => Decision::Complete,
            Err(e) => {
                self.lower.log(LogLevel::Warn, &e);
                Decision::Fail
            }
        }
    }

    fn stats(&self) -> serde_json::Value {
        let s = &self.stats;
        let tree = self.state.lock().map(|st| {
            let t = &st.tree;
            (
                t.generation(),
                t.cached_nodes(),
                t.dirty_leaves(),
                t.damaged,
                t.adopted,
            )
        });
        let (generation, cached, dirty, damaged, adopted) = tree.unwrap_or_default();
        serde_json::json!({
            "format": "encrypt",
            "format_version": layout::VERSION,
            "capacity_bytes": self.geo.n * BLOCK,
            "generation": generation,
            "cached_nodes": cached,
            "dirty_leaves": dirty,
            "damaged_nodes": damaged,
            "adopted_leaves": adopted,
            "reads": s.reads.load(Relaxed),
            "writes": s.writes.load(Relaxed),
            "flushes": s.flushes.load(Relaxed),
            "blocks_encrypted": s.blocks_encrypted.load(Relaxed),
            "blocks_clear": s.blocks_clear.load(Relaxed),
            "auth_failures": s.auth_failures.load(Relaxed),
            "fallbacks": s.fallbacks.load(Relaxed),
            "read_modify_writes": s.read_modify_writes.load(Relaxed),
        })
    }

    fn capacity(&self) -> Option<u64> {
        Some(self.geo.n * BLOCK)
    }

    /// Reads and authenticates every block (and, on the way, every metadata node): a block
    /// whose data or entry fails its tag, or a node its MAC, is a problem.
    fn check(&self) -> Option<interceptor_sdk::CheckReport> {
        let mut report = interceptor_sdk::CheckReport::default();
        let Ok(mut st) = self.state.lock() else {
            report.problems.push("the state lock is poisoned".into());
            return Some(report);
        };
        let damaged_before = st.tree.damaged;
        for block in 0..self.geo.n {
            if let Err(e) = self.read_block(&mut st, block) {
                report.problems.push(e);
            }
        }
        let damaged = st.tree.damaged;
        if damaged > damaged_before {
            report.problems.push(format!(
                "{} metadata nodes fail their check",
                damaged - damaged_before
            ));
        }
        let d = &mut report.details;
        d.insert("format".into(), "encrypt".into());
        d.insert("format_version".into(), layout::VERSION.into());
        d.insert("blocks_checked".into(), self.geo.n.into());
        d.insert("generation".into(), st.tree.generation().into());
        if let Some(note) = &self.recovered {
            // Nothing lost, but the image is not as written (store.md's convention).
            d.insert("recovered".into(), vec![note.clone()].into());
        }
        Some(report)
    }
}

impl Drop for Encrypt {
    /// Commits what is left at shutdown.
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            self.lower
                .log(LogLevel::Warn, &format!("final commit: {e}"));
        }
    }
}

export_interceptor!(Encrypt);

#[cfg(test)]
mod config_bounds {
    use super::*;

    #[test]
    fn cache_mib_is_bounded_by_the_hard_maximum_and_the_hosts_memory() {
        assert_eq!(cache_nodes(0, Some(64)), cache_nodes(1, Some(64)));
        assert_eq!(cache_nodes(16, None).unwrap(), (16 << 20) / 2560);
        assert!(cache_nodes(MAX_CACHE_MIB, None).is_ok());
        let e = cache_nodes(MAX_CACHE_MIB + 1, None).unwrap_err();
        assert!(
            e.starts_with("config: cache_mib = 65537: more than the largest metadata cache"),
            "{e}"
        );
        let e = cache_nodes(99_999_999, Some(4096)).unwrap_err();
        assert!(
            e.starts_with(
                "config: cache_mib = 99999999: more than the host's available memory (4096 MiB"
            ),
            "{e}"
        );
        let e = cache_nodes(u64::MAX, Some(4096)).unwrap_err();
        assert!(e.contains("host's available memory"), "{e}");
        assert!(cache_nodes(4096, Some(4096)).is_err(), "its index too");
        assert!(cache_nodes(4000, Some(4096)).is_ok());
    }

    struct Zeros;

    impl compat::BlockBackend for Zeros {
        fn capacity(&self) -> u64 {
            1 << 20
        }

        unsafe fn execute(&self, _: &compat::IoRequest<'_>) -> compat::RequestStatus {
            compat::RequestStatus::Ok
        }
    }

    /// Refused at create (from the config or an API client), naming the field, before the
    /// key file is read or the disk touched; it used to be clamped silently.
    #[test]
    fn a_cache_over_the_hosts_memory_is_refused_at_create() {
        let create = |cache_mib: u64| {
            let spec = compat::InstanceSpec {
                id: "enc".into(),
                plugin: compat::Plugin::from_static(
                    "encrypt",
                    interceptor_sdk::static_table!(Encrypt),
                )
                .unwrap(),
                config_json: serde_json::json!({
                    "key_file": "/nonexistent/key",
                    "cache_mib": cache_mib,
                })
                .to_string(),
                enabled: true,
            };
            compat::BlockStack::build("d", std::sync::Arc::new(Zeros), &[spec])
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let e = create(99_999_999);
        assert!(e.contains("cache_mib = 99999999: more than"), "{e}");
        let available =
            interceptor_sdk::host_available_mib().expect("MemAvailable in /proc/meminfo");
        let over = available + 1;
        let e = create(over);
        assert!(
            e.contains(&format!(
                "cache_mib = {over}: more than the host's available memory"
            )),
            "{e}"
        );
        // Within the bounds, the next check is the key file's.
        assert!(create(16).contains("/nonexistent/key"));
    }
}
