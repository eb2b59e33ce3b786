//! Sealing and opening one version of a block: AES-256-GCM for encrypted blocks, a GMAC tag
//! over the plain bytes for blocks written while disabled. The block number, the mode and
//! the slot are authenticated data, so a block moved elsewhere on disk fails to open.

use crate::layout::{Mode, Version};
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit, Nonce, Tag};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

pub struct Sealer {
    cipher: Aes256Gcm,
    /// This open's epoch (from 1; epoch 0 is the key check's).
    epoch: u32,
    /// Writes sealed in this epoch.
    counter: AtomicU64,
}

fn aad(block: u64, mode: Mode, slot: u8) -> [u8; 10] {
    let mut a = [0u8; 10];
    a[..8].copy_from_slice(&block.to_le_bytes());
    a[8] = mode as u8;
    a[9] = slot;
    a
}

impl Sealer {
    pub fn new(key: &[u8; 32], epoch: u32) -> Sealer {
        Sealer {
            cipher: Aes256Gcm::new(key.into()),
            epoch,
            counter: AtomicU64::new(0),
        }
    }

    /// The tag that proves a key is the disk's: GMAC of a fixed text under the all-zero nonce,
    /// which no write ever uses (write nonces carry an epoch of at least 1).
    pub fn key_check(key: &[u8; 32], blocks: u64) -> Result<[u8; 16], String> {
        let cipher = Aes256Gcm::new(key.into());
        let mut text = b"VMMCRYPT key check".to_vec();
        text.extend_from_slice(&blocks.to_le_bytes());
        let tag = cipher
            .encrypt_inout_detached(&Nonce::from([0u8; 12]), &text, (&mut [][..]).into())
            .map_err(|_| "cannot compute the key check".to_string())?;
        Ok(tag.into())
    }

    /// A nonce never used before under this key: the epoch (bumped and made durable at every
    /// open, before any write) and a counter of this open's writes.
    fn next_nonce(&self) -> Result<[u8; 12], String> {
        let n = self.counter.fetch_add(1, Relaxed);
        if n == u64::MAX {
            return Err("nonce counter exhausted; reopen the disk".into());
        }
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&self.epoch.to_le_bytes());
        nonce[4..].copy_from_slice(&n.to_le_bytes());
        Ok(nonce)
    }

    /// Seals `data` (a whole block) in place for `slot` of `block`; returns its version.
    pub fn seal(
        &self,
        block: u64,
        mode: Mode,
        slot: u8,
        data: &mut [u8],
    ) -> Result<Version, String> {
        let nonce = self.next_nonce()?;
        let a = aad(block, mode, slot);
        let tag = match mode {
            Mode::Encrypted => {
                self.cipher
                    .encrypt_inout_detached(&Nonce::from(nonce), &a, data.into())
            }
            Mode::Clear => {
                let mut all = a.to_vec();
                all.extend_from_slice(data);
                self.cipher
                    .encrypt_inout_detached(&Nonce::from(nonce), &all, (&mut [][..]).into())
            }
        }
        .map_err(|_| "sealing failed".to_string())?;
        Ok(Version {
            mode,
            slot,
            nonce,
            tag: tag.into(),
        })
    }

    /// Opens `data` (a whole block as stored in `v.slot`) in place; false if it fails its tag.
    pub fn open(&self, block: u64, v: &Version, data: &mut [u8]) -> bool {
        let a = aad(block, v.mode, v.slot);
        let nonce = &Nonce::from(v.nonce);
        let tag = &Tag::from(v.tag);
        match v.mode {
            Mode::Encrypted => self
                .cipher
                .decrypt_inout_detached(nonce, &a, data.into(), tag)
                .is_ok(),
            Mode::Clear => {
                let mut all = a.to_vec();
                all.extend_from_slice(data);
                self.cipher
                    .decrypt_inout_detached(nonce, &all, (&mut [][..]).into(), tag)
                    .is_ok()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_blocks_open_only_where_they_were_written() {
        let s = Sealer::new(&[3u8; 32], 1);
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
            assert!(
                !s.open(10, &other, &mut data.clone()),
                "moved to another slot"
            );
            let mut flipped = data.clone();
            flipped[100] ^= 4;
            assert!(!s.open(10, &v, &mut flipped), "a flipped bit");
        }
    }

    #[test]
    fn nonces_never_repeat_within_an_epoch_or_across_epochs() {
        let mut seen = std::collections::HashSet::new();
        for epoch in 1..4 {
            let s = Sealer::new(&[3u8; 32], epoch);
            for _ in 0..1000 {
                let v = s.seal(0, Mode::Encrypted, 0, &mut [0u8; 16]).unwrap();
                assert!(seen.insert(v.nonce));
            }
        }
        assert!(!seen.contains(&[0u8; 12]), "the key check's nonce");
    }
}
