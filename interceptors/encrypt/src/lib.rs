//! The encryption interceptor: AES-256-GCM per 4 KiB block, authenticated, crash-safe.
//!
//! Every guest block has a metadata entry (nonce, tag, mode, which of two data slots holds
//! it) and two data slots. A write never overwrites the version the last completed flush
//! made durable: it goes to the other slot, and its entry keeps the durable version as a
//! fallback until the next completed flush settles it. So after a crash at any instant a
//! block reads its old or its new contents, whatever subset of the unflushed writes reached
//! the disk. The layout, the nonce scheme and what "disabled" means are in
//! docs/encryption.md; the layout is also in `layout.rs`.

mod key;
mod layout;
pub mod seal;

pub use layout::Mode;

use interceptor_sdk::{
    abi, block_pieces, export_interceptor, BlockPiece, CreateContext, Decision, Interceptor,
    LogLevel, Lower, Request, RequestKind, Slot,
};
use layout::{
    Entry, Fallback, Geometry, Header, Version, BLOCK, ENTRIES_PER_SECTOR, ENTRY_BYTES, SECTOR,
};
use seal::Sealer;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// A file holding the key: 32 raw bytes or 64 hex digits.
    key_file: std::path::PathBuf,
}

/// A block's metadata as loaded: an entry, or one that failed its MAC (reads fail).
#[derive(Clone, Copy)]
enum Meta {
    Ok(Entry),
    Corrupt,
}

/// What the last completed flush (or the open) made durable for a block, once known.
#[derive(Clone, Copy)]
enum Durable {
    Unknown,
    /// Nothing readable (its metadata or data fail their checks): no fallback to keep.
    Unreadable,
    Known(Fallback),
}

struct State {
    meta: Vec<Meta>,
    durable: Vec<Durable>,
    /// Blocks written since the last completed flush.
    dirty: BTreeSet<u64>,
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
    sealer: Sealer,
    mac_key: [u8; 32],
    epoch: u64,
    state: Mutex<State>,
    stats: Stats,
}

type Res<T> = Result<T, String>;

fn io(e: interceptor_sdk::IoError) -> String {
    e.to_string()
}

impl Encrypt {
    fn open_disk(lower: Lower, key: &key::Key) -> Res<Encrypt> {
        let total = lower.capacity() / BLOCK;
        let geo = Geometry::for_disk(total)
            .ok_or_else(|| format!("a disk of {total} blocks is too small to encrypt"))?;
        let check = Sealer::key_check(&key.0, geo.n)?;
        let mut head = vec![0u8; SECTOR as usize];
        lower.read(0, &mut head).map_err(io)?;
        let epoch = match Header::decode(&head)? {
            None => {
                // A blank disk: clear the metadata region, then write the header.
                let zeros = vec![0u8; 1 << 20];
                let (mut at, end) = (geo.meta_start * BLOCK, geo.data_start * BLOCK);
                while at < end {
                    let n = (end - at).min(zeros.len() as u64) as usize;
                    lower.write(at, &zeros[..n]).map_err(io)?;
                    at += n as u64;
                }
                0
            }
            Some(h) if h.geometry != geo => {
                return Err(format!(
                "the encrypted layout on this disk was made for {} blocks, the disk now gives {}",
                h.geometry.n, geo.n
            ))
            }
            Some(h) if h.key_check != check => {
                return Err("wrong key: it does not match this disk's key check".into())
            }
            Some(h) => h.epoch,
        };
        let epoch = epoch + 1;
        let epoch32 = u32::try_from(epoch).map_err(|_| {
            "this disk has used all its nonce epochs; re-encrypt it under a new key"
        })?;
        // The new epoch is durable before any write uses it: nonces never repeat, crash or not.
        let header = Header {
            geometry: geo,
            epoch,
            key_check: check,
        };
        lower.write(0, &header.encode()).map_err(io)?;
        lower.flush().map_err(io)?;
        let mac_key = blake3::derive_key("vmm encrypt interceptor 2026 metadata", &key.0);
        let meta = Self::load_meta(&lower, &geo, &mac_key)?;
        Ok(Encrypt {
            lower,
            geo,
            sealer: Sealer::new(&key.0, epoch32),
            mac_key,
            epoch,
            state: Mutex::new(State {
                durable: vec![Durable::Unknown; meta.len()],
                meta,
                dirty: BTreeSet::new(),
            }),
            stats: Stats::default(),
        })
    }

    fn load_meta(lower: &Lower, geo: &Geometry, mac_key: &[u8; 32]) -> Res<Vec<Meta>> {
        let mut out = Vec::with_capacity(geo.n as usize);
        let (mut at, end) = (geo.meta_start * BLOCK, geo.data_start * BLOCK);
        while at < end && (out.len() as u64) < geo.n {
            let mut buf = vec![0u8; (end - at).min(1 << 20) as usize];
            lower.read(at, &mut buf).map_err(io)?;
            for raw in buf.chunks_exact(ENTRY_BYTES) {
                let block = out.len() as u64;
                if block == geo.n {
                    break;
                }
                out.push(match Entry::decode(block, raw, mac_key) {
                    Ok(e) => Meta::Ok(e),
                    Err(()) => Meta::Corrupt,
                });
            }
            at += buf.len() as u64;
        }
        Ok(out)
    }

    /// Reads and opens one stored version; `None` if it does not authenticate.
    fn try_version(&self, block: u64, v: &Version) -> Res<Option<Vec<u8>>> {
        let mut data = vec![0u8; BLOCK as usize];
        self.lower
            .read(self.geo.slot_offset(block, v.slot), &mut data)
            .map_err(io)?;
        Ok(self.sealer.open(block, v, &mut data).then_some(data))
    }

    /// The plaintext of `block`, or `Err` (an I/O error for the guest).
    fn read_block(&self, st: &State, block: u64) -> Res<Vec<u8>> {
        let entry = match st.meta[block as usize] {
            Meta::Ok(e) => e,
            Meta::Corrupt => {
                self.stats.auth_failures.fetch_add(1, Relaxed);
                return Err(format!("block {block}: metadata fails its check"));
            }
        };
        let Some(cur) = entry.cur else {
            return Ok(vec![0u8; BLOCK as usize]);
        };
        if let Some(data) = self.try_version(block, &cur)? {
            return Ok(data);
        }
        // The newest version did not fully reach the disk (a crash): the durable one.
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

    /// What the last completed flush made durable for `block`, finding out on first use
    /// (the open flushed, so what reads back now is durable). `None`: nothing readable.
    fn durable(&self, st: &mut State, block: u64) -> Res<Option<Fallback>> {
        let i = block as usize;
        let found = match st.durable[i] {
            Durable::Known(f) => return Ok(Some(f)),
            Durable::Unreadable => return Ok(None),
            Durable::Unknown => match st.meta[i] {
                Meta::Corrupt => None,
                Meta::Ok(Entry { cur: None, .. }) => Some(Fallback::Zeros),
                Meta::Ok(Entry {
                    cur: Some(cur),
                    prev,
                }) => {
                    if self.try_version(block, &cur)?.is_some() {
                        Some(Fallback::Version(cur))
                    } else {
                        match prev {
                            Some(Fallback::Version(p))
                                if self.try_version(block, &p)?.is_some() =>
                            {
                                Some(Fallback::Version(p))
                            }
                            Some(Fallback::Zeros) => Some(Fallback::Zeros),
                            _ => None,
                        }
                    }
                }
            },
        };
        st.durable[i] = found.map_or(Durable::Unreadable, Durable::Known);
        Ok(found)
    }

    fn write_meta_sector(&self, st: &State, block: u64) -> Res<()> {
        let first = block / ENTRIES_PER_SECTOR * ENTRIES_PER_SECTOR;
        let mut sector = vec![0u8; SECTOR as usize];
        for k in 0..ENTRIES_PER_SECTOR {
            let b = first + k;
            if b >= self.geo.n {
                break;
            }
            let raw = match st.meta[b as usize] {
                Meta::Ok(e) => e.encode(b, &self.mac_key),
                // Left as found: still refused on read until the block is written again.
                Meta::Corrupt => {
                    let mut junk = [0u8; ENTRY_BYTES];
                    junk[0] = 0xff;
                    junk
                }
            };
            let at = k as usize * ENTRY_BYTES;
            sector[at..at + ENTRY_BYTES].copy_from_slice(&raw);
        }
        self.lower
            .write(self.geo.meta_sector_offset(block), &sector)
            .map_err(io)
    }

    /// Stores a whole block's data in the slot the durable version is not in and updates its
    /// entry in memory; the caller writes the entry's metadata sector.
    fn write_block(&self, st: &mut State, block: u64, mut data: Vec<u8>, clear: bool) -> Res<()> {
        let durable = self.durable(st, block)?;
        let slot = match durable {
            Some(Fallback::Version(v)) => 1 - v.slot,
            _ => 0,
        };
        let mode = if clear { Mode::Clear } else { Mode::Encrypted };
        let version = self.sealer.seal(block, mode, slot, &mut data)?;
        self.lower
            .write(self.geo.slot_offset(block, slot), &data)
            .map_err(io)?;
        st.meta[block as usize] = Meta::Ok(Entry {
            cur: Some(version),
            prev: durable,
        });
        st.dirty.insert(block);
        let counter = if clear {
            &self.stats.blocks_clear
        } else {
            &self.stats.blocks_encrypted
        };
        counter.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Flushes below, then settles every block written since the last flush: its newest
    /// version is now durable and the fallback goes.
    fn flush(&self, st: &mut State) -> Res<()> {
        self.lower.flush().map_err(io)?;
        let dirty = std::mem::take(&mut st.dirty);
        let mut last_sector = None;
        for &block in &dirty {
            if let Meta::Ok(e) = &mut st.meta[block as usize] {
                st.durable[block as usize] = e.cur.map_or(Durable::Unreadable, |v| {
                    Durable::Known(Fallback::Version(v))
                });
                e.prev = None;
            }
        }
        for &block in &dirty {
            let sector = block / ENTRIES_PER_SECTOR;
            if last_sector != Some(sector) {
                last_sector = Some(sector);
                // Best effort: an unsettled entry on disk is still correct, only less strict.
                if let Err(e) = self.write_meta_sector(st, block) {
                    self.lower
                        .log(LogLevel::Warn, &format!("settling block {block}: {e}"));
                }
            }
        }
        Ok(())
    }

    fn read(&self, req: &mut Request<'_>) -> Res<()> {
        let st = self.state.lock().map_err(|_| "state lock poisoned")?;
        for p in block_pieces(req.offset(), req.len(), BLOCK) {
            let data = self.read_block(&st, p.block)?;
            req.write_data(p.at, &data[p.range()])
                .map_err(|e| format!("{e:?}"))?;
        }
        Ok(())
    }

    fn write(&self, req: &mut Request<'_>) -> Res<()> {
        let clear = req.disabled();
        let mut st = self.state.lock().map_err(|_| "state lock poisoned")?;
        // Each metadata sector is written once per request, after the data of its blocks
        // (any order of the two is crash-safe: docs/encryption.md), also when a block fails.
        let mut pending: Option<u64> = None;
        let mut result = Ok(());
        for p in block_pieces(req.offset(), req.len(), BLOCK) {
            let sector = p.block / ENTRIES_PER_SECTOR;
            if let Some(done) = pending.filter(|&s| s != sector) {
                result = self.write_meta_sector(&st, done * ENTRIES_PER_SECTOR);
                pending = None;
                if result.is_err() {
                    break;
                }
            }
            result = self.write_piece(req, &mut st, p, clear);
            if result.is_err() {
                break;
            }
            pending = Some(sector);
        }
        if let Some(last) = pending {
            let meta = self.write_meta_sector(&st, last * ENTRIES_PER_SECTOR);
            result = result.and(meta);
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
}

impl Interceptor for Encrypt {
    const NAME: &'static std::ffi::CStr = c"encrypt";
    // Its layout is its own: it stays in the path while disabled (writing new blocks in the
    // clear) and does all its I/O itself, so it never needs the shim's bounce buffers.
    const FLAGS: u32 = abi::F_KEEP_WHEN_DISABLED | abi::F_OWNS_FORMAT;

    fn create(ctx: CreateContext<'_>) -> Result<Self, String> {
        let cfg: Config = ctx.config_as()?;
        let key = key::read_key_file(&cfg.key_file)?;
        Encrypt::open_disk(ctx.lower, &key)
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
                match self.state.lock() {
                    Ok(mut st) => self.flush(&mut st),
                    Err(_) => Err("state lock poisoned".into()),
                }
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
        serde_json::json!({
            "capacity_bytes": self.geo.n * BLOCK,
            "epoch": self.epoch,
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
}

impl Drop for Encrypt {
    /// Settles what is left at shutdown, so that every block is strict again.
    fn drop(&mut self) {
        if let Ok(mut st) = self.state.lock() {
            if !st.dirty.is_empty() {
                if let Err(e) = self.flush(&mut st) {
                    self.lower.log(LogLevel::Warn, &format!("final flush: {e}"));
                }
            }
        }
    }
}

export_interceptor!(Encrypt);
