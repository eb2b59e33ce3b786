//! The encryption plugin opening images it did not write, and images it wrote that were
//! then tampered with.
//!
//! Two kinds of input. A raw image: fuzz bytes patched over a blank disk, opened (with
//! `format` on or off, any `min_generation`, a right or a wrong key) and, if it opens,
//! worked on. A history: a blank disk formatted and worked on over a few sessions (writes,
//! reads, flushes, crash images taken in between), with tampering between sessions: a
//! whole older image or a range of one put back, bits flipped, ranges moved, overwritten
//! or zeroed; then opened again and read.
//!
//! What must hold: nothing panics; a refusal is one line; every sector read with status
//! OK holds a version that was written there (or zeros), never anything else; and while
//! nobody tampered, every request succeeds and reads back exactly the last write.

use crate::disk::{scratch_dir, MemDisk};
use crate::input::Input;
use compat::{BlockRequestKind, BlockStack, InstanceSpec, Plugin, RequestStatus, Segment};
use interceptor_encrypt::Encrypt;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

const SECTOR: usize = 512;
const BLOCK: usize = 4096;
/// Most sectors one request covers.
const MAX_SECTORS: usize = 24;
const MAX_SESSIONS: usize = 3;
const MAX_OPS: usize = 12;
const MAX_SNAPSHOTS: usize = 4;

struct Keys {
    /// The key every history is written with, raw and as hex.
    good: PathBuf,
    good_hex: PathBuf,
    /// Another key, a key file of the wrong size, and none at all.
    other: PathBuf,
    short: PathBuf,
    missing: PathBuf,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = scratch_dir();
        let key: Vec<u8> = (0..32u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .collect();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).expect("key file");
            p
        };
        Keys {
            good: write("key-good", &key),
            good_hex: write("key-hex", format!("{hex}\n").as_bytes()),
            other: write("key-other", &[0x42; 32]),
            short: write("key-short", &key[..31]),
            missing: dir.join("key-missing"),
        }
    })
}

fn plugin() -> Arc<Plugin> {
    static PLUGIN: OnceLock<Arc<Plugin>> = OnceLock::new();
    PLUGIN
        .get_or_init(|| {
            Plugin::from_static("encrypt", interceptor_sdk::static_table!(Encrypt))
                .expect("encrypt table")
        })
        .clone()
}

/// The instance's config: usually the right key; the options from the input.
fn config(inp: &mut Input<'_>, history: bool) -> String {
    let k = keys();
    let key = match inp.u8() % 16 {
        0 => &k.other,
        1 => &k.short,
        2 => &k.missing,
        3 => &k.good_hex,
        _ => &k.good,
    };
    let format = !history && inp.one_in(4);
    let min_generation = match inp.u8() % 8 {
        0 => u64::from(inp.u8() % 8),
        1 => inp.u64(),
        _ => 0,
    };
    let cache_mib = inp.pick(&[16u64, 16, 0, 1]);
    let mut cfg = serde_json::json!({
        "key_file": key,
        "format": format,
        "min_generation": min_generation,
        "cache_mib": cache_mib,
    });
    if inp.one_in(32) {
        cfg["unknown"] = serde_json::json!(1);
    }
    cfg.to_string()
}

fn open(disk: &Arc<MemDisk>, config: &str) -> Result<Arc<BlockStack>, String> {
    let spec = InstanceSpec {
        id: "enc".into(),
        plugin: plugin(),
        config_json: config.to_string(),
        enabled: true,
    };
    let result = BlockStack::build("fuzz", disk.clone(), &[spec]).map_err(|e| e.to_string());
    if let Err(e) = &result {
        assert!(!e.contains('\n'), "a refusal is one line: {e:?}");
    }
    result
}

fn submit(
    stack: &BlockStack,
    kind: BlockRequestKind,
    offset: u64,
    buf: &mut [u8],
) -> RequestStatus {
    let seg = [Segment {
        base: buf.as_mut_ptr(),
        len: buf.len(),
    }];
    let segs: &[Segment] = if buf.is_empty() { &[] } else { &seg };
    // SAFETY: buf is valid for its length for the call; callers keep requests inside the
    // stack's capacity.
    unsafe { stack.submit(kind, offset, segs) }
}

/// The bytes of version `tag` of `sector`: never zeros, never another version's.
fn pattern(tag: u32, sector: u64) -> [u8; SECTOR] {
    let mut s = [0u8; SECTOR];
    for (i, chunk) in s.chunks_mut(16).enumerate() {
        chunk[..4].copy_from_slice(&tag.to_le_bytes());
        chunk[4..12].copy_from_slice(&sector.to_le_bytes());
        chunk[12..].copy_from_slice(&(i as u32 | 0x8000_0000).to_le_bytes());
    }
    s
}

/// What may be read back: every version written to each sector, the last one last.
#[derive(Default)]
struct History {
    versions: HashMap<u64, Vec<u32>>,
    next_tag: u32,
    /// No one has touched the image behind the plugin's back.
    clean: bool,
}

impl History {
    fn check(&self, sector: u64, data: &[u8]) {
        let versions = self.versions.get(&sector).map_or(&[][..], |v| &v[..]);
        if self.clean {
            let want = versions
                .last()
                .map_or([0u8; SECTOR], |&t| pattern(t, sector));
            assert!(
                data == want,
                "sector {sector}: not the last version written"
            );
            return;
        }
        let known =
            data.iter().all(|&b| b == 0) || versions.iter().any(|&t| data == pattern(t, sector));
        assert!(
            known,
            "sector {sector} reads back bytes never written there"
        );
    }
}

/// One open-work-close of the image; false if the plugin refused it.
fn session(
    inp: &mut Input<'_>,
    disk: &Arc<MemDisk>,
    cfg: &str,
    h: &mut History,
    snaps: &mut Vec<Vec<u8>>,
) -> bool {
    let opened = open(disk, cfg);
    trace!(
        "encrypt: open with {cfg}: {:?}",
        opened.as_ref().map(|s| s.capacity())
    );
    let stack = match opened {
        Ok(s) => s,
        Err(e) => {
            assert!(!h.clean, "a clean image was refused: {e}");
            return false;
        }
    };
    let sectors = stack.capacity() / SECTOR as u64;
    let ops = inp.below(MAX_OPS + 1);
    for _ in 0..ops {
        let op = inp.u8() % 8;
        if sectors == 0 && op < 5 {
            continue;
        }
        let (first, count) = if sectors == 0 {
            (0, 0)
        } else {
            let first = inp.below(sectors as usize) as u64;
            let room = MAX_SECTORS.min((sectors - first) as usize);
            (first, 1 + inp.below(room))
        };
        match op {
            0..=2 => {
                let mut buf = Vec::with_capacity(count * SECTOR);
                for s in first..first + count as u64 {
                    h.next_tag += 1;
                    buf.extend_from_slice(&pattern(h.next_tag, s));
                    h.versions.entry(s).or_default().push(h.next_tag);
                }
                let status = submit(
                    &stack,
                    BlockRequestKind::Write,
                    first * SECTOR as u64,
                    &mut buf,
                );
                assert!(
                    !h.clean || status == RequestStatus::Ok,
                    "a write failed: {status:?}"
                );
            }
            3 | 4 => {
                let mut buf = vec![0u8; count * SECTOR];
                let status = submit(
                    &stack,
                    BlockRequestKind::Read,
                    first * SECTOR as u64,
                    &mut buf,
                );
                assert!(
                    !h.clean || status == RequestStatus::Ok,
                    "a read failed: {status:?}"
                );
                if status == RequestStatus::Ok {
                    for (i, data) in buf.chunks(SECTOR).enumerate() {
                        h.check(first + i as u64, data);
                    }
                }
            }
            5 => {
                let status = stack.flush();
                assert!(
                    !h.clean || status == RequestStatus::Ok,
                    "a flush failed: {status:?}"
                );
            }
            6 => {
                // A crash image: what the disk holds now, unflushed writes and all.
                if snaps.len() < MAX_SNAPSHOTS {
                    snaps.push(disk.image());
                }
            }
            _ => {
                let mut id = [0u8; 20];
                let _ = submit(&stack, BlockRequestKind::GetId, 0, &mut id);
                if let Some(enc) = stack.instance("enc") {
                    let stats = enc.plugin_stats();
                    assert!(stats.is_ok(), "stats: {stats:?}");
                }
            }
        }
    }
    let status = stack.flush();
    assert!(
        !h.clean || status == RequestStatus::Ok,
        "the last flush failed: {status:?}"
    );
    drop(stack);
    true
}

/// Somewhere worth changing: the header block, the tree, the data, or anywhere.
fn place(inp: &mut Input<'_>, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let at = match inp.u8() % 4 {
        0 => inp.below(BLOCK.min(len)),
        1 => inp.below(1024.min(len)),
        _ => inp.u32() as usize % len,
    };
    at.min(len - 1)
}

fn tamper(inp: &mut Input<'_>, disk: &MemDisk, snaps: &[Vec<u8>]) {
    let mut image = disk.lock();
    let len = image.len();
    if len == 0 {
        return;
    }
    match inp.u8() % 6 {
        0 if !snaps.is_empty() => {
            let old = &snaps[inp.below(snaps.len())];
            image.copy_from_slice(old);
        }
        1 if !snaps.is_empty() => {
            let old = &snaps[inp.below(snaps.len())];
            let at = place(inp, len) & !(SECTOR - 1);
            let n = (SECTOR * (1 + inp.below(16))).min(len - at);
            image[at..at + n].copy_from_slice(&old[at..at + n]);
        }
        2 => {
            let at = place(inp, len);
            image[at] ^= 1 << (inp.u8() % 8);
        }
        3 => {
            let at = place(inp, len);
            let bytes = inp.chunk(64);
            let n = bytes.len().min(len - at);
            image[at..at + n].copy_from_slice(&bytes[..n]);
        }
        4 => {
            let from = place(inp, len) & !(SECTOR - 1);
            let to = place(inp, len) & !(SECTOR - 1);
            let n = (SECTOR * (1 + inp.below(8))).min(len - from).min(len - to);
            image.copy_within(from..from + n, to);
        }
        _ => {
            let at = place(inp, len);
            let n = (1 + inp.below(BLOCK)).min(len - at);
            image[at..at + n].fill(0);
        }
    }
}

/// Image sizes: too small to encrypt, one or a few data blocks (one tree level), a few
/// hundred (two), past 512 data blocks (three); and sizes that are not whole blocks.
fn image_bytes(inp: &mut Input<'_>) -> usize {
    let blocks = match inp.u8() % 16 {
        0 => 1,
        1 => 2,
        2 => 3,
        3..=6 => 8,
        7..=10 => 16,
        11 | 12 => 64,
        13 | 14 => 300,
        _ => 1100,
    };
    // Drivers expose whole sectors.
    let odd = if inp.one_in(8) {
        SECTOR * inp.below(BLOCK / SECTOR)
    } else {
        0
    };
    blocks * BLOCK + odd
}

pub fn encrypt_open(data: &[u8]) {
    let mut inp = Input::new(data);
    let bytes = image_bytes(&mut inp);
    let disk = Arc::new(MemDisk::new(bytes));
    let mut h = History::default();
    let mut snaps = Vec::new();
    if inp.one_in(4) {
        // A raw image: fuzz bytes over a blank disk.
        {
            let mut image = disk.lock();
            let patches = inp.below(8);
            for _ in 0..patches {
                let at = place(&mut inp, bytes);
                let chunk = inp.chunk(255);
                let n = chunk.len().min(bytes.saturating_sub(at));
                image[at..at + n].copy_from_slice(&chunk[..n]);
            }
        }
        let cfg = config(&mut inp, false);
        session(&mut inp, &disk, &cfg, &mut h, &mut snaps);
        return;
    }
    // A history, written with the good key.
    let good = serde_json::json!({ "key_file": keys().good }).to_string();
    // A blank disk of four blocks or more formats (header, one leaf, two slots per block).
    let too_small = bytes / BLOCK < 4;
    h.clean = !too_small;
    let opened = session(&mut inp, &disk, &good, &mut h, &mut snaps);
    assert!(
        opened || too_small,
        "a blank image of {bytes} bytes was refused"
    );
    if !opened {
        return;
    }
    snaps.push(disk.image());
    for _ in 1..MAX_SESSIONS {
        let tampering = inp.below(4);
        for _ in 0..tampering {
            tamper(&mut inp, &disk, &snaps);
            h.clean = false;
        }
        let cfg = if h.clean {
            good.clone()
        } else {
            config(&mut inp, true)
        };
        session(&mut inp, &disk, &cfg, &mut h, &mut snaps);
        if snaps.len() < MAX_SNAPSHOTS {
            snaps.push(disk.image());
        }
        if inp.is_empty() {
            break;
        }
    }
    // Everything read back once more.
    if let Ok(stack) = open(&disk, &good) {
        let sectors = stack.capacity() / SECTOR as u64;
        let mut buf = vec![0u8; BLOCK];
        for block in 0..(sectors * SECTOR as u64).div_ceil(BLOCK as u64).min(64) {
            let n = (sectors * SECTOR as u64 - block * BLOCK as u64).min(BLOCK as u64) as usize;
            let status = submit(
                &stack,
                BlockRequestKind::Read,
                block * BLOCK as u64,
                &mut buf[..n],
            );
            assert!(
                !h.clean || status == RequestStatus::Ok,
                "a read failed: {status:?}"
            );
            if status == RequestStatus::Ok {
                for (i, d) in buf[..n].chunks(SECTOR).enumerate() {
                    h.check(block * (BLOCK / SECTOR) as u64 + i as u64, d);
                }
            }
        }
    } else {
        assert!(!h.clean, "a clean image was refused at the end");
    }
}
