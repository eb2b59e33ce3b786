//! Keys, sealing and opening one version of a block: AES-256-GCM for encrypted blocks, a GMAC
//! tag over the plain bytes for blocks written while disabled.
//!
//! Every open of a disk draws a random 128-bit open id and encrypts its writes under its own
//! data key, derived with BLAKE3 from the disk's key, the disk's random id and the open id;
//! the GCM nonce is the write's number within the open. So a (key, nonce) pair repeats only
//! if two opens under one disk key draw the same open id: with `q` opens in all, at most
//! `q^2 / 2^129` (docs/encryption.md). Nothing read from the image goes into a nonce, so
//! a restored, cloned, altered or concurrently opened image cannot make one repeat. The
//! block number, the mode and the slot are associated data: a block moved elsewhere fails.

use crate::node::{Mode, Version};
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit, Nonce, Tag};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// BLAKE3 key-derivation contexts, one per use of the disk key.
const CTX_HEADER: &str = "vmm encrypt interceptor v2 2026-12 header MAC";
const CTX_CHECK: &str = "vmm encrypt interceptor v2 2026-12 key check";
const CTX_META: &str = "vmm encrypt interceptor v2 2026-12 metadata MAC";
const CTX_DATA: &str = "vmm encrypt interceptor v2 2026-12 data key";

/// The header's MAC key (the header carries the disk id, so this key cannot depend on it).
pub fn header_key(key: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key(CTX_HEADER, key)
}

/// The key check: proves at open that the key is the disk's, without revealing it.
pub fn key_check(key: &[u8; 32], disk_id: &[u8; 16]) -> [u8; 16] {
    let k = blake3::derive_key(CTX_CHECK, key);
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::keyed_hash(&k, disk_id).as_bytes()[..16]);
    out
}

/// The tree's MAC key, bound to the disk: nodes copied from another disk never verify.
pub fn meta_key(key: &[u8; 32], disk_id: &[u8; 16]) -> [u8; 32] {
    let mut m = [0u8; 48];
    m[..32].copy_from_slice(key);
    m[32..].copy_from_slice(disk_id);
    blake3::derive_key(CTX_META, &m)
}

/// The data key of one open of one disk.
pub fn data_key(key: &[u8; 32], disk_id: &[u8; 16], open_id: &[u8; 16]) -> [u8; 32] {
    let mut m = [0u8; 64];
    m[..32].copy_from_slice(key);
    m[32..48].copy_from_slice(disk_id);
    m[48..].copy_from_slice(open_id);
    blake3::derive_key(CTX_DATA, &m)
}

/// Fresh random bytes from the kernel.
pub fn random16() -> Result<[u8; 16], String> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| format!("no random numbers from the kernel: {e}"))?;
    Ok(b)
}

fn aad(block: u64, mode: Mode, slot: u8) -> [u8; 10] {
    let mut a = [0u8; 10];
    a[..8].copy_from_slice(&block.to_le_bytes());
    a[8] = mode as u8;
    a[9] = slot;
    a
}

fn nonce(counter: u64) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&counter.to_le_bytes());
    Nonce::from(n)
}

/// Seals one block in place under `cipher` with the nonce of `counter`; returns the tag.
fn seal_with(
    cipher: &Aes256Gcm,
    counter: u64,
    block: u64,
    mode: Mode,
    slot: u8,
    data: &mut [u8],
) -> Option<[u8; 16]> {
    let a = aad(block, mode, slot);
    let tag = match mode {
        Mode::Encrypted => cipher.encrypt_inout_detached(&nonce(counter), &a, data.into()),
        Mode::Clear => {
            let mut all = a.to_vec();
            all.extend_from_slice(data);
            cipher.encrypt_inout_detached(&nonce(counter), &all, (&mut [][..]).into())
        }
    };
    tag.ok().map(Into::into)
}

fn open_with(cipher: &Aes256Gcm, block: u64, v: &Version, data: &mut [u8]) -> bool {
    let a = aad(block, v.mode, v.slot);
    let (n, tag) = (&nonce(v.counter), &Tag::from(v.tag));
    match v.mode {
        Mode::Encrypted => cipher
            .decrypt_inout_detached(n, &a, data.into(), tag)
            .is_ok(),
        Mode::Clear => {
            let mut all = a.to_vec();
            all.extend_from_slice(data);
            cipher
                .decrypt_inout_detached(n, &all, (&mut [][..]).into(), tag)
                .is_ok()
        }
    }
}

/// The ciphers of one disk: this open's, which seals, and those of earlier opens, which
/// open the blocks they wrote (derived on demand, the most recent few kept). Shared by
/// hooks that run side by side: the nonce counter is atomic, the earlier ciphers behind a
/// lock held only to look one up.
pub struct Sealer {
    key: [u8; 32],
    disk_id: [u8; 16],
    open_id: [u8; 16],
    cipher: Aes256Gcm,
    /// Writes sealed in this open: the next nonce.
    counter: AtomicU64,
    earlier: Mutex<lru::LruCache<[u8; 16], Aes256Gcm>>,
}

impl Sealer {
    /// The sealer of a new open of the disk `disk_id`, with the fresh random `open_id`.
    pub fn new(key: &[u8; 32], disk_id: [u8; 16], open_id: [u8; 16]) -> Sealer {
        let cipher = Aes256Gcm::new(&data_key(key, &disk_id, &open_id).into());
        Sealer {
            key: *key,
            disk_id,
            open_id,
            cipher,
            counter: AtomicU64::new(0),
            earlier: Mutex::new(lru::LruCache::new(NonZeroUsize::MIN.saturating_add(15))),
        }
    }

    pub fn open_id(&self) -> [u8; 16] {
        self.open_id
    }

    /// Seals `data` (a whole block) in place for `slot` of `block`; returns its version.
    pub fn seal(
        &self,
        block: u64,
        mode: Mode,
        slot: u8,
        data: &mut [u8],
    ) -> Result<Version, String> {
        let counter = self.reserve()?;
        self.seal_at(counter, block, mode, slot, data)
    }

    /// Hands out the next nonce of this open, each once (to [`seal_at`](Self::seal_at), or
    /// skipped); never one that wrapped around.
    pub fn reserve(&self) -> Result<u64, String> {
        self.counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_add(1))
            .map_err(|_| "this open has used all its nonces; reopen the disk".to_string())
    }

    /// Seals `data` (a whole block) in place for `slot` of `block` with the nonce
    /// `counter`, which [`reserve`](Self::reserve) handed out.
    pub fn seal_at(
        &self,
        counter: u64,
        block: u64,
        mode: Mode,
        slot: u8,
        data: &mut [u8],
    ) -> Result<Version, String> {
        let tag =
            seal_with(&self.cipher, counter, block, mode, slot, data).ok_or("sealing failed")?;
        Ok(Version {
            mode,
            slot,
            open_id: self.open_id,
            counter,
            tag,
        })
    }

    /// Opens `data` (a whole block as stored in `v.slot`) in place; false if it fails its tag.
    pub fn open(&self, block: u64, v: &Version, data: &mut [u8]) -> bool {
        if v.open_id == self.open_id {
            return open_with(&self.cipher, block, v, data);
        }
        // A copy of the earlier open's cipher (its round keys), so that no lock is held
        // while the block is opened.
        let cipher = {
            let mut earlier = self.earlier.lock().unwrap_or_else(|p| p.into_inner());
            let (key, disk) = (&self.key, &self.disk_id);
            earlier
                .get_or_insert(v.open_id, || {
                    Aes256Gcm::new(&data_key(key, disk, &v.open_id).into())
                })
                .clone()
        };
        open_with(&cipher, block, v, data)
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        self.key.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_blocks_open_only_where_they_were_written() {
        let s = Sealer::new(&[3u8; 32], [1; 16], [2; 16]);
        for mode in [Mode::Encrypted, Mode::Clear] {
            let plain = vec![0x42u8; 4096];
            let mut data = plain.clone();
            let v = s.seal(10, mode, 1, &mut data).unwrap();
            assert_eq!(data == plain, mode == Mode::Clear);
            let mut back = data.clone();
            assert!(s.open(10, &v, &mut back));
            assert_eq!(back, plain);
            assert!(!s.open(11, &v, &mut data.clone()), "moved to another block");
            let other = Version { slot: 0, ..v };
            assert!(!s.open(10, &other, &mut data.clone()), "another slot");
            let mut flipped = data.clone();
            flipped[100] ^= 4;
            assert!(!s.open(10, &v, &mut flipped), "a flipped bit");
            // Another disk under the same key cannot open it.
            let elsewhere = Sealer::new(&[3u8; 32], [9; 16], [2; 16]);
            assert!(!elsewhere.open(10, &v, &mut data.clone()), "another disk");
        }
    }

    #[test]
    fn a_later_open_reads_what_an_earlier_one_wrote_under_its_own_key() {
        let first = Sealer::new(&[3u8; 32], [1; 16], [2; 16]);
        let mut data = vec![7u8; 4096];
        let v = first.seal(5, Mode::Encrypted, 0, &mut data).unwrap();
        let second = Sealer::new(&[3u8; 32], [1; 16], [4; 16]);
        let mut same = vec![7u8; 4096];
        let w = second.seal(5, Mode::Encrypted, 0, &mut same).unwrap();
        assert_eq!(v.counter, w.counter, "both opens start their counters at 0");
        assert_ne!(data, same, "but under different keys: no keystream repeats");
        assert!(second.open(5, &v, &mut data));
        assert_eq!(data, vec![7u8; 4096]);
    }

    /// Threads sealing at once never get the same nonce, and an open whose counter is
    /// spent refuses to seal rather than wrap around.
    #[test]
    fn nonces_are_unique_across_threads_and_never_wrap() {
        let s = Sealer::new(&[3u8; 32], [1; 16], [2; 16]);
        let mut all: Vec<u64> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4)
                .map(|_| sc.spawn(|| (0..1000).map(|_| s.reserve().unwrap()).collect::<Vec<_>>()))
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4000);
        let spent = Sealer::new(&[3u8; 32], [1; 16], [2; 16]);
        spent.counter.store(u64::MAX, Ordering::Relaxed);
        let e = spent
            .seal(0, Mode::Encrypted, 0, &mut [0u8; 4096])
            .unwrap_err();
        assert!(e.contains("used all its nonces"), "{e}");
    }

    #[test]
    fn derived_keys_differ_by_disk_and_open() {
        let k = [3u8; 32];
        let a = data_key(&k, &[1; 16], &[2; 16]);
        assert_ne!(a, data_key(&k, &[1; 16], &[3; 16]));
        assert_ne!(a, data_key(&k, &[0; 16], &[2; 16]));
        assert_ne!(meta_key(&k, &[1; 16]), meta_key(&k, &[2; 16]));
        assert_ne!(key_check(&k, &[1; 16]), key_check(&[4; 32], &[1; 16]));
        assert_ne!(random16().unwrap(), random16().unwrap());
    }
}
